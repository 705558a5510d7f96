//! The push protocol with simulated agents over real mTLS: bursts coalesce into one push per
//! device, an idle fleet costs no database query, silent devices go OFFLINE, and the device watch
//! streams what changes. SQLite, or PostgreSQL with FLOTILLA_TEST_DATABASE_URL.

use crate::support;

use flotilla::control::{Policy, SessionSettings};
use flotilla::hub::{Debounce, SyncState};
use flotilla::proto::admin::v1 as admin;
use flotilla::proto::admin::v1::device_service_client::DeviceServiceClient;
use flotilla::proto::admin::v1::fleet_service_client::FleetServiceClient;
use flotilla::proto::agent::v1 as agent;
use std::collections::BTreeMap;
use std::time::Duration;
use support::sim::{SimAgent, all_synced, connect_fleet};
use support::{TestServer, channel, wait_for};

fn web_fleet(content: &str) -> admin::ApplyFleetRequest {
    admin::ApplyFleetRequest {
        name: "web".into(),
        selector: "role=web".into(),
        label_defaults: Default::default(),
        template: Some(agent::DeviceSpec {
            files: vec![agent::FileSpec {
                path: "/etc/{{ device.name }}.conf".into(),
                content: format!("{content} on {{{{ device.labels.site }}}}\n"),
                mode: 0o644,
                ..Default::default()
            }],
            ..Default::default()
        }),
        rollout: None,
    }
}

fn role(value: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("role".to_string(), value.to_string())])
}

/// Enrolls `names` with `labels` and connects a simulated agent for each.
/// Enrolls `names` with `labels` and connects a simulated agent for each.
async fn fleet_of(
    server: &TestServer,
    names: &[&str],
    labels: BTreeMap<String, String>,
    heartbeat: Duration,
) -> Vec<(String, SimAgent)> {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    connect_fleet(server, &names, &labels, heartbeat, None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_fleet_edits_is_one_push_per_device() {
    // A long maximum delay makes the outcome independent of how fast this machine applies edits.
    let server = TestServer::start_with(Policy {
        debounce: Debounce {
            quiet: Duration::from_millis(400),
            max_delay: Duration::from_secs(60),
        },
        ..Policy::default()
    })
    .await;
    let web = fleet_of(
        &server,
        &["web-1", "web-2", "web-3"],
        role("web"),
        Duration::from_secs(5),
    )
    .await;
    let other = fleet_of(&server, &["db-1"], role("db"), Duration::from_secs(5)).await;
    let mut fleets =
        FleetServiceClient::new(channel(&server.admin_url, &server.admin_creds()).await);
    fleets.apply_fleet(web_fleet("edit 0")).await.unwrap();
    all_synced(&server, &web).await;
    all_synced(&server, &other).await;
    let before: Vec<usize> = web.iter().map(|(_, a)| a.seen().pushes.len()).collect();
    let other_before = other[0].1.seen().pushes.len();
    let pushes_before = server.control.hub().pushes();

    for edit in 1..=100 {
        fleets
            .apply_fleet(web_fleet(&format!("edit {edit}")))
            .await
            .unwrap();
    }
    let revision = fleets
        .get_fleet(admin::GetFleetRequest { name: "web".into() })
        .await
        .unwrap()
        .into_inner()
        .revision;
    assert_eq!(revision, 101, "every edit is a revision");
    all_synced(&server, &web).await;
    // Give a straggling second wave the chance to show up before counting.
    tokio::time::sleep(Duration::from_secs(1)).await;

    for ((id, agent), before) in web.iter().zip(before) {
        let seen = agent.seen();
        assert_eq!(seen.pushes.len() - before, 1, "{id}: {:?}", seen.pushes);
        let desired = server.control.hub().desired(id).unwrap();
        assert_eq!(
            seen.pushes.last(),
            Some(&desired.version),
            "the last edit won"
        );
    }
    assert_eq!(
        other[0].1.seen().pushes.len(),
        other_before,
        "other fleets untouched"
    );
    assert_eq!(server.control.hub().pushes() - pushes_before, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_fleet_makes_no_database_queries() {
    let server = TestServer::start_with(Policy {
        session: SessionSettings {
            heartbeat_interval: Duration::from_millis(100),
            silence_timeout: Duration::from_secs(5),
            ..SessionSettings::default()
        },
        ..Policy::default()
    })
    .await;
    let agents = fleet_of(
        &server,
        &["idle-1", "idle-2", "idle-3"],
        role("web"),
        Duration::from_millis(50),
    )
    .await;
    let mut fleets =
        FleetServiceClient::new(channel(&server.admin_url, &server.admin_creds()).await);
    fleets.apply_fleet(web_fleet("idle")).await.unwrap();
    all_synced(&server, &agents).await;
    // Let the session-start bookkeeping settle.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let store = server.control.store().clone();
    let queries_before = store.operation_count();
    let beats_before: usize = agents.iter().map(|(_, a)| a.seen().heartbeats_sent).sum();
    let seen_before = server
        .control
        .hub()
        .status(&agents[0].0)
        .unwrap()
        .last_seen_ms;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Reads are served from memory too.
    let mut devices =
        DeviceServiceClient::new(channel(&server.admin_url, &server.admin_creds()).await);
    let listed = devices
        .list_devices(admin::ListDevicesRequest {
            selector: "role=web".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .devices;
    assert_eq!(listed.len(), 3);
    fleets
        .get_fleet(admin::GetFleetRequest { name: "web".into() })
        .await
        .unwrap();

    let beats: usize = agents.iter().map(|(_, a)| a.seen().heartbeats_sent).sum();
    assert!(
        beats - beats_before >= 30,
        "heartbeats flowed: {}",
        beats - beats_before
    );
    let seen_after = server
        .control
        .hub()
        .status(&agents[0].0)
        .unwrap()
        .last_seen_ms;
    assert!(
        seen_after > seen_before,
        "last_seen follows heartbeats in memory"
    );
    assert_eq!(
        store.operation_count(),
        queries_before,
        "no database work while idle"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_device_goes_offline_and_a_chatty_one_stays_online() {
    let server = TestServer::start_with(Policy {
        session: SessionSettings {
            heartbeat_interval: Duration::from_millis(100),
            silence_timeout: Duration::from_millis(600),
            ..SessionSettings::default()
        },
        ..Policy::default()
    })
    .await;
    let chatty = fleet_of(
        &server,
        &["chatty"],
        role("web"),
        Duration::from_millis(100),
    )
    .await;
    let silent = fleet_of(&server, &["silent"], role("web"), Duration::from_secs(3600)).await;
    all_synced(&server, &chatty).await;
    let hub = server.control.hub().clone();
    let silent_id = silent[0].0.clone();
    wait_for("the silent device OFFLINE", Duration::from_secs(10), || {
        let hub = hub.clone();
        let id = silent_id.clone();
        async move { (hub.status(&id)?.state == SyncState::Offline).then_some(()) }
    })
    .await;
    let chatty_status = hub.status(&chatty[0].0).unwrap();
    assert!(chatty_status.online);
    assert_eq!(chatty_status.state, SyncState::Synced);
}

async fn next_event(
    stream: &mut tonic::Streaming<admin::DeviceEvent>,
) -> (admin::device_event::Type, String, String) {
    let event = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an event in time")
        .unwrap()
        .expect("the stream stays open");
    let kind = event.r#type();
    let device = event.device.unwrap_or_default();
    (kind, device.name, device.fleet)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_the_set_then_its_changes() {
    use admin::device_event::Type;
    let server = TestServer::start().await;
    let _web = fleet_of(
        &server,
        &["w-1", "w-2"],
        role("web"),
        Duration::from_secs(5),
    )
    .await;
    let _db = fleet_of(&server, &["d-1"], role("db"), Duration::from_secs(5)).await;
    let admin_channel = channel(&server.admin_url, &server.admin_creds()).await;
    let mut devices = DeviceServiceClient::new(admin_channel.clone());
    let mut stream = devices
        .watch_devices(admin::WatchDevicesRequest {
            selector: "role=web".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = next_event(&mut stream).await;
    let second = next_event(&mut stream).await;
    assert_eq!((first.0, first.1.as_str()), (Type::Added, "w-1"));
    assert_eq!((second.0, second.1.as_str()), (Type::Added, "w-2"));
    assert_eq!(next_event(&mut stream).await.0, Type::Synced);

    // A fleet now owns them: each is MODIFIED with its fleet.
    FleetServiceClient::new(admin_channel)
        .apply_fleet(web_fleet("watched"))
        .await
        .unwrap();
    let mut owned = std::collections::BTreeSet::new();
    while owned.len() < 2 {
        let (kind, name, fleet) = next_event(&mut stream).await;
        assert_eq!(kind, Type::Modified);
        if fleet == "web" {
            owned.insert(name);
        }
    }

    // Relabelled out of the selection: DELETED; back in: ADDED.
    devices
        .label_device(admin::LabelDeviceRequest {
            name: "w-2".into(),
            set: [("role".to_string(), "db".to_string())].into(),
            remove: vec![],
        })
        .await
        .unwrap();
    loop {
        let (kind, name, _) = next_event(&mut stream).await;
        if kind == Type::Deleted {
            assert_eq!(name, "w-2");
            break;
        }
    }
    let invalid = devices
        .watch_devices(admin::WatchDevicesRequest {
            selector: "role in (".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_and_ack_bookkeeping_is_written_behind_and_flushed() {
    let server = TestServer::start().await;
    let names: Vec<String> = (0..20).map(|i| format!("book-{i:02}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let agents = fleet_of(&server, &names, role("web"), Duration::from_secs(5)).await;
    let mut fleets =
        FleetServiceClient::new(channel(&server.admin_url, &server.admin_creds()).await);
    fleets.apply_fleet(web_fleet("book")).await.unwrap();
    all_synced(&server, &agents).await;

    server.control.flush_journal().await;
    let stored = server.control.store().list_devices().await.unwrap();
    for (id, _) in &agents {
        let live = server.control.hub().status(id).unwrap();
        let row = stored.iter().find(|d| &d.id == id).expect("device row");
        assert_eq!(row.acked_version, live.acked_version, "{id}");
        assert!(row.acked_version.is_some(), "{id}");
        assert!(row.last_seen_ms.is_some(), "{id}: session start recorded");
    }

    // Session ends are recorded too: last_seen moves when the agents go away.
    let before: Vec<Option<i64>> = stored.iter().map(|d| d.last_seen_ms).collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(agents);
    wait_for("every session closed", Duration::from_secs(20), || {
        let hub = server.control.hub().clone();
        async move { (hub.connected() == 0).then_some(()) }
    })
    .await;
    server.control.flush_journal().await;
    let after: Vec<Option<i64>> = server
        .control
        .store()
        .list_devices()
        .await
        .unwrap()
        .iter()
        .map(|d| d.last_seen_ms)
        .collect();
    assert!(
        before.iter().zip(&after).all(|(b, a)| a > b),
        "{before:?} → {after:?}"
    );
}

#[tokio::test]
async fn a_large_spec_travels_whole_through_the_stream() {
    // Stream buffers start small (see proto::codec); a spec near the 1 MiB limit must still arrive
    // intact, and the agent's large ACK path must too.
    let server = TestServer::start().await;
    let (creds, id) = server.enroll_device("large").await;
    let mut session = support::sim::RawSession::open(&server.agent_url, &creds, &id)
        .await
        .unwrap();
    let content: String = (0..900 * 1024)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let spec = agent::DeviceSpec {
        files: vec![agent::FileSpec {
            path: "/etc/large.conf".into(),
            content: content.clone(),
            mode: 0o644,
            ..Default::default()
        }],
        ..Default::default()
    };
    DeviceServiceClient::new(channel(&server.admin_url, &server.admin_creds()).await)
        .apply_device(admin::ApplyDeviceRequest {
            name: "large".into(),
            spec: Some(spec),
            labels: None,
        })
        .await
        .unwrap();
    let pushed = session
        .next_matching(|kind| match kind {
            // The first push is the empty spec the device had on connecting.
            agent::server_message::Kind::Spec(push) => push.spec.filter(|s| !s.files.is_empty()),
            _ => None,
        })
        .await
        .expect("the large spec is pushed");
    let file = &pushed.files[0];
    assert_eq!(file.content.len(), content.len());
    assert!(file.content == content, "content arrives unchanged");
}

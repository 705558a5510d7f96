//! The hub's sessions, pushes, answers and waves; waves and certificate windows in virtual time
//! (tokio's paused clock, which the hub's clock follows).

use super::*;
use crate::spec::FileSpec;
use crate::status::conditions::{ConditionStatus, ConditionType};
use std::time::Duration;

fn rendered(content: &str) -> Arc<Rendered> {
    Rendered::new(DeviceSpec {
        files: vec![FileSpec::new("/etc/x", content)],
        ..Default::default()
    })
}

/// What the hub is loaded with for `device_id`: `desired`, nothing answered or seen yet.
fn seed(device_id: &str, desired: Arc<Rendered>) -> Seed {
    Seed {
        device_id: device_id.into(),
        desired: Ok(desired),
        acked_version: None,
        nacked: None,
        last_seen_ms: None,
        report: None,
    }
}

/// A loaded hub of `devices`, each to run the same `rendered("0")`.
fn hub_of(devices: &[&str]) -> Hub {
    let hub = Hub::new();
    hub.load(devices.iter().map(|id| seed(id, rendered("0"))).collect());
    hub
}

/// A hub of device `d`, to run `rendered("1")`, on tokio's (paused) clock from `start_ms`.
fn hub_in_virtual_time(start_ms: i64) -> Hub {
    let hub = Hub::with_clock(Clock::following_tokio(start_ms));
    hub.load(vec![seed("d", rendered("1"))]);
    hub
}

fn hub_with(device: &str, desired: Arc<Rendered>) -> Hub {
    let hub = Hub::new();
    hub.load(vec![seed(device, desired)]);
    hub
}

#[test]
fn refuses_sessions_until_loaded_and_for_unknown_devices() {
    let hub = Hub::new();
    assert_eq!(
        hub.open_session("d", "", "s", 0).unwrap_err(),
        HubError::NotReady
    );
    hub.load(vec![]);
    assert_eq!(
        hub.open_session("d", "", "s", 0).unwrap_err(),
        HubError::UnknownDevice("d".into())
    );
}

#[test]
fn push_ack_cycle_and_resume_without_push() {
    let v1 = rendered("1");
    let hub = hub_with("d", v1.clone());
    let (s, current) = hub.open_session("d", "", "s", 0).unwrap();
    assert_eq!(current, v1.version);
    assert_eq!(hub.status("d").unwrap().state, SyncState::Pending);
    let push = hub.next_push("d", s.id).unwrap();
    assert_eq!(push.rendered.version, v1.version);
    assert!(hub.next_push("d", s.id).is_none(), "sent once only");
    assert_eq!(hub.ack("d", s.id, "bogus"), Answer::Stale);
    assert!(matches!(
        hub.ack("d", s.id, &push.nonce),
        Answer::Recorded { .. }
    ));
    assert_eq!(hub.status("d").unwrap().state, SyncState::Synced);

    hub.close_session("d", s.id, 1);
    assert_eq!(hub.status("d").unwrap().state, SyncState::Offline);
    let (s2, _) = hub.open_session("d", &v1.version, "s", 2).unwrap();
    assert!(hub.next_push("d", s2.id).is_none(), "resume costs nothing");
    assert_eq!(hub.status("d").unwrap().state, SyncState::Synced);
}

#[test]
fn nacked_version_is_not_resent_until_a_new_one_arrives() {
    let hub = hub_with("d", rendered("1"));
    let (s, _) = hub.open_session("d", "", "s", 0).unwrap();
    let push = hub.next_push("d", s.id).unwrap();
    hub.nack("d", s.id, &push.nonce, "disk full");
    let status = hub.status("d").unwrap();
    assert_eq!(status.state, SyncState::Error);
    assert_eq!(status.last_error.as_deref(), Some("disk full"));
    assert!(hub.next_push("d", s.id).is_none());
    hub.set_desired("d", rendered("2"));
    hub.release_wave();
    assert!(hub.next_push("d", s.id).is_some());
}

#[test]
fn a_rejection_of_a_version_no_longer_wanted_is_not_shown_as_the_last_error() {
    let v1 = rendered("1");
    let hub = hub_with("d", v1.clone());
    let (s, _) = hub.open_session("d", &v1.version, "s", 0).unwrap();
    hub.set_desired("d", rendered("2"));
    hub.release_wave();
    let push = hub.next_push("d", s.id).unwrap();
    hub.nack("d", s.id, &push.nonce, "disk full");
    assert_eq!(
        hub.status("d").unwrap().last_error.as_deref(),
        Some("disk full")
    );
    // Back to the version the device runs: SYNCED, and the old rejection is history.
    hub.set_desired("d", v1);
    hub.release_wave();
    let status = hub.status("d").unwrap();
    assert_eq!(status.state, SyncState::Synced);
    assert_eq!(status.last_error, None);
    assert_eq!(status.summary, crate::status::conditions::Summary::Healthy);
}

#[test]
fn changes_are_held_until_the_wave_and_coalesce() {
    let hub = hub_with("d", rendered("0"));
    let (s, _) = hub.open_session("d", "", "s", 0).unwrap();
    let push = hub.next_push("d", s.id).unwrap();
    hub.ack("d", s.id, &push.nonce);
    for i in 1..=50 {
        hub.set_desired("d", rendered(&i.to_string()));
    }
    assert!(hub.next_push("d", s.id).is_none(), "held until released");
    assert_eq!(hub.status("d").unwrap().state, SyncState::Pending);
    assert_eq!(hub.release_wave(), 1);
    let push = hub.next_push("d", s.id).unwrap();
    assert_eq!(push.rendered.version, rendered("50").version);
    assert!(hub.next_push("d", s.id).is_none());
    assert_eq!(hub.pushes(), 2);
}

/// Only sessions held here wait for a wave: a device whose session is elsewhere (or nowhere)
/// neither joins the wave nor restarts its quiet period, and a session opened here later gets
/// the newest spec at once.
#[test]
fn only_devices_with_a_session_here_wait_for_the_wave() {
    let hub = hub_of(&["here", "elsewhere"]);
    let (s, _) = hub.open_session("here", "", "s", 0).unwrap();
    let generation = hub.generation.load(Ordering::Relaxed);
    assert!(hub.set_desired("elsewhere", rendered("1")));
    assert_eq!(hub.generation.load(Ordering::Relaxed), generation);
    assert_eq!(
        hub.status("elsewhere").unwrap().desired_version,
        rendered("1").version
    );
    assert!(hub.set_desired("here", rendered("1")));
    assert!(hub.generation.load(Ordering::Relaxed) > generation);
    assert_eq!(hub.release_wave(), 1, "only the device with a session here");
    assert_eq!(
        hub.next_push("here", s.id).unwrap().rendered.version,
        rendered("1").version
    );
    let (later, _) = hub.open_session("elsewhere", "", "s", 0).unwrap();
    assert_eq!(
        hub.next_push("elsewhere", later.id)
            .unwrap()
            .rendered
            .version,
        rendered("1").version
    );
}

#[test]
fn renders_of_sessions_held_here_come_first() {
    let hub = hub_of(&["a", "b", "c", "d"]);
    hub.open_session("b", "", "s", 0).unwrap();
    hub.open_session("d", "", "s", 0).unwrap();
    let order = hub.sessions_first(["a", "b", "c", "d", "unknown"].map(String::from));
    assert_eq!(order, ["b", "d", "a", "c", "unknown"]);
}

/// A new render is announced to the watchers once, and says so, so its caller does not announce
/// the device again; the same render, or the same failure again, announces nothing.
#[test]
fn a_new_render_is_announced_once_and_a_repeat_not_at_all() {
    let hub = hub_with("d", rendered("1"));
    let mut events = hub.subscribe();
    assert!(!hub.set_desired("d", rendered("1")), "same content");
    assert!(hub.set_desired("d", rendered("2")));
    assert!(hub.set_render_failed("d", "undefined label".into()));
    assert!(!hub.set_render_failed("d", "undefined label".into()));
    assert!(hub.set_desired("d", rendered("2")), "the failure is over");
    let mut announced = 0;
    while let Ok(id) = events.try_recv() {
        assert_eq!(id, "d");
        announced += 1;
    }
    assert_eq!(announced, 3);
}

/// A batch of renders is handed over as one: the device with a session here joins the wave, the
/// one held elsewhere takes its new spec without waiting, a failure is recorded, and every device
/// of the batch the hub knows is announced once, changed or not.
#[test]
fn a_batch_of_renders_is_taken_in_one_go_and_each_device_announced_once() {
    let hub = hub_of(&["here", "elsewhere", "broken", "same"]);
    let (s, _) = hub.open_session("here", "", "s", 0).unwrap();
    let first = hub.next_push("here", s.id).unwrap();
    hub.ack("here", s.id, &first.nonce);
    let mut events = hub.subscribe();
    let generation = hub.generation.load(Ordering::Relaxed);
    hub.apply_renders(vec![
        ("here".into(), Some(Ok(rendered("1")))),
        ("elsewhere".into(), Some(Ok(rendered("1")))),
        ("broken".into(), Some(Err("undefined label".into()))),
        ("same".into(), Some(Ok(rendered("0")))),
        ("deleted".into(), None),
    ]);
    assert_eq!(hub.generation.load(Ordering::Relaxed), generation + 1);
    assert!(hub.next_push("here", s.id).is_none(), "held for the wave");
    assert_eq!(hub.status("here").unwrap().state, SyncState::Pending);
    assert_eq!(
        hub.status("elsewhere").unwrap().desired_version,
        rendered("1").version
    );
    let broken = hub.status("broken").unwrap();
    assert_eq!(broken.render_error.as_deref(), Some("undefined label"));
    assert_eq!(broken.desired_version, rendered("0").version);
    assert!(
        hub.status("deleted").is_none(),
        "no entry for a device gone"
    );
    let mut announced: Vec<String> = std::iter::from_fn(|| events.try_recv().ok()).collect();
    announced.sort();
    assert_eq!(
        announced,
        ["broken", "deleted", "elsewhere", "here", "same"]
    );
    assert_eq!(hub.release_wave(), 1);
    assert_eq!(
        hub.next_push("here", s.id).unwrap().rendered.version,
        rendered("1").version
    );
}

#[test]
fn a_render_failure_is_an_error_and_keeps_the_last_good_spec() {
    let good = rendered("1");
    let hub = hub_with("d", good.clone());
    let (s, _) = hub.open_session("d", &good.version, "s", 0).unwrap();
    hub.set_render_failed("d", "undefined label".into());
    let status = hub.status("d").unwrap();
    assert_eq!(status.state, SyncState::Error);
    assert_eq!(status.desired_version, good.version);
    assert!(hub.next_push("d", s.id).is_none());
    hub.set_desired("d", good.clone());
    assert_eq!(hub.status("d").unwrap().state, SyncState::Synced);
}

#[test]
fn a_newer_session_replaces_the_older() {
    let hub = hub_with("d", rendered("1"));
    let (old, _) = hub.open_session("d", "", "s", 0).unwrap();
    let (new, _) = hub.open_session("d", "", "s", 0).unwrap();
    assert!(hub.next_push("d", old.id).is_none());
    assert!(hub.next_push("d", new.id).is_some());
    assert!(
        !hub.close_session("d", old.id, 1),
        "the old one was no longer the device's session"
    );
    assert!(
        hub.status("d").unwrap().online,
        "closing the old one keeps the new"
    );
    assert_eq!(hub.connected(), 1);
    assert!(hub.close_session("d", new.id, 2), "the new one was");
}

#[tokio::test(start_paused = true)]
async fn a_change_waits_for_quiet_and_a_steady_burst_for_the_maximum_delay() {
    let hub = Arc::new(hub_with("d", rendered("0")));
    let (s, _) = hub.open_session("d", "", "s", 0).unwrap();
    let first = hub.next_push("d", s.id).unwrap();
    hub.ack("d", s.id, &first.nonce);
    let debounce = Debounce {
        quiet: Duration::from_millis(150),
        max_delay: Duration::from_secs(2),
    };
    tokio::spawn({
        let hub = hub.clone();
        async move { hub.run_waves(debounce).await }
    });

    hub.set_desired("d", rendered("1"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        hub.next_push("d", s.id).is_none(),
        "held while changes may still come"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let push = hub.next_push("d", s.id).expect("released once quiet");
    assert_eq!(push.rendered.version, rendered("1").version);
    hub.ack("d", s.id, &push.nonce);

    // An edit every 100 ms never leaves 150 ms of quiet: the maximum delay releases the latest.
    let started = tokio::time::Instant::now();
    let mut released = None;
    for edit in 2..100 {
        hub.set_desired("d", rendered(&edit.to_string()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Some(push) = hub.next_push("d", s.id) {
            released = Some((started.elapsed(), edit, push));
            break;
        }
    }
    let (after, edit, push) = released.expect("a steady burst is released");
    assert!(
        after >= Duration::from_secs(2) && after < Duration::from_millis(2500),
        "released after {after:?}"
    );
    assert_eq!(push.rendered.version, rendered(&edit.to_string()).version);
}

#[tokio::test(start_paused = true)]
async fn a_certificate_enters_its_window_is_asked_for_and_expires_in_virtual_time() {
    const DAY_MS: i64 = 24 * 3600 * 1000;
    let day = Duration::from_millis(DAY_MS as u64);
    let start = 1_800_000_000_000;
    let hub = hub_in_virtual_time(start);
    hub.track_certificate("d", "01", start + 30 * DAY_MS, start + 10 * DAY_MS, false);
    let (s, _) = hub.open_session("d", "", "01", start).unwrap();
    let now = || hub.clock().now_millis();
    let certificate = |hub: &Hub| {
        let status = hub.status("d").unwrap();
        let condition = status
            .conditions
            .iter()
            .find(|c| c.kind == ConditionType::CertificateExpiring)
            .cloned()
            .unwrap();
        (status.certificate.unwrap().state, condition)
    };

    assert_eq!(certificate(&hub).0, RenewalState::Valid);
    assert_eq!(hub.renewal_sweep(now(), DAY_MS), 0);

    let expiring = |hub: &Hub| {
        let index = ConditionType::ALL
            .iter()
            .position(|c| *c == ConditionType::CertificateExpiring)
            .unwrap();
        hub.summary(hub.clock().now_millis()).status.conditions_true[index]
    };
    assert_eq!(expiring(&hub), 0);
    tokio::time::advance(10 * day).await;
    // Nothing about the device changed but the time: the metrics pass still sees it move.
    assert_eq!(expiring(&hub), 1, "the window opened");
    let (state, condition) = certificate(&hub);
    assert_eq!(state, RenewalState::Due);
    assert_eq!(condition.status, ConditionStatus::True);
    assert_eq!(condition.last_transition_ms, start + 10 * DAY_MS);
    assert_eq!(hub.renewal_sweep(now(), DAY_MS), 1);
    let ask = hub.take_renewal_request("d", s.id).unwrap();
    assert_eq!(
        ask.reason,
        format!("certificate expires in {} s", 20 * 86_400)
    );
    assert_eq!(ask.deadline_ms, start + 30 * DAY_MS);
    assert_eq!(
        hub.renewal_sweep(now(), DAY_MS),
        0,
        "not again within a day"
    );
    tokio::time::advance(day).await;
    assert_eq!(
        hub.renewal_sweep(now(), DAY_MS),
        1,
        "asked again a day later"
    );
    assert_eq!(hub.renewal_asked_ms("d"), Some(start + 11 * DAY_MS));

    tokio::time::advance(19 * day).await;
    assert_eq!(certificate(&hub).0, RenewalState::Expired);
    assert_eq!(
        hub.renewal_sweep(now(), DAY_MS),
        0,
        "an expired certificate cannot be renewed, only recovered"
    );
    let summary = hub.summary(now());
    assert_eq!((summary.expiring_7d, summary.renewal_due), (1, 1));
}

/// A device whose session another replica holds is settled when its status is read, as of its
/// last change: what the feed brings about it costs no condition evaluation on every replica, and
/// its conditions still change when the device did, not when somebody looked.
#[tokio::test(start_paused = true)]
async fn a_device_held_elsewhere_is_settled_when_read_as_of_its_last_change() {
    let start = 1_800_000_000_000;
    let hub = hub_in_virtual_time(start);
    let online = |hub: &Hub| {
        hub.status("d")
            .unwrap()
            .conditions
            .into_iter()
            .find(|c| c.kind == ConditionType::Online)
            .unwrap()
    };
    assert_eq!(online(&hub).status, ConditionStatus::False);
    tokio::time::advance(Duration::from_secs(10)).await;
    hub.note_remotes(vec![RemoteSession {
        device_id: "d".into(),
        holder: Some("b".into()),
        acked_version: Some(rendered("1").version.clone()),
        nacked: None,
    }]);
    {
        let state = hub.lock();
        let entry = state.get("d").unwrap();
        assert_eq!(entry.unsettled_at, Some(start + 10_000), "not settled yet");
    }
    tokio::time::advance(Duration::from_secs(50)).await;
    let condition = online(&hub);
    assert_eq!(condition.status, ConditionStatus::True);
    assert_eq!(
        condition.last_transition_ms,
        start + 10_000,
        "as of the change"
    );
    assert_eq!(hub.status("d").unwrap().state, SyncState::Synced);
    // A metrics pass counts it as settled too.
    let index = ConditionType::ALL
        .iter()
        .position(|c| *c == ConditionType::Online)
        .unwrap();
    hub.note_remotes(vec![RemoteSession {
        device_id: "d".into(),
        holder: None,
        acked_version: None,
        nacked: None,
    }]);
    assert_eq!(
        hub.summary(hub.clock().now_millis()).status.conditions_true[index],
        0
    );

    // A session held here is settled at once.
    let (_s, _) = hub.open_session("d", "", "s", start + 60_000).unwrap();
    let state = hub.lock();
    assert_eq!(state.get("d").unwrap().unsettled_at, None);
}

/// A fleet's view reads many devices' standing at once: each as its full status says, `None` for
/// a device the hub does not know.
#[test]
fn standings_agree_with_each_device_s_status() {
    let hub = hub_of(&["synced", "offline", "broken"]);
    let (s, _) = hub
        .open_session("synced", &rendered("0").version, "s", 0)
        .unwrap();
    assert!(hub.next_push("synced", s.id).is_none());
    hub.set_render_failed("broken", "undefined label".into());
    let ids = ["synced", "offline", "broken", "unknown"].map(String::from);
    let standings = hub.standings(&ids);
    for (id, standing) in ids.iter().zip(&standings) {
        let status = hub.status(id);
        assert_eq!(
            standing
                .as_ref()
                .map(|s| (s.state, s.summary, s.render_error.clone())),
            status.map(|s| (s.state, s.summary, s.render_error)),
            "{id}"
        );
    }
    let states: Vec<_> = standings
        .iter()
        .map(|s| s.as_ref().map(|s| s.state))
        .collect();
    assert_eq!(
        states,
        [
            Some(SyncState::Synced),
            Some(SyncState::Offline),
            Some(SyncState::Offline),
            None
        ]
    );
}

/// Other replicas' facts arrive in batches: each device of a batch takes its facts and is
/// announced once, a device unknown here is skipped, this replica's own session keeps its own
/// answers, and a session here that another replica has since replaced is closed.
#[test]
fn a_batch_of_remote_facts_is_taken_device_by_device() {
    let hub = hub_of(&["remote", "mine", "moved"]);
    let (mine, _) = hub.open_session("mine", "", "s1", 0).unwrap();
    let push = hub.next_push("mine", mine.id).unwrap();
    hub.ack("mine", mine.id, &push.nonce);
    let (moved, _) = hub.open_session("moved", "", "s2", 0).unwrap();
    let mut events = hub.subscribe();
    let version = rendered("0").version.clone();
    let remote = |device_id: &str, holder: Option<&str>, acked: Option<&str>| RemoteSession {
        device_id: device_id.into(),
        holder: holder.map(Into::into),
        acked_version: acked.map(Into::into),
        nacked: None,
    };
    hub.note_remotes(vec![
        remote("remote", Some("b"), Some(&version)),
        remote("mine", None, None),
        remote("moved", Some("c"), None),
        remote("unknown", Some("b"), None),
    ]);
    let status = hub.status("remote").unwrap();
    assert_eq!(
        (status.elsewhere.as_deref(), status.state),
        (Some("b"), SyncState::Synced)
    );
    let status = hub.status("mine").unwrap();
    assert_eq!(
        (status.elsewhere, status.acked_version),
        (None, Some(version.clone())),
        "our own session's answers stand"
    );
    let status = hub.status("moved").unwrap();
    assert_eq!(status.elsewhere.as_deref(), Some("c"));
    assert!(
        hub.next_push("moved", moved.id).is_none(),
        "the replaced session here is closed"
    );
    assert!(hub.status("unknown").is_none());
    let mut announced: Vec<String> = std::iter::from_fn(|| events.try_recv().ok()).collect();
    announced.sort();
    assert_eq!(announced, ["moved", "remote"]);
}

#[tokio::test(start_paused = true)]
async fn renewals_run_a_bounded_number_at_once_and_each_that_ends_lets_the_next_in() {
    const DAY_MS: i64 = 24 * 3600 * 1000;
    let start = 1_800_000_000_000;
    let hub = Hub::with_clock(Clock::following_tokio(start));
    let devices = ["a", "b", "c", "d", "e"];
    hub.load(devices.iter().map(|id| seed(id, rendered("1"))).collect());
    hub.set_renewal_slots(2);
    let mut sessions = HashMap::new();
    for id in devices {
        // Not due on their own: only the operator's request makes them renew.
        hub.track_certificate(id, "01", start + 300 * DAY_MS, start + 200 * DAY_MS, false);
        let (session, _) = hub.open_session(id, "", "01", start).unwrap();
        sessions.insert(id, session.id);
    }
    let asked = |hub: &Hub, id: &str| hub.take_renewal_request(id, sessions[id]).is_some();

    for id in devices {
        assert!(hub.force_renewal(id), "{id} is connected, so it is in line");
    }
    assert!(
        asked(&hub, "a") && asked(&hub, "b"),
        "the first two take the slots"
    );
    assert!(!asked(&hub, "c") && !asked(&hub, "d") && !asked(&hub, "e"));
    assert_eq!(hub.renewals_in_flight(), (2, 3));

    // a's certificate is issued: a keeps its slot until it is back on it.
    hub.track_certificate("a", "02", start + 400 * DAY_MS, start + 300 * DAY_MS, false);
    assert!(!asked(&hub, "c"), "a has not reconnected yet");
    hub.close_session("a", sessions["a"], start);
    assert!(
        !asked(&hub, "c"),
        "a is reconnecting on its new certificate"
    );
    let (again, _) = hub.open_session("a", "", "02", start).unwrap();
    assert!(
        hub.take_renewal_request("a", again.id).is_none(),
        "a is done"
    );
    assert!(asked(&hub, "c"), "a's slot went to the next in line");

    // b is refused: its slot goes to d.
    hub.renewal_failed("b", "issuance rate limit");
    assert!(asked(&hub, "d"));
    assert_eq!(hub.renewals_in_flight(), (2, 1));

    // c leaves before its certificate is issued: its slot goes to e.
    hub.close_session("c", sessions["c"], start);
    assert!(asked(&hub, "e"));
    assert_eq!(hub.renewals_in_flight(), (2, 0));

    // d and e never answer: their slots come back once held too long, at the next sweep, and
    // they are not asked again before the resend interval.
    tokio::time::advance(Duration::from_millis(renewal::SLOT_HELD_MS as u64 - 1)).await;
    hub.renewal_sweep(hub.clock().now_millis(), DAY_MS);
    assert_eq!(hub.renewals_in_flight(), (2, 0), "not yet");
    tokio::time::advance(Duration::from_millis(2)).await;
    assert_eq!(hub.renewal_sweep(hub.clock().now_millis(), DAY_MS), 0);
    assert_eq!(hub.renewals_in_flight(), (0, 0));
    assert!(!asked(&hub, "d") && !asked(&hub, "e"));
}

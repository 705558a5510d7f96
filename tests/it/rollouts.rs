//! Rollouts with simulated agents over real mTLS: batches advance in order within the disruption
//! budget, a revision the first batch rejects halts the rollout before later batches see it and
//! rollback restores everyone, pause/resume, and bad policies. SQLite, or PostgreSQL with
//! FLOTILLA_TEST_DATABASE_URL.

use crate::support;

use flotilla::control::Policy;
use flotilla::hub::Debounce;
use flotilla::proto::admin::v1 as admin;
use flotilla::proto::admin::v1::fleet_service_client::FleetServiceClient;
use flotilla::proto::admin::v1::rollout_service_client::RolloutServiceClient;
use flotilla::proto::agent::v1 as agent;
use std::collections::BTreeMap;
use std::time::Duration;
use support::sim::{SimAgent, all_synced, connect_fleet};
use support::{TestServer, channel, wait_for};
use tonic::Code;

fn policy(batches: &[(u32, u32)], budget: &str, deadline: u32) -> admin::RolloutPolicy {
    admin::RolloutPolicy {
        batches: batches
            .iter()
            .map(|(count, percent)| admin::RolloutBatch {
                count: *count,
                percent: *percent,
                selector: String::new(),
            })
            .collect(),
        success_threshold: 100,
        progress_deadline_seconds: deadline,
        max_unavailable: budget.into(),
        ..Default::default()
    }
}

fn fleet(content: &str, rollout: Option<admin::RolloutPolicy>) -> admin::ApplyFleetRequest {
    admin::ApplyFleetRequest {
        name: "web".into(),
        selector: "role=web".into(),
        label_defaults: Default::default(),
        template: Some(agent::DeviceSpec {
            files: vec![agent::FileSpec {
                path: "/etc/web.conf".into(),
                content: content.into(),
                mode: 0o644,
                ..Default::default()
            }],
            ..Default::default()
        }),
        rollout,
    }
}

/// A fast server: short debounce so rollouts move quickly.
async fn server() -> TestServer {
    TestServer::start_with(Policy {
        debounce: Debounce {
            quiet: Duration::from_millis(20),
            max_delay: Duration::from_millis(200),
        },
        ..Policy::default()
    })
    .await
}

async fn web_devices(
    server: &TestServer,
    count: usize,
    reject: Option<&str>,
) -> Vec<(String, SimAgent)> {
    let names: Vec<String> = (0..count).map(|i| format!("web-{i:02}")).collect();
    let labels = BTreeMap::from([("role".to_string(), "web".to_string())]);
    connect_fleet(server, &names, &labels, Duration::from_secs(5), reject).await
}

async fn rollout(server: &TestServer) -> admin::Rollout {
    RolloutServiceClient::new(channel(&server.admin_url, &server.admin_creds()).await)
        .get_rollout(admin::GetRolloutRequest {
            fleet: "web".into(),
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_advance_in_order_within_the_budget() {
    let server = server().await;
    let agents = web_devices(&server, 12, None).await;
    let mut fleets =
        FleetServiceClient::new(channel(&server.admin_url, &server.admin_creds()).await);
    let rollout_policy = policy(&[(2, 0), (0, 25)], "2", 120);
    fleets
        .apply_fleet(fleet("v1", Some(rollout_policy.clone())))
        .await
        .unwrap();
    all_synced(&server, &agents).await;
    let first = server
        .control
        .hub()
        .desired(&agents[0].0)
        .unwrap()
        .version
        .clone();

    fleets
        .apply_fleet(fleet("v2", Some(rollout_policy)))
        .await
        .unwrap();
    let control = server.control.clone();
    let mut max_updating = 0;
    let mut batches_seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let done = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the rollout did not complete"
        );
        let view = control.rollout_view("web").await.unwrap();
        max_updating = max_updating.max(view.updating);
        if batches_seen.last() != Some(&view.record.batch) {
            batches_seen.push(view.record.batch);
        }
        if view.record.state == "completed" {
            break view;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        max_updating <= 2,
        "at most 2 devices updating at once, saw {max_updating}"
    );
    assert_eq!(batches_seen, [0, 1, 2], "batch by batch, never back");
    let events: Vec<&str> = done.events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(events.first(), Some(&"started"));
    assert_eq!(events.last(), Some(&"completed"));
    assert_eq!(events.iter().filter(|e| **e == "batch-started").count(), 3);
    assert_eq!(events.iter().filter(|e| **e == "batch-done").count(), 2);
    all_synced(&server, &agents).await;
    for (id, agent) in &agents {
        let pushes = agent.seen().pushes;
        let last = pushes.last().unwrap();
        assert_ne!(last, &first);
        assert_eq!(
            pushes.iter().filter(|v| *v == last).count(),
            1,
            "{id}: updated once"
        );
    }
    let status = rollout(&server).await;
    assert_eq!((status.batch, status.batches), (3, 3));
    assert_eq!(status.fleet_moved, 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_revision_halts_in_the_first_batch_and_rollback_restores_everyone() {
    let server = server().await;
    let agents = web_devices(&server, 8, Some("broken")).await;
    let mut fleets =
        FleetServiceClient::new(channel(&server.admin_url, &server.admin_creds()).await);
    let rollout_policy = policy(&[(2, 0), (3, 0)], "2", 120);
    fleets
        .apply_fleet(fleet("good", Some(rollout_policy.clone())))
        .await
        .unwrap();
    all_synced(&server, &agents).await;
    let good = server
        .control
        .hub()
        .desired(&agents[0].0)
        .unwrap()
        .version
        .clone();
    let before: Vec<usize> = agents.iter().map(|(_, a)| a.seen().pushes.len()).collect();

    fleets
        .apply_fleet(fleet("broken", Some(rollout_policy)))
        .await
        .unwrap();
    let control = server.control.clone();
    let paused = wait_for("the rollout to pause", Duration::from_secs(60), || {
        let control = control.clone();
        async move {
            let view = control.rollout_view("web").await.ok()?;
            (view.record.state == "paused").then_some(view)
        }
    })
    .await;
    assert_eq!(paused.record.batch, 0, "halted in the first batch");
    assert!(
        paused.record.reason.contains("rejected"),
        "{}",
        paused.record.reason
    );
    let first_batch = &paused.record.members[0];
    for ((id, agent), before) in agents.iter().zip(&before) {
        let received = agent.seen().pushes.len() - before;
        if first_batch.contains(id) {
            assert!(received <= 1);
        } else {
            assert_eq!(
                received, 0,
                "{id} outside the first batch never got the revision"
            );
        }
    }
    let mut rollouts =
        RolloutServiceClient::new(channel(&server.admin_url, &server.admin_creds()).await);
    let not_paused = rollouts
        .pause_rollout(admin::RolloutRequest {
            fleet: "web".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(not_paused.code(), Code::FailedPrecondition);

    let rolled = rollouts
        .rollback_rollout(admin::RolloutRequest {
            fleet: "web".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rolled.state, "progressing");
    wait_for("the rollback to complete", Duration::from_secs(90), || {
        let control = control.clone();
        async move {
            let view = control.rollout_view("web").await.ok()?;
            (view.record.state == "completed").then_some(())
        }
    })
    .await;
    all_synced(&server, &agents).await;
    for (id, _) in &agents {
        let desired = server.control.hub().desired(id).unwrap();
        assert_eq!(desired.version, good, "{id} back on the good content");
    }

    // Back to a named revision: revision 3 (the rollback) is current, 1 is the good one again.
    let named = |revision: i64| admin::RolloutRequest {
        fleet: "web".into(),
        to_revision: revision,
    };
    let status = rollouts.rollback_rollout(named(3)).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let status = rollouts.rollback_rollout(named(99)).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let revisions = || {
        let mut fleets = fleets.clone();
        async move {
            fleets
                .list_fleet_revisions(admin::ListFleetRevisionsRequest { name: "web".into() })
                .await
                .unwrap()
                .into_inner()
                .revisions
        }
    };
    // Revision 1's template is what the fleet has already: nothing to roll out.
    rollouts.rollback_rollout(named(1)).await.unwrap();
    assert_eq!(revisions().await.len(), 3);
    // Revision 2's is another: it becomes revision 4, rolled out under the policy.
    rollouts.rollback_rollout(named(2)).await.unwrap();
    let all = revisions().await;
    assert_eq!(all.len(), 4);
    assert_eq!(
        all[3].template, all[1].template,
        "revision 4 is revision 2's template"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_and_bad_policies() {
    let server = server().await;
    let agents = web_devices(&server, 4, None).await;
    let mut fleets =
        FleetServiceClient::new(channel(&server.admin_url, &server.admin_creds()).await);
    let mut rollouts =
        RolloutServiceClient::new(channel(&server.admin_url, &server.admin_creds()).await);
    // Slow batches: a deadline long enough, a budget of one.
    let rollout_policy = policy(&[(1, 0)], "1", 600);
    fleets
        .apply_fleet(fleet("a", Some(rollout_policy.clone())))
        .await
        .unwrap();
    all_synced(&server, &agents).await;
    fleets
        .apply_fleet(fleet("b", Some(rollout_policy.clone())))
        .await
        .unwrap();
    let mut watch = rollouts
        .watch_rollout(admin::RolloutRequest {
            fleet: "web".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.to_revision, 2);
    let paused = rollouts
        .pause_rollout(admin::RolloutRequest {
            fleet: "web".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(paused.state, "paused");
    assert!(paused.reason.contains("admin/admin"), "{}", paused.reason);
    let watched = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let update = watch.message().await.unwrap().unwrap();
            if update.state == "paused" {
                return update;
            }
        }
    })
    .await
    .expect("the watch shows the pause");
    assert_eq!(watched.reason, paused.reason);
    let resumed = rollouts
        .resume_rollout(admin::RolloutRequest {
            fleet: "web".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resumed.state, "progressing");
    let twice = rollouts
        .resume_rollout(admin::RolloutRequest {
            fleet: "web".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        twice.code(),
        Code::FailedPrecondition,
        "resume of a rollout that is not paused"
    );

    // A new revision supersedes the rollout in progress.
    fleets
        .apply_fleet(fleet("c", Some(rollout_policy.clone())))
        .await
        .unwrap();
    let latest = rollout(&server).await;
    assert_eq!(latest.to_revision, 3);
    assert_eq!(latest.events[0].event, "started");

    for (policy, field) in [
        (
            admin::RolloutPolicy {
                success_threshold: 150,
                ..policy(&[(1, 0)], "1", 60)
            },
            "rollout.successThreshold",
        ),
        (policy(&[], "1", 60), "rollout.batches"),
        (policy(&[(1, 10)], "1", 60), "rollout.batches[0]"),
        (policy(&[(1, 0)], "lots", 60), "rollout.maxUnavailable"),
    ] {
        let status = fleets
            .apply_fleet(fleet("d", Some(policy)))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}");
        assert!(status.message().contains(field), "{}", status.message());
    }
    let unknown = rollouts
        .get_rollout(admin::GetRolloutRequest {
            fleet: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

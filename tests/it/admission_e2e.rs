//! Admission control with real processes: a control plane that holds one session at most turns the
//! second agent away with a retry delay; the agent waits as told (no error spiral) and takes the
//! place as soon as it is free.

use crate::support;

use std::time::Duration;
use support::cluster::{Cluster, count_lines, wait};

const TIMEOUT: Duration = Duration::from_secs(30);

fn online(cluster: &Cluster, name: &str) -> bool {
    cluster
        .flotctl_json(&["get", "device", name])
        .is_some_and(|d| d["status"]["online"] == true)
}

/// Waits for `name`'s enrollment request and approves it.
fn approve_when_asked(cluster: &Cluster, name: &str) {
    wait(&format!("{name}'s enrollment request"), TIMEOUT, || {
        cluster
            .flotctl_json(&["get", "enrollments", "--state", "pending"])
            .is_some_and(|v| {
                v.as_array()
                    .is_some_and(|a| a.iter().any(|e| e["name"] == name))
            })
    });
    cluster.flotctl_ok(&["approve", "enrollment", name]);
}

#[test]
fn an_agent_turned_away_waits_as_told_and_gets_the_freed_place() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let cluster = Cluster::new(root);
    let _server = cluster.start_server_with(1, &["--max-sessions", "1"]);
    cluster.wait_until_serving();

    let log_a = root.join("agent-a.log");
    let log_b = root.join("agent-b.log");
    let agent_a = cluster.spawn_agent("a", &["site=lab"], &root.join("state-a"), &log_a);
    approve_when_asked(&cluster, "a");
    wait("a online", TIMEOUT, || online(&cluster, "a"));

    let _agent_b = cluster.spawn_agent("b", &["site=lab"], &root.join("state-b"), &log_b);
    approve_when_asked(&cluster, "b");
    wait("b told the control plane is busy, twice", TIMEOUT, || {
        count_lines(&log_b, "control plane busy") >= 2
    });
    assert!(!online(&cluster, "b"), "b must not be admitted");
    assert_eq!(
        count_lines(&log_b, "session lost"),
        0,
        "a busy answer is not a lost session"
    );

    drop(agent_a);
    wait("b takes the freed place", TIMEOUT, || online(&cluster, "b"));
}

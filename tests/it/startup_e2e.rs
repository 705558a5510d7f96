//! Start-up on a slow database, end to end with real processes: until its state is loaded the
//! control plane answers UNAVAILABLE ("starting: state not loaded") — never an empty fleet, never
//! NotFound for what exists — and a revoked device that keeps knocking through the restart is
//! neither let in nor given a certificate. Always on PostgreSQL, behind a proxy that slows every
//! answer of the database.

use crate::support;

use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};
use support::cluster::{Cluster, wait};
use support::proxy::Proxy;

const TIMEOUT: Duration = Duration::from_secs(60);

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// An answer from a control plane that is still starting: refused at the door or UNAVAILABLE.
fn starting(what: &str, out: &std::process::Output) -> bool {
    let message = stderr(out);
    if message.contains("starting: state not loaded") {
        return true;
    }
    assert!(
        message.contains("Connection refused") || message.contains("connect"),
        "{what}: a starting control plane answered neither UNAVAILABLE nor nothing: {message}"
    );
    false
}

fn certificates(cluster: &Cluster, device: &str) -> usize {
    cluster
        .flotctl_json(&["cert", "list", "--device", device])
        .and_then(|v| v.as_array().map(Vec::len))
        .unwrap_or(0)
}

fn online(cluster: &Cluster, device: &str) -> bool {
    cluster
        .flotctl_json(&["get", "device", device])
        .is_some_and(|d| d["status"]["online"] == true)
}

fn apply_fleet(cluster: &Cluster, root: &Path) {
    let path = root.join("fleet.yaml");
    std::fs::write(
        &path,
        "kind: Fleet\nmetadata:\n  name: lab\nspec:\n  selector: \"site=lab\"\n  template:\n    files:\n      - path: /tmp/flotilla-startup-e2e/site\n        content: \"{{ device.labels.site }}\"\n",
    )
    .unwrap();
    cluster.flotctl_ok(&["apply", "-f", &path.display().to_string()]);
}

#[test]
fn a_slow_start_answers_unavailable_until_loaded_and_never_lets_a_revoked_device_in() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let cluster = Cluster::on_postgres(root);
    let mut server = cluster.start_server(1);
    cluster.wait_until_serving();
    apply_fleet(&cluster, root);
    let _edge_1 = cluster.spawn_agent(
        "edge-1",
        &["site=lab"],
        &root.join("s1"),
        &root.join("a1.log"),
    );
    let _edge_2 = cluster.spawn_agent(
        "edge-2",
        &["site=lab"],
        &root.join("s2"),
        &root.join("a2.log"),
    );
    wait("two enrollment requests", TIMEOUT, || {
        cluster
            .flotctl_json(&["get", "enrollments"])
            .and_then(|v| v.as_array().map(Vec::len))
            == Some(2)
    });
    for name in ["edge-1", "edge-2"] {
        cluster.flotctl_ok(&["approve", "enrollment", name]);
    }
    wait("both devices online", TIMEOUT, || {
        online(&cluster, "edge-1") && online(&cluster, "edge-2")
    });
    cluster.flotctl_ok(&["cert", "revoke", "--device", "edge-2", "--reason", "stolen"]);
    wait("edge-2 cut off", TIMEOUT, || !online(&cluster, "edge-2"));
    let issued_to_edge_2 = certificates(&cluster, "edge-2");
    server.terminate();

    // The same database, every answer of it slowed: loading takes seconds, while both agents
    // keep reconnecting.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let postgres = cluster.db.server_addr();
    let proxy = runtime.block_on(Proxy::start(postgres));
    proxy.set_latency(Duration::from_millis(60));
    let slow_url = cluster.db.url_via(proxy.addr);
    let _server = cluster.start_server_with(2, &["--database-url", &slow_url]);

    let deadline = Instant::now() + TIMEOUT;
    let mut unavailable = 0;
    loop {
        assert!(Instant::now() < deadline, "the control plane never loaded");
        let devices = cluster.flotctl(&["get", "devices", "-o", "json"]);
        if !devices.status.success() {
            unavailable += usize::from(starting("get devices", &devices));
            let device = cluster.flotctl(&["get", "device", "edge-1"]);
            assert!(
                device.status.success() || !stderr(&device).contains("NotFound"),
                "edge-1 exists: {}",
                stderr(&device)
            );
            let fleets = cluster.flotctl(&["get", "fleets", "-o", "json"]);
            if fleets.status.success() {
                let fleets: Value = serde_json::from_slice(&fleets.stdout).unwrap();
                assert_eq!(
                    fleets[0]["metadata"]["name"], "lab",
                    "a loaded world has its fleet: {fleets}"
                );
            } else {
                starting("get fleets", &fleets);
            }
            continue;
        }
        let devices: Value = serde_json::from_slice(&devices.stdout).unwrap();
        let names: Vec<&str> = devices
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|d| d["metadata"]["name"].as_str())
            .collect();
        assert_eq!(
            names.len(),
            2,
            "the first answer is the whole fleet: {names:?}"
        );
        break;
    }
    assert!(
        unavailable > 0,
        "a start on a slowed database was seen answering UNAVAILABLE"
    );

    proxy.set_latency(Duration::ZERO);
    wait("edge-1 back online", TIMEOUT, || online(&cluster, "edge-1"));
    // edge-2 has been knocking all along (its agent retries within seconds).
    std::thread::sleep(Duration::from_secs(5));
    assert!(!online(&cluster, "edge-2"), "a revoked device stays out");
    assert_eq!(
        certificates(&cluster, "edge-2"),
        issued_to_edge_2,
        "nothing issued to a revoked device"
    );
}

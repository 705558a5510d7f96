//! Rollouts end to end with real processes: twenty agents, a three-batch rollout that advances
//! batch by batch within its disruption budget (sampled throughout) and survives the control
//! plane being killed mid-rollout with no device skipped or updated twice; then a revision some
//! agents reject halts the rollout in its first batch and rollback returns everyone.
//! SQLite by default; PostgreSQL when FLOTILLA_TEST_DATABASE_URL is set.

use crate::support;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::cluster::{Cluster, count_lines, wait};

const AGENTS: usize = 20;
const BUDGET: u64 = 3;
const TIMEOUT: Duration = Duration::from_secs(120);

fn fleet_yaml(out: &Path, content: &str) -> String {
    format!(
        r#"kind: Fleet
metadata:
  name: web
spec:
  selector: role=web
  rollout:
    batches:
      - count: 4
      - percent: 25
    maxUnavailable: {BUDGET}
    successThreshold: 100
    progressDeadlineSeconds: 300
  template:
    files:
      - path: "{out}/{{{{ device.name }}}}/{content_path}"
        content: "{content}"
"#,
        out = out.display(),
        content_path = "app.conf",
    )
}

/// A template that devices of site s0 cannot apply (a file below a regular file).
fn rejected_yaml(out: &Path) -> String {
    format!(
        r#"kind: Fleet
metadata:
  name: web
spec:
  selector: role=web
  rollout:
    batches:
      - count: 4
      - percent: 25
    maxUnavailable: {BUDGET}
    successThreshold: 100
    progressDeadlineSeconds: 300
  template:
    files:
      - path: "{out}/{{{{ device.name }}}}/{{% if device.labels.site == 's0' %}}app.conf/child{{% else %}}extra.conf{{% endif %}}"
        content: "v3"
      - path: "{out}/{{{{ device.name }}}}/app.conf"
        content: "v2"
"#,
        out = out.display(),
    )
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

struct Fleet {
    cluster: Cluster,
    out: PathBuf,
}

impl Fleet {
    fn apply(&self, name: &str, yaml: &str) {
        let path = self.cluster.root.join(name);
        std::fs::write(&path, yaml).unwrap();
        self.cluster
            .flotctl_ok(&["apply", "-f", path.to_str().unwrap()]);
    }

    fn status(&self) -> Value {
        self.cluster
            .flotctl_json(&["rollout", "status", "web"])
            .unwrap_or(Value::Null)
    }

    fn all_files(&self, content: &str) -> bool {
        (0..AGENTS)
            .all(|i| read(&self.out.join(format!("r-{i:02}/app.conf"))).as_deref() == Some(content))
    }
}

/// What the sampler saw of the rollout.
#[derive(Default)]
struct Samples {
    max_updating: u64,
    /// Batches in the order seen, for the latest rollout.
    batches: Vec<u64>,
    rollouts: Vec<String>,
}

/// Samples `flotctl rollout status` until stopped.
fn sampler(
    data: PathBuf,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Samples>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let out = std::process::Command::new(support::binary("flotctl"))
                .arg("--config")
                .arg(data.join("flotctl.toml"))
                .args(["rollout", "status", "web", "-o", "json"])
                .output();
            if let Ok(out) = out
                && let Ok(status) = serde_json::from_slice::<Value>(&out.stdout)
            {
                let updating = status["updating"].as_u64().unwrap_or(0);
                let batch = status["batch"]
                    .as_str()
                    .and_then(|b| b.split('/').next())
                    .and_then(|b| b.parse().ok())
                    .unwrap_or(0);
                let id = status["id"].as_str().unwrap_or_default().to_string();
                let mut seen = seen.lock().unwrap();
                seen.max_updating = seen.max_updating.max(updating);
                if seen.rollouts.last() != Some(&id) {
                    seen.rollouts.push(id);
                    seen.batches.clear();
                }
                if seen.batches.last() != Some(&batch) {
                    seen.batches.push(batch);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

#[test]
fn a_batched_rollout_survives_a_restart_and_a_rejected_revision_halts_then_rolls_back() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let cluster = Cluster::new(&root);
    let mut server = cluster.start_server(1);
    cluster.wait_until_serving();
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        let name = format!("r-{i:02}");
        let site = format!("site=s{}", i % 4);
        agents.push(cluster.spawn_agent(
            &name,
            &["role=web", &site],
            &root.join(format!("state-{name}")),
            &root.join(format!("agent-{name}.log")),
        ));
    }
    wait("twenty enrollment requests", TIMEOUT, || {
        cluster
            .flotctl_json(&["get", "enrollments", "--state", "pending"])
            .is_some_and(|v| v.as_array().is_some_and(|a| a.len() == AGENTS))
    });
    for i in 0..AGENTS {
        cluster.flotctl_ok(&["approve", "enrollment", &format!("r-{i:02}")]);
    }
    let fleet = Fleet {
        out: root.join("out"),
        cluster,
    };
    let cluster = &fleet.cluster;
    fleet.apply("v1.yaml", &fleet_yaml(&fleet.out, "v1"));
    wait("v1 everywhere", TIMEOUT, || fleet.all_files("v1"));

    // Revision 2 rolls out in three batches; the control plane is killed in the middle.
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Samples::default()));
    let sampling = sampler(cluster.data.clone(), stop.clone(), seen.clone());
    fleet.apply("v2.yaml", &fleet_yaml(&fleet.out, "v2"));
    wait("the second batch", TIMEOUT, || {
        fleet.status()["batch"]
            .as_str()
            .is_some_and(|b| b.starts_with('2'))
    });
    server.0.kill().unwrap();
    server.0.wait().unwrap();
    let before_restart = (0..AGENTS)
        .filter(|i| read(&fleet.out.join(format!("r-{i:02}/app.conf"))).as_deref() == Some("v2"))
        .count();
    assert!(before_restart < AGENTS, "killed mid-rollout");
    let _server = fleet.cluster.start_server_with(2, &[]);
    wait("the rollout to complete after the restart", TIMEOUT, || {
        fleet.status()["state"] == "completed"
    });
    stop.store(true, Ordering::Relaxed);
    sampling.join().unwrap();
    wait("v2 everywhere", TIMEOUT, || fleet.all_files("v2"));
    {
        let seen = seen.lock().unwrap();
        assert!(
            seen.max_updating <= BUDGET,
            "at most {BUDGET} devices updating, saw {}",
            seen.max_updating
        );
        assert!(
            seen.batches.windows(2).all(|w| w[0] <= w[1]),
            "batches only advance: {:?}",
            seen.batches
        );
        assert_eq!(seen.batches.last(), Some(&3));
    }
    // Each device renders its own version (its name is in the path).
    let devices = cluster
        .flotctl_json(&["get", "devices", "-l", "role=web"])
        .unwrap();
    let v2: std::collections::BTreeMap<String, String> = devices
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["metadata"]["name"].as_str().unwrap().to_string(),
                d["status"]["desired_version"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (name, version) in &v2 {
        let log = root.join(format!("agent-{name}.log"));
        let applied = std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .filter(|l| l.contains("spec applied") && l.contains(version.as_str()))
            .count();
        assert_eq!(applied, 1, "{name} applied revision 2 exactly once");
    }
    let events = fleet.status()["events"].as_array().unwrap().clone();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "batch-started").count(),
        3,
        "{kinds:?}"
    );
    assert_eq!(kinds.last(), Some(&"completed"));

    // A revision the s0 devices reject halts in the first batch; rollback restores everyone.
    fleet.apply("v3.yaml", &rejected_yaml(&fleet.out));
    wait("the rollout to pause", TIMEOUT, || {
        fleet.status()["state"] == "paused"
    });
    let paused = fleet.status();
    assert_eq!(
        paused["batch"].as_str().unwrap().split('/').next(),
        Some("1")
    );
    assert!(
        paused["reason"].as_str().unwrap().contains("rejected"),
        "{paused}"
    );
    let first_batch: Vec<String> = paused["batch_devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        first_batch,
        ["r-00", "r-01", "r-02", "r-03"],
        "batches take devices by name"
    );
    for i in 4..AGENTS {
        assert!(
            !fleet.out.join(format!("r-{i:02}/extra.conf")).exists(),
            "r-{i:02} is outside the first batch and never received revision 3"
        );
    }
    // `rollout watch` tells a script how it ended: 1 for a pause (with why), 0 once complete.
    let watched = cluster.flotctl(&["rollout", "watch", "web"]);
    assert_eq!(watched.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&watched.stderr).contains("paused"));
    cluster.flotctl_ok(&["rollout", "rollback", "web"]);
    let watched = cluster.flotctl(&["rollout", "watch", "web"]);
    assert!(
        watched.status.success(),
        "{}",
        String::from_utf8_lossy(&watched.stderr)
    );
    wait("the rollback to complete", TIMEOUT, || {
        fleet.status()["state"] == "completed"
    });
    wait(
        "every device SYNCED on the previous template",
        TIMEOUT,
        || {
            cluster
                .flotctl_json(&["get", "devices", "-l", "role=web"])
                .is_some_and(|devices| {
                    devices.as_array().is_some_and(|all| {
                        all.len() == AGENTS
                            && all.iter().all(|d| {
                                let name = d["metadata"]["name"].as_str().unwrap_or_default();
                                d["status"]["sync_state"] == "SYNCED"
                                    && v2.get(name).is_some_and(|v| {
                                        d["status"]["desired_version"] == v.as_str()
                                    })
                            })
                    })
                })
        },
    );
    assert!(fleet.all_files("v2"));
    for i in 0..4 {
        assert!(
            !fleet.out.join(format!("r-{i:02}/extra.conf")).exists(),
            "r-{i:02} rolled back"
        );
    }
    assert_eq!(
        count_lines(&root.join("server-2.log"), "rollout step failed"),
        0
    );
    drop(agents);
}

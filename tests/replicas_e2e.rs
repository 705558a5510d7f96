//! Several control planes, end to end with real processes: SQLite serves exactly one process;
//! PostgreSQL serves any number of replicas that share one identity (CA, credentials) — started
//! from a copy of the first replica's data directory — and refuses a replica with another CA.

mod support;

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};
use support::ChildGuard;
use support::cluster::{Cluster, count_lines, wait};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Waits for `child` to exit; returns its exit status and the log it wrote.
fn exit_of(child: &mut Child, log: &Path) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status, std::fs::read_to_string(log).unwrap_or_default());
        }
        assert!(
            Instant::now() < deadline,
            "the process kept running; its log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn kill_9(child: &mut ChildGuard) {
    child.0.kill().unwrap();
    child.0.wait().unwrap();
}

#[test]
fn a_second_process_on_the_same_sqlite_database_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let first = Cluster::on_sqlite(tmp.path());
    let mut one = first.start_server(1);
    first.wait_until_serving();

    // Same data directory (so the same SQLite file), other ports: only the lock stands in the way.
    let second = first.replica(&tmp.path().join("second"), &first.data);
    let mut two = second.start_server(2);
    let (status, log) = exit_of(&mut two.0, &second.root.join("server-2.log"));
    assert!(
        !status.success(),
        "a second process served the same SQLite file"
    );
    assert!(
        log.contains("in use by another flotilla process") && log.contains("--database-url"),
        "the refusal does not say why or what to do instead:\n{log}"
    );
    assert!(
        first.flotctl(&["get", "devices"]).status.success(),
        "the first process stopped serving"
    );

    // The lock goes with its process, however it ends: after kill -9 a new process may start.
    kill_9(&mut one);
    let _three = second.start_server(3);
    second.point_configs_here();
    second.wait_until_serving();
}

#[test]
fn replicas_on_postgres_share_one_ca_and_a_stranger_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let first = Cluster::on_postgres(&tmp.path().join("one"));
    let _one = first.start_server(1);
    first.wait_until_serving();
    let ca = std::fs::read_to_string(first.data.join("ca/ca.crt")).unwrap();
    let fingerprint = flotilla::pki::cert_info_pem(&ca).unwrap().key_fingerprint;

    // A replica that was not given the first one's data directory creates its own CA and must not
    // serve with it: its certificates would mean nothing to the other replicas.
    let stranger_root = tmp.path().join("stranger");
    let stranger = first.replica(&stranger_root, &stranger_root.join("data"));
    let mut refused = stranger.start_server(1);
    let (status, log) = exit_of(&mut refused.0, &stranger.root.join("server-1.log"));
    assert!(!status.success(), "a replica with another CA served");
    assert!(
        log.contains("another CA") && log.contains(&fingerprint),
        "the refusal does not name the recorded CA:\n{log}"
    );
    assert!(
        log.contains("copy of the first replica's data directory"),
        "{log}"
    );

    // A copy of the first replica's data directory is all a replica needs.
    let copy_root = tmp.path().join("two");
    std::fs::create_dir_all(&copy_root).unwrap();
    first.copy_data_dir(&copy_root.join("data"));
    let second = first.replica(&copy_root, &copy_root.join("data"));
    second.point_configs_here();
    let _two = second.start_server(2);
    second.wait_until_serving();
    assert_eq!(
        std::fs::read_to_string(second.data.join("ca/ca.crt")).unwrap(),
        ca
    );
}

#[test]
fn replicas_starting_together_on_an_empty_database_create_one_ca() {
    let tmp = tempfile::tempdir().unwrap();
    // One data directory both mount (as a shared volume would be), an empty database, and two
    // processes started at the same moment: without a first-start lock both would create a CA.
    let first = Cluster::on_postgres(&tmp.path().join("one"));
    let second = first.replica(&tmp.path().join("two"), &first.data);
    let _one = first.start_server(1);
    let _two = second.start_server(2);
    first.wait_until_serving();
    second.point_configs_here();
    second.wait_until_serving();
    let ca = std::fs::read_to_string(first.data.join("ca/ca.crt")).unwrap();
    assert_eq!(ca.matches("BEGIN CERTIFICATE").count(), 1);
    for (cluster, log) in [(&first, "server-1.log"), (&second, "server-2.log")] {
        let log = std::fs::read_to_string(cluster.root.join(log)).unwrap();
        assert!(!log.contains("another CA"), "{log}");
    }
}

/// Three replicas on one PostgreSQL database, each started from a copy of the first one's data
/// directory and with agents of its own.
struct Replicas {
    _tmp: tempfile::TempDir,
    root: std::path::PathBuf,
    nodes: Vec<Cluster>,
    servers: Vec<Option<ChildGuard>>,
}

impl Replicas {
    fn start(count: usize) -> Replicas {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let first = Cluster::on_postgres(&root.join("r1"));
        let mut servers = vec![Some(first.start_server(1))];
        first.wait_until_serving();
        let mut nodes = vec![first];
        for index in 2..=count {
            let dir = root.join(format!("r{index}"));
            std::fs::create_dir_all(&dir).unwrap();
            nodes[0].copy_data_dir(&dir.join("data"));
            let node = nodes[0].replica(&dir, &dir.join("data"));
            node.point_configs_here();
            servers.push(Some(node.start_server(index)));
            node.wait_until_serving();
            nodes.push(node);
        }
        Replicas {
            _tmp: tmp,
            root,
            nodes,
            servers,
        }
    }

    /// Starts agent `name` (label site=lab) talking to replica `index` (0-based).
    fn agent(&self, index: usize, name: &str) -> ChildGuard {
        let node = &self.nodes[index];
        node.spawn_agent(
            name,
            &["site=lab"],
            &self.root.join(format!("{name}-state")),
            &self.root.join(format!("{name}.log")),
        )
    }

    fn device(&self, index: usize, name: &str) -> serde_json::Value {
        self.nodes[index]
            .flotctl_json(&["get", "device", name])
            .unwrap_or_default()
    }

    fn synced_everywhere(&self, names: &[&str]) -> bool {
        (0..self.nodes.len()).all(|index| {
            names.iter().all(|name| {
                let device = self.device(index, name);
                device["status"]["online"] == true && device["status"]["sync_state"] == "SYNCED"
            })
        })
    }
}

fn apply_fleet(node: &Cluster, root: &Path, content: &str) {
    let path = root.join("fleet.yaml");
    let target = root.join("out/{{ device.name }}/site.conf");
    std::fs::write(
        &path,
        format!(
            "kind: Fleet\nmetadata:\n  name: lab\nspec:\n  selector: \"site=lab\"\n  template:\n    files:\n      - path: {}\n        content: \"{content}\"\n",
            target.display()
        ),
    )
    .unwrap();
    node.flotctl_ok(&["apply", "-f", &path.display().to_string()]);
}

fn applied(root: &Path, device: &str) -> String {
    std::fs::read_to_string(root.join(format!("out/{device}/site.conf"))).unwrap_or_default()
}

#[test]
fn three_replicas_serve_one_coherent_fleet() {
    let replicas = Replicas::start(3);
    let root = replicas.root.clone();
    let names = ["edge-a", "edge-b", "edge-c"];
    // edge-a talks to replica 3, edge-b to replica 1, edge-c to replica 2.
    let _agents: Vec<ChildGuard> = [(2, "edge-a"), (0, "edge-b"), (1, "edge-c")]
        .iter()
        .map(|(index, name)| replicas.agent(*index, name))
        .collect();
    wait(
        "three enrollment requests, seen through replica 1",
        TIMEOUT,
        || {
            replicas.nodes[0]
                .flotctl_json(&["get", "enrollments"])
                .and_then(|v| v.as_array().map(Vec::len))
                == Some(3)
        },
    );
    // Approved through a replica other than the one each agent talks to.
    replicas.nodes[0].flotctl_ok(&["approve", "enrollment", "edge-a"]);
    replicas.nodes[2].flotctl_ok(&["approve", "enrollment", "edge-b"]);
    replicas.nodes[0].flotctl_ok(&["approve", "enrollment", "edge-c"]);
    for name in names {
        wait(&format!("{name}'s session"), TIMEOUT, || {
            count_lines(&root.join(format!("{name}.log")), "session established") >= 1
        });
    }

    // A fleet applied through replica 2 reaches agents on all three.
    apply_fleet(&replicas.nodes[1], &root, "v1");
    wait("the file on every agent", TIMEOUT, || {
        names.iter().all(|name| applied(&root, name) == "v1")
    });
    wait(
        "every agent online and SYNCED through every replica",
        TIMEOUT,
        || replicas.synced_everywhere(&names),
    );
    let holder = replicas.device(0, "edge-a")["status"]["session_replica"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        !holder.is_empty(),
        "the holder of edge-a's session is shown"
    );
    assert_eq!(
        replicas.device(1, "edge-a")["status"]["session_replica"],
        holder.as_str(),
        "replicas agree on who holds edge-a"
    );
    for index in 0..3 {
        let listed = replicas.nodes[index]
            .flotctl_json(&["get", "devices"])
            .unwrap();
        assert_eq!(listed.as_array().map(Vec::len), Some(3), "replica {index}");
    }

    // Revoked through replica 2, edge-a's session on replica 3 closes.
    let revoked_at = Instant::now();
    replicas.nodes[1].flotctl_ok(&["cert", "revoke", "--device", "edge-a", "--reason", "stolen"]);
    wait("edge-a's session closed on replica 3", TIMEOUT, || {
        count_lines(
            &replicas.nodes[2].root.join("server-3.log"),
            "closed a session using a revoked certificate",
        ) >= 1
    });
    eprintln!(
        "revocation through replica 2 closed the session on replica 3 after {:?}",
        revoked_at.elapsed()
    );
    wait("edge-a offline through every replica", TIMEOUT, || {
        (0..3).all(|index| replicas.device(index, "edge-a")["status"]["online"] == false)
    });

    // Another change, through replica 3, still reaches the others.
    apply_fleet(&replicas.nodes[2], &root, "v2");
    wait("v2 on the agents that are still enrolled", TIMEOUT, || {
        applied(&root, "edge-b") == "v2" && applied(&root, "edge-c") == "v2"
    });
    assert_eq!(
        applied(&root, "edge-a"),
        "v1",
        "a revoked device gets nothing new"
    );
    drop(replicas.servers);
}

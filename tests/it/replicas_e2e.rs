//! Several control planes, end to end with real processes: SQLite serves exactly one process;
//! PostgreSQL serves any number of replicas that share one identity (CA, credentials) — started
//! from a copy of the first replica's data directory — and refuses a replica with another CA.

use crate::support;

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
    let _two = second.start_server(2);
    second.point_configs_here();
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
            servers.push(Some(node.start_server(index)));
            node.point_configs_here();
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
    // What a device reports reaches every replica, not only the one holding its session.
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    wait("edge-a's status report on every replica", TIMEOUT, || {
        (0..3).all(|index| {
            let device = replicas.device(index, "edge-a");
            device["status"]["systemInfo"]["hostname"] == hostname.trim()
                && device["status"]["summary"] == "Healthy"
        })
    });
    // A change to the device itself, through replica 2, re-reads it on the others, without
    // forgetting what it reported (replica 1 knows the report only from the feed).
    replicas.nodes[1].flotctl_ok(&["label", "device", "edge-a", "rack=r1"]);
    wait("edge-a's new label on replica 1", TIMEOUT, || {
        replicas.device(0, "edge-a")["metadata"]["labels"]["rack"] == "r1"
    });
    assert_eq!(
        replicas.device(0, "edge-a")["status"]["systemInfo"]["hostname"],
        hostname.trim(),
        "the report survives a change of the device on a replica that does not hold it"
    );

    // A renewal asked through replica 3 reaches edge-b, whose session replica 1 holds.
    replicas.nodes[2].flotctl_ok(&["cert", "renew", "--device", "edge-b"]);
    wait("edge-b renewed", TIMEOUT, || {
        replicas.nodes[1]
            .flotctl_json(&["cert", "list", "--device", "edge-b"])
            .and_then(|v| v.as_array().map(Vec::len))
            .is_some_and(|n| n >= 2)
    });

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

impl Replicas {
    /// Starts agent `name` (labels site=lab, role=web) whose first endpoint is replica `index`
    /// and whose further endpoints are the other replicas.
    fn agent_with_all_endpoints(&self, index: usize, name: &str) -> ChildGuard {
        let node = &self.nodes[index];
        let base = std::fs::read_to_string(node.agent_config()).unwrap();
        let others: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != index)
            .map(|(_, n)| format!("\"https://{}\"", n.agent_addr()))
            .collect();
        let config = self.root.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!("servers = [{}]\n{base}", others.join(", ")),
        )
        .unwrap();
        ChildGuard(
            node.agent_command(
                &config,
                name,
                &["site=lab", "role=web"],
                &self.root.join(format!("{name}-state")),
                &self.root.join(format!("{name}.log")),
            )
            .spawn()
            .unwrap(),
        )
    }

    /// Index of the replica whose log says it leads.
    fn leader(&self) -> Option<usize> {
        (0..self.nodes.len()).find(|index| {
            count_lines(
                &self.nodes[*index]
                    .root
                    .join(format!("server-{}.log", index + 1)),
                "this replica now leads",
            ) > 0
                && self.servers[*index].is_some()
        })
    }

    fn approve_all(&self, names: &[String]) {
        wait("every enrollment request", TIMEOUT, || {
            self.nodes[0]
                .flotctl_json(&["get", "enrollments", "--state", "pending"])
                .and_then(|v| v.as_array().map(Vec::len))
                == Some(names.len())
        });
        for (i, name) in names.iter().enumerate() {
            self.nodes[i % self.nodes.len()].flotctl_ok(&["approve", "enrollment", name]);
        }
    }
}

fn rollout_fleet(root: &Path, content: &str) -> String {
    format!(
        r#"kind: Fleet
metadata:
  name: lab
spec:
  selector: role=web
  rollout:
    batches:
      - count: 3
      - count: 3
      - percent: 100
    maxUnavailable: 2
    successThreshold: 100
    progressDeadlineSeconds: 300
  template:
    files:
      - path: "{out}/{{{{ device.name }}}}/site.conf"
        content: "{content}"
"#,
        out = root.join("out").display(),
    )
}

#[test]
fn a_replica_killed_mid_rollout_loses_no_agent_and_the_rollout_completes_once() {
    let mut replicas = Replicas::start(3);
    let root = replicas.root.clone();
    let names: Vec<String> = (0..9).map(|i| format!("edge-{i}")).collect();
    let _agents: Vec<ChildGuard> = names
        .iter()
        .enumerate()
        .map(|(i, name)| replicas.agent_with_all_endpoints(i % 3, name))
        .collect();
    replicas.approve_all(&names);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let path = root.join("fleet.yaml");
    std::fs::write(&path, rollout_fleet(&root, "v1")).unwrap();
    replicas.nodes[0].flotctl_ok(&["apply", "-f", &path.display().to_string()]);
    wait(
        "v1 on every agent, SYNCED through every replica",
        TIMEOUT,
        || {
            refs.iter().all(|name| applied(&root, name) == "v1")
                && replicas.synced_everywhere(&refs)
        },
    );

    // Revision 2 rolls out in batches; the replica leading it is killed in the middle.
    let leader = replicas.leader().expect("one replica leads");
    let observer = (leader + 1) % 3;
    std::fs::write(&path, rollout_fleet(&root, "v2")).unwrap();
    replicas.nodes[observer].flotctl_ok(&["apply", "-f", &path.display().to_string()]);
    let status = |replicas: &Replicas, index: usize| {
        replicas.nodes[index]
            .flotctl_json(&["rollout", "status", "lab"])
            .unwrap_or_default()
    };
    let mut max_updating = 0;
    wait("the second batch", TIMEOUT, || {
        let status = status(&replicas, observer);
        max_updating = max_updating.max(status["updating"].as_u64().unwrap_or(0));
        status["batch"].as_str().is_some_and(|b| b.starts_with('2'))
    });
    let mut killed = replicas.servers[leader].take().unwrap();
    kill_9(&mut killed);
    let killed_at = Instant::now();
    let before = refs.iter().filter(|n| applied(&root, n) == "v2").count();
    assert!(before < names.len(), "killed mid-rollout");

    wait("another replica to lead", TIMEOUT, || {
        replicas.leader().is_some_and(|l| l != leader)
    });
    eprintln!("leadership moved after {:?}", killed_at.elapsed());
    wait("the rollout to complete", TIMEOUT, || {
        let status = status(&replicas, observer);
        max_updating = max_updating.max(status["updating"].as_u64().unwrap_or(0));
        status["state"] == "completed"
    });
    assert!(
        max_updating <= 2,
        "at most 2 devices updating, saw {max_updating}"
    );
    wait("v2 on every agent", TIMEOUT, || {
        refs.iter().all(|name| applied(&root, name) == "v2")
    });
    // The killed replica's agents are on the others, and every survivor shows every agent.
    replicas.nodes = replicas
        .nodes
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i != leader)
        .map(|(_, n)| n)
        .collect();
    replicas.servers.retain(Option::is_some);
    wait(
        "every agent online and SYNCED on the survivors",
        TIMEOUT,
        || replicas.synced_everywhere(&refs),
    );
    eprintln!(
        "all agents SYNCED on the surviving replicas {:?} after the kill",
        killed_at.elapsed()
    );
    let v2 = replicas.device(0, "edge-0")["status"]["desired_version"]
        .as_str()
        .unwrap()
        .to_string();
    for name in &names {
        let log = std::fs::read_to_string(root.join(format!("{name}.log"))).unwrap();
        let version = replicas.device(0, name)["status"]["desired_version"]
            .as_str()
            .unwrap()
            .to_string();
        let applied = log
            .lines()
            .filter(|l| l.contains("spec applied") && l.contains(&version))
            .count();
        assert_eq!(applied, 1, "{name} applied revision 2 exactly once");
    }
    assert!(!v2.is_empty());
}

#[test]
fn a_replica_cut_from_its_database_catches_up_and_renewals_on_all_replicas_keep_one_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let first = Cluster::on_postgres(&root.join("r1"));
    // Short-lived certificates: every device renews on its own replica, all around the same time.
    let lifetimes = ["--device-cert-validity", "90s", "--renew-before", "70s"];
    let _one = first.start_server_with(1, &lifetimes);
    first.wait_until_serving();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let proxy = runtime.block_on(support::proxy::Proxy::start(first.db.server_addr()));
    let dir = root.join("r2");
    std::fs::create_dir_all(&dir).unwrap();
    first.copy_data_dir(&dir.join("data"));
    let second = first.replica(&dir, &dir.join("data"));
    let via_proxy = first.db.url_via(proxy.addr);
    let mut args = lifetimes.to_vec();
    args.extend(["--database-url", &via_proxy]);
    let _two = second.start_server_with(2, &args);
    second.point_configs_here();
    second.wait_until_serving();
    let nodes = [&first, &second];
    let names: Vec<String> = (0..4).map(|i| format!("edge-{i}")).collect();
    let _agents: Vec<ChildGuard> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            nodes[i % 2].spawn_agent(
                name,
                &["site=lab"],
                &root.join(format!("{name}-state")),
                &root.join(format!("{name}.log")),
            )
        })
        .collect();
    wait("every enrollment request", TIMEOUT, || {
        first
            .flotctl_json(&["get", "enrollments", "--state", "pending"])
            .and_then(|v| v.as_array().map(Vec::len))
            == Some(names.len())
    });
    for name in &names {
        first.flotctl_ok(&["approve", "enrollment", name]);
    }
    apply_fleet(&first, &root, "v1");
    wait("v1 everywhere", TIMEOUT, || {
        names.iter().all(|n| applied(&root, n) == "v1")
    });

    // Replica 2 loses its database; changes go on through replica 1 meanwhile.
    proxy.cut();
    apply_fleet(&first, &root, "v2");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        applied(&root, "edge-1"),
        "v1",
        "replica 2 cannot have learnt of v2 while cut off"
    );
    apply_fleet(&first, &root, "v3");
    proxy.restore();
    wait("v3 on the agents of both replicas", TIMEOUT, || {
        names.iter().all(|n| applied(&root, n) == "v3")
    });

    // Each device renews (on whichever replica holds it) at least once; one chain records it all.
    wait(
        "a renewal of every device",
        Duration::from_secs(120),
        || {
            names.iter().all(|name| {
                first
                    .flotctl_json(&["cert", "list", "--device", name])
                    .and_then(|v| v.as_array().map(Vec::len))
                    .is_some_and(|n| n >= 2)
            })
        },
    );
    for node in nodes {
        let verified = node.flotctl_ok(&["audit", "verify"]);
        assert!(verified.contains("intact"), "{verified}");
    }
    let audit = first.flotctl_json(&["audit", "list"]).unwrap();
    for name in &names {
        let id = first.flotctl_json(&["get", "device", name]).unwrap()["metadata"]["id"]
            .as_str()
            .unwrap()
            .to_string();
        let certificates: std::collections::BTreeSet<String> = first
            .flotctl_json(&["cert", "list", "--device", name])
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["serial"].as_str().unwrap().to_string())
            .collect();
        let issuances: Vec<String> = audit
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["device_id"] == id.as_str() && r["outcome"] == "ok")
            .filter(|r| r["kind"] == "issued" || r["kind"] == "renewed")
            .map(|r| r["serial"].as_str().unwrap().to_string())
            .collect();
        let audited: std::collections::BTreeSet<String> = issuances.iter().cloned().collect();
        assert_eq!(
            issuances.len(),
            audited.len(),
            "{name}: one record per certificate"
        );
        assert_eq!(audited, certificates, "{name}: every certificate audited");
    }
}

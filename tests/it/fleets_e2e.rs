//! Fleets end to end with real processes over real TLS: three agents with different labels, two
//! fleets with label templates, edits, relabelling, overrides, a render failure and a NACK.
//! SQLite by default; PostgreSQL when FLOTILLA_TEST_DATABASE_URL is set.

use crate::support;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::cluster::{APPLIED, Cluster, REJECTED, agent_counter_now, wait};
use support::{ChildGuard, binary};

const TIMEOUT: Duration = Duration::from_secs(30);

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn write_yaml(root: &Path, name: &str, text: &str) -> String {
    let path = root.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// Fleet YAML whose template writes one file per device under `out`, using a label.
fn fleet_yaml(name: &str, selector: &str, out: &Path, file: &str, content: &str) -> String {
    format!(
        "kind: Fleet\nmetadata:\n  name: {name}\nspec:\n  selector: {selector:?}\n  template:\n    files:\n      - path: \"{}/{{{{ device.name }}}}/{file}\"\n        content: {content:?}\n",
        out.display()
    )
}

struct Fleet {
    cluster: Cluster,
    out: PathBuf,
}

impl Fleet {
    fn device(&self, name: &str) -> Value {
        self.cluster
            .flotctl_json(&["get", "device", name])
            .unwrap_or(Value::Null)
    }

    fn state(&self, name: &str) -> String {
        self.device(name)["status"]["sync_state"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    fn wait_state(&self, name: &str, state: &str) {
        wait(&format!("{name} {state}"), TIMEOUT, || {
            self.state(name) == state
        });
    }

    fn file(&self, device: &str, file: &str) -> PathBuf {
        self.out.join(device).join(file)
    }

    fn wait_content(&self, device: &str, file: &str, content: &str) {
        let path = self.file(device, file);
        wait(
            &format!("{} = {content:?}", path.display()),
            TIMEOUT,
            || read(&path).as_deref() == Some(content),
        );
    }

    fn apply(&self, name: &str, yaml: &str) {
        let file = write_yaml(&self.cluster.root, name, yaml);
        self.cluster.flotctl_ok(&["apply", "-f", &file]);
    }
}

#[test]
fn fleets_render_per_device_follow_edits_and_labels_and_report_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let cluster = Cluster::new(&root);
    let _server = cluster.start_server(1);
    cluster.wait_until_serving();
    let fleet = Fleet {
        out: root.join("out"),
        cluster,
    };
    let cluster = &fleet.cluster;

    let mut agents = Vec::new();
    for (name, labels) in [
        ("a", ["role=web", "site=berlin"]),
        ("b", ["role=web", "site=paris"]),
        ("c", ["role=db", "site=berlin"]),
    ] {
        let log = root.join(format!("agent-{name}.log"));
        let state = root.join(format!("state-{name}"));
        agents.push(cluster.spawn_agent(name, &labels, &state, &log));
    }
    wait("three enrollment requests", TIMEOUT, || {
        cluster
            .flotctl_json(&["get", "enrollments", "--state", "pending"])
            .is_some_and(|v| v.as_array().is_some_and(|a| a.len() == 3))
    });
    for name in ["a", "b", "c"] {
        cluster.flotctl_ok(&["approve", "enrollment", name]);
    }

    // Two fleets; each agent gets exactly its own rendered file.
    let out = fleet.out.clone();
    fleet.apply(
        "fleets.yaml",
        &format!(
            "{}---\n{}",
            fleet_yaml(
                "web",
                "role=web",
                &out,
                "site.conf",
                "site={{ device.labels.site }}\n"
            ),
            fleet_yaml(
                "db",
                "role=db",
                &out,
                "db.conf",
                "db in {{ device.labels.site }}\n"
            )
        ),
    );
    fleet.wait_content("a", "site.conf", "site=berlin\n");
    fleet.wait_content("b", "site.conf", "site=paris\n");
    fleet.wait_content("c", "db.conf", "db in berlin\n");
    for name in ["a", "b", "c"] {
        fleet.wait_state(name, "SYNCED");
    }
    assert!(!fleet.file("a", "db.conf").exists());
    assert!(!fleet.file("c", "site.conf").exists());
    let listed = cluster.flotctl_ok(&["get", "devices", "-l", "role=web"]);
    assert!(
        listed.contains("a ") && listed.contains("b ") && !listed.contains("\nc "),
        "{listed}"
    );
    let web = cluster.flotctl_json(&["get", "fleet", "web"]).unwrap();
    assert_eq!(web["status"]["devices"], serde_json::json!(["a", "b"]));
    assert_eq!(web["status"]["synced"], 2);

    // Editing one fleet changes only its agents.
    let c_log = root.join("agent-c.log");
    let c_applies = agent_counter_now(&c_log, APPLIED);
    fleet.apply(
        "web.yaml",
        &fleet_yaml(
            "web",
            "role=web",
            &out,
            "site.conf",
            "v2 site={{ device.labels.site }}\n",
        ),
    );
    fleet.wait_content("a", "site.conf", "v2 site=berlin\n");
    fleet.wait_content("b", "site.conf", "v2 site=paris\n");
    fleet.wait_state("a", "SYNCED");
    assert_eq!(
        agent_counter_now(&c_log, APPLIED),
        c_applies,
        "db agent untouched"
    );
    assert_eq!(
        read(&fleet.file("c", "db.conf")).as_deref(),
        Some("db in berlin\n")
    );

    // Relabelling moves c to web; its files follow, and a watch of role=web sees it arrive.
    let watch_out = root.join("watch.jsonl");
    let _watch = ChildGuard(
        Command::new(binary("flotctl"))
            .arg("--config")
            .arg(cluster.data.join("flotctl.toml"))
            .args(["watch", "devices", "-l", "role=web", "-o", "json"])
            .stdout(std::fs::File::create(&watch_out).unwrap())
            .spawn()
            .unwrap(),
    );
    let watched = || -> Vec<Value> {
        read(&watch_out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    wait("the watch's initial set", TIMEOUT, || {
        watched().iter().any(|e| e["type"] == "SYNCED")
    });
    let initial: Vec<Value> = watched();
    assert_eq!(initial.len(), 3, "a, b, then SYNCED: {initial:?}");
    assert_eq!(initial[0]["device"]["metadata"]["name"], "a");
    cluster.flotctl_ok(&["label", "device", "c", "role=web"]);
    wait("the watch to see c added", TIMEOUT, || {
        watched()
            .iter()
            .any(|e| e["type"] == "ADDED" && e["device"]["metadata"]["name"] == "c")
    });
    fleet.wait_content("c", "site.conf", "v2 site=berlin\n");
    wait("c's db.conf removed", TIMEOUT, || {
        !fleet.file("c", "db.conf").exists()
    });
    assert_eq!(fleet.device("c")["fleet"], "web");

    // A device override beats the fleet template.
    fleet.apply(
        "override.yaml",
        &format!(
            "kind: Device\nmetadata:\n  name: a\nspec:\n  files:\n    - path: {}\n      content: \"override\\n\"\n",
            fleet.file("a", "site.conf").display()
        ),
    );
    fleet.wait_content("a", "site.conf", "override\n");
    fleet.wait_state("a", "SYNCED");

    // A template b cannot render: b shows ERROR with the reason and keeps its files; the others
    // (which have the label) get the new render.
    cluster.flotctl_ok(&["label", "device", "c", "rack=r1"]);
    fleet.apply(
        "rack.yaml",
        &fleet_yaml(
            "web",
            "role=web",
            &out,
            "site.conf",
            "rack={{ device.labels.rack }}\n",
        ),
    );
    fleet.wait_content("c", "site.conf", "rack=r1\n");
    fleet.wait_state("b", "ERROR");
    let b = fleet.device("b");
    let reason = b["status"]["render_error"].as_str().unwrap_or_default();
    assert!(reason.contains("undefined"), "{b}");
    assert_eq!(
        read(&fleet.file("b", "site.conf")).as_deref(),
        Some("v2 site=paris\n")
    );
    let described = cluster.flotctl_ok(&["describe", "fleet", "web"]);
    assert!(
        described.contains("Render failures:") && described.contains("b: "),
        "{described}"
    );

    // Fixing the template brings b back.
    fleet.apply(
        "rack-fixed.yaml",
        &fleet_yaml(
            "web",
            "role=web",
            &out,
            "site.conf",
            "rack={{ device.labels.rack | default('none') }}\n",
        ),
    );
    fleet.wait_content("b", "site.conf", "rack=none\n");
    fleet.wait_state("b", "SYNCED");

    // A spec the agent cannot apply (a file below a regular file): NACK, ERROR with the reason,
    // last good files kept, and the version is not pushed again.
    let b_log = root.join("agent-b.log");
    let blocked = fleet.file("b", "site.conf").join("child");
    fleet.apply(
        "nack.yaml",
        &format!(
            "kind: Device\nmetadata:\n  name: b\nspec:\n  files:\n    - path: {}\n      content: x\n",
            blocked.display()
        ),
    );
    fleet.wait_state("b", "ERROR");
    let b = fleet.device("b");
    let error = b["status"]["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("site.conf"), "{b}");
    assert_eq!(
        read(&fleet.file("b", "site.conf")).as_deref(),
        Some("rack=none\n")
    );
    let rejected = agent_counter_now(&b_log, REJECTED);
    assert_eq!(rejected, 1);
    // Several heartbeats (2 s each) later, still not resent.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        agent_counter_now(&b_log, REJECTED),
        rejected,
        "a NACKed version is not resent"
    );
    assert_eq!(fleet.state("b"), "ERROR");

    // Removing the bad override brings b back to SYNCED.
    fleet.apply(
        "unblock.yaml",
        "kind: Device\nmetadata:\n  name: b\nspec: {}\n",
    );
    fleet.wait_state("b", "SYNCED");
    assert_eq!(
        read(&fleet.file("b", "site.conf")).as_deref(),
        Some("rack=none\n")
    );
    drop(agents);
}

//! End to end with real processes over real TLS: `flotilla serve`, `flotilla-agent` and `flotctl`.
//! An agent enrolls, is approved, receives a two-file spec, follows a change, and survives a
//! control-plane restart without re-applying anything. SQLite by default; PostgreSQL when
//! FLOTILLA_TEST_DATABASE_URL is set.

use crate::support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use support::binary;
use support::cluster::{
    APPLIED, Cluster, SESSIONS, agent_counter, agent_counter_now, count_lines, wait,
};

fn device_yaml(out: &Path, a: &str) -> String {
    format!(
        "kind: Device\nmetadata:\n  name: edge-1\nspec:\n  files:\n    - path: {}\n      content: {a:?}\n      mode: \"0600\"\n    - path: {}\n      content: \"#!/bin/sh\\necho hi\\n\"\n      mode: \"0755\"\n",
        out.join("etc/app.conf").display(),
        out.join("bin/hello.sh").display()
    )
}

#[test]
fn an_enrolled_agent_applies_pushed_specs_and_survives_a_server_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let cluster = Cluster::new(&root);
    eprintln!(
        "backend: {}",
        if cluster.db.is_postgres() {
            "postgres"
        } else {
            "sqlite"
        }
    );
    let mut server = cluster.start_server(1);
    cluster.wait_until_serving();

    let agent_log = root.join("agent.log");
    let mut agent = cluster.start_agent(&agent_log);
    let key = root.join("agent-state/device.key");
    wait("the enrollment request", Duration::from_secs(30), || {
        cluster
            .flotctl_json(&["get", "enrollments"])
            .is_some_and(|v| v[0]["name"] == "edge-1" && v[0]["state"] == "PENDING")
    });
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let approved = cluster.flotctl(&["approve", "enrollment", "edge-1", "--label", "role=gateway"]);
    assert!(
        approved.status.success(),
        "{}",
        String::from_utf8_lossy(&approved.stderr)
    );

    let out = root.join("out");
    let spec_file = root.join("device.yaml");
    std::fs::write(&spec_file, device_yaml(&out, "v1\n")).unwrap();
    let applied = cluster.flotctl(&["apply", "-f", spec_file.to_str().unwrap()]);
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );

    let conf = out.join("etc/app.conf");
    let script = out.join("bin/hello.sh");
    wait("both files on disk", Duration::from_secs(30), || {
        std::fs::read_to_string(&conf).is_ok_and(|c| c == "v1\n") && script.exists()
    });
    assert_eq!(
        std::fs::read_to_string(&script).unwrap(),
        "#!/bin/sh\necho hi\n"
    );
    assert_eq!(
        std::fs::metadata(&conf).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(&script).unwrap().permissions().mode() & 0o777,
        0o755
    );

    let synced = |cluster: &Cluster| {
        cluster
            .flotctl_json(&["get", "device", "edge-1"])
            .is_some_and(|d| {
                let s = &d["status"];
                s["online"] == true
                    && s["sync_state"] == "SYNCED"
                    && s["acked_version"] == s["desired_version"]
            })
    };
    wait("edge-1 online and SYNCED", Duration::from_secs(20), || {
        synced(&cluster)
    });
    let device = cluster.flotctl_json(&["get", "device", "edge-1"]).unwrap();
    assert_eq!(device["metadata"]["labels"]["site"], "lab");
    assert_eq!(device["metadata"]["labels"]["role"], "gateway");

    // A change reaches the agent as a push (the agent never polls).
    std::fs::write(&spec_file, device_yaml(&out, "v2\n")).unwrap();
    assert!(
        cluster
            .flotctl(&["apply", "-f", spec_file.to_str().unwrap()])
            .status
            .success()
    );
    let took = wait("the changed file", Duration::from_secs(10), || {
        std::fs::read_to_string(&conf).is_ok_and(|c| c == "v2\n")
    });
    eprintln!("change reached the agent {took:?} after `flotctl apply` returned");
    wait("SYNCED on v2", Duration::from_secs(20), || synced(&cluster));

    // Restart the control plane: the agent comes back by itself and nothing is re-applied.
    let applies_before = agent_counter_now(&agent_log, APPLIED);
    let sessions_before = agent_counter_now(&agent_log, SESSIONS);
    let mtime = std::fs::metadata(&conf).unwrap().mtime_nsec();
    server.terminate();
    let _server = cluster.start_server(2);
    wait("the agent to reconnect", Duration::from_secs(60), || {
        agent_counter(&agent_log, SESSIONS).is_some_and(|n| n > sessions_before)
    });
    wait(
        "edge-1 SYNCED after the restart",
        Duration::from_secs(20),
        || synced(&cluster),
    );
    assert_eq!(
        agent_counter_now(&agent_log, APPLIED),
        applies_before,
        "nothing re-applied"
    );
    assert_eq!(std::fs::metadata(&conf).unwrap().mtime_nsec(), mtime);
    assert_eq!(
        count_lines(&root.join("server-2.log"), "pushing spec"),
        0,
        "resume costs no push"
    );

    // Restart the agent: it resumes from the spec it keeps on disk and applies nothing again.
    agent.terminate();
    let second_log = root.join("agent-2.log");
    let _agent = cluster.start_agent(&second_log);
    wait(
        "the restarted agent's session",
        Duration::from_secs(30),
        || agent_counter(&second_log, SESSIONS) == Some(1),
    );
    wait(
        "edge-1 SYNCED after the agent restart",
        Duration::from_secs(20),
        || synced(&cluster),
    );
    assert_eq!(
        agent_counter_now(&second_log, APPLIED),
        0,
        "nothing re-applied"
    );
    assert_eq!(
        count_lines(&second_log, "enrollment request submitted"),
        0,
        "no re-enrollment"
    );
    assert_eq!(std::fs::metadata(&conf).unwrap().mtime_nsec(), mtime);
}

#[test]
fn migrate_applies_the_schema_once() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = Cluster::new(tmp.path());
    let migrate = || {
        let mut command = Command::new(binary("flotilla"));
        command.arg("migrate").arg("--data-dir").arg(&cluster.data);
        if cluster.db.is_postgres() {
            command.arg("--database-url").arg(&cluster.db.url);
        }
        command.output().unwrap()
    };
    let first = migrate();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/sqlite"))
        .unwrap()
        .count();
    assert_eq!(
        String::from_utf8_lossy(&first.stdout),
        format!("{migrations} migration(s) applied\n")
    );
    let second = migrate();
    assert!(second.status.success());
    assert_eq!(
        String::from_utf8_lossy(&second.stdout),
        "0 migration(s) applied\n"
    );
}

#[test]
fn flotctl_reports_bad_input_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let cluster = Cluster::new(&root);
    let _server = cluster.start_server(1);
    cluster.wait_until_serving();
    let bad = root.join("bad.yaml");
    for (content, expected) in [
        ("kind: Device\nmetadata: [\n", "not valid YAML"),
        ("kind: Device\nmetadata: {name: ghost}\n", "NotFound"),
        (
            "kind: Device\nmetadata: {name: ghost}\nspec:\n  files:\n    - path: relative/x\n",
            "spec.files[0].path",
        ),
    ] {
        std::fs::write(&bad, content).unwrap();
        let out = cluster.flotctl(&["apply", "-f", bad.to_str().unwrap()]);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{content:?}: {stderr}");
    }
    let out = cluster.flotctl(&["get", "device", "ghost"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("device \"ghost\" not found"));
}

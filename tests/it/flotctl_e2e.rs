//! flotctl as an operator uses it, with real processes: versions of both sides, approving many
//! requests at once, what `get -o yaml` prints applied again (one device, a whole list, from
//! stdin), conflicts that apply reports (and `--strict` fails on), `describe -o json`, `get -w`,
//! `rollout watch` ending with the rollout, and clear errors: no configuration, the agent endpoint
//! instead of the admin one, a YAML mistake with its line, a watch the server ends.

use crate::support;

use serde_json::Value;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;
use support::binary;
use support::cluster::{Cluster, wait};

const TIMEOUT: Duration = Duration::from_secs(60);

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs flotctl with `input` on its stdin.
fn piped(cluster: &Cluster, args: &[&str], input: &[u8]) -> std::process::Output {
    let mut child = Command::new(binary("flotctl"))
        .arg("--config")
        .arg(&cluster.ctl_config)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn flotctl_behaves_like_an_operator_expects() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let cluster = Cluster::new(root);
    let mut server = cluster.start_server(0);
    cluster.wait_until_serving();

    // Versions of both sides.
    let version = cluster.flotctl_json(&["version"]).unwrap();
    assert_eq!(version["client"]["version"], flotilla::VERSION);
    assert_eq!(version["server"]["version"], flotilla::VERSION);
    assert!(version["server"]["database"].is_string());

    // Three agents ask to enroll; two from site a are approved by selector, the rest at once.
    let mut agents = Vec::new();
    for (name, site) in [("a-1", "site=a"), ("a-2", "site=a"), ("b-1", "site=b")] {
        agents.push(cluster.spawn_agent(
            name,
            &[site, "role=web"],
            &root.join(format!("state-{name}")),
            &root.join(format!("agent-{name}.log")),
        ));
    }
    wait("three enrollment requests", TIMEOUT, || {
        cluster
            .flotctl_json(&["get", "enrollments", "--state", "pending"])
            .is_some_and(|v| v.as_array().is_some_and(|a| a.len() == 3))
    });
    let approved = cluster
        .flotctl_json(&[
            "approve",
            "enrollment",
            "-l",
            "site=a",
            "--label",
            "tier=edge",
        ])
        .unwrap();
    let mut names: Vec<&str> = approved
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["a-1", "a-2"]);
    cluster.flotctl_ok(&["approve", "enrollment", "--all-pending"]);
    wait("three devices online", TIMEOUT, || {
        cluster.flotctl_json(&["get", "devices"]).is_some_and(|v| {
            v.as_array()
                .is_some_and(|a| a.len() == 3 && a.iter().all(|d| d["status"]["online"] == true))
        })
    });
    let a1 = cluster.flotctl_json(&["get", "device", "a-1"]).unwrap();
    assert_eq!(a1["metadata"]["labels"]["tier"], "edge");
    let usage = cluster.flotctl(&["approve", "enrollment", "x", "-l", "site=a"]);
    assert!(!usage.status.success());

    // What get prints applies again: one device from stdin, then the whole list.
    let spec = root.join("out");
    let yaml = format!(
        "kind: Device\nmetadata: {{name: a-1}}\nspec:\n  files:\n    - path: {}/a-1\n      content: hello\n",
        spec.display()
    );
    std::fs::write(root.join("a-1.yaml"), yaml).unwrap();
    cluster.flotctl_ok(&["apply", "-f", root.join("a-1.yaml").to_str().unwrap()]);
    let printed = cluster.flotctl_ok(&["get", "device", "a-1", "-o", "yaml"]);
    let again = piped(&cluster, &["apply", "-f", "-"], printed.as_bytes());
    assert!(again.status.success(), "{}", stderr(&again));
    let list = cluster.flotctl_ok(&["get", "devices", "-o", "yaml"]);
    let again = piped(&cluster, &["apply", "-f", "-"], list.as_bytes());
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(
        String::from_utf8_lossy(&again.stdout)
            .lines()
            .filter(|l| l.ends_with("applied"))
            .count(),
        3
    );
    wait("the file", TIMEOUT, || spec.join("a-1").exists());

    // A YAML mistake names its line.
    std::fs::write(
        root.join("typo.yaml"),
        "kind: Device\nmetadata:\n  name: a-1\nspec:\n  files:\n    - path: /tmp/x\n      contnet: y\n",
    )
    .unwrap();
    let typo = cluster.flotctl(&["apply", "-f", root.join("typo.yaml").to_str().unwrap()]);
    assert!(!typo.status.success());
    assert!(
        stderr(&typo).contains("contnet") && stderr(&typo).contains("line 7"),
        "{}",
        stderr(&typo)
    );

    // Two fleets over the same devices: apply says so, and --strict fails.
    let fleet = |name: &str, selector: &str| {
        let path = root.join(format!("{name}.yaml"));
        std::fs::write(
            &path,
            format!("kind: Fleet\nmetadata: {{name: {name}}}\nspec:\n  selector: {selector}\n"),
        )
        .unwrap();
        path
    };
    cluster.flotctl_ok(&["apply", "-f", fleet("web", "role=web").to_str().unwrap()]);
    let conflicting = fleet("site-a", "site=a");
    let out = cluster.flotctl(&["apply", "-f", conflicting.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(
        stderr(&out).contains("conflicts with fleet/web"),
        "{}",
        stderr(&out)
    );
    let out = cluster.flotctl(&["apply", "--strict", "-f", conflicting.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--strict"), "{}", stderr(&out));

    // Paged listing, and a limit.
    let limited = cluster.flotctl(&["get", "devices", "--limit", "2", "-o", "name"]);
    assert_eq!(String::from_utf8_lossy(&limited.stdout).lines().count(), 2);
    assert!(
        stderr(&limited).contains("more match"),
        "{}",
        stderr(&limited)
    );

    // edit: saved with a change, it is applied; unchanged, nothing happens; broken, it is kept.
    let editor = |script: &str| {
        Command::new(binary("flotctl"))
            .arg("--config")
            .arg(&cluster.ctl_config)
            .args(["edit", "device", "a-1"])
            .env("EDITOR", script)
            .env_remove("VISUAL")
            .output()
            .unwrap()
    };
    let changed = editor("sed -i -e 's/content: hello/content: edited/'");
    assert!(changed.status.success(), "{}", stderr(&changed));
    wait("the edited file", TIMEOUT, || {
        std::fs::read_to_string(spec.join("a-1")).ok().as_deref() == Some("edited")
    });
    let untouched = editor("true");
    assert!(untouched.status.success());
    assert!(
        stderr(&untouched).contains("edit cancelled"),
        "{}",
        stderr(&untouched)
    );
    let broken = editor("sed -i -e 's/^kind: Device/kind: Devise/'");
    assert!(!broken.status.success());
    assert!(
        stderr(&broken).contains("your edit is kept in"),
        "{}",
        stderr(&broken)
    );

    // describe honours -o json.
    let described: Value =
        serde_json::from_str(&cluster.flotctl_ok(&["describe", "device", "a-1", "-o", "json"]))
            .unwrap();
    assert_eq!(described["metadata"]["name"], "a-1");
    assert!(
        !cluster
            .flotctl_ok(&["describe", "fleet", "web"])
            .starts_with('{'),
        "the table view stays text"
    );

    // get -w lists, then follows.
    let mut watch = Command::new(binary("flotctl"))
        .arg("--config")
        .arg(&cluster.ctl_config)
        .args(["get", "devices", "-w", "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(watch.stdout.take().unwrap()));
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["type"], "ADDED");

    // The control plane stops: the watch ends with an error that says so.
    server.terminate();
    let ended = watch.wait_with_output().unwrap();
    assert!(!ended.status.success());
    assert!(
        stderr(&ended).contains("shutting down and closed the watch"),
        "{}",
        stderr(&ended)
    );
    drop(agents);

    // No configuration, and the agent endpoint by mistake.
    let missing = Command::new(binary("flotctl"))
        .args([
            "--config",
            root.join("nowhere.toml").to_str().unwrap(),
            "get",
            "devices",
        ])
        .output()
        .unwrap();
    assert!(
        stderr(&missing).contains("flotilla serve` writes one"),
        "{}",
        stderr(&missing)
    );
    let _server = cluster.start_server(1);
    cluster.wait_until_serving();
    let text = std::fs::read_to_string(&cluster.ctl_config).unwrap();
    let wrong = root.join("wrong-port.toml");
    std::fs::write(
        &wrong,
        text.replace(
            &cluster.admin_addr().to_string(),
            &cluster.agent_addr().to_string(),
        ),
    )
    .unwrap();
    let out = Command::new(binary("flotctl"))
        .args(["--config", wrong.to_str().unwrap(), "get", "fleets"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("agent endpoint"), "{}", stderr(&out));
}

#[test]
fn a_revoked_device_stops_is_shown_as_revoked_and_stays_out_of_rollouts() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let cluster = Cluster::new(root);
    let _server = cluster.start_server_with(0, &["--metrics-listen", "127.0.0.1:0"]);
    cluster.wait_until_serving();
    let metrics = cluster.operations_addr();
    let mut agents: Vec<support::ChildGuard> = ["edge-1", "edge-2"]
        .iter()
        .map(|name| {
            cluster.spawn_agent(
                name,
                &["role=web"],
                &root.join(format!("state-{name}")),
                &root.join(format!("agent-{name}.log")),
            )
        })
        .collect();
    wait("two requests", TIMEOUT, || {
        cluster
            .flotctl_json(&["get", "enrollments", "--state", "pending"])
            .is_some_and(|v| v.as_array().is_some_and(|a| a.len() == 2))
    });
    cluster.flotctl_ok(&["approve", "enrollment", "--all-pending"]);
    let out = root.join("out");
    let fleet = |revision: u32| {
        let path = root.join("web.yaml");
        std::fs::write(
            &path,
            format!(
                "kind: Fleet\nmetadata: {{name: web}}\nspec:\n  selector: role=web\n  rollout:\n    batches: [{{count: 1}}]\n    offlineBlocks: true\n    successThreshold: 100\n  template:\n    files:\n      - path: \"{}/{{{{ device.name }}}}\"\n        content: \"{revision}\"\n",
                out.display()
            ),
        )
        .unwrap();
        cluster.flotctl_ok(&["apply", "-f", path.to_str().unwrap()]);
    };
    fleet(1);
    wait("revision 1 on both", TIMEOUT, || {
        ["edge-1", "edge-2"]
            .iter()
            .all(|n| std::fs::read_to_string(out.join(n)).ok().as_deref() == Some("1"))
    });

    cluster.flotctl_ok(&["cert", "revoke", "--device", "edge-2", "--reason", "stolen"]);
    // The agent stops for good instead of retrying forever.
    let status = wait_exit(&mut agents[1], TIMEOUT);
    assert_eq!(status.code(), Some(78), "{status:?}");
    let device = cluster.flotctl_json(&["get", "device", "edge-2"]).unwrap();
    assert_eq!(device["status"]["sync_state"], "REVOKED", "{device}");
    assert_eq!(device["status"]["summary"], "Revoked");
    assert_eq!(device["status"]["renewal_state"], "REVOKED");
    let table = cluster.flotctl_ok(&["get", "devices"]);
    assert!(
        table
            .lines()
            .any(|l| l.contains("edge-2") && l.contains("REVOKED")),
        "{table}"
    );
    let exposition = |name: &str| {
        let text = support::http_body_blocking(&format!("http://{metrics}/metrics"));
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    wait("the gauges to say so", TIMEOUT, || {
        exposition("flotilla_devices{sync_state=\"revoked\"}") == Some(1.0)
            && exposition("flotilla_devices{sync_state=\"offline\"}") == Some(0.0)
    });

    // A rollout that waits for offline devices does not wait for a revoked one.
    fleet(2);
    wait("the rollout to complete without edge-2", TIMEOUT, || {
        cluster
            .flotctl_json(&["rollout", "status", "web"])
            .is_some_and(|r| r["state"] == "completed")
    });
    assert_eq!(std::fs::read_to_string(out.join("edge-1")).unwrap(), "2");
    assert_eq!(std::fs::read_to_string(out.join("edge-2")).unwrap(), "1");
}

fn wait_exit(child: &mut support::ChildGuard, timeout: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

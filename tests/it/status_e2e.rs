//! Device status end to end with real processes: the agent reports this machine's own hostname,
//! kernel, architecture, OS, CPUs and memory, and they show in `flotctl get device -o json`,
//! `-o wide` and `describe`; a memory monitor below the machine's real use raises
//! ResourcePressure (and a field selector finds the device), raising the threshold clears it; a
//! managed file changed on disk is put back within the check period (Drifted raised, then
//! cleared, as a watch sees it), and a `drift: report` file is reported and left alone.

use crate::support;

use serde_json::Value;
use std::process::Command;
use std::time::Duration;
use support::cluster::{Cluster, wait};

fn command_output(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(out.status.success(), "{program} {args:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn os_release(key: &str) -> String {
    let text = std::fs::read_to_string("/etc/os-release").unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_default()
}

fn mem_total_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kib * 1024
}

fn device_with_monitor(warning: u32) -> String {
    format!(
        "kind: Device\nmetadata:\n  name: edge-1\nspec:\n  resources:\n    - monitor: memory\n      warning: {warning}\n"
    )
}

/// Two managed files: `kept` corrected when it drifts, `local` only reported.
fn device_with_files(out: &std::path::Path) -> String {
    format!(
        "kind: Device\nmetadata:\n  name: edge-1\nspec:\n  files:\n    - path: {}\n      content: \"kept\\n\"\n    - path: {}\n      content: \"local\\n\"\n      drift: report\n",
        out.join("kept.conf").display(),
        out.join("local.conf").display()
    )
}

fn condition(device: &Value, kind: &str) -> Option<(String, String)> {
    device["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_string(),
                c["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
}

#[test]
fn an_agent_reports_this_machine_and_its_monitors() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let cluster = Cluster::new(&root);
    let _server = cluster.start_server(1);
    cluster.wait_until_serving();

    // Sample every second so the test need not wait the default ten.
    let config = root.join("agent-fast.toml");
    let mut text = std::fs::read_to_string(cluster.agent_config()).unwrap();
    text.push_str("\n[status]\nsample_interval_secs = 1\ndrift_check_interval_secs = 2\n");
    std::fs::write(&config, text).unwrap();
    let log = root.join("agent.log");
    let _agent = support::ChildGuard(
        cluster
            .agent_command(
                &config,
                "edge-1",
                &["site=lab"],
                &root.join("agent-state"),
                &log,
            )
            .spawn()
            .unwrap(),
    );
    wait("the enrollment request", Duration::from_secs(30), || {
        cluster
            .flotctl_json(&["get", "enrollments"])
            .is_some_and(|v| v[0]["name"] == "edge-1")
    });
    cluster.flotctl_ok(&["approve", "enrollment", "edge-1"]);

    let mut device = Value::Null;
    wait("the agent's system info", Duration::from_secs(30), || {
        device = cluster
            .flotctl_json(&["get", "device", "edge-1"])
            .unwrap_or(Value::Null);
        device["status"]["systemInfo"]["hostname"].is_string()
    });
    let info = &device["status"]["systemInfo"];
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(info["hostname"], hostname.trim());
    let kernel = command_output("uname", &["-r"]);
    let arch = command_output("uname", &["-m"]);
    assert_eq!(info["kernelRelease"], kernel.as_str());
    assert_eq!(info["architecture"], arch.as_str());
    assert_eq!(info["osPrettyName"], os_release("PRETTY_NAME").as_str());
    assert_eq!(info["osId"], os_release("ID").as_str());
    let cpus: u64 = command_output("getconf", &["_NPROCESSORS_ONLN"])
        .parse()
        .unwrap();
    assert_eq!(info["cpuCount"], cpus);
    assert_eq!(info["memoryTotalBytes"], mem_total_bytes());
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(info["bootId"], boot_id.trim());
    assert_eq!(info["agentVersion"], env!("CARGO_PKG_VERSION"));
    assert!(
        device["status"]["resources"]["memoryTotalBytes"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert_eq!(device["status"]["summary"], "Healthy");
    assert_eq!(
        condition(&device, "Online"),
        Some(("True".into(), "SessionOpen".into()))
    );

    let wide = cluster.flotctl_ok(&["get", "devices", "-o", "wide"]);
    let header = wide.lines().next().unwrap();
    for column in ["STATUS", "OS", "KERNEL", "ARCH", "AGENT", "MEMORY", "DISK"] {
        assert!(header.contains(column), "{column} in {header}");
    }
    let row = wide.lines().find(|l| l.starts_with("edge-1")).unwrap();
    for value in [kernel.as_str(), arch.as_str(), &os_release("ID"), "Healthy"] {
        assert!(row.contains(value), "{value} in {row}");
    }
    let table = cluster.flotctl_ok(&["get", "devices"]);
    assert!(table.lines().next().unwrap().contains("STATUS"));
    let describe = cluster.flotctl_ok(&["describe", "device", "edge-1"]);
    for needle in [
        format!("Kernel:       {kernel}"),
        format!("Architecture: {arch}"),
        format!("Hostname:     {}", hostname.trim()),
        format!("CPUs:         {cpus}"),
        "Conditions:".to_string(),
        "ResourcePressure".to_string(),
        "Status:       Healthy".to_string(),
    ] {
        assert!(describe.contains(&needle), "{needle:?} in\n{describe}");
    }

    // A monitor below the real memory use fires; the field selector finds the device.
    let spec = root.join("device.yaml");
    std::fs::write(&spec, device_with_monitor(1)).unwrap();
    cluster.flotctl_ok(&["apply", "-f", spec.to_str().unwrap()]);
    wait("ResourcePressure", Duration::from_secs(30), || {
        cluster
            .flotctl_json(&["get", "device", "edge-1"])
            .is_some_and(|d| {
                condition(&d, "ResourcePressure") == Some(("True".into(), "Warning".into()))
                    && d["status"]["summary"] == "Degraded"
            })
    });
    let degraded = cluster.flotctl_ok(&[
        "get",
        "devices",
        "--field-selector",
        "status.summary=Degraded",
    ]);
    assert!(
        degraded.lines().any(|l| l.starts_with("edge-1")),
        "{degraded}"
    );
    let describe = cluster.flotctl_ok(&["describe", "device", "edge-1"]);
    assert!(
        describe.contains("Alert:") && describe.contains("(warning)"),
        "{describe}"
    );

    // Raising the threshold above any possible use clears it.
    std::fs::write(&spec, device_with_monitor(100)).unwrap();
    cluster.flotctl_ok(&["apply", "-f", spec.to_str().unwrap()]);
    wait("ResourcePressure cleared", Duration::from_secs(30), || {
        cluster
            .flotctl_json(&["get", "device", "edge-1"])
            .is_some_and(|d| {
                condition(&d, "ResourcePressure")
                    == Some(("False".into(), "WithinThresholds".into()))
                    && d["status"]["summary"] == "Healthy"
            })
    });
    let none = cluster.flotctl_ok(&[
        "get",
        "devices",
        "--field-selector",
        "status.summary=Degraded",
    ]);
    assert!(!none.lines().any(|l| l.starts_with("edge-1")), "{none}");

    // Drift: a watch records every change of the device meanwhile.
    let events = root.join("watch.jsonl");
    let _watch = support::ChildGuard(
        Command::new(support::binary("flotctl"))
            .arg("--config")
            .arg(&cluster.ctl_config)
            .args(["watch", "devices", "-o", "json"])
            .stdout(std::fs::File::create(&events).unwrap())
            .spawn()
            .unwrap(),
    );
    let out = root.join("managed");
    std::fs::write(&spec, device_with_files(&out)).unwrap();
    cluster.flotctl_ok(&["apply", "-f", spec.to_str().unwrap()]);
    let (kept, local) = (out.join("kept.conf"), out.join("local.conf"));
    wait("both files applied", Duration::from_secs(30), || {
        std::fs::read_to_string(&local).is_ok_and(|c| c == "local\n")
            && std::fs::read_to_string(&kept).is_ok_and(|c| c == "kept\n")
    });
    wait("a clean drift check", Duration::from_secs(30), || {
        cluster
            .flotctl_json(&["get", "device", "edge-1"])
            .is_some_and(|d| condition(&d, "Drifted") == Some(("False".into(), "InSync".into())))
    });
    std::fs::write(&kept, "edited by hand\n").unwrap();
    wait("the edited file put back", Duration::from_secs(10), || {
        std::fs::read_to_string(&kept).is_ok_and(|c| c == "kept\n")
    });
    wait(
        "Drifted cleared after the correction",
        Duration::from_secs(30),
        || {
            let text = std::fs::read_to_string(&events).unwrap_or_default();
            let drifted: Vec<(String, String)> = text
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter_map(|e| condition(&e["device"], "Drifted"))
                .collect();
            let raised = drifted
                .iter()
                .position(|c| *c == ("True".to_string(), "Corrected".to_string()));
            raised.is_some_and(|at| {
                drifted[at..]
                    .iter()
                    .any(|c| *c == ("False".to_string(), "InSync".to_string()))
            })
        },
    );
    std::fs::write(&local, "tuned on site\n").unwrap();
    wait("the reported drift", Duration::from_secs(30), || {
        cluster
            .flotctl_json(&["get", "device", "edge-1"])
            .is_some_and(|d| {
                condition(&d, "Drifted") == Some(("True".into(), "Reported".into()))
                    && d["status"]["summary"] == "Degraded"
                    && d["status"]["drift"]["items"][0]["name"] == local.display().to_string()
            })
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        std::fs::read_to_string(&local).unwrap(),
        "tuned on site\n",
        "drift: report leaves the file alone"
    );
    let describe = cluster.flotctl_ok(&["describe", "device", "edge-1"]);
    assert!(
        describe.contains(&format!("{} (content; left as it is)", local.display())),
        "{describe}"
    );
    std::fs::write(&local, "local\n").unwrap();
    wait(
        "Drifted cleared once the file matches",
        Duration::from_secs(30),
        || {
            cluster
                .flotctl_json(&["get", "device", "edge-1"])
                .is_some_and(|d| {
                    condition(&d, "Drifted") == Some(("False".into(), "InSync".into()))
                })
        },
    );

    // A malformed field selector is refused clearly.
    let bad = cluster.flotctl(&["get", "devices", "--field-selector", "status.colour=red"]);
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("unknown field \"status.colour\""),
        "{stderr}"
    );
}

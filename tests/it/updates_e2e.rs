//! Updating the agents themselves, with real processes: a signed build published with flotctl
//! rolls out to three agents in batches of one — each downloads, verifies, swaps, restarts (as
//! systemd would start it again) and confirms; builds signed by another key, corrupted or
//! truncated downloads and OS images on a device without bootc are refused before anything is
//! replaced and halt the rollout; a signed build that exits at once is rolled back by the
//! launcher; a kill -9 at every step of an update leaves an agent that converges; waiting for a
//! maintenance window shows in the status; SIGTERM lets an apply finish, SIGQUIT stops at once.
//! SQLite by default; PostgreSQL when FLOTILLA_TEST_DATABASE_URL is set.

use crate::support;

use serde_json::Value;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::binary;
use support::cluster::{Cluster, wait};

const TIMEOUT: Duration = Duration::from_secs(120);

/// Starts a command again whenever it exits, as systemd's `Restart=always` does; `make(n)` builds
/// the command for the `n`th start (from 0).
struct Supervisor {
    stop: Arc<AtomicBool>,
    child: Arc<Mutex<Option<Child>>>,
    /// How each run ended (`None`: killed by a signal, with the signal).
    exits: Arc<Mutex<Vec<std::process::ExitStatus>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Supervisor {
    fn start(make: impl Fn(usize) -> Command + Send + 'static) -> Supervisor {
        let stop = Arc::new(AtomicBool::new(false));
        let child: Arc<Mutex<Option<Child>>> = Arc::default();
        let exits: Arc<Mutex<Vec<std::process::ExitStatus>>> = Arc::default();
        let thread = {
            let (stop, child, exits) = (stop.clone(), child.clone(), exits.clone());
            std::thread::spawn(move || {
                for run in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    *child.lock().unwrap() = Some(make(run).spawn().unwrap());
                    loop {
                        let done = child.lock().unwrap().as_mut().unwrap().try_wait().unwrap();
                        if let Some(status) = done {
                            exits.lock().unwrap().push(status);
                            break;
                        }
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        };
        Supervisor {
            stop,
            child,
            exits,
            thread: Some(thread),
        }
    }

    fn exits(&self) -> Vec<std::process::ExitStatus> {
        self.exits.lock().unwrap().clone()
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(child) = self.child.lock().unwrap().as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn sha256_file(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// The cluster, the "packaged" agent binary that service managers start, and the release key.
struct Site {
    cluster: Cluster,
    root: PathBuf,
    launcher: PathBuf,
    _server: support::ChildGuard,
}

impl Site {
    fn new(root: &Path) -> Site {
        let cluster = Cluster::new(root);
        let server = cluster.start_server(0);
        cluster.wait_until_serving();
        let launcher = root.join("usr-bin").join("flotilla-agent");
        std::fs::create_dir_all(launcher.parent().unwrap()).unwrap();
        std::fs::copy(binary("flotilla-agent"), &launcher).unwrap();
        let site = Site {
            root: root.to_path_buf(),
            cluster,
            launcher,
            _server: server,
        };
        site.ctl(&[
            "agent-release",
            "keygen",
            "--out",
            site.path("release").to_str().unwrap(),
        ]);
        site
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn ctl(&self, args: &[&str]) -> String {
        self.cluster.flotctl_ok(args)
    }

    /// A new "build": the packaged binary with a trailer (ELF ignores it), so it has a digest of
    /// its own without a second compilation.
    fn build(&self, version: &str) -> PathBuf {
        let path = self.path(&format!("flotilla-agent-{version}"));
        let mut bytes = std::fs::read(&self.launcher).unwrap();
        bytes.extend_from_slice(format!("\nflotilla test build {version}\n").as_bytes());
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// Signs `file` as `version` with `key` and publishes it (at `url`, when given).
    fn publish(&self, file: &Path, version: &str, key: &str, url: Option<&str>) {
        let signature = self.path(&format!("{version}.sig"));
        let file = file.to_str().unwrap();
        self.ctl(&[
            "agent-release",
            "sign",
            "--key",
            self.path(key).to_str().unwrap(),
            "--version",
            version,
            "--out",
            signature.to_str().unwrap(),
            file,
        ]);
        let mut args = vec![
            "agent-release",
            "publish",
            file,
            "--version",
            version,
            "--signature",
            signature.to_str().unwrap(),
        ];
        if let Some(url) = url {
            args.extend(["--url", url]);
        }
        self.ctl(&args);
    }

    /// agent.toml with the release key pinned, restarting by `restart` (`exit`: for the
    /// supervisor to start it again, as systemd does; `exec`: in place).
    fn agent_config(&self, restart: &str) -> PathBuf {
        let path = self.path(&format!("agent-update-{restart}.toml"));
        if !path.exists() {
            let mut text = std::fs::read_to_string(self.cluster.agent_config()).unwrap();
            text.push_str(&format!(
                "\n[update]\nrelease_keys = [\"{}\"]\nrestart = \"{restart}\"\nconfirm_timeout_secs = 60\n",
                self.path("release.pub").display()
            ));
            std::fs::write(&path, text).unwrap();
        }
        path
    }

    /// An agent under a supervisor, started from the packaged binary; `first_env` only on its
    /// first start (a failpoint).
    fn agent(&self, name: &str, first_env: &[(&str, &str)]) -> Supervisor {
        self.agent_with(name, first_env, None, "exit")
    }

    fn agent_with(
        &self,
        name: &str,
        first_env: &[(&str, &str)],
        health: Option<std::net::SocketAddr>,
        restart: &str,
    ) -> Supervisor {
        let config = self.agent_config(restart);
        let launcher = self.launcher.clone();
        let state = self.path(&format!("state-{name}"));
        let log = self.path(&format!("agent-{name}.log"));
        let name = name.to_string();
        let first_env: Vec<(String, String)> = first_env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Supervisor::start(move |run| {
            let mut command = Command::new(&launcher);
            command
                .arg("--config")
                .arg(&config)
                .arg("--state-dir")
                .arg(&state)
                .args(["--name", &name, "--label", "role=web"])
                .args(
                    health
                        .iter()
                        .flat_map(|a| ["--health-listen".to_string(), a.to_string()]),
                )
                .stdout(std::process::Stdio::null())
                .stderr(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&log)
                        .unwrap(),
                );
            if run == 0 {
                command.envs(first_env.iter().map(|(k, v)| (k, v)));
            }
            command
        })
    }

    fn approve(&self, names: &[&str]) {
        wait("the enrollment requests", TIMEOUT, || {
            self.cluster
                .flotctl_json(&["get", "enrollments", "--state", "pending"])
                .is_some_and(|v| v.as_array().is_some_and(|a| a.len() == names.len()))
        });
        for name in names {
            self.ctl(&["approve", "enrollment", name]);
        }
    }

    /// Applies fleet `web` (every device, batches of one) with `agent` as its agent section.
    fn fleet(&self, revision: &str, extra: &str) {
        let yaml = format!(
            r#"kind: Fleet
metadata:
  name: web
spec:
  selector: role=web
  rollout:
    batches:
      - count: 1
      - count: 1
    maxUnavailable: 1
    successThreshold: 100
    nackHaltThreshold: 1
    progressDeadlineSeconds: 300
  template:
    files:
      - path: "{out}/{{{{ device.name }}}}/revision"
        content: "{revision}"
{extra}"#,
            out = self.path("out").display(),
        );
        let path = self.path(&format!("fleet-{revision}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        self.ctl(&["apply", "-f", path.to_str().unwrap()]);
    }

    fn device(&self, name: &str) -> Value {
        self.cluster
            .flotctl_json(&["get", "device", name])
            .unwrap_or(Value::Null)
    }

    fn rollout(&self) -> Value {
        self.cluster
            .flotctl_json(&["rollout", "status", "web"])
            .unwrap_or(Value::Null)
    }

    fn revision_file(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.path("out").join(name).join("revision")).ok()
    }

    /// Waits until `name` runs agent `version` (by its report) and is SYNCED on what it should run.
    fn wait_running(&self, name: &str, version: &str, sha256: &str) {
        wait(&format!("{name} on agent {version}"), TIMEOUT, || {
            let device = self.device(name);
            let update = &device["status"]["update"];
            update["agentVersion"] == version
                && update["agentDigest"] == sha256
                && device["status"]["sync_state"] == "SYNCED"
        });
    }

    /// Waits until the rollout pauses because `name` rejected the revision; returns its error.
    fn wait_refused(&self, name: &str) -> String {
        wait("the rollout to pause", TIMEOUT, || {
            self.rollout()["state"] == "paused"
        });
        let reason = self.rollout()["reason"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(reason.contains("rejected"), "{reason}");
        let device = self.device(name);
        assert_eq!(device["status"]["sync_state"], "ERROR", "{device}");
        device["status"]["last_error"].as_str().unwrap().to_string()
    }

    fn condition(&self, name: &str, kind: &str) -> Value {
        self.device(name)["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == kind)
            .cloned()
            .unwrap_or(Value::Null)
    }
}

/// The build `current` names in an agent's install directory.
fn current_build(state: &Path) -> Option<String> {
    std::fs::read_link(state.join("agent/current"))
        .ok()
        .map(|t| t.file_name().unwrap().to_string_lossy().into_owned())
}

#[test]
fn a_signed_build_rolls_out_in_batches_and_every_agent_confirms_it() {
    let tmp = tempfile::tempdir().unwrap();
    let site = Site::new(tmp.path());
    let names = ["edge-1", "edge-2", "edge-3"];
    let health = support::free_addr();
    // edge-2 restarts into the new build in place (exec); the others exit for their supervisor.
    let agents: Vec<Supervisor> = names
        .iter()
        .map(|n| {
            let restart = if *n == "edge-2" { "exec" } else { "exit" };
            site.agent_with(n, &[], (*n == "edge-1").then_some(health), restart)
        })
        .collect();
    site.approve(&names);
    site.fleet("1", "");
    wait("revision 1 everywhere", TIMEOUT, || {
        names
            .iter()
            .all(|n| site.revision_file(n).as_deref() == Some("1"))
    });
    let packaged = sha256_file(&site.launcher);
    for name in names {
        site.wait_running(name, "0.1.0", &packaged);
    }

    let build = site.build("0.2.0");
    let new = sha256_file(&build);
    site.publish(&build, "0.2.0", "release.key", None);
    let listed = site
        .cluster
        .flotctl_json(&["get", "agent-releases"])
        .unwrap();
    assert_eq!(listed[0]["sha256"], new.as_str());
    site.fleet("2", "    agent:\n      version: 0.2.0\n");
    wait("the rollout to complete", TIMEOUT, || {
        site.rollout()["state"] == "completed"
    });
    let batches: Vec<Value> = site.rollout()["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "batch-started")
        .cloned()
        .collect();
    assert_eq!(batches.len(), 3, "one device per batch: {batches:?}");
    for name in names {
        site.wait_running(name, "0.2.0", &new);
        assert_eq!(site.revision_file(name).as_deref(), Some("2"));
        let state = site.path(&format!("state-{name}"));
        assert_eq!(current_build(&state), Some(new.clone()));
        // The build it replaced is kept for the next update's rollback.
        let previous = std::fs::read_link(state.join("agent/previous")).unwrap();
        assert!(previous.ends_with(&packaged), "{previous:?}");
        assert_eq!(site.condition(name, "UpdateFailed")["status"], "False");
    }
    let codes =
        |i: usize| -> Vec<Option<i32>> { agents[i].exits().iter().map(|e| e.code()).collect() };
    assert_eq!(codes(0), [Some(75)], "edge-1 exited once, for the restart");
    assert!(
        codes(1).is_empty(),
        "edge-2 replaced itself in place: {:?}",
        codes(1)
    );
    // `-o wide` shows the agent version, its build and the update state of every device.
    let wide = site.ctl(&["get", "devices", "-o", "wide"]);
    assert_eq!(
        wide.lines()
            .filter(|l| l.contains("0.2.0") && l.contains(&new[..12]))
            .count(),
        3,
        "{wide}"
    );
    // The greenboot check passes against a healthy agent and fails without one.
    let check = |url: &str| {
        Command::new("deploy/greenboot/40_flotilla_agent.sh")
            .env("FLOTILLA_AGENT_HEALTH_URL", url)
            .env("FLOTILLA_AGENT_HEALTH_TIMEOUT", "2")
            .env("FLOTILLA_AGENT_HEALTH_INTERVAL", "1")
            .env("SYSTEMCTL", "true")
            .output()
            .unwrap()
    };
    let healthy = check(&format!("http://{health}/healthz"));
    assert!(
        healthy.status.success(),
        "{}",
        String::from_utf8_lossy(&healthy.stderr)
    );
    let dead = format!("http://{}/healthz", support::free_addr());
    let failed = check(&dead);
    assert!(!failed.status.success());
    assert!(String::from_utf8_lossy(&failed.stderr).contains("not healthy"));
}

/// Serves fixed bodies over plain HTTP: what a CDN holding a broken artifact would send.
fn serve_files(files: Vec<(&'static str, Vec<u8>)>) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = [0; 4096];
            let n = stream.read(&mut request).unwrap_or(0);
            let text = String::from_utf8_lossy(&request[..n]);
            let path = text.split_whitespace().nth(1).unwrap_or("/");
            let body = files
                .iter()
                .find(|(p, _)| *p == path)
                .map(|(_, b)| b.as_slice())
                .unwrap_or(b"");
            // Whatever Range was asked for, the whole body: a server without range support.
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(body);
        }
    });
    addr
}

#[test]
fn bad_builds_are_refused_before_anything_is_replaced_and_halt_the_rollout() {
    let tmp = tempfile::tempdir().unwrap();
    let site = Site::new(tmp.path());
    let _agent = site.agent("edge-1", &[]);
    site.approve(&["edge-1"]);
    site.fleet("1", "");
    wait("revision 1", TIMEOUT, || {
        site.revision_file("edge-1").as_deref() == Some("1")
    });
    let state = site.path("state-edge-1");
    let refused = |revision: &str, extra: &str, expected: &str| {
        site.fleet(revision, extra);
        let error = site.wait_refused("edge-1");
        assert!(error.contains(expected), "{expected}: {error}");
        assert_eq!(current_build(&state), None, "nothing was replaced");
        assert_eq!(site.revision_file("edge-1").as_deref(), Some("1"));
        let condition = site.condition("edge-1", "UpdateFailed");
        assert_eq!(condition["status"], "True", "{condition}");
        assert!(
            condition["message"].as_str().unwrap().contains(expected),
            "{condition}"
        );
    };

    // Signed by a key the device does not pin.
    site.ctl(&[
        "agent-release",
        "keygen",
        "--out",
        site.path("rogue").to_str().unwrap(),
    ]);
    let rogue = site.build("0.3.0");
    site.publish(&rogue, "0.3.0", "rogue.key", None);
    refused(
        "2",
        "    agent:\n      version: 0.3.0\n",
        "does not verify against any pinned release key",
    );

    // Published at a URL whose server sends other bytes, or stops half way.
    let corrupt_build = site.build("0.4.0");
    let truncated_build = site.build("0.5.0");
    let mut corrupt = std::fs::read(&corrupt_build).unwrap();
    corrupt[1000] ^= 0xff;
    let whole = std::fs::read(&truncated_build).unwrap();
    let cdn = serve_files(vec![
        ("/corrupt", corrupt),
        ("/truncated", whole[..whole.len() / 2].to_vec()),
    ]);
    site.publish(
        &corrupt_build,
        "0.4.0",
        "release.key",
        Some(&format!("http://{cdn}/corrupt")),
    );
    refused("3", "    agent:\n      version: 0.4.0\n", "is corrupt");
    site.publish(
        &truncated_build,
        "0.5.0",
        "release.key",
        Some(&format!("http://{cdn}/truncated")),
    );
    refused("4", "    agent:\n      version: 0.5.0\n", "truncated");

    // An OS image on a device that is not bootc-based.
    refused(
        "5",
        "    os:\n      image: quay.io/acme/edge-os:1.1\n",
        "needs a bootc-based device",
    );

    // A release the device waits for: downloads only on a day that is ten days away.
    let later = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(240);
    let day = later.to_zoned(jiff::tz::TimeZone::UTC).day();
    let waiting = site.build("0.6.0");
    site.publish(&waiting, "0.6.0", "release.key", None);
    site.fleet(
        "6",
        &format!("    agent:\n      version: 0.6.0\n    updatePolicy:\n      downloadSchedule: \"* * {day} * *\"\n"),
    );
    wait("edge-1 to wait for its window", TIMEOUT, || {
        let device = site.device("edge-1");
        device["status"]["update"]["phase"] == "waitingForWindow"
    });
    let device = site.device("edge-1");
    let opens = device["status"]["update"]["nextWindowMs"].as_i64().unwrap();
    let expected = later
        .to_zoned(jiff::tz::TimeZone::UTC)
        .start_of_day()
        .unwrap()
        .timestamp()
        .as_millisecond();
    assert_eq!(opens, expected);
    assert_eq!(
        site.condition("edge-1", "Updating")["reason"],
        "WaitingForWindow"
    );
    let wide = site.ctl(&["get", "devices", "-o", "wide"]);
    assert!(wide.contains("waitingForWindow"), "{wide}");
    let described = site.ctl(&["describe", "device", "edge-1"]);
    assert!(described.contains("window opens"), "{described}");
    assert_eq!(current_build(&state), None);
}

#[test]
fn a_signed_build_that_exits_at_once_is_rolled_back_by_the_launcher() {
    let tmp = tempfile::tempdir().unwrap();
    let site = Site::new(tmp.path());
    let agent = site.agent("edge-1", &[]);
    site.approve(&["edge-1"]);
    site.fleet("1", "");
    wait("revision 1", TIMEOUT, || {
        site.revision_file("edge-1").as_deref() == Some("1")
    });
    let broken = site.path("broken-agent");
    std::fs::write(
        &broken,
        "#!/bin/sh\necho 'this build cannot start' >&2\nexit 3\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).unwrap();
    site.publish(&broken, "0.7.0", "release.key", None);
    site.fleet("2", "    agent:\n      version: 0.7.0\n");
    let error = site.wait_refused("edge-1");
    assert!(error.contains("agent 0.7.0 rolled back"), "{error}");
    assert!(error.contains("started 3 times"), "{error}");
    // It exited for the restart, the broken build exited three times, then the launcher ran
    // the previous build again.
    let codes: Vec<Option<i32>> = agent.exits().iter().map(|e| e.code()).collect();
    assert_eq!(
        &codes[..4],
        [Some(75), Some(3), Some(3), Some(3)],
        "{codes:?}"
    );
    let packaged = sha256_file(&site.launcher);
    assert_eq!(
        current_build(&site.path("state-edge-1")),
        Some(packaged.clone())
    );
    let condition = site.condition("edge-1", "UpdateFailed");
    assert_eq!(condition["reason"], "AgentUpdateFailed", "{condition}");
    site.wait_running_failed("edge-1", &packaged);
}

impl Site {
    /// The device is back on the `sha256` build, online, reporting the failed update.
    fn wait_running_failed(&self, name: &str, sha256: &str) {
        wait(
            &format!("{name} back on its previous build"),
            TIMEOUT,
            || {
                let device = self.device(name);
                let update = &device["status"]["update"];
                update["agentDigest"] == sha256
                    && update["lastFailure"]["rolledBack"] == true
                    && device["status"]["online"] == true
            },
        );
    }
}

#[test]
fn a_kill_at_every_step_of_an_update_leaves_an_agent_that_converges() {
    let tmp = tempfile::tempdir().unwrap();
    let site = Site::new(tmp.path());
    let steps = [
        "agent-update-downloaded",
        "agent-update-installed",
        "agent-update-pending",
        "agent-update-switched",
    ];
    let names: Vec<String> = (1..=steps.len()).map(|i| format!("edge-{i}")).collect();
    let agents: Vec<Supervisor> = names
        .iter()
        .zip(steps)
        .map(|(name, step)| site.agent(name, &[("FLOTILLA_AGENT_FAILPOINT", step)]))
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    site.approve(&refs);
    let build = site.build("0.2.0");
    let new = sha256_file(&build);
    site.publish(&build, "0.2.0", "release.key", None);
    // No rollout batches matter here: every device at once.
    let yaml = format!(
        "kind: Fleet\nmetadata:\n  name: web\nspec:\n  selector: role=web\n  template:\n    agent:\n      version: 0.2.0\n    files:\n      - path: \"{}/{{{{ device.name }}}}/revision\"\n        content: \"1\"\n",
        site.path("out").display()
    );
    std::fs::write(site.path("fleet.yaml"), yaml).unwrap();
    site.ctl(&["apply", "-f", site.path("fleet.yaml").to_str().unwrap()]);
    for (name, agent) in names.iter().zip(&agents) {
        site.wait_running(name, "0.2.0", &new);
        assert_eq!(site.revision_file(name).as_deref(), Some("1"));
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            agent.exits()[0].signal(),
            Some(9),
            "{name} was killed at its failpoint"
        );
        assert_eq!(
            current_build(&site.path(&format!("state-{name}"))),
            Some(new.clone())
        );
    }
}

#[test]
fn sigterm_lets_an_apply_finish_and_sigquit_stops_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let site = Site::new(tmp.path());
    let cluster = &site.cluster;
    let state = site.path("state-edge-1");
    let log = site.path("agent.log");
    let start = || {
        let mut command = cluster.agent_command(
            &cluster.agent_config(),
            "edge-1",
            &["role=web"],
            &state,
            &log,
        );
        command.stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .unwrap(),
        );
        support::ChildGuard(command.spawn().unwrap())
    };
    let mut agent = start();
    site.approve(&["edge-1"]);
    let marker = site.path("hook-started");
    let block = site.path("hold-the-hook");
    let apply = |revision: &str| {
        let _ = std::fs::remove_file(&marker);
        std::fs::write(&block, "").unwrap();
        let yaml = format!(
            "kind: Fleet\nmetadata:\n  name: web\nspec:\n  selector: role=web\n  template:\n    beforeUpdate:\n      - run: [/bin/sh, -c, \"touch {marker} && while [ -e {block} ]; do sleep 0.1; done\"]\n        timeoutSeconds: 60\n    files:\n      - path: \"{out}/slow\"\n        content: \"{revision}\"\n",
            marker = marker.display(),
            block = block.display(),
            out = site.path("out").display()
        );
        std::fs::write(site.path("slow.yaml"), yaml).unwrap();
        site.ctl(&["apply", "-f", site.path("slow.yaml").to_str().unwrap()]);
        wait("the hook to start", TIMEOUT, || marker.exists());
    };
    let slow_file = site.path("out/slow");

    // SIGTERM in the middle of an apply: the agent waits for it, it is acknowledged, the agent
    // exits 0.
    apply("a");
    let pid = agent.0.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        agent.0.try_wait().unwrap().is_none(),
        "it waits for the apply"
    );
    std::fs::remove_file(&block).unwrap();
    let status = agent.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(std::fs::read_to_string(&slow_file).unwrap(), "a");
    let device = site.device("edge-1");
    assert_eq!(
        device["status"]["acked_version"], device["status"]["desired_version"],
        "the apply was acknowledged before the agent stopped: {device}"
    );

    // SIGQUIT: gone at once, the apply not acknowledged; the next start converges.
    let mut agent = start();
    apply("b");
    let pid = agent.0.id().to_string();
    Command::new("kill").args(["-QUIT", &pid]).status().unwrap();
    let status = agent.0.wait().unwrap();
    assert_eq!(status.code(), Some(131), "{status:?}");
    assert_eq!(
        std::fs::read_to_string(&slow_file).unwrap(),
        "a",
        "untouched: the hook runs first"
    );
    let device = site.device("edge-1");
    assert_ne!(
        device["status"]["acked_version"],
        device["status"]["desired_version"]
    );
    std::fs::remove_file(&block).unwrap();
    let _agent = start();
    apply_wait_converged(&site, &slow_file, "b");
}

fn apply_wait_converged(site: &Site, file: &Path, content: &str) {
    wait("the agent to converge after SIGQUIT", TIMEOUT, || {
        std::fs::read_to_string(file).ok().as_deref() == Some(content)
            && site.device("edge-1")["status"]["sync_state"] == "SYNCED"
    });
}

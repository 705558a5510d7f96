//! Faults during an apply, end to end with real processes: the agent killed (SIGKILL) in the middle
//! of a 40-file apply, the agent's process group stopped (SIGTERM, as systemd does) while an update
//! hook runs, a state directory that is full or read-only, and an unreadable applied-spec record.
//! The disk must never stay a mix of two versions, and a version the device could not apply for
//! reasons of its own must be applied later — never marked rejected for good. SQLite by default;
//! PostgreSQL when FLOTILLA_TEST_DATABASE_URL is set.

use crate::support;

use serde_json::Value;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::ChildGuard;
use support::cluster::{Cluster, wait};

const TIMEOUT: Duration = Duration::from_secs(45);
const FILES: usize = 40;

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// A fleet whose template writes `FILES` files (plus `extra`, if given) with `content` under `out`,
/// optionally running `after` after each update.
fn fleet_yaml(out: &Path, content: &str, extra: Option<&str>, after: Option<&str>) -> String {
    let mut yaml = String::from(
        "kind: Fleet\nmetadata:\n  name: many\nspec:\n  selector: \"site=lab\"\n  template:\n    files:\n",
    );
    for i in 0..FILES {
        yaml.push_str(&format!(
            "      - path: \"{}/f{i:02}\"\n        content: {content:?}\n",
            out.display()
        ));
    }
    if let Some(extra) = extra {
        yaml.push_str(&format!(
            "      - path: \"{}/{extra}\"\n        content: {content:?}\n",
            out.display()
        ));
    }
    if let Some(after) = after {
        yaml.push_str(&format!(
            "    afterUpdate:\n      - run: [\"sh\", \"-c\", {after:?}]\n        timeoutSeconds: 60\n"
        ));
    }
    yaml
}

struct Setup {
    cluster: Cluster,
    out: PathBuf,
    state: PathBuf,
}

impl Setup {
    fn new(root: &Path) -> Setup {
        Setup {
            cluster: Cluster::new(root),
            out: root.join("out"),
            state: root.join("agent-state"),
        }
    }

    fn apply(&self, yaml: &str) {
        let path = self.cluster.root.join("fleet.yaml");
        std::fs::write(&path, yaml).unwrap();
        self.cluster
            .flotctl_ok(&["apply", "-f", &path.display().to_string()]);
    }

    fn device(&self) -> Value {
        self.cluster
            .flotctl_json(&["get", "device", "edge-1"])
            .unwrap_or(Value::Null)
    }

    /// The contents of the fleet's files, in order (None: missing).
    fn contents(&self) -> Vec<Option<String>> {
        (0..FILES)
            .map(|i| read(&self.out.join(format!("f{i:02}"))))
            .collect()
    }

    fn all(&self, content: &str) -> bool {
        self.contents()
            .iter()
            .all(|c| c.as_deref() == Some(content))
    }

    fn wait_synced_with(&self, content: &str) {
        wait(
            &format!("SYNCED with every file {content:?}"),
            TIMEOUT,
            || self.device()["status"]["sync_state"] == "SYNCED" && self.all(content),
        );
    }

    fn agent(&self, log: &str, env: &[(&str, &str)]) -> ChildGuard {
        self.cluster.spawn_agent_with_env(
            "edge-1",
            &["site=lab"],
            &self.state,
            &self.cluster.root.join(log),
            env,
        )
    }

    /// Server up, agent enrolled and SYNCED on `content`; returns both processes.
    fn enrolled(&self, content: &str) -> (ChildGuard, ChildGuard) {
        let server = self.cluster.start_server(1);
        self.cluster.wait_until_serving();
        self.apply(&fleet_yaml(&self.out, content, None, None));
        let agent = self.agent("agent-0.log", &[]);
        wait("the enrollment request", TIMEOUT, || {
            self.cluster
                .flotctl_json(&["get", "enrollments"])
                .is_some_and(|v| v[0]["name"] == "edge-1")
        });
        self.cluster
            .flotctl_ok(&["approve", "enrollment", "edge-1"]);
        self.wait_synced_with(content);
        (server, agent)
    }

    /// Like `enrolled`, with the agent stopped again; returns the server.
    fn enrolled_then_stopped(&self, content: &str) -> ChildGuard {
        let (server, mut agent) = self.enrolled(content);
        agent.terminate();
        server
    }
}

/// A boxed step of a test case.
type Step<'a> = Box<dyn Fn(&mut Option<PathBuf>) + 'a>;

fn wait_exit(child: &mut ChildGuard, what: &str) -> std::process::ExitStatus {
    let mut status = None;
    wait(what, TIMEOUT, || {
        status = child.0.try_wait().unwrap();
        status.is_some()
    });
    status.unwrap()
}

#[test]
fn an_agent_killed_mid_apply_rolls_back_at_start_and_never_stays_mixed() {
    let tmp = tempfile::tempdir().unwrap();
    let setup = Setup::new(tmp.path());
    let mut server = setup.enrolled_then_stopped("v1");

    let mut current = "v1".to_string();
    // Killed after the 1st, 13th, 27th and last file; the last round is reverted while down.
    for (round, after) in [1, 13, 27, FILES].into_iter().enumerate() {
        let next = format!("v{}", round + 2);
        // Sorts after the f-files, so the kill after the n-th file has written n f-files.
        let extra = format!("z-extra-{round}");
        setup.apply(&fleet_yaml(&setup.out, &next, Some(&extra), None));
        let failpoint = format!("apply:file:{after}");
        let mut doomed = setup.agent(
            &format!("agent-kill-{round}.log"),
            &[("FLOTILLA_AGENT_FAILPOINT", &failpoint)],
        );
        let status = wait_exit(&mut doomed, &format!("{failpoint}: the agent killed"));
        assert_eq!(status.signal(), Some(9), "{failpoint}: died of SIGKILL");
        let contents = setup.contents();
        let new = contents
            .iter()
            .filter(|c| c.as_deref() == Some(next.as_str()))
            .count();
        assert_eq!(new, after.min(FILES), "{failpoint}: killed mid-apply");

        // Start-up settles the interrupted apply before anything else — even with the control
        // plane away: every file is back at the previous version, the added one gone.
        server.terminate();
        let mut offline = setup.agent(&format!("agent-offline-{round}.log"), &[]);
        wait(
            &format!("{failpoint}: all files back at {current}"),
            TIMEOUT,
            || setup.all(&current) && !setup.out.join(&extra).exists(),
        );
        offline.terminate();
        assert!(
            setup.all(&current),
            "{failpoint}: still one version after stopping"
        );

        let reverted = round == 3;
        if reverted {
            // The spec goes back while the device is away: it must end on the old files with no
            // stray file, and report SYNCED truthfully.
            server = setup.cluster.start_server(round + 2);
            setup.cluster.wait_until_serving();
            setup.apply(&fleet_yaml(&setup.out, &current, None, None));
        } else {
            server = setup.cluster.start_server(round + 2);
            setup.cluster.wait_until_serving();
        }
        let mut revived = setup.agent(&format!("agent-after-{round}.log"), &[]);
        if reverted {
            setup.wait_synced_with(&current);
            assert!(!setup.out.join(&extra).exists(), "no stray file");
        } else {
            setup.wait_synced_with(&next);
            assert!(setup.out.join(&extra).exists());
            current = next;
        }
        assert!(
            setup.device()["status"]["last_error"].is_null()
                || setup.device()["status"]["last_error"] == ""
        );
        revived.terminate();
    }
    assert!(
        !setup.state.join("apply-journal").exists(),
        "no journal left once settled"
    );
}

#[test]
fn a_shutdown_during_an_update_hook_defers_the_version_and_it_is_applied_after_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let setup = Setup::new(tmp.path());
    let _server = setup.enrolled_then_stopped("v1");

    // The agent in its own process group, as systemd runs a unit's processes.
    let log = setup.cluster.root.join("agent-grouped.log");
    let mut command = setup.cluster.agent_command(
        &setup.cluster.data.join("agent.toml"),
        "edge-1",
        &["site=lab"],
        &setup.state,
        &log,
    );
    command.process_group(0);
    let mut grouped = ChildGuard(command.spawn().unwrap());
    wait("the agent connected", TIMEOUT, || {
        setup.device()["status"]["online"] == true
    });
    let marker = setup.cluster.root.join("hook-started");
    let hook = format!("touch {}; sleep 5", marker.display());
    setup.apply(&fleet_yaml(&setup.out, "v2", None, Some(&hook)));
    wait("the update hook running", TIMEOUT, || marker.exists());
    // SIGTERM to the whole group: the hook dies with the agent.
    let pgid = grouped.0.id() as i32;
    let status = Command::new("kill")
        .args(["-s", "TERM", "--", &format!("-{pgid}")])
        .status()
        .unwrap();
    assert!(status.success());
    wait_exit(&mut grouped, "the agent stopped");
    assert!(setup.all("v1"), "the interrupted update was rolled back");
    let device = setup.device();
    assert_ne!(
        device["status"]["sync_state"], "ERROR",
        "an interrupted update is not a rejection: {device}"
    );

    std::fs::remove_file(&marker).unwrap();
    let _agent = setup.agent("agent-restarted.log", &[]);
    setup.wait_synced_with("v2");
    assert!(marker.exists(), "the hook ran again and finished");
}

/// A small tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .status()
            .expect("mount (the tests run as root)");
        assert!(status.success(), "mounting a tmpfs at {}", path.display());
        Tmpfs(path.to_path_buf())
    }

    fn remount(&self, option: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,{option}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success(), "remount {option}");
    }

    /// Fills the filesystem; returns the filler file.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.0.join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 4096];
        while file.write_all(&block).is_ok() {}
        let _ = file.sync_all();
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn healthz(port: u16) -> Option<Value> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    serde_json::from_str(response.split_once("\r\n\r\n")?.1).ok()
}

fn check(health: &Option<Value>, name: &str) -> String {
    health
        .as_ref()
        .and_then(|h| h["checks"].as_array().cloned())
        .and_then(|checks| checks.into_iter().find(|c| c["name"] == name))
        .map(|c| c["status"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

#[test]
fn a_full_or_read_only_state_directory_defers_updates_until_it_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let setup = Setup::new(tmp.path());
    let state_fs = Tmpfs::mount(&setup.state, "2m");
    let _server = setup.enrolled_then_stopped("v1");
    let port = support::free_port();
    let mut command = setup.cluster.agent_command(
        &setup.cluster.data.join("agent.toml"),
        "edge-1",
        &["site=lab"],
        &setup.state,
        &setup.cluster.root.join("agent-fs.log"),
    );
    command.args(["--health-listen", &format!("127.0.0.1:{port}")]);
    let _agent = ChildGuard(command.spawn().unwrap());
    wait("the agent connected", TIMEOUT, || {
        setup.device()["status"]["online"] == true && check(&healthz(port), "state") == "pass"
    });

    // Full, then read-only: the journal cannot be written, so nothing changes and nothing is
    // rejected; once the disk recovers, the version is applied.
    let mut filler = None;
    let cases: [(&str, &str, &str, Step, Step); 2] = [
        (
            "full",
            "v1",
            "v2",
            Box::new(|filler| *filler = Some(state_fs.fill())),
            Box::new(|filler| std::fs::remove_file(filler.take().unwrap()).unwrap()),
        ),
        (
            "read-only",
            "v2",
            "v3",
            Box::new(|_| state_fs.remount("ro")),
            Box::new(|_| state_fs.remount("rw")),
        ),
    ];
    for (what, before, next, break_it, mend) in cases {
        break_it(&mut filler);
        setup.apply(&fleet_yaml(&setup.out, next, None, None));
        wait(&format!("{what}: the state check failing"), TIMEOUT, || {
            check(&healthz(port), "state") == "fail"
        });
        assert!(setup.all(before), "{what}: nothing changed");
        assert_ne!(setup.device()["status"]["sync_state"], "ERROR", "{what}");
        mend(&mut filler);
        setup.wait_synced_with(next);
        wait(
            &format!("{what}: the state check passing again"),
            TIMEOUT,
            || check(&healthz(port), "state") == "pass",
        );
    }
}

#[test]
fn an_unreadable_applied_record_is_resynced_and_a_broken_certificate_names_the_way_out() {
    let tmp = tempfile::tempdir().unwrap();
    let setup = Setup::new(tmp.path());
    let _server = setup.enrolled_then_stopped("v1");
    std::fs::write(setup.state.join("applied.json"), "{ not json").unwrap();
    let mut agent = setup.agent("agent-corrupt.log", &[]);
    wait("the agent back online", TIMEOUT, || {
        setup.device()["status"]["online"] == true
    });
    // The agent claims nothing applied, so the control plane sends the spec again.
    let mut applied = Value::Null;
    wait("the applied record rewritten by a resync", TIMEOUT, || {
        applied = read(&setup.state.join("applied.json"))
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or(Value::Null);
        !applied.is_null()
    });
    setup.wait_synced_with("v1");
    assert!(setup.state.join("applied.json.corrupt").exists());
    assert_eq!(
        applied["version"],
        setup.device()["status"]["acked_version"],
        "the record is rewritten by the resync"
    );
    agent.terminate();

    // A damaged certificate: the agent says how to get out of it.
    let current = std::fs::canonicalize(setup.state.join("certs/current")).unwrap();
    let cert = std::fs::read_dir(&current)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "crt" || e == "pem"))
        .expect("a certificate file in the current pair");
    std::fs::write(&cert, "garbage").unwrap();
    let log = setup.cluster.root.join("agent-garbage.log");
    let _agent = setup.agent("agent-garbage.log", &[]);
    wait("the way out named", TIMEOUT, || {
        read(&log).is_some_and(|text| text.contains("flotctl delete device"))
    });
}

//! A control plane, agents and flotctl as real processes, for end-to-end tests.

use super::{ChildGuard, TestDb, binary, free_addr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub struct Cluster {
    pub root: std::path::PathBuf,
    pub data: std::path::PathBuf,
    pub db: TestDb,
    pub agent_addr: std::net::SocketAddr,
    pub admin_addr: std::net::SocketAddr,
}

impl Cluster {
    pub fn new(root: &Path) -> Cluster {
        Cluster::with_db(root, TestDb::new(root))
    }

    /// A cluster on PostgreSQL whatever backend the suite runs on.
    pub fn on_postgres(root: &Path) -> Cluster {
        Cluster::with_db(root, TestDb::postgres_for_tests())
    }

    fn with_db(root: &Path, db: TestDb) -> Cluster {
        // Build the binaries before taking ports: another test may bind a port taken and released
        // here while this one waits for the build.
        binary("flotilla");
        Cluster {
            data: root.join("data"),
            db,
            agent_addr: free_addr(),
            admin_addr: free_addr(),
            root: root.to_path_buf(),
        }
    }

    pub fn wait_until_serving(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !(self.data.join("flotctl.toml").exists()
            && self.flotctl(&["get", "devices"]).status.success())
        {
            if Instant::now() > deadline {
                let logs: Vec<String> = std::fs::read_dir(&self.root)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("server-"))
                    .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                    .collect();
                panic!(
                    "timed out waiting for the server to write flotctl.toml and answer; its log:\n{}",
                    logs.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn start_server(&self, run: usize) -> ChildGuard {
        self.start_server_with(run, &[])
    }

    /// Starts `flotilla serve` with extra arguments (e.g. certificate lifetimes, or a
    /// `--database-url` that replaces the cluster's).
    pub fn start_server_with(&self, run: usize, extra: &[&str]) -> ChildGuard {
        let log = std::fs::File::create(self.root.join(format!("server-{run}.log"))).unwrap();
        let mut command = Command::new(binary("flotilla"));
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--agent-listen")
            .arg(self.agent_addr.to_string())
            .arg("--admin-listen")
            .arg(self.admin_addr.to_string())
            .arg("--heartbeat-interval")
            .arg("2")
            .args(extra)
            .env("FLOTILLA_LOG", "info,flotilla::control::session=debug")
            .stdout(Stdio::null())
            .stderr(log);
        if self.db.is_postgres() && !extra.contains(&"--database-url") {
            command.arg("--database-url").arg(&self.db.url);
        }
        ChildGuard(command.spawn().unwrap())
    }

    /// The agent `edge-1` (label site=lab) with its state in `agent-state/`.
    pub fn start_agent(&self, log: &Path) -> ChildGuard {
        self.spawn_agent("edge-1", &["site=lab"], &self.root.join("agent-state"), log)
    }

    /// An agent asking to enroll as `name` with `labels` (`key=value`).
    pub fn spawn_agent(&self, name: &str, labels: &[&str], state: &Path, log: &Path) -> ChildGuard {
        self.spawn_agent_with_env(name, labels, state, log, &[])
    }

    /// Like `spawn_agent`, with extra environment variables.
    pub fn spawn_agent_with_env(
        &self,
        name: &str,
        labels: &[&str],
        state: &Path,
        log: &Path,
        env: &[(&str, &str)],
    ) -> ChildGuard {
        let mut command =
            self.agent_command(&self.data.join("agent.toml"), name, labels, state, log);
        command.envs(env.iter().copied());
        ChildGuard(command.spawn().unwrap())
    }

    /// The command that starts an agent (not yet spawned), logging to `log`.
    pub fn agent_command(
        &self,
        config: &Path,
        name: &str,
        labels: &[&str],
        state: &Path,
        log: &Path,
    ) -> Command {
        let mut command = Command::new(binary("flotilla-agent"));
        command
            .arg("--config")
            .arg(config)
            .arg("--state-dir")
            .arg(state)
            .args(["--name", name]);
        for label in labels {
            command.args(["--label", label]);
        }
        command
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap());
        command
    }

    /// Runs flotctl and fails the test, with its stderr, if it fails.
    pub fn flotctl_ok(&self, args: &[&str]) -> String {
        let out = self.flotctl(args);
        assert!(
            out.status.success(),
            "flotctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn flotctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(binary("flotctl"))
            .arg("--config")
            .arg(self.data.join("flotctl.toml"))
            .args(args)
            .output()
            .unwrap()
    }

    pub fn flotctl_json(&self, args: &[&str]) -> Option<serde_json::Value> {
        let mut full = args.to_vec();
        full.extend(["-o", "json"]);
        let out = self.flotctl(&full);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }
}

pub fn wait(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
    start.elapsed()
}

pub fn count_lines(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

//! A control plane, agents and flotctl as real processes, for end-to-end tests.

use super::{ChildGuard, TestDb, binary, free_addr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) struct Cluster {
    pub root: std::path::PathBuf,
    pub data: std::path::PathBuf,
    pub db: TestDb,
    pub agent_addr: std::net::SocketAddr,
    pub admin_addr: std::net::SocketAddr,
    /// flotctl's configuration: the data directory's, or one pointing at this replica.
    pub ctl_config: std::path::PathBuf,
}

impl Cluster {
    pub(crate) fn new(root: &Path) -> Cluster {
        Cluster::with_db(root, TestDb::new(root))
    }

    /// A cluster on PostgreSQL whatever backend the suite runs on.
    pub(crate) fn on_postgres(root: &Path) -> Cluster {
        Cluster::with_db(root, TestDb::postgres_for_tests())
    }

    /// A cluster on SQLite in its data directory, whatever backend the suite runs on.
    pub(crate) fn on_sqlite(root: &Path) -> Cluster {
        Cluster::with_db(root, TestDb::sqlite(root))
    }

    /// Another control plane on this cluster's database, in `root` with its own ports, serving
    /// from `data` (a copy of this cluster's data directory, the same directory, or a new one).
    /// flotctl and agent configurations written by `point_configs_here` talk to it.
    pub(crate) fn replica(&self, root: &Path, data: &Path) -> Cluster {
        std::fs::create_dir_all(root).unwrap();
        Cluster {
            data: data.to_path_buf(),
            db: self.db.shared(),
            agent_addr: free_addr(),
            admin_addr: free_addr(),
            root: root.to_path_buf(),
            ctl_config: root.join("flotctl.toml"),
        }
    }

    /// Copies this cluster's data directory (CA, credentials) to `to`, as an operator starting a
    /// second replica would.
    pub(crate) fn copy_data_dir(&self, to: &Path) {
        let status = Command::new("cp")
            .arg("-a")
            .arg(&self.data)
            .arg(to)
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Writes flotctl.toml and agent.toml into this replica's root, pointing at its own ports.
    pub(crate) fn point_configs_here(&self) {
        let retarget = |from: &Path, to: &Path, url: String| {
            let text = std::fs::read_to_string(from).unwrap();
            let text: Vec<String> = text
                .lines()
                .map(|line| {
                    if line.starts_with("server = ") {
                        format!("server = \"{url}\"")
                    } else {
                        line.to_string()
                    }
                })
                .collect();
            std::fs::write(to, text.join("\n")).unwrap();
        };
        retarget(
            &self.data.join("flotctl.toml"),
            &self.ctl_config,
            format!("https://{}", self.admin_addr),
        );
        retarget(
            &self.data.join("agent.toml"),
            &self.agent_config(),
            format!("https://{}", self.agent_addr),
        );
    }

    /// The agent configuration agents of this replica use.
    pub(crate) fn agent_config(&self) -> std::path::PathBuf {
        if self.ctl_config == self.data.join("flotctl.toml") {
            self.data.join("agent.toml")
        } else {
            self.root.join("agent.toml")
        }
    }

    fn with_db(root: &Path, db: TestDb) -> Cluster {
        // Build the binaries before taking ports: another test may bind a port taken and released
        // here while this one waits for the build.
        binary("flotilla");
        std::fs::create_dir_all(root).unwrap();
        Cluster {
            data: root.join("data"),
            db,
            agent_addr: free_addr(),
            admin_addr: free_addr(),
            root: root.to_path_buf(),
            ctl_config: root.join("data").join("flotctl.toml"),
        }
    }

    pub(crate) fn wait_until_serving(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !(self.ctl_config.exists() && self.flotctl(&["get", "devices"]).status.success()) {
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

    pub(crate) fn start_server(&self, run: usize) -> ChildGuard {
        self.start_server_with(run, &[])
    }

    /// Starts `flotilla serve` with extra arguments (e.g. certificate lifetimes, or a
    /// `--database-url` that replaces the cluster's).
    pub(crate) fn start_server_with(&self, run: usize, extra: &[&str]) -> ChildGuard {
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
    pub(crate) fn start_agent(&self, log: &Path) -> ChildGuard {
        self.spawn_agent("edge-1", &["site=lab"], &self.root.join("agent-state"), log)
    }

    /// An agent asking to enroll as `name` with `labels` (`key=value`).
    pub(crate) fn spawn_agent(
        &self,
        name: &str,
        labels: &[&str],
        state: &Path,
        log: &Path,
    ) -> ChildGuard {
        self.spawn_agent_with_env(name, labels, state, log, &[])
    }

    /// Like `spawn_agent`, with extra environment variables.
    pub(crate) fn spawn_agent_with_env(
        &self,
        name: &str,
        labels: &[&str],
        state: &Path,
        log: &Path,
        env: &[(&str, &str)],
    ) -> ChildGuard {
        let mut command = self.agent_command(&self.agent_config(), name, labels, state, log);
        command.envs(env.iter().copied());
        ChildGuard(command.spawn().unwrap())
    }

    /// The command that starts an agent (not yet spawned), logging to `log`.
    pub(crate) fn agent_command(
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
    pub(crate) fn flotctl_ok(&self, args: &[&str]) -> String {
        let out = self.flotctl(args);
        assert!(
            out.status.success(),
            "flotctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub(crate) fn flotctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(binary("flotctl"))
            .arg("--config")
            .arg(&self.ctl_config)
            .args(args)
            .output()
            .unwrap()
    }

    pub(crate) fn flotctl_json(&self, args: &[&str]) -> Option<serde_json::Value> {
        let mut full = args.to_vec();
        full.extend(["-o", "json"]);
        let out = self.flotctl(&full);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }
}

pub(crate) fn wait(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Duration {
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

pub(crate) fn count_lines(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

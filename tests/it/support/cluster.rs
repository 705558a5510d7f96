//! A control plane, agents and flotctl as real processes, for end-to-end tests.

use super::{ChildGuard, TestDb, binary};
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub(crate) struct Cluster {
    pub root: std::path::PathBuf,
    pub data: std::path::PathBuf,
    pub db: TestDb,
    /// The agent and admin endpoints: chosen by the kernel at the first start (port 0, reported
    /// by the server), kept for every restart.
    endpoints: OnceLock<(SocketAddr, SocketAddr)>,
    /// The operations endpoint of the latest start, when asked for with `--metrics-listen`.
    operations: Mutex<Option<SocketAddr>>,
    /// flotctl's configuration: the data directory's, or one pointing at this replica.
    pub ctl_config: std::path::PathBuf,
}

/// What a starting `flotilla serve` reports on stdout, in order.
const AGENT_LINE: &str = "agent endpoint: https://";
const ADMIN_LINE: &str = "admin endpoint: https://";
const OPERATIONS_LINE: &str = "operations endpoint: http://";

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
            endpoints: OnceLock::new(),
            operations: Mutex::new(None),
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
            format!("https://{}", self.admin_addr()),
        );
        retarget(
            &self.data.join("agent.toml"),
            &self.agent_config(),
            format!("https://{}", self.agent_addr()),
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
        std::fs::create_dir_all(root).unwrap();
        Cluster {
            data: root.join("data"),
            db,
            endpoints: OnceLock::new(),
            operations: Mutex::new(None),
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

    /// The agent endpoint (known once the server has started).
    pub(crate) fn agent_addr(&self) -> SocketAddr {
        self.endpoints
            .get()
            .expect("the server has not started yet")
            .0
    }

    /// The admin endpoint (known once the server has started).
    pub(crate) fn admin_addr(&self) -> SocketAddr {
        self.endpoints
            .get()
            .expect("the server has not started yet")
            .1
    }

    /// The operations endpoint of the running server, started with `--metrics-listen`
    /// (`127.0.0.1:0` lets the kernel choose).
    pub(crate) fn operations_addr(&self) -> SocketAddr {
        self.operations
            .lock()
            .unwrap()
            .expect("the server was started without --metrics-listen")
    }

    /// Starts `flotilla serve` with extra arguments (e.g. certificate lifetimes, or a
    /// `--database-url` that replaces the cluster's). Returns once the server has bound its
    /// endpoints and said where.
    pub(crate) fn start_server_with(&self, run: usize, extra: &[&str]) -> ChildGuard {
        let log = std::fs::File::create(self.root.join(format!("server-{run}.log"))).unwrap();
        let (agent, admin) = match self.endpoints.get() {
            Some((agent, admin)) => (agent.to_string(), admin.to_string()),
            None => ("127.0.0.1:0".to_string(), "127.0.0.1:0".to_string()),
        };
        let mut command = Command::new(binary("flotilla"));
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--agent-listen")
            .arg(agent)
            .arg("--admin-listen")
            .arg(admin)
            .arg("--heartbeat-interval")
            .arg("2")
            .args(extra)
            .env("FLOTILLA_LOG", "info,flotilla::control::session=debug")
            .stdout(Stdio::piped())
            .stderr(log);
        if self.db.is_postgres() && !extra.contains(&"--database-url") {
            command.arg("--database-url").arg(&self.db.url);
        }
        let mut child = command.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let with_operations = extra.contains(&"--metrics-listen");
        let (reported, endpoints) = std::sync::mpsc::channel();
        let out_path = self.root.join(format!("server-{run}.out"));
        // Reads the report, then keeps the pipe drained (into server-N.out) for the server's life.
        std::thread::spawn(move || {
            let mut out = std::fs::File::create(out_path).unwrap();
            let mut found: Vec<SocketAddr> = Vec::new();
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = std::io::Write::write_all(&mut out, format!("{line}\n").as_bytes());
                let addr = [AGENT_LINE, ADMIN_LINE, OPERATIONS_LINE]
                    .iter()
                    .find_map(|prefix| line.strip_prefix(prefix))
                    .and_then(|rest| rest.trim_end_matches("/metrics").parse().ok());
                if let Some(addr) = addr {
                    found.push(addr);
                    if found.len() == 2 + usize::from(with_operations) {
                        let _ = reported.send(found.clone());
                    }
                }
            }
        });
        let found = match endpoints.recv_timeout(Duration::from_secs(60)) {
            Ok(found) => found,
            Err(_) => {
                let _ = child.kill();
                let log = std::fs::read_to_string(self.root.join(format!("server-{run}.log")));
                panic!(
                    "the server did not report its endpoints; its log:\n{}",
                    log.unwrap_or_default()
                );
            }
        };
        let _ = self.endpoints.set((found[0], found[1]));
        *self.operations.lock().unwrap() = found.get(2).copied();
        ChildGuard(child)
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
        // Its health endpoint on a port of the kernel's choosing, reported in the log: tests read
        // the agent's counters there (`agent_counter`). A test may pass its own address after.
        command
            .args(["--health-listen", "127.0.0.1:0"])
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

/// Series of the agent's `/metrics` the end-to-end tests follow.
pub(crate) const APPLIED: &str = "flotilla_agent_applies_total{result=\"ok\"}";
pub(crate) const REJECTED: &str = "flotilla_agent_applies_total{result=\"rejected\"}";
pub(crate) const SESSIONS: &str = "flotilla_agent_sessions_total";
pub(crate) const RENEWED: &str = "flotilla_agent_renewals_total{result=\"renewed\"}";

/// The value of `series` (`flotilla_agent_applies_total{result="ok"}`) on the `/metrics` page of
/// the agent logging to `log`: its latest start's health endpoint, as the log reports it. `None`
/// while that agent is not up (or the series is not there).
pub(crate) fn agent_counter(log: &Path, series: &str) -> Option<u64> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("health endpoint listening"))?;
    let addr = line.split("addr=").nth(1)?.split_whitespace().next()?;
    let page = super::try_http_body(&format!("http://{addr}/metrics"))?;
    page.lines().find_map(|l| {
        let value = l.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse::<f64>().ok().map(|v| v as u64)
    })
}

/// `agent_counter`, waiting for the agent to serve it.
pub(crate) fn agent_counter_now(log: &Path, series: &str) -> u64 {
    let mut value = None;
    wait(
        &format!("{series} from the agent logging to {}", log.display()),
        Duration::from_secs(30),
        || {
            value = agent_counter(log, series);
            value.is_some()
        },
    );
    value.unwrap_or_default()
}

pub(crate) fn count_lines(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

//! `flotilla-agent`: enrolls the device, holds its management stream and applies pushed specs.

mod apply;
mod backoff;
mod certs;
mod enroll;
mod failpoint;
mod health;
mod keys;
mod push;
mod recover;
mod renewal;
mod session;
mod state;
mod status;
mod tls;
#[cfg(feature = "tpm")]
mod tpm;
mod update;

use anyhow::{Context, Result, bail};
use clap::Parser;
use flotilla::names::{validate_labels, validate_name};
use flotilla::profiles::AgentConfig;
use state::StateDir;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::watch;

const DEFAULT_STATE_DIR: &str = "/var/lib/flotilla-agent";

#[derive(Parser)]
#[command(
    name = "flotilla-agent",
    version,
    about = "Flotilla device agent",
    args_override_self = true
)]
struct Cli {
    /// Agent configuration (as written by `flotilla serve` into its data directory).
    #[arg(long, env = "FLOTILLA_AGENT_CONFIG")]
    config: PathBuf,
    /// Directory for the device key, certificate and applied spec.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Device name to request (default: from the config, else the hostname).
    #[arg(long)]
    name: Option<String>,
    /// Label to request, `key=value` (repeatable).
    #[arg(long = "label", value_parser = flotilla::names::parse_label)]
    labels: Vec<(String, String)>,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
    /// Serve `/healthz` and `/metrics` on this address (overrides `health_listen` in the config).
    #[arg(long)]
    health_listen: Option<std::net::SocketAddr>,
}

/// Everything the agent's tasks share.
pub struct Agent {
    pub config: AgentConfig,
    pub state: StateDir,
    pub certs: certs::CertStore,
    /// Where device keys are made: files, or the TPM.
    pub keys: keys::KeySource,
    pub health: std::sync::Arc<health::Health>,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub boot_id: String,
    pub shutdown: watch::Receiver<bool>,
    /// How long an apply in progress may take to finish once shutdown was asked for (SIGTERM:
    /// 60 s, SIGINT: 10 s).
    pub grace: std::sync::Arc<std::sync::Mutex<Duration>>,
    /// The agent's own updates: which build runs, the pinned release keys, the OS image.
    pub updater: update::Updater,
    /// The control-plane endpoints (replicas) and which one is in use.
    endpoints: Vec<String>,
    endpoint: std::sync::atomic::AtomicUsize,
}

impl Agent {
    /// The control-plane endpoint in use.
    pub fn server(&self) -> &str {
        let index = self.endpoint.load(std::sync::atomic::Ordering::Relaxed);
        &self.endpoints[index % self.endpoints.len()]
    }

    /// Moves to the next endpoint after the one in use failed (with one endpoint, stays).
    pub fn next_server(&self) {
        if self.endpoints.len() > 1 {
            self.endpoint
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(server = %self.server(), "trying the next control-plane endpoint");
        }
    }

    /// Sleeps for `duration`; returns true if shutdown was requested meanwhile.
    pub async fn sleep_or_shutdown(&self, duration: Duration) -> bool {
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            _ = tokio::time::sleep(duration) => *self.shutdown.borrow(),
            _ = shutdown.wait_for(|stop| *stop) => true,
        }
    }
}

/// Help texts of the agent's series.
fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge};
    describe_gauge!(
        "flotilla_agent_build_info",
        "Always 1; the version label is the agent's version."
    );
    describe_gauge!(
        "flotilla_agent_connected",
        "1 while the management stream is open."
    );
    describe_counter!("flotilla_agent_applies_total", "Spec applies by result.");
    describe_counter!(
        "flotilla_agent_sessions_total",
        "Management sessions established (the first, and every reconnect)."
    );
    describe_counter!(
        "flotilla_agent_renewals_total",
        "Certificate renewals by result."
    );
    describe_counter!(
        "flotilla_agent_updates_total",
        "Updates of the agent and the OS by kind and result (succeeded, failed, rolled_back)."
    );
    describe_gauge!(
        "flotilla_agent_certificate_expiry_seconds",
        "Unix time the current certificate expires."
    );
    describe_gauge!(
        "flotilla_agent_health",
        "Last health result per check: 0 pass, 1 warn, 2 fail."
    );
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_lowercase())
        .unwrap_or_else(|_| "device".to_string())
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|b| b.trim().to_string())
        .unwrap_or_default()
}

/// Grace for an apply in progress after SIGTERM (what a service manager sends) and after SIGINT
/// (someone at a terminal, who wants it over sooner).
const TERM_GRACE: Duration = Duration::from_secs(60);
const INT_GRACE: Duration = Duration::from_secs(10);

/// Waits for SIGTERM or SIGINT (a graceful stop: the apply in progress may finish or roll back
/// within its grace, a final status is sent, the stream is closed) or SIGQUIT (stop at once:
/// every file the agent writes is written atomically, and an interrupted apply is rolled back at
/// the next start, so nothing is left half-written).
async fn shutdown_signal(
    tx: watch::Sender<bool>,
    grace: std::sync::Arc<std::sync::Mutex<Duration>>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut quit)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::quit()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    let (signal, wait) = tokio::select! {
        _ = term.recv() => ("SIGTERM", TERM_GRACE),
        _ = int.recv() => ("SIGINT", INT_GRACE),
        _ = quit.recv() => {
            tracing::warn!("SIGQUIT: stopping at once");
            std::process::exit(131);
        }
    };
    tracing::info!(signal, grace_secs = wait.as_secs(), "shutting down");
    *grace.lock().unwrap_or_else(|p| p.into_inner()) = wait;
    let _ = tx.send(true);
    // A second signal of any kind while draining stops at once.
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = quit.recv() => {}
    }
    tracing::warn!("a second signal: stopping at once");
    std::process::exit(130);
}

/// Settles an agent update left open and runs the build `current` names (replacing this
/// process when that is another binary). Runs before anything else of the agent.
fn launch(builds: &update::builds::Builds, records: &update::records::Records, max_attempts: u32) {
    use update::launcher::{Launch, exec, roll_back, settle};
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let launched = std::env::var_os(update::launcher::LAUNCHED_ENV).is_some();
    // At most a few rounds: a build that cannot be started is rolled back, then the next runs.
    for _ in 0..3 {
        match settle(
            builds,
            records,
            &exe,
            launched,
            max_attempts,
            flotilla::clock::now_millis(),
        ) {
            Launch::Run => return,
            Launch::Exec(binary) => {
                tracing::info!(binary = %binary.display(), "starting the current agent build");
                let error = exec(&binary, true);
                let reason = format!("it could not be started: {error}");
                match records.pending_agent() {
                    Some(pending) => roll_back(
                        builds,
                        records,
                        &pending,
                        reason,
                        flotilla::clock::now_millis(),
                    ),
                    None => {
                        tracing::error!(%reason, binary = %binary.display(), "the current agent build is unusable; going back");
                        let _ = builds.roll_back();
                    }
                }
            }
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLOTILLA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if cli.log_json {
        logs.json().init();
    } else {
        logs.init();
    }

    let config = AgentConfig::load(&cli.config)?;
    let state_dir = cli
        .state_dir
        .or_else(|| config.state_dir.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    let state = StateDir::open(&state_dir)
        .with_context(|| format!("opening state directory {}", state_dir.display()))?;
    let name = cli
        .name
        .or_else(|| config.device_name.clone())
        .unwrap_or_else(hostname);
    if let Err(error) = validate_name(&name) {
        bail!("device name: {error}");
    }
    let mut labels = config.labels.clone();
    labels.extend(cli.labels);
    validate_labels(&labels).context("labels")?;

    let install_dir = config
        .update
        .install_dir
        .clone()
        .unwrap_or_else(|| state.root().join("agent"));
    let builds = update::builds::Builds::new(&install_dir);
    launch(
        &builds,
        &update::records::Records::new(state.root()),
        config.update.max_start_attempts(),
    );
    let running = update::Running::identify(&builds);
    tracing::info!(version = %running.version, sha256 = %running.sha256, "flotilla-agent starting");

    let (stop_tx, stop_rx) = watch::channel(false);
    let grace = std::sync::Arc::new(std::sync::Mutex::new(TERM_GRACE));
    tokio::spawn(shutdown_signal(stop_tx, grace.clone()));
    let health = std::sync::Arc::new(health::Health::new(state.root().to_path_buf()));
    if let Some(addr) = cli.health_listen.or(config.health_listen) {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the health endpoint {addr}"))?;
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).context("installing the metrics recorder")?;
        describe_metrics();
        metrics::gauge!("flotilla_agent_build_info", "version" => running.version.clone()).set(1.0);
        for kind in ["agent", "os"] {
            for result in ["succeeded", "failed", "rolled_back"] {
                metrics::counter!("flotilla_agent_updates_total", "kind" => kind, "result" => result)
                    .absolute(0);
            }
        }
        for result in ["ok", "rejected", "deferred"] {
            metrics::counter!("flotilla_agent_applies_total", "result" => result).absolute(0);
        }
        for result in ["renewed", "refused", "rejected"] {
            metrics::counter!("flotilla_agent_renewals_total", "result" => result).absolute(0);
        }
        metrics::counter!("flotilla_agent_sessions_total").absolute(0);
        // The bound address: with port 0 the kernel chose it, and whoever started the agent reads
        // it here.
        let addr = listener.local_addr().unwrap_or(addr);
        tracing::info!(%addr, "health endpoint listening");
        tokio::spawn(health::serve(listener, health.clone(), handle));
    }
    let keys = keys::KeySource::from_config(&config.tpm)?;
    let endpoints = config.endpoints();
    let boot_id = boot_id();
    let updater = update::Updater::new(
        config.update.clone(),
        builds,
        state.root(),
        running,
        boot_id.clone(),
        state.ca_path(),
    );
    let agent = Agent {
        updater,
        grace,
        keys,
        config,
        certs: certs::CertStore::new(state.root()),
        health,
        state,
        name,
        labels,
        boot_id,
        shutdown: stop_rx,
        // A random first endpoint spreads a fleet over the replicas.
        endpoint: std::sync::atomic::AtomicUsize::new(rand::random_range(0..endpoints.len())),
        endpoints,
    };
    // Before anything else: a crash in the middle of an apply is settled now, so the disk holds
    // one version, and the session says which.
    let applied = push::current_applied(&agent);
    let _ = push::settle_interrupted_apply(&agent, &applied.version);
    let enrolled = enroll::ensure_enrolled(&agent).await?;
    match session::run(&agent, &enrolled).await {
        Err(error) if error.is::<session::Decommissioned>() => {
            tracing::error!(%error, "stopping: this device is no longer part of the fleet");
            std::process::exit(session::EXIT_DECOMMISSIONED);
        }
        other => other,
    }
}

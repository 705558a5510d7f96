//! `flotilla-load`: runs a real `flotilla serve` and N simulated agents speaking the real agent
//! protocol over real mTLS (certificates minted in bulk for the run), and measures the scenarios
//! of BENCHMARKS.md — idle streams, fan-out, renewal, reconnect storm — beside Mosquitto holding
//! the same N TLS connections. Prints the figures, writes them as JSON, and stops by itself.
//!
//! `cargo build --release -p flotilla-load -p flotilla && target/release/flotilla-load --agents 10000`

// A benchmark measures real time: it reads the clock directly.
#![allow(clippy::disallowed_methods)]

mod download;
mod fleet;
mod measure;
mod mosquitto;
mod server;
mod worker;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use fleet::{Fleet, wait_reporting, wait_until};
use flotilla::bootstrap::DataDir;
use flotilla::client::ClientCredentials;
use flotilla::proto::admin::v1 as admin;
use flotilla::proto::admin::v1::certificate_service_client::CertificateServiceClient;
use flotilla::proto::admin::v1::fleet_service_client::FleetServiceClient;
use flotilla::proto::agent::v1 as agent;
use flotilla::store::{AuditQuery, Backend, Store};
use measure::{Latencies, metric_sum, socket_memory, usage};
use serde::Serialize;
use server::{ControlPlane, LOAD_SELECTOR};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Idle,
    Fanout,
    Renewal,
    Storm,
    Mosquitto,
    /// An agent release downloaded by `--downloaders` devices at once (not part of `all`).
    Download,
    All,
}

#[derive(Parser)]
#[command(name = "flotilla-load", about = "Flotilla load harness")]
struct Cli {
    /// Number of simulated agents (streams), and of Mosquitto connections.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Scenarios to run (repeatable); `all` runs every one, Mosquitto first.
    #[arg(long, value_enum, default_values_t = [Scenario::All])]
    scenario: Vec<Scenario>,
    /// Seconds of idle measurement.
    #[arg(long, default_value_t = 60)]
    idle_seconds: u64,
    /// The control plane binary (default: beside this one).
    #[arg(long)]
    flotilla: Option<PathBuf>,
    /// Extra arguments for `flotilla serve` (repeatable), e.g. `--server-arg=--max-opening-sessions=64`.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// Where to write the figures as JSON.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Fail (exit 1) unless every scenario completed correctly (all ACKed, none lost, every
    /// renewal audited, no store work while idle): the CI smoke test.
    #[arg(long)]
    check: bool,
    /// Control-plane replicas on one PostgreSQL database (agents spread over them; fan-out is
    /// applied through another replica than most agents use; the storm kills one replica).
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Runtime threads of each replica (`TOKIO_WORKER_THREADS`; default: the runtime's own, one per
    /// core). The replicas share the cores with the simulated fleet, and how many threads each
    /// side runs decides how the cores are split between them (BENCHMARKS.md).
    #[arg(long)]
    replica_threads: Option<NonZeroUsize>,
    /// PostgreSQL server for the run (a database is created on it and dropped afterwards);
    /// default with --replicas above 1: postgres://postgres@127.0.0.1:5432/test.
    #[arg(long)]
    database_url: Option<String>,
    /// Harness processes the simulated fleet is split over (0: one per 15,000 agents, so each
    /// stays below the per-process open-file limit).
    #[arg(long, default_value_t = 0)]
    harness_processes: usize,
    /// Agents send a status report (system info and resources, about what a real agent sends) at
    /// session start and again, unchanged, every 5 s; with --check the idle fleet must still
    /// cause no store operation.
    #[arg(long)]
    status: bool,
    /// Size of the artifact of the download scenario, MiB.
    #[arg(long, default_value_t = 20)]
    download_mib: usize,
    /// Devices downloading it at once (at most --agents).
    #[arg(long, default_value_t = 200)]
    downloaders: usize,
    /// Internal: run as a harness worker on the slice of the fleet in this file.
    #[arg(long, hide = true)]
    worker: Option<PathBuf>,
}

/// Agents one harness process holds when the fleet is split automatically.
const AGENTS_PER_PROCESS: usize = 15_000;

const DEFAULT_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A PostgreSQL database created for the run and dropped when it ends.
struct RunDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl RunDatabase {
    async fn create(admin_url: &str) -> Result<RunDatabase> {
        let name = format!("flotilla_load_{}", std::process::id());
        let (client, connection) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connecting to {admin_url}"))?;
        tokio::spawn(connection);
        // One statement each: CREATE DATABASE cannot run inside the implicit transaction of a
        // multi-statement query.
        client
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await?;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("creating database {name}"))?;
        let base = admin_url.rsplit_once('/').map_or(admin_url, |(b, _)| b);
        Ok(RunDatabase {
            url: format!("{base}/{name}"),
            admin_url: admin_url.to_string(),
            name,
        })
    }

    async fn drop_database(&self) {
        if let Ok((client, connection)) =
            tokio_postgres::connect(&self.admin_url, tokio_postgres::NoTls).await
        {
            tokio::spawn(connection);
            let _ = client
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                ))
                .await;
        }
    }
}

impl Cli {
    fn runs(&self, scenario: Scenario) -> bool {
        self.scenario.contains(&scenario)
            || (self.scenario.contains(&Scenario::All) && scenario != Scenario::Download)
    }
}

#[derive(Serialize, Default)]
struct Figures {
    agents: usize,
    replicas: usize,
    /// Each replica's runtime threads, when not the runtime's default.
    replica_threads: Option<NonZeroUsize>,
    harness_processes: usize,
    cpus: usize,
    open_file_limit: u64,
    mosquitto: Option<mosquitto::MosquittoFigures>,
    connect: Option<Connect>,
    idle: Option<Idle>,
    /// The fan-out of the fleet's creation (every device joins it).
    fanout: Option<Fanout>,
    /// The fan-out of a change to the existing fleet's template.
    template_change: Option<Fanout>,
    renewal: Option<Renewal>,
    storm: Option<Storm>,
    download: Option<download::DownloadFigures>,
}

#[derive(Serialize)]
struct Connect {
    seconds: f64,
    told_to_back_off: usize,
    /// Connection attempts that failed (the agent backed off and retried), and the first errors.
    attempts_failed: usize,
    errors: Vec<String>,
}

#[derive(Serialize)]
struct Idle {
    rss_before_mib: f64,
    rss_after_mib: f64,
    rss_per_stream_kib: f64,
    socket_memory_kib: Option<f64>,
    cpu_seconds: f64,
    idle_seconds: u64,
    store_operations: f64,
    per_replica: Vec<ReplicaMemory>,
}

#[derive(Serialize)]
struct ReplicaMemory {
    sessions: f64,
    rss_mib: f64,
    rss_per_stream_kib: f64,
}

/// How far the replicas' change feeds fell behind while something ran (sampled every second).
#[derive(Serialize, Default, Clone, Copy)]
struct FeedLag {
    max_lag_seconds: f64,
    max_ids_behind: f64,
}

#[derive(Serialize)]
struct Fanout {
    acked: usize,
    /// How long the apply call took (the change is committed when it returns).
    apply_ms: f64,
    /// From the start of the operator's call to each agent's ACK: agents of other replicas may
    /// have the change before the applying replica returns, so counting from the return would
    /// hide the time the call took.
    latency: Latencies,
    feed: FeedLag,
}

#[derive(Serialize)]
struct Renewal {
    renewed: usize,
    seconds: f64,
    issuances_per_second: f64,
    latency: Latencies,
    all_back_on_new_certificate_seconds: f64,
    refused: usize,
    server_cpu_seconds: f64,
    audited: usize,
    audit_chain_verified: usize,
}

#[derive(Serialize)]
struct Storm {
    /// With replicas, one replica is killed and not restarted: its agents move to the others.
    replica_killed: bool,
    restart_to_ready_seconds: f64,
    ready_to_all_synced_seconds: f64,
    restart_to_all_synced_seconds: f64,
    agents_told_to_back_off: usize,
    sessions_refused_by_server: f64,
    server_sessions: f64,
    server_synced: f64,
}

fn admin_template(content: &str) -> admin::ApplyFleetRequest {
    admin::ApplyFleetRequest {
        name: "load".into(),
        selector: LOAD_SELECTOR.into(),
        template: Some(agent::DeviceSpec {
            files: vec![agent::FileSpec {
                path: "/etc/load.conf".into(),
                content: content.into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(input) = &cli.worker {
        return worker::run(input).await;
    }
    let open_file_limit = measure::raise_file_limit();
    let work = std::env::temp_dir().join(format!("flotilla-load-{}", std::process::id()));
    let database = match (&cli.database_url, cli.replicas > 1) {
        (Some(url), _) => Some(RunDatabase::create(url).await?),
        (None, true) => Some(RunDatabase::create(DEFAULT_POSTGRES).await?),
        (None, false) => None,
    };
    let result = run(&cli, &work, database.as_ref(), open_file_limit).await;
    let _ = std::fs::remove_dir_all(&work);
    if let Some(database) = &database {
        database.drop_database().await;
    }
    let figures = result?;
    let json = serde_json::to_string_pretty(&figures)?;
    println!("{json}");
    if let Some(out) = &cli.out {
        std::fs::write(out, &json)?;
    }
    Ok(())
}

async fn run(
    cli: &Cli,
    work: &std::path::Path,
    database: Option<&RunDatabase>,
    open_file_limit: u64,
) -> Result<Figures> {
    let n = cli.agents;
    let replicas = cli.replicas.max(1);
    let dir = DataDir::new(work.join("data"));
    let backend = match database {
        Some(db) => Backend::Postgres(db.url.clone()),
        None => Backend::Sqlite(dir.sqlite_path().display().to_string()),
    };
    let binary = match cli.flotilla.clone() {
        Some(path) => path,
        None => std::env::current_exe()?.with_file_name("flotilla"),
    };
    let mut figures = Figures {
        agents: n,
        replicas,
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        open_file_limit,
        ..Default::default()
    };
    eprintln!("minting {n} devices…");
    let devices = server::mint(&dir, &backend, n).await?;

    if cli.runs(Scenario::Mosquitto) {
        let publisher = ClientCredentials {
            ca_pem: std::fs::read_to_string(dir.ca_cert())?,
            cert_pem: std::fs::read_to_string(dir.admin_cert())?,
            key_pem: std::fs::read_to_string(dir.admin_key())?,
            server_name: "localhost".into(),
        };
        // The same bytes a pushed spec carries.
        let payload =
            prost::Message::encode_to_vec(&admin_template("fan-out").template.unwrap_or_default());
        let figures_m = mosquitto::run(
            work,
            &devices,
            &publisher,
            server::broker_certificate(&dir)?,
            payload,
        )
        .await
        .context("mosquitto")?;
        eprintln!(
            "mosquitto: {} TLS connections in {:.1} s, RSS {:.1} → {:.1} MiB ({:.1} KiB per connection), delivery {}",
            figures_m.connections,
            figures_m.connect_seconds,
            figures_m.rss_before_mib,
            figures_m.rss_after_mib,
            figures_m.rss_per_connection_kib,
            figures_m.delivery
        );
        if cli.check && figures_m.delivery.count < n {
            bail!("mosquitto delivered to {} of {n}", figures_m.delivery.count);
        }
        figures.mosquitto = Some(figures_m);
        if cli.scenario == [Scenario::Mosquitto] {
            return Ok(figures);
        }
    }

    figures.replica_threads = cli.replica_threads;
    let mut servers = Vec::with_capacity(replicas);
    for index in 0..replicas {
        servers.push(
            ControlPlane::start(
                &binary,
                &dir,
                database.map(|db| db.url.as_str()),
                &format!("replica-{index}"),
                cli.server_args.clone(),
                cli.replica_threads,
            )
            .await?,
        );
    }
    let pids: Vec<u32> = servers.iter().map(ControlPlane::pid).collect();
    let rss_before_each: Vec<f64> = pids
        .iter()
        .map(|pid| usage(*pid).map(|u| u.0))
        .collect::<Result<_>>()?;
    let rss_before: f64 = rss_before_each.iter().sum();
    let started = Instant::now();
    let ports: Vec<u16> = servers.iter().map(|s| s.agent_port).collect();
    let processes = match cli.harness_processes {
        0 => n.div_ceil(AGENTS_PER_PROCESS),
        chosen => chosen,
    };
    figures.harness_processes = processes.max(1);
    let download_creds: Vec<ClientCredentials> = devices
        .iter()
        .take(cli.downloaders.min(n))
        .map(|d| d.creds.clone())
        .collect();
    let fleet = if processes > 1 {
        eprintln!("agents split over {processes} harness processes");
        Fleet::connect_in_processes(devices, ports, processes, work, cli.status)?
    } else {
        Fleet::connect(devices, ports, cli.status).await
    };
    if cli.status {
        let report = fleet::status_report(n.saturating_sub(1));
        eprintln!(
            "status reports on: {} bytes each (protobuf, the largest agent index)",
            prost::Message::encoded_len(&report)
        );
    }
    let shared = fleet.shared.clone();
    let connected = wait_reporting(
        Duration::from_secs(900),
        "first connection and sync",
        || shared.synced_since(started) >= n,
        || Some(format!("{} of {n} synced", shared.synced_since(started))),
    )
    .await
    .with_context(|| {
        format!(
            "{} of {n} synced; errors: {:?}",
            shared.synced_since(started),
            shared.errors()
        )
    })?;
    let connect = Connect {
        seconds: connected.as_secs_f64(),
        told_to_back_off: shared.take_told_busy(),
        attempts_failed: shared
            .sessions_lost
            .load(std::sync::atomic::Ordering::Relaxed),
        errors: shared.errors(),
    };
    eprintln!(
        "{n} agents connected and synced in {:.1} s ({} attempts failed: {:?})",
        connect.seconds, connect.attempts_failed, connect.errors
    );
    figures.connect = Some(connect);

    if cli.runs(Scenario::Idle) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let ops_before = store_operations(&servers).await?;
        let (rss_after, cpu_before) = usage_of(&pids)?;
        tokio::time::sleep(Duration::from_secs(cli.idle_seconds)).await;
        let (_, cpu_after) = usage_of(&pids)?;
        let ops_after = store_operations(&servers).await?;
        let idle = Idle {
            rss_before_mib: rss_before / 1024.0,
            rss_after_mib: rss_after / 1024.0,
            rss_per_stream_kib: (rss_after - rss_before) / n as f64,
            socket_memory_kib: servers
                .iter()
                .map(|s| socket_memory(s.agent_port))
                .sum::<Option<f64>>(),
            cpu_seconds: cpu_after - cpu_before,
            idle_seconds: cli.idle_seconds,
            store_operations: ops_after - ops_before,
            per_replica: replica_memory(&servers, &rss_before_each).await?,
        };
        eprintln!(
            "idle: RSS {:.1} → {:.1} MiB ({:.1} KiB per stream), socket memory {:.0} KiB, CPU {:.2} s over {} s, {} store operations",
            idle.rss_before_mib,
            idle.rss_after_mib,
            idle.rss_per_stream_kib,
            idle.socket_memory_kib.unwrap_or(0.0),
            idle.cpu_seconds,
            idle.idle_seconds,
            idle.store_operations
        );
        for (index, replica) in idle.per_replica.iter().enumerate() {
            eprintln!(
                "  replica-{index}: {} sessions, RSS {:.1} MiB ({:.1} KiB per stream)",
                replica.sessions, replica.rss_mib, replica.rss_per_stream_kib
            );
        }
        if cli.check && idle.store_operations > 0.0 {
            bail!(
                "the idle fleet made {} store operations",
                idle.store_operations
            );
        }
        figures.idle = Some(idle);
    }

    if cli.runs(Scenario::Download) {
        let figures_d = download::run(&servers, download_creds, cli.download_mib).await?;
        eprintln!(
            "download: {} devices × {:.0} MiB in {:.1} s ({:.0} MiB/s), {}; told to come back {} times; RSS {:.1} MiB before, peak {:.1} MiB; server CPU {:.1} s",
            figures_d.downloaders,
            figures_d.artifact_mib,
            figures_d.seconds,
            figures_d.throughput_mib_s,
            figures_d.latency,
            figures_d.told_to_come_back,
            figures_d.rss_before_mib,
            figures_d.rss_peak_mib,
            figures_d.server_cpu_seconds
        );
        figures.download = Some(figures_d);
    }

    if cli.runs(Scenario::Fanout) {
        // First the fleet is created: every device joins it (its ownership is written and fed to
        // the other replicas). Then a change of its template alone.
        figures.fanout =
            Some(fan_out(&servers, &shared, n, "fan-out", "fleet created", cli.check).await?);
        figures.template_change = Some(
            fan_out(
                &servers,
                &shared,
                n,
                "fan-out, changed",
                "template changed",
                cli.check,
            )
            .await?,
        );
    }

    let mut renewal = None;
    if cli.runs(Scenario::Renewal) {
        // The renewal is asked through the first replica: wait until it knows every device's
        // session (those held elsewhere reach it through the change feed).
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline
            && metric_sum(
                &servers[0].metrics().await?,
                "flotilla_devices",
                "sync_state=\"offline\"",
            ) > 0.0
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let before = shared.renewal_count();
        let (_, cpu_before) = usage_of(&pids)?;
        let asked = CertificateServiceClient::new(servers[0].admin().await?)
            .renew_certificate(admin::RenewCertificateRequest {
                selector: LOAD_SELECTOR.into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        let called = Instant::now();
        if asked.asked as usize != n {
            bail!(
                "renewal: {} of {n} asked ({} not connected)",
                asked.asked,
                asked.not_connected
            );
        }
        let took = wait_reporting(
            Duration::from_secs(600),
            "renewal",
            || shared.renewal_count() >= before + n,
            || {
                Some(format!(
                    "{} of {n} renewed, {} refusals",
                    shared.renewal_count() - before,
                    shared.refusals.load(std::sync::atomic::Ordering::Relaxed)
                ))
            },
        )
        .await
        .with_context(|| {
            format!(
                "{} of {n} renewed; errors: {:?}",
                shared.renewal_count() - before,
                shared.errors()
            )
        })?;
        wait_reporting(
            Duration::from_secs(600),
            "reconnect with the new certificates",
            || shared.synced_since(called) >= n,
            || Some(format!("{} of {n} back", shared.synced_since(called))),
        )
        .await
        .with_context(|| {
            format!(
                "{} of {n} back; not back (agent, port, renewals received): {:?}; errors: {:?}",
                shared.synced_since(called),
                shared.not_synced_since(called, 20),
                shared.errors()
            )
        })?;
        let back = shared.last_synced_after(called);
        let (_, cpu_after) = usage_of(&pids)?;
        let latency = Latencies::of(
            shared
                .renewals
                .lock()
                .map(|r| {
                    r[before..]
                        .iter()
                        .map(|(_, at)| at.duration_since(called).as_secs_f64() * 1000.0)
                        .collect()
                })
                .unwrap_or_default(),
        );
        eprintln!(
            "renewal of {n}: {:.1} s ({:.0} issuances/s), {latency}; all back on the new certificate after {:.1} s; server CPU {:.1} s",
            took.as_secs_f64(),
            n as f64 / took.as_secs_f64(),
            back.as_secs_f64(),
            cpu_after - cpu_before
        );
        renewal = Some(Renewal {
            renewed: latency.count,
            seconds: took.as_secs_f64(),
            issuances_per_second: n as f64 / took.as_secs_f64(),
            latency,
            all_back_on_new_certificate_seconds: back.as_secs_f64(),
            refused: shared.refusals.load(std::sync::atomic::Ordering::Relaxed),
            server_cpu_seconds: cpu_after - cpu_before,
            audited: 0,
            audit_chain_verified: 0,
        });
    }

    if cli.runs(Scenario::Storm) {
        shared.take_told_busy();
        // With replicas, one replica dies for good and its agents must find the others; alone,
        // the control plane is restarted under the whole fleet.
        let affected: Vec<usize> = if replicas > 1 {
            let port = servers[replicas - 1].agent_port;
            shared.agents_on(port)
        } else {
            (0..n).collect()
        };
        let killed = Instant::now();
        if replicas > 1 {
            if let Some(mut last) = servers.pop() {
                last.crash();
            }
        } else {
            servers[0].crash_and_restart()?;
            servers[0].wait_ready(Duration::from_secs(120)).await?;
        }
        let ready = killed.elapsed();
        wait_reporting(
            Duration::from_secs(600),
            "storm",
            || shared.synced_since_among(&affected, killed) >= affected.len(),
            || {
                Some(format!(
                    "{} of {} synced again",
                    shared.synced_since_among(&affected, killed),
                    affected.len()
                ))
            },
        )
        .await
        .with_context(|| {
            format!(
                "{} of {} synced again; errors: {:?}",
                shared.synced_since_among(&affected, killed),
                affected.len(),
                shared.errors()
            )
        })?;
        eprintln!("storm: {} agents had to reconnect", affected.len());
        let all_synced = shared.last_synced_after(killed);
        // The control planes' own view must agree: every device connected (to one of them) and
        // in sync (as each of them sees it).
        let mut server_view = (0.0, 0.0);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let mut sessions = 0.0;
            let mut synced = f64::MAX;
            for server in &servers {
                let metrics = server.metrics().await?;
                sessions += metric_sum(&metrics, "flotilla_agent_sessions", "");
                synced = synced.min(metric_sum(
                    &metrics,
                    "flotilla_devices",
                    "sync_state=\"synced\"",
                ));
            }
            server_view = (sessions, synced);
            if server_view == (n as f64, n as f64) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut refused = 0.0;
        for server in &servers {
            refused += metric_sum(
                &server.metrics().await?,
                "flotilla_sessions_refused_total",
                "",
            );
        }
        let storm = Storm {
            replica_killed: replicas > 1,
            restart_to_ready_seconds: ready.as_secs_f64(),
            ready_to_all_synced_seconds: (all_synced.saturating_sub(ready)).as_secs_f64(),
            restart_to_all_synced_seconds: all_synced.as_secs_f64(),
            agents_told_to_back_off: shared.take_told_busy(),
            // The restarted process counts from zero.
            sessions_refused_by_server: refused,
            server_sessions: server_view.0,
            server_synced: server_view.1,
        };
        eprintln!(
            "storm of {n}: ready {:.1} s after the crash, all synced {:.1} s after ready ({:.1} s after the crash); {} agents told to back off; server sees {} sessions, {} synced",
            storm.restart_to_ready_seconds,
            storm.ready_to_all_synced_seconds,
            storm.restart_to_all_synced_seconds,
            storm.agents_told_to_back_off,
            storm.server_sessions,
            storm.server_synced
        );
        if cli.check && server_view != (n as f64, n as f64) {
            bail!(
                "after the storm the server sees {} sessions and {} synced devices of {n}",
                server_view.0,
                server_view.1
            );
        }
        figures.storm = Some(storm);
    }

    fleet.stop();
    for server in &mut servers {
        server.stop();
    }
    if let Some(mut renewal) = renewal {
        let (audited, verified) = audit(&dir, &backend).await?;
        renewal.audited = audited;
        renewal.audit_chain_verified = verified;
        eprintln!("audit: {audited} renewals recorded; chain of {verified} records verifies");
        if cli.check && (audited < n || renewal.renewed < n) {
            bail!(
                "renewal: {} renewed, {audited} audited, of {n}",
                renewal.renewed
            );
        }
        figures.renewal = Some(renewal);
    }
    Ok(figures)
}

/// Resident memory (KiB) and CPU seconds of the control-plane processes together.
fn usage_of(pids: &[u32]) -> Result<(f64, f64)> {
    let mut total = (0.0, 0.0);
    for pid in pids {
        let (rss, cpu) = usage(*pid)?;
        total.0 += rss;
        total.1 += cpu;
    }
    Ok(total)
}

/// Each replica's sessions and memory now, against its RSS before the fleet connected.
/// Applies the load fleet with `content` through the second replica (when there are several, most
/// agents are held elsewhere) and measures until every agent ACKed it.
async fn fan_out(
    servers: &[ControlPlane],
    shared: &fleet::Shared,
    n: usize,
    content: &str,
    what: &str,
    check: bool,
) -> Result<Fanout> {
    if servers.len() > 1 {
        let waited = wait_for_quiet_feeds(servers).await?;
        eprintln!(
            "change feeds of the {} replicas quiet after {:.1} s",
            servers.len(),
            waited.as_secs_f64()
        );
    }
    let acked_before = shared.ack_count();
    let sampler = FeedSampler::start(servers.iter().map(|s| s.metrics_port).collect());
    let mut client = FleetServiceClient::new(servers[1 % servers.len()].admin().await?);
    let called = Instant::now();
    client.apply_fleet(admin_template(content)).await?;
    let returned = Instant::now();
    let apply_ms = returned.duration_since(called).as_secs_f64() * 1000.0;
    wait_until(Duration::from_secs(300), "fan-out", || {
        shared.ack_count() >= acked_before + n
    })
    .await
    .with_context(|| format!("{} of {n} ACKed", shared.ack_count() - acked_before))?;
    let (latency, distinct_agents) = shared
        .acks
        .lock()
        .map(|acks| {
            let since = &acks[acked_before..];
            let latency = Latencies::of(
                since
                    .iter()
                    .map(|a| a.at.duration_since(called).as_secs_f64() * 1000.0)
                    .collect(),
            );
            let agents = since
                .iter()
                .map(|a| a.agent)
                .collect::<std::collections::BTreeSet<_>>()
                .len();
            (latency, agents)
        })
        .map_err(|_| anyhow::anyhow!("the ACK record was poisoned"))?;
    let feed = sampler.finish().await;
    eprintln!(
        "fan-out ({what}) to {distinct_agents} agents: {latency} from the call; applied in {apply_ms:.0} ms; change feed at most {:.2} s / {} changes behind",
        feed.max_lag_seconds, feed.max_ids_behind
    );
    if check && distinct_agents < n {
        bail!("fan-out ({what}) reached {distinct_agents} of {n} agents");
    }
    Ok(Fanout {
        acked: distinct_agents,
        apply_ms,
        latency,
        feed,
    })
}

async fn replica_memory(servers: &[ControlPlane], before: &[f64]) -> Result<Vec<ReplicaMemory>> {
    let mut each = Vec::with_capacity(servers.len());
    for (server, before) in servers.iter().zip(before) {
        let sessions = metric_sum(&server.metrics().await?, "flotilla_agent_sessions", "");
        let (rss, _) = usage(server.pid())?;
        each.push(ReplicaMemory {
            sessions,
            rss_mib: rss / 1024.0,
            rss_per_stream_kib: if sessions > 0.0 {
                (rss - before) / sessions
            } else {
                0.0
            },
        });
    }
    Ok(each)
}

/// Waits until no replica's change feed has moved or lagged between two reads a second apart, so
/// that a fan-out is measured from a quiet fleet and not from the tail of the change before it
/// (the other replicas may still be taking in the previous fan-out's acknowledgements). Returns
/// how long that took.
async fn wait_for_quiet_feeds(servers: &[ControlPlane]) -> Result<Duration> {
    const QUIET_WITHIN: Duration = Duration::from_secs(300);
    let started = Instant::now();
    let mut previous = Vec::new();
    while started.elapsed() < QUIET_WITHIN {
        let mut positions = Vec::with_capacity(servers.len());
        let mut lagging = false;
        for server in servers {
            let text = server.metrics().await?;
            positions.push(metric_sum(&text, "flotilla_change_feed_position", ""));
            lagging |= metric_sum(&text, "flotilla_change_feed_lag_seconds", "") > 0.0;
        }
        if !lagging && positions == previous {
            return Ok(started.elapsed());
        }
        previous = positions;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    bail!("the replicas' change feeds were still moving after {QUIET_WITHIN:?}")
}

/// Between two reads of every replica's gauges: each read renders a replica's whole `/metrics`,
/// which at 15,000 devices costs it milliseconds of CPU the fan-out being measured needs.
const FEED_SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Samples every replica's change-feed gauges until finished; the worst seen.
struct FeedSampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<FeedLag>,
}

impl FeedSampler {
    fn start(metrics_ports: Vec<u16>) -> FeedSampler {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut worst = FeedLag::default();
            loop {
                let mut positions = Vec::new();
                for port in &metrics_ports {
                    if let Ok(text) = server::http_get(*port, "/metrics").await {
                        worst.max_lag_seconds = worst.max_lag_seconds.max(metric_sum(
                            &text,
                            "flotilla_change_feed_lag_seconds",
                            "",
                        ));
                        positions.push(metric_sum(&text, "flotilla_change_feed_position", ""));
                    }
                }
                let newest = positions.iter().copied().fold(0.0, f64::max);
                let oldest = positions.iter().copied().fold(newest, f64::min);
                worst.max_ids_behind = worst.max_ids_behind.max(newest - oldest);
                tokio::select! {
                    _ = &mut stopped => return worst,
                    _ = tokio::time::sleep(FEED_SAMPLE_EVERY) => {}
                }
            }
        });
        FeedSampler { stop, task }
    }

    async fn finish(self) -> FeedLag {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}

/// The leader's periodic housekeeping (a constant cost per deployment, not per device).
const HOUSEKEEPING: &[&str] = &[
    "session_holders",
    "live_replicas",
    "clear_sessions_of",
    "prune_changes",
];

/// Store operations the fleet caused on every replica so far (housekeeping excluded).
async fn store_operations(servers: &[ControlPlane]) -> Result<f64> {
    const SERIES: &str = "flotilla_store_operation_seconds_count";
    let mut total = 0.0;
    for server in servers {
        let metrics = server.metrics().await?;
        total += metric_sum(&metrics, SERIES, "");
        for operation in HOUSEKEEPING {
            total -= metric_sum(&metrics, SERIES, &format!("operation=\"{operation}\""));
        }
    }
    Ok(total)
}

/// Counts `renewed` audit records and verifies the whole chain.
async fn audit(dir: &DataDir, backend: &Backend) -> Result<(usize, usize)> {
    let store = Store::open(backend.clone())?;
    let mut records = Vec::new();
    loop {
        let page = store
            .list_audit(AuditQuery {
                after_seq: records
                    .last()
                    .map(|r: &flotilla::audit::SealedRecord| r.entry.seq)
                    .unwrap_or(0),
                limit: 5000,
                ..Default::default()
            })
            .await?;
        if page.is_empty() {
            break;
        }
        records.extend(page);
    }
    let renewed = records.iter().filter(|r| r.entry.kind == "renewed").count();
    let key =
        flotilla::signature::spki_der_from_pem(&std::fs::read_to_string(dir.audit_public_key())?)?;
    let verified = flotilla::audit::verify_chain(&records, &key)?;
    Ok((renewed, verified))
}

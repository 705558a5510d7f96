//! `flotilla-load`: a load harness that runs a real `flotilla serve` and N simulated agents speaking
//! the real agent protocol over real mTLS (certificates minted in bulk for the run), and measures
//! the idle cost of held streams and the fan-out time of a fleet change. Stops by itself.
//!
//! `cargo run --release --bin flotilla-load -- --agents 10000 --scenario all`

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use flotilla::bootstrap::{BootstrapOptions, DataDir, prepare};
use flotilla::ca::{Subject, Usage};
use flotilla::client::{ClientCredentials, endpoint};
use flotilla::identity::{Identity, Role};
use flotilla::proto::admin::v1 as admin;
use flotilla::proto::admin::v1::fleet_service_client::FleetServiceClient;
use flotilla::proto::agent::v1 as agent;
use flotilla::proto::agent::v1::agent_service_client::AgentServiceClient;
use flotilla::store::{Backend, CertificateRecord, NewDevice, Store};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, mpsc};
use tokio_stream::wrappers::ReceiverStream;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Idle,
    Fanout,
    All,
}

#[derive(Parser)]
#[command(name = "flotilla-load", about = "Flotilla load harness")]
struct Cli {
    /// Number of simulated agents (streams).
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    #[arg(long, value_enum, default_value_t = Scenario::All)]
    scenario: Scenario,
    /// Seconds of idle measurement.
    #[arg(long, default_value_t = 60)]
    idle_seconds: u64,
    /// The control plane binary (default: beside this one).
    #[arg(long)]
    flotilla: Option<PathBuf>,
    /// Where to write the figures as JSON.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Fail (exit 1) unless every agent ACKed every push: the CI smoke test.
    #[arg(long)]
    check: bool,
}

#[derive(Serialize, Default)]
struct Figures {
    agents: usize,
    connect_seconds: f64,
    idle: Option<Idle>,
    fanout: Option<Fanout>,
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
}

#[derive(Serialize)]
struct Fanout {
    acked: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

fn raise_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a properly initialised rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Resident memory (KiB) and CPU time (seconds) of a process.
fn usage(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .context("VmRSS")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = (fields
        .get(11)
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0))
        / ticks;
    Ok((rss, cpu))
}

/// Total socket memory (KiB) of TCP sockets on `port`, from `ss -tmn`.
fn socket_memory(port: u16) -> Option<f64> {
    let out = Command::new("ss")
        .args([
            "-tmn",
            "state",
            "established",
            "sport",
            "=",
            &format!(":{port}"),
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut bytes = 0u64;
    for chunk in text.split("skmem:(").skip(1) {
        let inner = chunk.split(')').next().unwrap_or_default();
        for field in inner.split(',') {
            // Allocated receive, send, forward-allocated, queued and option memory.
            for prefix in ["r", "t", "f", "w", "o"] {
                if let Some(v) = field
                    .strip_prefix(prefix)
                    .filter(|v| v.chars().all(|c| c.is_ascii_digit()))
                {
                    bytes += v.parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    Some(bytes as f64 / 1024.0)
}

/// Sum of a counter family in an exposition.
fn metric_sum(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

async fn http_get(port: u16, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

struct Server {
    child: Child,
    agent_port: u16,
    admin_port: u16,
    metrics_port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Mints `n` devices with certificates straight into the store of `dir`.
async fn mint(dir: &DataDir, n: usize) -> Result<Vec<(String, ClientCredentials)>> {
    let prepared = prepare(
        dir,
        &BootstrapOptions {
            agent_url: "https://127.0.0.1:1".into(),
            admin_url: "https://127.0.0.1:1".into(),
            server_names: vec![],
        },
    )?;
    let store = Store::open(Backend::Sqlite(dir.sqlite_path().display().to_string()))?;
    store.migrate().await?;
    let ca_pem = prepared.ca.cert_pem().to_string();
    let mut rows = Vec::with_capacity(n);
    let mut creds = Vec::with_capacity(n);
    let now = flotilla::clock::now_millis();
    for i in 0..n {
        let id = format!("00000000-0000-4000-8000-{i:012}");
        let name = format!("load-{i:06}");
        let (issued, key) = prepared.ca.issue_with_new_key(&Subject {
            common_name: name.clone(),
            identity: Some(Identity::new(Role::Device, &id)),
            dns_names: vec![],
            ip_addresses: vec![],
            usage: Usage::Client,
            validity: Duration::from_secs(365 * 24 * 3600),
        })?;
        let certificate = CertificateRecord {
            serial: issued.info.serial.clone(),
            device_id: id.clone(),
            key_fingerprint: issued.info.key_fingerprint.clone(),
            fingerprint: issued.info.fingerprint.clone(),
            certificate_pem: issued.pem.clone(),
            not_before_ms: issued.info.not_before * 1000,
            not_after_ms: issued.info.not_after * 1000,
            issued_ms: now,
            revoked_ms: None,
            revocation_reason: None,
        };
        rows.push((
            NewDevice {
                id: id.clone(),
                name,
                labels: BTreeMap::from([("role".to_string(), "load".to_string())]),
                spec: Default::default(),
                cert_serial: certificate.serial.clone(),
                cert_not_after_ms: certificate.not_after_ms,
                created_ms: now,
                fleet: None,
            },
            certificate,
        ));
        creds.push((
            id,
            ClientCredentials {
                ca_pem: ca_pem.clone(),
                cert_pem: issued.pem,
                key_pem: key,
                server_name: "localhost".into(),
            },
        ));
    }
    store
        .insert_devices(rows, Arc::new(prepared.audit_key), "load/harness".into())
        .await?;
    Ok(creds)
}

fn start_server(flotilla: &Path, dir: &DataDir) -> Result<Server> {
    let (agent_port, admin_port, metrics_port) = (free_port()?, free_port()?, free_port()?);
    let child = Command::new(flotilla)
        .args(["serve", "--data-dir"])
        .arg(dir.root())
        .args(["--agent-listen", &format!("127.0.0.1:{agent_port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
        .env("FLOTILLA_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", flotilla.display()))?;
    Ok(Server {
        child,
        agent_port,
        admin_port,
        metrics_port,
    })
}

/// Every push an agent ACKed: (device index, version, when).
type Acks = Arc<Mutex<Vec<(usize, String, Instant)>>>;

async fn run_agent(
    index: usize,
    port: u16,
    device_id: String,
    creds: ClientCredentials,
    acks: Acks,
    connected: Arc<AtomicUsize>,
) -> Result<()> {
    // Spread source addresses over 127.0.0.0/8 so tens of thousands of connections find ports.
    let source = IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        (index / 250 % 250) as u8 + 1,
        (index % 250) as u8 + 1,
    ));
    let channel = endpoint(&format!("https://127.0.0.1:{port}"), &creds)?
        .local_address(Some(source))
        .connect()
        .await?;
    let (tx, rx) = mpsc::channel(4);
    tx.send(agent::AgentMessage {
        kind: Some(agent::agent_message::Kind::Hello(agent::Hello {
            device_id: device_id.clone(),
            ..Default::default()
        })),
    })
    .await?;
    let mut inbound = AgentServiceClient::new(channel)
        .session(ReceiverStream::new(rx))
        .await?
        .into_inner();
    connected.fetch_add(1, Ordering::Relaxed);
    let mut beat = tokio::time::interval(Duration::from_secs(30));
    beat.reset();
    loop {
        tokio::select! {
            _ = beat.tick() => {
                let heartbeat = agent::AgentMessage { kind: Some(agent::agent_message::Kind::Heartbeat(agent::Heartbeat { sent_at: None })) };
                if tx.send(heartbeat).await.is_err() { return Ok(()); }
            }
            message = inbound.message() => {
                let Some(message) = message? else { return Ok(()) };
                if let Some(agent::server_message::Kind::Spec(push)) = message.kind {
                    let ack = agent::AgentMessage { kind: Some(agent::agent_message::Kind::Ack(agent::Ack { nonce: push.nonce, version: push.version.clone() })) };
                    if tx.send(ack).await.is_err() { return Ok(()); }
                    acks.lock().await.push((index, push.version, Instant::now()));
                }
            }
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    raise_file_limit();
    let work = std::env::temp_dir().join(format!("flotilla-load-{}", std::process::id()));
    let dir = DataDir::new(work.join("data"));
    let flotilla = match cli.flotilla.clone() {
        Some(path) => path,
        None => std::env::current_exe()?.with_file_name("flotilla"),
    };
    eprintln!("minting {} devices…", cli.agents);
    let devices = mint(&dir, cli.agents).await?;
    let server = start_server(&flotilla, &dir)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_get(server.metrics_port, "/readyz")
        .await
        .map(|b| b.starts_with("ready"))
        .ok()
        != Some(true)
    {
        if Instant::now() > deadline {
            bail!("the control plane did not become ready");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = server.child.id();
    let (rss_before, _) = usage(pid)?;
    let mut figures = Figures {
        agents: cli.agents,
        ..Default::default()
    };

    let acks: Acks = Arc::default();
    let connected = Arc::new(AtomicUsize::new(0));
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    for (index, (id, creds)) in devices.into_iter().enumerate() {
        let (acks, connected, stopping) = (acks.clone(), connected.clone(), stopping.clone());
        let port = server.agent_port;
        tokio::spawn(async move {
            if let Err(error) = run_agent(index, port, id, creds, acks, connected).await {
                if !stopping.load(Ordering::Relaxed) {
                    eprintln!("agent {index}: {error:#}");
                }
            }
        });
        if index % 200 == 199 {
            tokio::task::yield_now().await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while acks.lock().await.len() < cli.agents {
        if Instant::now() > deadline {
            bail!(
                "only {} of {} agents connected and ACKed their first spec",
                acks.lock().await.len(),
                cli.agents
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    figures.connect_seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "{} agents connected and synced in {:.1} s",
        connected.load(Ordering::Relaxed),
        figures.connect_seconds
    );

    if matches!(cli.scenario, Scenario::Idle | Scenario::All) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let metrics = http_get(server.metrics_port, "/metrics").await?;
        let ops_before = metric_sum(&metrics, "flotilla_store_operation_seconds_count");
        let (rss_after, cpu_before) = usage(pid)?;
        tokio::time::sleep(Duration::from_secs(cli.idle_seconds)).await;
        let (_, cpu_after) = usage(pid)?;
        let metrics = http_get(server.metrics_port, "/metrics").await?;
        let ops_after = metric_sum(&metrics, "flotilla_store_operation_seconds_count");
        let idle = Idle {
            rss_before_mib: rss_before / 1024.0,
            rss_after_mib: rss_after / 1024.0,
            rss_per_stream_kib: (rss_after - rss_before) / cli.agents as f64,
            socket_memory_kib: socket_memory(server.agent_port),
            cpu_seconds: cpu_after - cpu_before,
            idle_seconds: cli.idle_seconds,
            store_operations: ops_after - ops_before,
        };
        eprintln!(
            "idle: RSS {:.1} → {:.1} MiB ({:.1} KiB per stream), CPU {:.2} s over {} s, {} store operations",
            idle.rss_before_mib,
            idle.rss_after_mib,
            idle.rss_per_stream_kib,
            idle.cpu_seconds,
            idle.idle_seconds,
            idle.store_operations
        );
        if cli.check && idle.store_operations > 0.0 {
            bail!(
                "the idle fleet made {} store operations",
                idle.store_operations
            );
        }
        figures.idle = Some(idle);
    }

    if matches!(cli.scenario, Scenario::Fanout | Scenario::All) {
        let admin_creds = ClientCredentials {
            ca_pem: std::fs::read_to_string(dir.ca_cert())?,
            cert_pem: std::fs::read_to_string(dir.admin_cert())?,
            key_pem: std::fs::read_to_string(dir.admin_key())?,
            server_name: "localhost".into(),
        };
        let channel = flotilla::client::connect(
            &format!("https://127.0.0.1:{}", server.admin_port),
            &admin_creds,
        )
        .await?;
        let acked_before = acks.lock().await.len();
        let request = admin::ApplyFleetRequest {
            name: "load".into(),
            selector: "role=load".into(),
            template: Some(agent::DeviceSpec {
                files: vec![agent::FileSpec {
                    path: "/etc/load.conf".into(),
                    content: "fan-out".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        FleetServiceClient::new(channel)
            .apply_fleet(request)
            .await?;
        let returned = Instant::now();
        let deadline = returned + Duration::from_secs(300);
        while acks.lock().await.len() < acked_before + cli.agents {
            if Instant::now() > deadline {
                bail!(
                    "fan-out: only {} of {} agents ACKed",
                    acks.lock().await.len() - acked_before,
                    cli.agents
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut latencies: Vec<f64> = acks.lock().await[acked_before..]
            .iter()
            .map(|(_, _, at)| at.duration_since(returned).as_secs_f64() * 1000.0)
            .collect();
        latencies.sort_by(f64::total_cmp);
        let fanout = Fanout {
            acked: latencies.len(),
            p50_ms: percentile(&latencies, 50.0),
            p99_ms: percentile(&latencies, 99.0),
            max_ms: latencies.last().copied().unwrap_or(0.0),
        };
        eprintln!(
            "fan-out to {} agents: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            fanout.acked, fanout.p50_ms, fanout.p99_ms, fanout.max_ms
        );
        figures.fanout = Some(fanout);
    }

    let json = serde_json::to_string_pretty(&figures)?;
    println!("{json}");
    if let Some(out) = &cli.out {
        std::fs::write(out, &json)?;
    }
    stopping.store(true, Ordering::Relaxed);
    drop(server);
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

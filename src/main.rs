//! The `flotilla` control-plane binary: `serve` runs it, `migrate` applies database migrations.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use flotilla::bootstrap::{BootstrapOptions, DataDir, prepare};
use flotilla::control::{
    AdmissionSettings, ControlPlane, Policy, RateLimit, ReleasePolicy, SessionSettings, TpmPolicy,
};
use flotilla::hub::{Debounce, Hub};
use flotilla::store::{Backend, StartLock, Store};
use flotilla::transport::{ConnectionLimits, Endpoints, TlsMaterial, serve};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// jemalloc rather than glibc's malloc: the replicas spend about an eighth less CPU on a fan-out,
/// for about the same memory per held stream (BENCHMARKS.md, "2026-12-07, night").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "flotilla",
    version,
    about = "Flotilla control plane for fleets of Linux edge devices"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "FLOTILLA_LOG_FORMAT")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args)]
struct StoreArgs {
    /// Directory for the CA, credentials and the embedded SQLite database.
    #[arg(long, env = "FLOTILLA_DATA_DIR", default_value = "flotilla-data")]
    data_dir: PathBuf,
    /// `postgres://…` to use PostgreSQL instead of SQLite in the data directory.
    #[arg(long, env = "FLOTILLA_DATABASE_URL")]
    database_url: Option<String>,
    /// This replica's name in logs, metrics and session records (a random suffix keeps each
    /// process distinct). Default: the host name.
    #[arg(long, env = "FLOTILLA_REPLICA_NAME")]
    replica_name: Option<String>,
    /// Pooled PostgreSQL connections of this replica (each replica also holds two dedicated
    /// ones: change feed and leadership); keep replicas × (pool + 2) under `max_connections`.
    #[arg(long, env = "FLOTILLA_DATABASE_POOL_SIZE", default_value_t = flotilla::store::DEFAULT_POSTGRES_POOL)]
    database_pool_size: u32,
}

/// The replica's name: given, or the host name, reduced to characters safe in any label.
fn replica_name(args: &StoreArgs) -> String {
    let raw = args
        .replica_name
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .unwrap_or_default();
    let name: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        .take(48)
        .collect();
    if name.is_empty() {
        "flotilla".into()
    } else {
        name
    }
}

#[derive(clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Address of the device-facing endpoint.
    #[arg(long, default_value = "0.0.0.0:7443")]
    agent_listen: SocketAddr,
    /// Address of the admin endpoint.
    #[arg(long, default_value = "127.0.0.1:7444")]
    admin_listen: SocketAddr,
    /// Address of the plain-HTTP operations endpoint (`/metrics`, `/healthz`, `/readyz`).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Extra DNS names or IP addresses for the server certificate (repeatable).
    #[arg(long = "server-name")]
    server_names: Vec<String>,
    /// Agent endpoint URL written into the generated agent.toml (default: from --agent-listen);
    /// given on a later start, it replaces the one in agent.toml.
    #[arg(long)]
    agent_url: Option<String>,
    /// Lifetime of the server certificate; it is renewed while serving once a third of it is
    /// left (`flotilla_server_certificate_expiry_seconds` says when it expires).
    #[arg(long, default_value = "365d", value_parser = flotilla::clock::parse_duration)]
    server_cert_validity: Duration,
    /// Seconds between agent heartbeats.
    #[arg(long, default_value_t = 30)]
    heartbeat_interval: u64,
    /// Seconds of silence after which a device is OFFLINE and its stream closed
    /// (default: three heartbeat intervals plus 10 seconds).
    #[arg(long)]
    offline_after: Option<u64>,
    /// Milliseconds without further changes before a burst of spec changes is pushed as one wave.
    #[arg(long, default_value_t = 150)]
    push_debounce_ms: u64,
    /// Longest a change waits for its wave, however long the burst lasts, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    push_max_delay_ms: u64,
    /// Lifetime of device management certificates (`90s`, `15m`, `12h`, `365d`).
    #[arg(long, default_value = "365d", value_parser = flotilla::clock::parse_duration)]
    device_cert_validity: Duration,
    /// Renew device certificates this long before they expire (each a little earlier, by a
    /// per-certificate jitter of up to a fifth of this).
    #[arg(long, default_value = "30d", value_parser = flotilla::clock::parse_duration)]
    renew_before: Duration,
    /// How long after expiry a device may still recover with its previous key.
    #[arg(long, default_value = "90d", value_parser = flotilla::clock::parse_duration)]
    recovery_window: Duration,
    /// Sessions that may be opening at once; agents beyond it are told to retry later
    /// (RESOURCE_EXHAUSTED with a retry delay).
    #[arg(long, default_value_t = 256)]
    max_opening_sessions: usize,
    /// Certificate renewals this control plane lets run at once (asked, and not yet back on a
    /// session with the new certificate); devices beyond it are asked as others finish, so a
    /// fleet asked to renew together does not spend the cores on handshakes that time out.
    #[arg(long, default_value_t = flotilla::hub::DEFAULT_RENEWAL_SLOTS)]
    max_renewals_in_flight: usize,
    /// Sessions this control plane holds at most (0: no limit).
    #[arg(long, default_value_t = 0)]
    max_sessions: usize,
    /// A session older than this (less up to a tenth, at random) is asked to reconnect, so
    /// connections rebalance across replicas and pick up renewed certificates (0: never).
    #[arg(long, default_value = "24h", value_parser = flotilla::clock::parse_duration)]
    session_max_age: Duration,
    /// Certificates one device may be issued (renewals, recoveries) per issuance window; more
    /// are refused with a retry delay (audited once per window).
    #[arg(long, default_value_t = 5)]
    max_issuances_per_device: u32,
    /// The window of --max-issuances-per-device and of the recovery attempt limit.
    #[arg(long, default_value = "10m", value_parser = flotilla::clock::parse_duration)]
    issuance_window: Duration,
    /// Enrollment requests that may wait for a decision at once; new requests beyond it are
    /// refused (RESOURCE_EXHAUSTED) until an operator decides some.
    #[arg(long, default_value_t = 1000)]
    max_pending_enrollments: usize,
    /// How often the leader signs the audit trail's head with a timestamp and keeps it (and logs
    /// it), when records were added since: a head kept elsewhere reveals deleted records.
    #[arg(long, default_value = "1m", value_parser = flotilla::clock::parse_duration)]
    audit_head_interval: Duration,
    /// Connections per gRPC endpoint that may be open without having authenticated a request
    /// (in the TLS handshake, or not yet past the first request); while this many are pending,
    /// new connections wait in the listen backlog.
    #[arg(long, default_value_t = 256)]
    max_pending_connections: usize,
    /// Open connections per source address and gRPC endpoint (0: no limit). Devices behind one
    /// NAT address share it.
    #[arg(long, default_value_t = 1024)]
    max_connections_per_address: usize,
    /// A connection that has not authenticated a request this long after it was accepted is
    /// closed.
    #[arg(long, default_value = "10s", value_parser = flotilla::clock::parse_duration)]
    first_request_timeout: Duration,
    /// TPM manufacturer CA certificates (PEM bundle) that endorsement key certificates must chain
    /// to; repeatable. Without one, agents that offer TPM evidence are refused.
    #[arg(long = "tpm-ca", value_name = "PEM")]
    tpm_cas: Vec<PathBuf>,
    /// Approve an enrollment at once when its TPM attestation verifies and no other request or
    /// device has the same TPM.
    #[arg(long)]
    auto_approve_tpm: bool,
    /// Where this replica keeps the agent release artifacts it serves to devices (filled from the
    /// database on first use). Default: `artifacts/` in the data directory.
    #[arg(long)]
    artifact_dir: Option<PathBuf>,
    /// Agent release downloads this replica serves at once; devices beyond it are told to retry
    /// later (RESOURCE_EXHAUSTED with a retry delay) and resume where they stopped.
    #[arg(long, default_value_t = 32)]
    max_downloads: usize,
    /// Bytes a second this replica sends to devices downloading releases, all downloads together
    /// (`128MiB`, `500KiB`, `0` for no limit).
    #[arg(long, default_value = "128MiB", value_parser = parse_bytes)]
    download_rate: u64,
    /// Ed25519 release public key (PEM) that agent releases must be signed with to be published
    /// (repeatable). Devices check releases against the keys they pin whatever this says; this
    /// catches a wrongly signed release at publication.
    #[arg(long = "release-key", value_name = "PEM")]
    release_keys: Vec<PathBuf>,
}

/// A byte count with an optional binary unit: `1048576`, `512KiB`, `128MiB`, `1GiB`.
fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a byte count like 128MiB"))?;
    let factor = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => return Err(format!("unknown unit {other:?}: use B, KiB, MiB or GiB")),
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Reads release public keys.
fn read_release_keys(paths: &[PathBuf]) -> Result<Vec<flotilla::release::ReleaseKey>> {
    paths
        .iter()
        .map(|path| {
            let pem = std::fs::read_to_string(path)
                .with_context(|| format!("reading release key {}", path.display()))?;
            flotilla::release::ReleaseKey::from_pem(&pem)
                .with_context(|| format!("release key {}", path.display()))
        })
        .collect()
}

/// Reads the TPM manufacturer CAs (DER) from PEM bundles.
fn read_tpm_cas(paths: &[PathBuf]) -> Result<Vec<Vec<u8>>> {
    let mut cas = Vec::new();
    for path in paths {
        let pem = std::fs::read_to_string(path)
            .with_context(|| format!("reading TPM CA bundle {}", path.display()))?;
        let certs = flotilla::pki::certs_from_pem(&pem)
            .with_context(|| format!("TPM CA bundle {}", path.display()))?;
        cas.extend(certs.into_iter().map(|c| c.to_vec()));
    }
    Ok(cas)
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane (creates CA and credentials on first start).
    Serve(Box<ServeArgs>),
    /// Create the identity replicas share (CA, server certificate, audit key, admin and
    /// enrollment credentials, flotctl.toml, agent.toml) in a data directory, without serving.
    Init {
        /// Directory to create the identity in (existing files are kept).
        #[arg(long, env = "FLOTILLA_DATA_DIR", default_value = "flotilla-data")]
        data_dir: PathBuf,
        /// DNS names or IP addresses the server certificate carries besides localhost (the load
        /// balancer's name; repeatable).
        #[arg(long = "server-name")]
        server_names: Vec<String>,
        /// Agent endpoint URL written into agent.toml (default https://127.0.0.1:7443; given
        /// again later, it replaces the one there).
        #[arg(long)]
        agent_url: Option<String>,
        /// Admin endpoint URL written into flotctl.toml.
        #[arg(long, default_value = "https://127.0.0.1:7444")]
        admin_url: String,
    },
    /// Print an agent.toml to install on devices elsewhere: the agent endpoint URL, the CA and an
    /// enrollment credential inline, so one file is all a device needs.
    EnrollmentBundle {
        #[arg(long, env = "FLOTILLA_DATA_DIR", default_value = "flotilla-data")]
        data_dir: PathBuf,
        /// The agent endpoint as devices reach it, e.g. `https://cp.example.com:7443`
        /// (repeatable: one per replica; devices move to the next when one fails).
        #[arg(long = "server-url", required = true)]
        server_urls: Vec<String>,
        /// The name the server certificate is checked against: one of its names (see
        /// `--server-name` of `serve`). `localhost` works at any address, since devices pin the CA.
        #[arg(long, default_value = "localhost")]
        server_name: String,
        /// The enrollment certificate to bundle (default: the data directory's; or one made with
        /// `flotctl credential create NAME --role enrollment`).
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
        /// A label devices ask for at enrollment, `key=value` (repeatable).
        #[arg(long = "label", value_parser = flotilla::names::parse_label)]
        labels: Vec<(String, String)>,
        /// Write the bundle here (0600) instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Apply pending database migrations and exit.
    Migrate {
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// The agent.toml of `flotilla enrollment-bundle`.
fn enrollment_bundle(
    data_dir: &std::path::Path,
    server_urls: Vec<String>,
    server_name: String,
    credential: Option<(PathBuf, PathBuf)>,
    labels: Vec<(String, String)>,
) -> Result<String> {
    use flotilla::profiles::AgentConfig;
    let dir = DataDir::new(data_dir);
    let (cert, key) = credential.unwrap_or_else(|| (dir.enrollment_cert(), dir.enrollment_key()));
    let read = |path: &std::path::Path| {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    };
    let cert_pem = read(&cert)?;
    let identity = flotilla::pki::identity_pem(&cert_pem)
        .with_context(|| format!("{} is not a certificate", cert.display()))?;
    if identity.role != flotilla::identity::Role::Enrollment {
        anyhow::bail!(
            "{} is a {identity} certificate, not an enrollment credential",
            cert.display()
        );
    }
    for url in &server_urls {
        if !url.starts_with("https://") {
            anyhow::bail!("--server-url {url:?} must be an https:// URL of the agent endpoint");
        }
    }
    let mut urls = server_urls.into_iter();
    let server = urls.next().unwrap_or_default();
    let config = AgentConfig {
        servers: urls.collect(),
        server_name,
        ca_pem: Some(read(&dir.ca_cert())?),
        enrollment_cert_pem: Some(cert_pem),
        enrollment_key_pem: Some(read(&key)?),
        labels: labels.into_iter().collect(),
        ..AgentConfig::new(server)
    };
    Ok(format!(
        "# flotilla-agent configuration with its enrollment credential ({identity}): keep it private\n\
         # (0600). Install as /etc/flotilla/agent.toml; every key is described in the README.\n{}",
        toml::to_string_pretty(&config)?
    ))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLOTILLA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn backend(store: &StoreArgs) -> Backend {
    match &store.database_url {
        Some(url) => Backend::from_url(url),
        None => Backend::Sqlite(
            DataDir::new(&store.data_dir)
                .sqlite_path()
                .display()
                .to_string(),
        ),
    }
}

/// Opens the store, waits until no other replica is starting on the same database, and applies
/// pending migrations. The returned lock is held until the caller has checked the shared identity.
async fn open_store(args: &StoreArgs) -> Result<(Store, StartLock, usize)> {
    flotilla::bootstrap::private_dir(&args.data_dir)
        .with_context(|| format!("creating data directory {}", args.data_dir.display()))?;
    let backend = backend(args);
    let location = backend.redacted();
    let name = replica_name(args);
    let pool = args.database_pool_size;
    let store = tokio::task::spawn_blocking(move || Store::open_pooled(backend, &name, pool))
        .await?
        .with_context(|| format!("opening the database at {location}"))?;
    let start_lock = store
        .start_lock()
        .await
        .context("waiting for other replicas to finish starting")?;
    let applied = store.migrate().await.context("applying migrations")?;
    tracing::info!(
        backend = store.backend().name(),
        location,
        applied,
        replica = store.replica(),
        "database ready"
    );
    Ok((store, start_lock, applied))
}

/// The deployment-identity key under which the CA's public-key fingerprint is recorded.
const CA_FINGERPRINT_KEY: &str = "ca_public_key_sha256";

/// Records the CA on first start, or checks that this replica serves with the recorded one: two
/// CAs on one database would split the fleet into devices each replica cannot verify.
async fn check_shared_ca(store: &Store, ca_pem: &str, data_dir: &std::path::Path) -> Result<()> {
    let ours = flotilla::pki::cert_info_pem(ca_pem)
        .context("reading the CA certificate")?
        .key_fingerprint;
    let recorded = store
        .claim_identity(CA_FINGERPRINT_KEY, &ours, flotilla::clock::now_millis())
        .await
        .context("recording the CA in the database")?;
    if recorded != ours {
        anyhow::bail!(
            "this database was created with another CA (public key SHA-256 {recorded}); the CA in \
             {} has {ours}. Every replica must serve with the same CA: start this one from a copy \
             of the first replica's data directory (or the same mounted secret)",
            data_dir.display()
        );
    }
    Ok(())
}

fn url_for(addr: SocketAddr) -> String {
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        match addr.ip() {
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        }
    };
    format!("https://{host}:{}", addr.port())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Init {
            data_dir,
            server_names,
            agent_url,
            admin_url,
        } => {
            let dir = DataDir::new(&data_dir);
            let options = BootstrapOptions {
                agent_url_given: agent_url.is_some(),
                server_cert_validity: flotilla::bootstrap::SERVER_VALIDITY,
                agent_url: agent_url.unwrap_or_else(|| "https://127.0.0.1:7443".into()),
                admin_url,
                server_names,
            };
            let prepared = prepare(&dir, &options).context("creating the identity")?;
            if prepared.created.is_empty() {
                println!(
                    "{} already holds an identity; nothing created",
                    data_dir.display()
                );
            } else {
                println!("Created in {}", data_dir.display());
                for line in &prepared.created {
                    println!("  {line}");
                }
            }
            Ok(())
        }
        Command::EnrollmentBundle {
            data_dir,
            server_urls,
            server_name,
            cert,
            key,
            labels,
            out,
        } => {
            let bundle =
                enrollment_bundle(&data_dir, server_urls, server_name, cert.zip(key), labels)?;
            match out {
                Some(path) => {
                    flotilla::bootstrap::write_file(&path, bundle.as_bytes(), 0o600)?;
                    println!("enrollment bundle: {}", path.display());
                }
                None => print!("{bundle}"),
            }
            Ok(())
        }
        Command::Migrate { store } => {
            let (_, _start_lock, applied) = open_store(&store).await?;
            println!("{applied} migration(s) applied");
            Ok(())
        }
        Command::Serve(args) => {
            let ServeArgs {
                store,
                agent_listen,
                admin_listen,
                metrics_listen,
                server_names,
                agent_url,
                heartbeat_interval,
                offline_after,
                push_debounce_ms,
                push_max_delay_ms,
                device_cert_validity,
                renew_before,
                recovery_window,
                max_opening_sessions,
                max_renewals_in_flight,
                max_sessions,
                session_max_age,
                tpm_cas,
                auto_approve_tpm,
                max_pending_connections,
                max_connections_per_address,
                first_request_timeout,
                max_issuances_per_device,
                issuance_window,
                max_pending_enrollments,
                audit_head_interval,
                server_cert_validity,
                artifact_dir,
                max_downloads,
                download_rate,
                release_keys,
            } = *args;
            let releases = ReleasePolicy {
                artifact_dir: artifact_dir.unwrap_or_else(|| store.data_dir.join("artifacts")),
                max_downloads: max_downloads.max(1),
                max_rate: download_rate,
                keys: read_release_keys(&release_keys)?,
                ..ReleasePolicy::default()
            };
            let tpm = TpmPolicy {
                trusted_cas: read_tpm_cas(&tpm_cas)?,
                auto_approve: auto_approve_tpm,
            };
            if auto_approve_tpm && tpm.trusted_cas.is_empty() {
                anyhow::bail!("--auto-approve-tpm needs at least one --tpm-ca");
            }
            let agent = flotilla::transport::listen::bind(agent_listen)
                .with_context(|| format!("binding the agent endpoint {agent_listen}"))?;
            let admin = flotilla::transport::listen::bind(admin_listen)
                .with_context(|| format!("binding the admin endpoint {admin_listen}"))?;
            let metrics = match metrics_listen {
                Some(addr) => Some(
                    TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("binding the operations endpoint {addr}"))?,
                ),
                None => None,
            };
            let agent_addr = agent.local_addr()?;
            let admin_addr = admin.local_addr()?;
            // Reported at once, before the database is touched: with port 0 the kernel chose them.
            println!("agent endpoint: {}", url_for(agent_addr));
            println!("admin endpoint: {}", url_for(admin_addr));
            if let Some(listener) = &metrics {
                println!(
                    "operations endpoint: http://{}/metrics",
                    listener.local_addr()?
                );
            }
            let (db, start_lock, _) = open_store(&store).await?;
            let dir = DataDir::new(&store.data_dir);
            // `options` moves into the blocking task; this is read after it.
            let agent_url_local = agent_url.is_none();
            let options = BootstrapOptions {
                agent_url_given: !agent_url_local,
                server_cert_validity,
                agent_url: agent_url.unwrap_or_else(|| url_for(agent_addr)),
                admin_url: url_for(admin_addr),
                server_names,
            };
            let prepared = tokio::task::spawn_blocking(move || prepare(&dir, &options))
                .await?
                .context("preparing the data directory")?;
            if !prepared.created.is_empty() {
                println!("First start: created in {}", store.data_dir.display());
                for line in &prepared.created {
                    println!("  {line}");
                }
                println!(
                    "Use `flotctl --config {}` to administer, and give agents agent.toml.",
                    DataDir::new(&store.data_dir).ctl_config().display()
                );
                if agent_url_local {
                    println!(
                        "agent.toml points at this host's loopback address; for devices elsewhere: \
                         flotilla enrollment-bundle --data-dir {} --server-url https://HOST:{} > agent.toml",
                        store.data_dir.display(),
                        agent_addr.port()
                    );
                }
            }
            check_shared_ca(&db, prepared.ca.cert_pem(), &store.data_dir).await?;
            drop(start_lock);
            let heartbeat = Duration::from_secs(heartbeat_interval.max(1));
            let policy = Policy {
                device_cert_validity,
                renew_before,
                recovery_window,
                session: SessionSettings {
                    heartbeat_interval: heartbeat,
                    silence_timeout: offline_after
                        .map(|s| Duration::from_secs(s.max(1)))
                        .unwrap_or(heartbeat * 3 + Duration::from_secs(10)),
                    max_age: Some(session_max_age).filter(|age| !age.is_zero()),
                },
                admission: AdmissionSettings {
                    max_opening: max_opening_sessions.max(1),
                    max_sessions,
                    ..AdmissionSettings::default()
                },
                debounce: Debounce {
                    quiet: Duration::from_millis(push_debounce_ms),
                    max_delay: Duration::from_millis(push_max_delay_ms.max(push_debounce_ms)),
                },
                tpm,
                issuance_limit: RateLimit {
                    max: max_issuances_per_device.max(1),
                    window: issuance_window,
                },
                recovery_limit: RateLimit {
                    max: Policy::default().recovery_limit.max,
                    window: issuance_window,
                },
                renewal_slots: max_renewals_in_flight.max(1),
                max_pending_enrollments: max_pending_enrollments.max(1),
                audit_head_interval: audit_head_interval.max(Duration::from_secs(1)),
                releases,
                ..Policy::default()
            };
            let material = TlsMaterial {
                ca_pem: prepared.ca.cert_pem().to_string(),
                cert_pem: prepared.server_cert_pem.clone(),
                key_pem: prepared.server_key_pem.clone(),
                server_cert_validity,
            };
            let control = ControlPlane::new(
                db,
                Arc::new(prepared.ca),
                Arc::new(prepared.audit_key),
                Arc::new(Hub::new()),
                policy,
            );
            if let Some(pem) = &prepared.admin_cert_pem {
                control
                    .register_bootstrap_admin(pem)
                    .await
                    .context("registering the bootstrap admin credential")?;
            }
            if let Some(pem) = &prepared.enrollment_cert_pem {
                control
                    .register_bootstrap_enrollment(pem)
                    .await
                    .context("registering the bootstrap enrollment credential")?;
            }
            serve(
                control,
                Endpoints {
                    agent,
                    admin,
                    metrics,
                    limits: ConnectionLimits {
                        first_request_timeout,
                        max_pending: max_pending_connections.max(1),
                        max_per_address: max_connections_per_address,
                    },
                },
                material,
                shutdown_signal(),
            )
            .await?;
            tracing::info!("stopped");
            Ok(())
        }
    }
}

//! The control plane under test: real `flotilla serve` processes — one on SQLite, or several
//! replicas on one PostgreSQL database — with devices and certificates minted straight into the
//! store for the run.

use anyhow::{Context, Result, bail};
use flotilla::bootstrap::{BootstrapOptions, DataDir, Prepared, prepare};
use flotilla::ca::{Subject, Usage};
use flotilla::client::ClientCredentials;
use flotilla::identity::{Identity, Role};
use flotilla::store::{Backend, CertificateRecord, NewDevice, Store};
use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// One simulated device: its id and mTLS credentials.
pub(crate) struct Device {
    pub id: String,
    pub name: String,
    pub creds: ClientCredentials,
}

/// The label every minted device carries (fleets and renewals select on it).
pub(crate) const LOAD_SELECTOR: &str = "role=load";

/// The run's data directory with its CA (created on first use; the URLs written into the
/// generated profiles are not used).
fn prepare_dir(dir: &DataDir) -> Result<Prepared> {
    Ok(prepare(
        dir,
        &BootstrapOptions {
            agent_url: "https://127.0.0.1:1".into(),
            admin_url: "https://127.0.0.1:1".into(),
            server_names: vec![],
            agent_url_given: false,
            server_cert_validity: flotilla::bootstrap::SERVER_VALIDITY,
        },
    )?)
}

/// Mints `n` devices with certificates straight into the store of `dir` (audited like any
/// issuance), plus a server certificate for a broker to use.
pub(crate) async fn mint(dir: &DataDir, backend: &Backend, n: usize) -> Result<Vec<Device>> {
    let prepared = prepare_dir(dir)?;
    let store = Store::open(backend.clone())?;
    store.migrate().await?;
    let ca_pem = prepared.ca.cert_pem().to_string();
    let mut rows = Vec::with_capacity(n);
    let mut devices = Vec::with_capacity(n);
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
                name: name.clone(),
                labels: BTreeMap::from([("role".to_string(), "load".to_string())]),
                spec: Default::default(),
                cert_serial: certificate.serial.clone(),
                cert_not_after_ms: certificate.not_after_ms,
                created_ms: now,
                fleet: None,
                tpm_ek_fingerprint: None,
            },
            certificate,
        ));
        devices.push(Device {
            id,
            name,
            creds: ClientCredentials {
                ca_pem: ca_pem.clone(),
                cert_pem: issued.pem,
                key_pem: key,
                server_name: "localhost".into(),
            },
        });
    }
    store
        .insert_devices(rows, Arc::new(prepared.audit_key), "load/harness".into())
        .await?;
    Ok(devices)
}

/// A server certificate (and key) for `localhost`, signed by the run's CA.
pub(crate) fn broker_certificate(dir: &DataDir) -> Result<(String, String)> {
    let prepared = prepare_dir(dir)?;
    let (issued, key) = prepared.ca.issue_with_new_key(&Subject {
        common_name: "localhost".into(),
        identity: None,
        dns_names: vec!["localhost".into()],
        ip_addresses: vec!["127.0.0.1".parse()?],
        usage: Usage::Server,
        validity: Duration::from_secs(24 * 3600),
    })?;
    Ok((issued.pem, key))
}

pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A running `flotilla serve`.
pub(crate) struct ControlPlane {
    binary: PathBuf,
    dir: DataDir,
    extra_args: Vec<String>,
    /// The replica's runtime threads (`TOKIO_WORKER_THREADS`), when not the runtime's default.
    threads: Option<NonZeroUsize>,
    /// PostgreSQL (replicas) instead of the data directory's SQLite.
    database_url: Option<String>,
    name: String,
    child: Option<Child>,
    pub agent_port: u16,
    pub admin_port: u16,
    pub metrics_port: u16,
}

impl ControlPlane {
    /// Starts a control plane (replica `name`) on fresh ports and waits until it is ready.
    pub(crate) async fn start(
        binary: &Path,
        dir: &DataDir,
        database_url: Option<&str>,
        name: &str,
        extra_args: Vec<String>,
        threads: Option<NonZeroUsize>,
    ) -> Result<Self> {
        let mut server = ControlPlane {
            binary: binary.to_path_buf(),
            dir: DataDir::new(dir.root()),
            extra_args,
            threads,
            database_url: database_url.map(str::to_string),
            name: name.to_string(),
            child: None,
            agent_port: free_port()?,
            admin_port: free_port()?,
            metrics_port: free_port()?,
        };
        server.spawn()?;
        server.wait_ready(Duration::from_secs(120)).await?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<()> {
        let mut command = Command::new(&self.binary);
        command
            .args(["serve", "--data-dir"])
            .arg(self.dir.root())
            .args(["--replica-name", &self.name]);
        if let Some(url) = &self.database_url {
            command.args(["--database-url", url]);
        }
        if let Some(threads) = self.threads {
            command.env("TOKIO_WORKER_THREADS", threads.to_string());
        }
        let child = command
            .args(["--agent-listen", &format!("127.0.0.1:{}", self.agent_port)])
            .args(["--admin-listen", &format!("127.0.0.1:{}", self.admin_port)])
            .args([
                "--metrics-listen",
                &format!("127.0.0.1:{}", self.metrics_port),
            ])
            // Every simulated device connects from 127.0.0.1, so the per-address cap (meant for
            // one host holding many connections) would refuse the fleet itself.
            .args(["--max-connections-per-address", "0"])
            .args(&self.extra_args)
            .env("FLOTILLA_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.child = Some(child);
        Ok(())
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    pub(crate) async fn wait_ready(&self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if http_get(self.metrics_port, "/readyz")
                .await
                .is_ok_and(|body| body.starts_with("ready"))
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the control plane did not become ready within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the process without warning (SIGKILL), as a crash would.
    pub(crate) fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Crashes the process and starts it again on the same ports. Returns when the new process
    /// is started (not yet ready).
    pub(crate) fn crash_and_restart(&mut self) -> Result<()> {
        self.crash();
        self.spawn()
    }

    pub(crate) async fn metrics(&self) -> Result<String> {
        http_get(self.metrics_port, "/metrics").await
    }

    /// An admin channel with the administrator's credentials.
    pub(crate) async fn admin(&self) -> Result<Channel> {
        let creds = ClientCredentials {
            ca_pem: std::fs::read_to_string(self.dir.ca_cert())?,
            cert_pem: std::fs::read_to_string(self.dir.admin_cert())?,
            key_pem: std::fs::read_to_string(self.dir.admin_key())?,
            server_name: "localhost".into(),
        };
        Ok(
            flotilla::client::connect(&format!("https://127.0.0.1:{}", self.admin_port), &creds)
                .await?,
        )
    }

    /// Stops the process gracefully (SIGTERM, so profilers can write their output), then kills it
    /// if it has not gone within 30 s.
    pub(crate) fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: sending a signal to our own child.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A plain HTTP GET against the operations endpoint; the body.
pub(crate) async fn http_get(port: u16, path: &str) -> Result<String> {
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

//! Shared test support: a database per test (SQLite, or a fresh PostgreSQL database when
//! `FLOTILLA_TEST_DATABASE_URL` is set), an in-process control plane on real TLS over loopback, and
//! helpers for driving the real binaries.
#![allow(dead_code)]

pub(crate) mod cluster;
pub(crate) mod proxy;
pub(crate) mod sim;
pub(crate) mod swtpm;

use diesel::{Connection, PgConnection, RunQueryDsl};
use flotilla::bootstrap::{BootstrapOptions, DataDir, prepare};
use flotilla::ca::{CertificateAuthority, Subject, Usage};
use flotilla::client::{ClientCredentials, connect};
use flotilla::clock::Clock;
use flotilla::control::{ControlPlane, Policy};
use flotilla::hub::Hub;
use flotilla::identity::Identity;
use flotilla::proto::admin::v1 as admin;
use flotilla::proto::admin::v1::enrollment_service_client::EnrollmentServiceClient as AdminEnrollmentClient;
use flotilla::proto::agent::v1 as agent;
use flotilla::proto::agent::v1::enrollment_service_client::EnrollmentServiceClient;
use flotilla::store::{Backend, Store};
use flotilla::transport::{ConnectionLimits, Endpoints, TlsMaterial, serve};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// A database for one test; a PostgreSQL database is dropped again at the end.
pub(crate) struct TestDb {
    pub url: String,
    admin_url: Option<String>,
    name: String,
    /// Whether dropping this handle drops the database (false for a replica's view of it).
    owner: bool,
}

/// The PostgreSQL server tests use when FLOTILLA_TEST_DATABASE_URL names none (CI starts it).
pub(crate) const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

impl TestDb {
    /// A new database on the PostgreSQL server `admin_url` points at.
    pub(crate) fn postgres(admin_url: &str) -> TestDb {
        let name = format!("flotilla_t_{}", uuid::Uuid::new_v4().simple());
        let mut conn =
            PgConnection::establish(admin_url).expect("connect to the PostgreSQL test server");
        diesel::sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .unwrap();
        let base = admin_url
            .rsplit_once('/')
            .map(|(b, _)| b)
            .unwrap_or(admin_url);
        TestDb {
            url: format!("{base}/{name}"),
            admin_url: Some(admin_url.to_string()),
            name,
            owner: true,
        }
    }

    /// The PostgreSQL server's address (for a proxy in front of it).
    pub(crate) fn server_addr(&self) -> SocketAddr {
        let rest = self.url.split_once("://").unwrap().1;
        let authority = rest.split_once('/').unwrap().0;
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let host = if host.contains(':') {
            host.to_string()
        } else {
            format!("{host}:5432")
        };
        std::net::ToSocketAddrs::to_socket_addrs(&host)
            .unwrap()
            .next()
            .unwrap()
    }

    /// A new database on the suite's PostgreSQL server, whatever backend the suite runs on.
    pub(crate) fn postgres_for_tests() -> TestDb {
        let admin_url = std::env::var("FLOTILLA_TEST_DATABASE_URL")
            .ok()
            .filter(|url| !url.is_empty())
            .unwrap_or_else(|| DEFAULT_POSTGRES_URL.to_string());
        TestDb::postgres(&admin_url)
    }

    /// The database's URL with its host and port replaced by `addr` (e.g. a proxy's).
    pub(crate) fn url_via(&self, addr: SocketAddr) -> String {
        let (scheme, rest) = self.url.split_once("://").unwrap();
        let (authority, path) = rest.split_once('/').unwrap();
        let user = authority.rsplit_once('@').map(|(u, _)| format!("{u}@"));
        format!("{scheme}://{}{addr}/{path}", user.unwrap_or_default())
    }

    /// SQLite in `dir`, or a new database on the server named by `FLOTILLA_TEST_DATABASE_URL`.
    pub(crate) fn new(dir: &Path) -> TestDb {
        match std::env::var("FLOTILLA_TEST_DATABASE_URL") {
            Ok(admin_url) if !admin_url.is_empty() => TestDb::postgres(&admin_url),
            _ => TestDb {
                url: dir.join("flotilla.db").display().to_string(),
                admin_url: None,
                name: String::new(),
                owner: true,
            },
        }
    }

    /// SQLite in `dir`, whatever backend the suite runs on.
    pub(crate) fn sqlite(dir: &Path) -> TestDb {
        TestDb {
            url: dir.join("flotilla.db").display().to_string(),
            admin_url: None,
            name: String::new(),
            owner: true,
        }
    }

    /// Another handle on the same database that leaves it in place when dropped.
    pub(crate) fn shared(&self) -> TestDb {
        TestDb {
            url: self.url.clone(),
            admin_url: self.admin_url.clone(),
            name: self.name.clone(),
            owner: false,
        }
    }

    pub(crate) fn backend(&self) -> Backend {
        Backend::from_url(&self.url)
    }

    pub(crate) fn is_postgres(&self) -> bool {
        self.admin_url.is_some()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(admin_url) = self.admin_url.as_ref().filter(|_| self.owner)
            && let Ok(mut conn) = PgConnection::establish(admin_url)
        {
            let _ = diesel::sql_query(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut conn);
        }
    }
}

/// Opens and migrates a store on a fresh test database.
pub(crate) async fn test_store(dir: &Path) -> (Store, TestDb) {
    let db = TestDb::new(dir);
    let backend = db.backend();
    let store = tokio::task::spawn_blocking(move || Store::open(backend))
        .await
        .unwrap()
        .unwrap();
    store.migrate().await.unwrap();
    (store, db)
}

/// A control plane running in this process on real TLS over loopback.
pub(crate) struct TestServer {
    /// `http://host:port` of the operations endpoint (`/metrics`, `/healthz`, `/readyz`).
    pub metrics_url: String,
    pub agent_url: String,
    pub admin_url: String,
    pub dir: DataDir,
    pub control: ControlPlane,
    pub ca: Arc<CertificateAuthority>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _db: TestDb,
    _tmp: tempfile::TempDir,
}

pub(crate) async fn channel(url: &str, creds: &ClientCredentials) -> Channel {
    connect(url, creds).await.unwrap()
}

pub(crate) fn csr(key: &rcgen::KeyPair) -> String {
    rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(key)
        .unwrap()
        .pem()
        .unwrap()
}

pub(crate) fn enroll_request(name: &str, csr_pem: String) -> agent::EnrollRequest {
    agent::EnrollRequest {
        csr_pem,
        device_name: name.into(),
        labels: [("site".to_string(), "lab".to_string())].into(),
        system_info: None,
        tpm_evidence: None,
        tpm_answer: None,
    }
}

impl TestServer {
    pub(crate) async fn start() -> TestServer {
        TestServer::start_with(Policy::default()).await
    }

    /// Enrolls a device through the real API (label site=lab) and returns its credentials and id.
    pub(crate) async fn enroll_device(&self, name: &str) -> (ClientCredentials, String) {
        self.enroll_device_with(name, BTreeMap::new()).await
    }

    /// Like `enroll_device`, approving with extra `labels`.
    pub(crate) async fn enroll_device_with(
        &self,
        name: &str,
        labels: BTreeMap<String, String>,
    ) -> (ClientCredentials, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut enroll =
            EnrollmentServiceClient::new(channel(&self.agent_url, &self.enrollment_creds()).await);
        enroll
            .enroll(enroll_request(name, csr(&key)))
            .await
            .unwrap();
        AdminEnrollmentClient::new(channel(&self.admin_url, &self.admin_creds()).await)
            .approve_enrollment(admin::ApproveEnrollmentRequest {
                name: name.into(),
                labels: labels.into_iter().collect(),
            })
            .await
            .unwrap();
        let response = enroll
            .enroll(enroll_request(name, csr(&key)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.state(), agent::EnrollmentState::Approved);
        let creds = ClientCredentials {
            ca_pem: self.ca_pem(),
            cert_pem: response.certificate_pem,
            key_pem: key.serialize_pem(),
            server_name: "localhost".into(),
        };
        (creds, response.device_id)
    }

    pub(crate) async fn start_with(policy: Policy) -> TestServer {
        let tmp = tempfile::tempdir().unwrap();
        let db = TestDb::new(tmp.path());
        let url = db.url.clone();
        TestServer::start_on(policy, ConnectionLimits::default(), tmp, db, &url).await
    }

    /// Starts on `db`, reached at `url` (which may lead through a proxy).
    pub(crate) async fn start_on(
        policy: Policy,
        limits: ConnectionLimits,
        tmp: tempfile::TempDir,
        db: TestDb,
        url: &str,
    ) -> TestServer {
        let dir = DataDir::new(tmp.path().join("data"));
        let agent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics_url = format!("http://{}", metrics.local_addr().unwrap());
        let metrics = Some(metrics);
        let agent_url = format!("https://{}", agent.local_addr().unwrap());
        let admin_url = format!("https://{}", admin.local_addr().unwrap());
        let options = BootstrapOptions {
            agent_url: agent_url.clone(),
            admin_url: admin_url.clone(),
            server_names: vec![],
            agent_url_given: false,
            server_cert_validity: flotilla::bootstrap::SERVER_VALIDITY,
        };
        let prepared = prepare(&dir, &options).unwrap();
        let backend = Backend::from_url(url);
        let store = tokio::task::spawn_blocking(move || Store::open(backend))
            .await
            .unwrap()
            .unwrap();
        store.migrate().await.unwrap();
        // One clock for the hub, the control plane, the CA and the auth layer, which a test moves
        // ahead (`control.clock().advance`) instead of sleeping until a certificate expires.
        let clock = Clock::adjustable();
        let ca = Arc::new(prepared.ca.with_clock(clock.clone()));
        let control = ControlPlane::new(
            store,
            ca.clone(),
            Arc::new(prepared.audit_key),
            Arc::new(Hub::with_clock(clock)),
            policy,
        );
        if let Some(pem) = &prepared.admin_cert_pem {
            control.register_bootstrap_admin(pem).await.unwrap();
        }
        if let Some(pem) = &prepared.enrollment_cert_pem {
            control.register_bootstrap_enrollment(pem).await.unwrap();
        }
        let material = TlsMaterial {
            ca_pem: ca.cert_pem().to_string(),
            cert_pem: prepared.server_cert_pem,
            key_pem: prepared.server_key_pem,
            server_cert_validity: flotilla::bootstrap::SERVER_VALIDITY,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = control.clone();
        let task = tokio::spawn(async move {
            serve(
                serving,
                Endpoints {
                    agent,
                    admin,
                    metrics,
                    limits,
                },
                material,
                async {
                    let _ = stopped.await;
                },
            )
            .await
            .unwrap();
        });
        let server = TestServer {
            agent_url,
            admin_url,
            metrics_url,
            dir,
            control,
            ca,
            stop: Some(stop),
            task: Some(task),
            _db: db,
            _tmp: tmp,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !server.control.is_loaded() {
            assert!(Instant::now() < deadline, "server did not become ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server
    }

    /// The database URL (PostgreSQL) or file (SQLite) this server uses.
    pub(crate) fn db_url(&self) -> &str {
        &self._db.url
    }

    fn read(&self, path: PathBuf) -> String {
        std::fs::read_to_string(path).unwrap()
    }

    pub(crate) fn ca_pem(&self) -> String {
        self.ca.cert_pem().to_string()
    }

    fn creds(&self, cert_pem: String, key_pem: String) -> ClientCredentials {
        ClientCredentials {
            ca_pem: self.ca_pem(),
            cert_pem,
            key_pem,
            server_name: "localhost".into(),
        }
    }

    pub(crate) fn admin_creds(&self) -> ClientCredentials {
        self.creds(
            self.read(self.dir.admin_cert()),
            self.read(self.dir.admin_key()),
        )
    }

    pub(crate) fn enrollment_creds(&self) -> ClientCredentials {
        self.creds(
            self.read(self.dir.enrollment_cert()),
            self.read(self.dir.enrollment_key()),
        )
    }

    /// Credentials for any identity, signed by this server's CA.
    pub(crate) fn creds_for(&self, identity: Identity) -> ClientCredentials {
        let (issued, key) = self
            .ca
            .issue_with_new_key(&Subject {
                common_name: identity.to_string(),
                identity: Some(identity),
                dns_names: vec![],
                ip_addresses: vec![],
                usage: Usage::Client,
                validity: Duration::from_secs(3600),
            })
            .unwrap();
        self.creds(issued.pem, key)
    }

    pub(crate) async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The audit records about devices' certificates (the trail also holds the bootstrap admin
/// credential's, which names its target).
pub(crate) async fn device_audit(server: &TestServer) -> Vec<admin::AuditRecord> {
    use flotilla::proto::admin::v1::audit_service_client::AuditServiceClient;
    let mut records =
        AuditServiceClient::new(channel(&server.admin_url, &server.admin_creds()).await)
            .list_audit(admin::ListAuditRequest::default())
            .await
            .unwrap()
            .into_inner()
            .records;
    records.retain(|r| r.target.is_empty());
    records
}

/// Polls `check` until it returns Some, or panics with `what` after `timeout`.
pub(crate) async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A free loopback port (bound, then released).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(crate) fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Path of a workspace binary: `flotilla` from this package, `flotilla-agent` and `flotctl` from
/// the same target directory and profile. No cargo runs inside a test.
pub(crate) fn binary(name: &str) -> PathBuf {
    let server = PathBuf::from(env!("CARGO_BIN_EXE_flotilla"));
    let path = server.parent().unwrap().join(name);
    assert!(
        path.exists(),
        "{} is missing: `cargo test --workspace` builds it before any test runs (through the \
         agent's and flotctl's own integration tests); to run this binary alone, \
         `cargo build --workspace` first",
        path.display()
    );
    path
}

/// A child process that is killed when the guard goes away.
pub(crate) struct ChildGuard(pub Child);

impl ChildGuard {
    pub(crate) fn terminate(&mut self) {
        let pid = self.0.id() as i32;
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The body of a plain-HTTP GET of `url` (`http://host:port/path`), e.g. the `/metrics` page.
pub(crate) async fn http_body(url: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let request = format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    text.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default()
}

/// `http_body` for tests without a runtime.
pub(crate) fn http_body_blocking(url: &str) -> String {
    try_http_body(url).unwrap_or_else(|| panic!("nothing answered at {url}"))
}

/// The body of a plain-HTTP GET of `url` without a runtime; `None` when nothing answers there.
pub(crate) fn try_http_body(url: &str) -> Option<String> {
    use std::io::{Read, Write};
    let (host, path) = url.strip_prefix("http://")?.split_once('/')?;
    let mut stream = std::net::TcpStream::connect(host).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    let request = format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let text = String::from_utf8_lossy(&response).into_owned();
    text.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
}

//! Defects found by probing the control plane from outside, each pinned by a test: revocation that
//! a held-back Hello could race, superseded and spare certificates, unbounded issuance and
//! recovery attempts, certificates strict parsers refuse, world-readable files, readiness during
//! shutdown, and a database outage that must fail writers fast and clearly. Real mTLS over
//! loopback; SQLite, or PostgreSQL with FLOTILLA_TEST_DATABASE_URL (the outage test always uses a
//! real PostgreSQL behind a proxy it can cut).

use crate::support;

use flotilla::client::ClientCredentials;
use flotilla::control::{Policy, RateLimit};
use flotilla::identity::{Identity, Role};
use flotilla::pki::cert_info_pem;
use flotilla::proto::admin::v1 as admin;
use flotilla::proto::admin::v1::certificate_service_client::CertificateServiceClient;
use flotilla::proto::admin::v1::device_service_client::DeviceServiceClient;
use flotilla::proto::agent::v1 as agent;
use flotilla::proto::agent::v1::agent_service_client::AgentServiceClient;
use flotilla::proto::agent::v1::enrollment_service_client::EnrollmentServiceClient;
use flotilla::signature::recovery_message;
use rcgen::{KeyPair, SigningKey};
use std::time::Duration;
use support::sim::RawSession;
use support::{TestServer, channel, http_body, wait_for};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

fn message(kind: agent::agent_message::Kind) -> agent::AgentMessage {
    agent::AgentMessage { kind: Some(kind) }
}

fn hello(device_id: &str) -> agent::AgentMessage {
    message(agent::agent_message::Kind::Hello(agent::Hello {
        device_id: device_id.into(),
        ..Default::default()
    }))
}

fn renewal_csr(key: &KeyPair, device_id: &str) -> String {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        Identity::new(Role::Device, device_id)
            .uri()
            .try_into()
            .unwrap(),
    )];
    params.serialize_request(key).unwrap().pem().unwrap()
}

fn certificate_request(id: &str, csr_pem: &str) -> agent::agent_message::Kind {
    agent::agent_message::Kind::CertificateRequest(agent::CertificateRequest {
        request_id: id.into(),
        csr_pem: csr_pem.into(),
    })
}

enum Answer {
    Issued(agent::CertificateIssued),
    Refused(agent::CertificateRefused),
}

async fn answer(session: &mut RawSession) -> Answer {
    session
        .next_matching(|kind| match kind {
            agent::server_message::Kind::CertificateIssued(i) => Some(Answer::Issued(i)),
            agent::server_message::Kind::CertificateRefused(r) => Some(Answer::Refused(r)),
            _ => None,
        })
        .await
        .expect("an answer to the certificate request")
}

async fn audit(server: &TestServer) -> Vec<admin::AuditRecord> {
    support::device_audit(server).await
}

fn kinds(records: &[admin::AuditRecord]) -> Vec<&str> {
    records.iter().map(|r| r.kind.as_str()).collect()
}

async fn revoke_device(server: &TestServer, name: &str) -> Vec<String> {
    CertificateServiceClient::new(channel(&server.admin_url, &server.admin_creds()).await)
        .revoke_certificate(admin::RevokeCertificateRequest {
            device: name.into(),
            reason: "stolen".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .revoked_serials
}

async fn renewal_state(server: &TestServer, name: &str) -> admin::RenewalState {
    DeviceServiceClient::new(channel(&server.admin_url, &server.admin_creds()).await)
        .get_device(admin::GetDeviceRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap()
        .renewal_state()
}

/// Renews `creds` on a fresh session with a new key; returns the new credentials.
async fn renew(server: &TestServer, creds: &ClientCredentials, id: &str) -> ClientCredentials {
    let mut session = RawSession::open(&server.agent_url, creds, id)
        .await
        .unwrap();
    let key = KeyPair::generate().unwrap();
    session
        .send(certificate_request("r", &renewal_csr(&key, id)))
        .await;
    let Answer::Issued(issued) = answer(&mut session).await else {
        panic!("renewal refused");
    };
    ClientCredentials {
        cert_pem: issued.certificate_pem,
        key_pem: key.serialize_pem(),
        ..creds.clone()
    }
}

#[tokio::test]
async fn a_hello_held_back_past_a_revocation_is_refused() {
    let server = TestServer::start().await;
    let (creds, id) = server.enroll_device("held-back").await;
    // Headers go out (and pass authentication) now; the Hello is held back.
    let (tx, rx) = mpsc::channel(4);
    let mut client = AgentServiceClient::new(channel(&server.agent_url, &creds).await);
    let call = tokio::spawn(async move { client.session(ReceiverStream::new(rx)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!call.is_finished(), "the server waits for the Hello");

    let revoked = revoke_device(&server, "held-back").await;
    assert_eq!(revoked, [cert_info_pem(&creds.cert_pem).unwrap().serial]);
    tx.send(hello(&id)).await.unwrap();
    let refused = call
        .await
        .unwrap()
        .expect_err("a Hello after revocation opens nothing");
    assert_eq!(
        refused.code(),
        Code::Unauthenticated,
        "{}",
        refused.message()
    );
    assert!(
        refused.message().contains("revoked"),
        "{}",
        refused.message()
    );
    assert!(
        !server.control.hub().status(&id).unwrap().online,
        "no session is registered for the revoked device"
    );
}

#[tokio::test]
async fn a_renewed_certificate_supersedes_the_old_one_once_used() {
    let server = TestServer::start().await;
    let (old, id) = server.enroll_device("renewer").await;
    let old_serial = cert_info_pem(&old.cert_pem).unwrap().serial;
    let new = renew(&server, &old, &id).await;
    let new_serial = cert_info_pem(&new.cert_pem).unwrap().serial;

    // Until the new certificate is used, the old one still works (the device may not have
    // switched yet).
    RawSession::open(&server.agent_url, &old, &id)
        .await
        .expect("the renewed-but-unused certificate still opens a session");
    let mut session = RawSession::open(&server.agent_url, &new, &id)
        .await
        .unwrap();
    session
        .next_matching(|kind| {
            matches!(kind, agent::server_message::Kind::Accepted(_)).then_some(())
        })
        .await
        .unwrap();
    let refused = RawSession::open(&server.agent_url, &old, &id)
        .await
        .err()
        .expect("the superseded certificate is refused");
    assert_eq!(refused.code(), Code::Unauthenticated);
    let records = audit(&server).await;
    assert_eq!(kinds(&records), ["issued", "renewed", "superseded"]);
    let superseded = records.last().unwrap();
    assert_eq!(superseded.serial, old_serial);
    assert!(
        superseded.reason.contains(&new_serial),
        "{}",
        superseded.reason
    );

    // A CSR for the pre-renewal key gets nothing back — not the old certificate — and is audited.
    let old_key = KeyPair::from_pem(&old.key_pem).unwrap();
    session
        .send(certificate_request("again", &renewal_csr(&old_key, &id)))
        .await;
    let Answer::Refused(refusal) = answer(&mut session).await else {
        panic!("the pre-renewal key was answered with a certificate");
    };
    assert!(!refusal.retryable, "{}", refusal.reason);
    let records = audit(&server).await;
    assert_eq!(records.last().unwrap().kind, "rejected");
    assert_eq!(
        renewal_state(&server, "renewer").await,
        admin::RenewalState::Failed
    );

    // A later success clears the failure.
    let key = KeyPair::generate().unwrap();
    session
        .send(certificate_request("fresh", &renewal_csr(&key, &id)))
        .await;
    assert!(matches!(answer(&mut session).await, Answer::Issued(_)));
    assert_eq!(
        renewal_state(&server, "renewer").await,
        admin::RenewalState::Valid
    );
}

#[tokio::test]
async fn issuance_is_rate_limited_per_device_and_audited_once_per_window() {
    let server = TestServer::start_with(Policy {
        issuance_limit: RateLimit {
            max: 2,
            window: Duration::from_secs(600),
        },
        ..Policy::default()
    })
    .await;
    let (creds, id) = server.enroll_device("greedy").await;
    let (other, other_id) = server.enroll_device("neighbour").await;
    let mut session = RawSession::open(&server.agent_url, &creds, &id)
        .await
        .unwrap();
    let mut serials = Vec::new();
    for i in 0..2 {
        let key = KeyPair::generate().unwrap();
        session
            .send(certificate_request(
                &format!("ok-{i}"),
                &renewal_csr(&key, &id),
            ))
            .await;
        let Answer::Issued(issued) = answer(&mut session).await else {
            panic!("renewal {i} refused");
        };
        serials.push(cert_info_pem(&issued.certificate_pem).unwrap().serial);
    }
    let before = audit(&server).await.len();
    for i in 0..3 {
        let key = KeyPair::generate().unwrap();
        session
            .send(certificate_request(
                &format!("over-{i}"),
                &renewal_csr(&key, &id),
            ))
            .await;
        let Answer::Refused(refused) = answer(&mut session).await else {
            panic!("issuance past the limit");
        };
        assert!(refused.retryable, "{}", refused.reason);
        assert!(refused.reason.contains("rate limit"), "{}", refused.reason);
        let wait = Duration::try_from(refused.retry_after.expect("a retry delay")).unwrap();
        assert!(wait > Duration::from_secs(500) && wait <= Duration::from_secs(600));
    }
    let records = audit(&server).await;
    assert_eq!(records.len(), before + 1, "one audit record for the window");
    assert!(records.last().unwrap().reason.contains("rate limit"));
    // Only the last issued certificate is spare: the first unused one was superseded by the second.
    let superseded: Vec<&str> = records
        .iter()
        .filter(|r| r.kind == "superseded")
        .map(|r| r.serial.as_str())
        .collect();
    assert_eq!(superseded, [serials[0].as_str()]);
    // Other devices are not affected.
    let _ = renew(&server, &other, &other_id).await;
}

fn recover_request(
    device_id: &str,
    nonce: &str,
    previous_pem: &str,
    signer: &KeyPair,
    fresh: &KeyPair,
) -> agent::RecoverRequest {
    let csr = renewal_csr(fresh, device_id);
    let signature = signer
        .sign(&recovery_message(device_id, nonce, &csr))
        .unwrap();
    agent::RecoverRequest {
        device_id: device_id.into(),
        nonce: nonce.into(),
        previous_certificate_pem: previous_pem.into(),
        signature,
        csr_pem: csr,
    }
}

#[tokio::test]
async fn recovery_is_only_for_expired_certificates_and_attempts_are_limited() {
    let server = TestServer::start_with(Policy {
        recovery_limit: RateLimit {
            max: 3,
            window: Duration::from_secs(600),
        },
        ..Policy::default()
    })
    .await;
    let (creds, id) = server.enroll_device("awake").await;
    let mut enroll =
        EnrollmentServiceClient::new(channel(&server.agent_url, &server.enrollment_creds()).await);
    let key = KeyPair::from_pem(&creds.key_pem).unwrap();
    let fresh = KeyPair::generate().unwrap();
    let nonce = enroll
        .recovery_challenge(agent::RecoveryChallengeRequest {
            device_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .nonce;
    let status = enroll
        .recover(recover_request(&id, &nonce, &creds.cert_pem, &key, &fresh))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("has not expired"),
        "{}",
        status.message()
    );

    // Garbage attempts: refused and audited until the limit, then refused without a record each.
    for _ in 0..2 {
        let status = enroll
            .recover(recover_request(&id, "bogus", "garbage", &key, &fresh))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
    }
    let audited = audit(&server).await.len();
    let status = enroll
        .recover(recover_request(&id, "bogus", "garbage", &key, &fresh))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("too many recovery attempts"),
        "{}",
        status.message()
    );
    for _ in 0..20 {
        let status = enroll
            .recover(recover_request(&id, "bogus", "garbage", &key, &fresh))
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::ResourceExhausted,
            "{}",
            status.message()
        );
        assert!(flotilla::client::retry_after(&status).is_some());
    }
    let records = audit(&server).await;
    assert_eq!(
        records.len(),
        audited + 1,
        "one record for the window's refusals"
    );
    assert!(
        records
            .last()
            .unwrap()
            .reason
            .contains("too many recovery attempts")
    );
}

/// Every kind of certificate the control plane makes, read by pyca/cryptography, which refuses
/// DER that encodes a default value (such as BasicConstraints `cA FALSE`).
#[tokio::test]
async fn every_certificate_is_strict_der() {
    let server = TestServer::start().await;
    let (device, id) = server.enroll_device("strict").await;
    let renewed = renew(&server, &device, &id).await;
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (name, pem) in [
        ("ca", server.ca_pem()),
        (
            "server",
            std::fs::read_to_string(server.dir.server_cert()).unwrap(),
        ),
        ("admin", server.admin_creds().cert_pem),
        ("enrollment", server.enrollment_creds().cert_pem),
        ("device", device.cert_pem.clone()),
        ("renewed", renewed.cert_pem.clone()),
    ] {
        let path = dir.path().join(format!("{name}.pem"));
        // The first certificate of each file (the server's may carry its chain).
        let first = pem
            .split_inclusive("-----END CERTIFICATE-----")
            .next()
            .unwrap()
            .trim()
            .to_string();
        std::fs::write(&path, first).unwrap();
        files.push(path);
    }
    let script = r#"
import sys
from cryptography import x509
for path in sys.argv[1:]:
    cert = x509.load_pem_x509_certificate(open(path, "rb").read())
    names = [ext.oid._name for ext in cert.extensions]
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        print(path, "ca" if bc.ca else "not-ca", names)
    except x509.ExtensionNotFound:
        print(path, "no-basic-constraints", names)
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(&files)
        .output()
        .expect("python3 with pyca/cryptography");
    assert!(
        out.status.success(),
        "pyca/cryptography refused a certificate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), files.len(), "{text}");
    assert!(text.lines().next().unwrap().contains(" ca "), "{text}");
    for line in text.lines().skip(1) {
        assert!(!line.contains(" ca "), "only the CA is a CA: {line}");
    }
    // x509-parser reads every extension of each, too.
    for path in &files {
        let pem = std::fs::read_to_string(path).unwrap();
        let der = flotilla::pki::certs_from_pem(&pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der[0]).expect("x509-parser reads it");
        for extension in cert.extensions() {
            assert!(
                !matches!(
                    extension.parsed_extension(),
                    x509_parser::extensions::ParsedExtension::UnsupportedExtension { .. }
                        | x509_parser::extensions::ParsedExtension::ParseError { .. }
                ),
                "{}: extension {} did not parse",
                path.display(),
                extension.oid
            );
        }
    }
}

#[tokio::test]
async fn the_data_directory_and_database_are_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let server = TestServer::start().await;
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(server.dir.root()), 0o700);
    for key in [
        server.dir.ca_key(),
        server.dir.server_key(),
        server.dir.admin_key(),
        server.dir.enrollment_key(),
        server.dir.audit_key(),
    ] {
        assert_eq!(mode(&key), 0o600, "{}", key.display());
    }
    if !server.db_url().starts_with("postgres") {
        let db = std::path::PathBuf::from(server.db_url());
        assert_eq!(mode(&db), 0o600, "{}", db.display());
        let wal = std::path::PathBuf::from(format!("{}-wal", server.db_url()));
        if wal.exists() {
            assert_eq!(mode(&wal), 0o600, "{}", wal.display());
        }
    }
}

#[tokio::test]
async fn readiness_answers_503_until_the_drain_ends() {
    let server = TestServer::start().await;
    let (creds, id) = server.enroll_device("lingering").await;
    // An agent that keeps its connection open holds the drain open (up to its timeout).
    let _session = RawSession::open(&server.agent_url, &creds, &id)
        .await
        .unwrap();
    let url = format!("{}/readyz", server.metrics_url);
    assert_eq!(http_status(&url).await, Some(200));
    let stopping = tokio::spawn(server.stop());
    let answered_503 = wait_for("/readyz to answer 503", Duration::from_secs(5), || {
        let url = url.clone();
        async move {
            match http_status(&url).await {
                Some(503) => Some(true),
                None => Some(false),
                _ => None,
            }
        }
    })
    .await;
    assert!(
        answered_503,
        "the operations endpoint closed instead of answering 503 while draining"
    );
    stopping.await.unwrap();
}

/// The status code of a plain HTTP GET, or None if nothing answers.
async fn http_status(url: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/')?;
    let mut stream = tokio::net::TcpStream::connect(host).await.ok()?;
    let request = format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let text = String::from_utf8_lossy(&response);
    text.split_whitespace().nth(1)?.parse().ok()
}

/// The body of a plain HTTP GET (status line and headers stripped).
#[tokio::test]
async fn a_cut_database_fails_concurrent_writers_fast_and_clearly_then_recovers() {
    let admin_url = std::env::var("FLOTILLA_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| support::DEFAULT_POSTGRES_URL.to_string());
    let db = support::TestDb::postgres(&admin_url);
    let upstream: std::net::SocketAddr = tokio::net::lookup_host(
        admin_url
            .split_once('@')
            .map(|(_, rest)| rest)
            .unwrap()
            .split('/')
            .next()
            .unwrap(),
    )
    .await
    .unwrap()
    .next()
    .unwrap();
    let proxy = support::proxy::Proxy::start(upstream).await;
    let url = db.url_via(proxy.addr);
    let server = TestServer::start_on(
        Policy::default(),
        flotilla::transport::ConnectionLimits::default(),
        tempfile::tempdir().unwrap(),
        db,
        &url,
    )
    .await;
    server.enroll_device("edge-1").await;
    let devices = DeviceServiceClient::new(channel(&server.admin_url, &server.admin_creds()).await);
    let label = |devices: &DeviceServiceClient<tonic::transport::Channel>, i: usize| {
        let mut devices = devices.clone();
        async move {
            let started = std::time::Instant::now();
            let result = devices
                .label_device(admin::LabelDeviceRequest {
                    name: "edge-1".into(),
                    set: [("writer".to_string(), i.to_string())].into(),
                    remove: vec![],
                })
                .await;
            (result, started.elapsed())
        }
    };
    assert!(label(&devices, 0).await.0.is_ok());

    proxy.cut();
    let writers: Vec<_> = (0..20).map(|i| tokio::spawn(label(&devices, i))).collect();
    for writer in writers {
        let (result, took) = writer.await.unwrap();
        let status = result.expect_err("a write with the database cut");
        assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
        assert!(
            status.message().contains("database unavailable"),
            "{}",
            status.message()
        );
        assert!(
            !status.message().contains(&proxy.addr.to_string()),
            "connection details stay in the log: {}",
            status.message()
        );
        assert!(took < Duration::from_secs(12), "a writer waited {took:?}");
    }
    let ready = format!("{}/readyz", server.metrics_url);
    assert_eq!(http_status(&ready).await, Some(503));
    assert!(http_body(&ready).await.contains("database unreachable"));
    let metrics = http_body(&format!("{}/metrics", server.metrics_url)).await;
    assert!(
        metrics.contains("flotilla_database_reachable 0"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("reachable"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Reads are served from memory meanwhile.
    let listed = devices
        .clone()
        .list_devices(admin::ListDevicesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.devices.len(), 1);

    proxy.restore();
    wait_for("writes to succeed again", Duration::from_secs(15), || {
        let devices = devices.clone();
        async move { label(&devices, 99).await.0.ok().map(|_| ()) }
    })
    .await;
    assert_eq!(http_status(&ready).await, Some(200));
    let device = devices
        .clone()
        .get_device(admin::GetDeviceRequest {
            name: "edge-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(device.labels.get("writer").map(String::as_str), Some("99"));
}

/// Whether the server closes `stream` within `limit` (EOF or a reset); false if it is still open.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, limit: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 512];
    let read = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, read).await.is_ok()
}

/// A TLS connection to the admin endpoint with `creds`, offering HTTP/2 and then saying nothing.
async fn silent_tls(
    server: &TestServer,
    creds: &ClientCredentials,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(creds.ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(creds.cert_pem.as_bytes())
            .map(|c| c.unwrap())
            .collect();
    let key = PrivateKeyDer::from_pem_slice(creds.key_pem.as_bytes()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(server.admin_url.trim_start_matches("https://"))
        .await
        .unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("the TLS handshake completes")
}

/// A server on a database of its own with these connection limits.
async fn server_with_limits(limits: flotilla::transport::ConnectionLimits) -> TestServer {
    let tmp = tempfile::tempdir().unwrap();
    let db = support::TestDb::new(tmp.path());
    let url = db.url.clone();
    TestServer::start_on(Policy::default(), limits, tmp, db, &url).await
}

#[tokio::test]
async fn connections_that_never_make_a_request_are_bounded_and_closed() {
    let server = server_with_limits(flotilla::transport::ConnectionLimits {
        first_request_timeout: Duration::from_secs(2),
        max_pending: 16,
        max_per_address: 8,
    })
    .await;
    let admin_addr = server.admin_url.trim_start_matches("https://").to_string();

    // A TLS client with a valid certificate that never speaks HTTP/2 is closed after the timeout.
    let mut silent = silent_tls(&server, &server.admin_creds()).await;
    let started = std::time::Instant::now();
    assert!(
        closed_within(&mut silent, Duration::from_secs(6)).await,
        "a connection without a request stayed open"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    // One address holding many bare TCP connections gets only its share...
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..30 {
        let mut tcp = tokio::net::TcpStream::connect(&admin_addr).await.unwrap();
        if closed_within(&mut tcp, Duration::from_millis(200)).await {
            refused += 1;
        } else {
            held.push(tcp);
        }
    }
    assert_eq!(held.len(), 8, "connections held from one address");
    assert_eq!(refused, 22);
    // ...and a client from another address is still served meanwhile.
    let endpoint = flotilla::client::endpoint(&server.admin_url, &server.admin_creds())
        .unwrap()
        .local_address(Some([127, 0, 0, 2].into()));
    let listed = DeviceServiceClient::new(endpoint.connect().await.unwrap())
        .list_devices(admin::ListDevicesRequest::default())
        .await;
    assert!(listed.is_ok(), "{listed:?}");
    // The held ones are closed once their time is up.
    for tcp in &mut held {
        assert!(closed_within(tcp, Duration::from_secs(5)).await);
    }
    let metrics = http_body(&format!("{}/metrics", server.metrics_url)).await;
    for reason in ["too_many_from_address", "timeout"] {
        let line = metrics
            .lines()
            .find(|l| {
                l.starts_with("flotilla_connections_refused_total")
                    && l.contains("endpoint=\"admin\"")
                    && l.contains(reason)
            })
            .unwrap_or_else(|| panic!("no {reason} series"));
        let count: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(count >= 1.0, "{line}");
    }
}

#[tokio::test]
async fn a_storm_beyond_the_pending_limit_waits_its_turn_instead_of_being_turned_away() {
    let server = server_with_limits(flotilla::transport::ConnectionLimits {
        first_request_timeout: Duration::from_secs(10),
        max_pending: 4,
        max_per_address: 0,
    })
    .await;
    // Sixty-four clients at once against room for four pending: each is served on its first
    // attempt (a refused one would fail its handshake or first request).
    let calls = (0..64u8).map(|i| {
        let endpoint = flotilla::client::endpoint(&server.admin_url, &server.admin_creds())
            .unwrap()
            .local_address(Some([127, 0, 1, i + 1].into()));
        async move {
            let channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
            DeviceServiceClient::new(channel)
                .list_devices(admin::ListDevicesRequest::default())
                .await
                .map_err(|s| s.to_string())
        }
    });
    let outcomes = futures::future::join_all(calls).await;
    let failed: Vec<_> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of 64 failed: {:?}",
        failed.len(),
        failed.first()
    );
}

/// In a storm, connections wait in the listen backlog, and a client whose own deadline passed
/// there closes its end and retries. Such a connection, its ClientHello still queued, is dropped
/// on accept without an answer: a handshake with it would spend the server's key exchange and
/// signature on nobody while live clients wait.
#[tokio::test]
async fn a_connection_abandoned_in_the_backlog_is_dropped_without_a_handshake() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = server_with_limits(flotilla::transport::ConnectionLimits {
        first_request_timeout: Duration::from_secs(10),
        max_pending: 1,
        max_per_address: 0,
    })
    .await;
    let address = server.admin_url.trim_start_matches("https://").to_string();
    // A connection that says nothing takes the only pending place, so the next waits unaccepted.
    let holder = tokio::net::TcpStream::connect(&address).await.unwrap();
    let mut waiting = tokio::net::TcpStream::connect(&address).await.unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let mut client =
        rustls::ClientConnection::new(std::sync::Arc::new(config), "localhost".try_into().unwrap())
            .unwrap();
    let mut hello = Vec::new();
    client.write_tls(&mut hello).unwrap();
    waiting.write_all(&hello).await.unwrap();
    // It gives up while still in the backlog; then the place frees.
    waiting.shutdown().await.unwrap();
    drop(holder);
    // Closed unread, the connection ends in a reset rather than an orderly end: either is fine,
    // an answer is not.
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), waiting.read_to_end(&mut answer))
        .await
        .expect("the server closes the abandoned connection");
    assert!(
        answer.is_empty(),
        "{} bytes of handshake sent to a client that had gone",
        answer.len()
    );
    // A live client is still served after it.
    DeviceServiceClient::new(channel(&server.admin_url, &server.admin_creds()).await)
        .list_devices(admin::ListDevicesRequest::default())
        .await
        .unwrap();
    let metrics = http_body(&format!("{}/metrics", server.metrics_url)).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("flotilla_connections_refused_total")
                && l.contains("endpoint=\"admin\"")
                && l.contains("reason=\"abandoned\"")
                && l.ends_with(" 1")),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_client_without_a_certificate_fails_the_handshake() {
    let server = TestServer::start().await;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(server.ca_pem()))
        .domain_name("localhost");
    let outcome = async {
        let channel = tonic::transport::Endpoint::from_shared(server.admin_url.clone())
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        DeviceServiceClient::new(channel)
            .list_devices(admin::ListDevicesRequest::default())
            .await
            .map_err(|s| s.to_string())
    }
    .await;
    let error = outcome.expect_err("no certificate, no answer");
    assert!(!error.contains("ListDevices"), "{error}");
}

#[tokio::test]
async fn the_shared_enrollment_credential_cannot_flood_the_queue() {
    let server = TestServer::start_with(Policy {
        max_pending_enrollments: 3,
        ..Policy::default()
    })
    .await;
    let mut enroll =
        EnrollmentServiceClient::new(channel(&server.agent_url, &server.enrollment_creds()).await);
    let keys: Vec<KeyPair> = (0..3).map(|_| KeyPair::generate().unwrap()).collect();
    for (i, key) in keys.iter().enumerate() {
        enroll
            .enroll(support::enroll_request(
                &format!("queued-{i}"),
                support::csr(key),
            ))
            .await
            .unwrap();
    }
    let status = enroll
        .enroll(support::enroll_request(
            "one-too-many",
            support::csr(&KeyPair::generate().unwrap()),
        ))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("too many pending"),
        "{}",
        status.message()
    );
    assert!(flotilla::client::retry_after(&status).is_some());
    // A device already waiting still gets its answer.
    let polled = enroll
        .enroll(support::enroll_request("queued-0", support::csr(&keys[0])))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(polled.state(), agent::EnrollmentState::Pending);

    // Label sets are bounded.
    let mut request =
        support::enroll_request("labelled", support::csr(&KeyPair::generate().unwrap()));
    request.labels = (0..65)
        .map(|i| (format!("k{i}"), "v".to_string()))
        .collect();
    let status = enroll.enroll(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    assert!(
        status.message().contains("65 labels"),
        "{}",
        status.message()
    );

    // A decision makes room.
    flotilla::proto::admin::v1::enrollment_service_client::EnrollmentServiceClient::new(
        channel(&server.admin_url, &server.admin_creds()).await,
    )
    .deny_enrollment(admin::DenyEnrollmentRequest {
        name: "queued-1".into(),
        reason: "not ours".into(),
    })
    .await
    .unwrap();
    enroll
        .enroll(support::enroll_request(
            "one-too-many",
            support::csr(&KeyPair::generate().unwrap()),
        ))
        .await
        .unwrap();
}

// Multi-threaded: flotctl runs as a blocking child process while this runtime serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_device_says_cannot_drive_the_operators_terminal() {
    let server = TestServer::start().await;
    let hostile = "evil\u{1b}]0;owned\u{7}\u{1b}[2J\u{9b}31m";
    let mut request =
        support::enroll_request("hostile", support::csr(&KeyPair::generate().unwrap()));
    request.system_info = Some(agent::SystemInfo {
        hostname: hostile.into(),
        ..Default::default()
    });
    EnrollmentServiceClient::new(channel(&server.agent_url, &server.enrollment_creds()).await)
        .enroll(request)
        .await
        .unwrap();
    let flotctl = |args: &[&str]| {
        let out = std::process::Command::new(support::binary("flotctl"))
            .arg("--config")
            .arg(server.dir.ctl_config())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let table = flotctl(&["get", "enrollments"]);
    assert!(
        !table.contains(&0x1b) && !table.contains(&0x07),
        "raw control bytes printed"
    );
    let text = String::from_utf8(table).unwrap();
    assert!(
        text.contains("evil\\x1b]0;owned\\x07\\x1b[2J\\x9b31m"),
        "{text}"
    );
    // Machine-readable output stays exact.
    let json: serde_json::Value =
        serde_json::from_slice(&flotctl(&["get", "enrollments", "-o", "json"])).unwrap();
    assert_eq!(json[0]["hostname"], hostile);
}

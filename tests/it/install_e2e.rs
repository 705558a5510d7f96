//! Installing Flotilla as an operator would, with real processes: a device set up from nothing but
//! the enrollment bundle (one file, PEMs inline) copied elsewhere; a later start that adds a name
//! to the server certificate and moves agents to a new URL; the server certificate renewed while
//! serving, with its expiry exported for alerting.

use crate::support;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use support::binary;
use support::cluster::{Cluster, wait};

const TIMEOUT: Duration = Duration::from_secs(60);

/// The serial of the certificate the server at `addr` presents, checked against `ca_pem`.
fn served_serial(addr: std::net::SocketAddr, ca_pem: &str) -> String {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut roots = rustls::RootCertStore::empty();
        for cert in flotilla::pki::certs_from_pem(ca_pem).unwrap() {
            roots.add(cert).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        // The server wants a client certificate; the handshake still shows its own first.
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await;
        let der = match &tls {
            Ok(stream) => stream.get_ref().1.peer_certificates().unwrap()[0].clone(),
            Err(error) => panic!("no handshake with {addr}: {error}"),
        };
        flotilla::pki::cert_info(&der).unwrap().serial
    })
}

#[test]
fn a_device_installed_from_the_enrollment_bundle_alone_joins() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let cluster = Cluster::new(root);
    let _server = cluster.start_server(0);
    cluster.wait_until_serving();
    let bundle = root.join("device/etc/agent.toml");
    std::fs::create_dir_all(bundle.parent().unwrap()).unwrap();
    let out = Command::new(binary("flotilla"))
        .args(["enrollment-bundle", "--data-dir"])
        .arg(&cluster.data)
        .args(["--server-url", &format!("https://{}", cluster.agent_addr())])
        .args(["--label", "site=remote", "--out"])
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&bundle).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let text = std::fs::read_to_string(&bundle).unwrap();
    assert!(
        text.contains("BEGIN CERTIFICATE") && !text.contains("_file"),
        "{text}"
    );
    // Only the bundle is on the "device": no data directory paths to follow.
    let device = root.join("device");
    let mut agent = support::ChildGuard(
        cluster
            .agent_command(
                &bundle,
                "remote-1",
                &[],
                &device.join("state"),
                &root.join("agent.log"),
            )
            .spawn()
            .unwrap(),
    );
    wait("the request", TIMEOUT, || {
        cluster
            .flotctl_json(&["get", "enrollment", "remote-1"])
            .is_some()
    });
    let request = cluster
        .flotctl_json(&["get", "enrollment", "remote-1"])
        .unwrap();
    assert_eq!(request["labels"]["site"], "remote");
    cluster.flotctl_ok(&["approve", "enrollment", "remote-1"]);
    wait("the device online", TIMEOUT, || {
        cluster
            .flotctl_json(&["get", "device", "remote-1"])
            .is_some_and(|d| d["status"]["online"] == true)
    });
    agent.terminate();

    // A bundle of something that is not an enrollment credential is refused.
    let out = Command::new(binary("flotilla"))
        .args(["enrollment-bundle", "--data-dir"])
        .arg(&cluster.data)
        .args(["--server-url", "https://cp:7443", "--cert"])
        .arg(cluster.data.join("admin/admin.crt"))
        .arg("--key")
        .arg(cluster.data.join("admin/admin.key"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an enrollment credential"));
}

#[test]
fn the_server_certificate_takes_new_names_and_is_renewed_while_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let cluster = Cluster::new(root);
    let ca = || std::fs::read_to_string(cluster.data.join("ca/ca.crt")).unwrap();
    let mut server = cluster.start_server(0);
    cluster.wait_until_serving();
    let first = served_serial(cluster.agent_addr(), &ca());
    server.terminate();

    // A later start with a new name reissues the certificate; --agent-url moves agent.toml.
    let url = format!("https://cp.example.test:{}", cluster.agent_addr().port());
    let mut server = cluster.start_server_with(
        1,
        &[
            "--server-name",
            "cp.example.test",
            "--agent-url",
            &url,
            "--server-cert-validity",
            "9s",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    cluster.wait_until_serving();
    let metrics = cluster.operations_addr();
    let pem = std::fs::read_to_string(cluster.data.join("tls/server.crt")).unwrap();
    let names = flotilla::pki::subject_alt_names_pem(&pem).unwrap();
    assert!(names.contains(&"cp.example.test".to_string()), "{names:?}");
    let second = served_serial(cluster.agent_addr(), &ca());
    assert_ne!(first, second);
    let agent = flotilla::profiles::AgentConfig::load(&cluster.data.join("agent.toml")).unwrap();
    assert_eq!(agent.server, url);

    // Nine-second certificates are renewed while serving, with the expiry exported.
    let expiry = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("flotilla_server_certificate_expiry_seconds"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    let mut seen = std::collections::BTreeSet::from([second]);
    wait("two renewals while serving", TIMEOUT, || {
        seen.insert(served_serial(cluster.agent_addr(), &ca()));
        seen.len() >= 3
    });
    let exported = expiry(&support::http_body_blocking(&format!(
        "http://{metrics}/metrics"
    )))
    .expect("the expiry is exported");
    let now = flotilla::clock::now_millis() as f64 / 1000.0;
    assert!(
        exported > now && exported < now + 10.0,
        "{exported} vs {now}"
    );
    // New connections still work with the renewed certificates.
    cluster.flotctl_ok(&["get", "devices"]);
    server.terminate();
}

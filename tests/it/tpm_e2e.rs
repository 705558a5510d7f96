//! End to end with a TPM: `flotilla serve` trusting swtpm's manufacturer CA, and a real
//! `flotilla-agent` built with `tpm` keeping its key in swtpm. It enrolls with attestation and is
//! approved for it, shows as TPM-verified, applies a pushed spec, renews its certificate into a
//! fresh TPM key — and no private key is ever written to its state directory. A second device
//! with the same TPM is caught, and one offline past expiry recovers with a proof the TPM signs.
//! Runs with `cargo build -p flotilla-agent --features tpm && cargo test --features tpm-tests --test it tpm_e2e`.

use crate::support;

use serde_json::Value;
use std::path::Path;
use std::time::Duration;
use support::ChildGuard;
use support::cluster::{Cluster, count_lines, wait};
use support::swtpm::Swtpm;

const TIMEOUT: Duration = Duration::from_secs(60);

fn tpm_agent_config(cluster: &Cluster, swtpm: &Swtpm) -> std::path::PathBuf {
    let base = std::fs::read_to_string(cluster.data.join("agent.toml")).unwrap();
    let path = cluster.root.join("agent-tpm.toml");
    std::fs::write(
        &path,
        format!("{base}\n[tpm]\nenabled = true\ntcti = {:?}\n", swtpm.tcti),
    )
    .unwrap();
    path
}

fn enrollment(cluster: &Cluster, name: &str) -> Value {
    cluster
        .flotctl_json(&["get", "enrollments"])
        .and_then(|list| list.as_array()?.iter().find(|e| e["name"] == name).cloned())
        .unwrap_or(Value::Null)
}

fn device(cluster: &Cluster, name: &str) -> Value {
    cluster
        .flotctl_json(&["get", "device", name])
        .unwrap_or(Value::Null)
}

/// The first audit record of `kind`, as `flotctl audit list` shows it.
fn audit_record(cluster: &Cluster, kind: &str) -> Option<Value> {
    cluster
        .flotctl_json(&["audit", "list"])?
        .as_array()?
        .iter()
        // Devices' certificate records: credential records name their target.
        .find(|r| r["kind"] == kind && r["target"].as_str().unwrap_or_default().is_empty())
        .cloned()
}

/// Every file under `dir`, with its contents.
fn files(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            found.extend(files(&path));
        } else if meta.is_file() {
            found.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
    found
}

/// No file in the state directory is, or contains, a usable private key.
fn assert_no_private_key(state: &Path) {
    let all = files(state);
    assert!(!all.is_empty());
    for (path, content) in &all {
        let text = String::from_utf8_lossy(content);
        assert!(
            !text.contains("PRIVATE KEY"),
            "{} holds a private key",
            path.display()
        );
        assert!(
            rcgen::KeyPair::from_pem(&text).is_err(),
            "{} parses as a private key",
            path.display()
        );
        assert_ne!(
            path.file_name().unwrap(),
            "device.key",
            "a key file outside the TPM"
        );
    }
}

/// SHA-256 of the RSA EK certificate's public key, read from the TPM's NV storage by tpm2-tools
/// and hashed by openssl: an account of the EK independent of the agent and the control plane.
fn ek_fingerprint_read_with_tpm2_tools(swtpm: &Swtpm, root: &Path) -> String {
    let der = root.join("ek.der");
    let read = std::process::Command::new("tpm2_nvread")
        .env("TPM2TOOLS_TCTI", &swtpm.tcti)
        .args(["-C", "o", "0x01c00002", "-o"])
        .arg(&der)
        .output()
        .expect("run tpm2_nvread (tpm2-tools)");
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    let spki = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl x509 -inform DER -in {} -pubkey -noout | openssl pkey -pubin -outform DER",
            der.display()
        ))
        .output()
        .unwrap();
    assert!(spki.status.success());
    flotilla::pki::sha256_hex(&spki.stdout)
}

#[test]
fn a_tpm_backed_agent_enrolls_with_attestation_gets_specs_renews_and_never_writes_a_key() {
    let swtpm = Swtpm::start();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let cluster = Cluster::new(&root);
    let bundle = swtpm.ca_bundle().display().to_string();
    let _server = cluster.start_server_with(1, &["--tpm-ca", &bundle, "--auto-approve-tpm"]);
    cluster.wait_until_serving();
    let config = tpm_agent_config(&cluster, &swtpm);
    let state = root.join("state-1");
    let log = root.join("agent-1.log");
    let mut agent = ChildGuard(
        cluster
            .agent_command(&config, "edge-tpm", &["site=lab"], &state, &log)
            .spawn()
            .unwrap(),
    );

    // Attested, then approved by policy, with no operator involved.
    wait("the TPM-attested enrollment, approved", TIMEOUT, || {
        enrollment(&cluster, "edge-tpm")["state"] == "APPROVED"
    });
    let request = enrollment(&cluster, "edge-tpm");
    let ek = request["tpm_ek_fingerprint"].as_str().unwrap().to_string();
    assert_eq!(ek.len(), 64, "{request}");
    assert_eq!(request["decided_by"], "service/tpm-attestation");
    wait("the TPM agent's session", TIMEOUT, || {
        count_lines(&log, "session established") >= 1
    });
    assert_eq!(
        device(&cluster, "edge-tpm")["status"]["tpm_ek_fingerprint"],
        ek.as_str()
    );
    let described = cluster.flotctl_ok(&["describe", "device", "edge-tpm"]);
    assert!(
        described.contains(&format!("key attested at enrollment (EK {ek})")),
        "{described}"
    );
    let issued = audit_record(&cluster, "issued").expect("the enrollment's issuance is audited");
    assert!(
        issued["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("attested by TPM (EK {ek})")),
        "{issued}"
    );

    // A pushed spec arrives over the TPM-authenticated stream.
    let out = root.join("out");
    let spec = root.join("device.yaml");
    std::fs::write(
        &spec,
        format!(
            "kind: Device\nmetadata:\n  name: edge-tpm\nspec:\n  files:\n    - path: {}\n      content: \"from the control plane\\n\"\n",
            out.join("motd").display()
        ),
    )
    .unwrap();
    cluster.flotctl_ok(&["apply", "-f", spec.to_str().unwrap()]);
    wait("the pushed file", TIMEOUT, || {
        std::fs::read_to_string(out.join("motd")).is_ok_and(|t| t == "from the control plane\n")
    });
    wait("the device SYNCED", TIMEOUT, || {
        device(&cluster, "edge-tpm")["status"]["sync_state"] == "SYNCED"
    });

    // Renewal: a fresh key in the TPM, a new certificate, a new session with it.
    let before = device(&cluster, "edge-tpm")["status"]["certificate_serial"].clone();
    let key_before = std::fs::read(state.join("certs/current/device.tpmkey")).unwrap();
    cluster.flotctl_ok(&["cert", "renew", "--device", "edge-tpm"]);
    wait(
        "the renewed certificate confirmed by a new session",
        TIMEOUT,
        || count_lines(&log, "renewed certificate confirmed") >= 1,
    );
    let after = device(&cluster, "edge-tpm")["status"]["certificate_serial"].clone();
    assert_ne!(before, after);
    let key_after = std::fs::read(state.join("certs/current/device.tpmkey")).unwrap();
    assert_ne!(key_before, key_after, "every renewal makes a fresh TPM key");
    assert!(audit_record(&cluster, "renewed").is_some());
    assert_no_private_key(&state);

    // The same TPM enrolling as another device (re-imaged, or its identity copied) is shown, and
    // left to an operator.
    agent.terminate();
    assert_eq!(
        ek_fingerprint_read_with_tpm2_tools(&swtpm, &root),
        ek,
        "the fingerprint is of the TPM's own EK certificate"
    );
    let state_2 = root.join("state-2");
    let log_2 = root.join("agent-2.log");
    let _second = ChildGuard(
        cluster
            .agent_command(&config, "edge-tpm-2", &["site=lab"], &state_2, &log_2)
            .spawn()
            .unwrap(),
    );
    wait("the second request from the same TPM", TIMEOUT, || {
        enrollment(&cluster, "edge-tpm-2")["tpm_ek_fingerprint"] == ek.as_str()
    });
    let second = enrollment(&cluster, "edge-tpm-2");
    assert_eq!(second["state"], "PENDING", "{second}");
    assert_eq!(second["same_tpm_as"], serde_json::json!(["edge-tpm"]));
    let listed = cluster.flotctl_ok(&["get", "enrollments"]);
    assert!(
        listed.contains("verified, same TPM as edge-tpm"),
        "{listed}"
    );
    assert_no_private_key(&state_2);
}

#[test]
fn an_ek_certificate_from_an_untrusted_manufacturer_is_refused_audited_and_not_recorded() {
    let swtpm = Swtpm::start();
    let stranger = Swtpm::start();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let cluster = Cluster::new(&root);
    // The control plane trusts another TPM's manufacturer, not this one's.
    let bundle = stranger.ca_bundle().display().to_string();
    let _server = cluster.start_server_with(1, &["--tpm-ca", &bundle, "--auto-approve-tpm"]);
    cluster.wait_until_serving();
    let config = tpm_agent_config(&cluster, &swtpm);
    let log = root.join("agent.log");
    let mut agent = ChildGuard(
        cluster
            .agent_command(&config, "edge-tpm", &[], &root.join("state"), &log)
            .spawn()
            .unwrap(),
    );
    wait("the agent to give up", TIMEOUT, || {
        matches!(agent.0.try_wait(), Ok(Some(_)))
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("not signed by a trusted TPM manufacturer CA"),
        "{text}"
    );
    assert_eq!(
        cluster.flotctl_json(&["get", "enrollments"]).unwrap(),
        serde_json::json!([])
    );
    let refused = audit_record(&cluster, "rejected").expect("the refusal is audited");
    assert!(
        refused["reason"]
            .as_str()
            .unwrap()
            .contains("enrollment of edge-tpm: TPM attestation refused"),
        "{refused}"
    );
    assert_eq!(refused["proof"], "tpm-attestation", "{refused}");
    cluster.flotctl_ok(&["audit", "verify"]);
}

#[test]
fn a_tpm_backed_agent_offline_past_expiry_recovers_with_its_tpm_key() {
    let swtpm = Swtpm::start();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let cluster = Cluster::new(&root);
    let bundle = swtpm.ca_bundle().display().to_string();
    let _server = cluster.start_server_with(
        1,
        &[
            "--tpm-ca",
            &bundle,
            "--auto-approve-tpm",
            "--device-cert-validity",
            "10s",
            "--renew-before",
            "2s",
            "--recovery-window",
            "5m",
        ],
    );
    cluster.wait_until_serving();
    let config = tpm_agent_config(&cluster, &swtpm);
    let state = root.join("state");
    let log = root.join("agent-1.log");
    let mut agent = ChildGuard(
        cluster
            .agent_command(&config, "edge-tpm", &[], &state, &log)
            .spawn()
            .unwrap(),
    );
    wait("the TPM agent's session", TIMEOUT, || {
        count_lines(&log, "session established") >= 1
    });
    agent.terminate();
    let expired_key = std::fs::read(state.join("certs/current/device.tpmkey")).unwrap();
    // Offline until the ten-second certificate has expired.
    std::thread::sleep(Duration::from_secs(12));

    let log = root.join("agent-2.log");
    let _agent = ChildGuard(
        cluster
            .agent_command(&config, "edge-tpm", &[], &state, &log)
            .spawn()
            .unwrap(),
    );
    wait("recovery signed by the TPM, and a session", TIMEOUT, || {
        count_lines(&log, "recovered from an expired certificate") == 1
            && count_lines(&log, "session established") >= 1
    });
    let recovered_key = std::fs::read(state.join("certs/current/device.tpmkey")).unwrap();
    assert_ne!(expired_key, recovered_key, "recovery makes a fresh TPM key");
    assert!(audit_record(&cluster, "recovered").is_some());
    assert_no_private_key(&state);
}

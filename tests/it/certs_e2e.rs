//! The certificate lifecycle end to end with real processes and certificates of seconds: renewal
//! cycles with no operator action (every issued certificate checked by `openssl verify`, the
//! agent's pair sampled throughout), SIGKILL at every step of the swap, recovery of an expired
//! certificate within the window and refusal after it, and revocation of a connected agent.
//! SQLite by default; PostgreSQL when FLOTILLA_TEST_DATABASE_URL is set.

use crate::support;

use flotilla::identity::{Identity, Role};
use flotilla::pki::{cert_info_pem, identity_pem, sha256_hex, verify_issued_by, verify_signed_by};
use rcgen::{KeyPair, PublicKeyData};
use serde_json::Value;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use support::cluster::{
    Cluster, RENEWED, SESSIONS, agent_counter, agent_counter_now, count_lines, wait,
};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Reads the agent's current pair the way the agent does (one version directory) and checks it:
/// signed by the CA, for this key, naming the device, within its validity. `Ok(None)` when the
/// directory changed under the reader (a swap or clean-up in progress): not a failure, read again.
fn check_pair(state: &Path, ca_pem: &str, device_id: &str) -> Result<Option<String>, String> {
    check_pair_at(state, ca_pem, device_id, true)
}

fn check_pair_at(
    state: &Path,
    ca_pem: &str,
    device_id: &str,
    unexpired: bool,
) -> Result<Option<String>, String> {
    let certs = state.join("certs");
    let Ok(version) = std::fs::read_link(certs.join("current")) else {
        return Ok(None);
    };
    let dir = certs.join(version);
    let (Ok(key_pem), Ok(cert_pem)) = (
        std::fs::read_to_string(dir.join("device.key")),
        std::fs::read_to_string(dir.join("device.crt")),
    ) else {
        return Ok(None);
    };
    let chained = if unexpired {
        verify_issued_by(&cert_pem, ca_pem)
    } else {
        verify_signed_by(&cert_pem, ca_pem)
    };
    chained.map_err(|e| format!("{}: {e}", dir.display()))?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| e.to_string())?;
    let info = cert_info_pem(&cert_pem).map_err(|e| e.to_string())?;
    if info.key_fingerprint != sha256_hex(&key.subject_public_key_info()) {
        return Err(format!(
            "{}: certificate and key do not match",
            dir.display()
        ));
    }
    if identity_pem(&cert_pem).map_err(|e| e.to_string())? != Identity::new(Role::Device, device_id)
    {
        return Err(format!(
            "{}: certificate names another device",
            dir.display()
        ));
    }
    Ok(Some(info.serial))
}

/// A pair that checks out, retrying reads that raced with a swap.
fn valid_pair(state: &Path, ca_pem: &str, device_id: &str) -> String {
    checked_pair(state, ca_pem, device_id, true)
}

fn checked_pair(state: &Path, ca_pem: &str, device_id: &str, unexpired: bool) -> String {
    for _ in 0..100 {
        match check_pair_at(state, ca_pem, device_id, unexpired) {
            Ok(Some(serial)) => return serial,
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(problem) => panic!("invalid pair on disk: {problem}"),
        }
    }
    panic!("no readable pair in {}", state.display());
}

fn device_json(cluster: &Cluster, name: &str) -> Value {
    cluster
        .flotctl_json(&["get", "device", name])
        .unwrap_or(Value::Null)
}

fn audit_kinds(cluster: &Cluster) -> Vec<String> {
    cluster
        .flotctl_json(&["audit", "list"])
        .and_then(|v| {
            v.as_array().map(|a| {
                // Devices' certificate records: credential records name their target.
                a.iter()
                    .filter(|r| r["target"].as_str().unwrap_or_default().is_empty())
                    .map(|r| r["kind"].as_str().unwrap_or_default().to_string())
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// Starts a cluster with `server_args`, enrolls `edge-1` and returns it with its id, running.
fn enrolled(
    root: &Path,
    server_args: &[&str],
) -> (Cluster, support::ChildGuard, support::ChildGuard, String) {
    let cluster = Cluster::new(root);
    let server = cluster.start_server_with(1, server_args);
    cluster.wait_until_serving();
    let agent = cluster.start_agent(&root.join("agent-0.log"));
    wait("the enrollment request", TIMEOUT, || {
        cluster
            .flotctl_json(&["get", "enrollments"])
            .is_some_and(|v| v[0]["name"] == "edge-1")
    });
    cluster.flotctl_ok(&["approve", "enrollment", "edge-1"]);
    wait("edge-1's session", TIMEOUT, || {
        agent_counter(&root.join("agent-0.log"), SESSIONS).is_some_and(|n| n >= 1)
    });
    let id = device_json(&cluster, "edge-1")["metadata"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    (cluster, server, agent, id)
}

fn ca_pem(cluster: &Cluster) -> String {
    std::fs::read_to_string(cluster.data.join("ca/ca.crt")).unwrap()
}

#[test]
fn agents_renew_before_expiry_without_operators_and_never_hold_a_bad_pair() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let (cluster, _server, _agent, id) = enrolled(
        &root,
        &["--device-cert-validity", "30s", "--renew-before", "20s"],
    );
    let ca = ca_pem(&cluster);
    let state = root.join("agent-state");

    // Sample the agent's pair continuously while it renews.
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, samples, state, ca, id) = (
            stop.clone(),
            samples.clone(),
            state.clone(),
            ca.clone(),
            id.clone(),
        );
        std::thread::spawn(move || -> Result<(), String> {
            while !stop.load(Ordering::Relaxed) {
                if check_pair(&state, &ca, &id)?.is_some() {
                    samples.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            Ok(())
        })
    };
    // Issued (audited on the server) and swapped in (logged by the agent a moment later).
    let log = root.join("agent-0.log");
    wait("three renewals", Duration::from_secs(90), || {
        audit_kinds(&cluster)
            .iter()
            .filter(|k| *k == "renewed")
            .count()
            >= 3
            && agent_counter(&log, RENEWED).is_some_and(|n| n >= 3)
    });
    stop.store(true, Ordering::Relaxed);
    sampler
        .join()
        .unwrap()
        .expect("the agent always held a valid, matching pair");
    assert!(
        samples.load(Ordering::Relaxed) > 100,
        "the pair was sampled throughout"
    );

    assert!(agent_counter_now(&log, RENEWED) >= 3);
    assert_eq!(
        count_lines(&log, "enrollment request submitted"),
        1,
        "never re-enrolled"
    );
    wait(
        "edge-1 online and SYNCED on its newest certificate",
        TIMEOUT,
        || {
            let device = device_json(&cluster, "edge-1");
            let serial = valid_pair(&state, &ca, &id);
            device["status"]["online"] == true
                && device["status"]["sync_state"] == "SYNCED"
                && device["status"]["certificate_serial"] == serial.as_str()
        },
    );

    // Every certificate ever issued verifies against the CA with openssl.
    let certificates = cluster.flotctl_json(&["cert", "list"]).unwrap();
    let certificates = certificates.as_array().unwrap();
    assert!(certificates.len() >= 4);
    for (i, certificate) in certificates.iter().enumerate() {
        let path = root.join(format!("issued-{i}.pem"));
        std::fs::write(&path, certificate["certificate_pem"].as_str().unwrap()).unwrap();
        let out = Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(cluster.data.join("ca/ca.crt"))
            .arg("-no_check_time")
            .arg(&path)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl verify {}: {}{}",
            path.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let verified = cluster.flotctl_ok(&["audit", "verify"]);
    assert!(verified.contains("intact"), "{verified}");
}

/// Where the agent can be stopped dead during a renewal, in order.
const FAILPOINTS: &[&str] = &[
    "renew:pending-saved",
    "swap:staged",
    "swap:version-written",
    "swap:previous-linked",
    "swap:current-switched",
    "swap:pending-cleared",
    "confirm:previous-unlinked",
];

#[test]
fn power_loss_at_any_step_of_the_swap_leaves_a_valid_pair_then_revocation_cuts_the_agent_off() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    // Seven renewals in a row: more than the default per-device issuance limit allows.
    let (cluster, _server, mut agent, id) = enrolled(&root, &["--max-issuances-per-device", "20"]);
    let ca = ca_pem(&cluster);
    let state = root.join("agent-state");
    agent.terminate();

    for (round, point) in FAILPOINTS.iter().enumerate() {
        let log = root.join(format!("agent-kill-{round}.log"));
        let mut doomed = cluster.spawn_agent_with_env(
            "edge-1",
            &["site=lab"],
            &state,
            &log,
            &[("FLOTILLA_AGENT_FAILPOINT", point)],
        );
        wait(&format!("{point}: session"), TIMEOUT, || {
            agent_counter(&log, SESSIONS).is_some_and(|n| n >= 1)
        });
        cluster.flotctl_ok(&["cert", "renew", "--device", "edge-1"]);
        let mut status = None;
        wait(
            &format!("{point}: the agent killed at the failpoint"),
            TIMEOUT,
            || {
                status = doomed.0.try_wait().unwrap();
                status.is_some()
            },
        );
        assert_eq!(
            status.unwrap().signal(),
            Some(9),
            "{point}: died of SIGKILL"
        );
        assert!(count_lines(&log, "failpoint reached") == 1, "{point}");
        valid_pair(&state, &ca, &id);

        // After the restart the renewal completes and the agent runs on the newest certificate.
        let log = root.join(format!("agent-after-{round}.log"));
        let mut revived = cluster.spawn_agent("edge-1", &["site=lab"], &state, &log);
        wait(
            &format!("{point}: renewal completed after restart"),
            TIMEOUT,
            || {
                let serial = valid_pair(&state, &ca, &id);
                let device = device_json(&cluster, "edge-1");
                device["status"]["online"] == true
                    && device["status"]["certificate_serial"] == serial.as_str()
                    && !state.join("certs/pending").exists()
                    && !state.join("certs/previous").exists()
            },
        );
        assert_eq!(
            count_lines(&log, "enrollment request submitted"),
            0,
            "{point}"
        );
        revived.terminate();
    }
    let renewed = audit_kinds(&cluster)
        .iter()
        .filter(|k| *k == "renewed")
        .count();
    assert_eq!(
        renewed,
        FAILPOINTS.len(),
        "one issuance per renewal, however often retried"
    );

    // Revocation: the open stream closes and the certificate is refused from then on.
    let log = root.join("agent-revoked.log");
    let _agent = cluster.spawn_agent("edge-1", &["site=lab"], &state, &log);
    wait("the session before revocation", TIMEOUT, || {
        count_lines(&log, "session established") >= 1
    });
    cluster.flotctl_ok(&["cert", "revoke", "--device", "edge-1", "--reason", "stolen"]);
    wait("the device offline after revocation", TIMEOUT, || {
        device_json(&cluster, "edge-1")["status"]["online"] == false
    });
    wait("reconnection refused as revoked", TIMEOUT, || {
        count_lines(&log, "has been revoked") >= 1
    });
    assert_eq!(count_lines(&log, "session established"), 1);
    assert_eq!(
        audit_kinds(&cluster).last().map(String::as_str),
        Some("revoked")
    );
}

fn not_after(cluster: &Cluster) -> i64 {
    let certificates = cluster.flotctl_json(&["cert", "list"]).unwrap();
    let current = certificates
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["current"] == true)
        .unwrap()
        .clone();
    cert_info_pem(current["certificate_pem"].as_str().unwrap())
        .unwrap()
        .not_after
}

fn sleep_until_unix(deadline: i64) {
    loop {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        if now >= deadline as f64 {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_agent_offline_past_expiry_recovers_within_the_window_and_is_refused_after_it() {
    let tmp = tempfile::tempdir().unwrap();
    let root: PathBuf = tmp.path().to_path_buf();
    let (cluster, _server, mut agent, id) = enrolled(
        &root,
        &[
            "--device-cert-validity",
            "10s",
            "--renew-before",
            "2s",
            "--recovery-window",
            "8s",
        ],
    );
    agent.terminate();
    let state = root.join("agent-state");
    let first = valid_pair(&state, &ca_pem(&cluster), &id);
    sleep_until_unix(not_after(&cluster) + 2);

    let log = root.join("agent-recover.log");
    let mut agent = cluster.spawn_agent("edge-1", &["site=lab"], &state, &log);
    wait("recovery and a session", TIMEOUT, || {
        count_lines(&log, "recovered from an expired certificate") == 1
            && agent_counter(&log, SESSIONS).is_some_and(|n| n >= 1)
    });
    agent.terminate();
    let second = valid_pair(&state, &ca_pem(&cluster), &id);
    assert_ne!(first, second, "a new certificate");
    assert!(audit_kinds(&cluster).contains(&"recovered".to_string()));

    // Offline again, this time past expiry plus the recovery window.
    sleep_until_unix(not_after(&cluster) + 8 + 2);
    let log = root.join("agent-too-late.log");
    let _agent = cluster.spawn_agent("edge-1", &["site=lab"], &state, &log);
    wait("recovery refused with advice to re-enroll", TIMEOUT, || {
        count_lines(&log, "enroll this device again") >= 1
    });
    assert_eq!(count_lines(&log, "session established"), 0);
    assert_eq!(
        audit_kinds(&cluster).last().map(String::as_str),
        Some("rejected")
    );
    // The expired pair is kept, intact: it is the device's proof should the window be widened.
    checked_pair(&state, &ca_pem(&cluster), &id, false);
}

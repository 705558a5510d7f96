//! The certificate lifecycle over real mTLS, in process: renewal on the stream (idempotent, fresh
//! keys only), refusals with audit records, the scheduler and forced renewals, revocation,
//! recovery of expired certificates, device deletion, and tamper detection of the audit trail by
//! the real `flotctl`. SQLite, or PostgreSQL with FLOTILLA_TEST_DATABASE_URL.

use crate::support;

use diesel::{Connection, RunQueryDsl};
use flotilla::control::Policy;
use flotilla::identity::{Identity, Role};
use flotilla::pki::{cert_info_pem, identity_pem, sha256_hex, verify_issued_by};
use flotilla::proto::admin::v1 as admin;
use flotilla::proto::admin::v1::certificate_service_client::CertificateServiceClient;
use flotilla::proto::admin::v1::device_service_client::DeviceServiceClient;
use flotilla::proto::agent::v1 as agent;
use flotilla::proto::agent::v1::enrollment_service_client::EnrollmentServiceClient;
use flotilla::signature::recovery_message;
use flotilla::store::DbConnection;
use rcgen::{KeyPair, PublicKeyData, SigningKey};
use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;
use support::sim::RawSession;
use support::{TestServer, binary, channel, enroll_request};
use tonic::Code;

/// Enrolls a device, returning its credentials, id and key.
async fn device(server: &TestServer, name: &str) -> (flotilla::client::ClientCredentials, String) {
    server.enroll_device(name).await
}

fn csr_for(key: &KeyPair, identity: Option<&str>) -> String {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    if let Some(uri) = identity {
        params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    }
    params.serialize_request(key).unwrap().pem().unwrap()
}

fn request(id: &str, csr_pem: &str) -> agent::agent_message::Kind {
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

fn kinds(records: &[admin::AuditRecord]) -> Vec<String> {
    records.iter().map(|r| r.kind.clone()).collect()
}

#[tokio::test]
async fn renewal_on_the_stream_is_checked_idempotent_and_audited() {
    let server = TestServer::start().await;
    let (creds, id) = device(&server, "renewer").await;
    let mut session = RawSession::open(&server.agent_url, &creds, &id)
        .await
        .unwrap();
    let fresh = KeyPair::generate().unwrap();
    let csr = csr_for(&fresh, Some(&Identity::new(Role::Device, &id).uri()));
    session.send(request("r1", &csr)).await;
    let Answer::Issued(issued) = answer(&mut session).await else {
        panic!("renewal refused");
    };
    assert_eq!(issued.request_id, "r1");
    verify_issued_by(&issued.certificate_pem, &server.ca_pem()).unwrap();
    let info = cert_info_pem(&issued.certificate_pem).unwrap();
    assert_eq!(
        info.key_fingerprint,
        sha256_hex(&fresh.subject_public_key_info())
    );
    assert_eq!(
        identity_pem(&issued.certificate_pem).unwrap(),
        Identity::new(Role::Device, &id)
    );

    // The same CSR again: the same certificate, not a second one.
    session.send(request("r2", &csr)).await;
    let Answer::Issued(again) = answer(&mut session).await else {
        panic!("retry refused");
    };
    assert_eq!(again.certificate_pem, issued.certificate_pem);
    assert_eq!(kinds(&audit(&server).await), ["issued", "renewed"]);

    let shown = DeviceServiceClient::new(channel(&server.admin_url, &server.admin_creds()).await)
        .get_device(admin::GetDeviceRequest {
            name: "renewer".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let status = shown.status.unwrap();
    assert_eq!(status.certificate_serial, info.serial);
    assert_eq!(status.renewal_state(), admin::RenewalState::Valid);

    // A device that refuses what it was given says so, and that is audited too.
    session
        .send(agent::agent_message::Kind::CertificateRejected(
            agent::CertificateRejected {
                request_id: "r2".into(),
                serial: info.serial.clone(),
                reason: "issued certificate is for a different key".into(),
            },
        ))
        .await;
    let records = support::wait_for(
        "the device's refusal audited",
        Duration::from_secs(10),
        || {
            let server = &server;
            async move {
                let records = audit(server).await;
                (records.len() == 3).then_some(records)
            }
        },
    )
    .await;
    let refusal = &records[2];
    assert_eq!(
        (
            refusal.kind.as_str(),
            refusal.proof.as_str(),
            refusal.outcome.as_str()
        ),
        ("rejected", "device-validation", "refused")
    );
    assert!(
        refusal.reason.contains("different key"),
        "{}",
        refusal.reason
    );
}

/// An RSA-1024 CSR (a weak, unsupported key) made by openssl.
fn weak_csr() -> String {
    let out = Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "rsa:1024",
            "-nodes",
            "-keyout",
            "/dev/null",
            "-subj",
            "/CN=weak",
        ])
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn bad_renewal_requests_are_refused_with_a_reason_and_an_audit_record() {
    let server = TestServer::start().await;
    let (creds, id) = device(&server, "bad").await;
    let mut session = RawSession::open(&server.agent_url, &creds, &id)
        .await
        .unwrap();
    let current_key = KeyPair::from_pem(&creds.key_pem).unwrap();
    let other_key = KeyPair::generate().unwrap();
    for (csr, fragment) in [
        ("garbage".to_string(), "not PEM"),
        (
            csr_for(&other_key, Some("flotilla://device/somebody-else")),
            "asks for identity flotilla://device/somebody-else",
        ),
        (csr_for(&current_key, None), "reuses the key"),
        (weak_csr(), "unsupported key type"),
    ] {
        session.send(request("bad", &csr)).await;
        let Answer::Refused(refused) = answer(&mut session).await else {
            panic!("{fragment}: issued");
        };
        assert!(refused.reason.contains(fragment), "{}", refused.reason);
        assert!(!refused.retryable);
    }
    let records = audit(&server).await;
    assert_eq!(
        kinds(&records),
        ["issued", "rejected", "rejected", "rejected", "rejected"]
    );
    assert!(
        records[1..]
            .iter()
            .all(|r| r.outcome == "refused" && r.device_id == id)
    );
}

#[tokio::test]
async fn the_scheduler_asks_due_devices_and_operators_can_force_a_renewal() {
    // Certificates of an hour that renew two hours ahead are due from the start.
    let server = TestServer::start_with(Policy {
        device_cert_validity: Duration::from_secs(3600),
        renew_before: Duration::from_secs(7200),
        ..Policy::default()
    })
    .await;
    let (creds, id) = device(&server, "due").await;
    let mut session = RawSession::open(&server.agent_url, &creds, &id)
        .await
        .unwrap();
    let directive = session
        .next_matching(|kind| match kind {
            agent::server_message::Kind::RenewCertificate(r) => Some(r),
            _ => None,
        })
        .await
        .expect("a renewal directive");
    let not_after = cert_info_pem(&creds.cert_pem).unwrap().not_after;
    assert_eq!(directive.deadline.unwrap().seconds, not_after);

    let relaxed = TestServer::start().await;
    let (creds, id) = device(&relaxed, "forced").await;
    let mut certificates =
        CertificateServiceClient::new(channel(&relaxed.admin_url, &relaxed.admin_creds()).await);
    let offline = certificates
        .renew_certificate(admin::RenewCertificateRequest {
            device: "forced".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(offline.code(), Code::FailedPrecondition);
    let mut session = RawSession::open(&relaxed.agent_url, &creds, &id)
        .await
        .unwrap();
    session
        .next_matching(|kind| {
            matches!(kind, agent::server_message::Kind::Accepted(_)).then_some(())
        })
        .await
        .unwrap();
    certificates
        .renew_certificate(admin::RenewCertificateRequest {
            device: "forced".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let directive = session
        .next_matching(|kind| match kind {
            agent::server_message::Kind::RenewCertificate(r) => Some(r),
            _ => None,
        })
        .await
        .expect("a forced renewal directive");
    assert!(
        directive.reason.contains("operator"),
        "{}",
        directive.reason
    );

    // By selector: every connected match is asked, offline and non-matching ones are not.
    let site = |s: &str| BTreeMap::from([("site".to_string(), s.to_string())]);
    let (creds_a, id_a) = relaxed.enroll_device_with("berlin-a", site("berlin")).await;
    relaxed.enroll_device_with("berlin-b", site("berlin")).await;
    let (creds_c, id_c) = relaxed.enroll_device_with("paris-c", site("paris")).await;
    let mut berlin = RawSession::open(&relaxed.agent_url, &creds_a, &id_a)
        .await
        .unwrap();
    let mut paris = RawSession::open(&relaxed.agent_url, &creds_c, &id_c)
        .await
        .unwrap();
    for session in [&mut berlin, &mut paris] {
        session
            .next_matching(|kind| {
                matches!(kind, agent::server_message::Kind::Accepted(_)).then_some(())
            })
            .await
            .unwrap();
    }
    let reached = certificates
        .renew_certificate(admin::RenewCertificateRequest {
            selector: "site=berlin".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((reached.asked, reached.not_connected), (1, 1));
    berlin
        .next_matching(|kind| match kind {
            agent::server_message::Kind::RenewCertificate(r) => Some(r),
            _ => None,
        })
        .await
        .expect("the connected berlin device is asked");
    assert!(
        paris
            .next_matching_within(Duration::from_millis(500), |kind| match kind {
                agent::server_message::Kind::RenewCertificate(r) => Some(r),
                _ => None,
            })
            .await
            .flatten()
            .is_none(),
        "a device outside the selector is not asked"
    );
    for bad in [
        admin::RenewCertificateRequest::default(),
        admin::RenewCertificateRequest {
            device: "forced".into(),
            selector: "site=berlin".into(),
        },
        admin::RenewCertificateRequest {
            selector: "site in (".into(),
            ..Default::default()
        },
    ] {
        let refused = certificates.renew_certificate(bad).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    }
}

#[tokio::test]
async fn revocation_closes_the_stream_and_refuses_the_certificate() {
    let server = TestServer::start().await;
    let (creds, id) = device(&server, "revoked").await;
    let mut session = RawSession::open(&server.agent_url, &creds, &id)
        .await
        .unwrap();
    session
        .next_matching(|kind| {
            matches!(kind, agent::server_message::Kind::Accepted(_)).then_some(())
        })
        .await
        .unwrap();
    let mut certificates =
        CertificateServiceClient::new(channel(&server.admin_url, &server.admin_creds()).await);
    let revoked = certificates
        .revoke_certificate(admin::RevokeCertificateRequest {
            device: "revoked".into(),
            reason: "stolen".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .revoked_serials;
    assert_eq!(revoked, [cert_info_pem(&creds.cert_pem).unwrap().serial]);
    // The open stream is told to go and ends.
    let ended = session.next_matching(|_| None::<()>).await;
    assert!(ended.is_none(), "the stream ended");
    let refused = RawSession::open(&server.agent_url, &creds, &id)
        .await
        .err()
        .expect("a revoked certificate is refused");
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(
        refused.message().contains("revoked"),
        "{}",
        refused.message()
    );
    assert_eq!(kinds(&audit(&server).await), ["issued", "revoked"]);

    for (request, code) in [
        (
            admin::RevokeCertificateRequest {
                serial: "00".into(),
                ..Default::default()
            },
            Code::NotFound,
        ),
        (
            admin::RevokeCertificateRequest::default(),
            Code::InvalidArgument,
        ),
    ] {
        let status = certificates.revoke_certificate(request).await.unwrap_err();
        assert_eq!(status.code(), code);
    }
}

fn recover_request(
    device_id: &str,
    nonce: &str,
    previous_cert: &str,
    signer: &KeyPair,
    fresh: &KeyPair,
) -> agent::RecoverRequest {
    let csr_pem = csr_for(fresh, None);
    let signature = signer
        .sign(&recovery_message(device_id, nonce, &csr_pem))
        .unwrap();
    agent::RecoverRequest {
        device_id: device_id.into(),
        nonce: nonce.into(),
        previous_certificate_pem: previous_cert.into(),
        signature,
        csr_pem,
    }
}

#[tokio::test]
async fn an_expired_device_recovers_with_its_previous_key_and_bad_proofs_are_refused() {
    let server = TestServer::start_with(Policy {
        device_cert_validity: Duration::from_secs(2),
        recovery_window: Duration::from_secs(600),
        ..Policy::default()
    })
    .await;
    let (creds, id) = device(&server, "sleeper").await;
    let (other_creds, _) = device(&server, "neighbour").await;
    // Validity is whole seconds: the control plane's clock moves past the certificate's last one.
    server.control.clock().advance(Duration::from_millis(3500));
    let expired = RawSession::open(&server.agent_url, &creds, &id).await.err();
    assert_eq!(expired.map(|s| s.code()), Some(Code::Unauthenticated));

    let mut enroll =
        EnrollmentServiceClient::new(channel(&server.agent_url, &server.enrollment_creds()).await);
    let old_key = KeyPair::from_pem(&creds.key_pem).unwrap();
    let nonce = |enroll: &mut EnrollmentServiceClient<tonic::transport::Channel>| {
        let mut enroll = enroll.clone();
        let id = id.clone();
        async move {
            enroll
                .recovery_challenge(agent::RecoveryChallengeRequest { device_id: id })
                .await
                .unwrap()
                .into_inner()
                .nonce
        }
    };

    // Signed by a key that is not the certificate's.
    let n = nonce(&mut enroll).await;
    let stranger = KeyPair::generate().unwrap();
    let fresh = KeyPair::generate().unwrap();
    let status = enroll
        .recover(recover_request(&id, &n, &creds.cert_pem, &stranger, &fresh))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::PermissionDenied,
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("does not verify"),
        "{}",
        status.message()
    );
    // The nonce was used up by that attempt: replaying it fails even with a good signature.
    let status = enroll
        .recover(recover_request(&id, &n, &creds.cert_pem, &old_key, &fresh))
        .await
        .unwrap_err();
    assert!(
        status.message().contains("already used"),
        "{}",
        status.message()
    );
    // Another device's certificate proves nothing about this one.
    let n = nonce(&mut enroll).await;
    let other_key = KeyPair::from_pem(&other_creds.key_pem).unwrap();
    let status = enroll
        .recover(recover_request(
            &id,
            &n,
            &other_creds.cert_pem,
            &other_key,
            &fresh,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // The previous key cannot be certified again.
    let n = nonce(&mut enroll).await;
    let status = enroll
        .recover(recover_request(
            &id,
            &n,
            &creds.cert_pem,
            &old_key,
            &old_key,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());

    // The real proof works.
    let n = nonce(&mut enroll).await;
    let recovered = enroll
        .recover(recover_request(&id, &n, &creds.cert_pem, &old_key, &fresh))
        .await
        .unwrap()
        .into_inner();
    verify_issued_by(&recovered.certificate_pem, &server.ca_pem()).unwrap();
    let info = cert_info_pem(&recovered.certificate_pem).unwrap();
    assert_eq!(
        info.key_fingerprint,
        sha256_hex(&fresh.subject_public_key_info())
    );
    let renewed = flotilla::client::ClientCredentials {
        cert_pem: recovered.certificate_pem,
        key_pem: fresh.serialize_pem(),
        ..creds.clone()
    };
    RawSession::open(&server.agent_url, &renewed, &id)
        .await
        .expect("the recovered certificate opens a session");

    let records = audit(&server).await;
    let recovery_kinds: Vec<&str> = records[2..].iter().map(|r| r.kind.as_str()).collect();
    // The recovered certificate supersedes the expired one: it cannot serve a second recovery.
    assert_eq!(
        recovery_kinds,
        [
            "rejected",
            "rejected",
            "rejected",
            "rejected",
            "recovered",
            "superseded"
        ]
    );
    let recovered_record = &records[records.len() - 2];
    assert_eq!(recovered_record.proof, "previous-key");
    let superseded = records.last().unwrap();
    assert_eq!(
        superseded.serial,
        cert_info_pem(&creds.cert_pem).unwrap().serial
    );

    // Management credentials cannot use the recovery API at all.
    let mut as_device = EnrollmentServiceClient::new(channel(&server.agent_url, &renewed).await);
    let status = as_device
        .recovery_challenge(agent::RecoveryChallengeRequest {
            device_id: id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn recovery_after_the_window_is_refused_with_advice_to_re_enroll() {
    let server = TestServer::start_with(Policy {
        device_cert_validity: Duration::from_secs(1),
        recovery_window: Duration::from_secs(1),
        ..Policy::default()
    })
    .await;
    let (creds, id) = device(&server, "too-late").await;
    // Past the certificate's expiry and the recovery window after it.
    server.control.clock().advance(Duration::from_millis(3000));
    let mut enroll =
        EnrollmentServiceClient::new(channel(&server.agent_url, &server.enrollment_creds()).await);
    let nonce = enroll
        .recovery_challenge(agent::RecoveryChallengeRequest {
            device_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .nonce;
    let old_key = KeyPair::from_pem(&creds.key_pem).unwrap();
    let status = enroll
        .recover(recover_request(
            &id,
            &nonce,
            &creds.cert_pem,
            &old_key,
            &KeyPair::generate().unwrap(),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("enroll the device again"),
        "{}",
        status.message()
    );
    assert_eq!(audit(&server).await.last().unwrap().kind, "rejected");
}

#[tokio::test]
async fn deleting_a_device_revokes_its_certificates_and_frees_its_name() {
    let server = TestServer::start().await;
    let (creds, id) = device(&server, "retired").await;
    let mut devices =
        DeviceServiceClient::new(channel(&server.admin_url, &server.admin_creds()).await);
    let revoked = devices
        .delete_device(admin::DeleteDeviceRequest {
            name: "retired".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .revoked_serials;
    assert_eq!(revoked.len(), 1);
    let gone = devices
        .get_device(admin::GetDeviceRequest {
            name: "retired".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    assert!(
        RawSession::open(&server.agent_url, &creds, &id)
            .await
            .is_err()
    );
    let key = KeyPair::generate().unwrap();
    let again =
        EnrollmentServiceClient::new(channel(&server.agent_url, &server.enrollment_creds()).await)
            .enroll(enroll_request("retired", support::csr(&key)))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(
        again.state(),
        agent::EnrollmentState::Pending,
        "the name can enroll again"
    );
}

/// Runs `flotctl audit verify` against the server; returns (success, stdout + stderr).
fn flotctl_verify(server: &TestServer) -> (bool, String) {
    let out = Command::new(binary("flotctl"))
        .arg("--config")
        .arg(server.dir.ctl_config())
        .args(["audit", "verify"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

async fn trail_of_four(server: &TestServer) {
    device(server, "one").await;
    device(server, "two").await;
    device(server, "three").await;
    CertificateServiceClient::new(channel(&server.admin_url, &server.admin_creds()).await)
        .revoke_certificate(admin::RevokeCertificateRequest {
            device: "one".into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_with_any_audit_record_is_detected_and_named() {
    for (tamper, statements, named) in [
        (
            "a changed field",
            vec!["UPDATE certificate_audit SET reason = 'nothing happened' WHERE seq = 2"],
            "audit record 2:",
        ),
        (
            "a deleted record",
            vec!["DELETE FROM certificate_audit WHERE seq = 2"],
            "audit record 3:",
        ),
        (
            "reordered records",
            vec![
                "UPDATE certificate_audit SET seq = -2 WHERE seq = 2",
                "UPDATE certificate_audit SET seq = 2 WHERE seq = 3",
                "UPDATE certificate_audit SET seq = 3 WHERE seq = -2",
            ],
            "audit record 2:",
        ),
    ] {
        let server = TestServer::start().await;
        trail_of_four(&server).await;
        let (ok, text) = flotctl_verify(&server);
        assert!(ok, "{tamper}: intact before: {text}");
        // The bootstrap admin and enrollment credentials' records first, then the devices' four,
        // each with the record of the admin call that caused it (three approvals, one revocation).
        assert!(text.contains("10 record(s) verified"), "{text}");
        let mut conn = DbConnection::establish(server.db_url()).unwrap();
        for statement in statements {
            diesel::sql_query(statement).execute(&mut conn).unwrap();
        }
        drop(conn);
        let (ok, text) = flotctl_verify(&server);
        assert!(!ok, "{tamper} went unnoticed: {text}");
        assert!(text.contains(named), "{tamper}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_slower_than_the_silence_timeout_does_not_cost_the_session() {
    // PostgreSQL behind a proxy whatever the suite runs on: the proxy makes the database slow.
    let tmp = tempfile::tempdir().unwrap();
    let db = support::TestDb::postgres_for_tests();
    let proxy = support::proxy::Proxy::start(db.server_addr()).await;
    let url = db.url_via(proxy.addr);
    let silence = Duration::from_secs(3);
    let policy = Policy {
        session: flotilla::control::SessionSettings {
            silence_timeout: silence,
            ..Default::default()
        },
        ..Policy::default()
    };
    let server = TestServer::start_on(
        policy,
        flotilla::transport::ConnectionLimits::default(),
        tmp,
        db,
        &url,
    )
    .await;
    let (creds, id) = device(&server, "patient").await;
    let mut session = RawSession::open(&server.agent_url, &creds, &id)
        .await
        .unwrap();
    // Slow statements are the point, not slow connecting: a connection opened through 700 ms of
    // latency takes longer than the pool's checkout timeout, and the store would take the
    // database for unreachable. So the pool opens its connections first, at near full speed.
    proxy.set_latency(Duration::from_millis(50));
    let store = server.control.store();
    futures::future::join_all((0..16).map(|_| store.latest_change_id())).await;
    proxy.set_latency(Duration::from_millis(700));
    let fresh = KeyPair::generate().unwrap();
    let csr = csr_for(&fresh, Some(&Identity::new(Role::Device, &id).uri()));
    let asked = std::time::Instant::now();
    session.send(request("slow", &csr)).await;
    let answered = session
        .next_matching_within(Duration::from_secs(60), |kind| match kind {
            agent::server_message::Kind::CertificateIssued(i) => Some(i),
            _ => None,
        })
        .await
        .expect("an answer within a minute")
        .expect("the certificate, on the open session");
    assert_eq!(answered.request_id, "slow");
    assert!(
        asked.elapsed() > silence,
        "the renewal took {:?}, not longer than the silence timeout",
        asked.elapsed()
    );
    proxy.set_latency(Duration::ZERO);
    // The agent speaks at once after the answer: its session must not be ended as silent.
    session
        .send(agent::agent_message::Kind::Heartbeat(agent::Heartbeat {
            sent_at: None,
        }))
        .await;
    let ended = session
        .next_matching_within(Duration::from_millis(1500), |_| None::<()>)
        .await;
    assert!(
        ended.is_none(),
        "the session ended right after a slow renewal"
    );
    assert!(server.control.hub().status(&id).unwrap().online);
}

/// A device reconnects to the same replica while its old session is still open (as every
/// renewing device does): the old session's end must not erase the record that this replica
/// holds the new one, which the other replicas read to know where the device is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_session_ending_after_its_replacement_leaves_the_new_one_on_record() {
    let tmp = tempfile::tempdir().unwrap();
    let db = support::TestDb::postgres_for_tests();
    let url = db.url.clone();
    let server = TestServer::start_on(
        Policy::default(),
        flotilla::transport::ConnectionLimits::default(),
        tmp,
        db,
        &url,
    )
    .await;
    let (creds, id) = device(&server, "reconnecting").await;
    let accepted = |kind| matches!(kind, agent::server_message::Kind::Accepted(_)).then_some(());
    let mut old = RawSession::open(&server.agent_url, &creds, &id)
        .await
        .unwrap();
    old.next_matching(accepted).await.unwrap();
    let mut new = RawSession::open(&server.agent_url, &creds, &id)
        .await
        .unwrap();
    new.next_matching(accepted).await.unwrap();
    // The new session closes the old one; the old one's end comes after the new one's start.
    assert_eq!(
        old.next_matching_within(Duration::from_secs(15), |_| None::<()>)
            .await,
        Some(None),
        "the old session ends"
    );
    server.control.flush_journal().await;

    let store = server.control.store();
    let record = store.get_devices(vec![id.clone()]).await.unwrap();
    assert_eq!(
        record[0].session_replica.as_deref(),
        Some(store.replica()),
        "the new session is on record"
    );
    drop(new);
}

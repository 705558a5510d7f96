//! The TPM code against a real software TPM (swtpm, started per test by `scripts/swtpm.sh`) and the
//! control plane's checks of what it produces: keys that sign but cannot be used in another TPM,
//! evidence that verifies and every tampering refused, and the credential challenge answered by
//! the TPM exactly once.

use super::Tpm;
use crate::keys::{DeviceKey, KeySource, StoredKey, TpmKeyBlob};
use flotilla::bootstrap::{BootstrapOptions, DataDir, prepare};
use flotilla::control::{ControlError, ControlPlane, EnrollInput, Policy, TpmPolicy, TpmProof};
use flotilla::hub::Hub;
use flotilla::identity::{Identity, Role};
use flotilla::proto::agent::v1 as pb;
use flotilla::signature::tpm_certify_qualifying_data;
use flotilla::store::{Backend, EnrollmentState, Store};
use flotilla::tpm::{Evidence, TpmError, check_evidence, make_credential};
use rcgen::{CertificateParams, KeyPair, PublicKeyData};
use std::path::Path;
use std::sync::Arc;
use swtpm::Swtpm;

#[path = "../../../tests/it/support/swtpm.rs"]
#[allow(clippy::disallowed_methods)]
mod swtpm;

fn open(swtpm: &Swtpm) -> Arc<Tpm> {
    Arc::new(Tpm::open(&swtpm.tcti).unwrap())
}

fn evidence(e: &pb::TpmEvidence) -> Evidence {
    Evidence {
        ek_certificate_der: e.ek_certificate.clone(),
        ek_public: e.ek_public.clone(),
        ak_public: e.ak_public.clone(),
        key_public: e.key_public.clone(),
        certify_info: e.certify_info.clone(),
        certify_signature: e.certify_signature.clone(),
    }
}

fn as_challenge(wrapped: flotilla::tpm::WrappedCredential) -> pb::TpmChallenge {
    pb::TpmChallenge {
        challenge_id: "c".into(),
        credential_blob: wrapped.credential_blob,
        encrypted_secret: wrapped.encrypted_secret,
    }
}

fn blob(key: &StoredKey) -> TpmKeyBlob {
    match key {
        StoredKey::Tpm(blob) => blob.clone(),
        StoredKey::Pem(_) => panic!("expected a TPM key"),
    }
}

/// A device key in the TPM and a CSR signed by it.
fn key_and_csr(keys: &KeySource) -> (StoredKey, DeviceKey, String) {
    let stored = keys.generate().unwrap();
    let signer = keys.open(&stored).unwrap();
    let csr = CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&signer)
        .unwrap()
        .pem()
        .unwrap();
    (stored, signer, csr)
}

/// A TPM key, its CSR's qualifying data, and evidence for it from `swtpm`.
struct Attested {
    tpm: Arc<Tpm>,
    keys: KeySource,
    stored: StoredKey,
    signer: DeviceKey,
    qualifying: Vec<u8>,
    good: Evidence,
}

fn attested(swtpm: &Swtpm) -> Attested {
    let tpm = open(swtpm);
    let keys = KeySource::Tpm(tpm.clone());
    let (stored, signer, csr) = key_and_csr(&keys);
    let qualifying = tpm_certify_qualifying_data(&csr);
    let good = evidence(&tpm.attest(&blob(&stored), &qualifying).unwrap());
    Attested {
        tpm,
        keys,
        stored,
        signer,
        qualifying,
        good,
    }
}

fn refusal(result: Result<flotilla::tpm::CheckedEvidence, TpmError>) -> String {
    match result {
        Err(TpmError::Refused(reason)) => reason,
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("expected a refusal, the evidence was accepted"),
    }
}

#[test]
fn a_tpm_key_signs_requests_and_handshakes_and_is_useless_in_another_tpm() {
    let swtpm = Swtpm::start();
    let keys = KeySource::Tpm(open(&swtpm));
    let (stored, signer, csr) = key_and_csr(&keys);
    let verified = flotilla::ca::csr::verify_csr_pem(&csr).expect("the TPM-signed CSR verifies");
    assert_eq!(
        verified.fingerprint,
        flotilla::pki::sha256_hex(&stored.spki().unwrap()),
        "the CSR is for the TPM key"
    );

    let DeviceKey::Tpm(tpm_signer) = &signer else {
        panic!("a TPM signer")
    };
    let handshake = b"TLS 1.3, client CertificateVerify";
    let signature = tpm_signer.sign_message(handshake).unwrap();
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_ASN1,
        signer.der_bytes(),
    )
    .verify(handshake, &signature)
    .expect("the TPM's signature verifies against the key's point");

    let on_disk = String::from_utf8(stored.to_bytes()).unwrap();
    assert!(!on_disk.contains("PRIVATE KEY"));
    assert!(KeyPair::from_pem(&on_disk).is_err());

    let other = Swtpm::start();
    let elsewhere = KeySource::Tpm(open(&other)).open(&stored).unwrap();
    let DeviceKey::Tpm(elsewhere) = elsewhere else {
        panic!("a TPM signer")
    };
    assert!(
        elsewhere.sign_message(handshake).is_err(),
        "the wrapped key cannot be loaded into another TPM"
    );
}

#[test]
fn evidence_verifies_and_every_tampering_is_refused() {
    let swtpm = Swtpm::start();
    let Attested {
        tpm: _,
        keys,
        stored: _,
        signer,
        qualifying,
        good,
    } = attested(&swtpm);
    let trusted = swtpm.trusted();
    let point = signer.der_bytes().to_vec();

    let checked = check_evidence(&good, &trusted, &point, &qualifying).unwrap();
    let (_, ek_cert) = x509_parser::parse_x509_certificate(&good.ek_certificate_der).unwrap();
    assert_eq!(
        checked.ek_fingerprint,
        flotilla::pki::sha256_hex(ek_cert.public_key().raw)
    );

    // An EK certificate from a CA that is not configured.
    let stranger = {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().der().to_vec()
    };
    let reason = refusal(check_evidence(&good, &[stranger], &point, &qualifying));
    assert!(
        reason.contains("not signed by a trusted TPM manufacturer CA"),
        "{reason}"
    );

    // A certify signature that does not verify.
    let mut forged = good.clone();
    let last = forged.certify_signature.len() - 1;
    forged.certify_signature[last] ^= 0x01;
    let reason = refusal(check_evidence(&forged, &trusted, &point, &qualifying));
    assert!(
        reason.contains("certify signature does not verify"),
        "{reason}"
    );

    // A certify of one TPM key presented with another TPM key.
    let (other_key, other_signer, _) = key_and_csr(&keys);
    let mut swapped = good.clone();
    swapped.key_public = blob(&other_key).public().unwrap();
    let reason = refusal(check_evidence(
        &swapped,
        &trusted,
        other_signer.der_bytes(),
        &qualifying,
    ));
    assert!(
        reason.contains("certify is for a different key"),
        "{reason}"
    );

    // A CSR for a key that is not the certified one (a software key).
    let software = KeyPair::generate().unwrap();
    let reason = refusal(check_evidence(
        &good,
        &trusted,
        software.der_bytes(),
        &qualifying,
    ));
    assert!(reason.contains("CSR is for a different key"), "{reason}");

    // Evidence made for another request.
    let reason = refusal(check_evidence(&good, &trusted, &point, &[0u8; 32]));
    assert!(reason.contains("different request"), "{reason}");

    // An endorsement key that is not the one the certificate is for.
    let mut other_ek = good.clone();
    other_ek.ek_public = good.ak_public.clone();
    assert!(check_evidence(&other_ek, &trusted, &point, &qualifying).is_err());
}

#[test]
fn the_tpm_activates_a_software_credential_only_for_its_attestation_key() {
    let swtpm = Swtpm::start();
    let Attested {
        tpm,
        keys: _,
        stored,
        signer,
        qualifying,
        good,
    } = attested(&swtpm);
    let checked = check_evidence(&good, &swtpm.trusted(), signer.der_bytes(), &qualifying).unwrap();

    let secret = b"a secret only this TPM can read!".to_vec();
    let wrapped = make_credential(&checked.ek, &checked.ak_name, &secret).unwrap();
    let challenge = as_challenge(wrapped);
    assert_eq!(tpm.activate(&challenge).unwrap(), secret);

    // Bound to another object's name, the TPM refuses to activate it.
    tpm.attest(&blob(&stored), &qualifying).unwrap();
    let mut other_name = checked.ak_name.clone();
    let last = other_name.len() - 1;
    other_name[last] ^= 0x01;
    let wrapped = make_credential(&checked.ek, &other_name, &secret).unwrap();
    let challenge = as_challenge(wrapped);
    assert!(tpm.activate(&challenge).is_err());
}

#[test]
fn credentials_for_an_ecc_endorsement_key_activate_too() {
    use tss_esapi::abstraction::AsymmetricAlgorithmSelection;
    use tss_esapi::interface_types::ecc::EccCurve;
    let swtpm = Swtpm::start();
    let tpm = open(&swtpm);
    let keys = KeySource::Tpm(tpm.clone());
    let (stored, _, csr) = key_and_csr(&keys);
    let evidence = tpm
        .attest_with_ek(
            AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
            &blob(&stored),
            &tpm_certify_qualifying_data(&csr),
        )
        .unwrap();
    let ek = flotilla::tpm::TpmPublic::parse(&evidence.ek_public).unwrap();
    assert!(matches!(
        ek.key,
        flotilla::tpm::public::PublicKey::Ecc { .. }
    ));
    let ak = flotilla::tpm::TpmPublic::parse(&evidence.ak_public).unwrap();
    let secret = vec![7u8; 32];
    let wrapped = make_credential(&ek, &ak.name(), &secret).unwrap();
    let challenge = as_challenge(wrapped);
    assert_eq!(tpm.activate(&challenge).unwrap(), secret);
}

/// A control plane in this process on a fresh SQLite store, trusting `swtpm`'s manufacturer CA.
async fn control_plane(dir: &Path, swtpm: &Swtpm, auto_approve: bool) -> ControlPlane {
    let data = DataDir::new(dir.join("data"));
    let prepared = prepare(
        &data,
        &BootstrapOptions {
            agent_url: "https://127.0.0.1:1".into(),
            admin_url: "https://127.0.0.1:2".into(),
            server_names: vec![],
            agent_url_given: false,
            server_cert_validity: flotilla::bootstrap::SERVER_VALIDITY,
        },
    )
    .unwrap();
    let path = dir.join("flotilla.db").display().to_string();
    let store = tokio::task::spawn_blocking(move || Store::open(Backend::Sqlite(path)))
        .await
        .unwrap()
        .unwrap();
    store.migrate().await.unwrap();
    ControlPlane::new(
        store,
        Arc::new(prepared.ca),
        Arc::new(prepared.audit_key),
        Arc::new(Hub::new()),
        Policy {
            tpm: TpmPolicy {
                trusted_cas: swtpm.trusted(),
                auto_approve,
            },
            ..Policy::default()
        },
    )
}

fn input(name: &str, csr: &str, tpm: TpmProof) -> EnrollInput {
    EnrollInput {
        csr_pem: csr.to_string(),
        device_name: name.into(),
        labels: Default::default(),
        system_info: Default::default(),
        tpm: Some(tpm),
        source_address: "127.0.0.1:4000".into(),
    }
}

fn denied(result: Result<flotilla::control::EnrollOutcome, ControlError>) -> String {
    match result {
        Err(ControlError::PermissionDenied(reason)) => reason,
        other => panic!("expected PermissionDenied, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_challenge_is_answered_by_the_tpm_once_and_never_by_a_guess_or_a_replay() {
    let swtpm = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let control = control_plane(dir.path(), &swtpm, false).await;
    let caller = Identity::new(Role::Enrollment, "shared");
    let tpm = open(&swtpm);
    let keys = KeySource::Tpm(tpm.clone());
    let (stored, _, csr) = key_and_csr(&keys);
    let attest = |csr: &str| {
        let e = tpm
            .attest(&blob(&stored), &tpm_certify_qualifying_data(csr))
            .unwrap();
        TpmProof::Evidence(evidence(&e))
    };

    // A wrong answer is refused, and uses the challenge up.
    let outcome = control
        .enroll(&caller, input("edge-tpm", &csr, attest(&csr)))
        .await
        .unwrap();
    let challenge = outcome.tpm_challenge.expect("a challenge");
    assert_eq!(outcome.state, EnrollmentState::Pending);
    let guess = TpmProof::Answer {
        challenge_id: challenge.id.clone(),
        secret: vec![0u8; 32],
    };
    let reason = denied(
        control
            .enroll(&caller, input("edge-tpm", &csr, guess))
            .await,
    );
    assert!(reason.contains("wrong answer"), "{reason}");
    let secret = tpm
        .activate(&pb::TpmChallenge {
            challenge_id: challenge.id.clone(),
            credential_blob: challenge.credential.credential_blob.clone(),
            encrypted_secret: challenge.credential.encrypted_secret.clone(),
        })
        .unwrap();
    let late = TpmProof::Answer {
        challenge_id: challenge.id.clone(),
        secret,
    };
    let reason = denied(control.enroll(&caller, input("edge-tpm", &csr, late)).await);
    assert!(reason.contains("unknown or already answered"), "{reason}");
    assert!(
        control.get_enrollment("edge-tpm").await.is_err(),
        "nothing is recorded for a request whose TPM was not proven"
    );

    // The TPM's answer to a fresh challenge is accepted once; replaying it is refused.
    let outcome = control
        .enroll(&caller, input("edge-tpm", &csr, attest(&csr)))
        .await
        .unwrap();
    let challenge = outcome.tpm_challenge.expect("a challenge");
    let secret = tpm
        .activate(&pb::TpmChallenge {
            challenge_id: challenge.id.clone(),
            credential_blob: challenge.credential.credential_blob,
            encrypted_secret: challenge.credential.encrypted_secret,
        })
        .unwrap();
    let answer = TpmProof::Answer {
        challenge_id: challenge.id.clone(),
        secret,
    };
    let outcome = control
        .enroll(&caller, input("edge-tpm", &csr, answer.clone()))
        .await
        .unwrap();
    assert!(outcome.tpm_verified);
    assert_eq!(outcome.state, EnrollmentState::Pending, "not auto-approved");
    let reason = denied(
        control
            .enroll(&caller, input("edge-tpm", &csr, answer))
            .await,
    );
    assert!(reason.contains("unknown or already answered"), "{reason}");
    let record = control.get_enrollment("edge-tpm").await.unwrap();
    assert!(record.tpm_ek_fingerprint.is_some());

    // Evidence for one key cannot get a challenge for a CSR of another.
    let (_, _, other_csr) = key_and_csr(&keys);
    let reason = denied(
        control
            .enroll(&caller, input("edge-tpm-2", &other_csr, attest(&csr)))
            .await,
    );
    assert!(reason.contains("different request"), "{reason}");
}

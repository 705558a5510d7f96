//! TPM attestation through the real enrollment API, refusals that need no TPM: a control plane
//! without manufacturer CAs refuses evidence, malformed evidence is a clear INVALID_ARGUMENT, and
//! an answer to a challenge never issued is denied — none of them records anything.

use crate::support;

use flotilla::control::{Policy, TpmPolicy};
use flotilla::proto::agent::v1 as agent;
use flotilla::proto::agent::v1::enrollment_service_client::EnrollmentServiceClient;
use support::{TestServer, channel, csr, enroll_request};
use tonic::Code;

fn with_evidence(
    name: &str,
    csr_pem: String,
    evidence: agent::TpmEvidence,
) -> agent::EnrollRequest {
    agent::EnrollRequest {
        tpm_evidence: Some(evidence),
        ..enroll_request(name, csr_pem)
    }
}

fn garbage_evidence() -> agent::TpmEvidence {
    agent::TpmEvidence {
        ek_certificate: b"not a certificate".to_vec(),
        ek_public: vec![0, 1],
        ak_public: vec![],
        key_public: vec![],
        certify_info: vec![0xff, 0x54],
        certify_signature: vec![],
    }
}

fn manufacturer_ca() -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.self_signed(&key).unwrap().der().to_vec()
}

async fn assert_no_requests(server: &TestServer) {
    let requests = server.control.list_enrollments(None).await.unwrap();
    assert!(requests.is_empty(), "{requests:?}");
}

#[tokio::test]
async fn a_control_plane_without_tpm_cas_refuses_evidence_and_records_nothing() {
    let server = TestServer::start().await;
    let mut enroll =
        EnrollmentServiceClient::new(channel(&server.agent_url, &server.enrollment_creds()).await);
    let key = rcgen::KeyPair::generate().unwrap();
    let status = enroll
        .enroll(with_evidence("edge-tpm", csr(&key), garbage_evidence()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("--tpm-ca"),
        "{}",
        status.message()
    );
    assert_no_requests(&server).await;
}

#[tokio::test]
async fn malformed_evidence_and_unknown_challenges_are_refused_clearly() {
    let server = TestServer::start_with(Policy {
        tpm: TpmPolicy {
            // Any CA will do: nothing here gets as far as the chain.
            trusted_cas: vec![manufacturer_ca()],
            auto_approve: true,
        },
        ..Policy::default()
    })
    .await;
    let mut enroll =
        EnrollmentServiceClient::new(channel(&server.agent_url, &server.enrollment_creds()).await);
    let key = rcgen::KeyPair::generate().unwrap();

    let status = enroll
        .enroll(with_evidence("edge-tpm", csr(&key), garbage_evidence()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    assert!(
        status.message().contains("EK certificate"),
        "{}",
        status.message()
    );

    let answer = agent::EnrollRequest {
        tpm_answer: Some(agent::TpmChallengeAnswer {
            challenge_id: "never-issued".into(),
            secret: vec![1; 32],
        }),
        ..enroll_request("edge-tpm", csr(&key))
    };
    let status = enroll.enroll(answer).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("unknown or already answered"),
        "{}",
        status.message()
    );
    assert_no_requests(&server).await;

    // A device without a TPM still enrolls as before, and is not TPM-verified.
    let response = enroll
        .enroll(enroll_request("edge-plain", csr(&key)))
        .await
        .unwrap()
        .into_inner();
    assert!(!response.tpm_verified);
    assert_eq!(
        response.state(),
        agent::EnrollmentState::Pending,
        "no auto-approval without a TPM"
    );
}

//! Enrollment: generate the device key (once, on the device), submit a CSR with the enrollment
//! credential, and wait — polling with backoff — until an operator approves or denies.

use crate::Agent;
use crate::backoff::Backoff;
use anyhow::{Context, Result, bail};
use flotilla::client::{ClientCredentials, connect};
use flotilla::identity::Role;
use flotilla::pki::{cert_info_pem, identity_pem, sha256_hex, verify_issued_by};
use flotilla::proto::agent::v1 as pb;
use flotilla::proto::agent::v1::enrollment_service_client::EnrollmentServiceClient;
use rcgen::CertificateParams;
use std::time::Duration;
use tonic::Code;

use crate::certs::Pair;
use crate::health::Enrollment;
use crate::keys::StoredKey;
use crate::state::Enrolled;
use flotilla::profiles::AgentConfig;

/// Loads the device key, generating it (in the TPM when configured) on first use.
fn device_key(agent: &Agent) -> Result<StoredKey> {
    let file = if agent.keys.is_tpm() {
        StoredKey::TPM_FILE
    } else {
        StoredKey::PEM_FILE
    };
    let path = agent.state.root().join(file);
    if let Some(text) = agent.state.read_optional(&path)? {
        return StoredKey::parse(file, &text)
            .with_context(|| format!("reading device key {}", path.display()));
    }
    let key = agent.keys.generate().context("generating the device key")?;
    agent.state.write(&path, &key.to_bytes(), 0o600)?;
    tracing::info!(path = %path.display(), tpm = agent.keys.is_tpm(), "generated device key");
    Ok(key)
}

fn system_info(agent: &Agent) -> pb::SystemInfo {
    pb::SystemInfo {
        hostname: crate::hostname(),
        os: std::env::consts::OS.to_string(),
        arch: std::env::consts::ARCH.to_string(),
        agent_version: agent.updater.running().version.clone(),
        boot_id: agent.boot_id.clone(),
    }
}

/// Checks an issued certificate before the agent relies on it.
fn check_certificate(cert_pem: &str, ca_pem: &str, key: &StoredKey, device_id: &str) -> Result<()> {
    verify_issued_by(cert_pem, ca_pem).context("issued certificate does not chain to the CA")?;
    let info = cert_info_pem(cert_pem)?;
    if info.key_fingerprint != sha256_hex(&key.spki()?) {
        bail!("issued certificate is for a different key");
    }
    let identity = identity_pem(cert_pem)?;
    if identity.role != Role::Device || identity.name != device_id {
        bail!("issued certificate names {identity}, expected device/{device_id}");
    }
    Ok(())
}

/// The shared enrollment credential from the agent config (also used for recovery).
pub(crate) fn enrollment_credentials(config: &AgentConfig) -> Result<ClientCredentials> {
    Ok(ClientCredentials {
        ca_pem: config.ca()?,
        cert_pem: config.enrollment_cert()?,
        key_pem: config.enrollment_key()?,
        server_name: config.server_name.clone(),
    })
}

/// The request with fresh TPM evidence that the key lives in this TPM.
async fn with_tpm_evidence(
    agent: &Agent,
    key: &StoredKey,
    request: &pb::EnrollRequest,
) -> Result<pb::EnrollRequest> {
    #[cfg(feature = "tpm")]
    if let (crate::keys::KeySource::Tpm(tpm), StoredKey::Tpm(blob)) = (&agent.keys, key) {
        let (tpm, blob) = (tpm.clone(), blob.clone());
        let qualifying = flotilla::signature::tpm_certify_qualifying_data(&request.csr_pem);
        let evidence = tokio::task::spawn_blocking(move || tpm.attest(&blob, &qualifying))
            .await?
            .context("attesting the device key with the TPM")?;
        tracing::info!(device.name = %agent.name, "sending TPM evidence");
        return Ok(pb::EnrollRequest {
            tpm_evidence: Some(evidence),
            ..request.clone()
        });
    }
    let _ = (agent, key, request);
    bail!("TPM attestation needs a TPM-backed key and an agent built with `tpm`")
}

/// Activates the control plane's credential with the TPM and sends the answer.
async fn answer_challenge(
    agent: &Agent,
    creds: &ClientCredentials,
    request: &pb::EnrollRequest,
    challenge: pb::TpmChallenge,
) -> Result<Result<(), tonic::Status>> {
    #[cfg(feature = "tpm")]
    if let crate::keys::KeySource::Tpm(tpm) = &agent.keys {
        let tpm = tpm.clone();
        let challenge_id = challenge.challenge_id.clone();
        let secret = tokio::task::spawn_blocking(move || tpm.activate(&challenge)).await??;
        let channel = match connect(agent.server(), creds).await {
            Ok(channel) => channel,
            Err(error) => return Ok(Err(tonic::Status::unavailable(error.to_string()))),
        };
        let answered = EnrollmentServiceClient::new(channel)
            .enroll(pb::EnrollRequest {
                tpm_answer: Some(pb::TpmChallengeAnswer {
                    challenge_id,
                    secret,
                }),
                ..request.clone()
            })
            .await;
        if answered.is_ok() {
            tracing::info!(device.name = %agent.name, "TPM challenge answered");
        }
        return Ok(answered.map(|_| ()));
    }
    let _ = (agent, creds, request, challenge);
    bail!("the control plane sent a TPM challenge to an agent without a TPM")
}

/// Whether a failed call is worth repeating (the control plane or the network, not a refusal).
fn retryable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Internal
    )
}

/// Installs an approved request's certificate with its key and records the device identity.
fn install(agent: &Agent, key: &StoredKey, response: pb::EnrollResponse) -> Result<Enrolled> {
    check_certificate(
        &response.certificate_pem,
        &response.ca_bundle_pem,
        key,
        &response.device_id,
    )?;
    agent.state.write(
        &agent.state.ca_path(),
        response.ca_bundle_pem.as_bytes(),
        0o644,
    )?;
    agent.certs.activate(&Pair {
        key: key.clone(),
        cert_pem: response.certificate_pem.clone(),
    })?;
    let enrolled = Enrolled {
        device_id: response.device_id,
        device_name: agent.name.clone(),
    };
    agent.state.save_enrolled(&enrolled)?;
    // The key now lives with its certificate.
    let _ = std::fs::remove_file(agent.state.root().join(key.file_name()));
    agent.health.set_enrollment(Enrollment::Enrolled);
    tracing::info!(device.id = %enrolled.device_id, device.name = %enrolled.device_name, tpm_verified = response.tpm_verified, "enrolled");
    Ok(enrolled)
}

/// Returns the device identity, enrolling first if needed; repairs an interrupted certificate swap.
pub(crate) async fn ensure_enrolled(agent: &Agent) -> Result<Enrolled> {
    if let Some(enrolled) = agent.state.enrolled()? {
        let ca_pem = agent
            .state
            .read_optional(&agent.state.ca_path())?
            .context("the CA bundle of an enrolled device is missing")?;
        agent
            .certs
            .reconcile(agent.state.root(), &ca_pem, &enrolled.device_id)
            .with_context(|| {
                format!(
                    "no usable device certificate in {}; to bring device {name} back, restore its certificate and key, or have an operator run `flotctl delete device {name}` and start the agent with an empty state directory to enroll again",
                    agent.state.root().join("certs").display(),
                    name = enrolled.device_name
                )
            })?;
        agent.health.set_enrollment(Enrollment::Enrolled);
        return Ok(enrolled);
    }
    let key = device_key(agent)?;
    // The operator compares this with `flotctl get enrollments` (KEY) before approving.
    let fingerprint = sha256_hex(&key.spki()?);
    tracing::info!(device.name = %agent.name, key.fingerprint = %fingerprint, "enrolling with key {}", &fingerprint[..16.min(fingerprint.len())]);
    let csr_pem = CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&agent.keys.open(&key)?)?
        .pem()?;
    let config = &agent.config;
    let creds = enrollment_credentials(config)?;
    let request = pb::EnrollRequest {
        csr_pem,
        device_name: agent.name.clone(),
        labels: agent.labels.clone(),
        system_info: Some(system_info(agent)),
        tpm_evidence: None,
        tpm_answer: None,
    };
    // A TPM-backed key is attested first: evidence, then the challenge's answer, then polling.
    let mut attest = agent.keys.is_tpm();
    let mut backoff = Backoff::new(Duration::from_secs(1), config.max_backoff());
    let mut announced = false;
    loop {
        let wait = match connect(agent.server(), &creds).await {
            Err(error) => {
                tracing::warn!(%error, "cannot reach the control plane to enroll");
                agent.next_server();
                backoff.next_delay()
            }
            Ok(channel) => match EnrollmentServiceClient::new(channel)
                .enroll(if attest {
                    with_tpm_evidence(agent, &key, &request).await?
                } else {
                    request.clone()
                })
                .await
            {
                Ok(response) => {
                    let response = response.into_inner();
                    if let Some(challenge) = response.tpm_challenge {
                        match answer_challenge(agent, &creds, &request, challenge).await? {
                            Ok(()) => {
                                attest = false;
                                continue;
                            }
                            Err(status) if retryable(&status) => {
                                tracing::warn!(code = ?status.code(), message = status.message(), "answering the TPM challenge failed; attesting again");
                                backoff.next_delay()
                            }
                            Err(status) => bail!(
                                "TPM attestation refused ({:?}): {}",
                                status.code(),
                                status.message()
                            ),
                        }
                    } else {
                        match pb::EnrollmentState::try_from(response.state) {
                            Ok(pb::EnrollmentState::Approved) => {
                                return install(agent, &key, response);
                            }
                            Ok(pb::EnrollmentState::Denied) => {
                                agent.health.set_enrollment(Enrollment::Refused(format!(
                                    "enrollment denied: {}",
                                    response.reason
                                )));
                                bail!(
                                    "enrollment of {:?} was denied: {}",
                                    agent.name,
                                    response.reason
                                )
                            }
                            _ => {
                                if !announced {
                                    agent.health.set_enrollment(Enrollment::Waiting);
                                    tracing::info!(device.name = %agent.name, "enrollment request submitted; waiting for approval");
                                    announced = true;
                                }
                                backoff.next_delay().max(
                                    Duration::from_secs(response.retry_after_seconds.into())
                                        .min(config.max_backoff()),
                                )
                            }
                        }
                    }
                }
                Err(status) if retryable(&status) => {
                    tracing::warn!(code = ?status.code(), message = status.message(), "enrollment attempt failed");
                    backoff.next_delay()
                }
                // The control plane is busy (e.g. its pending queue is full): wait as told.
                Err(status) if status.code() == Code::ResourceExhausted => {
                    let told = flotilla::client::retry_after(&status).unwrap_or_default();
                    tracing::warn!(
                        message = status.message(),
                        retry_in_s = told.as_secs(),
                        "enrollment turned away for now"
                    );
                    backoff.next_delay().max(told.min(config.max_backoff()))
                }
                Err(status) => bail!(
                    "enrollment refused ({:?}): {}",
                    status.code(),
                    status.message()
                ),
            },
        };
        if agent.sleep_or_shutdown(wait).await {
            bail!("shut down before enrollment completed");
        }
    }
}

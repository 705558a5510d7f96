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
use rcgen::{CertificateParams, KeyPair, PublicKeyData};
use std::time::Duration;
use tonic::Code;

use crate::certs::Pair;
use crate::health::Enrollment;
use crate::state::Enrolled;
use flotilla::profiles::AgentConfig;

/// Loads the device key, generating it on first use.
fn device_key(agent: &Agent) -> Result<KeyPair> {
    let path = agent.state.key_path();
    if let Some(pem) = agent.state.read_optional(&path)? {
        return KeyPair::from_pem(&pem)
            .with_context(|| format!("reading device key {}", path.display()));
    }
    let key = KeyPair::generate().context("generating the device key")?;
    agent
        .state
        .write(&path, key.serialize_pem().as_bytes(), 0o600)?;
    tracing::info!(path = %path.display(), "generated device key");
    Ok(key)
}

fn system_info(agent: &Agent) -> pb::SystemInfo {
    pb::SystemInfo {
        hostname: crate::hostname(),
        os: std::env::consts::OS.to_string(),
        arch: std::env::consts::ARCH.to_string(),
        agent_version: flotilla::VERSION.to_string(),
        boot_id: agent.boot_id.clone(),
    }
}

/// Checks an issued certificate before the agent relies on it.
fn check_certificate(cert_pem: &str, ca_pem: &str, key: &KeyPair, device_id: &str) -> Result<()> {
    verify_issued_by(cert_pem, ca_pem).context("issued certificate does not chain to the CA")?;
    let info = cert_info_pem(cert_pem)?;
    if info.key_fingerprint != sha256_hex(&key.subject_public_key_info()) {
        bail!("issued certificate is for a different key");
    }
    let identity = identity_pem(cert_pem)?;
    if identity.role != Role::Device || identity.name != device_id {
        bail!("issued certificate names {identity}, expected device/{device_id}");
    }
    Ok(())
}

/// The shared enrollment credential from the agent config (also used for recovery).
pub fn enrollment_credentials(config: &AgentConfig) -> Result<ClientCredentials> {
    Ok(ClientCredentials {
        ca_pem: std::fs::read_to_string(&config.ca_file)
            .with_context(|| format!("reading CA bundle {}", config.ca_file.display()))?,
        cert_pem: std::fs::read_to_string(&config.enrollment_cert_file).with_context(|| {
            format!(
                "reading enrollment certificate {}",
                config.enrollment_cert_file.display()
            )
        })?,
        key_pem: std::fs::read_to_string(&config.enrollment_key_file).with_context(|| {
            format!(
                "reading enrollment key {}",
                config.enrollment_key_file.display()
            )
        })?,
        server_name: config.server_name.clone(),
    })
}

/// Returns the device identity, enrolling first if needed; repairs an interrupted certificate swap.
pub async fn ensure_enrolled(agent: &Agent) -> Result<Enrolled> {
    if let Some(enrolled) = agent.state.enrolled()? {
        let ca_pem = agent
            .state
            .read_optional(&agent.state.ca_path())?
            .context("the CA bundle of an enrolled device is missing")?;
        agent
            .certs
            .reconcile(agent.state.root(), &ca_pem, &enrolled.device_id)
            .context("no usable device certificate; enroll the device again")?;
        agent.health.set_enrollment(Enrollment::Enrolled);
        return Ok(enrolled);
    }
    let key = device_key(agent)?;
    let csr_pem = CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&key)?
        .pem()?;
    let config = &agent.config;
    let creds = enrollment_credentials(config)?;
    let request = pb::EnrollRequest {
        csr_pem,
        device_name: agent.name.clone(),
        labels: agent.labels.clone(),
        system_info: Some(system_info(agent)),
    };
    let mut backoff = Backoff::new(Duration::from_secs(1), config.max_backoff());
    let mut announced = false;
    loop {
        let wait = match connect(&config.server, &creds).await {
            Err(error) => {
                tracing::warn!(%error, "cannot reach the control plane to enroll");
                backoff.next_delay()
            }
            Ok(channel) => match EnrollmentServiceClient::new(channel)
                .enroll(request.clone())
                .await
            {
                Ok(response) => {
                    let response = response.into_inner();
                    match pb::EnrollmentState::try_from(response.state) {
                        Ok(pb::EnrollmentState::Approved) => {
                            check_certificate(
                                &response.certificate_pem,
                                &response.ca_bundle_pem,
                                &key,
                                &response.device_id,
                            )?;
                            agent.state.write(
                                &agent.state.ca_path(),
                                response.ca_bundle_pem.as_bytes(),
                                0o644,
                            )?;
                            agent.certs.activate(&Pair {
                                key_pem: key.serialize_pem(),
                                cert_pem: response.certificate_pem.clone(),
                            })?;
                            let enrolled = Enrolled {
                                device_id: response.device_id,
                                device_name: agent.name.clone(),
                            };
                            agent.state.save_enrolled(&enrolled)?;
                            // The key now lives with its certificate.
                            let _ = std::fs::remove_file(agent.state.key_path());
                            agent.health.set_enrollment(Enrollment::Enrolled);
                            tracing::info!(device.id = %enrolled.device_id, device.name = %enrolled.device_name, "enrolled");
                            return Ok(enrolled);
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
                Err(status)
                    if matches!(
                        status.code(),
                        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Internal
                    ) =>
                {
                    tracing::warn!(code = ?status.code(), message = status.message(), "enrollment attempt failed");
                    backoff.next_delay()
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

//! Expired-certificate recovery: a device whose certificate expired while it was offline proves it
//! is the same device by signing a server nonce with the key of that certificate, over the
//! enrollment credential, and gets a certificate for a fresh key.

use crate::Agent;
use crate::enroll::enrollment_credentials;
use crate::renewal::{accept, pending_or_new};
use crate::state::Enrolled;
use anyhow::{Context, Result};
use flotilla::client::connect;
use flotilla::pki::cert_info_pem;
use flotilla::proto::agent::v1 as pb;
use flotilla::proto::agent::v1::enrollment_service_client::EnrollmentServiceClient;
use flotilla::signature::recovery_message;
use rcgen::SigningKey;
use tonic::Code;

/// How a recovery attempt ended.
pub(crate) enum Recovery {
    /// A new pair is active.
    Recovered,
    /// The control plane will never accept this proof (beyond the window, revoked, unknown).
    Refused(String),
    /// Worth trying again later (unreachable, temporary failure).
    Retry(String),
}

/// Whether the current certificate has expired.
pub(crate) fn expired(agent: &Agent) -> bool {
    let now = flotilla::clock::now_secs();
    agent
        .certs
        .current()
        .ok()
        .and_then(|pair| cert_info_pem(&pair.cert_pem).ok())
        .is_some_and(|info| info.not_after <= now)
}

pub(crate) async fn recover(agent: &Agent, enrolled: &Enrolled) -> Result<Recovery> {
    let previous = agent.certs.current()?;
    let previous_key = agent
        .keys
        .open(&previous.key)
        .context("opening the previous key")?;
    let ca_pem = agent
        .state
        .read_optional(&agent.state.ca_path())?
        .context("the CA bundle is missing")?;
    let creds = enrollment_credentials(&agent.config)?;
    let channel = match connect(agent.server(), &creds).await {
        Ok(channel) => channel,
        Err(error) => {
            agent.next_server();
            return Ok(Recovery::Retry(error.to_string()));
        }
    };
    let mut client = EnrollmentServiceClient::new(channel);
    let device_id = enrolled.device_id.clone();
    let classify = |status: tonic::Status| match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Internal => {
            Recovery::Retry(format!("{:?}: {}", status.code(), status.message()))
        }
        code => Recovery::Refused(format!("{code:?}: {}", status.message())),
    };
    let challenge = match client
        .recovery_challenge(pb::RecoveryChallengeRequest {
            device_id: device_id.clone(),
        })
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => return Ok(classify(status)),
    };
    let (_, pending) = pending_or_new(&agent.certs, &agent.keys, &device_id)?;
    let message = recovery_message(&device_id, &challenge.nonce, &pending.csr_pem);
    let signature = previous_key
        .sign(&message)
        .context("signing the recovery proof")?;
    let response = match client
        .recover(pb::RecoverRequest {
            device_id: device_id.clone(),
            nonce: challenge.nonce,
            previous_certificate_pem: previous.cert_pem,
            signature,
            csr_pem: pending.csr_pem,
        })
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => return Ok(classify(status)),
    };
    let pair = accept(&agent.certs, &ca_pem, &device_id, &response.certificate_pem)?;
    agent.certs.activate(&pair)?;
    tracing::info!(device.id = %device_id, "recovered from an expired certificate");
    Ok(Recovery::Recovered)
}

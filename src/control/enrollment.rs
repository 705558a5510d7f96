//! Enrollment use cases: an agent submits (and polls) its request; an operator approves or denies.
//! Approval creates the device, signs its CSR and records the certificate in one transaction.

use super::certs::{Refusal, issuance_audit};
use super::{Actor, ControlError, ControlPlane};
use crate::audit::AuditEntry;
use crate::ca::csr::verify_csr_pem;
use crate::identity::Identity;
use crate::identity::Role;
use crate::names::{validate_labels, validate_name};
use crate::pki::sha256_hex;
use crate::spec::DeviceSpec;
use crate::store::{
    CertificateRecord, EnrollmentRecord, EnrollmentState, NewDevice, NewEnrollment, SystemInfo,
    TpmChallengeRecord,
};
use crate::tpm::{
    Evidence, TpmError, WrappedCredential, certify_qualifying_data, check_evidence, make_credential,
};
use std::collections::BTreeMap;

/// What an agent submits.
#[derive(Debug, Clone)]
pub struct EnrollInput {
    /// A CSR for the device key (PEM).
    pub csr_pem: String,
    /// The name the device asks for.
    pub device_name: String,
    /// The labels it asks for.
    pub labels: BTreeMap<String, String>,
    /// What it says about itself.
    pub system_info: SystemInfo,
    /// Proof that the key lives in a TPM: evidence first, then the answer to its challenge.
    pub tpm: Option<TpmProof>,
    /// Where the request came from (the TCP peer), for operators comparing before approving.
    pub source_address: String,
}

/// One of the two TPM steps of an enrollment.
#[derive(Debug, Clone)]
pub enum TpmProof {
    /// The TPM's evidence that the device key is its own.
    Evidence(Evidence),
    /// The secret the TPM recovered from the challenge.
    Answer {
        /// The challenge answered.
        challenge_id: String,
        /// The recovered secret.
        secret: Vec<u8>,
    },
}

/// What an agent learns about its request.
#[derive(Debug, Clone)]
pub struct EnrollOutcome {
    /// Pending, approved or denied.
    pub state: EnrollmentState,
    /// Why, when denied.
    pub reason: Option<String>,
    /// The device's id, once approved.
    pub device_id: Option<String>,
    /// Its certificate, once approved.
    pub certificate: Option<CertificateRecord>,
    /// The CA bundle (PEM).
    pub ca_pem: String,
    /// When to ask again while pending, seconds.
    pub retry_after_secs: u32,
    /// The credential the agent must activate, in answer to TPM evidence.
    pub tpm_challenge: Option<IssuedChallenge>,
    /// The TPM evidence and challenge checked out.
    pub tpm_verified: bool,
}

/// A TPM credential challenge as sent to the agent.
#[derive(Debug, Clone)]
pub struct IssuedChallenge {
    /// The challenge's id, echoed with the answer.
    pub id: String,
    /// The credential only the device's TPM can recover.
    pub credential: WrappedCredential,
}

/// How long a TPM challenge can be answered.
const TPM_CHALLENGE_TTL_MS: i64 = 5 * 60 * 1000;
/// When an agent turned away by the pending-request quota should ask again.
const PENDING_QUOTA_RETRY: std::time::Duration = std::time::Duration::from_secs(60);

/// The identity that approves requests whose TPM evidence checked out, when configured to.
fn tpm_approver() -> Identity {
    Identity::new(Role::Service, "tpm-attestation")
}

fn tpm_refused(error: TpmError) -> ControlError {
    match error {
        TpmError::Refused(reason) => {
            ControlError::PermissionDenied(format!("TPM attestation refused: {reason}"))
        }
        TpmError::Internal(reason) => ControlError::Internal(reason),
        other => ControlError::invalid("tpm_evidence", other),
    }
}

impl ControlPlane {
    /// Submits or polls an enrollment request (idempotent for the same name and key).
    /// Refuses a *new* request while the pending queue is full; a request already known (a
    /// device polling for its decision) always gets its answer.
    async fn check_pending_quota(&self, name: &str) -> Result<(), ControlError> {
        let limit = self.policy.max_pending_enrollments;
        if self.enrollment_counts.pending() < limit as i64
            || self.store.get_enrollment(name).await?.is_some()
        {
            return Ok(());
        }
        tracing::warn!(enrollment.name = %name, limit, "enrollment request refused: too many pending");
        Err(ControlError::Overloaded {
            message: format!(
                "too many pending enrollment requests ({limit}); an operator must approve, deny or delete some first"
            ),
            retry_after: PENDING_QUOTA_RETRY,
        })
    }

    /// Takes in a device's enrollment request (or its repetition, which is answered the same).
    pub async fn enroll(
        &self,
        caller: &Identity,
        input: EnrollInput,
    ) -> Result<EnrollOutcome, ControlError> {
        validate_name(&input.device_name).map_err(|e| ControlError::invalid("device_name", e))?;
        validate_labels(&input.labels).map_err(|e| ControlError::invalid("labels", e))?;
        let key =
            verify_csr_pem(&input.csr_pem).map_err(|e| ControlError::invalid("csr_pem", e))?;
        let submitted_ms = self.now_millis();
        let tpm_ek_fingerprint = match &input.tpm {
            None => None,
            Some(TpmProof::Evidence(evidence)) => {
                let challenged = self.challenge_tpm(&input, evidence, &key).await;
                if let Err(ControlError::PermissionDenied(reason)) = &challenged {
                    self.audit_tpm_refusal(caller, &input.device_name, &key.fingerprint, reason)
                        .await;
                }
                return challenged;
            }
            Some(TpmProof::Answer {
                challenge_id,
                secret,
            }) => {
                let answered = self
                    .check_tpm_answer(&input.device_name, &key.fingerprint, challenge_id, secret)
                    .await;
                if let Err(ControlError::PermissionDenied(reason)) = &answered {
                    self.audit_tpm_refusal(caller, &input.device_name, &key.fingerprint, reason)
                        .await;
                }
                Some(answered?)
            }
        };
        let name = input.device_name.clone();
        self.check_pending_quota(&name).await?;
        // The credential's labels win over the agent's: they are what the factory vouches for.
        let policy = self
            .credentials
            .get(&caller.name)
            .and_then(|c| c.enrollment)
            .unwrap_or_default();
        let mut labels = input.labels;
        labels.extend(policy.labels.clone());
        let mut record = self
            .store
            .submit_enrollment(NewEnrollment {
                name: input.device_name,
                key_fingerprint: key.fingerprint,
                csr_pem: input.csr_pem,
                labels,
                system_info: input.system_info,
                created_ms: submitted_ms,
                tpm_ek_fingerprint: tpm_ek_fingerprint.clone(),
                credential: caller.name.clone(),
                source_address: input.source_address,
            })
            .await?;
        if record.created_ms == submitted_ms && record.state == EnrollmentState::Pending {
            self.enrollment_counts
                .moved(None, Some(EnrollmentState::Pending));
        }
        if let Some(ek) = &tpm_ek_fingerprint {
            let same_tpm = self.store.names_with_tpm(ek, &name).await?;
            if !same_tpm.is_empty() {
                tracing::warn!(enrollment.name = %name, tpm.ek = %ek, same_tpm_as = ?same_tpm, "a TPM that already enrolled is enrolling again; leaving the request to an operator");
            } else if self.policy.tpm.auto_approve && record.state == EnrollmentState::Pending {
                record = self
                    .approve(&name, BTreeMap::new(), &tpm_approver(), None)
                    .await?;
            }
        }
        if policy.auto_approve
            && record.state == EnrollmentState::Pending
            && record.credential == caller.name
        {
            tracing::info!(enrollment.name = %name, credential = %caller.name, "enrollment approved by its credential's policy");
            record = self.approve(&name, BTreeMap::new(), caller, None).await?;
        }
        let certificate = match &record.certificate_serial {
            Some(serial) => self.store.get_certificate(serial).await?,
            None => None,
        };
        tracing::debug!(enrollment.name = %record.name, caller = %caller, state = record.state.as_str(), "enrollment polled");
        Ok(EnrollOutcome {
            state: record.state,
            reason: record.reason,
            device_id: record.device_id,
            certificate,
            ca_pem: self.ca.cert_pem().to_string(),
            retry_after_secs: self.policy.enrollment_poll_interval.as_secs() as u32,
            tpm_verified: record.tpm_ek_fingerprint.is_some(),
            tpm_challenge: None,
        })
    }

    /// A refused TPM proof in the audit trail: no device or serial yet, the requested key and name.
    async fn audit_tpm_refusal(
        &self,
        caller: &Identity,
        name: &str,
        key_fingerprint: &str,
        reason: &str,
    ) {
        self.audit_refusal(Refusal {
            device_id: "",
            serial: "",
            key_fingerprint,
            actor: caller,
            proof: "tpm-attestation",
            reason: format!("enrollment of {name}: {reason}"),
        })
        .await;
    }

    /// Checks TPM evidence and answers with a credential only that TPM can activate.
    async fn challenge_tpm(
        &self,
        input: &EnrollInput,
        evidence: &Evidence,
        key: &crate::ca::csr::CsrPublicKey,
    ) -> Result<EnrollOutcome, ControlError> {
        if self.policy.tpm.trusted_cas.is_empty() {
            return Err(ControlError::FailedPrecondition(
                "this control plane does not accept TPM attestation: no TPM manufacturer CA is configured (--tpm-ca)".into(),
            ));
        }
        let checked = check_evidence(
            evidence,
            &self.policy.tpm.trusted_cas,
            rcgen::PublicKeyData::der_bytes(key),
            &certify_qualifying_data(&input.csr_pem),
        )
        .map_err(|error| {
            tracing::warn!(enrollment.name = %input.device_name, %error, "TPM evidence refused");
            crate::telemetry::tpm_attestation("refused");
            tpm_refused(error)
        })?;
        let mut secret = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut secret);
        let credential =
            make_credential(&checked.ek, &checked.ak_name, &secret).map_err(tpm_refused)?;
        let now = self.now_millis();
        let id = uuid::Uuid::new_v4().to_string();
        self.store
            .put_tpm_challenge(TpmChallengeRecord {
                id: id.clone(),
                name: input.device_name.clone(),
                key_fingerprint: key.fingerprint.clone(),
                ek_fingerprint: checked.ek_fingerprint.clone(),
                secret_digest: sha256_hex(&secret),
                expires_ms: now + TPM_CHALLENGE_TTL_MS,
                created_ms: now,
            })
            .await?;
        crate::telemetry::tpm_attestation("challenged");
        tracing::info!(enrollment.name = %input.device_name, tpm.ek = %checked.ek_fingerprint, "TPM evidence checked; challenge issued");
        Ok(EnrollOutcome {
            state: EnrollmentState::Pending,
            reason: None,
            device_id: None,
            certificate: None,
            ca_pem: self.ca.cert_pem().to_string(),
            retry_after_secs: 0,
            tpm_challenge: Some(IssuedChallenge { id, credential }),
            tpm_verified: false,
        })
    }

    /// Consumes a challenge and checks the answer; the endorsement key's fingerprint if right.
    async fn check_tpm_answer(
        &self,
        name: &str,
        key_fingerprint: &str,
        challenge_id: &str,
        secret: &[u8],
    ) -> Result<String, ControlError> {
        let refuse = |reason: &str| {
            tracing::warn!(enrollment.name = %name, reason, "TPM challenge answer refused");
            crate::telemetry::tpm_attestation("refused");
            ControlError::PermissionDenied(format!("TPM attestation refused: {reason}"))
        };
        let Some(challenge) = self.store.take_tpm_challenge(challenge_id).await? else {
            return Err(refuse("unknown or already answered challenge"));
        };
        if challenge.name != name || challenge.key_fingerprint != key_fingerprint {
            return Err(refuse("the challenge was issued for a different request"));
        }
        if challenge.expires_ms < self.now_millis() {
            return Err(refuse("the challenge expired"));
        }
        if sha256_hex(secret) != challenge.secret_digest {
            return Err(refuse("wrong answer to the credential challenge"));
        }
        crate::telemetry::tpm_attestation("verified");
        tracing::info!(enrollment.name = %name, tpm.ek = %challenge.ek_fingerprint, "TPM attestation verified");
        Ok(challenge.ek_fingerprint)
    }

    /// Enrollment requests, all or those in `state`.
    pub async fn list_enrollments(
        &self,
        state: Option<EnrollmentState>,
    ) -> Result<Vec<EnrollmentRecord>, ControlError> {
        let mut records = self.store.list_enrollments(state).await?;
        for record in &mut records {
            self.note_same_tpm(record).await?;
        }
        Ok(records)
    }

    /// One enrollment request, or `NotFound`.
    pub async fn get_enrollment(&self, name: &str) -> Result<EnrollmentRecord, ControlError> {
        validate_name(name).map_err(|e| ControlError::invalid("name", e))?;
        let mut record = self.store.get_enrollment(name).await?.ok_or_else(|| {
            ControlError::NotFound(format!("enrollment request {name:?} not found"))
        })?;
        self.note_same_tpm(&mut record).await?;
        Ok(record)
    }

    /// Shows which other requests and devices the same TPM vouched for.
    async fn note_same_tpm(&self, record: &mut EnrollmentRecord) -> Result<(), ControlError> {
        if let Some(ek) = &record.tpm_ek_fingerprint {
            record.same_tpm_as = self.store.names_with_tpm(ek, &record.name).await?;
        }
        Ok(())
    }

    async fn pending(&self, name: &str) -> Result<EnrollmentRecord, ControlError> {
        let record = self.get_enrollment(name).await?;
        if record.state != EnrollmentState::Pending {
            return Err(ControlError::FailedPrecondition(format!(
                "enrollment request {name:?} is already {}",
                record.state.as_str()
            )));
        }
        Ok(record)
    }

    /// Approves a pending request: creates the device with the requested labels plus `labels`.
    pub async fn approve_enrollment(
        &self,
        name: &str,
        labels: BTreeMap<String, String>,
        actor: &Actor,
    ) -> Result<EnrollmentRecord, ControlError> {
        let mut call = actor.record(self.now_millis(), format!("enrollment/{name}"));
        if !labels.is_empty() {
            call.reason = format!("with labels {}", super::devices::describe_labels(&labels));
        }
        self.approve(name, labels, &actor.identity, Some(call))
            .await
    }

    /// Approves a pending request on behalf of `decided_by` (a person, or a policy such as TPM
    /// attestation); `call` is the record of the admin call that asked, if one did.
    pub(super) async fn approve(
        &self,
        name: &str,
        labels: BTreeMap<String, String>,
        decided_by: &Identity,
        call: Option<AuditEntry>,
    ) -> Result<EnrollmentRecord, ControlError> {
        validate_labels(&labels).map_err(|e| ControlError::invalid("labels", e))?;
        let request = self.pending(name).await?;
        let key = verify_csr_pem(&request.csr_pem)
            .map_err(|e| ControlError::Internal(format!("stored CSR no longer verifies: {e}")))?;
        let device_id = uuid::Uuid::new_v4().to_string();
        let mut device_labels = request.labels.clone();
        device_labels.extend(labels);
        let certificate = self.sign_device_certificate(&device_id, name, &key)?;
        let now = certificate.issued_ms;
        let _writes = self.writes.lock().await;
        let owner = self.catalog().placement_for(&device_labels, None).owner;
        let device = NewDevice {
            id: device_id.clone(),
            name: name.to_string(),
            labels: device_labels,
            spec: DeviceSpec::default(),
            cert_serial: certificate.serial.clone(),
            cert_not_after_ms: certificate.not_after_ms,
            created_ms: now,
            fleet: owner,
            tpm_ek_fingerprint: request.tpm_ek_fingerprint.clone(),
        };
        let (reason, via) = match &request.tpm_ek_fingerprint {
            Some(ek) => (
                format!("enrollment of {name} approved; key attested by TPM (EK {ek})"),
                "tpm-attestation",
            ),
            None => (
                format!("enrollment of {name} approved"),
                "enrollment-approval",
            ),
        };
        let issued = issuance_audit(&certificate, "issued", decided_by, reason, via);
        let call = call.map(|mut call| {
            call.device_id = device_id.clone();
            call.revision = certificate.serial.clone();
            call
        });
        let audit = self.audited(std::iter::once(issued).chain(call).collect());
        let (serial, not_after_ms) = (certificate.serial.clone(), certificate.not_after_ms);
        let record = {
            let _order = self.audit_lock.lock().await;
            self.store
                .approve_enrollment(
                    name,
                    device.clone(),
                    certificate,
                    decided_by.to_string(),
                    audit,
                )
                .await?
        };
        {
            let mut catalog = self.catalog_mut();
            catalog.put_device(device.into_record());
            catalog.replan([device_id.as_str()]);
            catalog.render_into(&self.hub, [device_id.clone()]);
        }
        self.track_certificate(&device_id, &serial, not_after_ms);
        self.enrollment_counts.moved(
            Some(EnrollmentState::Pending),
            Some(EnrollmentState::Approved),
        );
        crate::telemetry::certificate_event("issued");
        tracing::info!(device.id = %device_id, device.name = %name, by = %decided_by, "enrollment approved");
        Ok(record)
    }

    /// Deletes a pending or denied request, freeing its name.
    pub async fn delete_enrollment(&self, name: &str, actor: &Actor) -> Result<(), ControlError> {
        validate_name(name).map_err(|e| ControlError::invalid("name", e))?;
        let deleted = self
            .store
            .delete_enrollment(
                name,
                self.audited(vec![
                    actor.record(self.now_millis(), format!("enrollment/{name}")),
                ]),
            )
            .await?
            .ok_or_else(|| {
                ControlError::NotFound(format!("enrollment request {name:?} not found"))
            })?;
        self.enrollment_counts.moved(Some(deleted.state), None);
        tracing::info!(enrollment.name = %name, by = %actor, "enrollment request deleted");
        Ok(())
    }

    /// Denies a pending request, saying why.
    pub async fn deny_enrollment(
        &self,
        name: &str,
        reason: &str,
        actor: &Actor,
    ) -> Result<EnrollmentRecord, ControlError> {
        let decided_by = &actor.identity;
        self.pending(name).await?;
        let reason = if reason.is_empty() {
            "denied by operator"
        } else {
            reason
        };
        let record = self
            .store
            .deny_enrollment(
                name,
                reason.to_string(),
                decided_by.to_string(),
                self.now_millis(),
                self.audited(vec![AuditEntry {
                    reason: reason.to_string(),
                    ..actor.record(self.now_millis(), format!("enrollment/{name}"))
                }]),
            )
            .await?;
        self.enrollment_counts.moved(
            Some(EnrollmentState::Pending),
            Some(EnrollmentState::Denied),
        );
        tracing::info!(enrollment.name = %name, by = %decided_by, "enrollment denied");
        Ok(record)
    }
}

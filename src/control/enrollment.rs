//! Enrollment use cases: an agent submits (and polls) its request; an operator approves or denies.
//! Approval creates the device, signs its CSR and records the certificate in one transaction.

use super::certs::issuance_audit;
use super::{ControlError, ControlPlane};
use crate::ca::csr::verify_csr_pem;
use crate::clock::now_millis;
use crate::identity::Identity;
use crate::names::{validate_labels, validate_name};
use crate::spec::DeviceSpec;
use crate::store::{
    CertificateRecord, EnrollmentRecord, EnrollmentState, NewDevice, NewEnrollment, SystemInfo,
};
use std::collections::BTreeMap;

/// What an agent submits.
#[derive(Debug, Clone)]
pub struct EnrollInput {
    pub csr_pem: String,
    pub device_name: String,
    pub labels: BTreeMap<String, String>,
    pub system_info: SystemInfo,
}

/// What an agent learns about its request.
#[derive(Debug, Clone)]
pub struct EnrollOutcome {
    pub state: EnrollmentState,
    pub reason: Option<String>,
    pub device_id: Option<String>,
    pub certificate: Option<CertificateRecord>,
    pub ca_pem: String,
    pub retry_after_secs: u32,
}

impl ControlPlane {
    /// Submits or polls an enrollment request (idempotent for the same name and key).
    pub async fn enroll(
        &self,
        caller: &Identity,
        input: EnrollInput,
    ) -> Result<EnrollOutcome, ControlError> {
        validate_name(&input.device_name).map_err(|e| ControlError::invalid("device_name", e))?;
        validate_labels(&input.labels).map_err(|e| ControlError::invalid("labels", e))?;
        let key =
            verify_csr_pem(&input.csr_pem).map_err(|e| ControlError::invalid("csr_pem", e))?;
        let submitted_ms = now_millis();
        let record = self
            .store
            .submit_enrollment(NewEnrollment {
                name: input.device_name,
                key_fingerprint: key.fingerprint,
                csr_pem: input.csr_pem,
                labels: input.labels,
                system_info: input.system_info,
                created_ms: submitted_ms,
            })
            .await?;
        if record.created_ms == submitted_ms && record.state == EnrollmentState::Pending {
            self.enrollment_counts
                .moved(None, Some(EnrollmentState::Pending));
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
        })
    }

    pub async fn list_enrollments(
        &self,
        state: Option<EnrollmentState>,
    ) -> Result<Vec<EnrollmentRecord>, ControlError> {
        Ok(self.store.list_enrollments(state).await?)
    }

    pub async fn get_enrollment(&self, name: &str) -> Result<EnrollmentRecord, ControlError> {
        validate_name(name).map_err(|e| ControlError::invalid("name", e))?;
        self.store
            .get_enrollment(name)
            .await?
            .ok_or_else(|| ControlError::NotFound(format!("enrollment request {name:?} not found")))
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
        decided_by: &Identity,
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
        };
        let audit = issuance_audit(
            &certificate,
            "issued",
            decided_by,
            format!("enrollment of {name} approved"),
            "enrollment-approval",
        );
        let (serial, not_after_ms) = (certificate.serial.clone(), certificate.not_after_ms);
        let record = {
            let _order = self.audit_lock.lock().await;
            self.store
                .approve_enrollment(
                    name,
                    device.clone(),
                    certificate,
                    decided_by.to_string(),
                    self.audit_key.clone(),
                    audit,
                )
                .await?
        };
        {
            let mut catalog = self.catalog_mut();
            catalog.put_device(device.into_record());
            catalog.apply_owners(&Vec::new());
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

    pub async fn deny_enrollment(
        &self,
        name: &str,
        reason: &str,
        decided_by: &Identity,
    ) -> Result<EnrollmentRecord, ControlError> {
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
                now_millis(),
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

//! Certificate lifecycle use cases, and what they share: issuing a device certificate, checking a
//! CSR, and the audit trail every one of them writes to — refusals included. Renewal (on the stream,
//! scheduled, forced), recovery and revocation each have their own submodule.

mod recovery;
mod renewal;
mod revocation;

pub(super) use recovery::Challenges;
pub use recovery::{RecoverInput, RecoveryChallenge};
pub use renewal::RenewalRequested;

use super::{ControlError, ControlPlane};
use crate::audit::{AuditEntry, SealedRecord};
use crate::ca::csr::{CsrPublicKey, verify_csr_pem};
use crate::ca::{Subject, Usage};
use crate::identity::{Identity, Role};
use crate::store::{AuditQuery, AuditSeal, CertificateRecord, IssuanceRules};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;

/// Most audit records returned by one listing.
pub(super) const MAX_AUDIT_PAGE: i64 = 1000;

/// A certificate with its device, as listed.
#[derive(Debug, Clone)]
pub struct CertificateView {
    /// The stored certificate.
    pub record: CertificateRecord,
    /// Its device's name.
    pub device_name: String,
    /// Whether it is its device's newest.
    pub current: bool,
}

/// What an issuance's audit record says of it.
struct Issuance<'a> {
    kind: &'a str,
    actor: &'a Identity,
    proof: &'a str,
    reason: String,
}

/// Facts of a refused request, for its audit record.
pub(super) struct Refusal<'a> {
    pub device_id: &'a str,
    pub serial: &'a str,
    pub key_fingerprint: &'a str,
    pub actor: &'a Identity,
    pub proof: &'a str,
    pub reason: String,
}

impl ControlPlane {
    pub(super) fn seal(&self) -> Arc<dyn AuditSeal> {
        self.audit_key.clone()
    }

    /// When the scheduler asks for a renewal of this certificate: `renew_before` ahead of expiry,
    /// plus a per-certificate jitter of up to a fifth of `renew_before`.
    pub(super) fn renew_at(&self, serial: &str, not_after_ms: i64) -> i64 {
        let renew_before = self.policy.renew_before.as_millis() as i64;
        let digest = Sha256::digest(serial.as_bytes());
        let spread = u64::from_be_bytes([
            digest[0], digest[1], digest[2], digest[3], digest[4], digest[5], digest[6], digest[7],
        ]);
        let jitter = (spread % 1000) as i64 * (renew_before / 5) / 1000;
        not_after_ms - renew_before - jitter
    }

    pub(super) fn track_certificate(&self, device_id: &str, serial: &str, not_after_ms: i64) {
        let renew_at = self.renew_at(serial, not_after_ms);
        let revoked = self.revoked.contains(serial);
        self.hub
            .track_certificate(device_id, serial, not_after_ms, renew_at, revoked);
    }

    /// Appends an audit record, serialised with every other append.
    async fn audit(&self, entry: AuditEntry) -> Result<SealedRecord, ControlError> {
        let _order = self.audit_lock.lock().await;
        Ok(self.store.append_audit(self.seal(), entry).await?)
    }

    /// Records a refused request in the audit trail (a failure to record it is logged, not hidden).
    pub(super) async fn audit_refusal(&self, refusal: Refusal<'_>) {
        let entry = AuditEntry {
            at_ms: self.now_millis(),
            kind: "rejected".into(),
            device_id: refusal.device_id.to_string(),
            serial: refusal.serial.to_string(),
            key_fingerprint: refusal.key_fingerprint.to_string(),
            actor: refusal.actor.to_string(),
            reason: refusal.reason.clone(),
            proof: refusal.proof.to_string(),
            outcome: "refused".into(),
            ..Default::default()
        };
        crate::telemetry::certificate_event("rejected");
        if let Err(error) = self.audit(entry).await {
            tracing::error!(device.id = %refusal.device_id, %error, "could not audit a refused certificate request");
        }
    }

    /// Checks a CSR for `device_id`: valid, supported key, and no identity but the device's.
    fn check_csr(&self, device_id: &str, csr_pem: &str) -> Result<CsrPublicKey, String> {
        let key = verify_csr_pem(csr_pem).map_err(|e| e.to_string())?;
        let own = Identity::new(Role::Device, device_id).uri();
        if let Some(other) = key.requested_identities.iter().find(|uri| **uri != own) {
            return Err(format!(
                "CSR asks for identity {other}, but the requester is {own}"
            ));
        }
        Ok(key)
    }

    /// Signs a device certificate for `key` and records it (with its audit record) in one
    /// transaction, if `rules` still hold then; then the scheduler tracks it.
    async fn issue_for_device(
        &self,
        device_id: &str,
        key: &CsrPublicKey,
        issuance: Issuance<'_>,
        rules: IssuanceRules,
    ) -> Result<CertificateRecord, ControlError> {
        let Issuance {
            kind,
            actor,
            proof,
            reason,
        } = issuance;
        let name = self
            .catalog()
            .device(device_id)
            .map(|d| d.name.clone())
            .ok_or_else(|| ControlError::NotFound(format!("device {device_id} not found")))?;
        let record = self.sign_device_certificate(device_id, &name, key)?;
        let entry = issuance_audit(&record, kind, actor, reason, proof);
        let keeps_spare = rules.renews.is_some();
        // Committed with whatever other issuances are waiting (group commit), in audit order.
        self.start_writers();
        let recorded = self.issuances.record(record.clone(), entry, rules).await?;
        self.after_revocation(recorded.superseded);
        if keeps_spare {
            // The renewed certificate stays valid until the new one is used.
            self.spares().insert(device_id.to_string());
        }
        // Measured before tracking the new certificate clears the request time.
        if kind == "renewed"
            && let Some(asked) = self.hub.renewal_asked_ms(device_id)
        {
            let waited = (self.now_millis() - asked).max(0) as u64;
            crate::telemetry::renewal_latency(Duration::from_millis(waited));
        }
        self.catalog_mut()
            .note_certificate(device_id, &record.serial, record.not_after_ms);
        self.track_certificate(device_id, &record.serial, record.not_after_ms);
        crate::telemetry::certificate_event(if kind == "renewed" {
            "renewed"
        } else {
            "recovered"
        });
        tracing::info!(device.id = %device_id, serial = %record.serial, kind, "certificate issued");
        Ok(record)
    }

    /// Signs a management certificate for `key` as `device/<device_id>`.
    pub(super) fn sign_device_certificate(
        &self,
        device_id: &str,
        name: &str,
        key: &CsrPublicKey,
    ) -> Result<CertificateRecord, ControlError> {
        let issued = self
            .ca
            .sign(
                &Subject {
                    common_name: name.to_string(),
                    identity: Some(Identity::new(Role::Device, device_id)),
                    dns_names: vec![],
                    ip_addresses: vec![],
                    usage: Usage::Client,
                    validity: self.policy.device_cert_validity,
                },
                key,
            )
            .map_err(|e| ControlError::Internal(e.to_string()))?;
        Ok(CertificateRecord {
            serial: issued.info.serial.clone(),
            device_id: device_id.to_string(),
            key_fingerprint: issued.info.key_fingerprint.clone(),
            fingerprint: issued.info.fingerprint.clone(),
            certificate_pem: issued.pem,
            not_before_ms: issued.info.not_before * 1000,
            not_after_ms: issued.info.not_after * 1000,
            issued_ms: self.now_millis(),
            revoked_ms: None,
            revocation_reason: None,
        })
    }

    fn device_id_by_name(&self, name: &str) -> Result<String, ControlError> {
        self.catalog()
            .device_by_name(name)
            .map(|d| d.id.clone())
            .ok_or_else(|| ControlError::NotFound(format!("device {name:?} not found")))
    }

    /// Certificates (of one device, by name, when given), with their device and whether current.
    pub async fn list_certificates(
        &self,
        device: Option<&str>,
    ) -> Result<Vec<CertificateView>, ControlError> {
        let device_id = device.map(|n| self.device_id_by_name(n)).transpose()?;
        let records = self.store.list_certificates(device_id).await?;
        let catalog = self.catalog();
        Ok(records
            .into_iter()
            .map(|record| {
                let device = catalog.device(&record.device_id);
                CertificateView {
                    device_name: device.map(|d| d.name.clone()).unwrap_or_default(),
                    current: device.and_then(|d| d.cert_serial.as_deref())
                        == Some(record.serial.as_str()),
                    record,
                }
            })
            .collect())
    }

    /// The name of the device with this id, while it exists.
    pub fn device_name(&self, id: &str) -> Option<String> {
        if id.is_empty() {
            return None;
        }
        self.catalog().device(id).map(|d| d.name.clone())
    }

    /// Audit records matching `query`; a device filter may be a name or an id. A `device/NAME`
    /// target also selects the records of that device's certificates.
    pub async fn list_audit(
        &self,
        device: Option<&str>,
        mut query: AuditQuery,
    ) -> Result<Vec<SealedRecord>, ControlError> {
        if device.is_some() && query.target.is_some() {
            return Err(ControlError::invalid(
                "target",
                "give a device or a target, not both",
            ));
        }
        if let Some(name) = query
            .target
            .as_deref()
            .and_then(|t| t.strip_prefix("device/"))
            && let Some(found) = self.catalog().device_by_name(name)
        {
            query.device_id = Some(found.id.clone());
        }
        if let Some(device) = device {
            let id = self
                .catalog()
                .device_by_name(device)
                .map(|d| d.id.clone())
                .unwrap_or_else(|| device.to_string());
            query.device_id = Some(id);
        }
        if query.limit <= 0 || query.limit > MAX_AUDIT_PAGE {
            query.limit = MAX_AUDIT_PAGE;
        }
        Ok(self.store.list_audit(query).await?)
    }

    /// The audit public key (SPKI PEM).
    pub fn audit_public_key_pem(&self) -> String {
        self.audit_key.public_key_pem()
    }
}

/// The audit record of a successful issuance.
pub(super) fn issuance_audit(
    record: &CertificateRecord,
    kind: &str,
    actor: &Identity,
    reason: String,
    proof: &str,
) -> AuditEntry {
    AuditEntry {
        at_ms: record.issued_ms,
        kind: kind.into(),
        device_id: record.device_id.clone(),
        serial: record.serial.clone(),
        key_fingerprint: record.key_fingerprint.clone(),
        not_before_ms: record.not_before_ms,
        not_after_ms: record.not_after_ms,
        actor: actor.to_string(),
        reason,
        proof: proof.into(),
        outcome: "ok".into(),
        ..Default::default()
    }
}

/// The SubjectPublicKeyInfo (DER) of a certificate.
fn x509_spki(der: &[u8]) -> Result<Vec<u8>, String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    Ok(cert.public_key().raw.to_vec())
}

//! Certificate lifecycle use cases: renewal on the stream (idempotent, fresh key only), recovery of
//! an expired certificate with a signature by the previous key, revocation, decommissioning, the
//! renewal scheduler, and the audit trail every one of them writes to — refusals included.

use super::{Actor, ControlError, ControlPlane};
use crate::audit::{AuditEntry, SealedRecord};
use crate::ca::csr::{CsrPublicKey, verify_csr_pem};
use crate::ca::{Subject, Usage};
use crate::clock::now_millis;
use crate::identity::{Identity, Role};
use crate::pki::{cert_info_pem, certs_from_pem, identity_pem, verify_signed_by};
use crate::proto::agent::v1 as pb;
use crate::signature::{recovery_message, verify};
use crate::store::{AuditQuery, AuditSeal, CertificateRecord, IssuanceRules, Revocation};
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a recovery nonce may be used.
const CHALLENGE_LIFETIME: Duration = Duration::from_secs(300);
/// Outstanding nonces kept at most (enrollment-credential holders cannot exhaust memory).
const MAX_CHALLENGES: usize = 100_000;
/// Most audit records returned by one listing.
pub(super) const MAX_AUDIT_PAGE: i64 = 1000;

/// Outstanding recovery nonces: nonce → (device id, expiry).
#[derive(Debug, Default)]
pub(super) struct Challenges {
    nonces: Mutex<HashMap<String, (String, i64)>>,
}

impl Challenges {
    fn issue(&self, device_id: &str, now_ms: i64) -> (String, i64) {
        let mut bytes = [0u8; 24];
        rand::rng().fill_bytes(&mut bytes);
        let nonce = hex::encode(bytes);
        let expires = now_ms + CHALLENGE_LIFETIME.as_millis() as i64;
        let mut nonces = self.nonces.lock().unwrap_or_else(|p| p.into_inner());
        nonces.retain(|_, (_, until)| *until > now_ms);
        if nonces.len() >= MAX_CHALLENGES {
            // Drop the oldest half rather than refuse every device.
            let mut by_expiry: Vec<(String, i64)> =
                nonces.iter().map(|(n, (_, e))| (n.clone(), *e)).collect();
            by_expiry.sort_by_key(|(_, e)| *e);
            for (old, _) in by_expiry.into_iter().take(MAX_CHALLENGES / 2) {
                nonces.remove(&old);
            }
        }
        nonces.insert(nonce.clone(), (device_id.to_string(), expires));
        (nonce, expires)
    }

    /// Consumes a nonce: it works once, for its device, before it expires.
    fn redeem(&self, nonce: &str, device_id: &str, now_ms: i64) -> Result<(), String> {
        let mut nonces = self.nonces.lock().unwrap_or_else(|p| p.into_inner());
        match nonces.remove(nonce) {
            None => Err("unknown or already used recovery nonce".into()),
            Some((owner, _)) if owner != device_id => {
                Err("recovery nonce was issued for another device".into())
            }
            Some((_, expires)) if expires <= now_ms => Err("recovery nonce has expired".into()),
            Some(_) => Ok(()),
        }
    }
}

/// A nonce for expired-certificate recovery.
#[derive(Debug, Clone)]
pub struct RecoveryChallenge {
    pub nonce: String,
    pub expires_ms: i64,
}

/// A recovery attempt as received.
#[derive(Debug, Clone)]
pub struct RecoverInput {
    pub device_id: String,
    pub nonce: String,
    pub previous_certificate_pem: String,
    pub signature: Vec<u8>,
    pub csr_pem: String,
}

/// A certificate with its device.
/// What a renewal request by selector reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenewalRequested {
    pub asked: usize,
    pub not_connected: usize,
}

#[derive(Debug, Clone)]
pub struct CertificateView {
    pub record: CertificateRecord,
    pub device_name: String,
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

    /// Asks connected devices whose certificates are due to renew, forever. Memory only.
    pub async fn run_renewal_scheduler(&self) {
        let renew_before = self.policy.renew_before;
        let tick = (renew_before / 20).clamp(Duration::from_millis(200), Duration::from_secs(5));
        let resend_after = (renew_before / 10).max(tick * 5).as_millis() as i64;
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            interval.tick().await;
            let asked = self.hub.renewal_sweep(now_millis(), resend_after);
            if asked > 0 {
                tracing::info!(devices = asked, "asked devices to renew their certificates");
            }
        }
    }

    /// Appends an audit record, serialised with every other append.
    async fn audit(&self, entry: AuditEntry) -> Result<SealedRecord, ControlError> {
        let _order = self.audit_lock.lock().await;
        Ok(self.store.append_audit(self.seal(), entry).await?)
    }

    /// Records a refused request in the audit trail (a failure to record it is logged, not hidden).
    pub(super) async fn audit_refusal(&self, refusal: Refusal<'_>) {
        let entry = AuditEntry {
            at_ms: now_millis(),
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
            let waited = (now_millis() - asked).max(0) as u64;
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
            issued_ms: now_millis(),
            revoked_ms: None,
            revocation_reason: None,
        })
    }

    /// Answers a renewal request received on a device's stream.
    pub async fn renew_certificate(
        &self,
        device_id: &str,
        session_serial: &str,
        request: pb::CertificateRequest,
    ) -> pb::server_message::Kind {
        let actor = Identity::new(Role::Device, device_id);
        let refuse_after = |reason: String, retryable: bool, retry_after: Option<Duration>| {
            pb::server_message::Kind::CertificateRefused(pb::CertificateRefused {
                request_id: request.request_id.clone(),
                reason,
                retryable,
                retry_after: retry_after.and_then(|d| prost_types::Duration::try_from(d).ok()),
            })
        };
        let refuse = |reason: String, retryable: bool| refuse_after(reason, retryable, None);
        if self.revoked.contains(session_serial) {
            let reason = format!("certificate {session_serial} has been revoked");
            self.refused_renewal(device_id, session_serial, "", &actor, &reason)
                .await;
            return refuse(reason, false);
        }
        let key = match self.check_csr(device_id, &request.csr_pem) {
            Ok(key) => key,
            Err(reason) => {
                self.refused_renewal(device_id, session_serial, "", &actor, &reason)
                    .await;
                return refuse(reason, false);
            }
        };
        let (current_key, existing) = match self
            .store
            .renewal_context(session_serial, device_id, &key.fingerprint)
            .await
        {
            Ok(context) => context,
            Err(error) => {
                tracing::warn!(device.id = %device_id, %error, "renewal deferred: database unavailable");
                return refuse("database unavailable; try again later".into(), true);
            }
        };
        if current_key.as_deref() == Some(key.fingerprint.as_str()) {
            let reason =
                "the CSR reuses the key of the current certificate; renewal needs a fresh key"
                    .to_string();
            self.refused_renewal(device_id, session_serial, &key.fingerprint, &actor, &reason)
                .await;
            return refuse(reason, false);
        }
        // The same CSR (same key) yields the same certificate while that certificate is the
        // device's newest and not yet in use; an older key gets nothing.
        if let Some(existing) = existing {
            let newest = self
                .catalog()
                .device(device_id)
                .and_then(|d| d.cert_serial.clone());
            if existing.revoked_ms.is_none()
                && newest.as_deref() == Some(existing.serial.as_str())
                && existing.serial != session_serial
            {
                self.hub.renewal_succeeded(device_id);
                return self.issued_message(&request.request_id, &existing);
            }
            let reason = if existing.revoked_ms.is_some() {
                "a certificate for this key was revoked".to_string()
            } else {
                "a certificate for this key was already issued and replaced; renewal needs a fresh key".to_string()
            };
            self.refused_renewal(device_id, session_serial, &key.fingerprint, &actor, &reason)
                .await;
            return refuse(reason, false);
        }
        if let Err(limited) = self.issuance_limiter.check(device_id, now_millis()) {
            let limit = self.policy.issuance_limit;
            let reason = format!(
                "issuance rate limit: at most {} certificates per device in {} s",
                limit.max,
                limit.window.as_secs()
            );
            tracing::warn!(device.id = %device_id, retry_after_s = limited.retry_after.as_secs(), "certificate renewal refused: rate limit");
            if limited.first_refusal {
                self.audit_refusal(Refusal {
                    device_id,
                    serial: session_serial,
                    key_fingerprint: &key.fingerprint,
                    actor: &actor,
                    proof: "device-certificate",
                    reason: format!("{reason}; further refusals in this window are not audited"),
                })
                .await;
            }
            return refuse_after(reason, true, Some(limited.retry_after));
        }
        let reason = format!("renewal of {session_serial}");
        match self
            .issue_for_device(
                device_id,
                &key,
                Issuance {
                    kind: "renewed",
                    actor: &actor,
                    proof: "device-certificate",
                    reason,
                },
                IssuanceRules {
                    renews: Some(session_serial.to_string()),
                },
            )
            .await
        {
            Ok(record) => self.issued_message(&request.request_id, &record),
            Err(ControlError::FailedPrecondition(reason)) => {
                // Revoked between the check above and the issuance's transaction.
                self.refused_renewal(device_id, session_serial, &key.fingerprint, &actor, &reason)
                    .await;
                refuse(reason, false)
            }
            Err(error) => {
                tracing::error!(device.id = %device_id, %error, "renewal failed");
                self.hub.renewal_failed(
                    device_id,
                    "the control plane could not issue the certificate",
                );
                refuse(
                    "the control plane could not issue the certificate; try again later".into(),
                    true,
                )
            }
        }
    }

    /// The device refused a certificate it was given: recorded, and the renewal counts as failed.
    pub async fn certificate_rejected_by_device(
        &self,
        device_id: &str,
        rejected: pb::CertificateRejected,
    ) {
        let reason = format!(
            "device rejected the issued certificate: {}",
            rejected.reason
        );
        tracing::warn!(device.id = %device_id, serial = %rejected.serial, %reason, "device rejected a certificate");
        self.hub.renewal_failed(device_id, &reason);
        let actor = Identity::new(Role::Device, device_id);
        self.audit_refusal(Refusal {
            device_id,
            serial: &rejected.serial,
            key_fingerprint: "",
            actor: &actor,
            proof: "device-validation",
            reason,
        })
        .await;
    }

    async fn refused_renewal(
        &self,
        device_id: &str,
        serial: &str,
        key_fingerprint: &str,
        actor: &Identity,
        reason: &str,
    ) {
        tracing::warn!(device.id = %device_id, %reason, "certificate renewal refused");
        self.hub.renewal_failed(device_id, reason);
        self.audit_refusal(Refusal {
            device_id,
            serial,
            key_fingerprint,
            actor,
            proof: "device-certificate",
            reason: reason.to_string(),
        })
        .await;
    }

    fn issued_message(
        &self,
        request_id: &str,
        record: &CertificateRecord,
    ) -> pb::server_message::Kind {
        pb::server_message::Kind::CertificateIssued(pb::CertificateIssued {
            request_id: request_id.to_string(),
            certificate_pem: record.certificate_pem.clone(),
            ca_bundle_pem: self.ca.cert_pem().to_string(),
            not_after: Some(crate::clock::timestamp_from_millis(record.not_after_ms)),
        })
    }

    /// Step 1 of recovery: a nonce for `device_id`.
    pub async fn recovery_challenge(
        &self,
        caller: &Identity,
        device_id: &str,
    ) -> Result<RecoveryChallenge, ControlError> {
        if caller.role != Role::Enrollment {
            return Err(ControlError::PermissionDenied(format!(
                "{caller} may not recover devices"
            )));
        }
        if self.catalog().device(device_id).is_none() {
            return Err(ControlError::NotFound(format!(
                "device {device_id} is not enrolled; enroll it again"
            )));
        }
        let (nonce, expires_ms) = self.challenges.issue(device_id, now_millis());
        Ok(RecoveryChallenge { nonce, expires_ms })
    }

    /// Step 2 of recovery: checks the proof and issues a certificate for the fresh key.
    pub async fn recover(
        &self,
        caller: &Identity,
        input: RecoverInput,
    ) -> Result<CertificateRecord, ControlError> {
        if caller.role != Role::Enrollment {
            return Err(ControlError::PermissionDenied(format!(
                "{caller} may not recover devices"
            )));
        }
        let device_id = input.device_id.clone();
        let previous = cert_info_pem(&input.previous_certificate_pem).ok();
        let serial = previous
            .as_ref()
            .map(|c| c.serial.clone())
            .unwrap_or_default();
        let key_fingerprint = previous
            .as_ref()
            .map(|c| c.key_fingerprint.clone())
            .unwrap_or_default();
        match self.check_recovery(&input).await {
            Ok(key) => {
                // A retried recovery (same fresh key) gets the certificate already issued.
                if let Some(existing) = self
                    .store
                    .find_certificate_for_key(&device_id, &key.fingerprint)
                    .await?
                    .filter(|c| c.revoked_ms.is_none())
                {
                    return Ok(existing);
                }
                let reason = format!("recovery of expired certificate {serial}");
                self.issue_for_device(
                    &device_id,
                    &key,
                    Issuance {
                        kind: "recovered",
                        actor: caller,
                        proof: "previous-key",
                        reason,
                    },
                    IssuanceRules::default(),
                )
                .await
            }
            Err(error @ ControlError::Overloaded { .. }) => Err(error),
            Err(error) => {
                tracing::warn!(device.id = %device_id, %error, "certificate recovery refused");
                self.audit_refusal(Refusal {
                    device_id: &device_id,
                    serial: &serial,
                    key_fingerprint: &key_fingerprint,
                    actor: caller,
                    proof: "previous-key",
                    reason: error.to_string(),
                })
                .await;
                Err(error)
            }
        }
    }

    async fn check_recovery(&self, input: &RecoverInput) -> Result<CsrPublicKey, ControlError> {
        let denied = |reason: String| ControlError::PermissionDenied(reason);
        let now = now_millis();
        if let Err(limited) = self.recovery_limiter.check(&input.device_id, now) {
            let message = format!(
                "too many recovery attempts for device {}; retry in {} s",
                input.device_id,
                limited.retry_after.as_secs().max(1)
            );
            if limited.first_refusal {
                // One record per window, not one per attempt.
                return Err(denied(format!(
                    "{message} (further attempts in this window are refused without a record)"
                )));
            }
            return Err(ControlError::Overloaded {
                message,
                retry_after: limited.retry_after,
            });
        }
        self.challenges
            .redeem(&input.nonce, &input.device_id, now)
            .map_err(denied)?;
        let previous_pem = &input.previous_certificate_pem;
        verify_signed_by(previous_pem, self.ca.cert_pem())
            .map_err(|e| denied(format!("previous certificate: {e}")))?;
        let identity =
            identity_pem(previous_pem).map_err(|e| denied(format!("previous certificate: {e}")))?;
        if identity != Identity::new(Role::Device, &input.device_id) {
            return Err(denied(format!(
                "previous certificate belongs to {identity}, not device {}",
                input.device_id
            )));
        }
        let info = cert_info_pem(previous_pem).map_err(|e| denied(e.to_string()))?;
        // The latest certificate, or the one it replaced when the device lost power before it
        // could switch to the new one.
        let certificates = self
            .store
            .list_certificates(Some(input.device_id.clone()))
            .await?;
        let stored = certificates
            .iter()
            .rev()
            .take(2)
            .find(|c| c.serial == info.serial)
            .cloned()
            .ok_or_else(|| {
                denied("previous certificate is not one of the device's latest certificates".into())
            })?;
        if stored.revoked_ms.is_some() {
            return Err(denied("previous certificate was revoked".into()));
        }
        if now < info.not_after * 1000 {
            return Err(denied(format!(
                "certificate {} has not expired; a device with a valid certificate renews it on its session",
                info.serial
            )));
        }
        let window_end = info.not_after * 1000 + self.policy.recovery_window.as_millis() as i64;
        if now > window_end {
            return Err(ControlError::FailedPrecondition(format!(
                "certificate {} expired more than the recovery window ({} s) ago; enroll the device again",
                info.serial,
                self.policy.recovery_window.as_secs()
            )));
        }
        let der = certs_from_pem(previous_pem).map_err(|e| denied(e.to_string()))?;
        let spki = x509_spki(&der[0]).map_err(denied)?;
        verify(
            &spki,
            &recovery_message(&input.device_id, &input.nonce, &input.csr_pem),
            &input.signature,
        )
        .map_err(|e| denied(format!("proof of the previous key: {e}")))?;
        let key = self
            .check_csr(&input.device_id, &input.csr_pem)
            .map_err(|e| ControlError::invalid("csr_pem", e))?;
        if key.fingerprint == info.key_fingerprint {
            return Err(ControlError::invalid(
                "csr_pem",
                "the CSR reuses the previous key; recovery needs a fresh key",
            ));
        }
        Ok(key)
    }

    /// Revokes one certificate (`serial`) or all of a device's; closes streams that use them.
    pub async fn revoke_certificates(
        &self,
        serial: Option<&str>,
        device: Option<&str>,
        reason: &str,
        actor: &Actor,
    ) -> Result<Vec<String>, ControlError> {
        let mut call = actor.record(match device {
            Some(name) => format!("device/{name}"),
            None => format!("certificate/{}", serial.unwrap_or_default()),
        });
        call.reason = reason.to_string();
        let serials = match (serial, device) {
            (Some(serial), None) => match self.store.get_certificate(serial).await? {
                Some(record) => {
                    call.device_id = record.device_id.clone();
                    if let Some(device) = self.catalog().device(&record.device_id) {
                        call.target = format!("device/{}", device.name);
                        call.serial = record.serial.clone();
                    }
                    (vec![record.serial], None)
                }
                None => {
                    return self
                        .revoke_credential_certificate(serial, reason, actor)
                        .await;
                }
            },
            // Listed inside the revoking transaction: one issued a moment ago is included.
            (None, Some(name)) => {
                let id = self.device_id_by_name(name)?;
                call.device_id = id.clone();
                (Vec::new(), Some(id))
            }
            _ => {
                return Err(ControlError::invalid(
                    "serial",
                    "give exactly one of a serial and a device",
                ));
            }
        };
        let (serials, device) = serials;
        let revocation = Revocation {
            serials,
            device,
            reason: if reason.is_empty() {
                "revoked by operator".into()
            } else {
                reason.to_string()
            },
            actor: actor.to_string(),
            now_ms: now_millis(),
            superseded: false,
        };
        // Under the audit order, so no issuance commits between the store and memory updates.
        let _order = self.audit_lock.lock().await;
        let revoked = self
            .store
            .revoke_certificates(revocation, self.audited(vec![call]))
            .await?;
        Ok(self.after_revocation(revoked))
    }

    /// A device opened a session with its newest certificate: the certificate it renewed is no
    /// longer needed and is superseded (audited), so it cannot open sessions for the rest of its
    /// lifetime. A failure leaves the spare for the next session to retire.
    pub(super) async fn supersede_spares(&self, device_id: &str, serial: &str) {
        let actor = Identity::new(Role::Device, device_id).to_string();
        // With whatever other certificate writes are waiting (group commit), in audit order.
        match self
            .issuances
            .supersede(device_id, serial, actor, now_millis())
            .await
        {
            Ok(superseded) => {
                self.spares().remove(device_id);
                self.hub.renewal_succeeded(device_id);
                for serial in self.after_revocation(superseded) {
                    tracing::info!(device.id = %device_id, %serial, "certificate superseded by the one in use");
                }
            }
            Err(error) => {
                tracing::warn!(device.id = %device_id, %error, "could not retire the renewed certificate; trying again on the next session");
            }
        }
    }

    /// Makes revocations effective at once: refused on new connections, open streams closed.
    fn after_revocation(&self, revoked: Vec<CertificateRecord>) -> Vec<String> {
        let serials = self.enforce_revocation(&revoked);
        for serial in &serials {
            crate::telemetry::certificate_event("revoked");
            tracing::info!(serial = %serial, "certificate revoked");
        }
        serials
    }

    /// Refuses the revoked serials on new connections and closes the sessions using them (also
    /// for revocations another replica recorded).
    pub(super) fn enforce_revocation(&self, revoked: &[CertificateRecord]) -> Vec<String> {
        let serials: Vec<String> = revoked.iter().map(|c| c.serial.clone()).collect();
        self.revoked.extend(serials.iter().cloned());
        for certificate in revoked {
            self.hub
                .certificate_revoked(&certificate.device_id, &certificate.serial);
            // A serial belongs to one device: only its own can be the one its session uses.
            if self.hub.close_session_using(
                &certificate.device_id,
                std::slice::from_ref(&certificate.serial),
            ) {
                tracing::info!(device.id = %certificate.device_id, serial = %certificate.serial, "closed a session using a revoked certificate");
            }
        }
        serials
    }

    fn device_id_by_name(&self, name: &str) -> Result<String, ControlError> {
        self.catalog()
            .device_by_name(name)
            .map(|d| d.id.clone())
            .ok_or_else(|| ControlError::NotFound(format!("device {name:?} not found")))
    }

    /// Decommissions a device: revokes its certificates, removes it and its enrollment request.
    pub async fn delete_device(
        &self,
        name: &str,
        actor: &Actor,
    ) -> Result<Vec<String>, ControlError> {
        let _writes = self.writes.lock().await;
        let id = self.device_id_by_name(name)?;
        let revocation = Revocation {
            device: Some(id.clone()),
            reason: format!("device {name} deleted"),
            actor: actor.to_string(),
            now_ms: now_millis(),
            ..Default::default()
        };
        let serials = {
            let _order = self.audit_lock.lock().await;
            let revoked = self
                .store
                .delete_device(
                    &id,
                    revocation,
                    self.audited(vec![AuditEntry {
                        device_id: id.clone(),
                        ..actor.record(format!("device/{name}"))
                    }]),
                )
                .await?;
            self.after_revocation(revoked)
        };
        self.enrollment_counts
            .moved(Some(crate::store::EnrollmentState::Approved), None);
        self.hub.remove(&id);
        {
            let mut catalog = self.catalog_mut();
            catalog.remove_device(&id);
        }
        tracing::info!(device.id = %id, device.name = %name, by = %actor, "device deleted");
        Ok(serials)
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

    /// Asks a connected device to renew now.
    pub async fn force_renewal(&self, name: &str, actor: &Actor) -> Result<(), ControlError> {
        let id = self.device_id_by_name(name)?;
        if self.ask_renewals(std::slice::from_ref(&id)).await? == 0 {
            return Err(ControlError::FailedPrecondition(format!(
                "device {name:?} is not connected; it renews on its own when its certificate is due"
            )));
        }
        self.record_call(AuditEntry {
            device_id: id.clone(),
            ..actor.record(format!("device/{name}"))
        })
        .await?;
        tracing::info!(device.id = %id, by = %actor, "certificate renewal requested");
        Ok(())
    }

    /// Asks every connected device whose labels match `selector` to renew now.
    /// Asks the devices to renew now: those connected here directly, those connected to another
    /// replica through the change feed. Returns how many were asked.
    async fn ask_renewals(&self, ids: &[String]) -> Result<usize, ControlError> {
        let mut asked = 0;
        let mut elsewhere = Vec::new();
        for id in ids {
            if self.hub.force_renewal(id) {
                asked += 1;
            } else if self.hub.is_held_elsewhere(id) {
                elsewhere.push(id.clone());
            }
        }
        if !elsewhere.is_empty() && self.store.has_change_feed() {
            asked += elsewhere.len();
            self.store.request_renewals(elsewhere).await?;
        }
        Ok(asked)
    }

    pub async fn force_renewal_matching(
        &self,
        selector: &str,
        actor: &Actor,
    ) -> Result<RenewalRequested, ControlError> {
        let selector = super::devices::parse_selector(selector)?;
        let ids: Vec<String> = self
            .catalog()
            .devices()
            .filter(|d| selector.matches(&d.labels))
            .map(|d| d.id.clone())
            .collect();
        let asked = self.ask_renewals(&ids).await?;
        let requested = RenewalRequested {
            asked,
            not_connected: ids.len() - asked,
        };
        self.record_call(AuditEntry {
            reason: format!(
                "{asked} device(s) asked, {} not connected",
                requested.not_connected
            ),
            ..actor.record(format!("selector/{selector}"))
        })
        .await?;
        tracing::info!(%selector, by = %actor, asked, not_connected = requested.not_connected, "certificate renewal requested");
        Ok(requested)
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

//! Recovery of a device whose certificate expired: a one-time nonce, then a CSR signed by the
//! previous key, within the recovery window.

use crate::ca::csr::CsrPublicKey;
use crate::control::{ControlError, ControlPlane};
use crate::identity::{Identity, Role};
use crate::pki::{cert_info_pem, certs_from_pem, identity_pem, verify_signed_by};
use crate::signature::{recovery_message, verify};
use crate::store::{CertificateRecord, IssuanceRules};
use rand::RngCore;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use super::{Issuance, Refusal, x509_spki};

/// How long a recovery nonce may be used.
const CHALLENGE_LIFETIME: Duration = Duration::from_secs(300);

/// Outstanding nonces kept at most (enrollment-credential holders cannot exhaust memory).
const MAX_CHALLENGES: usize = 100_000;

/// Outstanding recovery nonces: nonce → (device id, expiry).
#[derive(Debug, Default)]
pub(in crate::control) struct Challenges {
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
    /// The nonce to sign with the previous key.
    pub nonce: String,
    /// When it stops working, Unix milliseconds.
    pub expires_ms: i64,
}

/// A recovery attempt as received.
#[derive(Debug, Clone)]
pub struct RecoverInput {
    /// The device recovering.
    pub device_id: String,
    /// The nonce of `recovery_challenge`.
    pub nonce: String,
    /// The expired certificate (PEM).
    pub previous_certificate_pem: String,
    /// Its key's signature over the recovery message.
    pub signature: Vec<u8>,
    /// A CSR for a fresh key (PEM).
    pub csr_pem: String,
}

impl ControlPlane {
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
        let (nonce, expires_ms) = self.challenges.issue(device_id, self.now_millis());
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
        let now = self.now_millis();
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
}

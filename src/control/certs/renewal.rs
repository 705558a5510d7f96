//! Certificate renewal: the scheduler that asks devices to renew, renewal requests answered on the
//! stream (idempotent, fresh key only, rate-limited), and renewals an operator forces.

use crate::audit::AuditEntry;
use crate::control::messages::{CertificateRejected, CertificateRequest, Directive};
use crate::control::{Actor, ControlError, ControlPlane};
use crate::identity::{Identity, Role};
use crate::store::{CertificateRecord, IssuanceRules};
use std::time::Duration;

use super::{Issuance, Refusal};

/// A certificate with its device.
/// What a renewal request by selector reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenewalRequested {
    /// Connected devices asked to renew now.
    pub asked: usize,
    /// Matching devices not connected: asked when they are.
    pub not_connected: usize,
}

impl ControlPlane {
    /// Asks connected devices whose certificates are due to renew, forever. Memory only.
    pub async fn run_renewal_scheduler(&self) {
        let renew_before = self.policy.renew_before;
        let tick = (renew_before / 20).clamp(Duration::from_millis(200), Duration::from_secs(5));
        let resend_after = (renew_before / 10).max(tick * 5).as_millis() as i64;
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            interval.tick().await;
            let asked = self.hub.renewal_sweep(self.now_millis(), resend_after);
            if asked > 0 {
                tracing::info!(devices = asked, "asked devices to renew their certificates");
            }
        }
    }

    /// Answers a renewal request received on a device's stream.
    pub async fn renew_certificate(
        &self,
        device_id: &str,
        session_serial: &str,
        request: CertificateRequest,
    ) -> Directive {
        let actor = Identity::new(Role::Device, device_id);
        let refuse_after = |reason: String, retryable: bool, retry_after: Option<Duration>| {
            Directive::CertificateRefused {
                request_id: request.request_id.clone(),
                reason,
                retryable,
                retry_after,
            }
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
        if let Err(limited) = self.issuance_limiter.check(device_id, self.now_millis()) {
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
        rejected: CertificateRejected,
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

    fn issued_message(&self, request_id: &str, record: &CertificateRecord) -> Directive {
        Directive::CertificateIssued {
            request_id: request_id.to_string(),
            certificate_pem: record.certificate_pem.clone(),
            ca_bundle_pem: self.ca.cert_pem().to_string(),
            not_after_ms: record.not_after_ms,
        }
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
            ..actor.record(self.now_millis(), format!("device/{name}"))
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

    /// Asks every device `selector` matches to renew.
    pub async fn force_renewal_matching(
        &self,
        selector: &str,
        actor: &Actor,
    ) -> Result<RenewalRequested, ControlError> {
        let selector = crate::control::devices::parse_selector(selector)?;
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
            ..actor.record(self.now_millis(), format!("selector/{selector}"))
        })
        .await?;
        tracing::info!(%selector, by = %actor, asked, not_connected = requested.not_connected, "certificate renewal requested");
        Ok(requested)
    }
}

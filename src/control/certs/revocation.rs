//! Revocation of certificates (closing the sessions that use them, on whichever replica holds them),
//! superseding spare certificates, and decommissioning a device.

use crate::audit::AuditEntry;
use crate::control::{Actor, ControlError, ControlPlane};
use crate::identity::{Identity, Role};
use crate::store::{CertificateRecord, Revocation};

impl ControlPlane {
    /// Revokes one certificate (`serial`) or all of a device's; closes streams that use them.
    pub async fn revoke_certificates(
        &self,
        serial: Option<&str>,
        device: Option<&str>,
        reason: &str,
        actor: &Actor,
    ) -> Result<Vec<String>, ControlError> {
        let mut call = actor.record(
            self.now_millis(),
            match device {
                Some(name) => format!("device/{name}"),
                None => format!("certificate/{}", serial.unwrap_or_default()),
            },
        );
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
            now_ms: self.now_millis(),
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
    pub(in crate::control) async fn supersede_spares(&self, device_id: &str, serial: &str) {
        let actor = Identity::new(Role::Device, device_id).to_string();
        // With whatever other certificate writes are waiting (group commit), in audit order.
        match self
            .issuances
            .supersede(device_id, serial, actor, self.now_millis())
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
    pub(super) fn after_revocation(&self, revoked: Vec<CertificateRecord>) -> Vec<String> {
        let serials = self.enforce_revocation(&revoked);
        for serial in &serials {
            crate::telemetry::certificate_event("revoked");
            tracing::info!(serial = %serial, "certificate revoked");
        }
        serials
    }

    /// Refuses the revoked serials on new connections and closes the sessions using them (also
    /// for revocations another replica recorded).
    pub(in crate::control) fn enforce_revocation(
        &self,
        revoked: &[CertificateRecord],
    ) -> Vec<String> {
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
            now_ms: self.now_millis(),
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
                        ..actor.record(self.now_millis(), format!("device/{name}"))
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
}

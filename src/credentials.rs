//! The registry of credentials the authentication layer consults on every request: which names
//! exist with which role, grant, scope or enrollment policy, whether they are revoked, and which
//! certificate is each one's newest. A certificate with a
//! `flotilla://admin|operator|viewer|service|enrollment/<name>` identity is accepted only for a
//! registered, unrevoked credential of that role — one forged with the CA key under a name nobody
//! created is refused. Uses are noted in memory (last use, a renewed
//! credential's first use of its new certificate) for the control plane to write behind.

use crate::authz::{Grant, ServiceGrant};
use crate::identity::{Identity, Role};
use crate::selector::Selector;
use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, RwLock};
use tokio::sync::Notify;

/// A credential as the auth layer needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// Its name (`ops`, `factory-line-1`).
    pub name: String,
    /// The role it acts in.
    pub role: Role,
    /// What a service credential was given.
    pub grant: Option<ServiceGrant>,
    /// Devices and fleets outside it are neither shown nor changed; `None` for everything.
    pub scope: Option<Selector>,
    /// Revoked: nothing made with it is admitted.
    pub revoked: bool,
    /// The serial of its newest certificate.
    pub newest_serial: String,
    /// Whether an older certificate is still unrevoked (superseded once the newest is used).
    pub older_live: bool,
    /// When the newest certificate expires (Unix ms).
    pub not_after_ms: i64,
    /// Enrollment credentials only: what happens to the requests made with it.
    pub enrollment: Option<EnrollmentPolicy>,
}

/// What an enrollment credential does to the requests made with it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnrollmentPolicy {
    /// Set on every device it enrolls, over the labels the device asked for.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Requests made with it are approved without an operator.
    pub auto_approve: bool,
}

/// What a verified caller may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// What the caller may call.
    pub grant: Grant,
    /// The devices it sees and changes; `None` for all.
    pub scope: Option<Selector>,
}

/// Why a certificate's credential is not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmitError {
    /// No credential of that name and role.
    #[error(
        "{0} is not a registered credential (an admin creates credentials with `flotctl credential create`)"
    )]
    Unknown(String),
    /// The credential was revoked.
    #[error("credential {0:?} has been revoked")]
    Revoked(String),
}

/// Uses noted since the last `take_uses`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Uses {
    /// Name → last use (Unix ms).
    pub last_used: HashMap<String, i64>,
    /// (name, newest serial) of credentials whose new certificate was used while an older one
    /// is still valid.
    pub renewed_in_use: Vec<(String, String)>,
}

/// The credentials the auth layer admits callers by, in memory, kept in step with the store.
#[derive(Debug, Default)]
pub struct Registry {
    credentials: RwLock<HashMap<String, Credential>>,
    uses: Mutex<Uses>,
    /// Names already queued in `renewed_in_use`, so each is queued once.
    queued: Mutex<HashSet<String>>,
    /// Wakes the writer when a renewed credential's new certificate was first used.
    pub renewed: Notify,
}

impl Registry {
    /// Decides whether the holder of `identity` (role and name from its verified certificate,
    /// presented with `serial`) is a live credential, and notes the use.
    pub fn admit(
        &self,
        identity: &Identity,
        serial: &str,
        now_ms: i64,
    ) -> Result<Admitted, AdmitError> {
        let credentials = self.credentials.read().unwrap_or_else(|p| p.into_inner());
        let credential = credentials
            .get(&identity.name)
            .filter(|c| c.role == identity.role)
            .ok_or_else(|| AdmitError::Unknown(identity.uri()))?;
        if credential.revoked {
            return Err(AdmitError::Revoked(credential.name.clone()));
        }
        let admitted = Admitted {
            grant: Grant {
                role: credential.role,
                service: credential.grant.clone(),
            },
            scope: credential.scope.clone(),
        };
        let renewed_in_use = credential.older_live && credential.newest_serial == serial;
        drop(credentials);
        let mut uses = self.uses.lock().unwrap_or_else(|p| p.into_inner());
        uses.last_used.insert(identity.name.clone(), now_ms);
        if renewed_in_use
            && self
                .queued
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(identity.name.clone())
        {
            uses.renewed_in_use
                .push((identity.name.clone(), serial.to_string()));
            self.renewed.notify_one();
        }
        Ok(admitted)
    }

    /// Adds or replaces a credential (after a write, at load, or from the change feed).
    pub fn put(&self, credential: Credential) {
        if !credential.older_live {
            self.queued
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&credential.name);
        }
        self.credentials
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(credential.name.clone(), credential);
    }

    /// The credential `name`, if registered.
    pub fn get(&self, name: &str) -> Option<Credential> {
        self.credentials
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Takes the uses noted since the last call.
    pub fn take_uses(&self) -> Uses {
        std::mem::take(&mut *self.uses.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Lets a renewal that could not be finished be queued again by the next use.
    pub fn requeue(&self, name: &str) {
        self.queued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }

    /// The role and expiry of every unrevoked credential (for metrics).
    pub fn live(&self) -> Vec<(Role, i64)> {
        self.credentials
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|c| !c.revoked)
            .map(|c| (c.role, c.not_after_ms))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credential(name: &str, role: Role) -> Credential {
        Credential {
            name: name.into(),
            role,
            grant: None,
            scope: None,
            revoked: false,
            newest_serial: "02".into(),
            older_live: false,
            not_after_ms: 0,
            enrollment: None,
        }
    }

    #[test]
    fn only_registered_live_credentials_of_the_named_role_are_admitted() {
        let registry = Registry::default();
        registry.put(credential("ops", Role::Operator));
        assert!(
            registry
                .admit(&Identity::new(Role::Operator, "ops"), "02", 1)
                .is_ok()
        );
        assert_eq!(
            registry.admit(&Identity::new(Role::Admin, "ops"), "02", 1),
            Err(AdmitError::Unknown("flotilla://admin/ops".into()))
        );
        assert!(matches!(
            registry.admit(&Identity::new(Role::Viewer, "forged"), "09", 1),
            Err(AdmitError::Unknown(_))
        ));
        registry.put(Credential {
            revoked: true,
            ..credential("ops", Role::Operator)
        });
        assert_eq!(
            registry.admit(&Identity::new(Role::Operator, "ops"), "02", 1),
            Err(AdmitError::Revoked("ops".into()))
        );
    }

    #[test]
    fn the_first_use_of_a_renewed_certificate_is_queued_once() {
        let registry = Registry::default();
        registry.put(Credential {
            older_live: true,
            ..credential("svc", Role::Service)
        });
        let me = Identity::new(Role::Service, "svc");
        registry.admit(&me, "01", 5).unwrap();
        assert!(registry.take_uses().renewed_in_use.is_empty(), "old serial");
        registry.admit(&me, "02", 6).unwrap();
        registry.admit(&me, "02", 7).unwrap();
        let uses = registry.take_uses();
        assert_eq!(uses.renewed_in_use, vec![("svc".into(), "02".into())]);
        assert_eq!(uses.last_used.get("svc"), Some(&7));
    }
}

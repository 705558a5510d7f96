//! Credential use cases: creating a credential for a key the client holds (a CSR), renewing it
//! (fresh key, same name; the older certificates superseded once the new one is used), revoking it
//! (every certificate, every open call, every replica), the bootstrap admin's registration, and
//! writing behind when credentials were last used.

use super::{Actor, ControlError, ControlPlane};
use crate::audit::AuditEntry;
use crate::authz::ServiceGrant;
use crate::ca::csr::{CsrPublicKey, verify_csr_pem};
use crate::ca::{Subject, Usage};
use crate::credentials::{Credential, EnrollmentPolicy};
use crate::identity::{Identity, Role};
use crate::names::{validate_labels, validate_name};
use crate::pki::cert_info_pem;
use crate::selector::Selector;
use crate::store::{
    CredentialCertificate, CredentialRecord, CredentialRevocation, StoreError, StoredCredential,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// Lifetime of a credential's certificate unless asked otherwise.
pub const DEFAULT_CREDENTIAL_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// Longest lifetime a credential's certificate may be given.
pub const MAX_CREDENTIAL_VALIDITY: Duration = Duration::from_secs(2 * 365 * 24 * 3600);
/// Shortest lifetime (a certificate that expires before it can be used helps nobody).
const MIN_CREDENTIAL_VALIDITY: Duration = Duration::from_secs(3600);
/// How often the last uses of credentials are written.
const USE_FLUSH_INTERVAL: Duration = Duration::from_secs(30);
/// The name of the credential every first start creates (`bootstrap`).
pub const BOOTSTRAP_ADMIN: &str = "admin";

/// A credential to create.
#[derive(Debug, Clone)]
pub struct NewCredential {
    /// The credential's name.
    pub name: String,
    /// Its role (`None` for a service, which `acts_as` or `methods` describe).
    pub role: Option<Role>,
    /// Its scope as a label selector ("" for everything).
    pub scope: String,
    /// For services: a role to act as, and/or methods (exactly one of them).
    pub acts_as: Option<Role>,
    /// The admin methods a service may call.
    pub methods: Vec<String>,
    /// The CSR for its key (PEM); the private key never leaves the client.
    pub csr_pem: String,
    /// How long its certificate is valid (`90d`).
    pub validity: String,
    /// Enrollment credentials only.
    pub enrollment: Option<EnrollmentPolicy>,
}

/// A credential as shown to admins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialView {
    /// The stored credential.
    pub record: CredentialRecord,
    /// Its role.
    pub role: Role,
    /// What a service was given.
    pub grant: Option<ServiceGrant>,
    /// The newest certificate.
    pub newest: Option<CredentialCertificate>,
    /// What an enrollment credential stamps and approves.
    pub enrollment: Option<EnrollmentPolicy>,
}

/// A certificate just issued for a credential.
#[derive(Debug, Clone)]
pub struct IssuedCredential {
    /// The credential.
    pub view: CredentialView,
    /// Its new certificate (PEM).
    pub certificate_pem: String,
}

/// The stored form of a service grant or an enrollment policy.
#[derive(Debug, Default, Serialize, Deserialize)]
struct StoredGrant {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    acts_as: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    methods: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    auto_approve: bool,
}

fn policy_text(policy: &EnrollmentPolicy) -> String {
    let stored = StoredGrant {
        labels: policy.labels.clone(),
        auto_approve: policy.auto_approve,
        ..Default::default()
    };
    serde_json::to_string(&stored).unwrap_or_else(|_| "{}".into())
}

fn grant_text(grant: Option<&ServiceGrant>) -> String {
    let stored = match grant {
        None => StoredGrant::default(),
        Some(ServiceGrant::ActsAs(role)) => StoredGrant {
            acts_as: Some(role.kind().to_string()),
            ..Default::default()
        },
        Some(ServiceGrant::Methods(methods)) => StoredGrant {
            methods: methods.iter().cloned().collect(),
            ..Default::default()
        },
    };
    serde_json::to_string(&stored).unwrap_or_else(|_| "{}".into())
}

fn corrupt(name: &str, detail: impl std::fmt::Display) -> ControlError {
    ControlError::Internal(format!("stored credential {name:?}: {detail}"))
}

/// Reads a stored credential back into its parts. Stored credentials were validated when created,
/// so a failure means the database was changed behind the control plane's back.
fn parse_stored(
    record: &CredentialRecord,
) -> Result<(Role, Option<ServiceGrant>, Option<Selector>), ControlError> {
    let role = Role::from_kind(&record.role)
        .filter(|r| is_credential_role(*r))
        .ok_or_else(|| corrupt(&record.name, format!("unknown role {:?}", record.role)))?;
    let stored: StoredGrant =
        serde_json::from_str(&record.grants).map_err(|e| corrupt(&record.name, e))?;
    let grant = if role == Role::Service {
        let acts_as = stored.acts_as.as_deref().map(|kind| {
            Role::from_kind(kind).ok_or_else(|| corrupt(&record.name, "unknown role in grant"))
        });
        Some(
            ServiceGrant::parse(acts_as.transpose()?, &stored.methods)
                .map_err(|e| corrupt(&record.name, e))?,
        )
    } else {
        None
    };
    let scope = if record.scope.is_empty() {
        None
    } else {
        Some(Selector::parse(&record.scope).map_err(|e| corrupt(&record.name, e))?)
    };
    Ok((role, grant, scope))
}

fn is_credential_role(role: Role) -> bool {
    matches!(
        role,
        Role::Admin | Role::Operator | Role::Viewer | Role::Service | Role::Enrollment
    )
}

/// An enrollment credential's policy, as stored.
fn stored_policy(record: &CredentialRecord) -> Result<Option<EnrollmentPolicy>, ControlError> {
    if record.role != Role::Enrollment.kind() {
        return Ok(None);
    }
    let stored: StoredGrant =
        serde_json::from_str(&record.grants).map_err(|e| corrupt(&record.name, e))?;
    Ok(Some(EnrollmentPolicy {
        labels: stored.labels,
        auto_approve: stored.auto_approve,
    }))
}

fn view(stored: &StoredCredential) -> Result<CredentialView, ControlError> {
    let (role, grant, _) = parse_stored(&stored.record)?;
    Ok(CredentialView {
        record: stored.record.clone(),
        role,
        grant,
        newest: stored.certificates.last().cloned(),
        enrollment: stored_policy(&stored.record)?,
    })
}

/// The registry's picture of a stored credential.
fn registry_entry(stored: &StoredCredential) -> Result<Credential, ControlError> {
    let (role, grant, scope) = parse_stored(&stored.record)?;
    let newest = stored.certificates.last();
    Ok(Credential {
        name: stored.record.name.clone(),
        role,
        grant,
        scope,
        revoked: stored.record.revoked_ms.is_some(),
        newest_serial: newest.map(|c| c.serial.clone()).unwrap_or_default(),
        older_live: stored.certificates.len() > 1
            && stored.certificates[..stored.certificates.len() - 1]
                .iter()
                .any(|c| c.revoked_ms.is_none()),
        not_after_ms: newest.map(|c| c.not_after_ms).unwrap_or(0),
        enrollment: stored_policy(&stored.record)?,
    })
}

fn validity(text: &str, default: Duration) -> Result<Duration, ControlError> {
    if text.trim().is_empty() {
        return Ok(default);
    }
    let validity =
        crate::clock::parse_duration(text).map_err(|e| ControlError::invalid("validity", e))?;
    if validity < MIN_CREDENTIAL_VALIDITY {
        return Err(ControlError::invalid("validity", "must be at least 1h"));
    }
    if validity > MAX_CREDENTIAL_VALIDITY {
        return Err(ControlError::invalid(
            "validity",
            "must be at most 730d (two years)",
        ));
    }
    Ok(validity)
}

/// A revocation by an admin; an empty reason says so.
fn admin_revocation(
    name: &str,
    reason: &str,
    actor: &Identity,
    now_ms: i64,
) -> CredentialRevocation {
    CredentialRevocation {
        name: name.to_string(),
        reason: if reason.trim().is_empty() {
            "revoked by admin".into()
        } else {
            reason.to_string()
        },
        actor: actor.to_string(),
        now_ms,
    }
}

fn check_csr(csr_pem: &str, identity: &Identity) -> Result<CsrPublicKey, ControlError> {
    let key = verify_csr_pem(csr_pem).map_err(|e| ControlError::invalid("csr_pem", e))?;
    let own = identity.uri();
    if let Some(other) = key.requested_identities.iter().find(|uri| **uri != own) {
        return Err(ControlError::invalid(
            "csr_pem",
            format!("CSR asks for identity {other}, but the credential is {own}"),
        ));
    }
    Ok(key)
}

impl ControlPlane {
    fn sign_credential(
        &self,
        identity: &Identity,
        key: &CsrPublicKey,
        validity: Duration,
    ) -> Result<CredentialCertificate, ControlError> {
        let issued = self
            .ca
            .sign(
                &Subject {
                    common_name: identity.to_string(),
                    identity: Some(identity.clone()),
                    dns_names: vec![],
                    ip_addresses: vec![],
                    usage: Usage::Client,
                    validity,
                },
                key,
            )
            .map_err(|e| ControlError::Internal(e.to_string()))?;
        Ok(CredentialCertificate {
            serial: issued.info.serial,
            credential: identity.name.clone(),
            key_fingerprint: issued.info.key_fingerprint,
            fingerprint: issued.info.fingerprint,
            certificate_pem: issued.pem,
            not_before_ms: issued.info.not_before * 1000,
            not_after_ms: issued.info.not_after * 1000,
            issued_ms: self.now_millis(),
            revoked_ms: None,
            revocation_reason: None,
        })
    }

    /// Loads every credential into the registry (at start).
    pub(super) async fn load_credentials(&self) -> Result<(), ControlError> {
        for stored in self.store.load_credentials().await? {
            self.credentials.put(registry_entry(&stored)?);
        }
        Ok(())
    }

    /// Re-reads credentials another replica changed.
    pub(super) async fn reload_credentials(
        &self,
        names: impl IntoIterator<Item = &String>,
    ) -> Result<(), ControlError> {
        for name in names {
            if let Some(stored) = self.store.credential(name).await? {
                self.refresh_credential(&stored)?;
            }
        }
        Ok(())
    }

    /// Puts a credential's current state into the registry and refuses its revoked serials.
    fn refresh_credential(&self, stored: &StoredCredential) -> Result<(), ControlError> {
        let revoked: Vec<String> = stored
            .certificates
            .iter()
            .filter(|c| c.revoked_ms.is_some() || stored.record.revoked_ms.is_some())
            .map(|c| c.serial.clone())
            .collect();
        // Serials first: an open call ends before the registry could admit it again.
        self.revoked.extend(revoked);
        self.credentials.put(registry_entry(stored)?);
        Ok(())
    }

    /// Creates a credential and issues its first certificate for the CSR's key.
    pub async fn create_credential(
        &self,
        new: NewCredential,
        actor: &Actor,
    ) -> Result<IssuedCredential, ControlError> {
        validate_name(&new.name).map_err(|e| ControlError::invalid("name", e))?;
        let role = new.role.filter(|r| is_credential_role(*r)).ok_or_else(|| {
            ControlError::invalid(
                "role",
                "must be one of admin, operator, viewer, service, enrollment",
            )
        })?;
        let scope = new.scope.trim();
        match (&new.enrollment, role) {
            (Some(policy), Role::Enrollment) => validate_labels(&policy.labels)
                .map_err(|e| ControlError::invalid("enrollment.labels", e))?,
            (Some(_), _) => {
                return Err(ControlError::invalid(
                    "enrollment",
                    "only enrollment credentials take labels or auto-approval",
                ));
            }
            (None, _) => {}
        }
        if !scope.is_empty() {
            if matches!(role, Role::Admin | Role::Enrollment) {
                return Err(ControlError::invalid(
                    "scope",
                    "admin and enrollment credentials take no scope; give a scope to operator, viewer or service credentials",
                ));
            }
            Selector::parse(scope).map_err(|e| ControlError::invalid("scope", e))?;
        }
        let grant = match role {
            Role::Service => Some(
                ServiceGrant::parse(new.acts_as, &new.methods)
                    .map_err(|e| ControlError::invalid("grant", e))?,
            ),
            _ if new.acts_as.is_some() || !new.methods.is_empty() => {
                return Err(ControlError::invalid(
                    "grant",
                    "only service credentials take a grant",
                ));
            }
            _ => None,
        };
        let validity = validity(&new.validity, DEFAULT_CREDENTIAL_VALIDITY)?;
        let identity = Identity::new(role, &new.name);
        let key = check_csr(&new.csr_pem, &identity)?;
        let certificate = self.sign_credential(&identity, &key, validity)?;
        let record = CredentialRecord {
            name: new.name.clone(),
            role: role.kind().to_string(),
            scope: scope.to_string(),
            grants: match role {
                Role::Enrollment => policy_text(&new.enrollment.clone().unwrap_or_default()),
                _ => grant_text(grant.as_ref()),
            },
            validity_ms: validity.as_millis() as i64,
            created_ms: certificate.issued_ms,
            created_by: actor.to_string(),
            last_used_ms: None,
            revoked_ms: None,
            revocation_reason: None,
        };
        let stored = self
            .store
            .create_credential(
                record,
                certificate.clone(),
                self.audited(vec![AuditEntry {
                    revision: certificate.serial.clone(),
                    reason: match scope {
                        "" => format!("role {}", role.kind()),
                        scope => format!("role {}, scope {scope}", role.kind()),
                    },
                    ..actor.record(self.now_millis(), format!("credential/{}", new.name))
                }]),
                false,
            )
            .await
            .map_err(|e| match e {
                StoreError::Conflict(_) => {
                    ControlError::AlreadyExists(format!("credential {:?} already exists", new.name))
                }
                other => other.into(),
            })?;
        self.refresh_credential(&stored)?;
        crate::telemetry::credential_event("created");
        tracing::info!(credential.name = %new.name, role = role.kind(), by = %actor, "credential created");
        Ok(IssuedCredential {
            view: view(&stored)?,
            certificate_pem: certificate.certificate_pem,
        })
    }

    /// Registers the admin credential a first start wrote to the data directory, unless a
    /// credential of that name exists (every replica, every start, calls this).
    pub async fn register_bootstrap_admin(
        &self,
        certificate_pem: &str,
    ) -> Result<(), ControlError> {
        self.register_bootstrap(certificate_pem, BOOTSTRAP_ADMIN, Role::Admin)
            .await
    }

    /// Registers the shared enrollment credential a first start wrote to the data directory
    /// (named by its certificate's identity), unless it exists: listed and revocable like any
    /// other, approving nothing by itself.
    pub async fn register_bootstrap_enrollment(
        &self,
        certificate_pem: &str,
    ) -> Result<(), ControlError> {
        let identity = crate::pki::identity_pem(certificate_pem).map_err(|e| {
            ControlError::Internal(format!("bootstrap enrollment certificate: {e}"))
        })?;
        if identity.role != Role::Enrollment {
            return Err(ControlError::Internal(format!(
                "the bootstrap enrollment certificate is {identity}, not an enrollment identity"
            )));
        }
        self.register_bootstrap(certificate_pem, &identity.name, Role::Enrollment)
            .await
    }

    async fn register_bootstrap(
        &self,
        certificate_pem: &str,
        name: &str,
        role: Role,
    ) -> Result<(), ControlError> {
        let info = cert_info_pem(certificate_pem)
            .map_err(|e| ControlError::Internal(format!("bootstrap certificate: {e}")))?;
        let certificate = CredentialCertificate {
            serial: info.serial,
            credential: name.into(),
            key_fingerprint: info.key_fingerprint,
            fingerprint: info.fingerprint,
            certificate_pem: certificate_pem.to_string(),
            not_before_ms: info.not_before * 1000,
            not_after_ms: info.not_after * 1000,
            issued_ms: info.not_before * 1000,
            revoked_ms: None,
            revocation_reason: None,
        };
        let record = CredentialRecord {
            name: name.into(),
            role: role.kind().into(),
            scope: String::new(),
            grants: grant_text(None),
            validity_ms: (info.not_after - info.not_before) * 1000,
            created_ms: self.now_millis(),
            created_by: "bootstrap".into(),
            last_used_ms: None,
            revoked_ms: None,
            revocation_reason: None,
        };
        let stored = self
            .store
            .create_credential(record, certificate, self.audited(Vec::new()), true)
            .await?;
        self.refresh_credential(&stored)
    }

    /// Every credential, by name.
    pub async fn list_credentials(
        &self,
        include_revoked: bool,
    ) -> Result<Vec<CredentialView>, ControlError> {
        self.flush_credential_uses().await;
        self.store
            .load_credentials()
            .await?
            .iter()
            .filter(|c| include_revoked || c.record.revoked_ms.is_none())
            .map(view)
            .collect()
    }

    /// One credential, or `NotFound`.
    pub async fn get_credential(&self, name: &str) -> Result<CredentialView, ControlError> {
        self.flush_credential_uses().await;
        let stored = self
            .store
            .credential(name)
            .await?
            .ok_or_else(|| ControlError::NotFound(format!("credential {name:?} not found")))?;
        view(&stored)
    }

    /// Issues a certificate for a fresh key under `name`. The same CSR again gets the same
    /// certificate; a CSR for a key the credential already had is refused.
    pub async fn renew_credential(
        &self,
        name: &str,
        csr_pem: &str,
        validity_text: &str,
        actor: &Actor,
    ) -> Result<IssuedCredential, ControlError> {
        let stored = self
            .store
            .credential(name)
            .await?
            .ok_or_else(|| ControlError::NotFound(format!("credential {name:?} not found")))?;
        if stored.record.revoked_ms.is_some() {
            return Err(ControlError::FailedPrecondition(format!(
                "credential {name:?} is revoked; create a new one"
            )));
        }
        let (role, _, _) = parse_stored(&stored.record)?;
        let identity = Identity::new(role, name);
        let key = check_csr(csr_pem, &identity)?;
        if let Some(same) = stored
            .certificates
            .iter()
            .find(|c| c.key_fingerprint == key.fingerprint)
        {
            if Some(same) != stored.certificates.last() || same.revoked_ms.is_some() {
                return Err(ControlError::invalid(
                    "csr_pem",
                    "the CSR is for a key this credential already had; renewal needs a fresh key",
                ));
            }
            // A retried renewal: the certificate it was given.
            return Ok(IssuedCredential {
                certificate_pem: same.certificate_pem.clone(),
                view: view(&stored)?,
            });
        }
        let default = Duration::from_millis(stored.record.validity_ms.max(0) as u64);
        let validity = validity(validity_text, default)?;
        let certificate = self.sign_credential(&identity, &key, validity)?;
        let issued = self
            .store
            .renew_credential(
                certificate,
                actor.to_string(),
                self.audited(vec![
                    actor.record(self.now_millis(), format!("credential/{name}")),
                ]),
            )
            .await?;
        let stored = self
            .store
            .credential(name)
            .await?
            .ok_or_else(|| ControlError::NotFound(format!("credential {name:?} not found")))?;
        self.refresh_credential(&stored)?;
        crate::telemetry::credential_event("renewed");
        tracing::info!(credential.name = %name, serial = %issued.serial, by = %actor, "credential renewed");
        Ok(IssuedCredential {
            view: view(&stored)?,
            certificate_pem: issued.certificate_pem,
        })
    }

    /// Revokes a credential: every certificate refused at once, open calls ended.
    pub async fn revoke_credential(
        &self,
        name: &str,
        reason: &str,
        actor: &Actor,
    ) -> Result<CredentialView, ControlError> {
        let revocation = admin_revocation(name, reason, &actor.identity, self.now_millis());
        let call = AuditEntry {
            reason: revocation.reason.clone(),
            ..actor.record(self.now_millis(), format!("credential/{name}"))
        };
        let serials = self
            .store
            .revoke_credential(revocation, self.audited(vec![call]))
            .await
            .map_err(|e| match e {
                StoreError::Precondition(message) if message.ends_with("does not exist") => {
                    ControlError::NotFound(format!("credential {name:?} not found"))
                }
                other => other.into(),
            })?;
        self.revoked.extend(serials);
        let stored = self
            .store
            .credential(name)
            .await?
            .ok_or_else(|| ControlError::NotFound(format!("credential {name:?} not found")))?;
        self.refresh_credential(&stored)?;
        crate::telemetry::credential_event("revoked");
        tracing::info!(credential.name = %name, by = %actor, "credential revoked");
        view(&stored)
    }

    /// Revokes one certificate of a credential by serial (`flotctl cert revoke SERIAL`): a
    /// credential operation, so for admins only.
    pub(super) async fn revoke_credential_certificate(
        &self,
        serial: &str,
        reason: &str,
        actor: &Actor,
    ) -> Result<Vec<String>, ControlError> {
        let not_found = || ControlError::NotFound(format!("certificate {serial} not found"));
        let name = self
            .store
            .credential_by_serial(serial)
            .await?
            .ok_or_else(not_found)?;
        if actor.identity.role != Role::Admin {
            return Err(ControlError::PermissionDenied(format!(
                "certificate {serial} belongs to credential {name:?}; revoking it needs the admin role"
            )));
        }
        let revocation = admin_revocation(&name, reason, &actor.identity, self.now_millis());
        let call = AuditEntry {
            serial: serial.to_string(),
            reason: revocation.reason.clone(),
            ..actor.record(self.now_millis(), format!("credential/{name}"))
        };
        let revoked = self
            .store
            .revoke_credential_certificate(serial.to_string(), revocation, self.audited(vec![call]))
            .await?;
        if let Some(stored) = self.store.credential(&name).await? {
            self.refresh_credential(&stored)?;
        }
        tracing::info!(credential.name = %name, %serial, by = %actor, "credential certificate revoked");
        Ok(if revoked {
            vec![serial.to_string()]
        } else {
            Vec::new()
        })
    }

    /// Writes the last uses noted by the auth layer, and supersedes the older certificates of
    /// credentials whose renewed certificate has been used.
    async fn flush_credential_uses(&self) {
        let uses = self.credentials.take_uses();
        if !uses.last_used.is_empty() {
            let touched: Vec<(String, i64)> = uses.last_used.into_iter().collect();
            if let Err(error) = self.store.touch_credentials(touched).await {
                tracing::warn!(%error, "could not record when credentials were last used");
            }
        }
        for (name, newest) in uses.renewed_in_use {
            let superseded = self
                .store
                .supersede_credential_certificates(
                    name.clone(),
                    newest.clone(),
                    self.now_millis(),
                    self.audit_key.clone(),
                )
                .await;
            let refreshed = match superseded {
                Ok(serials) => {
                    self.revoked.extend(serials);
                    match self.store.credential(&name).await {
                        Ok(Some(stored)) => self.refresh_credential(&stored),
                        Ok(None) => Ok(()),
                        Err(e) => Err(e.into()),
                    }
                }
                Err(e) => Err(ControlError::from(e)),
            };
            match refreshed {
                Ok(()) => {
                    tracing::info!(credential.name = %name, serial = %newest, "renewed credential in use; older certificates superseded")
                }
                Err(error) => {
                    self.credentials.requeue(&name);
                    tracing::warn!(credential.name = %name, %error, "could not supersede a renewed credential's older certificates; trying again on its next use");
                }
            }
        }
    }

    /// Writes credential uses behind, every half minute and at once when a renewed credential's
    /// new certificate was first used.
    pub async fn run_credential_writer(&self) {
        loop {
            tokio::select! {
                _ = self.credentials.renewed.notified() => {}
                _ = tokio::time::sleep(USE_FLUSH_INTERVAL) => {}
            }
            self.flush_credential_uses().await;
        }
    }
}

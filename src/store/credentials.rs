//! Credentials of the admin API and the certificates issued for them: created, renewed and revoked
//! with their audit records in one transaction each.

use super::audit::{append, lock_appends};
use super::schema::{credential_certificates as cc, credentials};
use super::{AuditSeal, Audited, DbConnection, Store, StoreError};
use crate::audit::AuditEntry;
use diesel::prelude::*;
use std::sync::Arc;

/// A credential as stored; `grants` is the JSON of a service credential's rights.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = credentials)]
pub struct CredentialRecord {
    /// The credential's name.
    pub name: String,
    /// Its role (`Role::kind`).
    pub role: String,
    /// Its scope as a label selector ("" for everything).
    pub scope: String,
    /// A service's grant, as JSON.
    pub grants: String,
    /// Validity of its certificates, milliseconds.
    pub validity_ms: i64,
    /// When it was created, Unix milliseconds.
    pub created_ms: i64,
    /// Who created it.
    pub created_by: String,
    /// When a certificate of it was last used, Unix milliseconds.
    pub last_used_ms: Option<i64>,
    /// When it was revoked, Unix milliseconds.
    pub revoked_ms: Option<i64>,
    /// Why it was revoked.
    pub revocation_reason: Option<String>,
}

/// A certificate issued for a credential.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = cc)]
pub struct CredentialCertificate {
    /// Serial, lowercase hex.
    pub serial: String,
    /// The credential it belongs to.
    pub credential: String,
    /// SHA-256 (hex) of its public key.
    pub key_fingerprint: String,
    /// SHA-256 (hex) of the certificate.
    pub fingerprint: String,
    /// The certificate (PEM).
    pub certificate_pem: String,
    /// Start of its validity, Unix milliseconds.
    pub not_before_ms: i64,
    /// End of its validity, Unix milliseconds.
    pub not_after_ms: i64,
    /// When it was issued, Unix milliseconds.
    pub issued_ms: i64,
    /// When it was revoked, Unix milliseconds.
    pub revoked_ms: Option<i64>,
    /// Why it was revoked.
    pub revocation_reason: Option<String>,
}

/// A credential with every certificate issued for it, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCredential {
    /// The credential.
    pub record: CredentialRecord,
    /// Its certificates, oldest first.
    pub certificates: Vec<CredentialCertificate>,
}

/// Who revokes, and why.
#[derive(Debug, Clone)]
pub struct CredentialRevocation {
    /// The credential to revoke.
    pub name: String,
    /// Why, for the records.
    pub reason: String,
    /// Who, for the records.
    pub actor: String,
    /// When, Unix milliseconds.
    pub now_ms: i64,
}

fn load_one(conn: &mut DbConnection, name: &str) -> Result<Option<StoredCredential>, StoreError> {
    let Some(record) = credentials::table
        .find(name)
        .select(CredentialRecord::as_select())
        .first(conn)
        .optional()?
    else {
        return Ok(None);
    };
    let certificates = cc::table
        .filter(cc::credential.eq(name))
        .select(CredentialCertificate::as_select())
        .order((cc::issued_ms.asc(), cc::serial.asc()))
        .load(conn)?;
    Ok(Some(StoredCredential {
        record,
        certificates,
    }))
}

/// Valid certificates of unrevoked admin credentials, leaving out one credential or one serial:
/// what would remain to administer with.
fn live_admin_certificates(
    conn: &mut DbConnection,
    now_ms: i64,
    except_credential: Option<&str>,
    except_serial: Option<&str>,
) -> Result<i64, StoreError> {
    let admins: Vec<String> = credentials::table
        .filter(credentials::role.eq("admin"))
        .filter(credentials::revoked_ms.is_null())
        .filter(credentials::name.ne(except_credential.unwrap_or("")))
        .select(credentials::name)
        .load(conn)?;
    Ok(cc::table
        .filter(cc::credential.eq_any(&admins))
        .filter(cc::revoked_ms.is_null())
        .filter(cc::not_after_ms.gt(now_ms))
        .filter(cc::serial.ne(except_serial.unwrap_or("")))
        .count()
        .get_result(conn)?)
}

fn certificate_entry(
    kind: &str,
    certificate: &CredentialCertificate,
    actor: &str,
    reason: &str,
    at_ms: i64,
) -> AuditEntry {
    AuditEntry {
        at_ms,
        kind: kind.into(),
        serial: certificate.serial.clone(),
        key_fingerprint: certificate.key_fingerprint.clone(),
        not_before_ms: certificate.not_before_ms,
        not_after_ms: certificate.not_after_ms,
        actor: actor.into(),
        reason: reason.into(),
        proof: "admin".into(),
        outcome: "ok".into(),
        target: format!("credential/{}", certificate.credential),
        ..Default::default()
    }
}

/// Marks the listed certificates revoked (those not revoked already), auditing each.
fn revoke_certificates(
    conn: &mut DbConnection,
    seal: &dyn AuditSeal,
    certificates: &[CredentialCertificate],
    kind: &str,
    revocation: &CredentialRevocation,
) -> Result<Vec<String>, StoreError> {
    let mut revoked = Vec::new();
    for certificate in certificates.iter().filter(|c| c.revoked_ms.is_none()) {
        let changed = diesel::update(
            cc::table
                .find(&certificate.serial)
                .filter(cc::revoked_ms.is_null()),
        )
        .set((
            cc::revoked_ms.eq(revocation.now_ms),
            cc::revocation_reason.eq(&revocation.reason),
        ))
        .execute(conn)?;
        if changed == 1 {
            append(
                conn,
                seal,
                certificate_entry(
                    kind,
                    certificate,
                    &revocation.actor,
                    &revocation.reason,
                    revocation.now_ms,
                ),
            )?;
            revoked.push(certificate.serial.clone());
        }
    }
    Ok(revoked)
}

impl Store {
    /// Every credential with its certificates (loaded at start, and by the feed for one name).
    pub async fn load_credentials(&self) -> Result<Vec<StoredCredential>, StoreError> {
        self.run("load_credentials", |conn| {
            let records: Vec<CredentialRecord> = credentials::table
                .select(CredentialRecord::as_select())
                .order(credentials::name.asc())
                .load(conn)?;
            let mut certificates: Vec<CredentialCertificate> = cc::table
                .select(CredentialCertificate::as_select())
                .order((cc::issued_ms.asc(), cc::serial.asc()))
                .load(conn)?;
            Ok(records
                .into_iter()
                .map(|record| {
                    let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut certificates)
                        .into_iter()
                        .partition(|c| c.credential == record.name);
                    certificates = rest;
                    StoredCredential {
                        record,
                        certificates: mine,
                    }
                })
                .collect())
        })
        .await
    }

    /// One credential with its certificates.
    pub async fn credential(&self, name: &str) -> Result<Option<StoredCredential>, StoreError> {
        let name = name.to_string();
        self.run("credential", move |conn| load_one(conn, &name))
            .await
    }

    /// The credential a certificate serial was issued for, if it was issued for one.
    pub async fn credential_by_serial(&self, serial: &str) -> Result<Option<String>, StoreError> {
        let serial = serial.to_string();
        self.run("credential_by_serial", move |conn| {
            Ok(cc::table
                .find(&serial)
                .select(cc::credential)
                .first(conn)
                .optional()?)
        })
        .await
    }

    /// Creates a credential with its first certificate, audited. `Conflict` if the name is taken.
    /// With `if_absent`, an existing credential of that name is left as it is and returned
    /// (the bootstrap admin, registered by every replica that starts).
    pub async fn create_credential(
        &self,
        record: CredentialRecord,
        certificate: CredentialCertificate,
        audit: Audited,
        if_absent: bool,
    ) -> Result<StoredCredential, StoreError> {
        self.run("create_credential", move |conn| {
            conn.transaction(|conn| {
                lock_appends(conn)?;
                if let Some(existing) = load_one(conn, &record.name)? {
                    if if_absent {
                        return Ok(existing);
                    }
                    return Err(StoreError::Conflict(format!(
                        "credential {:?} already exists",
                        record.name
                    )));
                }
                diesel::insert_into(credentials::table)
                    .values(&record)
                    .execute(conn)?;
                diesel::insert_into(cc::table)
                    .values(&certificate)
                    .execute(conn)?;
                let mut entry = certificate_entry(
                    "issued",
                    &certificate,
                    &record.created_by,
                    &format!("{} credential created", record.role),
                    certificate.issued_ms,
                );
                if record.created_by == "bootstrap" {
                    entry.proof = "bootstrap".into();
                }
                append(conn, audit.seal.as_ref(), entry)?;
                audit.commit(conn)?;
                Ok(StoredCredential {
                    record,
                    certificates: vec![certificate],
                })
            })
        })
        .await
    }

    /// Records a renewed certificate of a credential, audited; the certificate already issued for
    /// the same key is returned instead (a retried renewal). `Precondition` if the credential is
    /// revoked, `NotFound`-like `Precondition` if it does not exist.
    pub async fn renew_credential(
        &self,
        certificate: CredentialCertificate,
        actor: String,
        audit: Audited,
    ) -> Result<CredentialCertificate, StoreError> {
        self.run("renew_credential", move |conn| {
            conn.transaction(|conn| {
                lock_appends(conn)?;
                let Some(existing) = load_one(conn, &certificate.credential)? else {
                    return Err(StoreError::Precondition(format!(
                        "credential {:?} does not exist",
                        certificate.credential
                    )));
                };
                if existing.record.revoked_ms.is_some() {
                    return Err(StoreError::Precondition(format!(
                        "credential {:?} is revoked",
                        certificate.credential
                    )));
                }
                if let Some(same_key) = existing
                    .certificates
                    .iter()
                    .find(|c| c.key_fingerprint == certificate.key_fingerprint)
                {
                    return Ok(same_key.clone());
                }
                diesel::insert_into(cc::table)
                    .values(&certificate)
                    .execute(conn)?;
                append(
                    conn,
                    audit.seal.as_ref(),
                    certificate_entry(
                        "renewed",
                        &certificate,
                        &actor,
                        "credential renewed",
                        certificate.issued_ms,
                    ),
                )?;
                audit.produced(&certificate.serial).commit(conn)?;
                Ok(certificate)
            })
        })
        .await
    }

    /// Revokes a credential and all its certificates, audited; returns the serials revoked.
    /// `Precondition` when it is already revoked or is the last admin credential that is not.
    pub async fn revoke_credential(
        &self,
        revocation: CredentialRevocation,
        audit: Audited,
    ) -> Result<Vec<String>, StoreError> {
        self.run("revoke_credential", move |conn| {
            conn.transaction(|conn| {
                // Decided under the audit order: two replicas revoking the last two admins at
                // once cannot both see another one left.
                lock_appends(conn)?;
                let Some(stored) = load_one(conn, &revocation.name)? else {
                    return Err(StoreError::Precondition(format!(
                        "credential {:?} does not exist",
                        revocation.name
                    )));
                };
                if stored.record.revoked_ms.is_some() {
                    return Err(StoreError::Precondition(format!(
                        "credential {:?} is already revoked",
                        revocation.name
                    )));
                }
                if stored.record.role == "admin" {
                    let others = live_admin_certificates(
                        conn,
                        revocation.now_ms,
                        Some(&revocation.name),
                        None,
                    )?;
                    if others == 0 {
                        return Err(StoreError::Precondition(format!(
                            "{:?} is the last admin credential; create another admin credential before revoking it",
                            revocation.name
                        )));
                    }
                }
                diesel::update(credentials::table.find(&revocation.name))
                    .set((
                        credentials::revoked_ms.eq(revocation.now_ms),
                        credentials::revocation_reason.eq(&revocation.reason),
                    ))
                    .execute(conn)?;
                let revoked = revoke_certificates(
                    conn,
                    audit.seal.as_ref(),
                    &stored.certificates,
                    "revoked",
                    &revocation,
                )?;
                audit.commit(conn)?;
                Ok(revoked)
            })
        })
        .await
    }

    /// Revokes one certificate of a credential (by serial), audited; returns whether it was live.
    /// `Precondition` if no other admin credential would keep a valid certificate.
    pub async fn revoke_credential_certificate(
        &self,
        serial: String,
        revocation: CredentialRevocation,
        audit: Audited,
    ) -> Result<bool, StoreError> {
        self.run("revoke_credential_certificate", move |conn| {
            conn.transaction(|conn| {
                lock_appends(conn)?;
                let Some(stored) = load_one(conn, &revocation.name)? else {
                    return Ok(false);
                };
                let Some(certificate) = stored.certificates.iter().find(|c| c.serial == serial)
                else {
                    return Ok(false);
                };
                if stored.record.role == "admin" && certificate.revoked_ms.is_none() {
                    let others =
                        live_admin_certificates(conn, revocation.now_ms, None, Some(&serial))?;
                    if others == 0 {
                        return Err(StoreError::Precondition(format!(
                            "certificate {serial} is the last valid admin certificate; create another admin credential before revoking it"
                        )));
                    }
                }
                let revoked = revoke_certificates(
                    conn,
                    audit.seal.as_ref(),
                    std::slice::from_ref(certificate),
                    "revoked",
                    &revocation,
                )?;
                audit.commit(conn)?;
                Ok(!revoked.is_empty())
            })
        })
        .await
    }

    /// Supersedes the certificates of a credential issued before `newest` (which has now been
    /// used), audited; returns the serials superseded.
    pub async fn supersede_credential_certificates(
        &self,
        name: String,
        newest: String,
        now_ms: i64,
        seal: Arc<dyn AuditSeal>,
    ) -> Result<Vec<String>, StoreError> {
        self.run("supersede_credential_certificates", move |conn| {
            conn.transaction(|conn| {
                let Some(stored) = load_one(conn, &name)? else {
                    return Ok(Vec::new());
                };
                let Some(position) = stored.certificates.iter().position(|c| c.serial == newest)
                else {
                    return Ok(Vec::new());
                };
                let revocation = CredentialRevocation {
                    name: name.clone(),
                    reason: format!("superseded by {newest}"),
                    actor: format!("credential/{name}"),
                    now_ms,
                };
                revoke_certificates(
                    conn,
                    seal.as_ref(),
                    &stored.certificates[..position],
                    "superseded",
                    &revocation,
                )
            })
        })
        .await
    }

    /// Records when credentials were last used (never moving a time back).
    pub async fn touch_credentials(&self, uses: Vec<(String, i64)>) -> Result<(), StoreError> {
        self.run("touch_credentials", move |conn| {
            conn.transaction(|conn| {
                for (name, at_ms) in &uses {
                    diesel::update(
                        credentials::table.find(name).filter(
                            credentials::last_used_ms
                                .is_null()
                                .or(credentials::last_used_ms.lt(at_ms)),
                        ),
                    )
                    .set(credentials::last_used_ms.eq(at_ms))
                    .execute(conn)?;
                }
                Ok(())
            })
        })
        .await
    }
}

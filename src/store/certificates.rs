//! Certificates issued to devices: every one is kept, so a serial can always be traced to its device.

use super::audit::{AuditSeal, Audited, append};
use super::devices::{NewDevice, insert_device};
use super::schema::{certificates, devices, enrollment_requests};
use super::{DbConnection, Store, StoreError};
use crate::audit::{AuditEntry, SealedRecord};
use diesel::prelude::*;
use std::sync::Arc;

/// A device certificate as stored.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = certificates)]
pub struct CertificateRecord {
    /// Serial, lowercase hex.
    pub serial: String,
    /// The device it identifies.
    pub device_id: String,
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

fn certificate_for_key(
    conn: &mut DbConnection,
    device_id: &str,
    key_fingerprint: &str,
) -> Result<Option<CertificateRecord>, StoreError> {
    Ok(certificates::table
        .filter(certificates::device_id.eq(device_id))
        .filter(certificates::key_fingerprint.eq(key_fingerprint))
        .select(CertificateRecord::as_select())
        .first(conn)
        .optional()?)
}

/// What must hold for an issuance to be recorded, checked inside its transaction.
#[derive(Debug, Clone, Default)]
pub struct IssuanceRules {
    /// The certificate this one renews (the one the device authenticated with): if it has been
    /// revoked meanwhile, nothing is issued. It stays valid until the new one is used.
    pub renews: Option<String>,
}

/// An issuance as recorded: its audit record and the spare certificates it superseded.
#[derive(Debug, Clone)]
pub struct RecordedIssuance {
    /// The issuance's audit record.
    pub record: SealedRecord,
    /// Spare certificates of the device it superseded.
    pub superseded: Vec<CertificateRecord>,
}

/// The refusal of an issuance that renews a revoked certificate.
pub(super) fn renewed_is_revoked(renews: &str) -> StoreError {
    StoreError::Precondition(format!(
        "certificate {renews} has been revoked; nothing is issued on its behalf"
    ))
}

/// The reason recorded when an issuance supersedes a spare.
pub(super) fn superseded_by(serial: &str) -> String {
    format!("superseded by {serial}")
}

/// The reason recorded when a device's use of `keep` supersedes its spares.
pub(super) fn superseded_in_use(keep: &str) -> String {
    format!("superseded: the device uses {keep}")
}

/// A new certificate, the device now using it, and its audit record. Every other valid
/// certificate of the device except the one it renews is superseded (audited) at once: a device
/// holds at most the certificate it uses and the one replacing it.
fn record_one_issuance(
    conn: &mut DbConnection,
    certificate: &CertificateRecord,
    seal: &dyn AuditSeal,
    entry: AuditEntry,
    rules: &IssuanceRules,
) -> Result<RecordedIssuance, StoreError> {
    if let Some(renews) = &rules.renews {
        let revoked: Option<Option<i64>> = certificates::table
            .find(renews)
            .select(certificates::revoked_ms)
            .first(conn)
            .optional()?;
        if matches!(revoked, Some(Some(_))) {
            return Err(renewed_is_revoked(renews));
        }
    }
    insert_certificate(conn, certificate)?;
    diesel::update(devices::table.find(&certificate.device_id))
        .set((
            devices::cert_serial.eq(&certificate.serial),
            devices::cert_not_after_ms.eq(certificate.not_after_ms),
        ))
        .execute(conn)?;
    let record = append(conn, seal, entry)?;
    let keep: Vec<&str> = [Some(certificate.serial.as_str()), rules.renews.as_deref()]
        .into_iter()
        .flatten()
        .collect();
    let spares = spare_certificates(conn, &certificate.device_id, &keep)?;
    let superseded = revoke(
        conn,
        seal,
        &Revocation {
            serials: spares,
            reason: superseded_by(&certificate.serial),
            actor: record.entry.actor.clone(),
            now_ms: certificate.issued_ms,
            superseded: true,
            ..Default::default()
        },
    )?;
    Ok(RecordedIssuance { record, superseded })
}

/// One write of the certificate group commit.
// Each is moved once through the writer's queue; boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum CertificateWrite {
    /// A new certificate, with its audit record, if `rules` hold.
    Issue {
        /// The certificate.
        certificate: CertificateRecord,
        /// Its audit record.
        entry: AuditEntry,
        /// What must hold for it to be recorded.
        rules: IssuanceRules,
    },
    /// The device uses `keep`: its other valid certificates are superseded (audited).
    Supersede {
        /// The device.
        device_id: String,
        /// The serial it uses.
        keep: String,
        /// Who, for the audit records.
        actor: String,
        /// When, Unix milliseconds.
        now_ms: i64,
    },
}

/// What a [`CertificateWrite`] recorded.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum CertificateWritten {
    /// An `Issue` was recorded.
    Issued(RecordedIssuance),
    /// A `Supersede` revoked these.
    Superseded(Vec<CertificateRecord>),
}

impl CertificateWrite {
    /// The device whose rows the write touches (writes are ordered by it).
    pub fn device_id(&self) -> &str {
        match self {
            CertificateWrite::Issue { certificate, .. } => &certificate.device_id,
            CertificateWrite::Supersede { device_id, .. } => device_id,
        }
    }
}

/// Records one write of the group commit on its own (inside the caller's savepoint).
fn record_one(
    conn: &mut DbConnection,
    write: CertificateWrite,
    seal: &dyn AuditSeal,
) -> Result<CertificateWritten, StoreError> {
    match write {
        CertificateWrite::Issue {
            certificate,
            entry,
            rules,
        } => record_one_issuance(conn, &certificate, seal, entry, &rules)
            .map(CertificateWritten::Issued),
        CertificateWrite::Supersede {
            device_id,
            keep,
            actor,
            now_ms,
        } => supersede(conn, seal, &device_id, &keep, actor, now_ms)
            .map(CertificateWritten::Superseded),
    }
}

/// Supersedes the device's valid certificates other than `keep`; returns them.
fn supersede(
    conn: &mut DbConnection,
    seal: &dyn AuditSeal,
    device_id: &str,
    keep: &str,
    actor: String,
    now_ms: i64,
) -> Result<Vec<CertificateRecord>, StoreError> {
    let spares = spare_certificates(conn, device_id, &[keep])?;
    revoke(
        conn,
        seal,
        &Revocation {
            serials: spares,
            reason: superseded_in_use(keep),
            actor,
            now_ms,
            superseded: true,
            ..Default::default()
        },
    )
}

/// The device's valid certificates other than `keep`.
fn spare_certificates(
    conn: &mut DbConnection,
    device_id: &str,
    keep: &[&str],
) -> Result<Vec<String>, StoreError> {
    Ok(certificates::table
        .filter(certificates::device_id.eq(device_id))
        .filter(certificates::revoked_ms.is_null())
        .filter(certificates::serial.ne_all(keep))
        .select(certificates::serial)
        .load(conn)?)
}

pub(super) fn insert_certificate(
    conn: &mut super::DbConnection,
    certificate: &CertificateRecord,
) -> Result<(), StoreError> {
    diesel::insert_into(certificates::table)
        .values(certificate)
        .execute(conn)?;
    Ok(())
}

impl Store {
    /// The certificates with these serials (those that exist), in no particular order.
    pub async fn get_certificates(
        &self,
        serials: Vec<String>,
    ) -> Result<Vec<CertificateRecord>, StoreError> {
        self.run("get_certificates", move |conn| {
            let mut found = Vec::with_capacity(serials.len());
            for chunk in serials.chunks(500) {
                found.extend(
                    certificates::table
                        .filter(certificates::serial.eq_any(chunk))
                        .select(CertificateRecord::as_select())
                        .load(conn)?,
                );
            }
            Ok(found)
        })
        .await
    }

    /// One certificate by serial.
    pub async fn get_certificate(
        &self,
        serial: &str,
    ) -> Result<Option<CertificateRecord>, StoreError> {
        let serial = serial.to_string();
        self.run("get_certificate", move |conn| {
            Ok(certificates::table
                .find(serial)
                .select(CertificateRecord::as_select())
                .first(conn)
                .optional()?)
        })
        .await
    }
}

/// A certificate revocation to record.
#[derive(Debug, Clone, Default)]
pub struct Revocation {
    /// The certificates to revoke, by serial.
    pub serials: Vec<String>,
    /// Also every valid certificate of this device, listed inside the revoking transaction, so a
    /// certificate issued a moment earlier cannot slip through.
    pub device: Option<String>,
    /// Why, for the records.
    pub reason: String,
    /// Who, for the records.
    pub actor: String,
    /// When, Unix milliseconds.
    pub now_ms: i64,
    /// Audited as `superseded` (a newer certificate replaced these) rather than `revoked`.
    pub superseded: bool,
}

/// The audit record of `certificate`'s revocation: `superseded` (a newer certificate replaced
/// it) or `revoked` (an operator's decision), as `revocation` says.
pub(super) fn revocation_entry(
    certificate: &CertificateRecord,
    revocation: &Revocation,
) -> AuditEntry {
    let (kind, proof) = if revocation.superseded {
        ("superseded", "newer-certificate")
    } else {
        ("revoked", "admin")
    };
    AuditEntry {
        at_ms: revocation.now_ms,
        kind: kind.into(),
        device_id: certificate.device_id.clone(),
        serial: certificate.serial.clone(),
        key_fingerprint: certificate.key_fingerprint.clone(),
        not_before_ms: certificate.not_before_ms,
        not_after_ms: certificate.not_after_ms,
        actor: revocation.actor.clone(),
        reason: revocation.reason.clone(),
        proof: proof.into(),
        outcome: "ok".into(),
        ..Default::default()
    }
}

/// Marks `serials` revoked (those not revoked already) and audits each; returns the ones revoked.
fn revoke(
    conn: &mut DbConnection,
    seal: &dyn AuditSeal,
    revocation: &Revocation,
) -> Result<Vec<CertificateRecord>, StoreError> {
    let mut serials = revocation.serials.clone();
    if let Some(device_id) = &revocation.device {
        serials.extend(spare_certificates(conn, device_id, &[])?);
    }
    let mut revoked = Vec::new();
    for serial in &serials {
        let changed = diesel::update(
            certificates::table
                .find(serial)
                .filter(certificates::revoked_ms.is_null()),
        )
        .set((
            certificates::revoked_ms.eq(revocation.now_ms),
            certificates::revocation_reason.eq(&revocation.reason),
        ))
        .execute(conn)?;
        if changed == 0 {
            continue;
        }
        let certificate: CertificateRecord = certificates::table
            .find(serial)
            .select(CertificateRecord::as_select())
            .first(conn)?;
        append(conn, seal, revocation_entry(&certificate, revocation))?;
        revoked.push(certificate);
    }
    Ok(revoked)
}

impl Store {
    /// Certificates, oldest first; only `device_id`'s when given.
    pub async fn list_certificates(
        &self,
        device_id: Option<String>,
    ) -> Result<Vec<CertificateRecord>, StoreError> {
        self.run("list_certificates", move |conn| {
            let mut query = certificates::table
                .select(CertificateRecord::as_select())
                .order((certificates::issued_ms.asc(), certificates::serial.asc()))
                .into_boxed();
            if let Some(device_id) = device_id {
                query = query.filter(certificates::device_id.eq(device_id));
            }
            Ok(query.load(conn)?)
        })
        .await
    }

    /// The certificate issued to `device_id` for the key with `key_fingerprint`, if any.
    /// What a renewal must know, in one round trip: the key fingerprint of the certificate the
    /// session authenticated with, and any certificate already issued to the device for `key`.
    pub async fn renewal_context(
        &self,
        session_serial: &str,
        device_id: &str,
        key_fingerprint: &str,
    ) -> Result<(Option<String>, Option<CertificateRecord>), StoreError> {
        let serial = session_serial.to_string();
        let (device_id, key) = (device_id.to_string(), key_fingerprint.to_string());
        self.run("renewal_context", move |conn| {
            let current = certificates::table
                .find(serial)
                .select(certificates::key_fingerprint)
                .first::<String>(conn)
                .optional()?;
            Ok((current, certificate_for_key(conn, &device_id, &key)?))
        })
        .await
    }

    /// The certificate of `device_id` for the key with `key_fingerprint`, if one was issued.
    pub async fn find_certificate_for_key(
        &self,
        device_id: &str,
        key_fingerprint: &str,
    ) -> Result<Option<CertificateRecord>, StoreError> {
        let (device_id, key) = (device_id.to_string(), key_fingerprint.to_string());
        self.run("find_certificate_for_key", move |conn| {
            certificate_for_key(conn, &device_id, &key)
        })
        .await
    }

    /// Records a certificate issued to an existing device (renewal or recovery): the certificate,
    /// the device's current certificate and the audit record, all or nothing.
    pub async fn record_issuance(
        &self,
        certificate: CertificateRecord,
        seal: Arc<dyn AuditSeal>,
        entry: AuditEntry,
        rules: IssuanceRules,
    ) -> Result<RecordedIssuance, StoreError> {
        self.run("record_issuance", move |conn| {
            conn.transaction(|conn| {
                record_one_issuance(conn, &certificate, seal.as_ref(), entry, &rules)
            })
        })
        .await
    }

    /// Records several certificate writes in one transaction, in order, each with its audit
    /// records (the group commit of concurrent renewals and of the supersessions that follow them).
    /// Each stands alone: one that fails (say, a duplicate) is rolled back to its savepoint and
    /// reported, the others are kept. An error for the whole batch means nothing was recorded.
    pub async fn record_certificate_writes(
        &self,
        writes: Vec<CertificateWrite>,
        seal: Arc<dyn AuditSeal>,
    ) -> Result<Vec<Result<CertificateWritten, StoreError>>, StoreError> {
        self.run("record_certificate_writes", move |conn| {
            conn.transaction(|conn| {
                if super::certificate_batch::distinct_devices(&writes) {
                    // In a savepoint: if anything in it fails, the batch is written one by one.
                    let bulk = conn.transaction(|conn| {
                        super::certificate_batch::record_in_bulk(conn, &writes, seal.as_ref())
                    });
                    match bulk {
                        Ok(outcomes) => return Ok(outcomes),
                        Err(error) => {
                            tracing::debug!(%error, writes = writes.len(), "certificate batch written one by one")
                        }
                    }
                }
                Ok(writes
                    .into_iter()
                    .map(|write| conn.transaction(|conn| record_one(conn, write, seal.as_ref())))
                    .collect())
            })
        })
        .await
    }

    /// Revokes certificates, auditing each; returns those that were not revoked already.
    /// The admin call's records in `audit` are appended after the revocations' own.
    pub async fn revoke_certificates(
        &self,
        revocation: Revocation,
        audit: Audited,
    ) -> Result<Vec<CertificateRecord>, StoreError> {
        self.run("revoke_certificates", move |conn| {
            conn.transaction(|conn| {
                Audited::begin(conn)?;
                let revoked = revoke(conn, audit.seal.as_ref(), &revocation)?;
                audit.commit(conn)?;
                Ok(revoked)
            })
        })
        .await
    }

    /// Decommissions a device: revokes its certificates, deletes it and its enrollment request (so
    /// the name can enroll again). Returns the revoked certificates.
    pub async fn delete_device(
        &self,
        device_id: &str,
        revocation: Revocation,
        audit: Audited,
    ) -> Result<Vec<CertificateRecord>, StoreError> {
        let device_id = device_id.to_string();
        self.run("delete_device", move |conn| {
            conn.transaction(|conn| {
                Audited::begin(conn)?;
                let revoked = revoke(conn, audit.seal.as_ref(), &revocation)?;
                audit.commit(conn)?;
                diesel::delete(
                    enrollment_requests::table
                        .filter(enrollment_requests::device_id.eq(&device_id)),
                )
                .execute(conn)?;
                diesel::delete(devices::table.find(&device_id)).execute(conn)?;
                Ok(revoked)
            })
        })
        .await
    }

    /// Creates many devices with their first certificates at once (load tests, bulk imports), each
    /// issuance audited, in transactions of a thousand.
    pub async fn insert_devices(
        &self,
        devices: Vec<(NewDevice, CertificateRecord)>,
        seal: Arc<dyn AuditSeal>,
        actor: String,
    ) -> Result<(), StoreError> {
        self.run("insert_devices", move |conn| {
            for chunk in devices.chunks(1000) {
                conn.transaction(|conn| {
                    for (device, certificate) in chunk {
                        insert_device(conn, device)?;
                        insert_certificate(conn, certificate)?;
                        append(
                            conn,
                            seal.as_ref(),
                            AuditEntry {
                                at_ms: certificate.issued_ms,
                                kind: "issued".into(),
                                device_id: device.id.clone(),
                                serial: certificate.serial.clone(),
                                key_fingerprint: certificate.key_fingerprint.clone(),
                                not_before_ms: certificate.not_before_ms,
                                not_after_ms: certificate.not_after_ms,
                                actor: actor.clone(),
                                reason: "bulk import".into(),
                                proof: "bulk-import".into(),
                                outcome: "ok".into(),
                                ..Default::default()
                            },
                        )?;
                    }
                    Ok::<_, StoreError>(())
                })?;
            }
            Ok(())
        })
        .await
    }

    /// Devices holding more than one valid certificate (a renewal not yet confirmed by use).
    pub async fn devices_with_spare_certificates(&self) -> Result<Vec<String>, StoreError> {
        self.run("devices_with_spare_certificates", |conn| {
            use diesel::dsl::count_star;
            let counts: Vec<(String, i64)> = certificates::table
                .filter(certificates::revoked_ms.is_null())
                .group_by(certificates::device_id)
                .select((certificates::device_id, count_star()))
                .load(conn)?;
            Ok(counts
                .into_iter()
                .filter(|(_, n)| *n > 1)
                .map(|(id, _)| id)
                .collect())
        })
        .await
    }

    /// Serials of every revoked certificate, of devices and of credentials (loaded at start for
    /// the connection check).
    pub async fn revoked_serials(&self) -> Result<Vec<String>, StoreError> {
        use super::schema::credential_certificates as cc;
        self.run("revoked_serials", |conn| {
            let mut serials: Vec<String> = certificates::table
                .filter(certificates::revoked_ms.is_not_null())
                .select(certificates::serial)
                .load(conn)?;
            serials.extend(
                cc::table
                    .filter(cc::revoked_ms.is_not_null())
                    .select(cc::serial)
                    .load::<String>(conn)?,
            );
            Ok(serials)
        })
        .await
    }
}

//! The fast path of the certificate group commit. A batch whose writes are all for distinct
//! devices — every batch of a fleet renewing, or reconnecting with new certificates — is recorded
//! in a few statements for the whole batch: renewed certificates checked together, new ones
//! inserted together, device rows updated together, spares read (locked) and superseded together,
//! and the audit records chained in memory from one read of the chain's head and inserted
//! together. The outcome is what writing them one by one would give; anything unusual (a device
//! twice, a statement that fails) leaves the batch to the one-by-one path.

use super::audit::{AuditSeal, append_all};
use super::certificates::{
    CertificateRecord, CertificateWrite, CertificateWritten, RecordedIssuance, Revocation,
    renewed_is_revoked, revocation_entry, superseded_by, superseded_in_use,
};
use super::schema::{certificates, devices};
use super::{DbConnection, StoreError};
use crate::audit::AuditEntry;
use diesel::prelude::*;
use std::collections::{HashMap, HashSet};

/// Certificate rows per insert: well under every backend's limit on bound parameters.
const ROWS_PER_INSERT: usize = 200;

/// Whether no two writes of the batch are for the same device.
pub(super) fn distinct_devices(writes: &[CertificateWrite]) -> bool {
    let mut seen = HashSet::with_capacity(writes.len());
    writes.iter().all(|w| seen.insert(w.device_id()))
}

/// A write of the batch that goes ahead: the certificates it keeps, and how it supersedes the rest.
struct Accepted<'a> {
    index: usize,
    device_id: &'a str,
    keep: Vec<&'a str>,
    /// The issuance's audit record, first of the write's records.
    issuance: Option<AuditEntry>,
    revocation: Revocation,
}

/// Records `writes` (for distinct devices) in bulk; one outcome per write, in order.
pub(super) fn record_in_bulk(
    conn: &mut DbConnection,
    writes: &[CertificateWrite],
    seal: &dyn AuditSeal,
) -> Result<Vec<Result<CertificateWritten, StoreError>>, StoreError> {
    let mut outcomes: Vec<Option<Result<CertificateWritten, StoreError>>> =
        writes.iter().map(|_| None).collect();
    let renewed: Vec<&str> = writes
        .iter()
        .filter_map(|w| match w {
            CertificateWrite::Issue { rules, .. } => rules.renews.as_deref(),
            CertificateWrite::Supersede { .. } => None,
        })
        .collect();
    let revoked_renewed: HashSet<String> = certificates::table
        .filter(certificates::serial.eq_any(&renewed))
        .filter(certificates::revoked_ms.is_not_null())
        .select(certificates::serial)
        .load::<String>(conn)?
        .into_iter()
        .collect();

    let mut accepted = Vec::with_capacity(writes.len());
    let mut issued: Vec<&CertificateRecord> = Vec::new();
    for (index, write) in writes.iter().enumerate() {
        match write {
            CertificateWrite::Issue {
                certificate,
                entry,
                rules,
            } => {
                if let Some(renews) = rules.renews.as_deref()
                    && revoked_renewed.contains(renews)
                {
                    outcomes[index] = Some(Err(renewed_is_revoked(renews)));
                    continue;
                }
                issued.push(certificate);
                let keep = [Some(certificate.serial.as_str()), rules.renews.as_deref()]
                    .into_iter()
                    .flatten()
                    .collect();
                accepted.push(Accepted {
                    index,
                    device_id: &certificate.device_id,
                    keep,
                    issuance: Some(entry.clone()),
                    revocation: Revocation {
                        reason: superseded_by(&certificate.serial),
                        actor: entry.actor.clone(),
                        now_ms: certificate.issued_ms,
                        superseded: true,
                        ..Default::default()
                    },
                });
            }
            CertificateWrite::Supersede {
                device_id,
                keep,
                actor,
                now_ms,
            } => accepted.push(Accepted {
                index,
                device_id,
                keep: vec![keep.as_str()],
                issuance: None,
                revocation: Revocation {
                    reason: superseded_in_use(keep),
                    actor: actor.clone(),
                    now_ms: *now_ms,
                    superseded: true,
                    ..Default::default()
                },
            }),
        }
    }

    for chunk in issued.chunks(ROWS_PER_INSERT) {
        let rows: Vec<&CertificateRecord> = chunk.to_vec();
        // Multi-row inserts are backend-specific in Diesel: the MultiConnection has none.
        let insert = diesel::insert_into(certificates::table).values(rows);
        match conn {
            DbConnection::Postgres(pg) => insert.execute(pg)?,
            DbConnection::Sqlite(sqlite) => insert.execute(sqlite)?,
        };
    }
    set_current_certificates(conn, &issued)?;

    // Every valid certificate of these devices, the new ones included, locked against a
    // concurrent revocation so each is superseded (and audited) exactly once.
    let device_ids: Vec<&str> = accepted.iter().map(|a| a.device_id).collect();
    if let DbConnection::Postgres(pg) = conn {
        use diesel::sql_types::{Array, Text};
        diesel::sql_query(
            "SELECT serial FROM certificates WHERE device_id = ANY($1) AND revoked_ms IS NULL \
             ORDER BY serial FOR UPDATE",
        )
        .bind::<Array<Text>, _>(&device_ids)
        .execute(pg)?;
    }
    let mut valid: HashMap<String, Vec<CertificateRecord>> = HashMap::new();
    for certificate in certificates::table
        .filter(certificates::device_id.eq_any(&device_ids))
        .filter(certificates::revoked_ms.is_null())
        .order(certificates::serial.asc())
        .select(CertificateRecord::as_select())
        .load(conn)?
    {
        valid
            .entry(certificate.device_id.clone())
            .or_default()
            .push(certificate);
    }

    let mut entries = Vec::new();
    let mut superseded: Vec<Vec<CertificateRecord>> = Vec::with_capacity(accepted.len());
    // (serial, when, reason) of every spare superseded.
    let mut revoked_rows: Vec<(String, i64, String)> = Vec::new();
    for write in &accepted {
        entries.extend(write.issuance.clone());
        let spares: Vec<CertificateRecord> = valid
            .get(write.device_id)
            .into_iter()
            .flatten()
            .filter(|c| !write.keep.contains(&c.serial.as_str()))
            .map(|c| CertificateRecord {
                revoked_ms: Some(write.revocation.now_ms),
                revocation_reason: Some(write.revocation.reason.clone()),
                ..c.clone()
            })
            .collect();
        for spare in &spares {
            entries.push(revocation_entry(spare, &write.revocation));
            revoked_rows.push((
                spare.serial.clone(),
                write.revocation.now_ms,
                write.revocation.reason.clone(),
            ));
        }
        superseded.push(spares);
    }
    mark_revoked(conn, &revoked_rows)?;
    // In the order of `entries`: per write, its issuance's record (if any), then its spares'.
    let mut records = append_all(conn, seal, entries)?.into_iter();
    for (write, spares) in accepted.iter().zip(superseded) {
        let spare_records = spares.len();
        let outcome = match write.issuance {
            Some(_) => {
                let record = records.next().ok_or_else(chain_mismatch)?;
                CertificateWritten::Issued(RecordedIssuance {
                    record,
                    superseded: spares,
                })
            }
            None => CertificateWritten::Superseded(spares),
        };
        records.by_ref().take(spare_records).for_each(drop);
        outcomes[write.index] = Some(Ok(outcome));
    }
    outcomes
        .into_iter()
        .map(|outcome| outcome.ok_or_else(chain_mismatch))
        .collect()
}

/// A bookkeeping slip of the fast path: the batch is then written one by one instead.
fn chain_mismatch() -> StoreError {
    StoreError::Unavailable("certificate batch: records out of step with writes".into())
}

/// Makes each issued certificate its device's current one.
fn set_current_certificates(
    conn: &mut DbConnection,
    issued: &[&CertificateRecord],
) -> Result<(), diesel::result::Error> {
    if issued.is_empty() {
        return Ok(());
    }
    if let DbConnection::Postgres(pg) = conn {
        use diesel::sql_types::{Array, BigInt, Text};
        let ids: Vec<&str> = issued.iter().map(|c| c.device_id.as_str()).collect();
        let serials: Vec<&str> = issued.iter().map(|c| c.serial.as_str()).collect();
        let not_after: Vec<i64> = issued.iter().map(|c| c.not_after_ms).collect();
        diesel::sql_query(
            "UPDATE devices AS d SET cert_serial = v.serial, cert_not_after_ms = v.not_after \
             FROM unnest($1::text[], $2::text[], $3::bigint[]) AS v(id, serial, not_after) \
             WHERE d.id = v.id",
        )
        .bind::<Array<Text>, _>(&ids)
        .bind::<Array<Text>, _>(&serials)
        .bind::<Array<BigInt>, _>(&not_after)
        .execute(pg)?;
        return Ok(());
    }
    for certificate in issued {
        diesel::update(devices::table.find(&certificate.device_id))
            .set((
                devices::cert_serial.eq(&certificate.serial),
                devices::cert_not_after_ms.eq(certificate.not_after_ms),
            ))
            .execute(conn)?;
    }
    Ok(())
}

/// Marks certificates revoked: (serial, when, reason).
fn mark_revoked(
    conn: &mut DbConnection,
    revoked: &[(String, i64, String)],
) -> Result<(), diesel::result::Error> {
    if revoked.is_empty() {
        return Ok(());
    }
    if let DbConnection::Postgres(pg) = conn {
        use diesel::sql_types::{Array, BigInt, Text};
        let serials: Vec<&str> = revoked.iter().map(|r| r.0.as_str()).collect();
        let at: Vec<i64> = revoked.iter().map(|r| r.1).collect();
        let reasons: Vec<&str> = revoked.iter().map(|r| r.2.as_str()).collect();
        diesel::sql_query(
            "UPDATE certificates AS c SET revoked_ms = v.at, revocation_reason = v.reason \
             FROM unnest($1::text[], $2::bigint[], $3::text[]) AS v(serial, at, reason) \
             WHERE c.serial = v.serial",
        )
        .bind::<Array<Text>, _>(&serials)
        .bind::<Array<BigInt>, _>(&at)
        .bind::<Array<Text>, _>(&reasons)
        .execute(pg)?;
        return Ok(());
    }
    for (serial, at, reason) in revoked {
        diesel::update(certificates::table.find(serial))
            .set((
                certificates::revoked_ms.eq(at),
                certificates::revocation_reason.eq(reason),
            ))
            .execute(conn)?;
    }
    Ok(())
}

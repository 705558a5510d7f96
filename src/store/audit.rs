//! The certificate audit trail: appended inside the transaction of the change it records, read in
//! pages for listing and verification.

use super::schema::certificate_audit as ca;
use super::{DbConnection, Store, StoreError};
use crate::audit::{AuditEntry, GENESIS_HASH, SealedRecord};
use diesel::prelude::*;

/// Computes a record's hash and signature; implemented by the control plane's audit key.
pub trait AuditSeal: Send + Sync {
    fn seal(&self, entry: AuditEntry, previous_hash: &str) -> SealedRecord;
}

/// Filters of an audit listing; `None` means any.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub device_id: Option<String>,
    pub kind: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub after_seq: i64,
    pub limit: i64,
}

#[derive(Queryable, Selectable, Insertable)]
#[diesel(table_name = ca)]
struct AuditRow {
    seq: i64,
    at_ms: i64,
    kind: String,
    device_id: String,
    serial: String,
    key_fingerprint: String,
    not_before_ms: i64,
    not_after_ms: i64,
    actor: String,
    reason: String,
    proof: String,
    outcome: String,
    target: String,
    previous_hash: String,
    hash: String,
    signature: String,
}

impl AuditRow {
    fn from_sealed(record: &SealedRecord) -> AuditRow {
        let e = &record.entry;
        AuditRow {
            seq: e.seq,
            at_ms: e.at_ms,
            kind: e.kind.clone(),
            device_id: e.device_id.clone(),
            serial: e.serial.clone(),
            key_fingerprint: e.key_fingerprint.clone(),
            not_before_ms: e.not_before_ms,
            not_after_ms: e.not_after_ms,
            actor: e.actor.clone(),
            reason: e.reason.clone(),
            proof: e.proof.clone(),
            outcome: e.outcome.clone(),
            target: e.target.clone(),
            previous_hash: record.previous_hash.clone(),
            hash: record.hash.clone(),
            signature: hex::encode(&record.signature),
        }
    }

    fn into_sealed(self) -> SealedRecord {
        SealedRecord {
            // A signature that is not hex cannot verify; keep the raw text so verification says so.
            signature: hex::decode(&self.signature).unwrap_or_else(|_| self.signature.into_bytes()),
            previous_hash: self.previous_hash,
            hash: self.hash,
            entry: AuditEntry {
                seq: self.seq,
                at_ms: self.at_ms,
                kind: self.kind,
                device_id: self.device_id,
                serial: self.serial,
                key_fingerprint: self.key_fingerprint,
                not_before_ms: self.not_before_ms,
                not_after_ms: self.not_after_ms,
                actor: self.actor,
                reason: self.reason,
                proof: self.proof,
                outcome: self.outcome,
                target: self.target,
            },
        }
    }
}

/// The PostgreSQL advisory lock (transaction level) that serialises audit appends of every replica.
const AUDIT_APPEND_LOCK: i64 = 0x466c_6f74_0002;

/// Takes the append lock (PostgreSQL) for the rest of the transaction: a change that must decide
/// under the audit order (the last admin credential) takes it before it reads.
pub(super) fn lock_appends(conn: &mut DbConnection) -> Result<(), StoreError> {
    if let DbConnection::Postgres(pg) = conn {
        diesel::sql_query(format!("SELECT pg_advisory_xact_lock({AUDIT_APPEND_LOCK})"))
            .execute(pg)?;
    }
    Ok(())
}

/// The last record's sequence number and hash (0 and the genesis hash on an empty trail), with
/// the append lock taken on PostgreSQL for the rest of the transaction.
fn chain_head(conn: &mut DbConnection) -> Result<(i64, String), StoreError> {
    lock_appends(conn)?;
    let last: Option<(i64, String)> = ca::table
        .order(ca::seq.desc())
        .select((ca::seq, ca::hash))
        .first(conn)
        .optional()?;
    Ok(last.unwrap_or((0, GENESIS_HASH.to_string())))
}

/// Appends `entry` after the current last record (its `seq` is assigned here), inside the caller's
/// transaction. On PostgreSQL the append first takes a transaction-level lock, so replicas issuing
/// at the same moment chain one after another instead of colliding on the sequence; on SQLite the
/// single writer already serialises them.
pub(super) fn append(
    conn: &mut DbConnection,
    seal: &dyn AuditSeal,
    mut entry: AuditEntry,
) -> Result<SealedRecord, StoreError> {
    let (last_seq, previous_hash) = chain_head(conn)?;
    entry.seq = last_seq + 1;
    let record = seal.seal(entry, &previous_hash);
    diesel::insert_into(ca::table)
        .values(AuditRow::from_sealed(&record))
        .execute(conn)?;
    Ok(record)
}

/// Appends `entries` in order after the current last record, as `append` does one by one: the
/// chain's head is read once (under the same lock) and the rows are written together.
pub(super) fn append_all(
    conn: &mut DbConnection,
    seal: &dyn AuditSeal,
    entries: Vec<AuditEntry>,
) -> Result<Vec<SealedRecord>, StoreError> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let (mut seq, mut previous_hash) = chain_head(conn)?;
    let mut records = Vec::with_capacity(entries.len());
    for mut entry in entries {
        seq += 1;
        entry.seq = seq;
        let record = seal.seal(entry, &previous_hash);
        previous_hash = record.hash.clone();
        records.push(record);
    }
    // Well under every backend's limit on bound parameters per statement.
    for chunk in records.chunks(500) {
        let rows: Vec<AuditRow> = chunk.iter().map(AuditRow::from_sealed).collect();
        // Multi-row inserts are backend-specific in Diesel: the MultiConnection has none.
        let insert = diesel::insert_into(ca::table).values(rows);
        match conn {
            DbConnection::Postgres(pg) => insert.execute(pg)?,
            DbConnection::Sqlite(sqlite) => insert.execute(sqlite)?,
        };
    }
    Ok(records)
}

impl Store {
    /// Appends one record on its own (for refused requests, which change nothing else).
    pub async fn append_audit(
        &self,
        seal: std::sync::Arc<dyn AuditSeal>,
        entry: AuditEntry,
    ) -> Result<SealedRecord, StoreError> {
        self.run("append_audit", move |conn| {
            conn.transaction(|conn| append(conn, seal.as_ref(), entry))
        })
        .await
    }

    /// Records matching `query`, in sequence order.
    pub async fn list_audit(&self, query: AuditQuery) -> Result<Vec<SealedRecord>, StoreError> {
        self.run("list_audit", move |conn| {
            let mut q = ca::table
                .filter(ca::seq.gt(query.after_seq))
                .select(AuditRow::as_select())
                .order(ca::seq.asc())
                .limit(query.limit)
                .into_boxed();
            if let Some(device) = query.device_id {
                q = q.filter(ca::device_id.eq(device));
            }
            if let Some(kind) = query.kind {
                q = q.filter(ca::kind.eq(kind));
            }
            if let Some(since) = query.since_ms {
                q = q.filter(ca::at_ms.ge(since));
            }
            if let Some(until) = query.until_ms {
                q = q.filter(ca::at_ms.le(until));
            }
            Ok(q.load(conn)?
                .into_iter()
                .map(AuditRow::into_sealed)
                .collect())
        })
        .await
    }
}

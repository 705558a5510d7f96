//! The certificate audit trail: appended inside the transaction of the change it records, read in
//! pages for listing and verification.

use super::schema::audit_heads as ah;
use super::schema::certificate_audit as ca;
use super::{DbConnection, Store, StoreError};
use crate::audit::{AuditEntry, GENESIS_HASH, SealedRecord, SignedHead};
use diesel::prelude::*;

/// Computes a record's hash and signature; implemented by the control plane's audit key.
pub trait AuditSeal: Send + Sync {
    /// The record `entry` makes after the record hashed `previous_hash`.
    fn seal(&self, entry: AuditEntry, previous_hash: &str) -> SealedRecord;
}

/// Filters of an audit listing; `None` means any.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Records about this device.
    pub device_id: Option<String>,
    /// Records of this kind (`renewed`).
    pub kind: Option<String>,
    /// The actor (`operator/alice`) or its name (`alice`).
    pub actor: Option<String>,
    /// The target (`fleet/web`); with `device_id`, records of either match.
    pub target: Option<String>,
    /// Records written at or after this, Unix milliseconds.
    pub since_ms: Option<i64>,
    /// Records written before this, Unix milliseconds.
    pub until_ms: Option<i64>,
    /// Records after this position (paging).
    pub after_seq: i64,
    /// At most this many records.
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
    role: String,
    method: String,
    revision: String,
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
            role: e.role.clone(),
            method: e.method.clone(),
            revision: e.revision.clone(),
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
                role: self.role,
                method: self.method,
                revision: self.revision,
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
    last_record(conn)
}

/// The last record's sequence number and hash (0 and the genesis hash on an empty trail).
fn last_record(conn: &mut DbConnection) -> Result<(i64, String), StoreError> {
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

/// The records of an admin call, appended in the transaction of the change they describe.
#[derive(Clone)]
pub struct Audited {
    /// Seals the records.
    pub seal: std::sync::Arc<dyn AuditSeal>,
    /// The records, in order.
    pub entries: Vec<AuditEntry>,
}

impl Audited {
    /// Takes the append lock before the change touches any row, so a transaction holding it and
    /// one holding a row the other needs can never wait on each other.
    pub(super) fn begin(conn: &mut DbConnection) -> Result<(), StoreError> {
        lock_appends(conn)
    }

    /// Appends the records after the change, in its transaction.
    pub(super) fn commit(self, conn: &mut DbConnection) -> Result<Vec<SealedRecord>, StoreError> {
        append_all(conn, self.seal.as_ref(), self.entries)
    }

    /// Sets the revision the change produced on every record (known only inside the transaction).
    pub(super) fn produced(mut self, revision: impl std::fmt::Display) -> Audited {
        let revision = revision.to_string();
        for entry in &mut self.entries {
            entry.revision = revision.clone();
        }
        self
    }
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

    /// The last record's sequence number and hash, read without taking the append lock.
    pub async fn audit_chain_head(&self) -> Result<(i64, String), StoreError> {
        self.run("audit_chain_head", last_record).await
    }

    /// Keeps a signed head (once per record: a head already kept for that record stays).
    pub async fn save_audit_head(&self, head: SignedHead) -> Result<(), StoreError> {
        self.run("save_audit_head", move |conn| {
            let exists = ah::table
                .find(head.seq)
                .select(ah::seq)
                .first::<i64>(conn)
                .optional()?
                .is_some();
            if !exists {
                diesel::insert_into(ah::table)
                    .values((
                        ah::seq.eq(head.seq),
                        ah::hash.eq(&head.hash),
                        ah::at_ms.eq(head.at_ms),
                        ah::signature.eq(hex::encode(&head.signature)),
                    ))
                    .execute(conn)?;
            }
            Ok(())
        })
        .await
    }

    /// The kept heads, newest first.
    pub async fn list_audit_heads(&self, limit: i64) -> Result<Vec<SignedHead>, StoreError> {
        self.run("list_audit_heads", move |conn| {
            let rows: Vec<(i64, String, i64, String)> = ah::table
                .order(ah::seq.desc())
                .limit(limit)
                .select((ah::seq, ah::hash, ah::at_ms, ah::signature))
                .load(conn)?;
            Ok(rows
                .into_iter()
                .map(|(seq, hash, at_ms, signature)| SignedHead {
                    seq,
                    hash,
                    at_ms,
                    signature: hex::decode(&signature).unwrap_or_else(|_| signature.into_bytes()),
                })
                .collect())
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
            match (query.device_id, query.target) {
                (Some(device), Some(target)) => {
                    q = q.filter(ca::device_id.eq(device).or(ca::target.eq(target)));
                }
                (Some(device), None) => q = q.filter(ca::device_id.eq(device)),
                (None, Some(target)) => q = q.filter(ca::target.eq(target)),
                (None, None) => {}
            }
            if let Some(actor) = query.actor {
                q = match actor.contains('/') {
                    true => q.filter(ca::actor.eq(actor)),
                    false => q.filter(
                        ca::actor
                            .like(format!("%/{}", escape_like(&actor)))
                            .escape('\\'),
                    ),
                };
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

/// `text` as a literal inside a LIKE pattern escaped by `\\`.
fn escape_like(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

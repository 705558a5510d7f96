//! The certificate audit trail's integrity: every record's hash covers the previous record's hash and
//! all of its own fields in a fixed, unambiguous encoding, and is signed by the audit key. Anyone
//! with the audit public key can verify a trail from its first record. Pure.

use crate::signature::{SignatureError, verify};
use sha2::{Digest, Sha256};

/// `previous_hash` of the first record.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What an audit record says (everything but its chain fields).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditEntry {
    pub seq: i64,
    pub at_ms: i64,
    /// issued | renewed | recovered | revoked | rejected
    pub kind: String,
    pub device_id: String,
    pub serial: String,
    pub key_fingerprint: String,
    pub not_before_ms: i64,
    pub not_after_ms: i64,
    pub actor: String,
    pub reason: String,
    /// enrollment-approval | device-certificate | previous-key | admin
    pub proof: String,
    /// ok | refused
    pub outcome: String,
    /// What the record is about, by name (`credential/ops`); empty on records of devices'
    /// certificates, which name their device by id.
    pub target: String,
}

/// A record with its place in the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedRecord {
    pub entry: AuditEntry,
    pub previous_hash: String,
    pub hash: String,
    pub signature: Vec<u8>,
}

/// The hex SHA-256 that chains `entry` after `previous_hash`: each field is length-prefixed so no two
/// different records encode alike. A record with a target is encoded as version 2 (the target
/// last); one without keeps version 1's encoding, so trails written before targets verify as they
/// were.
pub fn record_hash(previous_hash: &str, entry: &AuditEntry) -> String {
    let mut hasher = Sha256::new();
    let mut field = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_be_bytes());
        hasher.update(bytes);
    };
    let version: &[u8] = if entry.target.is_empty() {
        b"flotilla-audit-v1"
    } else {
        b"flotilla-audit-v2"
    };
    field(version);
    field(previous_hash.as_bytes());
    field(&entry.seq.to_be_bytes());
    field(&entry.at_ms.to_be_bytes());
    for text in [
        &entry.kind,
        &entry.device_id,
        &entry.serial,
        &entry.key_fingerprint,
    ] {
        field(text.as_bytes());
    }
    field(&entry.not_before_ms.to_be_bytes());
    field(&entry.not_after_ms.to_be_bytes());
    for text in [&entry.actor, &entry.reason, &entry.proof, &entry.outcome] {
        field(text.as_bytes());
    }
    if !entry.target.is_empty() {
        field(entry.target.as_bytes());
    }
    hex::encode(hasher.finalize())
}

/// The bytes the audit key signs for a record: its hash.
pub fn signed_bytes(hash: &str) -> Vec<u8> {
    hex::decode(hash).unwrap_or_else(|_| hash.as_bytes().to_vec())
}

/// Where a trail stops being intact.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit record {seq}: {problem}")]
pub struct ChainError {
    pub seq: i64,
    pub problem: String,
}

/// Checks a whole trail, in order from the first record: sequence without gaps, each record chained
/// to the one before, each hash matching its fields, each signature valid. Returns how many records
/// were verified, or the first record that is not intact.
pub fn verify_chain<'a>(
    records: impl IntoIterator<Item = &'a SealedRecord>,
    audit_key_spki_der: &[u8],
) -> Result<usize, ChainError> {
    let mut previous_hash = GENESIS_HASH.to_string();
    let mut count = 0;
    for (expected_seq, record) in (1i64..).zip(records) {
        let seq = record.entry.seq;
        let fail = |problem: String| ChainError { seq, problem };
        if seq != expected_seq {
            return Err(fail(format!(
                "expected record {expected_seq} here: a record was deleted, inserted or reordered"
            )));
        }
        if record.previous_hash != previous_hash {
            return Err(fail(
                "does not chain to the record before it: a record was deleted, inserted or reordered"
                    .into(),
            ));
        }
        if record_hash(&record.previous_hash, &record.entry) != record.hash {
            return Err(fail(
                "its fields do not match its hash: it was changed".into(),
            ));
        }
        match verify(
            audit_key_spki_der,
            &signed_bytes(&record.hash),
            &record.signature,
        ) {
            Ok(()) => {}
            Err(SignatureError::Invalid) => {
                return Err(fail(
                    "its signature does not verify with the audit key".into(),
                ));
            }
            Err(other) => return Err(fail(format!("audit key unusable: {other}"))),
        }
        previous_hash = record.hash.clone();
        count += 1;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{PublicKeyData, SigningKey};

    fn chain(key: &rcgen::KeyPair, n: i64) -> Vec<SealedRecord> {
        let mut previous = GENESIS_HASH.to_string();
        (1..=n)
            .map(|seq| {
                let entry = AuditEntry {
                    seq,
                    at_ms: 1000 + seq,
                    kind: "renewed".into(),
                    device_id: "dev".into(),
                    serial: format!("{seq:02x}"),
                    outcome: "ok".into(),
                    ..Default::default()
                };
                let hash = record_hash(&previous, &entry);
                let signature = key.sign(&signed_bytes(&hash)).unwrap();
                let record = SealedRecord {
                    entry,
                    previous_hash: previous.clone(),
                    hash: hash.clone(),
                    signature,
                };
                previous = hash;
                record
            })
            .collect()
    }

    #[test]
    fn a_target_is_covered_and_records_without_one_keep_the_first_encoding() {
        let entry = AuditEntry {
            seq: 1,
            kind: "issued".into(),
            ..Default::default()
        };
        let v1 = record_hash(GENESIS_HASH, &entry);
        // The first encoding, spelled out: a trail written before targets existed still verifies.
        let mut hasher = Sha256::new();
        let mut field = |bytes: &[u8]| {
            hasher.update((bytes.len() as u64).to_be_bytes());
            hasher.update(bytes);
        };
        field(b"flotilla-audit-v1");
        field(GENESIS_HASH.as_bytes());
        field(&1i64.to_be_bytes());
        field(&0i64.to_be_bytes());
        for text in ["issued", "", "", ""] {
            field(text.as_bytes());
        }
        field(&0i64.to_be_bytes());
        field(&0i64.to_be_bytes());
        for text in ["", "", "", ""] {
            field(text.as_bytes());
        }
        assert_eq!(v1, hex::encode(hasher.finalize()));
        let targeted = AuditEntry {
            target: "credential/ops".into(),
            ..entry.clone()
        };
        let v2 = record_hash(GENESIS_HASH, &targeted);
        assert_ne!(v1, v2);
        let other = AuditEntry {
            target: "credential/dev".into(),
            ..entry
        };
        assert_ne!(v2, record_hash(GENESIS_HASH, &other));
    }

    #[test]
    fn an_intact_chain_verifies_and_any_tampering_names_the_record() {
        let key = rcgen::KeyPair::generate().unwrap();
        let spki = key.subject_public_key_info();
        let records = chain(&key, 5);
        assert_eq!(verify_chain(&records, &spki), Ok(5));

        let mut changed = records.clone();
        changed[2].entry.reason = "edited".into();
        assert_eq!(verify_chain(&changed, &spki).unwrap_err().seq, 3);

        let mut deleted = records.clone();
        deleted.remove(1);
        assert_eq!(verify_chain(&deleted, &spki).unwrap_err().seq, 3);

        let mut reordered = records.clone();
        reordered.swap(1, 3);
        assert_eq!(verify_chain(&reordered, &spki).unwrap_err().seq, 4);

        // Re-hashing a changed record does not help without the audit key.
        let mut forged = records.clone();
        forged[3].entry.serial = "ff".into();
        forged[3].hash = record_hash(&forged[3].previous_hash, &forged[3].entry);
        let error = verify_chain(&forged, &spki).unwrap_err();
        assert_eq!(error.seq, 4);
        assert!(error.problem.contains("signature"), "{error}");

        let stranger = rcgen::KeyPair::generate().unwrap();
        assert_eq!(
            verify_chain(&records, &stranger.subject_public_key_info())
                .unwrap_err()
                .seq,
            1
        );
    }
}

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
    /// Position in the trail, from 1.
    pub seq: i64,
    /// When it was written, Unix milliseconds.
    pub at_ms: i64,
    /// issued | renewed | recovered | revoked | rejected
    pub kind: String,
    /// The device the certificate belongs to (empty for records of calls).
    pub device_id: String,
    /// Serial of the certificate concerned, lowercase hex.
    pub serial: String,
    /// SHA-256 (hex) of the certificate's public key.
    pub key_fingerprint: String,
    /// Start of the certificate's validity, Unix milliseconds.
    pub not_before_ms: i64,
    /// End of the certificate's validity, Unix milliseconds.
    pub not_after_ms: i64,
    /// Who did it (`operator/alice`, `device/<id>`).
    pub actor: String,
    /// Why, in words.
    pub reason: String,
    /// enrollment-approval | device-certificate | previous-key | admin
    pub proof: String,
    /// ok | refused
    pub outcome: String,
    /// What the record is about, by name (`credential/ops`, `fleet/web`); empty on records of
    /// devices' certificates, which name their device by id.
    pub target: String,
    /// The caller's role on records of admin calls (`operator`).
    pub role: String,
    /// The admin method called (`FleetService/ApplyFleet`).
    pub method: String,
    /// The revision or version the change produced (a fleet's revision, a device's spec version).
    pub revision: String,
}

impl AuditEntry {
    /// The encoding version of this record's hash: each version adds fields, and a record uses the
    /// oldest one that holds all of its fields, so trails written before a field existed verify as
    /// they were.
    pub fn encoding(&self) -> u8 {
        if !(self.role.is_empty() && self.method.is_empty() && self.revision.is_empty()) {
            3
        } else if !self.target.is_empty() {
            2
        } else {
            1
        }
    }
}

/// A record with its place in the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedRecord {
    /// What the record says.
    pub entry: AuditEntry,
    /// Hash of the record before it (`GENESIS_HASH` for the first).
    pub previous_hash: String,
    /// Hash over `previous_hash` and every field of the entry.
    pub hash: String,
    /// The audit key's signature of `hash`.
    pub signature: Vec<u8>,
}

/// The hex SHA-256 that chains `entry` after `previous_hash`: each field is length-prefixed so no two
/// different records encode alike. Version 1 holds the certificate fields; version 2 adds the
/// target; version 3 the role, method and revision (see `AuditEntry::encoding`).
pub fn record_hash(previous_hash: &str, entry: &AuditEntry) -> String {
    let mut hasher = Sha256::new();
    let mut field = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_be_bytes());
        hasher.update(bytes);
    };
    let encoding = entry.encoding();
    let version: &[u8] = match encoding {
        1 => b"flotilla-audit-v1",
        2 => b"flotilla-audit-v2",
        _ => b"flotilla-audit-v3",
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
    if encoding >= 2 {
        field(entry.target.as_bytes());
    }
    if encoding >= 3 {
        for text in [&entry.role, &entry.method, &entry.revision] {
            field(text.as_bytes());
        }
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
    /// The first record that does not check out.
    pub seq: i64,
    /// What is wrong with it.
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

/// The chain's last record as the audit key signed it at a moment: kept elsewhere (a file, a log
/// shipped off the host), it shows whether records were deleted from the head of the trail since.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHead {
    /// Position of the last record.
    pub seq: i64,
    /// Its hash.
    pub hash: String,
    /// When the head was signed, Unix milliseconds.
    pub at_ms: i64,
    /// The audit key's signature over seq, hash and time.
    pub signature: Vec<u8>,
}

/// The bytes the audit key signs for a head; a different domain from records' so neither can pass
/// for the other.
pub fn head_signed_bytes(seq: i64, hash: &str, at_ms: i64) -> Vec<u8> {
    let mut bytes = Vec::new();
    for field in [
        b"flotilla-audit-head-v1".as_slice(),
        &seq.to_be_bytes(),
        hash.as_bytes(),
        &at_ms.to_be_bytes(),
    ] {
        bytes.extend((field.len() as u64).to_be_bytes());
        bytes.extend(field);
    }
    bytes
}

/// Checks a head's signature and that `records` (a trail verified from its first record) still
/// hold the record it names, unchanged.
pub fn check_head(
    records: &[SealedRecord],
    head: &SignedHead,
    audit_key_spki_der: &[u8],
) -> Result<(), ChainError> {
    let fail = |problem: String| ChainError {
        seq: head.seq,
        problem,
    };
    match verify(
        audit_key_spki_der,
        &head_signed_bytes(head.seq, &head.hash, head.at_ms),
        &head.signature,
    ) {
        Ok(()) => {}
        Err(SignatureError::Invalid) => {
            return Err(fail(
                "the saved head's signature does not verify with the audit key".into(),
            ));
        }
        Err(other) => return Err(fail(format!("audit key unusable: {other}"))),
    }
    let signed_at = crate::clock::timestamp_from_millis(head.at_ms);
    let index = usize::try_from(head.seq - 1).ok();
    match index.and_then(|i| records.get(i)) {
        None if head.seq == 0 => Ok(()),
        None => Err(fail(format!(
            "the trail ends at record {} but the head signed at {signed_at} shows record {}: the \
             newest records were deleted",
            records.len(),
            head.seq
        ))),
        Some(record) if record.hash != head.hash => Err(fail(format!(
            "differs from the head signed at {signed_at}: the trail was rewritten"
        ))),
        Some(_) => Ok(()),
    }
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
    fn role_method_and_revision_are_covered_as_the_third_encoding() {
        let entry = AuditEntry {
            seq: 1,
            kind: "applied".into(),
            target: "fleet/web".into(),
            ..Default::default()
        };
        assert_eq!(entry.encoding(), 2);
        let call = AuditEntry {
            role: "operator".into(),
            method: "FleetService/ApplyFleet".into(),
            revision: "3".into(),
            ..entry.clone()
        };
        assert_eq!(call.encoding(), 3);
        let hash = record_hash(GENESIS_HASH, &call);
        assert_ne!(hash, record_hash(GENESIS_HASH, &entry));
        for changed in [
            AuditEntry {
                role: "admin".into(),
                ..call.clone()
            },
            AuditEntry {
                method: "FleetService/DeleteFleet".into(),
                ..call.clone()
            },
            AuditEntry {
                revision: "4".into(),
                ..call.clone()
            },
        ] {
            assert_ne!(hash, record_hash(GENESIS_HASH, &changed));
        }
    }

    #[test]
    fn a_saved_head_shows_truncation_and_rewriting() {
        let key = rcgen::KeyPair::generate().unwrap();
        let spki = key.subject_public_key_info();
        let records = chain(&key, 5);
        let sign = |seq: i64, hash: &str| SignedHead {
            seq,
            hash: hash.to_string(),
            at_ms: 42,
            signature: key.sign(&head_signed_bytes(seq, hash, 42)).unwrap(),
        };
        let head = sign(4, &records[3].hash);
        assert_eq!(check_head(&records, &head, &spki), Ok(()));
        assert_eq!(check_head(&records[..4], &head, &spki), Ok(()));

        let error = check_head(&records[..3], &head, &spki).unwrap_err();
        assert_eq!(error.seq, 4);
        assert!(
            error.problem.contains("newest records were deleted"),
            "{error}"
        );

        let mut rewritten = records.clone();
        rewritten[3].hash = record_hash(&rewritten[3].previous_hash, &AuditEntry::default());
        let error = check_head(&rewritten, &head, &spki).unwrap_err();
        assert!(error.problem.contains("rewritten"), "{error}");

        let mut forged = head.clone();
        forged.seq = 2;
        let error = check_head(&records, &forged, &spki).unwrap_err();
        assert!(error.problem.contains("signature"), "{error}");
        // A record's signature does not pass for a head's.
        let mut swapped = head.clone();
        swapped.signature = records[3].signature.clone();
        assert!(check_head(&records, &swapped, &spki).is_err());
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

//! The audit key: a P-256 key, separate from the CA key, that signs every audit record and the
//! chain heads.
//! Its public key is written beside it and into `flotctl.toml`, so verifiers pin it.

use crate::audit::{AuditEntry, SealedRecord, record_hash, signed_bytes};
use crate::store::AuditSeal;
use rcgen::{KeyPair, PublicKeyData, SigningKey};

/// The audit key could not be created, read or used.
#[derive(Debug, thiserror::Error)]
#[error("audit key is unusable: {0}")]
pub struct AuditKeyError(String);

/// The Ed25519 key that signs audit records and chain heads.
pub struct AuditKey {
    key: KeyPair,
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditKey").finish_non_exhaustive()
    }
}

impl AuditKey {
    /// A new key and its PKCS#8 PEM (to store with mode 0600).
    pub fn generate() -> Result<(AuditKey, String), AuditKeyError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| AuditKeyError(e.to_string()))?;
        let pem = key.serialize_pem();
        Ok((AuditKey { key }, pem))
    }

    /// Reads the key from PKCS#8 PEM.
    pub fn load(pem: &str) -> Result<AuditKey, AuditKeyError> {
        let key = KeyPair::from_pem(pem).map_err(|e| AuditKeyError(e.to_string()))?;
        Ok(AuditKey { key })
    }

    /// SubjectPublicKeyInfo in PEM.
    pub fn public_key_pem(&self) -> String {
        self.key.public_key_pem()
    }

    /// The public key, as SubjectPublicKeyInfo DER.
    pub fn public_key_der(&self) -> Vec<u8> {
        self.key.subject_public_key_info()
    }

    /// Signs `message` (a head's bytes, `audit::head_signed_bytes`). As for records, an RNG failure
    /// gives an empty signature, which fails verification.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.key.sign(message).unwrap_or_default()
    }
}

impl AuditSeal for AuditKey {
    fn seal(&self, entry: AuditEntry, previous_hash: &str) -> SealedRecord {
        let hash = record_hash(previous_hash, &entry);
        // ECDSA signing with a loaded P-256 key only fails if the system RNG fails; an empty
        // signature then fails verification rather than passing silently.
        let signature = self.key.sign(&signed_bytes(&hash)).unwrap_or_default();
        SealedRecord {
            entry,
            previous_hash: previous_hash.to_string(),
            hash,
            signature,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{GENESIS_HASH, verify_chain};

    #[test]
    fn sealed_records_verify_with_the_public_key_after_a_reload() {
        let (key, pem) = AuditKey::generate().unwrap();
        let first = key.seal(
            AuditEntry {
                seq: 1,
                kind: "issued".into(),
                ..Default::default()
            },
            GENESIS_HASH,
        );
        let reloaded = AuditKey::load(&pem).unwrap();
        let second = reloaded.seal(
            AuditEntry {
                seq: 2,
                kind: "renewed".into(),
                ..Default::default()
            },
            &first.hash,
        );
        assert_eq!(
            verify_chain([&first, &second], &key.public_key_der()),
            Ok(2)
        );
        assert!(
            key.public_key_pem()
                .starts_with("-----BEGIN PUBLIC KEY-----")
        );
    }
}

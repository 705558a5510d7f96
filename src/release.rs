//! Agent releases and their signatures: what an operator's release key signs, how a device checks
//! a build against the keys it pins, and the signature file `flotctl agent-release sign` writes.
//! The control plane only stores and serves releases; the key that signs them stays with the
//! operator, so a device never runs a build the operator did not sign. Pure: no I/O.

use crate::signature::{SignatureError, spki_der_from_pem, verify};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Ed25519 in a SubjectPublicKeyInfo.
const OID_ED25519: &str = "1.3.101.112";
/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// Why a release key, signature or signature file is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReleaseError {
    /// The key is not a usable Ed25519 public or private key.
    #[error("release key: {0}")]
    Key(String),
    /// The signature has the wrong length.
    #[error("the signature is {0} bytes; an Ed25519 signature is 64")]
    SignatureLength(usize),
    /// No pinned key made the signature.
    #[error("the signature does not verify against any pinned release key ({0})")]
    Untrusted(String),
    /// The agent pins no key, so it can trust no release.
    #[error("no release keys are pinned")]
    NoKeys,
    /// The signature file cannot be read.
    #[error("signature file: {0}")]
    File(String),
}

/// The bytes a release key signs: the version, the binary's digest and size, under a domain tag
/// that no other Flotilla signature uses.
pub fn signing_message(version: &str, sha256_hex: &str, size: u64) -> Vec<u8> {
    format!("flotilla-agent-release-v1\nversion={version}\nsha256={sha256_hex}\nsize={size}\n")
        .into_bytes()
}

/// A public release key a device or the control plane trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseKey {
    spki_der: Vec<u8>,
}

impl ReleaseKey {
    /// An Ed25519 public key from a `PUBLIC KEY` PEM block.
    pub fn from_pem(pem: &str) -> Result<ReleaseKey, ReleaseError> {
        let spki_der = spki_der_from_pem(pem).map_err(|e| ReleaseError::Key(e.to_string()))?;
        use x509_parser::prelude::FromDer;
        let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&spki_der)
            .map_err(|e| ReleaseError::Key(e.to_string()))?;
        let algorithm = spki.algorithm.algorithm.to_id_string();
        if algorithm != OID_ED25519 {
            return Err(ReleaseError::Key(format!(
                "an Ed25519 key is needed, not {algorithm}"
            )));
        }
        Ok(ReleaseKey { spki_der })
    }

    /// Hex SHA-256 of the key's SubjectPublicKeyInfo.
    pub fn fingerprint(&self) -> String {
        hex::encode(Sha256::digest(&self.spki_der))
    }

    fn verifies(&self, message: &[u8], signature: &[u8]) -> Result<(), SignatureError> {
        verify(&self.spki_der, message, signature)
    }
}

/// A release as signed: what a device checks before installing anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedRelease {
    /// The agent version it is published as.
    pub version: String,
    /// SHA-256 (hex) of the binary.
    pub sha256: String,
    /// Size of the binary in bytes.
    pub size: u64,
    /// The release key's Ed25519 signature of version, digest and size.
    pub signature: Vec<u8>,
}

impl SignedRelease {
    /// The pinned key that signed this release, or why none did.
    pub fn verify<'k>(&self, keys: &'k [ReleaseKey]) -> Result<&'k ReleaseKey, ReleaseError> {
        if keys.is_empty() {
            return Err(ReleaseError::NoKeys);
        }
        if self.signature.len() != SIGNATURE_LEN {
            return Err(ReleaseError::SignatureLength(self.signature.len()));
        }
        let message = signing_message(&self.version, &self.sha256, self.size);
        keys.iter()
            .find(|key| key.verifies(&message, &self.signature).is_ok())
            .ok_or_else(|| {
                let pinned: Vec<String> = keys
                    .iter()
                    .map(|k| k.fingerprint()[..16].to_string())
                    .collect();
                ReleaseError::Untrusted(format!("pinned: {}", pinned.join(", ")))
            })
    }
}

/// The signature file `flotctl agent-release sign` writes and `publish` reads (TOML).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureFile {
    /// The agent version signed.
    pub version: String,
    /// SHA-256 (hex) of the binary.
    pub sha256: String,
    /// Size of the binary in bytes.
    pub size: u64,
    /// Fingerprint of the release key that signed (informational).
    pub key: String,
    /// Hex of the 64-byte Ed25519 signature.
    pub signature: String,
}

impl SignatureFile {
    /// Reads a signature file.
    pub fn parse(text: &str) -> Result<SignatureFile, ReleaseError> {
        toml::from_str(text).map_err(|e| ReleaseError::File(e.message().to_string()))
    }

    /// The file's text.
    pub fn to_text(&self) -> String {
        format!(
            "# flotilla agent release signature\n{}",
            toml::to_string(self).unwrap_or_default()
        )
    }

    /// The signature, decoded from hex.
    pub fn signature_bytes(&self) -> Result<Vec<u8>, ReleaseError> {
        hex::decode(&self.signature)
            .map_err(|e| ReleaseError::File(format!("signature is not hex: {e}")))
    }

    /// The release the file signs, ready to verify.
    pub fn signed_release(&self) -> Result<SignedRelease, ReleaseError> {
        Ok(SignedRelease {
            version: self.version.clone(),
            sha256: self.sha256.clone(),
            size: self.size,
            signature: self.signature_bytes()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::SigningKey;

    fn key() -> rcgen::KeyPair {
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap()
    }

    fn signed(key: &rcgen::KeyPair, version: &str, sha256: &str, size: u64) -> SignedRelease {
        SignedRelease {
            version: version.into(),
            sha256: sha256.into(),
            size,
            signature: key.sign(&signing_message(version, sha256, size)).unwrap(),
        }
    }

    #[test]
    fn a_release_verifies_only_against_its_key_and_its_own_fields() {
        let operator = key();
        let pinned = vec![ReleaseKey::from_pem(&operator.public_key_pem()).unwrap()];
        let release = signed(&operator, "1.4.0", "ab", 10);
        assert_eq!(release.verify(&pinned).unwrap(), &pinned[0]);
        for tampered in [
            SignedRelease {
                version: "1.5.0".into(),
                ..release.clone()
            },
            SignedRelease {
                sha256: "ac".into(),
                ..release.clone()
            },
            SignedRelease {
                size: 11,
                ..release.clone()
            },
        ] {
            assert!(matches!(
                tampered.verify(&pinned),
                Err(ReleaseError::Untrusted(_))
            ));
        }
        let stranger = signed(&key(), "1.4.0", "ab", 10);
        assert!(matches!(
            stranger.verify(&pinned),
            Err(ReleaseError::Untrusted(_))
        ));
        assert_eq!(release.verify(&[]), Err(ReleaseError::NoKeys));
        // A second pinned key (rotation) is tried too.
        let next = key();
        let both = vec![
            ReleaseKey::from_pem(&next.public_key_pem()).unwrap(),
            pinned[0].clone(),
        ];
        assert_eq!(release.verify(&both).unwrap(), &both[1]);
    }

    #[test]
    fn only_ed25519_keys_are_release_keys() {
        let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        assert!(matches!(
            ReleaseKey::from_pem(&p256.public_key_pem()),
            Err(ReleaseError::Key(_))
        ));
    }

    #[test]
    fn the_signature_file_round_trips() {
        let operator = key();
        let release = signed(&operator, "1.4.0", "ab", 10);
        let file = SignatureFile {
            version: release.version.clone(),
            sha256: release.sha256.clone(),
            size: release.size,
            key: ReleaseKey::from_pem(&operator.public_key_pem())
                .unwrap()
                .fingerprint(),
            signature: hex::encode(&release.signature),
        };
        let parsed = SignatureFile::parse(&file.to_text()).unwrap();
        assert_eq!(parsed, file);
        assert_eq!(parsed.signed_release().unwrap(), release);
        assert!(SignatureFile::parse("version = 1").is_err());
    }
}

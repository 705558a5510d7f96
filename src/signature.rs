//! Detached signatures over small messages with certificate-style keys (P-256, P-384, Ed25519):
//! verification against a SubjectPublicKeyInfo, and the messages Flotilla signs. Pure.

use ring::signature::{self, UnparsedPublicKey};
use sha2::{Digest, Sha256};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_ED25519: &str = "1.3.101.112";

/// The qualifying data of a TPM2_Certify of a device key at enrollment: SHA-256 of the CSR PEM,
/// so the attestation is bound to the one request it travels with.
pub fn tpm_certify_qualifying_data(csr_pem: &str) -> Vec<u8> {
    Sha256::digest(csr_pem.as_bytes()).to_vec()
}

/// Why a signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The public key is not DER.
    #[error("public key is not valid DER: {0}")]
    Key(String),
    /// A key type other than P-256, P-384 or Ed25519.
    #[error("unsupported key type {0}")]
    Unsupported(String),
    /// The signature is not the key's over the message.
    #[error("signature does not verify")]
    Invalid,
}

/// Verifies `signature` (ECDSA: ASN.1 DER) over `message` with the key in `spki_der`.
pub fn verify(
    spki_der: &[u8],
    message: &[u8],
    signature_bytes: &[u8],
) -> Result<(), SignatureError> {
    let (_, spki) =
        SubjectPublicKeyInfo::from_der(spki_der).map_err(|e| SignatureError::Key(e.to_string()))?;
    let algorithm = spki.algorithm.algorithm.to_id_string();
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|oid| oid.to_id_string());
    let verifier: &dyn signature::VerificationAlgorithm =
        match (algorithm.as_str(), curve.as_deref()) {
            (OID_EC_PUBLIC_KEY, Some(OID_P256)) => &signature::ECDSA_P256_SHA256_ASN1,
            (OID_EC_PUBLIC_KEY, Some(OID_P384)) => &signature::ECDSA_P384_SHA384_ASN1,
            (OID_ED25519, _) => &signature::ED25519,
            (other, curve) => {
                return Err(SignatureError::Unsupported(format!(
                    "{other}{}",
                    curve.map(|c| format!(" on {c}")).unwrap_or_default()
                )));
            }
        };
    UnparsedPublicKey::new(verifier, spki.subject_public_key.data.as_ref())
        .verify(message, signature_bytes)
        .map_err(|_| SignatureError::Invalid)
}

/// Decodes a `PUBLIC KEY` PEM block (SubjectPublicKeyInfo) to DER.
pub fn spki_der_from_pem(pem: &str) -> Result<Vec<u8>, SignatureError> {
    use rustls::pki_types::SubjectPublicKeyInfoDer;
    use rustls::pki_types::pem::PemObject;
    SubjectPublicKeyInfoDer::from_pem_slice(pem.as_bytes())
        .map(|der| der.as_ref().to_vec())
        .map_err(|e| SignatureError::Key(e.to_string()))
}

/// The bytes a device signs with its previous key to recover an expired certificate.
pub fn recovery_message(device_id: &str, nonce: &str, csr_pem: &str) -> Vec<u8> {
    format!(
        "flotilla-recovery-v1\n{device_id}\n{nonce}\n{}",
        hex::encode(Sha256::digest(csr_pem.as_bytes()))
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{PublicKeyData, SigningKey};

    #[test]
    fn verifies_every_supported_key_type_and_refuses_tampering() {
        for algorithm in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ] {
            let key = rcgen::KeyPair::generate_for(algorithm).unwrap();
            let message = recovery_message("dev", "nonce", "csr");
            let signature = key.sign(&message).unwrap();
            let spki = key.subject_public_key_info();
            assert_eq!(verify(&spki, &message, &signature), Ok(()));
            let other = recovery_message("dev", "other-nonce", "csr");
            assert_eq!(
                verify(&spki, &other, &signature),
                Err(SignatureError::Invalid)
            );
        }
        let rsa_like = b"\x30\x03\x02\x01\x00";
        assert!(matches!(
            verify(rsa_like, b"m", b"s"),
            Err(SignatureError::Key(_))
        ));
    }
}

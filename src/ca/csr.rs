//! Checking a certificate signing request before the CA signs anything for it: it must parse, its
//! signature must verify (proof of possession), and its key must be of a supported type. The subject
//! and requested extensions are deliberately ignored: the CA alone decides what a certificate says.

use crate::pki::sha256_hex;
use rcgen::{
    PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ED25519, PublicKeyData, SignatureAlgorithm,
};
use rustls::pki_types::CertificateSigningRequestDer;
use rustls::pki_types::pem::PemObject;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

/// Largest CSR accepted, far above any real one (a P-384 CSR is about 500 bytes).
pub const MAX_CSR_BYTES: usize = 16 * 1024;

/// Why a certificate signing request is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrError {
    /// Nothing was sent.
    #[error("CSR is empty")]
    Empty,
    /// Over the size limit.
    #[error("CSR is larger than {MAX_CSR_BYTES} bytes")]
    TooLarge,
    /// Not PEM.
    #[error("CSR is not PEM-encoded: {0}")]
    Pem(String),
    /// Not PKCS#10.
    #[error("CSR is not a valid PKCS#10 request: {0}")]
    Der(String),
    /// Not signed by the key it carries.
    #[error("CSR signature does not verify: the requester does not hold the key")]
    Signature,
    /// A key type the CA does not certify.
    #[error("unsupported key type {0}: use ECDSA P-256, ECDSA P-384 or Ed25519")]
    UnsupportedKey(String),
}

/// The public key of a verified CSR, ready to be put into a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsrPublicKey {
    raw: Vec<u8>,
    algorithm: &'static SignatureAlgorithm,
    /// SHA-256 (hex) of the SubjectPublicKeyInfo, the key's stable name.
    pub fingerprint: String,
    /// `flotilla://` URIs the request asks for in its subject alternative names. Never copied into a
    /// certificate; a renewal checks that they name the requester and nobody else.
    pub requested_identities: Vec<String>,
}

impl PublicKeyData for CsrPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.algorithm
    }
}

fn key_algorithm(spki: &SubjectPublicKeyInfo<'_>) -> Result<&'static SignatureAlgorithm, CsrError> {
    let oid = &spki.algorithm.algorithm;
    if *oid == OID_SIG_ED25519 {
        return Ok(&PKCS_ED25519);
    }
    if *oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        return match curve {
            Some(c) if c == OID_EC_P256 => Ok(&PKCS_ECDSA_P256_SHA256),
            Some(c) if c == OID_NIST_EC_P384 => Ok(&PKCS_ECDSA_P384_SHA384),
            Some(c) => Err(CsrError::UnsupportedKey(format!("EC curve {c}"))),
            None => Err(CsrError::UnsupportedKey(
                "EC key without a named curve".into(),
            )),
        };
    }
    Err(CsrError::UnsupportedKey(oid.to_id_string()))
}

/// Parses and verifies a PEM CSR, returning the key it asks a certificate for.
pub fn verify_csr_pem(pem: &str) -> Result<CsrPublicKey, CsrError> {
    if pem.trim().is_empty() {
        return Err(CsrError::Empty);
    }
    if pem.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge);
    }
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| CsrError::Pem(e.to_string()))?;
    verify_csr_der(der.as_ref())
}

/// Parses and verifies a DER CSR.
pub fn verify_csr_der(der: &[u8]) -> Result<CsrPublicKey, CsrError> {
    let (rest, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(der)
        .map_err(|e| CsrError::Der(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Der("trailing bytes after the request".into()));
    }
    let spki = &csr.certification_request_info.subject_pki;
    let algorithm = key_algorithm(spki)?;
    csr.verify_signature().map_err(|_| CsrError::Signature)?;
    let mut requested_identities = Vec::new();
    for extension in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = extension {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name
                    && uri.starts_with("flotilla://")
                {
                    requested_identities.push(uri.to_string());
                }
            }
        }
    }
    Ok(CsrPublicKey {
        raw: spki.subject_public_key.data.to_vec(),
        algorithm,
        fingerprint: sha256_hex(spki.raw),
        requested_identities,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    fn csr_for(key: &KeyPair) -> String {
        CertificateParams::new(vec!["ignored".to_string()])
            .unwrap()
            .serialize_request(key)
            .unwrap()
            .pem()
            .unwrap()
    }

    #[test]
    fn accepts_p256_p384_ed25519() {
        for alg in [
            &PKCS_ECDSA_P256_SHA256,
            &PKCS_ECDSA_P384_SHA384,
            &PKCS_ED25519,
        ] {
            let key = KeyPair::generate_for(alg).unwrap();
            let public = verify_csr_pem(&csr_for(&key)).unwrap();
            assert_eq!(
                public.fingerprint,
                sha256_hex(&rcgen::PublicKeyData::subject_public_key_info(&key))
            );
            assert_eq!(public.der_bytes(), key.der_bytes());
        }
    }

    #[test]
    fn refuses_garbage_and_tampering() {
        assert_eq!(verify_csr_pem("  "), Err(CsrError::Empty));
        assert!(matches!(verify_csr_pem("not a csr"), Err(CsrError::Pem(_))));
        let junk = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n";
        assert!(matches!(verify_csr_pem(junk), Err(CsrError::Der(_))));
        assert_eq!(
            verify_csr_pem(&"A".repeat(MAX_CSR_BYTES + 1)),
            Err(CsrError::TooLarge)
        );

        // Flip one bit of the signature: the request no longer proves possession.
        let key = KeyPair::generate().unwrap();
        let pem = csr_for(&key);
        let mut der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
        let last = der.len() - 1;
        der[last] ^= 1;
        assert!(matches!(
            verify_csr_der(&der),
            Err(CsrError::Signature) | Err(CsrError::Der(_))
        ));
    }
}

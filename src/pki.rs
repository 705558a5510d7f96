//! Certificate facts every component needs: PEM decoding, serials, validity, key fingerprints and the
//! identity a certificate carries. Pure functions over bytes.

use crate::identity::{Identity, IdentityError};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, X509Certificate};

/// Why a certificate could not be read or checked.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// No PEM certificate block.
    #[error("no PEM certificate found: {0}")]
    Pem(String),
    /// Not X.509.
    #[error("certificate is not valid X.509: {0}")]
    Der(String),
    /// No usable identity in it.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// Not issued by the expected CA, or outside its validity.
    #[error("{0}")]
    Untrusted(String),
}

/// What the control plane and the agent need to know about one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Serial number in lowercase hex, no separators.
    pub serial: String,
    /// Start of the validity window, Unix seconds.
    pub not_before: i64,
    /// End of the validity window, Unix seconds.
    pub not_after: i64,
    /// SHA-256 (hex) of the SubjectPublicKeyInfo.
    pub key_fingerprint: String,
    /// SHA-256 (hex) of the whole DER certificate.
    pub fingerprint: String,
}

/// SHA-256 (hex) of DER bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// SHA-256 (hex) and size of a file, read a piece at a time (agent builds are tens of MiB).
pub fn sha256_file(path: &std::path::Path) -> std::io::Result<(String, u64)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 256 * 1024];
    let mut size = 0;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            return Ok((hex::encode(hasher.finalize()), size));
        }
        size += n as u64;
        hasher.update(&buffer[..n]);
    }
}

/// Decodes every certificate in a PEM bundle.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(PkiError::Pem("the input holds no CERTIFICATE block".into()));
    }
    Ok(certs)
}

/// Reads the facts of a DER certificate.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, PkiError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| PkiError::Der(e.to_string()))?;
    Ok(CertInfo {
        serial: cert.tbs_certificate.raw_serial_as_string().replace(':', ""),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        key_fingerprint: sha256_hex(cert.public_key().raw),
        fingerprint: sha256_hex(der),
    })
}

/// Reads the facts of the first certificate of a PEM bundle.
pub fn cert_info_pem(pem: &str) -> Result<CertInfo, PkiError> {
    let certs = certs_from_pem(pem)?;
    cert_info(&certs[0])
}

/// The DNS names and IP addresses (as text) the first certificate of a PEM bundle is for.
pub fn subject_alt_names_pem(pem: &str) -> Result<Vec<String>, PkiError> {
    use x509_parser::extensions::GeneralName;
    let der = certs_from_pem(pem)?.remove(0);
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| PkiError::Der(e.to_string()))?;
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some(dns.to_string()),
            GeneralName::IPAddress(bytes) => match bytes.len() {
                4 => <[u8; 4]>::try_from(*bytes)
                    .ok()
                    .map(|b| std::net::IpAddr::from(b).to_string()),
                16 => <[u8; 16]>::try_from(*bytes)
                    .ok()
                    .map(|b| std::net::IpAddr::from(b).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect())
}

/// The identity carried by the first certificate of a PEM bundle.
pub fn identity_pem(pem: &str) -> Result<Identity, PkiError> {
    let certs = certs_from_pem(pem)?;
    Ok(Identity::from_certificate_der(&certs[0])?)
}

/// Checks that `cert_pem` was signed by (the first certificate of) `ca_pem`, whatever its
/// validity window (recovery looks at expired certificates).
pub fn verify_signed_by(cert_pem: &str, ca_pem: &str) -> Result<(), PkiError> {
    let cert_der = certs_from_pem(cert_pem)?.remove(0);
    let ca_der = certs_from_pem(ca_pem)?.remove(0);
    let (_, cert) =
        X509Certificate::from_der(&cert_der).map_err(|e| PkiError::Der(e.to_string()))?;
    let (_, ca) = X509Certificate::from_der(&ca_der).map_err(|e| PkiError::Der(e.to_string()))?;
    cert.verify_signature(Some(ca.public_key()))
        .map_err(|_| PkiError::Untrusted("certificate is not signed by the CA bundle".into()))
}

/// Checks that `cert_pem` was signed by (the first certificate of) `ca_pem` and is within its
/// validity window now.
pub fn verify_issued_by(cert_pem: &str, ca_pem: &str) -> Result<(), PkiError> {
    verify_signed_by(cert_pem, ca_pem)?;
    let cert_der = certs_from_pem(cert_pem)?.remove(0);
    let (_, cert) =
        X509Certificate::from_der(&cert_der).map_err(|e| PkiError::Der(e.to_string()))?;
    if !cert.validity().is_valid() {
        return Err(PkiError::Untrusted(
            "certificate is outside its validity window".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_a_clear_error() {
        assert!(matches!(certs_from_pem("hello"), Err(PkiError::Pem(_))));
        assert!(matches!(cert_info(b"\x30\x03abc"), Err(PkiError::Der(_))));
    }

    #[test]
    fn reads_a_generated_certificate() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "flotilla://device/abc".try_into().unwrap(),
        )];
        let cert = params.self_signed(&key).unwrap();
        let info = cert_info_pem(&cert.pem()).unwrap();
        assert!(info.not_after > info.not_before);
        assert_eq!(
            info.key_fingerprint,
            sha256_hex(&rcgen::PublicKeyData::subject_public_key_info(&key))
        );
        assert_eq!(
            identity_pem(&cert.pem()).unwrap(),
            Identity::new(crate::identity::Role::Device, "abc")
        );
    }
}

//! Checking a device's TPM evidence at enrollment: the endorsement key certificate chains to a
//! configured TPM manufacturer CA and is for the endorsement key presented; the attestation key
//! is a restricted signing key that cannot leave its TPM; it certified the device key; and the
//! device key is the one the CSR asks a certificate for, fixed to the TPM.

use super::TpmError;
use super::attest::{CertifyInfo, verify_signature};
use super::public::{CURVE_NIST_P256, PublicKey, TpmPublic, attr};
use crate::pki::sha256_hex;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey as X509PublicKey;

/// What the agent sends with its CSR (all TPM structures as the TPM marshals them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Evidence {
    /// The endorsement key's certificate, from the manufacturer (DER).
    pub ek_certificate_der: Vec<u8>,
    /// The endorsement key (`TPMT_PUBLIC`).
    pub ek_public: Vec<u8>,
    /// The attestation key (`TPMT_PUBLIC`).
    pub ak_public: Vec<u8>,
    /// The device key the CSR is for (`TPMT_PUBLIC`).
    pub key_public: Vec<u8>,
    /// The attestation key's certify of the device key (`TPMS_ATTEST`).
    pub certify_info: Vec<u8>,
    /// Its signature (`TPMT_SIGNATURE`).
    pub certify_signature: Vec<u8>,
}

/// Evidence that checked out, before the credential challenge proves the EK is present.
#[derive(Debug, Clone)]
pub struct CheckedEvidence {
    /// The endorsement key, parsed.
    pub ek: TpmPublic,
    /// SHA-256 (hex) of the endorsement key's SubjectPublicKeyInfo: the TPM's stable name.
    pub ek_fingerprint: String,
    /// The name the credential is bound to.
    pub ak_name: Vec<u8>,
}

pub use crate::signature::tpm_certify_qualifying_data as certify_qualifying_data;

fn refused(reason: impl Into<String>) -> TpmError {
    TpmError::Refused(reason.into())
}

/// Finds a trusted certificate that signed `cert`.
fn check_chain(cert: &X509Certificate<'_>, trusted: &[Vec<u8>]) -> Result<(), TpmError> {
    for anchor_der in trusted {
        let Ok((_, anchor)) = X509Certificate::from_der(anchor_der) else {
            continue;
        };
        if anchor.subject() == cert.issuer()
            && cert.verify_signature(Some(anchor.public_key())).is_ok()
        {
            return Ok(());
        }
    }
    Err(refused(
        "the EK certificate is not signed by a trusted TPM manufacturer CA",
    ))
}

/// Whether the EK certificate is for the endorsement key the agent presented.
fn same_key(cert: &X509Certificate<'_>, ek: &TpmPublic) -> bool {
    let trim = |b: &[u8]| -> Vec<u8> {
        let start = b.iter().position(|x| *x != 0).unwrap_or(b.len());
        b[start..].to_vec()
    };
    match (cert.public_key().parsed(), &ek.key) {
        (Ok(X509PublicKey::RSA(rsa)), PublicKey::Rsa { modulus, exponent }) => {
            trim(rsa.modulus) == trim(modulus)
                && trim(rsa.exponent) == trim(&exponent.to_be_bytes())
        }
        (Ok(X509PublicKey::EC(point)), PublicKey::Ecc { .. }) => ek
            .ecc_point()
            .is_some_and(|(_, p)| p.as_slice() == point.data()),
        _ => false,
    }
}

/// Checks everything that can be checked before the challenge.
///
/// `csr_key` is the uncompressed P-256 point the CSR asks a certificate for;
/// `qualifying_data` what the certify must carry; `trusted` the manufacturer CA certificates (DER).
pub fn check_evidence(
    evidence: &Evidence,
    trusted: &[Vec<u8>],
    csr_key: &[u8],
    qualifying_data: &[u8],
) -> Result<CheckedEvidence, TpmError> {
    let (rest, ek_cert) = X509Certificate::from_der(&evidence.ek_certificate_der)
        .map_err(|e| TpmError::Malformed(format!("EK certificate: {e}")))?;
    if !rest.is_empty() {
        return Err(TpmError::Malformed("EK certificate: trailing bytes".into()));
    }
    check_chain(&ek_cert, trusted)?;
    if !ek_cert.validity().is_valid() {
        return Err(refused("the EK certificate is outside its validity window"));
    }
    let ek = TpmPublic::parse(&evidence.ek_public)?;
    if !same_key(&ek_cert, &ek) {
        return Err(refused(
            "the endorsement key is not the one its certificate is for",
        ));
    }
    if !ek.has(attr::FIXED_TPM | attr::RESTRICTED | attr::DECRYPT) {
        return Err(refused(
            "the endorsement key is not a restricted decryption key fixed to its TPM",
        ));
    }
    let ak = TpmPublic::parse(&evidence.ak_public)?;
    let ak_required = attr::FIXED_TPM
        | attr::FIXED_PARENT
        | attr::SENSITIVE_DATA_ORIGIN
        | attr::RESTRICTED
        | attr::SIGN;
    if !ak.has(ak_required) || ak.has(attr::DECRYPT) {
        return Err(refused(
            "the attestation key is not a restricted signing key created in and fixed to its TPM",
        ));
    }
    verify_signature(&ak, &evidence.certify_info, &evidence.certify_signature)?;
    let certify = CertifyInfo::parse(&evidence.certify_info)?;
    if certify.extra_data != qualifying_data {
        return Err(refused(
            "the certify was made for a different request (qualifying data differs)",
        ));
    }
    let key = TpmPublic::parse(&evidence.key_public)?;
    if certify.name != key.name() {
        return Err(refused(
            "the certify is for a different key than the device key presented",
        ));
    }
    let key_required =
        attr::FIXED_TPM | attr::FIXED_PARENT | attr::SENSITIVE_DATA_ORIGIN | attr::SIGN;
    if !key.has(key_required) {
        return Err(refused(
            "the device key was not created in the TPM or can leave it",
        ));
    }
    match key.ecc_point() {
        Some((CURVE_NIST_P256, point)) if point == csr_key => {}
        _ => {
            return Err(refused(
                "the CSR is for a different key than the one the TPM certified",
            ));
        }
    }
    Ok(CheckedEvidence {
        ek_fingerprint: sha256_hex(ek_cert.public_key().raw),
        ak_name: ak.name(),
        ek,
    })
}

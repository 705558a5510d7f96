//! TPM 2.0 attestation, checked in software by the control plane: the wire structures a TPM
//! produces (`public`, `attest`), the enrollment evidence check (`evidence`) and the credential
//! challenge only the TPM holding an endorsement key can answer (`credential`). Pure: no I/O.

pub mod attest;
pub mod credential;
pub mod evidence;
pub mod public;
pub mod wire;

pub use credential::{WrappedCredential, make_credential};
pub use evidence::{CheckedEvidence, Evidence, certify_qualifying_data, check_evidence};
pub use public::TpmPublic;

/// Why TPM evidence was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    /// The structure cannot be parsed.
    #[error("malformed TPM data: {0}")]
    Malformed(String),
    /// A well-formed structure that uses an algorithm this control plane does not accept.
    #[error("unsupported TPM algorithm: {0}")]
    Unsupported(String),
    /// The evidence parses but does not prove what it must.
    #[error("{0}")]
    Refused(String),
    /// A fault of the checking code itself.
    #[error("{0}")]
    Internal(String),
}

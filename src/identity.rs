//! Who a caller is: the identity carried as a `flotilla://<kind>/<name>` URI SAN in every client
//! certificate this control plane issues, and the role that follows from it.

use std::fmt;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// The URI scheme of every identity SAN.
/// The scheme of identity URIs, `flotilla://<kind>/<name>`.
pub const SCHEME: &str = "flotilla://";

/// What a certificate holder is allowed to be. The order is not a hierarchy; see `authz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Everything, including credentials and revocation.
    Admin,
    /// Changes fleets, devices, enrollments and rollouts.
    Operator,
    /// Reads and watches.
    Viewer,
    /// Another program, holding the rights its credential was granted.
    Service,
    /// A device's management certificate: its session, and renewing itself.
    Device,
    /// The credential devices enroll (and recover) with.
    Enrollment,
}

impl Role {
    /// The `<kind>` part of the identity URI.
    pub fn kind(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
            Role::Service => "service",
            Role::Device => "device",
            Role::Enrollment => "enrollment",
        }
    }

    /// The role a `<kind>` names.
    pub fn from_kind(kind: &str) -> Option<Role> {
        Some(match kind {
            "admin" => Role::Admin,
            "operator" => Role::Operator,
            "viewer" => Role::Viewer,
            "service" => Role::Service,
            "device" => Role::Device,
            "enrollment" => Role::Enrollment,
            _ => return None,
        })
    }
}

/// A verified caller: role plus name (device id for devices).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// What the caller may be.
    pub role: Role,
    /// Who: the device id for devices, the credential name otherwise.
    pub name: String,
}

/// Why a certificate names no usable identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    /// Not DER.
    #[error("certificate is not valid DER: {0}")]
    BadCertificate(String),
    /// No identity URI.
    #[error("certificate carries no flotilla:// identity URI")]
    Missing,
    /// More than one identity URI.
    #[error("certificate carries more than one flotilla:// identity URI")]
    Ambiguous,
    /// Not `flotilla://<kind>/<name>`.
    #[error("identity URI {0:?} is malformed (expected flotilla://<kind>/<name>)")]
    Malformed(String),
    /// A kind no role has.
    #[error("identity URI {0:?} names an unknown kind")]
    UnknownKind(String),
}

impl Identity {
    /// The identity `role`/`name`.
    pub fn new(role: Role, name: impl Into<String>) -> Self {
        Identity {
            role,
            name: name.into(),
        }
    }

    /// The URI SAN for this identity.
    pub fn uri(&self) -> String {
        format!("{SCHEME}{}/{}", self.role.kind(), self.name)
    }

    /// Parses `flotilla://<kind>/<name>`.
    pub fn from_uri(uri: &str) -> Result<Identity, IdentityError> {
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdentityError::Malformed(uri.to_string()))?;
        let (kind, name) = rest
            .split_once('/')
            .ok_or_else(|| IdentityError::Malformed(uri.to_string()))?;
        if name.is_empty() || name.contains('/') {
            return Err(IdentityError::Malformed(uri.to_string()));
        }
        let role = Role::from_kind(kind).ok_or_else(|| IdentityError::UnknownKind(uri.into()))?;
        Ok(Identity::new(role, name))
    }

    /// Extracts the single identity URI SAN from a DER certificate. The certificate's chain must
    /// already have been verified by the caller.
    pub fn from_certificate_der(der: &[u8]) -> Result<Identity, IdentityError> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        let mut found = None;
        for name in san.iter().flat_map(|ext| ext.value.general_names.iter()) {
            if let GeneralName::URI(uri) = name
                && uri.starts_with(SCHEME)
            {
                if found.is_some() {
                    return Err(IdentityError::Ambiguous);
                }
                found = Some(Identity::from_uri(uri)?);
            }
        }
        found.ok_or(IdentityError::Missing)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.role.kind(), self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_role() {
        for role in [
            Role::Admin,
            Role::Operator,
            Role::Viewer,
            Role::Service,
            Role::Device,
            Role::Enrollment,
        ] {
            let id = Identity::new(role, "x-1");
            assert_eq!(Identity::from_uri(&id.uri()).unwrap(), id);
        }
    }

    #[test]
    fn rejects_malformed_uris() {
        for bad in [
            "https://device/x",
            "flotilla://device",
            "flotilla://device/",
            "flotilla://device/a/b",
        ] {
            assert!(matches!(
                Identity::from_uri(bad),
                Err(IdentityError::Malformed(_))
            ));
        }
        assert!(matches!(
            Identity::from_uri("flotilla://root/x"),
            Err(IdentityError::UnknownKind(_))
        ));
    }
}

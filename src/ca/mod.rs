//! The control plane's certificate authority: it creates or loads the CA key pair and signs every
//! certificate the system uses (server, admin and enrollment credentials, device certificates). The
//! CA decides everything a certificate says; nothing is copied from a request.

pub mod audit_key;
pub mod csr;

use crate::clock::Clock;
use crate::identity::Identity;
use crate::pki::{CertInfo, cert_info};
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use std::net::IpAddr;
use std::time::Duration;
use time::OffsetDateTime;

/// Certificates start this long in the past so a device whose clock is a little behind accepts them.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// Why the CA could not load or sign.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The CA certificate or key cannot be used.
    #[error("CA certificate or key is unusable: {0}")]
    Load(String),
    /// rcgen refused to sign.
    #[error("signing failed: {0}")]
    Sign(#[from] rcgen::Error),
    /// A name that cannot go into a certificate.
    #[error("invalid subject name {0:?}")]
    Name(String),
    /// The signed certificate does not parse back.
    #[error("issued certificate cannot be read back: {0}")]
    Readback(String),
}

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// A TLS client: devices, operators, services, the enrollment credential.
    Client,
    /// The control plane's TLS server certificate.
    Server,
}

/// Everything the CA puts into one certificate.
#[derive(Debug, Clone)]
pub struct Subject {
    /// The subject's common name.
    pub common_name: String,
    /// The `flotilla://` identity (client certificates).
    pub identity: Option<Identity>,
    /// DNS names (server certificates).
    pub dns_names: Vec<String>,
    /// IP addresses (server certificates).
    pub ip_addresses: Vec<IpAddr>,
    /// Client or server.
    pub usage: Usage,
    /// How long from now it is valid.
    pub validity: Duration,
}

/// A freshly signed certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate in PEM.
    pub pem: String,
    /// What it says: serial, validity, key fingerprint.
    pub info: CertInfo,
}

/// The signer. Cheap to share behind an `Arc`; signing takes `&self`.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    /// Validity windows start from its time.
    clock: Clock,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .finish_non_exhaustive()
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    // A positive INTEGER whose encoding never needs a leading zero.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

fn window(clock: &Clock, validity: Duration) -> (OffsetDateTime, OffsetDateTime) {
    let now =
        OffsetDateTime::from_unix_timestamp(clock.now_secs()).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    (now - BACKDATE, now + validity)
}

impl CertificateAuthority {
    /// Creates a new self-signed CA (ECDSA P-256). Returns the CA and its private key in PEM.
    pub fn generate(common_name: &str, validity: Duration) -> Result<(Self, String), CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "Flotilla");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        (params.not_before, params.not_after) = window(&Clock::system(), validity);
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        let cert_pem = cert.pem();
        Ok((
            CertificateAuthority {
                issuer: Issuer::new(params, key),
                cert_pem,
                clock: Clock::system(),
            },
            key_pem,
        ))
    }

    /// Loads an existing CA from its certificate and key.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::Load(e.to_string()))?;
        let issuer =
            Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| CaError::Load(e.to_string()))?;
        Ok(CertificateAuthority {
            issuer,
            cert_pem: cert_pem.to_string(),
            clock: Clock::system(),
        })
    }

    /// The same CA, dating the certificates it signs by `clock`.
    pub fn with_clock(self, clock: Clock) -> Self {
        CertificateAuthority { clock, ..self }
    }

    /// The CA certificate in PEM: the trust bundle for servers and clients alike.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Signs a certificate for `public_key`, saying exactly what `subject` says.
    pub fn sign(
        &self,
        subject: &Subject,
        public_key: &impl PublicKeyData,
    ) -> Result<Issued, CaError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, subject.common_name.as_str());
        params.distinguished_name = dn;
        let mut sans = Vec::new();
        if let Some(identity) = &subject.identity {
            let uri = identity.uri();
            sans.push(SanType::URI(
                uri.clone().try_into().map_err(|_| CaError::Name(uri))?,
            ));
        }
        for name in &subject.dns_names {
            sans.push(SanType::DnsName(
                name.clone()
                    .try_into()
                    .map_err(|_| CaError::Name(name.clone()))?,
            ));
        }
        sans.extend(
            subject
                .ip_addresses
                .iter()
                .map(|ip| SanType::IpAddress(*ip)),
        );
        params.subject_alt_names = sans;
        // No BasicConstraints at all: DER forbids encoding its default (`cA FALSE`), and strict
        // parsers refuse certificates that do.
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match subject.usage {
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
        }];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        (params.not_before, params.not_after) = window(&self.clock, subject.validity);
        let cert = params.signed_by(public_key, &self.issuer)?;
        let info = cert_info(cert.der()).map_err(|e| CaError::Readback(e.to_string()))?;
        Ok(Issued {
            pem: cert.pem(),
            info,
        })
    }

    /// Creates a key pair and signs a certificate for it: for credentials the control plane hands
    /// out itself (server, admin, enrollment). Returns the certificate and the private key in PEM.
    pub fn issue_with_new_key(&self, subject: &Subject) -> Result<(Issued, String), CaError> {
        let key = KeyPair::generate()?;
        let issued = self.sign(subject, &key)?;
        Ok((issued, key.serialize_pem()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Role;
    use x509_parser::prelude::{FromDer, X509Certificate};

    fn client(identity: Identity) -> Subject {
        Subject {
            common_name: identity.name.clone(),
            identity: Some(identity),
            dns_names: vec![],
            ip_addresses: vec![],
            usage: Usage::Client,
            validity: Duration::from_secs(3600),
        }
    }

    #[test]
    fn signed_certificates_chain_to_the_ca_and_carry_the_identity() {
        let (ca, key_pem) =
            CertificateAuthority::generate("test CA", Duration::from_secs(86400)).unwrap();
        let reloaded = CertificateAuthority::load(ca.cert_pem(), &key_pem).unwrap();
        let id = Identity::new(Role::Device, "d-1");
        let (issued, _key) = reloaded.issue_with_new_key(&client(id.clone())).unwrap();
        assert_eq!(crate::pki::identity_pem(&issued.pem).unwrap(), id);
        assert!(issued.info.not_after - issued.info.not_before >= 3600);

        let ca_der = crate::pki::certs_from_pem(ca.cert_pem()).unwrap().remove(0);
        let (_, ca_cert) = X509Certificate::from_der(&ca_der).unwrap();
        let der = crate::pki::certs_from_pem(&issued.pem).unwrap().remove(0);
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
        assert!(!cert.is_ca());
    }

    #[test]
    fn serials_are_unique() {
        let (ca, _) = CertificateAuthority::generate("t", Duration::from_secs(60)).unwrap();
        let subject = client(Identity::new(Role::Admin, "a"));
        let a = ca.issue_with_new_key(&subject).unwrap().0.info.serial;
        let b = ca.issue_with_new_key(&subject).unwrap().0.info.serial;
        assert_ne!(a, b);
    }
}

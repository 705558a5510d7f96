//! Device keys, wherever they live: a PEM file in the state directory, or a key inside the TPM of
//! which the state directory holds only the TPM's wrapped blob (useless without that TPM). The
//! rest of the agent asks a `KeySource` for fresh keys and signs through `DeviceKey`.

use anyhow::{Context, Result, bail};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData, SignatureAlgorithm, SigningKey};
use serde::{Deserialize, Serialize};

/// SubjectPublicKeyInfo prefix of an uncompressed ECDSA P-256 point.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// A TPM key as kept on disk: its public area and the private area wrapped by the TPM's storage
/// key (the TPM's own `TPM2B_PRIVATE`, encrypted and integrity-protected by the TPM).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TpmKeyBlob {
    format: String,
    public: String,
    wrapped_private: String,
    /// Uncompressed P-256 point, so a certificate can be matched without the TPM.
    point: String,
}

const TPM_BLOB_FORMAT: &str = "flotilla-tpm-key/v1";

impl TpmKeyBlob {
    pub fn new(public: &[u8], wrapped_private: &[u8], point: &[u8]) -> TpmKeyBlob {
        TpmKeyBlob {
            format: TPM_BLOB_FORMAT.into(),
            public: hex::encode(public),
            wrapped_private: hex::encode(wrapped_private),
            point: hex::encode(point),
        }
    }
    pub fn public(&self) -> Result<Vec<u8>> {
        hex::decode(&self.public).context("TPM key blob: public area")
    }
    pub fn private(&self) -> Result<Vec<u8>> {
        hex::decode(&self.wrapped_private).context("TPM key blob: private area")
    }
    fn point(&self) -> Result<Vec<u8>> {
        hex::decode(&self.point).context("TPM key blob: point")
    }
}

/// A device key as stored in the state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredKey {
    Pem(String),
    Tpm(TpmKeyBlob),
}

impl StoredKey {
    pub const PEM_FILE: &'static str = "device.key";
    pub const TPM_FILE: &'static str = "device.tpmkey";

    pub fn file_name(&self) -> &'static str {
        match self {
            StoredKey::Pem(_) => Self::PEM_FILE,
            StoredKey::Tpm(_) => Self::TPM_FILE,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            StoredKey::Pem(pem) => pem.as_bytes().to_vec(),
            StoredKey::Tpm(blob) => serde_json::to_vec_pretty(blob).unwrap_or_default(),
        }
    }

    /// Parses the content of a key file named `file_name`.
    pub fn parse(file_name: &str, text: &str) -> Result<StoredKey> {
        if file_name == Self::TPM_FILE {
            let blob: TpmKeyBlob = serde_json::from_str(text).context("TPM key blob")?;
            if blob.format != TPM_BLOB_FORMAT {
                bail!("unknown TPM key blob format {:?}", blob.format);
            }
            Ok(StoredKey::Tpm(blob))
        } else {
            Ok(StoredKey::Pem(text.to_string()))
        }
    }

    /// The DER SubjectPublicKeyInfo, the key's name in certificates.
    pub fn spki(&self) -> Result<Vec<u8>> {
        match self {
            StoredKey::Pem(pem) => Ok(KeyPair::from_pem(pem)
                .context("device key")?
                .subject_public_key_info()),
            StoredKey::Tpm(blob) => {
                let mut spki = P256_SPKI_PREFIX.to_vec();
                spki.extend(blob.point()?);
                Ok(spki)
            }
        }
    }
}

/// Where new device keys come from.
#[derive(Clone)]
pub enum KeySource {
    File,
    #[cfg(feature = "tpm")]
    Tpm(std::sync::Arc<crate::tpm::Tpm>),
}

impl KeySource {
    /// Opens what the configuration asks for.
    pub fn from_config(config: &flotilla::profiles::TpmConfig) -> Result<KeySource> {
        if !config.enabled {
            return Ok(KeySource::File);
        }
        #[cfg(feature = "tpm")]
        {
            let tcti = config.tcti();
            let tpm = crate::tpm::Tpm::open(&tcti)?;
            tracing::info!(%tcti, "device keys live in the TPM");
            Ok(KeySource::Tpm(std::sync::Arc::new(tpm)))
        }
        #[cfg(not(feature = "tpm"))]
        bail!(
            "tpm.enabled is set but this agent was built without TPM support (cargo feature `tpm`)"
        )
    }

    pub fn is_tpm(&self) -> bool {
        !matches!(self, KeySource::File)
    }

    /// A fresh key: generated in memory for files, inside the TPM otherwise.
    pub fn generate(&self) -> Result<StoredKey> {
        match self {
            KeySource::File => Ok(StoredKey::Pem(
                KeyPair::generate()
                    .context("generating a key")?
                    .serialize_pem(),
            )),
            #[cfg(feature = "tpm")]
            KeySource::Tpm(tpm) => Ok(StoredKey::Tpm(tpm.create_key()?)),
        }
    }

    /// A signer for a stored key.
    pub fn open(&self, key: &StoredKey) -> Result<DeviceKey> {
        match (self, key) {
            (_, StoredKey::Pem(pem)) => Ok(DeviceKey::File(Box::new(
                KeyPair::from_pem(pem).context("reading the device key")?,
            ))),
            #[cfg(feature = "tpm")]
            (KeySource::Tpm(tpm), StoredKey::Tpm(blob)) => Ok(DeviceKey::Tpm(TpmSigner {
                tpm: tpm.clone(),
                blob: blob.clone(),
                point: blob.point()?,
            })),
            #[allow(unreachable_patterns)]
            (_, StoredKey::Tpm(_)) => {
                bail!("the device key is in a TPM, but TPM support is not enabled (tpm.enabled)")
            }
        }
    }
}

/// A key held by the TPM, signing through it.
#[derive(Clone)]
pub struct TpmSigner {
    #[cfg(feature = "tpm")]
    tpm: std::sync::Arc<crate::tpm::Tpm>,
    #[cfg(feature = "tpm")]
    blob: TpmKeyBlob,
    point: Vec<u8>,
}

impl TpmSigner {
    /// DER ECDSA P-256/SHA-256 signature of `message`, made by the TPM.
    pub fn sign_message(&self, message: &[u8]) -> Result<Vec<u8>> {
        #[cfg(feature = "tpm")]
        {
            let digest = <sha2::Sha256 as sha2::Digest>::digest(message);
            self.tpm.sign(&self.blob, &digest)
        }
        #[cfg(not(feature = "tpm"))]
        {
            let _ = message;
            bail!("TPM support is not built in")
        }
    }
}

/// A device key ready to sign CSRs, recovery proofs and TLS handshakes.
pub enum DeviceKey {
    File(Box<KeyPair>),
    Tpm(TpmSigner),
}

impl PublicKeyData for DeviceKey {
    fn der_bytes(&self) -> &[u8] {
        match self {
            DeviceKey::File(key) => key.der_bytes(),
            DeviceKey::Tpm(signer) => &signer.point,
        }
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        match self {
            DeviceKey::File(key) => key.algorithm(),
            DeviceKey::Tpm(_) => &PKCS_ECDSA_P256_SHA256,
        }
    }
}

impl SigningKey for DeviceKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        match self {
            DeviceKey::File(key) => key.sign(msg),
            DeviceKey::Tpm(signer) => signer.sign_message(msg).map_err(|error| {
                tracing::error!(error = %format!("{error:#}"), "TPM signing failed");
                rcgen::Error::RemoteKeyError
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_keys_round_trip_and_name_the_same_public_key() {
        let key = KeyPair::generate().unwrap();
        let pem = StoredKey::Pem(key.serialize_pem());
        assert_eq!(pem.spki().unwrap(), key.subject_public_key_info());
        let blob = StoredKey::Tpm(TpmKeyBlob::new(b"pub", b"priv", key.der_bytes()));
        assert_eq!(
            blob.spki().unwrap(),
            key.subject_public_key_info(),
            "the SPKI built from a TPM point matches rcgen's"
        );
        let text = String::from_utf8(blob.to_bytes()).unwrap();
        assert_eq!(StoredKey::parse(StoredKey::TPM_FILE, &text).unwrap(), blob);
        assert!(StoredKey::parse(StoredKey::TPM_FILE, "{").is_err());
        assert!(!text.contains("PRIVATE KEY"));
    }

    #[cfg(not(feature = "tpm"))]
    #[test]
    fn a_tpm_config_without_tpm_support_is_a_clear_error() {
        let config = flotilla::profiles::TpmConfig {
            enabled: true,
            tcti: None,
        };
        let error = KeySource::from_config(&config).err().unwrap();
        assert!(format!("{error}").contains("built without TPM support"));
    }
}

//! `TPMT_PUBLIC`: the public area of a TPM object (key type, attributes, policy, parameters and
//! public key), and its TPM name — the hash that certify and credential activation bind to.

use super::TpmError;
use super::wire::Reader;

/// `TPM_ALG_RSA`.
pub const ALG_RSA: u16 = 0x0001;
/// `TPM_ALG_AES`.
pub const ALG_AES: u16 = 0x0006;
/// `TPM_ALG_SHA1`.
pub const ALG_SHA1: u16 = 0x0004;
/// `TPM_ALG_SHA256`.
pub const ALG_SHA256: u16 = 0x000B;
/// `TPM_ALG_SHA384`.
pub const ALG_SHA384: u16 = 0x000C;
/// `TPM_ALG_SHA512`.
pub const ALG_SHA512: u16 = 0x000D;
/// `TPM_ALG_NULL`.
pub const ALG_NULL: u16 = 0x0010;
/// `TPM_ALG_ECDSA`.
pub const ALG_ECDSA: u16 = 0x0018;
/// `TPM_ALG_ECDAA`.
pub const ALG_ECDAA: u16 = 0x001A;
/// `TPM_ALG_ECC`.
pub const ALG_ECC: u16 = 0x0023;
/// `TPM_ALG_CFB`.
pub const ALG_CFB: u16 = 0x0043;
/// `TPM_ECC_NIST_P256`.
pub const CURVE_NIST_P256: u16 = 0x0003;
/// `TPM_ECC_NIST_P384`.
pub const CURVE_NIST_P384: u16 = 0x0004;

/// `TPMA_OBJECT` bits that matter for attestation.
pub mod attr {
    /// The object cannot leave this TPM.
    pub const FIXED_TPM: u32 = 1 << 1;
    /// The object cannot move to another parent.
    pub const FIXED_PARENT: u32 = 1 << 4;
    /// The TPM generated the sensitive part (nobody knew the key).
    pub const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
    /// The key only signs or decrypts TPM-made structures.
    pub const RESTRICTED: u32 = 1 << 16;
    /// The key decrypts.
    pub const DECRYPT: u32 = 1 << 17;
    /// The key signs.
    pub const SIGN: u32 = 1 << 18;
}

/// A hash algorithm the TPM names objects with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlg {
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl HashAlg {
    /// The algorithm a `TPM_ALG_ID` names, if accepted.
    pub fn from_id(id: u16) -> Result<HashAlg, TpmError> {
        match id {
            ALG_SHA256 => Ok(HashAlg::Sha256),
            ALG_SHA384 => Ok(HashAlg::Sha384),
            ALG_SHA512 => Ok(HashAlg::Sha512),
            other => Err(TpmError::Unsupported(format!(
                "hash algorithm 0x{other:04x}"
            ))),
        }
    }

    /// Its `TPM_ALG_ID`.
    pub fn id(self) -> u16 {
        match self {
            HashAlg::Sha256 => ALG_SHA256,
            HashAlg::Sha384 => ALG_SHA384,
            HashAlg::Sha512 => ALG_SHA512,
        }
    }

    /// The ring digest algorithm.
    pub fn digest_algorithm(self) -> &'static ring::digest::Algorithm {
        match self {
            HashAlg::Sha256 => &ring::digest::SHA256,
            HashAlg::Sha384 => &ring::digest::SHA384,
            HashAlg::Sha512 => &ring::digest::SHA512,
        }
    }

    /// The ring HMAC algorithm.
    pub fn hmac_algorithm(self) -> ring::hmac::Algorithm {
        match self {
            HashAlg::Sha256 => ring::hmac::HMAC_SHA256,
            HashAlg::Sha384 => ring::hmac::HMAC_SHA384,
            HashAlg::Sha512 => ring::hmac::HMAC_SHA512,
        }
    }

    /// The digest of `bytes`.
    pub fn digest(self, bytes: &[u8]) -> Vec<u8> {
        ring::digest::digest(self.digest_algorithm(), bytes)
            .as_ref()
            .to_vec()
    }

    /// Digest size in bytes.
    pub fn size(self) -> usize {
        self.digest_algorithm().output_len()
    }
}

/// The public key of an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// An RSA key.
    Rsa {
        /// The modulus, big-endian.
        modulus: Vec<u8>,
        /// The public exponent (65537 where the structure says 0, its default).
        exponent: u32,
    },
    /// An ECC key.
    Ecc {
        /// `TPM_ECC_CURVE`.
        curve: u16,
        /// The point's x coordinate, big-endian.
        x: Vec<u8>,
        /// The point's y coordinate, big-endian.
        y: Vec<u8>,
    },
}

/// A parsed `TPMT_PUBLIC`, keeping the exact bytes its name is computed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmPublic {
    /// The hash its name is computed with.
    pub name_alg: HashAlg,
    /// `TPMA_OBJECT` bits (see `attr`).
    pub attributes: u32,
    /// The policy that authorizes its use (empty: none).
    pub auth_policy: Vec<u8>,
    /// The symmetric algorithm of a storage key (`(algorithm, key bits, mode)`), if any.
    pub symmetric: Option<(u16, u16, u16)>,
    /// The signing scheme a signing key is fixed to (`(scheme, hash)`), if any.
    pub scheme: Option<(u16, u16)>,
    /// The public key.
    pub key: PublicKey,
    marshaled: Vec<u8>,
}

fn symmetric(r: &mut Reader<'_>) -> Result<Option<(u16, u16, u16)>, TpmError> {
    let algorithm = r.u16()?;
    if algorithm == ALG_NULL {
        return Ok(None);
    }
    Ok(Some((algorithm, r.u16()?, r.u16()?)))
}

fn scheme(r: &mut Reader<'_>) -> Result<Option<(u16, u16)>, TpmError> {
    let scheme = r.u16()?;
    if scheme == ALG_NULL {
        return Ok(None);
    }
    let hash = r.u16()?;
    if scheme == ALG_ECDAA {
        r.u16()?; // count
    }
    Ok(Some((scheme, hash)))
}

impl TpmPublic {
    /// Parses a marshaled `TPMT_PUBLIC` (also accepting a `TPM2B_PUBLIC` around it).
    pub fn parse(bytes: &[u8]) -> Result<TpmPublic, TpmError> {
        let inner = Self::strip_size(bytes);
        let mut r = Reader::new(inner, "TPMT_PUBLIC");
        let kind = r.u16()?;
        let name_alg = HashAlg::from_id(r.u16()?)?;
        let attributes = r.u32()?;
        let auth_policy = r.sized()?.to_vec();
        let (symmetric, scheme, key) = match kind {
            ALG_RSA => {
                let symmetric = symmetric(&mut r)?;
                let scheme = scheme(&mut r)?;
                let _bits = r.u16()?;
                let exponent = match r.u32()? {
                    0 => 65537,
                    e => e,
                };
                let modulus = r.sized()?.to_vec();
                (symmetric, scheme, PublicKey::Rsa { modulus, exponent })
            }
            ALG_ECC => {
                let symmetric = symmetric(&mut r)?;
                let scheme = scheme(&mut r)?;
                let curve = r.u16()?;
                scheme_is_null_kdf(&mut r)?;
                let x = r.sized()?.to_vec();
                let y = r.sized()?.to_vec();
                (symmetric, scheme, PublicKey::Ecc { curve, x, y })
            }
            other => {
                return Err(TpmError::Unsupported(format!("key type 0x{other:04x}")));
            }
        };
        r.finish()?;
        Ok(TpmPublic {
            name_alg,
            attributes,
            auth_policy,
            symmetric,
            scheme,
            key,
            marshaled: inner.to_vec(),
        })
    }

    /// A `TPM2B_PUBLIC` starts with its own length; a `TPMT_PUBLIC` starts with a key type.
    fn strip_size(bytes: &[u8]) -> &[u8] {
        if bytes.len() >= 2 && u16::from_be_bytes([bytes[0], bytes[1]]) as usize == bytes.len() - 2
        {
            &bytes[2..]
        } else {
            bytes
        }
    }

    /// The object's name: its name algorithm followed by the hash of the public area.
    pub fn name(&self) -> Vec<u8> {
        let mut name = self.name_alg.id().to_be_bytes().to_vec();
        name.extend(self.name_alg.digest(&self.marshaled));
        name
    }

    /// Whether every bit of `bits` is set in the attributes.
    pub fn has(&self, bits: u32) -> bool {
        self.attributes & bits == bits
    }

    /// The uncompressed SEC1 point of an ECC key, coordinates padded to the curve's size.
    pub fn ecc_point(&self) -> Option<(u16, Vec<u8>)> {
        let PublicKey::Ecc { curve, x, y } = &self.key else {
            return None;
        };
        let size = match *curve {
            CURVE_NIST_P256 => 32,
            CURVE_NIST_P384 => 48,
            _ => return None,
        };
        if x.len() > size || y.len() > size {
            return None;
        }
        let mut point = vec![0x04];
        point.extend(std::iter::repeat_n(0, size - x.len()));
        point.extend(x);
        point.extend(std::iter::repeat_n(0, size - y.len()));
        point.extend(y);
        Some((*curve, point))
    }
}

/// The KDF of an ECC key: only parsed past (`TPMT_KDF_SCHEME`).
fn scheme_is_null_kdf(r: &mut Reader<'_>) -> Result<(), TpmError> {
    if r.u16()? != ALG_NULL {
        r.u16()?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::tpm::wire::put_sized;

    /// A marshaled ECC P-256 signing key's TPMT_PUBLIC with the given point and attributes.
    pub(crate) fn ecc_public(attributes: u32, x: &[u8], y: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(ALG_ECC.to_be_bytes());
        out.extend(ALG_SHA256.to_be_bytes());
        out.extend(attributes.to_be_bytes());
        put_sized(&mut out, &[]).unwrap();
        out.extend(ALG_NULL.to_be_bytes()); // symmetric
        out.extend(ALG_ECDSA.to_be_bytes()); // scheme
        out.extend(ALG_SHA256.to_be_bytes());
        out.extend(CURVE_NIST_P256.to_be_bytes());
        out.extend(ALG_NULL.to_be_bytes()); // kdf
        put_sized(&mut out, x).unwrap();
        put_sized(&mut out, y).unwrap();
        out
    }

    #[test]
    fn parses_an_ecc_key_names_it_and_pads_its_point() {
        let bytes = ecc_public(attr::SIGN | attr::FIXED_TPM, &[1; 31], &[2; 32]);
        let public = TpmPublic::parse(&bytes).unwrap();
        assert!(public.has(attr::SIGN | attr::FIXED_TPM));
        assert!(!public.has(attr::RESTRICTED));
        assert_eq!(public.scheme, Some((ALG_ECDSA, ALG_SHA256)));
        let (curve, point) = public.ecc_point().unwrap();
        assert_eq!(curve, CURVE_NIST_P256);
        assert_eq!(point.len(), 65);
        assert_eq!(&point[..2], &[0x04, 0x00], "x padded to 32 bytes");
        let mut name = ALG_SHA256.to_be_bytes().to_vec();
        name.extend(HashAlg::Sha256.digest(&bytes));
        assert_eq!(public.name(), name);

        let mut sized = Vec::new();
        put_sized(&mut sized, &bytes).unwrap();
        assert_eq!(
            TpmPublic::parse(&sized).unwrap(),
            public,
            "TPM2B_PUBLIC too"
        );
    }

    #[test]
    fn truncated_trailing_and_unknown_structures_are_errors() {
        let bytes = ecc_public(0, &[1; 32], &[2; 32]);
        assert!(matches!(
            TpmPublic::parse(&bytes[..bytes.len() - 3]),
            Err(TpmError::Malformed(_))
        ));
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(
            TpmPublic::parse(&long),
            Err(TpmError::Malformed(_))
        ));
        let mut keyed_hash = bytes;
        keyed_hash[..2].copy_from_slice(&0x0008u16.to_be_bytes());
        assert!(matches!(
            TpmPublic::parse(&keyed_hash),
            Err(TpmError::Unsupported(_))
        ));
    }
}

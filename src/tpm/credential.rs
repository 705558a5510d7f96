//! TPM2_MakeCredential in software (TPM 2.0 Part 1 §24): wraps a secret so that only the TPM
//! holding the endorsement key can unwrap it, and only for the object with the given name. The
//! control plane needs no TPM for this; the device proves possession by TPM2_ActivateCredential.

use super::TpmError;
use super::public::{ALG_AES, ALG_CFB, CURVE_NIST_P256, CURVE_NIST_P384, PublicKey, TpmPublic};
use super::wire::put_sized;
use aes::cipher::{AsyncStreamCipher, KeyIvInit};

/// What the device receives: `TPM2B_ID_OBJECT` and `TPM2B_ENCRYPTED_SECRET` contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedCredential {
    /// The encrypted credential (`TPM2B_ID_OBJECT`).
    pub credential_blob: Vec<u8>,
    /// The seed, encrypted to the endorsement key (`TPM2B_ENCRYPTED_SECRET`).
    pub encrypted_secret: Vec<u8>,
}

/// KDFa (SP 800-108 counter mode with HMAC) as the TPM specifies it.
pub fn kdf_a(
    hash: super::public::HashAlg,
    key: &[u8],
    label: &str,
    context_u: &[u8],
    context_v: &[u8],
    bits: usize,
) -> Vec<u8> {
    let key = ring::hmac::Key::new(hash.hmac_algorithm(), key);
    let mut out = Vec::new();
    let mut counter: u32 = 1;
    while out.len() * 8 < bits {
        let mut ctx = ring::hmac::Context::with_key(&key);
        ctx.update(&counter.to_be_bytes());
        ctx.update(label.as_bytes());
        ctx.update(&[0]);
        ctx.update(context_u);
        ctx.update(context_v);
        ctx.update(&(bits as u32).to_be_bytes());
        out.extend_from_slice(ctx.sign().as_ref());
        counter += 1;
    }
    out.truncate(bits.div_ceil(8));
    out
}

/// KDFe (SP 800-56A concatenation KDF) as the TPM specifies it for ECDH seeds.
fn kdf_e(
    hash: super::public::HashAlg,
    z: &[u8],
    label: &str,
    party_u: &[u8],
    party_v: &[u8],
    bits: usize,
) -> Vec<u8> {
    let mut out = Vec::new();
    let mut counter: u32 = 1;
    while out.len() * 8 < bits {
        let mut ctx = ring::digest::Context::new(hash.digest_algorithm());
        ctx.update(&counter.to_be_bytes());
        ctx.update(z);
        ctx.update(label.as_bytes());
        ctx.update(&[0]);
        ctx.update(party_u);
        ctx.update(party_v);
        out.extend_from_slice(ctx.finish().as_ref());
        counter += 1;
    }
    out.truncate(bits.div_ceil(8));
    out
}

/// A fresh seed and how it travels encrypted to the endorsement key.
fn seed_for(ek: &TpmPublic) -> Result<(Vec<u8>, Vec<u8>), TpmError> {
    let hash = ek.name_alg;
    match &ek.key {
        PublicKey::Rsa { modulus, exponent } => {
            let mut seed = vec![0u8; hash.size()];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
                .map_err(|_| TpmError::Internal("no randomness".into()))?;
            let key = rsa::RsaPublicKey::new(
                rsa::BigUint::from_bytes_be(modulus),
                rsa::BigUint::from(*exponent),
            )
            .map_err(|e| TpmError::Malformed(format!("endorsement key: {e}")))?;
            let mut rng = rsa::rand_core::OsRng;
            let encrypted = match hash {
                super::public::HashAlg::Sha256 => key.encrypt(
                    &mut rng,
                    rsa::Oaep::new_with_label::<sha2::Sha256, _>("IDENTITY\0"),
                    &seed,
                ),
                super::public::HashAlg::Sha384 => key.encrypt(
                    &mut rng,
                    rsa::Oaep::new_with_label::<sha2::Sha384, _>("IDENTITY\0"),
                    &seed,
                ),
                super::public::HashAlg::Sha512 => key.encrypt(
                    &mut rng,
                    rsa::Oaep::new_with_label::<sha2::Sha512, _>("IDENTITY\0"),
                    &seed,
                ),
            }
            .map_err(|e| TpmError::Internal(format!("encrypting the seed: {e}")))?;
            Ok((seed, encrypted))
        }
        PublicKey::Ecc { curve, .. } => {
            let algorithm = match *curve {
                CURVE_NIST_P256 => &ring::agreement::ECDH_P256,
                CURVE_NIST_P384 => &ring::agreement::ECDH_P384,
                other => {
                    return Err(TpmError::Unsupported(format!(
                        "endorsement key curve 0x{other:04x}"
                    )));
                }
            };
            let (_, ek_point) = ek
                .ecc_point()
                .ok_or_else(|| TpmError::Malformed("endorsement key point".into()))?;
            let rng = ring::rand::SystemRandom::new();
            let ephemeral = ring::agreement::EphemeralPrivateKey::generate(algorithm, &rng)
                .map_err(|_| TpmError::Internal("ephemeral key".into()))?;
            let public = ephemeral
                .compute_public_key()
                .map_err(|_| TpmError::Internal("ephemeral key".into()))?;
            let size = (public.as_ref().len() - 1) / 2;
            let (eph_x, eph_y) = public.as_ref()[1..].split_at(size);
            let ek_x = &ek_point[1..1 + size];
            let peer = ring::agreement::UnparsedPublicKey::new(algorithm, &ek_point);
            let seed = ring::agreement::agree_ephemeral(ephemeral, &peer, |z| {
                kdf_e(hash, z, "IDENTITY", eph_x, ek_x, hash.size() * 8)
            })
            .map_err(|_| TpmError::Malformed("endorsement key is not on its curve".into()))?;
            let mut encrypted = Vec::new();
            put_sized(&mut encrypted, eph_x)?;
            put_sized(&mut encrypted, eph_y)?;
            Ok((seed, encrypted))
        }
    }
}

/// Wraps `secret` for the object named `object_name` in the TPM that holds `ek`.
pub fn make_credential(
    ek: &TpmPublic,
    object_name: &[u8],
    secret: &[u8],
) -> Result<WrappedCredential, TpmError> {
    let hash = ek.name_alg;
    if secret.len() > hash.size() {
        return Err(TpmError::Internal("credential longer than a digest".into()));
    }
    let key_bits = match ek.symmetric {
        Some((ALG_AES, bits @ (128 | 256), ALG_CFB)) => bits as usize,
        other => {
            return Err(TpmError::Unsupported(format!(
                "endorsement key symmetric algorithm {other:?}: use AES-CFB"
            )));
        }
    };
    let (seed, encrypted_secret) = seed_for(ek)?;
    let sym_key = kdf_a(hash, &seed, "STORAGE", object_name, &[], key_bits);
    let mut enc_identity = Vec::new();
    put_sized(&mut enc_identity, secret)?;
    let iv = [0u8; 16];
    match key_bits {
        128 => cfb_mode::Encryptor::<aes::Aes128>::new_from_slices(&sym_key, &iv)
            .map_err(|e| TpmError::Internal(e.to_string()))?
            .encrypt(&mut enc_identity),
        _ => cfb_mode::Encryptor::<aes::Aes256>::new_from_slices(&sym_key, &iv)
            .map_err(|e| TpmError::Internal(e.to_string()))?
            .encrypt(&mut enc_identity),
    }
    let hmac_key = kdf_a(hash, &seed, "INTEGRITY", &[], &[], hash.size() * 8);
    let mut mac =
        ring::hmac::Context::with_key(&ring::hmac::Key::new(hash.hmac_algorithm(), &hmac_key));
    mac.update(&enc_identity);
    mac.update(object_name);
    let mut credential_blob = Vec::new();
    put_sized(&mut credential_blob, mac.sign().as_ref())?;
    credential_blob.extend(enc_identity);
    Ok(WrappedCredential {
        credential_blob,
        encrypted_secret,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tpm::public::HashAlg;
    use crate::tpm::public::tests::ecc_public;

    #[test]
    fn kdf_a_is_deterministic_sized_and_separates_labels() {
        let a = kdf_a(HashAlg::Sha256, b"seed", "STORAGE", b"name", &[], 128);
        assert_eq!(a.len(), 16);
        assert_eq!(
            a,
            kdf_a(HashAlg::Sha256, b"seed", "STORAGE", b"name", &[], 128)
        );
        assert_ne!(
            a,
            kdf_a(HashAlg::Sha256, b"seed", "INTEGRITY", b"name", &[], 128)
        );
        let long = kdf_a(HashAlg::Sha256, b"seed", "STORAGE", b"name", &[], 384);
        assert_eq!(long.len(), 48, "more than one HMAC block");
    }

    #[test]
    fn a_key_without_an_aes_cfb_storage_algorithm_gets_no_credential() {
        let signing_key = TpmPublic::parse(&ecc_public(0, &[1; 32], &[2; 32])).unwrap();
        let error = make_credential(&signing_key, b"name", &[0; 32]).unwrap_err();
        assert!(matches!(error, TpmError::Unsupported(_)), "{error}");
    }
}

//! The device's TPM 2.0, through tss-esapi (agent feature `tpm`): the device key is created inside
//! the TPM under the owner hierarchy's storage key and never leaves it (the state directory holds
//! only the TPM's wrapped blob); CSRs and TLS handshakes are signed by the TPM; at enrollment the
//! endorsement key, a fresh attestation key and a TPM2_Certify of the device key prove where the
//! key lives, and TPM2_ActivateCredential answers the control plane's challenge.
//!
//! One worker thread owns the TSS context (it is neither `Send` nor `Sync`); callers queue jobs.

use crate::keys::TpmKeyBlob;
use anyhow::{Context as _, Result, anyhow, bail};
use flotilla::proto::agent::v1 as pb;
use std::sync::mpsc;
use tss_esapi::abstraction::{AsymmetricAlgorithmSelection, ak, ek};
use tss_esapi::attributes::{ObjectAttributesBuilder, SessionAttributesBuilder};
use tss_esapi::constants::SessionType;
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::handles::{AuthHandle, KeyHandle};
use tss_esapi::interface_types::algorithm::{
    HashingAlgorithm, PublicAlgorithm, SignatureSchemeAlgorithm,
};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Data, Digest, EccPoint, EccScheme, EncryptedSecret, HashScheme, HashcheckTicket, IdObject,
    Private, Public, PublicBuilder, PublicEccParametersBuilder, Signature, SignatureScheme,
    SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;
use tss_esapi::utils::create_unrestricted_signing_ecc_public;
use tss_esapi::{Context, TctiNameConf};

type Job = Box<dyn FnOnce(&mut Worker) + Send>;

/// A handle on the TPM worker thread.
pub struct Tpm {
    jobs: std::sync::Mutex<Option<mpsc::Sender<Job>>>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Tpm {
    /// Lets the worker flush what it holds and close the context before the process goes on.
    fn drop(&mut self) {
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.take();
        }
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

struct Worker {
    ctx: Context,
    srk: KeyHandle,
    /// The attestation key of an enrollment in progress, and which endorsement key it is under.
    attestation: Option<(AsymmetricAlgorithmSelection, KeyHandle)>,
}

/// The storage root key: an ECC P-256 restricted decryption primary in the owner hierarchy. The
/// same template always gives the same key, so nothing about it is stored.
fn srk_template() -> Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()?;
    Ok(PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()?)
}

fn device_key_template() -> Result<Public> {
    Ok(create_unrestricted_signing_ecc_public(
        EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)),
        EccCurve::NistP256,
    )?)
}

fn null_ticket() -> Result<HashcheckTicket> {
    Ok(HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
        tag: TPM2_ST_HASHCHECK,
        hierarchy: TPM2_RH_NULL,
        digest: Default::default(),
    })?)
}

/// DER `ECDSA-Sig-Value` from the TPM's big-endian r and s.
pub(crate) fn ecdsa_der(r: &[u8], s: &[u8]) -> Vec<u8> {
    fn integer(out: &mut Vec<u8>, bytes: &[u8]) {
        let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
        let mut value = bytes[start..].to_vec();
        if value.first().is_none_or(|b| b & 0x80 != 0) {
            value.insert(0, 0);
        }
        out.push(0x02);
        out.push(value.len() as u8);
        out.extend(value);
    }
    let mut body = Vec::new();
    integer(&mut body, r);
    integer(&mut body, s);
    let mut out = vec![0x30, body.len() as u8];
    out.extend(body);
    out
}

/// The uncompressed point of an ECC P-256 public area.
fn ecc_point(public: &Public) -> Result<Vec<u8>> {
    let Public::Ecc { unique, .. } = public else {
        bail!("the TPM returned a non-ECC key");
    };
    let pad = |v: &[u8]| -> Result<Vec<u8>> {
        if v.len() > 32 {
            bail!("coordinate longer than P-256");
        }
        let mut out = vec![0u8; 32 - v.len()];
        out.extend_from_slice(v);
        Ok(out)
    };
    let mut point = vec![0x04];
    point.extend(pad(unique.x().value())?);
    point.extend(pad(unique.y().value())?);
    Ok(point)
}

impl Worker {
    fn open(tcti: &str) -> Result<Worker> {
        let conf: TctiNameConf = tcti.parse().with_context(|| format!("TPM TCTI {tcti:?}"))?;
        let mut ctx = Context::new(conf).with_context(|| format!("opening the TPM at {tcti}"))?;
        let srk = ctx
            .execute_with_nullauth_session(|c| {
                c.create_primary(Hierarchy::Owner, srk_template()?, None, None, None, None)
                    .map_err(anyhow::Error::from)
            })
            .context("creating the TPM storage root key")?
            .key_handle;
        Ok(Worker {
            ctx,
            srk,
            attestation: None,
        })
    }

    fn load(&mut self, blob: &TpmKeyBlob) -> Result<KeyHandle> {
        let public = Public::unmarshall(&blob.public()?)?;
        let private = Private::try_from(blob.private()?)?;
        let srk = self.srk;
        self.ctx
            .execute_with_nullauth_session(|c| c.load(srk, private, public))
            .context("loading the device key into the TPM")
    }

    fn create_key(&mut self) -> Result<TpmKeyBlob> {
        let srk = self.srk;
        let created = self
            .ctx
            .execute_with_nullauth_session(|c| {
                c.create(srk, device_key_template()?, None, None, None, None)
                    .map_err(anyhow::Error::from)
            })
            .context("creating a key in the TPM")?;
        let point = ecc_point(&created.out_public)?;
        Ok(TpmKeyBlob::new(
            &created.out_public.marshall()?,
            created.out_private.value(),
            &point,
        ))
    }

    fn sign(&mut self, blob: &TpmKeyBlob, digest: &[u8]) -> Result<Vec<u8>> {
        let key = self.load(blob)?;
        let digest = Digest::try_from(digest.to_vec())?;
        let signed = self.ctx.execute_with_nullauth_session(|c| {
            c.sign(key, digest, SignatureScheme::Null, null_ticket()?)
                .map_err(anyhow::Error::from)
        });
        let _ = self.ctx.flush_context(key.into());
        match signed.context("signing with the TPM")? {
            Signature::EcDsa(sig) => Ok(ecdsa_der(
                sig.signature_r().value(),
                sig.signature_s().value(),
            )),
            other => bail!("the TPM made a {:?} signature", other.algorithm()),
        }
    }

    fn forget_attestation(&mut self) {
        if let Some((_, ak)) = self.attestation.take() {
            let _ = self.ctx.flush_context(ak.into());
        }
    }

    /// The endorsement key that has a certificate in the TPM's NV storage, and that certificate.
    fn endorsement(&mut self) -> Result<(AsymmetricAlgorithmSelection, KeyHandle, Vec<u8>)> {
        let mut last = None;
        for alg in [
            AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
            AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
        ] {
            match ek::retrieve_ek_pubcert(&mut self.ctx, alg) {
                Ok(cert) => {
                    let handle = ek::create_ek_object_2(&mut self.ctx, alg, None)
                        .context("creating the endorsement key")?;
                    return Ok((alg, handle, cert));
                }
                Err(error) => last = Some(error),
            }
        }
        Err(anyhow!(
            "the TPM holds no RSA-2048 or ECC P-256 EK certificate: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        ))
    }

    fn attest(&mut self, blob: &TpmKeyBlob, qualifying: &[u8]) -> Result<pb::TpmEvidence> {
        self.forget_attestation();
        let endorsement = self.endorsement()?;
        self.attest_under(endorsement, blob, qualifying)
    }

    /// Evidence under a given endorsement key (its algorithm, handle and certificate).
    fn attest_under(
        &mut self,
        (ek_alg, ek_handle, ek_certificate): (AsymmetricAlgorithmSelection, KeyHandle, Vec<u8>),
        blob: &TpmKeyBlob,
        qualifying: &[u8],
    ) -> Result<pb::TpmEvidence> {
        // A TPM without a resource manager holds only three transient objects: the endorsement
        // key goes once the attestation key is loaded, and is made again (the same key, from the
        // same template) to activate the credential.
        let ek_public = self.ctx.read_public(ek_handle)?.0;
        let created = ak::create_ak_2(
            &mut self.ctx,
            ek_handle,
            HashingAlgorithm::Sha256,
            AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
            SignatureSchemeAlgorithm::EcDsa,
            None,
            None,
        )
        .context("creating the attestation key")?;
        let ak_public = created.out_public.clone();
        let loaded = ak::load_ak(
            &mut self.ctx,
            ek_handle,
            None,
            created.out_private,
            created.out_public,
        );
        let _ = self.ctx.flush_context(ek_handle.into());
        let ak_handle = loaded.context("loading the attestation key")?;
        self.attestation = Some((ek_alg, ak_handle));
        let key = self.load(blob)?;
        let data = Data::try_from(qualifying.to_vec())?;
        let certified = self.ctx.execute_with_sessions(
            (
                Some(AuthSession::Password),
                Some(AuthSession::Password),
                None,
            ),
            |c| c.certify(key.into(), ak_handle, data, SignatureScheme::Null),
        );
        let _ = self.ctx.flush_context(key.into());
        let (attest, signature) = certified.context("certifying the device key")?;
        Ok(pb::TpmEvidence {
            ek_certificate,
            ek_public: ek_public.marshall()?,
            ak_public: ak_public.marshall()?,
            key_public: blob.public()?,
            certify_info: attest.marshall()?,
            certify_signature: signature.marshall()?,
        })
    }

    fn activate(&mut self, challenge: &pb::TpmChallenge) -> Result<Vec<u8>> {
        let (ek_alg, ak) = self
            .attestation
            .context("no attestation in progress to answer a challenge for")?;
        let ek = ek::create_ek_object_2(&mut self.ctx, ek_alg, None)
            .context("creating the endorsement key")?;
        let policy = self
            .ctx
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Policy,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )?
            .context("the TPM gave no policy session")?;
        let (attributes, mask) = SessionAttributesBuilder::new()
            .with_decrypt(true)
            .with_encrypt(true)
            .build();
        self.ctx.tr_sess_set_attributes(policy, attributes, mask)?;
        let policy_session = PolicySession::try_from(policy)?;
        let answer = self
            .ctx
            .execute_with_nullauth_session(|c| {
                c.policy_secret(
                    policy_session,
                    AuthHandle::Endorsement,
                    Default::default(),
                    Default::default(),
                    Default::default(),
                    None,
                )
            })
            .map_err(anyhow::Error::from)
            .and_then(|_| {
                let blob = IdObject::try_from(challenge.credential_blob.clone())?;
                let secret = EncryptedSecret::try_from(challenge.encrypted_secret.clone())?;
                self.ctx
                    .execute_with_sessions((Some(AuthSession::Password), Some(policy), None), |c| {
                        c.activate_credential(ak, ek, blob, secret)
                    })
                    .map_err(anyhow::Error::from)
            });
        let _ = self
            .ctx
            .flush_context(tss_esapi::handles::SessionHandle::from(policy).into());
        let _ = self.ctx.flush_context(ek.into());
        self.forget_attestation();
        Ok(answer
            .context("the TPM could not activate the credential")?
            .value()
            .to_vec())
    }
}

/// Some TSS errors display as nothing; their debug form names the response code.
fn readable(error: anyhow::Error) -> anyhow::Error {
    let parts: Vec<String> = error
        .chain()
        .map(|cause| match cause.to_string() {
            text if text.trim().is_empty() => format!("{cause:?}"),
            text => text,
        })
        .collect();
    anyhow!(parts.join(": "))
}

impl Tpm {
    /// Opens the TPM on its own thread and creates the storage root key.
    pub fn open(tcti: &str) -> Result<Tpm> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let (ready_tx, ready) = mpsc::channel();
        let tcti = tcti.to_string();
        let worker = std::thread::Builder::new()
            .name("tpm".into())
            .spawn(move || {
                let mut worker = match Worker::open(&tcti) {
                    Ok(worker) => {
                        let _ = ready_tx.send(Ok(()));
                        worker
                    }
                    Err(error) => {
                        let _ = ready_tx.send(Err(error));
                        return;
                    }
                };
                while let Ok(job) = queue.recv() {
                    job(&mut worker);
                }
                worker.forget_attestation();
                let _ = worker.ctx.flush_context(worker.srk.into());
            })
            .context("starting the TPM thread")?;
        ready
            .recv()
            .map_err(|_| anyhow!("the TPM thread stopped"))??;
        Ok(Tpm {
            jobs: std::sync::Mutex::new(Some(jobs)),
            worker: Some(worker),
        })
    }

    fn call<R: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Worker) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let (reply, answer) = mpsc::channel();
        let sender = self
            .jobs
            .lock()
            .map_err(|_| anyhow!("the TPM thread failed"))?
            .clone()
            .context("the TPM is closed")?;
        sender
            .send(Box::new(move |worker: &mut Worker| {
                let _ = reply.send(job(worker));
            }))
            .map_err(|_| anyhow!("the TPM thread stopped"))?;
        answer
            .recv()
            .map_err(|_| anyhow!("the TPM thread stopped"))?
            .map_err(readable)
    }

    /// Creates a fresh P-256 signing key inside the TPM.
    pub fn create_key(&self) -> Result<TpmKeyBlob> {
        self.call(|w| w.create_key())
    }

    /// Signs a SHA-256 digest with a key the TPM holds; DER ECDSA signature.
    pub fn sign(&self, blob: &TpmKeyBlob, digest: &[u8]) -> Result<Vec<u8>> {
        let (blob, digest) = (blob.clone(), digest.to_vec());
        self.call(move |w| w.sign(&blob, &digest))
    }

    /// Evidence that `blob` lives in this TPM, bound to `qualifying` (keeps the attestation key
    /// loaded for the challenge that follows).
    pub fn attest(&self, blob: &TpmKeyBlob, qualifying: &[u8]) -> Result<pb::TpmEvidence> {
        let (blob, qualifying) = (blob.clone(), qualifying.to_vec());
        self.call(move |w| w.attest(&blob, &qualifying))
    }

    /// Evidence under an endorsement key of the given kind, certificate or not (the tests use it
    /// for the ECC endorsement key that swtpm certifies only at P-384).
    #[cfg(test)]
    pub fn attest_with_ek(
        &self,
        alg: AsymmetricAlgorithmSelection,
        blob: &TpmKeyBlob,
        qualifying: &[u8],
    ) -> Result<pb::TpmEvidence> {
        let (blob, qualifying) = (blob.clone(), qualifying.to_vec());
        self.call(move |w| {
            w.forget_attestation();
            let ek = ek::create_ek_object_2(&mut w.ctx, alg, None)?;
            w.attest_under((alg, ek, Vec::new()), &blob, &qualifying)
        })
    }

    /// Answers the control plane's credential challenge.
    pub fn activate(&self, challenge: &pb::TpmChallenge) -> Result<Vec<u8>> {
        let challenge = challenge.clone();
        self.call(move |w| w.activate(&challenge))
    }
}

#[cfg(test)]
mod tests;

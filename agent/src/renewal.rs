//! Certificate renewal on the stream: when the server asks, or when the certificate enters its
//! renewal window and the server has not asked, the agent generates a fresh key, keeps it pending
//! (so a retry sends the same request and gets the same certificate), validates what comes back
//! and swaps it in. Failed attempts back off (1 min doubling to 24 h, jittered) for as long as the
//! certificate is valid.

use crate::backoff::Backoff;
use crate::certs::{CertStore, Pair, PendingRequest};
use crate::keys::{DeviceKey, KeySource, StoredKey};
use anyhow::{Context, Result, bail};
use flotilla::pki::{cert_info_pem, sha256_hex};
use flotilla::proto::agent::v1 as pb;
use rand::RngCore;
use rcgen::{CertificateParams, SanType};
use std::time::Duration;
use tokio::time::Instant;

/// Used until the control plane says otherwise.
pub(crate) const DEFAULT_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

fn unix_secs() -> i64 {
    flotilla::clock::now_secs()
}

/// A CSR for `key` asking for the device's own identity (the server checks it is nobody else's).
pub(crate) fn device_csr(key: &DeviceKey, device_id: &str) -> Result<String> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = vec![SanType::URI(
        format!("flotilla://device/{device_id}")
            .try_into()
            .context("device identity as a URI")?,
    )];
    Ok(params.serialize_request(key)?.pem()?)
}

/// The pending renewal, or a new one with a fresh key (saved before it is used).
pub(crate) fn pending_or_new(
    store: &CertStore,
    keys: &KeySource,
    device_id: &str,
) -> Result<(StoredKey, PendingRequest)> {
    if let Some(pending) = store.pending() {
        return Ok(pending);
    }
    let key = keys.generate().context("generating a fresh key")?;
    let mut id = [0u8; 12];
    rand::rng().fill_bytes(&mut id);
    let request = PendingRequest {
        request_id: hex::encode(id),
        csr_pem: device_csr(&keys.open(&key)?, device_id)?,
    };
    store.save_pending(&key, &request)?;
    Ok((key, request))
}

/// Checks an issued certificate against the pending key before anything uses it.
pub(crate) fn accept(
    store: &CertStore,
    ca_pem: &str,
    device_id: &str,
    certificate_pem: &str,
) -> Result<Pair> {
    let (key, _) = store
        .pending()
        .context("no renewal is pending for this certificate")?;
    let spki = key.spki()?;
    let pair = Pair {
        key,
        cert_pem: certificate_pem.to_string(),
    };
    pair.check(ca_pem, device_id)
        .map_err(|e| anyhow::anyhow!("issued certificate refused: {e}"))?;
    let info = cert_info_pem(certificate_pem)?;
    let now = unix_secs();
    if info.not_after <= now || info.not_before > now + 300 || info.not_after <= info.not_before {
        bail!("issued certificate has an unusable validity window");
    }
    if info.key_fingerprint != sha256_hex(&spki) {
        bail!("issued certificate is not for the pending key");
    }
    Ok(pair)
}

/// The agent's renewal state for one process lifetime.
pub(crate) struct Renewer {
    store: CertStore,
    keys: KeySource,
    ca_pem: String,
    device_id: String,
    pub renew_before: Duration,
    backoff: Backoff,
    not_before: Option<Instant>,
    in_flight: Option<String>,
}

/// What to do after handling a server message.
pub(crate) enum Outcome {
    Nothing,
    /// Send this request on the stream.
    Send(pb::CertificateRequest),
    /// A new pair is active: reconnect with it.
    Swapped,
    /// Tell the server the certificate it sent was refused.
    Report(pb::CertificateRejected),
}

impl Renewer {
    pub(crate) fn new(
        store: CertStore,
        keys: KeySource,
        ca_pem: String,
        device_id: String,
        renew_before: Duration,
        retry: (Duration, Duration),
    ) -> Renewer {
        Renewer {
            store,
            keys,
            ca_pem,
            device_id,
            renew_before,
            backoff: Backoff::new(retry.0, retry.1),
            not_before: None,
            in_flight: None,
        }
    }

    /// Whether the current certificate is in its renewal window.
    pub(crate) fn due(&self) -> bool {
        let Ok(pair) = self.store.current() else {
            return false;
        };
        let Ok(info) = cert_info_pem(&pair.cert_pem) else {
            return false;
        };
        unix_secs() + self.renew_before.as_secs() as i64 >= info.not_after
    }

    fn request(&mut self) -> Result<Outcome> {
        let (_, pending) = pending_or_new(&self.store, &self.keys, &self.device_id)?;
        self.in_flight = Some(pending.request_id.clone());
        Ok(Outcome::Send(pb::CertificateRequest {
            request_id: pending.request_id,
            csr_pem: pending.csr_pem,
        }))
    }

    /// Called when a session opens and on every tick: renews on the agent's own initiative when a
    /// request is pending from before, or when due and not backing off.
    pub(crate) fn on_tick(&mut self) -> Result<Outcome> {
        if self.in_flight.is_some() {
            return Ok(Outcome::Nothing);
        }
        let waiting = self.not_before.is_some_and(|t| Instant::now() < t);
        if self.store.pending().is_some() && !waiting {
            tracing::info!("resending the pending certificate request");
            return self.request();
        }
        if self.due() && !waiting {
            tracing::info!("certificate is in its renewal window; renewing");
            return self.request();
        }
        Ok(Outcome::Nothing)
    }

    /// The server asked for a renewal.
    pub(crate) fn on_directive(&mut self, directive: &pb::RenewCertificate) -> Result<Outcome> {
        tracing::info!(reason = %directive.reason, "server asked to renew the certificate");
        if self.in_flight.is_some() {
            return Ok(Outcome::Nothing);
        }
        self.request()
    }

    /// A certificate arrived: validate, swap, and reconnect with it.
    pub(crate) fn on_issued(&mut self, issued: &pb::CertificateIssued) -> Result<Outcome> {
        if self.in_flight.as_deref() != Some(issued.request_id.as_str()) {
            tracing::warn!(request_id = %issued.request_id, "ignoring a certificate for a request not in flight");
            return Ok(Outcome::Nothing);
        }
        self.in_flight = None;
        let started = Instant::now();
        match accept(
            &self.store,
            &self.ca_pem,
            &self.device_id,
            &issued.certificate_pem,
        ) {
            Ok(pair) => {
                self.store.activate(&pair)?;
                self.backoff.reset();
                self.not_before = None;
                let serial = cert_info_pem(&pair.cert_pem)
                    .map(|i| i.serial)
                    .unwrap_or_default();
                tracing::info!(%serial, swap_ms = started.elapsed().as_millis() as u64, "certificate renewed; reconnecting with it");
                Ok(Outcome::Swapped)
            }
            Err(error) => {
                // The old pair stays in use; the next attempt uses a new key.
                tracing::error!(%error, "renewed certificate rejected; keeping the current one");
                self.store.clear_pending()?;
                self.back_off();
                Ok(Outcome::Report(pb::CertificateRejected {
                    request_id: issued.request_id.clone(),
                    serial: cert_info_pem(&issued.certificate_pem)
                        .map(|i| i.serial)
                        .unwrap_or_default(),
                    reason: format!("{error:#}"),
                }))
            }
        }
    }

    pub(crate) fn on_refused(&mut self, refused: &pb::CertificateRefused) -> Result<Outcome> {
        if self.in_flight.as_deref() == Some(refused.request_id.as_str()) {
            self.in_flight = None;
        }
        tracing::warn!(reason = %refused.reason, retryable = refused.retryable, "certificate renewal refused");
        if !refused.retryable {
            self.store.clear_pending()?;
        }
        self.back_off();
        // The control plane's own wait (a rate limit) overrides a shorter backoff.
        if let Some(wait) = refused
            .retry_after
            .and_then(|d| std::time::Duration::try_from(d).ok())
        {
            let told = Instant::now() + wait;
            self.not_before = Some(self.not_before.map_or(told, |at| at.max(told)));
        }
        Ok(Outcome::Nothing)
    }

    /// The session ended with a request unanswered: it is resent on the next session.
    pub(crate) fn on_session_end(&mut self) {
        self.in_flight = None;
    }

    fn back_off(&mut self) {
        let wait = self.backoff.next_delay();
        tracing::info!(
            retry_in_s = wait.as_secs(),
            "next renewal attempt after backing off"
        );
        self.not_before = Some(Instant::now() + wait);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::KeyPair;

    fn ca() -> (KeyPair, rcgen::Certificate) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        (key, cert)
    }

    fn issue(ca: &(KeyPair, rcgen::Certificate), key: &KeyPair, device: &str) -> String {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![SanType::URI(
            format!("flotilla://device/{device}").try_into().unwrap(),
        )];
        let issuer = rcgen::Issuer::from_ca_cert_der(ca.1.der(), &ca.0).unwrap();
        params.signed_by(key, &issuer).unwrap().pem()
    }

    #[test]
    fn only_a_certificate_for_the_pending_key_from_the_ca_for_this_device_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let store = CertStore::new(dir.path());
        let authority = ca();
        let ca_pem = authority.1.pem();
        assert!(
            accept(&store, &ca_pem, "d", "x").is_err(),
            "nothing pending"
        );
        let (pending, request) = pending_or_new(&store, &KeySource::File, "d").unwrap();
        let StoredKey::Pem(pending_pem) = &pending else {
            panic!("a file key")
        };
        let pending_key = KeyPair::from_pem(pending_pem).unwrap();
        assert!(request.csr_pem.contains("CERTIFICATE REQUEST"));
        let (again, same) = pending_or_new(&store, &KeySource::File, "d").unwrap();
        assert_eq!(same, request, "a retry sends the same request");
        assert_eq!(again, pending);

        let other_key = KeyPair::generate().unwrap();
        let error = accept(&store, &ca_pem, "d", &issue(&authority, &other_key, "d")).unwrap_err();
        assert!(format!("{error:#}").contains("different key"), "{error:#}");
        let error =
            accept(&store, &ca_pem, "d", &issue(&authority, &pending_key, "e")).unwrap_err();
        assert!(
            format!("{error:#}").contains("expected device/d"),
            "{error:#}"
        );
        let stranger = ca();
        let error = accept(&store, &ca_pem, "d", &issue(&stranger, &pending_key, "d")).unwrap_err();
        assert!(
            format!("{error:#}").contains("not signed by the CA"),
            "{error:#}"
        );
        let pair = accept(&store, &ca_pem, "d", &issue(&authority, &pending_key, "d")).unwrap();
        assert_eq!(pair.key, pending);
    }
}

//! Certificate renewal as the hub tracks it: where each device's certificate stands in its
//! renewal window, which connected devices must be asked to renew, and what they answered.

use super::{Hub, entry_for};

/// Where a device's management certificate stands in its renewal cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewalState {
    /// Not yet in its renewal window.
    Valid,
    /// In the window (or renewal forced); the device is asked while connected.
    Due,
    /// The device's last renewal request was refused.
    Failed,
    /// Past its expiry: only recovery can bring the device back.
    Expired,
    /// Revoked: the device must enroll again.
    Revoked,
}

/// A device's certificate as the renewal scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertStatus {
    /// Serial of the device's newest certificate, lowercase hex.
    pub serial: String,
    /// Its expiry, Unix milliseconds.
    pub not_after_ms: i64,
    /// When its renewal window opens, Unix milliseconds.
    pub renew_at_ms: i64,
    /// Where it stands.
    pub state: RenewalState,
    /// Why the last renewal failed.
    pub last_error: Option<String>,
}

#[derive(Debug, Clone)]
pub(super) struct CertTrack {
    pub(super) serial: String,
    pub(super) not_after_ms: i64,
    pub(super) renew_at_ms: i64,
    pub(super) last_error: Option<String>,
    /// When the device was last asked to renew.
    pub(super) asked_ms: Option<i64>,
    /// A directive waits to be sent on the session.
    pub(super) ask_now: bool,
    /// An operator asked for a renewal regardless of the window.
    pub(super) forced: bool,
    /// The certificate was revoked.
    pub(super) revoked: bool,
}

impl CertTrack {
    pub(super) fn due(&self, now_ms: i64) -> bool {
        self.forced || now_ms >= self.renew_at_ms
    }

    /// Where the certificate stands at `now_ms`.
    pub(super) fn state(&self, now_ms: i64) -> RenewalState {
        if self.revoked {
            RenewalState::Revoked
        } else if now_ms >= self.not_after_ms {
            RenewalState::Expired
        } else if self.last_error.is_some() {
            RenewalState::Failed
        } else if self.due(now_ms) {
            RenewalState::Due
        } else {
            RenewalState::Valid
        }
    }

    pub(super) fn status(&self, now_ms: i64) -> CertStatus {
        CertStatus {
            serial: self.serial.clone(),
            not_after_ms: self.not_after_ms,
            renew_at_ms: self.renew_at_ms,
            state: self.state(now_ms),
            last_error: self.last_error.clone(),
        }
    }
}

/// A renewal directive for a session to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenewalRequest {
    /// Why, for the device's log.
    pub reason: String,
    /// The current certificate's expiry, Unix milliseconds.
    pub deadline_ms: i64,
}

impl Hub {
    /// When the device was asked to renew, if it was.
    pub fn renewal_asked_ms(&self, device_id: &str) -> Option<i64> {
        self.lock()
            .get(device_id)
            .and_then(|e| e.cert.as_ref())
            .and_then(|c| c.asked_ms)
    }

    /// Tracks a device's current certificate (at start, and after every issuance).
    pub fn track_certificate(
        &self,
        device_id: &str,
        serial: &str,
        not_after_ms: i64,
        renew_at_ms: i64,
        revoked: bool,
    ) {
        let mut state = self.lock();
        let entry = entry_for(&mut state.devices, device_id);
        entry.cert = Some(CertTrack {
            serial: serial.to_string(),
            not_after_ms,
            renew_at_ms,
            last_error: None,
            asked_ms: None,
            ask_now: false,
            forced: false,
            revoked,
        });
        entry.note_change(self.clock.now_millis());
        drop(state);
        self.announce(device_id);
    }

    /// The certificate `serial` was revoked: if it is the device's newest, the device is out
    /// until it enrolls again.
    pub fn certificate_revoked(&self, device_id: &str, serial: &str) {
        let mut state = self.lock();
        let Some(cert) = state
            .devices
            .get_mut(device_id)
            .and_then(|entry| entry.cert.as_mut())
            .filter(|cert| cert.serial == serial && !cert.revoked)
        else {
            return;
        };
        cert.revoked = true;
        drop(state);
        self.changed(device_id);
    }

    /// Asks every connected device whose certificate is due (and was not asked within
    /// `resend_after_ms`) to renew. Memory only. Returns how many were asked.
    pub fn renewal_sweep(&self, now_ms: i64, resend_after_ms: i64) -> usize {
        let mut asked = 0;
        for entry in self.lock().devices.values_mut() {
            let Some(session) = &entry.session else {
                continue;
            };
            let Some(cert) = entry.cert.as_mut() else {
                continue;
            };
            let recently = cert
                .asked_ms
                .is_some_and(|at| now_ms - at < resend_after_ms);
            if cert.due(now_ms) && !recently && now_ms < cert.not_after_ms {
                cert.asked_ms = Some(now_ms);
                cert.ask_now = true;
                session.changed.notify_one();
                asked += 1;
            }
        }
        asked
    }

    /// The renewal directive a session should send now, if any.
    pub fn take_renewal_request(&self, device_id: &str, session_id: u64) -> Option<RenewalRequest> {
        let mut state = self.lock();
        let entry = state.get_mut(device_id)?;
        if entry.session.as_ref().map(|s| s.id) != Some(session_id) {
            return None;
        }
        let cert = entry.cert.as_mut()?;
        if !std::mem::take(&mut cert.ask_now) {
            return None;
        }
        let reason = if cert.forced {
            "renewal requested by an operator".to_string()
        } else {
            let left = (cert.not_after_ms - self.clock.now_millis()).max(0) / 1000;
            format!("certificate expires in {left} s")
        };
        Some(RenewalRequest {
            reason,
            deadline_ms: cert.not_after_ms,
        })
    }

    /// Records that a device's renewal request was refused.
    pub fn renewal_failed(&self, device_id: &str, reason: &str) {
        if let Some(cert) = self.lock().get_mut(device_id).and_then(|e| e.cert.as_mut()) {
            cert.last_error = Some(reason.to_string());
        }
        self.changed(device_id);
    }

    /// Records that a device holds a good certificate again (a repeated request answered, or its
    /// new certificate in use): an earlier failure no longer describes it.
    pub fn renewal_succeeded(&self, device_id: &str) {
        if let Some(cert) = self.lock().get_mut(device_id).and_then(|e| e.cert.as_mut()) {
            cert.last_error = None;
        }
        self.changed(device_id);
    }

    /// Asks a connected device to renew now; false if it has no open session.
    pub fn force_renewal(&self, device_id: &str) -> bool {
        let mut state = self.lock();
        let Some(entry) = state.get_mut(device_id) else {
            return false;
        };
        let (Some(session), Some(cert)) = (&entry.session, entry.cert.as_mut()) else {
            return false;
        };
        cert.forced = true;
        cert.ask_now = true;
        cert.asked_ms = Some(self.clock.now_millis());
        session.changed.notify_one();
        true
    }
}

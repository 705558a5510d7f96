//! Certificate renewal as the hub tracks it: where each device's certificate stands in its
//! renewal window, which connected devices must be asked to renew, and what they answered.
//!
//! Renewals are paced: a replica lets a bounded number run at once (asked, and not yet back on a
//! session with the new certificate), and asks the next device in line as each one finishes. A
//! renewal costs a fresh key on the device, an issuance, and a new TLS session; asking a whole
//! fleet at once spends the cores on handshakes that time out and are retried, and issuance
//! collapses. Paced, the same work goes through at the rate the machine can do it.

use super::{Hub, HubState, entry_for};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;

/// Renewals one replica lets run at once unless told otherwise.
pub const DEFAULT_RENEWAL_SLOTS: usize = 256;

/// How long a renewal holds its slot at most: from the ask, and again from the issuance, until the
/// device is back here on the new certificate. A device that went elsewhere (another replica, or
/// away) gives its slot back after this.
pub(super) const SLOT_HELD_MS: i64 = 30_000;

/// The renewals a replica runs: devices waiting for a slot, and how many hold one.
#[derive(Debug, Default)]
pub(super) struct RenewalSlots {
    /// Devices due (or forced) that wait to be asked, in order.
    queue: VecDeque<String>,
    /// Renewals holding a slot (recounted at every sweep, so a slot never leaks).
    in_flight: usize,
}

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
    /// Since when this device's renewal holds a slot (asked, or issued and not yet back on it).
    pub(super) in_flight_since: Option<i64>,
    /// The device waits in the renewal queue.
    pub(super) queued: bool,
}

impl CertTrack {
    /// Whether the device's renewal holds a slot at `now_ms`.
    pub(super) fn holds_slot(&self, now_ms: i64) -> bool {
        self.in_flight_since
            .is_some_and(|since| now_ms - since < SLOT_HELD_MS)
    }

    /// Marks the device asked at `now_ms`: its session sends the directive when woken.
    pub(super) fn ask(&mut self, now_ms: i64) {
        self.ask_now = true;
        self.asked_ms = Some(now_ms);
    }

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
        let now_ms = self.clock.now_millis();
        let entry = entry_for(&mut state.devices, device_id);
        // A renewal this replica asked for keeps its slot, afresh, until the device is back on
        // the new certificate: reconnecting is the renewal's most expensive part.
        let in_flight_since = entry
            .cert
            .as_ref()
            .and_then(|c| c.in_flight_since)
            .map(|_| now_ms);
        entry.cert = Some(CertTrack {
            serial: serial.to_string(),
            not_after_ms,
            renew_at_ms,
            last_error: None,
            asked_ms: None,
            ask_now: false,
            forced: false,
            revoked,
            in_flight_since,
            queued: false,
        });
        entry.note_change(now_ms);
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

    /// Puts every connected device whose certificate is due (and was not asked within
    /// `resend_after_ms`) in line to renew, gives back the slots of renewals that ran out of time,
    /// and asks as many as there are free slots. Memory only. Returns how many were asked.
    pub fn renewal_sweep(&self, now_ms: i64, resend_after_ms: i64) -> usize {
        let mut state = self.lock();
        let HubState {
            devices, renewals, ..
        } = &mut *state;
        renewals.in_flight = 0;
        for (device_id, entry) in devices.iter_mut() {
            let Some(cert) = entry.cert.as_mut() else {
                continue;
            };
            if cert.holds_slot(now_ms) {
                renewals.in_flight += 1;
                continue;
            }
            cert.in_flight_since = None;
            if entry.session.is_none() || cert.queued {
                continue;
            }
            let recently = cert
                .asked_ms
                .is_some_and(|at| now_ms - at < resend_after_ms);
            if cert.due(now_ms) && !recently && now_ms < cert.not_after_ms {
                cert.queued = true;
                renewals.queue.push_back(device_id.clone());
            }
        }
        self.fill_renewal_slots(&mut state, now_ms)
    }

    /// Asks the devices first in line to renew while slots are free; how many were asked.
    fn fill_renewal_slots(&self, state: &mut HubState, now_ms: i64) -> usize {
        let slots = self.renewal_slots.load(Ordering::Relaxed);
        let mut asked = 0;
        while state.renewals.in_flight < slots {
            let Some(device_id) = state.renewals.queue.pop_front() else {
                break;
            };
            let Some(entry) = state.devices.get_mut(&device_id) else {
                continue;
            };
            let (Some(session), Some(cert)) = (&entry.session, entry.cert.as_mut()) else {
                continue;
            };
            if !cert.queued {
                // Left the line since (a new certificate, or asked on a new session).
                continue;
            }
            cert.queued = false;
            if !cert.due(now_ms) || now_ms >= cert.not_after_ms || cert.holds_slot(now_ms) {
                continue;
            }
            cert.ask(now_ms);
            cert.in_flight_since = Some(now_ms);
            session.changed.notify_one();
            state.renewals.in_flight += 1;
            asked += 1;
        }
        asked
    }

    /// Puts a device in line to renew (unless it is already, or renewing) and asks whoever is
    /// first while slots are free.
    pub(super) fn queue_renewal(&self, state: &mut HubState, device_id: &str, now_ms: i64) {
        if let Some(cert) = state
            .devices
            .get_mut(device_id)
            .and_then(|e| e.cert.as_mut())
            && !cert.queued
            && !cert.holds_slot(now_ms)
        {
            cert.queued = true;
            state.renewals.queue.push_back(device_id.to_string());
        }
        self.fill_renewal_slots(state, now_ms);
    }

    /// A device's renewal gives its slot back (it finished, failed, or the device left), and the
    /// next in line is asked.
    pub(super) fn release_renewal_slot(&self, state: &mut HubState, device_id: &str, now_ms: i64) {
        let Some(cert) = state
            .devices
            .get_mut(device_id)
            .and_then(|e| e.cert.as_mut())
        else {
            return;
        };
        let counted = cert.holds_slot(now_ms);
        cert.in_flight_since = None;
        if counted {
            state.renewals.in_flight = state.renewals.in_flight.saturating_sub(1);
            self.fill_renewal_slots(state, now_ms);
        }
    }

    /// Renewals running here (holding a slot) and devices waiting for one.
    pub fn renewals_in_flight(&self) -> (usize, usize) {
        let state = self.lock();
        (state.renewals.in_flight, state.renewals.queue.len())
    }

    /// How many renewals may run here at once (at least one).
    pub fn set_renewal_slots(&self, slots: usize) {
        self.renewal_slots.store(slots.max(1), Ordering::Relaxed);
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

    /// Records that a device's renewal request was refused; its slot goes to the next in line
    /// (the device is asked again after the resend interval).
    pub fn renewal_failed(&self, device_id: &str, reason: &str) {
        let mut state = self.lock();
        if let Some(cert) = state.get_mut(device_id).and_then(|e| e.cert.as_mut()) {
            cert.last_error = Some(reason.to_string());
        }
        self.release_renewal_slot(&mut state, device_id, self.clock.now_millis());
        drop(state);
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

    /// Asks a connected device to renew: at once if it is renewing already (the directive is
    /// sent again) or a slot is free, otherwise when its turn comes. False if it has no open
    /// session here.
    pub fn force_renewal(&self, device_id: &str) -> bool {
        let now_ms = self.clock.now_millis();
        let mut state = self.lock();
        let Some(entry) = state.get_mut(device_id) else {
            return false;
        };
        let (Some(session), Some(cert)) = (&entry.session, entry.cert.as_mut()) else {
            return false;
        };
        cert.forced = true;
        if cert.holds_slot(now_ms) {
            cert.ask(now_ms);
            session.changed.notify_one();
            return true;
        }
        self.queue_renewal(&mut state, device_id, now_ms);
        true
    }
}

//! Sessions in the hub: registering and closing them (the newest wins, here and across
//! replicas), the push each should send next, and the ACKs and NACKs that answer it.

use super::entry::{DeviceEntry, Sent};
use super::{Hub, HubError, Rendered};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::Notify;
use tokio::time::Instant;

/// A spec for a session to send: the device answers with `nonce`.
#[derive(Debug, Clone, PartialEq)]
pub struct Push {
    /// Echoed by the device's ACK or NACK.
    pub nonce: String,
    /// The spec to send.
    pub rendered: Arc<Rendered>,
}

/// The handle a session task keeps: it is woken on `changed` when there may be something to push,
/// and on `closed` when it must end (replaced by a newer session, device removed, shutdown).
#[derive(Debug, Clone)]
pub struct SessionHandle {
    /// Unique within the process.
    pub id: u64,
    /// Notified when there may be something to push.
    pub changed: Arc<Notify>,
    /// Notified when the session must end.
    pub closed: Arc<Notify>,
}

/// What another replica recorded about a device's session (from the change feed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteSession {
    /// The device.
    pub device_id: String,
    /// The replica holding its session; `None`: none, or this one.
    pub holder: Option<String>,
    /// The version it last acknowledged.
    pub acked_version: Option<String>,
    /// The version it last rejected, with the reason.
    pub nacked: Option<(String, String)>,
}

/// What a new session means for the device's renewal.
enum RenewalOnOpen {
    /// Nothing to do.
    Nothing,
    /// The renewal it was asked for is done: its slot goes to the next in line.
    Done,
    /// Its certificate is due: in line for a slot.
    Queue,
}

/// What an ACK or NACK changed, so the caller knows what to persist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The answer matched the outstanding push; persist the device's new sync facts.
    Recorded {
        /// The version the device now acknowledges.
        acked_version: Option<String>,
        /// The version it now rejects, with the reason.
        nacked: Option<(String, String)>,
    },
    /// A late answer to an older push, or to a push of another session: nothing changes.
    Stale,
}

impl Hub {
    /// Registers a new session for a device that runs `running_version`, closing any older one.
    pub fn open_session(
        &self,
        device_id: &str,
        running_version: &str,
        certificate_serial: &str,
        now_ms: i64,
    ) -> Result<(SessionHandle, String), HubError> {
        if !self.is_ready() {
            return Err(HubError::NotReady);
        }
        let mut state = self.lock();
        let entry = state
            .get_mut(device_id)
            .ok_or_else(|| HubError::UnknownDevice(device_id.to_string()))?;
        let handle = SessionHandle {
            id: self.next_id.fetch_add(1, Ordering::Relaxed) + 1,
            changed: Arc::new(Notify::new()),
            closed: Arc::new(Notify::new()),
        };
        if let Some(old) = entry.session.replace(handle.clone()) {
            old.closed.notify_one();
        }
        entry.elsewhere = None;
        // The device's word is what it runs: "" means nothing (a fresh or wiped agent), so the
        // current version is sent again rather than assumed from an old ACK.
        entry.acked_version = Some(running_version.to_string()).filter(|v| !v.is_empty());
        entry.sent = None;
        entry.session_serial = Some(certificate_serial.to_string());
        // A new session gets the latest at once, whatever wave it belongs to.
        entry.held = false;
        entry.last_seen_ms = Some(now_ms);
        let current = entry.desired_version().unwrap_or_default().to_string();
        entry.note_change(self.clock.now_millis());
        let mut renewal = RenewalOnOpen::Nothing;
        if let Some(cert) = entry.cert.as_mut() {
            let due = cert.due(now_ms) && now_ms < cert.not_after_ms;
            cert.ask_now = false;
            renewal = if cert.in_flight_since.is_some() && cert.serial == certificate_serial {
                // Back on the new certificate: the renewal is done.
                RenewalOnOpen::Done
            } else if due && cert.holds_slot(now_ms) {
                // Renewing, but back without the new certificate: asked again at once.
                cert.ask(now_ms);
                RenewalOnOpen::Nothing
            } else if due {
                RenewalOnOpen::Queue
            } else {
                RenewalOnOpen::Nothing
            };
        }
        match renewal {
            RenewalOnOpen::Done => self.release_renewal_slot(&mut state, device_id, now_ms),
            RenewalOnOpen::Queue => self.queue_renewal(&mut state, device_id, now_ms),
            RenewalOnOpen::Nothing => {}
        }
        drop(state);
        // The first check happens at once: the device may be behind.
        handle.changed.notify_one();
        self.announce(device_id);
        Ok((handle, current))
    }

    /// Forgets a session that ended; a newer session of the same device is left alone. Whether it
    /// was still the device's session here (false: a newer one replaced it, here or elsewhere).
    pub fn close_session(&self, device_id: &str, session_id: u64, now_ms: i64) -> bool {
        let mut state = self.lock();
        if let Some(entry) = state.get_mut(device_id)
            && entry.session.as_ref().map(|s| s.id) == Some(session_id)
        {
            entry.session = None;
            let serial = entry.session_serial.take();
            entry.sent = None;
            entry.last_seen_ms = Some(now_ms);
            entry.note_change(self.clock.now_millis());
            // A device that leaves before its new certificate is issued gives its renewal slot
            // back; one that leaves to come back on the new certificate keeps it.
            let renewal_abandoned = entry.cert.as_ref().is_some_and(|c| {
                c.in_flight_since.is_some() && serial.as_deref() == Some(&c.serial)
            });
            if renewal_abandoned {
                self.release_renewal_slot(&mut state, device_id, now_ms);
            }
            drop(state);
            self.announce(device_id);
            return true;
        }
        false
    }

    /// The push a session should send now, if any. Records it as sent.
    pub fn next_push(&self, device_id: &str, session_id: u64) -> Option<Push> {
        let mut state = self.lock();
        let entry = state.get_mut(device_id)?;
        if entry.session.as_ref().map(|s| s.id) != Some(session_id) || !entry.wants_push() {
            return None;
        }
        let desired = entry.desired.clone()?;
        let nonce = format!(
            "{session_id:x}-{:x}",
            self.next_id.fetch_add(1, Ordering::Relaxed) + 1
        );
        entry.sent = Some(Sent {
            version: desired.version.clone(),
            nonce: nonce.clone(),
            at: Instant::now(),
        });
        entry.note_change(self.clock.now_millis());
        drop(state);
        self.pushes.fetch_add(1, Ordering::Relaxed);
        crate::telemetry::spec_pushed();
        self.announce(device_id);
        Some(Push {
            nonce,
            rendered: desired,
        })
    }

    fn answer(
        &self,
        device_id: &str,
        session_id: u64,
        nonce: &str,
        nacked: bool,
        apply: impl FnOnce(&mut DeviceEntry, String),
    ) -> Answer {
        let mut state = self.lock();
        let Some(entry) = state.get_mut(device_id) else {
            return Answer::Stale;
        };
        let current = entry.session.as_ref().map(|s| s.id) == Some(session_id);
        let Some(sent) = entry.sent.take_if(|s| current && s.nonce == nonce) else {
            return Answer::Stale;
        };
        crate::telemetry::push_answered(sent.at.elapsed(), nacked);
        apply(entry, sent.version);
        // A newer desired version may have arrived while this push was in flight.
        entry.wake();
        let answer = Answer::Recorded {
            acked_version: entry.acked_version.clone(),
            nacked: entry.nacked.clone(),
        };
        entry.note_change(self.clock.now_millis());
        drop(state);
        self.announce(device_id);
        answer
    }

    /// Records an ACK of the push with `nonce`.
    pub fn ack(&self, device_id: &str, session_id: u64, nonce: &str) -> Answer {
        self.answer(device_id, session_id, nonce, false, |entry, version| {
            entry.acked_version = Some(version);
            entry.nacked = None;
        })
    }

    /// Records a NACK of the push with `nonce`: that version is not resent.
    pub fn nack(&self, device_id: &str, session_id: u64, nonce: &str, error: &str) -> Answer {
        self.answer(device_id, session_id, nonce, true, |entry, version| {
            entry.nacked = Some((version, error.to_string()));
        })
    }

    /// Takes in what other replicas recorded about devices, a few hundred per lock: which replica
    /// holds each session (`None`: none, or this one) and its last answers. A fan-out to a large
    /// fleet brings every replica the answers of every device another replica holds. A session
    /// this replica still holds while a newer one is open elsewhere is stale and is closed: the
    /// newest session wins.
    pub fn note_remotes(&self, batch: Vec<RemoteSession>) {
        let now_ms = self.clock.now_millis();
        let mut taken = Vec::with_capacity(batch.len());
        let mut batch = batch.into_iter().peekable();
        while batch.peek().is_some() {
            let mut state = self.lock();
            for remote in batch.by_ref().take(super::DEVICES_PER_LOCK) {
                let Some(entry) = state.get_mut(&remote.device_id) else {
                    continue;
                };
                if remote.holder.is_none() && entry.session.is_some() {
                    // Our own session: our answers are the newest.
                    continue;
                }
                if remote.holder.is_some()
                    && let Some(stale) = entry.session.take()
                {
                    stale.closed.notify_one();
                    entry.session_serial = None;
                    entry.sent = None;
                }
                entry.elsewhere = remote.holder;
                entry.acked_version = remote.acked_version;
                entry.nacked = remote.nacked;
                entry.note_change(now_ms);
                taken.push(remote.device_id);
            }
        }
        for device_id in &taken {
            self.announce(device_id);
        }
    }

    /// Notes that a device was heard from (kept in memory only).
    pub fn touch(&self, device_id: &str, now_ms: i64) {
        if let Some(entry) = self.lock().get_mut(device_id) {
            entry.last_seen_ms = Some(now_ms);
        }
    }

    /// Whether another replica holds the device's session.
    pub fn is_held_elsewhere(&self, device_id: &str) -> bool {
        self.lock()
            .get(device_id)
            .is_some_and(|e| e.session.is_none() && e.elsewhere.is_some())
    }

    /// Closes the session of `device_id` if it authenticated with one of `serials` (or if
    /// `serials` is empty).
    pub fn close_session_using(&self, device_id: &str, serials: &[String]) -> bool {
        let state = self.lock();
        let Some(entry) = state.get(device_id) else {
            return false;
        };
        let uses = serials.is_empty()
            || entry
                .session_serial
                .as_ref()
                .is_some_and(|s| serials.contains(s));
        match (&entry.session, uses) {
            (Some(session), true) => {
                session.closed.notify_one();
                true
            }
            _ => false,
        }
    }

    /// Closes every open session (shutdown).
    pub fn close_all(&self) {
        for entry in self.lock().devices.values() {
            if let Some(session) = &entry.session {
                session.closed.notify_one();
            }
        }
    }
}

//! The hub: in-memory state of every device's session and sync progress. It holds, per device, the
//! rendered spec the device should run, what was last pushed and acknowledged, and a handle to its
//! open session. Pushes are state-of-the-world: a session is *notified* that something changed and
//! then asks the hub what to send, so bursts coalesce and a slow agent never queues stale specs.
//! No I/O happens under the hub's lock.

use crate::proto::agent::v1 as pb;
use crate::spec::{DeviceSpec, version_of};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

/// A rendered spec, shared by every holder (never copied per device).
#[derive(Debug, PartialEq)]
pub struct Rendered {
    pub version: String,
    pub content_hash: String,
    pub spec: pb::DeviceSpec,
}

impl Rendered {
    pub fn new(spec: DeviceSpec) -> Arc<Rendered> {
        let spec = spec.normalized();
        let content_hash = spec.content_hash();
        Arc::new(Rendered {
            version: version_of(&content_hash),
            content_hash,
            spec: spec.into(),
        })
    }
}

/// Where a device stands, as the admin API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncState {
    Synced,
    Pending,
    Error,
    Offline,
}

/// A snapshot of one device's sync progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncStatus {
    pub online: bool,
    pub state: SyncState,
    pub desired_version: String,
    pub sent_version: Option<String>,
    pub acked_version: Option<String>,
    pub last_error: Option<String>,
    pub last_seen_ms: Option<i64>,
}

/// The handle a session task keeps: it is woken on `changed` when there may be something to push,
/// and on `closed` when it must end (replaced by a newer session, device removed, shutdown).
#[derive(Debug, Clone)]
pub struct SessionHandle {
    pub id: u64,
    pub changed: Arc<Notify>,
    pub closed: Arc<Notify>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HubError {
    #[error("control plane is still loading its state; retry shortly")]
    NotReady,
    #[error("device {0} is not enrolled")]
    UnknownDevice(String),
}

/// What an ACK or NACK changed, so the caller knows what to persist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The answer matched the outstanding push; persist the device's new sync facts.
    Recorded {
        acked_version: Option<String>,
        nacked: Option<(String, String)>,
    },
    /// A late answer to an older push, or to a push of another session: nothing changes.
    Stale,
}

#[derive(Debug)]
struct Sent {
    version: String,
    nonce: String,
}

#[derive(Debug)]
struct DeviceEntry {
    desired: Arc<Rendered>,
    /// The version the device last acknowledged (or reported in Hello).
    acked_version: Option<String>,
    /// The version the device rejected, with its reason. Never resent automatically.
    nacked: Option<(String, String)>,
    sent: Option<Sent>,
    session: Option<SessionHandle>,
    last_seen_ms: Option<i64>,
}

impl DeviceEntry {
    fn status(&self) -> SyncStatus {
        let desired = &self.desired.version;
        let online = self.session.is_some();
        let error_for_desired = self
            .nacked
            .as_ref()
            .filter(|(version, _)| version == desired)
            .map(|(_, error)| error.clone());
        let state = if !online {
            SyncState::Offline
        } else if error_for_desired.is_some() {
            SyncState::Error
        } else if self.acked_version.as_deref() == Some(desired) {
            SyncState::Synced
        } else {
            SyncState::Pending
        };
        SyncStatus {
            online,
            state,
            desired_version: desired.clone(),
            sent_version: self.sent.as_ref().map(|s| s.version.clone()),
            acked_version: self.acked_version.clone(),
            last_error: self.nacked.as_ref().map(|(_, e)| e.clone()),
            last_seen_ms: self.last_seen_ms,
        }
    }

    fn wants_push(&self) -> bool {
        let desired = &self.desired.version;
        self.acked_version.as_deref() != Some(desired)
            && self.sent.as_ref().map(|s| &s.version) != Some(desired)
            && self.nacked.as_ref().map(|(v, _)| v) != Some(desired)
    }
}

/// What is known at start-up about one device.
#[derive(Debug)]
pub struct Seed {
    pub device_id: String,
    pub desired: Arc<Rendered>,
    pub acked_version: Option<String>,
    pub nacked: Option<(String, String)>,
    pub last_seen_ms: Option<i64>,
}

#[derive(Debug, Default)]
pub struct Hub {
    devices: Mutex<HashMap<String, DeviceEntry>>,
    ready: AtomicBool,
    next_id: AtomicU64,
}

impl Hub {
    pub fn new() -> Hub {
        Hub::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, DeviceEntry>> {
        // A panic while holding the lock cannot leave an entry half-updated (every update is a
        // field assignment), so a poisoned lock is still consistent.
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Loads the state of every device and opens the hub for sessions.
    pub fn load(&self, seeds: Vec<Seed>) {
        let mut devices = self.lock();
        for seed in seeds {
            devices.insert(
                seed.device_id,
                DeviceEntry {
                    desired: seed.desired,
                    acked_version: seed.acked_version,
                    nacked: seed.nacked,
                    sent: None,
                    session: None,
                    last_seen_ms: seed.last_seen_ms,
                },
            );
        }
        self.ready.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Sets what a device should run (a new device, or a new render). Wakes its session if the
    /// version changed.
    pub fn set_desired(&self, device_id: &str, desired: Arc<Rendered>) {
        let mut devices = self.lock();
        match devices.get_mut(device_id) {
            Some(entry) => {
                if entry.desired.version != desired.version {
                    entry.desired = desired;
                    if let Some(session) = &entry.session {
                        session.changed.notify_one();
                    }
                }
            }
            None => {
                devices.insert(
                    device_id.to_string(),
                    DeviceEntry {
                        desired,
                        acked_version: None,
                        nacked: None,
                        sent: None,
                        session: None,
                        last_seen_ms: None,
                    },
                );
            }
        }
    }

    /// Registers a new session for a device that runs `running_version`, closing any older one.
    pub fn open_session(
        &self,
        device_id: &str,
        running_version: &str,
        now_ms: i64,
    ) -> Result<(SessionHandle, String), HubError> {
        if !self.is_ready() {
            return Err(HubError::NotReady);
        }
        let mut devices = self.lock();
        let entry = devices
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
        if !running_version.is_empty() {
            entry.acked_version = Some(running_version.to_string());
        }
        entry.sent = None;
        entry.last_seen_ms = Some(now_ms);
        // The first check happens at once: the device may be behind.
        handle.changed.notify_one();
        Ok((handle, entry.desired.version.clone()))
    }

    /// Forgets a session that ended; a newer session of the same device is left alone.
    pub fn close_session(&self, device_id: &str, session_id: u64, now_ms: i64) {
        let mut devices = self.lock();
        if let Some(entry) = devices.get_mut(device_id) {
            if entry.session.as_ref().map(|s| s.id) == Some(session_id) {
                entry.session = None;
                entry.sent = None;
                entry.last_seen_ms = Some(now_ms);
            }
        }
    }

    /// The push a session should send now, if any. Records it as sent.
    pub fn next_push(&self, device_id: &str, session_id: u64) -> Option<pb::RenderedSpec> {
        let mut devices = self.lock();
        let entry = devices.get_mut(device_id)?;
        if entry.session.as_ref().map(|s| s.id) != Some(session_id) || !entry.wants_push() {
            return None;
        }
        let nonce = format!(
            "{session_id:x}-{:x}",
            self.next_id.fetch_add(1, Ordering::Relaxed) + 1
        );
        entry.sent = Some(Sent {
            version: entry.desired.version.clone(),
            nonce: nonce.clone(),
        });
        let desired = &entry.desired;
        Some(pb::RenderedSpec {
            version: desired.version.clone(),
            content_hash: desired.content_hash.clone(),
            nonce,
            spec: Some(desired.spec.clone()),
        })
    }

    fn answer(
        &self,
        device_id: &str,
        session_id: u64,
        nonce: &str,
        apply: impl FnOnce(&mut DeviceEntry, String),
    ) -> Answer {
        let mut devices = self.lock();
        let Some(entry) = devices.get_mut(device_id) else {
            return Answer::Stale;
        };
        let current = entry.session.as_ref().map(|s| s.id) == Some(session_id);
        let Some(sent) = entry.sent.take_if(|s| current && s.nonce == nonce) else {
            return Answer::Stale;
        };
        apply(entry, sent.version);
        // A newer desired version may have arrived while this push was in flight.
        if let Some(session) = &entry.session {
            session.changed.notify_one();
        }
        Answer::Recorded {
            acked_version: entry.acked_version.clone(),
            nacked: entry.nacked.clone(),
        }
    }

    /// Records an ACK of the push with `nonce`.
    pub fn ack(&self, device_id: &str, session_id: u64, nonce: &str) -> Answer {
        self.answer(device_id, session_id, nonce, |entry, version| {
            entry.acked_version = Some(version);
            entry.nacked = None;
        })
    }

    /// Records a NACK of the push with `nonce`: that version is not resent.
    pub fn nack(&self, device_id: &str, session_id: u64, nonce: &str, error: &str) -> Answer {
        self.answer(device_id, session_id, nonce, |entry, version| {
            entry.nacked = Some((version, error.to_string()));
        })
    }

    /// Notes that a device was heard from (kept in memory only).
    pub fn touch(&self, device_id: &str, now_ms: i64) {
        if let Some(entry) = self.lock().get_mut(device_id) {
            entry.last_seen_ms = Some(now_ms);
        }
    }

    pub fn status(&self, device_id: &str) -> Option<SyncStatus> {
        self.lock().get(device_id).map(DeviceEntry::status)
    }

    /// Number of open sessions.
    pub fn connected(&self) -> usize {
        self.lock().values().filter(|e| e.session.is_some()).count()
    }

    /// Closes every open session (shutdown).
    pub fn close_all(&self) {
        for entry in self.lock().values() {
            if let Some(session) = &entry.session {
                session.closed.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::FileSpec;

    fn rendered(content: &str) -> Arc<Rendered> {
        Rendered::new(DeviceSpec {
            files: vec![FileSpec {
                path: "/etc/x".into(),
                content: content.into(),
                mode: 0o644,
            }],
        })
    }

    fn hub_with(device: &str, desired: Arc<Rendered>) -> Hub {
        let hub = Hub::new();
        hub.load(vec![Seed {
            device_id: device.into(),
            desired,
            acked_version: None,
            nacked: None,
            last_seen_ms: None,
        }]);
        hub
    }

    #[test]
    fn refuses_sessions_until_loaded_and_for_unknown_devices() {
        let hub = Hub::new();
        assert_eq!(
            hub.open_session("d", "", 0).unwrap_err(),
            HubError::NotReady
        );
        hub.load(vec![]);
        assert_eq!(
            hub.open_session("d", "", 0).unwrap_err(),
            HubError::UnknownDevice("d".into())
        );
    }

    #[test]
    fn push_ack_cycle_and_resume_without_push() {
        let v1 = rendered("1");
        let hub = hub_with("d", v1.clone());
        let (s, current) = hub.open_session("d", "", 0).unwrap();
        assert_eq!(current, v1.version);
        assert_eq!(hub.status("d").unwrap().state, SyncState::Pending);
        let push = hub.next_push("d", s.id).unwrap();
        assert_eq!(push.version, v1.version);
        assert!(hub.next_push("d", s.id).is_none(), "sent once only");
        assert_eq!(hub.ack("d", s.id, "bogus"), Answer::Stale);
        assert!(matches!(
            hub.ack("d", s.id, &push.nonce),
            Answer::Recorded { .. }
        ));
        assert_eq!(hub.status("d").unwrap().state, SyncState::Synced);

        hub.close_session("d", s.id, 1);
        assert_eq!(hub.status("d").unwrap().state, SyncState::Offline);
        let (s2, _) = hub.open_session("d", &v1.version, 2).unwrap();
        assert!(hub.next_push("d", s2.id).is_none(), "resume costs nothing");
        assert_eq!(hub.status("d").unwrap().state, SyncState::Synced);
    }

    #[test]
    fn nacked_version_is_not_resent_until_a_new_one_arrives() {
        let hub = hub_with("d", rendered("1"));
        let (s, _) = hub.open_session("d", "", 0).unwrap();
        let push = hub.next_push("d", s.id).unwrap();
        hub.nack("d", s.id, &push.nonce, "disk full");
        let status = hub.status("d").unwrap();
        assert_eq!(status.state, SyncState::Error);
        assert_eq!(status.last_error.as_deref(), Some("disk full"));
        assert!(hub.next_push("d", s.id).is_none());
        hub.set_desired("d", rendered("2"));
        assert!(hub.next_push("d", s.id).is_some());
    }

    #[test]
    fn a_newer_session_replaces_the_older() {
        let hub = hub_with("d", rendered("1"));
        let (old, _) = hub.open_session("d", "", 0).unwrap();
        let (new, _) = hub.open_session("d", "", 0).unwrap();
        assert!(hub.next_push("d", old.id).is_none());
        assert!(hub.next_push("d", new.id).is_some());
        hub.close_session("d", old.id, 1);
        assert!(
            hub.status("d").unwrap().online,
            "closing the old one keeps the new"
        );
        assert_eq!(hub.connected(), 1);
    }
}

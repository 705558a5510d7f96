//! The hub: in-memory state of every device's session and sync progress. It holds, per device, the
//! rendered spec the device should run, what was last pushed and acknowledged, and a handle to its
//! open session. Pushes are state-of-the-world: a session is *notified* that something changed and
//! then asks the hub what to send, so bursts coalesce and a slow agent never queues stale specs.
//! A new desired spec is *held* until the current wave is released: the wave task waits until
//! changes stop arriving for a short quiet period (bounded by a maximum delay), so a burst of edits
//! becomes one push per device. No I/O happens under the hub's lock.

mod device_status;
mod entry;
mod renewal;
mod sessions;
mod waves;

pub use device_status::StatusCounts;
pub use entry::{SyncState, SyncStatus};
pub use renewal::{CertStatus, DEFAULT_RENEWAL_SLOTS, RenewalRequest, RenewalState};
pub use sessions::{Answer, Push, RemoteSession, SessionHandle};
pub use waves::Debounce;

use crate::clock::Clock;
use crate::spec::{DeviceSpec, version_of};
use crate::status::DeviceReport;
use crate::status::conditions::Summary;
use entry::{DeviceEntry, entry_for};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{Notify, broadcast};

/// A rendered spec, shared by every holder (never copied per device).
#[derive(Debug, PartialEq)]
pub struct Rendered {
    /// The first hex digits of the content hash: what the device reports it runs.
    pub version: String,
    /// SHA-256 (hex) of the canonical spec.
    pub content_hash: String,
    /// Normalized, as the device receives it.
    pub spec: DeviceSpec,
}

impl Rendered {
    /// Wraps a rendered spec for sharing, with its version.
    pub fn new(spec: DeviceSpec) -> Arc<Rendered> {
        let content_hash = spec.content_hash();
        Rendered::with_hash(spec, content_hash)
    }

    /// Like `new`, for a caller that already computed `spec.content_hash()`.
    pub fn with_hash(spec: DeviceSpec, content_hash: String) -> Arc<Rendered> {
        Arc::new(Rendered {
            version: version_of(&content_hash),
            content_hash,
            spec: spec.normalized(),
        })
    }
}

/// The outcome of rendering one device: its spec, or why it could not be rendered.
pub type RenderOutcome = Result<Arc<Rendered>, String>;

/// Devices and certificates counted for metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HubSummary {
    /// Devices on the desired version.
    pub synced: usize,
    /// Devices online and not yet on it.
    pub pending: usize,
    /// Devices whose spec could not be rendered or was rejected.
    pub error: usize,
    /// Devices with no session anywhere (revoked ones aside).
    pub offline: usize,
    /// Devices whose certificate was revoked (not counted as offline).
    pub revoked: usize,
    /// Devices with a session on any replica.
    pub online: usize,
    /// Sessions this replica holds.
    pub sessions: usize,
    /// Certificates expiring within 7 days.
    pub expiring_7d: usize,
    /// Certificates expiring within 30 days.
    pub expiring_30d: usize,
    /// Certificates in their renewal window.
    pub renewal_due: usize,
    /// Devices by summary, condition and agent version.
    pub status: StatusCounts,
}

/// Devices read or written under one lock by those who handle many (a fleet's renders, its view):
/// enough to make the lock's cost vanish, few enough not to hold the sessions up for long.
pub const DEVICES_PER_LOCK: usize = 256;

/// Where a device stands, as a fleet's view counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standing {
    /// Its sync state.
    pub state: SyncState,
    /// What its conditions add up to.
    pub summary: Summary,
    /// Why its spec could not be rendered.
    pub render_error: Option<String>,
}

/// Capacity of the change feed; a watcher that falls further behind is told to resynchronise.
const EVENT_CAPACITY: usize = 4096;

/// Why the hub cannot open a session.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HubError {
    /// The state is not loaded yet.
    #[error("control plane is still loading its state; retry shortly")]
    NotReady,
    /// No such device.
    #[error("device {0} is not enrolled")]
    UnknownDevice(String),
}

/// What is known at start-up about one device.
#[derive(Debug)]
pub struct Seed {
    /// The device's id.
    pub device_id: String,
    /// Its render, or why it could not be rendered.
    pub desired: Result<Arc<Rendered>, String>,
    /// The version it last acknowledged.
    pub acked_version: Option<String>,
    /// The version it last rejected, with the reason.
    pub nacked: Option<(String, String)>,
    /// When it was last heard from, Unix milliseconds.
    pub last_seen_ms: Option<i64>,
    /// Its last status report.
    pub report: Option<DeviceReport>,
}

#[derive(Debug, Default)]
struct HubState {
    devices: HashMap<String, DeviceEntry>,
    /// Devices whose new desired spec waits for the current wave.
    wave: Vec<String>,
    /// Renewals running here and devices in line for one.
    renewals: renewal::RenewalSlots,
}

impl std::ops::Deref for HubState {
    type Target = HashMap<String, DeviceEntry>;
    fn deref(&self) -> &Self::Target {
        &self.devices
    }
}

impl std::ops::DerefMut for HubState {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.devices
    }
}

/// Every device's live state, shared by the sessions, the use cases and the metrics.
#[derive(Debug)]
pub struct Hub {
    state: Mutex<HubState>,
    /// Certificate windows, last-seen times and condition transitions are read from it.
    clock: Clock,
    ready: AtomicBool,
    next_id: AtomicU64,
    /// Bumped by every held change; the wave task watches it to find the end of a burst.
    generation: AtomicU64,
    wave_pending: Notify,
    pushes: AtomicU64,
    events: broadcast::Sender<String>,
    /// Renewals that may run at once.
    renewal_slots: AtomicUsize,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            state: Mutex::default(),
            clock: Clock::system(),
            ready: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            wave_pending: Notify::new(),
            pushes: AtomicU64::new(0),
            events: broadcast::channel(EVENT_CAPACITY).0,
            renewal_slots: AtomicUsize::new(renewal::DEFAULT_RENEWAL_SLOTS),
        }
    }
}

impl Hub {
    /// An empty hub on the system clock, not ready until `load`.
    pub fn new() -> Hub {
        Hub::default()
    }

    /// A hub that reads the time from `clock` (the control plane reads it from the hub's).
    pub fn with_clock(clock: Clock) -> Hub {
        Hub {
            clock,
            ..Hub::default()
        }
    }

    /// The clock the hub reads.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        // A panic while holding the lock cannot leave an entry half-updated (every update is a
        // field assignment), so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Announces that something about a device changed (for watchers; nobody listening is fine).
    pub fn changed(&self, device_id: &str) {
        if let Some(entry) = self.lock().get_mut(device_id) {
            entry.note_change(self.clock.now_millis());
        }
        self.announce(device_id);
    }

    /// Tells the watchers a device changed (its entry already settled).
    fn announce(&self, device_id: &str) {
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(device_id.to_string());
        }
    }

    /// A feed of ids of devices whose status or desired spec changed.
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.events.subscribe()
    }

    /// Number of specs pushed since start.
    pub fn pushes(&self) -> u64 {
        self.pushes.load(Ordering::Relaxed)
    }

    /// Loads the state of every device and opens the hub for sessions.
    pub fn load(&self, seeds: Vec<Seed>) {
        let mut devices = self.lock();
        for seed in seeds {
            let (desired, render_error) = match seed.desired {
                Ok(desired) => (Some(desired), None),
                Err(error) => (None, Some(error)),
            };
            let mut entry = DeviceEntry::new(desired);
            entry.render_error = render_error;
            entry.acked_version = seed.acked_version;
            entry.nacked = seed.nacked;
            entry.last_seen_ms = seed.last_seen_ms;
            entry.report = seed.report.map(Arc::new);
            entry.settle(self.clock.now_millis());
            devices.insert(seed.device_id, entry);
        }
        self.ready.store(true, Ordering::Release);
    }

    /// Whether `load` has run: sessions are refused before.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Forgets a device (deleted); its session is closed.
    pub fn remove(&self, device_id: &str) {
        if let Some(entry) = self.lock().remove(device_id)
            && let Some(session) = entry.session
        {
            session.closed.notify_one();
        }
        self.changed(device_id);
    }

    /// The spec a device should run, if one was rendered.
    pub fn desired(&self, device_id: &str) -> Option<Arc<Rendered>> {
        self.lock().get(device_id).and_then(|e| e.desired.clone())
    }

    /// A device's sync status now, or `None` for an unknown device.
    pub fn status(&self, device_id: &str) -> Option<SyncStatus> {
        self.lock().get_mut(device_id).map(|entry| {
            // Time alone can move a condition (a certificate entering its renewal window).
            let now_ms = self.clock.now_millis();
            entry.settle_if_time_moved(now_ms);
            entry.status(now_ms)
        })
    }

    /// Where each of `device_ids` stands (`None` for a device the hub does not know), without
    /// copying each one's whole status: what a fleet's view counts. A few hundred devices are
    /// read per lock, so a large fleet's view does not hold the sessions up.
    pub fn standings(&self, device_ids: &[String]) -> Vec<Option<Standing>> {
        let now_ms = self.clock.now_millis();
        let mut standings = Vec::with_capacity(device_ids.len());
        for chunk in device_ids.chunks(DEVICES_PER_LOCK) {
            let mut state = self.lock();
            standings.extend(chunk.iter().map(|id| {
                state.get_mut(id.as_str()).map(|entry| {
                    entry.settle_if_time_moved(now_ms);
                    Standing {
                        state: entry.sync_state(),
                        summary: entry.ledger.summary(),
                        render_error: entry.render_error.clone(),
                    }
                })
            }));
        }
        standings
    }

    /// Number of open sessions.
    pub fn connected(&self) -> usize {
        self.lock()
            .devices
            .values()
            .filter(|e| e.session.is_some())
            .count()
    }

    /// Counts devices by sync and connection state and certificates by urgency, for metrics.
    pub fn summary(&self, now_ms: i64) -> HubSummary {
        const DAY_MS: i64 = 24 * 3600 * 1000;
        let mut summary = HubSummary::default();
        for entry in self.lock().devices.values_mut() {
            // Time alone can move a condition (a certificate entering its renewal window).
            entry.settle_if_time_moved(now_ms);
            summary.status.count(entry);
            match entry.sync_state() {
                SyncState::Synced => summary.synced += 1,
                SyncState::Pending => summary.pending += 1,
                SyncState::Error => summary.error += 1,
                SyncState::Offline => summary.offline += 1,
                SyncState::Revoked => summary.revoked += 1,
            }
            if entry.session.is_some() {
                summary.sessions += 1;
            }
            if entry.session.is_some() || entry.elsewhere.is_some() {
                summary.online += 1;
            }
            if let Some(cert) = entry.cert.as_ref().filter(|c| !c.revoked) {
                let left = cert.not_after_ms - now_ms;
                summary.expiring_7d += usize::from(left < 7 * DAY_MS);
                summary.expiring_30d += usize::from(left < 30 * DAY_MS);
                summary.renewal_due += usize::from(cert.due(now_ms));
            }
        }
        summary
    }
}

#[cfg(test)]
mod tests;

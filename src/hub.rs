//! The hub: in-memory state of every device's session and sync progress. It holds, per device, the
//! rendered spec the device should run, what was last pushed and acknowledged, and a handle to its
//! open session. Pushes are state-of-the-world: a session is *notified* that something changed and
//! then asks the hub what to send, so bursts coalesce and a slow agent never queues stale specs.
//! A new desired spec is *held* until the current wave is released: the wave task waits until
//! changes stop arriving for a short quiet period (bounded by a maximum delay), so a burst of edits
//! becomes one push per device. No I/O happens under the hub's lock.

mod device_status;

pub use device_status::StatusCounts;

use crate::proto::agent::v1 as pb;
use crate::spec::{DeviceSpec, version_of};
use crate::status::DeviceReport;
use crate::status::conditions::{Condition, Ledger, Summary};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;

/// A rendered spec, shared by every holder (never copied per device).
#[derive(Debug, PartialEq)]
pub struct Rendered {
    pub version: String,
    pub content_hash: String,
    pub spec: pb::DeviceSpec,
}

impl Rendered {
    pub fn new(spec: DeviceSpec) -> Arc<Rendered> {
        let content_hash = spec.content_hash();
        Rendered::with_hash(spec, content_hash)
    }

    /// Like `new`, for a caller that already computed `spec.content_hash()`.
    pub fn with_hash(spec: DeviceSpec, content_hash: String) -> Arc<Rendered> {
        Arc::new(Rendered {
            version: version_of(&content_hash),
            content_hash,
            spec: spec.normalized().into(),
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
    /// Its certificate was revoked: it cannot connect until it enrolls again.
    Revoked,
}

/// A snapshot of one device's sync progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncStatus {
    pub online: bool,
    pub state: SyncState,
    /// Empty while no render of this device has succeeded since start.
    pub desired_version: String,
    pub sent_version: Option<String>,
    pub acked_version: Option<String>,
    pub last_error: Option<String>,
    /// Why the device's spec could not be rendered; it keeps its last good spec meanwhile.
    pub render_error: Option<String>,
    pub last_seen_ms: Option<i64>,
    pub certificate: Option<CertStatus>,
    /// The other replica that holds the device's session, when not this one.
    pub elsewhere: Option<String>,
    /// What the device last reported about itself.
    pub report: Option<Arc<DeviceReport>>,
    pub conditions: Vec<Condition>,
    pub summary: Summary,
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
    pub serial: String,
    pub not_after_ms: i64,
    pub renew_at_ms: i64,
    pub state: RenewalState,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone)]
struct CertTrack {
    serial: String,
    not_after_ms: i64,
    renew_at_ms: i64,
    last_error: Option<String>,
    /// When the device was last asked to renew.
    asked_ms: Option<i64>,
    /// A directive waits to be sent on the session.
    ask_now: bool,
    /// An operator asked for a renewal regardless of the window.
    forced: bool,
    /// The certificate was revoked.
    revoked: bool,
}

impl CertTrack {
    fn due(&self, now_ms: i64) -> bool {
        self.forced || now_ms >= self.renew_at_ms
    }

    fn status(&self, now_ms: i64) -> CertStatus {
        let state = if self.revoked {
            RenewalState::Revoked
        } else if now_ms >= self.not_after_ms {
            RenewalState::Expired
        } else if self.last_error.is_some() {
            RenewalState::Failed
        } else if self.due(now_ms) {
            RenewalState::Due
        } else {
            RenewalState::Valid
        };
        CertStatus {
            serial: self.serial.clone(),
            not_after_ms: self.not_after_ms,
            renew_at_ms: self.renew_at_ms,
            state,
            last_error: self.last_error.clone(),
        }
    }
}

/// Devices and certificates counted for metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HubSummary {
    pub synced: usize,
    pub pending: usize,
    pub error: usize,
    pub offline: usize,
    /// Devices whose certificate was revoked (not counted as offline).
    pub revoked: usize,
    /// Devices with a session on any replica.
    pub online: usize,
    /// Sessions this replica holds.
    pub sessions: usize,
    pub expiring_7d: usize,
    pub expiring_30d: usize,
    pub renewal_due: usize,
    pub status: StatusCounts,
}

/// A renewal directive for a session to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenewalRequest {
    pub reason: String,
    pub deadline_ms: i64,
}

/// How long changes are held so that bursts coalesce into one wave of pushes.
#[derive(Debug, Clone, Copy)]
pub struct Debounce {
    /// A wave is released once no change arrived for this long…
    pub quiet: Duration,
    /// …or once its first change has waited this long.
    pub max_delay: Duration,
}

impl Default for Debounce {
    fn default() -> Self {
        Debounce {
            quiet: Duration::from_millis(150),
            max_delay: Duration::from_secs(2),
        }
    }
}

/// Capacity of the change feed; a watcher that falls further behind is told to resynchronise.
const EVENT_CAPACITY: usize = 4096;

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
    at: Instant,
}

#[derive(Debug)]
struct DeviceEntry {
    /// `None` until a render of this device succeeded (only after a failed render at start).
    desired: Option<Arc<Rendered>>,
    /// Set when `desired` changed and the wave that carries it has not been released yet.
    held: bool,
    render_error: Option<String>,
    /// The version the device last acknowledged (or reported in Hello).
    acked_version: Option<String>,
    /// The version the device rejected, with its reason. Never resent automatically.
    nacked: Option<(String, String)>,
    sent: Option<Sent>,
    session: Option<SessionHandle>,
    /// Serial of the certificate the open session authenticated with.
    session_serial: Option<String>,
    last_seen_ms: Option<i64>,
    cert: Option<CertTrack>,
    /// Another replica holds the device's session (learnt from the change feed).
    elsewhere: Option<String>,
    report: Option<Arc<DeviceReport>>,
    /// Conditions with their transition times, settled on every change of the device.
    ledger: Ledger,
}

impl DeviceEntry {
    fn desired_version(&self) -> Option<&str> {
        self.desired.as_ref().map(|d| d.version.as_str())
    }

    fn status(&self) -> SyncStatus {
        let desired = self.desired_version();
        let online = self.session.is_some() || self.elsewhere.is_some();
        let nacked_desired = self
            .nacked
            .as_ref()
            .is_some_and(|(version, _)| Some(version.as_str()) == desired);
        let revoked = self.cert.as_ref().is_some_and(|c| c.revoked);
        let state = if revoked && !online {
            SyncState::Revoked
        } else if !online {
            SyncState::Offline
        } else if self.render_error.is_some() || nacked_desired {
            SyncState::Error
        } else if desired.is_none() || self.acked_version.as_deref() == desired {
            SyncState::Synced
        } else {
            SyncState::Pending
        };
        SyncStatus {
            online,
            state,
            desired_version: desired.unwrap_or_default().to_string(),
            sent_version: self.sent.as_ref().map(|s| s.version.clone()),
            acked_version: self.acked_version.clone(),
            // A rejection of a version the device is no longer meant to run is history, not
            // its state (the version is still never resent).
            last_error: self
                .nacked
                .as_ref()
                .filter(|_| nacked_desired)
                .map(|(_, e)| e.clone()),
            render_error: self.render_error.clone(),
            last_seen_ms: self.last_seen_ms,
            certificate: self
                .cert
                .as_ref()
                .map(|c| c.status(crate::clock::now_millis())),
            elsewhere: self.elsewhere.clone(),
            report: self.report.clone(),
            conditions: self.ledger.conditions().to_vec(),
            summary: self.ledger.summary(),
        }
    }

    fn wants_push(&self) -> bool {
        let Some(desired) = self.desired_version() else {
            return false;
        };
        !self.held
            && self.acked_version.as_deref() != Some(desired)
            && self.sent.as_ref().map(|s| s.version.as_str()) != Some(desired)
            && self.nacked.as_ref().map(|(v, _)| v.as_str()) != Some(desired)
    }

    fn new(desired: Option<Arc<Rendered>>) -> DeviceEntry {
        DeviceEntry {
            desired,
            held: false,
            render_error: None,
            acked_version: None,
            nacked: None,
            sent: None,
            session: None,
            session_serial: None,
            last_seen_ms: None,
            cert: None,
            elsewhere: None,
            report: None,
            ledger: Ledger::default(),
        }
    }

    fn wake(&self) {
        if let Some(session) = &self.session {
            session.changed.notify_one();
        }
    }
}

/// What is known at start-up about one device.
#[derive(Debug)]
pub struct Seed {
    pub device_id: String,
    pub desired: Result<Arc<Rendered>, String>,
    pub acked_version: Option<String>,
    pub nacked: Option<(String, String)>,
    pub last_seen_ms: Option<i64>,
    pub report: Option<DeviceReport>,
}

#[derive(Debug, Default)]
struct HubState {
    devices: HashMap<String, DeviceEntry>,
    /// Devices whose new desired spec waits for the current wave.
    wave: Vec<String>,
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

/// The entry of a device, created (with nothing to run yet) if it is new.
fn entry_for<'a>(
    devices: &'a mut HashMap<String, DeviceEntry>,
    device_id: &str,
) -> &'a mut DeviceEntry {
    devices
        .entry(device_id.to_string())
        .or_insert_with(|| DeviceEntry::new(None))
}

#[derive(Debug)]
pub struct Hub {
    state: Mutex<HubState>,
    ready: AtomicBool,
    next_id: AtomicU64,
    /// Bumped by every held change; the wave task watches it to find the end of a burst.
    generation: AtomicU64,
    wave_pending: Notify,
    pushes: AtomicU64,
    events: broadcast::Sender<String>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            state: Mutex::default(),
            ready: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            wave_pending: Notify::new(),
            pushes: AtomicU64::new(0),
            events: broadcast::channel(EVENT_CAPACITY).0,
        }
    }
}

impl Hub {
    pub fn new() -> Hub {
        Hub::default()
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        // A panic while holding the lock cannot leave an entry half-updated (every update is a
        // field assignment), so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Announces that something about a device changed (for watchers; nobody listening is fine).
    pub fn changed(&self, device_id: &str) {
        if let Some(entry) = self.lock().get_mut(device_id) {
            entry.settle(crate::clock::now_millis());
        }
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
            entry.settle(crate::clock::now_millis());
            devices.insert(seed.device_id, entry);
        }
        self.ready.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Sets what a device should run (a new device, or a new render). A changed version is held
    /// for the next wave.
    pub fn set_desired(&self, device_id: &str, desired: Arc<Rendered>) {
        let mut state = self.lock();
        let HubState { devices, wave } = &mut *state;
        let entry = entry_for(devices, device_id);
        let had_error = entry.render_error.take().is_some();
        if entry.desired_version() == Some(desired.version.as_str()) {
            // Same content: adopt the shared instance, push nothing.
            entry.desired = Some(desired);
            drop(state);
            if had_error {
                self.changed(device_id);
            }
            return;
        }
        entry.desired = Some(desired);
        let newly_held = !entry.held;
        entry.held = true;
        if newly_held {
            wave.push(device_id.to_string());
        }
        drop(state);
        self.generation.fetch_add(1, Ordering::Relaxed);
        self.wave_pending.notify_one();
        self.changed(device_id);
    }

    /// Records that a device's spec could not be rendered; it keeps its last good spec.
    pub fn set_render_failed(&self, device_id: &str, reason: String) {
        let mut state = self.lock();
        let entry = entry_for(&mut state.devices, device_id);
        if entry.render_error.as_ref() == Some(&reason) {
            return;
        }
        entry.render_error = Some(reason);
        drop(state);
        self.changed(device_id);
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

    /// Releases the held changes: every waiting session is woken to pull its new spec.
    pub fn release_wave(&self) -> usize {
        let mut state = self.lock();
        let wave = std::mem::take(&mut state.wave);
        for id in &wave {
            if let Some(entry) = state.get_mut(id) {
                entry.held = false;
                entry.wake();
            }
        }
        wave.len()
    }

    /// Runs forever, releasing each burst of changes as one wave once it has settled.
    pub async fn run_waves(&self, debounce: Debounce) {
        loop {
            self.wave_pending.notified().await;
            let first = Instant::now();
            loop {
                let seen = self.generation.load(Ordering::Relaxed);
                tokio::time::sleep(debounce.quiet).await;
                let settled = self.generation.load(Ordering::Relaxed) == seen;
                if settled || first.elapsed() >= debounce.max_delay {
                    break;
                }
            }
            let devices = self.release_wave();
            tracing::debug!(devices, "released a wave of spec changes");
        }
    }

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
        if let Some(cert) = entry.cert.as_mut() {
            // A device whose certificate is due is asked at once on its new session.
            let due = cert.due(now_ms) && now_ms < cert.not_after_ms;
            cert.ask_now = due;
            cert.asked_ms = due.then_some(now_ms);
        }
        // A new session gets the latest at once, whatever wave it belongs to.
        entry.held = false;
        entry.last_seen_ms = Some(now_ms);
        let current = entry.desired_version().unwrap_or_default().to_string();
        drop(state);
        // The first check happens at once: the device may be behind.
        handle.changed.notify_one();
        self.changed(device_id);
        Ok((handle, current))
    }

    /// Forgets a session that ended; a newer session of the same device is left alone.
    pub fn close_session(&self, device_id: &str, session_id: u64, now_ms: i64) {
        let mut state = self.lock();
        if let Some(entry) = state.get_mut(device_id)
            && entry.session.as_ref().map(|s| s.id) == Some(session_id)
        {
            entry.session = None;
            entry.session_serial = None;
            entry.sent = None;
            entry.last_seen_ms = Some(now_ms);
            drop(state);
            self.changed(device_id);
        }
    }

    /// The push a session should send now, if any. Records it as sent.
    pub fn next_push(&self, device_id: &str, session_id: u64) -> Option<pb::RenderedSpec> {
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
        drop(state);
        self.pushes.fetch_add(1, Ordering::Relaxed);
        crate::telemetry::spec_pushed();
        self.changed(device_id);
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
        drop(state);
        self.changed(device_id);
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

    /// Takes in what another replica recorded about a device: which replica holds its session
    /// (`None`: none, or this one) and its last answers. A session this replica still holds while
    /// a newer one is open elsewhere is stale and is closed: the newest session wins.
    pub fn note_remote(
        &self,
        device_id: &str,
        holder: Option<String>,
        acked_version: Option<String>,
        nacked: Option<(String, String)>,
    ) {
        let mut state = self.lock();
        let Some(entry) = state.get_mut(device_id) else {
            return;
        };
        if holder.is_none() && entry.session.is_some() {
            // Our own session: our answers are the newest.
            return;
        }
        if holder.is_some()
            && let Some(stale) = entry.session.take()
        {
            stale.closed.notify_one();
            entry.session_serial = None;
            entry.sent = None;
        }
        entry.elsewhere = holder;
        entry.acked_version = acked_version;
        entry.nacked = nacked;
        drop(state);
        self.changed(device_id);
    }

    /// Notes that a device was heard from (kept in memory only).
    pub fn touch(&self, device_id: &str, now_ms: i64) {
        if let Some(entry) = self.lock().get_mut(device_id) {
            entry.last_seen_ms = Some(now_ms);
        }
    }

    /// The spec a device should run, if one was rendered.
    pub fn desired(&self, device_id: &str) -> Option<Arc<Rendered>> {
        self.lock().get(device_id).and_then(|e| e.desired.clone())
    }

    pub fn status(&self, device_id: &str) -> Option<SyncStatus> {
        self.lock().get_mut(device_id).map(|entry| {
            // Time alone can move a condition (a certificate entering its renewal window).
            entry.settle(crate::clock::now_millis());
            entry.status()
        })
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
            entry.settle(now_ms);
            summary.status.count(entry);
            match entry.status().state {
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
        drop(state);
        self.changed(device_id);
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
            let left = (cert.not_after_ms - crate::clock::now_millis()).max(0) / 1000;
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

    /// Whether another replica holds the device's session.
    pub fn is_held_elsewhere(&self, device_id: &str) -> bool {
        self.lock()
            .get(device_id)
            .is_some_and(|e| e.session.is_none() && e.elsewhere.is_some())
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
        cert.asked_ms = Some(crate::clock::now_millis());
        session.changed.notify_one();
        true
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::FileSpec;

    fn rendered(content: &str) -> Arc<Rendered> {
        Rendered::new(DeviceSpec {
            files: vec![FileSpec::new("/etc/x", content)],
            ..Default::default()
        })
    }

    fn hub_with(device: &str, desired: Arc<Rendered>) -> Hub {
        let hub = Hub::new();
        hub.load(vec![Seed {
            device_id: device.into(),
            desired: Ok(desired),
            acked_version: None,
            nacked: None,
            last_seen_ms: None,
            report: None,
        }]);
        hub
    }

    #[test]
    fn refuses_sessions_until_loaded_and_for_unknown_devices() {
        let hub = Hub::new();
        assert_eq!(
            hub.open_session("d", "", "s", 0).unwrap_err(),
            HubError::NotReady
        );
        hub.load(vec![]);
        assert_eq!(
            hub.open_session("d", "", "s", 0).unwrap_err(),
            HubError::UnknownDevice("d".into())
        );
    }

    #[test]
    fn push_ack_cycle_and_resume_without_push() {
        let v1 = rendered("1");
        let hub = hub_with("d", v1.clone());
        let (s, current) = hub.open_session("d", "", "s", 0).unwrap();
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
        let (s2, _) = hub.open_session("d", &v1.version, "s", 2).unwrap();
        assert!(hub.next_push("d", s2.id).is_none(), "resume costs nothing");
        assert_eq!(hub.status("d").unwrap().state, SyncState::Synced);
    }

    #[test]
    fn nacked_version_is_not_resent_until_a_new_one_arrives() {
        let hub = hub_with("d", rendered("1"));
        let (s, _) = hub.open_session("d", "", "s", 0).unwrap();
        let push = hub.next_push("d", s.id).unwrap();
        hub.nack("d", s.id, &push.nonce, "disk full");
        let status = hub.status("d").unwrap();
        assert_eq!(status.state, SyncState::Error);
        assert_eq!(status.last_error.as_deref(), Some("disk full"));
        assert!(hub.next_push("d", s.id).is_none());
        hub.set_desired("d", rendered("2"));
        hub.release_wave();
        assert!(hub.next_push("d", s.id).is_some());
    }

    #[test]
    fn a_rejection_of_a_version_no_longer_wanted_is_not_shown_as_the_last_error() {
        let v1 = rendered("1");
        let hub = hub_with("d", v1.clone());
        let (s, _) = hub.open_session("d", &v1.version, "s", 0).unwrap();
        hub.set_desired("d", rendered("2"));
        hub.release_wave();
        let push = hub.next_push("d", s.id).unwrap();
        hub.nack("d", s.id, &push.nonce, "disk full");
        assert_eq!(
            hub.status("d").unwrap().last_error.as_deref(),
            Some("disk full")
        );
        // Back to the version the device runs: SYNCED, and the old rejection is history.
        hub.set_desired("d", v1);
        hub.release_wave();
        let status = hub.status("d").unwrap();
        assert_eq!(status.state, SyncState::Synced);
        assert_eq!(status.last_error, None);
        assert_eq!(status.summary, crate::status::conditions::Summary::Healthy);
    }

    #[test]
    fn changes_are_held_until_the_wave_and_coalesce() {
        let hub = hub_with("d", rendered("0"));
        let (s, _) = hub.open_session("d", "", "s", 0).unwrap();
        let push = hub.next_push("d", s.id).unwrap();
        hub.ack("d", s.id, &push.nonce);
        for i in 1..=50 {
            hub.set_desired("d", rendered(&i.to_string()));
        }
        assert!(hub.next_push("d", s.id).is_none(), "held until released");
        assert_eq!(hub.status("d").unwrap().state, SyncState::Pending);
        assert_eq!(hub.release_wave(), 1);
        let push = hub.next_push("d", s.id).unwrap();
        assert_eq!(push.version, rendered("50").version);
        assert!(hub.next_push("d", s.id).is_none());
        assert_eq!(hub.pushes(), 2);
    }

    #[test]
    fn a_render_failure_is_an_error_and_keeps_the_last_good_spec() {
        let good = rendered("1");
        let hub = hub_with("d", good.clone());
        let (s, _) = hub.open_session("d", &good.version, "s", 0).unwrap();
        hub.set_render_failed("d", "undefined label".into());
        let status = hub.status("d").unwrap();
        assert_eq!(status.state, SyncState::Error);
        assert_eq!(status.desired_version, good.version);
        assert!(hub.next_push("d", s.id).is_none());
        hub.set_desired("d", good.clone());
        assert_eq!(hub.status("d").unwrap().state, SyncState::Synced);
    }

    #[test]
    fn a_newer_session_replaces_the_older() {
        let hub = hub_with("d", rendered("1"));
        let (old, _) = hub.open_session("d", "", "s", 0).unwrap();
        let (new, _) = hub.open_session("d", "", "s", 0).unwrap();
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

//! One device as the hub holds it: what it should run, what was sent and answered, its session
//! and certificate, and the sync status all of that adds up to.

use super::renewal::{CertStatus, CertTrack};
use super::{Rendered, SessionHandle};
use crate::status::DeviceReport;
use crate::status::conditions::{CertificateStanding, Condition, Ledger, Summary};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::time::Instant;

/// Where a device stands, as the admin API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncState {
    /// Online and running the desired version.
    Synced,
    /// Online, the desired version not yet acknowledged.
    Pending,
    /// The render failed or the device rejected the desired version.
    Error,
    /// No session on any replica.
    Offline,
    /// Its certificate was revoked: it cannot connect until it enrolls again.
    Revoked,
}

/// A snapshot of one device's sync progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncStatus {
    /// A session is open on some replica.
    pub online: bool,
    /// Where the device stands.
    pub state: SyncState,
    /// Empty while no render of this device has succeeded since start.
    pub desired_version: String,
    /// The version last pushed on the open session.
    pub sent_version: Option<String>,
    /// The version the device last acknowledged.
    pub acked_version: Option<String>,
    /// Why the device rejected the desired version.
    pub last_error: Option<String>,
    /// Why the device's spec could not be rendered; it keeps its last good spec meanwhile.
    pub render_error: Option<String>,
    /// When the device was last heard from, Unix milliseconds.
    pub last_seen_ms: Option<i64>,
    /// Its certificate's renewal state.
    pub certificate: Option<CertStatus>,
    /// The other replica that holds the device's session, when not this one.
    pub elsewhere: Option<String>,
    /// What the device last reported about itself.
    pub report: Option<Arc<DeviceReport>>,
    /// The device's conditions, with their transition times.
    pub conditions: Vec<Condition>,
    /// What the conditions add up to.
    pub summary: Summary,
}

#[derive(Debug)]
pub(super) struct Sent {
    pub(super) version: String,
    pub(super) nonce: String,
    pub(super) at: Instant,
}

#[derive(Debug)]
pub(super) struct DeviceEntry {
    /// `None` until a render of this device succeeded (only after a failed render at start).
    pub(super) desired: Option<Arc<Rendered>>,
    /// Set when `desired` changed and the wave that carries it has not been released yet.
    pub(super) held: bool,
    pub(super) render_error: Option<String>,
    /// The version the device last acknowledged (or reported in Hello).
    pub(super) acked_version: Option<String>,
    /// The version the device rejected, with its reason. Never resent automatically.
    pub(super) nacked: Option<(String, String)>,
    pub(super) sent: Option<Sent>,
    pub(super) session: Option<SessionHandle>,
    /// Serial of the certificate the open session authenticated with.
    pub(super) session_serial: Option<String>,
    pub(super) last_seen_ms: Option<i64>,
    pub(super) cert: Option<CertTrack>,
    /// Another replica holds the device's session (learnt from the change feed).
    pub(super) elsewhere: Option<String>,
    pub(super) report: Option<Arc<DeviceReport>>,
    /// Conditions with their transition times, settled on every change of the device (of one held
    /// elsewhere, when next read).
    pub(super) ledger: Ledger,
    /// The certificate standing the ledger was last settled with (outer `None`: never settled),
    /// so a metrics pass re-settles only the devices that time has moved.
    pub(super) settled_standing: Option<Option<CertificateStanding>>,
    /// When the entry last changed without being settled (its session is elsewhere or nowhere):
    /// it is settled as of then when its status is next read.
    pub(super) unsettled_at: Option<i64>,
}

impl DeviceEntry {
    pub(super) fn desired_version(&self) -> Option<&str> {
        self.desired.as_ref().map(|d| d.version.as_str())
    }

    /// Where the device stands, without copying anything (the metrics count this for every device).
    pub(super) fn sync_state(&self) -> SyncState {
        let desired = self.desired_version();
        let online = self.session.is_some() || self.elsewhere.is_some();
        let revoked = self.cert.as_ref().is_some_and(|c| c.revoked);
        if revoked && !online {
            SyncState::Revoked
        } else if !online {
            SyncState::Offline
        } else if self.render_error.is_some() || self.nacked_desired() {
            SyncState::Error
        } else if desired.is_none() || self.acked_version.as_deref() == desired {
            SyncState::Synced
        } else {
            SyncState::Pending
        }
    }

    /// The device rejected the version it is meant to run.
    fn nacked_desired(&self) -> bool {
        let desired = self.desired_version();
        self.nacked
            .as_ref()
            .is_some_and(|(version, _)| Some(version.as_str()) == desired)
    }

    pub(super) fn status(&self, now_ms: i64) -> SyncStatus {
        let desired = self.desired_version();
        let online = self.session.is_some() || self.elsewhere.is_some();
        let nacked_desired = self.nacked_desired();
        let state = self.sync_state();
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
            certificate: self.cert.as_ref().map(|c| c.status(now_ms)),
            elsewhere: self.elsewhere.clone(),
            report: self.report.clone(),
            conditions: self.ledger.conditions().to_vec(),
            summary: self.ledger.summary(),
        }
    }

    pub(super) fn wants_push(&self) -> bool {
        let Some(desired) = self.desired_version() else {
            return false;
        };
        !self.held
            && self.acked_version.as_deref() != Some(desired)
            && self.sent.as_ref().map(|s| s.version.as_str()) != Some(desired)
            && self.nacked.as_ref().map(|(v, _)| v.as_str()) != Some(desired)
    }

    pub(super) fn new(desired: Option<Arc<Rendered>>) -> DeviceEntry {
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
            settled_standing: None,
            unsettled_at: None,
        }
    }

    pub(super) fn wake(&self) {
        if let Some(session) = &self.session {
            session.changed.notify_one();
        }
    }
}

/// The entry of a device, created (with nothing to run yet) if it is new. The id is copied only
/// for a new entry: this runs for every device of every render.
pub(super) fn entry_for<'a>(
    devices: &'a mut HashMap<String, DeviceEntry>,
    device_id: &str,
) -> &'a mut DeviceEntry {
    if !devices.contains_key(device_id) {
        devices.insert(device_id.to_string(), DeviceEntry::new(None));
    }
    match devices.get_mut(device_id) {
        Some(entry) => entry,
        None => unreachable!("the entry was inserted above"),
    }
}

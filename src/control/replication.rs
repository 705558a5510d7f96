//! Following the change feed: what other replicas committed — devices, fleets, revocations,
//! rollouts, enrollment decisions — is read back from the database and applied to this replica's
//! catalog and hub, so every replica renders, pushes, refuses and reports the same fleet. Most
//! changes name only their subject, which is re-read; the journal's session facts and a device's
//! move to another owner or revision carry what they committed instead. Either way applying a
//! change twice, or a change this replica made itself, is harmless.

use super::catalog::FleetEntry;
use super::{ControlError, ControlPlane, fleet_entry, owner_of, revisions_held};
use crate::hub::RemoteSession;
use crate::store::{
    ALL_DEVICES, Change, ChangeKind, DeviceOwner, DeviceRecord, FeedLane, SessionFacts,
};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;
use tokio::sync::Notify;

/// Most changes read at once.
const PAGE: i64 = 2000;
/// Most session changes read at once: one may carry the facts of a whole batch of devices.
const SESSION_PAGE: i64 = 200;
/// Wait before reading again after the database refused.
const RETRY: Duration = Duration::from_secs(1);

/// Where each lane of the feed stands: the last id applied and how far behind its newest change
/// was when applied (0 once caught up).
#[derive(Debug)]
struct LaneProgress {
    position: [AtomicI64; 2],
    lag_ms: [AtomicI64; 2],
}

impl LaneProgress {
    fn starting_at(position: i64) -> LaneProgress {
        LaneProgress {
            position: [AtomicI64::new(position), AtomicI64::new(position)],
            lag_ms: [AtomicI64::new(0), AtomicI64::new(0)],
        }
    }

    fn index(lane: FeedLane) -> usize {
        match lane {
            FeedLane::Sessions => 0,
            FeedLane::Others => 1,
        }
    }

    fn position(&self, lane: FeedLane) -> i64 {
        self.position[Self::index(lane)].load(Ordering::Acquire)
    }

    fn applied(&self, lane: FeedLane, id: i64, lag_ms: i64) {
        self.position[Self::index(lane)].store(id, Ordering::Release);
        self.lag_ms[Self::index(lane)].store(lag_ms, Ordering::Release);
    }

    fn caught_up(&self, lane: FeedLane) {
        self.lag_ms[Self::index(lane)].store(0, Ordering::Release);
    }

    /// Every change at or below the lower position is applied; the lag is the larger one.
    fn combined(&self) -> (i64, i64) {
        let [a, b] = &self.position;
        let [x, y] = &self.lag_ms;
        (
            a.load(Ordering::Acquire).min(b.load(Ordering::Acquire)),
            x.load(Ordering::Acquire).max(y.load(Ordering::Acquire)),
        )
    }
}

/// Devices the device lane re-read whole, each with the id of the newest change that made it: the
/// facts read then are at least as new as that change. Session facts a change carries are its
/// state as it committed, so the session lane, running on its own, must not apply facts carried
/// by an older change over such a re-read (nothing later would correct them). A mark is dropped
/// once the session lane has passed its id: every change it reads after that is newer.
#[derive(Debug, Default)]
pub(super) struct Rereads {
    at: HashMap<String, i64>,
}

impl Rereads {
    fn mark(&mut self, device_id: &str, change_id: i64) {
        let at = self.at.entry(device_id.to_string()).or_default();
        *at = (*at).max(change_id);
    }

    /// Whether facts carried by `change_id` are older than what was re-read of the device.
    fn supersede(&self, device_id: &str, change_id: i64) -> bool {
        self.at.get(device_id).is_some_and(|at| *at > change_id)
    }

    /// The session lane has applied everything up to `position`.
    fn passed(&mut self, position: i64) {
        if !self.at.is_empty() {
            self.at.retain(|_, at| *at > position);
        }
    }
}

/// What one page of changes touched, by kind.
#[derive(Debug, Default)]
struct Touched {
    /// Devices to re-read whole, with the newest change id of each.
    devices: BTreeMap<String, i64>,
    /// Devices of which only session facts changed, to re-read (unless also in `devices`).
    sessions: BTreeSet<String>,
    /// A batch's session facts could not be read: every device's are re-read.
    all_sessions: bool,
    /// The change of a batch whose owners could not be read: every device is re-read.
    all_devices: Option<i64>,
    /// Session facts the changes carried, the newest of each device with its change id (devices
    /// neither re-read whole nor in `sessions`).
    carried: BTreeMap<String, (i64, SessionFacts)>,
    /// Devices whose owner or revision alone changed, the newest of each with its change id
    /// (devices not re-read whole).
    moved: BTreeMap<String, (i64, DeviceOwner)>,
    fleets: BTreeSet<String>,
    certificates: BTreeSet<String>,
    rollouts: BTreeSet<String>,
    renewals: BTreeSet<String>,
    credentials: BTreeSet<String>,
    enrollments: bool,
}

impl Touched {
    fn of(changes: Vec<Change>) -> Touched {
        let mut touched = Touched::default();
        for change in changes.into_iter().filter(|c| !c.own) {
            let subject = change.subject;
            match change.kind {
                ChangeKind::Device if subject == ALL_DEVICES => {
                    touched.all_devices = Some(change.id);
                }
                ChangeKind::Device => match change.moved_to {
                    // As with session facts: a carried owner stands for its change unless the
                    // device is re-read anyway, which brings the newest owner along.
                    Some(owner) if !touched.devices.contains_key(&subject) => {
                        touched.moved.insert(subject, (change.id, owner));
                    }
                    _ => {
                        touched.moved.remove(&subject);
                        touched.devices.insert(subject, change.id);
                    }
                },
                ChangeKind::Session if subject == ALL_DEVICES => touched.all_sessions = true,
                ChangeKind::Session => match change.facts {
                    // Facts a change carries stand for it unless the device must be re-read
                    // anyway (an earlier change in the page carried none).
                    Some(facts) if !touched.sessions.contains(&subject) => {
                        touched.carried.insert(subject, (change.id, *facts));
                    }
                    _ => {
                        touched.carried.remove(&subject);
                        touched.sessions.insert(subject);
                    }
                },
                ChangeKind::Fleet => {
                    touched.fleets.insert(subject);
                }
                ChangeKind::Certificate => {
                    touched.certificates.insert(subject);
                }
                ChangeKind::Rollout => {
                    touched.rollouts.insert(subject);
                }
                ChangeKind::Enrollment => touched.enrollments = true,
                ChangeKind::Credential => {
                    touched.credentials.insert(subject);
                }
                ChangeKind::Renewal => {
                    touched.renewals.insert(subject);
                }
            }
        }
        // A device re-read whole brings its session facts along.
        let Touched {
            devices,
            sessions,
            carried,
            ..
        } = &mut touched;
        sessions.retain(|id| !devices.contains_key(id));
        carried.retain(|id, _| !devices.contains_key(id));
        touched
    }
}

impl ControlPlane {
    /// Follows the change feed forever, in its two lanes at once (`FeedLane`): each waits for a
    /// NOTIFY (no queries while nothing changes), then applies every change of its lane after the
    /// last one it applied. Does nothing on SQLite.
    pub async fn run_change_feed(&self) {
        if !self.store.has_change_feed() {
            return;
        }
        let sessions = Arc::new(Notify::new());
        let others = Arc::new(Notify::new());
        self.store
            .listen_for_changes(vec![sessions.clone(), others.clone()]);
        let start = self.feed_position.load(Ordering::Acquire);
        let progress = LaneProgress::starting_at(start);
        tokio::join!(
            self.follow_lane(FeedLane::Sessions, &sessions, &progress),
            self.follow_lane(FeedLane::Others, &others, &progress),
        );
    }

    async fn follow_lane(&self, lane: FeedLane, wake: &Notify, progress: &LaneProgress) {
        let mut failing = false;
        loop {
            wake.notified().await;
            loop {
                let position = progress.position(lane);
                let page = match lane {
                    FeedLane::Sessions => SESSION_PAGE,
                    FeedLane::Others => PAGE,
                };
                let changes = match self.store.changes_after(position, page, Some(lane)).await {
                    Ok(changes) => changes,
                    Err(error) => {
                        if !std::mem::replace(&mut failing, true) {
                            tracing::warn!(%error, ?lane, "change feed: could not read changes; retrying");
                        }
                        tokio::time::sleep(RETRY).await;
                        continue;
                    }
                };
                let Some(last) = changes.last().map(|c| (c.id, c.created_ms)) else {
                    progress.caught_up(lane);
                    self.publish_feed_progress(progress);
                    break;
                };
                if let Err(error) = self.apply_changes(changes).await {
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(%error, ?lane, "change feed: could not apply changes; retrying");
                    }
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
                failing = false;
                if lane == FeedLane::Sessions {
                    self.catalog_mut().rereads.passed(last.0);
                }
                progress.applied(lane, last.0, (self.now_millis() - last.1).max(0));
                self.publish_feed_progress(progress);
            }
        }
    }

    /// The position every change at or below which is applied (the lower lane's), and the lag of
    /// the lane further behind.
    fn publish_feed_progress(&self, progress: &LaneProgress) {
        let (position, lag_ms) = progress.combined();
        self.feed_position.store(position, Ordering::Release);
        self.feed_lag_ms.store(lag_ms, Ordering::Release);
    }

    /// Applies one page of changes made by other replicas.
    async fn apply_changes(&self, changes: Vec<Change>) -> Result<(), ControlError> {
        let mut touched = Touched::of(changes);
        // Certificates first: a revocation takes effect before anything else is looked at.
        if !touched.certificates.is_empty() {
            let mut revoked = self
                .store
                .get_certificates(touched.certificates.iter().cloned().collect())
                .await?;
            revoked.retain(|record| record.revoked_ms.is_some());
            self.enforce_revocation(&revoked);
        }
        if !touched.credentials.is_empty() {
            self.reload_credentials(&touched.credentials).await?;
        }
        if let Some(change_id) = touched.all_devices {
            // A re-read brings every device's newest owner, newer than any carried in the page.
            touched.moved.clear();
            let catalog = self.catalog();
            for device in catalog.devices() {
                let at = touched.devices.entry(device.id.clone()).or_default();
                *at = (*at).max(change_id);
            }
        }
        if !touched.devices.is_empty() || !touched.fleets.is_empty() || !touched.moved.is_empty() {
            self.apply_catalog_changes(&touched).await?;
        }
        if touched.all_sessions {
            // A re-read brings every device's newest facts, newer than any carried in the page.
            touched.carried.clear();
            let catalog = self.catalog();
            touched
                .sessions
                .extend(catalog.devices().map(|d| d.id.clone()));
        }
        if !touched.sessions.is_empty() || !touched.carried.is_empty() {
            let carried = std::mem::take(&mut touched.carried);
            self.apply_session_facts(&touched.sessions, carried).await?;
        }
        if !touched.rollouts.is_empty() {
            for id in &touched.rollouts {
                if let Some(record) = self.store.get_rollout(id).await? {
                    self.open_rollouts.set(record);
                }
            }
            self.rollout_changed.notify_waiters();
        }
        if touched.enrollments {
            self.count_enrollments().await?;
        }
        for device_id in &touched.renewals {
            // Only the replica holding the session can ask; the others have nothing to do.
            if self.hub.force_renewal(device_id) {
                tracing::info!(device.id = %device_id, "certificate renewal requested through another replica");
            }
        }
        Ok(())
    }

    /// Takes in what other replicas' devices answered and where their sessions are: re-read for
    /// `ids`, as the changes carried them for the rest. Nothing that renders a device changed, so
    /// nothing is re-rendered and the write lock is not needed.
    async fn apply_session_facts(
        &self,
        ids: &BTreeSet<String>,
        carried: BTreeMap<String, (i64, SessionFacts)>,
    ) -> Result<(), ControlError> {
        let mut facts = if ids.is_empty() {
            Vec::new()
        } else {
            self.store
                .session_facts(ids.iter().cloned().collect())
                .await?
        };
        let mut certificates = Vec::new();
        {
            // The catalog's lock is held until the hub has them too, so the device lane cannot
            // slip a re-read in between (see `Rereads`).
            let mut catalog = self.catalog_mut();
            facts.extend(
                carried
                    .into_iter()
                    .filter(|(id, (change_id, _))| !catalog.rereads.supersede(id, *change_id))
                    .map(|(_, (_, facts))| facts),
            );
            for facts in &facts {
                if let Some(certificate) = new_certificate(catalog.device(&facts.id), facts) {
                    certificates.push(certificate);
                }
                catalog.note_session(facts.clone());
            }
            self.note_remote_facts(facts);
        }
        self.track_new_certificates(certificates);
        Ok(())
    }

    /// Schedules the renewal of certificates other replicas issued; a device that renewed keeps its
    /// old certificate as a spare until it opens a session with the new one, wherever it does.
    fn track_new_certificates(&self, certificates: Vec<NewCertificate>) {
        for certificate in certificates {
            if certificate.renews {
                self.spares().insert(certificate.device_id.clone());
            }
            self.track_certificate(
                &certificate.device_id,
                &certificate.serial,
                certificate.not_after_ms,
            );
        }
    }

    /// Hands the hub what other replicas recorded of devices' sessions.
    fn note_remote_facts(&self, facts: Vec<SessionFacts>) {
        let mut sessions = Vec::with_capacity(facts.len());
        let mut reports = Vec::new();
        for facts in facts {
            let holder = facts
                .session_replica
                .filter(|r| r.as_str() != self.store.replica());
            if let Some(report) = facts.report {
                reports.push((facts.id.clone(), report));
            }
            sessions.push(RemoteSession {
                device_id: facts.id,
                holder,
                acked_version: facts.acked_version,
                nacked: facts.nacked,
            });
        }
        self.hub.note_remotes(sessions);
        for (device_id, report) in reports {
            self.hub.note_remote_report(&device_id, report);
        }
    }

    /// The changed fleets, each with the older revisions its devices are held at compiled (kept
    /// from this replica's catalog where it has them). Most pages change no fleet and cost nothing.
    async fn recompile_fleets(
        &self,
        entries: &HashMap<String, Option<FleetEntry>>,
        changed_devices: &[DeviceRecord],
        moves: &[Move<'_>],
    ) -> Result<Vec<FleetEntry>, ControlError> {
        let (fleets, held_at) = {
            let catalog = self.catalog();
            let mut fleets = Vec::new();
            for (name, entry) in entries {
                let Some(entry) = entry else { continue };
                let mut entry = entry.clone();
                if let Some(previous) = catalog.fleet(name) {
                    entry.pinned = previous.pinned.clone();
                    if previous.record.revision != entry.record.revision {
                        entry
                            .pinned
                            .insert(previous.record.revision, previous.template.clone());
                    }
                }
                fleets.push(entry);
            }
            if fleets.is_empty() {
                return Ok(fleets);
            }
            // The revisions devices are held at after this page (`compile_pinned` takes those of
            // these fleets): each device as this page has it, else as the catalog does. Read in
            // place, without copying the fleets' devices.
            let changed: HashSet<&str> = changed_devices
                .iter()
                .map(|d| d.id.as_str())
                .chain(moves.iter().map(|m| m.id))
                .collect();
            let held_at = revisions_held(
                catalog
                    .devices()
                    .filter(|d| !changed.contains(d.id.as_str()))
                    .chain(changed_devices)
                    .map(owner_of)
                    .chain(
                        moves
                            .iter()
                            .map(|m| (m.owner.fleet.as_deref(), m.owner.revision)),
                    ),
            );
            (fleets, held_at)
        };
        self.compile_pinned(fleets, &held_at).await
    }

    /// Re-reads changed fleets and devices, moves the devices whose owner alone changed, and
    /// re-renders what they affect.
    async fn apply_catalog_changes(&self, touched: &Touched) -> Result<(), ControlError> {
        let _writes = self.writes.lock().await;
        let mut entries = HashMap::new();
        for name in &touched.fleets {
            let entry = match self.store.get_fleet(name).await? {
                Some(record) => Some(fleet_entry(record)?),
                None => None,
            };
            entries.insert(name.clone(), entry);
        }
        // A carried owner is applied to the device as this replica knows it; a device it does
        // not know is re-read like any other.
        let mut reread = touched.devices.clone();
        let mut moves = Vec::new();
        {
            let catalog = self.catalog();
            for (id, (change_id, owner)) in &touched.moved {
                if catalog.device(id).is_some() {
                    moves.push(Move { id, owner });
                } else {
                    reread.insert(id.clone(), *change_id);
                }
            }
        }
        let devices: Vec<DeviceRecord> = self
            .store
            .get_devices(reread.keys().cloned().collect())
            .await?;
        let present: BTreeSet<&str> = devices.iter().map(|d| d.id.as_str()).collect();
        let gone: Vec<String> = reread
            .keys()
            .filter(|id| !present.contains(id.as_str()))
            .cloned()
            .collect();
        let compiled = self.recompile_fleets(&entries, &devices, &moves).await?;
        let mut certificates = Vec::new();
        let mut remote = Vec::new();
        {
            let mut catalog = self.catalog_mut();
            // Devices whose rendering may have changed; most pages carry only session facts
            // (opened, closed, acknowledged), which change what is shown, not what is rendered.
            let mut affected: BTreeSet<String> = BTreeSet::new();
            for (name, entry) in &entries {
                if entry.is_none() {
                    affected.extend(catalog.owned_by(name));
                    catalog.remove_fleet(name);
                }
            }
            for entry in compiled {
                let name = entry.record.name.clone();
                catalog.put_fleet(entry);
                affected.extend(catalog.owned_by(&name));
            }
            for id in &gone {
                catalog.remove_device(id);
                self.hub.remove(id);
                affected.remove(id);
            }
            for device in devices {
                let facts = SessionFacts::of(&device);
                if let Some(certificate) = new_certificate(catalog.device(&device.id), &facts) {
                    certificates.push(certificate);
                }
                remote.push(facts);
                if catalog.would_render_differently(&device) {
                    affected.insert(device.id.clone());
                }
                catalog.put_device(device);
            }
            for m in &moves {
                if catalog.move_device(m.id, m.owner) {
                    affected.insert(m.id.to_string());
                }
            }
            if entries.is_empty() {
                // No fleet changed: only the devices of this page can have changed conflicts.
                catalog.replan(
                    reread
                        .keys()
                        .map(String::as_str)
                        .chain(moves.iter().map(|m| m.id)),
                );
            } else {
                catalog.apply_owners(&Vec::new());
            }
            catalog.render_into(&self.hub, affected);
            // Moves are not marked: they brought no session facts, so the session lane's
            // carried facts still stand for them.
            for (id, change_id) in &reread {
                catalog.rereads.mark(id, *change_id);
            }
            // After rendering, so a device new to this replica has its hub entry; under the
            // catalog's lock, as the session lane does (see `Rereads`).
            self.note_remote_facts(remote);
        }
        self.track_new_certificates(certificates);
        Ok(())
    }
}

/// A device whose owner alone changed, as a change carried it.
struct Move<'a> {
    id: &'a str,
    owner: &'a DeviceOwner,
}

/// A device's certificate that another replica issued.
struct NewCertificate {
    device_id: String,
    serial: String,
    not_after_ms: i64,
    /// It renews one this replica knew, which stays valid until the device uses the new one.
    renews: bool,
}

/// The device's certificate, if `facts` name another one than the catalog knows it by (`known`).
fn new_certificate(known: Option<&DeviceRecord>, facts: &SessionFacts) -> Option<NewCertificate> {
    let serial = facts.cert_serial.clone()?;
    let not_after_ms = facts.cert_not_after_ms?;
    let known = known.and_then(|d| d.cert_serial.as_deref());
    (known != Some(serial.as_str())).then(|| NewCertificate {
        device_id: facts.id.clone(),
        serial,
        not_after_ms,
        renews: known.is_some(),
    })
}

/// What the leader remembers between housekeeping passes.
#[derive(Debug, Default)]
pub(super) struct Housekeeping {
    next_ms: i64,
    passes: u64,
    /// Replicas recorded as session holders that were not alive at the last pass.
    suspects: BTreeSet<String>,
}

/// Between housekeeping passes (the leader's only periodic queries, two per pass).
const HOUSEKEEPING_EVERY_MS: i64 = 30_000;
/// Change-feed rows are kept this long (a replica down longer reloads everything at start).
const FEED_RETENTION_MS: i64 = 3600 * 1000;

impl ControlPlane {
    /// The leader's periodic duties on PostgreSQL: sessions recorded for replicas that are gone
    /// (absent at two passes in a row) are forgotten, so their devices show offline; old
    /// change-feed rows are pruned.
    pub(super) async fn leader_housekeeping(&self) {
        if !self.store.has_change_feed() {
            return;
        }
        let now = self.now_millis();
        let (passes, suspects) = {
            let mut state = self.housekeeping.lock().unwrap_or_else(|p| p.into_inner());
            if now < state.next_ms {
                return;
            }
            state.next_ms = now + HOUSEKEEPING_EVERY_MS;
            state.passes += 1;
            (state.passes, state.suspects.clone())
        };
        let (holders, live) = match (
            self.store.session_holders().await,
            self.store.live_replicas().await,
        ) {
            (Ok(holders), Ok(live)) => (holders, live),
            (Err(error), _) | (_, Err(error)) => {
                tracing::debug!(%error, "housekeeping could not read the replicas");
                return;
            }
        };
        let absent: BTreeSet<String> = holders
            .into_iter()
            .filter(|h| !live.contains(h) && h.as_str() != self.store.replica())
            .collect();
        let gone: Vec<String> = absent.intersection(&suspects).cloned().collect();
        if !gone.is_empty() {
            match self.store.clear_sessions_of(gone.clone()).await {
                Ok(devices) => {
                    tracing::info!(replicas = ?gone, devices, "forgot the sessions of replicas that are gone")
                }
                Err(error) => {
                    tracing::warn!(%error, "could not forget the sessions of gone replicas")
                }
            }
        }
        self.housekeeping
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .suspects = absent;
        if passes % 10 == 1
            && let Err(error) = self.store.prune_changes(now - FEED_RETENTION_MS).await
        {
            tracing::debug!(%error, "could not prune the change feed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(id: &str, acked: &str) -> SessionFacts {
        SessionFacts {
            id: id.into(),
            acked_version: Some(acked.into()),
            nacked: None,
            agent_version: None,
            session_replica: Some("c".into()),
            cert_serial: None,
            cert_not_after_ms: None,
            report: None,
        }
    }

    fn change(id: i64, kind: ChangeKind, subject: &str, facts: Option<SessionFacts>) -> Change {
        Change {
            id,
            kind,
            subject: subject.into(),
            own: false,
            created_ms: 0,
            facts: facts.map(Box::new),
            moved_to: None,
        }
    }

    #[test]
    fn an_unreadable_batch_has_every_device_re_read() {
        let page = [
            change(1, ChangeKind::Session, "x", Some(facts("x", "v1"))),
            change(2, ChangeKind::Session, ALL_DEVICES, None),
        ];
        let touched = Touched::of(page.into());
        assert!(touched.all_sessions);
        assert_eq!(touched.all_devices, None);
        assert!(
            touched.sessions.is_empty(),
            "no device named by the empty subject"
        );
        let readable = Touched::of(vec![change(1, ChangeKind::Session, "x", None)]);
        assert!(!readable.all_sessions);
        let owners = Touched::of(vec![change(3, ChangeKind::Device, ALL_DEVICES, None)]);
        assert_eq!(owners.all_devices, Some(3));
        assert!(owners.devices.is_empty() && !owners.all_sessions);
    }

    #[test]
    fn a_page_uses_carried_facts_unless_the_device_must_be_re_read() {
        use ChangeKind::{Device, Session};
        let page = [
            change(1, Session, "x", Some(facts("x", "v1"))),
            change(2, Session, "x", None),
            change(3, Session, "x", Some(facts("x", "v3"))),
            change(4, Session, "y", Some(facts("y", "v4"))),
            change(5, Device, "y", None),
            change(6, Session, "z", Some(facts("z", "v6"))),
            change(7, Session, "z", Some(facts("z", "v7"))),
            Change {
                own: true,
                ..change(8, Session, "w", Some(facts("w", "v8")))
            },
        ];
        let touched = Touched::of(page.to_vec());
        assert_eq!(
            touched.sessions,
            BTreeSet::from(["x".to_string()]),
            "x had a change without facts: re-read, and its later facts are no newer than that"
        );
        assert_eq!(touched.devices, BTreeMap::from([("y".to_string(), 5)]));
        let carried: Vec<(&str, i64, &str)> = touched
            .carried
            .iter()
            .map(|(id, (at, f))| (id.as_str(), *at, f.acked_version.as_deref().unwrap()))
            .collect();
        assert_eq!(
            carried,
            [("z", 7, "v7")],
            "the newest facts of z; y is re-read whole; w is this replica's own"
        );
    }

    #[test]
    fn a_page_moves_devices_as_carried_unless_they_must_be_re_read() {
        use ChangeKind::Device;
        let owner = |fleet: &str, revision: Option<i64>| DeviceOwner {
            fleet: Some(fleet.into()),
            revision,
        };
        let moved = |id: i64, subject: &str, to: DeviceOwner| Change {
            moved_to: Some(to),
            ..change(id, Device, subject, None)
        };
        let page = [
            moved(1, "a", owner("web", None)),
            moved(2, "a", owner("web", Some(3))),
            moved(3, "b", owner("web", None)),
            change(4, Device, "b", None),
            change(5, Device, "c", None),
            moved(6, "c", owner("db", None)),
        ];
        let touched = Touched::of(page.to_vec());
        assert_eq!(
            touched.moved,
            BTreeMap::from([("a".to_string(), (2, owner("web", Some(3))))]),
            "the newest carried owner of a device moved only"
        );
        assert_eq!(
            touched.devices,
            BTreeMap::from([("b".to_string(), 4), ("c".to_string(), 6)]),
            "a device with any other change is re-read, up to its newest change"
        );
    }

    #[test]
    fn carried_facts_older_than_a_re_read_are_not_applied_until_the_lane_passes_it() {
        let mut rereads = Rereads::default();
        rereads.mark("d", 10);
        rereads.mark("d", 7);
        assert!(rereads.supersede("d", 9), "older than the re-read");
        assert!(!rereads.supersede("d", 11), "newer than the re-read");
        assert!(!rereads.supersede("e", 1), "never re-read");
        rereads.passed(9);
        assert!(rereads.supersede("d", 9), "the lane has not passed 10 yet");
        rereads.passed(10);
        assert!(rereads.at.is_empty(), "nothing older can come any more");
    }
}

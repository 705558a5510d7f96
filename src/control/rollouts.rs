//! Rollout use cases: starting (from a fleet change), the engine that carries out the planner's
//! decisions, pause, resume, rollback and the status view. Progress is persisted with every
//! transition (and the device pins it writes), so a restarted control plane continues where it was.
//!
//! A new revision during a rollout supersedes it: the open rollout is marked `superseded` and a new
//! one starts from its first batch with every device that is not on the newest revision.

use super::catalog::FleetEntry;
use super::{Actor, ControlError, ControlPlane};
use crate::audit::AuditEntry;
use crate::rollout::{Decision, DeviceState, Progress, RolloutSpec, plan};
use crate::store::{FleetRollout, Pins, RolloutEventRecord, RolloutRecord};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// How often the engine looks at progressing rollouts (memory only unless something changes).
const ENGINE_TICK: Duration = Duration::from_millis(500);

pub(super) const PROGRESSING: &str = "progressing";
pub(super) const PAUSED: &str = "paused";
pub(super) const COMPLETED: &str = "completed";
pub(super) const SUPERSEDED: &str = "superseded";

/// Open (progressing or paused) rollouts by fleet.
#[derive(Debug, Default)]
pub(super) struct OpenRollouts {
    by_fleet: Mutex<HashMap<String, RolloutRecord>>,
}

impl OpenRollouts {
    pub(super) fn get(&self, fleet: &str) -> Option<RolloutRecord> {
        self.lock().get(fleet).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, RolloutRecord>> {
        self.by_fleet.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn set(&self, record: RolloutRecord) {
        let mut open = self.lock();
        if record.state == PROGRESSING || record.state == PAUSED {
            open.insert(record.fleet.clone(), record);
        } else if open.get(&record.fleet).is_some_and(|r| r.id == record.id) {
            open.remove(&record.fleet);
        }
    }

    pub(super) fn all(&self) -> Vec<RolloutRecord> {
        self.lock().values().cloned().collect()
    }
}

/// What an operator can do to a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutCommand {
    /// Stop starting batches.
    Pause,
    /// Go on from where it paused.
    Resume,
    /// Back to the template of this revision, or of the one the latest rollout started from.
    Rollback {
        /// The revision to go back to.
        to_revision: Option<i64>,
    },
}

/// A rollout with live counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutView {
    /// The stored rollout.
    pub record: RolloutRecord,
    /// Batches in all, the implicit last one included.
    pub batches: usize,
    /// Names of the devices in the current batch.
    pub batch_devices: Vec<String>,
    /// Devices in the current batch.
    pub batch_size: usize,
    /// Of them, moved to the new revision.
    pub batch_moved: usize,
    /// Of them, SYNCED on it.
    pub batch_synced: usize,
    /// Of them, NACKing it.
    pub batch_nacked: usize,
    /// Of them, offline.
    pub batch_offline: usize,
    /// Devices of the fleet moved to the new revision.
    pub fleet_moved: usize,
    /// Devices of the fleet.
    pub fleet_devices: usize,
    /// Devices moved and not yet SYNCED (what the disruption budget limits).
    pub updating: usize,
    /// What happened, oldest first.
    pub events: Vec<RolloutEventRecord>,
}

fn event(at_ms: i64, event: &str, detail: impl Into<String>) -> RolloutEventRecord {
    RolloutEventRecord {
        at_ms,
        event: event.into(),
        detail: detail.into(),
    }
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

impl ControlPlane {
    /// What a fleet change means for rollouts: pins, a superseded rollout, a new rollout.
    /// `previous` is the fleet before the change; `revision` the revision it will have.
    pub(super) fn plan_fleet_rollout(
        &self,
        previous: Option<&FleetEntry>,
        revision: i64,
        policy: Option<&RolloutSpec>,
    ) -> (FleetRollout, Option<RolloutRecord>) {
        let mut change = FleetRollout::default();
        let Some(previous) = previous else {
            return (change, None);
        };
        let name = &previous.record.name;
        if revision == previous.record.revision {
            return (change, None);
        }
        let now = self.now_millis();
        if let Some(mut open) = self.open_rollouts.get(name) {
            open.state = SUPERSEDED.into();
            open.updated_ms = now;
            change.saves.push((
                open,
                event(
                    now,
                    SUPERSEDED,
                    format!("revision {revision} supersedes this rollout"),
                ),
            ));
        }
        let catalog = self.catalog();
        let owned = catalog.owned_by(name);
        if policy.is_none() {
            let pinned: Vec<String> = owned
                .into_iter()
                .filter(|id| {
                    catalog
                        .device(id)
                        .is_some_and(|d| d.fleet_revision.is_some())
                })
                .collect();
            change.pins.push(Pins {
                devices: pinned,
                revision: None,
            });
            return (change, None);
        }
        // Every device following the current revision is held at it; the rollout moves them.
        let following: Vec<String> = owned
            .into_iter()
            .filter(|id| {
                catalog
                    .device(id)
                    .is_some_and(|d| d.fleet_revision.is_none())
            })
            .collect();
        change.pins.push(Pins {
            devices: following,
            revision: Some(previous.record.revision),
        });
        let record = RolloutRecord {
            id: new_id(),
            fleet: name.clone(),
            from_revision: previous.record.revision,
            to_revision: revision,
            state: PROGRESSING.into(),
            batch: 0,
            members: Vec::new(),
            batch_started_ms: now,
            reason: String::new(),
            created_ms: now,
            updated_ms: now,
        };
        change.saves.push((
            record.clone(),
            event(
                self.now_millis(),
                "started",
                format!("revision {} → {revision}", previous.record.revision),
            ),
        ));
        (change, Some(record))
    }

    /// The devices of a fleet as the planner sees them, for a rollout to `to_revision`.
    fn rollout_devices(&self, fleet: &str, to_revision: i64) -> (Vec<DeviceState>, i64) {
        let catalog = self.catalog();
        let current = catalog
            .fleet(fleet)
            .map(|f| f.record.revision)
            .unwrap_or(to_revision);
        let devices = catalog
            .owned_by(fleet)
            .into_iter()
            .filter_map(|id| {
                let device = catalog.device(&id)?;
                let status = self.hub.status(&id);
                // A revoked device can never update: it is not part of the rollout.
                if status
                    .as_ref()
                    .is_some_and(|s| s.state == crate::hub::SyncState::Revoked)
                {
                    return None;
                }
                let moved = device.fleet_revision.unwrap_or(current) == to_revision;
                let state = status.as_ref().map(|s| s.state);
                // Done means the device acknowledged the target's render, even if it is offline
                // right now (say, reconnecting after a control-plane restart).
                let applied = status.as_ref().is_some_and(|s| {
                    !s.desired_version.is_empty()
                        && s.acked_version.as_deref() == Some(s.desired_version.as_str())
                });
                Some(DeviceState {
                    id,
                    name: device.name.clone(),
                    labels: device.labels.clone(),
                    moved,
                    synced: moved && applied,
                    nacked: moved && state == Some(crate::hub::SyncState::Error),
                    online: status.is_some_and(|s| s.online),
                })
            })
            .collect();
        (devices, current)
    }

    /// Persists a rollout transition, then mirrors it in memory (pins, renders, open rollouts).
    async fn record_transition(
        &self,
        record: RolloutRecord,
        what: RolloutEventRecord,
        pins: Vec<Pins>,
    ) -> Result<(), ControlError> {
        self.record_transition_by(record, what, pins, None).await
    }

    /// Records a transition; `call`, the record of the admin call that caused it, is appended in
    /// the same transaction.
    async fn record_transition_by(
        &self,
        record: RolloutRecord,
        what: RolloutEventRecord,
        pins: Vec<Pins>,
        call: Option<AuditEntry>,
    ) -> Result<(), ControlError> {
        tracing::info!(rollout.id = %record.id, fleet.name = %record.fleet, event = %what.event, detail = %what.detail, "rollout");
        let audit = call.map(|mut entry| {
            entry.revision = record.to_revision.to_string();
            self.audited(vec![entry])
        });
        self.store
            .save_rollout(record.clone(), what, pins.clone(), audit)
            .await?;
        {
            let mut catalog = self.catalog_mut();
            for pin in &pins {
                catalog.pin(&pin.devices, pin.revision);
                catalog.render_into(&self.hub, pin.devices.iter().cloned());
            }
        }
        self.open_rollouts.set(record);
        self.rollout_changed.notify_waiters();
        Ok(())
    }

    /// One engine step for one progressing rollout.
    async fn step_rollout(&self, mut record: RolloutRecord) -> Result<(), ControlError> {
        let policy = self
            .catalog()
            .fleet(&record.fleet)
            .and_then(|f| f.record.rollout.clone())
            .map(|spec| spec.to_policy());
        let now = self.now_millis();
        let (devices, current) = self.rollout_devices(&record.fleet, record.to_revision);
        let decision = match policy {
            Some(Ok(policy)) => {
                let progress = Progress {
                    batch: record.batch as usize,
                    members: record.members.clone(),
                    batch_started_ms: record.batch_started_ms,
                };
                plan(&policy, &devices, &progress, now)
            }
            // The policy was removed (or the fleet deleted): nothing holds the devices back.
            _ => Decision::Complete,
        };
        record.updated_ms = now;
        match decision {
            Decision::Wait => Ok(()),
            Decision::StartBatch { batch, members } => {
                let detail = format!("batch {}: {} device(s)", batch + 1, members.len());
                record.members.push(members);
                record.batch_started_ms = now;
                self.record_transition(
                    record,
                    event(self.now_millis(), "batch-started", detail),
                    vec![],
                )
                .await
            }
            Decision::Move(ids) => {
                let detail = format!("{} device(s) to revision {}", ids.len(), record.to_revision);
                let pins = vec![Pins {
                    devices: ids,
                    revision: Some(record.to_revision),
                }];
                self.record_transition(record, event(self.now_millis(), "moved", detail), pins)
                    .await
            }
            Decision::Advance => {
                let detail = format!("batch {} done", record.batch + 1);
                record.batch += 1;
                record.batch_started_ms = now;
                self.record_transition(
                    record,
                    event(self.now_millis(), "batch-done", detail),
                    vec![],
                )
                .await
            }
            Decision::Complete => {
                record.state = COMPLETED.into();
                let mut pins = Vec::new();
                if record.to_revision == current {
                    pins.push(Pins {
                        devices: devices.iter().map(|d| d.id.clone()).collect(),
                        revision: None,
                    });
                }
                let detail = format!("every device on revision {}", record.to_revision);
                self.record_transition(record, event(self.now_millis(), COMPLETED, detail), pins)
                    .await
            }
            Decision::Pause(reason) => {
                record.state = PAUSED.into();
                record.reason = reason.clone();
                self.record_transition(record, event(self.now_millis(), PAUSED, reason), vec![])
                    .await
            }
        }
    }

    /// Drives every progressing rollout, forever — while this replica leads. A replica that
    /// becomes leader re-reads the open rollouts first and resumes from their persisted state.
    pub async fn run_rollout_engine(&self) {
        let mut interval = tokio::time::interval(ENGINE_TICK);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        self.store.contend_for_leadership(self.leading.clone());
        let mut was_leading = false;
        loop {
            interval.tick().await;
            let leading = self.leading.load(std::sync::atomic::Ordering::Acquire);
            if leading && !was_leading && self.store.has_change_feed() {
                match self.store.list_open_rollouts().await {
                    Ok(open) => {
                        for rollout in open {
                            self.open_rollouts.set(rollout);
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "new leader could not read the open rollouts; retrying");
                        continue;
                    }
                }
            }
            was_leading = leading;
            if !leading {
                continue;
            }
            self.leader_housekeeping().await;
            let progressing: Vec<RolloutRecord> = self
                .open_rollouts
                .all()
                .into_iter()
                .filter(|r| r.state == PROGRESSING)
                .collect();
            for record in progressing {
                let _writes = self.writes.lock().await;
                // Re-read under the lock: a fleet change may have superseded it meanwhile.
                let Some(current) = self
                    .open_rollouts
                    .get(&record.fleet)
                    .filter(|r| r.id == record.id && r.state == PROGRESSING)
                else {
                    continue;
                };
                if let Err(error) = self.step_rollout(current).await {
                    tracing::error!(rollout.id = %record.id, fleet.name = %record.fleet, %error, "rollout step failed");
                }
            }
        }
    }

    /// The fleet's open rollout, which must be in `state`.
    fn open_rollout_in(&self, fleet: &str, state: &str) -> Result<RolloutRecord, ControlError> {
        if self.catalog().fleet(fleet).is_none() {
            return Err(ControlError::NotFound(format!("fleet {fleet:?} not found")));
        }
        let record = self.open_rollouts.get(fleet).ok_or_else(|| {
            ControlError::FailedPrecondition(format!("fleet {fleet:?} has no rollout in progress"))
        })?;
        if record.state != state {
            return Err(ControlError::FailedPrecondition(format!(
                "the rollout of {fleet:?} is {}, not {state}",
                record.state
            )));
        }
        Ok(record)
    }

    /// Carries out an operator's command on a fleet's rollout.
    pub async fn command_rollout(
        &self,
        fleet: &str,
        command: RolloutCommand,
        actor: &Actor,
    ) -> Result<RolloutView, ControlError> {
        match command {
            RolloutCommand::Pause => self.pause_rollout(fleet, actor).await,
            RolloutCommand::Resume => self.resume_rollout(fleet, actor).await,
            RolloutCommand::Rollback { to_revision } => {
                self.rollback_rollout(fleet, to_revision, actor).await
            }
        }
    }

    /// Pauses a fleet's rollout.
    pub async fn pause_rollout(
        &self,
        fleet: &str,
        actor: &Actor,
    ) -> Result<RolloutView, ControlError> {
        let _writes = self.writes.lock().await;
        let mut record = self.open_rollout_in(fleet, PROGRESSING)?;
        record.state = PAUSED.into();
        record.reason = format!("paused by {actor}");
        record.updated_ms = self.now_millis();
        let reason = record.reason.clone();
        let call = actor.record(self.now_millis(), format!("fleet/{fleet}"));
        self.record_transition_by(
            record,
            event(self.now_millis(), PAUSED, reason),
            vec![],
            Some(call),
        )
        .await?;
        self.rollout_view(fleet).await
    }

    /// Resumes a fleet's paused rollout.
    pub async fn resume_rollout(
        &self,
        fleet: &str,
        actor: &Actor,
    ) -> Result<RolloutView, ControlError> {
        let _writes = self.writes.lock().await;
        let mut record = self.open_rollout_in(fleet, PAUSED)?;
        record.state = PROGRESSING.into();
        record.reason = String::new();
        record.batch_started_ms = self.now_millis();
        record.updated_ms = record.batch_started_ms;
        let call = actor.record(self.now_millis(), format!("fleet/{fleet}"));
        self.record_transition_by(
            record,
            event(self.now_millis(), "resumed", format!("by {actor}")),
            vec![],
            Some(call),
        )
        .await?;
        self.rollout_view(fleet).await
    }

    /// Rolls the fleet back to the template of `to_revision`, or of the revision its latest
    /// rollout started from, as a new revision rolled out under the fleet's policy.
    pub async fn rollback_rollout(
        &self,
        fleet: &str,
        to_revision: Option<i64>,
        actor: &Actor,
    ) -> Result<RolloutView, ControlError> {
        let entry = self
            .catalog()
            .fleet(fleet)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(format!("fleet {fleet:?} not found")))?;
        let target = match to_revision {
            Some(revision) if revision == entry.record.revision => {
                return Err(ControlError::FailedPrecondition(format!(
                    "fleet {fleet:?} is at revision {revision} already"
                )));
            }
            Some(revision) => revision,
            None => self
                .store
                .latest_rollout(fleet)
                .await?
                .ok_or_else(|| {
                    ControlError::FailedPrecondition(format!(
                        "fleet {fleet:?} has no rollout to roll back; name a revision to return to"
                    ))
                })?
                .from_revision,
        };
        let template = self
            .store
            .list_fleet_revisions(fleet)
            .await?
            .into_iter()
            .find(|r| r.revision == target)
            .map(|r| r.template)
            .ok_or_else(|| {
                ControlError::NotFound(format!("fleet {fleet:?} has no revision {target}"))
            })?;
        tracing::info!(fleet.name = %fleet, to = target, by = %actor, "rolling back");
        let mut call = actor.record(self.now_millis(), format!("fleet/{fleet}"));
        call.reason = format!("to the template of revision {target}");
        self.apply_fleet_recorded(
            super::FleetApply {
                name: fleet.to_string(),
                selector: entry.record.selector.clone(),
                label_defaults: entry.record.label_defaults.clone(),
                template,
                rollout: entry.record.rollout.clone(),
            },
            actor,
            call,
        )
        .await?;
        self.rollout_view(fleet).await
    }

    /// The fleet's latest rollout with live counts and its events.
    pub async fn rollout_view(&self, fleet: &str) -> Result<RolloutView, ControlError> {
        if self.catalog().fleet(fleet).is_none() {
            return Err(ControlError::NotFound(format!("fleet {fleet:?} not found")));
        }
        let record = match self.open_rollouts.get(fleet) {
            Some(open) => open,
            None => self.store.latest_rollout(fleet).await?.ok_or_else(|| {
                ControlError::NotFound(format!("fleet {fleet:?} has had no rollout"))
            })?,
        };
        let events = self.store.rollout_events(&record.id).await?;
        Ok(self.rollout_counts(record, events))
    }

    fn rollout_counts(
        &self,
        record: RolloutRecord,
        events: Vec<RolloutEventRecord>,
    ) -> RolloutView {
        let (devices, _) = self.rollout_devices(&record.fleet, record.to_revision);
        let batches = self
            .catalog()
            .fleet(&record.fleet)
            .and_then(|f| f.record.rollout.as_ref().map(|r| r.batches.len()))
            .map(|n| n + 1)
            .unwrap_or(1);
        let members: Vec<&String> = record
            .members
            .get(record.batch as usize)
            .map(|m| m.iter().collect())
            .unwrap_or_default();
        let in_batch: Vec<&DeviceState> = devices
            .iter()
            .filter(|d| members.contains(&&d.id))
            .collect();
        let mut batch_devices: Vec<String> = in_batch.iter().map(|d| d.name.clone()).collect();
        batch_devices.sort();
        RolloutView {
            batches,
            batch_devices,
            batch_size: in_batch.len(),
            batch_moved: in_batch.iter().filter(|d| d.moved).count(),
            batch_synced: in_batch.iter().filter(|d| d.synced).count(),
            batch_nacked: in_batch.iter().filter(|d| d.nacked).count(),
            batch_offline: in_batch.iter().filter(|d| !d.online).count(),
            fleet_moved: devices.iter().filter(|d| d.moved).count(),
            fleet_devices: devices.len(),
            updating: devices.iter().filter(|d| d.moved && !d.synced).count(),
            events,
            record,
        }
    }

    /// Open rollouts with their progress, for metrics: (fleet, moved share, paused).
    pub(super) fn rollout_gauges(&self) -> Vec<(String, f64, bool)> {
        self.open_rollouts
            .all()
            .into_iter()
            .map(|record| {
                let (devices, _) = self.rollout_devices(&record.fleet, record.to_revision);
                let moved = devices.iter().filter(|d| d.synced).count();
                let share = if devices.is_empty() {
                    1.0
                } else {
                    moved as f64 / devices.len() as f64
                };
                (record.fleet, share, record.state == PAUSED)
            })
            .collect()
    }

    /// Waits until some rollout changes (or `timeout` passes).
    pub async fn rollout_changed(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.rollout_changed.notified()).await;
    }
}

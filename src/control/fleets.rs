//! Fleet use cases: apply (create or update; a changed template is a new revision), read, list,
//! delete. Each change re-decides the owner of every device and re-renders the devices it moves
//! or owns; the hub then pushes what changed in one wave.

use super::catalog::FleetEntry;
use super::devices::parse_selector;
use super::{Actor, ControlError, ControlPlane};
use crate::audit::AuditEntry;
use crate::hub::SyncState;
use crate::names::{validate_labels, validate_name};
use crate::render::CompiledTemplate;
use crate::rollout::RolloutSpec;
use crate::spec::DeviceSpec;
use crate::store::{FleetRecord, FleetRevision, FleetWrite};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// A fleet as an operator applies it.
#[derive(Debug, Clone)]
pub struct FleetApply {
    /// The fleet's name.
    pub name: String,
    /// Its label selector.
    pub selector: String,
    /// Values the template sees for labels a device lacks.
    pub label_defaults: BTreeMap<String, String>,
    /// The spec template its devices render.
    pub template: DeviceSpec,
    /// How new revisions reach the devices; `None`: all at once.
    pub rollout: Option<RolloutSpec>,
}

/// A fleet with what it currently owns.
#[derive(Debug, Clone)]
pub struct FleetView {
    /// The stored fleet.
    pub record: FleetRecord,
    /// Names of the devices the fleet owns.
    pub devices: Vec<String>,
    /// Owned devices by sync state.
    pub synced: usize,
    /// Owned devices PENDING.
    pub pending: usize,
    /// Owned devices in ERROR.
    pub error: usize,
    /// Owned devices OFFLINE.
    pub offline: usize,
    /// Devices this fleet's selector matches together with other fleets: (device, all matching).
    pub conflicts: Vec<(String, Vec<String>)>,
    /// Owned devices whose render failed: (device, reason).
    pub render_failures: Vec<(String, String)>,
    /// Owned devices by status summary (`Healthy`, `Degraded`, ...).
    pub summaries: std::collections::BTreeMap<&'static str, usize>,
}

fn has_template_syntax(template: &DeviceSpec) -> bool {
    let text = serde_json::to_string(template).unwrap_or_default();
    text.contains("{{") || text.contains("{%") || text.contains("{#")
}

impl ControlPlane {
    fn fleet_view(&self, name: &str) -> Option<FleetView> {
        let catalog = self.catalog();
        let fleet = catalog.fleet(name)?;
        let mut view = FleetView {
            record: fleet.record.clone(),
            devices: Vec::new(),
            synced: 0,
            pending: 0,
            error: 0,
            offline: 0,
            conflicts: catalog
                .conflicted_in(name)
                .into_iter()
                .map(|d| (d.name.clone(), catalog.conflicts(&d.id).to_vec()))
                .collect(),
            render_failures: Vec::new(),
            summaries: Default::default(),
        };
        let owned = catalog.owned_by(name);
        for (id, standing) in owned.iter().zip(self.hub.standings(&owned)) {
            let Some(device) = catalog.device(id) else {
                continue;
            };
            view.devices.push(device.name.clone());
            let Some(standing) = standing else {
                continue;
            };
            match standing.state {
                SyncState::Synced => view.synced += 1,
                SyncState::Pending => view.pending += 1,
                SyncState::Error => view.error += 1,
                SyncState::Offline | SyncState::Revoked => view.offline += 1,
            }
            *view.summaries.entry(standing.summary.as_str()).or_default() += 1;
            if let Some(reason) = standing.render_error {
                view.render_failures.push((device.name.clone(), reason));
            }
        }
        view.devices.sort();
        view.render_failures.sort();
        Some(view)
    }

    /// Every fleet with what it owns.
    pub async fn list_fleets(&self) -> Result<Vec<FleetView>, ControlError> {
        let names: Vec<String> = self
            .catalog()
            .fleets()
            .map(|f| f.record.name.clone())
            .collect();
        Ok(names.iter().filter_map(|n| self.fleet_view(n)).collect())
    }

    /// One fleet with what it owns, or `NotFound`.
    pub async fn get_fleet(&self, name: &str) -> Result<FleetView, ControlError> {
        validate_name(name).map_err(|e| ControlError::invalid("name", e))?;
        self.fleet_view(name).ok_or_else(|| fleet_not_found(name))
    }

    /// A fleet's template revisions, oldest first.
    pub async fn list_fleet_revisions(
        &self,
        name: &str,
    ) -> Result<Vec<FleetRevision>, ControlError> {
        validate_name(name).map_err(|e| ControlError::invalid("name", e))?;
        if self.catalog().fleet(name).is_none() {
            return Err(fleet_not_found(name));
        }
        Ok(self.store.list_fleet_revisions(name).await?)
    }

    /// Creates or updates a fleet. Nothing is stored if any part of it is invalid.
    pub async fn apply_fleet(
        &self,
        apply: FleetApply,
        actor: &Actor,
    ) -> Result<FleetView, ControlError> {
        let record = actor.record(self.now_millis(), format!("fleet/{}", apply.name));
        self.apply_fleet_recorded(apply, actor, record).await
    }

    /// Applies a fleet with `record` (the call that caused it) appended in its transaction, the
    /// revision it produced filled in.
    pub(super) async fn apply_fleet_recorded(
        &self,
        apply: FleetApply,
        actor: &Actor,
        record: AuditEntry,
    ) -> Result<FleetView, ControlError> {
        validate_name(&apply.name).map_err(|e| ControlError::invalid("name", e))?;
        let selector = parse_selector(&apply.selector)?;
        validate_labels(&apply.label_defaults)
            .map_err(|e| ControlError::invalid("defaults.labels", e))?;
        if !has_template_syntax(&apply.template) {
            apply
                .template
                .validate()
                .map_err(|e| ControlError::invalid(e.field().replacen("spec", "template", 1), e))?;
        }
        if let Some(spec) = &apply.rollout {
            spec.to_policy()
                .map_err(|e| ControlError::invalid(e.field.clone(), e.reason))?;
        }
        let template = apply.template.normalized();
        let compiled =
            CompiledTemplate::compile(&apply.name, &template, apply.label_defaults.clone())
                .map_err(|e| ControlError::invalid(e.field.clone(), e.reason))?;

        let began = tokio::time::Instant::now();
        let writes = self.writes.lock().await;
        let locked = began.elapsed();
        let now = self.now_millis();
        let previous = self.catalog().fleet(&apply.name).cloned();
        let revision = match &previous {
            Some(p) if p.record.template == template => p.record.revision,
            Some(p) => p.record.revision + 1,
            None => 1,
        };
        let mut pinned = previous
            .as_ref()
            .map(|p| p.pinned.clone())
            .unwrap_or_default();
        if let Some(p) = &previous
            && p.record.revision != revision
        {
            pinned.insert(p.record.revision, p.template.clone());
        }
        let mut entry = FleetEntry {
            record: FleetRecord {
                name: apply.name.clone(),
                selector: selector.to_string(),
                label_defaults: apply.label_defaults.clone(),
                revision: 0,
                template: template.clone(),
                created_ms: now,
                updated_ms: now,
                rollout: apply.rollout.clone(),
            },
            selector,
            template: Arc::new(compiled),
            pinned,
        };
        let changes = self.catalog().plan_with(&apply.name, Some(&entry));
        let (rollout_change, started) =
            self.plan_fleet_rollout(previous.as_ref(), revision, apply.rollout.as_ref());
        let pins = rollout_change.pins.clone();
        let saves = rollout_change.saves.clone();
        let write = FleetWrite {
            name: apply.name.clone(),
            selector: entry.record.selector.clone(),
            label_defaults: apply.label_defaults,
            template,
            rollout: apply.rollout,
            actor: actor.to_string(),
            now_ms: now,
        };
        let planned = began.elapsed();
        entry.record = self
            .store
            .apply_fleet(
                write,
                changes.clone(),
                rollout_change,
                self.audited(vec![record]),
            )
            .await?;
        let stored = began.elapsed();
        let revision = entry.record.revision;
        for (record, _) in saves {
            self.open_rollouts.set(record);
        }
        if let Some(started) = &started {
            tracing::info!(rollout.id = %started.id, fleet.name = %apply.name, from = started.from_revision, to = started.to_revision, "rollout started");
        }
        self.rollout_changed.notify_waiters();
        let (devices, failed) = {
            let mut catalog = self.catalog_mut();
            catalog.put_fleet(entry);
            for pin in &pins {
                catalog.pin(&pin.devices, pin.revision);
            }
            catalog.apply_owners(&changes);
            let mut affected: BTreeSet<String> =
                catalog.owned_by(&apply.name).into_iter().collect();
            affected.extend(changes.iter().map(|(id, _)| id.clone()));
            let count = affected.len();
            (count, catalog.render_into(&self.hub, affected))
        };
        let rendered = began.elapsed();
        // The view only reads: the next write need not wait for it.
        drop(writes);
        let view = self
            .fleet_view(&apply.name)
            .ok_or_else(|| fleet_not_found(&apply.name));
        // Where a slow apply of a large fleet spent its time, cumulative from the call.
        tracing::info!(
            fleet.name = %apply.name,
            fleet.revision = revision,
            moved = changes.len(),
            devices,
            render_failures = failed,
            by = %actor,
            writes_locked_ms = locked.as_millis() as u64,
            planned_ms = planned.as_millis() as u64,
            stored_ms = stored.as_millis() as u64,
            rendered_ms = rendered.as_millis() as u64,
            viewed_ms = began.elapsed().as_millis() as u64,
            "fleet applied"
        );
        view
    }

    /// Deletes a fleet; its devices move to the fleet that now matches them alone, or to none.
    pub async fn delete_fleet(&self, name: &str, actor: &Actor) -> Result<(), ControlError> {
        validate_name(name).map_err(|e| ControlError::invalid("name", e))?;
        let _writes = self.writes.lock().await;
        if self.catalog().fleet(name).is_none() {
            return Err(fleet_not_found(name));
        }
        let changes = self.catalog().plan_with(name, None);
        let audit = self.audited(vec![
            actor.record(self.now_millis(), format!("fleet/{name}")),
        ]);
        if !self
            .store
            .delete_fleet(name, changes.clone(), audit)
            .await?
        {
            return Err(fleet_not_found(name));
        }
        {
            let mut catalog = self.catalog_mut();
            catalog.remove_fleet(name);
            catalog.apply_owners(&changes);
            catalog.render_into(&self.hub, changes.iter().map(|(id, _)| id.clone()));
        }
        tracing::info!(fleet.name = %name, released = changes.len(), by = %actor, "fleet deleted");
        Ok(())
    }
}

fn fleet_not_found(name: &str) -> ControlError {
    ControlError::NotFound(format!("fleet {name:?} not found"))
}

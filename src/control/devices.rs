//! Device use cases: list (by selector), read, set overrides and labels. Reads come from the
//! catalog and the hub; every change re-decides the device's fleet and re-renders it.

use super::{Actor, ControlError, ControlPlane};
use crate::audit::AuditEntry;
use crate::hub::{Rendered, SyncState, SyncStatus};
use crate::names::{validate_label_key, validate_labels, validate_name};
use crate::scope::Scope;
use crate::selector::Selector;
use crate::spec::DeviceSpec;
use crate::status::conditions::Summary;
use crate::status::field_selector::{Field, FieldSelector};
use crate::store::{DeviceChange, DeviceRecord};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A device with its live sync status.
#[derive(Debug, Clone)]
pub struct DeviceView {
    /// The stored device.
    pub record: DeviceRecord,
    /// Its live sync status (`None` before the hub knows it).
    pub status: Option<SyncStatus>,
    /// The fleets that all match the device, when more than one does.
    pub conflicts: Vec<String>,
    /// The complete rendered spec (fleet template plus overrides); only filled by `get_device`.
    pub rendered: Option<Arc<Rendered>>,
    /// The replica that holds the device's session, if any does.
    pub session_replica: Option<String>,
}

/// A request to set a device's overrides (and labels).
#[derive(Debug, Clone)]
pub struct DeviceUpdate {
    /// The device's name.
    pub name: String,
    /// The device's own spec, laid over its fleet's template.
    pub spec: DeviceSpec,
    /// Replaces the labels when set.
    pub labels: Option<BTreeMap<String, String>>,
}

/// A request to change some labels of a device.
#[derive(Debug, Clone, Default)]
pub struct LabelChange {
    /// The device's name.
    pub name: String,
    /// Labels to set.
    pub set: BTreeMap<String, String>,
    /// Label keys to remove.
    pub remove: Vec<String>,
}

pub(super) fn parse_selector(text: &str) -> Result<Selector, ControlError> {
    Selector::parse(text).map_err(|e| ControlError::invalid("selector", e))
}

/// Which devices a list or watch wants: a label selector and a field selector on the status.
#[derive(Debug, Clone, Default)]
pub(super) struct DeviceFilter {
    pub labels: Selector,
    fields: FieldSelector,
    /// The caller's scope: devices outside it are never shown.
    pub scope: Scope,
}

impl DeviceFilter {
    pub(super) fn parse(
        labels: &str,
        fields: &str,
        scope: &Scope,
    ) -> Result<DeviceFilter, ControlError> {
        Ok(DeviceFilter {
            labels: parse_selector(labels)?,
            fields: fields
                .parse()
                .map_err(|e| ControlError::invalid("field_selector", e))?,
            scope: scope.clone(),
        })
    }

    pub(super) fn matches(&self, view: &DeviceView) -> bool {
        self.labels.matches(&view.record.labels)
            && self.scope.covers_labels(&view.record.labels)
            && (self.fields.is_empty() || self.fields.matches(|field| field_value(view, field)))
    }
}

/// A device's value of a status field, as field selectors compare it.
fn field_value(view: &DeviceView, field: Field) -> String {
    let status = view.status.as_ref();
    let info = status
        .and_then(|s| s.report.as_ref())
        .and_then(|r| r.system_info.as_ref());
    match field {
        Field::Summary => status
            .map_or(Summary::Unknown, |s| s.summary)
            .as_str()
            .to_string(),
        Field::Os => info.map(|i| i.os_id.clone()).unwrap_or_default(),
        Field::Arch => info.map(|i| i.architecture.clone()).unwrap_or_default(),
        Field::AgentVersion => view
            .record
            .agent_version
            .clone()
            .filter(|v| !v.is_empty())
            .or_else(|| info.map(|i| i.agent_version.clone()))
            .unwrap_or_default(),
        Field::Online => status.is_some_and(|s| s.online).to_string(),
        Field::SyncState => match status.map(|s| s.state) {
            Some(SyncState::Synced) => "Synced",
            Some(SyncState::Pending) => "Pending",
            Some(SyncState::Error) => "Error",
            Some(SyncState::Offline) | None => "Offline",
            Some(SyncState::Revoked) => "Revoked",
        }
        .to_string(),
    }
}

/// Where a listing starts and how much of it to return.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    /// At most this many (0: all).
    pub size: usize,
    /// Only names after this one (the previous page's last).
    pub after: Option<String>,
}

/// The largest page a listing returns.
pub const MAX_PAGE: usize = 5000;

impl ControlPlane {
    fn view_of(&self, record: DeviceRecord, conflicts: Vec<String>) -> DeviceView {
        let status = self.hub.status(&record.id);
        let session_replica = status.as_ref().and_then(|s| {
            s.elsewhere
                .clone()
                .or_else(|| s.online.then(|| self.store.replica().to_string()))
        });
        DeviceView {
            record,
            status,
            conflicts,
            rendered: None,
            session_replica,
        }
    }

    /// The current view of a device by id, if it exists.
    pub(super) fn view_by_id(&self, id: &str) -> Option<DeviceView> {
        let (record, conflicts) = {
            let catalog = self.catalog();
            let record = catalog.device(id)?.clone();
            (record, catalog.conflicts(id).to_vec())
        };
        Some(self.view_of(record, conflicts))
    }

    /// Devices whose labels match `selector` and whose status matches `field_selector` (empty:
    /// all), by name.
    pub async fn list_devices(
        &self,
        selector: &str,
        field_selector: &str,
        scope: &Scope,
    ) -> Result<Vec<DeviceView>, ControlError> {
        Ok(self
            .list_devices_page(selector, field_selector, scope, Page::default())?
            .0)
    }

    /// A page of the matching devices in name order, and the token of the next page if more
    /// follow. The token is the last name of the page: pages stay consistent while devices come
    /// and go (a device added before the token's name is not seen, as in any paged listing).
    pub fn list_devices_page(
        &self,
        selector: &str,
        field_selector: &str,
        scope: &Scope,
        page: Page,
    ) -> Result<(Vec<DeviceView>, Option<String>), ControlError> {
        let filter = DeviceFilter::parse(selector, field_selector, scope)?;
        let mut found: Vec<(DeviceRecord, Vec<String>)> = {
            let catalog = self.catalog();
            catalog
                .devices()
                .filter(|d| {
                    page.after
                        .as_deref()
                        .is_none_or(|after| d.name.as_str() > after)
                })
                .filter(|d| filter.labels.matches(&d.labels) && scope.covers_labels(&d.labels))
                .map(|d| (d.clone(), catalog.conflicts(&d.id).to_vec()))
                .collect()
        };
        found.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        let limit = if page.size == 0 {
            usize::MAX
        } else {
            page.size.min(MAX_PAGE)
        };
        let mut views = found
            .into_iter()
            .map(|(record, conflicts)| self.view_of(record, conflicts))
            .filter(|view| filter.matches(view));
        let devices: Vec<DeviceView> = views.by_ref().take(limit).collect();
        let next = (views.next().is_some())
            .then(|| devices.last().map(|d| d.record.name.clone()))
            .flatten();
        Ok((devices, next))
    }

    /// One device with its status, or `NotFound`.
    pub async fn get_device(&self, name: &str) -> Result<DeviceView, ControlError> {
        validate_name(name).map_err(|e| ControlError::invalid("name", e))?;
        let id = self
            .catalog()
            .device_by_name(name)
            .map(|d| d.id.clone())
            .ok_or_else(|| not_found(name))?;
        let mut view = self.view_by_id(&id).ok_or_else(|| not_found(name))?;
        view.rendered = self.hub.desired(&id);
        Ok(view)
    }

    /// Validates and stores a device's overrides (and labels), then re-renders it.
    pub async fn apply_device(
        &self,
        update: DeviceUpdate,
        actor: &Actor,
    ) -> Result<DeviceView, ControlError> {
        validate_name(&update.name).map_err(|e| ControlError::invalid("name", e))?;
        update
            .spec
            .validate()
            .map_err(|e| ControlError::invalid(e.field(), e))?;
        if let Some(labels) = &update.labels {
            validate_labels(labels).map_err(|e| ControlError::invalid("labels", e))?;
        }
        let spec = update.spec.normalized();
        let mut record = actor.record(self.now_millis(), format!("device/{}", update.name));
        record.revision = crate::spec::version_of(&spec.content_hash());
        if let Some(labels) = &update.labels {
            record.reason = format!("labels {}", describe_labels(labels));
        }
        let view = self
            .change_device(&update.name, Some(spec), update.labels, record)
            .await?;
        tracing::info!(device.id = %view.record.id, device.name = %view.record.name, "device spec applied");
        Ok(view)
    }

    /// Sets and removes labels of a device; it may move to another fleet.
    pub async fn label_device(
        &self,
        change: LabelChange,
        actor: &Actor,
    ) -> Result<DeviceView, ControlError> {
        validate_name(&change.name).map_err(|e| ControlError::invalid("name", e))?;
        validate_labels(&change.set).map_err(|e| ControlError::invalid("labels", e))?;
        for key in &change.remove {
            validate_label_key(key).map_err(|e| ControlError::invalid("remove", e))?;
            if change.set.contains_key(key) {
                return Err(ControlError::invalid(
                    "remove",
                    format!("label {key:?} is both set and removed"),
                ));
            }
        }
        let current = self
            .catalog()
            .device_by_name(&change.name)
            .map(|d| d.labels.clone())
            .ok_or_else(|| not_found(&change.name))?;
        let mut record = actor.record(self.now_millis(), format!("device/{}", change.name));
        let mut described = Vec::new();
        if !change.set.is_empty() {
            described.push(format!("set {}", describe_labels(&change.set)));
        }
        if !change.remove.is_empty() {
            described.push(format!("removed {}", change.remove.join(",")));
        }
        record.reason = described.join("; ");
        let mut labels = current;
        labels.extend(change.set);
        for key in &change.remove {
            labels.remove(key);
        }
        let view = self
            .change_device(&change.name, None, Some(labels), record)
            .await?;
        tracing::info!(device.id = %view.record.id, device.name = %view.record.name, fleet = ?view.record.fleet, "device labels changed");
        Ok(view)
    }

    /// Stores a device change together with the owner it implies and the call's audit record, then
    /// re-renders the device.
    async fn change_device(
        &self,
        name: &str,
        spec: Option<DeviceSpec>,
        labels: Option<BTreeMap<String, String>>,
        mut record: AuditEntry,
    ) -> Result<DeviceView, ControlError> {
        let _writes = self.writes.lock().await;
        let owner_change = {
            let catalog = self.catalog();
            let device = catalog
                .device_by_name(name)
                .ok_or_else(|| not_found(name))?;
            record.device_id = device.id.clone();
            let labels = labels.as_ref().unwrap_or(&device.labels);
            let owner = catalog.placement_for(labels, device.fleet.as_deref()).owner;
            (owner != device.fleet).then_some(owner)
        };
        // A device that changes fleet follows its new fleet's current revision.
        let fleet_revision = owner_change.is_some().then_some(None);
        let change = DeviceChange {
            spec,
            labels,
            fleet: owner_change,
            fleet_revision,
        };
        let record = self
            .store
            .update_device(name, change, self.now_millis(), self.audited(vec![record]))
            .await?
            .ok_or_else(|| not_found(name))?;
        let id = record.id.clone();
        {
            let mut catalog = self.catalog_mut();
            catalog.put_device(record);
            catalog.replan([id.as_str()]);
            catalog.render_into(&self.hub, [id.clone()]);
        }
        self.view_by_id(&id).ok_or_else(|| not_found(name))
    }
}

/// `a=1,b=2`, as a selector would say it.
pub(super) fn describe_labels(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn not_found(name: &str) -> ControlError {
    ControlError::NotFound(format!("device {name:?} not found"))
}

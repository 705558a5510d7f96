//! Device use cases: list, read, and set the spec (which is pushed at once).

use super::{ControlError, ControlPlane};
use crate::clock::now_millis;
use crate::hub::{Rendered, SyncStatus};
use crate::names::{validate_labels, validate_name};
use crate::spec::DeviceSpec;
use crate::store::DeviceRecord;
use std::collections::BTreeMap;

/// A device with its live sync status.
#[derive(Debug, Clone)]
pub struct DeviceView {
    pub record: DeviceRecord,
    pub status: Option<SyncStatus>,
}

/// A request to change a device.
#[derive(Debug, Clone)]
pub struct DeviceUpdate {
    pub name: String,
    pub spec: DeviceSpec,
    /// Replaces the labels when set.
    pub labels: Option<BTreeMap<String, String>>,
}

impl ControlPlane {
    fn view(&self, record: DeviceRecord) -> DeviceView {
        let status = self.hub.status(&record.id);
        DeviceView { record, status }
    }

    pub async fn list_devices(&self) -> Result<Vec<DeviceView>, ControlError> {
        let records = self.store.list_devices().await?;
        Ok(records.into_iter().map(|r| self.view(r)).collect())
    }

    pub async fn get_device(&self, name: &str) -> Result<DeviceView, ControlError> {
        validate_name(name).map_err(|e| ControlError::invalid("name", e))?;
        let record = self
            .store
            .get_device_by_name(name)
            .await?
            .ok_or_else(|| ControlError::NotFound(format!("device {name:?} not found")))?;
        Ok(self.view(record))
    }

    /// Validates and stores a device's spec (and labels), then hands the new render to the hub.
    pub async fn apply_device(&self, update: DeviceUpdate) -> Result<DeviceView, ControlError> {
        validate_name(&update.name).map_err(|e| ControlError::invalid("name", e))?;
        update
            .spec
            .validate()
            .map_err(|e| ControlError::invalid(e.field(), e))?;
        if let Some(labels) = &update.labels {
            validate_labels(labels).map_err(|e| ControlError::invalid("labels", e))?;
        }
        let spec = update.spec.normalized();
        let record = self
            .store
            .update_device(&update.name, spec.clone(), update.labels, now_millis())
            .await?
            .ok_or_else(|| ControlError::NotFound(format!("device {:?} not found", update.name)))?;
        self.hub.set_desired(&record.id, Rendered::new(spec));
        tracing::info!(device.id = %record.id, device.name = %record.name, "device spec applied");
        Ok(self.view(record))
    }
}

//! Where a credential's scope is enforced: the checks every admin write and single read of a
//! device, fleet, rollout, enrollment request or certificate passes before its use case runs, and
//! the filters lists and watches apply. Outside the scope is `PERMISSION_DENIED` naming it.

use super::{ControlError, ControlPlane};
use crate::scope::Scope;
use std::collections::BTreeMap;

fn outside(what: String, scope: &Scope) -> ControlError {
    ControlError::PermissionDenied(format!(
        "{what} is outside this credential's scope ({scope})"
    ))
}

impl ControlPlane {
    /// A device (by name) must be in scope. An unknown name passes: the use case says not found.
    pub fn ensure_device_in_scope(&self, name: &str, scope: &Scope) -> Result<(), ControlError> {
        if scope.is_everything() {
            return Ok(());
        }
        match self.catalog().device_by_name(name) {
            Some(device) if !scope.covers_labels(&device.labels) => {
                Err(outside(format!("device {name:?}"), scope))
            }
            _ => Ok(()),
        }
    }

    /// Labels a write would give a device must be in scope.
    pub fn ensure_labels_in_scope(
        &self,
        what: &str,
        labels: &BTreeMap<String, String>,
        scope: &Scope,
    ) -> Result<(), ControlError> {
        if scope.covers_labels(labels) {
            Ok(())
        } else {
            Err(outside(what.to_string(), scope))
        }
    }

    /// A fleet (by name) must only reach devices in scope. An unknown name passes.
    pub fn ensure_fleet_in_scope(&self, name: &str, scope: &Scope) -> Result<(), ControlError> {
        if scope.is_everything() {
            return Ok(());
        }
        match self.catalog().fleet(name) {
            Some(fleet) if !scope.covers_selector(&fleet.selector) => Err(outside(
                format!("fleet {name:?} (selector {})", fleet.selector),
                scope,
            )),
            _ => Ok(()),
        }
    }

    /// A selector a write would give a fleet must only reach devices in scope.
    pub fn ensure_selector_in_scope(
        &self,
        selector: &str,
        scope: &Scope,
    ) -> Result<(), ControlError> {
        if scope.is_everything() {
            return Ok(());
        }
        let parsed = super::devices::parse_selector(selector)?;
        if scope.covers_selector(&parsed) {
            Ok(())
        } else {
            Err(outside(format!("the selector {selector:?}"), scope))
        }
    }

    /// An enrollment request's labels (with those an approval adds) must be in scope.
    pub async fn ensure_enrollment_in_scope(
        &self,
        name: &str,
        extra_labels: &BTreeMap<String, String>,
        scope: &Scope,
    ) -> Result<(), ControlError> {
        if scope.is_everything() {
            return Ok(());
        }
        if let Some(record) = self.store.get_enrollment(name).await? {
            let mut labels = record.labels;
            labels.extend(extra_labels.clone());
            if !scope.covers_labels(&labels) {
                return Err(outside(format!("enrollment request {name:?}"), scope));
            }
        }
        Ok(())
    }

    /// A certificate (by serial) must belong to a device in scope; credentials' certificates are
    /// outside every scope.
    pub async fn ensure_certificate_in_scope(
        &self,
        serial: &str,
        scope: &Scope,
    ) -> Result<(), ControlError> {
        if scope.is_everything() {
            return Ok(());
        }
        let labels = match self.store.get_certificate(serial).await? {
            Some(record) => self
                .catalog()
                .device(&record.device_id)
                .map(|d| d.labels.clone()),
            None if self.store.credential_by_serial(serial).await?.is_some() => {
                return Err(outside(format!("certificate {serial}"), scope));
            }
            None => return Ok(()),
        };
        match labels {
            Some(labels) if !scope.covers_labels(&labels) => {
                Err(outside(format!("certificate {serial}"), scope))
            }
            _ => Ok(()),
        }
    }

    /// Whether the device with this id is in scope (for filtering lists by id).
    pub fn device_id_in_scope(&self, id: &str, scope: &Scope) -> bool {
        scope.is_everything()
            || self
                .catalog()
                .device(id)
                .is_some_and(|d| scope.covers_labels(&d.labels))
    }

    /// Whether the fleet with this name is in scope (for filtering lists).
    pub fn fleet_in_scope(&self, name: &str, scope: &Scope) -> bool {
        scope.is_everything()
            || self
                .catalog()
                .fleet(name)
                .is_some_and(|f| scope.covers_selector(&f.selector))
    }
}

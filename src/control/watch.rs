//! Watching devices: the current matching devices, a marker, then every change as it happens.
//! Fed by the hub's change feed; views come from memory, so a watch costs no database query.

use super::devices::DeviceFilter;
use super::{ControlError, ControlPlane, DeviceView};
use std::collections::{HashMap, VecDeque};
use tokio::sync::broadcast::{Receiver, error::RecvError};

/// One event of a device watch.
#[derive(Debug, Clone)]
pub enum DeviceEvent {
    /// A device is (now) in the watched set.
    Added(DeviceView),
    /// A device in the set changed.
    Modified(DeviceView),
    /// A device left the set (deleted, or it no longer matches): (id, name).
    Deleted {
        /// The device's id.
        id: String,
        /// Its name.
        name: String,
    },
    /// Every device that matched when the watch started (or resynchronised) has been sent.
    Synced,
}

/// An open watch; `next` yields events until the control plane shuts down.
pub struct DeviceWatch {
    control: ControlPlane,
    filter: DeviceFilter,
    feed: Receiver<String>,
    /// Devices currently in the set: id → name.
    members: HashMap<String, String>,
    queued: VecDeque<DeviceEvent>,
}

impl DeviceWatch {
    /// Queues the whole current set, followed by `Synced`.
    fn resync(&mut self) {
        let mut views: Vec<DeviceView> = self
            .control
            .catalog()
            .devices()
            .filter(|d| self.filter.labels.matches(&d.labels))
            .map(|d| d.id.clone())
            .collect::<Vec<_>>()
            .into_iter()
            .filter_map(|id| self.control.view_by_id(&id))
            .filter(|view| self.filter.matches(view))
            .collect();
        views.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        let mut members = HashMap::new();
        for view in views {
            members.insert(view.record.id.clone(), view.record.name.clone());
            self.queued.push_back(DeviceEvent::Added(view));
        }
        for (id, name) in std::mem::replace(&mut self.members, members) {
            if !self.members.contains_key(&id) {
                self.queued.push_back(DeviceEvent::Deleted { id, name });
            }
        }
        self.queued.push_back(DeviceEvent::Synced);
    }

    fn on_change(&mut self, id: String) -> Option<DeviceEvent> {
        match self.control.view_by_id(&id) {
            Some(view) if self.filter.matches(&view) => {
                let known = self.members.insert(id, view.record.name.clone()).is_some();
                Some(if known {
                    DeviceEvent::Modified(view)
                } else {
                    DeviceEvent::Added(view)
                })
            }
            _ => self
                .members
                .remove(&id)
                .map(|name| DeviceEvent::Deleted { id, name }),
        }
    }

    /// The next event; `None` once the change feed has closed.
    pub async fn next(&mut self) -> Option<DeviceEvent> {
        loop {
            if let Some(event) = self.queued.pop_front() {
                return Some(event);
            }
            match self.feed.recv().await {
                Ok(id) => {
                    if let Some(event) = self.on_change(id) {
                        return Some(event);
                    }
                }
                Err(RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "device watch fell behind; resynchronising");
                    self.resync();
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

impl ControlPlane {
    /// Starts a watch of the devices matching `selector` and `field_selector` (empty: all).
    pub fn watch_devices(
        &self,
        selector: &str,
        field_selector: &str,
        scope: &crate::scope::Scope,
    ) -> Result<DeviceWatch, ControlError> {
        let filter = DeviceFilter::parse(selector, field_selector, scope)?;
        // Subscribe before taking the snapshot, so no change between the two is lost.
        let feed = self.hub.subscribe();
        let mut watch = DeviceWatch {
            control: self.clone(),
            filter,
            feed,
            members: HashMap::new(),
            queued: VecDeque::new(),
        };
        watch.resync();
        Ok(watch)
    }
}

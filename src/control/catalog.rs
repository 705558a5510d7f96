//! The control plane's in-memory picture of fleets and devices, kept in step with the store by
//! every write: which fleet owns each device, which devices are in conflict, and each device's
//! rendered spec. Reads (lists, views, watches) are served from here, so they cost no database
//! query; renders are interned so identical specs share one allocation.

use crate::fleet::{Placement, place};
use crate::hub::{DEVICES_PER_LOCK, Hub, RenderOutcome, Rendered};
use crate::render::{CompiledTemplate, DeviceContext, render_device};
use crate::selector::Selector;
use crate::spec::DeviceSpec;
use crate::store::{DeviceOwner, DeviceRecord, FleetRecord, SessionFacts};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};

/// A fleet with its parsed selector and compiled template.
#[derive(Debug, Clone)]
pub(super) struct FleetEntry {
    pub record: FleetRecord,
    pub selector: Selector,
    pub template: Arc<CompiledTemplate>,
    /// Older revisions some devices are still held at by a rollout, compiled.
    pub pinned: BTreeMap<i64, Arc<CompiledTemplate>>,
}

impl FleetEntry {
    /// The template a device held at `revision` (or following the current one) renders.
    pub(super) fn template_for(&self, revision: Option<i64>) -> Arc<CompiledTemplate> {
        match revision {
            Some(r) if r != self.record.revision => self
                .pinned
                .get(&r)
                .cloned()
                .unwrap_or_else(|| self.template.clone()),
            _ => self.template.clone(),
        }
    }
}

/// Owner changes to persist: (device id, new owner).
pub(super) type OwnerChanges = Vec<(String, Option<String>)>;

#[derive(Debug, Default)]
pub(super) struct Catalog {
    fleets: BTreeMap<String, FleetEntry>,
    devices: HashMap<String, DeviceRecord>,
    ids_by_name: HashMap<String, String>,
    /// Devices matched by more than one fleet: device id → the matching fleets.
    conflicts: HashMap<String, Vec<String>>,
    interned: HashMap<String, Weak<Rendered>>,
    /// Renders by what they were rendered from: the compilation, what its templates read of the
    /// device (`CompiledTemplate::device_key`) and the device's overrides. A fleet change then
    /// renders once per distinct input, not once per device.
    shared: HashMap<RenderInputs, Weak<Rendered>>,
    /// Devices the change feed's device lane re-read lately (see `Rereads`).
    pub(super) rereads: super::replication::Rereads,
}

/// What a render is a function of: (compilation id or 0 without a fleet, device key, overrides).
type RenderInputs = (u64, String, String);

/// Where a device with `labels`, now owned by `current`, belongs among `fleets`.
fn place_among(
    fleets: &BTreeMap<String, FleetEntry>,
    labels: &BTreeMap<String, String>,
    current: Option<&str>,
) -> Placement {
    place(
        fleets.iter().map(|(name, f)| (name.as_str(), &f.selector)),
        labels,
        current,
    )
}

/// Decides owners for `devices` against `fleets`; returns the changes and the conflicts.
fn plan<'a>(
    fleets: &BTreeMap<String, FleetEntry>,
    devices: impl Iterator<Item = &'a DeviceRecord>,
) -> (OwnerChanges, HashMap<String, Vec<String>>) {
    let mut changes = Vec::new();
    let mut conflicts = HashMap::new();
    for device in devices {
        let Placement {
            owner,
            conflicts: matching,
        } = place_among(fleets, &device.labels, device.fleet.as_deref());
        if owner != device.fleet {
            changes.push((device.id.clone(), owner));
        }
        if !matching.is_empty() {
            conflicts.insert(device.id.clone(), matching);
        }
    }
    (changes, conflicts)
}

impl Catalog {
    pub(super) fn new(fleets: Vec<FleetEntry>, devices: Vec<DeviceRecord>) -> Catalog {
        let mut catalog = Catalog::default();
        for fleet in fleets {
            catalog.fleets.insert(fleet.record.name.clone(), fleet);
        }
        for device in devices {
            catalog.put_device(device);
        }
        catalog
    }

    pub(super) fn fleets(&self) -> impl Iterator<Item = &FleetEntry> {
        self.fleets.values()
    }

    pub(super) fn fleet(&self, name: &str) -> Option<&FleetEntry> {
        self.fleets.get(name)
    }

    pub(super) fn devices(&self) -> impl Iterator<Item = &DeviceRecord> {
        self.devices.values()
    }

    pub(super) fn device(&self, id: &str) -> Option<&DeviceRecord> {
        self.devices.get(id)
    }

    pub(super) fn device_by_name(&self, name: &str) -> Option<&DeviceRecord> {
        self.ids_by_name
            .get(name)
            .and_then(|id| self.devices.get(id))
    }

    pub(super) fn conflicts(&self, device_id: &str) -> &[String] {
        self.conflicts
            .get(device_id)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Devices matched by more than one fleet, one of which is `fleet`.
    pub(super) fn conflicted_in(&self, fleet: &str) -> Vec<&DeviceRecord> {
        let mut devices: Vec<&DeviceRecord> = self
            .conflicts
            .iter()
            .filter(|(_, fleets)| fleets.iter().any(|f| f == fleet))
            .filter_map(|(id, _)| self.devices.get(id))
            .collect();
        devices.sort_by(|a, b| a.name.cmp(&b.name));
        devices
    }

    pub(super) fn put_device(&mut self, device: DeviceRecord) {
        self.ids_by_name
            .insert(device.name.clone(), device.id.clone());
        self.devices.insert(device.id.clone(), device);
    }

    /// Records a device's new current certificate.
    pub(super) fn note_certificate(&mut self, device_id: &str, serial: &str, not_after_ms: i64) {
        if let Some(device) = self.devices.get_mut(device_id) {
            device.cert_serial = Some(serial.to_string());
            device.cert_not_after_ms = Some(not_after_ms);
        }
    }

    /// Gives a device the owner and revision another replica committed; whether they changed.
    pub(super) fn move_device(&mut self, id: &str, owner: &DeviceOwner) -> bool {
        let Some(device) = self.devices.get_mut(id) else {
            return false;
        };
        if device.fleet == owner.fleet && device.fleet_revision == owner.revision {
            return false;
        }
        device.fleet.clone_from(&owner.fleet);
        device.fleet_revision = owner.revision;
        true
    }

    /// Pins devices to a revision of their fleet (`None`: follow the current one).
    pub(super) fn pin(&mut self, ids: &[String], revision: Option<i64>) {
        for id in ids {
            if let Some(device) = self.devices.get_mut(id) {
                device.fleet_revision = revision;
            }
        }
    }

    /// Forgets a deleted device.
    pub(super) fn remove_device(&mut self, device_id: &str) {
        if let Some(device) = self.devices.remove(device_id) {
            self.ids_by_name.remove(&device.name);
        }
        self.conflicts.remove(device_id);
    }

    /// Records what a device answered, where its session is and which certificate it holds, as
    /// another replica wrote it.
    pub(super) fn note_session(&mut self, facts: SessionFacts) {
        if let Some(device) = self.devices.get_mut(&facts.id) {
            device.acked_version = facts.acked_version;
            device.nacked = facts.nacked;
            device.agent_version = facts.agent_version;
            device.session_replica = facts.session_replica;
            device.cert_serial = facts.cert_serial;
            device.cert_not_after_ms = facts.cert_not_after_ms;
        }
    }

    /// Updates the agent version of a device after its Hello.
    pub(super) fn note_agent_version(&mut self, device_id: &str, agent_version: &str) {
        if let Some(device) = self.devices.get_mut(device_id) {
            device.agent_version = Some(agent_version.to_string());
        }
    }

    /// The owner changes (and conflicts) that would follow if `fleet` were applied (`Some`) or
    /// `name` deleted (`None`). Nothing is changed.
    pub(super) fn plan_with(&self, name: &str, fleet: Option<&FleetEntry>) -> OwnerChanges {
        let mut fleets = self.fleets.clone();
        match fleet {
            Some(fleet) => fleets.insert(name.to_string(), fleet.clone()),
            None => fleets.remove(name),
        };
        plan(&fleets, self.devices.values()).0
    }

    /// The owner a device with `labels` should have, given the fleets as they are.
    pub(super) fn placement_for(
        &self,
        labels: &BTreeMap<String, String>,
        current: Option<&str>,
    ) -> Placement {
        place_among(&self.fleets, labels, current)
    }

    /// Every owner change the current fleets call for (used at start-up).
    pub(super) fn plan_all(&self) -> OwnerChanges {
        plan(&self.fleets, self.devices.values()).0
    }

    pub(super) fn put_fleet(&mut self, fleet: FleetEntry) {
        self.fleets.insert(fleet.record.name.clone(), fleet);
    }

    pub(super) fn remove_fleet(&mut self, name: &str) {
        self.fleets.remove(name);
    }

    /// Recomputes the conflicts of `device_ids` only: enough when nothing but these devices changed
    /// (a fleet change calls for `apply_owners`, which recomputes every device's).
    pub(super) fn replan<'a>(&mut self, device_ids: impl IntoIterator<Item = &'a str>) {
        for id in device_ids {
            let Some(device) = self.devices.get(id) else {
                self.conflicts.remove(id);
                continue;
            };
            let matching =
                place_among(&self.fleets, &device.labels, device.fleet.as_deref()).conflicts;
            if matching.is_empty() {
                self.conflicts.remove(id);
            } else {
                self.conflicts.insert(id.to_string(), matching);
            }
        }
    }

    /// Applies persisted owner changes and recomputes every conflict.
    pub(super) fn apply_owners(&mut self, changes: &OwnerChanges) {
        for (id, owner) in changes {
            if let Some(device) = self.devices.get_mut(id) {
                device.fleet = owner.clone();
            }
        }
        self.conflicts = plan(&self.fleets, self.devices.values()).1;
    }

    fn intern(&mut self, spec: DeviceSpec) -> Arc<Rendered> {
        let hash = spec.content_hash();
        if let Some(existing) = self.interned.get(&hash).and_then(Weak::upgrade) {
            return existing;
        }
        let rendered = Rendered::with_hash(spec, hash.clone());
        self.interned.insert(hash, Arc::downgrade(&rendered));
        rendered
    }

    /// Whether `device` (a newer version of a known device) could render differently from the
    /// version held: something `render` reads changed, or the device is new here. Session facts
    /// (holder, acknowledged version, last seen) do not count.
    pub(super) fn would_render_differently(&self, device: &DeviceRecord) -> bool {
        self.devices.get(&device.id).is_none_or(|known| {
            known.name != device.name
                || known.labels != device.labels
                || known.spec != device.spec
                || known.fleet != device.fleet
                || known.fleet_revision != device.fleet_revision
        })
    }

    /// Renders one device from its fleet's template and its own overrides.
    pub(super) fn render(&mut self, device_id: &str) -> Option<RenderOutcome> {
        let device = self.devices.get(device_id)?;
        let template = device
            .fleet
            .as_ref()
            .and_then(|f| self.fleets.get(f))
            .map(|f| f.template_for(device.fleet_revision));
        let context = DeviceContext {
            id: &device.id,
            name: &device.name,
            labels: &device.labels,
        };
        let inputs = match serde_json::to_string(&device.spec) {
            Ok(overrides) => Some((
                template.as_ref().map_or(0, |t| t.id()),
                template
                    .as_ref()
                    .map(|t| t.device_key(&context))
                    .unwrap_or_default(),
                overrides,
            )),
            // Not expected for a spec; such a device simply renders on its own.
            Err(_) => None,
        };
        if let Some(known) = inputs
            .as_ref()
            .and_then(|inputs| self.shared.get(inputs))
            .and_then(Weak::upgrade)
        {
            return Some(Ok(known));
        }
        let rendered = render_device(template.as_deref(), &context, &device.spec);
        Some(match rendered {
            Ok(spec) => {
                let rendered = self.intern(spec);
                if let Some(inputs) = inputs {
                    self.shared.insert(inputs, Arc::downgrade(&rendered));
                }
                Ok(rendered)
            }
            Err(error) => Err(format!("render failed: {error}")),
        })
    }

    /// Renders `device_ids` and hands the results to the hub; returns how many failed.
    pub(super) fn render_into(
        &mut self,
        hub: &Hub,
        device_ids: impl IntoIterator<Item = String>,
    ) -> usize {
        let mut failed = 0;
        let mut order = hub.sessions_first(device_ids).into_iter().peekable();
        while order.peek().is_some() {
            let renders = order
                .by_ref()
                .take(DEVICES_PER_LOCK)
                .map(|id| {
                    let render = self.render(&id);
                    if let Some(Err(reason)) = &render {
                        failed += 1;
                        tracing::warn!(device.id = %id, %reason, "device spec could not be rendered");
                    }
                    (id, render)
                })
                .collect();
            hub.apply_renders(renders);
        }
        self.interned.retain(|_, weak| weak.strong_count() > 0);
        self.shared.retain(|_, weak| weak.strong_count() > 0);
        failed
    }

    /// How many devices each fleet holds (fleets holding none included), in one pass.
    pub(super) fn fleet_sizes(&self) -> BTreeMap<String, usize> {
        let mut sizes: BTreeMap<&str, usize> =
            self.fleets().map(|f| (f.record.name.as_str(), 0)).collect();
        for fleet in self.devices.values().filter_map(|d| d.fleet.as_deref()) {
            if let Some(size) = sizes.get_mut(fleet) {
                *size += 1;
            }
        }
        sizes
            .into_iter()
            .map(|(name, size)| (name.to_string(), size))
            .collect()
    }

    /// Ids of the devices `fleet` owns.
    pub(super) fn owned_by(&self, fleet: &str) -> Vec<String> {
        self.devices
            .values()
            .filter(|d| d.fleet.as_deref() == Some(fleet))
            .map(|d| d.id.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::FileSpec;

    fn device(id: &str, site: &str) -> DeviceRecord {
        DeviceRecord {
            id: id.into(),
            name: format!("dev-{id}"),
            labels: BTreeMap::from([
                ("role".to_string(), "web".to_string()),
                ("site".to_string(), site.to_string()),
            ]),
            spec: DeviceSpec::default(),
            acked_version: None,
            nacked: None,
            agent_version: None,
            last_seen_ms: None,
            cert_serial: None,
            cert_not_after_ms: None,
            created_ms: 0,
            updated_ms: 0,
            fleet: None,
            fleet_revision: None,
            tpm_ek_fingerprint: None,
            session_replica: None,
        }
    }

    fn fleet(name: &str, selector: &str, content: &str) -> FleetEntry {
        let template = DeviceSpec {
            files: vec![FileSpec::new("/etc/site", content)],
            ..Default::default()
        };
        FleetEntry {
            record: FleetRecord {
                name: name.into(),
                selector: selector.into(),
                label_defaults: BTreeMap::new(),
                revision: 1,
                template: template.clone(),
                created_ms: 0,
                updated_ms: 0,
                rollout: None,
            },
            selector: Selector::parse(selector).unwrap(),
            template: Arc::new(
                CompiledTemplate::compile(name, &template, BTreeMap::new()).unwrap(),
            ),
            pinned: BTreeMap::new(),
        }
    }

    #[test]
    fn identical_renders_share_one_copy() {
        let mut catalog = Catalog::new(
            vec![fleet("web", "role=web", "{{ device.labels.site }}")],
            vec![
                device("1", "berlin"),
                device("2", "berlin"),
                device("3", "paris"),
            ],
        );
        let changes = catalog.plan_all();
        assert_eq!(changes.len(), 3, "all three join the only matching fleet");
        catalog.apply_owners(&changes);
        let one = catalog.render("1").unwrap().unwrap();
        let two = catalog.render("2").unwrap().unwrap();
        let three = catalog.render("3").unwrap().unwrap();
        assert!(Arc::ptr_eq(&one, &two), "same render, same allocation");
        assert!(!Arc::ptr_eq(&one, &three));
        assert_ne!(one.version, three.version);
    }

    #[test]
    fn planning_a_fleet_changes_nothing_until_applied() {
        let catalog = Catalog::new(vec![], vec![device("1", "berlin")]);
        let changes = catalog.plan_with("web", Some(&fleet("web", "site=berlin", "x")));
        assert_eq!(changes, vec![("1".to_string(), Some("web".to_string()))]);
        assert!(catalog.fleet("web").is_none());
        assert_eq!(catalog.device("1").unwrap().fleet, None);
        assert!(catalog.plan_with("web", None).is_empty());
    }

    #[test]
    fn replanning_some_devices_leaves_the_conflicts_a_full_plan_would() {
        let mut catalog = Catalog::new(
            vec![
                fleet("web", "role=web", "w"),
                fleet("berlin", "site=berlin", "b"),
            ],
            vec![device("1", "berlin"), device("2", "paris")],
        );
        catalog.apply_owners(&Vec::new());
        assert_eq!(catalog.conflicts("1"), ["berlin", "web"]);
        assert!(catalog.conflicts("2").is_empty());
        // Device 2 moves to Berlin, device 1 to Paris; device 3 arrives in Berlin.
        let mut two = device("2", "berlin");
        two.fleet = Some("web".into());
        catalog.put_device(two);
        catalog.put_device(device("1", "paris"));
        catalog.put_device(device("3", "berlin"));
        catalog.replan(["1", "2", "3"]);
        let replanned: Vec<Vec<String>> = ["1", "2", "3"]
            .iter()
            .map(|id| catalog.conflicts(id).to_vec())
            .collect();
        catalog.apply_owners(&Vec::new());
        let full: Vec<Vec<String>> = ["1", "2", "3"]
            .iter()
            .map(|id| catalog.conflicts(id).to_vec())
            .collect();
        assert_eq!(replanned, full);
        assert!(replanned[0].is_empty());
        assert_eq!(replanned[1], ["berlin", "web"]);
        catalog.remove_device("3");
        catalog.replan(["3"]);
        assert!(catalog.conflicts("3").is_empty());
    }

    #[test]
    fn session_facts_do_not_call_for_a_new_rendering() {
        let mut catalog = Catalog::default();
        let before = device("1", "berlin");
        assert!(catalog.would_render_differently(&before), "new here");
        catalog.put_device(before.clone());
        let mut acked = before.clone();
        acked.acked_version = Some("v2".into());
        acked.session_replica = Some("replica-b".into());
        acked.last_seen_ms = Some(5);
        assert!(!catalog.would_render_differently(&acked));
        let mut relabelled = before.clone();
        relabelled.labels.insert("tier".into(), "edge".into());
        assert!(catalog.would_render_differently(&relabelled));
        let mut pinned = before;
        pinned.fleet_revision = Some(3);
        assert!(catalog.would_render_differently(&pinned));
    }
}

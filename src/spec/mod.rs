//! The device spec as the domain sees it: files, systemd units, podman containers and update
//! commands; its canonical content hash and version. Pure: no I/O.

mod merge;
mod octal;
mod update;
mod validate;

pub use update::{
    AgentUpdate, OsUpdate, UpdatePolicy, Window, Windows, parse_release_version, time_zone,
};
pub use validate::{SpecError, check_path};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Default permission bits of a managed file.
pub const DEFAULT_FILE_MODE: u32 = 0o644;
/// Default deadline of an update command.
pub const DEFAULT_COMMAND_TIMEOUT_SECS: u32 = 60;
/// Upper bound of a whole rendered spec, so one device cannot hold the push path hostage.
pub const MAX_SPEC_BYTES: usize = 1024 * 1024;
/// Number of hex digits of the content hash that make up a version.
const VERSION_HEX_LEN: usize = 16;

/// What a device should have. Fields added after the first release are skipped when empty, so the
/// content hash of a spec that does not use them is unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DeviceSpec {
    /// Files to write.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileSpec>,
    /// systemd units: enabled or not, started or stopped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub units: Vec<UnitSpec>,
    /// Containers to run with podman.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<ContainerSpec>,
    /// Commands run before an update is applied; one failing aborts it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub before_update: Vec<CommandSpec>,
    /// Commands run after an update is applied; one failing rolls it back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after_update: Vec<CommandSpec>,
    /// Thresholds the agent evaluates on the device (`status::monitor`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<ResourceMonitor>,
    /// The agent release the device should run (`update`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentUpdate>,
    /// The OS image of a bootc-based device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<OsUpdate>,
    /// When agent and OS updates may be downloaded and applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_policy: Option<UpdatePolicy>,
}

/// What a resource monitor watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MonitorKind {
    /// CPU use.
    Cpu,
    /// Memory use.
    Memory,
    /// Use of a filesystem.
    Disk,
}

impl MonitorKind {
    /// The name in a spec (`cpu`, `memory`, `disk`).
    pub fn as_str(self) -> &'static str {
        match self {
            MonitorKind::Cpu => "cpu",
            MonitorKind::Memory => "memory",
            MonitorKind::Disk => "disk",
        }
    }

    /// The monitor a name stands for.
    pub fn parse(text: &str) -> Option<MonitorKind> {
        match text {
            "cpu" => Some(MonitorKind::Cpu),
            "memory" => Some(MonitorKind::Memory),
            "disk" => Some(MonitorKind::Disk),
            _ => None,
        }
    }
}

/// A threshold on a resource: `{monitor: memory, warning: 80, critical: 95, forSeconds: 300}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ResourceMonitor {
    /// What is measured.
    pub monitor: MonitorKind,
    /// The mount point of a disk monitor (`/` when not given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Percent of use (1-100) from which the monitor fires as a warning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<u32>,
    /// Percent of use from which the monitor fires as critical.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub critical: Option<u32>,
    /// How long use must stay at or above a threshold before the alert fires.
    #[serde(default)]
    pub for_seconds: u32,
}

impl ResourceMonitor {
    /// What the monitor watches: its kind and, for a disk, the mount point.
    pub fn key(&self) -> (MonitorKind, &str) {
        let path = match self.monitor {
            MonitorKind::Disk => self.path.as_deref().unwrap_or("/"),
            MonitorKind::Cpu | MonitorKind::Memory => "",
        };
        (self.monitor, path)
    }
}

/// One managed file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Absolute path on the device.
    pub path: String,
    /// The whole content.
    #[serde(default)]
    pub content: String,
    /// Permission bits; written and read as an octal string ("0644") in YAML/JSON.
    #[serde(default = "default_mode", with = "octal")]
    pub mode: u32,
    /// User name or numeric id; `None` leaves the owner to the agent's user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Group name or numeric id; `None` leaves the group to the agent's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// What the agent does when the file on disk no longer matches (default: correct it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<DriftPolicy>,
}

/// What the agent does with a managed item that changed on the device behind its back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriftPolicy {
    /// Put it back as the spec says (the default), and report that it did.
    Correct,
    /// Report it and leave it alone.
    Report,
}

impl FileSpec {
    /// A file with the default mode and owner.
    pub fn new(path: impl Into<String>, content: impl Into<String>) -> FileSpec {
        FileSpec {
            path: path.into(),
            content: content.into(),
            mode: DEFAULT_FILE_MODE,
            owner: None,
            group: None,
            drift: None,
        }
    }
}

fn default_mode() -> u32 {
    DEFAULT_FILE_MODE
}

/// Whether a unit should run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnitState {
    /// Running (started if it is not).
    Started,
    /// Not running (stopped if it is).
    Stopped,
}

/// A systemd unit whose state the agent manages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UnitSpec {
    /// The unit's name (`web.service`).
    pub name: String,
    /// `Some(true)`: enable; `Some(false)`: disable; `None`: leave alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Started or stopped; `None` leaves whether it runs alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<UnitState>,
    /// Paths of files of this spec whose change restarts the (started) unit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restart_on_change: Vec<String>,
    /// What the agent does when the unit's state or enablement no longer matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<DriftPolicy>,
}

/// A podman container workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerSpec {
    /// The container's name.
    pub name: String,
    /// The image reference.
    pub image: String,
    /// Command and arguments, instead of the image's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Environment variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Published ports, as podman takes them (`8080:80`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    /// Volumes, as podman takes them (`/srv/data:/data`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<String>,
    /// What the agent does when the container is gone or runs another definition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<DriftPolicy>,
}

impl ContainerSpec {
    /// Hex SHA-256 of the definition; a container is recreated exactly when this changes. The
    /// drift policy is not part of the definition.
    pub fn definition_hash(&self) -> String {
        let definition = ContainerSpec {
            drift: None,
            ..self.clone()
        };
        hex::encode(Sha256::digest(canonical_json(&definition)))
    }
}

/// A command run without a shell before or after an update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CommandSpec {
    /// The program and its arguments (no shell).
    pub run: Vec<String>,
    /// Killed after this long.
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u32,
}

fn default_timeout() -> u32 {
    DEFAULT_COMMAND_TIMEOUT_SECS
}

fn canonical_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain structs of strings, integers and ordered maps always serialise.
    serde_json::to_vec(value).unwrap_or_default()
}

impl DeviceSpec {
    /// The spec in canonical order: files by path, units and containers by name (commands keep
    /// their order, which is meaningful), so equal content always hashes equally.
    pub fn normalized(mut self) -> DeviceSpec {
        self.files.sort_by(|a, b| a.path.cmp(&b.path));
        self.units.sort_by(|a, b| a.name.cmp(&b.name));
        self.containers.sort_by(|a, b| a.name.cmp(&b.name));
        self.resources
            .sort_by(|a, b| a.key().cmp(&b.key()).then(a.path.cmp(&b.path)));
        // Empty texts and an empty policy mean "not set", whichever form they came in.
        self.agent = self.agent.filter(|a| !a.version.is_empty());
        self.os = self.os.filter(|o| !o.image.is_empty());
        self.update_policy = self.update_policy.and_then(|mut p| {
            let unset = |t: Option<String>| t.filter(|t| !t.trim().is_empty());
            p.download_schedule = unset(p.download_schedule);
            p.update_schedule = unset(p.update_schedule);
            p.time_zone = unset(p.time_zone);
            Some(p).filter(|p| *p != UpdatePolicy::default())
        });
        self
    }

    /// Hex SHA-256 of the canonical (normalised, JSON) encoding.
    pub fn content_hash(&self) -> String {
        let canonical = self.clone().normalized();
        hex::encode(Sha256::digest(canonical_json(&canonical)))
    }

    /// Whether the spec asks for nothing.
    pub fn is_empty(&self) -> bool {
        self == &DeviceSpec::default()
    }

    /// Approximate encoded size, for the spec size limit.
    pub fn approximate_size(&self) -> usize {
        canonical_json(self).len()
    }
}

/// The version of a spec with the given content hash.
pub fn version_of(content_hash: &str) -> String {
    content_hash[..VERSION_HEX_LEN.min(content_hash.len())].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_ignores_file_and_unit_order_but_not_content() {
        let a = DeviceSpec {
            files: vec![FileSpec::new("/a", "x"), FileSpec::new("/b", "x")],
            ..Default::default()
        };
        let b = DeviceSpec {
            files: vec![FileSpec::new("/b", "x"), FileSpec::new("/a", "x")],
            ..Default::default()
        };
        assert_eq!(a.content_hash(), b.content_hash());
        let mut c = a.clone();
        c.files[0].mode = 0o600;
        assert_ne!(a.content_hash(), c.content_hash());
        assert_eq!(version_of(&a.content_hash()).len(), 16);
    }

    #[test]
    fn files_only_specs_hash_as_before_the_new_fields() {
        // The encoding of the first release: unused fields must not change existing versions.
        let spec = DeviceSpec {
            files: vec![FileSpec::new("/etc/motd", "hi")],
            ..Default::default()
        };
        assert_eq!(
            String::from_utf8(canonical_json(&spec)).unwrap(),
            r#"{"files":[{"path":"/etc/motd","content":"hi","mode":"0644"}]}"#
        );
    }

    #[test]
    fn parses_the_complete_yaml_shape() {
        let spec: DeviceSpec = serde_json::from_value(serde_json::json!({
            "files": [{"path": "/etc/app.conf", "content": "x", "mode": "0600", "owner": "app", "group": "app"}],
            "units": [{"name": "app.service", "enabled": true, "state": "started", "restartOnChange": ["/etc/app.conf"]}],
            "containers": [{"name": "web", "image": "quay.io/acme/web:1", "env": {"A": "1"}, "ports": ["8080:80"], "volumes": ["/srv:/data:ro"]}],
            "beforeUpdate": [{"run": ["/bin/true"]}],
            "afterUpdate": [{"run": ["/bin/sh", "-c", "exit 0"], "timeoutSeconds": 5}]
        }))
        .unwrap();
        assert_eq!(spec.validate(), Ok(()));
        assert_eq!(spec.units[0].state, Some(UnitState::Started));
        assert_eq!(spec.before_update[0].timeout_seconds, 60);
        assert_eq!(spec.files[0].owner.as_deref(), Some("app"));
    }
}

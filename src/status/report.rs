//! A device's own report: system info, the latest resource sample and the firing alerts; how a new
//! partial report updates the last one, and the bounds the control plane accepts.

use super::UpdateState;
use crate::spec::MonitorKind;
use serde::{Deserialize, Serialize};

/// What the device runs on. Sent at session start and when it changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SystemInfo {
    /// The host name.
    pub hostname: String,
    /// os-release `ID`.
    pub os_id: String,
    /// os-release `VERSION_ID`.
    pub os_version_id: String,
    /// os-release `PRETTY_NAME`.
    pub os_pretty_name: String,
    /// `uname -r`.
    pub kernel_release: String,
    /// `uname -m`.
    pub architecture: String,
    /// Changes at every boot.
    pub boot_id: String,
    /// `/etc/machine-id`.
    pub machine_id: String,
    /// Online CPUs.
    pub cpu_count: u32,
    /// Physical memory, bytes.
    pub memory_total_bytes: u64,
    /// The agent's version.
    pub agent_version: String,
    /// SHA-256 (hex) of the running agent binary.
    pub agent_build: String,
    /// A TPM is present.
    pub tpm_present: bool,
    /// The device key lives in it.
    pub tpm_used: bool,
    /// Network interfaces and their addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<NetworkInterface>,
}

/// One network interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInterface {
    /// Its name (`eth0`).
    pub name: String,
    /// Its addresses, with prefix length.
    pub addresses: Vec<String>,
}

/// One resource sample.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceUsage {
    /// When the sample was taken, Unix milliseconds.
    pub sampled_ms: i64,
    /// Load averages times 100.
    pub load_centi: [u32; 3],
    /// CPU use since the previous sample, percent.
    pub cpu_percent: u32,
    /// Physical memory, bytes.
    pub memory_total_bytes: u64,
    /// Memory in use (total less available), bytes.
    pub memory_used_bytes: u64,
    /// Filesystems the monitors watch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filesystems: Vec<FilesystemUsage>,
}

impl ResourceUsage {
    /// Memory in use, percent.
    pub fn memory_percent(&self) -> u32 {
        percent(self.memory_used_bytes, self.memory_total_bytes)
    }

    /// Use of a resource in percent; `None` for a filesystem that was not sampled.
    pub fn percent_of(&self, kind: MonitorKind, path: &str) -> Option<u32> {
        match kind {
            MonitorKind::Cpu => Some(self.cpu_percent),
            MonitorKind::Memory => Some(self.memory_percent()),
            MonitorKind::Disk => self
                .filesystems
                .iter()
                .find(|fs| fs.mount_point == path)
                .map(FilesystemUsage::percent),
        }
    }
}

/// One filesystem's use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FilesystemUsage {
    /// Where it is mounted.
    pub mount_point: String,
    /// Its size, bytes.
    pub total_bytes: u64,
    /// Bytes in use.
    pub used_bytes: u64,
}

impl FilesystemUsage {
    /// Use, percent.
    pub fn percent(&self) -> u32 {
        percent(self.used_bytes, self.total_bytes)
    }
}

/// `part` of `whole` in whole percent, rounded up (99.2 % full is not 99 % full), 0 for nothing.
fn percent(part: u64, whole: u64) -> u32 {
    if whole == 0 {
        return 0;
    }
    let scaled = u128::from(part.min(whole)) * 100;
    scaled.div_ceil(u128::from(whole)) as u32
}

/// How serious an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Past the warning threshold.
    Warning,
    /// Past the critical threshold.
    Critical,
}

impl Severity {
    /// `warning` or `critical`.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// A monitor whose threshold has been exceeded for its `forSeconds`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    /// What is exceeded.
    pub monitor: MonitorKind,
    /// The mount point of a disk monitor, empty otherwise.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    /// Which threshold.
    pub severity: Severity,
    /// The use when it fired, percent.
    pub percent: u32,
    /// The threshold exceeded, percent.
    pub threshold: u32,
    /// Since when, Unix milliseconds.
    pub since_ms: i64,
}

impl Alert {
    /// `memory 87% >= 80% (warning)`.
    pub fn describe(&self) -> String {
        let what = match self.monitor {
            MonitorKind::Disk => format!("disk {}", self.path),
            other => other.as_str().to_string(),
        };
        format!(
            "{what} {}% >= {}% ({})",
            self.percent,
            self.threshold,
            self.severity.as_str()
        )
    }
}

/// A managed item that did not match its spec when the device last checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DriftItem {
    /// `file`.
    pub kind: String,
    /// The path or name of the item.
    pub name: String,
    /// What differed: `missing`, `content`, `mode`, `owner`, `group` (comma-separated).
    pub difference: String,
    /// Put back as the spec says.
    pub corrected: bool,
    /// Why it could not be corrected.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

impl DriftItem {
    /// `/etc/app.conf (content, corrected)`.
    pub fn describe(&self) -> String {
        let outcome = if self.corrected {
            "corrected".to_string()
        } else if self.error.is_empty() {
            "left as it is".to_string()
        } else {
            format!("not corrected: {}", self.error)
        };
        format!("{} ({}; {outcome})", self.name, self.difference)
    }
}

/// A managed unit or container as systemd or podman reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadStatus {
    /// `unit` or `container`.
    pub kind: String,
    /// The unit's or container's name.
    pub name: String,
    /// systemd's ActiveState, or podman's state.
    pub state: String,
    /// systemd's SubState.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sub_state: String,
    /// Restarts counted by systemd or podman.
    #[serde(default)]
    pub restarts: u32,
    /// podman's health check result.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub health: String,
    /// The digest of the image a container runs.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image_digest: String,
    /// Why its state could not be read.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

impl WorkloadStatus {
    /// Why this workload counts as failed, if it does: a failed unit, a container that is not
    /// running or reports itself unhealthy.
    pub fn failure(&self) -> Option<String> {
        match self.kind.as_str() {
            "unit" if self.state == "failed" => Some(format!("unit {} failed", self.name)),
            "container" if self.health == "unhealthy" => {
                Some(format!("container {} unhealthy", self.name))
            }
            "container" if !matches!(self.state.as_str(), "running" | "unknown" | "") => {
                Some(format!("container {} {}", self.name, self.state))
            }
            _ => None,
        }
    }
}

/// The last drift check.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DriftCheck {
    /// When the check ran, Unix milliseconds.
    pub checked_ms: i64,
    /// What differed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<DriftItem>,
}

/// Everything the control plane keeps of a device's reports: the last of each part.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceReport {
    /// The last system information.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_info: Option<SystemInfo>,
    /// The last resource sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceUsage>,
    /// The alerts firing at that sample.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<Alert>,
    /// The last drift check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<DriftCheck>,
    /// The last state of the managed units and containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workloads: Option<Vec<WorkloadStatus>>,
    /// The agent build and OS image, and the update in progress or last failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdateState>,
    /// When the last report arrived, Unix milliseconds.
    pub reported_ms: i64,
}

/// The parts one status message carries (a part not carried is unchanged).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReportUpdate {
    /// New system information, if sent.
    pub system_info: Option<SystemInfo>,
    /// A new resource sample and its alerts, if sent.
    pub resources: Option<(ResourceUsage, Vec<Alert>)>,
    /// A new drift check, if sent.
    pub drift: Option<DriftCheck>,
    /// A new state of the workloads, if sent.
    pub workloads: Option<Vec<WorkloadStatus>>,
    /// A new software and update state, if sent.
    pub update: Option<UpdateState>,
}

impl ReportUpdate {
    /// Whether the report carries nothing.
    pub fn is_empty(&self) -> bool {
        self.system_info.is_none()
            && self.resources.is_none()
            && self.drift.is_none()
            && self.workloads.is_none()
            && self.update.is_none()
    }
}

impl DeviceReport {
    /// This report with the parts a new one carries (a part it does not carry is unchanged).
    pub fn updated(&self, update: ReportUpdate, now_ms: i64) -> DeviceReport {
        let mut next = self.clone();
        if let Some(info) = update.system_info {
            next.system_info = Some(info);
        }
        if let Some((usage, alerts)) = update.resources {
            next.resources = Some(usage);
            next.alerts = alerts;
        }
        if let Some(drift) = update.drift {
            next.drift = Some(drift);
        }
        if let Some(workloads) = update.workloads {
            next.workloads = Some(workloads);
        }
        if let Some(state) = update.update {
            next.update = Some(state);
        }
        next.reported_ms = now_ms;
        next
    }

    /// Same content, whatever the time of the report.
    pub fn same_content(&self, other: &DeviceReport) -> bool {
        self.system_info == other.system_info
            && self.resources == other.resources
            && self.alerts == other.alerts
            && self.drift.as_ref().map(|d| &d.items) == other.drift.as_ref().map(|d| &d.items)
            && self.workloads == other.workloads
            && self.update == other.update
    }
}

/// What the control plane accepts in one report; the rest is refused with the reason.
pub(super) const MAX_INTERFACES: usize = 16;
pub(super) const MAX_ADDRESSES: usize = 8;
pub(super) const MAX_FILESYSTEMS: usize = 16;
pub(super) const MAX_ALERTS: usize = 32;
pub(super) const MAX_TEXT: usize = 256;

/// A report out of bounds, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("status refused: {0}")]
pub struct ReportError(pub String);

pub(super) const MAX_DRIFT_ITEMS: usize = 64;
pub(super) const MAX_WORKLOADS: usize = 256;

/// Checks a report's parts against the bounds: counts of interfaces, addresses, filesystems,
/// alerts and drift items, and the length of every text.
pub fn check_bounds(update: &ReportUpdate) -> Result<(), ReportError> {
    let system_info = update.system_info.as_ref();
    let resources = update.resources.as_ref();
    let too_long = |field: &str, value: &str| {
        (value.len() > MAX_TEXT).then(|| {
            ReportError(format!(
                "{field} is {} bytes; at most {MAX_TEXT}",
                value.len()
            ))
        })
    };
    let mut texts: Vec<(String, &str)> = Vec::new();
    if let Some(info) = system_info {
        if info.interfaces.len() > MAX_INTERFACES {
            return Err(ReportError(format!(
                "{} network interfaces; at most {MAX_INTERFACES}",
                info.interfaces.len()
            )));
        }
        for field in [
            ("hostname", &info.hostname),
            ("osId", &info.os_id),
            ("osVersionId", &info.os_version_id),
            ("osPrettyName", &info.os_pretty_name),
            ("kernelRelease", &info.kernel_release),
            ("architecture", &info.architecture),
            ("bootId", &info.boot_id),
            ("machineId", &info.machine_id),
            ("agentVersion", &info.agent_version),
            ("agentBuild", &info.agent_build),
        ] {
            texts.push((field.0.to_string(), field.1));
        }
        for (i, interface) in info.interfaces.iter().enumerate() {
            if interface.addresses.len() > MAX_ADDRESSES {
                return Err(ReportError(format!(
                    "interface {:?} has {} addresses; at most {MAX_ADDRESSES}",
                    truncated(&interface.name),
                    interface.addresses.len()
                )));
            }
            texts.push((format!("interfaces[{i}].name"), &interface.name));
            for (j, address) in interface.addresses.iter().enumerate() {
                texts.push((format!("interfaces[{i}].addresses[{j}]"), address));
            }
        }
    }
    if let Some((usage, alerts)) = resources {
        if usage.filesystems.len() > MAX_FILESYSTEMS {
            return Err(ReportError(format!(
                "{} filesystems; at most {MAX_FILESYSTEMS}",
                usage.filesystems.len()
            )));
        }
        if alerts.len() > MAX_ALERTS {
            return Err(ReportError(format!(
                "{} alerts; at most {MAX_ALERTS}",
                alerts.len()
            )));
        }
        for (i, fs) in usage.filesystems.iter().enumerate() {
            texts.push((format!("filesystems[{i}].mountPoint"), &fs.mount_point));
        }
        for (i, alert) in alerts.iter().enumerate() {
            texts.push((format!("alerts[{i}].path"), &alert.path));
        }
    }
    if let Some(drift) = &update.drift {
        if drift.items.len() > MAX_DRIFT_ITEMS {
            return Err(ReportError(format!(
                "{} drift items; at most {MAX_DRIFT_ITEMS}",
                drift.items.len()
            )));
        }
        for (i, item) in drift.items.iter().enumerate() {
            texts.push((format!("drift[{i}].kind"), &item.kind));
            texts.push((format!("drift[{i}].difference"), &item.difference));
            texts.push((format!("drift[{i}].error"), &item.error));
        }
    }
    if let Some(state) = &update.update {
        for (field, value) in state.texts() {
            texts.push((field.to_string(), value));
        }
    }
    if let Some(workloads) = &update.workloads {
        if workloads.len() > MAX_WORKLOADS {
            return Err(ReportError(format!(
                "{} workloads; at most {MAX_WORKLOADS}",
                workloads.len()
            )));
        }
        for (i, w) in workloads.iter().enumerate() {
            for (field, value) in [
                ("kind", &w.kind),
                ("name", &w.name),
                ("state", &w.state),
                ("subState", &w.sub_state),
                ("health", &w.health),
                ("imageDigest", &w.image_digest),
                ("error", &w.error),
            ] {
                texts.push((format!("workloads[{i}].{field}"), value));
            }
        }
    }
    if let Some((i, item)) = update
        .drift
        .iter()
        .flat_map(|d| d.items.iter().enumerate())
        .find(|(_, item)| item.name.len() > MAX_PATH)
    {
        return Err(ReportError(format!(
            "drift[{i}].name is {} bytes; at most {MAX_PATH}",
            item.name.len()
        )));
    }
    texts
        .iter()
        .find_map(|(field, value)| too_long(field, value))
        .map_or(Ok(()), Err)
}

/// Longest path of a drift item (Linux's PATH_MAX).
const MAX_PATH: usize = 4096;

fn truncated(text: &str) -> &str {
    let mut end = text.len().min(32);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_rounds_up_and_survives_zero() {
        assert_eq!(percent(0, 0), 0);
        assert_eq!(percent(1, 1000), 1);
        assert_eq!(percent(992, 1000), 100);
        assert_eq!(percent(500, 1000), 50);
        assert_eq!(percent(u64::MAX, u64::MAX), 100);
    }

    #[test]
    fn an_update_keeps_the_parts_it_does_not_carry() {
        let info = SystemInfo {
            hostname: "edge-1".into(),
            ..Default::default()
        };
        let first = DeviceReport::default().updated(
            ReportUpdate {
                system_info: Some(info.clone()),
                ..Default::default()
            },
            1,
        );
        let usage = ResourceUsage {
            cpu_percent: 7,
            ..Default::default()
        };
        let second = first.updated(
            ReportUpdate {
                resources: Some((usage.clone(), vec![])),
                ..Default::default()
            },
            2,
        );
        assert_eq!(second.system_info, Some(info));
        assert_eq!(second.resources, Some(usage));
        assert_eq!(second.reported_ms, 2);
        assert!(second.same_content(&second.updated(ReportUpdate::default(), 3)));
        assert!(!second.same_content(&first));
        // A drift check with the same findings at another time is the same content.
        let checked = |at: i64| ReportUpdate {
            drift: Some(DriftCheck {
                checked_ms: at,
                items: vec![],
            }),
            ..Default::default()
        };
        let third = second.updated(checked(4), 4);
        assert!(!third.same_content(&second));
        assert!(third.same_content(&third.updated(checked(5), 5)));
    }

    #[test]
    fn bounds_name_what_is_too_much() {
        let of_info = |info: &SystemInfo| ReportUpdate {
            system_info: Some(info.clone()),
            ..Default::default()
        };
        let mut info = SystemInfo::default();
        assert!(check_bounds(&of_info(&info)).is_ok());
        info.hostname = "h".repeat(MAX_TEXT + 1);
        let error = check_bounds(&of_info(&info)).unwrap_err();
        assert!(
            error.to_string().contains("hostname is 257 bytes"),
            "{error}"
        );
        info.hostname.clear();
        info.interfaces = vec![NetworkInterface::default(); MAX_INTERFACES + 1];
        let error = check_bounds(&of_info(&info)).unwrap_err();
        assert!(
            error.to_string().contains("17 network interfaces"),
            "{error}"
        );
        info.interfaces = vec![NetworkInterface {
            name: "eth0".into(),
            addresses: vec!["10.0.0.1/8".into(); MAX_ADDRESSES + 1],
        }];
        assert!(check_bounds(&of_info(&info)).is_err());
        let usage = ResourceUsage {
            filesystems: vec![FilesystemUsage::default(); MAX_FILESYSTEMS + 1],
            ..Default::default()
        };
        let resources = ReportUpdate {
            resources: Some((usage, vec![])),
            ..Default::default()
        };
        assert!(check_bounds(&resources).is_err());
        let item = DriftItem {
            kind: "file".into(),
            name: "/etc/a".into(),
            difference: "content".into(),
            corrected: true,
            error: String::new(),
        };
        let drift = |items: Vec<DriftItem>| ReportUpdate {
            drift: Some(DriftCheck {
                checked_ms: 0,
                items,
            }),
            ..Default::default()
        };
        assert!(check_bounds(&drift(vec![item.clone(); MAX_DRIFT_ITEMS])).is_ok());
        let error = check_bounds(&drift(vec![item.clone(); MAX_DRIFT_ITEMS + 1])).unwrap_err();
        assert!(error.to_string().contains("65 drift items"), "{error}");
        let mut long = item.clone();
        long.name = "/a".repeat(3000);
        assert!(check_bounds(&drift(vec![long])).is_err());
        assert_eq!(item.describe(), "/etc/a (content; corrected)");
    }
}

//! How `flotctl` shows a device's status report and conditions: the JSON/YAML view (camelCase, as
//! the rest of the documents) and the text of `describe device` and `get devices -o wide`.

use flotilla::proto::admin::v1 as admin;
use flotilla::status::{Alert, DriftCheck, ResourceUsage, SystemInfo, UpdateState, WorkloadStatus};
use flotilla::wire::status::{alerts_from, condition_status_from, summary_from};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ConditionView {
    #[serde(rename = "type")]
    pub kind: String,
    pub status: String,
    pub reason: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct FilesystemView {
    pub mount_point: String,
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub used_percent: u32,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ResourcesView {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampled_at: Option<String>,
    pub cpu_percent: u32,
    /// 1, 5 and 15 minute load averages.
    pub load: [f64; 3],
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    pub memory_percent: u32,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub filesystems: Vec<FilesystemView>,
}

/// The report part of a device's status.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ReportView {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_info: Option<SystemInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourcesView>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drift: Option<DriftView>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<WorkloadStatus>,
    /// The agent build and OS image, and where an update of either stands.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdateState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reported_at: Option<String>,
}

/// The device's last drift check.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DriftView {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checked_at: Option<String>,
    pub items: Vec<flotilla::status::DriftItem>,
}

pub(crate) fn summary_name(summary: i32) -> String {
    summary_from(summary).as_str().to_string()
}

pub(crate) fn conditions(status: &admin::DeviceStatus) -> Vec<ConditionView> {
    status
        .conditions
        .iter()
        .map(|c| ConditionView {
            kind: c.r#type.clone(),
            status: condition_status_from(c.status).as_str().into(),
            reason: c.reason.clone(),
            message: c.message.clone(),
            last_transition_time: c.last_transition_time.map(|t| t.to_string()),
        })
        .collect()
}

pub(crate) fn report(status: &admin::DeviceStatus) -> ReportView {
    let resources = status.resources.clone().map(ResourceUsage::from);
    let alerts: Vec<Alert> = alerts_from(status.alerts.clone()).unwrap_or_default();
    ReportView {
        system_info: status.system_info.clone().map(SystemInfo::from),
        resources: resources.map(|usage| ResourcesView {
            sampled_at: status
                .resources
                .as_ref()
                .and_then(|r| r.sampled_at)
                .map(|t| t.to_string()),
            cpu_percent: usage.cpu_percent,
            load: usage.load_centi.map(|l| f64::from(l) / 100.0),
            memory_total_bytes: usage.memory_total_bytes,
            memory_used_bytes: usage.memory_used_bytes,
            memory_percent: usage.memory_percent(),
            filesystems: usage
                .filesystems
                .iter()
                .map(|f| FilesystemView {
                    mount_point: f.mount_point.clone(),
                    total_bytes: f.total_bytes,
                    used_bytes: f.used_bytes,
                    used_percent: f.percent(),
                })
                .collect(),
        }),
        alerts: alerts.iter().map(Alert::describe).collect(),
        drift: status.drift.clone().map(|d| DriftView {
            checked_at: d.checked_at.map(|t| t.to_string()),
            items: DriftCheck::from(d).items,
        }),
        workloads: status
            .workloads
            .iter()
            .cloned()
            .map(WorkloadStatus::from)
            .collect(),
        update: status.update.clone().map(UpdateState::from),
        reported_at: status.reported_at.map(|t| t.to_string()),
    }
}

/// `active/running, 3 restarts, sha256:...` for `describe`.
fn workload_line(w: &WorkloadStatus) -> String {
    let mut parts = vec![if w.sub_state.is_empty() {
        w.state.clone()
    } else {
        format!("{}/{}", w.state, w.sub_state)
    }];
    if !w.health.is_empty() {
        parts.push(w.health.clone());
    }
    if w.restarts > 0 {
        parts.push(format!("{} restarts", w.restarts));
    }
    if !w.image_digest.is_empty() {
        parts.push(w.image_digest.clone());
    }
    if !w.error.is_empty() {
        parts.push(w.error.clone());
    }
    parts.join(", ")
}

/// `1.5 GiB`-style sizes.
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The first 12 hex digits of a digest (`sha256:` dropped).
pub(crate) fn short_digest(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

/// The lines `describe device` adds for the report and the conditions.
pub(crate) fn describe(out: &mut String, report: &ReportView, conditions: &[ConditionView]) {
    let mut line = |key: &str, value: String| {
        if !value.is_empty() {
            out.push_str(&format!("  {:<14}{value}\n", format!("{key}:")));
        }
    };
    if let Some(info) = &report.system_info {
        line("Hostname", info.hostname.clone());
        line(
            "OS",
            format!(
                "{} ({} {})",
                info.os_pretty_name, info.os_id, info.os_version_id
            )
            .replace(" ()", ""),
        );
        line("Kernel", info.kernel_release.clone());
        line("Architecture", info.architecture.clone());
        line("CPUs", info.cpu_count.to_string());
        line("Memory", bytes(info.memory_total_bytes));
        line("Boot ID", info.boot_id.clone());
        line("Machine ID", info.machine_id.clone());
        line(
            "Agent",
            format!("{} ({})", info.agent_version, info.agent_build),
        );
        line(
            "TPM",
            match (info.tpm_present, info.tpm_used) {
                (_, true) => "holds the device key".to_string(),
                (true, false) => "present, not used".to_string(),
                (false, false) => "none".to_string(),
            },
        );
        for interface in &info.interfaces {
            line(
                &format!("Net {}", interface.name),
                interface.addresses.join(", "),
            );
        }
    }
    if let Some(resources) = &report.resources {
        line("CPU", format!("{}%", resources.cpu_percent));
        line(
            "Load",
            format!(
                "{:.2} {:.2} {:.2}",
                resources.load[0], resources.load[1], resources.load[2]
            ),
        );
        line(
            "Memory used",
            format!(
                "{}% ({} of {})",
                resources.memory_percent,
                bytes(resources.memory_used_bytes),
                bytes(resources.memory_total_bytes)
            ),
        );
        for fs in &resources.filesystems {
            line(
                &format!("Disk {}", fs.mount_point),
                format!(
                    "{}% ({} of {})",
                    fs.used_percent,
                    bytes(fs.used_bytes),
                    bytes(fs.total_bytes)
                ),
            );
        }
        line("Sampled", resources.sampled_at.clone().unwrap_or_default());
    }
    for alert in &report.alerts {
        line("Alert", alert.clone());
    }
    if let Some(update) = &report.update {
        line(
            "Agent build",
            format!(
                "{} sha256:{}",
                update.agent_version,
                short_digest(&update.agent_digest)
            ),
        );
        line(
            "OS image",
            format!(
                "{} {}",
                update.os_image,
                short_digest(&update.os_image_digest)
            )
            .trim()
            .to_string(),
        );
        if update.phase != flotilla::status::UpdatePhase::Idle {
            let next = update
                .next_window_ms
                .map(|at| format!(" (window opens {})", flotilla::status::rfc3339(at)))
                .unwrap_or_default();
            line(
                "Update",
                format!(
                    "{} {}{next} {}",
                    update.phase.as_str(),
                    update.target,
                    update.message
                )
                .trim()
                .to_string(),
            );
        }
        if let Some(failure) = &update.last_failure {
            line("Update failed", failure.describe());
        }
    }
    for w in &report.workloads {
        line(&format!("{} {}", w.kind, w.name), workload_line(w));
    }
    if let Some(drift) = &report.drift {
        let checked = drift.checked_at.clone().unwrap_or_default();
        if drift.items.is_empty() {
            line("Drift", format!("none (checked {checked})"));
        }
        for item in &drift.items {
            line("Drift", format!("{} (checked {checked})", item.describe()));
        }
    }
    if !conditions.is_empty() {
        out.push_str("Conditions:\n");
        out.push_str(&format!(
            "  {:<20} {:<8} {:<18} {:<22} {}\n",
            "TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"
        ));
        for c in conditions {
            out.push_str(&format!(
                "  {:<20} {:<8} {:<18} {:<22} {}\n",
                c.kind,
                c.status,
                c.reason,
                c.last_transition_time.clone().unwrap_or_default(),
                c.message
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_sizes() {
        assert_eq!(
            summary_name(admin::DeviceSummary::Degraded as i32),
            "Degraded"
        );
        assert_eq!(summary_name(0), "Unknown");
        assert_eq!(summary_name(99), "Unknown");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 * 1024 * 1024 * 1024 / 2), "1.5 GiB");
        let unit = WorkloadStatus {
            kind: "unit".into(),
            name: "app.service".into(),
            state: "failed".into(),
            sub_state: "failed".into(),
            restarts: 3,
            ..Default::default()
        };
        assert_eq!(workload_line(&unit), "failed/failed, 3 restarts");
    }
}

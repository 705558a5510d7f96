//! Conversions between the status domain types and their protobuf form (both directions: the
//! agent sends them, the control plane reads them and shows them through the admin API, flotctl
//! reads them back).

use crate::clock::timestamp_from_millis;
use crate::proto::admin::v1 as admin;
use crate::proto::agent::v1 as pb;
use crate::spec::MonitorKind;
use crate::status::conditions::{ConditionStatus, Summary};
use crate::status::{
    Alert, DriftCheck, DriftItem, FilesystemUsage, NetworkInterface, ResourceUsage, Severity,
    SystemInfo, UpdateFailure, UpdateKind, UpdatePhase, UpdateState, WorkloadStatus,
};

fn millis(timestamp: Option<prost_types::Timestamp>) -> i64 {
    timestamp.map_or(0, |t| {
        t.seconds.saturating_mul(1000) + i64::from(t.nanos.clamp(0, 999_999_999)) / 1_000_000
    })
}

impl From<SystemInfo> for pb::DeviceSystemInfo {
    fn from(i: SystemInfo) -> Self {
        pb::DeviceSystemInfo {
            hostname: i.hostname,
            os_id: i.os_id,
            os_version_id: i.os_version_id,
            os_pretty_name: i.os_pretty_name,
            kernel_release: i.kernel_release,
            architecture: i.architecture,
            boot_id: i.boot_id,
            machine_id: i.machine_id,
            cpu_count: i.cpu_count,
            memory_total_bytes: i.memory_total_bytes,
            agent_version: i.agent_version,
            agent_build: i.agent_build,
            tpm_present: i.tpm_present,
            tpm_used: i.tpm_used,
            interfaces: i
                .interfaces
                .into_iter()
                .map(|n| pb::NetworkInterface {
                    name: n.name,
                    addresses: n.addresses,
                })
                .collect(),
        }
    }
}

impl From<pb::DeviceSystemInfo> for SystemInfo {
    fn from(i: pb::DeviceSystemInfo) -> Self {
        SystemInfo {
            hostname: i.hostname,
            os_id: i.os_id,
            os_version_id: i.os_version_id,
            os_pretty_name: i.os_pretty_name,
            kernel_release: i.kernel_release,
            architecture: i.architecture,
            boot_id: i.boot_id,
            machine_id: i.machine_id,
            cpu_count: i.cpu_count,
            memory_total_bytes: i.memory_total_bytes,
            agent_version: i.agent_version,
            agent_build: i.agent_build,
            tpm_present: i.tpm_present,
            tpm_used: i.tpm_used,
            interfaces: i
                .interfaces
                .into_iter()
                .map(|n| NetworkInterface {
                    name: n.name,
                    addresses: n.addresses,
                })
                .collect(),
        }
    }
}

impl From<ResourceUsage> for pb::ResourceUsage {
    fn from(u: ResourceUsage) -> Self {
        pb::ResourceUsage {
            sampled_at: Some(timestamp_from_millis(u.sampled_ms)),
            load1_centi: u.load_centi[0],
            load5_centi: u.load_centi[1],
            load15_centi: u.load_centi[2],
            cpu_percent: u.cpu_percent,
            memory_total_bytes: u.memory_total_bytes,
            memory_used_bytes: u.memory_used_bytes,
            filesystems: u
                .filesystems
                .into_iter()
                .map(|f| pb::FilesystemUsage {
                    mount_point: f.mount_point,
                    total_bytes: f.total_bytes,
                    used_bytes: f.used_bytes,
                })
                .collect(),
        }
    }
}

impl From<pb::ResourceUsage> for ResourceUsage {
    fn from(u: pb::ResourceUsage) -> Self {
        ResourceUsage {
            sampled_ms: millis(u.sampled_at),
            load_centi: [u.load1_centi, u.load5_centi, u.load15_centi],
            cpu_percent: u.cpu_percent.min(100),
            memory_total_bytes: u.memory_total_bytes,
            memory_used_bytes: u.memory_used_bytes,
            filesystems: u
                .filesystems
                .into_iter()
                .map(|f| FilesystemUsage {
                    mount_point: f.mount_point,
                    total_bytes: f.total_bytes,
                    used_bytes: f.used_bytes,
                })
                .collect(),
        }
    }
}

impl From<Alert> for pb::ResourceAlert {
    fn from(a: Alert) -> Self {
        let severity = match a.severity {
            Severity::Warning => pb::AlertSeverity::Warning,
            Severity::Critical => pb::AlertSeverity::Critical,
        };
        pb::ResourceAlert {
            monitor: a.monitor.as_str().to_string(),
            path: a.path,
            severity: severity as i32,
            percent: a.percent,
            threshold: a.threshold,
            since: Some(timestamp_from_millis(a.since_ms)),
        }
    }
}

impl From<DriftCheck> for pb::DriftReport {
    fn from(d: DriftCheck) -> Self {
        pb::DriftReport {
            checked_at: Some(timestamp_from_millis(d.checked_ms)),
            items: d
                .items
                .into_iter()
                .map(|i| pb::DriftItem {
                    kind: i.kind,
                    name: i.name,
                    difference: i.difference,
                    corrected: i.corrected,
                    error: i.error,
                })
                .collect(),
        }
    }
}

impl From<pb::DriftReport> for DriftCheck {
    fn from(d: pb::DriftReport) -> Self {
        DriftCheck {
            checked_ms: millis(d.checked_at),
            items: d
                .items
                .into_iter()
                .map(|i| DriftItem {
                    kind: i.kind,
                    name: i.name,
                    difference: i.difference,
                    corrected: i.corrected,
                    error: i.error,
                })
                .collect(),
        }
    }
}

impl From<WorkloadStatus> for pb::WorkloadStatus {
    fn from(w: WorkloadStatus) -> Self {
        pb::WorkloadStatus {
            kind: w.kind,
            name: w.name,
            state: w.state,
            sub_state: w.sub_state,
            restarts: w.restarts,
            health: w.health,
            image_digest: w.image_digest,
            error: w.error,
        }
    }
}

impl From<pb::WorkloadStatus> for WorkloadStatus {
    fn from(w: pb::WorkloadStatus) -> Self {
        WorkloadStatus {
            kind: w.kind,
            name: w.name,
            state: w.state,
            sub_state: w.sub_state,
            restarts: w.restarts,
            health: w.health,
            image_digest: w.image_digest,
            error: w.error,
        }
    }
}

impl From<UpdatePhase> for pb::UpdatePhase {
    fn from(phase: UpdatePhase) -> Self {
        match phase {
            UpdatePhase::Idle => pb::UpdatePhase::Idle,
            UpdatePhase::Downloading => pb::UpdatePhase::Downloading,
            UpdatePhase::WaitingForWindow => pb::UpdatePhase::WaitingForWindow,
            UpdatePhase::Applying => pb::UpdatePhase::Applying,
            UpdatePhase::Confirming => pb::UpdatePhase::Confirming,
            UpdatePhase::Rebooting => pb::UpdatePhase::Rebooting,
        }
    }
}

/// The phase a wire value names; unset or unknown (a newer peer) is `Idle`.
fn update_phase_from(wire: i32) -> UpdatePhase {
    match pb::UpdatePhase::try_from(wire) {
        Ok(pb::UpdatePhase::Downloading) => UpdatePhase::Downloading,
        Ok(pb::UpdatePhase::WaitingForWindow) => UpdatePhase::WaitingForWindow,
        Ok(pb::UpdatePhase::Applying) => UpdatePhase::Applying,
        Ok(pb::UpdatePhase::Confirming) => UpdatePhase::Confirming,
        Ok(pb::UpdatePhase::Rebooting) => UpdatePhase::Rebooting,
        _ => UpdatePhase::Idle,
    }
}

impl From<UpdateState> for pb::UpdateStatus {
    fn from(u: UpdateState) -> Self {
        pb::UpdateStatus {
            agent_version: u.agent_version,
            agent_digest: u.agent_digest,
            os_image: u.os_image,
            os_image_digest: u.os_image_digest,
            phase: pb::UpdatePhase::from(u.phase) as i32,
            target: u.target,
            next_window: u.next_window_ms.map(timestamp_from_millis),
            message: u.message,
            last_failure: u.last_failure.map(|f| pb::UpdateFailure {
                kind: f.kind.as_str().to_string(),
                target: f.target,
                reason: f.reason,
                rolled_back: f.rolled_back,
                at: Some(timestamp_from_millis(f.at_ms)),
            }),
        }
    }
}

impl From<pb::UpdateStatus> for UpdateState {
    fn from(u: pb::UpdateStatus) -> Self {
        UpdateState {
            agent_version: u.agent_version,
            agent_digest: u.agent_digest,
            os_image: u.os_image,
            os_image_digest: u.os_image_digest,
            phase: update_phase_from(u.phase),
            target: u.target,
            next_window_ms: u.next_window.map(|t| millis(Some(t))),
            message: u.message,
            // A failure of a kind this side does not know (a newer peer) is left out.
            last_failure: u.last_failure.and_then(|f| {
                Some(UpdateFailure {
                    kind: UpdateKind::parse(&f.kind)?,
                    target: f.target,
                    reason: f.reason,
                    rolled_back: f.rolled_back,
                    at_ms: millis(f.at),
                })
            }),
        }
    }
}

impl From<Summary> for admin::DeviceSummary {
    fn from(s: Summary) -> Self {
        match s {
            Summary::Healthy => admin::DeviceSummary::Healthy,
            Summary::Degraded => admin::DeviceSummary::Degraded,
            Summary::Error => admin::DeviceSummary::Error,
            Summary::Offline => admin::DeviceSummary::Offline,
            Summary::Unknown => admin::DeviceSummary::Unknown,
            Summary::Revoked => admin::DeviceSummary::Revoked,
        }
    }
}

/// The summary a wire value names; unset or unknown (a newer peer) is `Unknown`.
pub fn summary_from(wire: i32) -> Summary {
    match admin::DeviceSummary::try_from(wire) {
        Ok(admin::DeviceSummary::Healthy) => Summary::Healthy,
        Ok(admin::DeviceSummary::Degraded) => Summary::Degraded,
        Ok(admin::DeviceSummary::Error) => Summary::Error,
        Ok(admin::DeviceSummary::Offline) => Summary::Offline,
        Ok(admin::DeviceSummary::Revoked) => Summary::Revoked,
        _ => Summary::Unknown,
    }
}

impl From<ConditionStatus> for admin::ConditionStatus {
    fn from(s: ConditionStatus) -> Self {
        match s {
            ConditionStatus::True => admin::ConditionStatus::True,
            ConditionStatus::False => admin::ConditionStatus::False,
            ConditionStatus::Unknown => admin::ConditionStatus::Unknown,
        }
    }
}

/// The condition status a wire value names; unset or unknown is `Unknown`.
pub fn condition_status_from(wire: i32) -> ConditionStatus {
    match admin::ConditionStatus::try_from(wire) {
        Ok(admin::ConditionStatus::True) => ConditionStatus::True,
        Ok(admin::ConditionStatus::False) => ConditionStatus::False,
        _ => ConditionStatus::Unknown,
    }
}

/// Why a reported alert cannot be taken in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("alert {index}: {reason}")]
pub struct AlertError {
    /// Position of the alert in the report.
    pub index: usize,
    /// What is wrong with it.
    pub reason: String,
}

/// The alerts of a report, each checked: a known monitor and a severity.
pub fn alerts_from(alerts: Vec<pb::ResourceAlert>) -> Result<Vec<Alert>, AlertError> {
    alerts
        .into_iter()
        .enumerate()
        .map(|(index, a)| {
            let error = |reason: String| AlertError { index, reason };
            let monitor = MonitorKind::parse(&a.monitor)
                .ok_or_else(|| error(format!("unknown monitor {:?}", a.monitor)))?;
            let severity = match pb::AlertSeverity::try_from(a.severity) {
                Ok(pb::AlertSeverity::Warning) => Severity::Warning,
                Ok(pb::AlertSeverity::Critical) => Severity::Critical,
                _ => return Err(error("severity must be WARNING or CRITICAL".into())),
            };
            Ok(Alert {
                monitor,
                path: a.path,
                severity,
                percent: a.percent,
                threshold: a.threshold,
                since_ms: millis(a.since),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// `Status` as the first release defined it.
    #[derive(Clone, PartialEq, prost::Message)]
    struct FirstStatus {
        #[prost(string, tag = "1")]
        applied_version: String,
        #[prost(string, tag = "2")]
        message: String,
    }

    /// `ServerMessage` as the first release defined it (kinds 1-6), with only `Reconnect` spelled out.
    #[derive(Clone, PartialEq, prost::Message)]
    struct FirstServerMessage {
        #[prost(message, optional, tag = "3")]
        reconnect: Option<pb::Reconnect>,
    }

    #[test]
    fn the_new_fields_are_additive_for_older_peers() {
        // An older control plane reads a new agent's Status as the one it knows.
        let status = pb::Status {
            applied_version: "v1".into(),
            message: "ok".into(),
            system_info: Some(SystemInfo::default().into()),
            resources: Some(pb::ResourceReport::default()),
            drift: Some(pb::DriftReport::default()),
            workloads: Some(pb::WorkloadReport::default()),
            update: Some(
                UpdateState {
                    agent_version: "1.4.0".into(),
                    phase: UpdatePhase::WaitingForWindow,
                    ..Default::default()
                }
                .into(),
            ),
        };
        let old = FirstStatus::decode(status.encode_to_vec().as_slice()).unwrap();
        assert_eq!(
            (old.applied_version.as_str(), old.message.as_str()),
            ("v1", "ok")
        );
        // A new agent reads an older Status (nothing reported) as no report.
        let new = pb::Status::decode(old.encode_to_vec().as_slice()).unwrap();
        assert!(new.system_info.is_none() && new.resources.is_none() && new.drift.is_none());
        // An older agent decodes a StatusRefused as a message of no kind it knows, and goes on.
        let refused = pb::ServerMessage {
            kind: Some(pb::server_message::Kind::StatusRefused(pb::StatusRefused {
                reason: "too big".into(),
            })),
        };
        let old = FirstServerMessage::decode(refused.encode_to_vec().as_slice()).unwrap();
        assert!(old.reconnect.is_none());
    }

    #[test]
    fn summaries_and_condition_statuses_round_trip() {
        for summary in Summary::ALL {
            assert_eq!(
                summary_from(admin::DeviceSummary::from(summary) as i32),
                summary
            );
        }
        assert_eq!(summary_from(0), Summary::Unknown);
        assert_eq!(summary_from(99), Summary::Unknown);
        for status in [
            ConditionStatus::True,
            ConditionStatus::False,
            ConditionStatus::Unknown,
        ] {
            assert_eq!(
                condition_status_from(admin::ConditionStatus::from(status) as i32),
                status
            );
        }
    }

    #[test]
    fn round_trips_and_refuses_unknown_alerts() {
        let usage = ResourceUsage {
            sampled_ms: 1_234,
            load_centi: [1, 2, 3],
            cpu_percent: 9,
            memory_total_bytes: 10,
            memory_used_bytes: 5,
            filesystems: vec![FilesystemUsage {
                mount_point: "/".into(),
                total_bytes: 4,
                used_bytes: 1,
            }],
        };
        assert_eq!(
            ResourceUsage::from(pb::ResourceUsage::from(usage.clone())),
            usage
        );
        let alert = Alert {
            monitor: MonitorKind::Disk,
            path: "/".into(),
            severity: Severity::Critical,
            percent: 99,
            threshold: 95,
            since_ms: 77_000,
        };
        assert_eq!(
            alerts_from(vec![alert.clone().into()]).unwrap(),
            vec![alert]
        );
        let bad = pb::ResourceAlert {
            monitor: "gpu".into(),
            ..Default::default()
        };
        assert!(
            alerts_from(vec![bad])
                .unwrap_err()
                .to_string()
                .contains("unknown monitor \"gpu\"")
        );
        let unset = pb::ResourceAlert {
            monitor: "cpu".into(),
            ..Default::default()
        };
        assert!(alerts_from(vec![unset]).is_err());
    }
}

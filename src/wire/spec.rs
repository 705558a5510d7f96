//! Conversions between the domain spec and its protobuf form (both directions: the control plane
//! pushes specs, the agent reads them).

use crate::proto::agent::v1 as pb;
use crate::spec::{
    AgentUpdate, CommandSpec, ContainerSpec, DEFAULT_COMMAND_TIMEOUT_SECS, DEFAULT_FILE_MODE,
    DeviceSpec, DriftPolicy, FileSpec, MonitorKind, OsUpdate, ResourceMonitor, UnitSpec, UnitState,
    UpdatePolicy,
};

fn non_empty(s: String) -> Option<String> {
    Some(s).filter(|s| !s.is_empty())
}

fn drift_text(policy: Option<DriftPolicy>) -> String {
    match policy {
        None => String::new(),
        Some(DriftPolicy::Correct) => "correct".into(),
        Some(DriftPolicy::Report) => "report".into(),
    }
}

/// Anything but `report` or `correct` (from a newer peer) is corrected, the default.
fn drift_policy(text: &str) -> Option<DriftPolicy> {
    match text {
        "report" => Some(DriftPolicy::Report),
        "correct" => Some(DriftPolicy::Correct),
        _ => None,
    }
}

impl From<FileSpec> for pb::FileSpec {
    fn from(f: FileSpec) -> Self {
        pb::FileSpec {
            path: f.path,
            content: f.content,
            mode: f.mode,
            owner: f.owner.unwrap_or_default(),
            group: f.group.unwrap_or_default(),
            drift: drift_text(f.drift),
        }
    }
}

impl From<pb::FileSpec> for FileSpec {
    fn from(f: pb::FileSpec) -> Self {
        FileSpec {
            path: f.path,
            content: f.content,
            mode: if f.mode == 0 {
                DEFAULT_FILE_MODE
            } else {
                f.mode
            },
            owner: non_empty(f.owner),
            group: non_empty(f.group),
            drift: drift_policy(&f.drift),
        }
    }
}

impl From<UnitSpec> for pb::UnitSpec {
    fn from(u: UnitSpec) -> Self {
        let state = match u.state {
            None => pb::UnitState::Unspecified,
            Some(UnitState::Started) => pb::UnitState::Started,
            Some(UnitState::Stopped) => pb::UnitState::Stopped,
        };
        pb::UnitSpec {
            name: u.name,
            enabled: u.enabled,
            state: state as i32,
            restart_on_change: u.restart_on_change,
            drift: drift_text(u.drift),
        }
    }
}

impl From<pb::UnitSpec> for UnitSpec {
    fn from(u: pb::UnitSpec) -> Self {
        // Unknown enum numbers from a newer peer mean "leave alone", like UNSPECIFIED.
        let state = match pb::UnitState::try_from(u.state) {
            Ok(pb::UnitState::Started) => Some(UnitState::Started),
            Ok(pb::UnitState::Stopped) => Some(UnitState::Stopped),
            _ => None,
        };
        UnitSpec {
            name: u.name,
            enabled: u.enabled,
            state,
            restart_on_change: u.restart_on_change,
            drift: drift_policy(&u.drift),
        }
    }
}

impl From<ContainerSpec> for pb::ContainerSpec {
    fn from(c: ContainerSpec) -> Self {
        pb::ContainerSpec {
            name: c.name,
            image: c.image,
            command: c.command,
            env: c.env.into_iter().collect(),
            ports: c.ports,
            volumes: c.volumes,
            drift: drift_text(c.drift),
        }
    }
}

impl From<pb::ContainerSpec> for ContainerSpec {
    fn from(c: pb::ContainerSpec) -> Self {
        ContainerSpec {
            name: c.name,
            image: c.image,
            command: c.command,
            env: c.env.into_iter().collect(),
            ports: c.ports,
            volumes: c.volumes,
            drift: drift_policy(&c.drift),
        }
    }
}

impl From<CommandSpec> for pb::CommandSpec {
    fn from(c: CommandSpec) -> Self {
        pb::CommandSpec {
            run: c.run,
            timeout_seconds: c.timeout_seconds,
        }
    }
}

impl From<pb::CommandSpec> for CommandSpec {
    fn from(c: pb::CommandSpec) -> Self {
        CommandSpec {
            run: c.run,
            timeout_seconds: if c.timeout_seconds == 0 {
                DEFAULT_COMMAND_TIMEOUT_SECS
            } else {
                c.timeout_seconds
            },
        }
    }
}

fn convert<A, B: From<A>>(items: Vec<A>) -> Vec<B> {
    items.into_iter().map(B::from).collect()
}

impl From<DeviceSpec> for pb::DeviceSpec {
    fn from(spec: DeviceSpec) -> Self {
        pb::DeviceSpec {
            files: convert(spec.files),
            units: convert(spec.units),
            containers: convert(spec.containers),
            before_update: convert(spec.before_update),
            after_update: convert(spec.after_update),
            resources: convert(spec.resources),
            agent: spec.agent.map(|a| pb::AgentUpdate {
                version: a.version,
                allow_downgrade: a.allow_downgrade,
            }),
            os: spec.os.map(|o| pb::OsUpdate { image: o.image }),
            update_policy: spec.update_policy.map(|p| pb::UpdatePolicy {
                download_schedule: p.download_schedule.unwrap_or_default(),
                update_schedule: p.update_schedule.unwrap_or_default(),
                time_zone: p.time_zone.unwrap_or_default(),
            }),
        }
    }
}

impl From<pb::DeviceSpec> for DeviceSpec {
    fn from(spec: pb::DeviceSpec) -> Self {
        DeviceSpec {
            files: convert(spec.files),
            units: convert(spec.units),
            containers: convert(spec.containers),
            before_update: convert(spec.before_update),
            after_update: convert(spec.after_update),
            resources: spec
                .resources
                .into_iter()
                .filter_map(|m| ResourceMonitor::try_from(m).ok())
                .collect(),
            agent: spec
                .agent
                .filter(|a| !a.version.is_empty())
                .map(|a| AgentUpdate {
                    version: a.version,
                    allow_downgrade: a.allow_downgrade,
                }),
            os: spec
                .os
                .filter(|o| !o.image.is_empty())
                .map(|o| OsUpdate { image: o.image }),
            update_policy: spec
                .update_policy
                .map(|p| UpdatePolicy {
                    download_schedule: non_empty(p.download_schedule),
                    update_schedule: non_empty(p.update_schedule),
                    time_zone: non_empty(p.time_zone),
                })
                .filter(|p| *p != UpdatePolicy::default()),
        }
    }
}

impl From<ResourceMonitor> for pb::ResourceMonitor {
    fn from(m: ResourceMonitor) -> Self {
        pb::ResourceMonitor {
            monitor: m.monitor.as_str().to_string(),
            path: m.path.unwrap_or_default(),
            warning: m.warning.unwrap_or(0),
            critical: m.critical.unwrap_or(0),
            for_seconds: m.for_seconds,
        }
    }
}

/// A monitor of an unknown kind (from a newer peer) is not one this side can evaluate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownMonitor(pub String);

impl TryFrom<pb::ResourceMonitor> for ResourceMonitor {
    type Error = UnknownMonitor;

    fn try_from(m: pb::ResourceMonitor) -> Result<Self, Self::Error> {
        let monitor = MonitorKind::parse(&m.monitor).ok_or(UnknownMonitor(m.monitor))?;
        Ok(ResourceMonitor {
            monitor,
            path: non_empty(m.path),
            warning: Some(m.warning).filter(|&t| t != 0),
            critical: Some(m.critical).filter(|&t| t != 0),
            for_seconds: m.for_seconds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_protobuf() {
        let spec: DeviceSpec = serde_json::from_value(serde_json::json!({
            "files": [{"path": "/etc/a", "content": "x", "mode": "0600", "owner": "root"}],
            "units": [{"name": "a.service", "enabled": false, "state": "stopped"}],
            "containers": [{"name": "web", "image": "web:1", "env": {"A": "1"}}],
            "afterUpdate": [{"run": ["/bin/true"], "timeoutSeconds": 3}]
        }))
        .unwrap();
        let wire: pb::DeviceSpec = spec.clone().into();
        assert_eq!(DeviceSpec::from(wire), spec);
    }
}

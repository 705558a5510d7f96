//! The state of the units and containers a spec manages, as the real tools report it:
//! `systemctl show` (ActiveState, SubState, NRestarts) and `podman inspect` (status, restarts,
//! image digest, health), through the executor.

use super::executor::{CommandLine, Executor};
use flotilla::spec::DeviceSpec;
use flotilla::status::WorkloadStatus;
use std::time::Duration;

/// A query that takes longer than this is reported as unknown.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// What podman prints for a container, one line: status|restarts|digest|health.
const PODMAN_FORMAT: &str = "{{.State.Status}}|{{.RestartCount}}|{{.ImageDigest}}|{{if .State.Health}}{{.State.Health.Status}}{{end}}";

/// The state of every managed unit and container of `spec`, in the spec's order.
pub(crate) fn query(exec: &dyn Executor, spec: &DeviceSpec) -> Vec<WorkloadStatus> {
    let units = spec.units.iter().map(|u| unit(exec, &u.name));
    let containers = spec.containers.iter().map(|c| container(exec, &c.name));
    units.chain(containers).collect()
}

/// The value of `key` in what `systemctl show --property=...` printed (`Key=value` lines).
pub(super) fn show_property(printed: &str, key: &str) -> String {
    printed
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        .map(str::trim)
        .unwrap_or_default()
        .to_string()
}

fn unknown(kind: &str, name: &str, error: String) -> WorkloadStatus {
    WorkloadStatus {
        kind: kind.into(),
        name: name.into(),
        state: "unknown".into(),
        error,
        ..Default::default()
    }
}

fn unit(exec: &dyn Executor, name: &str) -> WorkloadStatus {
    let command = CommandLine::new(
        &[
            "systemctl",
            "show",
            name,
            "--property=ActiveState,SubState,NRestarts",
            "--no-pager",
        ],
        QUERY_TIMEOUT,
    );
    let printed = match exec.output(&command) {
        Ok(printed) => printed,
        Err(error) => return unknown("unit", name, error.message),
    };
    let field = |key: &str| show_property(&printed, key);
    WorkloadStatus {
        kind: "unit".into(),
        name: name.into(),
        state: Some(field("ActiveState"))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unknown".into()),
        sub_state: field("SubState"),
        restarts: field("NRestarts").parse().unwrap_or(0),
        ..Default::default()
    }
}

fn container(exec: &dyn Executor, name: &str) -> WorkloadStatus {
    let command = CommandLine::new(
        &[
            "podman",
            "inspect",
            "--type",
            "container",
            "--format",
            PODMAN_FORMAT,
            name,
        ],
        QUERY_TIMEOUT,
    );
    let printed = match exec.output(&command) {
        Ok(printed) => printed,
        Err(error) => return unknown("container", name, error.message),
    };
    let line = printed.lines().next().unwrap_or_default().trim();
    let mut parts = line.split('|');
    let mut next = || parts.next().unwrap_or_default().trim().to_string();
    let state = next();
    let restarts = next().parse().unwrap_or(0);
    let image_digest = next();
    let health = next();
    WorkloadStatus {
        kind: "container".into(),
        name: name.into(),
        state: if state.is_empty() {
            "unknown".into()
        } else {
            state
        },
        restarts,
        health,
        image_digest,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::executor::recording::RecordingExecutor;
    use flotilla::spec::{ContainerSpec, UnitSpec};
    use flotilla::status::conditions::{ConditionType, Inputs, evaluate};

    fn spec() -> DeviceSpec {
        DeviceSpec {
            units: vec![
                UnitSpec {
                    name: "app.service".into(),
                    enabled: Some(true),
                    state: None,
                    restart_on_change: vec![],
                    drift: None,
                },
                UnitSpec {
                    name: "sync.timer".into(),
                    enabled: None,
                    state: None,
                    restart_on_change: vec![],
                    drift: None,
                },
            ],
            containers: vec![ContainerSpec {
                name: "web".into(),
                image: "quay.io/acme/web:1".into(),
                command: vec![],
                env: Default::default(),
                ports: vec![],
                volumes: vec![],
                drift: None,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn asks_systemctl_and_podman_and_reads_their_answers() {
        let app = "systemctl show app.service --property=ActiveState,SubState,NRestarts --no-pager";
        let timer =
            "systemctl show sync.timer --property=ActiveState,SubState,NRestarts --no-pager";
        let web = format!("podman inspect --type container --format {PODMAN_FORMAT} web");
        let mut exec = RecordingExecutor::failing_on(timer);
        exec.outputs.insert(
            app.into(),
            "ActiveState=failed\nSubState=failed\nNRestarts=3\n".into(),
        );
        exec.outputs
            .insert(web.clone(), "running|2|sha256:abc|unhealthy\n".into());
        let found = query(&exec, &spec());
        assert_eq!(exec.calls(), [app, timer, web.as_str()]);
        assert_eq!(
            (
                found[0].state.as_str(),
                found[0].sub_state.as_str(),
                found[0].restarts
            ),
            ("failed", "failed", 3)
        );
        assert_eq!(found[1].state, "unknown");
        assert!(
            found[1].error.contains("exited with 1"),
            "{}",
            found[1].error
        );
        assert_eq!(
            (
                found[2].state.as_str(),
                found[2].restarts,
                found[2].image_digest.as_str(),
                found[2].health.as_str()
            ),
            ("running", 2, "sha256:abc", "unhealthy")
        );
        // The failed unit raises WorkloadFailed, naming it.
        let failed = evaluate(&Inputs {
            workloads: Some(&found),
            ..Default::default()
        })
        .into_iter()
        .find(|o| o.kind == ConditionType::WorkloadFailed)
        .unwrap();
        assert_eq!(failed.reason, "Failed");
        assert_eq!(
            failed.message,
            "unit app.service failed, container web unhealthy"
        );
    }
}

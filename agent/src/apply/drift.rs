//! Drift: whether what the agent manages still matches the spec it last applied — each file's
//! content, mode, owner and group; each unit's run state and enablement (`systemctl show`); each
//! container's presence and definition (`podman inspect` of its definition label) — and putting it
//! back unless the item says `drift: report`. Run at start and periodically by the session; never
//! while an apply runs (same task).

use super::accounts::{group_id, user_id};
use super::containers::{HASH_LABEL, run_command};
use super::executor::{CommandLine, Executor};
use super::files::{Existing, read_existing, write_file};
use super::units::{UnitAction, Verb};
use super::workloads::show_property;
use flotilla::spec::{ContainerSpec, DeviceSpec, DriftPolicy, FileSpec, UnitSpec, UnitState};
use flotilla::status::DriftItem;
use std::path::Path;
use std::time::Duration;

/// A query that takes longer than this counts as a failed check.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// What differs between a file on disk and its spec (empty: nothing).
fn differences(
    file: &FileSpec,
    existing: Option<&Existing>,
    uid: Option<u32>,
    gid: Option<u32>,
) -> Vec<&'static str> {
    let Some(was) = existing else {
        return vec!["missing"];
    };
    let mut found = Vec::new();
    if was.content != file.content.as_bytes() {
        found.push("content");
    }
    if was.mode != file.mode {
        found.push("mode");
    }
    if uid.is_some_and(|u| u != was.uid) {
        found.push("owner");
    }
    if gid.is_some_and(|g| g != was.gid) {
        found.push("group");
    }
    found
}

/// Checks every file, unit and container of `spec`; corrects what differs unless its policy is
/// `report`. Returns every item that differed, with what was done.
pub(crate) fn check_and_correct(exec: &dyn Executor, spec: &DeviceSpec) -> Vec<DriftItem> {
    let files = spec.files.iter().filter_map(check_file);
    let units = spec.units.iter().filter_map(|u| check_unit(exec, u));
    let containers = spec
        .containers
        .iter()
        .filter_map(|c| check_container(exec, c));
    files.chain(units).chain(containers).collect()
}

fn drift_item(
    kind: &str,
    name: &str,
    difference: String,
    corrected: bool,
    error: String,
) -> DriftItem {
    DriftItem {
        kind: kind.into(),
        name: name.into(),
        difference,
        corrected,
        error,
    }
}

/// Runs the corrections in order; the first failure is the item's error.
fn correct(
    exec: &dyn Executor,
    kind: &str,
    name: &str,
    difference: String,
    policy: Option<DriftPolicy>,
    fixes: &[CommandLine],
) -> DriftItem {
    if policy == Some(DriftPolicy::Report) {
        tracing::warn!(%kind, %name, %difference, "managed item drifted; reporting it (drift: report)");
        return drift_item(kind, name, difference, false, String::new());
    }
    match fixes.iter().try_for_each(|fix| exec.run(fix)) {
        Ok(()) => {
            tracing::warn!(%kind, %name, %difference, "managed item drifted; put back as the spec says");
            metrics::counter!("flotilla_agent_drift_corrections_total").increment(1);
            drift_item(kind, name, difference, true, String::new())
        }
        Err(error) => {
            tracing::warn!(%kind, %name, %difference, %error, "managed item drifted and could not be put back");
            drift_item(kind, name, difference, false, error.message)
        }
    }
}

fn check_unit(exec: &dyn Executor, unit: &UnitSpec) -> Option<DriftItem> {
    if unit.state.is_none() && unit.enabled.is_none() {
        return None;
    }
    let query = CommandLine::new(
        &[
            "systemctl",
            "show",
            &unit.name,
            "--property=ActiveState,UnitFileState",
            "--no-pager",
        ],
        QUERY_TIMEOUT,
    );
    let printed = match exec.output(&query) {
        Ok(printed) => printed,
        Err(error) => {
            return Some(drift_item(
                "unit",
                &unit.name,
                "unknown".into(),
                false,
                error.message,
            ));
        }
    };
    let field = |key: &str| show_property(&printed, key);
    let running = matches!(
        field("ActiveState").as_str(),
        "active" | "activating" | "reloading"
    );
    let file_state = field("UnitFileState");
    let mut found = Vec::new();
    let mut fixes = Vec::new();
    match unit.state {
        Some(UnitState::Started) if !running => {
            found.push("stopped");
            fixes.push(Verb::Start);
        }
        Some(UnitState::Stopped) if running => {
            found.push("running");
            fixes.push(Verb::Stop);
        }
        _ => {}
    }
    match unit.enabled {
        Some(true) if file_state == "disabled" => {
            found.push("disabled");
            fixes.push(Verb::Enable);
        }
        Some(false) if file_state == "enabled" => {
            found.push("enabled");
            fixes.push(Verb::Disable);
        }
        _ => {}
    }
    if found.is_empty() {
        return None;
    }
    let commands: Vec<CommandLine> = fixes
        .into_iter()
        .map(|verb| {
            UnitAction {
                verb,
                unit: unit.name.clone(),
            }
            .command()
        })
        .collect();
    Some(correct(
        exec,
        "unit",
        &unit.name,
        found.join(","),
        unit.drift,
        &commands,
    ))
}

fn check_container(exec: &dyn Executor, container: &ContainerSpec) -> Option<DriftItem> {
    let query = CommandLine::new(
        &[
            "podman",
            "inspect",
            "--type",
            "container",
            "--format",
            &format!("{{{{index .Config.Labels \"{HASH_LABEL}\"}}}}"),
            &container.name,
        ],
        QUERY_TIMEOUT,
    );
    let hash = container.definition_hash();
    let difference = match exec.output(&query) {
        // podman inspect fails for a container that does not exist.
        Err(_) => "missing",
        Ok(label) if label.trim() != &hash[..16] => "definition",
        Ok(_) => return None,
    };
    Some(correct(
        exec,
        "container",
        &container.name,
        difference.into(),
        container.drift,
        &[run_command(container)],
    ))
}

fn check_file(file: &FileSpec) -> Option<DriftItem> {
    let item = |difference: String, corrected: bool, error: String| {
        drift_item("file", &file.path, difference, corrected, error)
    };
    // An owner that no longer resolves is itself a difference the agent cannot correct.
    let uid = match file.owner.as_deref().map(user_id).transpose() {
        Ok(uid) => uid,
        Err(error) => return Some(item("owner".into(), false, error)),
    };
    let gid = match file.group.as_deref().map(group_id).transpose() {
        Ok(gid) => gid,
        Err(error) => return Some(item("group".into(), false, error)),
    };
    let existing = match read_existing(Path::new(&file.path)) {
        Ok(existing) => existing,
        Err(error) => return Some(item("unreadable".into(), false, error.to_string())),
    };
    let found = differences(file, existing.as_ref(), uid, gid);
    if found.is_empty() {
        return None;
    }
    let difference = found.join(",");
    if file.drift == Some(DriftPolicy::Report) {
        tracing::warn!(path = %file.path, %difference, "managed file drifted; reporting it (drift: report)");
        return Some(item(difference, false, String::new()));
    }
    match write_file(file, uid, gid) {
        Ok(()) => {
            tracing::warn!(path = %file.path, %difference, "managed file drifted; put back as the spec says");
            metrics::counter!("flotilla_agent_drift_corrections_total").increment(1);
            Some(item(difference, true, String::new()))
        }
        Err(error) => {
            tracing::warn!(path = %file.path, %difference, %error, "managed file drifted and could not be put back");
            Some(item(difference, false, error))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::executor::recording::RecordingExecutor;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn units_and_containers_are_checked_and_put_back_with_the_exact_commands() {
        let unit = |name: &str, state: UnitState, drift: Option<DriftPolicy>| UnitSpec {
            name: name.into(),
            enabled: Some(true),
            state: Some(state),
            restart_on_change: vec![],
            drift,
        };
        let web = ContainerSpec {
            name: "web".into(),
            image: "quay.io/acme/web:1".into(),
            command: vec![],
            env: Default::default(),
            ports: vec![],
            volumes: vec![],
            drift: None,
        };
        let db = ContainerSpec {
            name: "db".into(),
            ..web.clone()
        };
        let spec = DeviceSpec {
            units: vec![
                unit("app.service", UnitState::Started, None),
                unit(
                    "tuned.service",
                    UnitState::Started,
                    Some(DriftPolicy::Report),
                ),
                unit("ok.service", UnitState::Started, None),
            ],
            containers: vec![web.clone(), db.clone()],
            ..Default::default()
        };
        let show = |name: &str| {
            format!("systemctl show {name} --property=ActiveState,UnitFileState --no-pager")
        };
        let inspect = |name: &str| {
            format!(
                "podman inspect --type container --format {{{{index .Config.Labels \"{HASH_LABEL}\"}}}} {name}"
            )
        };
        let mut exec = RecordingExecutor::failing_on(&inspect("db"));
        exec.outputs.insert(
            show("app.service"),
            "ActiveState=inactive\nUnitFileState=disabled\n".into(),
        );
        exec.outputs.insert(
            show("tuned.service"),
            "ActiveState=failed\nUnitFileState=enabled\n".into(),
        );
        exec.outputs.insert(
            show("ok.service"),
            "ActiveState=active\nUnitFileState=enabled\n".into(),
        );
        exec.outputs
            .insert(inspect("web"), "0123456789abcdef\n".into());
        let items = check_and_correct(&exec, &spec);
        let run = |c: &ContainerSpec| run_command(c).display();
        assert_eq!(
            exec.calls(),
            [
                show("app.service"),
                "systemctl start app.service".into(),
                "systemctl enable app.service".into(),
                show("tuned.service"),
                show("ok.service"),
                inspect("web"),
                run(&web),
                inspect("db"),
                run(&db),
            ]
        );
        let found: Vec<(&str, &str, &str, bool)> = items
            .iter()
            .map(|i| {
                (
                    i.kind.as_str(),
                    i.name.as_str(),
                    i.difference.as_str(),
                    i.corrected,
                )
            })
            .collect();
        assert_eq!(
            found,
            [
                ("unit", "app.service", "stopped,disabled", true),
                ("unit", "tuned.service", "stopped", false),
                ("container", "web", "definition", true),
                ("container", "db", "missing", true),
            ]
        );
    }

    #[test]
    fn finds_corrects_and_reports() {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name).display().to_string();
        let corrected = FileSpec::new(path("a"), "a\n");
        let mut reported = FileSpec::new(path("b"), "b\n");
        reported.drift = Some(DriftPolicy::Report);
        let missing = FileSpec::new(path("c"), "c\n");
        let spec = DeviceSpec {
            files: vec![corrected.clone(), reported.clone(), missing],
            ..Default::default()
        };
        std::fs::write(path("a"), "a\n").unwrap();
        std::fs::set_permissions(path("a"), std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(path("b"), "b\n").unwrap();
        std::fs::set_permissions(path("b"), std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(path("c"), "c\n").unwrap();
        std::fs::set_permissions(path("c"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let exec = RecordingExecutor::default();
        assert!(check_and_correct(&exec, &spec).is_empty(), "all in place");

        std::fs::write(path("a"), "changed\n").unwrap();
        std::fs::set_permissions(path("b"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(path("b"), "local\n").unwrap();
        std::fs::remove_file(path("c")).unwrap();
        let items = check_and_correct(&exec, &spec);
        let found: Vec<(&str, &str, bool)> = items
            .iter()
            .map(|i| {
                (
                    i.name.rsplit('/').next().unwrap(),
                    i.difference.as_str(),
                    i.corrected,
                )
            })
            .collect();
        assert_eq!(
            found,
            [
                ("a", "content", true),
                ("b", "content,mode", false),
                ("c", "missing", true)
            ]
        );
        assert_eq!(std::fs::read_to_string(path("a")).unwrap(), "a\n");
        assert_eq!(std::fs::read_to_string(path("c")).unwrap(), "c\n");
        assert_eq!(
            std::fs::read_to_string(path("b")).unwrap(),
            "local\n",
            "left alone"
        );
        // Next check: only the reported one remains.
        let again = check_and_correct(&exec, &spec);
        assert_eq!(again.len(), 1);
        assert!(!again[0].corrected);
    }
}

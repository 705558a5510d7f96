//! Validation of a device spec: everything an agent would trip over is refused before it is stored
//! or pushed, with the offending field named.

use super::{
    CommandSpec, ContainerSpec, DeviceSpec, FileSpec, MAX_SPEC_BYTES, MonitorKind, ResourceMonitor,
    UnitSpec,
};
use std::collections::BTreeSet;
use std::path::{Component, Path};

/// Longest command deadline an update may ask for.
const MAX_COMMAND_TIMEOUT_SECS: u32 = 3600;
const UNIT_SUFFIXES: &[&str] = &[
    ".service",
    ".socket",
    ".timer",
    ".target",
    ".path",
    ".mount",
    ".automount",
    ".swap",
    ".slice",
];

/// A problem with one field of a spec.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{}: {reason}", self.field())]
pub struct SpecError {
    /// Path of the field inside the spec, e.g. `files[2].path`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl SpecError {
    pub(crate) fn new(field: impl Into<String>, reason: impl Into<String>) -> SpecError {
        SpecError {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The request field the error is about, for gRPC field details.
    pub fn field(&self) -> String {
        if self.field.is_empty() {
            "spec".to_string()
        } else {
            format!("spec.{}", self.field)
        }
    }
}

/// Checks that a path is absolute and normalised: no `.`/`..` components, no empty segments.
pub fn check_path(path: &str) -> Result<(), &'static str> {
    if !path.starts_with('/') {
        return Err("must be an absolute path");
    }
    if path == "/" || path.ends_with('/') {
        return Err("must name a file, not a directory");
    }
    if path.contains("//") || path.contains('\0') {
        return Err("must not contain empty segments or NUL");
    }
    for component in Path::new(path).components() {
        match component {
            Component::RootDir | Component::Normal(_) => {}
            Component::ParentDir => return Err("must not contain '..'"),
            Component::CurDir | Component::Prefix(_) => return Err("must not contain '.'"),
        }
    }
    if path
        .split('/')
        .any(|segment| segment == "." || segment == "..")
    {
        return Err("must not contain '.' or '..'");
    }
    Ok(())
}

/// A user or group: a POSIX-ish name or a numeric id.
fn check_account(name: &str) -> Result<(), &'static str> {
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    let rest_ok = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '.'));
    if name.len() <= 32 && first_ok && rest_ok {
        Ok(())
    } else {
        Err("must be a user or group name (lowercase, digits, '_', '-', '.') or a numeric id")
    }
}

fn check_file(index: usize, file: &FileSpec) -> Result<(), SpecError> {
    let at = |what: &str| format!("files[{index}].{what}");
    check_path(&file.path).map_err(|reason| SpecError::new(at("path"), reason))?;
    if file.mode > 0o7777 {
        return Err(SpecError::new(
            at("mode"),
            format!("{:o} is not a permission mode (at most 07777)", file.mode),
        ));
    }
    for (what, value) in [("owner", &file.owner), ("group", &file.group)] {
        if let Some(value) = value {
            check_account(value).map_err(|reason| SpecError::new(at(what), reason))?;
        }
    }
    Ok(())
}

fn check_unit(index: usize, unit: &UnitSpec, files: &BTreeSet<&str>) -> Result<(), SpecError> {
    let at = |what: &str| format!("units[{index}].{what}");
    let name_ok = unit
        .name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '.' | '@' | '-' | '\\'))
        && unit.name.len() <= 255
        && UNIT_SUFFIXES
            .iter()
            .any(|s| unit.name.len() > s.len() && unit.name.ends_with(s));
    if !name_ok {
        return Err(SpecError::new(
            at("name"),
            format!(
                "{:?} is not a systemd unit name (e.g. app.service; suffixes {})",
                unit.name,
                UNIT_SUFFIXES.join(" ")
            ),
        ));
    }
    for (i, path) in unit.restart_on_change.iter().enumerate() {
        if !files.contains(path.as_str()) {
            return Err(SpecError::new(
                at(&format!("restartOnChange[{i}]")),
                format!("{path:?} is not a file of this spec"),
            ));
        }
    }
    Ok(())
}

fn check_port(port: &str) -> bool {
    let (mapping, protocol) = match port.rsplit_once('/') {
        Some((m, p)) => (m, Some(p)),
        None => (port, None),
    };
    let numbers: Vec<&str> = mapping.rsplitn(3, ':').collect();
    let is_port = |s: &str| s.parse::<u16>().is_ok_and(|n| n > 0);
    protocol.is_none_or(|p| p == "tcp" || p == "udp")
        && numbers.len() >= 2
        && is_port(numbers[0])
        && is_port(numbers[1])
}

fn check_container(index: usize, container: &ContainerSpec) -> Result<(), SpecError> {
    let at = |what: &str| format!("containers[{index}].{what}");
    let name = &container.name;
    let name_ok = name.len() <= 128
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !name_ok {
        return Err(SpecError::new(
            at("name"),
            format!("{name:?} is not a container name (letters, digits, '_', '.', '-')"),
        ));
    }
    if container.image.is_empty() || container.image.chars().any(char::is_whitespace) {
        return Err(SpecError::new(
            at("image"),
            "must be an image reference without spaces",
        ));
    }
    for key in container.env.keys() {
        let ok = key
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(SpecError::new(
                at("env"),
                format!("{key:?} is not an environment variable name"),
            ));
        }
    }
    for (i, port) in container.ports.iter().enumerate() {
        if !check_port(port) {
            return Err(SpecError::new(
                at(&format!("ports[{i}]")),
                format!("{port:?} is not [ip:]host:container[/tcp|/udp]"),
            ));
        }
    }
    for (i, volume) in container.volumes.iter().enumerate() {
        let parts: Vec<&str> = volume.split(':').collect();
        let ok = (2..=3).contains(&parts.len())
            && check_path(parts[0]).is_ok()
            && check_path(parts[1]).is_ok()
            && parts
                .get(2)
                .is_none_or(|o| matches!(*o, "ro" | "rw" | "z" | "Z"));
        if !ok {
            return Err(SpecError::new(
                at(&format!("volumes[{i}]")),
                format!("{volume:?} is not /host/path:/container/path[:ro|rw|z|Z]"),
            ));
        }
    }
    Ok(())
}

fn check_command(list: &str, index: usize, command: &CommandSpec) -> Result<(), SpecError> {
    let at = |what: &str| format!("{list}[{index}].{what}");
    if command.run.first().is_none_or(|p| p.is_empty()) {
        return Err(SpecError::new(at("run"), "must name a program"));
    }
    if command.run.iter().any(|a| a.contains('\0')) {
        return Err(SpecError::new(at("run"), "must not contain NUL"));
    }
    if command.timeout_seconds == 0 || command.timeout_seconds > MAX_COMMAND_TIMEOUT_SECS {
        return Err(SpecError::new(
            at("timeoutSeconds"),
            format!("must be between 1 and {MAX_COMMAND_TIMEOUT_SECS}"),
        ));
    }
    Ok(())
}

/// Most resource monitors in one spec (the agent reports at most 16 filesystems).
const MAX_MONITORS: usize = 16;

fn check_monitor(index: usize, monitor: &ResourceMonitor) -> Result<(), SpecError> {
    let at = |field: &str| format!("resources[{index}].{field}");
    if monitor.warning.is_none() && monitor.critical.is_none() {
        return Err(SpecError::new(
            at("warning"),
            "a monitor needs a warning or a critical threshold",
        ));
    }
    for (field, value) in [("warning", monitor.warning), ("critical", monitor.critical)] {
        if let Some(value) = value
            && !(1..=100).contains(&value)
        {
            return Err(SpecError::new(
                at(field),
                format!("{value} is not a percentage between 1 and 100"),
            ));
        }
    }
    if let (Some(warning), Some(critical)) = (monitor.warning, monitor.critical)
        && warning > critical
    {
        return Err(SpecError::new(
            at("warning"),
            format!("warning {warning} is above critical {critical}"),
        ));
    }
    if monitor.for_seconds > MAX_MONITOR_FOR_SECONDS {
        return Err(SpecError::new(
            at("forSeconds"),
            format!("at most {MAX_MONITOR_FOR_SECONDS} (one day)"),
        ));
    }
    match (monitor.monitor, &monitor.path) {
        (MonitorKind::Disk, Some(path)) if path == "/" => Ok(()),
        (MonitorKind::Disk, Some(path)) => {
            check_path(path).map_err(|reason| SpecError::new(at("path"), reason))
        }
        (MonitorKind::Disk, None) => Ok(()),
        (_, Some(_)) => Err(SpecError::new(at("path"), "only a disk monitor has a path")),
        (_, None) => Ok(()),
    }
}

const MAX_MONITOR_FOR_SECONDS: u32 = 86_400;

impl DeviceSpec {
    /// Validates the whole spec; the first problem found is reported.
    pub fn validate(&self) -> Result<(), SpecError> {
        let mut paths = BTreeSet::new();
        for (index, file) in self.files.iter().enumerate() {
            check_file(index, file)?;
            if !paths.insert(file.path.as_str()) {
                return Err(SpecError::new(
                    format!("files[{index}].path"),
                    format!("{:?} appears more than once", file.path),
                ));
            }
        }
        let mut units = BTreeSet::new();
        for (index, unit) in self.units.iter().enumerate() {
            check_unit(index, unit, &paths)?;
            if !units.insert(unit.name.as_str()) {
                return Err(SpecError::new(
                    format!("units[{index}].name"),
                    format!("{:?} appears more than once", unit.name),
                ));
            }
        }
        let mut containers = BTreeSet::new();
        for (index, container) in self.containers.iter().enumerate() {
            check_container(index, container)?;
            if !containers.insert(container.name.as_str()) {
                return Err(SpecError::new(
                    format!("containers[{index}].name"),
                    format!("{:?} appears more than once", container.name),
                ));
            }
        }
        for (index, command) in self.before_update.iter().enumerate() {
            check_command("beforeUpdate", index, command)?;
        }
        for (index, command) in self.after_update.iter().enumerate() {
            check_command("afterUpdate", index, command)?;
        }
        let mut monitors = BTreeSet::new();
        for (index, monitor) in self.resources.iter().enumerate() {
            check_monitor(index, monitor)?;
            if !monitors.insert(monitor.key()) {
                return Err(SpecError::new(
                    format!("resources[{index}]"),
                    "a monitor of this resource appears more than once",
                ));
            }
        }
        if self.resources.len() > MAX_MONITORS {
            return Err(SpecError::new(
                "resources",
                format!("at most {MAX_MONITORS} monitors"),
            ));
        }
        super::update::check(
            self.agent.as_ref(),
            self.os.as_ref(),
            self.update_policy.as_ref(),
        )?;
        let size = self.approximate_size();
        if size > MAX_SPEC_BYTES {
            return Err(SpecError {
                field: String::new(),
                reason: format!("spec is {size} bytes; the limit is {MAX_SPEC_BYTES}"),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{ContainerSpec, FileSpec, UnitSpec};

    fn files(paths: &[&str]) -> DeviceSpec {
        DeviceSpec {
            files: paths.iter().map(|p| FileSpec::new(*p, "x")).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn rejects_relative_and_dotdot_paths() {
        for bad in [
            "etc/x",
            "/etc/../x",
            "/etc/./x",
            "/",
            "/etc/",
            "//x",
            "/a//b",
            "",
        ] {
            let error = files(&[bad]).validate().unwrap_err();
            assert_eq!(error.field(), "spec.files[0].path", "{bad}");
        }
        assert_eq!(
            files(&["/etc/motd", "/opt/app/config.toml"]).validate(),
            Ok(())
        );
    }

    #[test]
    fn rejects_duplicates_bad_modes_owners_and_oversize() {
        let error = files(&["/a", "/a"]).validate().unwrap_err();
        assert_eq!(error.field(), "spec.files[1].path");
        assert!(error.reason.contains("more than once"));
        let mut spec = files(&["/a"]);
        spec.files[0].mode = 0o10000;
        assert_eq!(spec.validate().unwrap_err().field(), "spec.files[0].mode");
        let mut spec = files(&["/a"]);
        spec.files[0].owner = Some("Root; rm".into());
        assert_eq!(spec.validate().unwrap_err().field(), "spec.files[0].owner");
        let mut spec = files(&["/big"]);
        spec.files[0].content = "x".repeat(MAX_SPEC_BYTES + 1);
        assert!(spec.validate().unwrap_err().reason.contains("limit"));
    }

    #[test]
    fn rejects_bad_units_containers_and_commands() {
        let unit = |name: &str, restart: &[&str]| UnitSpec {
            name: name.into(),
            enabled: Some(true),
            state: None,
            restart_on_change: restart.iter().map(|s| s.to_string()).collect(),
            drift: None,
        };
        let mut spec = files(&["/etc/app.conf"]);
        spec.units = vec![unit("app.service", &["/etc/app.conf"])];
        assert_eq!(spec.validate(), Ok(()));
        spec.units = vec![unit("app", &[])];
        assert_eq!(spec.validate().unwrap_err().field(), "spec.units[0].name");
        spec.units = vec![unit("app.service", &["/etc/other"])];
        assert_eq!(
            spec.validate().unwrap_err().field(),
            "spec.units[0].restartOnChange[0]"
        );
        spec.units = vec![unit("a.timer", &[]), unit("a.timer", &[])];
        assert_eq!(spec.validate().unwrap_err().field(), "spec.units[1].name");

        let container = ContainerSpec {
            name: "web".into(),
            image: "quay.io/acme/web:1".into(),
            command: vec![],
            env: [("PORT".to_string(), "80".to_string())].into(),
            ports: vec!["8080:80".into(), "127.0.0.1:53:53/udp".into()],
            volumes: vec!["/srv/web:/data:ro".into()],
            drift: None,
        };
        let mut spec = DeviceSpec {
            containers: vec![container.clone()],
            ..Default::default()
        };
        assert_eq!(spec.validate(), Ok(()));
        for (field, change) in [
            (
                "name",
                Box::new(|c: &mut ContainerSpec| c.name = "-x".into())
                    as Box<dyn Fn(&mut ContainerSpec)>,
            ),
            (
                "image",
                Box::new(|c: &mut ContainerSpec| c.image = "a b".into()),
            ),
            (
                "env",
                Box::new(|c: &mut ContainerSpec| {
                    c.env.insert("1X".into(), String::new());
                }),
            ),
            (
                "ports[0]",
                Box::new(|c: &mut ContainerSpec| c.ports[0] = "80".into()),
            ),
            (
                "volumes[0]",
                Box::new(|c: &mut ContainerSpec| c.volumes[0] = "srv:/data".into()),
            ),
        ] {
            let mut bad = container.clone();
            change(&mut bad);
            spec.containers = vec![bad];
            assert_eq!(
                spec.validate().unwrap_err().field(),
                format!("spec.containers[0].{field}")
            );
        }

        let spec = DeviceSpec {
            before_update: vec![CommandSpec {
                run: vec![],
                timeout_seconds: 5,
            }],
            ..Default::default()
        };
        assert_eq!(
            spec.validate().unwrap_err().field(),
            "spec.beforeUpdate[0].run"
        );
        let spec = DeviceSpec {
            after_update: vec![CommandSpec {
                run: vec!["/bin/true".into()],
                timeout_seconds: 0,
            }],
            ..Default::default()
        };
        assert_eq!(
            spec.validate().unwrap_err().field(),
            "spec.afterUpdate[0].timeoutSeconds"
        );
    }
}

//! Applying a spec to the device, all or nothing. Order: `beforeUpdate` commands, image pulls
//! (nothing is touched yet), files, `daemon-reload` if a unit file changed, units, containers,
//! `afterUpdate` commands. A failure after the first change restores every touched file, undoes
//! the unit and container steps already taken, and says so.

mod accounts;
mod containers;
pub mod executor;
mod files;
mod units;

use containers::ContainerAction;
use executor::{CommandLine, Executor};
use files::{FileChanges, apply_files};
use flotilla::spec::{CommandSpec, DeviceSpec};
use std::time::Duration;
use units::UnitAction;

/// Why an apply failed, and whether the previous state had to be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApplyError {
    pub message: String,
    /// True when some change had been made and was undone.
    pub rolled_back: bool,
}

fn untouched(message: String) -> ApplyError {
    ApplyError {
        message,
        rolled_back: false,
    }
}

fn update_command(command: &CommandSpec) -> CommandLine {
    CommandLine::new(
        &command.run,
        Duration::from_secs(u64::from(command.timeout_seconds)),
    )
}

/// What the changing part of an apply has done so far, so it can be undone.
#[derive(Default)]
struct Progress {
    files: FileChanges,
    units: Vec<UnitAction>,
    containers: Vec<ContainerAction>,
}

impl Progress {
    fn touched(&self) -> bool {
        !self.files.is_empty() || !self.units.is_empty() || !self.containers.is_empty()
    }

    /// Undoes everything, best effort; returns a summary and what could not be undone.
    fn undo(&self, previous: &DeviceSpec, exec: &dyn Executor) -> (String, Vec<String>) {
        let mut failures = self.files.restore();
        if units::needs_daemon_reload(&self.files.changed()) {
            if let Err(e) = exec.run(&units::daemon_reload()) {
                failures.push(e);
            }
        }
        for action in units::undo(&self.units) {
            if let Err(e) = exec.run(&action.command()) {
                failures.push(e);
            }
        }
        for action in containers::undo(previous, &self.containers) {
            if let Err(e) = exec.run(&action.command()) {
                failures.push(e);
            }
        }
        let summary = format!(
            "rolled back: restored {} file(s), undid {} unit step(s) and {} container step(s)",
            self.files.changed().len(),
            self.units.len(),
            self.containers.len()
        );
        (summary, failures)
    }
}

fn change(
    previous: &DeviceSpec,
    next: &DeviceSpec,
    exec: &dyn Executor,
    progress: &mut Progress,
) -> Result<(), String> {
    progress.files = match apply_files(previous, next) {
        Ok(changes) => changes,
        Err((partial, error)) => {
            progress.files = partial;
            return Err(error);
        }
    };
    let changed = progress.files.changed();
    if units::needs_daemon_reload(&changed) {
        exec.run(&units::daemon_reload())?;
    }
    for action in units::plan(previous, next, &changed) {
        exec.run(&action.command())?;
        progress.units.push(action);
    }
    for action in containers::plan(previous, next) {
        exec.run(&action.command())?;
        progress.containers.push(action);
    }
    for (i, command) in next.after_update.iter().enumerate() {
        exec.run(&update_command(command))
            .map_err(|e| format!("afterUpdate[{i}]: {e}"))?;
    }
    Ok(())
}

/// Moves the device from `previous` to `next`. On error nothing of `next` remains.
pub fn apply(
    previous: &DeviceSpec,
    next: &DeviceSpec,
    exec: &dyn Executor,
) -> Result<(), ApplyError> {
    next.validate()
        .map_err(|e| untouched(format!("invalid spec: {e}")))?;
    for (i, command) in next.before_update.iter().enumerate() {
        exec.run(&update_command(command))
            .map_err(|e| untouched(format!("beforeUpdate[{i}]: {e}; nothing was changed")))?;
    }
    for image in containers::pulls(previous, next) {
        exec.run(&containers::pull_command(&image))
            .map_err(|e| untouched(format!("{e}; nothing was changed")))?;
    }
    let mut progress = Progress::default();
    let Err(error) = change(previous, next, exec, &mut progress) else {
        return Ok(());
    };
    if !progress.touched() {
        return Err(untouched(format!("{error}; nothing was changed")));
    }
    let (summary, failures) = progress.undo(previous, exec);
    let mut message = format!("{error}; {summary}");
    if !failures.is_empty() {
        message.push_str(&format!("; undoing also failed: {}", failures.join(", ")));
    }
    Err(ApplyError {
        message,
        rolled_back: true,
    })
}

#[cfg(test)]
mod tests {
    use super::executor::SystemExecutor;
    use super::executor::recording::RecordingExecutor;
    use super::*;
    use flotilla::spec::{ContainerSpec, FileSpec, UnitSpec, UnitState};
    use std::path::Path;

    fn file(path: &Path, content: &str) -> FileSpec {
        FileSpec::new(path.display().to_string(), content)
    }

    fn full_spec(dir: &Path, content: &str, image: &str) -> DeviceSpec {
        let conf = dir.join("app.conf");
        DeviceSpec {
            files: vec![file(&conf, content)],
            units: vec![UnitSpec {
                name: "app.service".into(),
                enabled: Some(true),
                state: Some(UnitState::Started),
                restart_on_change: vec![conf.display().to_string()],
            }],
            containers: vec![ContainerSpec {
                name: "web".into(),
                image: image.into(),
                command: vec![],
                env: Default::default(),
                ports: vec![],
                volumes: vec![],
            }],
            before_update: vec![CommandSpec {
                run: vec!["/usr/bin/check".into()],
                timeout_seconds: 5,
            }],
            after_update: vec![CommandSpec {
                run: vec!["/usr/bin/smoke-test".into(), "--quick".into()],
                timeout_seconds: 5,
            }],
        }
    }

    #[test]
    fn issues_the_exact_commands_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let exec = RecordingExecutor::default();
        let v1 = full_spec(dir.path(), "one", "web:1");
        apply(&DeviceSpec::default(), &v1, &exec).unwrap();
        let hash = &v1.containers[0].definition_hash()[..16];
        assert_eq!(
            exec.calls(),
            [
                "/usr/bin/check".to_string(),
                "podman pull web:1".into(),
                "systemctl enable app.service".into(),
                "systemctl start app.service".into(),
                format!(
                    "podman run --detach --replace --name web --label io.flotilla.definition={hash} web:1"
                ),
                "/usr/bin/smoke-test --quick".into(),
            ]
        );

        let exec = RecordingExecutor::default();
        let v2 = full_spec(dir.path(), "two", "web:1");
        apply(&v1, &v2, &exec).unwrap();
        assert_eq!(
            exec.calls(),
            [
                "/usr/bin/check",
                "systemctl restart app.service",
                "/usr/bin/smoke-test --quick"
            ],
            "only the restart the changed file calls for"
        );
    }

    #[test]
    fn a_failing_before_command_or_pull_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = full_spec(dir.path(), "one", "web:1");
        let exec = RecordingExecutor::failing_on("podman pull web:1");
        let error = apply(&DeviceSpec::default(), &v1, &exec).unwrap_err();
        assert!(!error.rolled_back);
        assert!(
            error.message.contains("nothing was changed"),
            "{}",
            error.message
        );
        assert!(!dir.path().join("app.conf").exists());
    }

    #[test]
    fn a_failing_after_command_rolls_everything_back_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = full_spec(dir.path(), "one", "web:1");
        apply(&DeviceSpec::default(), &v1, &RecordingExecutor::default()).unwrap();
        let v2 = full_spec(dir.path(), "two", "web:2");
        let exec = RecordingExecutor::failing_on("/usr/bin/smoke-test --quick");
        let error = apply(&v1, &v2, &exec).unwrap_err();
        assert!(error.rolled_back);
        assert!(
            error.message.starts_with("afterUpdate[0]: `/usr/bin/smoke-test --quick` exited with 1; rolled back: restored 1 file(s), undid 1 unit step(s) and 1 container step(s)"),
            "{}",
            error.message
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("app.conf")).unwrap(),
            "one"
        );
        let hash = &v1.containers[0].definition_hash()[..16];
        let calls = exec.calls();
        assert_eq!(
            &calls[calls.len() - 2..],
            [
                "systemctl restart app.service".to_string(),
                format!(
                    "podman run --detach --replace --name web --label io.flotilla.definition={hash} web:1"
                ),
            ],
            "restarted on the restored file and the previous container put back"
        );
    }

    #[test]
    fn real_update_commands_run_with_their_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let spec = DeviceSpec {
            files: vec![file(&dir.path().join("f"), "x")],
            after_update: vec![CommandSpec {
                run: vec!["touch".into(), marker.display().to_string()],
                timeout_seconds: 5,
            }],
            ..Default::default()
        };
        apply(&DeviceSpec::default(), &spec, &SystemExecutor).unwrap();
        assert!(marker.exists());

        let slow = DeviceSpec {
            files: vec![file(&dir.path().join("f"), "y")],
            after_update: vec![CommandSpec {
                run: vec!["sleep".into(), "30".into()],
                timeout_seconds: 1,
            }],
            ..Default::default()
        };
        let error = apply(&spec, &slow, &SystemExecutor).unwrap_err();
        assert!(
            error.message.contains("timed out after 1s"),
            "{}",
            error.message
        );
        assert!(error.rolled_back);
        assert_eq!(std::fs::read_to_string(dir.path().join("f")).unwrap(), "x");
    }

    #[test]
    fn invalid_specs_change_nothing() {
        let next = DeviceSpec {
            files: vec![FileSpec::new("relative/path", "")],
            ..Default::default()
        };
        let error =
            apply(&DeviceSpec::default(), &next, &RecordingExecutor::default()).unwrap_err();
        assert!(!error.rolled_back);
        assert!(error.message.contains("absolute"));
    }
}

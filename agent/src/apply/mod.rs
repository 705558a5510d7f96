//! Applying a spec to the device, all or nothing. Order: `beforeUpdate` commands, image pulls
//! (nothing is touched yet), the apply journal (the previous state of every file it will touch,
//! durably), files, `daemon-reload` if a unit file changed, units, containers, `afterUpdate`
//! commands, the caller's record of the new version. A failure after the first change restores
//! every touched file, undoes the unit and container steps already taken, and says so; a crash
//! is undone at the next start from the journal.

mod accounts;
mod containers;
pub(crate) mod drift;
pub(crate) mod executor;
mod files;
pub(crate) mod journal;
mod units;
pub(crate) mod workloads;

use containers::ContainerAction;
use executor::{CommandLine, ExecError, Executor};
use files::{FileChanges, FilePlan, plan_files};
use flotilla::spec::{CommandSpec, DeviceSpec};
use journal::ApplyJournal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use units::UnitAction;

/// Why an apply failed, and whether the previous state had to be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub(crate) struct ApplyError {
    pub message: String,
    /// True when some change had been made and was undone.
    pub rolled_back: bool,
    /// Not the spec's fault: the apply was interrupted by a shutdown, or the device could not
    /// record it (state directory read-only or full). The same version should be applied again
    /// later, not rejected.
    pub retry: bool,
}

fn untouched(message: String) -> ApplyError {
    ApplyError {
        message,
        rolled_back: false,
        retry: false,
    }
}

fn update_command(command: &CommandSpec) -> CommandLine {
    CommandLine::new(
        &command.run,
        Duration::from_secs(u64::from(command.timeout_seconds)),
    )
}

/// Runs commands through `inner`, noting whether any was stopped by a shutdown signal.
struct Watched<'a> {
    inner: &'a dyn Executor,
    interrupted: AtomicBool,
}

impl Watched<'_> {
    fn note(&self, error: &ExecError) {
        if error.interrupted {
            self.interrupted.store(true, Ordering::Relaxed);
        }
    }
}

impl Executor for Watched<'_> {
    fn run(&self, command: &CommandLine) -> Result<(), ExecError> {
        self.inner.run(command).inspect_err(|e| self.note(e))
    }

    fn output(&self, command: &CommandLine) -> Result<String, ExecError> {
        self.inner.output(command).inspect_err(|e| self.note(e))
    }
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
        let mut run = |command: CommandLine| {
            if let Err(e) = exec.run(&command) {
                failures.push(e.message);
            }
        };
        if units::needs_daemon_reload(&self.files.changed()) {
            run(units::daemon_reload());
        }
        for action in units::undo(&self.units) {
            run(action.command());
        }
        for action in containers::undo(previous, &self.containers) {
            run(action.command());
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
    plan: FilePlan,
    previous: &DeviceSpec,
    next: &DeviceSpec,
    exec: &dyn Executor,
    progress: &mut Progress,
) -> Result<(), String> {
    progress.files = match plan.execute() {
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

/// Where an apply keeps its journal, and how its caller records the new version.
pub(crate) struct Durable<'a> {
    pub journal: &'a ApplyJournal,
    pub target_version: &'a str,
    /// Records the new version as applied; a failure undoes the apply.
    pub record: &'a dyn Fn() -> Result<(), String>,
}

/// Moves the device from `previous` to `next`. On error nothing of `next` remains.
#[cfg(test)]
pub(crate) fn apply(
    previous: &DeviceSpec,
    next: &DeviceSpec,
    exec: &dyn Executor,
) -> Result<(), ApplyError> {
    run(previous, next, exec, None)
}

/// Like `apply`, journaled so that a crash midway is undone at the next start, and finished by
/// `durable.record` (its failure undoes the apply too).
pub(crate) fn apply_durably(
    previous: &DeviceSpec,
    next: &DeviceSpec,
    exec: &dyn Executor,
    durable: Durable<'_>,
) -> Result<(), ApplyError> {
    run(previous, next, exec, Some(durable))
}

fn run(
    previous: &DeviceSpec,
    next: &DeviceSpec,
    exec: &dyn Executor,
    durable: Option<Durable<'_>>,
) -> Result<(), ApplyError> {
    let exec = Watched {
        inner: exec,
        interrupted: AtomicBool::new(false),
    };
    let interrupted = |mut error: ApplyError| {
        error.retry |= exec.interrupted.load(Ordering::Relaxed);
        error
    };
    next.validate()
        .map_err(|e| untouched(format!("invalid spec: {e}")))?;
    for (i, command) in next.before_update.iter().enumerate() {
        exec.run(&update_command(command)).map_err(|e| {
            interrupted(untouched(format!(
                "beforeUpdate[{i}]: {e}; nothing was changed"
            )))
        })?;
    }
    for image in containers::pulls(previous, next) {
        exec.run(&containers::pull_command(&image))
            .map_err(|e| interrupted(untouched(format!("{e}; nothing was changed"))))?;
    }
    let plan =
        plan_files(previous, next).map_err(|e| untouched(format!("{e}; nothing was changed")))?;
    if let Some(durable) = &durable {
        durable
            .journal
            .begin(durable.target_version, plan.backups())
            .map_err(|e| ApplyError {
                message: format!(
                    "could not record the apply in the state directory ({e}); nothing was changed"
                ),
                rolled_back: false,
                retry: true,
            })?;
    }
    let mut progress = Progress::default();
    let mut retry = false;
    let mut result = change(plan, previous, next, &exec, &mut progress);
    if let (Ok(()), Some(durable)) = (&result, &durable)
        && let Err(error) = (durable.record)()
    {
        retry = true;
        result = Err(format!("could not record the applied version: {error}"));
    }
    let outcome = match result {
        Ok(()) => Ok(()),
        Err(error) if !progress.touched() => Err(ApplyError {
            message: format!("{error}; nothing was changed"),
            rolled_back: false,
            retry,
        }),
        Err(error) => {
            let (summary, failures) = progress.undo(previous, &exec);
            let mut message = format!("{error}; {summary}");
            if !failures.is_empty() {
                message.push_str(&format!("; undoing also failed: {}", failures.join(", ")));
            }
            Err(ApplyError {
                message,
                rolled_back: true,
                retry,
            })
        }
    };
    // The journal goes once the outcome is settled on disk; if it cannot be removed, start-up
    // settles it again (restoring what is already restored, or keeping a recorded version).
    if let Some(durable) = &durable
        && let Err(error) = durable.journal.finish()
    {
        tracing::warn!(%error, "could not remove the apply journal; start-up will settle it");
    }
    outcome.map_err(interrupted)
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
                drift: None,
            }],
            containers: vec![ContainerSpec {
                name: "web".into(),
                image: image.into(),
                command: vec![],
                env: Default::default(),
                ports: vec![],
                volumes: vec![],
                drift: None,
            }],
            before_update: vec![CommandSpec {
                run: vec!["/usr/bin/check".into()],
                timeout_seconds: 5,
            }],
            after_update: vec![CommandSpec {
                run: vec!["/usr/bin/smoke-test".into(), "--quick".into()],
                timeout_seconds: 5,
            }],
            ..Default::default()
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
    fn a_hook_stopped_by_a_shutdown_is_deferred_not_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let before = DeviceSpec {
            files: vec![file(&dir.path().join("f"), "x")],
            ..Default::default()
        };
        apply(&DeviceSpec::default(), &before, &SystemExecutor).unwrap();
        let next = DeviceSpec {
            files: vec![file(&dir.path().join("f"), "y")],
            after_update: vec![CommandSpec {
                run: vec!["sh".into(), "-c".into(), "kill -TERM $$".into()],
                timeout_seconds: 5,
            }],
            ..Default::default()
        };
        let error = apply(&before, &next, &SystemExecutor).unwrap_err();
        assert!(error.retry, "{}", error.message);
        assert!(error.rolled_back);
        assert_eq!(std::fs::read_to_string(dir.path().join("f")).unwrap(), "x");

        // A hook that fails on its own is the spec's problem.
        let failing = DeviceSpec {
            after_update: vec![CommandSpec {
                run: vec!["false".into()],
                timeout_seconds: 5,
            }],
            ..next
        };
        assert!(!apply(&before, &failing, &SystemExecutor).unwrap_err().retry);
    }

    fn durable_apply(
        state: &Path,
        previous: &DeviceSpec,
        next: &DeviceSpec,
        record: &dyn Fn() -> Result<(), String>,
    ) -> Result<(), ApplyError> {
        let journal = ApplyJournal::new(state);
        apply_durably(
            previous,
            next,
            &RecordingExecutor::default(),
            Durable {
                journal: &journal,
                target_version: "v2",
                record,
            },
        )
    }

    #[test]
    fn an_apply_that_cannot_be_recorded_is_undone_and_deferred() {
        let dir = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let v1 = DeviceSpec {
            files: vec![file(&dir.path().join("f"), "one")],
            ..Default::default()
        };
        apply(&DeviceSpec::default(), &v1, &RecordingExecutor::default()).unwrap();
        let v2 = DeviceSpec {
            files: vec![
                file(&dir.path().join("f"), "two"),
                file(&dir.path().join("g"), "new"),
            ],
            ..Default::default()
        };
        let error = durable_apply(state.path(), &v1, &v2, &|| Err("disk full".into())).unwrap_err();
        assert!(error.retry && error.rolled_back, "{}", error.message);
        assert!(error.message.contains("disk full"), "{}", error.message);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("f")).unwrap(),
            "one"
        );
        assert!(!dir.path().join("g").exists());
        assert!(!ApplyJournal::new(state.path()).in_progress());

        durable_apply(state.path(), &v1, &v2, &|| Ok(())).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("f")).unwrap(),
            "two"
        );
        assert!(!ApplyJournal::new(state.path()).in_progress(), "settled");
    }

    #[test]
    fn an_apply_whose_journal_cannot_be_written_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        // The journal's directory cannot be created where a regular file is in the way.
        let blocked = state.path().join("blocked");
        std::fs::write(&blocked, "").unwrap();
        let next = DeviceSpec {
            files: vec![file(&dir.path().join("f"), "x")],
            ..Default::default()
        };
        let error = durable_apply(&blocked, &DeviceSpec::default(), &next, &|| Ok(())).unwrap_err();
        assert!(error.retry && !error.rolled_back, "{}", error.message);
        assert!(
            error.message.contains("nothing was changed"),
            "{}",
            error.message
        );
        assert!(!dir.path().join("f").exists());
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

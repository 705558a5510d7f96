//! What every start of the agent does before anything else: settle an agent update left open
//! (count the new build's starts, roll it back when it started too often or missed its deadline
//! without confirming) and run the build `current` names — by replacing this process with it
//! when this process is another binary (the packaged one, which the service manager starts).
//! This is what brings back a build that cannot even start: the next start of the unit runs
//! this code in the launcher, not in the broken build.

use super::builds::Builds;
use super::records::{Failed, PendingAgent, Records};
use flotilla::profiles::RestartMode;
use flotilla::status::{UpdateFailure, UpdateKind};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

/// Set in the environment of a build a launcher started (its start is counted already).
pub(crate) const LAUNCHED_ENV: &str = "FLOTILLA_AGENT_LAUNCHED";
/// The exit code that asks the service manager to start the agent again (EX_TEMPFAIL).
pub(crate) const EXIT_RESTART: i32 = 75;

/// What this start should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Launch {
    /// Go on in this process.
    Run,
    /// Replace this process with the build at this path.
    Exec(PathBuf),
}

/// Rolls back the pending build: `current` returns to the build it replaced, the failure is
/// recorded for the status and for the spec version that asked for it.
pub(crate) fn roll_back(
    builds: &Builds,
    records: &Records,
    pending: &PendingAgent,
    reason: String,
    now_ms: i64,
) {
    tracing::error!(version = %pending.version, %reason, "agent update failed; rolling back to {}", pending.from_version);
    let failed = Failed {
        failure: UpdateFailure {
            kind: UpdateKind::Agent,
            target: pending.version.clone(),
            reason,
            rolled_back: true,
            at_ms: now_ms,
        },
        spec_version: pending.spec_version.clone(),
    };
    if let Err(error) = records.save_failure(&failed) {
        tracing::warn!(%error, "could not record the failed agent update");
    }
    if let Err(error) = builds.roll_back() {
        tracing::error!(%error, "could not switch back to the previous agent build");
    }
    if let Err(error) = records.clear_pending_agent() {
        tracing::warn!(%error, "could not clear the pending agent update");
    }
}

/// Settles the update records for this start and says which binary should run. `exe` is this
/// process's binary; `launched` whether a launcher counted this start already.
pub(crate) fn settle(
    builds: &Builds,
    records: &Records,
    exe: &Path,
    launched: bool,
    max_attempts: u32,
    now_ms: i64,
) -> Launch {
    if !launched && let Some(mut pending) = records.pending_agent() {
        if builds.current().as_deref() != Some(pending.sha256.as_str()) {
            // The switch never happened (a crash before it): nothing changed, and the control
            // plane sends the spec again.
            tracing::info!(version = %pending.version, "an agent update was interrupted before the switch; it starts over");
            let _ = records.clear_pending_agent();
        } else if now_ms > pending.deadline_ms {
            let waited = (pending.deadline_ms - pending.switched_ms) / 1000;
            let reason = format!(
                "it did not confirm (open a session and pass its health checks) within {waited}s"
            );
            roll_back(builds, records, &pending, reason, now_ms);
        } else if pending.attempts >= max_attempts {
            let reason = format!(
                "it was started {} times without confirming (it exits or crashes at start)",
                pending.attempts
            );
            roll_back(builds, records, &pending, reason, now_ms);
        } else {
            pending.attempts += 1;
            if let Err(error) = records.save_pending_agent(&pending) {
                tracing::warn!(%error, "could not count the start of the new agent build");
            }
        }
    }
    if builds.current().is_none() {
        return Launch::Run;
    }
    let target = builds.current_binary();
    match (std::fs::canonicalize(&target), std::fs::canonicalize(exe)) {
        (Ok(target), Ok(exe)) if target == exe => Launch::Run,
        // A launched process never launches again: no loop whatever the links say.
        (Ok(_), _) if launched => Launch::Run,
        (Ok(target), _) => Launch::Exec(target),
        (Err(error), _) => {
            if let Some(pending) = records.pending_agent() {
                roll_back(
                    builds,
                    records,
                    &pending,
                    format!("its binary is missing: {error}"),
                    now_ms,
                );
            } else {
                tracing::error!(%error, "the current agent build is missing; running this binary");
                let _ = builds.roll_back();
            }
            Launch::Run
        }
    }
}

/// Replaces this process with `binary`, with the same arguments; returns only if that failed.
pub(crate) fn exec(binary: &Path, counted: bool) -> std::io::Error {
    let mut command = std::process::Command::new(binary);
    command.args(std::env::args_os().skip(1));
    if counted {
        command.env(LAUNCHED_ENV, "1");
    } else {
        command.env_remove(LAUNCHED_ENV);
    }
    command.exec()
}

/// Starts the agent again as `mode` says: the build `current` names replaces this process, or
/// this process exits for the service manager to start it. Returns only if exec failed.
pub(crate) fn restart(mode: RestartMode, builds: &Builds) -> std::io::Error {
    match mode {
        RestartMode::Exit => {
            tracing::info!("exiting for the service manager to start the agent again");
            std::process::exit(EXIT_RESTART);
        }
        RestartMode::Exec => {
            let binary = builds.current_binary();
            tracing::info!(binary = %binary.display(), "restarting into the current agent build");
            // Not counted: the build counts its own start.
            exec(&binary, false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::builds::{BuildInfo, digest_file};

    struct Fixture {
        _tmp: tempfile::TempDir,
        builds: Builds,
        records: Records,
        launcher: PathBuf,
        old: BuildInfo,
        new: BuildInfo,
    }

    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let builds = Builds::new(&tmp.path().join("agent"));
        let records = Records::new(tmp.path());
        let launcher = tmp.path().join("flotilla-agent");
        std::fs::write(&launcher, b"packaged build").unwrap();
        let info = |path: &Path, version: &str| BuildInfo {
            version: version.into(),
            sha256: digest_file(path).unwrap().0,
        };
        let old = info(&launcher, "1.0.0");
        builds.install_copy(&launcher, &old).unwrap();
        let download = tmp.path().join("download");
        std::fs::write(&download, b"new build").unwrap();
        let new = info(&download, "1.1.0");
        builds.install_from(&download, &new).unwrap();
        Fixture {
            _tmp: tmp,
            builds,
            records,
            launcher,
            old,
            new,
        }
    }

    fn pending(f: &Fixture, attempts: u32) -> PendingAgent {
        PendingAgent {
            version: f.new.version.clone(),
            sha256: f.new.sha256.clone(),
            from_version: f.old.version.clone(),
            from_sha256: Some(f.old.sha256.clone()),
            spec_version: "spec-2".into(),
            switched_ms: 1_000,
            deadline_ms: 301_000,
            attempts,
        }
    }

    #[test]
    fn without_builds_the_launcher_runs_itself() {
        let f = fixture();
        assert_eq!(
            settle(&f.builds, &f.records, &f.launcher, false, 3, 0),
            Launch::Run
        );
    }

    #[test]
    fn the_launcher_runs_the_current_build_and_counts_its_starts() {
        let f = fixture();
        f.builds.switch(&f.new.sha256, Some(&f.old.sha256)).unwrap();
        f.records.save_pending_agent(&pending(&f, 0)).unwrap();
        let new_binary = f.builds.binary(&f.new.sha256).canonicalize().unwrap();
        for attempt in 1..=3 {
            assert_eq!(
                settle(&f.builds, &f.records, &f.launcher, false, 3, 2_000),
                Launch::Exec(new_binary.clone())
            );
            assert_eq!(f.records.pending_agent().unwrap().attempts, attempt);
            // The build the launcher started does not count its start again, nor relaunch.
            assert_eq!(
                settle(&f.builds, &f.records, &new_binary, true, 3, 2_000),
                Launch::Run
            );
            assert_eq!(f.records.pending_agent().unwrap().attempts, attempt);
        }
        // A fourth start without a confirmation: back to the old build, the failure recorded.
        let old_binary = f.builds.binary(&f.old.sha256).canonicalize().unwrap();
        assert_eq!(
            settle(&f.builds, &f.records, &f.launcher, false, 3, 2_000),
            Launch::Exec(old_binary)
        );
        assert_eq!(f.records.pending_agent(), None);
        let failed = f.records.failure().unwrap();
        assert_eq!(failed.spec_version, "spec-2");
        assert_eq!(failed.failure.target, "1.1.0");
        assert!(failed.failure.rolled_back);
        assert!(
            failed.failure.reason.contains("started 3 times"),
            "{}",
            failed.failure.reason
        );
    }

    #[test]
    fn a_missed_deadline_rolls_back_and_an_unswitched_update_is_dropped() {
        let f = fixture();
        f.builds.switch(&f.new.sha256, Some(&f.old.sha256)).unwrap();
        f.records.save_pending_agent(&pending(&f, 1)).unwrap();
        settle(&f.builds, &f.records, &f.launcher, false, 3, 400_000);
        assert_eq!(f.builds.current(), Some(f.old.sha256.clone()));
        let reason = f.records.failure().unwrap().failure.reason;
        assert!(reason.contains("within 300s"), "{reason}");

        // Killed after the record was written but before the switch: nothing to roll back.
        f.records.clear_failure().unwrap();
        f.records.save_pending_agent(&pending(&f, 0)).unwrap();
        settle(&f.builds, &f.records, &f.launcher, false, 3, 2_000);
        assert_eq!(f.records.pending_agent(), None);
        assert_eq!(f.records.failure(), None);
        assert_eq!(f.builds.current(), Some(f.old.sha256.clone()));
    }

    #[test]
    fn a_missing_current_build_falls_back() {
        let f = fixture();
        f.builds.switch(&f.new.sha256, Some(&f.old.sha256)).unwrap();
        f.records.save_pending_agent(&pending(&f, 0)).unwrap();
        std::fs::remove_file(f.builds.binary(&f.new.sha256)).unwrap();
        // The start is counted, then the missing binary sends it back.
        assert_eq!(
            settle(&f.builds, &f.records, &f.launcher, true, 3, 2_000),
            Launch::Run
        );
        assert_eq!(f.builds.current(), Some(f.old.sha256.clone()));
        assert!(
            f.records
                .failure()
                .unwrap()
                .failure
                .reason
                .contains("missing")
        );
    }
}

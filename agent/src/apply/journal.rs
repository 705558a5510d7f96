//! The apply journal: before an apply changes anything, the previous state of every file it will
//! touch is written to the state directory (`apply-journal/`: one backup file each and an
//! `intent.json` naming the target version), durably, as one unit (built beside, then renamed into
//! place). While it exists an apply is in progress. If the agent dies mid-apply (power loss,
//! kill -9), start-up finds it and puts every file back before doing anything else, so the disk
//! never stays a mix of two versions; the control plane then pushes whatever is wanted now.

use super::files::{Backup, Existing};
use crate::state::{sync_dir, write_atomic};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const DIR: &str = "apply-journal";
const STAGING: &str = "apply-journal.new";
const INTENT: &str = "intent.json";

/// One file the apply will change, as it was.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Entry {
    path: PathBuf,
    /// The backup file in the journal; `None`: the file did not exist.
    backup: Option<String>,
    mode: u32,
    uid: u32,
    gid: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Intent {
    target_version: String,
    entries: Vec<Entry>,
}

/// What start-up found of an interrupted apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Recovered {
    /// No apply was in progress.
    Nothing,
    /// The apply had finished (its version was recorded); only the journal was left.
    Completed,
    /// The apply was interrupted: this many files were put back as they were before it.
    RolledBack {
        target_version: String,
        files: usize,
    },
}

/// The journal of the state directory `root`.
#[derive(Debug, Clone)]
pub(crate) struct ApplyJournal {
    root: PathBuf,
}

fn remove_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

impl ApplyJournal {
    pub(crate) fn new(root: &Path) -> ApplyJournal {
        ApplyJournal {
            root: root.to_path_buf(),
        }
    }

    fn dir(&self) -> PathBuf {
        self.root.join(DIR)
    }

    /// Records, durably, that an apply towards `target_version` will change the files of
    /// `backups`, with what they hold now. Nothing may change before this returns Ok.
    pub(crate) fn begin<'a>(
        &self,
        target_version: &str,
        backups: impl Iterator<Item = &'a Backup>,
    ) -> std::io::Result<()> {
        if self.in_progress() {
            // Its backups are the only record of the files before the interrupted apply.
            return Err(std::io::Error::other(
                "an interrupted apply is not settled yet",
            ));
        }
        let staging = self.root.join(STAGING);
        remove_dir(&staging)?;
        remove_dir(&self.dir())?;
        std::fs::create_dir(&staging)?;
        let mut entries = Vec::new();
        for (i, backup) in backups.enumerate() {
            let entry = match &backup.previous {
                Some(was) => {
                    let name = format!("backup-{i}");
                    write_atomic(&staging.join(&name), &was.content, 0o600)?;
                    Entry {
                        path: backup.path.clone(),
                        backup: Some(name),
                        mode: was.mode,
                        uid: was.uid,
                        gid: was.gid,
                    }
                }
                None => Entry {
                    path: backup.path.clone(),
                    backup: None,
                    mode: 0,
                    uid: 0,
                    gid: 0,
                },
            };
            entries.push(entry);
        }
        let intent = Intent {
            target_version: target_version.to_string(),
            entries,
        };
        let text = serde_json::to_vec_pretty(&intent).map_err(std::io::Error::other)?;
        write_atomic(&staging.join(INTENT), &text, 0o600)?;
        std::fs::rename(&staging, self.dir())?;
        sync_dir(&self.root)
    }

    /// The apply is over (done, or undone in process): forgets the journal.
    pub(crate) fn finish(&self) -> std::io::Result<()> {
        remove_dir(&self.dir())?;
        sync_dir(&self.root)
    }

    /// Whether an apply is recorded as in progress.
    pub(crate) fn in_progress(&self) -> bool {
        self.dir().join(INTENT).exists()
    }

    /// Finishes or rolls back an apply that was interrupted, before anything else runs.
    /// `applied_version` is the version the state directory records as applied.
    pub(crate) fn recover(&self, applied_version: Option<&str>) -> Result<Recovered, String> {
        remove_dir(&self.root.join(STAGING)).map_err(|e| format!("{STAGING}: {e}"))?;
        let dir = self.dir();
        let text = match std::fs::read(dir.join(INTENT)) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                remove_dir(&dir).map_err(|e| format!("{DIR}: {e}"))?;
                return Ok(Recovered::Nothing);
            }
            Err(e) => return Err(format!("{}: {e}", dir.join(INTENT).display())),
        };
        let intent: Intent = serde_json::from_slice(&text).map_err(|e| {
            format!(
                "{} is corrupt ({e}); the files of the interrupted apply cannot be restored",
                dir.join(INTENT).display()
            )
        })?;
        if applied_version == Some(intent.target_version.as_str()) {
            self.finish().map_err(|e| format!("{DIR}: {e}"))?;
            return Ok(Recovered::Completed);
        }
        for entry in intent.entries.iter().rev() {
            let previous = match &entry.backup {
                Some(name) => Some(Existing {
                    content: std::fs::read(dir.join(name))
                        .map_err(|e| format!("backup of {}: {e}", entry.path.display()))?,
                    mode: entry.mode,
                    uid: entry.uid,
                    gid: entry.gid,
                }),
                None => None,
            };
            Backup {
                path: entry.path.clone(),
                previous,
            }
            .restore()
            .map_err(|e| format!("restoring {}: {e}", entry.path.display()))?;
        }
        self.finish().map_err(|e| format!("{DIR}: {e}"))?;
        Ok(Recovered::RolledBack {
            target_version: intent.target_version,
            files: intent.entries.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::files::plan_files;
    use flotilla::spec::{DeviceSpec, FileSpec};

    fn spec(dir: &Path, version: &str, paths: &[&str]) -> DeviceSpec {
        DeviceSpec {
            files: paths
                .iter()
                .map(|p| FileSpec::new(dir.join(p).display().to_string(), version))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn an_interrupted_apply_is_rolled_back_at_start_up() {
        let work = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let journal = ApplyJournal::new(state.path());
        let old = spec(work.path(), "old", &["a", "b"]);
        plan_files(&DeviceSpec::default(), &old)
            .unwrap()
            .execute()
            .unwrap();
        let new = spec(work.path(), "new", &["a", "c"]);
        let plan = plan_files(&old, &new).unwrap();
        journal.begin("v2", plan.backups()).unwrap();
        assert!(journal.in_progress());
        plan.execute().unwrap();
        // As if the agent died before recording v2 as applied.
        let recovered = journal.recover(Some("v1")).unwrap();
        assert_eq!(
            recovered,
            Recovered::RolledBack {
                target_version: "v2".into(),
                files: 3
            }
        );
        let read = |p: &str| std::fs::read_to_string(work.path().join(p)).ok();
        assert_eq!(read("a").as_deref(), Some("old"));
        assert_eq!(
            read("b").as_deref(),
            Some("old"),
            "a removed file comes back"
        );
        assert_eq!(read("c"), None, "a file the apply added is gone");
        assert!(!journal.in_progress());
        assert_eq!(journal.recover(Some("v1")).unwrap(), Recovered::Nothing);
    }

    #[test]
    fn a_finished_apply_keeps_its_files() {
        let work = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let journal = ApplyJournal::new(state.path());
        let new = spec(work.path(), "new", &["a"]);
        let plan = plan_files(&DeviceSpec::default(), &new).unwrap();
        journal.begin("v2", plan.backups()).unwrap();
        plan.execute().unwrap();
        assert_eq!(journal.recover(Some("v2")).unwrap(), Recovered::Completed);
        assert_eq!(
            std::fs::read_to_string(work.path().join("a")).unwrap(),
            "new"
        );
    }

    #[test]
    fn a_half_written_journal_never_counts() {
        let state = tempfile::tempdir().unwrap();
        std::fs::create_dir(state.path().join(STAGING)).unwrap();
        std::fs::write(state.path().join(STAGING).join("backup-0"), "x").unwrap();
        let journal = ApplyJournal::new(state.path());
        assert_eq!(journal.recover(None).unwrap(), Recovered::Nothing);
        assert!(!state.path().join(STAGING).exists());
    }
}

//! The file step of an apply: write what the new spec wants, remove what it dropped, and remember
//! every file's previous state so the whole step can be undone.

use super::accounts::{group_id, user_id};
use crate::state::write_atomic_owned;
use flotilla::spec::{DeviceSpec, FileSpec};
use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A file as it was: content, mode, owner, group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Existing {
    pub content: Vec<u8>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// A file as it was before the apply (`None`: it did not exist).
#[derive(Debug, Clone)]
pub(crate) struct Backup {
    pub path: PathBuf,
    pub previous: Option<Existing>,
}

impl Backup {
    /// Puts the file back as it was.
    pub(crate) fn restore(&self) -> std::io::Result<()> {
        match &self.previous {
            Some(was) => write_atomic_owned(
                &self.path,
                &was.content,
                was.mode,
                Some(was.uid),
                Some(was.gid),
            ),
            None => match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        }
    }
}

/// One change the file step will make.
#[derive(Debug)]
enum Step {
    Write {
        file: FileSpec,
        uid: Option<u32>,
        gid: Option<u32>,
    },
    Remove(PathBuf),
}

/// What the file step will do, worked out (and every touched file read) before anything
/// changes, so the previous state can be recorded durably first.
#[derive(Debug, Default)]
pub(super) struct FilePlan {
    steps: Vec<(Step, Backup)>,
}

impl FilePlan {
    /// The files that will change, as they are now.
    pub(super) fn backups(&self) -> impl Iterator<Item = &Backup> {
        self.steps.iter().map(|(_, backup)| backup)
    }

    /// Makes the changes in order. On error, those made so far are returned with it.
    pub(super) fn execute(self) -> Result<FileChanges, (FileChanges, String)> {
        let mut changes = FileChanges::default();
        for (step, backup) in self.steps {
            let path = backup.path.clone();
            changes.backups.push(backup);
            let result = match step {
                Step::Write { file, uid, gid } => write_file(&file, uid, gid),
                Step::Remove(path) => std::fs::remove_file(&path)
                    .map_err(|e| format!("removing {}: {e}", path.display())),
            };
            if let Err(error) = result {
                return Err((changes, error));
            }
            crate::failpoint::reached_nth("apply:file", changes.backups.len());
            tracing::trace!(path = %path.display(), "file changed");
        }
        Ok(changes)
    }
}

pub(super) fn write_file(
    file: &FileSpec,
    uid: Option<u32>,
    gid: Option<u32>,
) -> Result<(), String> {
    let at = |e: &dyn std::fmt::Display| format!("file {}: {e}", file.path);
    let path = Path::new(&file.path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| at(&e))?;
    }
    write_atomic_owned(path, file.content.as_bytes(), file.mode, uid, gid).map_err(|e| at(&e))
}

pub(super) fn read_existing(path: &Path) -> std::io::Result<Option<Existing>> {
    match std::fs::read(path) {
        Ok(content) => {
            let meta = std::fs::metadata(path)?;
            Ok(Some(Existing {
                content,
                mode: meta.permissions().mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
            }))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The files the apply changed, with what they were.
#[derive(Debug, Default)]
pub(super) struct FileChanges {
    backups: Vec<Backup>,
}

impl FileChanges {
    /// Paths written or removed.
    pub(super) fn changed(&self) -> BTreeSet<String> {
        self.backups
            .iter()
            .map(|b| b.path.display().to_string())
            .collect()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.backups.is_empty()
    }

    /// Puts every changed file back as it was; returns what could not be restored.
    pub(super) fn restore(&self) -> Vec<String> {
        self.backups
            .iter()
            .rev()
            .filter_map(|backup| {
                backup
                    .restore()
                    .err()
                    .map(|e| format!("{}: {e}", backup.path.display()))
            })
            .collect()
    }
}

impl FilePlan {
    fn write(&mut self, file: &FileSpec) -> Result<(), String> {
        let at = |e: &dyn std::fmt::Display| format!("file {}: {e}", file.path);
        let uid = file
            .owner
            .as_deref()
            .map(user_id)
            .transpose()
            .map_err(|e| at(&e))?;
        let gid = file
            .group
            .as_deref()
            .map(group_id)
            .transpose()
            .map_err(|e| at(&e))?;
        let path = Path::new(&file.path);
        let existing = read_existing(path).map_err(|e| at(&e))?;
        let up_to_date = existing.as_ref().is_some_and(|was| {
            was.content == file.content.as_bytes()
                && was.mode == file.mode
                && uid.is_none_or(|u| u == was.uid)
                && gid.is_none_or(|g| g == was.gid)
        });
        if up_to_date {
            return Ok(());
        }
        self.steps.push((
            Step::Write {
                file: file.clone(),
                uid,
                gid,
            },
            Backup {
                path: path.to_path_buf(),
                previous: existing,
            },
        ));
        Ok(())
    }

    fn remove(&mut self, path: &str) -> Result<(), String> {
        let at = |e: std::io::Error| format!("removing {path}: {e}");
        let existing = read_existing(Path::new(path)).map_err(at)?;
        if existing.is_none() {
            return Ok(());
        }
        self.steps.push((
            Step::Remove(PathBuf::from(path)),
            Backup {
                path: PathBuf::from(path),
                previous: existing,
            },
        ));
        Ok(())
    }
}

/// Works out how to write `next`'s files and remove those only `previous` had, reading what
/// each touched file is now. Changes nothing.
pub(super) fn plan_files(previous: &DeviceSpec, next: &DeviceSpec) -> Result<FilePlan, String> {
    let wanted: BTreeSet<&str> = next.files.iter().map(|f| f.path.as_str()).collect();
    let mut plan = FilePlan::default();
    for file in &next.files {
        plan.write(file)?;
    }
    for file in &previous.files {
        if !wanted.contains(file.path.as_str()) {
            plan.remove(&file.path)?;
        }
    }
    Ok(plan)
}

/// Writes `next`'s files and removes those only `previous` had. On error, the changes made so far
/// are returned with it so the caller can restore them.
#[cfg(test)]
pub(super) fn apply_files(
    previous: &DeviceSpec,
    next: &DeviceSpec,
) -> Result<FileChanges, (FileChanges, String)> {
    match plan_files(previous, next) {
        Ok(plan) => plan.execute(),
        Err(error) => Err((FileChanges::default(), error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &Path, content: &str, mode: u32) -> FileSpec {
        let mut file = FileSpec::new(path.display().to_string(), content);
        file.mode = mode;
        file
    }

    fn spec(files: Vec<FileSpec>) -> DeviceSpec {
        DeviceSpec {
            files,
            ..Default::default()
        }
    }

    #[test]
    fn writes_files_with_modes_and_removes_dropped_ones() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("etc/a.conf");
        let b = dir.path().join("b.sh");
        let first = spec(vec![file(&a, "one", 0o644), file(&b, "#!/bin/sh", 0o755)]);
        let changes = apply_files(&DeviceSpec::default(), &first).unwrap();
        assert_eq!(changes.changed().len(), 2);
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "one");
        assert_eq!(
            std::fs::metadata(&b).unwrap().permissions().mode() & 0o777,
            0o755
        );

        let second = spec(vec![file(&a, "two", 0o600)]);
        apply_files(&first, &second).unwrap();
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "two");
        assert_eq!(
            std::fs::metadata(&a).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!b.exists());
        let again = apply_files(&second, &second).unwrap();
        assert!(again.is_empty(), "an unchanged file is not touched");
    }

    #[test]
    fn owner_and_group_are_set_and_unknown_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("owned");
        let me = std::fs::metadata(dir.path()).unwrap();
        let mut owned = file(&path, "x", 0o640);
        owned.owner = Some(me.uid().to_string());
        owned.group = Some(me.gid().to_string());
        apply_files(&DeviceSpec::default(), &spec(vec![owned.clone()])).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (me.uid(), me.gid()));

        owned.owner = Some("no-such-user-here".into());
        let (changes, error) = apply_files(&DeviceSpec::default(), &spec(vec![owned]))
            .err()
            .unwrap();
        assert!(error.contains("no such entry"), "{error}");
        assert!(changes.is_empty());
    }

    #[test]
    fn every_touched_file_is_read_first_and_can_be_restored() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, "original").unwrap();
        let blocker = dir.path().join("not-a-dir");
        std::fs::write(&blocker, "").unwrap();
        let new_file = dir.path().join("new");
        let next = spec(vec![
            file(&a, "changed", 0o644),
            file(&new_file, "fresh", 0o644),
            file(&blocker.join("x"), "cannot", 0o644),
        ]);
        // Every touched file is read before the first change: a path that cannot be read
        // refuses the whole step up front.
        let (changes, error) = apply_files(&DeviceSpec::default(), &next).err().unwrap();
        assert!(error.contains("not-a-dir"), "{error}");
        assert!(changes.is_empty());
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "original");
        assert!(!new_file.exists());

        let next = spec(vec![
            file(&a, "changed", 0o644),
            file(&new_file, "fresh", 0o644),
        ]);
        let changes = apply_files(&DeviceSpec::default(), &next).unwrap();
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "changed");
        assert!(changes.restore().is_empty());
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "original");
        assert!(!new_file.exists());
    }
}

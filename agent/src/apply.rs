//! Applying a spec to the device, all or nothing: every file the new spec writes or the old spec
//! owned is backed up first; if any step fails, every touched file is restored to what it was.

use crate::state::write_atomic;
use flotilla::spec::DeviceSpec;
use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Why an apply failed, and whether the previous state had to be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApplyError {
    pub message: String,
    /// True when some change had been made and was undone.
    pub rolled_back: bool,
}

/// A file as it was before the apply (`None`: it did not exist).
struct Backup {
    path: PathBuf,
    previous: Option<(Vec<u8>, u32)>,
}

fn read_existing(path: &Path) -> std::io::Result<Option<(Vec<u8>, u32)>> {
    match std::fs::read(path) {
        Ok(content) => {
            let mode = std::fs::metadata(path)?.permissions().mode() & 0o7777;
            Ok(Some((content, mode)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn restore(backups: &[Backup]) -> Vec<String> {
    let mut failures = Vec::new();
    for backup in backups.iter().rev() {
        let result = match &backup.previous {
            Some((content, mode)) => write_atomic(&backup.path, content, *mode),
            None => match std::fs::remove_file(&backup.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        };
        if let Err(e) = result {
            failures.push(format!("{}: {e}", backup.path.display()));
        }
    }
    failures
}

/// Moves the device from `previous` to `next`. On error nothing of `next` remains.
pub fn apply(previous: &DeviceSpec, next: &DeviceSpec) -> Result<(), ApplyError> {
    next.validate().map_err(|e| ApplyError {
        message: format!("invalid spec: {e}"),
        rolled_back: false,
    })?;
    let wanted: BTreeSet<&str> = next.files.iter().map(|f| f.path.as_str()).collect();
    let removed: Vec<&str> = previous
        .files
        .iter()
        .map(|f| f.path.as_str())
        .filter(|p| !wanted.contains(p))
        .collect();

    let mut backups = Vec::new();
    let outcome = (|| -> Result<(), String> {
        for file in &next.files {
            let path = Path::new(&file.path);
            let existing = read_existing(path).map_err(|e| format!("file {}: {e}", file.path))?;
            if existing.as_ref() == Some(&(file.content.as_bytes().to_vec(), file.mode)) {
                continue;
            }
            backups.push(Backup {
                path: path.to_path_buf(),
                previous: existing,
            });
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| format!("file {}: {e}", file.path))?;
            }
            write_atomic(path, file.content.as_bytes(), file.mode)
                .map_err(|e| format!("file {}: {e}", file.path))?;
        }
        for path in &removed {
            let path = Path::new(path);
            let existing =
                read_existing(path).map_err(|e| format!("file {}: {e}", path.display()))?;
            if existing.is_none() {
                continue;
            }
            backups.push(Backup {
                path: path.to_path_buf(),
                previous: existing,
            });
            std::fs::remove_file(path).map_err(|e| format!("removing {}: {e}", path.display()))?;
        }
        Ok(())
    })();

    match outcome {
        Ok(()) => Ok(()),
        Err(message) => {
            let rolled_back = !backups.is_empty();
            let failures = restore(&backups);
            let message = if failures.is_empty() {
                message
            } else {
                format!("{message}; restoring also failed: {}", failures.join(", "))
            };
            Err(ApplyError {
                message,
                rolled_back,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla::spec::FileSpec;

    fn file(path: &Path, content: &str, mode: u32) -> FileSpec {
        FileSpec {
            path: path.display().to_string(),
            content: content.into(),
            mode,
        }
    }

    #[test]
    fn writes_files_with_modes_and_removes_dropped_ones() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("etc/a.conf");
        let b = dir.path().join("b.sh");
        let first = DeviceSpec {
            files: vec![file(&a, "one", 0o644), file(&b, "#!/bin/sh", 0o755)],
        };
        apply(&DeviceSpec::default(), &first).unwrap();
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "one");
        assert_eq!(
            std::fs::metadata(&b).unwrap().permissions().mode() & 0o777,
            0o755
        );

        let second = DeviceSpec {
            files: vec![file(&a, "two", 0o600)],
        };
        apply(&first, &second).unwrap();
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "two");
        assert_eq!(
            std::fs::metadata(&a).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!b.exists());
    }

    #[test]
    fn a_failure_restores_every_touched_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, "original").unwrap();
        let blocker = dir.path().join("not-a-dir");
        std::fs::write(&blocker, "").unwrap();
        let new_file = dir.path().join("new");
        let next = DeviceSpec {
            files: vec![
                file(&a, "changed", 0o644),
                file(&new_file, "fresh", 0o644),
                file(&blocker.join("x"), "cannot", 0o644),
            ],
        };
        let error = apply(&DeviceSpec::default(), &next).unwrap_err();
        assert!(error.rolled_back);
        assert!(error.message.contains("not-a-dir"), "{}", error.message);
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "original");
        assert!(!new_file.exists());
    }

    #[test]
    fn invalid_specs_change_nothing() {
        let next = DeviceSpec {
            files: vec![FileSpec {
                path: "relative/path".into(),
                content: String::new(),
                mode: 0o644,
            }],
        };
        let error = apply(&DeviceSpec::default(), &next).unwrap_err();
        assert!(!error.rolled_back);
        assert!(error.message.contains("absolute"));
    }
}

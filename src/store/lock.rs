//! The single-process lock on an embedded SQLite database. SQLite serves one replica: the control
//! plane keeps its picture of the fleet in memory, so a second process on the same file would
//! serve a stale world instead of failing.

use super::StoreError;
use std::fs::{File, OpenOptions, TryLockError};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

/// An exclusive lock on `DATABASE.lock`, held for as long as the store is open. The operating
/// system releases it when the process ends, however it ends.
#[derive(Debug)]
pub struct ProcessLock {
    _file: File,
}

/// Where the lock of the SQLite database at `database` lives.
pub fn lock_path(database: &str) -> PathBuf {
    PathBuf::from(format!("{database}.lock"))
}

/// Takes the lock of the SQLite database at `database`, or says which file another process holds.
/// In-memory and URI databases have no file to guard.
pub(super) fn lock_sqlite(database: &str) -> Result<Option<ProcessLock>, StoreError> {
    if database == ":memory:" || database.starts_with("file:") {
        return Ok(None);
    }
    let path = lock_path(database);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| StoreError::Unavailable(format!("lock file {}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(ProcessLock { _file: file })),
        Err(TryLockError::WouldBlock) => Err(StoreError::InUse(format!(
            "the SQLite database {database} is in use by another flotilla process (it holds {}); \
             SQLite serves a single replica — stop the other process, or run several replicas \
             on PostgreSQL (--database-url)",
            path.display()
        ))),
        Err(TryLockError::Error(e)) => Err(StoreError::Unavailable(format!(
            "locking {}: {e}",
            path.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let database = dir.path().join("flotilla.db").display().to_string();
        let first = lock_sqlite(&database).unwrap();
        assert!(first.is_some());
        let error = lock_sqlite(&database).unwrap_err();
        assert!(matches!(error, StoreError::InUse(_)), "{error}");
        assert!(error.to_string().contains("--database-url"), "{error}");
        drop(first);
        assert!(lock_sqlite(&database).unwrap().is_some());
    }

    #[test]
    fn memory_databases_need_no_lock() {
        assert!(lock_sqlite(":memory:").unwrap().is_none());
    }
}

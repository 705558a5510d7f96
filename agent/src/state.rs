//! The agent's state directory: its private key (0600, generated here, never sent anywhere — or, for
//! a TPM key, only the TPM's wrapped blob of it), its management certificate, and the last spec it
//! applied successfully. Every write is atomic (temporary file, fsync, rename, fsync of the
//! directory).

use flotilla::spec::DeviceSpec;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) use flotilla::fsutil::{relink, sync_dir, write_atomic, write_atomic_owned};

/// What the agent last applied successfully.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub version: String,
    pub spec: DeviceSpec,
}

/// The device identity the control plane assigned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolled {
    pub device_id: String,
    pub device_name: String,
}

#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn open(root: &Path) -> Result<StateDir, StateError> {
        std::fs::create_dir_all(root).map_err(io(root))?;
        std::fs::set_permissions(root, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(io(root))?;
        Ok(StateDir {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn ca_path(&self) -> PathBuf {
        self.root.join("ca.crt")
    }
    fn enrolled_path(&self) -> PathBuf {
        self.root.join("enrolled.json")
    }
    fn applied_path(&self) -> PathBuf {
        self.root.join("applied.json")
    }

    pub fn read_optional(&self, path: &Path) -> Result<Option<String>, StateError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(path)(e)),
        }
    }

    pub fn write(&self, path: &Path, content: &[u8], mode: u32) -> Result<(), StateError> {
        write_atomic(path, content, mode).map_err(io(path))
    }

    fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &Path,
    ) -> Result<Option<T>, StateError> {
        self.read_optional(path)?
            .map(|text| {
                serde_json::from_str(&text).map_err(|e| StateError::Corrupt {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })
            })
            .transpose()
    }

    fn write_json<T: Serialize>(&self, path: &Path, value: &T) -> Result<(), StateError> {
        let text = serde_json::to_vec_pretty(value).map_err(|e| StateError::Corrupt {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        self.write(path, &text, 0o600)
    }

    pub fn enrolled(&self) -> Result<Option<Enrolled>, StateError> {
        self.read_json(&self.enrolled_path())
    }

    pub fn save_enrolled(&self, enrolled: &Enrolled) -> Result<(), StateError> {
        self.write_json(&self.enrolled_path(), enrolled)
    }

    pub fn applied(&self) -> Result<Applied, StateError> {
        Ok(self.read_json(&self.applied_path())?.unwrap_or_default())
    }

    /// The applied record, or — when it cannot be read or is corrupt — nothing known (the
    /// control plane then sends the whole spec again). A corrupt record is moved aside to
    /// `applied.json.corrupt` for inspection; the returned message says what happened.
    pub fn applied_or_unknown(&self) -> (Applied, Option<String>) {
        match self.applied() {
            Ok(applied) => (applied, None),
            Err(error) => {
                let path = self.applied_path();
                let aside = self.root.join("applied.json.corrupt");
                let moved = std::fs::rename(&path, &aside).is_ok();
                let message = if moved {
                    format!(
                        "{error}; moved to {} and resyncing the whole spec",
                        aside.display()
                    )
                } else {
                    format!("{error}; resyncing the whole spec")
                };
                (Applied::default(), Some(message))
            }
        }
    }

    pub fn save_applied(&self, applied: &Applied) -> Result<(), StateError> {
        self.write_json(&self.applied_path(), applied)
    }

    /// The renewal lead time the control plane last announced (used while it is unreachable).
    pub fn renew_before(&self) -> Option<std::time::Duration> {
        self.read_json::<u64>(&self.root.join("renew-before.json"))
            .ok()
            .flatten()
            .map(std::time::Duration::from_secs)
    }

    pub fn save_renew_before(&self, renew_before: std::time::Duration) -> Result<(), StateError> {
        self.write_json(
            &self.root.join("renew-before.json"),
            &renew_before.as_secs(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn atomic_write_sets_mode_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        write_atomic(&path, b"secret", 0o600).unwrap();
        write_atomic(&path, b"secret2", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"secret2");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn applied_state_round_trips_and_corruption_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        assert_eq!(state.applied().unwrap(), Applied::default());
        let applied = Applied {
            version: "abc".into(),
            spec: DeviceSpec::default(),
        };
        state.save_applied(&applied).unwrap();
        assert_eq!(state.applied().unwrap(), applied);
        std::fs::write(dir.path().join("applied.json"), "{").unwrap();
        assert!(matches!(state.applied(), Err(StateError::Corrupt { .. })));
    }
}

//! What the agent remembers about updates across restarts and reboots, in `update/` of the state
//! directory, each record written atomically: the agent build switched to but not yet confirmed
//! (with its deadline and how often it was started), the OS image the device rebooted into, and
//! the last update that failed (so the same spec version is not tried again).

use crate::state::write_atomic;
use flotilla::status::UpdateFailure;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const PENDING_AGENT: &str = "pending-agent.json";
const PENDING_OS: &str = "pending-os.json";
const FAILURE: &str = "failure.json";
const DOWNLOADS: &str = "downloads";

/// An agent build switched to, until it confirms or is rolled back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PendingAgent {
    pub version: String,
    pub sha256: String,
    pub from_version: String,
    /// The build to return to (`None`: the launcher itself).
    pub from_sha256: Option<String>,
    /// The spec version that asked for it.
    pub spec_version: String,
    pub switched_ms: i64,
    pub deadline_ms: i64,
    /// Starts of the new build so far.
    pub attempts: u32,
}

/// An OS image the device was rebooted into, until the booted image says how it went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PendingOs {
    pub image: String,
    pub staged_digest: String,
    pub from_digest: String,
    pub spec_version: String,
    /// The boot the reboot was asked from: a different boot id means the device rebooted.
    pub boot_id: String,
    pub requested_ms: i64,
}

/// The last update that failed, and the spec version that asked for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Failed {
    pub failure: UpdateFailure,
    pub spec_version: String,
}

/// The `update/` directory.
#[derive(Debug, Clone)]
pub(crate) struct Records {
    dir: PathBuf,
}

impl Records {
    pub(crate) fn new(state_root: &Path) -> Records {
        Records {
            dir: state_root.join("update"),
        }
    }

    /// Where downloads are kept while they arrive (on the state directory's filesystem, so a
    /// finished one moves into the install directory by rename when both share it).
    pub(crate) fn downloads(&self) -> PathBuf {
        self.dir.join(DOWNLOADS)
    }

    fn read<T: DeserializeOwned>(&self, name: &str) -> Option<T> {
        let path = self.dir.join(name);
        let text = std::fs::read_to_string(&path).ok()?;
        match serde_json::from_str(&text) {
            Ok(value) => Some(value),
            Err(error) => {
                // A record that cannot be read is as good as none; say so once and drop it.
                tracing::warn!(path = %path.display(), %error, "unreadable update record removed");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    fn write<T: Serialize>(&self, name: &str, value: &T) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let text = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
        write_atomic(&self.dir.join(name), &text, 0o600)
    }

    fn remove(&self, name: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.dir.join(name)) {
            Ok(()) => crate::state::sync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub(crate) fn pending_agent(&self) -> Option<PendingAgent> {
        self.read(PENDING_AGENT)
    }

    pub(crate) fn save_pending_agent(&self, pending: &PendingAgent) -> std::io::Result<()> {
        self.write(PENDING_AGENT, pending)
    }

    pub(crate) fn clear_pending_agent(&self) -> std::io::Result<()> {
        self.remove(PENDING_AGENT)
    }

    pub(crate) fn pending_os(&self) -> Option<PendingOs> {
        self.read(PENDING_OS)
    }

    pub(crate) fn save_pending_os(&self, pending: &PendingOs) -> std::io::Result<()> {
        self.write(PENDING_OS, pending)
    }

    pub(crate) fn clear_pending_os(&self) -> std::io::Result<()> {
        self.remove(PENDING_OS)
    }

    pub(crate) fn failure(&self) -> Option<Failed> {
        self.read(FAILURE)
    }

    pub(crate) fn save_failure(&self, failed: &Failed) -> std::io::Result<()> {
        self.write(FAILURE, failed)
    }

    pub(crate) fn clear_failure(&self) -> std::io::Result<()> {
        self.remove(FAILURE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla::status::UpdateKind;

    #[test]
    fn records_round_trip_and_a_corrupt_one_counts_as_none() {
        let tmp = tempfile::tempdir().unwrap();
        let records = Records::new(tmp.path());
        assert_eq!(records.failure(), None);
        let failed = Failed {
            failure: UpdateFailure {
                kind: UpdateKind::Agent,
                target: "1.1.0".into(),
                reason: "bad".into(),
                rolled_back: true,
                at_ms: 5,
            },
            spec_version: "abc".into(),
        };
        records.save_failure(&failed).unwrap();
        assert_eq!(records.failure(), Some(failed));
        std::fs::write(tmp.path().join("update").join(FAILURE), "{").unwrap();
        assert_eq!(records.failure(), None);
        assert!(!tmp.path().join("update").join(FAILURE).exists());
        records.clear_failure().unwrap();
    }
}

//! Agent builds on disk: each in a directory of its own named by the binary's SHA-256
//! (`builds/<sha256>/flotilla-agent`, with `release.json` saying which release it is), complete
//! and fsynced before one atomic rename of the `current` symlink makes it the one that runs. The
//! build it replaced stays as `previous` for a rollback. The binary the service manager starts
//! (the packaged one) acts as the launcher: it runs whatever `current` names.

use crate::state::{relink, sync_dir, write_atomic};
pub(crate) use flotilla::pki::sha256_file as digest_file;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub(crate) const BINARY: &str = "flotilla-agent";
const CURRENT: &str = "current";
const PREVIOUS: &str = "previous";
const BUILDS: &str = "builds";
const INFO: &str = "release.json";

/// Which release a build is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildInfo {
    pub version: String,
    pub sha256: String,
}

/// The install directory.
#[derive(Debug, Clone)]
pub struct Builds {
    dir: PathBuf,
}

impl Builds {
    pub fn new(dir: &Path) -> Builds {
        Builds {
            dir: dir.to_path_buf(),
        }
    }

    fn build_dir(&self, sha256: &str) -> PathBuf {
        self.dir.join(BUILDS).join(sha256)
    }

    /// The binary of a build.
    pub fn binary(&self, sha256: &str) -> PathBuf {
        self.build_dir(sha256).join(BINARY)
    }

    /// The binary `current` names, through the link (what a launcher runs).
    pub fn current_binary(&self) -> PathBuf {
        self.dir.join(CURRENT).join(BINARY)
    }

    /// The release a build is, if it is installed.
    pub fn info(&self, sha256: &str) -> Option<BuildInfo> {
        let text = std::fs::read_to_string(self.build_dir(sha256).join(INFO)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Whether a complete build of `sha256` is installed.
    pub fn has(&self, sha256: &str) -> bool {
        self.info(sha256).is_some() && self.binary(sha256).is_file()
    }

    fn link(&self, name: &str) -> Option<String> {
        let target = std::fs::read_link(self.dir.join(name)).ok()?;
        let sha = target.file_name()?.to_string_lossy().into_owned();
        Some(sha)
    }

    /// The build `current` names.
    pub fn current(&self) -> Option<String> {
        self.link(CURRENT)
    }

    /// The build `previous` names.
    pub fn previous(&self) -> Option<String> {
        self.link(PREVIOUS)
    }

    /// Installs the file at `source` (moved, not copied: it is on the same filesystem) as the
    /// build `info.sha256`: binary and record fsynced before the directory holds them.
    pub fn install_from(&self, source: &Path, info: &BuildInfo) -> std::io::Result<()> {
        let dir = self.build_dir(&info.sha256);
        std::fs::create_dir_all(&dir)?;
        let binary = dir.join(BINARY);
        let staged = dir.join(format!(".{BINARY}.tmp"));
        std::fs::rename(source, &staged)?;
        let file = std::fs::File::open(&staged)?;
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        file.sync_all()?;
        std::fs::rename(&staged, &binary)?;
        self.finish(&dir, info)
    }

    /// Installs a copy of `exe` (the running binary) as the build `info.sha256`, so it can be
    /// returned to whatever happens to the file it was started from.
    pub fn install_copy(&self, exe: &Path, info: &BuildInfo) -> std::io::Result<()> {
        let dir = self.build_dir(&info.sha256);
        std::fs::create_dir_all(&dir)?;
        let staged = dir.join(format!(".{BINARY}.tmp"));
        {
            let mut from = std::fs::File::open(exe)?;
            let mut to = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o755)
                .open(&staged)?;
            std::io::copy(&mut from, &mut to)?;
            to.flush()?;
            to.sync_all()?;
        }
        std::fs::rename(&staged, dir.join(BINARY))?;
        self.finish(&dir, info)
    }

    fn finish(&self, dir: &Path, info: &BuildInfo) -> std::io::Result<()> {
        let text = serde_json::to_vec_pretty(info).map_err(std::io::Error::other)?;
        write_atomic(&dir.join(INFO), &text, 0o644)?;
        sync_dir(dir)?;
        sync_dir(&self.dir.join(BUILDS))
    }

    /// Makes `sha256` the build that runs and `previous` the one to return to (`None` leaves no
    /// previous: the launcher itself is the fallback). Each link moves by one atomic rename.
    pub fn switch(&self, sha256: &str, previous: Option<&str>) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        match previous {
            Some(previous) => relink(&self.dir, PREVIOUS, &format!("{BUILDS}/{previous}"))?,
            None => remove_link(&self.dir, PREVIOUS)?,
        }
        relink(&self.dir, CURRENT, &format!("{BUILDS}/{sha256}"))
    }

    /// Goes back to `previous` (or, with none, to the launcher itself); returns the build that
    /// now runs, if any.
    pub fn roll_back(&self) -> std::io::Result<Option<String>> {
        match self.previous().filter(|p| self.has(p)) {
            Some(previous) => {
                relink(&self.dir, CURRENT, &format!("{BUILDS}/{previous}"))?;
                remove_link(&self.dir, PREVIOUS)?;
                Ok(Some(previous))
            }
            None => {
                remove_link(&self.dir, CURRENT)?;
                Ok(None)
            }
        }
    }

    /// Removes every build but the current and previous one (and `.tmp` leftovers).
    pub fn prune(&self) {
        let keep = [self.current(), self.previous()];
        let Ok(entries) = std::fs::read_dir(self.dir.join(BUILDS)) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !keep.iter().flatten().any(|k| *k == name) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

fn remove_link(dir: &Path, link: &str) -> std::io::Result<()> {
    match std::fs::remove_file(dir.join(link)) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, content: &[u8]) -> (PathBuf, BuildInfo) {
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        let (sha256, _) = digest_file(&path).unwrap();
        (
            path,
            BuildInfo {
                version: name.into(),
                sha256,
            },
        )
    }

    #[test]
    fn a_switch_keeps_the_previous_build_and_a_rollback_returns_to_it() {
        let tmp = tempfile::tempdir().unwrap();
        let builds = Builds::new(&tmp.path().join("agent"));
        assert_eq!(builds.current(), None);
        let (old, old_info) = write(tmp.path(), "1.0.0", b"old build");
        let (new, new_info) = write(tmp.path(), "1.1.0", b"new build");
        builds.install_copy(&old, &old_info).unwrap();
        builds.install_from(&new, &new_info).unwrap();
        assert!(!new.exists(), "the download is moved, not copied");
        assert!(builds.has(&old_info.sha256) && builds.has(&new_info.sha256));
        assert_eq!(builds.info(&new_info.sha256), Some(new_info.clone()));
        builds
            .switch(&new_info.sha256, Some(&old_info.sha256))
            .unwrap();
        assert_eq!(builds.current(), Some(new_info.sha256.clone()));
        assert_eq!(builds.previous(), Some(old_info.sha256.clone()));
        assert_eq!(
            std::fs::read(builds.current_binary()).unwrap(),
            b"new build"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(builds.current_binary())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(builds.roll_back().unwrap(), Some(old_info.sha256.clone()));
        assert_eq!(
            std::fs::read(builds.current_binary()).unwrap(),
            b"old build"
        );
        assert_eq!(builds.previous(), None);
        // With nothing to go back to, the launcher runs itself.
        assert_eq!(builds.roll_back().unwrap(), None);
        assert_eq!(builds.current(), None);
        builds.switch(&old_info.sha256, None).unwrap();
        builds.prune();
        assert!(builds.has(&old_info.sha256));
        assert!(!builds.has(&new_info.sha256));
    }
}

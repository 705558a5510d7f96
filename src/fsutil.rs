//! Writing files so that a crash or power loss leaves the old content or the new, never a mix:
//! the one atomic-write helper of the control plane, the agent and flotctl (a temporary file in
//! the same directory, fsynced, renamed over the target, then the directory fsynced so the rename
//! itself survives), and the symlink switch the agent's versioned directories use.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Makes the entries of `dir` (renames, removals) durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Writes `content` to `path` atomically with permission `mode` (whatever the umask), creating
/// the parent directory if needed.
pub fn write_atomic(path: &Path, content: &[u8], mode: u32) -> std::io::Result<()> {
    write_atomic_owned(path, content, mode, None, None)
}

/// Like `write_atomic`, also giving the file an owner and group before it becomes visible.
pub fn write_atomic_owned(
    path: &Path,
    content: &[u8],
    mode: u32,
    uid: Option<u32>,
    gid: Option<u32>,
) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.flotilla-tmp"));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(content)?;
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::fchown(&file, uid, gid)?;
        }
        // The umask may have narrowed the mode given at creation, and an existing temporary
        // file keeps its own.
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Replaces the symlink `dir/link` by one pointing at `target`, atomically (a new link renamed
/// over the old), and makes it durable.
pub fn relink(dir: &Path, link: &str, target: &str) -> std::io::Result<()> {
    let tmp = dir.join(format!("{link}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    std::fs::rename(&tmp, dir.join(link))?;
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn an_atomic_write_sets_the_mode_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/k");
        write_atomic(&path, b"secret", 0o600).unwrap();
        write_atomic(&path, b"secret2", 0o640).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"secret2");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join("sub")).unwrap().count(),
            1
        );
        relink(dir.path(), "current", "sub").unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("current/k")).unwrap(),
            b"secret2"
        );
    }
}

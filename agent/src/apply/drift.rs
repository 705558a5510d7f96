//! Drift: whether what the agent manages still matches the spec it last applied — each file's
//! content, mode, owner and group — and putting it back unless the spec says `drift: report`.
//! Run at start and periodically by the session; never while an apply runs (same task).

use super::accounts::{group_id, user_id};
use super::files::{Existing, read_existing, write_file};
use flotilla::spec::{DeviceSpec, DriftPolicy, FileSpec};
use flotilla::status::DriftItem;
use std::path::Path;

/// What differs between a file on disk and its spec (empty: nothing).
fn differences(
    file: &FileSpec,
    existing: Option<&Existing>,
    uid: Option<u32>,
    gid: Option<u32>,
) -> Vec<&'static str> {
    let Some(was) = existing else {
        return vec!["missing"];
    };
    let mut found = Vec::new();
    if was.content != file.content.as_bytes() {
        found.push("content");
    }
    if was.mode != file.mode {
        found.push("mode");
    }
    if uid.is_some_and(|u| u != was.uid) {
        found.push("owner");
    }
    if gid.is_some_and(|g| g != was.gid) {
        found.push("group");
    }
    found
}

/// Checks every file of `spec`; corrects those that differ unless their policy is `report`.
/// Returns every file that differed, with what was done.
pub fn check_and_correct(spec: &DeviceSpec) -> Vec<DriftItem> {
    spec.files.iter().filter_map(check_file).collect()
}

fn check_file(file: &FileSpec) -> Option<DriftItem> {
    let item = |difference: String, corrected: bool, error: String| DriftItem {
        kind: "file".into(),
        name: file.path.clone(),
        difference,
        corrected,
        error,
    };
    // An owner that no longer resolves is itself a difference the agent cannot correct.
    let uid = match file.owner.as_deref().map(user_id).transpose() {
        Ok(uid) => uid,
        Err(error) => return Some(item("owner".into(), false, error)),
    };
    let gid = match file.group.as_deref().map(group_id).transpose() {
        Ok(gid) => gid,
        Err(error) => return Some(item("group".into(), false, error)),
    };
    let existing = match read_existing(Path::new(&file.path)) {
        Ok(existing) => existing,
        Err(error) => return Some(item("unreadable".into(), false, error.to_string())),
    };
    let found = differences(file, existing.as_ref(), uid, gid);
    if found.is_empty() {
        return None;
    }
    let difference = found.join(",");
    if file.drift == Some(DriftPolicy::Report) {
        tracing::warn!(path = %file.path, %difference, "managed file drifted; reporting it (drift: report)");
        return Some(item(difference, false, String::new()));
    }
    match write_file(file, uid, gid) {
        Ok(()) => {
            tracing::warn!(path = %file.path, %difference, "managed file drifted; put back as the spec says");
            metrics::counter!("flotilla_agent_drift_corrections_total").increment(1);
            Some(item(difference, true, String::new()))
        }
        Err(error) => {
            tracing::warn!(path = %file.path, %difference, %error, "managed file drifted and could not be put back");
            Some(item(difference, false, error))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn finds_corrects_and_reports() {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name).display().to_string();
        let corrected = FileSpec::new(path("a"), "a\n");
        let mut reported = FileSpec::new(path("b"), "b\n");
        reported.drift = Some(DriftPolicy::Report);
        let missing = FileSpec::new(path("c"), "c\n");
        let spec = DeviceSpec {
            files: vec![corrected.clone(), reported.clone(), missing],
            ..Default::default()
        };
        std::fs::write(path("a"), "a\n").unwrap();
        std::fs::set_permissions(path("a"), std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(path("b"), "b\n").unwrap();
        std::fs::set_permissions(path("b"), std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(path("c"), "c\n").unwrap();
        std::fs::set_permissions(path("c"), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(check_and_correct(&spec).is_empty(), "all in place");

        std::fs::write(path("a"), "changed\n").unwrap();
        std::fs::set_permissions(path("b"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(path("b"), "local\n").unwrap();
        std::fs::remove_file(path("c")).unwrap();
        let items = check_and_correct(&spec);
        let found: Vec<(&str, &str, bool)> = items
            .iter()
            .map(|i| {
                (
                    i.name.rsplit('/').next().unwrap(),
                    i.difference.as_str(),
                    i.corrected,
                )
            })
            .collect();
        assert_eq!(
            found,
            [
                ("a", "content", true),
                ("b", "content,mode", false),
                ("c", "missing", true)
            ]
        );
        assert_eq!(std::fs::read_to_string(path("a")).unwrap(), "a\n");
        assert_eq!(std::fs::read_to_string(path("c")).unwrap(), "c\n");
        assert_eq!(
            std::fs::read_to_string(path("b")).unwrap(),
            "local\n",
            "left alone"
        );
        // Next check: only the reported one remains.
        let again = check_and_correct(&spec);
        assert_eq!(again.len(), 1);
        assert!(!again[0].corrected);
    }
}

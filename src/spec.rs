//! The device spec as the domain sees it: validation, canonical content hash and version, and the
//! conversions to and from its protobuf form. Pure: no I/O.

use crate::proto::agent::v1 as pb;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::path::{Component, Path};

/// Default permission bits of a managed file.
pub const DEFAULT_FILE_MODE: u32 = 0o644;
/// Upper bound of a whole rendered spec, so one device cannot hold the push path hostage.
pub const MAX_SPEC_BYTES: usize = 1024 * 1024;
/// Number of hex digits of the content hash that make up a version.
const VERSION_HEX_LEN: usize = 16;

/// What a device should have.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileSpec>,
}

/// One managed file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    pub path: String,
    #[serde(default)]
    pub content: String,
    /// Permission bits; written and read as an octal string ("0644") in YAML/JSON.
    #[serde(default = "default_mode", with = "octal_mode")]
    pub mode: u32,
}

fn default_mode() -> u32 {
    DEFAULT_FILE_MODE
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("files[{index}].path {path:?}: {reason}")]
    BadPath {
        index: usize,
        path: String,
        reason: &'static str,
    },
    #[error("files[{index}].path {path:?} appears more than once")]
    DuplicatePath { index: usize, path: String },
    #[error("files[{index}].mode {mode:o} is not a permission mode (at most 07777)")]
    BadMode { index: usize, mode: u32 },
    #[error("spec is {size} bytes; the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
}

impl SpecError {
    /// The request field the error is about, for gRPC field details.
    pub fn field(&self) -> String {
        match self {
            SpecError::BadPath { index, .. } | SpecError::DuplicatePath { index, .. } => {
                format!("spec.files[{index}].path")
            }
            SpecError::BadMode { index, .. } => format!("spec.files[{index}].mode"),
            SpecError::TooLarge { .. } => "spec".to_string(),
        }
    }
}

/// Checks that a path is absolute and normalised: no `.`/`..` components, no empty segments.
pub fn check_path(path: &str) -> Result<(), &'static str> {
    if !path.starts_with('/') {
        return Err("must be an absolute path");
    }
    if path == "/" || path.ends_with('/') {
        return Err("must name a file, not a directory");
    }
    if path.contains("//") || path.contains('\0') {
        return Err("must not contain empty segments or NUL");
    }
    for component in Path::new(path).components() {
        match component {
            Component::RootDir | Component::Normal(_) => {}
            Component::ParentDir => return Err("must not contain '..'"),
            Component::CurDir | Component::Prefix(_) => return Err("must not contain '.'"),
        }
    }
    if path
        .split('/')
        .any(|segment| segment == "." || segment == "..")
    {
        return Err("must not contain '.' or '..'");
    }
    Ok(())
}

impl DeviceSpec {
    /// Validates the whole spec; the first problem found is reported.
    pub fn validate(&self) -> Result<(), SpecError> {
        let mut seen = BTreeSet::new();
        let mut size = 0usize;
        for (index, file) in self.files.iter().enumerate() {
            check_path(&file.path).map_err(|reason| SpecError::BadPath {
                index,
                path: file.path.clone(),
                reason,
            })?;
            if !seen.insert(file.path.as_str()) {
                return Err(SpecError::DuplicatePath {
                    index,
                    path: file.path.clone(),
                });
            }
            if file.mode > 0o7777 {
                return Err(SpecError::BadMode {
                    index,
                    mode: file.mode,
                });
            }
            size += file.path.len() + file.content.len();
        }
        if size > MAX_SPEC_BYTES {
            return Err(SpecError::TooLarge {
                size,
                limit: MAX_SPEC_BYTES,
            });
        }
        Ok(())
    }

    /// The spec with files in path order, so equal content always hashes equally.
    pub fn normalized(mut self) -> DeviceSpec {
        self.files.sort_by(|a, b| a.path.cmp(&b.path));
        self
    }

    /// Hex SHA-256 of the canonical (normalised, JSON) encoding.
    pub fn content_hash(&self) -> String {
        let canonical = self.clone().normalized();
        // Serialising plain structs of strings and integers cannot fail.
        let bytes = serde_json::to_vec(&canonical).unwrap_or_default();
        hex::encode(Sha256::digest(bytes))
    }
}

/// The version of a spec with the given content hash.
pub fn version_of(content_hash: &str) -> String {
    content_hash[..VERSION_HEX_LEN.min(content_hash.len())].to_string()
}

impl From<DeviceSpec> for pb::DeviceSpec {
    fn from(spec: DeviceSpec) -> Self {
        pb::DeviceSpec {
            files: spec
                .files
                .into_iter()
                .map(|f| pb::FileSpec {
                    path: f.path,
                    content: f.content,
                    mode: f.mode,
                })
                .collect(),
        }
    }
}

impl From<pb::DeviceSpec> for DeviceSpec {
    fn from(spec: pb::DeviceSpec) -> Self {
        DeviceSpec {
            files: spec
                .files
                .into_iter()
                .map(|f| FileSpec {
                    path: f.path,
                    content: f.content,
                    mode: if f.mode == 0 {
                        DEFAULT_FILE_MODE
                    } else {
                        f.mode
                    },
                })
                .collect(),
        }
    }
}

mod octal_mode {
    use serde::{Deserialize, Deserializer, Serializer, de};

    pub fn serialize<S: Serializer>(mode: &u32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{mode:04o}"))
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Number(u32),
    }

    /// Accepts "0644" / "644" / "0o644" as octal text; a bare number is taken as octal digits
    /// too (YAML `mode: 644`), because that is what every operator means by it.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        let text = match Raw::deserialize(d)? {
            Raw::Text(t) => t,
            Raw::Number(n) => n.to_string(),
        };
        let digits = text.trim_start_matches("0o");
        u32::from_str_radix(digits, 8)
            .map_err(|_| de::Error::custom(format!("mode {text:?} is not an octal number")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str) -> FileSpec {
        FileSpec {
            path: path.into(),
            content: "x".into(),
            mode: 0o644,
        }
    }

    #[test]
    fn rejects_relative_and_dotdot_paths() {
        for bad in [
            "etc/x",
            "/etc/../x",
            "/etc/./x",
            "/",
            "/etc/",
            "//x",
            "/a//b",
            "",
        ] {
            let spec = DeviceSpec {
                files: vec![file(bad)],
            };
            assert!(
                matches!(spec.validate(), Err(SpecError::BadPath { .. })),
                "{bad}"
            );
        }
        let ok = DeviceSpec {
            files: vec![file("/etc/motd"), file("/opt/app/config.toml")],
        };
        assert_eq!(ok.validate(), Ok(()));
    }

    #[test]
    fn rejects_duplicates_bad_modes_and_oversize() {
        let dup = DeviceSpec {
            files: vec![file("/a"), file("/a")],
        };
        assert!(matches!(
            dup.validate(),
            Err(SpecError::DuplicatePath { index: 1, .. })
        ));
        let mut bad_mode = file("/a");
        bad_mode.mode = 0o10000;
        let spec = DeviceSpec {
            files: vec![bad_mode],
        };
        assert_eq!(spec.validate().unwrap_err().field(), "spec.files[0].mode");
        let mut big = file("/big");
        big.content = "x".repeat(MAX_SPEC_BYTES + 1);
        let spec = DeviceSpec { files: vec![big] };
        assert!(matches!(spec.validate(), Err(SpecError::TooLarge { .. })));
    }

    #[test]
    fn hash_ignores_file_order_but_not_content() {
        let a = DeviceSpec {
            files: vec![file("/a"), file("/b")],
        };
        let b = DeviceSpec {
            files: vec![file("/b"), file("/a")],
        };
        assert_eq!(a.content_hash(), b.content_hash());
        let mut c = a.clone();
        c.files[0].mode = 0o600;
        assert_ne!(a.content_hash(), c.content_hash());
        assert_eq!(version_of(&a.content_hash()).len(), 16);
    }

    #[test]
    fn mode_parses_as_octal_in_yaml_and_json() {
        let f: FileSpec = serde_json::from_str(r#"{"path":"/a","mode":"0600"}"#).unwrap();
        assert_eq!(f.mode, 0o600);
        let f: FileSpec = serde_json::from_str(r#"{"path":"/a","mode":755}"#).unwrap();
        assert_eq!(f.mode, 0o755);
        let f: FileSpec = serde_json::from_str(r#"{"path":"/a"}"#).unwrap();
        assert_eq!(f.mode, DEFAULT_FILE_MODE);
        assert!(serde_json::from_str::<FileSpec>(r#"{"path":"/a","mode":"9"}"#).is_err());
        assert_eq!(
            serde_json::to_string(&f).unwrap(),
            r#"{"path":"/a","content":"","mode":"0644"}"#
        );
    }
}

//! Agent releases: publishing a signed build (its bytes go to the database, so every replica can
//! serve it), listing and deleting releases, and serving a release's bytes to devices — streamed
//! from a per-replica file cache in bounded chunks, at most `max_downloads` at once and
//! `max_rate` bytes a second per replica, so a fleet upgrading at once costs bounded memory and
//! bandwidth. The control plane never signs a release: it checks the operator's signature only
//! when it was given the release keys, and devices check it against their own pinned keys.

use super::{Actor, ControlError, ControlPlane};
use crate::release::{ReleaseKey, SIGNATURE_LEN, SignedRelease};
use crate::scope::Scope;
use crate::spec::parse_release_version;
use crate::store::ReleaseRecord;
use rand::Rng;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Bytes per chunk sent to a device.
pub const CHUNK_BYTES: usize = 64 * 1024;

/// How releases are stored and served.
#[derive(Debug, Clone)]
pub struct ReleasePolicy {
    /// Where this replica keeps the artifacts it serves (filled from the database on first use).
    pub artifact_dir: PathBuf,
    /// Downloads this replica serves at once; more are told to retry later.
    pub max_downloads: usize,
    /// Bytes a second this replica sends to devices in all (0: no limit).
    pub max_rate: u64,
    /// Largest artifact accepted.
    pub max_artifact_bytes: u64,
    /// Release keys the control plane checks signatures with at publication (none: not checked
    /// here; devices always check against their own).
    pub keys: Vec<ReleaseKey>,
}

impl Default for ReleasePolicy {
    fn default() -> Self {
        ReleasePolicy {
            artifact_dir: std::env::temp_dir().join("flotilla-artifacts"),
            max_downloads: 32,
            max_rate: 0,
            max_artifact_bytes: 512 * 1024 * 1024,
            keys: Vec::new(),
        }
    }
}

/// What an operator publishes, apart from the bytes.
#[derive(Debug, Clone)]
pub struct ReleaseHeader {
    /// The agent version.
    pub version: String,
    /// SHA-256 (hex) of the binary.
    pub sha256: String,
    /// Its size, bytes.
    pub size: u64,
    /// The release key's signature (see `release::SignedRelease`).
    pub signature: Vec<u8>,
    /// Where devices download it instead, if not from the control plane ("" for none).
    pub url: String,
}

/// A release as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseView {
    /// The agent version.
    pub version: String,
    /// SHA-256 (hex) of the binary.
    pub sha256: String,
    /// Its size, bytes.
    pub size: u64,
    /// The release key's signature.
    pub signature: Vec<u8>,
    /// The external download URL, if any.
    pub url: String,
    /// Fingerprint of the key that signed, when known.
    pub key_fingerprint: String,
    /// When it was published, Unix milliseconds.
    pub published_ms: i64,
    /// Who published it.
    pub published_by: String,
}

impl From<ReleaseRecord> for ReleaseView {
    fn from(r: ReleaseRecord) -> Self {
        ReleaseView {
            signature: hex::decode(&r.signature).unwrap_or_default(),
            version: r.version,
            sha256: r.sha256,
            size: u64::try_from(r.size).unwrap_or_default(),
            url: r.url,
            key_fingerprint: r.key_fingerprint,
            published_ms: r.published_ms,
            published_by: r.published_by,
        }
    }
}

/// The bytes of an artifact being uploaded: written to a file beside the cache while hashed and
/// counted, so an upload of any size costs one buffer of memory.
pub struct Upload {
    file: std::fs::File,
    path: PathBuf,
    hasher: Sha256,
    written: u64,
    limit: u64,
}

impl Upload {
    /// Writes the next bytes, refusing more than the header announced.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), ControlError> {
        self.written += bytes.len() as u64;
        if self.written > self.limit {
            return Err(ControlError::invalid(
                "chunk",
                format!(
                    "the artifact is larger than the {} bytes allowed",
                    self.limit
                ),
            ));
        }
        self.hasher.update(bytes);
        self.file
            .write_all(bytes)
            .map_err(|e| ControlError::Internal(format!("writing {}: {e}", self.path.display())))
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        // Kept only if `publish_release` moved it into the cache first.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Artifacts this replica serves, and the limits on serving them.
#[derive(Debug)]
pub(super) struct Artifacts {
    dir: PathBuf,
    /// One fill from the database at a time per artifact.
    filling: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    downloads: Arc<tokio::sync::Semaphore>,
    throttle: Option<Arc<Throttle>>,
}

impl Artifacts {
    pub(super) fn new(policy: &ReleasePolicy) -> Artifacts {
        Artifacts {
            dir: policy.artifact_dir.clone(),
            filling: Mutex::default(),
            downloads: Arc::new(tokio::sync::Semaphore::new(policy.max_downloads.max(1))),
            throttle: (policy.max_rate > 0).then(|| Arc::new(Throttle::new(policy.max_rate))),
        }
    }

    fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256)
    }
}

/// A token bucket shared by every download of the replica: at most `rate` bytes a second, with a
/// burst of one second's worth.
#[derive(Debug)]
struct Throttle {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl Throttle {
    fn new(rate: u64) -> Throttle {
        Throttle {
            rate: rate as f64,
            state: Mutex::new((rate as f64, Instant::now())),
        }
    }

    /// Takes `bytes` from the bucket; how long to wait before sending them.
    fn take(&self, bytes: usize) -> Duration {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let (tokens, last) = *state;
        let tokens = (tokens + now.duration_since(last).as_secs_f64() * self.rate).min(self.rate);
        let left = tokens - bytes as f64;
        *state = (left, now);
        if left >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-left / self.rate)
        }
    }
}

/// One device's download: the cached file from an offset, read a chunk at a time. Holds one of
/// the replica's download slots until dropped.
pub struct Download {
    file: std::fs::File,
    offset: u64,
    size: u64,
    throttle: Option<Arc<Throttle>>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Download {
    /// The artifact's size, bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The next chunk and its offset; `None` at the end.
    pub async fn next_chunk(&mut self) -> Result<Option<(u64, Vec<u8>)>, ControlError> {
        if self.offset >= self.size {
            return Ok(None);
        }
        let want = CHUNK_BYTES.min((self.size - self.offset) as usize);
        if let Some(throttle) = &self.throttle {
            let wait = throttle.take(want);
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        let mut chunk = vec![0; want];
        // A 64 KiB read of a local file: shorter than handing it to a blocking thread.
        self.file
            .read_exact(&mut chunk)
            .map_err(|e| ControlError::Internal(format!("reading an artifact: {e}")))?;
        let at = self.offset;
        self.offset += want as u64;
        Ok(Some((at, chunk)))
    }
}

fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

fn check_url(url: &str) -> Result<(), ControlError> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| ControlError::invalid("header.url", "must be an http:// or https:// URL"))?;
    if rest.is_empty() || url.len() > 2048 || url.chars().any(|c| c.is_whitespace()) {
        return Err(ControlError::invalid("header.url", "is not a usable URL"));
    }
    Ok(())
}

impl ControlPlane {
    /// Starts receiving an artifact's bytes.
    pub fn begin_upload(&self) -> Result<Upload, ControlError> {
        let dir = &self.artifacts.dir;
        std::fs::create_dir_all(dir)
            .map_err(|e| ControlError::Internal(format!("creating {}: {e}", dir.display())))?;
        let path = dir.join(format!(
            ".upload-{}",
            hex::encode(rand::rng().random::<[u8; 8]>())
        ));
        let file = std::fs::File::create(&path)
            .map_err(|e| ControlError::Internal(format!("creating {}: {e}", path.display())))?;
        Ok(Upload {
            file,
            path,
            hasher: Sha256::new(),
            written: 0,
            limit: self.policy.releases.max_artifact_bytes,
        })
    }

    /// Publishes a release: checks the header against the bytes (and the signature, when the
    /// control plane knows release keys), stores both with the call's audit record. Publishing the
    /// same release again is a no-op.
    pub async fn publish_release(
        &self,
        actor: &Actor,
        scope: &Scope,
        header: ReleaseHeader,
        upload: Option<Upload>,
    ) -> Result<ReleaseView, ControlError> {
        ensure_unscoped("publishing an agent release", scope)?;
        parse_release_version(&header.version)
            .map_err(|reason| ControlError::invalid("header.version", reason))?;
        if !is_sha256_hex(&header.sha256) {
            return Err(ControlError::invalid(
                "header.sha256",
                "must be 64 lowercase hex digits (SHA-256)",
            ));
        }
        if header.size == 0 || header.size > self.policy.releases.max_artifact_bytes {
            return Err(ControlError::invalid(
                "header.size",
                format!(
                    "must be between 1 and {} bytes",
                    self.policy.releases.max_artifact_bytes
                ),
            ));
        }
        if header.signature.len() != SIGNATURE_LEN {
            return Err(ControlError::invalid(
                "header.signature",
                format!(
                    "an Ed25519 signature is {SIGNATURE_LEN} bytes, not {}",
                    header.signature.len()
                ),
            ));
        }
        let key_fingerprint = self.check_release_signature(&header)?;
        let upload = match (header.url.is_empty(), upload) {
            (true, None) => {
                return Err(ControlError::invalid(
                    "chunk",
                    "the release has no bytes and no url",
                ));
            }
            (false, Some(upload)) if upload.written > 0 => {
                return Err(ControlError::invalid(
                    "header.url",
                    "a release published with a url carries no bytes",
                ));
            }
            (false, _) => {
                check_url(&header.url)?;
                None
            }
            (true, Some(upload)) => Some(upload),
        };
        let cached = match upload {
            Some(mut upload) => {
                upload
                    .file
                    .sync_all()
                    .map_err(|e| ControlError::Internal(format!("syncing an upload: {e}")))?;
                let sha256 = hex::encode(std::mem::take(&mut upload.hasher).finalize());
                if upload.written != header.size {
                    return Err(ControlError::invalid(
                        "header.size",
                        format!(
                            "the header says {} bytes but {} arrived",
                            header.size, upload.written
                        ),
                    ));
                }
                if sha256 != header.sha256 {
                    return Err(ControlError::invalid(
                        "header.sha256",
                        format!("the bytes that arrived have SHA-256 {sha256}"),
                    ));
                }
                Some(upload)
            }
            None => None,
        };
        let record = ReleaseRecord {
            version: header.version.clone(),
            sha256: header.sha256.clone(),
            size: header.size as i64,
            signature: hex::encode(&header.signature),
            url: header.url.clone(),
            key_fingerprint,
            published_ms: self.now_millis(),
            published_by: actor.identity.to_string(),
        };
        let mut entry = actor.record(
            self.now_millis(),
            format!("agent-release/{}", header.version),
        );
        entry.revision = header.sha256.clone();
        let audit = self.audited(vec![entry]);
        let stored = self
            .store
            .publish_release(record, cached.as_ref().map(|u| u.path.clone()), audit)
            .await?;
        if let Some(upload) = cached {
            // The bytes are in the database; this replica keeps its copy for serving.
            let _ = std::fs::rename(&upload.path, self.artifacts.path(&header.sha256));
        }
        tracing::info!(release.version = %stored.version, release.sha256 = %stored.sha256, actor = %actor, "agent release published");
        Ok(stored.into())
    }

    /// The fingerprint of the known release key that signed, or "" when none is configured.
    fn check_release_signature(&self, header: &ReleaseHeader) -> Result<String, ControlError> {
        let keys = &self.policy.releases.keys;
        if keys.is_empty() {
            return Ok(String::new());
        }
        let signed = SignedRelease {
            version: header.version.clone(),
            sha256: header.sha256.clone(),
            size: header.size,
            signature: header.signature.clone(),
        };
        signed
            .verify(keys)
            .map(ReleaseKey::fingerprint)
            .map_err(|e| ControlError::invalid("header.signature", e))
    }

    /// Every published release.
    pub async fn list_releases(&self) -> Result<Vec<ReleaseView>, ControlError> {
        Ok(self
            .store
            .list_releases()
            .await?
            .into_iter()
            .map(ReleaseView::from)
            .collect())
    }

    /// One release, or `NotFound`.
    pub async fn get_release(&self, version: &str) -> Result<ReleaseView, ControlError> {
        self.store
            .release(version)
            .await?
            .map(ReleaseView::from)
            .ok_or_else(|| {
                ControlError::NotFound(format!("no agent release {version:?} is published"))
            })
    }

    /// Deletes a release no fleet template or device spec names.
    pub async fn delete_release(
        &self,
        actor: &Actor,
        scope: &Scope,
        version: &str,
    ) -> Result<(), ControlError> {
        ensure_unscoped("deleting an agent release", scope)?;
        let users = self.release_users(version);
        if !users.is_empty() {
            return Err(ControlError::FailedPrecondition(format!(
                "agent release {version} is still named by {}; change them first",
                users.join(", ")
            )));
        }
        let audit = self.audited(vec![
            actor.record(self.now_millis(), format!("agent-release/{version}")),
        ]);
        let Some(deleted) = self.store.delete_release(version, audit).await? else {
            return Err(ControlError::NotFound(format!(
                "no agent release {version:?} is published"
            )));
        };
        let _ = std::fs::remove_file(self.artifacts.path(&deleted.sha256));
        tracing::info!(release.version = %version, actor = %actor, "agent release deleted");
        Ok(())
    }

    /// Fleets and devices whose own spec names `version` as their agent.
    fn release_users(&self, version: &str) -> Vec<String> {
        let names = |spec: &crate::spec::DeviceSpec| {
            spec.agent.as_ref().is_some_and(|a| a.version == version)
        };
        let catalog = self.catalog();
        let fleets = catalog
            .fleets()
            .filter(|f| names(&f.record.template))
            .map(|f| format!("fleet/{}", f.record.name));
        let devices = catalog
            .devices()
            .filter(|d| names(&d.spec))
            .map(|d| format!("device/{}", d.name));
        fleets.chain(devices).take(10).collect()
    }

    /// Starts serving an artifact to a device from `offset`, or says when to come back.
    pub async fn open_download(&self, sha256: &str, offset: u64) -> Result<Download, ControlError> {
        if !is_sha256_hex(sha256) {
            return Err(ControlError::invalid(
                "sha256",
                "must be 64 lowercase hex digits",
            ));
        }
        let slot = self
            .artifacts
            .downloads
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                let jitter = rand::rng().random_range(0..2000);
                ControlError::Overloaded {
                    message: format!(
                        "this replica serves {} downloads at once; retry later",
                        self.policy.releases.max_downloads
                    ),
                    retry_after: Duration::from_millis(2000 + jitter),
                }
            })?;
        let release = self.store.release_by_digest(sha256).await?.ok_or_else(|| {
            ControlError::NotFound(format!("no agent release has SHA-256 {sha256}"))
        })?;
        if !release.url.is_empty() {
            return Err(ControlError::FailedPrecondition(format!(
                "agent release {} is downloaded from {}",
                release.version, release.url
            )));
        }
        let size = release.size as u64;
        if offset > size {
            return Err(ControlError::invalid(
                "offset",
                format!("past the end of the {size}-byte artifact"),
            ));
        }
        let path = self.cached_artifact(sha256, size).await?;
        let mut file = std::fs::File::open(&path)
            .map_err(|e| ControlError::Internal(format!("opening {}: {e}", path.display())))?;
        file.seek(SeekFrom::Start(offset))
            .map_err(|e| ControlError::Internal(format!("seeking {}: {e}", path.display())))?;
        Ok(Download {
            file,
            offset,
            size,
            throttle: self.artifacts.throttle.clone(),
            _slot: slot,
        })
    }

    /// The artifact in this replica's cache, filled from the database (and checked against its
    /// digest) the first time it is asked for.
    async fn cached_artifact(&self, sha256: &str, size: u64) -> Result<PathBuf, ControlError> {
        let path = self.artifacts.path(sha256);
        let present = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.len() == size);
        if present(&path) {
            return Ok(path);
        }
        let lock = self
            .artifacts
            .filling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(sha256.to_string())
            .or_default()
            .clone();
        let _filling = lock.lock().await;
        if present(&path) {
            return Ok(path);
        }
        std::fs::create_dir_all(&self.artifacts.dir).map_err(|e| {
            ControlError::Internal(format!("creating {}: {e}", self.artifacts.dir.display()))
        })?;
        let partial = self.artifacts.dir.join(format!(".fill-{sha256}"));
        self.store.read_artifact(sha256, partial.clone()).await?;
        let checked = partial.clone();
        let (digest, length) =
            tokio::task::spawn_blocking(move || crate::pki::sha256_file(&checked))
                .await
                .map_err(|e| ControlError::Internal(e.to_string()))?
                .map_err(|e| {
                    ControlError::Internal(format!("reading {}: {e}", partial.display()))
                })?;
        if digest != sha256 || length != size {
            let _ = std::fs::remove_file(&partial);
            return Err(ControlError::Internal(format!(
                "the stored artifact {sha256} is corrupt ({length} bytes with SHA-256 {digest})"
            )));
        }
        std::fs::rename(&partial, &path)
            .map_err(|e| ControlError::Internal(format!("caching {}: {e}", path.display())))?;
        Ok(path)
    }
}

fn ensure_unscoped(what: &str, scope: &Scope) -> Result<(), ControlError> {
    if scope.is_everything() {
        Ok(())
    } else {
        Err(ControlError::PermissionDenied(format!(
            "{what} needs a credential without a scope (this one is limited to {scope})"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_throttle_lets_a_second_s_worth_through_then_paces() {
        let throttle = Throttle::new(1000);
        assert_eq!(throttle.take(600), Duration::ZERO);
        assert_eq!(throttle.take(400), Duration::ZERO);
        let wait = throttle.take(500);
        assert!(
            wait > Duration::from_millis(450) && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
    }

    #[test]
    fn digests_must_be_lowercase_sha256_hex() {
        assert!(is_sha256_hex(&"a".repeat(64)));
        assert!(!is_sha256_hex(&"A".repeat(64)));
        assert!(!is_sha256_hex(&"a".repeat(63)));
        assert!(!is_sha256_hex(&"g".repeat(64)));
        assert!(check_url("https://example.com/agent").is_ok());
        assert!(check_url("ftp://example.com/agent").is_err());
        assert!(check_url("https://").is_err());
    }
}

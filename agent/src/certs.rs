//! The device's key and certificate, kept so that a power loss at any instant leaves one valid,
//! matching pair. Each pair lives in its own versioned directory (`certs/v<N>/device.{key,crt}`),
//! written and fsynced completely before a single atomic rename of the `certs/current` symlink
//! activates it. The pair it replaces stays (`certs/previous`) until the new one has opened a
//! session; a renewal's fresh key waits in `certs/pending/` so a retry sends the same request.
//! Start-up reconciles whatever a crash left half done.

use crate::keys::StoredKey;
use crate::state::write_atomic;
use flotilla::identity::{Identity, Role};
use flotilla::pki::{cert_info_pem, identity_pem, sha256_hex, verify_signed_by};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const CURRENT: &str = "current";
const PREVIOUS: &str = "previous";
const PENDING: &str = "pending";
const CERT: &str = "device.crt";
/// Key file names, in the order they are looked for.
const KEY_FILES: [&str; 2] = [StoredKey::PEM_FILE, StoredKey::TPM_FILE];

#[derive(Debug, thiserror::Error)]
pub enum CertStoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no usable key and certificate in {0}")]
    Missing(PathBuf),
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CertStoreError + '_ {
    move |source| CertStoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A key and the certificate issued for it.
#[derive(Debug, Clone)]
pub struct Pair {
    pub key: StoredKey,
    pub cert_pem: String,
}

impl Pair {
    /// Checks that the certificate was signed by the CA, names the device and is for this key.
    /// Expiry is not checked here: an expired pair still proves who the device was.
    pub fn check(&self, ca_pem: &str, device_id: &str) -> Result<(), String> {
        verify_signed_by(&self.cert_pem, ca_pem).map_err(|e| e.to_string())?;
        let identity = identity_pem(&self.cert_pem).map_err(|e| e.to_string())?;
        if identity != Identity::new(Role::Device, device_id) {
            return Err(format!(
                "certificate names {identity}, expected device/{device_id}"
            ));
        }
        let spki = self.key.spki().map_err(|e| format!("key: {e:#}"))?;
        let info = cert_info_pem(&self.cert_pem).map_err(|e| e.to_string())?;
        if info.key_fingerprint != sha256_hex(&spki) {
            return Err("certificate is for a different key".into());
        }
        Ok(())
    }
}

/// A renewal in flight: the fresh key and the request made with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRequest {
    pub request_id: String,
    pub csr_pem: String,
}

/// The agent's certificate directory.
#[derive(Debug, Clone)]
pub struct CertStore {
    dir: PathBuf,
}

fn sync_dir(dir: &Path) -> Result<(), CertStoreError> {
    crate::state::sync_dir(dir).map_err(io(dir))
}

fn read(path: &Path) -> Result<String, CertStoreError> {
    std::fs::read_to_string(path).map_err(io(path))
}

/// The key of a version (or pending) directory, whichever kind it is.
fn read_key(dir: &Path) -> Result<StoredKey, CertStoreError> {
    for name in KEY_FILES {
        let path = dir.join(name);
        if path.exists() {
            return StoredKey::parse(name, &read(&path)?)
                .map_err(|e| CertStoreError::Invalid(format!("{}: {e:#}", path.display())));
        }
    }
    Err(CertStoreError::Missing(dir.to_path_buf()))
}

/// Replaces the symlink `link` by one pointing at `target`, atomically.
fn relink(dir: &Path, link: &str, target: &str) -> Result<(), CertStoreError> {
    crate::state::relink(dir, link, target).map_err(io(&dir.join(link)))
}

impl CertStore {
    pub fn new(state_root: &Path) -> CertStore {
        CertStore {
            dir: state_root.join("certs"),
        }
    }

    fn link_target(&self, link: &str) -> Option<String> {
        std::fs::read_link(self.dir.join(link))
            .ok()
            .map(|t| t.to_string_lossy().into_owned())
    }

    fn read_pair(&self, version: &str) -> Result<Pair, CertStoreError> {
        let dir = self.dir.join(version);
        Ok(Pair {
            key: read_key(&dir)?,
            cert_pem: read(&dir.join(CERT))?,
        })
    }

    /// Version directories (`v<N>`), newest first.
    fn versions(&self) -> Vec<(u64, String)> {
        let mut versions: Vec<(u64, String)> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let n = name.strip_prefix('v')?.parse().ok()?;
                Some((n, name))
            })
            .collect();
        versions.sort_by_key(|v| std::cmp::Reverse(v.0));
        versions
    }

    /// The pair in use.
    pub fn current(&self) -> Result<Pair, CertStoreError> {
        let version = self
            .link_target(CURRENT)
            .ok_or_else(|| CertStoreError::Missing(self.dir.clone()))?;
        self.read_pair(&version)
    }

    pub fn has_previous(&self) -> bool {
        self.link_target(PREVIOUS).is_some()
    }

    /// Paths of the pair in use (for tools and tests).
    pub fn current_paths(&self) -> (PathBuf, PathBuf) {
        let current = self.dir.join(CURRENT);
        let key = KEY_FILES
            .iter()
            .map(|name| current.join(name))
            .find(|path| path.exists())
            .unwrap_or_else(|| current.join(StoredKey::PEM_FILE));
        (key, current.join(CERT))
    }

    /// Writes a complete pair as a new version directory and makes it current with one atomic
    /// rename; the pair it replaces becomes `previous`.
    pub fn activate(&self, pair: &Pair) -> Result<(), CertStoreError> {
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let next = self.versions().first().map(|(n, _)| n + 1).unwrap_or(1);
        let version = format!("v{next}");
        let staging = self.dir.join(format!("{version}.tmp"));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).map_err(io(&staging))?;
        write_atomic(
            &staging.join(pair.key.file_name()),
            &pair.key.to_bytes(),
            0o600,
        )
        .map_err(io(&staging))?;
        write_atomic(&staging.join(CERT), pair.cert_pem.as_bytes(), 0o644).map_err(io(&staging))?;
        sync_dir(&staging)?;
        crate::failpoint::reached("swap:staged");
        let final_dir = self.dir.join(&version);
        std::fs::rename(&staging, &final_dir).map_err(io(&final_dir))?;
        sync_dir(&self.dir)?;
        crate::failpoint::reached("swap:version-written");
        if let Some(old) = self.link_target(CURRENT) {
            relink(&self.dir, PREVIOUS, &old)?;
        }
        crate::failpoint::reached("swap:previous-linked");
        relink(&self.dir, CURRENT, &version)?;
        crate::failpoint::reached("swap:current-switched");
        self.clear_pending()?;
        crate::failpoint::reached("swap:pending-cleared");
        Ok(())
    }

    /// The current pair has opened a session: the previous one (and any older) can go.
    pub fn confirm(&self) -> Result<(), CertStoreError> {
        let Some(current) = self.link_target(CURRENT) else {
            return Ok(());
        };
        if self.link_target(PREVIOUS).is_some() {
            let previous = self.dir.join(PREVIOUS);
            std::fs::remove_file(&previous).map_err(io(&previous))?;
            sync_dir(&self.dir)?;
        }
        crate::failpoint::reached("confirm:previous-unlinked");
        for (_, version) in self.versions() {
            if version != current {
                let dir = self.dir.join(&version);
                std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
            }
        }
        sync_dir(&self.dir)
    }

    /// Goes back to the previous pair (the new one was refused); false if there is none.
    pub fn roll_back(&self) -> Result<bool, CertStoreError> {
        let Some(previous) = self.link_target(PREVIOUS) else {
            return Ok(false);
        };
        relink(&self.dir, CURRENT, &previous)?;
        let link = self.dir.join(PREVIOUS);
        std::fs::remove_file(&link).map_err(io(&link))?;
        sync_dir(&self.dir)?;
        Ok(true)
    }

    /// The pending renewal, if one is in flight: its key and request.
    pub fn pending(&self) -> Option<(StoredKey, PendingRequest)> {
        let dir = self.dir.join(PENDING);
        let key = read_key(&dir).ok()?;
        let request =
            serde_json::from_str(&std::fs::read_to_string(dir.join("request.json")).ok()?).ok()?;
        Some((key, request))
    }

    /// Stores a fresh key and the request made with it, before the request is sent.
    pub fn save_pending(
        &self,
        key: &StoredKey,
        request: &PendingRequest,
    ) -> Result<(), CertStoreError> {
        let staging = self.dir.join(format!("{PENDING}.tmp"));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).map_err(io(&staging))?;
        write_atomic(&staging.join(key.file_name()), &key.to_bytes(), 0o600)
            .map_err(io(&staging))?;
        let json =
            serde_json::to_vec(request).map_err(|e| CertStoreError::Invalid(e.to_string()))?;
        write_atomic(&staging.join("request.json"), &json, 0o600).map_err(io(&staging))?;
        sync_dir(&staging)?;
        let dir = self.dir.join(PENDING);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&staging, &dir).map_err(io(&dir))?;
        sync_dir(&self.dir)?;
        crate::failpoint::reached("renew:pending-saved");
        Ok(())
    }

    pub fn clear_pending(&self) -> Result<(), CertStoreError> {
        let dir = self.dir.join(PENDING);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Repairs what an interrupted swap left behind: drops staging directories, and makes sure
    /// `current` names a complete pair that checks out (falling back to `previous`, then to the
    /// newest complete version, then to the key and certificate of an older agent's layout).
    pub fn reconcile(
        &self,
        legacy_root: &Path,
        ca_pem: &str,
        device_id: &str,
    ) -> Result<(), CertStoreError> {
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        for entry in std::fs::read_dir(&self.dir)
            .map_err(io(&self.dir))?
            .flatten()
        {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
            }
        }
        let usable = |version: &str| {
            self.read_pair(version)
                .ok()
                .is_some_and(|p| p.check(ca_pem, device_id).is_ok())
        };
        if self.link_target(CURRENT).is_some_and(|v| usable(&v)) {
            return Ok(());
        }
        let candidate = self
            .link_target(PREVIOUS)
            .filter(|v| usable(v))
            .or_else(|| {
                self.versions()
                    .into_iter()
                    .map(|(_, v)| v)
                    .find(|v| usable(v))
            });
        if let Some(version) = candidate {
            tracing::warn!(%version, "certificate directory was left half-switched; using the last complete pair");
            relink(&self.dir, CURRENT, &version)?;
            return Ok(());
        }
        let legacy = Pair {
            key: StoredKey::Pem(
                read(&legacy_root.join(StoredKey::PEM_FILE))
                    .map_err(|_| CertStoreError::Missing(self.dir.clone()))?,
            ),
            cert_pem: read(&legacy_root.join(CERT))
                .map_err(|_| CertStoreError::Missing(self.dir.clone()))?,
        };
        legacy
            .check(ca_pem, device_id)
            .map_err(CertStoreError::Invalid)?;
        self.activate(&legacy)?;
        let _ = std::fs::remove_file(legacy_root.join(StoredKey::PEM_FILE));
        let _ = std::fs::remove_file(legacy_root.join(CERT));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::KeyPair;

    struct Ca {
        key: KeyPair,
        cert: rcgen::Certificate,
    }

    fn ca() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Ca { key, cert }
    }

    fn pair(ca: &Ca, device: &str) -> Pair {
        let key = KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            format!("flotilla://device/{device}").try_into().unwrap(),
        )];
        let issuer = rcgen::Issuer::from_ca_cert_der(ca.cert.der(), &ca.key).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        Pair {
            key: StoredKey::Pem(key.serialize_pem()),
            cert_pem: cert.pem(),
        }
    }

    #[test]
    fn activate_keeps_the_previous_until_confirmed_and_can_roll_back() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca();
        let store = CertStore::new(dir.path());
        let first = pair(&ca, "d");
        store.activate(&first).unwrap();
        assert!(!store.has_previous());
        let second = pair(&ca, "d");
        store.activate(&second).unwrap();
        assert_eq!(store.current().unwrap().cert_pem, second.cert_pem);
        assert!(store.has_previous());
        assert!(store.roll_back().unwrap());
        assert_eq!(store.current().unwrap().cert_pem, first.cert_pem);

        let third = pair(&ca, "d");
        store.activate(&third).unwrap();
        store.confirm().unwrap();
        assert!(!store.has_previous());
        assert_eq!(
            store.versions().len(),
            1,
            "older pairs removed once confirmed"
        );
        assert_eq!(store.current().unwrap().cert_pem, third.cert_pem);
    }

    #[test]
    fn reconcile_repairs_a_broken_current_and_imports_the_old_layout() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca();
        let ca_pem = ca.cert.pem();
        let legacy = pair(&ca, "d");
        std::fs::write(dir.path().join(StoredKey::PEM_FILE), legacy.key.to_bytes()).unwrap();
        std::fs::write(dir.path().join(CERT), &legacy.cert_pem).unwrap();
        let store = CertStore::new(dir.path());
        store.reconcile(dir.path(), &ca_pem, "d").unwrap();
        assert_eq!(store.current().unwrap().cert_pem, legacy.cert_pem);
        assert!(
            !dir.path().join(StoredKey::PEM_FILE).exists(),
            "old layout moved in"
        );

        // A newer version whose certificate is for another key, made current by accident.
        let mut broken = pair(&ca, "d");
        broken.key = StoredKey::Pem(KeyPair::generate().unwrap().serialize_pem());
        store.activate(&broken).unwrap();
        std::fs::create_dir_all(dir.path().join("certs/v9.tmp")).unwrap();
        store.reconcile(dir.path(), &ca_pem, "d").unwrap();
        assert_eq!(store.current().unwrap().cert_pem, legacy.cert_pem);
        assert!(!dir.path().join("certs/v9.tmp").exists());

        // Another device's certificate is never accepted.
        assert!(pair(&ca, "other").check(&ca_pem, "d").is_err());
    }

    #[test]
    fn pending_requests_survive_and_clear() {
        let dir = tempfile::tempdir().unwrap();
        let store = CertStore::new(dir.path());
        assert!(store.pending().is_none());
        let key = StoredKey::Pem(KeyPair::generate().unwrap().serialize_pem());
        let request = PendingRequest {
            request_id: "r1".into(),
            csr_pem: "csr".into(),
        };
        store.save_pending(&key, &request).unwrap();
        let (loaded, again) = store.pending().unwrap();
        assert_eq!(again, request);
        assert_eq!(loaded, key);
        store.clear_pending().unwrap();
        assert!(store.pending().is_none());
    }
}

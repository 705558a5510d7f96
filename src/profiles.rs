//! The configuration files `flotilla serve` writes on first start and the agent and `flotctl` read:
//! `agent.toml` and `flotctl.toml`. Relative paths in them are resolved against the file's directory.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a configuration file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// The file is not valid TOML for its kind.
    #[error("{path} is not valid: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong in it.
        message: String,
    },
}

/// How `flotctl` reaches the admin endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CtlConfig {
    /// `https://host:port` of the admin endpoint.
    pub server: String,
    /// Name the server certificate must carry.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// The CA bundle (PEM) the server certificate must chain to.
    pub ca_file: PathBuf,
    /// The credential's certificate (PEM).
    pub cert_file: PathBuf,
    /// The credential's private key (PEM).
    pub key_file: PathBuf,
    /// The audit public key (SPKI PEM) that `flotctl audit verify` pins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_key_file: Option<PathBuf>,
}

/// How an agent reaches the control plane and who it asks to be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// `https://host:port` of the agent endpoint.
    pub server: String,
    /// Further agent endpoints (other replicas of the control plane); the agent moves to the
    /// next one when the one it uses fails.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<String>,
    /// Name the server certificate must carry.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// The CA that signs the control plane's certificates: a PEM file, or the PEM itself in
    /// `ca_pem` (what `flotilla enrollment-bundle` writes, so one file is all a device needs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// The CA certificate itself (PEM), instead of `ca_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    /// The enrollment credential: files, or the PEMs inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_cert_file: Option<PathBuf>,
    /// The enrollment credential's private key file (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_key_file: Option<PathBuf>,
    /// The enrollment credential's certificate itself (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_cert_pem: Option<String>,
    /// The enrollment credential's private key itself (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_key_pem: Option<String>,
    /// Where the agent keeps its key, certificate and last applied spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// Requested device name; the hostname when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_name: Option<String>,
    /// Labels the device asks for at enrollment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Longest wait between reconnection attempts, seconds.
    #[serde(default = "default_max_backoff_secs")]
    pub max_backoff_secs: u64,
    /// First wait before retrying a failed certificate renewal, seconds (doubles up to the maximum).
    #[serde(default = "default_renewal_retry_secs")]
    pub renewal_retry_secs: u64,
    /// Longest wait between renewal retries, seconds.
    #[serde(default = "default_renewal_retry_max_secs")]
    pub renewal_retry_max_secs: u64,
    /// Address of the local health and metrics endpoint (`/healthz`, `/metrics`); off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_listen: Option<std::net::SocketAddr>,
    /// Keep the device key in a TPM 2.0 and attest it at enrollment (agent built with `tpm`).
    #[serde(default, skip_serializing_if = "TpmConfig::is_off")]
    pub tpm: TpmConfig,
    /// How the agent reports its status: sampling and reporting steps.
    #[serde(default, skip_serializing_if = "StatusConfig::is_default")]
    pub status: StatusConfig,
    /// How the agent updates itself: the release keys it trusts, how it restarts.
    #[serde(default, skip_serializing_if = "UpdateConfig::is_default")]
    pub update: UpdateConfig,
}

/// How the agent restarts into a new build of itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RestartMode {
    /// Replace the process with the new build (same process id).
    #[default]
    Exec,
    /// Exit (code 75) and let the service manager start the agent again (`Restart=always`).
    Exit,
}

/// The `[update]` table of the agent configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateConfig {
    /// Ed25519 public keys (PEM files) an agent release must be signed with. None: agent updates
    /// are refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub release_keys: Vec<PathBuf>,
    /// How a new agent build is started: exec in place, or exit for systemd to restart.
    #[serde(default)]
    pub restart: RestartMode,
    /// Where agent builds are installed (default: `agent/` in the state directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install_dir: Option<PathBuf>,
    /// A new build that has not confirmed (opened a session, passed its health checks) this many
    /// seconds after it was switched to is rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirm_timeout_secs: Option<u64>,
    /// A new build that was started this many times without confirming is rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_start_attempts: Option<u32>,
}

impl UpdateConfig {
    fn is_default(&self) -> bool {
        *self == UpdateConfig::default()
    }

    /// How long a new build has to confirm (default 300 s).
    pub fn confirm_timeout(&self) -> Duration {
        Duration::from_secs(self.confirm_timeout_secs.unwrap_or(300).max(1))
    }

    /// Starts a new build gets before it is rolled back (default 3).
    pub fn max_start_attempts(&self) -> u32 {
        self.max_start_attempts.unwrap_or(3).max(1)
    }
}

/// The `[status]` table of the agent configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// Seconds between resource samples (and monitor evaluations).
    #[serde(default = "default_sample_secs")]
    pub sample_interval_secs: u64,
    /// Percentage points a value must move by before it is reported again.
    #[serde(default = "default_report_step")]
    pub report_step_percent: u32,
    /// Least seconds between two reports of moved values (a threshold crossing goes at once).
    #[serde(default = "default_report_interval_secs")]
    pub min_report_interval_secs: u64,
    /// Seconds between verifications of what the agent manages (less up to a tenth at random);
    /// also verified at the start of every session.
    #[serde(default = "default_drift_check_secs")]
    pub drift_check_interval_secs: u64,
}

fn default_drift_check_secs() -> u64 {
    300
}

fn default_sample_secs() -> u64 {
    10
}

fn default_report_step() -> u32 {
    5
}

fn default_report_interval_secs() -> u64 {
    30
}

impl Default for StatusConfig {
    fn default() -> Self {
        StatusConfig {
            sample_interval_secs: default_sample_secs(),
            report_step_percent: default_report_step(),
            min_report_interval_secs: default_report_interval_secs(),
            drift_check_interval_secs: default_drift_check_secs(),
        }
    }
}

impl StatusConfig {
    fn is_default(&self) -> bool {
        *self == StatusConfig::default()
    }
}

/// The `[tpm]` table of the agent configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TpmConfig {
    /// Whether the device key lives in the TPM.
    #[serde(default)]
    pub enabled: bool,
    /// A TSS2 TCTI string: `device:/dev/tpmrm0` (the default), `swtpm:host=127.0.0.1,port=2321`,
    /// `tabrmd:`; a bare path means a device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcti: Option<String>,
}

impl TpmConfig {
    fn is_off(&self) -> bool {
        *self == TpmConfig::default()
    }

    /// The TCTI to open.
    pub fn tcti(&self) -> String {
        match self.tcti.as_deref() {
            None | Some("") => "device:/dev/tpmrm0".to_string(),
            Some(path) if path.starts_with('/') => format!("device:{path}"),
            Some(tcti) => tcti.to_string(),
        }
    }
}

fn default_server_name() -> String {
    "localhost".to_string()
}

fn default_max_backoff_secs() -> u64 {
    60
}

fn default_renewal_retry_secs() -> u64 {
    60
}

fn default_renewal_retry_max_secs() -> u64 {
    24 * 3600
}

/// A PEM given inline or in a file; exactly one of them.
fn material(
    inline: &Option<String>,
    file: &Option<PathBuf>,
    what: &str,
    key: &str,
) -> Result<String, ProfileError> {
    match (inline, file) {
        (Some(pem), None) => Ok(pem.clone()),
        (None, Some(path)) => std::fs::read_to_string(path).map_err(|source| ProfileError::Read {
            path: path.clone(),
            source,
        }),
        (Some(_), Some(_)) => Err(ProfileError::Parse {
            path: PathBuf::from("agent.toml"),
            message: format!("give the {what} as {key}_pem or {key}_file, not both"),
        }),
        (None, None) => Err(ProfileError::Parse {
            path: PathBuf::from("agent.toml"),
            message: format!("the {what} is missing: set {key}_file (or {key}_pem)"),
        }),
    }
}

impl AgentConfig {
    /// A configuration for the agent endpoint `server`, every other key at its default (what a
    /// file that names only `server` reads as).
    pub fn new(server: String) -> AgentConfig {
        AgentConfig {
            server,
            servers: Vec::new(),
            server_name: default_server_name(),
            ca_file: None,
            ca_pem: None,
            enrollment_cert_file: None,
            enrollment_key_file: None,
            enrollment_cert_pem: None,
            enrollment_key_pem: None,
            state_dir: None,
            device_name: None,
            labels: BTreeMap::new(),
            max_backoff_secs: default_max_backoff_secs(),
            renewal_retry_secs: default_renewal_retry_secs(),
            renewal_retry_max_secs: default_renewal_retry_max_secs(),
            health_listen: None,
            tpm: TpmConfig::default(),
            status: StatusConfig::default(),
            update: UpdateConfig::default(),
        }
    }

    /// The CA bundle (PEM), inline or read from its file.
    pub fn ca(&self) -> Result<String, ProfileError> {
        material(&self.ca_pem, &self.ca_file, "CA bundle", "ca")
    }

    /// The enrollment certificate (PEM).
    pub fn enrollment_cert(&self) -> Result<String, ProfileError> {
        material(
            &self.enrollment_cert_pem,
            &self.enrollment_cert_file,
            "enrollment certificate",
            "enrollment_cert",
        )
    }

    /// The enrollment key (PEM).
    pub fn enrollment_key(&self) -> Result<String, ProfileError> {
        material(
            &self.enrollment_key_pem,
            &self.enrollment_key_file,
            "enrollment key",
            "enrollment_key",
        )
    }

    /// Every agent endpoint: `server` first, then `servers`, each once.
    pub fn endpoints(&self) -> Vec<String> {
        let mut endpoints = vec![self.server.clone()];
        for server in &self.servers {
            if !endpoints.contains(server) {
                endpoints.push(server.clone());
            }
        }
        endpoints
    }

    /// Longest wait between reconnects.
    pub fn max_backoff(&self) -> Duration {
        Duration::from_secs(self.max_backoff_secs.max(1))
    }

    /// Initial and maximum wait between certificate renewal attempts.
    pub fn renewal_retry(&self) -> (Duration, Duration) {
        let initial = Duration::from_secs(self.renewal_retry_secs.max(1));
        let max = Duration::from_secs(
            self.renewal_retry_max_secs
                .max(self.renewal_retry_secs.max(1)),
        );
        (initial, max)
    }
}

fn resolve(base: &Path, path: &mut PathBuf) {
    if path.is_relative() {
        *path = base.join(&*path);
    }
}

fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ProfileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ProfileError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn base_of(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}

impl CtlConfig {
    /// Reads `flotctl.toml`.
    pub fn load(path: &Path) -> Result<CtlConfig, ProfileError> {
        let mut config: CtlConfig = read_toml(path)?;
        let base = base_of(path);
        for p in [
            &mut config.ca_file,
            &mut config.cert_file,
            &mut config.key_file,
        ] {
            resolve(&base, p);
        }
        if let Some(key) = config.audit_key_file.as_mut() {
            resolve(&base, key);
        }
        Ok(config)
    }
}

impl AgentConfig {
    /// Reads `agent.toml`; paths in it are relative to the file.
    pub fn load(path: &Path) -> Result<AgentConfig, ProfileError> {
        let mut config: AgentConfig = read_toml(path)?;
        let base = base_of(path);
        for p in [
            &mut config.ca_file,
            &mut config.enrollment_cert_file,
            &mut config.enrollment_key_file,
        ]
        .into_iter()
        .flatten()
        {
            resolve(&base, p);
        }
        if let Some(dir) = config.state_dir.as_mut() {
            resolve(&base, dir);
        }
        if let Some(dir) = config.update.install_dir.as_mut() {
            resolve(&base, dir);
        }
        for key in &mut config.update.release_keys {
            resolve(&base, key);
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_resolve_against_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flotctl.toml");
        std::fs::write(
            &path,
            "server = \"https://127.0.0.1:7444\"\nca_file = \"ca.crt\"\ncert_file = \"/abs/a.crt\"\nkey_file = \"k/a.key\"\n",
        )
        .unwrap();
        let config = CtlConfig::load(&path).unwrap();
        assert_eq!(config.ca_file, dir.path().join("ca.crt"));
        assert_eq!(config.cert_file, PathBuf::from("/abs/a.crt"));
        assert_eq!(config.key_file, dir.path().join("k/a.key"));
        assert_eq!(config.server_name, "localhost");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "server = \"x\"\nsevrer_name = \"typo\"\n").unwrap();
        let error = AgentConfig::load(&path).unwrap_err().to_string();
        assert!(error.contains("sevrer_name"), "{error}");
    }
}

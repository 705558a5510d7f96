//! The data directory and first start: on an empty directory `flotilla serve` creates the CA, the
//! server certificate, an admin credential with a ready `flotctl.toml`, and an enrollment credential
//! with a ready `agent.toml`. Later starts load the CA and renew the server certificate when it
//! nears expiry. Private keys are written 0600.

use crate::ca::audit_key::{AuditKey, AuditKeyError};
use crate::ca::{CaError, CertificateAuthority, Subject, Usage};
use crate::identity::{Identity, Role};
use crate::pki::cert_info_pem;
use crate::profiles::{AgentConfig, CtlConfig};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

const DAY: u64 = 24 * 3600;
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * DAY);
/// Lifetime of the server certificate unless configured.
pub const SERVER_VALIDITY: Duration = Duration::from_secs(365 * DAY);
const ADMIN_VALIDITY: Duration = Duration::from_secs(2 * 365 * DAY);
const ENROLLMENT_VALIDITY: Duration = Duration::from_secs(5 * 365 * DAY);
/// The server certificate is replaced at start when it expires within this window.
const SERVER_RENEW_BEFORE: i64 = 30 * DAY as i64;

/// Why the data directory could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// The CA could not be created or loaded.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The audit key could not be created or loaded.
    #[error(transparent)]
    Audit(#[from] AuditKeyError),
    /// The directory holds a partial or contradictory set of files.
    #[error("{0}")]
    Inconsistent(String),
    /// A generated configuration could not be written.
    #[error("cannot write {path}: {message}")]
    Serialize {
        /// The file.
        path: PathBuf,
        /// Why it could not be written.
        message: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BootstrapError + '_ {
    move |source| BootstrapError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The layout of a data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The data directory at `root` (nothing is created yet).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DataDir { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// The CA certificate (PEM).
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca/ca.crt")
    }
    /// The CA private key (PEM).
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca/ca.key")
    }
    /// The server's TLS certificate (PEM).
    pub fn server_cert(&self) -> PathBuf {
        self.root.join("tls/server.crt")
    }
    /// The server's TLS private key (PEM).
    pub fn server_key(&self) -> PathBuf {
        self.root.join("tls/server.key")
    }
    /// The bootstrap admin credential's certificate (PEM).
    pub fn admin_cert(&self) -> PathBuf {
        self.root.join("admin/admin.crt")
    }
    /// The bootstrap admin credential's private key (PEM).
    pub fn admin_key(&self) -> PathBuf {
        self.root.join("admin/admin.key")
    }
    /// The shared enrollment credential's certificate (PEM).
    pub fn enrollment_cert(&self) -> PathBuf {
        self.root.join("enrollment/enrollment.crt")
    }
    /// The shared enrollment credential's private key (PEM).
    pub fn enrollment_key(&self) -> PathBuf {
        self.root.join("enrollment/enrollment.key")
    }
    /// The key that signs the audit trail (PEM).
    pub fn audit_key(&self) -> PathBuf {
        self.root.join("audit/audit.key")
    }
    /// Its public half, for `flotctl audit verify` (SPKI PEM).
    pub fn audit_public_key(&self) -> PathBuf {
        self.root.join("audit/audit.pub")
    }
    /// The generated `flotctl.toml`.
    pub fn ctl_config(&self) -> PathBuf {
        self.root.join("flotctl.toml")
    }
    /// The generated `agent.toml`.
    pub fn agent_config(&self) -> PathBuf {
        self.root.join("agent.toml")
    }
    /// The embedded SQLite database.
    pub fn sqlite_path(&self) -> PathBuf {
        self.root.join("flotilla.db")
    }
}

/// What first start needs to know to write usable client configs.
#[derive(Debug, Clone)]
pub struct BootstrapOptions {
    /// URL agents use, e.g. `https://127.0.0.1:7443`.
    pub agent_url: String,
    /// URL `flotctl` uses, e.g. `https://127.0.0.1:7444`.
    pub admin_url: String,
    /// Names and addresses the server certificate must carry (besides localhost). A name the
    /// existing certificate lacks has it reissued (keeping the names it had).
    pub server_names: Vec<String>,
    /// The agent URL was given explicitly: a later start writes it into an existing agent.toml.
    pub agent_url_given: bool,
    /// Lifetime of a new server certificate (renewed while serving once a third of it is left).
    pub server_cert_validity: Duration,
}

/// The result of preparing the data directory.
pub struct Prepared {
    /// The control plane's CA.
    pub ca: CertificateAuthority,
    /// Signs the certificate audit trail.
    pub audit_key: AuditKey,
    /// The server's TLS certificate (PEM), renewed when it was close to expiry.
    pub server_cert_pem: String,
    /// Its private key (PEM).
    pub server_key_pem: String,
    /// The bootstrap admin credential's certificate, if it is still in the data directory (it is
    /// registered as the credential `admin` unless one of that name exists).
    pub admin_cert_pem: Option<String>,
    /// The shared enrollment credential's certificate, if it is still in the data directory (it is
    /// registered under its identity's name unless that credential exists).
    pub enrollment_cert_pem: Option<String>,
    /// Human-readable lines about what was created (printed on first start).
    pub created: Vec<String>,
}

/// Writes a file with the given mode, atomically (see `fsutil::write_atomic`).
pub fn write_file(path: &Path, content: &[u8], mode: u32) -> Result<(), BootstrapError> {
    crate::fsutil::write_atomic(path, content, mode).map_err(io(path))
}

/// Creates `path` (and its parents) if needed and makes it private to the owner (0700), whatever
/// the umask: it holds keys and the database, whose specs may carry secrets.
pub fn private_dir(path: &Path) -> Result<(), BootstrapError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path).map_err(io(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(io(path))
}

fn read(path: &Path) -> Result<String, BootstrapError> {
    std::fs::read_to_string(path).map_err(io(path))
}

/// A server certificate for `names` (besides localhost), valid for `validity`: PEM of the
/// certificate and of its new key.
pub fn server_certificate(
    ca: &CertificateAuthority,
    names: &[String],
    validity: Duration,
) -> Result<(String, String), BootstrapError> {
    let subject = Subject {
        validity,
        ..server_subject(names)
    };
    let (cert, key) = ca.issue_with_new_key(&subject)?;
    Ok((cert.pem, key))
}

fn server_subject(names: &[String]) -> Subject {
    let mut dns_names = vec!["localhost".to_string()];
    let mut ip_addresses: Vec<IpAddr> = vec![
        [127, 0, 0, 1].into(),
        IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]),
    ];
    for name in names {
        match name.parse::<IpAddr>() {
            Ok(ip) if !ip_addresses.contains(&ip) => ip_addresses.push(ip),
            Ok(_) => {}
            Err(_) if !dns_names.contains(name) => dns_names.push(name.clone()),
            Err(_) => {}
        }
    }
    Subject {
        common_name: "flotilla control plane".into(),
        identity: None,
        dns_names,
        ip_addresses,
        usage: Usage::Server,
        validity: SERVER_VALIDITY,
    }
}

fn client_subject(identity: Identity, validity: Duration) -> Subject {
    Subject {
        common_name: identity.to_string(),
        identity: Some(identity),
        dns_names: vec![],
        ip_addresses: vec![],
        usage: Usage::Client,
        validity,
    }
}

fn toml_text<T: serde::Serialize>(path: &Path, value: &T) -> Result<String, BootstrapError> {
    toml::to_string_pretty(value).map_err(|e| BootstrapError::Serialize {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Loads the CA (creating everything on an empty directory) and returns the server's TLS material.
pub fn prepare(dir: &DataDir, options: &BootstrapOptions) -> Result<Prepared, BootstrapError> {
    private_dir(dir.root())?;
    let root = std::fs::canonicalize(dir.root()).map_err(io(dir.root()))?;
    let dir = DataDir::new(root);
    let mut created = Vec::new();

    let ca = if dir.ca_cert().exists() {
        CertificateAuthority::load(&read(&dir.ca_cert())?, &read(&dir.ca_key())?)?
    } else {
        for existing in [dir.server_cert(), dir.admin_cert(), dir.enrollment_cert()] {
            if existing.exists() {
                return Err(BootstrapError::Inconsistent(format!(
                    "{} exists but the CA does not; refusing to create a new CA over credentials signed by another",
                    existing.display()
                )));
            }
        }
        let (ca, key_pem) = CertificateAuthority::generate("Flotilla CA", CA_VALIDITY)?;
        write_file(&dir.ca_key(), key_pem.as_bytes(), 0o600)?;
        write_file(&dir.ca_cert(), ca.cert_pem().as_bytes(), 0o644)?;
        created.push(format!(
            "CA certificate:         {}",
            dir.ca_cert().display()
        ));
        ca
    };

    let existing = (dir.server_cert().exists() && dir.server_key().exists())
        .then(|| read(&dir.server_cert()))
        .transpose()?;
    let had: Vec<String> = existing
        .as_deref()
        .and_then(|pem| crate::pki::subject_alt_names_pem(pem).ok())
        .unwrap_or_default();
    let missing: Vec<&String> = options
        .server_names
        .iter()
        .filter(|name| !had.iter().any(|h| h.eq_ignore_ascii_case(name)))
        .collect();
    let renew_before = SERVER_RENEW_BEFORE.min(options.server_cert_validity.as_secs() as i64 / 3);
    let fresh = existing.as_deref().is_some_and(|pem| {
        cert_info_pem(pem)
            .map(|info| info.not_after - crate::clock::now_secs() > renew_before)
            .unwrap_or(false)
    });
    if !fresh || !missing.is_empty() {
        // Names given once stay: a later start with one more name adds it (`server_subject`
        // leaves out the built-in ones it adds itself).
        let mut names = had;
        names.extend(options.server_names.iter().cloned());
        names.sort();
        names.dedup();
        let (cert, key) = server_certificate(&ca, &names, options.server_cert_validity)?;
        write_file(&dir.server_key(), key.as_bytes(), 0o600)?;
        write_file(&dir.server_cert(), cert.as_bytes(), 0o644)?;
        let why = if existing.is_none() {
            String::new()
        } else if !missing.is_empty() {
            format!(
                " (reissued for {})",
                missing
                    .iter()
                    .map(|n| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            " (renewed: it was about to expire)".to_string()
        };
        created.push(format!(
            "server certificate:     {}{why}",
            dir.server_cert().display()
        ));
    }

    let audit_key = if dir.audit_key().exists() {
        AuditKey::load(&read(&dir.audit_key())?)?
    } else {
        let (key, pem) = AuditKey::generate()?;
        write_file(&dir.audit_key(), pem.as_bytes(), 0o600)?;
        write_file(
            &dir.audit_public_key(),
            key.public_key_pem().as_bytes(),
            0o644,
        )?;
        created.push(format!(
            "audit key:              {}",
            dir.audit_key().display()
        ));
        key
    };

    if !dir.admin_cert().exists() {
        let subject = client_subject(Identity::new(Role::Admin, "admin"), ADMIN_VALIDITY);
        let (cert, key) = ca.issue_with_new_key(&subject)?;
        write_file(&dir.admin_key(), key.as_bytes(), 0o600)?;
        write_file(&dir.admin_cert(), cert.pem.as_bytes(), 0o644)?;
        let ctl = CtlConfig {
            server: options.admin_url.clone(),
            server_name: "localhost".into(),
            ca_file: dir.ca_cert(),
            cert_file: dir.admin_cert(),
            key_file: dir.admin_key(),
            audit_key_file: Some(dir.audit_public_key()),
        };
        write_file(
            &dir.ctl_config(),
            toml_text(&dir.ctl_config(), &ctl)?.as_bytes(),
            0o600,
        )?;
        created.push(format!(
            "admin credential:       {}",
            dir.admin_cert().display()
        ));
        created.push(format!(
            "flotctl config:         {}",
            dir.ctl_config().display()
        ));
    }

    if dir.agent_config().exists() && options.agent_url_given {
        let mut agent = AgentConfig::load(&dir.agent_config())
            .map_err(|e| BootstrapError::Inconsistent(e.to_string()))?;
        if agent.server != options.agent_url {
            agent.server = options.agent_url.clone();
            write_file(
                &dir.agent_config(),
                toml_text(&dir.agent_config(), &agent)?.as_bytes(),
                0o600,
            )?;
            created.push(format!(
                "agent config:           {} (server is now {})",
                dir.agent_config().display(),
                options.agent_url
            ));
        }
    }

    if !dir.enrollment_cert().exists() {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let subject = client_subject(Identity::new(Role::Enrollment, id), ENROLLMENT_VALIDITY);
        let (cert, key) = ca.issue_with_new_key(&subject)?;
        write_file(&dir.enrollment_key(), key.as_bytes(), 0o600)?;
        write_file(&dir.enrollment_cert(), cert.pem.as_bytes(), 0o644)?;
        let agent = AgentConfig {
            ca_file: Some(dir.ca_cert()),
            enrollment_cert_file: Some(dir.enrollment_cert()),
            enrollment_key_file: Some(dir.enrollment_key()),
            ..AgentConfig::new(options.agent_url.clone())
        };
        write_file(
            &dir.agent_config(),
            toml_text(&dir.agent_config(), &agent)?.as_bytes(),
            0o600,
        )?;
        created.push(format!(
            "enrollment credential:  {}",
            dir.enrollment_cert().display()
        ));
        created.push(format!(
            "agent config:           {}",
            dir.agent_config().display()
        ));
    }

    Ok(Prepared {
        server_cert_pem: read(&dir.server_cert())?,
        server_key_pem: read(&dir.server_key())?,
        admin_cert_pem: std::fs::read_to_string(dir.admin_cert()).ok(),
        enrollment_cert_pem: std::fs::read_to_string(dir.enrollment_cert()).ok(),
        ca,
        audit_key,
        created,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn options() -> BootstrapOptions {
        BootstrapOptions {
            agent_url: "https://127.0.0.1:7443".into(),
            admin_url: "https://127.0.0.1:7444".into(),
            server_names: vec!["gw.example".into(), "10.0.0.1".into()],
            agent_url_given: false,
            server_cert_validity: SERVER_VALIDITY,
        }
    }

    #[test]
    fn first_start_creates_everything_and_later_starts_reuse_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path().join("data"));
        let first = prepare(&dir, &options()).unwrap();
        assert_eq!(first.created.len(), 7);
        for key in [
            dir.audit_key(),
            dir.ca_key(),
            dir.server_key(),
            dir.admin_key(),
            dir.enrollment_key(),
        ] {
            let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        let ctl = CtlConfig::load(&dir.ctl_config()).unwrap();
        assert_eq!(
            read(ctl.audit_key_file.as_ref().unwrap()).unwrap(),
            first.audit_key.public_key_pem(),
            "flotctl pins the audit key"
        );
        assert_eq!(
            crate::pki::identity_pem(&read(&ctl.cert_file).unwrap())
                .unwrap()
                .role,
            Role::Admin
        );
        let agent = AgentConfig::load(&dir.agent_config()).unwrap();
        let enrollment = crate::pki::identity_pem(&agent.enrollment_cert().unwrap()).unwrap();
        assert_eq!(enrollment.role, Role::Enrollment);

        let second = prepare(&dir, &options()).unwrap();
        assert!(second.created.is_empty());
        assert_eq!(second.ca.cert_pem(), first.ca.cert_pem());
        assert_eq!(second.server_cert_pem, first.server_cert_pem);
    }

    #[test]
    fn a_later_start_adds_names_to_the_server_certificate_and_moves_agents() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path().join("data"));
        let first = prepare(&dir, &options()).unwrap();
        let names = |pem: &str| crate::pki::subject_alt_names_pem(pem).unwrap();
        assert!(names(&first.server_cert_pem).contains(&"gw.example".to_string()));
        // One more name: reissued, keeping the names it had.
        let more = BootstrapOptions {
            server_names: vec!["cp.example.com".into()],
            agent_url: "https://cp.example.com:7443".into(),
            agent_url_given: true,
            ..options()
        };
        let second = prepare(&dir, &more).unwrap();
        assert_ne!(second.server_cert_pem, first.server_cert_pem);
        let now = names(&second.server_cert_pem);
        for name in [
            "localhost",
            "127.0.0.1",
            "gw.example",
            "10.0.0.1",
            "cp.example.com",
        ] {
            assert!(now.contains(&name.to_string()), "{name} in {now:?}");
        }
        assert!(
            second
                .created
                .iter()
                .any(|l| l.contains("reissued for cp.example.com"))
        );
        assert_eq!(
            AgentConfig::load(&dir.agent_config()).unwrap().server,
            "https://cp.example.com:7443"
        );
        // Nothing new: nothing changes.
        let third = prepare(&dir, &more).unwrap();
        assert_eq!(third.server_cert_pem, second.server_cert_pem);
        assert!(third.created.is_empty(), "{:?}", third.created);
    }

    #[test]
    fn refuses_to_replace_a_lost_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path());
        prepare(&dir, &options()).unwrap();
        std::fs::remove_file(dir.ca_cert()).unwrap();
        assert!(matches!(
            prepare(&dir, &options()),
            Err(BootstrapError::Inconsistent(_))
        ));
    }
}

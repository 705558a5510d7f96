//! `flotctl credential …` and `get credentials`: credentials for people and services. The key is
//! generated here and never sent; the control plane signs a CSR for it, and the result is written
//! as a ready `flotctl.toml` with the certificate, key and CA beside it (relative paths, so the
//! directory can be moved to another machine).

use crate::output::{Format, print};
use crate::rpc;
use anyhow::{Context, Result, bail};
use flotilla::identity::Role;
use flotilla::profiles::CtlConfig;
use flotilla::proto::admin::v1 as pb;
use flotilla::proto::admin::v1::credential_service_client::CredentialServiceClient;
use serde::Serialize;
use std::path::{Path, PathBuf};
use tonic::transport::Channel;

/// What `credential create` asks for.
pub(crate) struct Create {
    pub name: String,
    pub role: String,
    pub scope: String,
    pub acts_as: Option<String>,
    pub methods: Vec<String>,
    pub validity: String,
    pub out: Option<PathBuf>,
    /// Enrollment credentials: labels stamped on the devices it enrolls, and auto-approval.
    pub labels: Vec<(String, String)>,
    pub auto_approve: bool,
}

fn role_from(text: &str, field: &str) -> Result<pb::CredentialRole> {
    Ok(match Role::from_kind(text) {
        Some(Role::Admin) => pb::CredentialRole::Admin,
        Some(Role::Operator) => pb::CredentialRole::Operator,
        Some(Role::Viewer) => pb::CredentialRole::Viewer,
        Some(Role::Service) => pb::CredentialRole::Service,
        Some(Role::Enrollment) => pb::CredentialRole::Enrollment,
        _ => bail!(
            "{field}: unknown role {text:?}; use admin, operator, viewer, service or enrollment"
        ),
    })
}

fn role_name(role: i32) -> &'static str {
    match pb::CredentialRole::try_from(role) {
        Ok(pb::CredentialRole::Admin) => "admin",
        Ok(pb::CredentialRole::Operator) => "operator",
        Ok(pb::CredentialRole::Viewer) => "viewer",
        Ok(pb::CredentialRole::Service) => "service",
        Ok(pb::CredentialRole::Enrollment) => "enrollment",
        _ => "unknown",
    }
}

/// A fresh P-256 key and a CSR for it (no subject fields: the control plane decides them).
fn key_and_csr() -> Result<(String, String)> {
    let key = rcgen::KeyPair::generate().context("generating a key")?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&key)?
        .pem()?;
    Ok((key.serialize_pem(), csr))
}

/// Writes `content` to `path` atomically (temporary file, fsync, rename) with `mode`.
fn write_file(path: &Path, content: &str, mode: u32) -> Result<()> {
    flotilla::fsutil::write_atomic(path, content.as_bytes(), mode)
        .with_context(|| format!("writing {}", path.display()))
}

/// Writes `<name>.key` (0600), `<name>.crt` and `ca.crt` into `dir`; returns the certificate's
/// and key's paths.
fn write_pair(
    dir: &Path,
    name: &str,
    key_pem: &str,
    issued: &pb::IssuedCredential,
) -> Result<(PathBuf, PathBuf)> {
    let key = dir.join(format!("{name}.key"));
    let cert = dir.join(format!("{name}.crt"));
    write_file(&key, key_pem, 0o600)?;
    write_file(&cert, &issued.certificate_pem, 0o644)?;
    write_file(&dir.join("ca.crt"), &issued.ca_pem, 0o644)?;
    Ok((cert, key))
}

/// Writes a credential's files into `dir`: `<name>.key`, `<name>.crt`, `ca.crt` and a
/// `flotctl.toml` pointing at them for the server `current` talks to.
fn write_bundle(
    dir: &Path,
    name: &str,
    key_pem: &str,
    issued: &pb::IssuedCredential,
    current: &CtlConfig,
) -> Result<PathBuf> {
    write_pair(dir, name, key_pem, issued)?;
    let key_file = format!("{name}.key");
    let cert_file = format!("{name}.crt");
    let mut audit_key_file = None;
    if let Some(audit_key) = &current.audit_key_file
        && let Ok(pem) = std::fs::read_to_string(audit_key)
    {
        write_file(&dir.join("audit-key.pem"), &pem, 0o644)?;
        audit_key_file = Some(PathBuf::from("audit-key.pem"));
    }
    let config = CtlConfig {
        server: current.server.clone(),
        server_name: current.server_name.clone(),
        ca_file: "ca.crt".into(),
        cert_file: cert_file.into(),
        key_file: key_file.into(),
        audit_key_file,
    };
    let path = dir.join("flotctl.toml");
    write_file(&path, &toml::to_string_pretty(&config)?, 0o600)?;
    Ok(path)
}

pub(crate) async fn create(channel: Channel, current: &CtlConfig, create: Create) -> Result<()> {
    let role = role_from(&create.role, "--role")?;
    let acts_as = create
        .acts_as
        .as_deref()
        .map(|r| role_from(r, "--acts-as"))
        .transpose()?;
    let grant = (acts_as.is_some() || !create.methods.is_empty()).then(|| pb::ServiceGrant {
        acts_as: acts_as.map_or(0, |r| r as i32),
        methods: create.methods.clone(),
    });
    let enrollment = (role == pb::CredentialRole::Enrollment
        || create.auto_approve
        || !create.labels.is_empty())
    .then(|| pb::EnrollmentPolicy {
        labels: create.labels.iter().cloned().collect(),
        auto_approve: create.auto_approve,
    });
    let (key_pem, csr_pem) = key_and_csr()?;
    let issued = CredentialServiceClient::new(channel)
        .create_credential(pb::CreateCredentialRequest {
            name: create.name.clone(),
            role: role as i32,
            scope: create.scope,
            grant,
            csr_pem,
            validity: create.validity,
            enrollment,
        })
        .await
        .map_err(rpc)?
        .into_inner();
    let dir = create.out.unwrap_or_else(|| PathBuf::from(&create.name));
    if role == pb::CredentialRole::Enrollment {
        // For agents, not flotctl: the pair and the CA, and the agent.toml lines that use them.
        let (cert, key) = write_pair(&dir, &create.name, &key_pem, &issued)?;
        let credential = issued.credential.unwrap_or_default();
        println!(
            "credential/{} created (enrollment, serial {}); in agent.toml:\n  enrollment_cert_file = {:?}\n  enrollment_key_file = {:?}\n  ca_file = {:?}",
            create.name,
            credential.serial,
            cert.display(),
            key.display(),
            dir.join("ca.crt").display()
        );
        return Ok(());
    }
    let config = write_bundle(&dir, &create.name, &key_pem, &issued, current)?;
    let credential = issued.credential.unwrap_or_default();
    println!(
        "credential/{} created ({}, serial {}); use it with `flotctl --config {}`",
        create.name,
        role_name(credential.role),
        credential.serial,
        config.display()
    );
    Ok(())
}

/// Renews `name` with a fresh key. Without `out`, renewing the credential this config uses
/// replaces its key and certificate in place; any other is written to `./<name>/`.
pub(crate) async fn renew(
    channel: Channel,
    current: &CtlConfig,
    name: String,
    validity: String,
    out: Option<PathBuf>,
) -> Result<()> {
    let own = std::fs::read_to_string(&current.cert_file)
        .ok()
        .and_then(|pem| flotilla::pki::identity_pem(&pem).ok())
        .is_some_and(|identity| identity.name == name);
    let (key_pem, csr_pem) = key_and_csr()?;
    let issued = CredentialServiceClient::new(channel)
        .renew_credential(pb::RenewCredentialRequest {
            name: name.clone(),
            csr_pem,
            validity,
        })
        .await
        .map_err(rpc)?
        .into_inner();
    let serial = issued
        .credential
        .as_ref()
        .map(|c| c.serial.clone())
        .unwrap_or_default();
    match out {
        None if own => {
            // Key first: until the certificate follows, the old pair is still what a reader
            // that opened both files earlier holds; the previous certificate stays valid until
            // the new one is used.
            write_file(&current.key_file, &key_pem, 0o600)?;
            write_file(&current.cert_file, &issued.certificate_pem, 0o644)?;
            println!(
                "credential/{name} renewed (serial {serial}); {} and {} replaced",
                current.cert_file.display(),
                current.key_file.display()
            );
        }
        out => {
            let dir = out.unwrap_or_else(|| PathBuf::from(&name));
            let config = write_bundle(&dir, &name, &key_pem, &issued, current)?;
            println!(
                "credential/{name} renewed (serial {serial}); use it with `flotctl --config {}`",
                config.display()
            );
        }
    }
    Ok(())
}

pub(crate) async fn revoke(channel: Channel, name: String, reason: String) -> Result<()> {
    let credential = CredentialServiceClient::new(channel)
        .revoke_credential(pb::RevokeCredentialRequest {
            name: name.clone(),
            reason,
        })
        .await
        .map_err(rpc)?
        .into_inner();
    println!(
        "credential/{} revoked ({}); open calls made with it have ended",
        credential.name,
        role_name(credential.role)
    );
    Ok(())
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CredentialView {
    name: String,
    role: &'static str,
    identity: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    scope: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    acts_as: Option<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    methods: Vec<String>,
    serial: String,
    not_after: Option<String>,
    created_at: Option<String>,
    created_by: String,
    last_used_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    revoked_at: Option<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    revocation_reason: String,
}

fn view(c: pb::Credential) -> CredentialView {
    let grant = c.grant.unwrap_or_default();
    CredentialView {
        role: role_name(c.role),
        identity: c.identity,
        scope: c.scope,
        acts_as: (grant.acts_as != 0).then(|| role_name(grant.acts_as)),
        methods: grant.methods,
        serial: c.serial,
        not_after: c.not_after.map(|t| t.to_string()),
        created_at: c.created_at.map(|t| t.to_string()),
        created_by: c.created_by,
        last_used_at: c.last_used_at.map(|t| t.to_string()),
        revoked_at: c.revoked_at.map(|t| t.to_string()),
        revocation_reason: c.revocation_reason,
        name: c.name,
    }
}

const HEADER: &[&str] = &[
    "NAME",
    "ROLE",
    "SCOPE",
    "SERIAL",
    "EXPIRES",
    "LAST USED",
    "STATUS",
];

fn row(c: &CredentialView) -> Vec<String> {
    let role = match (&c.acts_as, c.methods.len()) {
        (Some(acts_as), _) => format!("{} (as {acts_as})", c.role),
        (None, 0) => c.role.to_string(),
        (None, n) => format!("{} ({n} methods)", c.role),
    };
    vec![
        c.name.clone(),
        role,
        if c.scope.is_empty() {
            "*".into()
        } else {
            c.scope.clone()
        },
        c.serial.clone(),
        c.not_after.clone().unwrap_or_default(),
        c.last_used_at.clone().unwrap_or_else(|| "never".into()),
        if c.revoked_at.is_some() {
            "revoked".into()
        } else {
            "active".into()
        },
    ]
}

pub(crate) async fn list(channel: Channel, format: Format, include_revoked: bool) -> Result<()> {
    let credentials = CredentialServiceClient::new(channel)
        .list_credentials(pb::ListCredentialsRequest { include_revoked })
        .await
        .map_err(rpc)?
        .into_inner()
        .credentials;
    let views: Vec<CredentialView> = credentials.into_iter().map(view).collect();
    print(format, &views, false, HEADER, row)
}

pub(crate) async fn get(channel: Channel, format: Format, name: String) -> Result<()> {
    let credential = CredentialServiceClient::new(channel)
        .get_credential(pb::GetCredentialRequest { name })
        .await
        .map_err(rpc)?
        .into_inner();
    print(format, &[view(credential)], true, HEADER, row)
}

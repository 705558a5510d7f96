//! `flotctl agent-release`: making a release key, signing a build with it (on the operator's
//! machine: the control plane never sees the private key), publishing the signed build, listing
//! and deleting releases.

use crate::output::{Format, print};
use crate::rpc;
use anyhow::{Context, Result, anyhow, bail};
use flotilla::proto::admin::v1 as pb;
use flotilla::proto::admin::v1::agent_release_service_client::AgentReleaseServiceClient;
use flotilla::proto::admin::v1::publish_agent_release_request::Part;
use flotilla::proto::agent::v1 as agent;
use flotilla::release::{ReleaseKey, SignatureFile, signing_message};
use rcgen::SigningKey;
use serde::Serialize;
use std::io::Read;
use std::path::{Path, PathBuf};
use tonic::transport::Channel;

/// Bytes per upload message.
const UPLOAD_CHUNK: usize = 1024 * 1024;

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ReleaseView {
    pub kind: &'static str,
    pub version: String,
    pub sha256: String,
    pub size: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub url: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub key_fingerprint: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub published_at: Option<String>,
    pub published_by: String,
}

fn view(release: agent::AgentRelease) -> ReleaseView {
    ReleaseView {
        kind: "AgentRelease",
        version: release.version,
        sha256: release.sha256,
        size: release.size,
        url: release.url,
        key_fingerprint: release.key_fingerprint,
        published_at: release.published_at.map(|t| t.to_string()),
        published_by: release.published_by,
    }
}

fn print_releases(format: Format, releases: Vec<agent::AgentRelease>, single: bool) -> Result<()> {
    let views: Vec<_> = releases.into_iter().map(view).collect();
    print(
        format,
        &views,
        single,
        &["VERSION", "SHA256", "SIZE", "SOURCE", "PUBLISHED", "BY"],
        |r| {
            vec![
                r.version.clone(),
                r.sha256.chars().take(16).collect(),
                r.size.to_string(),
                if r.url.is_empty() {
                    "control plane".into()
                } else {
                    r.url.clone()
                },
                r.published_at.clone().unwrap_or_default(),
                r.published_by.clone(),
            ]
        },
    )
}

/// Writes a new Ed25519 release key: `<out>.key` (private, 0600) and `<out>.pub`.
pub(crate) fn keygen(out: &Path) -> Result<()> {
    let private = out.with_extension("key");
    let public = out.with_extension("pub");
    for path in [&private, &public] {
        if path.exists() {
            bail!("{} exists; not overwriting a key", path.display());
        }
    }
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    write_new(&private, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&public, key.public_key_pem().as_bytes(), 0o644)?;
    let fingerprint = ReleaseKey::from_pem(&key.public_key_pem())?.fingerprint();
    println!(
        "release key: {} (keep it off the control plane)",
        private.display()
    );
    println!(
        "public key:  {} (pin it in every agent.toml: [update] release_keys)",
        public.display()
    );
    println!("fingerprint: {fingerprint}");
    Ok(())
}

fn write_new(path: &Path, content: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(content)?;
    file.sync_all()?;
    Ok(())
}

/// Signs `file` as release `version` with the private key at `key`; writes the signature file.
pub(crate) fn sign(key: &Path, version: &str, file: &Path, out: Option<PathBuf>) -> Result<()> {
    flotilla::spec::parse_release_version(version).map_err(|e| anyhow!(e))?;
    let pem = std::fs::read_to_string(key).with_context(|| format!("reading {}", key.display()))?;
    let pair = rcgen::KeyPair::from_pem(&pem)
        .with_context(|| format!("{} is not a private key", key.display()))?;
    let public = ReleaseKey::from_pem(&pair.public_key_pem())
        .with_context(|| format!("{} is not an Ed25519 release key", key.display()))?;
    let (sha256, size) =
        flotilla::pki::sha256_file(file).with_context(|| format!("reading {}", file.display()))?;
    let signature = pair.sign(&signing_message(version, &sha256, size))?;
    let signed = SignatureFile {
        version: version.to_string(),
        sha256,
        size,
        key: public.fingerprint(),
        signature: hex::encode(signature),
    };
    let out = out.unwrap_or_else(|| {
        let mut name = file.as_os_str().to_owned();
        name.push(".sig");
        PathBuf::from(name)
    });
    std::fs::write(&out, signed.to_text()).with_context(|| format!("writing {}", out.display()))?;
    println!(
        "signed {} as agent release {version}: {}",
        file.display(),
        out.display()
    );
    Ok(())
}

/// Publishes `file` (or, with `url`, only the record of a build served from there) as release
/// `version` with the signature file `signature`.
pub(crate) async fn publish(
    channel: Channel,
    format: Format,
    file: &Path,
    version: &str,
    signature: &Path,
    url: Option<String>,
) -> Result<()> {
    let text = std::fs::read_to_string(signature)
        .with_context(|| format!("reading {}", signature.display()))?;
    let signed = SignatureFile::parse(&text).with_context(|| signature.display().to_string())?;
    if signed.version != version {
        bail!(
            "{} signs version {}, not {version}",
            signature.display(),
            signed.version
        );
    }
    let (sha256, size) =
        flotilla::pki::sha256_file(file).with_context(|| format!("reading {}", file.display()))?;
    if (sha256.as_str(), size) != (signed.sha256.as_str(), signed.size) {
        bail!(
            "{} signs a {}-byte file with SHA-256 {}, but {} is {size} bytes with SHA-256 {sha256}",
            signature.display(),
            signed.size,
            signed.sha256,
            file.display()
        );
    }
    let header = pb::AgentReleaseHeader {
        version: version.to_string(),
        sha256,
        size,
        signature: signed.signature_bytes()?,
        url: url.clone().unwrap_or_default(),
    };
    let first = pb::PublishAgentReleaseRequest {
        part: Some(Part::Header(header)),
    };
    // Read as it is sent, one chunk at a time however large the build; none with a URL.
    let mut reader = match url {
        None => Some(std::fs::File::open(file)?),
        Some(_) => None,
    };
    let chunks = std::iter::from_fn(move || {
        let reader = reader.as_mut()?;
        let mut buffer = vec![0; UPLOAD_CHUNK];
        let mut filled = 0;
        while filled < buffer.len() {
            match reader.read(&mut buffer[filled..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => filled += n,
            }
        }
        (filled > 0).then(|| {
            buffer.truncate(filled);
            pb::PublishAgentReleaseRequest {
                part: Some(Part::Chunk(buffer)),
            }
        })
    });
    let release = AgentReleaseServiceClient::new(channel)
        .publish_agent_release(tokio_stream::iter(std::iter::once(first).chain(chunks)))
        .await
        .map_err(rpc)?
        .into_inner();
    print_releases(format, vec![release], true)
}

pub(crate) async fn list(channel: Channel, format: Format) -> Result<()> {
    let releases = AgentReleaseServiceClient::new(channel)
        .list_agent_releases(pb::ListAgentReleasesRequest {})
        .await
        .map_err(rpc)?
        .into_inner()
        .releases;
    print_releases(format, releases, false)
}

pub(crate) async fn get(channel: Channel, format: Format, version: String) -> Result<()> {
    let release = AgentReleaseServiceClient::new(channel)
        .get_agent_release(agent::GetAgentReleaseRequest { version })
        .await
        .map_err(rpc)?
        .into_inner();
    print_releases(format, vec![release], true)
}

pub(crate) async fn delete(channel: Channel, version: String) -> Result<()> {
    AgentReleaseServiceClient::new(channel)
        .delete_agent_release(pb::DeleteAgentReleaseRequest {
            version: version.clone(),
        })
        .await
        .map_err(rpc)?;
    println!("agent release {version} deleted");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_build_verifies_against_the_generated_public_key() {
        let dir = tempfile::tempdir().unwrap();
        keygen(&dir.path().join("release")).unwrap();
        assert!(
            keygen(&dir.path().join("release")).is_err(),
            "never overwrites"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("release.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let build = dir.path().join("flotilla-agent");
        std::fs::write(&build, b"a build").unwrap();
        sign(&dir.path().join("release.key"), "1.4.0", &build, None).unwrap();
        let signed = SignatureFile::parse(
            &std::fs::read_to_string(dir.path().join("flotilla-agent.sig")).unwrap(),
        )
        .unwrap();
        let key =
            ReleaseKey::from_pem(&std::fs::read_to_string(dir.path().join("release.pub")).unwrap())
                .unwrap();
        assert_eq!(signed.key, key.fingerprint());
        assert_eq!(signed.size, 7);
        signed.signed_release().unwrap().verify(&[key]).unwrap();
        assert!(sign(&dir.path().join("release.key"), "1.4", &build, None).is_err());
    }
}

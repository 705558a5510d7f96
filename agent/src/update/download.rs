//! Getting an agent release onto the device: its record from the control plane, its signature
//! checked against the pinned release keys before a byte is downloaded, then its bytes — from
//! the control plane (`DownloadArtifact`) or the release's URL — into `update/downloads/`,
//! resuming where an interrupted attempt stopped. Nothing is installed until size and SHA-256
//! match what the operator signed.

use super::http;
use flotilla::client::retry_after;
use flotilla::proto::agent::v1 as pb;
use flotilla::proto::agent::v1::agent_service_client::AgentServiceClient;
use flotilla::release::{ReleaseKey, SignedRelease};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::Channel;

/// Attempts that end early before a download counts as broken (each resumes the last).
const ATTEMPTS: u32 = 5;
/// Longest wait the control plane may ask for between attempts.
const MAX_BUSY_WAIT: Duration = Duration::from_secs(60);

/// Why a release could not be had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Unusable {
    /// It cannot be used as it is (not published, not signed by a pinned key, its bytes do not
    /// match): a refusal of the spec.
    Refused(String),
    /// It could not be had now (the control plane or the URL could not be reached): try again
    /// with the next session.
    Unavailable(String),
}

/// Asks the control plane for the release of `version` and checks its signature.
pub(super) async fn release(
    channel: &Channel,
    version: &str,
    keys: &[ReleaseKey],
) -> Result<pb::AgentRelease, Unusable> {
    let release = AgentServiceClient::new(channel.clone())
        .get_agent_release(pb::GetAgentReleaseRequest {
            version: version.to_string(),
        })
        .await
        .map_err(|status| match status.code() {
            tonic::Code::NotFound => Unusable::Refused(format!(
                "agent release {version} is not published on the control plane"
            )),
            _ => Unusable::Unavailable(format!(
                "asking for agent release {version}: {}",
                status.message()
            )),
        })?
        .into_inner();
    if release.version != version {
        return Err(Unusable::Refused(format!(
            "asked for agent release {version}, got {}",
            release.version
        )));
    }
    let signed = SignedRelease {
        version: release.version.clone(),
        sha256: release.sha256.clone(),
        size: release.size,
        signature: release.signature.clone(),
    };
    let key = signed
        .verify(keys)
        .map_err(|e| Unusable::Refused(format!("agent release {version} is refused: {e}")))?;
    tracing::info!(release.version = %version, release.sha256 = %release.sha256, key = %&key.fingerprint()[..16], "agent release signature verified");
    Ok(release)
}

/// Where the bytes come from.
enum Source<'a> {
    ControlPlane(&'a Channel),
    Url { url: &'a str, ca_file: &'a Path },
}

/// Downloads `release` into `dir` and returns the verified file.
pub(super) async fn fetch(
    release: &pb::AgentRelease,
    channel: &Channel,
    dir: &Path,
    ca_file: &Path,
) -> Result<PathBuf, Unusable> {
    let source = if release.url.is_empty() {
        Source::ControlPlane(channel)
    } else {
        Source::Url {
            url: &release.url,
            ca_file,
        }
    };
    std::fs::create_dir_all(dir)
        .map_err(|e| Unusable::Unavailable(format!("creating {}: {e}", dir.display())))?;
    let done = dir.join(&release.sha256);
    if super::builds::digest_file(&done)
        .is_ok_and(|(sha, size)| sha == release.sha256 && size == release.size)
    {
        return Ok(done);
    }
    let part = dir.join(format!("{}.part", release.sha256));
    let mut stalled = 0;
    loop {
        let mut have = file_len(&part);
        if have > release.size {
            let _ = std::fs::remove_file(&part);
            have = 0;
        }
        if have == release.size {
            break;
        }
        let attempt = match &source {
            Source::ControlPlane(channel) => {
                from_control_plane(channel, release, &part, have).await
            }
            Source::Url { url, ca_file } => from_url(url, release, &part, have, ca_file).await,
        };
        let now_have = file_len(&part);
        // An attempt that ended cleanly but short is a truncated download; one that broke off
        // is the network's doing.
        let (reason, truncated) = match attempt {
            Err(Attempt::Busy(wait)) => {
                tokio::time::sleep(wait.min(MAX_BUSY_WAIT)).await;
                continue;
            }
            Err(Attempt::Broken(reason)) => {
                let _ = std::fs::remove_file(&part);
                return Err(Unusable::Refused(reason));
            }
            Err(Attempt::Interrupted(reason)) => (reason, false),
            Ok(()) => (
                format!(
                    "the download of agent release {} stops at {now_have} of {} bytes (truncated)",
                    release.version, release.size
                ),
                true,
            ),
        };
        if now_have == release.size {
            break;
        }
        stalled = if now_have > have { 0 } else { stalled + 1 };
        if stalled >= ATTEMPTS {
            if truncated {
                let _ = std::fs::remove_file(&part);
                return Err(Unusable::Refused(reason));
            }
            return Err(Unusable::Unavailable(reason));
        }
        tokio::time::sleep(Duration::from_millis(200 * u64::from(stalled.max(1)))).await;
    }
    let checked = part.clone();
    let (sha256, size) = tokio::task::spawn_blocking(move || super::builds::digest_file(&checked))
        .await
        .map_err(|e| Unusable::Unavailable(e.to_string()))?
        .map_err(|e| Unusable::Unavailable(format!("reading {}: {e}", part.display())))?;
    if sha256 != release.sha256 || size != release.size {
        let _ = std::fs::remove_file(&part);
        return Err(Unusable::Refused(format!(
            "the download of agent release {} is corrupt: {size} bytes with SHA-256 {sha256}, \
             not the {} bytes with SHA-256 {} that were signed",
            release.version, release.size, release.sha256
        )));
    }
    std::fs::rename(&part, &done)
        .map_err(|e| Unusable::Unavailable(format!("keeping the download: {e}")))?;
    Ok(done)
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// How one attempt ended early.
enum Attempt {
    /// The connection or stream broke; resume.
    Interrupted(String),
    /// The control plane serves too many downloads; come back after this.
    Busy(Duration),
    /// What arrived cannot be the release.
    Broken(String),
}

fn append(part: &Path, offset: u64) -> Result<std::fs::File, Attempt> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(part)
        .map_err(|e| Attempt::Interrupted(format!("opening {}: {e}", part.display())))?;
    if offset == 0 {
        file.set_len(0)
            .map_err(|e| Attempt::Interrupted(format!("truncating {}: {e}", part.display())))?;
    }
    Ok(file)
}

fn write_piece(
    file: &mut std::fs::File,
    bytes: &[u8],
    have: &mut u64,
    size: u64,
) -> Result<(), Attempt> {
    *have += bytes.len() as u64;
    if *have > size {
        return Err(Attempt::Broken(format!(
            "the download is larger than the {size} bytes that were signed"
        )));
    }
    file.write_all(bytes)
        .map_err(|e| Attempt::Interrupted(format!("writing the download: {e}")))
}

fn finish(file: std::fs::File) -> Result<(), Attempt> {
    file.sync_all()
        .map_err(|e| Attempt::Interrupted(format!("syncing the download: {e}")))
}

async fn from_control_plane(
    channel: &Channel,
    release: &pb::AgentRelease,
    part: &Path,
    offset: u64,
) -> Result<(), Attempt> {
    let mut chunks = match AgentServiceClient::new(channel.clone())
        .download_artifact(pb::DownloadArtifactRequest {
            sha256: release.sha256.clone(),
            offset,
        })
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => {
            return Err(match retry_after(&status) {
                Some(wait) => Attempt::Busy(wait),
                None => Attempt::Interrupted(format!("download refused: {}", status.message())),
            });
        }
    };
    let mut file = append(part, offset)?;
    let mut have = offset;
    loop {
        match chunks.message().await {
            Ok(Some(chunk)) => {
                if chunk.offset != have {
                    return Err(Attempt::Interrupted(format!(
                        "a chunk for offset {} arrived at {have}",
                        chunk.offset
                    )));
                }
                write_piece(&mut file, &chunk.data, &mut have, release.size)?;
            }
            Ok(None) => return finish(file),
            Err(status) => {
                let _ = finish(file);
                return Err(Attempt::Interrupted(format!(
                    "the download broke off: {}",
                    status.message()
                )));
            }
        }
    }
}

async fn from_url(
    url: &str,
    release: &pb::AgentRelease,
    part: &Path,
    offset: u64,
    ca_file: &Path,
) -> Result<(), Attempt> {
    let mut response = http::get_from(url, offset, ca_file)
        .await
        .map_err(|e| Attempt::Interrupted(format!("{e:#}")))?;
    // A server that ignores Range sends the whole body: start over.
    let offset = if response.partial { offset } else { 0 };
    let mut file = append(part, offset)?;
    let mut have = offset;
    loop {
        match http::next_piece(&mut response.body).await {
            Ok(Some(bytes)) => write_piece(&mut file, &bytes, &mut have, release.size)?,
            Ok(None) => return finish(file),
            Err(error) => {
                let _ = finish(file);
                return Err(Attempt::Interrupted(format!(
                    "the download broke off: {error:#}"
                )));
            }
        }
    }
}

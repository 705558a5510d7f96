//! The download scenario: an agent release (a signed artifact of `--download-mib`) published
//! through the admin API, then fetched by `--downloaders` devices at once over the agent
//! endpoint as the real agent does it (release record, chunks from an offset, come back when told
//! the replica is busy and resume), each checked against its SHA-256. Measures the time, the
//! per-device latency, and the control plane's memory while it serves them: streaming from one
//! cached file, its peak must stay far below one copy per device.

use crate::fleet::source_address;
use crate::measure::{Latencies, usage};
use crate::server::ControlPlane;
use anyhow::{Context, Result, bail};
use flotilla::client::{ClientCredentials, endpoint, retry_after};
use flotilla::proto::admin::v1 as admin;
use flotilla::proto::admin::v1::agent_release_service_client::AgentReleaseServiceClient;
use flotilla::proto::admin::v1::publish_agent_release_request::Part;
use flotilla::proto::agent::v1 as agent;
use flotilla::proto::agent::v1::agent_service_client::AgentServiceClient;
use rcgen::SigningKey;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const VERSION: &str = "99.0.0";

#[derive(Debug, Serialize)]
pub(crate) struct DownloadFigures {
    pub downloaders: usize,
    pub artifact_mib: f64,
    /// From the first request to the last device holding the whole verified artifact.
    pub seconds: f64,
    /// Bytes delivered per second, all devices together.
    pub throughput_mib_s: f64,
    pub latency: Latencies,
    /// Times a device was told the replica serves enough downloads and came back later.
    pub told_to_come_back: usize,
    /// Summed over the replicas.
    pub rss_before_mib: f64,
    pub rss_peak_mib: f64,
    pub server_cpu_seconds: f64,
}

/// A pseudo-random artifact (incompressible enough for a realistic transfer).
fn artifact(size: usize) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    (0..size)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

async fn publish(server: &ControlPlane, bytes: &[u8]) -> Result<String> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let sha256 = hex::encode(Sha256::digest(bytes));
    let size = bytes.len() as u64;
    let header = admin::AgentReleaseHeader {
        version: VERSION.into(),
        sha256: sha256.clone(),
        size,
        signature: key.sign(&flotilla::release::signing_message(VERSION, &sha256, size))?,
        url: String::new(),
    };
    let mut parts = vec![admin::PublishAgentReleaseRequest {
        part: Some(Part::Header(header)),
    }];
    parts.extend(
        bytes
            .chunks(1024 * 1024)
            .map(|c| admin::PublishAgentReleaseRequest {
                part: Some(Part::Chunk(c.to_vec())),
            }),
    );
    AgentReleaseServiceClient::new(server.admin().await?)
        .publish_agent_release(tokio_stream::iter(parts))
        .await
        .context("publishing the artifact")?;
    Ok(sha256)
}

/// Fetches the whole artifact as one device; how many times it was told to come back.
async fn fetch(
    index: usize,
    creds: ClientCredentials,
    port: u16,
    sha256: String,
    size: u64,
) -> Result<usize> {
    let channel = endpoint(&format!("https://127.0.0.1:{port}"), &creds)?
        .local_address(Some(source_address(1_000_000 + index)))
        .connect()
        .await?;
    let mut client = AgentServiceClient::new(channel);
    let release = client
        .get_agent_release(agent::GetAgentReleaseRequest {
            version: VERSION.into(),
        })
        .await?
        .into_inner();
    if release.sha256 != sha256 {
        bail!("the release names another build");
    }
    let mut hasher = Sha256::new();
    let mut have = 0;
    let mut busy = 0;
    while have < size {
        let mut chunks = match client
            .download_artifact(agent::DownloadArtifactRequest {
                sha256: sha256.clone(),
                offset: have,
            })
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) => match retry_after(&status) {
                Some(wait) => {
                    busy += 1;
                    tokio::time::sleep(wait).await;
                    continue;
                }
                None => bail!("download refused: {status}"),
            },
        };
        while let Some(chunk) = chunks.message().await? {
            if chunk.offset != have {
                bail!("chunk at {} arrived at {have}", chunk.offset);
            }
            hasher.update(&chunk.data);
            have += chunk.data.len() as u64;
        }
    }
    if hex::encode(hasher.finalize()) != sha256 {
        bail!("the downloaded artifact does not match its SHA-256");
    }
    Ok(busy)
}

pub(crate) async fn run(
    servers: &[ControlPlane],
    creds: Vec<ClientCredentials>,
    mib: usize,
) -> Result<DownloadFigures> {
    let bytes = artifact(mib * 1024 * 1024);
    let sha256 = publish(&servers[0], &bytes).await?;
    let size = bytes.len() as u64;
    drop(bytes);
    let pids: Vec<u32> = servers.iter().map(ControlPlane::pid).collect();
    let sample = |pids: &[u32]| -> Result<(f64, f64)> {
        pids.iter().try_fold((0.0, 0.0), |(rss, cpu), pid| {
            let (r, c) = usage(*pid)?;
            Ok((rss + r, cpu + c))
        })
    };
    let (rss_before, cpu_before) = sample(&pids)?;
    let peak = Arc::new(std::sync::Mutex::new(rss_before));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling, pids) = (peak.clone(), sampling.clone(), pids.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                if let Ok((rss, _)) = sample(&pids) {
                    let mut peak = peak.lock().unwrap_or_else(|p| p.into_inner());
                    *peak = peak.max(rss);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let downloaders = creds.len();
    let told = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = creds
        .into_iter()
        .enumerate()
        .map(|(index, creds)| {
            let port = servers[index % servers.len()].agent_port;
            let (sha256, told) = (sha256.clone(), told.clone());
            tokio::spawn(async move {
                let busy = fetch(index, creds, port, sha256, size).await?;
                told.fetch_add(busy, Ordering::Relaxed);
                Ok::<_, anyhow::Error>(started.elapsed().as_secs_f64() * 1000.0)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(downloaders);
    for task in tasks {
        latencies.push(task.await??);
    }
    let seconds = started.elapsed().as_secs_f64();
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.await;
    let (_, cpu_after) = sample(&pids)?;
    let rss_peak = *peak.lock().unwrap_or_else(|p| p.into_inner());
    Ok(DownloadFigures {
        downloaders,
        artifact_mib: size as f64 / (1024.0 * 1024.0),
        seconds,
        throughput_mib_s: (size as f64 * downloaders as f64) / (1024.0 * 1024.0) / seconds,
        latency: Latencies::of(latencies),
        told_to_come_back: told.load(Ordering::Relaxed),
        rss_before_mib: rss_before / 1024.0,
        rss_peak_mib: rss_peak / 1024.0,
        server_cpu_seconds: cpu_after - cpu_before,
    })
}

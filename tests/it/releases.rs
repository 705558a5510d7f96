//! Agent releases through the real services over mTLS: publishing a signed build (stored in the
//! database, its call audited), listing, serving it to devices in chunks and from any offset (also
//! after the replica's cache is gone), the limits on downloads, and bad publications that store
//! nothing.

use crate::support;

use flotilla::client::ClientCredentials;
use flotilla::control::{Policy, ReleasePolicy};
use flotilla::proto::admin::v1 as pb;
use flotilla::proto::admin::v1::agent_release_service_client::AgentReleaseServiceClient;
use flotilla::proto::admin::v1::audit_service_client::AuditServiceClient;
use flotilla::proto::admin::v1::credential_service_client::CredentialServiceClient;
use flotilla::proto::admin::v1::fleet_service_client::FleetServiceClient;
use flotilla::proto::admin::v1::publish_agent_release_request::Part;
use flotilla::proto::agent::v1 as agent;
use flotilla::proto::agent::v1::agent_service_client::AgentServiceClient;
use flotilla::release::{ReleaseKey, SignedRelease, signing_message};
use rcgen::SigningKey;
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};
use support::{TestServer, channel, csr, wait_for};
use tonic::Code;

fn release_key() -> rcgen::KeyPair {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap()
}

/// Bytes that stand for a build.
fn build(size: usize, seed: u8) -> Vec<u8> {
    (0..size)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn header(key: &rcgen::KeyPair, version: &str, bytes: &[u8]) -> pb::AgentReleaseHeader {
    let sha256 = hex::encode(Sha256::digest(bytes));
    let size = bytes.len() as u64;
    pb::AgentReleaseHeader {
        signature: key.sign(&signing_message(version, &sha256, size)).unwrap(),
        version: version.into(),
        sha256,
        size,
        url: String::new(),
    }
}

/// Publishes `header` followed by `bytes` in chunks of 100 KiB.
async fn publish(
    server: &TestServer,
    creds: &ClientCredentials,
    header: pb::AgentReleaseHeader,
    bytes: &[u8],
) -> Result<agent::AgentRelease, tonic::Status> {
    let mut parts = vec![pb::PublishAgentReleaseRequest {
        part: Some(Part::Header(header)),
    }];
    parts.extend(
        bytes
            .chunks(100 * 1024)
            .map(|c| pb::PublishAgentReleaseRequest {
                part: Some(Part::Chunk(c.to_vec())),
            }),
    );
    AgentReleaseServiceClient::new(channel(&server.admin_url, creds).await)
        .publish_agent_release(tokio_stream::iter(parts))
        .await
        .map(|r| r.into_inner())
}

async fn releases(server: &TestServer) -> Vec<agent::AgentRelease> {
    AgentReleaseServiceClient::new(channel(&server.admin_url, &server.admin_creds()).await)
        .list_agent_releases(pb::ListAgentReleasesRequest {})
        .await
        .unwrap()
        .into_inner()
        .releases
}

/// Downloads `sha256` from `offset` as a device; the chunks' offsets must follow each other.
async fn download(
    server: &TestServer,
    creds: &ClientCredentials,
    sha256: &str,
    offset: u64,
) -> Result<Vec<u8>, tonic::Status> {
    let mut chunks = AgentServiceClient::new(channel(&server.agent_url, creds).await)
        .download_artifact(agent::DownloadArtifactRequest {
            sha256: sha256.into(),
            offset,
        })
        .await?
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = chunks.message().await? {
        assert_eq!(chunk.offset, offset + bytes.len() as u64);
        assert!(chunk.data.len() <= 64 * 1024, "chunks are at most 64 KiB");
        bytes.extend(chunk.data);
    }
    Ok(bytes)
}

fn with_artifacts(dir: &std::path::Path, releases: ReleasePolicy) -> Policy {
    Policy {
        releases: ReleasePolicy {
            artifact_dir: dir.to_path_buf(),
            ..releases
        },
        ..Policy::default()
    }
}

#[tokio::test]
async fn a_signed_release_is_published_served_in_chunks_from_any_offset_and_deleted() {
    let cache = tempfile::tempdir().unwrap();
    let server =
        TestServer::start_with(with_artifacts(cache.path(), ReleasePolicy::default())).await;
    let admin = server.admin_creds();
    let key = release_key();
    let bytes = build(300 * 1024 + 7, 1);
    let published = publish(&server, &admin, header(&key, "1.4.0", &bytes), &bytes)
        .await
        .unwrap();
    assert_eq!(published.sha256, hex::encode(Sha256::digest(&bytes)));
    assert_eq!(published.published_by, "admin/admin");
    assert_eq!(releases(&server).await.len(), 1);

    let (device, _) = server.enroll_device("edge-1").await;
    // The device reads the release and checks its signature against the key it pins.
    let release = AgentServiceClient::new(channel(&server.agent_url, &device).await)
        .get_agent_release(agent::GetAgentReleaseRequest {
            version: "1.4.0".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let pinned = ReleaseKey::from_pem(&key.public_key_pem()).unwrap();
    SignedRelease {
        version: release.version.clone(),
        sha256: release.sha256.clone(),
        size: release.size,
        signature: release.signature.clone(),
    }
    .verify(&[pinned])
    .unwrap();
    assert_eq!(
        download(&server, &device, &release.sha256, 0)
            .await
            .unwrap(),
        bytes
    );
    // Resumed where an interrupted download stopped.
    assert_eq!(
        download(&server, &device, &release.sha256, 100_000)
            .await
            .unwrap(),
        bytes[100_000..]
    );
    // Another replica's cache is empty: the bytes come from the database.
    std::fs::remove_file(cache.path().join(&release.sha256)).unwrap();
    assert_eq!(
        download(&server, &device, &release.sha256, 0)
            .await
            .unwrap(),
        bytes
    );
    let status = download(&server, &device, &release.sha256, bytes.len() as u64 + 1)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // The same release again changes nothing; other content under it, or it under another
    // version, is refused.
    publish(&server, &admin, header(&key, "1.4.0", &bytes), &bytes)
        .await
        .unwrap();
    let other = build(1000, 2);
    let status = publish(&server, &admin, header(&key, "1.4.0", &other), &other)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    let status = publish(&server, &admin, header(&key, "1.5.0", &bytes), &bytes)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert!(status.message().contains("1.4.0"), "{}", status.message());

    // Named by a fleet: not deleted.
    FleetServiceClient::new(channel(&server.admin_url, &admin).await)
        .apply_fleet(pb::ApplyFleetRequest {
            name: "web".into(),
            selector: "site=lab".into(),
            template: Some(agent::DeviceSpec {
                agent: Some(agent::AgentUpdate {
                    version: "1.4.0".into(),
                    allow_downgrade: false,
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut releases_client =
        AgentReleaseServiceClient::new(channel(&server.admin_url, &admin).await);
    let status = releases_client
        .delete_agent_release(pb::DeleteAgentReleaseRequest {
            version: "1.4.0".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("fleet/web"),
        "{}",
        status.message()
    );
    FleetServiceClient::new(channel(&server.admin_url, &admin).await)
        .delete_fleet(pb::DeleteFleetRequest { name: "web".into() })
        .await
        .unwrap();
    releases_client
        .delete_agent_release(pb::DeleteAgentReleaseRequest {
            version: "1.4.0".into(),
        })
        .await
        .unwrap();
    assert!(releases(&server).await.is_empty());
    let status = download(&server, &device, &release.sha256, 0)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    // Both calls are in the audit trail, by whom and on what.
    let records = AuditServiceClient::new(channel(&server.admin_url, &admin).await)
        .list_audit(pb::ListAuditRequest {
            target: "agent-release/1.4.0".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    let kinds: Vec<&str> = records.iter().map(|r| r.kind.as_str()).collect();
    assert_eq!(kinds, ["publish", "delete"]);
    assert_eq!(records[0].revision, published.sha256);
    assert!(records.iter().all(|r| r.actor == "admin/admin"));
}

#[tokio::test]
async fn bad_publications_are_refused_and_store_nothing() {
    let cache = tempfile::tempdir().unwrap();
    let operator_key = release_key();
    let pinned = ReleaseKey::from_pem(&operator_key.public_key_pem()).unwrap();
    // This control plane was given the release key: a release signed by another is refused here
    // already (devices would refuse it anyway).
    let server = TestServer::start_with(with_artifacts(
        cache.path(),
        ReleasePolicy {
            keys: vec![pinned],
            ..ReleasePolicy::default()
        },
    ))
    .await;
    let admin = server.admin_creds();
    let bytes = build(10_000, 3);
    let good = || header(&operator_key, "2.0.0", &bytes);
    let refused = |status: tonic::Status, field: &str| {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains(field),
            "{field}: {}",
            status.message()
        );
    };
    refused(
        publish(
            &server,
            &admin,
            header(&release_key(), "2.0.0", &bytes),
            &bytes,
        )
        .await
        .unwrap_err(),
        "does not verify",
    );
    refused(
        publish(&server, &admin, good(), &bytes[..9_999])
            .await
            .unwrap_err(),
        "arrived",
    );
    let mut corrupt = bytes.clone();
    corrupt[5] ^= 1;
    refused(
        publish(&server, &admin, good(), &corrupt)
            .await
            .unwrap_err(),
        "header.sha256",
    );
    refused(
        publish(
            &server,
            &admin,
            pb::AgentReleaseHeader {
                version: "2.0".into(),
                ..good()
            },
            &bytes,
        )
        .await
        .unwrap_err(),
        "semantic version",
    );
    refused(
        publish(
            &server,
            &admin,
            pb::AgentReleaseHeader {
                signature: vec![1; 10],
                ..good()
            },
            &bytes,
        )
        .await
        .unwrap_err(),
        "64 bytes",
    );
    refused(
        publish(&server, &admin, good(), &[]).await.unwrap_err(),
        "no bytes and no url",
    );
    refused(
        publish(
            &server,
            &admin,
            pb::AgentReleaseHeader {
                url: "https://cdn.example.com/agent".into(),
                ..good()
            },
            &bytes,
        )
        .await
        .unwrap_err(),
        "carries no bytes",
    );
    refused(
        publish(
            &server,
            &admin,
            pb::AgentReleaseHeader {
                url: "ftp://cdn.example.com/agent".into(),
                ..good()
            },
            &[],
        )
        .await
        .unwrap_err(),
        "http",
    );
    // A chunk before the header.
    let status = AgentReleaseServiceClient::new(channel(&server.admin_url, &admin).await)
        .publish_agent_release(tokio_stream::iter(vec![pb::PublishAgentReleaseRequest {
            part: Some(Part::Chunk(bytes.clone())),
        }]))
        .await
        .unwrap_err();
    refused(status, "header");
    // A credential limited to some devices publishes nothing for all of them.
    let key = rcgen::KeyPair::generate().unwrap();
    let issued = CredentialServiceClient::new(channel(&server.admin_url, &admin).await)
        .create_credential(pb::CreateCredentialRequest {
            name: "ops-a".into(),
            role: pb::CredentialRole::Operator as i32,
            scope: "site=a".into(),
            csr_pem: csr(&key),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let scoped = ClientCredentials {
        ca_pem: issued.ca_pem,
        cert_pem: issued.certificate_pem,
        key_pem: key.serialize_pem(),
        server_name: "localhost".into(),
    };
    let status = publish(&server, &scoped, good(), &bytes).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("scope"), "{}", status.message());

    assert!(releases(&server).await.is_empty());
    let leftovers: Vec<_> = std::fs::read_dir(cache.path())
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "uploads left behind: {leftovers:?}");
    // The good one goes through.
    let release = publish(&server, &admin, good(), &bytes).await.unwrap();
    assert_eq!(
        release.key_fingerprint,
        ReleaseKey::from_pem(&operator_key.public_key_pem())
            .unwrap()
            .fingerprint()
    );
    // Only devices download: an enrollment credential may not.
    let status = download(&server, &server.enrollment_creds(), &release.sha256, 0)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn downloads_are_bounded_in_number_and_rate_per_replica() {
    let cache = tempfile::tempdir().unwrap();
    let rate = 200 * 1024;
    let server = TestServer::start_with(with_artifacts(
        cache.path(),
        ReleasePolicy {
            max_downloads: 1,
            max_rate: rate,
            ..ReleasePolicy::default()
        },
    ))
    .await;
    let key = release_key();
    let bytes = build(600 * 1024, 4);
    let release = publish(
        &server,
        &server.admin_creds(),
        header(&key, "3.0.0", &bytes),
        &bytes,
    )
    .await
    .unwrap();
    let (device, _) = server.enroll_device("edge-1").await;
    // A download that is not read holds the replica's one slot.
    let held = AgentServiceClient::new(channel(&server.agent_url, &device).await)
        .download_artifact(agent::DownloadArtifactRequest {
            sha256: release.sha256.clone(),
            offset: 0,
        })
        .await
        .unwrap();
    let status = download(&server, &device, &release.sha256, 0)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let retry = flotilla::client::retry_after(&status).expect("a retry delay");
    assert!(retry >= Duration::from_secs(2), "{retry:?}");
    drop(held);
    // Once the slot is free: the whole artifact, never faster than the rate (one second's worth
    // may go at once).
    let started = Instant::now();
    let got = wait_for(
        "the download slot to be free",
        Duration::from_secs(10),
        || async { download(&server, &device, &release.sha256, 0).await.ok() },
    )
    .await;
    assert_eq!(got, bytes);
    let least = Duration::from_secs_f64((bytes.len() as f64 - rate as f64) / rate as f64);
    assert!(
        started.elapsed() >= least.mul_f64(0.9),
        "600 KiB at 200 KiB/s took {:?}",
        started.elapsed()
    );
}

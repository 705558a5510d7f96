//! `flotctl audit …`: list the certificate audit trail, and verify it from its first record with
//! the audit public key pinned in the flotctl config.

use crate::output::{Format, print};
use crate::rpc;
use anyhow::{Context, Result, anyhow, bail};
use flotilla::audit::{AuditEntry, SealedRecord, verify_chain};
use flotilla::profiles::CtlConfig;
use flotilla::proto::admin::v1 as pb;
use flotilla::proto::admin::v1::audit_service_client::AuditServiceClient;
use flotilla::signature::spki_der_from_pem;
use serde::Serialize;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tonic::transport::Channel;

const PAGE: u32 = 1000;

/// Filters of `audit list`.
pub struct Filters {
    pub device: Option<String>,
    pub kind: Option<String>,
    /// Only records newer than this long ago.
    pub since: Option<Duration>,
    pub until: Option<Duration>,
}

fn ago(duration: Duration) -> prost_types::Timestamp {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let at = now.saturating_sub(duration);
    prost_types::Timestamp {
        seconds: at.as_secs() as i64,
        nanos: at.subsec_nanos() as i32,
    }
}

fn millis(t: Option<&prost_types::Timestamp>) -> i64 {
    t.map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
        .unwrap_or(0)
}

fn sealed(record: pb::AuditRecord) -> SealedRecord {
    SealedRecord {
        entry: AuditEntry {
            seq: record.seq,
            at_ms: millis(record.at.as_ref()),
            kind: record.kind,
            device_id: record.device_id,
            serial: record.serial,
            key_fingerprint: record.key_fingerprint,
            not_before_ms: millis(record.not_before.as_ref()),
            not_after_ms: millis(record.not_after.as_ref()),
            actor: record.actor,
            reason: record.reason,
            proof: record.proof,
            outcome: record.outcome,
            target: record.target,
        },
        previous_hash: record.previous_hash,
        hash: record.hash,
        signature: record.signature,
    }
}

#[derive(Serialize)]
struct RecordView {
    seq: i64,
    at: Option<String>,
    kind: String,
    outcome: String,
    device_id: String,
    /// What the record is about, by name (`credential/ops`), when it names it.
    #[serde(skip_serializing_if = "String::is_empty")]
    target: String,
    serial: String,
    actor: String,
    proof: String,
    reason: String,
    hash: String,
}

/// Every record the filters select, page by page.
async fn fetch(
    channel: Channel,
    request: pb::ListAuditRequest,
) -> Result<(Vec<pb::AuditRecord>, String)> {
    let mut client = AuditServiceClient::new(channel);
    let mut records = Vec::new();
    let mut after_seq = 0;
    loop {
        let page = client
            .list_audit(pb::ListAuditRequest {
                after_seq,
                limit: PAGE,
                ..request.clone()
            })
            .await
            .map_err(rpc)?
            .into_inner();
        let key = page.audit_public_key_pem;
        let done = page.records.len() < PAGE as usize;
        if let Some(last) = page.records.last() {
            after_seq = last.seq;
        }
        records.extend(page.records);
        if done {
            return Ok((records, key));
        }
    }
}

pub async fn list(channel: Channel, format: Format, filters: Filters) -> Result<()> {
    let request = pb::ListAuditRequest {
        device: filters.device.unwrap_or_default(),
        kind: filters.kind.unwrap_or_default(),
        since: filters.since.map(ago),
        until: filters.until.map(ago),
        ..Default::default()
    };
    let (records, _) = fetch(channel, request).await?;
    let views: Vec<RecordView> = records
        .into_iter()
        .map(|r| RecordView {
            seq: r.seq,
            at: r.at.map(|t| t.to_string()),
            kind: r.kind,
            outcome: r.outcome,
            device_id: r.device_id,
            target: r.target,
            serial: r.serial,
            actor: r.actor,
            proof: r.proof,
            reason: r.reason,
            hash: r.hash,
        })
        .collect();
    print(
        format,
        &views,
        false,
        &[
            "SEQ", "AT", "KIND", "OUTCOME", "SUBJECT", "SERIAL", "ACTOR", "REASON",
        ],
        |r| {
            vec![
                r.seq.to_string(),
                r.at.clone().unwrap_or_default(),
                r.kind.clone(),
                r.outcome.clone(),
                if r.target.is_empty() {
                    format!("device/{}", r.device_id)
                } else {
                    r.target.clone()
                },
                r.serial.clone(),
                r.actor.clone(),
                r.reason.clone(),
            ]
        },
    )
}

/// Verifies the whole trail; fails naming the first record that is not intact.
pub async fn verify(channel: Channel, config: &CtlConfig) -> Result<()> {
    let (records, served_key) = fetch(channel, pb::ListAuditRequest::default()).await?;
    let key_pem = match &config.audit_key_file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the pinned audit key {}", path.display()))?,
        None => {
            eprintln!(
                "warning: no audit_key_file in the flotctl config; verifying with the key the server sent"
            );
            served_key
        }
    };
    let key = spki_der_from_pem(&key_pem).map_err(|e| anyhow!("audit key: {e}"))?;
    let sealed: Vec<SealedRecord> = records.into_iter().map(sealed).collect();
    match verify_chain(&sealed, &key) {
        Ok(count) => {
            println!("audit trail intact: {count} record(s) verified");
            Ok(())
        }
        Err(error) => bail!("audit trail is NOT intact: {error}"),
    }
}

//! `flotctl audit …`: list the audit trail (certificate events and admin calls), export it as JSON
//! lines, sign and save its head, and verify it from its first record with the pinned audit key —
//! from the server or offline from an export, against a head saved earlier.

use crate::output::{Format, print};
use crate::rpc;
use anyhow::{Context, Result, anyhow, bail};
use flotilla::audit::{AuditEntry, SealedRecord, SignedHead, check_head, verify_chain};
use flotilla::profiles::CtlConfig;
use flotilla::proto::admin::v1 as pb;
use flotilla::proto::admin::v1::audit_service_client::AuditServiceClient;
use flotilla::signature::spki_der_from_pem;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::Channel;

const PAGE: u32 = 1000;

/// Filters of `audit list`.
pub(crate) struct Filters {
    pub device: Option<String>,
    pub kind: Option<String>,
    pub actor: Option<String>,
    pub target: Option<String>,
    /// Only records newer than this long ago.
    pub since: Option<Duration>,
    pub until: Option<Duration>,
}

/// Where `audit verify` reads the trail and what it checks it against.
pub(crate) struct VerifyOptions {
    /// An export (`audit export`) to verify offline instead of asking the server.
    pub file: Option<PathBuf>,
    /// A head saved earlier (`audit head --out`): records deleted since are reported.
    pub expect_head: Option<PathBuf>,
    /// The audit public key (PEM) when there is no flotctl config to read it from.
    pub key: Option<PathBuf>,
}

fn ago(duration: Duration) -> prost_types::Timestamp {
    let now = Duration::from_millis(flotilla::clock::now_millis().max(0) as u64);
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

fn rfc3339(ms: i64) -> String {
    flotilla::clock::timestamp_from_millis(ms).to_string()
}

/// One record as exported (one JSON object per line) and as `-o json` shows it: every field the
/// hash covers, the chain fields and the signature in hex, and the device's current name.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct RecordLine {
    pub seq: i64,
    pub at: String,
    pub at_ms: i64,
    pub kind: String,
    pub outcome: String,
    #[serde(default)]
    pub actor: String,
    #[serde(default)]
    pub role: String,
    #[serde(default)]
    pub method: String,
    #[serde(default)]
    pub target: String,
    #[serde(default)]
    pub revision: String,
    #[serde(default)]
    pub device_id: String,
    /// Not part of the record: the device's name when it was exported or listed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub device_name: String,
    #[serde(default)]
    pub serial: String,
    #[serde(default)]
    pub key_fingerprint: String,
    #[serde(default)]
    pub not_before_ms: i64,
    #[serde(default)]
    pub not_after_ms: i64,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub proof: String,
    pub previous_hash: String,
    pub hash: String,
    pub signature: String,
}

impl RecordLine {
    fn from_wire(record: pb::AuditRecord) -> RecordLine {
        let at_ms = millis(record.at.as_ref());
        RecordLine {
            seq: record.seq,
            at: rfc3339(at_ms),
            at_ms,
            kind: record.kind,
            outcome: record.outcome,
            actor: record.actor,
            role: record.role,
            method: record.method,
            target: record.target,
            revision: record.revision,
            device_id: record.device_id,
            device_name: record.device_name,
            serial: record.serial,
            key_fingerprint: record.key_fingerprint,
            not_before_ms: millis(record.not_before.as_ref()),
            not_after_ms: millis(record.not_after.as_ref()),
            reason: record.reason,
            proof: record.proof,
            previous_hash: record.previous_hash,
            hash: record.hash,
            signature: hex::encode(record.signature),
        }
    }

    fn sealed(&self) -> SealedRecord {
        SealedRecord {
            entry: AuditEntry {
                seq: self.seq,
                at_ms: self.at_ms,
                kind: self.kind.clone(),
                device_id: self.device_id.clone(),
                serial: self.serial.clone(),
                key_fingerprint: self.key_fingerprint.clone(),
                not_before_ms: self.not_before_ms,
                not_after_ms: self.not_after_ms,
                actor: self.actor.clone(),
                reason: self.reason.clone(),
                proof: self.proof.clone(),
                outcome: self.outcome.clone(),
                target: self.target.clone(),
                role: self.role.clone(),
                method: self.method.clone(),
                revision: self.revision.clone(),
            },
            previous_hash: self.previous_hash.clone(),
            hash: self.hash.clone(),
            // A signature that is not hex cannot verify; keep its bytes so verification says so.
            signature: hex::decode(&self.signature)
                .unwrap_or_else(|_| self.signature.clone().into_bytes()),
        }
    }

    /// What the record is about, by name where the server knew it.
    fn subject(&self) -> String {
        if !self.target.is_empty() {
            self.target.clone()
        } else if !self.device_name.is_empty() {
            format!("device/{}", self.device_name)
        } else {
            format!("device/{}", self.device_id)
        }
    }
}

/// A signed head as saved to a file by `audit head --out`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct HeadFile {
    pub seq: i64,
    pub hash: String,
    pub at: String,
    pub at_ms: i64,
    pub signature: String,
}

impl HeadFile {
    fn from_wire(head: pb::AuditHead) -> HeadFile {
        let at_ms = millis(head.at.as_ref());
        HeadFile {
            seq: head.seq,
            hash: head.hash,
            at: rfc3339(at_ms),
            at_ms,
            signature: hex::encode(head.signature),
        }
    }

    fn signed(&self) -> SignedHead {
        SignedHead {
            seq: self.seq,
            hash: self.hash.clone(),
            at_ms: self.at_ms,
            signature: hex::decode(&self.signature)
                .unwrap_or_else(|_| self.signature.clone().into_bytes()),
        }
    }
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

pub(crate) async fn list(channel: Channel, format: Format, filters: Filters) -> Result<()> {
    let request = pb::ListAuditRequest {
        device: filters.device.unwrap_or_default(),
        kind: filters.kind.unwrap_or_default(),
        actor: filters.actor.unwrap_or_default(),
        target: filters.target.unwrap_or_default(),
        since: filters.since.map(ago),
        until: filters.until.map(ago),
        ..Default::default()
    };
    let (records, _) = fetch(channel, request).await?;
    let lines: Vec<RecordLine> = records.into_iter().map(RecordLine::from_wire).collect();
    print(
        format,
        &lines,
        false,
        &[
            "SEQ", "AT", "KIND", "OUTCOME", "SUBJECT", "ACTOR", "METHOD", "REVISION", "REASON",
        ],
        |r| {
            vec![
                r.seq.to_string(),
                r.at.clone(),
                r.kind.clone(),
                r.outcome.clone(),
                r.subject(),
                r.actor.clone(),
                r.method.clone(),
                if r.revision.is_empty() {
                    r.serial.clone()
                } else {
                    r.revision.clone()
                },
                r.reason.clone(),
            ]
        },
    )
}

/// Writes the whole trail as JSON lines (to `out`, or stdout), for a SIEM or offline verification.
pub(crate) async fn export(channel: Channel, out: Option<&Path>) -> Result<()> {
    let (records, _) = fetch(channel, pb::ListAuditRequest::default()).await?;
    let mut text = String::new();
    for record in records {
        text.push_str(&serde_json::to_string(&RecordLine::from_wire(record))?);
        text.push('\n');
    }
    match out {
        Some(path) => {
            std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?
        }
        None => std::io::stdout().lock().write_all(text.as_bytes())?,
    }
    Ok(())
}

/// Asks the control plane to sign the chain's head now; prints it or saves it to `out`.
pub(crate) async fn head(channel: Channel, out: Option<&Path>) -> Result<()> {
    let head = AuditServiceClient::new(channel)
        .get_audit_head(pb::GetAuditHeadRequest {})
        .await
        .map_err(rpc)?
        .into_inner();
    let head = HeadFile::from_wire(head);
    let text = serde_json::to_string_pretty(&head)?;
    match out {
        Some(path) => {
            std::fs::write(path, format!("{text}\n"))
                .with_context(|| format!("writing {}", path.display()))?;
            println!(
                "saved the head (record {}, signed {}) to {}",
                head.seq,
                head.at,
                path.display()
            );
        }
        None => println!("{text}"),
    }
    Ok(())
}

fn read_export(path: &Path) -> Result<Vec<RecordLine>> {
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = Vec::new();
    for (number, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let record = serde_json::from_str(&line).map_err(|e| {
            anyhow!(
                "{}:{}: not an audit record: {e}",
                path.display(),
                number + 1
            )
        })?;
        lines.push(record);
    }
    Ok(lines)
}

fn read_head(path: &Path) -> Result<SignedHead> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let head: HeadFile = serde_json::from_str(&text)
        .map_err(|e| anyhow!("{}: not a saved audit head: {e}", path.display()))?;
    Ok(head.signed())
}

/// The key to verify with: `--key`, else the config's pinned key, else (with a warning) the
/// server's.
fn verification_key(
    options: &VerifyOptions,
    config: Option<&CtlConfig>,
    served: Option<String>,
) -> Result<Vec<u8>> {
    let pinned = options
        .key
        .clone()
        .or_else(|| config.and_then(|c| c.audit_key_file.clone()));
    let pem = match (pinned, served) {
        (Some(path), _) => std::fs::read_to_string(&path)
            .with_context(|| format!("reading the pinned audit key {}", path.display()))?,
        (None, Some(served)) => {
            eprintln!(
                "warning: no audit_key_file in the flotctl config; verifying with the key the server sent"
            );
            served
        }
        (None, None) => bail!(
            "no audit key to verify with: give --key FILE (the audit public key, PEM) or a flotctl config with audit_key_file"
        ),
    };
    spki_der_from_pem(&pem).map_err(|e| anyhow!("audit key: {e}"))
}

/// Verifies the whole trail (from the server, or from an export); fails naming the first record
/// that is not intact, or the truncation a saved head shows.
pub(crate) async fn verify(
    channel: Option<Channel>,
    config: Option<&CtlConfig>,
    options: VerifyOptions,
) -> Result<()> {
    let (records, served_key, kept_heads) = match (&options.file, channel) {
        (Some(path), _) => (read_export(path)?, None, Vec::new()),
        (None, Some(channel)) => {
            let (records, key) = fetch(channel.clone(), pb::ListAuditRequest::default()).await?;
            let heads = AuditServiceClient::new(channel)
                .list_audit_heads(pb::ListAuditHeadsRequest { limit: 1 })
                .await
                .map_err(rpc)?
                .into_inner()
                .heads;
            (
                records.into_iter().map(RecordLine::from_wire).collect(),
                Some(key),
                heads,
            )
        }
        (None, None) => bail!("nothing to verify: give --file or a flotctl config"),
    };
    let key = verification_key(&options, config, served_key)?;
    let sealed: Vec<SealedRecord> = records.iter().map(RecordLine::sealed).collect();
    let count = match verify_chain(&sealed, &key) {
        Ok(count) => count,
        Err(error) => bail!("audit trail is NOT intact: {error}"),
    };
    if let Some(path) = &options.expect_head {
        let head = read_head(path)?;
        if let Err(error) = check_head(&sealed, &head, &key) {
            bail!("audit trail is NOT intact: {error}");
        }
        println!(
            "the saved head (record {}) is in the trail, unchanged",
            head.seq
        );
    }
    // The newest head the control plane kept: deleting records after it shows as well.
    if let Some(kept) = kept_heads.into_iter().next() {
        let kept = HeadFile::from_wire(kept).signed();
        if let Err(error) = check_head(&sealed, &kept, &key) {
            bail!("audit trail is NOT intact (against the head the control plane kept): {error}");
        }
    }
    println!("audit trail intact: {count} record(s) verified");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exported_line_keeps_every_hashed_field() {
        let line = RecordLine {
            seq: 3,
            at: rfc3339(1_000),
            at_ms: 1_000,
            kind: "apply".into(),
            outcome: "ok".into(),
            actor: "operator/alice".into(),
            role: "operator".into(),
            method: "FleetService/ApplyFleet".into(),
            target: "fleet/web".into(),
            revision: "2".into(),
            device_id: String::new(),
            device_name: String::new(),
            serial: String::new(),
            key_fingerprint: String::new(),
            not_before_ms: 0,
            not_after_ms: 0,
            reason: String::new(),
            proof: String::new(),
            previous_hash: "00".into(),
            hash: "ab".into(),
            signature: "cd".into(),
        };
        let text = serde_json::to_string(&line).unwrap();
        let back: RecordLine = serde_json::from_str(&text).unwrap();
        assert_eq!(back, line);
        assert_eq!(back.sealed().entry, line.sealed().entry);
        assert_eq!(back.sealed().signature, vec![0xcd]);
    }
}

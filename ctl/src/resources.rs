//! The resource documents `flotctl` reads (`apply -f`) and prints (`get -o json|yaml`), in the
//! familiar `kind` / `metadata` / `spec` / `status` shape, and their conversion from the API.

use anyhow::{Context, Result, bail};
use flotilla::proto::admin::v1 as admin;
use flotilla::proto::agent::v1 as agent;
use flotilla::spec::DeviceSpec;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Absent in an applied document: keep the device's labels as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
}

/// A document as written by a user: `kind: Device` with metadata and spec.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    #[serde(default, rename = "apiVersion")]
    pub api_version: Option<String>,
    pub kind: String,
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: DeviceSpec,
    /// Accepted (so `get -o yaml` output can be re-applied) and ignored.
    #[serde(default)]
    pub status: Option<serde_json::Value>,
}

/// Parses every document of a YAML (or JSON) file.
pub fn parse_documents(text: &str) -> Result<Vec<Document>> {
    let mut documents = Vec::new();
    for (index, de) in yaml_serde::Deserializer::from_str(text).enumerate() {
        let value = yaml_serde::Value::deserialize(de)
            .with_context(|| format!("document {} is not valid YAML", index + 1))?;
        if value.is_null() {
            continue;
        }
        let document: Document = yaml_serde::from_value(value)
            .with_context(|| format!("document {} is not a valid resource", index + 1))?;
        match document.kind.as_str() {
            "Device" => {}
            other => bail!(
                "document {}: unknown kind {other:?} (expected Device)",
                index + 1
            ),
        }
        documents.push(document);
    }
    if documents.is_empty() {
        bail!("the file holds no resources");
    }
    Ok(documents)
}

#[derive(Debug, Clone, Serialize)]
pub struct DeviceStatusView {
    pub online: bool,
    pub sync_state: String,
    pub desired_version: String,
    pub sent_version: String,
    pub acked_version: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub last_error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    pub agent_version: String,
    pub certificate_serial: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate_not_after: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeviceView {
    pub kind: &'static str,
    pub metadata: Metadata,
    pub spec: DeviceSpec,
    pub status: DeviceStatusView,
}

fn state_name(state: i32) -> String {
    admin::SyncState::try_from(state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("SYNC_STATE_")
                .to_string()
        })
        .unwrap_or_else(|_| "UNKNOWN".into())
}

pub fn device_view(device: admin::Device) -> DeviceView {
    let status = device.status.unwrap_or_default();
    DeviceView {
        kind: "Device",
        metadata: Metadata {
            name: device.name,
            id: Some(device.id),
            labels: Some(device.labels),
            created_at: device.created_at.map(|t| t.to_string()),
        },
        spec: device.spec.unwrap_or_default().into(),
        status: DeviceStatusView {
            online: status.online,
            sync_state: state_name(status.sync_state),
            desired_version: status.desired_version,
            sent_version: status.sent_version,
            acked_version: status.acked_version,
            last_error: status.last_error,
            last_seen: status.last_seen.map(|t| t.to_string()),
            agent_version: status.agent_version,
            certificate_serial: status.certificate_serial,
            certificate_not_after: status.certificate_not_after.map(|t| t.to_string()),
        },
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EnrollmentView {
    pub name: String,
    pub state: String,
    pub labels: BTreeMap<String, String>,
    pub key_fingerprint: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub device_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    pub hostname: String,
    pub agent_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub decided_by: String,
}

pub fn enrollment_view(enrollment: admin::Enrollment) -> EnrollmentView {
    let info = enrollment.system_info.unwrap_or_default();
    EnrollmentView {
        state: agent::EnrollmentState::try_from(enrollment.state)
            .map(|s| {
                s.as_str_name()
                    .trim_start_matches("ENROLLMENT_STATE_")
                    .to_string()
            })
            .unwrap_or_else(|_| "UNKNOWN".into()),
        name: enrollment.name,
        labels: enrollment.labels,
        key_fingerprint: enrollment.key_fingerprint,
        device_id: enrollment.device_id,
        reason: enrollment.reason,
        hostname: info.hostname,
        agent_version: info.agent_version,
        created_at: enrollment.created_at.map(|t| t.to_string()),
        decided_at: enrollment.decided_at.map(|t| t.to_string()),
        decided_by: enrollment.decided_by,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_multi_document_yaml_with_octal_modes() {
        let docs = parse_documents(
            "kind: Device\nmetadata:\n  name: a\nspec:\n  files:\n    - path: /etc/motd\n      content: hi\n      mode: \"0600\"\n---\nkind: Device\nmetadata:\n  name: b\n  labels: {site: berlin}\n",
        )
        .unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].spec.files[0].mode, 0o600);
        assert_eq!(docs[0].metadata.labels, None);
        assert_eq!(docs[1].metadata.labels.as_ref().unwrap()["site"], "berlin");
    }

    #[test]
    fn malformed_documents_are_clear_errors() {
        let err = |text: &str| format!("{:#}", parse_documents(text).unwrap_err());
        assert!(err("kind: Device\nmetadata: [").contains("not valid YAML"));
        assert!(err("kind: Fleet\nmetadata: {name: a}\n").contains("unknown kind"));
        assert!(err("kind: Device\nmetadata: {name: a}\nspec: {filez: []}\n").contains("filez"));
        assert!(err("").contains("no resources"));
    }
}

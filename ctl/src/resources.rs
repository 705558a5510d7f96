//! The resource documents `flotctl` reads (`apply -f`) and prints (`get -o json|yaml`), in the
//! familiar `kind` / `metadata` / `spec` / `status` shape, and their conversion from the API.

use anyhow::{Context, Result, bail};
use flotilla::proto::admin::v1 as admin;
use flotilla::proto::agent::v1 as agent;
use flotilla::rollout::RolloutSpec;
use flotilla::spec::DeviceSpec;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Absent in an applied document: keep the device's labels as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
}

/// A fleet's spec as written in a document.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct FleetSpec {
    /// Label selector, e.g. `site=berlin,tier!=canary`.
    #[serde(default)]
    pub selector: String,
    #[serde(default, skip_serializing_if = "FleetDefaults::is_empty")]
    pub defaults: FleetDefaults,
    #[serde(default)]
    pub template: DeviceSpec,
    /// How new revisions reach the devices; without it, all at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FleetDefaults {
    /// Values the template sees for labels a device lacks.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl FleetDefaults {
    fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// A resource as written by a user.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Resource {
    Device {
        metadata: Metadata,
        spec: DeviceSpec,
    },
    Fleet {
        metadata: Metadata,
        spec: FleetSpec,
    },
}

/// A Device document. What `get -o yaml` prints besides metadata and spec (status, fleet,
/// conflicts, the rendered spec) is accepted and ignored, so its output can be applied again.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DeviceDocument {
    #[serde(default, rename = "apiVersion")]
    _api_version: Option<String>,
    #[serde(rename = "kind")]
    _kind: String,
    metadata: Metadata,
    #[serde(default)]
    spec: DeviceSpec,
    #[serde(default, rename = "status")]
    _status: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "fleet")]
    _fleet: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "conflictingFleets")]
    _conflicting_fleets: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "renderedSpec")]
    _rendered_spec: Option<serde::de::IgnoredAny>,
}

/// A Fleet document (its printed status ignored).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FleetDocument {
    #[serde(default, rename = "apiVersion")]
    _api_version: Option<String>,
    #[serde(rename = "kind")]
    _kind: String,
    metadata: Metadata,
    #[serde(default)]
    spec: FleetSpec,
    #[serde(default, rename = "status")]
    _status: Option<serde::de::IgnoredAny>,
}

/// The kind a document says it is (`List` holds others in `items`).
fn kind_of(value: &yaml_serde::Value) -> Option<&str> {
    value.get("kind").and_then(yaml_serde::Value::as_str)
}

/// One resource from a document that says it is a Device or a Fleet.
fn resource<'de, D: serde::Deserializer<'de>>(kind: &str, de: D) -> Result<Resource>
where
    D::Error: Send + Sync + 'static,
{
    Ok(match kind {
        "Device" => {
            let document = DeviceDocument::deserialize(de)?;
            Resource::Device {
                metadata: document.metadata,
                spec: document.spec,
            }
        }
        "Fleet" => {
            let document = FleetDocument::deserialize(de)?;
            Resource::Fleet {
                metadata: document.metadata,
                spec: document.spec,
            }
        }
        other => bail!("unknown kind {other:?} (expected Device, Fleet or List)"),
    })
}

/// The resources of a list (a `kind: List` document's `items`, or a YAML sequence: what
/// `get devices -o yaml` prints).
fn list_items(items: &[yaml_serde::Value], number: usize) -> Result<Vec<Resource>> {
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let kind = kind_of(item).unwrap_or_default();
            resource(kind, item.clone())
                .with_context(|| format!("document {number}, item {}", i + 1))
        })
        .collect()
}

/// Parses every document of a YAML (or JSON) file. A document's errors name its line and column.
pub(crate) fn parse_documents(text: &str) -> Result<Vec<Resource>> {
    // First what each document is, then each parsed as its kind straight from the text, so an
    // error carries its position.
    let values = yaml_serde::Deserializer::from_str(text)
        .enumerate()
        .map(|(index, de)| {
            yaml_serde::Value::deserialize(de)
                .with_context(|| format!("document {} is not valid YAML", index + 1))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut documents = Vec::new();
    for ((index, de), value) in yaml_serde::Deserializer::from_str(text)
        .enumerate()
        .zip(&values)
    {
        let number = index + 1;
        match value {
            yaml_serde::Value::Null => continue,
            yaml_serde::Value::Sequence(items) => documents.extend(list_items(items, number)?),
            _ => match kind_of(value) {
                None => bail!("document {number} has no kind (Device, Fleet or List)"),
                Some("List") => {
                    let items = value
                        .get("items")
                        .and_then(yaml_serde::Value::as_sequence)
                        .with_context(|| format!("document {number} (List) has no items"))?;
                    documents.extend(list_items(items, number)?);
                }
                Some(kind) => documents.push(
                    resource(kind, de).with_context(|| format!("document {number} ({kind})"))?,
                ),
            },
        }
    }
    if documents.is_empty() {
        bail!("the file holds no resources");
    }
    Ok(documents)
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct DeviceStatusView {
    pub online: bool,
    pub sync_state: String,
    pub desired_version: String,
    pub sent_version: String,
    pub acked_version: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub last_error: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub render_error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    pub agent_version: String,
    pub certificate_serial: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate_not_after: Option<String>,
    pub renewal_state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub renew_at: Option<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub renewal_error: String,
    /// The endorsement key of the TPM the device's key was attested in, if it was.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub tpm_ek_fingerprint: String,
    /// The control-plane replica that holds the device's session.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub session_replica: String,
    /// Healthy, Degraded, Error, Offline or Unknown (from the conditions).
    pub summary: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<crate::status::ConditionView>,
    #[serde(flatten)]
    pub report: crate::status::ReportView,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct DeviceView {
    pub kind: &'static str,
    pub metadata: Metadata,
    pub spec: DeviceSpec,
    pub status: DeviceStatusView,
    #[serde(flatten)]
    pub fleet: DeviceFleetView,
}

/// Where a device stands with respect to fleets, and what it should run.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DeviceFleetView {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub fleet: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub conflicting_fleets: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rendered_spec: Option<DeviceSpec>,
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

pub(crate) fn device_view(device: admin::Device) -> DeviceView {
    let fleet = DeviceFleetView {
        fleet: device.fleet,
        conflicting_fleets: device.conflicting_fleets,
        rendered_spec: device.rendered_spec.map(DeviceSpec::from),
    };
    let status = device.status.unwrap_or_default();
    let report = crate::status::report(&status);
    let conditions = crate::status::conditions(&status);
    DeviceView {
        fleet,
        kind: "Device",
        metadata: Metadata {
            name: device.name,
            id: Some(device.id),
            labels: Some(device.labels.into_iter().collect()),
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
            render_error: status.render_error,
            last_seen: status.last_seen.map(|t| t.to_string()),
            agent_version: status.agent_version,
            certificate_serial: status.certificate_serial,
            certificate_not_after: status.certificate_not_after.map(|t| t.to_string()),
            renewal_state: admin::RenewalState::try_from(status.renewal_state)
                .map(|s| {
                    s.as_str_name()
                        .trim_start_matches("RENEWAL_STATE_")
                        .to_string()
                })
                .unwrap_or_else(|_| "UNKNOWN".into()),
            renew_at: status.renew_at.map(|t| t.to_string()),
            renewal_error: status.renewal_error,
            tpm_ek_fingerprint: device.tpm_ek_fingerprint,
            session_replica: status.session_replica,
            summary: crate::status::summary_name(status.summary),
            conditions,
            report,
        },
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct FleetStatusView {
    pub revision: i64,
    pub devices: Vec<String>,
    pub synced: u32,
    pub pending: u32,
    pub error: u32,
    pub offline: u32,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub conflicts: BTreeMap<String, Vec<String>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub render_failures: BTreeMap<String, String>,
    /// Members by status summary.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub summaries: BTreeMap<String, u32>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct FleetView {
    pub kind: &'static str,
    pub metadata: Metadata,
    pub spec: FleetSpec,
    pub status: FleetStatusView,
}

pub(crate) fn fleet_view(fleet: admin::Fleet) -> FleetView {
    let status = fleet.status.unwrap_or_default();
    FleetView {
        kind: "Fleet",
        metadata: Metadata {
            name: fleet.name,
            id: None,
            labels: None,
            created_at: fleet.created_at.map(|t| t.to_string()),
        },
        spec: FleetSpec {
            selector: fleet.selector,
            defaults: FleetDefaults {
                labels: fleet.label_defaults.into_iter().collect(),
            },
            template: fleet.template.unwrap_or_default().into(),
            rollout: fleet.rollout.map(RolloutSpec::from),
        },
        status: FleetStatusView {
            revision: fleet.revision,
            devices: status.devices,
            synced: status.synced,
            pending: status.pending,
            error: status.error,
            offline: status.offline,
            conflicts: status
                .conflicts
                .into_iter()
                .map(|c| (c.device, c.fleets))
                .collect(),
            render_failures: status
                .render_failures
                .into_iter()
                .map(|f| (f.device, f.reason))
                .collect(),
            summaries: status.summaries.into_iter().collect(),
        },
    }
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct EnrollmentView {
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
    /// Set when the key was proven to live in a genuine TPM.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub tpm_ek_fingerprint: String,
    /// Other requests and devices attested by the same TPM.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub same_tpm_as: Vec<String>,
    /// The enrollment credential the request came with.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub credential: String,
    /// Where the request came from.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub source_address: String,
}

pub(crate) fn enrollment_view(enrollment: admin::Enrollment) -> EnrollmentView {
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
        labels: enrollment.labels.into_iter().collect(),
        key_fingerprint: enrollment.key_fingerprint,
        device_id: enrollment.device_id,
        reason: enrollment.reason,
        hostname: info.hostname,
        agent_version: info.agent_version,
        created_at: enrollment.created_at.map(|t| t.to_string()),
        decided_at: enrollment.decided_at.map(|t| t.to_string()),
        decided_by: enrollment.decided_by,
        tpm_ek_fingerprint: enrollment.tpm_ek_fingerprint,
        same_tpm_as: enrollment.same_tpm_as,
        credential: enrollment.credential,
        source_address: enrollment.source_address,
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
        let Resource::Device { metadata, spec } = &docs[0] else {
            panic!("not a device: {docs:?}");
        };
        assert_eq!(spec.files[0].mode, 0o600);
        assert_eq!(metadata.labels, None);
        let Resource::Device { metadata, .. } = &docs[1] else {
            panic!("not a device: {docs:?}");
        };
        assert_eq!(metadata.labels.as_ref().unwrap()["site"], "berlin");
    }

    #[test]
    fn parses_fleets_with_templates_and_defaults() {
        let docs = parse_documents(
            "kind: Fleet\nmetadata: {name: web}\nspec:\n  selector: role=web\n  defaults: {labels: {site: lab}}\n  template:\n    files:\n      - path: /etc/site\n        content: \"{{ device.labels.site }}\"\n    units:\n      - {name: web.service, enabled: true, state: started, restartOnChange: [/etc/site]}\n",
        )
        .unwrap();
        let Resource::Fleet { metadata, spec } = &docs[0] else {
            panic!("not a fleet: {docs:?}");
        };
        assert_eq!(metadata.name, "web");
        assert_eq!(spec.selector, "role=web");
        assert_eq!(spec.defaults.labels["site"], "lab");
        assert_eq!(spec.template.files[0].content, "{{ device.labels.site }}");
        assert_eq!(spec.template.units[0].restart_on_change, ["/etc/site"]);
    }

    #[test]
    fn what_get_prints_applies_again_as_a_list() {
        let device = "kind: Device\nmetadata: {name: a, id: x, labels: {site: b}, created_at: t}\nspec: {files: [{path: /etc/a, content: x}]}\nstatus: {online: true, sync_state: SYNCED}\nfleet: web\nconflictingFleets: [x]\nrenderedSpec: {files: []}\n";
        assert_eq!(parse_documents(device).unwrap().len(), 1);
        let sequence = format!("- {}", device.replace('\n', "\n  "));
        assert_eq!(parse_documents(&sequence).unwrap().len(), 1);
        let list = "kind: List\nitems:\n  - {kind: Fleet, metadata: {name: web}, spec: {selector: a=b}, status: {revision: 2}}\n  - {kind: Device, metadata: {name: d}}\n";
        let docs = parse_documents(list).unwrap();
        assert!(
            matches!(docs[0], Resource::Fleet { .. }) && matches!(docs[1], Resource::Device { .. })
        );
        let bad = format!(
            "{:#}",
            parse_documents(
                "kind: List\nitems:\n  - {kind: Device, metadata: {name: d}, spek: {}}\n"
            )
            .unwrap_err()
        );
        assert!(bad.contains("item 1") && bad.contains("spek"), "{bad}");
    }

    proptest::proptest! {
        /// Whatever text `apply -f` is given, parsing answers: documents, or an error.
        #[test]
        fn arbitrary_text_parses_or_is_refused(text in "\\PC{0,200}") {
            let _ = parse_documents(&text);
        }

        /// A valid document with bytes changed, dropped or repeated parses or is refused cleanly.
        #[test]
        fn damaged_documents_parse_or_are_refused(
            edits in proptest::collection::vec((0usize..400, 0u8..3, proptest::char::any()), 1..8),
        ) {
            let mut text: Vec<char> = "kind: Fleet\nmetadata: {name: web, labels: {a: b}}\nspec:\n  selector: role=web\n  defaults: {labels: {site: lab}}\n  template:\n    files:\n      - path: /etc/site\n        content: \"{{ device.labels.site }}\"\n        mode: \"0640\"\n---\nkind: Device\nmetadata: {name: a}\nspec: {files: []}\n".chars().collect();
            for (at, how, c) in edits {
                let at = at % (text.len() + 1);
                match how {
                    0 => text.insert(at, c),
                    1 if at < text.len() => { text.remove(at); }
                    _ => {
                        let tail: Vec<char> = text[at..].iter().take(20).copied().collect();
                        text.splice(at..at, tail);
                    }
                }
            }
            let _ = parse_documents(&text.into_iter().collect::<String>());
        }
    }

    #[test]
    fn malformed_documents_are_clear_errors() {
        let err = |text: &str| format!("{:#}", parse_documents(text).unwrap_err());
        assert!(err("kind: Device\nmetadata: [").contains("not valid YAML"));
        assert!(err("kind: Fleat\nmetadata: {name: a}\n").contains("unknown kind"));
        // Where it went wrong: line and column of the unknown field.
        let located = err(
            "kind: Device\nmetadata:\n  name: a\nspec:\n  files:\n    - path: /x\n      contnet: y\n",
        );
        assert!(
            located.contains("contnet") && located.contains("line 7"),
            "{located}"
        );
        assert!(err("kind: Device\nmetadata: {name: a}\nspec: {filez: []}\n").contains("filez"));
        assert!(err("kind: Fleet\nmetadata: {name: a}\nspec: {selectr: x}\n").contains("selectr"));
        assert!(err("").contains("no resources"));
    }
}

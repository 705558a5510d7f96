//! `flotctl` enrollment commands: list, show, approve, deny.

use crate::output::{Format, print};
use crate::{labels_text, resources, rpc};
use anyhow::{Result, anyhow};
use flotilla::proto::admin::v1 as pb;
use flotilla::proto::admin::v1::enrollment_service_client::EnrollmentServiceClient;
use flotilla::proto::agent::v1::EnrollmentState;
use tonic::transport::Channel;

fn print_enrollments(format: Format, enrollments: Vec<pb::Enrollment>, single: bool) -> Result<()> {
    let views: Vec<_> = enrollments
        .into_iter()
        .map(resources::enrollment_view)
        .collect();
    print(
        format,
        &views,
        single,
        &[
            "NAME",
            "STATE",
            "KEY",
            "SOURCE",
            "CREDENTIAL",
            "HOSTNAME",
            "TPM",
            "LABELS",
            "CREATED",
        ],
        |e| {
            vec![
                e.name.clone(),
                e.state.clone(),
                // The agent prints the same prefix at start, for comparing before approving.
                short_fingerprint(&e.key_fingerprint),
                e.source_address.clone(),
                e.credential.clone(),
                e.hostname.clone(),
                tpm_text(e),
                labels_text(&e.labels),
                e.created_at.clone().unwrap_or_default(),
            ]
        },
    )
}

/// The first 16 hex digits of a key fingerprint (`-o json` shows it whole).
fn short_fingerprint(fingerprint: &str) -> String {
    fingerprint.chars().take(16).collect()
}

/// `verified`, with a warning when the same TPM enrolled under other names; `-` without a TPM.
fn tpm_text(view: &resources::EnrollmentView) -> String {
    match (
        view.tpm_ek_fingerprint.is_empty(),
        view.same_tpm_as.is_empty(),
    ) {
        (true, _) => "-".into(),
        (false, true) => "verified".into(),
        (false, false) => format!("verified, same TPM as {}", view.same_tpm_as.join(",")),
    }
}

fn parse_state(text: &str) -> Result<EnrollmentState> {
    EnrollmentState::from_str_name(&format!("ENROLLMENT_STATE_{}", text.to_uppercase()))
        .filter(|s| *s != EnrollmentState::Unspecified)
        .ok_or_else(|| anyhow!("unknown state {text:?}: use pending, approved or denied"))
}

pub(crate) async fn list(channel: Channel, format: Format, state: Option<String>) -> Result<()> {
    let state = state
        .as_deref()
        .map(parse_state)
        .transpose()?
        .unwrap_or(EnrollmentState::Unspecified);
    let enrollments = EnrollmentServiceClient::new(channel)
        .list_enrollments(pb::ListEnrollmentsRequest {
            state: state as i32,
        })
        .await
        .map_err(rpc)?
        .into_inner()
        .enrollments;
    print_enrollments(format, enrollments, false)
}

pub(crate) async fn get(channel: Channel, format: Format, name: String) -> Result<()> {
    let enrollment = EnrollmentServiceClient::new(channel)
        .get_enrollment(pb::GetEnrollmentRequest { name })
        .await
        .map_err(rpc)?
        .into_inner();
    print_enrollments(format, vec![enrollment], true)
}

pub(crate) async fn approve(
    channel: Channel,
    format: Format,
    name: String,
    labels: Vec<(String, String)>,
) -> Result<()> {
    let enrollment = EnrollmentServiceClient::new(channel)
        .approve_enrollment(pb::ApproveEnrollmentRequest {
            name,
            labels: labels.into_iter().collect(),
        })
        .await
        .map_err(rpc)?
        .into_inner();
    print_enrollments(format, vec![enrollment], true)
}

/// Approves every pending request whose requested labels match `selector` ("" matches all),
/// giving each `labels`; says which it approved and fails if one could not be.
pub(crate) async fn approve_matching(
    channel: Channel,
    format: Format,
    selector: &str,
    labels: Vec<(String, String)>,
) -> Result<()> {
    let selector = flotilla::selector::Selector::parse(selector)
        .map_err(|e| anyhow!("selector {selector:?}: {e}"))?;
    let mut client = EnrollmentServiceClient::new(channel);
    let pending = client
        .list_enrollments(pb::ListEnrollmentsRequest {
            state: EnrollmentState::Pending as i32,
        })
        .await
        .map_err(rpc)?
        .into_inner()
        .enrollments;
    let mut approved = Vec::new();
    let mut failed = Vec::new();
    for request in pending
        .into_iter()
        .filter(|r| selector.matches(&r.labels.clone().into_iter().collect()))
    {
        match client
            .approve_enrollment(pb::ApproveEnrollmentRequest {
                name: request.name.clone(),
                labels: labels.iter().cloned().collect(),
            })
            .await
        {
            Ok(response) => approved.push(response.into_inner()),
            Err(status) => failed.push(format!("{}: {}", request.name, rpc(status))),
        }
    }
    if approved.is_empty() && failed.is_empty() {
        eprintln!("no pending enrollment request matches");
    }
    print_enrollments(format, approved, false)?;
    if failed.is_empty() {
        Ok(())
    } else {
        Err(anyhow!("not approved: {}", failed.join("; ")))
    }
}

/// Deletes a pending or denied request so its name can enroll again.
pub(crate) async fn delete(channel: Channel, name: String) -> Result<()> {
    EnrollmentServiceClient::new(channel)
        .delete_enrollment(pb::DeleteEnrollmentRequest { name: name.clone() })
        .await
        .map_err(rpc)?;
    println!("enrollment/{name} deleted");
    Ok(())
}

pub(crate) async fn deny(
    channel: Channel,
    format: Format,
    name: String,
    reason: String,
) -> Result<()> {
    let enrollment = EnrollmentServiceClient::new(channel)
        .deny_enrollment(pb::DenyEnrollmentRequest { name, reason })
        .await
        .map_err(rpc)?
        .into_inner();
    print_enrollments(format, vec![enrollment], true)
}

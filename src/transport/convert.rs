//! Conversions between domain records and their protobuf messages, for the server: records of the
//! admin API here, the session's messages in `session`. Those the agent and flotctl share (specs,
//! status reports, rollout policies) are in `crate::wire`.

pub mod session;

use crate::audit::{SealedRecord, SignedHead};
use crate::authz::ServiceGrant;
use crate::clock::timestamp_from_millis;
use crate::control::{
    CertificateView, ControlError, CredentialView, DeviceEvent, DeviceView, EnrollOutcome,
    FleetView, IssuedCredential, ReleaseView, RolloutView, TpmProof,
};
use crate::hub::RenewalState;
use crate::hub::SyncState;
use crate::identity::{Identity, Role};
use crate::proto::admin::v1 as admin;
use crate::proto::agent::v1 as agent;
use crate::status::conditions::Condition;
use crate::store::{EnrollmentRecord, EnrollmentState, FleetRevision, SystemInfo};
use crate::tpm::Evidence;

/// An enrollment state on the wire.
pub fn enrollment_state(state: EnrollmentState) -> agent::EnrollmentState {
    match state {
        EnrollmentState::Pending => agent::EnrollmentState::Pending,
        EnrollmentState::Approved => agent::EnrollmentState::Approved,
        EnrollmentState::Denied => agent::EnrollmentState::Denied,
    }
}

/// `None` for UNSPECIFIED (meaning "any").
pub fn enrollment_state_filter(state: agent::EnrollmentState) -> Option<EnrollmentState> {
    match state {
        agent::EnrollmentState::Unspecified => None,
        agent::EnrollmentState::Pending => Some(EnrollmentState::Pending),
        agent::EnrollmentState::Approved => Some(EnrollmentState::Approved),
        agent::EnrollmentState::Denied => Some(EnrollmentState::Denied),
    }
}

/// System information as the agent sent it (missing: empty).
pub fn system_info_from(info: Option<agent::SystemInfo>) -> SystemInfo {
    let info = info.unwrap_or_default();
    SystemInfo {
        hostname: info.hostname,
        os: info.os,
        arch: info.arch,
        agent_version: info.agent_version,
        boot_id: info.boot_id,
    }
}

fn system_info_to(info: SystemInfo) -> agent::SystemInfo {
    agent::SystemInfo {
        hostname: info.hostname,
        os: info.os,
        arch: info.arch,
        agent_version: info.agent_version,
        boot_id: info.boot_id,
    }
}

/// The TPM step of an enrollment request, if it has one.
pub fn tpm_proof(
    evidence: Option<agent::TpmEvidence>,
    answer: Option<agent::TpmChallengeAnswer>,
) -> Option<TpmProof> {
    match (evidence, answer) {
        (_, Some(answer)) => Some(TpmProof::Answer {
            challenge_id: answer.challenge_id,
            secret: answer.secret,
        }),
        (Some(e), None) => Some(TpmProof::Evidence(Evidence {
            ek_certificate_der: e.ek_certificate,
            ek_public: e.ek_public,
            ak_public: e.ak_public,
            key_public: e.key_public,
            certify_info: e.certify_info,
            certify_signature: e.certify_signature,
        })),
        (None, None) => None,
    }
}

/// The answer to an enrollment request.
pub fn enroll_response(outcome: EnrollOutcome) -> agent::EnrollResponse {
    let (certificate_pem, not_after) = match outcome.certificate {
        Some(cert) => (
            cert.certificate_pem,
            Some(timestamp_from_millis(cert.not_after_ms)),
        ),
        None => (String::new(), None),
    };
    agent::EnrollResponse {
        state: enrollment_state(outcome.state) as i32,
        reason: outcome.reason.unwrap_or_default(),
        device_id: outcome.device_id.unwrap_or_default(),
        certificate_pem,
        ca_bundle_pem: outcome.ca_pem,
        retry_after_seconds: outcome.retry_after_secs,
        certificate_not_after: not_after,
        tpm_challenge: outcome.tpm_challenge.map(|c| agent::TpmChallenge {
            challenge_id: c.id,
            credential_blob: c.credential.credential_blob,
            encrypted_secret: c.credential.encrypted_secret,
        }),
        tpm_verified: outcome.tpm_verified,
    }
}

/// An enrollment request on the wire.
pub fn enrollment(record: EnrollmentRecord) -> admin::Enrollment {
    admin::Enrollment {
        name: record.name,
        state: enrollment_state(record.state) as i32,
        labels: record.labels,
        system_info: Some(system_info_to(record.system_info)),
        key_fingerprint: record.key_fingerprint,
        device_id: record.device_id.unwrap_or_default(),
        reason: record.reason.unwrap_or_default(),
        created_at: Some(timestamp_from_millis(record.created_ms)),
        decided_at: record.decided_ms.map(timestamp_from_millis),
        decided_by: record.decided_by.unwrap_or_default(),
        tpm_ek_fingerprint: record.tpm_ek_fingerprint.unwrap_or_default(),
        same_tpm_as: record.same_tpm_as,
        credential: record.credential,
        source_address: record.source_address,
    }
}

fn sync_state(state: SyncState) -> admin::SyncState {
    match state {
        SyncState::Synced => admin::SyncState::Synced,
        SyncState::Pending => admin::SyncState::Pending,
        SyncState::Error => admin::SyncState::Error,
        SyncState::Offline => admin::SyncState::Offline,
        SyncState::Revoked => admin::SyncState::Revoked,
    }
}

/// A device on the wire, status included.
pub fn device(view: DeviceView) -> admin::Device {
    let record = view.record;
    let mut status = admin::DeviceStatus {
        online: false,
        sync_state: admin::SyncState::Offline as i32,
        acked_version: record.acked_version.clone().unwrap_or_default(),
        last_error: record
            .nacked
            .as_ref()
            .map(|(_, e)| e.clone())
            .unwrap_or_default(),
        last_seen: record.last_seen_ms.map(timestamp_from_millis),
        agent_version: record.agent_version.unwrap_or_default(),
        certificate_serial: record.cert_serial.unwrap_or_default(),
        certificate_not_after: record.cert_not_after_ms.map(timestamp_from_millis),
        ..Default::default()
    };
    status.session_replica = view.session_replica.unwrap_or_default();
    if let Some(live) = view.status {
        status.online = live.online;
        status.sync_state = sync_state(live.state) as i32;
        status.desired_version = live.desired_version;
        status.sent_version = live.sent_version.unwrap_or_default();
        status.acked_version = live.acked_version.unwrap_or_default();
        status.last_error = live.last_error.unwrap_or_default();
        status.render_error = live.render_error.unwrap_or_default();
        if let Some(cert) = live.certificate {
            status.renewal_state = renewal_state(cert.state) as i32;
            status.renewal_error = cert.last_error.unwrap_or_default();
            status.renew_at = Some(timestamp_from_millis(cert.renew_at_ms));
            status.certificate_serial = cert.serial;
            status.certificate_not_after = Some(timestamp_from_millis(cert.not_after_ms));
        }
        status.last_seen = live
            .last_seen_ms
            .map(timestamp_from_millis)
            .or(status.last_seen);
        if let Some(report) = live.report.as_deref() {
            status.system_info = report.system_info.clone().map(Into::into);
            status.resources = report.resources.clone().map(Into::into);
            status.alerts = report.alerts.iter().cloned().map(Into::into).collect();
            status.reported_at = Some(timestamp_from_millis(report.reported_ms));
            status.drift = report.drift.clone().map(Into::into);
            status.workloads = report
                .workloads
                .iter()
                .flatten()
                .cloned()
                .map(Into::into)
                .collect();
            status.update = report.update.clone().map(Into::into);
        }
        status.conditions = live.conditions.into_iter().map(condition).collect();
        status.summary = admin::DeviceSummary::from(live.summary) as i32;
    }
    admin::Device {
        id: record.id,
        name: record.name,
        labels: record.labels.into_iter().collect(),
        spec: Some(record.spec.into()),
        status: Some(status),
        created_at: Some(timestamp_from_millis(record.created_ms)),
        fleet: record.fleet.unwrap_or_default(),
        conflicting_fleets: view.conflicts,
        rendered_spec: view.rendered.map(|r| r.spec.clone().into()),
        tpm_ek_fingerprint: record.tpm_ek_fingerprint.unwrap_or_default(),
    }
}

/// A watch event on the wire.
pub fn device_event(event: DeviceEvent) -> admin::DeviceEvent {
    use admin::device_event::Type;
    let (kind, device) = match event {
        DeviceEvent::Added(view) => (Type::Added, Some(device(view))),
        DeviceEvent::Modified(view) => (Type::Modified, Some(device(view))),
        DeviceEvent::Deleted { id, name } => (
            Type::Deleted,
            Some(admin::Device {
                id,
                name,
                ..Default::default()
            }),
        ),
        DeviceEvent::Synced => (Type::Synced, None),
    };
    admin::DeviceEvent {
        r#type: kind as i32,
        device,
    }
}

fn condition(c: Condition) -> admin::Condition {
    admin::Condition {
        r#type: c.kind.as_str().to_string(),
        status: admin::ConditionStatus::from(c.status) as i32,
        reason: c.reason.to_string(),
        message: c.message,
        last_transition_time: Some(timestamp_from_millis(c.last_transition_ms)),
    }
}

/// A count on the wire (saturating).
pub fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A fleet on the wire, status included.
pub fn fleet(view: FleetView) -> admin::Fleet {
    let record = view.record;
    admin::Fleet {
        name: record.name,
        selector: record.selector,
        label_defaults: record.label_defaults.into_iter().collect(),
        template: Some(record.template.into()),
        revision: record.revision,
        status: Some(admin::FleetStatus {
            devices: view.devices,
            synced: count(view.synced),
            pending: count(view.pending),
            error: count(view.error),
            offline: count(view.offline),
            conflicts: view
                .conflicts
                .into_iter()
                .map(|(device, fleets)| admin::FleetConflict { device, fleets })
                .collect(),
            render_failures: view
                .render_failures
                .into_iter()
                .map(|(device, reason)| admin::RenderFailure { device, reason })
                .collect(),
            summaries: view
                .summaries
                .into_iter()
                .map(|(summary, n)| (summary.to_string(), count(n)))
                .collect(),
        }),
        created_at: Some(timestamp_from_millis(record.created_ms)),
        updated_at: Some(timestamp_from_millis(record.updated_ms)),
        rollout: record.rollout.map(Into::into),
    }
}

/// A rollout on the wire.
pub fn rollout(view: RolloutView) -> admin::Rollout {
    let record = view.record;
    admin::Rollout {
        id: record.id,
        fleet: record.fleet,
        from_revision: record.from_revision,
        to_revision: record.to_revision,
        state: record.state,
        batch: count(record.batch as usize + 1).min(count(view.batches)),
        batches: count(view.batches),
        reason: record.reason,
        batch_size: count(view.batch_size),
        batch_moved: count(view.batch_moved),
        batch_synced: count(view.batch_synced),
        batch_nacked: count(view.batch_nacked),
        batch_offline: count(view.batch_offline),
        fleet_moved: count(view.fleet_moved),
        fleet_devices: count(view.fleet_devices),
        updating: count(view.updating),
        events: view
            .events
            .into_iter()
            .map(|e| admin::RolloutEvent {
                at: Some(timestamp_from_millis(e.at_ms)),
                event: e.event,
                detail: e.detail,
            })
            .collect(),
        updated_at: Some(timestamp_from_millis(record.updated_ms)),
        batch_devices: view.batch_devices,
    }
}

/// A fleet revision on the wire.
pub fn fleet_revision(revision: FleetRevision) -> admin::FleetRevision {
    admin::FleetRevision {
        revision: revision.revision,
        template: Some(revision.template.into()),
        created_at: Some(timestamp_from_millis(revision.created_ms)),
        created_by: revision.created_by,
    }
}

fn renewal_state(state: RenewalState) -> admin::RenewalState {
    match state {
        RenewalState::Valid => admin::RenewalState::Valid,
        RenewalState::Due => admin::RenewalState::Due,
        RenewalState::Failed => admin::RenewalState::Failed,
        RenewalState::Expired => admin::RenewalState::Expired,
        RenewalState::Revoked => admin::RenewalState::Revoked,
    }
}

/// A certificate on the wire.
pub fn certificate(view: CertificateView) -> admin::Certificate {
    let record = view.record;
    admin::Certificate {
        serial: record.serial,
        device_id: record.device_id,
        device_name: view.device_name,
        key_fingerprint: record.key_fingerprint,
        not_before: Some(timestamp_from_millis(record.not_before_ms)),
        not_after: Some(timestamp_from_millis(record.not_after_ms)),
        issued_at: Some(timestamp_from_millis(record.issued_ms)),
        revoked_at: record.revoked_ms.map(timestamp_from_millis),
        revocation_reason: record.revocation_reason.unwrap_or_default(),
        current: view.current,
        certificate_pem: record.certificate_pem,
    }
}

/// A record on the wire, with the current name of its device (not part of the record).
pub fn audit_record(record: SealedRecord, device_name: Option<String>) -> admin::AuditRecord {
    let e = record.entry;
    admin::AuditRecord {
        seq: e.seq,
        at: Some(timestamp_from_millis(e.at_ms)),
        kind: e.kind,
        device_id: e.device_id,
        serial: e.serial,
        key_fingerprint: e.key_fingerprint,
        not_before: Some(timestamp_from_millis(e.not_before_ms)),
        not_after: Some(timestamp_from_millis(e.not_after_ms)),
        actor: e.actor,
        reason: e.reason,
        proof: e.proof,
        outcome: e.outcome,
        previous_hash: record.previous_hash,
        hash: record.hash,
        signature: record.signature,
        target: e.target,
        role: e.role,
        method: e.method,
        revision: e.revision,
        device_name: device_name.unwrap_or_default(),
    }
}

/// A signed chain head on the wire.
pub fn audit_head(head: SignedHead) -> admin::AuditHead {
    admin::AuditHead {
        seq: head.seq,
        hash: head.hash,
        at: Some(timestamp_from_millis(head.at_ms)),
        signature: head.signature,
    }
}

/// A credential role from the wire: `None` when unspecified, INVALID_ARGUMENT when unknown.
pub fn credential_role(value: i32, field: &str) -> Result<Option<Role>, ControlError> {
    use admin::CredentialRole as R;
    match R::try_from(value) {
        Ok(R::Unspecified) => Ok(None),
        Ok(R::Admin) => Ok(Some(Role::Admin)),
        Ok(R::Operator) => Ok(Some(Role::Operator)),
        Ok(R::Viewer) => Ok(Some(Role::Viewer)),
        Ok(R::Service) => Ok(Some(Role::Service)),
        Ok(R::Enrollment) => Ok(Some(Role::Enrollment)),
        Err(_) => Err(ControlError::invalid(
            field,
            format!("unknown role {value}: use admin, operator, viewer, service or enrollment"),
        )),
    }
}

fn credential_role_to_wire(role: Role) -> admin::CredentialRole {
    use admin::CredentialRole as R;
    match role {
        Role::Admin => R::Admin,
        Role::Operator => R::Operator,
        Role::Viewer => R::Viewer,
        Role::Service => R::Service,
        Role::Enrollment => R::Enrollment,
        Role::Device => R::Unspecified,
    }
}

/// A credential on the wire.
pub fn credential(view: CredentialView) -> admin::Credential {
    let record = view.record;
    let grant = view.grant.map(|grant| match grant {
        ServiceGrant::ActsAs(role) => admin::ServiceGrant {
            acts_as: credential_role_to_wire(role) as i32,
            methods: vec![],
        },
        ServiceGrant::Methods(methods) => admin::ServiceGrant {
            acts_as: 0,
            methods: methods.into_iter().collect(),
        },
    });
    admin::Credential {
        identity: Identity::new(view.role, &record.name).uri(),
        name: record.name,
        role: credential_role_to_wire(view.role) as i32,
        scope: record.scope,
        grant,
        serial: view
            .newest
            .as_ref()
            .map(|c| c.serial.clone())
            .unwrap_or_default(),
        not_after: view
            .newest
            .as_ref()
            .map(|c| timestamp_from_millis(c.not_after_ms)),
        created_at: Some(timestamp_from_millis(record.created_ms)),
        created_by: record.created_by,
        last_used_at: record.last_used_ms.map(timestamp_from_millis),
        revoked_at: record.revoked_ms.map(timestamp_from_millis),
        enrollment: view.enrollment.map(|policy| admin::EnrollmentPolicy {
            labels: policy.labels.into_iter().collect(),
            auto_approve: policy.auto_approve,
        }),
        revocation_reason: record.revocation_reason.unwrap_or_default(),
    }
}

/// A newly issued credential on the wire, with the CA bundle.
pub fn issued_credential(issued: IssuedCredential, ca_pem: &str) -> admin::IssuedCredential {
    admin::IssuedCredential {
        credential: Some(credential(issued.view)),
        certificate_pem: issued.certificate_pem,
        ca_pem: ca_pem.to_string(),
    }
}

/// An agent release on the wire.
pub fn agent_release(view: ReleaseView) -> agent::AgentRelease {
    agent::AgentRelease {
        version: view.version,
        sha256: view.sha256,
        size: view.size,
        signature: view.signature,
        url: view.url,
        published_at: Some(timestamp_from_millis(view.published_ms)),
        published_by: view.published_by,
        key_fingerprint: view.key_fingerprint,
    }
}

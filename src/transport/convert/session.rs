//! Conversions of a device session's messages: `AgentMessage` in as a domain `SessionEvent`,
//! a domain `Directive` out as a `ServerMessage`.

use crate::clock::timestamp_from_millis;
use crate::control::{CertificateRejected, CertificateRequest, Directive, Hello, SessionEvent};
use crate::proto::agent::v1 as pb;
use crate::status::{DriftCheck, ReportUpdate, ResourceUsage, SystemInfo, UpdateState};
use crate::wire::status::alerts_from;
use std::time::Duration;

/// Largest status report taken in (a full one is a few KiB).
const MAX_STATUS_BYTES: usize = 32 * 1024;

/// A Hello in domain terms.
pub fn hello(hello: pb::Hello) -> Hello {
    Hello {
        device_id: hello.device_id,
        rendered_version: hello.rendered_version,
        agent_version: hello.agent_version,
    }
}

/// One agent message as a session event; a status report is checked and converted here.
pub fn session_event(message: pb::AgentMessage) -> SessionEvent {
    use pb::agent_message::Kind;
    match message.kind {
        Some(Kind::Ack(ack)) => SessionEvent::Ack { nonce: ack.nonce },
        Some(Kind::Nack(nack)) => SessionEvent::Nack {
            nonce: nack.nonce,
            version: nack.version,
            error: nack.error,
            rolled_back: nack.rolled_back,
        },
        Some(Kind::Heartbeat(_)) => SessionEvent::Heartbeat,
        Some(Kind::Status(status)) => SessionEvent::Status(report_update(status).map(Box::new)),
        Some(Kind::CertificateRequest(request)) => {
            SessionEvent::CertificateRequest(CertificateRequest {
                request_id: request.request_id,
                csr_pem: request.csr_pem,
            })
        }
        Some(Kind::CertificateRejected(rejected)) => {
            SessionEvent::CertificateRejected(CertificateRejected {
                request_id: rejected.request_id,
                serial: rejected.serial,
                reason: rejected.reason,
            })
        }
        Some(Kind::Hello(_)) | None => SessionEvent::Unexpected,
    }
}

/// A status report as the domain takes it in, or why it cannot be.
fn report_update(status: pb::Status) -> Result<ReportUpdate, String> {
    let size = prost::Message::encoded_len(&status);
    if size > MAX_STATUS_BYTES {
        return Err(format!(
            "status is {size} bytes; at most {MAX_STATUS_BYTES}"
        ));
    }
    let resources = match status.resources {
        None => None,
        Some(report) => {
            let alerts = alerts_from(report.alerts).map_err(|e| e.to_string())?;
            Some((
                report.usage.map(ResourceUsage::from).unwrap_or_default(),
                alerts,
            ))
        }
    };
    Ok(ReportUpdate {
        system_info: status.system_info.map(SystemInfo::from),
        resources,
        drift: status.drift.map(DriftCheck::from),
        workloads: status
            .workloads
            .map(|w| w.items.into_iter().map(Into::into).collect()),
        update: status.update.map(UpdateState::from),
    })
}

fn duration(d: Duration) -> Option<prost_types::Duration> {
    prost_types::Duration::try_from(d).ok()
}

/// A directive on the wire.
pub fn server_message(directive: Directive) -> pb::ServerMessage {
    use pb::server_message::Kind;
    let kind = match directive {
        Directive::Accepted {
            current_version,
            heartbeat_interval,
            renew_before,
        } => Kind::Accepted(pb::SessionAccepted {
            current_version,
            heartbeat_interval: duration(heartbeat_interval),
            certificate_renew_before: duration(renew_before),
        }),
        Directive::Spec(push) => Kind::Spec(pb::RenderedSpec {
            version: push.rendered.version.clone(),
            content_hash: push.rendered.content_hash.clone(),
            nonce: push.nonce,
            spec: Some(push.rendered.spec.clone().into()),
        }),
        Directive::RenewCertificate(renewal) => Kind::RenewCertificate(pb::RenewCertificate {
            reason: renewal.reason,
            deadline: Some(timestamp_from_millis(renewal.deadline_ms)),
        }),
        Directive::CertificateIssued {
            request_id,
            certificate_pem,
            ca_bundle_pem,
            not_after_ms,
        } => Kind::CertificateIssued(pb::CertificateIssued {
            request_id,
            certificate_pem,
            ca_bundle_pem,
            not_after: Some(timestamp_from_millis(not_after_ms)),
        }),
        Directive::CertificateRefused {
            request_id,
            reason,
            retryable,
            retry_after,
        } => Kind::CertificateRefused(pb::CertificateRefused {
            request_id,
            reason,
            retryable,
            retry_after: retry_after.and_then(duration),
        }),
        Directive::StatusRefused { reason } => Kind::StatusRefused(pb::StatusRefused { reason }),
        Directive::Reconnect { reason, within } => Kind::Reconnect(pb::Reconnect {
            reason,
            within: duration(within),
        }),
    };
    pb::ServerMessage { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oversized_status_is_refused_with_its_size() {
        let status = pb::Status {
            message: "x".repeat(MAX_STATUS_BYTES + 1),
            ..Default::default()
        };
        let event = session_event(pb::AgentMessage {
            kind: Some(pb::agent_message::Kind::Status(status)),
        });
        let SessionEvent::Status(Err(reason)) = event else {
            panic!("not refused: {event:?}");
        };
        assert!(reason.contains("at most 32768"), "{reason}");
    }

    #[test]
    fn a_second_hello_or_an_empty_message_has_no_place_in_a_session() {
        for kind in [
            Some(pb::agent_message::Kind::Hello(pb::Hello::default())),
            None,
        ] {
            let event = session_event(pb::AgentMessage { kind });
            assert!(matches!(event, SessionEvent::Unexpected), "{event:?}");
        }
    }

    #[test]
    fn a_refusal_keeps_its_retry_delay_on_the_wire() {
        let message = server_message(Directive::CertificateRefused {
            request_id: "r1".into(),
            reason: "rate".into(),
            retryable: true,
            retry_after: Some(Duration::from_secs(90)),
        });
        let Some(pb::server_message::Kind::CertificateRefused(refused)) = message.kind else {
            panic!("{message:?}");
        };
        assert_eq!(refused.request_id, "r1");
        assert_eq!(refused.retry_after.map(|d| d.seconds), Some(90));
    }
}

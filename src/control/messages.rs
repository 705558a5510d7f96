//! What a device's session tells the control plane and what it is told, in domain terms. The
//! transport turns each `AgentMessage` into a [`SessionEvent`] and each [`Directive`] into a
//! `ServerMessage`; nothing here knows the wire format.

use crate::hub::{Push, RenewalRequest};
use crate::status::ReportUpdate;
use std::time::Duration;

/// The first message of a session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hello {
    /// The device id the agent claims ("" for none); it must be its certificate's.
    pub device_id: String,
    /// The version of the spec the agent last applied ("" for none).
    pub rendered_version: String,
    pub agent_version: String,
}

/// A renewal request for the device's own identity, signed by a freshly generated key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertificateRequest {
    /// Chosen by the agent, echoed in the answer.
    pub request_id: String,
    pub csr_pem: String,
}

/// The device refused a certificate it was given and keeps its current one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertificateRejected {
    pub request_id: String,
    pub serial: String,
    pub reason: String,
}

/// One message from a device on its open session.
#[derive(Debug)]
pub enum SessionEvent {
    /// The push with `nonce` was applied.
    Ack {
        nonce: String,
    },
    /// The push with `nonce` was refused; the device kept (or went back to) what it ran.
    Nack {
        nonce: String,
        version: String,
        error: String,
        rolled_back: bool,
    },
    Heartbeat,
    /// A status report, as far as it could be read.
    Status(Box<ReportUpdate>),
    /// A status report that could not be taken in (too large, an unknown alert), and why.
    MalformedStatus(String),
    CertificateRequest(CertificateRequest),
    CertificateRejected(CertificateRejected),
    /// A message with no place on an open session (a second Hello, an empty message).
    Unexpected,
}

/// One message to a device on its session.
#[derive(Debug)]
pub enum Directive {
    /// The session is open: the version the control plane believes the device runs, and timing.
    Accepted {
        current_version: String,
        heartbeat_interval: Duration,
        renew_before: Duration,
    },
    /// A spec to apply and answer.
    Spec(Push),
    /// The device should renew its certificate.
    RenewCertificate(RenewalRequest),
    CertificateIssued {
        request_id: String,
        certificate_pem: String,
        ca_bundle_pem: String,
        not_after_ms: i64,
    },
    CertificateRefused {
        request_id: String,
        reason: String,
        /// False when the same request can never succeed.
        retryable: bool,
        retry_after: Option<Duration>,
    },
    /// A status report was refused; the session goes on.
    StatusRefused { reason: String },
    /// The device should reconnect, at a random moment within `within`.
    Reconnect { reason: String, within: Duration },
}

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
    /// The agent's version.
    pub agent_version: String,
}

/// A renewal request for the device's own identity, signed by a freshly generated key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertificateRequest {
    /// Chosen by the agent, echoed in the answer.
    pub request_id: String,
    /// The CSR for the fresh key (PEM).
    pub csr_pem: String,
}

/// The device refused a certificate it was given and keeps its current one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertificateRejected {
    /// The request answered by the refused certificate.
    pub request_id: String,
    /// The refused certificate's serial.
    pub serial: String,
    /// Why the device refused it.
    pub reason: String,
}

/// One message from a device on its open session.
#[derive(Debug)]
pub enum SessionEvent {
    /// The push with `nonce` was applied.
    Ack {
        /// The push answered.
        nonce: String,
    },
    /// The push with `nonce` was refused; the device kept (or went back to) what it ran.
    Nack {
        /// The push answered.
        nonce: String,
        /// The version refused.
        version: String,
        /// Why.
        error: String,
        /// Whether a partial apply was undone.
        rolled_back: bool,
    },
    /// The device is alive and has nothing to say.
    Heartbeat,
    /// A status report as far as it could be read, or why it could not be taken in (too large,
    /// an unknown alert).
    Status(Result<Box<ReportUpdate>, String>),
    /// A renewal request.
    CertificateRequest(CertificateRequest),
    /// A certificate the device refused.
    CertificateRejected(CertificateRejected),
    /// A message with no place on an open session (a second Hello, an empty message).
    Unexpected,
}

/// One message to a device on its session.
#[derive(Debug)]
pub enum Directive {
    /// The session is open: the version the control plane believes the device runs, and timing.
    Accepted {
        /// The version the control plane believes the device runs.
        current_version: String,
        /// How often the device sends a heartbeat.
        heartbeat_interval: Duration,
        /// How long before expiry the device renews by itself.
        renew_before: Duration,
    },
    /// A spec to apply and answer.
    Spec(Push),
    /// The device should renew its certificate.
    RenewCertificate(RenewalRequest),
    /// The renewed certificate.
    CertificateIssued {
        /// The request answered.
        request_id: String,
        /// The certificate (PEM).
        certificate_pem: String,
        /// The CA bundle (PEM).
        ca_bundle_pem: String,
        /// Its expiry, Unix milliseconds.
        not_after_ms: i64,
    },
    /// The renewal request was refused.
    CertificateRefused {
        /// The request answered.
        request_id: String,
        /// Why.
        reason: String,
        /// False when the same request can never succeed.
        retryable: bool,
        /// Retry no earlier than this.
        retry_after: Option<Duration>,
    },
    /// A status report was refused; the session goes on.
    StatusRefused {
        /// Why.
        reason: String,
    },
    /// The device should reconnect, at a random moment within `within`.
    Reconnect {
        /// Why, for the device's log.
        reason: String,
        /// The longest the device may wait.
        within: Duration,
    },
}

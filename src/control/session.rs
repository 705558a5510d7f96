//! A device's management session: accept its Hello, then, until it ends, push whatever the hub says
//! the device is missing and record its ACKs, NACKs and heartbeats. One task per session; nothing is
//! written to the database per heartbeat.

use super::messages::{Directive, Hello, SessionEvent};
use super::{ControlError, ControlPlane};
use crate::hub::{Answer, HubError, SessionHandle};
use crate::identity::{Identity, Role};
use crate::status::{ReportUpdate, UpdateState, check_bounds};
use crate::store::DeviceFact;
use futures::{Stream, StreamExt};
use rand::Rng;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};

/// Timing of sessions.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// How often an idle agent sends a heartbeat.
    pub heartbeat_interval: Duration,
    /// A session that sends nothing for this long is closed as dead.
    pub silence_timeout: Duration,
    /// A session older than this (less a random tenth) is asked to reconnect: connections
    /// rebalance across replicas and pick up renewed certificates. `None`: never.
    pub max_age: Option<Duration>,
}

impl Default for SessionSettings {
    fn default() -> Self {
        SessionSettings {
            heartbeat_interval: Duration::from_secs(30),
            silence_timeout: Duration::from_secs(100),
            max_age: Some(Duration::from_secs(24 * 3600)),
        }
    }
}

/// An accepted session, ready to run.
#[derive(Debug)]
pub struct Session {
    pub device_id: String,
    /// Serial of the certificate the session authenticated with.
    serial: String,
    handle: SessionHandle,
    current_version: String,
}

/// Why a session ended (a bounded set, for logs and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    AgentClosed,
    StreamError,
    Silent,
    Replaced,
    ProtocolError,
    /// Asked to reconnect because the session reached its maximum age.
    MaxAge,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::AgentClosed => "agent_closed",
            EndReason::StreamError => "stream_error",
            EndReason::Silent => "silent",
            EndReason::Replaced => "replaced",
            EndReason::ProtocolError => "protocol_error",
            EndReason::MaxAge => "max_age",
        }
    }
}

/// Directives on their way to an agent. Boxed: a bounded channel allocates room for 32 messages
/// up front, and a message inline is a few hundred bytes — per held stream, that was 6 KiB.
pub type Outbound = mpsc::Sender<Box<Directive>>;

/// Agents asked to reconnect because of age spread their return over this long.
const RECONNECT_WITHIN: Duration = Duration::from_secs(30);

/// When a session opened now should retire: `max_age` less up to a tenth, at random, so sessions
/// opened together (after an outage) do not all retire together.
fn max_age_deadline(max_age: Option<Duration>) -> Option<Instant> {
    let age = max_age?;
    let spread = (age / 10).as_millis().max(1) as u64;
    let early = Duration::from_millis(rand::rng().random_range(0..spread));
    Some(Instant::now() + age.saturating_sub(early))
}

fn reconnect(reason: &str, within: Duration) -> Box<Directive> {
    Box::new(Directive::Reconnect {
        reason: reason.into(),
        within,
    })
}

/// Counts the updates a device's report says finished since its previous one: a new failure, or
/// another agent build or OS image running than before.
fn count_updates(before: Option<&UpdateState>, after: Option<&UpdateState>) {
    let (Some(before), Some(after)) = (before, after) else {
        return;
    };
    if let Some(failure) = &after.last_failure
        && before.last_failure.as_ref().map(|f| f.at_ms) != Some(failure.at_ms)
    {
        let result = if failure.rolled_back {
            "rolled_back"
        } else {
            "failed"
        };
        crate::telemetry::device_update(failure.kind.as_str(), result);
    }
    // Another build running after a rollback is no success: the failure says what happened.
    if after.last_failure.is_some() {
        return;
    }
    if before.agent_digest != after.agent_digest && !before.agent_digest.is_empty() {
        crate::telemetry::device_update("agent", "succeeded");
    }
    if before.os_image_digest != after.os_image_digest && !before.os_image_digest.is_empty() {
        crate::telemetry::device_update("os", "succeeded");
    }
}

impl ControlPlane {
    /// Checks a Hello against the authenticated caller and registers the session.
    pub async fn open_session(
        &self,
        caller: &Identity,
        serial: &str,
        hello: &Hello,
    ) -> Result<Session, ControlError> {
        if caller.role != Role::Device {
            return Err(ControlError::PermissionDenied(format!(
                "{caller} may not open a device session"
            )));
        }
        let device_id = caller.name.clone();
        if !hello.device_id.is_empty() && hello.device_id != device_id {
            return Err(ControlError::PermissionDenied(format!(
                "certificate of device {device_id} may not open a session for device {}",
                hello.device_id
            )));
        }
        let now = self.now_millis();
        let (handle, current_version) = self
            .hub
            .open_session(&device_id, &hello.rendered_version, serial, now)
            .map_err(|e| match e {
                HubError::NotReady => ControlError::Unavailable(e.to_string()),
                HubError::UnknownDevice(_) => ControlError::PermissionDenied(e.to_string()),
            })?;
        // Checked after the session is registered: a revocation either finished before this
        // check (and is seen here) or closes the registered session itself.
        if self.revoked.contains(serial) {
            self.hub.close_session(&device_id, handle.id, now);
            tracing::warn!(device.id = %device_id, serial, "session refused: certificate revoked");
            return Err(ControlError::Unauthenticated(format!(
                "client certificate {serial} has been revoked"
            )));
        }
        let newest = self
            .catalog()
            .device(&device_id)
            .and_then(|d| d.cert_serial.clone());
        let has_spares = self.spares().contains(&device_id);
        if has_spares && newest.as_deref() == Some(serial) {
            self.supersede_spares(&device_id, serial).await;
        }
        self.catalog_mut()
            .note_agent_version(&device_id, &hello.agent_version);
        // Bookkeeping only: the live state is the hub's; written behind, in batches.
        self.journal.record(DeviceFact::Session {
            id: device_id.clone(),
            agent_version: hello.agent_version.clone(),
            running_version: Some(hello.rendered_version.clone()).filter(|v| !v.is_empty()),
            seen_ms: now,
        });
        crate::telemetry::session_opened();
        tracing::info!(device.id = %device_id, version = %hello.rendered_version, agent = %hello.agent_version, "session opened");
        Ok(Session {
            device_id,
            serial: serial.to_string(),
            handle,
            current_version,
        })
    }

    /// Runs an accepted session until the agent goes away, goes silent, or is replaced.
    pub async fn run_session<S>(
        &self,
        session: Session,
        mut inbound: S,
        outbound: Outbound,
    ) -> EndReason
    where
        S: Stream<Item = Result<SessionEvent, String>> + Unpin,
    {
        let settings = &self.policy.session;
        let Session {
            device_id,
            serial,
            handle,
            current_version,
        } = session;
        let accepted = Directive::Accepted {
            current_version,
            heartbeat_interval: settings.heartbeat_interval,
            renew_before: self.policy.renew_before,
        };
        let reason = if outbound.send(Box::new(accepted)).await.is_err() {
            EndReason::AgentClosed
        } else {
            self.session_loop(&device_id, &serial, &handle, &mut inbound, &outbound)
                .await
        };
        let now = self.now_millis();
        // last_seen lives in memory while the session is open; it is written once, here. A
        // session a newer one replaced writes nothing: its end would erase the record that this
        // replica holds the newer session, and the newer one writes last_seen when it ends.
        if self.hub.close_session(&device_id, handle.id, now) {
            self.journal.record(DeviceFact::LastSeen {
                id: device_id.clone(),
                seen_ms: now,
            });
        }
        crate::telemetry::session_closed(reason.as_str());
        tracing::info!(device.id = %device_id, reason = reason.as_str(), "session closed");
        reason
    }

    async fn session_loop<S>(
        &self,
        device_id: &str,
        serial: &str,
        handle: &SessionHandle,
        inbound: &mut S,
        outbound: &Outbound,
    ) -> EndReason
    where
        S: Stream<Item = Result<SessionEvent, String>> + Unpin,
    {
        let silence = self.policy.session.silence_timeout;
        let mut deadline = Instant::now() + silence;
        let retire_at = max_age_deadline(self.policy.session.max_age);
        loop {
            tokio::select! {
                _ = sleep_until(retire_at.unwrap_or(deadline)), if retire_at.is_some() => {
                    let _ = outbound.try_send(reconnect("the session reached its maximum age", RECONNECT_WITHIN));
                    return EndReason::MaxAge;
                }
                _ = handle.closed.notified() => {
                    let _ = outbound.try_send(reconnect("session closed by the control plane", Duration::from_secs(5)));
                    return EndReason::Replaced;
                }
                _ = handle.changed.notified() => {
                    while let Some(push) = self.hub.next_push(device_id, handle.id) {
                        tracing::debug!(device.id = %device_id, version = %push.rendered.version, "pushing spec");
                        if outbound.send(Box::new(Directive::Spec(push))).await.is_err() {
                            return EndReason::AgentClosed;
                        }
                    }
                    if let Some(renewal) = self.hub.take_renewal_request(device_id, handle.id) {
                        tracing::info!(device.id = %device_id, reason = %renewal.reason, "asking device to renew its certificate");
                        if outbound.send(Box::new(Directive::RenewCertificate(renewal))).await.is_err() {
                            return EndReason::AgentClosed;
                        }
                    }
                }
                _ = sleep_until(deadline) => return EndReason::Silent,
                _ = outbound.closed() => return EndReason::AgentClosed,
                message = inbound.next() => match message {
                    None => return EndReason::AgentClosed,
                    Some(Err(error)) => {
                        tracing::debug!(device.id = %device_id, %error, "session stream failed");
                        return EndReason::StreamError;
                    }
                    Some(Ok(SessionEvent::CertificateRequest(request))) => {
                        self.hub.touch(device_id, self.now_millis());
                        let answer = self.renew_certificate(device_id, serial, request).await;
                        if outbound.send(Box::new(answer)).await.is_err() {
                            return EndReason::AgentClosed;
                        }
                        // The agent waited on us meanwhile (issuance under load can take longer
                        // than the silence timeout): its silence starts now, not at its request.
                        deadline = Instant::now() + silence;
                    }
                    Some(Ok(SessionEvent::Status(update))) => {
                        deadline = Instant::now() + silence;
                        if let Some(refusal) = self.record_status(device_id, handle.id, update.map(|u| *u))
                            && outbound.send(Box::new(refusal)).await.is_err()
                        {
                            return EndReason::AgentClosed;
                        }
                    }
                    Some(Ok(SessionEvent::CertificateRejected(rejected))) => {
                        deadline = Instant::now() + silence;
                        self.certificate_rejected_by_device(device_id, rejected).await;
                    }
                    Some(Ok(message)) => {
                        deadline = Instant::now() + silence;
                        if !self.handle_message(device_id, handle.id, message).await {
                            return EndReason::ProtocolError;
                        }
                    }
                },
            }
        }
    }

    /// Takes in a device's status report (or why it could not be read): kept in the hub, written
    /// behind when its content changed. A report out of bounds is refused (the answer to send) and
    /// changes nothing; the session goes on.
    fn record_status(
        &self,
        device_id: &str,
        session_id: u64,
        update: Result<ReportUpdate, String>,
    ) -> Option<Directive> {
        let now = self.now_millis();
        self.hub.touch(device_id, now);
        let refuse = |reason: String| {
            tracing::warn!(device.id = %device_id, %reason, "status report refused");
            crate::telemetry::status_report(false);
            Some(Directive::StatusRefused { reason })
        };
        let update = match update {
            Ok(update) => update,
            Err(reason) => return refuse(reason),
        };
        if let Err(error) = check_bounds(&update) {
            return refuse(error.0);
        }
        crate::telemetry::status_report(true);
        if update.is_empty() {
            return None;
        }
        let corrections = update
            .drift
            .as_ref()
            .map_or(0, |d| d.items.iter().filter(|i| i.corrected).count());
        let mut before = None;
        let changed = self.hub.record_report(device_id, session_id, |current| {
            before = current.update.clone();
            current.updated(update, now)
        });
        if let Some(report) = changed {
            count_updates(before.as_ref(), report.update.as_ref());
            if corrections > 0 {
                crate::telemetry::drift_corrected(corrections);
            }
            self.journal.record(DeviceFact::Report {
                id: device_id.to_string(),
                report,
            });
        }
        None
    }

    /// Records one agent message. Returns false on a protocol violation.
    async fn handle_message(&self, device_id: &str, session_id: u64, event: SessionEvent) -> bool {
        let answer = match event {
            SessionEvent::Ack { nonce } => self.hub.ack(device_id, session_id, &nonce),
            SessionEvent::Nack {
                nonce,
                version,
                error,
                rolled_back,
            } => {
                tracing::warn!(device.id = %device_id, %version, %error, rolled_back, "device rejected spec");
                self.hub.nack(device_id, session_id, &nonce, &error)
            }
            SessionEvent::Heartbeat | SessionEvent::Status(_) => {
                // The session loop takes status reports in before this; here for completeness.
                self.hub.touch(device_id, self.now_millis());
                return true;
            }
            SessionEvent::CertificateRequest(_)
            | SessionEvent::CertificateRejected(_)
            | SessionEvent::Unexpected => {
                tracing::warn!(device.id = %device_id, "unexpected message on an open session");
                return false;
            }
        };
        self.hub.touch(device_id, self.now_millis());
        if let Answer::Recorded {
            acked_version,
            nacked,
        } = answer
        {
            self.journal.record(DeviceFact::Sync {
                id: device_id.to_string(),
                acked_version,
                nacked,
            });
        }
        true
    }
}

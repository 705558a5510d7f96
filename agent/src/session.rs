//! The management session: connect with the device certificate, say Hello with the version on disk,
//! apply what the server pushes (one push at a time, while heartbeats and reports go on; a push
//! waiting for a maintenance window is held and looked at again when it opens), answer every push
//! with ACK or NACK, send heartbeats, and come back with jittered backoff whenever the connection
//! is lost. A graceful shutdown lets the apply in progress finish within its grace, sends a last
//! status and closes the stream.

use crate::Agent;
use crate::backoff::Backoff;
use crate::certs::Pair;
use crate::health::Level;
use crate::keys::{DeviceKey, StoredKey};
use crate::push::{Pushed, current_applied, handle_push};
use crate::recover::{self, Recovery};
use crate::renewal::{DEFAULT_RENEW_BEFORE, Outcome, Renewer};
use crate::state::Enrolled;
use crate::status::Reporter;
use crate::tls::connect_with_tpm_key;
use anyhow::{Context, Result};
use flotilla::client::{ClientCredentials, connect, retry_after};
use flotilla::clock::{now_millis, timestamp_from_millis, timestamp_from_secs};
use flotilla::pki::cert_info_pem;
use flotilla::proto::agent::v1 as pb;
use flotilla::proto::agent::v1::agent_service_client::AgentServiceClient;
use rand::Rng;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// How a session ended.
enum End {
    /// The server asked us to come back after a random delay of at most this.
    Reconnect(Duration),
    /// A renewed certificate is active: reconnect with it at once.
    Renewed,
    /// The control plane is busy (admission control) and said when to come back.
    Busy(Duration),
    /// The stream closed or failed.
    Lost(String),
    Shutdown,
    /// A new agent build is switched to (or an unconfirmed one rolled back): start it.
    Restart,
}

/// The control plane refused this device for good: its certificate was revoked, or the device was
/// deleted. Retrying cannot help; the agent stops (exit code 78, which the shipped unit does not
/// restart) until it is enrolled again.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Decommissioned(pub String);

/// The exit code of a decommissioned agent (EX_CONFIG).
pub(crate) const EXIT_DECOMMISSIONED: i32 = 78;

/// After a stream is closed on shutdown, how long to wait for the control plane to end it.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// A session that lasted this long counts as healthy: the backoff starts over.
const HEALTHY_SESSION: Duration = Duration::from_secs(30);

fn message(kind: pb::agent_message::Kind) -> pb::AgentMessage {
    pb::AgentMessage { kind: Some(kind) }
}

/// A session attempt that fails this many times in a row with a freshly swapped-in certificate
/// makes the agent go back to the previous one.
const SWAP_ATTEMPTS: u32 = 3;

/// Keeps a session open for as long as the agent runs.
pub(crate) async fn run(agent: &Agent, enrolled: &Enrolled) -> Result<()> {
    let mut backoff = Backoff::new(Duration::from_millis(500), agent.config.max_backoff());
    let ca_pem = std::fs::read_to_string(agent.state.ca_path())
        .with_context(|| format!("reading {}", agent.state.ca_path().display()))?;
    let mut renewer = Renewer::new(
        agent.certs.clone(),
        agent.keys.clone(),
        ca_pem,
        enrolled.device_id.clone(),
        agent.state.renew_before().unwrap_or(DEFAULT_RENEW_BEFORE),
        agent.config.renewal_retry(),
    );
    let mut reporter = Reporter::new(
        agent.config.status.clone(),
        agent.boot_id.clone(),
        agent.keys.is_tpm(),
        agent.updater.running().version.clone(),
        agent.state.root().to_path_buf(),
    );
    let mut failures_with_new_pair = 0;
    loop {
        if recover::expired(agent) {
            let wait = match recover::recover(agent, enrolled).await {
                Ok(Recovery::Recovered) => Duration::ZERO,
                Ok(Recovery::Refused(reason)) => {
                    tracing::error!(%reason, "the certificate has expired and recovery was refused; enroll this device again (remove the state directory and restart the agent)");
                    agent.config.max_backoff()
                }
                Ok(Recovery::Retry(reason)) => {
                    tracing::warn!(%reason, "certificate expired; recovery will be retried");
                    backoff.next_delay()
                }
                Err(error) => {
                    tracing::warn!(error = %format!("{error:#}"), "certificate recovery failed; retrying");
                    backoff.next_delay()
                }
            };
            if wait > Duration::ZERO {
                if agent.sleep_or_shutdown(wait).await {
                    return Ok(());
                }
                continue;
            }
        }
        let started = Instant::now();
        let end = match session(agent, enrolled, &mut renewer, &mut reporter).await {
            Ok(end) => end,
            Err(error) if error.is::<Decommissioned>() => {
                agent
                    .health
                    .set_state(Some((Level::Fail, error.to_string())));
                return Err(error);
            }
            Err(error) => End::Lost(format!("{error:#}")),
        };
        agent.health.set_connected(false);
        renewer.on_session_end();
        if started.elapsed() >= HEALTHY_SESSION {
            backoff.reset();
        }
        if matches!(end, End::Lost(_)) && agent.certs.has_previous() {
            failures_with_new_pair += 1;
            if failures_with_new_pair >= SWAP_ATTEMPTS && agent.certs.roll_back()? {
                tracing::warn!(
                    "the renewed certificate could not open a session; back to the previous one"
                );
                failures_with_new_pair = 0;
            }
        } else {
            failures_with_new_pair = 0;
        }
        let wait = match end {
            End::Shutdown => return Ok(()),
            End::Restart => {
                let error = crate::update::launcher::restart(
                    agent.updater.restart_mode(),
                    agent.updater.builds(),
                );
                // Still here: the new build could not even be started.
                tracing::error!(%error, "could not start the new agent build");
                agent
                    .updater
                    .start_failed(format!("it could not be started: {error}"));
                Duration::ZERO
            }
            End::Renewed => Duration::ZERO,
            End::Busy(wait) => {
                tracing::info!(retry_in_ms = wait.as_millis() as u64, "control plane busy");
                wait.min(agent.config.max_backoff())
            }
            End::Reconnect(within) => {
                tracing::info!("server asked to reconnect");
                backoff.reset();
                let max = within.as_millis().max(1) as u64;
                Duration::from_millis(rand::rng().random_range(0..max))
            }
            End::Lost(reason) => {
                agent.next_server();
                let wait = backoff.next_delay();
                tracing::warn!(%reason, retry_in_ms = wait.as_millis() as u64, "session lost");
                wait
            }
        };
        if agent.sleep_or_shutdown(wait).await {
            return Ok(());
        }
    }
}

/// Opens the management channel with the current pair: tonic's TLS for a key file, rustls with
/// the TPM signing for a TPM key.
async fn open_channel(agent: &Agent, pair: Pair) -> Result<Channel> {
    let path = agent.state.ca_path();
    let ca_pem =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let server = agent.server();
    match pair.key {
        StoredKey::Pem(key_pem) => {
            let creds = ClientCredentials {
                ca_pem,
                cert_pem: pair.cert_pem,
                key_pem,
                server_name: agent.config.server_name.clone(),
            };
            Ok(connect(server, &creds).await?)
        }
        tpm_key @ StoredKey::Tpm(_) => {
            let DeviceKey::Tpm(signer) = agent.keys.open(&tpm_key)? else {
                anyhow::bail!("a TPM key opened as a file key");
            };
            connect_with_tpm_key(
                server,
                &ca_pem,
                &pair.cert_pem,
                signer,
                &agent.config.server_name,
            )
            .await
        }
    }
}

/// Sends what the renewer wants sent; true if the session should end because a new pair is active.
async fn renewal_step(
    outcome: Result<Outcome>,
    tx: &mpsc::Sender<pb::AgentMessage>,
) -> Result<Option<End>> {
    match outcome? {
        Outcome::Nothing => Ok(None),
        Outcome::Swapped => {
            metrics::counter!("flotilla_agent_renewals_total", "result" => "renewed").increment(1);
            Ok(Some(End::Renewed))
        }
        Outcome::Report(rejected) => {
            metrics::counter!("flotilla_agent_renewals_total", "result" => "rejected").increment(1);
            let _ = tx
                .send(message(pb::agent_message::Kind::CertificateRejected(
                    rejected,
                )))
                .await;
            Ok(None)
        }
        Outcome::Send(request) => {
            if tx
                .send(message(pb::agent_message::Kind::CertificateRequest(
                    request,
                )))
                .await
                .is_err()
            {
                return Ok(Some(End::Lost("outbound stream closed".into())));
            }
            Ok(None)
        }
    }
}

async fn session(
    agent: &Agent,
    enrolled: &Enrolled,
    renewer: &mut Renewer,
    reporter: &mut Reporter,
) -> Result<End> {
    if agent.updater.overdue(now_millis()) {
        return Ok(End::Restart);
    }
    let pair = agent.certs.current()?;
    let cert = cert_info_pem(&pair.cert_pem)?;
    let channel = open_channel(agent, pair).await?;
    let mut applied = current_applied(agent);
    let (tx, rx) = mpsc::channel(8);
    let running = agent.updater.running();
    tx.send(message(pb::agent_message::Kind::Hello(pb::Hello {
        device_id: enrolled.device_id.clone(),
        rendered_version: applied.version.clone(),
        agent_version: running.version.clone(),
        boot_id: agent.boot_id.clone(),
        certificate_serial: cert.serial.clone(),
        certificate_not_after: Some(timestamp_from_secs(cert.not_after)),
        agent_digest: running.sha256.clone(),
    })))
    .await?;
    let mut inbound = match AgentServiceClient::new(channel.clone())
        .session(ReceiverStream::new(rx))
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => match retry_after(&status) {
            Some(wait) => return Ok(End::Busy(wait)),
            None if refused_for_good(&status) => {
                return Err(Decommissioned(format!(
                    "the control plane refuses this device: {} (its certificate was revoked or \
                     the device was deleted); remove the state directory and enroll again",
                    status.message()
                ))
                .into());
            }
            None => anyhow::bail!(
                "session refused ({:?}): {}",
                status.code(),
                status.message()
            ),
        },
    };
    let mut heartbeat = tokio::time::interval(Duration::from_secs(30));
    heartbeat.reset();
    let mut sampling = tokio::time::interval(reporter.interval());
    sampling.reset();
    let drift_check = tokio::time::sleep(reporter.next_drift_check());
    tokio::pin!(drift_check);
    let mut shutdown = agent.shutdown.clone();
    // The push being handled (at most one: updates never overlap), the newest one that arrived
    // meanwhile, and one held until a window opens.
    let mut in_flight: Option<Pin<Box<dyn Future<Output = Pushed> + '_>>> = None;
    let mut queued: Option<pb::RenderedSpec> = None;
    let mut held: Option<(pb::RenderedSpec, Instant)> = None;
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => {
                return Ok(close(agent, in_flight, tx, &mut inbound, &applied.version).await);
            }
            pushed = async {
                match in_flight.as_mut() {
                    Some(push) => push.await,
                    None => std::future::pending().await,
                }
            }, if in_flight.is_some() => {
                in_flight = None;
                match pushed {
                    Pushed::Answer { answer, applied: now_applied } => {
                        if let Some(now_applied) = now_applied {
                            applied = *now_applied;
                        }
                        if tx.send(message(*answer)).await.is_err() {
                            return Ok(End::Lost("outbound stream closed".into()));
                        }
                    }
                    Pushed::Held { push, until_ms } => {
                        let wait = Duration::from_millis((until_ms - now_millis()).max(0) as u64);
                        tracing::info!(version = %push.version, wait_secs = wait.as_secs(), "spec held until its update window");
                        held = Some((*push, Instant::now() + wait));
                    }
                    Pushed::Restart => return Ok(End::Restart),
                    // No NACK: the version is fine, the device is not. A new session gets it
                    // pushed again.
                    Pushed::Deferred(_) if *agent.shutdown.borrow() => return Ok(End::Shutdown),
                    Pushed::Deferred(reason) => return Ok(End::Lost(format!("apply deferred: {reason}"))),
                }
                if let Some(update) = reporter.update(agent.updater.state())
                    && tx.send(message(pb::agent_message::Kind::Status(pb::Status { update: Some(update), ..Default::default() }))).await.is_err()
                {
                    return Ok(End::Lost("outbound stream closed".into()));
                }
                if let Some(next) = queued.take() {
                    in_flight = Some(Box::pin(handle_push(agent, applied.clone(), next, channel.clone())));
                }
            }
            _ = async {
                match held.as_ref() {
                    Some((_, at)) => tokio::time::sleep_until(*at).await,
                    None => std::future::pending().await,
                }
            }, if held.is_some() && in_flight.is_none() => {
                if let Some((push, _)) = held.take() {
                    in_flight = Some(Box::pin(handle_push(agent, applied.clone(), push, channel.clone())));
                }
            }
            _ = &mut drift_check => {
                drift_check.as_mut().reset(Instant::now() + reporter.next_drift_check());
                if let Some(status) = reporter.drift_check(&applied.spec, &applied.version)
                    && tx.send(message(pb::agent_message::Kind::Status(status))).await.is_err()
                {
                    return Ok(End::Lost("outbound stream closed".into()));
                }
            }
            _ = sampling.tick() => {
                if let Some(status) = reporter.next(&applied.spec, &applied.version, agent.updater.state())
                    && tx.send(message(pb::agent_message::Kind::Status(status))).await.is_err()
                {
                    return Ok(End::Lost("outbound stream closed".into()));
                }
            }
            _ = heartbeat.tick() => {
                if agent.updater.overdue(now_millis()) {
                    return Ok(End::Restart);
                }
                agent.updater.confirm(healthy(agent));
                if let Some(end) = renewal_step(renewer.on_tick(), &tx).await? {
                    return Ok(end);
                }
                let beat = pb::Heartbeat { sent_at: Some(timestamp_from_millis(now_millis())) };
                if tx.send(message(pb::agent_message::Kind::Heartbeat(beat))).await.is_err() {
                    return Ok(End::Lost("outbound stream closed".into()));
                }
            }
            next = inbound.message() => {
                let Some(server_message) = next.map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))? else {
                    return Ok(End::Lost("server closed the stream".into()));
                };
                match server_message.kind {
                    Some(pb::server_message::Kind::Accepted(accepted)) => {
                        tracing::info!(device.id = %enrolled.device_id, server_version = %accepted.current_version, version = %applied.version, "session established");
                        metrics::counter!("flotilla_agent_sessions_total").increment(1);
                        agent.health.set_connected(true);
                        if let Some(every) = accepted.heartbeat_interval.and_then(|d| Duration::try_from(d).ok()) {
                            heartbeat = tokio::time::interval(every.max(Duration::from_millis(100)));
                            heartbeat.reset();
                        }
                        if let Some(renew_before) = accepted.certificate_renew_before.and_then(|d| Duration::try_from(d).ok())
                            && renew_before != renewer.renew_before {
                                renewer.renew_before = renew_before;
                                agent.state.save_renew_before(renew_before)?;
                            }
                        agent
                            .health
                            .set_certificate(cert.not_before, cert.not_after, renewer.renew_before);
                        if agent.certs.has_previous() {
                            agent.certs.confirm()?;
                            tracing::info!(serial = %cert.serial, "renewed certificate confirmed by a new session; previous pair removed");
                        }
                        // A new agent build proves itself by this session (and its health).
                        agent.updater.confirm(healthy(agent));
                        let status = reporter.opening(&applied.spec, &applied.version, agent.updater.state());
                        if tx.send(message(pb::agent_message::Kind::Status(status))).await.is_err() {
                            return Ok(End::Lost("outbound stream closed".into()));
                        }
                        if let Some(end) = renewal_step(renewer.on_tick(), &tx).await? {
                            return Ok(end);
                        }
                    }
                    Some(pb::server_message::Kind::StatusRefused(refused)) => {
                        // Nothing to retry: the same report would be refused again. The next
                        // change is sent as usual.
                        tracing::warn!(reason = %refused.reason, "the control plane refused a status report");
                        metrics::counter!("flotilla_agent_status_refused_total").increment(1);
                    }
                    Some(pb::server_message::Kind::RenewCertificate(directive)) => {
                        if let Some(end) = renewal_step(renewer.on_directive(&directive), &tx).await? {
                            return Ok(end);
                        }
                    }
                    Some(pb::server_message::Kind::CertificateIssued(issued)) => {
                        if let Some(end) = renewal_step(renewer.on_issued(&issued), &tx).await? {
                            return Ok(end);
                        }
                    }
                    Some(pb::server_message::Kind::CertificateRefused(refused)) => {
                        metrics::counter!("flotilla_agent_renewals_total", "result" => "refused").increment(1);
                        if let Some(end) = renewal_step(renewer.on_refused(&refused), &tx).await? {
                            return Ok(end);
                        }
                    }
                    Some(pb::server_message::Kind::Spec(push)) => {
                        // The newest push supersedes one held or queued.
                        held = None;
                        if in_flight.is_some() {
                            queued = Some(push);
                        } else {
                            in_flight = Some(Box::pin(handle_push(agent, applied.clone(), push, channel.clone())));
                        }
                    }
                    Some(pb::server_message::Kind::Reconnect(reconnect)) => {
                        let within = reconnect.within.and_then(|d| Duration::try_from(d).ok()).unwrap_or(Duration::from_secs(5));
                        return Ok(End::Reconnect(within));
                    }
                    None => {}
                }
            }
        }
    }
}

/// A refusal that no retry can change: a revoked certificate, a device the control plane no
/// longer knows.
fn refused_for_good(status: &tonic::Status) -> bool {
    match status.code() {
        tonic::Code::Unauthenticated => status.message().contains("has been revoked"),
        tonic::Code::PermissionDenied => status.message().contains("not enrolled"),
        _ => false,
    }
}

/// Whether no health check fails (what a new build must show to confirm).
fn healthy(agent: &Agent) -> bool {
    agent
        .health
        .report()
        .iter()
        .all(|check| check.status != Level::Fail)
}

/// A graceful end: the push in progress may finish (and be answered) within the grace the signal
/// gave, then a last status says the agent is stopping, and the stream is closed.
async fn close(
    agent: &Agent,
    in_flight: Option<Pin<Box<dyn Future<Output = Pushed> + '_>>>,
    tx: mpsc::Sender<pb::AgentMessage>,
    inbound: &mut tonic::Streaming<pb::ServerMessage>,
    applied_version: &str,
) -> End {
    if let Some(push) = in_flight {
        let grace = *agent.grace.lock().unwrap_or_else(|p| p.into_inner());
        match tokio::time::timeout(grace, push).await {
            Ok(Pushed::Answer { answer, .. }) => {
                let _ = tx.send(message(*answer)).await;
            }
            Ok(_) => {}
            Err(_) => tracing::warn!(
                grace_secs = grace.as_secs(),
                "the apply in progress did not finish in time; it is rolled back at the next start"
            ),
        }
    }
    let last = pb::Status {
        applied_version: applied_version.to_string(),
        message: "agent stopping".into(),
        ..Default::default()
    };
    let _ = tx
        .send(message(pb::agent_message::Kind::Status(last)))
        .await;
    // Closing our side ends the session on the control plane; wait a moment for it to answer.
    drop(tx);
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Ok(Some(_)) = inbound.message().await {}
    })
    .await;
    End::Shutdown
}

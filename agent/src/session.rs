//! The management session: connect with the device certificate, say Hello with the version on disk,
//! apply what the server pushes, answer every push with ACK or NACK, send heartbeats, and come back
//! with jittered backoff whenever the connection is lost.

use crate::Agent;
use crate::apply::executor::SystemExecutor;
use crate::apply::journal::{ApplyJournal, Recovered};
use crate::apply::{Durable, apply_durably};
use crate::backoff::Backoff;
use crate::certs::Pair;
use crate::health::Level;
use crate::keys::{DeviceKey, StoredKey};
use crate::recover::{self, Recovery};
use crate::renewal::{DEFAULT_RENEW_BEFORE, Outcome, Renewer};
use crate::state::{Applied, Enrolled};
use crate::status::Reporter;
use crate::tls::connect_with_tpm_key;
use anyhow::{Context, Result};
use flotilla::client::{ClientCredentials, connect, retry_after};
use flotilla::clock::{now_millis, timestamp_from_millis, timestamp_from_secs};
use flotilla::pki::cert_info_pem;
use flotilla::proto::agent::v1 as pb;
use flotilla::proto::agent::v1::agent_service_client::AgentServiceClient;
use flotilla::spec::DeviceSpec;
use rand::Rng;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
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
}

/// A session that lasted this long counts as healthy: the backoff starts over.
const HEALTHY_SESSION: Duration = Duration::from_secs(30);

fn message(kind: pb::agent_message::Kind) -> pb::AgentMessage {
    pb::AgentMessage { kind: Some(kind) }
}

/// A session attempt that fails this many times in a row with a freshly swapped-in certificate
/// makes the agent go back to the previous one.
const SWAP_ATTEMPTS: u32 = 3;

/// Keeps a session open for as long as the agent runs.
pub async fn run(agent: &Agent, enrolled: &Enrolled) -> Result<()> {
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
    let pair = agent.certs.current()?;
    let cert = cert_info_pem(&pair.cert_pem)?;
    let channel = open_channel(agent, pair).await?;
    let mut applied = current_applied(agent);
    let (tx, rx) = mpsc::channel(8);
    tx.send(message(pb::agent_message::Kind::Hello(pb::Hello {
        device_id: enrolled.device_id.clone(),
        rendered_version: applied.version.clone(),
        agent_version: flotilla::VERSION.to_string(),
        boot_id: agent.boot_id.clone(),
        certificate_serial: cert.serial.clone(),
        certificate_not_after: Some(timestamp_from_secs(cert.not_after)),
    })))
    .await?;
    let mut inbound = match AgentServiceClient::new(channel)
        .session(ReceiverStream::new(rx))
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => match retry_after(&status) {
            Some(wait) => return Ok(End::Busy(wait)),
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
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return Ok(End::Shutdown),
            _ = &mut drift_check => {
                drift_check.as_mut().reset(tokio::time::Instant::now() + reporter.next_drift_check());
                if let Some(status) = reporter.drift_check(&applied.spec, &applied.version)
                    && tx.send(message(pb::agent_message::Kind::Status(status))).await.is_err()
                {
                    return Ok(End::Lost("outbound stream closed".into()));
                }
            }
            _ = sampling.tick() => {
                if let Some(status) = reporter.next(&applied.spec, &applied.version)
                    && tx.send(message(pb::agent_message::Kind::Status(status))).await.is_err()
                {
                    return Ok(End::Lost("outbound stream closed".into()));
                }
            }
            _ = heartbeat.tick() => {
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
                        let status = reporter.opening(&applied.spec, &applied.version);
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
                        match handle_push(agent, &mut applied, push).await {
                            Pushed::Answer(answer) => {
                                if tx.send(message(*answer)).await.is_err() {
                                    return Ok(End::Lost("outbound stream closed".into()));
                                }
                            }
                            // No NACK: the version is fine, the device is not. A new session
                            // gets it pushed again.
                            Pushed::Deferred(_) if *agent.shutdown.borrow() => return Ok(End::Shutdown),
                            Pushed::Deferred(reason) => return Ok(End::Lost(format!("apply deferred: {reason}"))),
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

/// The applied record; a corrupt one counts as nothing applied (and is reported).
pub fn current_applied(agent: &Agent) -> Applied {
    let (applied, problem) = agent.state.applied_or_unknown();
    if let Some(problem) = problem {
        tracing::warn!(%problem, "the applied-spec record is unreadable");
        agent.health.set_state(Some((Level::Warn, problem)));
    }
    applied
}

/// Finishes or rolls back an apply that a crash interrupted (see `apply::journal`), reporting
/// what it did; an error means the files could not be put back yet (e.g. a read-only disk).
pub fn settle_interrupted_apply(agent: &Agent, applied_version: &str) -> Result<(), String> {
    let journal = ApplyJournal::new(agent.state.root());
    match journal.recover(Some(applied_version)) {
        Ok(Recovered::Nothing) => Ok(()),
        Ok(Recovered::Completed) => {
            tracing::info!(version = %applied_version, "the last apply had completed; its journal is removed");
            Ok(())
        }
        Ok(Recovered::RolledBack {
            target_version,
            files,
        }) => {
            tracing::warn!(version = %target_version, files, "an apply was interrupted; its files are back as they were before it, and the control plane will send the spec again");
            Ok(())
        }
        Err(problem) => {
            let problem = format!("an interrupted apply could not be rolled back: {problem}");
            tracing::error!(%problem);
            agent.health.set_state(Some((Level::Fail, problem.clone())));
            Err(problem)
        }
    }
}

/// What became of a push.
enum Pushed {
    /// ACK or NACK it.
    Answer(Box<pb::agent_message::Kind>),
    /// Not applied for a reason of the device's own (interrupted, state directory unwritable):
    /// neither ACK nor NACK; the session ends so the version comes again.
    Deferred(String),
}

/// Applies one push and returns the ACK or NACK for it, or defers it.
async fn handle_push(agent: &Agent, applied: &mut Applied, push: pb::RenderedSpec) -> Pushed {
    let nack = |error: String, rolled_back: bool| {
        Pushed::Answer(Box::new(pb::agent_message::Kind::Nack(pb::Nack {
            nonce: push.nonce.clone(),
            version: push.version.clone(),
            error,
            rolled_back,
        })))
    };
    let spec: DeviceSpec = push.spec.clone().unwrap_or_default().into();
    if spec.content_hash() != push.content_hash {
        return nack("content hash does not match the spec".into(), false);
    }
    if let Err(problem) = settle_interrupted_apply(agent, &applied.version) {
        return Pushed::Deferred(problem);
    }
    let previous = applied.spec.clone();
    let new_state = Applied {
        version: push.version.clone(),
        spec,
    };
    let recorded = new_state.clone();
    let state = agent.state.clone();
    let result = tokio::task::spawn_blocking(move || {
        let journal = ApplyJournal::new(state.root());
        let record = || state.save_applied(&recorded).map_err(|e| e.to_string());
        apply_durably(
            &previous,
            &recorded.spec,
            &SystemExecutor,
            Durable {
                journal: &journal,
                target_version: &recorded.version,
                record: &record,
            },
        )
    })
    .await;
    match result {
        Ok(Ok(())) => {
            *applied = new_state;
            agent.health.set_last_apply(Ok(push.version.clone()));
            agent.health.set_state(None);
            metrics::counter!("flotilla_agent_applies_total", "result" => "ok").increment(1);
            tracing::info!(version = %push.version, files = applied.spec.files.len(), "spec applied");
            Pushed::Answer(Box::new(pb::agent_message::Kind::Ack(pb::Ack {
                nonce: push.nonce.clone(),
                version: push.version.clone(),
            })))
        }
        Ok(Err(error)) if error.retry || *agent.shutdown.borrow() => {
            metrics::counter!("flotilla_agent_applies_total", "result" => "deferred").increment(1);
            tracing::warn!(version = %push.version, error = %error.message, rolled_back = error.rolled_back, "apply deferred; the version will be applied again");
            agent
                .health
                .set_last_apply(Err(format!("deferred: {}", error.message)));
            if !*agent.shutdown.borrow() {
                agent
                    .health
                    .set_state(Some((Level::Fail, error.message.clone())));
            }
            Pushed::Deferred(error.message)
        }
        Ok(Err(error)) => {
            agent.health.set_last_apply(Err(error.message.clone()));
            metrics::counter!("flotilla_agent_applies_total", "result" => "rejected").increment(1);
            tracing::warn!(version = %push.version, error = %error.message, rolled_back = error.rolled_back, "spec rejected");
            nack(error.message, error.rolled_back)
        }
        Err(join) => nack(format!("apply task failed: {join}"), true),
    }
}

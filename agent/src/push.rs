//! What the agent does with one pushed spec: check it, bring the device's own software to what it
//! asks (a new agent build, an OS image — possibly waiting for a window, restarting or
//! rebooting), then apply its files, units and containers all or nothing, and answer ACK or
//! NACK. Also the start-up repair of an apply a crash interrupted.

use crate::Agent;
use crate::apply::executor::SystemExecutor;
use crate::apply::journal::{ApplyJournal, Recovered};
use crate::apply::{Durable, apply_durably};
use crate::health::Level;
use crate::state::Applied;
use crate::update::Prepared;
use flotilla::clock::now_millis;
use flotilla::proto::agent::v1 as pb;
use flotilla::spec::DeviceSpec;
use std::time::Duration;
use tonic::transport::Channel;

/// A device rebooting into a new image looks at the push again after this, in case the reboot
/// did not happen.
const REBOOT_RECHECK: Duration = Duration::from_secs(120);

/// What became of a push.
pub(crate) enum Pushed {
    /// ACK or NACK it; with an ACK, what the device now runs.
    Answer {
        answer: Box<pb::agent_message::Kind>,
        applied: Option<Box<Applied>>,
    },
    /// Not yet: a window is closed or a download must wait. Look at it again then.
    Held {
        push: Box<pb::RenderedSpec>,
        until_ms: i64,
    },
    /// A new agent build is switched to: the agent restarts into it, which answers the push.
    Restart,
    /// Not applied for a reason of the device's own (interrupted, state directory unwritable):
    /// neither ACK nor NACK; the session ends so the version comes again.
    Deferred(String),
}

/// The applied record; a corrupt one counts as nothing applied (and is reported).
pub(crate) fn current_applied(agent: &Agent) -> Applied {
    let (applied, problem) = agent.state.applied_or_unknown();
    if let Some(problem) = problem {
        tracing::warn!(%problem, "the applied-spec record is unreadable");
        agent.health.set_state(Some((Level::Warn, problem)));
    }
    applied
}

/// Finishes or rolls back an apply that a crash interrupted (see `apply::journal`), reporting
/// what it did; an error means the files could not be put back yet (e.g. a read-only disk).
pub(crate) fn settle_interrupted_apply(agent: &Agent, applied_version: &str) -> Result<(), String> {
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

fn nack(push: &pb::RenderedSpec, error: String, rolled_back: bool) -> Pushed {
    Pushed::Answer {
        answer: Box::new(pb::agent_message::Kind::Nack(pb::Nack {
            nonce: push.nonce.clone(),
            version: push.version.clone(),
            error,
            rolled_back,
        })),
        applied: None,
    }
}

/// Handles one push against what the device last applied.
pub(crate) async fn handle_push(
    agent: &Agent,
    applied: Applied,
    push: pb::RenderedSpec,
    channel: Channel,
) -> Pushed {
    let spec: DeviceSpec = push.spec.clone().unwrap_or_default().into();
    if spec.content_hash() != push.content_hash {
        return nack(&push, "content hash does not match the spec".into(), false);
    }
    if let Err(problem) = settle_interrupted_apply(agent, &applied.version) {
        return Pushed::Deferred(problem);
    }
    let now = now_millis();
    match agent
        .updater
        .prepare(&spec, &push.version, &channel, &SystemExecutor, now)
        .await
    {
        Prepared::Ready => {}
        Prepared::Wait { until_ms } => {
            return Pushed::Held {
                push: Box::new(push),
                until_ms,
            };
        }
        Prepared::Rebooting => {
            return Pushed::Held {
                push: Box::new(push),
                until_ms: now + REBOOT_RECHECK.as_millis() as i64,
            };
        }
        Prepared::Restart => return Pushed::Restart,
        Prepared::Refused(reason) => {
            agent.health.set_last_apply(Err(reason.clone()));
            metrics::counter!("flotilla_agent_applies_total", "result" => "rejected").increment(1);
            tracing::warn!(version = %push.version, error = %reason, "spec rejected");
            return nack(&push, reason, false);
        }
    }
    apply(agent, applied, push, spec).await
}

/// Applies the files, units and containers of a push, all or nothing.
async fn apply(
    agent: &Agent,
    applied: Applied,
    push: pb::RenderedSpec,
    spec: DeviceSpec,
) -> Pushed {
    let new_state = Applied {
        version: push.version.clone(),
        spec,
    };
    let recorded = new_state.clone();
    let state = agent.state.clone();
    let previous = applied.spec;
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
            agent.health.set_last_apply(Ok(push.version.clone()));
            agent.health.set_state(None);
            agent.updater.applied(&new_state.spec);
            metrics::counter!("flotilla_agent_applies_total", "result" => "ok").increment(1);
            tracing::info!(version = %push.version, files = new_state.spec.files.len(), "spec applied");
            Pushed::Answer {
                answer: Box::new(pb::agent_message::Kind::Ack(pb::Ack {
                    nonce: push.nonce.clone(),
                    version: push.version.clone(),
                })),
                applied: Some(Box::new(new_state)),
            }
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
            nack(&push, error.message, error.rolled_back)
        }
        Err(join) => nack(&push, format!("apply task failed: {join}"), true),
    }
}

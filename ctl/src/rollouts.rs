//! `flotctl rollout …`: status, pause, resume, rollback and a live watch of a fleet's rollout.

use crate::output::{Format, print};
use crate::rpc;
use anyhow::Result;
use flotilla::proto::admin::v1 as pb;
use flotilla::proto::admin::v1::rollout_service_client::RolloutServiceClient;
use serde::Serialize;
use tonic::transport::Channel;

/// What `rollout status|pause|resume|rollback` do.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Action {
    Status,
    Pause,
    Resume,
    /// Back to this revision's template, or to the one the latest rollout started from.
    Rollback(Option<i64>),
}

#[derive(Serialize)]
struct EventView {
    at: Option<String>,
    event: String,
    detail: String,
}

#[derive(Serialize)]
struct RolloutView {
    fleet: String,
    id: String,
    from_revision: i64,
    to_revision: i64,
    state: String,
    batch: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    reason: String,
    batch_size: u32,
    batch_moved: u32,
    batch_synced: u32,
    batch_nacked: u32,
    batch_offline: u32,
    fleet_moved: u32,
    fleet_devices: u32,
    updating: u32,
    batch_devices: Vec<String>,
    events: Vec<EventView>,
}

fn view(r: pb::Rollout) -> RolloutView {
    RolloutView {
        batch: format!("{}/{}", r.batch, r.batches),
        fleet: r.fleet,
        id: r.id,
        from_revision: r.from_revision,
        to_revision: r.to_revision,
        state: r.state,
        reason: r.reason,
        batch_size: r.batch_size,
        batch_moved: r.batch_moved,
        batch_synced: r.batch_synced,
        batch_nacked: r.batch_nacked,
        batch_offline: r.batch_offline,
        fleet_moved: r.fleet_moved,
        fleet_devices: r.fleet_devices,
        updating: r.updating,
        batch_devices: r.batch_devices,
        events: r
            .events
            .into_iter()
            .map(|e| EventView {
                at: e.at.map(|t| t.to_string()),
                event: e.event,
                detail: e.detail,
            })
            .collect(),
    }
}

fn show(format: Format, rollout: pb::Rollout) -> Result<()> {
    let rollout = view(rollout);
    if format != Format::Table {
        return print(format, &[rollout], true, &[], |_| vec![]);
    }
    let mut out = format!(
        "Fleet:     {}\nRevision:  {} -> {}\nState:     {}{}\nBatch:     {} ({} devices: {} moved, {} synced, {} rejected, {} offline)\nFleet:     {} of {} devices on the new revision, {} updating",
        rollout.fleet,
        rollout.from_revision,
        rollout.to_revision,
        rollout.state,
        if rollout.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", rollout.reason)
        },
        rollout.batch,
        rollout.batch_size,
        rollout.batch_moved,
        rollout.batch_synced,
        rollout.batch_nacked,
        rollout.batch_offline,
        rollout.fleet_moved,
        rollout.fleet_devices,
        rollout.updating
    );
    out.push_str("\nEvents:\n");
    for event in &rollout.events {
        out.push_str(&format!(
            "  {}  {:<14} {}\n",
            event.at.clone().unwrap_or_default(),
            event.event,
            event.detail
        ));
    }
    crate::output::print_text(&out);
    Ok(())
}

pub(crate) async fn act(
    channel: Channel,
    format: Format,
    fleet: String,
    action: Action,
) -> Result<()> {
    let mut client = RolloutServiceClient::new(channel);
    let request = pb::RolloutRequest {
        fleet: fleet.clone(),
        to_revision: match action {
            Action::Rollback(Some(revision)) => revision,
            _ => 0,
        },
    };
    let rollout = match action {
        Action::Status => client
            .get_rollout(pb::GetRolloutRequest { fleet })
            .await
            .map_err(rpc)?,
        Action::Pause => client.pause_rollout(request).await.map_err(rpc)?,
        Action::Resume => client.resume_rollout(request).await.map_err(rpc)?,
        Action::Rollback(_) => client.rollback_rollout(request).await.map_err(rpc)?,
    }
    .into_inner();
    show(format, rollout)
}

/// One line per change until the rollout completes (success) or pauses (an error, so scripts can
/// tell), or the stream ends.
pub(crate) async fn watch(channel: Channel, format: Format, fleet: String) -> Result<()> {
    let mut stream = RolloutServiceClient::new(channel)
        .watch_rollout(pb::RolloutRequest {
            fleet: fleet.clone(),
            to_revision: 0,
        })
        .await
        .map_err(rpc)?
        .into_inner();
    if format == Format::Table {
        println!("STATE         BATCH   MOVED   SYNCED   REJECTED   UPDATING   FLEET");
    }
    while let Some(rollout) = stream.message().await.map_err(rpc)? {
        let rollout = view(rollout);
        match format {
            Format::Table | Format::Wide => crate::output::print_text(&format!(
                "{:<13} {:<7} {:<7} {:<8} {:<10} {:<10} {}/{}\n",
                rollout.state,
                rollout.batch,
                rollout.batch_moved,
                rollout.batch_synced,
                rollout.batch_nacked,
                rollout.updating,
                rollout.fleet_moved,
                rollout.fleet_devices
            )),
            Format::Json | Format::Yaml | Format::Name => {
                println!("{}", serde_json::to_string(&rollout)?)
            }
        }
        match rollout.state.as_str() {
            "completed" => return Ok(()),
            "paused" => {
                return Err(anyhow::anyhow!(
                    "the rollout of {fleet} paused: {}",
                    rollout.reason
                ));
            }
            _ => {}
        }
    }
    Err(anyhow::anyhow!(
        "the control plane closed the watch before the rollout of {fleet} completed"
    ))
}

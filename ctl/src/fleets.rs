//! `flotctl` fleet commands: list, show, describe, revisions, delete.

use crate::output::{Format, print};
use crate::resources::{self, FleetView};
use crate::rpc;
use anyhow::Result;
use flotilla::proto::admin::v1 as pb;
use flotilla::proto::admin::v1::fleet_service_client::FleetServiceClient;
use flotilla::spec::DeviceSpec;
use serde::Serialize;
use tonic::transport::Channel;

pub(crate) fn print_fleets(format: Format, fleets: Vec<pb::Fleet>, single: bool) -> Result<()> {
    let views: Vec<_> = fleets.into_iter().map(resources::fleet_view).collect();
    print(
        format,
        &views,
        single,
        &[
            "NAME",
            "SELECTOR",
            "REVISION",
            "DEVICES",
            "SYNCED",
            "PENDING",
            "ERROR",
            "OFFLINE",
            "CONFLICTS",
        ],
        |f: &FleetView| {
            vec![
                f.metadata.name.clone(),
                f.spec.selector.clone(),
                f.status.revision.to_string(),
                f.status.devices.len().to_string(),
                f.status.synced.to_string(),
                f.status.pending.to_string(),
                f.status.error.to_string(),
                f.status.offline.to_string(),
                f.status.conflicts.len().to_string(),
            ]
        },
    )
}

pub(crate) async fn list(channel: Channel, format: Format) -> Result<()> {
    let fleets = FleetServiceClient::new(channel)
        .list_fleets(pb::ListFleetsRequest {})
        .await
        .map_err(rpc)?
        .into_inner()
        .fleets;
    print_fleets(format, fleets, false)
}

pub(crate) async fn fetch(channel: Channel, name: String) -> Result<pb::Fleet> {
    Ok(FleetServiceClient::new(channel)
        .get_fleet(pb::GetFleetRequest { name })
        .await
        .map_err(rpc)?
        .into_inner())
}

pub(crate) async fn get(channel: Channel, format: Format, name: String) -> Result<()> {
    print_fleets(format, vec![fetch(channel, name).await?], true)
}

pub(crate) async fn describe(channel: Channel, name: String) -> Result<()> {
    let view = resources::fleet_view(fetch(channel, name).await?);
    let status = &view.status;
    let mut out = format!(
        "Name:         {}\nSelector:     {}\nRevision:     {}\nDevices:      {} (synced {}, pending {}, error {}, offline {})\n",
        view.metadata.name,
        view.spec.selector,
        status.revision,
        status.devices.len(),
        status.synced,
        status.pending,
        status.error,
        status.offline
    );
    if !status.summaries.is_empty() {
        let counts: Vec<String> = status
            .summaries
            .iter()
            .map(|(summary, n)| format!("{summary} {n}"))
            .collect();
        out.push_str(&format!("Health:       {}\n", counts.join(", ")));
    }
    if !status.devices.is_empty() {
        out.push_str(&format!("Members:      {}\n", status.devices.join(", ")));
    }
    if !view.spec.defaults.labels.is_empty() {
        out.push_str(&format!(
            "Defaults:     {}\n",
            crate::labels_text(&view.spec.defaults.labels)
        ));
    }
    if !status.conflicts.is_empty() {
        out.push_str("Conflicts (device matched by several fleets; it keeps its current fleet):\n");
        for (device, fleets) in &status.conflicts {
            out.push_str(&format!("  {device}: {}\n", fleets.join(", ")));
        }
    }
    if !status.render_failures.is_empty() {
        out.push_str("Render failures:\n");
        for (device, reason) in &status.render_failures {
            out.push_str(&format!("  {device}: {reason}\n"));
        }
    }
    out.push_str("Template:\n");
    for line in yaml_serde::to_string(&view.spec.template)?.lines() {
        out.push_str(&format!("  {line}\n"));
    }
    crate::output::print_text(&out);
    Ok(())
}

#[derive(Serialize)]
struct RevisionView {
    revision: i64,
    created_at: Option<String>,
    created_by: String,
    template: DeviceSpec,
}

pub(crate) async fn revisions(channel: Channel, format: Format, fleet: String) -> Result<()> {
    let revisions = FleetServiceClient::new(channel)
        .list_fleet_revisions(pb::ListFleetRevisionsRequest { name: fleet })
        .await
        .map_err(rpc)?
        .into_inner()
        .revisions;
    let views: Vec<RevisionView> = revisions
        .into_iter()
        .map(|r| RevisionView {
            revision: r.revision,
            created_at: r.created_at.map(|t| t.to_string()),
            created_by: r.created_by,
            template: r.template.unwrap_or_default().into(),
        })
        .collect();
    print(
        format,
        &views,
        false,
        &["REVISION", "CREATED", "BY", "FILES", "UNITS", "CONTAINERS"],
        |r| {
            vec![
                r.revision.to_string(),
                r.created_at.clone().unwrap_or_default(),
                r.created_by.clone(),
                r.template.files.len().to_string(),
                r.template.units.len().to_string(),
                r.template.containers.len().to_string(),
            ]
        },
    )
}

pub(crate) async fn delete(channel: Channel, name: String) -> Result<()> {
    FleetServiceClient::new(channel)
        .delete_fleet(pb::DeleteFleetRequest { name: name.clone() })
        .await
        .map_err(rpc)?;
    println!("fleet/{name} deleted");
    Ok(())
}

//! `flotctl` device commands: list, show, describe, label, watch.

use crate::output::{Format, print};
use crate::resources::{self, DeviceView};
use crate::{labels_text, rpc};
use anyhow::Result;
use flotilla::proto::admin::v1 as pb;
use flotilla::proto::admin::v1::device_service_client::DeviceServiceClient;
use std::collections::BTreeMap;
use tonic::transport::Channel;

const HEADER: &[&str] = &[
    "NAME",
    "FLEET",
    "STATUS",
    "ONLINE",
    "SYNC",
    "VERSION",
    "ACKED",
    "LAST SEEN",
    "LABELS",
];

const WIDE_HEADER: &[&str] = &[
    "NAME", "FLEET", "STATUS", "SYNC", "VERSION", "OS", "KERNEL", "ARCH", "AGENT", "BUILD",
    "OS IMAGE", "UPDATE", "MEMORY", "DISK", "LABELS",
];

/// Which table columns to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Columns {
    Normal,
    /// `-o wide`: what the device runs on and how full it is.
    Wide,
}

impl Columns {
    pub(crate) fn new(wide: bool) -> Columns {
        if wide { Columns::Wide } else { Columns::Normal }
    }

    fn header(self) -> &'static [&'static str] {
        match self {
            Columns::Normal => HEADER,
            Columns::Wide => WIDE_HEADER,
        }
    }

    fn row(self, d: &DeviceView) -> Vec<String> {
        match self {
            Columns::Normal => row(d),
            Columns::Wide => wide_row(d),
        }
    }
}

fn fleet_cell(d: &DeviceView) -> String {
    let mut fleet = d.fleet.fleet.clone();
    if !d.fleet.conflicting_fleets.is_empty() {
        fleet = format!("{fleet}(conflict)");
    }
    fleet
}

fn row(d: &DeviceView) -> Vec<String> {
    vec![
        d.metadata.name.clone(),
        fleet_cell(d),
        d.status.summary.clone(),
        d.status.online.to_string(),
        d.status.sync_state.clone(),
        d.status.desired_version.clone(),
        d.status.acked_version.clone(),
        d.status.last_seen.clone().unwrap_or_default(),
        labels_text(d.metadata.labels.iter().flatten()),
    ]
}

fn wide_row(d: &DeviceView) -> Vec<String> {
    let info = d.status.report.system_info.as_ref();
    let text = |f: fn(&flotilla::status::SystemInfo) -> &String| {
        info.map(|i| f(i).clone()).unwrap_or_default()
    };
    let resources = d.status.report.resources.as_ref();
    let memory = resources
        .map(|r| format!("{}%", r.memory_percent))
        .unwrap_or_default();
    let disk = resources
        .and_then(|r| r.filesystems.iter().find(|f| f.mount_point == "/"))
        .map(|f| format!("{}%", f.used_percent))
        .unwrap_or_default();
    let os = info
        .map(|i| {
            format!("{} {}", i.os_id, i.os_version_id)
                .trim()
                .to_string()
        })
        .unwrap_or_default();
    let update = d.status.report.update.as_ref();
    let agent = update
        .map(|u| u.agent_version.clone())
        .or_else(|| info.map(|i| i.agent_version.clone()))
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| d.status.agent_version.clone());
    let build = update
        .map(|u| crate::status::short_digest(&u.agent_digest).to_string())
        .unwrap_or_default();
    let image = update.map(|u| u.os_image.clone()).unwrap_or_default();
    let phase = update
        .map(|u| match (&u.last_failure, u.phase) {
            (Some(_), flotilla::status::UpdatePhase::Idle) => "failed".to_string(),
            (_, phase) => phase.as_str().to_string(),
        })
        .unwrap_or_default();
    vec![
        d.metadata.name.clone(),
        fleet_cell(d),
        d.status.summary.clone(),
        d.status.sync_state.clone(),
        d.status.desired_version.clone(),
        os,
        text(|i| &i.kernel_release),
        text(|i| &i.architecture),
        agent,
        build,
        image,
        phase,
        memory,
        disk,
        labels_text(d.metadata.labels.iter().flatten()),
    ]
}

pub(crate) fn print_devices(format: Format, devices: Vec<pb::Device>, single: bool) -> Result<()> {
    print_columns(format, Columns::Normal, devices, single)
}

fn print_columns(
    format: Format,
    columns: Columns,
    devices: Vec<pb::Device>,
    single: bool,
) -> Result<()> {
    let views: Vec<_> = devices.into_iter().map(resources::device_view).collect();
    print(format, &views, single, columns.header(), |d| columns.row(d))
}

/// Devices fetched per request: a large fleet is listed in pages, not one huge message.
const CHUNK: u32 = 500;

/// What `get devices` asks for.
pub(crate) struct Query {
    pub selector: String,
    pub field_selector: String,
    /// Show at most this many (0: all).
    pub limit: usize,
}

pub(crate) async fn list(
    channel: Channel,
    format: Format,
    columns: Columns,
    query: Query,
) -> Result<()> {
    let mut client = DeviceServiceClient::new(channel);
    let mut devices = Vec::new();
    let mut page_token = String::new();
    loop {
        let wanted = match query.limit {
            0 => CHUNK,
            limit => CHUNK.min(u32::try_from(limit - devices.len()).unwrap_or(CHUNK)),
        };
        let page = client
            .list_devices(pb::ListDevicesRequest {
                selector: query.selector.clone(),
                field_selector: query.field_selector.clone(),
                page_size: wanted,
                page_token,
            })
            .await
            .map_err(rpc)?
            .into_inner();
        devices.extend(page.devices);
        page_token = page.next_page_token;
        let full = query.limit > 0 && devices.len() >= query.limit;
        if page_token.is_empty() || full {
            if full && !page_token.is_empty() {
                eprintln!("(first {} devices; more match)", devices.len());
            }
            break;
        }
    }
    print_columns(format, columns, devices, false)
}

pub(crate) async fn fetch(channel: Channel, name: String) -> Result<pb::Device> {
    Ok(DeviceServiceClient::new(channel)
        .get_device(pb::GetDeviceRequest { name })
        .await
        .map_err(rpc)?
        .into_inner())
}

pub(crate) async fn get(
    channel: Channel,
    format: Format,
    columns: Columns,
    name: String,
) -> Result<()> {
    print_columns(format, columns, vec![fetch(channel, name).await?], true)
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect::<String>()
}

pub(crate) async fn describe(channel: Channel, name: String) -> Result<()> {
    let view = resources::device_view(fetch(channel, name).await?);
    let status = &view.status;
    let mut out = String::new();
    let mut line = |key: &str, value: String| {
        if !value.is_empty() {
            out.push_str(&format!("{:<14}{value}\n", format!("{key}:")));
        }
    };
    line("Name", view.metadata.name.clone());
    line("ID", view.metadata.id.clone().unwrap_or_default());
    line("Status", status.summary.clone());
    line("Labels", labels_text(view.metadata.labels.iter().flatten()));
    line("Fleet", view.fleet.fleet.clone());
    if !view.fleet.conflicting_fleets.is_empty() {
        line(
            "Conflict",
            format!(
                "matched by {}; keeps its current fleet",
                view.fleet.conflicting_fleets.join(", ")
            ),
        );
    }
    line(
        "Sync",
        format!(
            "{} ({})",
            status.sync_state,
            if status.online { "online" } else { "offline" }
        ),
    );
    line("Replica", status.session_replica.clone());
    line("Desired", status.desired_version.clone());
    line("Sent", status.sent_version.clone());
    line("Acked", status.acked_version.clone());
    line("Last error", status.last_error.clone());
    line("Render error", status.render_error.clone());
    line("Last seen", status.last_seen.clone().unwrap_or_default());
    line("Agent", status.agent_version.clone());
    line("Renewal", status.renewal_state.clone());
    line("Renew at", status.renew_at.clone().unwrap_or_default());
    line("Renewal error", status.renewal_error.clone());
    line(
        "Certificate",
        match &status.certificate_not_after {
            Some(until) => format!("{} (until {until})", status.certificate_serial),
            None => status.certificate_serial.clone(),
        },
    );
    if !status.tpm_ek_fingerprint.is_empty() {
        line(
            "TPM",
            format!(
                "key attested at enrollment (EK {})",
                status.tpm_ek_fingerprint
            ),
        );
    }
    if status.report.system_info.is_some() || status.report.resources.is_some() {
        out.push_str(&format!(
            "Reported:     {}\n",
            status.report.reported_at.clone().unwrap_or_default()
        ));
    }
    crate::status::describe(&mut out, &status.report, &status.conditions);
    if !view.spec.is_empty() {
        out.push_str("Overrides:\n");
        out.push_str(&indent(&yaml_serde::to_string(&view.spec)?));
    }
    if let Some(rendered) = &view.fleet.rendered_spec {
        out.push_str("Rendered spec:\n");
        out.push_str(&indent(&yaml_serde::to_string(rendered)?));
    }
    crate::output::print_text(&out);
    Ok(())
}

pub(crate) async fn label(
    channel: Channel,
    format: Format,
    name: String,
    set: BTreeMap<String, String>,
    remove: Vec<String>,
) -> Result<()> {
    let device = DeviceServiceClient::new(channel)
        .label_device(pb::LabelDeviceRequest {
            name: name.clone(),
            set: set.into_iter().collect(),
            remove,
        })
        .await
        .map_err(rpc)?
        .into_inner();
    if format == Format::Table {
        let fleet = if device.fleet.is_empty() {
            "no fleet".to_string()
        } else {
            format!("fleet {}", device.fleet)
        };
        println!("device/{name} labeled ({fleet})");
        Ok(())
    } else {
        print_devices(format, vec![device], true)
    }
}

fn event_name(kind: i32) -> &'static str {
    match pb::device_event::Type::try_from(kind) {
        Ok(pb::device_event::Type::Added) => "ADDED",
        Ok(pb::device_event::Type::Modified) => "MODIFIED",
        Ok(pb::device_event::Type::Deleted) => "DELETED",
        Ok(pb::device_event::Type::Synced) => "SYNCED",
        _ => "UNKNOWN",
    }
}

/// Prints one line per event until the server ends the stream (or the user interrupts).
pub(crate) async fn watch(
    channel: Channel,
    format: Format,
    columns: Columns,
    selector: String,
    field_selector: String,
) -> Result<()> {
    let mut stream = DeviceServiceClient::new(channel)
        .watch_devices(pb::WatchDevicesRequest {
            selector,
            field_selector,
        })
        .await
        .map_err(rpc)?
        .into_inner();
    if format == Format::Table {
        println!("{:<9}{}", "EVENT", columns.header().join("   "));
    }
    while let Some(event) = stream.message().await.map_err(rpc)? {
        let kind = event_name(event.r#type);
        let view = event.device.map(resources::device_view);
        match format {
            Format::Table => {
                let cells = view.as_ref().map(|v| columns.row(v)).unwrap_or_default();
                let line = format!("{kind:<9}{}", cells.join("   "));
                println!("{}", crate::output::terminal_safe(&line, false));
            }
            Format::Name => {
                let name = view
                    .as_ref()
                    .map(|v| v.metadata.name.as_str())
                    .unwrap_or_default();
                println!(
                    "{kind} device/{}",
                    crate::output::terminal_safe(name, false)
                );
            }
            Format::Wide | Format::Json | Format::Yaml => {
                let line = serde_json::json!({ "type": kind, "device": view });
                println!("{}", serde_json::to_string(&line)?);
            }
        }
    }
    Err(anyhow::anyhow!(
        "the control plane closed the watch (it is shutting down or restarting); run it again"
    ))
}

pub(crate) async fn delete(channel: Channel, name: String) -> Result<()> {
    let revoked = DeviceServiceClient::new(channel)
        .delete_device(pb::DeleteDeviceRequest { name: name.clone() })
        .await
        .map_err(rpc)?
        .into_inner()
        .revoked_serials;
    println!(
        "device/{name} deleted ({} certificate(s) revoked)",
        revoked.len()
    );
    Ok(())
}

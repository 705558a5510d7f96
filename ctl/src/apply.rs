//! `flotctl apply -f`: create or update every resource of a file, in order, stopping at the first
//! refusal (which names the resource and the field).

use crate::devices::print_devices;
use crate::fleets::print_fleets;
use crate::output::Format;
use crate::resources::{Resource, parse_documents};
use crate::{channel, rpc};
use anyhow::{Context, Result};
use flotilla::proto::admin::v1 as pb;
use flotilla::proto::admin::v1::device_service_client::DeviceServiceClient;
use flotilla::proto::admin::v1::fleet_service_client::FleetServiceClient;
use std::path::PathBuf;

/// What a fleet's application left to look at: devices matched by it and another fleet (they keep
/// the fleet they had), and devices its template cannot render for.
fn fleet_warnings(fleet: &pb::Fleet) -> Vec<String> {
    let status = fleet.status.clone().unwrap_or_default();
    let conflicts = status.conflicts.into_iter().map(|c| {
        format!(
            "fleet/{} conflicts with {} over device {} (it keeps the fleet it had)",
            fleet.name,
            c.fleets
                .iter()
                .filter(|f| **f != fleet.name)
                .map(|f| format!("fleet/{f}"))
                .collect::<Vec<_>>()
                .join(", "),
            c.device
        )
    });
    let failures = status.render_failures.into_iter().map(|f| {
        format!(
            "fleet/{} cannot render for device {}: {}",
            fleet.name, f.device, f.reason
        )
    });
    conflicts.chain(failures).collect()
}

pub(crate) async fn apply(
    config: &Option<PathBuf>,
    format: Format,
    file: PathBuf,
    strict: bool,
) -> Result<()> {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading stdin")?
    } else {
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?
    };
    let documents = parse_documents(&text).with_context(|| format!("{}", file.display()))?;
    apply_documents(channel(config).await?, format, documents, strict).await
}

/// Applies parsed documents in order, stopping at the first refusal.
pub(crate) async fn apply_documents(
    channel: tonic::transport::Channel,
    format: Format,
    documents: Vec<Resource>,
    strict: bool,
) -> Result<()> {
    let mut devices = DeviceServiceClient::new(channel.clone());
    let mut fleets = FleetServiceClient::new(channel);
    let mut applied_devices = Vec::new();
    let mut applied_fleets = Vec::new();
    let mut warnings = Vec::new();
    for document in documents {
        match document {
            Resource::Device { metadata, spec } => {
                let name = metadata.name.clone();
                let device = devices
                    .apply_device(pb::ApplyDeviceRequest {
                        name: name.clone(),
                        spec: Some(spec.into()),
                        labels: metadata.labels.map(|values| pb::Labels {
                            values: values.into_iter().collect(),
                        }),
                    })
                    .await
                    .map_err(|s| rpc(s).context(format!("device {name:?}")))?
                    .into_inner();
                if format == Format::Table {
                    println!("device/{name} applied");
                }
                applied_devices.push(device);
            }
            Resource::Fleet { metadata, spec } => {
                let name = metadata.name.clone();
                let fleet = fleets
                    .apply_fleet(pb::ApplyFleetRequest {
                        name: name.clone(),
                        selector: spec.selector,
                        label_defaults: spec.defaults.labels.into_iter().collect(),
                        template: Some(spec.template.into()),
                        rollout: spec.rollout.map(Into::into),
                    })
                    .await
                    .map_err(|s| rpc(s).context(format!("fleet {name:?}")))?
                    .into_inner();
                if format == Format::Table {
                    println!("fleet/{name} applied (revision {})", fleet.revision);
                }
                warnings.extend(fleet_warnings(&fleet));
                applied_fleets.push(fleet);
            }
        }
    }
    if format != Format::Table {
        if !applied_fleets.is_empty() {
            print_fleets(format, applied_fleets, false)?;
        }
        if !applied_devices.is_empty() {
            print_devices(format, applied_devices, false)?;
        }
    }
    for warning in &warnings {
        eprintln!("warning: {}", crate::output::terminal_safe(warning, false));
    }
    if strict && !warnings.is_empty() {
        anyhow::bail!(
            "{} warning(s) with --strict; the resources were applied",
            warnings.len()
        );
    }
    Ok(())
}

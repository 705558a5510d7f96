//! `flotctl`: the Flotilla admin CLI.

mod output;
mod resources;

use anyhow::{Context, Result, anyhow};
use clap::{Parser, Subcommand};
use flotilla::client::{ClientCredentials, connect};
use flotilla::profiles::CtlConfig;
use flotilla::proto::admin::v1 as pb;
use flotilla::proto::admin::v1::device_service_client::DeviceServiceClient;
use flotilla::proto::admin::v1::enrollment_service_client::EnrollmentServiceClient;
use flotilla::proto::agent::v1::EnrollmentState;
use output::{Format, print};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use tonic::transport::Channel;

#[derive(Parser)]
#[command(
    name = "flotctl",
    version,
    about = "Administer a Flotilla control plane"
)]
struct Cli {
    /// Config file (default: $FLOTCTL_CONFIG, then ~/.config/flotctl/config.toml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List or show resources.
    Get {
        #[command(subcommand)]
        what: GetWhat,
    },
    /// Approve a pending request.
    Approve {
        #[command(subcommand)]
        what: ApproveWhat,
    },
    /// Deny a pending request.
    Deny {
        #[command(subcommand)]
        what: DenyWhat,
    },
    /// Create or update resources from a YAML or JSON file (`-` for stdin).
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum GetWhat {
    /// All devices.
    Devices,
    /// One device.
    Device { name: String },
    /// Enrollment requests.
    Enrollments {
        /// Only requests in this state (pending, approved, denied).
        #[arg(long)]
        state: Option<String>,
    },
    /// One enrollment request.
    Enrollment { name: String },
}

#[derive(Subcommand)]
enum ApproveWhat {
    Enrollment {
        name: String,
        /// Label to give the device, `key=value` (repeatable).
        #[arg(short = 'l', long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
}

#[derive(Subcommand)]
enum DenyWhat {
    Enrollment {
        name: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    let (k, v) = text
        .split_once('=')
        .ok_or_else(|| format!("label {text:?} must be key=value"))?;
    Ok((k.to_string(), v.to_string()))
}

fn config_path(cli: &Option<PathBuf>) -> Result<PathBuf> {
    if let Some(path) = cli {
        return Ok(path.clone());
    }
    if let Some(path) = std::env::var_os("FLOTCTL_CONFIG") {
        return Ok(PathBuf::from(path));
    }
    let home = std::env::var_os("HOME")
        .ok_or_else(|| anyhow!("no --config, no $FLOTCTL_CONFIG and no $HOME"))?;
    Ok(PathBuf::from(home).join(".config/flotctl/config.toml"))
}

async fn channel(cli: &Cli) -> Result<Channel> {
    let path = config_path(&cli.config)?;
    let config = CtlConfig::load(&path)?;
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
    };
    let creds = ClientCredentials {
        ca_pem: read(&config.ca_file)?,
        cert_pem: read(&config.cert_file)?,
        key_pem: read(&config.key_file)?,
        server_name: config.server_name.clone(),
    };
    Ok(connect(&config.server, &creds).await?)
}

/// Turns a gRPC error into a one-line message.
fn rpc(status: tonic::Status) -> anyhow::Error {
    anyhow!("{:?}: {}", status.code(), status.message())
}

fn labels_text(labels: &Option<BTreeMap<String, String>>) -> String {
    labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn print_devices(format: Format, devices: Vec<pb::Device>, single: bool) -> Result<()> {
    let views: Vec<_> = devices.into_iter().map(resources::device_view).collect();
    print(
        format,
        &views,
        single,
        &[
            "NAME",
            "ONLINE",
            "SYNC",
            "VERSION",
            "ACKED",
            "LAST SEEN",
            "LABELS",
        ],
        |d| {
            vec![
                d.metadata.name.clone(),
                d.status.online.to_string(),
                d.status.sync_state.clone(),
                d.status.desired_version.clone(),
                d.status.acked_version.clone(),
                d.status.last_seen.clone().unwrap_or_default(),
                labels_text(&d.metadata.labels),
            ]
        },
    )
}

fn print_enrollments(format: Format, enrollments: Vec<pb::Enrollment>, single: bool) -> Result<()> {
    let views: Vec<_> = enrollments
        .into_iter()
        .map(resources::enrollment_view)
        .collect();
    print(
        format,
        &views,
        single,
        &["NAME", "STATE", "HOSTNAME", "LABELS", "CREATED"],
        |e| {
            vec![
                e.name.clone(),
                e.state.clone(),
                e.hostname.clone(),
                labels_text(&Some(e.labels.clone())),
                e.created_at.clone().unwrap_or_default(),
            ]
        },
    )
}

fn parse_state(text: &str) -> Result<EnrollmentState> {
    EnrollmentState::from_str_name(&format!("ENROLLMENT_STATE_{}", text.to_uppercase()))
        .filter(|s| *s != EnrollmentState::Unspecified)
        .ok_or_else(|| anyhow!("unknown state {text:?}: use pending, approved or denied"))
}

async fn run(cli: Cli) -> Result<()> {
    let format = cli.output;
    match &cli.command {
        Command::Get { what } => match what {
            GetWhat::Devices => {
                let mut client = DeviceServiceClient::new(channel(&cli).await?);
                let devices = client
                    .list_devices(pb::ListDevicesRequest {})
                    .await
                    .map_err(rpc)?
                    .into_inner()
                    .devices;
                print_devices(format, devices, false)
            }
            GetWhat::Device { name } => {
                let mut client = DeviceServiceClient::new(channel(&cli).await?);
                let device = client
                    .get_device(pb::GetDeviceRequest { name: name.clone() })
                    .await
                    .map_err(rpc)?
                    .into_inner();
                print_devices(format, vec![device], true)
            }
            GetWhat::Enrollments { state } => {
                let state = state
                    .as_deref()
                    .map(parse_state)
                    .transpose()?
                    .unwrap_or(EnrollmentState::Unspecified);
                let mut client = EnrollmentServiceClient::new(channel(&cli).await?);
                let enrollments = client
                    .list_enrollments(pb::ListEnrollmentsRequest {
                        state: state as i32,
                    })
                    .await
                    .map_err(rpc)?
                    .into_inner()
                    .enrollments;
                print_enrollments(format, enrollments, false)
            }
            GetWhat::Enrollment { name } => {
                let mut client = EnrollmentServiceClient::new(channel(&cli).await?);
                let enrollment = client
                    .get_enrollment(pb::GetEnrollmentRequest { name: name.clone() })
                    .await
                    .map_err(rpc)?
                    .into_inner();
                print_enrollments(format, vec![enrollment], true)
            }
        },
        Command::Approve {
            what: ApproveWhat::Enrollment { name, labels },
        } => {
            let mut client = EnrollmentServiceClient::new(channel(&cli).await?);
            let enrollment = client
                .approve_enrollment(pb::ApproveEnrollmentRequest {
                    name: name.clone(),
                    labels: labels.iter().cloned().collect(),
                })
                .await
                .map_err(rpc)?
                .into_inner();
            print_enrollments(format, vec![enrollment], true)
        }
        Command::Deny {
            what: DenyWhat::Enrollment { name, reason },
        } => {
            let mut client = EnrollmentServiceClient::new(channel(&cli).await?);
            let enrollment = client
                .deny_enrollment(pb::DenyEnrollmentRequest {
                    name: name.clone(),
                    reason: reason.clone(),
                })
                .await
                .map_err(rpc)?
                .into_inner();
            print_enrollments(format, vec![enrollment], true)
        }
        Command::Apply { file } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading stdin")?
            } else {
                std::fs::read_to_string(file)
                    .with_context(|| format!("reading {}", file.display()))?
            };
            let documents =
                resources::parse_documents(&text).with_context(|| format!("{}", file.display()))?;
            let mut client = DeviceServiceClient::new(channel(&cli).await?);
            let mut applied = Vec::new();
            for document in documents {
                let name = document.metadata.name.clone();
                let device = client
                    .apply_device(pb::ApplyDeviceRequest {
                        name: name.clone(),
                        spec: Some(document.spec.into()),
                        labels: document.metadata.labels.map(|values| pb::Labels { values }),
                    })
                    .await
                    .map_err(|s| rpc(s).context(format!("device {name:?}")))?
                    .into_inner();
                if format == Format::Table {
                    println!("device/{name} applied");
                } else {
                    applied.push(device);
                }
            }
            if format != Format::Table {
                print_devices(format, applied, false)?;
            }
            Ok(())
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

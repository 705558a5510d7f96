//! `flotctl`: the Flotilla admin CLI.

mod apply;
mod audit;
mod certs;
mod credentials;
mod devices;
mod edit;
mod enrollments;
mod fleets;
mod output;
mod releases;
mod resources;
mod rollouts;
mod status;

use anyhow::{Context, Result, anyhow};
use clap::{Parser, Subcommand};
use flotilla::client::{ClientCredentials, connect};
use flotilla::profiles::CtlConfig;
use output::Format;
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
    /// Show one resource in detail.
    Describe {
        #[command(subcommand)]
        what: DescribeWhat,
    },
    /// The version of flotctl and of the control plane it talks to.
    Version,
    /// Print a shell completion script: `flotctl completion bash > /etc/bash_completion.d/flotctl`
    /// (also zsh, fish, elvish, powershell).
    Completion { shell: clap_complete::Shell },
    /// Credentials for people and services: create (the key stays here), renew, revoke.
    Credential {
        #[command(subcommand)]
        what: CredentialWhat,
    },
    /// Delete a resource.
    Delete {
        #[command(subcommand)]
        what: DeleteWhat,
    },
    /// Edit a device's or fleet's document in $VISUAL/$EDITOR; saved with changes, it is applied.
    Edit {
        #[command(subcommand)]
        what: EditWhat,
    },
    /// Set (`key=value`) and remove (`key-`) labels.
    Label {
        #[command(subcommand)]
        what: LabelWhat,
    },
    /// Stream changes as they happen.
    Watch {
        #[command(subcommand)]
        what: WatchWhat,
    },
    /// Device certificates: list, revoke, renew.
    Cert {
        #[command(subcommand)]
        what: CertWhat,
    },
    /// A fleet's rollout: status, pause, resume, rollback, watch.
    Rollout {
        #[command(subcommand)]
        what: RolloutWhat,
    },
    /// The audit trail (certificate events and admin calls): list, export, sign the head, verify.
    Audit {
        #[command(subcommand)]
        what: AuditWhat,
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
    /// Builds of the agent: make a release key, sign a build with it, publish it.
    #[command(name = "agent-release")]
    AgentRelease {
        #[command(subcommand)]
        what: AgentReleaseWhat,
    },
    /// Create or update resources (Device, Fleet, or a List of them) from a YAML or JSON file
    /// (`-` for stdin); what `get -o yaml` prints applies again.
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Fail (exit 1, after applying) when a fleet conflicts with another over a device or
        /// cannot render for one.
        #[arg(long)]
        strict: bool,
    },
}

#[derive(Subcommand)]
enum GetWhat {
    /// Devices, optionally those matching a label selector.
    Devices {
        /// Label selector, e.g. `site=berlin,tier!=canary,region in (eu,us),!legacy`.
        #[arg(short = 'l', long = "selector", default_value = "")]
        selector: String,
        /// Field selector on the status, e.g. `status.summary=Degraded,status.arch!=aarch64`
        /// (fields: status.summary, status.os, status.arch, status.agentVersion, status.online,
        /// status.syncState).
        #[arg(long = "field-selector", default_value = "")]
        field_selector: String,
        /// After listing them, keep printing changes as they happen (as `watch devices`).
        #[arg(short = 'w', long)]
        watch: bool,
        /// Show at most this many (in name order).
        #[arg(long, default_value_t = 0)]
        limit: usize,
    },
    /// One device.
    Device { name: String },
    /// All fleets.
    Fleets,
    /// One fleet.
    Fleet { name: String },
    /// The template revisions of a fleet.
    Revisions { fleet: String },
    /// Enrollment requests.
    Enrollments {
        /// Only requests in this state (pending, approved, denied).
        #[arg(long)]
        state: Option<String>,
    },
    /// One enrollment request.
    Enrollment { name: String },
    /// Credentials of the admin API (admin only).
    Credentials {
        /// Include revoked credentials.
        #[arg(long)]
        all: bool,
    },
    /// One credential.
    Credential { name: String },
    /// Published agent releases, newest first.
    #[command(name = "agent-releases")]
    AgentReleases,
    /// One agent release.
    #[command(name = "agent-release")]
    AgentRelease { version: String },
}

#[derive(Subcommand)]
enum AgentReleaseWhat {
    /// Makes an Ed25519 release key: `<out>.key` (keep it off the control plane) and `<out>.pub`
    /// (pin it in agent.toml, `[update] release_keys`).
    Keygen {
        #[arg(long, default_value = "release")]
        out: PathBuf,
    },
    /// Signs a build as a release version; writes `FILE.sig` (or `--out`). Runs locally.
    Sign {
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        version: String,
        file: PathBuf,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Publishes a signed build: the control plane stores it and serves it to devices (or, with
    /// `--url`, tells them to download it from there).
    Publish {
        file: PathBuf,
        #[arg(long)]
        version: String,
        /// The signature file `sign` wrote.
        #[arg(long)]
        signature: PathBuf,
        /// Devices download the build from this http(s) URL instead of from the control plane.
        #[arg(long)]
        url: Option<String>,
    },
}

#[derive(Subcommand)]
enum CredentialWhat {
    /// Creates a credential: generates a key here, has the control plane sign it, and writes
    /// `<out>/flotctl.toml` with the certificate, key and CA.
    Create {
        name: String,
        /// admin, operator, viewer, service or enrollment (for agents: a factory's or site's
        /// enrollment credential).
        #[arg(long)]
        role: String,
        /// Limit to devices and fleets matching this label selector (not for admin).
        #[arg(long, default_value = "")]
        scope: String,
        /// For a service: act with the rights of this role (operator or viewer).
        #[arg(long = "acts-as")]
        acts_as: Option<String>,
        /// For a service: a method it may call, e.g. `DeviceService/ListDevices` (repeatable).
        #[arg(long = "method")]
        methods: Vec<String>,
        /// Certificate lifetime, e.g. `90d` (default), `12h`; at most `730d`.
        #[arg(long, default_value = "")]
        validity: String,
        /// Directory for the files (default `./<name>`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// For enrollment: a label `key=value` set on every device it enrolls (repeatable).
        #[arg(long = "label", value_parser = flotilla::names::parse_label)]
        labels: Vec<(String, String)>,
        /// For enrollment: approve the requests made with it without an operator.
        #[arg(long)]
        auto_approve: bool,
    },
    /// Renews a credential with a fresh key (same name, role and scope). Renewing the credential
    /// this config uses replaces its files in place; the old certificate is refused once the new
    /// one has been used.
    Renew {
        name: String,
        /// Certificate lifetime; default: the credential's own.
        #[arg(long, default_value = "")]
        validity: String,
        /// Write to this directory instead.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Revokes a credential and all its certificates; its open calls end at once.
    Revoke {
        name: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Subcommand)]
enum EditWhat {
    /// A device: its labels and its own spec.
    Device { name: String },
    /// A fleet: selector, defaults, rollout policy and template.
    Fleet { name: String },
}

#[derive(Subcommand)]
enum DescribeWhat {
    /// A device: fleet, sync, certificate, its report, conditions and the rendered spec.
    Device { name: String },
    /// A fleet: members by state, conflicts, render failures and the template.
    Fleet { name: String },
}

#[derive(Subcommand)]
enum DeleteWhat {
    /// Delete a fleet; its devices keep what they run and join another fleet if one matches.
    Fleet { name: String },
    /// Decommission a device: revoke its certificates (its stream closes at once) and remove it.
    Device { name: String },
    /// Remove a pending or denied enrollment request, freeing its name.
    Enrollment { name: String },
    /// Remove a published agent release no fleet or device names.
    #[command(name = "agent-release")]
    AgentRelease { version: String },
}

#[derive(Subcommand)]
enum CertWhat {
    /// Certificates with days to expiry.
    List {
        #[arg(long)]
        device: Option<String>,
    },
    /// Revoke one certificate, or every certificate of a device.
    Revoke {
        serial: Option<String>,
        #[arg(long)]
        device: Option<String>,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Ask a connected device, or every connected device matching a selector, to renew now.
    Renew {
        #[arg(
            long,
            conflicts_with = "selector",
            required_unless_present = "selector"
        )]
        device: Option<String>,
        /// Label selector, e.g. `site=berlin`.
        #[arg(long, short = 'l')]
        selector: Option<String>,
    },
}

#[derive(Subcommand)]
enum RolloutWhat {
    /// Batch, per-state counts, the reason for a pause, and the events.
    Status { fleet: String },
    /// Stop moving devices to the new revision; the ones moved stay.
    Pause { fleet: String },
    /// Continue a paused rollout; the current batch's deadline starts over.
    Resume { fleet: String },
    /// Return every device of the fleet to the previous revision (or `--to-revision`'s
    /// template), in batches.
    Rollback {
        fleet: String,
        /// The revision whose template to return to (`flotctl get revisions FLEET`).
        #[arg(long)]
        to_revision: Option<i64>,
    },
    /// Live progress until the rollout completes (exit 0) or pauses (exit 1).
    Watch { fleet: String },
}

#[derive(Subcommand)]
enum AuditWhat {
    /// Audit records, oldest first.
    List {
        /// Device name or id.
        #[arg(long)]
        device: Option<String>,
        /// A certificate event (issued, renewed, recovered, revoked, superseded, rejected) or an
        /// admin call (apply, label, delete, approve, deny, pause, resume, rollback, revoke, renew,
        /// create).
        #[arg(long)]
        kind: Option<String>,
        /// Who: `operator/alice`, or just the name `alice`.
        #[arg(long)]
        actor: Option<String>,
        /// What the record is about: `fleet/web`, `credential/ops`, `enrollment/dev-1`;
        /// `device/NAME` also lists that device's certificate events.
        #[arg(long)]
        target: Option<String>,
        /// Only records newer than this long ago (`30m`, `7d`).
        #[arg(long, value_parser = flotilla::clock::parse_duration)]
        since: Option<std::time::Duration>,
        /// Only records older than this long ago.
        #[arg(long, value_parser = flotilla::clock::parse_duration)]
        until: Option<std::time::Duration>,
    },
    /// Check the whole trail with the pinned audit key; fails naming the first bad record, or
    /// the records deleted since a saved head.
    Verify {
        /// Verify an export (`audit export`) offline instead of the server's trail.
        #[arg(long)]
        file: Option<PathBuf>,
        /// A head saved earlier with `audit head --out`: deleted newest records are reported.
        #[arg(long)]
        expect_head: Option<PathBuf>,
        /// The audit public key (PEM); default: the config's audit_key_file.
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// The whole trail as JSON lines with hashes and signatures (for a SIEM, or `verify --file`).
    Export {
        /// Write here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Ask the control plane to sign the trail's head now; keep the file somewhere else and check
    /// later with `audit verify --expect-head FILE`.
    Head {
        /// Save the signed head here instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum LabelWhat {
    /// Change a device's labels; it may move to another fleet.
    Device {
        name: String,
        /// `key=value` to set, `key-` to remove.
        #[arg(required = true)]
        changes: Vec<String>,
    },
}

#[derive(Subcommand)]
enum WatchWhat {
    /// ADDED, MODIFIED and DELETED devices as they happen (SYNCED after the initial set).
    Devices {
        #[arg(short = 'l', long = "selector", default_value = "")]
        selector: String,
        /// Field selector on the status, as for `get devices`.
        #[arg(long = "field-selector", default_value = "")]
        field_selector: String,
    },
}

#[derive(Subcommand)]
enum ApproveWhat {
    /// Approve one request by name, or every pending one a selector matches (or all of them).
    Enrollment {
        /// The request (its requested device name).
        #[arg(required_unless_present_any = ["selector", "all_pending"])]
        name: Option<String>,
        /// Label to give the device, `key=value` (repeatable).
        #[arg(long = "label", value_parser = flotilla::names::parse_label)]
        labels: Vec<(String, String)>,
        /// Approve every pending request whose requested labels match this selector.
        #[arg(short = 'l', long, conflicts_with_all = ["name", "all_pending"])]
        selector: Option<String>,
        /// Approve every pending request.
        #[arg(long, conflicts_with = "name")]
        all_pending: bool,
    },
}

#[derive(Subcommand)]
enum DenyWhat {
    /// Refuse a pending request; its name can be requested again after `delete enrollment`.
    Enrollment {
        name: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
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

fn load_config(config: &Option<PathBuf>) -> Result<CtlConfig> {
    let path = config_path(config)?;
    if !path.exists() {
        return Err(anyhow!(
            "no flotctl configuration at {}: `flotilla serve` writes one on first start \
             (flotctl.toml in its data directory; `flotctl credential create` writes one per \
             credential). Pass it with --config or $FLOTCTL_CONFIG, or copy it to \
             ~/.config/flotctl/config.toml",
            path.display()
        ));
    }
    Ok(CtlConfig::load(&path)?)
}

async fn channel(config: &Option<PathBuf>) -> Result<Channel> {
    let config = load_config(config)?;
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

/// Turns a gRPC error into a one-line message, with a hint where the code alone says little.
pub fn rpc(status: tonic::Status) -> anyhow::Error {
    let hint = match status.code() {
        tonic::Code::Unimplemented => {
            " (the server does not offer this call: is `server` in the flotctl configuration the \
             admin endpoint? The agent endpoint, port 7443 by default, serves only agents)"
        }
        tonic::Code::Unavailable if status.message().is_empty() => {
            " (the control plane could not be reached, or is shutting down)"
        }
        _ => "",
    };
    let message = if status.message().is_empty() {
        "no details".to_string()
    } else {
        status.message().to_string()
    };
    anyhow!("{:?}: {message}{hint}", status.code())
}

/// Prints flotctl's version and the control plane's.
async fn version(config: &Option<PathBuf>, format: Format) -> Result<()> {
    let server = match channel(config).await {
        Ok(channel) => {
            flotilla::proto::admin::v1::server_service_client::ServerServiceClient::new(channel)
                .get_server_info(flotilla::proto::admin::v1::GetServerInfoRequest {})
                .await
                .map(tonic::Response::into_inner)
                .map_err(rpc)
        }
        Err(error) => Err(error),
    };
    let view = serde_json::json!({
        "client": { "version": flotilla::VERSION },
        "server": server.as_ref().ok().map(|s| serde_json::json!({
            "version": s.version,
            "replica": s.replica,
            "database": s.database,
            "leading": s.leading,
            "startedAt": s.started_at.map(|t| t.to_string()),
        })),
    });
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&view)?),
        Format::Yaml => print!("{}", yaml_serde::to_string(&view)?),
        _ => {
            println!("Client: flotctl {}", flotilla::VERSION);
            if let Ok(s) = &server {
                println!(
                    "Server: flotilla {} (replica {}, {}{})",
                    s.version,
                    s.replica,
                    s.database,
                    if s.leading { ", leading" } else { "" }
                );
            }
        }
    }
    server
        .map(drop)
        .context("asking the control plane for its version")
}

pub fn labels_text<'a>(labels: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    labels
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Splits `k=v` / `k-` arguments into labels to set and keys to remove.
fn label_changes(changes: &[String]) -> Result<(BTreeMap<String, String>, Vec<String>)> {
    let mut set = BTreeMap::new();
    let mut remove = Vec::new();
    for change in changes {
        if let Some((k, v)) = change.split_once('=') {
            set.insert(k.to_string(), v.to_string());
        } else if let Some(key) = change.strip_suffix('-') {
            remove.push(key.to_string());
        } else {
            return Err(anyhow!(
                "{change:?}: use key=value to set a label or key- to remove it"
            ));
        }
    }
    Ok((set, remove))
}

async fn run(cli: Cli) -> Result<()> {
    // `-o wide` is a table with more columns where a resource has them (devices).
    let wide = cli.output == Format::Wide;
    let format = if wide { Format::Table } else { cli.output };
    let config = &cli.config;
    match cli.command {
        Command::Get { what } => match what {
            GetWhat::Devices {
                selector,
                field_selector,
                watch,
                limit,
            } => {
                let columns = devices::Columns::new(wide);
                let channel = channel(config).await?;
                if watch {
                    devices::watch(channel, format, columns, selector, field_selector).await
                } else {
                    let query = devices::Query {
                        selector,
                        field_selector,
                        limit,
                    };
                    devices::list(channel, format, columns, query).await
                }
            }
            GetWhat::Device { name } => {
                let columns = devices::Columns::new(wide);
                devices::get(channel(config).await?, format, columns, name).await
            }
            GetWhat::Fleets => fleets::list(channel(config).await?, format).await,
            GetWhat::Fleet { name } => fleets::get(channel(config).await?, format, name).await,
            GetWhat::Revisions { fleet } => {
                fleets::revisions(channel(config).await?, format, fleet).await
            }
            GetWhat::Enrollments { state } => {
                enrollments::list(channel(config).await?, format, state).await
            }
            GetWhat::Enrollment { name } => {
                enrollments::get(channel(config).await?, format, name).await
            }
            GetWhat::Credentials { all } => {
                credentials::list(channel(config).await?, format, all).await
            }
            GetWhat::Credential { name } => {
                credentials::get(channel(config).await?, format, name).await
            }
            GetWhat::AgentReleases => releases::list(channel(config).await?, format).await,
            GetWhat::AgentRelease { version } => {
                releases::get(channel(config).await?, format, version).await
            }
        },
        Command::AgentRelease { what } => match what {
            AgentReleaseWhat::Keygen { out } => releases::keygen(&out),
            AgentReleaseWhat::Sign {
                key,
                version,
                file,
                out,
            } => releases::sign(&key, &version, &file, out),
            AgentReleaseWhat::Publish {
                file,
                version,
                signature,
                url,
            } => {
                let channel = channel(config).await?;
                releases::publish(channel, format, &file, &version, &signature, url).await
            }
        },
        Command::Credential { what } => {
            let current = load_config(config)?;
            let channel = channel(config).await?;
            match what {
                CredentialWhat::Create {
                    name,
                    role,
                    scope,
                    acts_as,
                    methods,
                    validity,
                    out,
                    labels,
                    auto_approve,
                } => {
                    let create = credentials::Create {
                        name,
                        role,
                        scope,
                        acts_as,
                        methods,
                        validity,
                        out,
                        labels,
                        auto_approve,
                    };
                    credentials::create(channel, &current, create).await
                }
                CredentialWhat::Renew {
                    name,
                    validity,
                    out,
                } => credentials::renew(channel, &current, name, validity, out).await,
                CredentialWhat::Revoke { name, reason } => {
                    credentials::revoke(channel, name, reason).await
                }
            }
        }
        Command::Describe { what } => match what {
            // `-o json|yaml` prints the whole resource, as `get` does.
            DescribeWhat::Device { name } if format != Format::Table => {
                devices::get(
                    channel(config).await?,
                    format,
                    devices::Columns::new(false),
                    name,
                )
                .await
            }
            DescribeWhat::Fleet { name } if format != Format::Table => {
                fleets::get(channel(config).await?, format, name).await
            }
            DescribeWhat::Device { name } => devices::describe(channel(config).await?, name).await,
            DescribeWhat::Fleet { name } => fleets::describe(channel(config).await?, name).await,
        },
        Command::Delete { what } => match what {
            DeleteWhat::Fleet { name } => fleets::delete(channel(config).await?, name).await,
            DeleteWhat::Device { name } => devices::delete(channel(config).await?, name).await,
            DeleteWhat::Enrollment { name } => {
                enrollments::delete(channel(config).await?, name).await
            }
            DeleteWhat::AgentRelease { version } => {
                releases::delete(channel(config).await?, version).await
            }
        },
        Command::Cert { what } => match what {
            CertWhat::List { device } => certs::list(channel(config).await?, format, device).await,
            CertWhat::Revoke {
                serial,
                device,
                reason,
            } => certs::revoke(channel(config).await?, serial, device, reason).await,
            CertWhat::Renew { device, selector } => {
                certs::renew(channel(config).await?, device, selector).await
            }
        },
        Command::Rollout { what } => {
            let channel = channel(config).await?;
            match what {
                RolloutWhat::Status { fleet } => {
                    rollouts::act(channel, format, fleet, rollouts::Action::Status).await
                }
                RolloutWhat::Pause { fleet } => {
                    rollouts::act(channel, format, fleet, rollouts::Action::Pause).await
                }
                RolloutWhat::Resume { fleet } => {
                    rollouts::act(channel, format, fleet, rollouts::Action::Resume).await
                }
                RolloutWhat::Rollback { fleet, to_revision } => {
                    let action = rollouts::Action::Rollback(to_revision);
                    rollouts::act(channel, format, fleet, action).await
                }
                RolloutWhat::Watch { fleet } => rollouts::watch(channel, format, fleet).await,
            }
        }
        Command::Audit { what } => match what {
            AuditWhat::List {
                device,
                kind,
                actor,
                target,
                since,
                until,
            } => {
                let filters = audit::Filters {
                    device,
                    kind,
                    actor,
                    target,
                    since,
                    until,
                };
                audit::list(channel(config).await?, format, filters).await
            }
            AuditWhat::Verify {
                file,
                expect_head,
                key,
            } => {
                let options = audit::VerifyOptions {
                    file,
                    expect_head,
                    key,
                };
                if options.file.is_some() {
                    // Offline: a config is used for its pinned key only, and need not exist.
                    let config = load_config(config).ok();
                    audit::verify(None, config.as_ref(), options).await
                } else {
                    let loaded = load_config(config)?;
                    audit::verify(Some(channel(config).await?), Some(&loaded), options).await
                }
            }
            AuditWhat::Export { out } => {
                audit::export(channel(config).await?, out.as_deref()).await
            }
            AuditWhat::Head { out } => audit::head(channel(config).await?, out.as_deref()).await,
        },
        Command::Label {
            what: LabelWhat::Device { name, changes },
        } => {
            let (set, remove) = label_changes(&changes)?;
            devices::label(channel(config).await?, format, name, set, remove).await
        }
        Command::Watch {
            what:
                WatchWhat::Devices {
                    selector,
                    field_selector,
                },
        } => {
            let columns = devices::Columns::new(wide);
            let channel = channel(config).await?;
            devices::watch(channel, format, columns, selector, field_selector).await
        }
        Command::Approve {
            what:
                ApproveWhat::Enrollment {
                    name,
                    labels,
                    selector,
                    all_pending,
                },
        } => {
            let channel = channel(config).await?;
            match (name, selector, all_pending) {
                (Some(name), _, _) => enrollments::approve(channel, format, name, labels).await,
                (None, None, false) => Err(anyhow!(
                    "name a request, or approve many with -l SELECTOR or --all-pending"
                )),
                (None, selector, _) => {
                    let selector = selector.unwrap_or_default();
                    enrollments::approve_matching(channel, format, &selector, labels).await
                }
            }
        }
        Command::Deny {
            what: DenyWhat::Enrollment { name, reason },
        } => enrollments::deny(channel(config).await?, format, name, reason).await,
        Command::Edit { what } => {
            let (kind, name) = match what {
                EditWhat::Device { name } => (edit::Kind::Device, name),
                EditWhat::Fleet { name } => (edit::Kind::Fleet, name),
            };
            edit::edit(channel(config).await?, format, kind, name).await
        }
        Command::Apply { file, strict } => apply::apply(config, format, file, strict).await,
        Command::Version => version(config, format).await,
        Command::Completion { shell } => {
            print!("{}", completion(shell));
            Ok(())
        }
    }
}

/// The completion script for `shell`.
fn completion(shell: clap_complete::Shell) -> String {
    use clap::CommandFactory;
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "flotctl", &mut script);
    String::from_utf8_lossy(&script).into_owned()
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let message = format!("{error:#}");
            eprintln!("error: {}", output::terminal_safe(&message, true));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_scripts_know_the_subcommands() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let script = completion(shell);
            for word in ["flotctl", "describe", "enrollment", "field-selector"] {
                assert!(script.contains(word), "{word} in the {shell} script");
            }
        }
    }

    #[test]
    fn every_command_says_what_it_does() {
        use clap::CommandFactory;
        fn walk(command: &clap::Command, path: &str, blank: &mut Vec<String>) {
            for sub in command.get_subcommands() {
                let name = format!("{path} {}", sub.get_name());
                if sub
                    .get_about()
                    .is_none_or(|a| a.to_string().trim().is_empty())
                {
                    blank.push(name.clone());
                }
                walk(sub, &name, blank);
            }
        }
        let mut blank = Vec::new();
        walk(&Cli::command(), "flotctl", &mut blank);
        assert!(blank.is_empty(), "commands without help: {blank:?}");
    }

    #[test]
    fn label_arguments_set_and_remove() {
        let (set, remove) =
            label_changes(&["site=berlin".into(), "tier-".into(), "empty=".into()]).unwrap();
        assert_eq!(set["site"], "berlin");
        assert_eq!(set["empty"], "");
        assert_eq!(remove, ["tier"]);
        assert!(label_changes(&["bare".into()]).is_err());
    }
}

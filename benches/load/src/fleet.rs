//! Simulated agents: each holds its own mTLS connection and management stream and speaks the real
//! protocol — Hello with the version it runs, ACK for every push, heartbeats, renewal with a fresh
//! key when asked (the request kept and sent again on the next session or after a retryable
//! refusal; then back at once with the new certificate), Reconnect, and back-off when the
//! control plane is busy or gone — like `flotilla-agent`, but applying specs in memory.
//!
//! One process holds at most a few ten thousand connections (its open-file limit), so a large
//! fleet is split over worker processes (`crate::worker`); each relays what its agents see as
//! [`Event`]s, and the parent folds them into one [`Shared`] view.

use crate::server::Device;
use anyhow::{Result, bail};
use flotilla::client::{ClientCredentials, endpoint, retry_after};
use flotilla::proto::agent::v1 as pb;
use flotilla::proto::agent::v1::agent_service_client::AgentServiceClient;
use rand::Rng;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// One ACK an agent sent: which agent, when.
pub(crate) struct Ack {
    pub agent: usize,
    pub at: Instant,
}

/// What the simulated fleet has seen, shared by every agent task.
pub(crate) struct Shared {
    epoch: Instant,
    /// Fleet-wide index of this process's agent 0 (source addresses and first endpoints follow
    /// the fleet-wide index, so worker processes never collide).
    base: usize,
    /// Where a worker process sends every event, for its parent.
    relay: Option<std::sync::mpsc::Sender<(usize, Event)>>,
    /// Agent endpoints (one per replica); agent i starts on `ports[i % len]` and moves to another
    /// one when its session is lost.
    ports: Vec<u16>,
    pub acks: Mutex<Vec<Ack>>,
    /// Per agent: milliseconds since `epoch` of the last time it was in sync (0: never).
    synced_at: Vec<AtomicU64>,
    /// Per agent: told at least once to back off since the last reset.
    told_busy: Vec<AtomicBool>,
    /// Per agent: the port of its open session (0: none).
    on_port: Vec<std::sync::atomic::AtomicU16>,
    pub busy_answers: AtomicUsize,
    pub sessions_lost: AtomicUsize,
    /// When each agent received a renewed certificate.
    pub renewals: Mutex<Vec<(usize, Instant)>>,
    pub refusals: AtomicUsize,
    stopping: AtomicBool,
    /// The first few distinct errors, for the report.
    errors: Mutex<Vec<String>>,
    /// Agents send a status report at session start and again, unchanged, every
    /// `STATUS_REPEAT` (as a chatty agent would: the control plane must not write it again).
    pub status: bool,
}

/// Something one agent saw, as relayed from a worker process to its parent.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Event {
    Synced(Instant),
    Acked(Instant),
    Renewed(Instant),
    /// The port of its open session (0: none).
    OnPort(u16),
    ToldBusy,
    SessionLost,
    Refused,
    Error(String),
}

impl Shared {
    /// The view of `n` agents whose first has fleet-wide index `base`.
    pub(crate) fn new(n: usize, base: usize, ports: Vec<u16>) -> Shared {
        Shared {
            epoch: Instant::now(),
            base,
            relay: None,
            ports,
            acks: Mutex::new(Vec::with_capacity(n * 3)),
            synced_at: (0..n).map(|_| AtomicU64::new(0)).collect(),
            told_busy: (0..n).map(|_| AtomicBool::new(false)).collect(),
            on_port: (0..n)
                .map(|_| std::sync::atomic::AtomicU16::new(0))
                .collect(),
            busy_answers: AtomicUsize::new(0),
            sessions_lost: AtomicUsize::new(0),
            renewals: Mutex::new(Vec::with_capacity(n)),
            refusals: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            errors: Mutex::default(),
            status: false,
        }
    }

    /// Relays every event to `sink` (fleet-wide index, event) besides recording it.
    pub(crate) fn relaying(mut self, sink: std::sync::mpsc::Sender<(usize, Event)>) -> Shared {
        self.relay = Some(sink);
        self
    }

    /// Agents send status reports (see `status`).
    pub(crate) fn reporting_status(mut self, on: bool) -> Shared {
        self.status = on;
        self
    }

    fn millis(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64 + 1
    }

    /// Records what agent `agent` (index in this process) saw.
    pub(crate) fn record(&self, agent: usize, event: Event) {
        if let Some(relay) = &self.relay {
            let _ = relay.send((self.base + agent, event.clone()));
        }
        match event {
            Event::Synced(at) => self.synced_at[agent].store(self.millis(at), Ordering::Relaxed),
            Event::Acked(at) => {
                self.synced_at[agent].store(self.millis(at), Ordering::Relaxed);
                if let Ok(mut acks) = self.acks.lock() {
                    acks.push(Ack { agent, at });
                }
            }
            Event::Renewed(at) => {
                if let Ok(mut renewals) = self.renewals.lock() {
                    renewals.push((agent, at));
                }
            }
            Event::OnPort(port) => self.on_port[agent].store(port, Ordering::Relaxed),
            Event::ToldBusy => {
                self.busy_answers.fetch_add(1, Ordering::Relaxed);
                self.told_busy[agent].store(true, Ordering::Relaxed);
            }
            Event::SessionLost => {
                self.sessions_lost.fetch_add(1, Ordering::Relaxed);
            }
            Event::Refused => {
                self.refusals.fetch_add(1, Ordering::Relaxed);
            }
            Event::Error(error) => self.note_error(error),
        }
    }

    fn mark_synced(&self, agent: usize) {
        self.record(agent, Event::Synced(Instant::now()));
    }

    /// Agents in sync at some moment after `since`.
    pub(crate) fn synced_since(&self, since: Instant) -> usize {
        let since = self.millis(since);
        self.synced_at
            .iter()
            .filter(|s| s.load(Ordering::Relaxed) >= since)
            .count()
    }

    /// Agents whose open session is on `port`.
    pub(crate) fn agents_on(&self, port: u16) -> Vec<usize> {
        (0..self.on_port.len())
            .filter(|i| self.on_port[*i].load(Ordering::Relaxed) == port)
            .collect()
    }

    /// How many of `agents` were in sync at some moment after `since`.
    pub(crate) fn synced_since_among(&self, agents: &[usize], since: Instant) -> usize {
        let since = self.millis(since);
        agents
            .iter()
            .filter(|i| self.synced_at[**i].load(Ordering::Relaxed) >= since)
            .count()
    }

    /// The first `limit` agents not in sync since `since`, each with the port of its open
    /// session (0: none) and how many renewed certificates it received, for a report.
    pub(crate) fn not_synced_since(
        &self,
        since: Instant,
        limit: usize,
    ) -> Vec<(usize, u16, usize)> {
        let since = self.millis(since);
        let renewals = self.renewals.lock().map(|r| r.clone()).unwrap_or_default();
        (0..self.synced_at.len())
            .filter(|i| self.synced_at[*i].load(Ordering::Relaxed) < since)
            .take(limit)
            .map(|i| {
                let renewed = renewals.iter().filter(|(agent, _)| *agent == i).count();
                (i, self.on_port[i].load(Ordering::Relaxed), renewed)
            })
            .collect()
    }

    /// When the last of the agents in sync after `since` got there.
    pub(crate) fn last_synced_after(&self, since: Instant) -> Duration {
        let since_ms = self.millis(since);
        let last = self
            .synced_at
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .filter(|&s| s >= since_ms)
            .max()
            .unwrap_or(since_ms);
        Duration::from_millis(last - since_ms)
    }

    /// How many agents were told to back off since the last call, and resets.
    pub(crate) fn take_told_busy(&self) -> usize {
        self.told_busy
            .iter()
            .filter(|b| b.swap(false, Ordering::Relaxed))
            .count()
    }

    pub(crate) fn ack_count(&self) -> usize {
        self.acks.lock().map(|a| a.len()).unwrap_or(0)
    }

    pub(crate) fn renewal_count(&self) -> usize {
        self.renewals.lock().map(|r| r.len()).unwrap_or(0)
    }

    pub(crate) fn errors(&self) -> Vec<String> {
        self.errors.lock().map(|e| e.clone()).unwrap_or_default()
    }

    fn note_error(&self, error: String) {
        if self.stopping.load(Ordering::Relaxed) {
            return;
        }
        if let Ok(mut errors) = self.errors.lock() {
            // Certificates and addresses differ per agent; compare the first words only.
            let key: String = error.chars().take(60).collect();
            if errors.len() < 10 && !errors.iter().any(|e| e.starts_with(&key)) {
                errors.push(error);
            }
        }
    }
}

/// The simulated agents of one run: tasks in this process, or worker processes.
pub(crate) struct Fleet {
    pub shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    workers: Vec<crate::worker::Worker>,
}

impl Fleet {
    /// Starts one task per device in this process, spread over `ports`; all connect at once.
    pub(crate) async fn connect(devices: Vec<Device>, ports: Vec<u16>, status: bool) -> Fleet {
        let shared = Arc::new(Shared::new(devices.len(), 0, ports).reporting_status(status));
        let tasks = spawn_agents(devices, &shared).await;
        Fleet {
            shared,
            tasks,
            workers: Vec::new(),
        }
    }

    /// Splits the devices over `processes` worker processes (each holding its share of the
    /// connections) and folds what they relay into one view.
    pub(crate) fn connect_in_processes(
        devices: Vec<Device>,
        ports: Vec<u16>,
        processes: usize,
        work: &std::path::Path,
        status: bool,
    ) -> Result<Fleet> {
        let n = devices.len();
        let shared = Arc::new(Shared::new(n, 0, ports.clone()).reporting_status(status));
        let per_process = n.div_ceil(processes.max(1));
        let mut workers = Vec::with_capacity(processes);
        let mut devices = devices.into_iter();
        let mut base = 0;
        while base < n {
            let slice: Vec<Device> = devices.by_ref().take(per_process).collect();
            let count = slice.len();
            workers.push(crate::worker::Worker::start(
                slice,
                base,
                &ports,
                work,
                shared.clone(),
            )?);
            base += count;
        }
        Ok(Fleet {
            shared,
            tasks: Vec::new(),
            workers,
        })
    }

    pub(crate) fn stop(self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.abort();
        }
        for worker in self.workers {
            worker.stop();
        }
    }
}

/// Starts one agent task per device on `shared`.
pub(crate) async fn spawn_agents(
    devices: Vec<Device>,
    shared: &Arc<Shared>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::with_capacity(devices.len());
    for (index, device) in devices.into_iter().enumerate() {
        tasks.push(tokio::spawn(run_agent(index, device, shared.clone())));
        if index % 200 == 199 {
            tokio::task::yield_now().await;
        }
    }
    tasks
}

/// Waits until `done` holds, checking every 20 ms; how long it took.
pub(crate) async fn wait_until(
    limit: Duration,
    what: &str,
    done: impl Fn() -> bool,
) -> Result<Duration> {
    wait_reporting(limit, what, done, || None).await
}

/// How often a long wait says how far it has come.
const PROGRESS_EVERY: Duration = Duration::from_secs(60);

/// [`wait_until`], printing `progress` every minute while it waits, so that a wait that runs
/// slow (or out of time) shows how fast it went rather than only where it ended.
pub(crate) async fn wait_reporting(
    limit: Duration,
    what: &str,
    done: impl Fn() -> bool,
    progress: impl Fn() -> Option<String>,
) -> Result<Duration> {
    let start = Instant::now();
    let mut next_report = PROGRESS_EVERY;
    while !done() {
        let waited = start.elapsed();
        if waited > limit {
            bail!("{what}: not done within {limit:?}");
        }
        if waited >= next_report {
            if let Some(line) = progress() {
                eprintln!("{what}: {line} after {} s", waited.as_secs());
            }
            next_report += PROGRESS_EVERY;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(start.elapsed())
}

/// Spreads source addresses over 127.0.0.0/8 so tens of thousands of connections find ports.
pub(crate) fn source_address(index: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        (index / 62_500 % 250) as u8 + 1,
        (index / 250 % 250) as u8 + 1,
        (index % 250) as u8 + 1,
    ))
}

enum End {
    Renewed,
    Reconnect(Duration),
    Busy(Duration),
    Closed,
}

/// Exponential back-off with full jitter from 500 ms to 30 s, as the real agent does.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(30);

    fn delay(&mut self) -> Duration {
        let ceiling = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        Duration::from_millis(rand::rng().random_range(0..=ceiling.as_millis() as u64))
    }
}

async fn run_agent(index: usize, device: Device, shared: Arc<Shared>) {
    let mut state = AgentState {
        creds: device.creds,
        version: String::new(),
        backoff: Backoff {
            next: Backoff::FIRST,
        },
        pending: None,
    };
    let mut endpoint = shared.base + index;
    while !shared.stopping.load(Ordering::Relaxed) {
        let port = shared.ports[endpoint % shared.ports.len()];
        let end = session(index, port, &device.id, &mut state, &shared).await;
        shared.record(index, Event::OnPort(0));
        if matches!(end, Ok(End::Closed) | Err(_)) {
            // Another endpoint, chosen at random as a load balancer would: the agents of a lost
            // replica spread over the others instead of all landing on the next one.
            endpoint += rand::rng().random_range(1..shared.ports.len().max(2));
        }
        let wait = match end {
            Ok(End::Renewed) => Duration::ZERO,
            Ok(End::Reconnect(within)) => {
                Duration::from_millis(rand::rng().random_range(0..=within.as_millis() as u64))
            }
            Ok(End::Busy(wait)) => {
                shared.record(index, Event::ToldBusy);
                wait
            }
            Ok(End::Closed) => {
                shared.record(index, Event::SessionLost);
                state.backoff.delay()
            }
            Err(error) => {
                shared.record(index, Event::SessionLost);
                shared.record(index, Event::Error(format!("{error:#}")));
                state.backoff.delay()
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// What one simulated agent keeps between sessions.
struct AgentState {
    creds: ClientCredentials,
    /// The version it runs.
    version: String,
    backoff: Backoff,
    /// Like the real agent's pending request: kept across sessions and sent again, so a
    /// certificate lost with its session is fetched again (the control plane answers the same
    /// CSR with the same certificate).
    pending: Option<Pending>,
}

/// A renewal asked for and not yet answered with a certificate.
struct Pending {
    key: rcgen::KeyPair,
    request: pb::CertificateRequest,
}

/// Sends the pending renewal request, if there is one; false when the session is gone.
async fn send_pending(tx: &mpsc::Sender<pb::AgentMessage>, pending: &Option<Pending>) -> bool {
    match pending {
        Some(p) => {
            let request = pb::agent_message::Kind::CertificateRequest(p.request.clone());
            tx.send(message(request)).await.is_ok()
        }
        None => true,
    }
}

fn message(kind: pb::agent_message::Kind) -> pb::AgentMessage {
    pb::AgentMessage { kind: Some(kind) }
}

async fn session(
    index: usize,
    port: u16,
    device_id: &str,
    state: &mut AgentState,
    shared: &Shared,
) -> Result<End> {
    let AgentState {
        creds,
        version,
        backoff,
        pending,
    } = state;
    let channel = endpoint(&format!("https://127.0.0.1:{port}"), creds)?
        .local_address(Some(source_address(shared.base + index)))
        .connect()
        .await?;
    let (tx, rx) = mpsc::channel(4);
    tx.send(message(pb::agent_message::Kind::Hello(pb::Hello {
        device_id: device_id.to_string(),
        rendered_version: version.clone(),
        agent_version: "load".into(),
        ..Default::default()
    })))
    .await?;
    let mut inbound = match AgentServiceClient::new(channel)
        .session(ReceiverStream::new(rx))
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => match retry_after(&status) {
            Some(wait) => return Ok(End::Busy(wait)),
            None => bail!(
                "session refused ({:?}): {}",
                status.code(),
                status.message()
            ),
        },
    };
    let mut beat = tokio::time::interval(Duration::from_secs(30));
    beat.reset();
    // With `status`, the unchanged report again every few seconds, spread by agent.
    let mut repeat = tokio::time::interval_at(
        tokio::time::Instant::now() + STATUS_REPEAT + Duration::from_millis((index % 2000) as u64),
        STATUS_REPEAT,
    );
    // When to send the pending request again after a retryable refusal.
    let retry = tokio::time::sleep(Duration::from_secs(86_400));
    tokio::pin!(retry);
    let mut retrying = false;
    loop {
        tokio::select! {
            _ = &mut retry, if retrying => {
                retrying = false;
                if !send_pending(&tx, pending).await {
                    return Ok(End::Closed);
                }
            }
            _ = beat.tick() => {
                let heartbeat = pb::agent_message::Kind::Heartbeat(pb::Heartbeat { sent_at: None });
                if tx.send(message(heartbeat)).await.is_err() {
                    return Ok(End::Closed);
                }
            }
            _ = repeat.tick(), if shared.status => {
                if tx.send(status_report(shared.base + index)).await.is_err() {
                    return Ok(End::Closed);
                }
            }
            received = inbound.message() => {
                let Some(received) = received? else { return Ok(End::Closed) };
                use pb::server_message::Kind;
                match received.kind {
                    Some(Kind::Accepted(accepted)) => {
                        backoff.next = Backoff::FIRST;
                        shared.record(index, Event::OnPort(port));
                        if !version.is_empty() && accepted.current_version == *version {
                            shared.mark_synced(index);
                        }
                        if !send_pending(&tx, pending).await {
                            return Ok(End::Closed);
                        }
                        if shared.status && tx.send(status_report(shared.base + index)).await.is_err() {
                            return Ok(End::Closed);
                        }
                    }
                    Some(Kind::Spec(push)) => {
                        let ack = pb::agent_message::Kind::Ack(pb::Ack { nonce: push.nonce, version: push.version.clone() });
                        if tx.send(message(ack)).await.is_err() {
                            return Ok(End::Closed);
                        }
                        *version = push.version;
                        shared.record(index, Event::Acked(Instant::now()));
                    }
                    Some(Kind::RenewCertificate(_)) => {
                        if pending.is_none() {
                            let key = rcgen::KeyPair::generate()?;
                            let request = pb::CertificateRequest {
                                request_id: format!("{device_id}-{}", creds.cert_pem.len()),
                                csr_pem: device_csr(&key, device_id)?,
                            };
                            *pending = Some(Pending { key, request });
                        }
                        if !send_pending(&tx, pending).await {
                            return Ok(End::Closed);
                        }
                    }
                    Some(Kind::CertificateIssued(issued)) => {
                        let Some(p) = pending.take() else {
                            bail!("a certificate arrived that was not asked for");
                        };
                        creds.cert_pem = issued.certificate_pem;
                        creds.key_pem = p.key.serialize_pem();
                        shared.record(index, Event::Renewed(Instant::now()));
                        return Ok(End::Renewed);
                    }
                    Some(Kind::StatusRefused(refused)) => {
                        shared.record(index, Event::Error(format!("status refused: {}", refused.reason)));
                    }
                    Some(Kind::CertificateRefused(refused)) => {
                        shared.record(index, Event::Refused);
                        shared.record(index, Event::Error(format!("renewal refused: {}", refused.reason)));
                        if refused.retryable {
                            let wait = refused
                                .retry_after
                                .and_then(|d| Duration::try_from(d).ok())
                                .unwrap_or(Duration::from_secs(5));
                            retry.as_mut().reset(tokio::time::Instant::now() + wait);
                            retrying = true;
                        } else {
                            *pending = None;
                        }
                    }
                    Some(Kind::Reconnect(reconnect)) => {
                        let within = reconnect
                            .within
                            .and_then(|d| Duration::try_from(d).ok())
                            .unwrap_or(Duration::from_secs(5));
                        return Ok(End::Reconnect(within));
                    }
                    None => {}
                }
            }
        }
    }
}

/// A CSR for `key` asking for the device's own identity.
/// How often an agent repeats its unchanged status report with `--status`.
const STATUS_REPEAT: Duration = Duration::from_secs(5);

/// What a typical device reports: its system info (two interfaces) and a resource sample of two
/// filesystems, no alert firing. The same every time for one agent.
pub(crate) fn status_report(agent: usize) -> pb::AgentMessage {
    let interface = |name: &str, v4: String| pb::NetworkInterface {
        name: name.into(),
        addresses: vec![v4, format!("fe80::{:x}/64", agent + 1)],
    };
    let filesystem = |mount: &str, total: u64| pb::FilesystemUsage {
        mount_point: mount.into(),
        total_bytes: total,
        used_bytes: total / 3,
    };
    message(pb::agent_message::Kind::Status(pb::Status {
        applied_version: String::new(),
        message: String::new(),
        system_info: Some(pb::DeviceSystemInfo {
            hostname: format!("sim-{agent}"),
            os_id: "debian".into(),
            os_version_id: "12".into(),
            os_pretty_name: "Debian GNU/Linux 12 (bookworm)".into(),
            kernel_release: "6.1.0-28-amd64".into(),
            architecture: "x86_64".into(),
            boot_id: format!("{agent:08x}-0000-4000-8000-000000000000"),
            machine_id: format!("{agent:032x}"),
            cpu_count: 4,
            memory_total_bytes: 4 << 30,
            agent_version: flotilla::VERSION.into(),
            agent_build: "x86_64-linux release".into(),
            tpm_present: false,
            tpm_used: false,
            interfaces: vec![
                interface(
                    "eth0",
                    format!(
                        "10.{}.{}.{}/16",
                        agent >> 16 & 255,
                        agent >> 8 & 255,
                        agent & 255
                    ),
                ),
                interface("wlan0", "192.168.1.20/24".into()),
            ],
        }),
        resources: Some(pb::ResourceReport {
            usage: Some(pb::ResourceUsage {
                sampled_at: None,
                load1_centi: 12,
                load5_centi: 9,
                load15_centi: 7,
                cpu_percent: 3,
                memory_total_bytes: 4 << 30,
                memory_used_bytes: 1 << 30,
                filesystems: vec![
                    filesystem("/", 32 << 30),
                    filesystem("/var/lib/flotilla", 8 << 30),
                ],
            }),
            alerts: Vec::new(),
        }),
        drift: Some(pb::DriftReport {
            checked_at: None,
            items: Vec::new(),
        }),
        workloads: Some(pb::WorkloadReport {
            items: vec![pb::WorkloadStatus {
                kind: "unit".into(),
                name: "app.service".into(),
                state: "active".into(),
                sub_state: "running".into(),
                ..Default::default()
            }],
        }),
        update: None,
    }))
}

fn device_csr(key: &rcgen::KeyPair, device_id: &str) -> Result<String> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = vec![rcgen::SanType::URI(
        format!("flotilla://device/{device_id}").try_into()?,
    )];
    Ok(params.serialize_request(key)?.pem()?)
}

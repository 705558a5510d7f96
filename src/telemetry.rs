//! The control plane's Prometheus metrics (catalogue in docs/metrics.md): one place that names
//! every series, records events through the `metrics` facade, and renders the exposition. No
//! metric carries a per-device label.

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::time::Duration;

/// Every reason a session closes, as metric labels.
pub const SESSION_CLOSE_REASONS: &[&str] = &[
    "agent_closed",
    "stream_error",
    "silent",
    "replaced",
    "protocol_error",
    "max_age",
];
/// Every certificate event, as metric labels.
pub const CERTIFICATE_EVENTS: &[&str] = &["issued", "renewed", "recovered", "revoked", "rejected"];
/// Every credential event, as metric labels.
pub const CREDENTIAL_EVENTS: &[&str] = &["created", "renewed", "revoked"];
/// Roles of admin-API credentials, as metric labels.
pub const CREDENTIAL_ROLES: &[&str] = &["admin", "operator", "viewer", "service"];
/// Why the auth layer turned a request away.
pub const REFUSAL_REASONS: &[&str] = &["unauthenticated", "unregistered", "revoked", "forbidden"];

/// Latency buckets, seconds: from a fast loopback ACK to a slow edge link.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Renewal latency buckets, seconds: a renewal may wait for a device to come back.
const RENEWAL_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 3600.0, 86400.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder (once) and returns the handle that renders it.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("flotilla_certificate_renewal_seconds".into()),
                    RENEWAL_BUCKETS,
                )
                .and_then(|b| b.set_buckets(LATENCY_BUCKETS));
            let recorder = match builder {
                Ok(builder) => builder.build_recorder(),
                Err(_) => PrometheusBuilder::new().build_recorder(),
            };
            let handle = recorder.handle();
            // Another recorder may already be installed (tests embedding several servers); the
            // handle then renders this recorder only, which nothing writes to.
            let _ = metrics::set_global_recorder(recorder);
            init_series();
            handle
        })
        .clone()
}

/// Help texts of every series (the exposition carries them; `promtool check metrics` wants them).
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        "flotilla_build_info",
        "Always 1; the version label is the running version."
    );
    describe_gauge!(
        "flotilla_ready",
        "1 when state is loaded and the server is not shutting down."
    );
    describe_gauge!(
        "flotilla_database_reachable",
        "1 while the database answers; 0 from the first failed connection until a probe succeeds."
    );
    describe_gauge!(
        "flotilla_agent_sessions",
        "Open agent streams (connected agents)."
    );
    describe_counter!("flotilla_sessions_opened_total", "Agent streams accepted.");
    describe_counter!(
        "flotilla_sessions_refused_total",
        "Agent streams turned away by admission control (told to retry later), by reason."
    );
    describe_counter!(
        "flotilla_connections_refused_total",
        "Connections closed before serving anything, by endpoint and reason (too many pending or from one address, no authenticated request in time)."
    );
    describe_counter!(
        "flotilla_sessions_closed_total",
        "Agent streams ended, by reason."
    );
    describe_counter!(
        "flotilla_specs_pushed_total",
        "Rendered specs pushed to agents."
    );
    describe_histogram!(
        "flotilla_push_ack_seconds",
        metrics::Unit::Seconds,
        "Time from a push to its ACK or NACK."
    );
    describe_counter!("flotilla_nacks_total", "Pushes the agent rejected.");
    describe_gauge!("flotilla_devices", "Devices by sync state.");
    describe_gauge!(
        "flotilla_devices_connection",
        "Devices by connection state."
    );
    describe_gauge!("flotilla_fleet_devices", "Devices each fleet owns.");
    describe_gauge!(
        "flotilla_devices_health",
        "Devices by status summary (Healthy, Degraded, Error, Offline, Unknown)."
    );
    describe_gauge!(
        "flotilla_devices_condition",
        "Devices whose condition is true, by condition."
    );
    describe_gauge!(
        "flotilla_devices_os",
        "Devices by reported os-release ID (the largest 15, the rest as other)."
    );
    describe_gauge!(
        "flotilla_devices_agent_version",
        "Devices by reported agent version (the largest 15, the rest as other)."
    );
    describe_gauge!(
        "flotilla_server_certificate_expiry_seconds",
        "Unix time the server certificate in use expires (it is renewed while serving once a third of its lifetime is left)."
    );
    describe_gauge!(
        "flotilla_devices_update_phase",
        "Devices by the phase of their agent or OS update as they report it (idle, downloading, waitingForWindow, applying, confirming, rebooting)."
    );
    describe_gauge!(
        "flotilla_devices_update_failed",
        "Devices whose last agent or OS update was refused or rolled back, by kind (agent, os)."
    );
    describe_counter!(
        "flotilla_device_updates_total",
        "Agent and OS updates devices reported, by kind (agent, os) and result (succeeded, failed, rolled_back); counted by the replica holding the session."
    );
    describe_counter!(
        "flotilla_drift_corrections_total",
        "Managed items (files) devices found changed behind their back and put back as their spec says."
    );
    describe_counter!(
        "flotilla_status_reports_total",
        "Device status reports taken in or refused (out of bounds, malformed)."
    );
    describe_gauge!(
        "flotilla_enrollment_requests",
        "Enrollment requests by state."
    );
    describe_counter!("flotilla_certificates_total", "Certificate events by kind.");
    describe_counter!(
        "flotilla_tpm_attestations_total",
        "TPM attestation steps at enrollment by result."
    );
    describe_gauge!(
        "flotilla_certificates_expiring",
        "Devices whose current certificate expires within the window."
    );
    describe_gauge!(
        "flotilla_certificates_renewal_due",
        "Devices whose certificate is due for renewal and not yet renewed."
    );
    describe_gauge!(
        "flotilla_certificate_renewals_running",
        "Renewals this replica runs (asked, not yet back on the new certificate)."
    );
    describe_gauge!(
        "flotilla_certificate_renewals_waiting",
        "Connected devices in line for a renewal slot on this replica."
    );
    describe_histogram!(
        "flotilla_certificate_renewal_seconds",
        metrics::Unit::Seconds,
        "From asking a device to renew to issuing its certificate."
    );
    describe_counter!(
        "flotilla_admin_requests_total",
        "Admin RPCs by method and status code."
    );
    describe_histogram!(
        "flotilla_admin_request_seconds",
        metrics::Unit::Seconds,
        "Admin RPC latency by method."
    );
    describe_gauge!("flotilla_rollouts_open", "Rollouts progressing or paused.");
    describe_gauge!(
        "flotilla_rollout_progress",
        "Share of a fleet's devices that applied the revision its open rollout moves to."
    );
    describe_gauge!(
        "flotilla_rollout_paused",
        "1 while the fleet's rollout is paused."
    );
    describe_gauge!(
        "flotilla_replica_info",
        "Always 1; the replica label is this process's name in the change feed and session records."
    );
    describe_gauge!(
        "flotilla_change_feed_position",
        "Id of the last change-feed row this replica applied."
    );
    describe_gauge!(
        "flotilla_change_feed_lag_seconds",
        "Age of the last change-feed row when this replica applied it; 0 once it has caught up."
    );
    describe_gauge!(
        "flotilla_rollout_leader",
        "1 while this replica drives rollouts (holds the leader lock)."
    );
    describe_counter!(
        "flotilla_credential_events_total",
        "Admin-API credentials created, renewed and revoked."
    );
    describe_gauge!(
        "flotilla_credentials",
        "Unrevoked admin-API credentials by role."
    );
    describe_gauge!(
        "flotilla_credentials_expiring",
        "Unrevoked admin-API credentials whose newest certificate expires within 7 or 30 days."
    );
    describe_counter!(
        "flotilla_requests_refused_total",
        "Requests the auth layer or a scope check refused, by the caller's role and the reason."
    );
    describe_histogram!(
        "flotilla_store_operation_seconds",
        metrics::Unit::Seconds,
        "Database operation latency by operation."
    );
}

/// Creates every counter at zero, so dashboards and alerts see them before the first event.
fn init_series() {
    describe();
    gauge!("flotilla_build_info", "version" => crate::VERSION).set(1.0);
    counter!("flotilla_sessions_opened_total").absolute(0);
    for reason in SESSION_REFUSAL_REASONS {
        counter!("flotilla_sessions_refused_total", "reason" => *reason).absolute(0);
    }
    for reason in SESSION_CLOSE_REASONS {
        counter!("flotilla_sessions_closed_total", "reason" => *reason).absolute(0);
    }
    for endpoint in ["agent", "admin"] {
        for reason in CONNECTION_REFUSAL_REASONS {
            counter!("flotilla_connections_refused_total", "endpoint" => endpoint, "reason" => *reason)
                .absolute(0);
        }
    }
    counter!("flotilla_specs_pushed_total").absolute(0);
    counter!("flotilla_nacks_total").absolute(0);
    counter!("flotilla_drift_corrections_total").absolute(0);
    for result in ["accepted", "refused"] {
        counter!("flotilla_status_reports_total", "result" => result).absolute(0);
    }
    for kind in ["agent", "os"] {
        for result in ["succeeded", "failed", "rolled_back"] {
            counter!("flotilla_device_updates_total", "kind" => kind, "result" => result)
                .absolute(0);
        }
    }
    for event in CERTIFICATE_EVENTS {
        counter!("flotilla_certificates_total", "event" => *event).absolute(0);
    }
    for event in CREDENTIAL_EVENTS {
        counter!("flotilla_credential_events_total", "event" => *event).absolute(0);
    }
    for role in CREDENTIAL_ROLES {
        for reason in REFUSAL_REASONS {
            counter!("flotilla_requests_refused_total", "role" => *role, "reason" => *reason)
                .absolute(0);
        }
    }
    for result in TPM_ATTESTATION_RESULTS {
        counter!("flotilla_tpm_attestations_total", "result" => *result).absolute(0);
    }
}

/// Steps of TPM attestation: evidence checked and challenged, answer verified, either refused.
pub const TPM_ATTESTATION_RESULTS: &[&str] = &["challenged", "verified", "refused"];

/// Counts a TPM attestation at enrollment by result.
pub fn tpm_attestation(result: &'static str) {
    counter!("flotilla_tpm_attestations_total", "result" => result).increment(1);
}

/// Counts a session opened.
pub fn session_opened() {
    counter!("flotilla_sessions_opened_total").increment(1);
}

/// Why admission control turned a session away.
const SESSION_REFUSAL_REASONS: &[&str] = &["opening", "max_sessions"];
const CONNECTION_REFUSAL_REASONS: &[&str] = &[
    "too_many_pending",
    "too_many_from_address",
    "handshake_failed",
    "abandoned",
    "timeout",
];

/// A connection was closed before it served anything (`reason` from a fixed set).
pub fn connection_refused(endpoint: &'static str, reason: &'static str) {
    counter!("flotilla_connections_refused_total", "endpoint" => endpoint, "reason" => reason)
        .increment(1);
}

/// Counts a session refused before it opened, by reason.
pub fn session_refused(reason: &'static str) {
    counter!("flotilla_sessions_refused_total", "reason" => reason).increment(1);
}

/// Counts a session closed, by reason.
pub fn session_closed(reason: &'static str) {
    counter!("flotilla_sessions_closed_total", "reason" => reason).increment(1);
}

/// Counts a spec pushed.
pub fn spec_pushed() {
    counter!("flotilla_specs_pushed_total").increment(1);
}

/// An ACK or NACK arrived `elapsed` after its push.
pub fn push_answered(elapsed: Duration, nacked: bool) {
    histogram!("flotilla_push_ack_seconds").record(elapsed.as_secs_f64());
    if nacked {
        counter!("flotilla_nacks_total").increment(1);
    }
}

/// Counts a certificate event (issued, renewed, …).
pub fn certificate_event(event: &'static str) {
    counter!("flotilla_certificates_total", "event" => event).increment(1);
}

/// Counts a credential event (created, renewed, revoked).
pub fn credential_event(event: &'static str) {
    counter!("flotilla_credential_events_total", "event" => event).increment(1);
}

/// A request refused for `reason` (one of `REFUSAL_REASONS`) to a caller of `role` (`unknown`
/// when no identity could be read).
pub fn request_refused(role: &'static str, reason: &'static str) {
    counter!("flotilla_requests_refused_total", "role" => role, "reason" => reason).increment(1);
}

/// Records how long a renewal took, from the request to the certificate in use.
pub fn renewal_latency(elapsed: Duration) {
    histogram!("flotilla_certificate_renewal_seconds").record(elapsed.as_secs_f64());
}

/// Records an admin call: method, gRPC code, duration.
pub fn admin_request(method: String, code: &'static str, elapsed: Duration) {
    histogram!("flotilla_admin_request_seconds", "method" => method.clone())
        .record(elapsed.as_secs_f64());
    counter!("flotilla_admin_requests_total", "method" => method, "code" => code).increment(1);
}

/// Records a store operation's duration.
pub fn store_operation(operation: &'static str, elapsed: Duration) {
    histogram!("flotilla_store_operation_seconds", "operation" => operation)
        .record(elapsed.as_secs_f64());
}

/// Point-in-time values computed from memory just before a scrape.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Loaded and not shutting down.
    pub ready: bool,
    /// The database answered the last operation.
    pub database_reachable: bool,
    /// Sessions this replica holds.
    pub sessions: usize,
    /// Devices SYNCED.
    pub synced: usize,
    /// Devices PENDING.
    pub pending: usize,
    /// Devices in ERROR.
    pub error: usize,
    /// Devices OFFLINE.
    pub offline: usize,
    /// Devices whose certificate was revoked.
    pub revoked: usize,
    /// Devices with a session on any replica.
    pub online: usize,
    /// Devices per fleet.
    pub fleets: Vec<(String, usize)>,
    /// Enrollment requests waiting for a decision.
    pub enrollments_pending: i64,
    /// Enrollment requests approved.
    pub enrollments_approved: i64,
    /// Enrollment requests denied.
    pub enrollments_denied: i64,
    /// Device certificates expiring within 7 days.
    pub expiring_7d: usize,
    /// Device certificates expiring within 30 days.
    pub expiring_30d: usize,
    /// Device certificates in their renewal window.
    pub renewal_due: usize,
    /// Renewals this replica runs, and devices in line for one.
    pub renewals: (usize, usize),
    /// Open rollouts: (fleet, share of devices synced on the new revision, paused).
    pub rollouts: Vec<(String, f64, bool)>,
    /// This replica's name.
    pub replica: String,
    /// Whether this replica drives rollouts.
    pub leading: bool,
    /// The last change-feed row applied, and how old it was then (0 once caught up).
    pub feed_position: i64,
    /// How old the last applied feed row was when applied, seconds.
    pub feed_lag_seconds: f64,
    /// Devices by status summary and by true condition (names as in `status::conditions`).
    pub summaries: Vec<(&'static str, usize)>,
    /// Devices by true condition.
    pub conditions: Vec<(&'static str, usize)>,
    /// Devices by the phase of their agent or OS update (`waitingForWindow`, ...), and devices
    /// whose last update failed, by kind (`agent`, `os`).
    pub update_phases: Vec<(&'static str, usize)>,
    /// Devices whose last update failed, by kind.
    pub update_failures: Vec<(&'static str, usize)>,
    /// Devices by os-release ID and by agent version, at most `MAX_VERSION_SERIES` each.
    pub os: Vec<(String, usize)>,
    /// Devices by agent version.
    pub agent_versions: Vec<(String, usize)>,
    /// Unrevoked credentials: role and how long until the newest certificate expires.
    pub credentials: Vec<(&'static str, Duration)>,
}

/// Most distinct values of a device-reported label; the rest are summed as `other`.
pub const MAX_VERSION_SERIES: usize = 16;

/// The largest `MAX_VERSION_SERIES - 1` groups by count, the rest as `other`.
pub fn bounded_groups(groups: impl IntoIterator<Item = (String, usize)>) -> Vec<(String, usize)> {
    let mut groups: Vec<(String, usize)> = groups.into_iter().collect();
    if groups.len() <= MAX_VERSION_SERIES {
        return groups;
    }
    groups.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let rest: usize = groups.drain(MAX_VERSION_SERIES - 1..).map(|(_, n)| n).sum();
    groups.push(("other".to_string(), rest));
    groups
}

/// Managed items a device reported it put back as its spec says.
pub fn drift_corrected(items: usize) {
    counter!("flotilla_drift_corrections_total").increment(items as u64);
}

/// When the server certificate in use expires (Unix seconds).
pub fn server_certificate_expiry(not_after: i64) {
    gauge!("flotilla_server_certificate_expiry_seconds").set(not_after as f64);
}

/// An agent or OS update a device reported finished (`succeeded`, `failed`, `rolled_back`).
pub fn device_update(kind: &'static str, result: &'static str) {
    counter!("flotilla_device_updates_total", "kind" => kind, "result" => result).increment(1);
}

/// A status report taken in, or refused.
pub fn status_report(accepted: bool) {
    let result = if accepted { "accepted" } else { "refused" };
    counter!("flotilla_status_reports_total", "result" => result).increment(1);
}

/// Sets the gauges from `snapshot`.
pub fn publish(snapshot: &Snapshot) {
    gauge!("flotilla_ready").set(if snapshot.ready { 1.0 } else { 0.0 });
    gauge!("flotilla_database_reachable").set(if snapshot.database_reachable {
        1.0
    } else {
        0.0
    });
    gauge!("flotilla_agent_sessions").set(snapshot.sessions as f64);
    if !snapshot.replica.is_empty() {
        gauge!("flotilla_replica_info", "replica" => snapshot.replica.clone()).set(1.0);
    }
    gauge!("flotilla_rollout_leader").set(if snapshot.leading { 1.0 } else { 0.0 });
    gauge!("flotilla_change_feed_position").set(snapshot.feed_position as f64);
    gauge!("flotilla_change_feed_lag_seconds").set(snapshot.feed_lag_seconds);
    for (state, count) in [
        ("synced", snapshot.synced),
        ("pending", snapshot.pending),
        ("error", snapshot.error),
        ("offline", snapshot.offline),
        ("revoked", snapshot.revoked),
    ] {
        gauge!("flotilla_devices", "sync_state" => state).set(count as f64);
    }
    gauge!("flotilla_devices_connection", "state" => "online").set(snapshot.online as f64);
    gauge!("flotilla_devices_connection", "state" => "offline").set(
        (snapshot.synced + snapshot.pending + snapshot.error + snapshot.offline)
            .saturating_sub(snapshot.online) as f64,
    );
    for (fleet, count) in &snapshot.fleets {
        gauge!("flotilla_fleet_devices", "fleet" => fleet.clone()).set(*count as f64);
    }
    for (summary, count) in &snapshot.summaries {
        gauge!("flotilla_devices_health", "health" => *summary).set(*count as f64);
    }
    for (condition, count) in &snapshot.conditions {
        gauge!("flotilla_devices_condition", "condition" => *condition).set(*count as f64);
    }
    for (os, count) in &snapshot.os {
        gauge!("flotilla_devices_os", "os" => os.clone()).set(*count as f64);
    }
    for (phase, count) in &snapshot.update_phases {
        gauge!("flotilla_devices_update_phase", "phase" => *phase).set(*count as f64);
    }
    for (kind, count) in &snapshot.update_failures {
        gauge!("flotilla_devices_update_failed", "kind" => *kind).set(*count as f64);
    }
    for (version, count) in &snapshot.agent_versions {
        gauge!("flotilla_devices_agent_version", "version" => version.clone()).set(*count as f64);
    }
    for (state, count) in [
        ("pending", snapshot.enrollments_pending),
        ("approved", snapshot.enrollments_approved),
        ("denied", snapshot.enrollments_denied),
    ] {
        gauge!("flotilla_enrollment_requests", "state" => state).set(count as f64);
    }
    gauge!("flotilla_certificates_expiring", "within" => "7d").set(snapshot.expiring_7d as f64);
    gauge!("flotilla_certificates_expiring", "within" => "30d").set(snapshot.expiring_30d as f64);
    gauge!("flotilla_certificates_renewal_due").set(snapshot.renewal_due as f64);
    gauge!("flotilla_certificate_renewals_running").set(snapshot.renewals.0 as f64);
    gauge!("flotilla_certificate_renewals_waiting").set(snapshot.renewals.1 as f64);
    for role in CREDENTIAL_ROLES {
        let count = snapshot
            .credentials
            .iter()
            .filter(|(r, _)| r == role)
            .count();
        gauge!("flotilla_credentials", "role" => *role).set(count as f64);
    }
    for (within, days) in [("7d", 7), ("30d", 30)] {
        let limit = Duration::from_secs(days * 24 * 3600);
        let count = snapshot
            .credentials
            .iter()
            .filter(|(_, left)| *left <= limit)
            .count();
        gauge!("flotilla_credentials_expiring", "within" => within).set(count as f64);
    }
    gauge!("flotilla_rollouts_open").set(snapshot.rollouts.len() as f64);
    for (fleet, progress, paused) in &snapshot.rollouts {
        gauge!("flotilla_rollout_progress", "fleet" => fleet.clone()).set(*progress);
        gauge!("flotilla_rollout_paused", "fleet" => fleet.clone()).set(if *paused {
            1.0
        } else {
            0.0
        });
    }
}

//! Conditions and the summary: what the control plane concludes about a device from its session,
//! its sync progress, its certificate and its own report, Kubernetes-style (type, status, reason,
//! message, last transition), and the one word derived from them by the rules below.
//!
//! Summary rules, first match wins:
//! 0. `CertificateExpiring` because the certificate was revoked: `Revoked` (out of the fleet until
//!    it enrolls again).
//! 1. `Online` is false: `Offline` if the device was ever seen, else `Unknown`.
//! 2. `Error`: `SpecApplied` false because the device rejected the spec or it could not be
//!    rendered; `CertificateExpiring` because the certificate expired; `ResourcePressure` critical;
//!    `WorkloadFailed` (a managed unit failed, a container stopped or is unhealthy).
//! 3. `Degraded`: `ResourcePressure` true (warning); `CertificateExpiring` because renewal failed;
//!    `Drifted` with an item the device left as it is (`drift: report`, or the correction failed);
//!    `UpdateFailed` (an agent or OS update was refused or rolled back; the device runs what it ran).
//! 4. `Healthy` otherwise (an update in progress is healthy).

use super::{Alert, DriftItem, Severity, UpdateKind, UpdatePhase, UpdateState, WorkloadStatus};
use std::borrow::Cow;
use std::fmt;

/// The kinds of condition a device has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ConditionType {
    /// The device holds a session.
    Online,
    /// An update (spec, agent or OS) is on its way to the device.
    Updating,
    /// The device runs the desired spec.
    SpecApplied,
    /// A managed item differed from the spec at the last check.
    Drifted,
    /// A managed unit failed, or a container stopped or is unhealthy.
    WorkloadFailed,
    /// A resource monitor's threshold is exceeded.
    ResourcePressure,
    /// The certificate is due, failed to renew, expired or was revoked.
    CertificateExpiring,
    /// The last agent or OS update failed.
    UpdateFailed,
}

impl ConditionType {
    /// Every kind, in the order they are shown.
    pub const ALL: [ConditionType; 8] = [
        ConditionType::Online,
        ConditionType::Updating,
        ConditionType::SpecApplied,
        ConditionType::Drifted,
        ConditionType::WorkloadFailed,
        ConditionType::ResourcePressure,
        ConditionType::CertificateExpiring,
        ConditionType::UpdateFailed,
    ];

    /// The name shown and selected by (`SpecApplied`).
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionType::Online => "Online",
            ConditionType::Updating => "Updating",
            ConditionType::SpecApplied => "SpecApplied",
            ConditionType::Drifted => "Drifted",
            ConditionType::WorkloadFailed => "WorkloadFailed",
            ConditionType::ResourcePressure => "ResourcePressure",
            ConditionType::CertificateExpiring => "CertificateExpiring",
            ConditionType::UpdateFailed => "UpdateFailed",
        }
    }
}

/// Whether a condition holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConditionStatus {
    /// It holds.
    True,
    /// It does not.
    False,
    /// Nothing tells yet.
    Unknown,
}

impl ConditionStatus {
    /// `True`, `False` or `Unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionStatus::True => "True",
            ConditionStatus::False => "False",
            ConditionStatus::Unknown => "Unknown",
        }
    }
}

/// A condition as it stands, with when its status last changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// Which condition.
    pub kind: ConditionType,
    /// Whether it holds.
    pub status: ConditionStatus,
    /// CamelCase, from a fixed set per type.
    pub reason: &'static str,
    /// The detail, in words.
    pub message: String,
    /// When its status last changed, Unix milliseconds.
    pub last_transition_ms: i64,
}

/// One word for a device, by the rules in the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Summary {
    /// Nothing wrong.
    Healthy,
    /// Working, with something an operator should look at.
    Degraded,
    /// Not doing what it should.
    Error,
    /// Seen before, no session now.
    Offline,
    /// Never seen.
    Unknown,
    /// Its certificate was revoked: out until it enrolls again.
    Revoked,
}

impl Summary {
    /// Every summary, in the order they are shown.
    pub const ALL: [Summary; 6] = [
        Summary::Healthy,
        Summary::Degraded,
        Summary::Error,
        Summary::Offline,
        Summary::Unknown,
        Summary::Revoked,
    ];

    /// The name shown and selected by (`Degraded`).
    pub fn as_str(self) -> &'static str {
        match self {
            Summary::Healthy => "Healthy",
            Summary::Degraded => "Degraded",
            Summary::Error => "Error",
            Summary::Offline => "Offline",
            Summary::Unknown => "Unknown",
            Summary::Revoked => "Revoked",
        }
    }

    /// The summary a name stands for (case-insensitive).
    pub fn parse(text: &str) -> Option<Summary> {
        Summary::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the certificate stands, as far as conditions care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateStanding {
    /// Not in its renewal window.
    Valid,
    /// In its renewal window.
    RenewalDue,
    /// The last renewal failed.
    RenewalFailed,
    /// Past its expiry.
    Expired,
    /// Revoked.
    Revoked,
}

/// Everything conditions are derived from.
#[derive(Debug, Clone, Default)]
pub struct Inputs<'a> {
    /// A session is open.
    pub online: bool,
    /// The device ever opened a session.
    pub ever_seen: bool,
    /// The version it should run (`None` before a render succeeded).
    pub desired_version: Option<&'a str>,
    /// The version it last acknowledged.
    pub acked_version: Option<&'a str>,
    /// The version the device rejected and why.
    pub nacked: Option<(&'a str, &'a str)>,
    /// Why its spec could not be rendered.
    pub render_error: Option<&'a str>,
    /// The version pushed and not answered yet.
    pub sent_version: Option<&'a str>,
    /// Its certificate's standing, with the last renewal error.
    pub certificate: Option<(CertificateStanding, Option<&'a str>)>,
    /// `None` while the device never reported resources (an older agent, or none yet).
    pub alerts: Option<&'a [Alert]>,
    /// What the last drift check found; `None` while the device reported none.
    pub drift: Option<&'a [DriftItem]>,
    /// The managed units and containers; `None` while the device reported none.
    pub workloads: Option<&'a [WorkloadStatus]>,
    /// The device's software and its update in progress; `None` while it reported none.
    pub update: Option<&'a UpdateState>,
}

/// A condition as derived now, before its transition time is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// Which condition.
    pub kind: ConditionType,
    /// Whether it holds.
    pub status: ConditionStatus,
    /// Why, as one CamelCase word.
    pub reason: &'static str,
    /// The detail, in words (most are fixed text, so nothing is allocated for them).
    pub message: Cow<'static, str>,
}

fn observed(
    kind: ConditionType,
    status: ConditionStatus,
    reason: &'static str,
    message: impl Into<Cow<'static, str>>,
) -> Observed {
    Observed {
        kind,
        status,
        reason,
        message: message.into(),
    }
}

/// The conditions for these inputs, one per type, in `ConditionType::ALL` order (an array: this
/// runs on every change of every device).
pub fn evaluate(inputs: &Inputs<'_>) -> [Observed; ConditionType::ALL.len()] {
    use ConditionStatus::{False, True, Unknown};
    use ConditionType as T;
    let online = if inputs.online {
        observed(T::Online, True, "SessionOpen", "the device holds a session")
    } else if inputs.ever_seen {
        observed(T::Online, False, "Disconnected", "no open session")
    } else {
        observed(
            T::Online,
            False,
            "NeverConnected",
            "the device never opened a session",
        )
    };
    let rejected = inputs
        .nacked
        .filter(|(version, _)| Some(*version) == inputs.desired_version);
    let applied = match (inputs.desired_version, inputs.render_error, rejected) {
        (_, Some(error), _) => observed(T::SpecApplied, False, "RenderFailed", error.to_string()),
        (_, None, Some((version, error))) => observed(
            T::SpecApplied,
            False,
            "Rejected",
            format!("version {version}: {error}"),
        ),
        (None, None, None) => observed(T::SpecApplied, Unknown, "NoSpec", "nothing rendered yet"),
        (Some(desired), None, None) if inputs.acked_version == Some(desired) => observed(
            T::SpecApplied,
            True,
            "Applied",
            format!("running version {desired}"),
        ),
        (Some(desired), None, None) => observed(
            T::SpecApplied,
            False,
            "NotYetApplied",
            format!("version {desired} not acknowledged yet"),
        ),
    };
    let phase = inputs.update.map(|u| (u.phase, u));
    let updating = match (inputs.online, applied.reason, inputs.sent_version) {
        (true, "NotYetApplied", Some(sent)) => match phase {
            Some((UpdatePhase::WaitingForWindow, update)) => observed(
                T::Updating,
                True,
                "WaitingForWindow",
                format!(
                    "version {sent}: {} waits for its window{}",
                    update.target,
                    update
                        .next_window_ms
                        .map(|at| format!(", which opens at {}", super::rfc3339(at)))
                        .unwrap_or_default()
                ),
            ),
            Some((UpdatePhase::Downloading, update)) => observed(
                T::Updating,
                True,
                "Downloading",
                format!("version {sent}: downloading {}", update.target),
            ),
            Some((UpdatePhase::Rebooting, update)) => observed(
                T::Updating,
                True,
                "Rebooting",
                format!("version {sent}: rebooting into {}", update.target),
            ),
            _ => observed(
                T::Updating,
                True,
                "Applying",
                format!("version {sent} sent"),
            ),
        },
        (true, "NotYetApplied", None) => observed(
            T::Updating,
            True,
            "Waiting",
            "the new version waits for its wave or rollout batch",
        ),
        (false, "NotYetApplied", _) => observed(
            T::Updating,
            Unknown,
            "Disconnected",
            "the new version is sent when the device connects",
        ),
        _ => observed(T::Updating, False, "UpToDate", "no update in progress"),
    };
    let pressure = match inputs.alerts {
        None => observed(
            T::ResourcePressure,
            Unknown,
            "NotReported",
            "the device has not reported resources",
        ),
        Some([]) => observed(
            T::ResourcePressure,
            False,
            "WithinThresholds",
            "no monitor fires",
        ),
        Some(alerts) => {
            let critical = alerts.iter().any(|a| a.severity == Severity::Critical);
            let message = alerts
                .iter()
                .map(Alert::describe)
                .collect::<Vec<_>>()
                .join(", ");
            let reason = if critical { "Critical" } else { "Warning" };
            observed(T::ResourcePressure, True, reason, message)
        }
    };
    let certificate = match inputs.certificate {
        None => observed(
            T::CertificateExpiring,
            Unknown,
            "NotTracked",
            "no certificate known",
        ),
        Some((CertificateStanding::Valid, _)) => observed(
            T::CertificateExpiring,
            False,
            "Valid",
            "not yet in its renewal window",
        ),
        Some((CertificateStanding::RenewalDue, _)) => observed(
            T::CertificateExpiring,
            True,
            "RenewalDue",
            "in its renewal window; the device is asked to renew",
        ),
        Some((CertificateStanding::RenewalFailed, error)) => observed(
            T::CertificateExpiring,
            True,
            "RenewalFailed",
            error.unwrap_or("the last renewal was refused").to_string(),
        ),
        Some((CertificateStanding::Expired, _)) => observed(
            T::CertificateExpiring,
            True,
            "Expired",
            "expired; only recovery can bring the device back",
        ),
        Some((CertificateStanding::Revoked, _)) => observed(
            T::CertificateExpiring,
            True,
            "Revoked",
            "revoked; the device must enroll again",
        ),
    };
    let drifted = match inputs.drift {
        None => observed(
            T::Drifted,
            Unknown,
            "NotChecked",
            "the device has not reported a drift check",
        ),
        Some([]) => observed(
            T::Drifted,
            False,
            "InSync",
            "everything managed matches the spec",
        ),
        Some(items) => {
            let message = items
                .iter()
                .map(DriftItem::describe)
                .collect::<Vec<_>>()
                .join(", ");
            let reason = if items.iter().all(|i| i.corrected) {
                "Corrected"
            } else {
                "Reported"
            };
            observed(T::Drifted, True, reason, message)
        }
    };
    let workloads = match inputs.workloads {
        None => observed(
            T::WorkloadFailed,
            Unknown,
            "NotReported",
            "the device has not reported its workloads",
        ),
        Some(items) => {
            let failures: Vec<String> = items.iter().filter_map(WorkloadStatus::failure).collect();
            if failures.is_empty() {
                observed(
                    T::WorkloadFailed,
                    False,
                    "AllRunning",
                    "no managed workload failed",
                )
            } else {
                observed(T::WorkloadFailed, True, "Failed", failures.join(", "))
            }
        }
    };
    let update_failed = match inputs.update {
        None => observed(
            T::UpdateFailed,
            Unknown,
            "NotReported",
            "the device has not reported its software",
        ),
        Some(UpdateState {
            last_failure: Some(failure),
            ..
        }) => {
            let reason = match failure.kind {
                UpdateKind::Agent => "AgentUpdateFailed",
                UpdateKind::Os => "OsUpdateFailed",
            };
            observed(T::UpdateFailed, True, reason, failure.describe())
        }
        Some(_) => observed(
            T::UpdateFailed,
            False,
            "NoFailure",
            "no agent or OS update failed",
        ),
    };
    [
        online,
        updating,
        applied,
        drifted,
        workloads,
        pressure,
        certificate,
        update_failed,
    ]
}

/// The summary of a set of conditions (rules in the module documentation). One pass and nothing
/// allocated: every scrape summarises every device.
pub fn summarize<'a>(
    conditions: impl IntoIterator<Item = (ConditionType, ConditionStatus, &'a str)>,
) -> Summary {
    let mut revoked = false;
    let mut offline = None;
    let mut degraded = false;
    let mut error = false;
    for (kind, status, reason) in conditions {
        match (kind, status, reason) {
            (ConditionType::CertificateExpiring, ConditionStatus::True, "Revoked") => {
                revoked = true;
            }
            (ConditionType::Online, ConditionStatus::False, "NeverConnected") => {
                offline = Some(Summary::Unknown);
            }
            (ConditionType::Online, ConditionStatus::False, _) => offline = Some(Summary::Offline),
            (ConditionType::SpecApplied, ConditionStatus::False, "Rejected" | "RenderFailed")
            | (ConditionType::CertificateExpiring, ConditionStatus::True, "Expired")
            | (ConditionType::ResourcePressure, ConditionStatus::True, "Critical")
            | (ConditionType::WorkloadFailed, ConditionStatus::True, _) => error = true,
            (ConditionType::ResourcePressure, ConditionStatus::True, _)
            | (ConditionType::CertificateExpiring, ConditionStatus::True, "RenewalFailed")
            | (ConditionType::Drifted, ConditionStatus::True, "Reported")
            | (ConditionType::UpdateFailed, ConditionStatus::True, _) => degraded = true,
            _ => {}
        }
    }
    if revoked {
        Summary::Revoked
    } else if let Some(offline) = offline {
        offline
    } else if error {
        Summary::Error
    } else if degraded {
        Summary::Degraded
    } else {
        Summary::Healthy
    }
}

/// A device's conditions with their transition times: a condition's time moves only when its
/// status changes (as in Kubernetes), not when its reason or message does.
#[derive(Debug, Clone)]
pub struct Ledger {
    conditions: Vec<Condition>,
    /// What the conditions add up to, and which of them hold (indexed like `ConditionType::ALL`),
    /// as of the last settle: a scrape counts every device, and these sit beside the device's
    /// other fields where the conditions themselves are a pointer away.
    summary: Summary,
    holding: [bool; ConditionType::ALL.len()],
}

impl Default for Ledger {
    fn default() -> Self {
        Ledger {
            conditions: Vec::new(),
            summary: Summary::Unknown,
            holding: [false; ConditionType::ALL.len()],
        }
    }
}

impl Condition {
    /// Takes in the same condition as derived now: its time moves only if its status did.
    /// Returns whether the status changed.
    fn take(&mut self, observed: Observed, now_ms: i64) -> bool {
        let changed = self.status != observed.status;
        if changed {
            self.status = observed.status;
            self.last_transition_ms = now_ms;
        }
        self.reason = observed.reason;
        if self.message != observed.message {
            self.message = observed.message.into_owned();
        }
        changed
    }
}

impl Ledger {
    /// Takes in the conditions derived now. Returns whether any status changed.
    pub fn settle(&mut self, observed: [Observed; ConditionType::ALL.len()], now_ms: i64) -> bool {
        let changed = self.take_in(observed, now_ms);
        self.summary = summarize(self.conditions.iter().map(|c| (c.kind, c.status, c.reason)));
        // The ledger is in `ConditionType::ALL` order, so what holds is read by position.
        self.holding = std::array::from_fn(|index| {
            self.conditions
                .get(index)
                .is_some_and(|c| c.status == ConditionStatus::True)
        });
        changed
    }

    fn take_in(&mut self, observed: [Observed; ConditionType::ALL.len()], now_ms: i64) -> bool {
        // Only `settle` writes the ledger and `evaluate` derives every type in `ALL` order, so a
        // ledger is either new or holds the same types in the same order: conditions are updated
        // in place and only messages that changed are copied.
        if self.conditions.is_empty() {
            self.conditions = observed
                .into_iter()
                .map(|o| Condition {
                    kind: o.kind,
                    status: o.status,
                    reason: o.reason,
                    message: o.message.into_owned(),
                    last_transition_ms: now_ms,
                })
                .collect();
            return true;
        }
        self.conditions
            .iter_mut()
            .zip(observed)
            .fold(false, |changed, (old, o)| {
                debug_assert_eq!(old.kind, o.kind, "evaluate keeps ConditionType::ALL order");
                old.take(o, now_ms) | changed
            })
    }

    /// The conditions, in `ConditionType::ALL` order.
    pub fn conditions(&self) -> &[Condition] {
        &self.conditions
    }

    /// What the conditions add up to.
    pub fn summary(&self) -> Summary {
        self.summary
    }

    /// Whether each condition holds, indexed like `ConditionType::ALL`.
    pub fn holding(&self) -> [bool; ConditionType::ALL.len()] {
        self.holding
    }

    /// The condition of `kind`, if derived.
    pub fn status_of(&self, kind: ConditionType) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.kind == kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::MonitorKind;

    fn synced<'a>() -> Inputs<'a> {
        Inputs {
            online: true,
            ever_seen: true,
            desired_version: Some("v2"),
            acked_version: Some("v2"),
            sent_version: Some("v2"),
            certificate: Some((CertificateStanding::Valid, None)),
            alerts: Some(&[]),
            ..Default::default()
        }
    }

    fn summary_of(inputs: &Inputs<'_>) -> Summary {
        let mut ledger = Ledger::default();
        ledger.settle(evaluate(inputs), 0);
        ledger.summary()
    }

    fn reason(inputs: &Inputs<'_>, kind: ConditionType) -> (&'static str, ConditionStatus) {
        let found = evaluate(inputs)
            .into_iter()
            .find(|o| o.kind == kind)
            .unwrap();
        (found.reason, found.status)
    }

    #[test]
    fn a_revoked_certificate_makes_the_device_revoked_whatever_else_holds() {
        let revoked = Inputs {
            online: false,
            certificate: Some((CertificateStanding::Revoked, None)),
            ..synced()
        };
        assert_eq!(summary_of(&revoked), Summary::Revoked);
        assert_eq!(
            reason(&revoked, ConditionType::CertificateExpiring),
            ("Revoked", ConditionStatus::True)
        );
        let offline = Inputs {
            online: false,
            ..synced()
        };
        assert_eq!(summary_of(&offline), Summary::Offline);
    }

    #[test]
    fn a_failed_update_degrades_a_device_and_a_window_shows_in_updating() {
        use crate::status::{UpdateFailure, UpdateKind};
        let failed = UpdateState {
            last_failure: Some(UpdateFailure {
                kind: UpdateKind::Agent,
                target: "1.4.0".into(),
                reason: "it exited".into(),
                rolled_back: true,
                at_ms: 0,
            }),
            ..Default::default()
        };
        let inputs = Inputs {
            update: Some(&failed),
            ..synced()
        };
        assert_eq!(summary_of(&inputs), Summary::Degraded);
        assert_eq!(
            reason(&inputs, ConditionType::UpdateFailed),
            ("AgentUpdateFailed", ConditionStatus::True)
        );
        let waiting = UpdateState {
            phase: UpdatePhase::WaitingForWindow,
            target: "agent 1.5.0".into(),
            next_window_ms: Some(1_796_608_800_000),
            ..Default::default()
        };
        let inputs = Inputs {
            acked_version: Some("v1"),
            update: Some(&waiting),
            ..synced()
        };
        assert_eq!(
            reason(&inputs, ConditionType::Updating),
            ("WaitingForWindow", ConditionStatus::True)
        );
        assert_eq!(summary_of(&inputs), Summary::Healthy);
    }

    #[test]
    fn summary_follows_the_documented_rules() {
        assert_eq!(summary_of(&synced()), Summary::Healthy);
        let offline = Inputs {
            online: false,
            ..synced()
        };
        assert_eq!(summary_of(&offline), Summary::Offline);
        let never = Inputs {
            online: false,
            ever_seen: false,
            ..synced()
        };
        assert_eq!(summary_of(&never), Summary::Unknown);
        let updating = Inputs {
            acked_version: Some("v1"),
            ..synced()
        };
        assert_eq!(summary_of(&updating), Summary::Healthy);
        assert_eq!(
            reason(&updating, ConditionType::Updating),
            ("Applying", ConditionStatus::True)
        );
        let rejected = Inputs {
            acked_version: Some("v1"),
            nacked: Some(("v2", "disk full")),
            ..synced()
        };
        assert_eq!(summary_of(&rejected), Summary::Error);
        assert_eq!(reason(&rejected, ConditionType::Updating).0, "UpToDate");
        // An old rejection of another version is no longer an error.
        let old_nack = Inputs {
            nacked: Some(("v1", "disk full")),
            ..synced()
        };
        assert_eq!(summary_of(&old_nack), Summary::Healthy);
        let render = Inputs {
            render_error: Some("undefined value"),
            ..synced()
        };
        assert_eq!(summary_of(&render), Summary::Error);
        let failed = Inputs {
            certificate: Some((CertificateStanding::RenewalFailed, Some("rate limited"))),
            ..synced()
        };
        assert_eq!(summary_of(&failed), Summary::Degraded);
        let due = Inputs {
            certificate: Some((CertificateStanding::RenewalDue, None)),
            ..synced()
        };
        assert_eq!(summary_of(&due), Summary::Healthy);
        let expired = Inputs {
            certificate: Some((CertificateStanding::Expired, None)),
            ..synced()
        };
        assert_eq!(summary_of(&expired), Summary::Error);
        let unreported = Inputs {
            alerts: None,
            ..synced()
        };
        assert_eq!(summary_of(&unreported), Summary::Healthy);
        assert_eq!(
            reason(&unreported, ConditionType::ResourcePressure).1,
            ConditionStatus::Unknown
        );
    }

    #[test]
    fn pressure_by_severity() {
        let mut alert = Alert {
            monitor: MonitorKind::Memory,
            path: String::new(),
            severity: Severity::Warning,
            percent: 85,
            threshold: 80,
            since_ms: 0,
        };
        let warning = [alert.clone()];
        let inputs = Inputs {
            alerts: Some(&warning),
            ..synced()
        };
        assert_eq!(summary_of(&inputs), Summary::Degraded);
        let [.., pressure, _, _] = evaluate(&inputs);
        assert_eq!(pressure.message, "memory 85% >= 80% (warning)");
        alert.severity = Severity::Critical;
        let critical = [alert];
        assert_eq!(
            summary_of(&Inputs {
                alerts: Some(&critical),
                ..synced()
            }),
            Summary::Error
        );
    }

    #[test]
    fn a_failed_unit_or_stopped_container_is_an_error() {
        let unit = |state: &str| WorkloadStatus {
            kind: "unit".into(),
            name: "app.service".into(),
            state: state.into(),
            ..Default::default()
        };
        let running = [unit("active")];
        let inputs = Inputs {
            workloads: Some(&running),
            ..synced()
        };
        assert_eq!(
            reason(&inputs, ConditionType::WorkloadFailed),
            ("AllRunning", ConditionStatus::False)
        );
        assert_eq!(summary_of(&inputs), Summary::Healthy);
        let failed = [unit("active"), unit("failed")];
        let inputs = Inputs {
            workloads: Some(&failed),
            ..synced()
        };
        let found = evaluate(&inputs)
            .into_iter()
            .find(|o| o.kind == ConditionType::WorkloadFailed)
            .unwrap();
        assert_eq!(
            (found.status, found.message.as_ref()),
            (ConditionStatus::True, "unit app.service failed")
        );
        assert_eq!(summary_of(&inputs), Summary::Error);
        let container = |state: &str, health: &str| WorkloadStatus {
            kind: "container".into(),
            name: "web".into(),
            state: state.into(),
            health: health.into(),
            ..Default::default()
        };
        assert_eq!(container("running", "").failure(), None);
        assert_eq!(
            container("exited", "").failure().unwrap(),
            "container web exited"
        );
        assert_eq!(
            container("running", "unhealthy").failure().unwrap(),
            "container web unhealthy"
        );
        assert_eq!(
            reason(&synced(), ConditionType::WorkloadFailed).1,
            ConditionStatus::Unknown
        );
    }

    #[test]
    fn drift_left_alone_degrades_drift_corrected_does_not() {
        let item = |corrected: bool| DriftItem {
            kind: "file".into(),
            name: "/etc/a".into(),
            difference: "content".into(),
            corrected,
            error: String::new(),
        };
        let corrected = [item(true)];
        let inputs = Inputs {
            drift: Some(&corrected),
            ..synced()
        };
        assert_eq!(
            reason(&inputs, ConditionType::Drifted),
            ("Corrected", ConditionStatus::True)
        );
        assert_eq!(summary_of(&inputs), Summary::Healthy);
        let left = [item(true), item(false)];
        let inputs = Inputs {
            drift: Some(&left),
            ..synced()
        };
        assert_eq!(
            reason(&inputs, ConditionType::Drifted),
            ("Reported", ConditionStatus::True)
        );
        assert_eq!(summary_of(&inputs), Summary::Degraded);
        let clean = Inputs {
            drift: Some(&[]),
            ..synced()
        };
        assert_eq!(
            reason(&clean, ConditionType::Drifted),
            ("InSync", ConditionStatus::False)
        );
        assert_eq!(
            reason(&synced(), ConditionType::Drifted).1,
            ConditionStatus::Unknown
        );
    }

    #[test]
    fn transition_time_moves_only_with_the_status() {
        let mut ledger = Ledger::default();
        assert!(ledger.settle(evaluate(&synced()), 10));
        let first = ledger
            .status_of(ConditionType::SpecApplied)
            .unwrap()
            .clone();
        assert_eq!(first.last_transition_ms, 10);
        // Another message, same status: the time stays.
        let v3 = Inputs {
            desired_version: Some("v3"),
            acked_version: Some("v3"),
            ..synced()
        };
        assert!(!ledger.settle(evaluate(&v3), 20));
        let applied = ledger.status_of(ConditionType::SpecApplied).unwrap();
        assert_eq!(applied.last_transition_ms, 10);
        assert_eq!(applied.message, "running version v3");
        let pending = Inputs {
            desired_version: Some("v4"),
            acked_version: Some("v3"),
            ..synced()
        };
        assert!(ledger.settle(evaluate(&pending), 30));
        assert_eq!(
            ledger.status_of(ConditionType::SpecApplied).unwrap().reason,
            "NotYetApplied",
            "the reason follows, in place"
        );
        assert_eq!(
            ledger
                .status_of(ConditionType::SpecApplied)
                .unwrap()
                .last_transition_ms,
            30
        );
        assert_eq!(
            ledger
                .status_of(ConditionType::Online)
                .unwrap()
                .last_transition_ms,
            10
        );
    }

    /// What a scrape counts (the summary and which conditions hold) is kept by every settle and
    /// agrees with the conditions themselves.
    #[test]
    fn the_ledger_keeps_its_summary_and_what_holds_as_it_settles() {
        let mut ledger = Ledger::default();
        assert_eq!(ledger.summary(), Summary::Unknown);
        assert_eq!(ledger.holding(), [false; ConditionType::ALL.len()]);
        let rejected = Inputs {
            desired_version: Some("v3"),
            nacked: Some(("v3", "no such unit")),
            ..synced()
        };
        for inputs in [synced(), rejected, synced()] {
            ledger.settle(evaluate(&inputs), 0);
            let kinds: Vec<ConditionType> = ledger.conditions().iter().map(|c| c.kind).collect();
            assert_eq!(
                kinds,
                ConditionType::ALL,
                "updated in place, in the order shown"
            );
            let holding: Vec<ConditionType> = ConditionType::ALL
                .into_iter()
                .zip(ledger.holding())
                .filter_map(|(kind, holds)| holds.then_some(kind))
                .collect();
            let expected: Vec<ConditionType> = ledger
                .conditions()
                .iter()
                .filter(|c| c.status == ConditionStatus::True)
                .map(|c| c.kind)
                .collect();
            assert_eq!(holding, expected);
            assert_eq!(ledger.summary(), summary_of(&inputs));
        }
        let mut ledger = Ledger::default();
        ledger.settle(
            evaluate(&Inputs {
                desired_version: Some("v3"),
                nacked: Some(("v3", "no such unit")),
                ..synced()
            }),
            0,
        );
        assert_eq!(ledger.summary(), Summary::Error);
        assert!(
            !ledger.holding()[ConditionType::ALL
                .iter()
                .position(|c| *c == ConditionType::SpecApplied)
                .unwrap()]
        );
    }
}

//! What the control plane reports at scrape time: gauges computed from memory (hub, catalog and
//! the enrollment counts kept up to date by the enrollment use cases), so a scrape costs no query.

use super::ControlPlane;
use crate::status::UpdatePhase;
use crate::status::conditions::{ConditionType, Summary};
use crate::store::EnrollmentState;
use crate::telemetry::{Snapshot, bounded_groups};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// Enrollment requests by state, counted once at start and moved on every decision.
#[derive(Debug, Default)]
pub(super) struct EnrollmentCounts {
    pending: AtomicI64,
    approved: AtomicI64,
    denied: AtomicI64,
}

impl EnrollmentCounts {
    fn counter(&self, state: EnrollmentState) -> &AtomicI64 {
        match state {
            EnrollmentState::Pending => &self.pending,
            EnrollmentState::Approved => &self.approved,
            EnrollmentState::Denied => &self.denied,
        }
    }

    /// A request left `from` (if any) for `to` (if any).
    pub(super) fn moved(&self, from: Option<EnrollmentState>, to: Option<EnrollmentState>) {
        if let Some(from) = from {
            self.counter(from).fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(to) = to {
            self.counter(to).fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Requests waiting for a decision.
    pub(super) fn pending(&self) -> i64 {
        self.pending.load(Ordering::Relaxed)
    }

    pub(super) fn reset(&self, pending: i64, approved: i64, denied: i64) {
        self.pending.store(pending, Ordering::Relaxed);
        self.approved.store(approved, Ordering::Relaxed);
        self.denied.store(denied, Ordering::Relaxed);
    }
}

impl ControlPlane {
    /// Counts enrollment requests (at start).
    pub(super) async fn count_enrollments(&self) -> Result<(), super::ControlError> {
        let requests = self.store.list_enrollments(None).await?;
        let count = |state| requests.iter().filter(|r| r.state == state).count() as i64;
        self.enrollment_counts.reset(
            count(EnrollmentState::Pending),
            count(EnrollmentState::Approved),
            count(EnrollmentState::Denied),
        );
        Ok(())
    }

    /// The gauges' current values.
    pub fn metrics_snapshot(&self) -> Snapshot {
        let summary = self.hub.summary(self.now_millis());
        let fleets = self.catalog().fleet_sizes().into_iter().collect();
        let counts = &self.enrollment_counts;
        Snapshot {
            ready: self.is_loaded() && !self.is_shutting_down(),
            database_reachable: self.store.reachability().is_reachable(),
            sessions: summary.sessions,
            synced: summary.synced,
            pending: summary.pending,
            error: summary.error,
            offline: summary.offline,
            revoked: summary.revoked,
            online: summary.online,
            fleets,
            enrollments_pending: counts.pending.load(Ordering::Relaxed),
            enrollments_approved: counts.approved.load(Ordering::Relaxed),
            enrollments_denied: counts.denied.load(Ordering::Relaxed),
            expiring_7d: summary.expiring_7d,
            expiring_30d: summary.expiring_30d,
            renewal_due: summary.renewal_due,
            renewals: self.hub.renewals_in_flight(),
            rollouts: self.rollout_gauges(),
            replica: self.store.replica().to_string(),
            leading: self.leading.load(Ordering::Acquire),
            feed_position: self.feed_position.load(Ordering::Acquire),
            feed_lag_seconds: self.feed_lag_ms.load(Ordering::Acquire) as f64 / 1000.0,
            summaries: Summary::ALL
                .iter()
                .zip(summary.status.summaries)
                .map(|(s, n)| (s.as_str(), n))
                .collect(),
            conditions: ConditionType::ALL
                .iter()
                .zip(summary.status.conditions_true)
                .map(|(c, n)| (c.as_str(), n))
                .collect(),
            update_phases: UpdatePhase::ALL
                .iter()
                .zip(summary.status.update_phases)
                .map(|(p, n)| (p.as_str(), n))
                .collect(),
            update_failures: vec![
                ("agent", summary.status.update_failures[0]),
                ("os", summary.status.update_failures[1]),
            ],
            os: bounded_groups(summary.status.os),
            agent_versions: bounded_groups(summary.status.agent_versions),
            credentials: self
                .credentials
                .live()
                .into_iter()
                .map(|(role, not_after_ms)| {
                    let left = (not_after_ms - self.now_millis()).max(0) as u64;
                    (role.kind(), Duration::from_millis(left))
                })
                .collect(),
        }
    }
}

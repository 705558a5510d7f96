//! The hub's part of device status: each device's last report and its conditions, settled whenever
//! something about the device changes (so transition times are when the change happened, not when
//! somebody looked; a device held by another replica as of its last change, when next read), and
//! counted by summary and condition for metrics.

use super::{DeviceEntry, Hub, RenewalState};
use crate::status::conditions::{CertificateStanding, ConditionType, Inputs, Summary, evaluate};
use crate::status::{DeviceReport, UpdateKind, UpdatePhase};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Devices by summary and by condition, for metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StatusCounts {
    /// Indexed like `Summary::ALL`.
    pub summaries: [usize; Summary::ALL.len()],
    /// Devices whose condition is true, indexed like `ConditionType::ALL`.
    pub conditions_true: [usize; ConditionType::ALL.len()],
    /// Devices by the phase of their update (as reported), indexed like `UpdatePhase::ALL`.
    pub update_phases: [usize; UpdatePhase::ALL.len()],
    /// Devices whose last agent or OS update failed: agent, os.
    pub update_failures: [usize; 2],
    /// Devices by reported os-release ID and by agent version (`unknown` before a report).
    pub os: BTreeMap<String, usize>,
    /// Devices by the agent version they report ("unknown" before a report).
    pub agent_versions: BTreeMap<String, usize>,
}

impl StatusCounts {
    pub(super) fn count(&mut self, entry: &DeviceEntry) {
        let info = entry.report.as_ref().and_then(|r| r.system_info.as_ref());
        fn known(value: Option<&String>) -> &str {
            value
                .map(String::as_str)
                .filter(|v| !v.is_empty())
                .unwrap_or("unknown")
        }
        count_by(&mut self.os, known(info.map(|i| &i.os_id)));
        count_by(
            &mut self.agent_versions,
            known(info.map(|i| &i.agent_version)),
        );
        if let Some(update) = entry.report.as_ref().and_then(|r| r.update.as_ref()) {
            if let Some(i) = UpdatePhase::ALL.iter().position(|p| *p == update.phase) {
                self.update_phases[i] += 1;
            }
            match update.last_failure.as_ref().map(|f| f.kind) {
                Some(UpdateKind::Agent) => self.update_failures[0] += 1,
                Some(UpdateKind::Os) => self.update_failures[1] += 1,
                None => {}
            }
        }
        let summary = entry.ledger.summary();
        if let Some(i) = Summary::ALL.iter().position(|s| *s == summary) {
            self.summaries[i] += 1;
        }
        for (count, holds) in self.conditions_true.iter_mut().zip(entry.ledger.holding()) {
            *count += usize::from(holds);
        }
    }
}

/// Adds one to `key`'s count; a key is copied only the first time it is seen.
fn count_by(counts: &mut BTreeMap<String, usize>, key: &str) {
    match counts.get_mut(key) {
        Some(count) => *count += 1,
        None => {
            counts.insert(key.to_string(), 1);
        }
    }
}

impl DeviceEntry {
    /// The certificate's standing at `now_ms`, as the conditions see it.
    fn standing(&self, now_ms: i64) -> Option<CertificateStanding> {
        self.cert.as_ref().map(|cert| match cert.state(now_ms) {
            RenewalState::Valid => CertificateStanding::Valid,
            RenewalState::Due => CertificateStanding::RenewalDue,
            RenewalState::Failed => CertificateStanding::RenewalFailed,
            RenewalState::Expired => CertificateStanding::Expired,
            RenewalState::Revoked => CertificateStanding::Revoked,
        })
    }

    /// Takes in a change of the entry: settled at once if this replica holds the device's session;
    /// otherwise when it changed is noted and whoever reads its status settles it
    /// (`settle_if_time_moved`). A device held elsewhere changes with what other replicas feed —
    /// with a fleet of 100,000, every render and every answer of each device, on every replica —
    /// and is read only by status calls and scrapes.
    pub(super) fn note_change(&mut self, now_ms: i64) {
        if self.session.is_some() {
            self.unsettled_at = None;
            self.settle(now_ms);
        } else {
            self.unsettled_at = Some(now_ms);
        }
    }

    /// Settles the entry if it changed since it was last settled (as of its last change: a device
    /// held elsewhere, read) or time alone has moved it (only the certificate's standing depends
    /// on the time).
    pub(super) fn settle_if_time_moved(&mut self, now_ms: i64) {
        if let Some(changed_ms) = self.unsettled_at.take() {
            self.settle(changed_ms);
        }
        if self.settled_standing != Some(self.standing(now_ms)) {
            self.settle(now_ms);
        }
    }

    /// Re-derives the conditions from the entry as it is now.
    pub(super) fn settle(&mut self, now_ms: i64) {
        let standing = self.standing(now_ms);
        let last_error = self.cert.as_ref().and_then(|c| c.last_error.as_deref());
        let online = self.session.is_some() || self.elsewhere.is_some();
        let inputs = Inputs {
            online,
            ever_seen: online || self.last_seen_ms.is_some(),
            desired_version: self.desired_version(),
            acked_version: self.acked_version.as_deref(),
            nacked: self
                .nacked
                .as_ref()
                .map(|(version, error)| (version.as_str(), error.as_str())),
            render_error: self.render_error.as_deref(),
            sent_version: self.sent.as_ref().map(|s| s.version.as_str()),
            certificate: standing.map(|standing| (standing, last_error)),
            alerts: self
                .report
                .as_ref()
                .filter(|r| r.resources.is_some())
                .map(|r| r.alerts.as_slice()),
            drift: self
                .report
                .as_ref()
                .and_then(|r| r.drift.as_ref())
                .map(|d| d.items.as_slice()),
            workloads: self.report.as_ref().and_then(|r| r.workloads.as_deref()),
            update: self.report.as_ref().and_then(|r| r.update.as_ref()),
        };
        let observed = evaluate(&inputs);
        self.ledger.settle(observed, now_ms);
        self.settled_standing = Some(standing);
    }
}

impl Hub {
    /// Takes in what a device reported on its session. Returns the new report when its content
    /// changed (for the journal and the watchers), `None` when it repeats what is known — or the
    /// session is not the device's current one.
    pub fn record_report(
        &self,
        device_id: &str,
        session_id: u64,
        update: impl FnOnce(&DeviceReport) -> DeviceReport,
    ) -> Option<Arc<DeviceReport>> {
        let mut state = self.lock();
        let entry = state.get_mut(device_id)?;
        if entry.session.as_ref().map(|s| s.id) != Some(session_id) {
            return None;
        }
        let empty = DeviceReport::default();
        let current = entry.report.as_deref().unwrap_or(&empty);
        let next = update(current);
        if entry.report.is_some() && current.same_content(&next) {
            return None;
        }
        let next = Arc::new(next);
        entry.report = Some(next.clone());
        entry.note_change(self.clock.now_millis());
        drop(state);
        self.announce(device_id);
        Some(next)
    }

    /// Takes in a report another replica recorded.
    pub fn note_remote_report(&self, device_id: &str, report: Option<Arc<DeviceReport>>) {
        let mut state = self.lock();
        let Some(entry) = state.get_mut(device_id) else {
            return;
        };
        if entry.session.is_some() {
            // Our own session: the device tells us directly.
            return;
        }
        if entry.report.as_deref() == report.as_deref() {
            return;
        }
        entry.report = report;
        entry.note_change(self.clock.now_millis());
        drop(state);
        self.announce(device_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::{Rendered, Seed};
    use crate::spec::DeviceSpec;
    use crate::status::conditions::ConditionStatus;
    use crate::status::{ReportUpdate, SystemInfo, check_bounds};

    fn hub() -> Hub {
        let hub = Hub::new();
        hub.load(vec![Seed {
            device_id: "d".into(),
            desired: Ok(Rendered::new(DeviceSpec::default())),
            acked_version: None,
            nacked: None,
            last_seen_ms: None,
            report: None,
        }]);
        hub
    }

    fn hostname(hub: &Hub) -> String {
        let report = hub.status("d").unwrap().report.unwrap();
        report.system_info.as_ref().unwrap().hostname.clone()
    }

    fn info(hostname: &str) -> SystemInfo {
        SystemInfo {
            hostname: hostname.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_report_counts_once_per_change_and_only_from_the_current_session() {
        let hub = hub();
        let status = hub.status("d").unwrap();
        assert_eq!(status.summary, Summary::Unknown, "never connected");
        let (old, _) = hub.open_session("d", "", "s1", 1).unwrap();
        let (session, _) = hub.open_session("d", "", "s2", 2).unwrap();
        let update = |name: &'static str| {
            move |r: &DeviceReport| {
                r.updated(
                    ReportUpdate {
                        system_info: Some(info(name)),
                        ..Default::default()
                    },
                    5,
                )
            }
        };
        assert!(
            hub.record_report("d", old.id, update("a")).is_none(),
            "stale session"
        );
        assert!(hub.record_report("d", session.id, update("a")).is_some());
        assert!(
            hub.record_report("d", session.id, update("a")).is_none(),
            "unchanged content is not written again"
        );
        let changed = hub.record_report("d", session.id, update("b")).unwrap();
        assert_eq!(changed.system_info.as_ref().unwrap().hostname, "b");
        let status = hub.status("d").unwrap();
        assert_eq!(
            status
                .report
                .unwrap()
                .system_info
                .as_ref()
                .unwrap()
                .hostname,
            "b"
        );
        // No resources reported yet: pressure unknown, the device healthy.
        let pressure = status
            .conditions
            .iter()
            .find(|c| c.kind == ConditionType::ResourcePressure)
            .unwrap();
        assert_eq!(pressure.status, ConditionStatus::Unknown);
        assert_eq!(status.summary, Summary::Healthy);
        assert!(
            check_bounds(&ReportUpdate {
                system_info: changed.system_info.clone(),
                ..Default::default()
            })
            .is_ok()
        );
    }

    #[test]
    fn a_remote_report_does_not_override_the_own_session() {
        let hub = hub();
        let with_info = |name: &str| ReportUpdate {
            system_info: Some(info(name)),
            ..Default::default()
        };
        hub.note_remote_report(
            "d",
            Some(Arc::new(DeviceReport::default().updated(with_info("r"), 1))),
        );
        assert_eq!(hostname(&hub), "r");
        let (session, _) = hub.open_session("d", "", "s", 2).unwrap();
        hub.record_report("d", session.id, |r| r.updated(with_info("own"), 3));
        hub.note_remote_report("d", None);
        assert_eq!(hostname(&hub), "own");
        let counts = hub.summary(4).status;
        assert_eq!(counts.summaries.iter().sum::<usize>(), 1);
        assert_eq!(counts.agent_versions.get("unknown"), Some(&1));
    }
}

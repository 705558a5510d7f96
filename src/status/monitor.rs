//! Resource monitors evaluated on the device: since when each threshold has been exceeded, which
//! alerts fire, and when a new sample is worth reporting (a threshold crossed, or a value moved by
//! more than the step — and not more often than the minimum interval). Pure: times are arguments.

use super::{Alert, ResourceUsage, Severity};
use crate::spec::{MonitorKind, ResourceMonitor};
use std::collections::BTreeMap;

type Key = (MonitorKind, String, Severity);

/// Since when each monitor's thresholds have been exceeded.
#[derive(Debug, Default)]
pub struct MonitorState {
    exceeded_since: BTreeMap<Key, i64>,
}

impl MonitorState {
    /// The alerts firing for `usage` at `now_ms`: per monitor the most severe threshold that has
    /// been exceeded for at least its `forSeconds`.
    pub fn evaluate(
        &mut self,
        monitors: &[ResourceMonitor],
        usage: &ResourceUsage,
        now_ms: i64,
    ) -> Vec<Alert> {
        let mut seen = BTreeMap::new();
        let mut alerts = Vec::new();
        for monitor in monitors {
            let (kind, path) = monitor.key();
            let Some(percent) = usage.percent_of(kind, path) else {
                continue;
            };
            let mut firing = None;
            for (severity, threshold) in [
                (Severity::Warning, monitor.warning),
                (Severity::Critical, monitor.critical),
            ] {
                let Some(threshold) = threshold else { continue };
                if percent < threshold {
                    continue;
                }
                let key = (kind, path.to_string(), severity);
                let since = *self.exceeded_since.get(&key).unwrap_or(&now_ms);
                seen.insert(key, since);
                if now_ms - since >= i64::from(monitor.for_seconds) * 1000 {
                    firing = Some(Alert {
                        monitor: kind,
                        path: path.to_string(),
                        severity,
                        percent,
                        threshold,
                        since_ms: since,
                    });
                }
            }
            alerts.extend(firing);
        }
        // Anything not exceeded now starts afresh next time.
        self.exceeded_since = seen;
        alerts
    }
}

/// When a sample is worth sending.
#[derive(Debug)]
pub struct ReportGate {
    /// Percentage points a value must move by to be reported.
    pub step: u32,
    /// Least time between two reports of moved values.
    pub min_interval_ms: i64,
    last: Option<(ResourceUsage, Vec<Alert>, i64)>,
}

impl ReportGate {
    /// A gate reporting moves of at least `step` points, at most once per `min_interval_ms`.
    pub fn new(step: u32, min_interval_ms: i64) -> ReportGate {
        ReportGate {
            step: step.max(1),
            min_interval_ms,
            last: None,
        }
    }

    /// Whether to send this sample. Firing alerts changing (a threshold crossed either way) is
    /// sent at once; values that moved by at least the step wait for the minimum interval; the
    /// first sample is always sent. A sent sample becomes the reference.
    pub fn admit(&mut self, usage: &ResourceUsage, alerts: &[Alert], now_ms: i64) -> bool {
        let send = match &self.last {
            None => true,
            Some((last, last_alerts, at)) => {
                !same_alerts(last_alerts, alerts)
                    || (now_ms - at >= self.min_interval_ms && self.moved(last, usage))
            }
        };
        if send {
            self.last = Some((usage.clone(), alerts.to_vec(), now_ms));
        }
        send
    }

    /// Forget the reference: the next sample is sent (a new session starts).
    pub fn reset(&mut self) {
        self.last = None;
    }

    fn moved(&self, last: &ResourceUsage, now: &ResourceUsage) -> bool {
        let far = |a: u32, b: u32| a.abs_diff(b) >= self.step;
        if far(last.cpu_percent, now.cpu_percent)
            || far(last.memory_percent(), now.memory_percent())
            || last.filesystems.len() != now.filesystems.len()
        {
            return true;
        }
        last.filesystems
            .iter()
            .zip(&now.filesystems)
            .any(|(a, b)| a.mount_point != b.mount_point || far(a.percent(), b.percent()))
    }
}

/// Alerts compare by what fires and how badly, not by the exact reading.
fn same_alerts(a: &[Alert], b: &[Alert]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            (x.monitor, &x.path, x.severity, x.threshold)
                == (y.monitor, &y.path, y.severity, y.threshold)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::FilesystemUsage;

    fn usage(cpu: u32, memory_used: u64) -> ResourceUsage {
        ResourceUsage {
            cpu_percent: cpu,
            memory_total_bytes: 100,
            memory_used_bytes: memory_used,
            filesystems: vec![FilesystemUsage {
                mount_point: "/".into(),
                total_bytes: 100,
                used_bytes: 40,
            }],
            ..Default::default()
        }
    }

    fn monitor(
        kind: MonitorKind,
        warning: u32,
        critical: u32,
        for_seconds: u32,
    ) -> ResourceMonitor {
        ResourceMonitor {
            monitor: kind,
            path: None,
            warning: Some(warning),
            critical: Some(critical),
            for_seconds,
        }
    }

    #[test]
    fn fires_after_for_seconds_and_escalates() {
        let monitors = [monitor(MonitorKind::Memory, 80, 95, 60)];
        let mut state = MonitorState::default();
        assert!(state.evaluate(&monitors, &usage(0, 85), 0).is_empty());
        assert!(state.evaluate(&monitors, &usage(0, 86), 59_000).is_empty());
        let alerts = state.evaluate(&monitors, &usage(0, 87), 60_000);
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].severity, Severity::Warning);
        assert_eq!((alerts[0].percent, alerts[0].threshold), (87, 80));
        assert_eq!(alerts[0].since_ms, 0);
        // Critical has its own clock.
        assert_eq!(
            state.evaluate(&monitors, &usage(0, 96), 70_000)[0].severity,
            Severity::Warning
        );
        assert_eq!(
            state.evaluate(&monitors, &usage(0, 97), 130_000)[0].severity,
            Severity::Critical
        );
        // Dropping below resets both.
        assert!(state.evaluate(&monitors, &usage(0, 10), 131_000).is_empty());
        assert!(state.evaluate(&monitors, &usage(0, 90), 132_000).is_empty());
    }

    #[test]
    fn immediate_monitors_and_unsampled_disks() {
        let mut disk = monitor(MonitorKind::Disk, 30, 90, 0);
        let mut state = MonitorState::default();
        let alerts = state.evaluate(std::slice::from_ref(&disk), &usage(0, 0), 5);
        assert_eq!(alerts[0].path, "/");
        disk.path = Some("/data".into());
        assert!(state.evaluate(&[disk], &usage(0, 0), 6).is_empty());
        let cpu = monitor(MonitorKind::Cpu, 50, 100, 0);
        assert_eq!(
            state.evaluate(&[cpu], &usage(100, 0), 7)[0].severity,
            Severity::Critical
        );
    }

    #[test]
    fn gate_sends_crossings_at_once_and_moves_at_most_every_interval() {
        let mut gate = ReportGate::new(5, 30_000);
        assert!(gate.admit(&usage(10, 50), &[], 0));
        // Small moves never; large moves only after the interval.
        assert!(!gate.admit(&usage(12, 51), &[], 40_000));
        assert!(!gate.admit(&usage(30, 50), &[], 10_000));
        assert!(gate.admit(&usage(30, 50), &[], 31_000));
        let alert = Alert {
            monitor: MonitorKind::Memory,
            path: String::new(),
            severity: Severity::Warning,
            percent: 81,
            threshold: 80,
            since_ms: 0,
        };
        assert!(gate.admit(&usage(30, 81), std::slice::from_ref(&alert), 32_000));
        // The same alert with another reading is no crossing.
        let mut later = alert.clone();
        later.percent = 82;
        assert!(!gate.admit(&usage(30, 82), &[later], 33_000));
        assert!(gate.admit(&usage(30, 20), &[], 34_000));
        gate.reset();
        assert!(gate.admit(&usage(30, 20), &[], 34_001));
    }
}

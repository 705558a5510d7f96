//! The agent's status reports: system info at the start of every session and when it changes,
//! resource samples and the spec's monitors evaluated on the device, sent only when something
//! crossed a threshold or moved by more than the step (`flotilla::status::monitor`), and what the
//! drift checks found (sent when the findings change).

mod resources;
mod system;

use crate::apply::executor::SystemExecutor;
use flotilla::clock::now_millis;
use flotilla::profiles::StatusConfig;
use flotilla::proto::agent::v1 as pb;
use flotilla::spec::{DeviceSpec, MonitorKind};
use flotilla::status::monitor::{MonitorState, ReportGate};
use flotilla::status::{
    Alert, DriftCheck, DriftItem, ResourceUsage, SystemInfo, UpdateState, WorkloadStatus,
};
use rand::Rng;
use std::path::PathBuf;
use std::time::Duration;

/// Most filesystems in one report (the control plane's bound).
const MAX_FILESYSTEMS: usize = 16;

/// System info is re-read every this many samples (interfaces and hostname change rarely).
const SYSTEM_INFO_EVERY: u32 = 6;

/// What the agent last told the control plane, and the state of its monitors.
pub(crate) struct Reporter {
    config: StatusConfig,
    boot_id: String,
    tpm_used: bool,
    agent_version: String,
    state_dir: PathBuf,
    sampler: resources::Sampler,
    monitors: MonitorState,
    gate: ReportGate,
    sent_info: Option<SystemInfo>,
    sent_drift: Option<Vec<DriftItem>>,
    sent_workloads: Option<Vec<WorkloadStatus>>,
    sent_update: Option<UpdateState>,
    samples: u32,
}

impl Reporter {
    pub(crate) fn new(
        config: StatusConfig,
        boot_id: String,
        tpm_used: bool,
        agent_version: String,
        state_dir: PathBuf,
    ) -> Self {
        let gate = ReportGate::new(
            config.report_step_percent,
            i64::try_from(config.min_report_interval_secs.saturating_mul(1000)).unwrap_or(i64::MAX),
        );
        Reporter {
            config,
            boot_id,
            tpm_used,
            agent_version,
            state_dir,
            sampler: resources::Sampler::default(),
            monitors: MonitorState::default(),
            gate,
            sent_info: None,
            sent_drift: None,
            sent_workloads: None,
            sent_update: None,
            samples: 0,
        }
    }

    /// Where the device's software stands, when it changed since last sent.
    pub(crate) fn update(&mut self, state: UpdateState) -> Option<pb::UpdateStatus> {
        if self.sent_update.as_ref() == Some(&state) {
            return None;
        }
        self.sent_update = Some(state.clone());
        Some(state.into())
    }

    /// When to verify what the agent manages next: the configured period, less up to a tenth at
    /// random, so devices started together do not all check together.
    pub(crate) fn next_drift_check(&self) -> Duration {
        let period = Duration::from_secs(self.config.drift_check_interval_secs.max(1));
        let spread = (period.as_millis() / 10).max(1) as u64;
        period.saturating_sub(Duration::from_millis(rand::rng().random_range(0..spread)))
    }

    /// Verifies (and corrects) what the agent manages; the Status to send when the findings
    /// differ from the last sent.
    pub(crate) fn drift_check(
        &mut self,
        spec: &DeviceSpec,
        applied_version: &str,
    ) -> Option<pb::Status> {
        let drift = self.check_drift(spec)?;
        Some(pb::Status {
            applied_version: applied_version.to_string(),
            drift: Some(drift),
            ..Default::default()
        })
    }

    fn check_drift(&mut self, spec: &DeviceSpec) -> Option<pb::DriftReport> {
        let items = crate::apply::drift::check_and_correct(&SystemExecutor, spec);
        if self.sent_drift.as_ref() == Some(&items) {
            return None;
        }
        self.sent_drift = Some(items.clone());
        Some(
            DriftCheck {
                checked_ms: now_millis(),
                items,
            }
            .into(),
        )
    }

    /// How often to sample.
    pub(crate) fn interval(&self) -> Duration {
        Duration::from_secs(self.config.sample_interval_secs.max(1))
    }

    /// The first Status of a session: everything, whatever was sent on the last one, after a
    /// drift check (an agent restarted after its files were changed puts them back first).
    pub(crate) fn opening(
        &mut self,
        spec: &DeviceSpec,
        applied_version: &str,
        update: UpdateState,
    ) -> pb::Status {
        self.gate.reset();
        self.sent_info = None;
        self.sent_drift = None;
        self.sent_workloads = None;
        self.sent_update = None;
        self.samples = 0;
        let drift = self.check_drift(spec);
        let mut status = self
            .next(spec, applied_version, update)
            .unwrap_or_else(|| pb::Status {
                applied_version: applied_version.to_string(),
                ..Default::default()
            });
        status.drift = drift;
        status
    }

    /// A sample: the Status to send, if anything changed enough to be worth it.
    pub(crate) fn next(
        &mut self,
        spec: &DeviceSpec,
        applied_version: &str,
        update: UpdateState,
    ) -> Option<pb::Status> {
        let now = now_millis();
        let info = (self.sent_info.is_none() || self.samples.is_multiple_of(SYSTEM_INFO_EVERY))
            .then(|| system::system_info(&self.boot_id, self.tpm_used, &self.agent_version))
            .filter(|info| self.sent_info.as_ref() != Some(info));
        self.samples = self.samples.wrapping_add(1);
        let (usage, alerts) = self.sample(spec, now);
        let resources = self
            .gate
            .admit(&usage, &alerts, now)
            .then(|| pb::ResourceReport {
                usage: Some(usage.into()),
                alerts: alerts.into_iter().map(Into::into).collect(),
            });
        let workloads = crate::apply::workloads::query(&SystemExecutor, spec);
        let workloads = (self.sent_workloads.as_ref() != Some(&workloads)).then(|| {
            self.sent_workloads = Some(workloads.clone());
            pb::WorkloadReport {
                items: workloads.into_iter().map(Into::into).collect(),
            }
        });
        let update = self.update(update);
        if info.is_none() && resources.is_none() && workloads.is_none() && update.is_none() {
            return None;
        }
        if let Some(info) = &info {
            self.sent_info = Some(info.clone());
        }
        Some(pb::Status {
            applied_version: applied_version.to_string(),
            message: String::new(),
            system_info: info.map(Into::into),
            resources,
            drift: None,
            workloads,
            update,
        })
    }

    fn sample(&mut self, spec: &DeviceSpec, now: i64) -> (ResourceUsage, Vec<Alert>) {
        let mut paths = vec![self.state_dir.clone(), PathBuf::from("/")];
        paths.extend(
            spec.resources
                .iter()
                .filter(|m| m.monitor == MonitorKind::Disk)
                .map(|m| PathBuf::from(m.key().1)),
        );
        let mut usage = self.sampler.sample(&paths, now);
        // A disk monitor may name a directory below a mount point; report the filesystem that
        // holds it (the longest mount point containing it) under the monitor's name too.
        for monitor in spec
            .resources
            .iter()
            .filter(|m| m.monitor == MonitorKind::Disk)
        {
            let wanted = monitor.key().1;
            if !usage.filesystems.iter().any(|f| f.mount_point == wanted)
                && let Some(found) = usage
                    .filesystems
                    .iter()
                    .filter(|f| PathBuf::from(wanted).starts_with(&f.mount_point))
                    .max_by_key(|f| f.mount_point.len())
                    .cloned()
            {
                let mut named = found;
                named.mount_point = wanted.to_string();
                usage.filesystems.push(named);
            }
        }
        usage.filesystems.truncate(MAX_FILESYSTEMS);
        let alerts = self.monitors.evaluate(&spec.resources, &usage, now);
        (usage, alerts)
    }
}

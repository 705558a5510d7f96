//! Updating the device itself before a spec is applied: the agent build the spec names (a signed
//! release, verified against the keys pinned in agent.toml, installed beside the running build,
//! switched to by one atomic rename, confirmed by the new build or rolled back) and the OS image
//! of a bootc-based device (staged, rebooted into, confirmed by the booted digest), each inside
//! the spec's maintenance windows. A push that updates the agent or the OS is acknowledged only
//! once the device runs what it asks for; one update at a time.

pub(crate) mod builds;
mod download;
mod http;
pub(crate) mod launcher;
pub(crate) mod os;
pub(crate) mod records;

use crate::apply::executor::Executor;
use builds::{BuildInfo, Builds};
use flotilla::clock::now_millis;
use flotilla::profiles::{RestartMode, UpdateConfig};
use flotilla::release::ReleaseKey;
use flotilla::spec::{AgentUpdate, DeviceSpec, Windows, parse_release_version};
use flotilla::status::{UpdateFailure, UpdateKind, UpdatePhase, UpdateState};
use records::{Failed, PendingAgent, Records};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;
use tonic::transport::Channel;

/// A release that could not be had is asked for again after this.
const RETRY_UNAVAILABLE: Duration = Duration::from_secs(60);
/// Texts in reports are bounded by the control plane.
const MAX_TEXT: usize = 256;

/// The build this process runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    /// The release version it was installed as, or the version built in.
    pub version: String,
    pub sha256: String,
    pub exe: PathBuf,
}

impl Running {
    /// Identifies this process's binary by its digest.
    pub fn identify(builds: &Builds) -> Running {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
        let sha256 = builds::digest_file(&exe)
            .map(|(sha, _)| sha)
            .unwrap_or_default();
        let version = builds
            .info(&sha256)
            .map(|info| info.version)
            .unwrap_or_else(|| flotilla::VERSION.to_string());
        Running {
            version,
            sha256,
            exe,
        }
    }
}

/// What the device must do about a push before its files are applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepared {
    /// It runs what the spec asks: apply the rest.
    Ready,
    /// Not now (a window is closed, the release could not be had): look again at this time.
    Wait { until_ms: i64 },
    /// A new agent build is switched to: restart into it.
    Restart,
    /// The device is rebooting into a new OS image.
    Rebooting,
    /// The spec cannot be run: NACK it with this reason.
    Refused(String),
}

fn bounded(mut text: String) -> String {
    if text.len() > MAX_TEXT {
        let mut end = MAX_TEXT - 3;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

/// The agent's updater: what it runs, what it pins, and where an update stands.
pub struct Updater {
    config: UpdateConfig,
    keys: Result<Vec<ReleaseKey>, String>,
    builds: Builds,
    records: Records,
    running: Running,
    boot_id: String,
    /// The control plane's CA (also trusted for release URLs served over https).
    ca_file: PathBuf,
    /// What the device reports; the last update failure comes from the records.
    state: Mutex<UpdateState>,
}

fn read_keys(paths: &[PathBuf]) -> Result<Vec<ReleaseKey>, String> {
    paths
        .iter()
        .map(|path| {
            let pem = std::fs::read_to_string(path)
                .map_err(|e| format!("release key {}: {e}", path.display()))?;
            ReleaseKey::from_pem(&pem).map_err(|e| format!("release key {}: {e}", path.display()))
        })
        .collect()
}

impl Updater {
    pub fn new(
        config: UpdateConfig,
        builds: Builds,
        state_root: &Path,
        running: Running,
        boot_id: String,
        ca_file: PathBuf,
    ) -> Updater {
        let keys = read_keys(&config.release_keys);
        if let Err(error) = &keys {
            tracing::error!(%error, "release keys are unusable: agent updates will be refused");
        }
        let state = UpdateState {
            agent_version: running.version.clone(),
            agent_digest: running.sha256.clone(),
            ..Default::default()
        };
        Updater {
            config,
            keys,
            builds,
            records: Records::new(state_root),
            running,
            boot_id,
            ca_file,
            state: Mutex::new(state),
        }
    }

    pub fn running(&self) -> &Running {
        &self.running
    }

    pub fn builds(&self) -> &Builds {
        &self.builds
    }

    pub fn restart_mode(&self) -> RestartMode {
        self.config.restart
    }

    fn state_mut(&self) -> std::sync::MutexGuard<'_, UpdateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What to report: the running build, the booted image, the update in progress and the
    /// last failure.
    pub fn state(&self) -> UpdateState {
        let mut state = self.state_mut().clone();
        state.last_failure = self.records.failure().map(|f| f.failure);
        if self.pending_here().is_some() {
            state.phase = UpdatePhase::Confirming;
            state.target = format!("agent {}", self.running.version);
        }
        state
    }

    fn set_phase(
        &self,
        phase: UpdatePhase,
        target: &str,
        next_window_ms: Option<i64>,
        message: &str,
    ) {
        let mut state = self.state_mut();
        state.phase = phase;
        state.target = bounded(target.to_string());
        state.next_window_ms = next_window_ms;
        state.message = bounded(message.to_string());
    }

    /// The unconfirmed update to this very build, if there is one.
    fn pending_here(&self) -> Option<PendingAgent> {
        self.records
            .pending_agent()
            .filter(|p| p.sha256 == self.running.sha256)
    }

    /// Called once a session is open: a new build that is healthy confirms itself (its previous
    /// build stays for the next update's rollback). Returns whether it confirmed now.
    pub fn confirm(&self, healthy: bool) -> bool {
        let Some(pending) = self.pending_here() else {
            return false;
        };
        if !healthy {
            tracing::warn!(version = %pending.version, "the new agent build holds a session but a health check fails; not confirmed yet");
            return false;
        }
        if let Err(error) = self.records.clear_pending_agent() {
            tracing::warn!(%error, "could not record the confirmation");
            return false;
        }
        let _ = self.records.clear_failure();
        metrics::counter!("flotilla_agent_updates_total", "kind" => "agent", "result" => "succeeded").increment(1);
        tracing::info!(version = %pending.version, from = %pending.from_version, sha256 = %pending.sha256, "agent update confirmed");
        true
    }

    /// Whether this build is an update that missed its deadline to confirm; if so it is rolled
    /// back (the caller restarts).
    pub fn overdue(&self, now_ms: i64) -> bool {
        match self.pending_here() {
            Some(pending) if now_ms > pending.deadline_ms => {
                let waited = (pending.deadline_ms - pending.switched_ms) / 1000;
                launcher::roll_back(
                    &self.builds,
                    &self.records,
                    &pending,
                    format!(
                        "it did not confirm (open a session and pass its health checks) within {waited}s"
                    ),
                    now_ms,
                );
                metrics::counter!("flotilla_agent_updates_total", "kind" => "agent", "result" => "rolled_back").increment(1);
                true
            }
            _ => false,
        }
    }

    /// The new build could not even be started: back to this one.
    pub fn start_failed(&self, reason: String) {
        if let Some(pending) = self.records.pending_agent() {
            launcher::roll_back(&self.builds, &self.records, &pending, reason, now_millis());
        }
    }

    /// After the push of `spec` was applied: a failure of an update this spec no longer asks
    /// for is over.
    pub fn applied(&self, spec: &DeviceSpec) {
        self.set_phase(UpdatePhase::Idle, "", None, "");
        if let Some(failed) = self.records.failure() {
            let still_asked = match failed.failure.kind {
                UpdateKind::Agent => spec
                    .agent
                    .as_ref()
                    .is_some_and(|a| a.version == failed.failure.target),
                UpdateKind::Os => spec
                    .os
                    .as_ref()
                    .is_some_and(|o| o.image == failed.failure.target),
            };
            if !still_asked {
                let _ = self.records.clear_failure();
            }
        }
    }

    fn refuse(
        &self,
        kind: UpdateKind,
        target: &str,
        spec_version: &str,
        reason: String,
        rolled_back: bool,
    ) -> Prepared {
        let reason = bounded(reason);
        let failed = Failed {
            failure: UpdateFailure {
                kind,
                target: bounded(target.to_string()),
                reason: reason.clone(),
                rolled_back,
                at_ms: now_millis(),
            },
            spec_version: spec_version.to_string(),
        };
        if let Err(error) = self.records.save_failure(&failed) {
            tracing::warn!(%error, "could not record the failed update");
        }
        let result = if rolled_back { "rolled_back" } else { "failed" };
        metrics::counter!("flotilla_agent_updates_total", "kind" => kind.as_str(), "result" => result).increment(1);
        self.set_phase(UpdatePhase::Idle, "", None, "");
        tracing::warn!(kind = kind.as_str(), target, %reason, "update refused");
        Prepared::Refused(failed.failure.describe())
    }

    /// Takes the device towards what `spec` asks of its agent and OS, before the spec's files.
    pub async fn prepare(
        &self,
        spec: &DeviceSpec,
        spec_version: &str,
        channel: &Channel,
        executor: &dyn Executor,
        now_ms: i64,
    ) -> Prepared {
        if spec.agent.is_none() && spec.os.is_none() {
            return Prepared::Ready;
        }
        if let Some(failed) = self
            .records
            .failure()
            .filter(|f| f.spec_version == spec_version)
        {
            // Never tried again automatically: a new spec version is.
            return Prepared::Refused(failed.failure.describe());
        }
        let windows = match spec.update_policy.clone().unwrap_or_default().windows() {
            Ok(windows) => windows,
            Err(error) => return Prepared::Refused(format!("update policy: {error}")),
        };
        if let Some(agent) = spec
            .agent
            .as_ref()
            .filter(|a| a.version != self.running.version)
        {
            match self
                .agent_step(agent, spec_version, channel, &windows, now_ms)
                .await
            {
                Prepared::Ready => {}
                other => return other,
            }
        }
        if let Some(os) = &spec.os {
            let ctx = os::OsContext {
                executor,
                records: &self.records,
                windows: &windows,
                boot_id: &self.boot_id,
                now_ms,
            };
            let (step, booted) =
                tokio::task::block_in_place(|| os::step(&ctx, &os.image, spec_version));
            if let Some(booted) = booted {
                let mut state = self.state_mut();
                state.os_image = bounded(booted.image);
                state.os_image_digest = bounded(booted.digest);
            }
            let target = format!("os {}", os.image);
            match step {
                os::OsStep::Ready => {}
                os::OsStep::Wait { until_ms, phase } => return self.wait(&target, phase, until_ms),
                os::OsStep::Rebooting => {
                    self.set_phase(UpdatePhase::Rebooting, &target, None, "");
                    return Prepared::Rebooting;
                }
                os::OsStep::Refused {
                    reason,
                    rolled_back,
                } => {
                    return self.refuse(
                        UpdateKind::Os,
                        &os.image,
                        spec_version,
                        reason,
                        rolled_back,
                    );
                }
            }
        }
        Prepared::Ready
    }

    fn wait(&self, target: &str, phase: UpdatePhase, until_ms: Option<i64>) -> Prepared {
        match until_ms {
            Some(at) => {
                self.set_phase(
                    phase,
                    target,
                    Some(at),
                    "waiting for the update policy's window",
                );
                Prepared::Wait { until_ms: at }
            }
            None => Prepared::Refused(format!("{target}: the update policy's window never opens")),
        }
    }

    async fn agent_step(
        &self,
        agent: &AgentUpdate,
        spec_version: &str,
        channel: &Channel,
        windows: &Windows,
        now_ms: i64,
    ) -> Prepared {
        let version = agent.version.as_str();
        let target = format!("agent {version}");
        let refuse =
            |reason: String| self.refuse(UpdateKind::Agent, version, spec_version, reason, false);
        let keys = match &self.keys {
            Ok(keys) if !keys.is_empty() => keys,
            Ok(_) => {
                return refuse(
                    "no release keys are pinned in agent.toml ([update] release_keys): agent updates are refused"
                        .into(),
                );
            }
            Err(error) => return refuse(error.clone()),
        };
        let wanted = match parse_release_version(version) {
            Ok(wanted) => wanted,
            Err(error) => return refuse(error),
        };
        if let Ok(running) = semver::Version::parse(&self.running.version)
            && wanted < running
            && !agent.allow_downgrade
        {
            return refuse(format!(
                "{version} is older than the running {running}; a downgrade needs agent.allowDowngrade"
            ));
        }
        if let Some(pending) = self.records.pending_agent() {
            return refuse(format!(
                "an update to agent {} is still being confirmed",
                pending.version
            ));
        }
        if let Err(until) = windows.download_open(now_ms) {
            return self.wait(&target, UpdatePhase::WaitingForWindow, until);
        }
        self.set_phase(UpdatePhase::Downloading, &target, None, "");
        let release = match download::release(channel, version, keys).await {
            Ok(release) => release,
            Err(download::Unusable::Refused(reason)) => return refuse(reason),
            Err(download::Unusable::Unavailable(reason)) => {
                return self.retry_later(&target, reason, now_ms);
            }
        };
        if !self.builds.has(&release.sha256) {
            let file =
                match download::fetch(&release, channel, &self.records.downloads(), &self.ca_file)
                    .await
                {
                    Ok(file) => file,
                    Err(download::Unusable::Refused(reason)) => return refuse(reason),
                    Err(download::Unusable::Unavailable(reason)) => {
                        return self.retry_later(&target, reason, now_ms);
                    }
                };
            crate::failpoint::reached("agent-update-downloaded");
            let info = BuildInfo {
                version: version.to_string(),
                sha256: release.sha256.clone(),
            };
            let installed = self.builds.install_from(&file, &info).or_else(|_| {
                // Another filesystem: copy instead of moving.
                self.builds.install_copy(&file, &info).map(|()| {
                    let _ = std::fs::remove_file(&file);
                })
            });
            if let Err(error) = installed {
                return self.retry_later(&target, format!("installing the build: {error}"), now_ms);
            }
            crate::failpoint::reached("agent-update-installed");
        }
        let now_ms = now_millis().max(now_ms);
        if let Err(until) = windows.update_open(now_ms) {
            return self.wait(&target, UpdatePhase::WaitingForWindow, until);
        }
        self.switch(version, &release.sha256, spec_version, now_ms)
            .unwrap_or_else(|error| {
                self.retry_later(&target, format!("switching builds: {error}"), now_ms)
            })
    }

    /// Makes the verified build `sha256` current, keeping this one to return to.
    fn switch(
        &self,
        version: &str,
        sha256: &str,
        spec_version: &str,
        now_ms: i64,
    ) -> std::io::Result<Prepared> {
        self.set_phase(UpdatePhase::Applying, &format!("agent {version}"), None, "");
        if !self.builds.has(&self.running.sha256) {
            self.builds.install_copy(
                &self.running.exe,
                &BuildInfo {
                    version: self.running.version.clone(),
                    sha256: self.running.sha256.clone(),
                },
            )?;
        }
        let pending = PendingAgent {
            version: version.to_string(),
            sha256: sha256.to_string(),
            from_version: self.running.version.clone(),
            from_sha256: Some(self.running.sha256.clone()),
            spec_version: spec_version.to_string(),
            switched_ms: now_ms,
            deadline_ms: now_ms + self.config.confirm_timeout().as_millis() as i64,
            attempts: 0,
        };
        self.records.save_pending_agent(&pending)?;
        crate::failpoint::reached("agent-update-pending");
        self.builds.switch(sha256, Some(&self.running.sha256))?;
        crate::failpoint::reached("agent-update-switched");
        self.builds.prune();
        tracing::info!(version, sha256, from = %self.running.version, "switched to the new agent build; restarting into it");
        Ok(Prepared::Restart)
    }

    fn retry_later(&self, target: &str, reason: String, now_ms: i64) -> Prepared {
        tracing::warn!(target, %reason, "update postponed");
        let at = now_ms + RETRY_UNAVAILABLE.as_millis() as i64;
        self.set_phase(UpdatePhase::Downloading, target, None, &reason);
        Prepared::Wait { until_ms: at }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::executor::recording::RecordingExecutor;
    use flotilla::spec::{OsUpdate, UpdatePolicy};

    struct Fixture {
        _tmp: tempfile::TempDir,
        updater: Updater,
        channel: Channel,
    }

    /// An updater running release 1.2.0, pinning `keys` (paths written here); the channel leads
    /// nowhere, so a step that would reach the control plane would fail.
    fn fixture(pin_a_key: bool) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let mut config = UpdateConfig::default();
        if pin_a_key {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
            let path = tmp.path().join("release.pub");
            std::fs::write(&path, key.public_key_pem()).unwrap();
            config.release_keys = vec![path];
        }
        let running = Running {
            version: "1.2.0".into(),
            sha256: "a".repeat(64),
            exe: tmp.path().join("flotilla-agent"),
        };
        let updater = Updater::new(
            config,
            Builds::new(&tmp.path().join("agent")),
            tmp.path(),
            running,
            "boot".into(),
            tmp.path().join("ca.crt"),
        );
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
        Fixture {
            _tmp: tmp,
            updater,
            channel,
        }
    }

    fn spec(version: &str, allow_downgrade: bool, policy: Option<UpdatePolicy>) -> DeviceSpec {
        DeviceSpec {
            agent: Some(AgentUpdate {
                version: version.into(),
                allow_downgrade,
            }),
            update_policy: policy,
            ..Default::default()
        }
    }

    async fn prepare(f: &Fixture, spec: &DeviceSpec, version: &str, now_ms: i64) -> Prepared {
        f.updater
            .prepare(
                spec,
                version,
                &f.channel,
                &RecordingExecutor::default(),
                now_ms,
            )
            .await
    }

    fn refused(prepared: Prepared) -> String {
        match prepared {
            Prepared::Refused(reason) => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_running_release_needs_nothing_and_without_a_pinned_key_nothing_is_installed() {
        let f = fixture(false);
        assert_eq!(
            prepare(&f, &spec("1.2.0", false, None), "v1", 0).await,
            Prepared::Ready
        );
        let reason = refused(prepare(&f, &spec("1.3.0", false, None), "v2", 0).await);
        assert!(reason.contains("no release keys are pinned"), "{reason}");
        // Refused once, the same spec version is not tried again; the status says why.
        let again = refused(prepare(&f, &spec("1.3.0", false, None), "v2", 0).await);
        assert_eq!(again, reason);
        let failure = f.updater.state().last_failure.unwrap();
        assert_eq!(failure.target, "1.3.0");
        assert!(!failure.rolled_back);
        // Once a spec that does not ask for it is applied, the failure is over.
        f.updater.applied(&DeviceSpec::default());
        assert_eq!(f.updater.state().last_failure, None);
    }

    #[tokio::test]
    async fn an_older_release_needs_the_spec_to_ask_for_a_downgrade() {
        let f = fixture(true);
        let reason = refused(prepare(&f, &spec("1.1.9", false, None), "v1", 0).await);
        assert!(reason.contains("allowDowngrade"), "{reason}");
        // Allowed, it goes on to ask the control plane for the release (which is unreachable
        // here): postponed, not refused.
        assert!(matches!(
            prepare(&f, &spec("1.1.9", true, None), "v2", 0).await,
            Prepared::Wait { .. }
        ));
    }

    #[tokio::test]
    async fn outside_the_download_window_the_update_waits_for_it() {
        let f = fixture(true);
        let nights = UpdatePolicy {
            download_schedule: Some("* 1-3 * * *".into()),
            update_schedule: None,
            time_zone: Some("UTC".into()),
        };
        // 2026-12-07 12:00 UTC; the window opens at 01:00 the next day.
        let noon = 1_796_644_800_000;
        assert_eq!(
            prepare(&f, &spec("1.3.0", false, Some(nights)), "v1", noon).await,
            Prepared::Wait {
                until_ms: noon + 13 * 3600 * 1000
            }
        );
        let state = f.updater.state();
        assert_eq!(state.phase, UpdatePhase::WaitingForWindow);
        assert_eq!(state.target, "agent 1.3.0");
        assert_eq!(state.next_window_ms, Some(noon + 13 * 3600 * 1000));
        let never = UpdatePolicy {
            download_schedule: Some("* * 30 2 *".into()),
            ..Default::default()
        };
        let reason = refused(prepare(&f, &spec("1.3.0", false, Some(never)), "v2", noon).await);
        assert!(reason.contains("never opens"), "{reason}");
    }

    // The agent's runtime is multi-threaded: the bootc steps run in place there.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_os_image_refused_by_the_device_is_reported_as_such() {
        let f = fixture(true);
        let image = DeviceSpec {
            os: Some(OsUpdate {
                image: "quay.io/acme/os:2".into(),
            }),
            ..Default::default()
        };
        let reason = f
            .updater
            .prepare(
                &image,
                "v1",
                &f.channel,
                &RecordingExecutor::failing_on("bootc status --json"),
                0,
            )
            .await;
        let reason = refused(reason);
        assert!(
            reason.starts_with("os quay.io/acme/os:2 refused"),
            "{reason}"
        );
    }
}

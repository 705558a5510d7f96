//! OS image updates of bootc-based devices: read `bootc status --json`, stage the spec's image
//! with `bootc switch --retain` while the download window is open, reboot while the update window
//! is open, and after the reboot tell from the booted image whether the device runs the new image
//! or came back to the old one (greenboot rolled it back). Every command goes through the
//! executor, so tests check the exact command lines against a simulated bootc.

use super::records::{PendingOs, Records};
use crate::apply::executor::{CommandLine, Executor};
use flotilla::spec::Windows;
use flotilla::status::UpdatePhase;
use serde::Deserialize;
use std::time::Duration;

const STATUS_TIMEOUT: Duration = Duration::from_secs(60);
/// Staging pulls the image: allow for a slow link.
const SWITCH_TIMEOUT: Duration = Duration::from_secs(3600);
const REBOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// One deployment bootc knows: the image reference and its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BootEntry {
    pub image: String,
    pub digest: String,
}

/// What `bootc status --json` says about the deployments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BootcStatus {
    pub booted: Option<BootEntry>,
    pub staged: Option<BootEntry>,
}

#[derive(Deserialize)]
struct Host {
    status: Option<HostStatus>,
}

#[derive(Deserialize)]
struct HostStatus {
    staged: Option<Entry>,
    booted: Option<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    image: Option<ImageStatus>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ImageStatus {
    image: ImageReference,
    image_digest: String,
}

#[derive(Deserialize)]
struct ImageReference {
    image: String,
}

fn entry(entry: Option<Entry>) -> Option<BootEntry> {
    let status = entry?.image?;
    Some(BootEntry {
        image: status.image.image,
        digest: status.image_digest,
    })
}

/// Parses `bootc status --json` (API `org.containers.bootc/v1`).
pub(crate) fn parse_status(json: &str) -> Result<BootcStatus, String> {
    let host: Host =
        serde_json::from_str(json).map_err(|e| format!("unreadable `bootc status --json`: {e}"))?;
    let status = host.status.ok_or("`bootc status --json` has no status")?;
    Ok(BootcStatus {
        booted: entry(status.booted),
        staged: entry(status.staged),
    })
}

/// Where the OS update stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OsStep {
    /// The device runs the image.
    Ready,
    /// A window is closed: come back at this time (`None`: it never opens).
    Wait {
        until_ms: Option<i64>,
        phase: UpdatePhase,
    },
    /// The reboot into the image is under way.
    Rebooting,
    Refused {
        reason: String,
        rolled_back: bool,
    },
}

/// Everything a step reads.
pub(crate) struct OsContext<'a> {
    pub executor: &'a dyn Executor,
    pub records: &'a Records,
    pub windows: &'a Windows,
    /// This boot's id (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: &'a str,
    pub now_ms: i64,
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

fn refused(reason: String) -> OsStep {
    OsStep::Refused {
        reason,
        rolled_back: false,
    }
}

fn read_status(executor: &dyn Executor) -> Result<BootcStatus, String> {
    let command = CommandLine::new(&["bootc", "status", "--json"], STATUS_TIMEOUT);
    let output = executor.output(&command).map_err(|e| {
        format!("os.image needs a bootc-based device, and `bootc status --json` failed: {e}")
    })?;
    parse_status(&output)
}

/// Takes the device one step towards running `image`; also returns the booted deployment.
pub(crate) fn step(
    ctx: &OsContext<'_>,
    image: &str,
    spec_version: &str,
) -> (OsStep, Option<BootEntry>) {
    let status = match read_status(ctx.executor) {
        Ok(status) => status,
        Err(reason) => return (refused(reason), None),
    };
    let Some(booted) = status.booted.clone() else {
        return (refused("bootc reports no booted image".into()), None);
    };
    let outcome = next(ctx, &status, &booted, image, spec_version);
    (outcome, Some(booted))
}

fn next(
    ctx: &OsContext<'_>,
    status: &BootcStatus,
    booted: &BootEntry,
    image: &str,
    spec_version: &str,
) -> OsStep {
    if let Some(pending) = ctx.records.pending_os().filter(|p| p.image == image) {
        if booted.image == image && booted.digest == pending.staged_digest {
            let _ = ctx.records.clear_pending_os();
            tracing::info!(image, digest = %booted.digest, "the device runs the new OS image");
            return OsStep::Ready;
        }
        if ctx.boot_id != pending.boot_id {
            let _ = ctx.records.clear_pending_os();
            return OsStep::Refused {
                reason: format!(
                    "the device rebooted into {} ({}) instead of {image} ({}): the new image \
                     failed its boot checks and greenboot rolled it back",
                    booted.image,
                    short(&booted.digest),
                    short(&pending.staged_digest)
                ),
                rolled_back: true,
            };
        }
        // Still the boot the reboot was asked from: it is under way (or must be asked again).
        return reboot(ctx, &pending);
    }
    if booted.image == image {
        return OsStep::Ready;
    }
    let staged = match status.staged.clone().filter(|s| s.image == image) {
        Some(staged) => staged,
        None => {
            if let Err(until_ms) = ctx.windows.download_open(ctx.now_ms) {
                return waiting(until_ms);
            }
            let switch = CommandLine::new(&["bootc", "switch", "--retain", image], SWITCH_TIMEOUT);
            if let Err(error) = ctx.executor.run(&switch) {
                return refused(format!("staging {image} failed: {error}"));
            }
            match read_status(ctx.executor) {
                Ok(BootcStatus {
                    staged: Some(staged),
                    ..
                }) if staged.image == image => staged,
                Ok(_) => return refused(format!("bootc did not stage {image}")),
                Err(reason) => return refused(reason),
            }
        }
    };
    if let Err(until_ms) = ctx.windows.update_open(ctx.now_ms) {
        return waiting(until_ms);
    }
    let pending = PendingOs {
        image: image.to_string(),
        staged_digest: staged.digest,
        from_digest: booted.digest.clone(),
        spec_version: spec_version.to_string(),
        boot_id: ctx.boot_id.to_string(),
        requested_ms: ctx.now_ms,
    };
    if let Err(error) = ctx.records.save_pending_os(&pending) {
        return refused(format!("could not record the OS update: {error}"));
    }
    crate::failpoint::reached("os-update-pending");
    reboot(ctx, &pending)
}

fn waiting(until_ms: Option<i64>) -> OsStep {
    OsStep::Wait {
        until_ms,
        phase: UpdatePhase::WaitingForWindow,
    }
}

fn reboot(ctx: &OsContext<'_>, pending: &PendingOs) -> OsStep {
    if let Err(until_ms) = ctx.windows.update_open(ctx.now_ms) {
        return waiting(until_ms);
    }
    tracing::info!(image = %pending.image, digest = %pending.staged_digest, "rebooting into the new OS image");
    let command = CommandLine::new(&["systemctl", "reboot"], REBOOT_TIMEOUT);
    match ctx.executor.run(&command) {
        Ok(()) => OsStep::Rebooting,
        Err(error) => {
            let _ = ctx.records.clear_pending_os();
            refused(format!("the reboot into {} failed: {error}", pending.image))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::executor::ExecError;
    use flotilla::spec::UpdatePolicy;
    use std::sync::Mutex;

    /// A bootc-based device: what `bootc status --json` prints follows what `bootc switch` staged
    /// and what the test boots.
    #[derive(Default)]
    struct Bootc {
        calls: Mutex<Vec<String>>,
        booted: Mutex<(String, String)>,
        staged: Mutex<Option<(String, String)>>,
        switch_fails: bool,
    }

    impl Bootc {
        fn booted(image: &str, digest: &str) -> Bootc {
            let bootc = Bootc::default();
            *bootc.booted.lock().unwrap() = (image.into(), digest.into());
            bootc
        }

        fn calls(&self) -> Vec<String> {
            std::mem::take(&mut *self.calls.lock().unwrap())
        }

        /// The reboot: the staged image becomes the booted one, unless greenboot sends the device
        /// back to the old one.
        fn reboot(&self, greenboot_rolls_back: bool) {
            let staged = self.staged.lock().unwrap().take().unwrap();
            if !greenboot_rolls_back {
                *self.booted.lock().unwrap() = staged;
            }
        }

        fn json(&self) -> String {
            let entry = |(image, digest): &(String, String)| serde_json::json!({"image": {"image": {"image": image, "transport": "registry"}, "imageDigest": digest}, "pinned": false});
            serde_json::json!({
                "apiVersion": "org.containers.bootc/v1",
                "kind": "BootcHost",
                "status": {
                    "booted": entry(&self.booted.lock().unwrap()),
                    "staged": self.staged.lock().unwrap().as_ref().map(entry),
                    "rollback": null,
                }
            })
            .to_string()
        }
    }

    impl Executor for Bootc {
        fn run(&self, command: &CommandLine) -> Result<(), ExecError> {
            let shown = command.display();
            self.calls.lock().unwrap().push(shown.clone());
            if let Some(image) = shown.strip_prefix("bootc switch --retain ") {
                if self.switch_fails {
                    return Err(ExecError::failed(
                        "`bootc switch` exited with 1: no such image".into(),
                    ));
                }
                *self.staged.lock().unwrap() =
                    Some((image.to_string(), format!("sha256:{image}-digest")));
            }
            Ok(())
        }

        fn output(&self, command: &CommandLine) -> Result<String, ExecError> {
            self.run(command)?;
            Ok(self.json())
        }
    }

    const OLD: &str = "quay.io/acme/edge-os:1.0";
    const NEW: &str = "quay.io/acme/edge-os:1.1";

    fn at(text: &str) -> i64 {
        text.parse::<jiff::Timestamp>().unwrap().as_millisecond()
    }

    fn windows(download: &str, update: &str) -> Windows {
        UpdatePolicy {
            download_schedule: Some(download.into()),
            update_schedule: Some(update.into()),
            time_zone: None,
        }
        .windows()
        .unwrap()
    }

    struct Device {
        bootc: Bootc,
        records: Records,
        windows: Windows,
        _tmp: tempfile::TempDir,
    }

    impl Device {
        fn new(windows: Windows) -> Device {
            let tmp = tempfile::tempdir().unwrap();
            Device {
                bootc: Bootc::booted(OLD, "sha256:old-digest"),
                records: Records::new(tmp.path()),
                windows,
                _tmp: tmp,
            }
        }

        fn step(&self, boot_id: &str, now_ms: i64) -> OsStep {
            let ctx = OsContext {
                executor: &self.bootc,
                records: &self.records,
                windows: &self.windows,
                boot_id,
                now_ms,
            };
            step(&ctx, NEW, "spec-2").0
        }
    }

    #[test]
    fn the_image_is_staged_rebooted_into_and_confirmed_by_its_digest() {
        let device = Device::new(Windows::default());
        let now = at("2026-12-07T12:00:00Z");
        assert_eq!(device.step("boot-1", now), OsStep::Rebooting);
        assert_eq!(
            device.bootc.calls(),
            [
                "bootc status --json",
                format!("bootc switch --retain {NEW}").as_str(),
                "bootc status --json",
                "systemctl reboot",
            ]
        );
        // The agent starts again before the reboot went through: no second switch, the reboot
        // is asked again.
        assert_eq!(device.step("boot-1", now), OsStep::Rebooting);
        assert_eq!(
            device.bootc.calls(),
            ["bootc status --json", "systemctl reboot"]
        );
        device.bootc.reboot(false);
        assert_eq!(device.step("boot-2", now), OsStep::Ready);
        assert_eq!(device.bootc.calls(), ["bootc status --json"]);
        assert_eq!(device.records.pending_os(), None);
        // And from then on it runs the image: nothing to do.
        assert_eq!(device.step("boot-2", now), OsStep::Ready);
    }

    #[test]
    fn a_greenboot_rollback_is_a_failed_update_with_the_reason() {
        let device = Device::new(Windows::default());
        let now = at("2026-12-07T12:00:00Z");
        assert_eq!(device.step("boot-1", now), OsStep::Rebooting);
        device.bootc.calls();
        device.bootc.reboot(true);
        match device.step("boot-2", now) {
            OsStep::Refused {
                reason,
                rolled_back: true,
            } => {
                assert!(reason.contains("greenboot rolled it back"), "{reason}");
                assert!(reason.contains(OLD), "{reason}");
            }
            other => panic!("expected a rolled-back refusal, got {other:?}"),
        }
        assert_eq!(device.bootc.calls(), ["bootc status --json"]);
        assert_eq!(device.records.pending_os(), None);
    }

    #[test]
    fn staging_and_rebooting_wait_for_their_windows() {
        // Downloads at night from 01:00, reboots on Sundays from 03:00 to 03:59.
        let device = Device::new(windows("* 1-5 * * *", "* 3 * * 0"));
        // Monday 12:00: nothing may happen; the next download window opens at 01:00.
        let monday = at("2026-12-07T12:00:00Z");
        assert_eq!(
            device.step("boot-1", monday),
            OsStep::Wait {
                until_ms: Some(at("2026-12-08T01:00:00Z")),
                phase: UpdatePhase::WaitingForWindow
            }
        );
        assert_eq!(device.bootc.calls(), ["bootc status --json"]);
        // Tuesday 01:30: staged, then waiting for Sunday 03:00 to reboot.
        let tuesday = at("2026-12-08T01:30:00Z");
        assert_eq!(
            device.step("boot-1", tuesday),
            OsStep::Wait {
                until_ms: Some(at("2026-12-13T03:00:00Z")),
                phase: UpdatePhase::WaitingForWindow
            }
        );
        assert_eq!(
            device.bootc.calls(),
            [
                "bootc status --json",
                format!("bootc switch --retain {NEW}").as_str(),
                "bootc status --json"
            ]
        );
        // Sunday 03:10: staged already, so straight to the reboot.
        assert_eq!(
            device.step("boot-1", at("2026-12-13T03:10:00Z")),
            OsStep::Rebooting
        );
        assert_eq!(
            device.bootc.calls(),
            ["bootc status --json", "systemctl reboot"]
        );
    }

    #[test]
    fn a_device_without_bootc_refuses_the_image() {
        let tmp = tempfile::tempdir().unwrap();
        let records = Records::new(tmp.path());
        let windows = Windows::default();
        let executor =
            crate::apply::executor::recording::RecordingExecutor::failing_on("bootc status --json");
        let ctx = OsContext {
            executor: &executor,
            records: &records,
            windows: &windows,
            boot_id: "b",
            now_ms: 0,
        };
        match step(&ctx, NEW, "spec-2").0 {
            OsStep::Refused {
                reason,
                rolled_back: false,
            } => {
                assert!(reason.contains("needs a bootc-based device"), "{reason}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        let broken = Bootc {
            switch_fails: true,
            ..Bootc::booted(OLD, "sha256:old")
        };
        let ctx = OsContext {
            executor: &broken,
            ..ctx
        };
        assert!(matches!(
            step(&ctx, NEW, "spec-2").0,
            OsStep::Refused {
                rolled_back: false,
                ..
            }
        ));
    }

    #[test]
    fn real_bootc_status_output_parses() {
        let json = r#"{"apiVersion":"org.containers.bootc/v1","kind":"BootcHost","metadata":{"name":"host"},
          "spec":{"image":{"image":"quay.io/acme/edge-os:1.0","transport":"registry"},"bootOrder":"default"},
          "status":{"staged":null,
            "booted":{"image":{"image":{"image":"quay.io/acme/edge-os:1.0","transport":"registry"},"version":"41.20241201","timestamp":null,"imageDigest":"sha256:aaaa"},"cachedUpdate":null,"incompatible":false,"pinned":false,"store":"ostreeContainer","ostree":{"checksum":"x","deploySerial":0}},
            "rollback":null,"rollbackQueued":false,"type":"bootcHost"}}"#;
        let status = parse_status(json).unwrap();
        assert_eq!(
            status.booted,
            Some(BootEntry {
                image: "quay.io/acme/edge-os:1.0".into(),
                digest: "sha256:aaaa".into()
            })
        );
        assert_eq!(status.staged, None);
        assert!(parse_status("{}").is_err());
    }
}

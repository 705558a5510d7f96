//! The parts of a spec that update the device itself: the agent release it should run, the OS image
//! of a bootc-based device, and the maintenance windows that say when either may be downloaded and
//! applied. Validation and window arithmetic are pure: the agent evaluates windows against its
//! clock, the control plane validates them before anything is stored.

use super::validate::SpecError;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};

/// Longest OS image reference accepted.
const MAX_IMAGE_REF: usize = 512;
/// Longest schedule or time-zone text accepted.
const MAX_SCHEDULE: usize = 128;
const MINUTE_MS: i64 = 60_000;

/// The agent release a device should run: `agent: {version: 1.4.0}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AgentUpdate {
    /// The agent version to run (an agent release of that version).
    pub version: String,
    /// Installing a release older than the running one needs this.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_downgrade: bool,
}

/// The OS image of a bootc-based device: `os: {image: quay.io/acme/edge-os:1.4}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OsUpdate {
    /// The bootc image reference to run.
    pub image: String,
}

/// When updates of the agent and the OS may be downloaded and applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UpdatePolicy {
    /// Cron expression of the minutes in which downloads and staging may happen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download_schedule: Option<String>,
    /// Cron expression of the minutes in which a new agent may start and the device may reboot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_schedule: Option<String>,
    /// IANA time zone of both schedules (UTC when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
}

/// A release version: semantic versioning (`1.4.0`, `2.0.0-rc.1`).
pub fn parse_release_version(text: &str) -> Result<semver::Version, String> {
    semver::Version::parse(text)
        .map_err(|e| format!("{text:?} is not a semantic version (like 1.4.0): {e}"))
}

/// Why an image reference is unusable, if it is.
fn check_image(image: &str) -> Result<(), String> {
    if image.is_empty() {
        return Err("must name an image".into());
    }
    if image.len() > MAX_IMAGE_REF {
        return Err(format!("longer than {MAX_IMAGE_REF} bytes"));
    }
    if image
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '\0')
    {
        return Err("must not contain whitespace or control characters".into());
    }
    if image.starts_with('-') {
        return Err("must not start with '-'".into());
    }
    Ok(())
}

/// A set of minutes, in a time zone, during which something may happen.
#[derive(Debug, Clone)]
pub struct Window {
    cron: Cron,
    zone: TimeZone,
    text: String,
}

/// A time zone by IANA name; UTC for none.
pub fn time_zone(name: Option<&str>) -> Result<TimeZone, String> {
    match name.filter(|n| !n.is_empty()) {
        None => Ok(TimeZone::UTC),
        Some(name) if name.len() > MAX_SCHEDULE => Err("time zone name too long".into()),
        Some(name) => TimeZone::get(name)
            .map_err(|_| format!("{name:?} is not an IANA time zone (like Europe/Berlin)")),
    }
}

impl Window {
    /// Parses a five-field cron expression (minute hour day-of-month month day-of-week).
    pub fn parse(text: &str, zone: TimeZone) -> Result<Window, String> {
        if text.len() > MAX_SCHEDULE {
            return Err(format!("longer than {MAX_SCHEDULE} bytes"));
        }
        if text.split_whitespace().count() != 5 {
            return Err(format!(
                "{text:?} must have five fields: minute hour day-of-month month day-of-week"
            ));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .build()
            .parse(text)
            .map_err(|e| format!("{text:?} is not a cron expression: {e}"))?;
        Ok(Window {
            cron,
            zone,
            text: text.to_string(),
        })
    }

    /// The minute holding `at_ms`, in the window's zone.
    fn minute(&self, at_ms: i64) -> Option<jiff::Zoned> {
        let floor = at_ms.div_euclid(MINUTE_MS) * MINUTE_MS;
        Timestamp::from_millisecond(floor)
            .ok()
            .map(|t| t.to_zoned(self.zone.clone()))
    }

    /// Whether the minute holding `at_ms` is in the window.
    pub fn is_open(&self, at_ms: i64) -> bool {
        self.minute(at_ms)
            .is_some_and(|minute| self.cron.is_time_matching(&minute).unwrap_or(false))
    }

    /// When the window is next open at or after `at_ms` (`at_ms` itself while it is open); `None`
    /// when it never opens again.
    pub fn next_open(&self, at_ms: i64) -> Option<i64> {
        if self.is_open(at_ms) {
            return Some(at_ms);
        }
        let minute = self.minute(at_ms)?;
        self.cron
            .find_next_occurrence(&minute, false)
            .ok()
            .map(|next| next.timestamp().as_millisecond())
    }

    /// The cron expression as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// The two windows of a policy; `None` is "any time".
#[derive(Debug, Clone, Default)]
pub struct Windows {
    /// When downloads and staging may happen.
    pub download: Option<Window>,
    /// When updates may be applied and the device rebooted.
    pub update: Option<Window>,
}

/// Whether `window` (none: any time) is open at `now_ms`; if not, when it opens (`None`: never).
fn open(window: Option<&Window>, now_ms: i64) -> Result<(), Option<i64>> {
    match window.map_or(Some(now_ms), |w| w.next_open(now_ms)) {
        Some(at) if at <= now_ms => Ok(()),
        next => Err(next),
    }
}

impl Windows {
    /// Ok when downloads may happen at `now_ms`; otherwise when they may (`None`: never).
    pub fn download_open(&self, now_ms: i64) -> Result<(), Option<i64>> {
        open(self.download.as_ref(), now_ms)
    }

    /// Ok when an update may be applied at `now_ms`; otherwise when it may (`None`: never).
    pub fn update_open(&self, now_ms: i64) -> Result<(), Option<i64>> {
        open(self.update.as_ref(), now_ms)
    }
}

impl UpdatePolicy {
    /// The policy's windows, or the field that is wrong.
    pub fn windows(&self) -> Result<Windows, SpecError> {
        let zone = time_zone(self.time_zone.as_deref())
            .map_err(|reason| SpecError::new("updatePolicy.timeZone", reason))?;
        let parse = |field: &str, text: &Option<String>| {
            text.as_deref()
                .filter(|t| !t.trim().is_empty())
                .map(|t| Window::parse(t, zone.clone()))
                .transpose()
                .map_err(|reason| SpecError::new(format!("updatePolicy.{field}"), reason))
        };
        Ok(Windows {
            download: parse("downloadSchedule", &self.download_schedule)?,
            update: parse("updateSchedule", &self.update_schedule)?,
        })
    }
}

/// Checks the update parts of a spec.
pub(super) fn check(
    agent: Option<&AgentUpdate>,
    os: Option<&OsUpdate>,
    policy: Option<&UpdatePolicy>,
) -> Result<(), SpecError> {
    if let Some(agent) = agent {
        parse_release_version(&agent.version)
            .map_err(|reason| SpecError::new("agent.version", reason))?;
    }
    if let Some(os) = os {
        check_image(&os.image).map_err(|reason| SpecError::new("os.image", reason))?;
    }
    if let Some(policy) = policy {
        policy.windows()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> i64 {
        text.parse::<Timestamp>().unwrap().as_millisecond()
    }

    #[test]
    fn a_window_is_the_set_of_minutes_its_expression_matches() {
        let window = Window::parse("* 2-4 * * 1-5", TimeZone::UTC).unwrap();
        // Monday 2026-12-07.
        assert!(window.is_open(at("2026-12-07T02:00:00Z")));
        assert!(window.is_open(at("2026-12-07T04:59:59Z")));
        assert!(!window.is_open(at("2026-12-07T05:00:00Z")));
        assert!(!window.is_open(at("2026-12-07T01:59:59Z")));
        // Saturday: closed all day; the next opening is Monday 02:00.
        assert!(!window.is_open(at("2026-12-12T03:00:00Z")));
        assert_eq!(
            window.next_open(at("2026-12-12T03:00:00Z")),
            Some(at("2026-12-14T02:00:00Z"))
        );
        assert_eq!(
            window.next_open(at("2026-12-07T03:10:30Z")),
            Some(at("2026-12-07T03:10:30Z"))
        );
    }

    #[test]
    fn windows_follow_their_time_zone() {
        let berlin = time_zone(Some("Europe/Berlin")).unwrap();
        let window = Window::parse("* 2 * * *", berlin).unwrap();
        // 02:30 in Berlin in winter is 01:30 UTC.
        assert!(window.is_open(at("2026-12-07T01:30:00Z")));
        assert!(!window.is_open(at("2026-12-07T02:30:00Z")));
        assert_eq!(
            window.next_open(at("2026-12-07T02:30:00Z")),
            Some(at("2026-12-08T01:00:00Z"))
        );
    }

    #[test]
    fn bad_policies_name_their_field() {
        let policy = |d: &str, u: &str, z: &str| UpdatePolicy {
            download_schedule: Some(d.into()),
            update_schedule: Some(u.into()),
            time_zone: Some(z.into()),
        };
        let error = policy("* * * * *", "* * * *", "UTC").windows().unwrap_err();
        assert_eq!(error.field, "updatePolicy.updateSchedule");
        assert!(error.reason.contains("five fields"), "{error}");
        let error = policy("* 25 * * *", "* * * * *", "UTC")
            .windows()
            .unwrap_err();
        assert_eq!(error.field, "updatePolicy.downloadSchedule");
        let error = policy("* * * * *", "* * * * *", "Mars/Olympus")
            .windows()
            .unwrap_err();
        assert_eq!(error.field, "updatePolicy.timeZone");
        assert!(
            policy("*/5 1-3 * * MON-FRI", "0 2 * * *", "Europe/Berlin")
                .windows()
                .is_ok()
        );
    }

    #[test]
    fn versions_and_images_are_checked() {
        assert!(
            check(
                Some(&AgentUpdate {
                    version: "1.4".into(),
                    allow_downgrade: false
                }),
                None,
                None
            )
            .is_err()
        );
        assert!(
            check(
                Some(&AgentUpdate {
                    version: "1.4.0-rc.1".into(),
                    allow_downgrade: false
                }),
                Some(&OsUpdate {
                    image: "quay.io/acme/os@sha256:abc".into()
                }),
                None
            )
            .is_ok()
        );
        let error = check(
            None,
            Some(&OsUpdate {
                image: "--root=/".into(),
            }),
            None,
        )
        .unwrap_err();
        assert_eq!(error.field, "os.image");
    }
}

//! Where a device's own software stands, as it reports it: the agent build and OS image it runs,
//! the phase of an update in progress (waiting for a window, downloading, confirming a new build,
//! rebooting), and the last update that failed. Pure.

use serde::{Deserialize, Serialize};

/// The step an update of the agent or the OS is at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum UpdatePhase {
    /// Nothing in progress.
    #[default]
    Idle,
    /// Fetching the new agent build or staging the OS image.
    Downloading,
    /// Ready, waiting for the update window to open.
    WaitingForWindow,
    /// Switching to the new build or image.
    Applying,
    /// A new agent build runs and must confirm before its deadline, or it is rolled back.
    Confirming,
    /// Rebooting into the new OS image.
    Rebooting,
}

impl UpdatePhase {
    /// Every phase, in order.
    pub const ALL: [UpdatePhase; 6] = [
        UpdatePhase::Idle,
        UpdatePhase::Downloading,
        UpdatePhase::WaitingForWindow,
        UpdatePhase::Applying,
        UpdatePhase::Confirming,
        UpdatePhase::Rebooting,
    ];

    /// The name shown (`waitingForWindow`).
    pub fn as_str(self) -> &'static str {
        match self {
            UpdatePhase::Idle => "idle",
            UpdatePhase::Downloading => "downloading",
            UpdatePhase::WaitingForWindow => "waitingForWindow",
            UpdatePhase::Applying => "applying",
            UpdatePhase::Confirming => "confirming",
            UpdatePhase::Rebooting => "rebooting",
        }
    }
}

/// What is being updated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpdateKind {
    /// The agent itself.
    Agent,
    /// The operating system image.
    Os,
}

impl UpdateKind {
    /// `agent` or `os`.
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateKind::Agent => "agent",
            UpdateKind::Os => "os",
        }
    }

    /// The kind a name stands for.
    pub fn parse(text: &str) -> Option<UpdateKind> {
        match text {
            "agent" => Some(UpdateKind::Agent),
            "os" => Some(UpdateKind::Os),
            _ => None,
        }
    }
}

/// An update that failed on the device: refused before anything changed, or rolled back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateFailure {
    /// Agent or OS.
    pub kind: UpdateKind,
    /// `1.4.0` or an image reference.
    pub target: String,
    /// Why it failed.
    pub reason: String,
    /// Whether the device went back to what it ran before.
    pub rolled_back: bool,
    /// When, Unix milliseconds.
    pub at_ms: i64,
}

impl UpdateFailure {
    /// `agent 1.4.0 rolled back: it exited 3 times at start`.
    pub fn describe(&self) -> String {
        let what = if self.rolled_back {
            "rolled back"
        } else {
            "refused"
        };
        format!(
            "{} {} {what}: {}",
            self.kind.as_str(),
            self.target,
            self.reason
        )
    }
}

/// The device's software and the update in progress.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateState {
    /// The running agent's version.
    pub agent_version: String,
    /// SHA-256 (hex) of the running agent binary.
    pub agent_digest: String,
    /// The OS image the device booted (bootc devices).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub os_image: String,
    /// Its digest.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub os_image_digest: String,
    /// Where an update stands.
    #[serde(default)]
    pub phase: UpdatePhase,
    /// `agent 1.4.0`, `os quay.io/acme/edge-os:1.4`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub target: String,
    /// When the update window next opens, Unix milliseconds, while waiting for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_window_ms: Option<i64>,
    /// What the agent says about the update.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// The last update that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<UpdateFailure>,
}

impl UpdateState {
    /// Every text of the report, named, for the bounds check.
    pub fn texts(&self) -> Vec<(&'static str, &str)> {
        let mut texts = vec![
            ("update.agentVersion", self.agent_version.as_str()),
            ("update.agentDigest", self.agent_digest.as_str()),
            ("update.osImage", self.os_image.as_str()),
            ("update.osImageDigest", self.os_image_digest.as_str()),
            ("update.target", self.target.as_str()),
            ("update.message", self.message.as_str()),
        ];
        if let Some(failure) = &self.last_failure {
            texts.push(("update.lastFailure.target", failure.target.as_str()));
            texts.push(("update.lastFailure.reason", failure.reason.as_str()));
        }
        texts
    }
}

/// A Unix-millisecond instant as RFC 3339 UTC (`2026-12-07T02:00:00Z`), for messages.
pub fn rfc3339(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|_| ms.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_and_instants_read_as_sentences() {
        let failure = UpdateFailure {
            kind: UpdateKind::Agent,
            target: "1.4.0".into(),
            reason: "it exited at start 3 times".into(),
            rolled_back: true,
            at_ms: 0,
        };
        assert_eq!(
            failure.describe(),
            "agent 1.4.0 rolled back: it exited at start 3 times"
        );
        assert_eq!(rfc3339(1_796_608_800_000), "2026-12-07T02:00:00Z");
    }
}

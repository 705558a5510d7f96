//! What `systemctl` must do to move units from one spec to the next, and how to undo it. Pure.

use super::executor::CommandLine;
use flotilla::spec::{DeviceSpec, UnitSpec, UnitState};
use std::collections::BTreeSet;
use std::time::Duration;

const SYSTEMCTL_TIMEOUT: Duration = Duration::from_secs(120);
/// Directories whose unit files systemd only notices after `daemon-reload`.
const UNIT_DIRECTORIES: &[&str] = &[
    "/etc/systemd/",
    "/run/systemd/",
    "/usr/lib/systemd/",
    "/lib/systemd/",
];

/// One `systemctl VERB UNIT` step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verb {
    Enable,
    Disable,
    Start,
    Stop,
    Restart,
    /// Restart only if running (for units whose run state the spec leaves alone).
    TryRestart,
}

impl Verb {
    fn as_str(self) -> &'static str {
        match self {
            Verb::Enable => "enable",
            Verb::Disable => "disable",
            Verb::Start => "start",
            Verb::Stop => "stop",
            Verb::Restart => "restart",
            Verb::TryRestart => "try-restart",
        }
    }

    fn inverse(self) -> Verb {
        match self {
            Verb::Enable => Verb::Disable,
            Verb::Disable => Verb::Enable,
            Verb::Start => Verb::Stop,
            Verb::Stop => Verb::Start,
            // The restored files must be picked up again.
            Verb::Restart => Verb::Restart,
            Verb::TryRestart => Verb::TryRestart,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct UnitAction {
    pub verb: Verb,
    pub unit: String,
}

impl UnitAction {
    pub(super) fn command(&self) -> CommandLine {
        CommandLine::new(
            &["systemctl", self.verb.as_str(), &self.unit],
            SYSTEMCTL_TIMEOUT,
        )
    }
}

pub(super) fn daemon_reload() -> CommandLine {
    CommandLine::new(&["systemctl", "daemon-reload"], SYSTEMCTL_TIMEOUT)
}

/// Whether a changed file is a unit definition systemd must reload.
pub(super) fn needs_daemon_reload(changed: &BTreeSet<String>) -> bool {
    changed
        .iter()
        .any(|path| UNIT_DIRECTORIES.iter().any(|dir| path.starts_with(dir)))
}

/// The steps, in spec order, that bring the units of `next` about, given the files that changed.
pub(super) fn plan(
    previous: &DeviceSpec,
    next: &DeviceSpec,
    changed: &BTreeSet<String>,
) -> Vec<UnitAction> {
    let mut actions = Vec::new();
    for unit in &next.units {
        let before: Option<&UnitSpec> = previous.units.iter().find(|u| u.name == unit.name);
        let was_enabled = before.and_then(|u| u.enabled);
        let was_state = before.and_then(|u| u.state);
        let mut push = |verb| {
            actions.push(UnitAction {
                verb,
                unit: unit.name.clone(),
            })
        };
        match unit.enabled {
            Some(true) if was_enabled != Some(true) => push(Verb::Enable),
            Some(false) if was_enabled != Some(false) => push(Verb::Disable),
            _ => {}
        }
        let triggered = unit.restart_on_change.iter().any(|p| changed.contains(p));
        match unit.state {
            Some(UnitState::Started) if was_state != Some(UnitState::Started) => push(Verb::Start),
            Some(UnitState::Started) if triggered => push(Verb::Restart),
            Some(UnitState::Stopped) if was_state != Some(UnitState::Stopped) => push(Verb::Stop),
            None if triggered => push(Verb::TryRestart),
            _ => {}
        }
    }
    actions
}

/// The steps that undo `done`, latest first.
pub(super) fn undo(done: &[UnitAction]) -> Vec<UnitAction> {
    done.iter()
        .rev()
        .map(|a| UnitAction {
            verb: a.verb.inverse(),
            unit: a.unit.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(
        name: &str,
        enabled: Option<bool>,
        state: Option<UnitState>,
        restart: &[&str],
    ) -> UnitSpec {
        UnitSpec {
            name: name.into(),
            enabled,
            state,
            restart_on_change: restart.iter().map(|s| s.to_string()).collect(),
            drift: None,
        }
    }

    fn shown(actions: &[UnitAction]) -> Vec<String> {
        actions.iter().map(|a| a.command().display()).collect()
    }

    #[test]
    fn enables_starts_restarts_and_stops_only_what_changed() {
        let previous = DeviceSpec::default();
        let next = DeviceSpec {
            units: vec![
                unit(
                    "app.service",
                    Some(true),
                    Some(UnitState::Started),
                    &["/etc/app.conf"],
                ),
                unit("old.timer", Some(false), Some(UnitState::Stopped), &[]),
            ],
            ..Default::default()
        };
        let changed = BTreeSet::from(["/etc/app.conf".to_string()]);
        assert_eq!(
            shown(&plan(&previous, &next, &changed)),
            [
                "systemctl enable app.service",
                "systemctl start app.service",
                "systemctl disable old.timer",
                "systemctl stop old.timer"
            ]
        );
        // Same units again: only a restart, and only when a watched file changed.
        assert_eq!(
            shown(&plan(&next, &next, &changed)),
            ["systemctl restart app.service"]
        );
        assert!(plan(&next, &next, &BTreeSet::new()).is_empty());
        let loose = DeviceSpec {
            units: vec![unit("app.service", None, None, &["/etc/app.conf"])],
            ..Default::default()
        };
        assert_eq!(
            shown(&plan(&loose, &loose, &changed)),
            ["systemctl try-restart app.service"]
        );
    }

    #[test]
    fn undo_inverts_in_reverse_order() {
        let done = vec![
            UnitAction {
                verb: Verb::Enable,
                unit: "a.service".into(),
            },
            UnitAction {
                verb: Verb::Start,
                unit: "a.service".into(),
            },
        ];
        assert_eq!(
            shown(&undo(&done)),
            ["systemctl stop a.service", "systemctl disable a.service"]
        );
        assert!(needs_daemon_reload(&BTreeSet::from([
            "/etc/systemd/system/a.service".to_string()
        ])));
        assert!(!needs_daemon_reload(&BTreeSet::from([
            "/etc/app.conf".to_string()
        ])));
    }
}

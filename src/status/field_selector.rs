//! Field selectors on device status (`status.summary=Degraded,status.arch!=aarch64`), as
//! `kubectl --field-selector`: a conjunction of `field=value`, `field==value` or `field!=value`.
//! Pure: a device's values are looked up through a function.

use super::conditions::Summary;
use std::fmt;
use std::str::FromStr;

/// The fields a selector may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// `status.summary`.
    Summary,
    /// `status.os` (os-release ID).
    Os,
    /// `status.arch`.
    Arch,
    /// `status.agentVersion`.
    AgentVersion,
    /// `status.online`.
    Online,
    /// `status.syncState`.
    SyncState,
}

impl Field {
    const ALL: [Field; 6] = [
        Field::Summary,
        Field::Os,
        Field::Arch,
        Field::AgentVersion,
        Field::Online,
        Field::SyncState,
    ];

    /// The field's name in a selector.
    pub fn name(self) -> &'static str {
        match self {
            Field::Summary => "status.summary",
            Field::Os => "status.os",
            Field::Arch => "status.arch",
            Field::AgentVersion => "status.agentVersion",
            Field::Online => "status.online",
            Field::SyncState => "status.syncState",
        }
    }

    /// The values a field can take, where that is a closed set.
    fn allowed(self) -> Option<Vec<&'static str>> {
        match self {
            Field::Summary => Some(Summary::ALL.iter().map(|s| s.as_str()).collect()),
            Field::Online => Some(vec!["true", "false"]),
            Field::SyncState => Some(vec!["Synced", "Pending", "Error", "Offline", "Revoked"]),
            Field::Os | Field::Arch | Field::AgentVersion => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Requirement {
    field: Field,
    equals: bool,
    value: String,
}

/// A conjunction of requirements; the empty selector matches every device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    requirements: Vec<Requirement>,
}

/// Why a field selector does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid field selector {input:?}: {reason}")]
pub struct FieldSelectorError {
    /// The selector as given.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

impl FieldSelector {
    /// Whether it selects everything.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Whether a device whose field values `value_of` gives matches.
    pub fn matches(&self, value_of: impl Fn(Field) -> String) -> bool {
        self.requirements
            .iter()
            .all(|r| (value_of(r.field) == r.value) == r.equals)
    }
}

impl FromStr for FieldSelector {
    type Err = FieldSelectorError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let error = |reason: String| FieldSelectorError {
            input: input.to_string(),
            reason,
        };
        let mut requirements = Vec::new();
        if input.trim().is_empty() {
            return Ok(FieldSelector { requirements });
        }
        for term in input.split(',') {
            let term = term.trim();
            let (name, equals, value) = if let Some((name, value)) = term.split_once("!=") {
                (name, false, value)
            } else if let Some((name, value)) = term.split_once("==") {
                (name, true, value)
            } else if let Some((name, value)) = term.split_once('=') {
                (name, true, value)
            } else {
                return Err(error(format!(
                    "{term:?} is not field=value, field==value or field!=value"
                )));
            };
            let (name, value) = (name.trim(), value.trim());
            let field = Field::ALL
                .into_iter()
                .find(|f| f.name() == name)
                .ok_or_else(|| {
                    let known: Vec<&str> = Field::ALL.iter().map(|f| f.name()).collect();
                    error(format!(
                        "unknown field {name:?}; known fields: {}",
                        known.join(", ")
                    ))
                })?;
            if value.is_empty() || value.contains(['=', '!']) {
                return Err(error(format!("{name} needs a value")));
            }
            if let Some(allowed) = field.allowed()
                && !allowed.contains(&value)
            {
                return Err(error(format!(
                    "{name} cannot be {value:?}; it is one of {}",
                    allowed.join(", ")
                )));
            }
            requirements.push(Requirement {
                field,
                equals,
                value: value.to_string(),
            });
        }
        Ok(FieldSelector { requirements })
    }
}

impl fmt::Display for FieldSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let terms: Vec<String> = self
            .requirements
            .iter()
            .map(|r| {
                let op = if r.equals { "=" } else { "!=" };
                format!("{}{op}{}", r.field.name(), r.value)
            })
            .collect();
        f.write_str(&terms.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(field: Field) -> String {
        match field {
            Field::Summary => "Degraded",
            Field::Os => "debian",
            Field::Arch => "x86_64",
            Field::AgentVersion => "0.1.0",
            Field::Online => "true",
            Field::SyncState => "Synced",
        }
        .to_string()
    }

    #[test]
    fn matches_conjunctions() {
        let parse = |s: &str| s.parse::<FieldSelector>().unwrap();
        assert!(parse("").matches(device));
        assert!(parse("status.summary=Degraded").matches(device));
        assert!(parse("status.summary==Degraded, status.arch!=aarch64").matches(device));
        assert!(!parse("status.summary=Degraded,status.os!=debian").matches(device));
        assert!(parse("status.online=true,status.syncState=Synced").matches(device));
        assert_eq!(
            parse("status.os==debian, status.arch!=arm").to_string(),
            "status.os=debian,status.arch!=arm"
        );
    }

    #[test]
    fn refuses_what_it_cannot_mean() {
        for (input, expect) in [
            ("status.summary", "is not field=value"),
            (
                "status.color=red",
                "unknown field \"status.color\"; known fields: status.summary",
            ),
            (
                "status.summary=Sad",
                "cannot be \"Sad\"; it is one of Healthy, Degraded",
            ),
            ("status.os=", "status.os needs a value"),
            ("status.online=yes", "cannot be \"yes\""),
            ("status.os=a=b", "needs a value"),
        ] {
            let error = input.parse::<FieldSelector>().unwrap_err().to_string();
            assert!(error.contains(expect), "{input}: {error}");
        }
    }
}

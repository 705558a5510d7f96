//! A rollout policy in its document form, as fleets are written and stored (`count` or `percent`,
//! selectors as text), and its conversion into a validated `Policy`.

use super::{Amount, BatchSpec, Policy, PolicyError};
use crate::selector::Selector;

/// A rollout policy as written in a fleet document and stored: amounts as `count` or `percent`,
/// selectors as text. Converted to a `Policy` (and validated) before use.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RolloutSpec {
    /// The batches, in order; the devices no batch takes form a last one.
    pub batches: Vec<BatchDoc>,
    /// Percent of a batch that must be SYNCED before the next starts (default 100).
    #[serde(default = "default_threshold")]
    pub success_threshold: u8,
    /// How long a batch may take before the rollout pauses (default 600).
    #[serde(default = "default_deadline")]
    pub progress_deadline_seconds: u64,
    /// `3` or `"20%"`.
    #[serde(default = "default_budget")]
    pub max_unavailable: AmountDoc,
    /// At most this many devices with the same value of a label unavailable at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable_per_label: Option<PerLabelDoc>,
    /// Percent of a batch whose NACKs halt the rollout (default 1: any NACK).
    #[serde(default = "default_nack_threshold")]
    pub nack_halt_threshold: u8,
    /// Whether offline devices count against the batch (default true).
    #[serde(default = "default_offline_blocks")]
    pub offline_blocks: bool,
}

/// One batch as written: `count` or `percent`, optionally only devices matching `selector`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchDoc {
    /// This many devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// This share of the fleet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u8>,
    /// Only devices matching this label selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
}

/// A number of devices as written: `3` or `"20%"`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum AmountDoc {
    /// A number.
    Count(u32),
    /// A number or a percentage, as text.
    Text(String),
}

/// The per-label budget as written.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerLabelDoc {
    /// The label key.
    pub label: String,
    /// Devices per value of it.
    pub max: u32,
}

pub(crate) fn default_threshold() -> u8 {
    100
}
pub(crate) fn default_deadline() -> u64 {
    600
}
pub(crate) fn default_budget() -> AmountDoc {
    AmountDoc::Text("25%".into())
}
pub(crate) fn default_nack_threshold() -> u8 {
    1
}
fn default_offline_blocks() -> bool {
    true
}

fn amount_of(doc: &AmountDoc, field: &str) -> Result<Amount, PolicyError> {
    match doc {
        AmountDoc::Count(n) => Ok(Amount::Count(*n)),
        AmountDoc::Text(text) => {
            let parsed = match text.strip_suffix('%') {
                Some(p) => p.trim().parse::<u8>().ok().map(Amount::Percent),
                None => text.trim().parse::<u32>().ok().map(Amount::Count),
            };
            parsed.ok_or_else(|| PolicyError {
                field: field.into(),
                reason: format!("{text:?} is not a count or a percentage like \"20%\""),
            })
        }
    }
}

impl RolloutSpec {
    /// The validated policy.
    pub fn to_policy(&self) -> Result<Policy, PolicyError> {
        let mut batches = Vec::new();
        for (i, batch) in self.batches.iter().enumerate() {
            let field = format!("rollout.batches[{i}]");
            let size = match (batch.count, batch.percent) {
                (Some(n), None) => Amount::Count(n),
                (None, Some(p)) => Amount::Percent(p),
                _ => {
                    return Err(PolicyError {
                        field,
                        reason: "give exactly one of count and percent".into(),
                    });
                }
            };
            let selector = batch
                .selector
                .as_deref()
                .map(Selector::parse)
                .transpose()
                .map_err(|e| PolicyError {
                    field: format!("{field}.selector"),
                    reason: e.to_string(),
                })?;
            batches.push(BatchSpec { size, selector });
        }
        let policy = Policy {
            batches,
            success_threshold: self.success_threshold,
            progress_deadline_ms: (self.progress_deadline_seconds as i64).saturating_mul(1000),
            max_unavailable: amount_of(&self.max_unavailable, "rollout.maxUnavailable")?,
            max_unavailable_per_label: self
                .max_unavailable_per_label
                .as_ref()
                .map(|p| (p.label.clone(), p.max)),
            nack_halt_threshold: self.nack_halt_threshold,
            offline_blocks: self.offline_blocks,
        };
        policy.validate()?;
        Ok(policy)
    }
}

#[cfg(test)]
mod spec_tests {
    use super::*;

    #[test]
    fn documents_convert_to_validated_policies() {
        let spec: RolloutSpec = serde_json::from_value(serde_json::json!({
            "batches": [{"count": 2}, {"percent": 50, "selector": "site=berlin"}],
            "successThreshold": 90,
            "maxUnavailable": "20%",
            "maxUnavailablePerLabel": {"label": "site", "max": 1}
        }))
        .unwrap();
        let policy = spec.to_policy().unwrap();
        assert_eq!(policy.batches.len(), 2);
        assert_eq!(policy.max_unavailable, Amount::Percent(20));
        assert_eq!(policy.progress_deadline_ms, 600_000);
        let mut bad = spec.clone();
        bad.success_threshold = 150;
        assert_eq!(
            bad.to_policy().unwrap_err().field,
            "rollout.successThreshold"
        );
        let mut bad = spec.clone();
        bad.batches.clear();
        assert_eq!(bad.to_policy().unwrap_err().field, "rollout.batches");
        let mut bad = spec;
        bad.max_unavailable = AmountDoc::Text("lots".into());
        assert_eq!(bad.to_policy().unwrap_err().field, "rollout.maxUnavailable");
    }
}

//! Conversions between a rollout policy document and its protobuf form.

use crate::proto::admin::v1 as admin;
use crate::rollout::{
    AmountDoc, BatchDoc, PerLabelDoc, RolloutSpec, default_budget, default_deadline,
    default_nack_threshold, default_threshold,
};

impl From<RolloutSpec> for admin::RolloutPolicy {
    fn from(spec: RolloutSpec) -> Self {
        admin::RolloutPolicy {
            batches: spec
                .batches
                .into_iter()
                .map(|b| admin::RolloutBatch {
                    count: b.count.unwrap_or(0),
                    percent: b.percent.map(u32::from).unwrap_or(0),
                    selector: b.selector.unwrap_or_default(),
                })
                .collect(),
            success_threshold: spec.success_threshold.into(),
            progress_deadline_seconds: u32::try_from(spec.progress_deadline_seconds)
                .unwrap_or(u32::MAX),
            max_unavailable: match spec.max_unavailable {
                AmountDoc::Count(n) => n.to_string(),
                AmountDoc::Text(t) => t,
            },
            max_unavailable_per_label: spec
                .max_unavailable_per_label
                .as_ref()
                .map(|p| p.label.clone())
                .unwrap_or_default(),
            max_unavailable_per_label_count: spec
                .max_unavailable_per_label
                .map(|p| p.max)
                .unwrap_or(0),
            nack_halt_threshold: spec.nack_halt_threshold.into(),
            ignore_offline: !spec.offline_blocks,
        }
    }
}

fn small(value: u32, default: u8) -> u8 {
    if value == 0 {
        default
    } else {
        u8::try_from(value).unwrap_or(u8::MAX)
    }
}

impl From<admin::RolloutPolicy> for RolloutSpec {
    /// Zero and empty fields take the documented defaults.
    fn from(policy: admin::RolloutPolicy) -> Self {
        RolloutSpec {
            batches: policy
                .batches
                .into_iter()
                .map(|b| BatchDoc {
                    count: Some(b.count).filter(|c| *c > 0),
                    percent: Some(b.percent)
                        .filter(|p| *p > 0)
                        .map(|p| u8::try_from(p).unwrap_or(u8::MAX)),
                    selector: Some(b.selector).filter(|s| !s.is_empty()),
                })
                .collect(),
            success_threshold: small(policy.success_threshold, default_threshold()),
            progress_deadline_seconds: if policy.progress_deadline_seconds == 0 {
                default_deadline()
            } else {
                policy.progress_deadline_seconds.into()
            },
            max_unavailable: if policy.max_unavailable.is_empty() {
                default_budget()
            } else {
                AmountDoc::Text(policy.max_unavailable)
            },
            max_unavailable_per_label: Some(policy.max_unavailable_per_label)
                .filter(|l| !l.is_empty())
                .map(|label| PerLabelDoc {
                    label,
                    max: policy.max_unavailable_per_label_count.max(1),
                }),
            nack_halt_threshold: small(policy.nack_halt_threshold, default_nack_threshold()),
            offline_blocks: !policy.ignore_offline,
        }
    }
}

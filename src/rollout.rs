//! Rollout planning: which devices of a fleet move to a new template revision next, when a batch
//! is done, and when a rollout must pause. Pure and deterministic: the engine feeds it the
//! persisted progress and the devices' live state, and carries out its decision.
//!
//! Percentages round up (1% of 10 devices is 1 device, never 0). A batch is done when its share of
//! devices SYNCED on the new revision reaches the success threshold; offline devices count as not
//! done, and when the policy says they do not block, they are left out of the count instead.

mod document;
mod plan;

pub use document::{AmountDoc, BatchDoc, PerLabelDoc, RolloutSpec};
pub(crate) use document::{
    default_budget, default_deadline, default_nack_threshold, default_threshold,
};
pub use plan::{batch_count, plan};

use crate::selector::Selector;
use std::collections::BTreeMap;

/// A number of devices, or a share of the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Amount {
    /// This many devices.
    Count(u32),
    /// This share of the fleet, rounded up.
    Percent(u8),
}

impl Amount {
    /// How many devices this is in a fleet of `total`; percentages round up.
    pub fn of(self, total: usize) -> usize {
        match self {
            Amount::Count(n) => (n as usize).min(total),
            Amount::Percent(p) => (p as usize * total).div_ceil(100).min(total),
        }
    }
}

/// One planned batch; the rollout adds a last batch for every device the others did not take.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchSpec {
    /// How many devices the batch takes.
    pub size: Amount,
    /// Only devices matching this are taken into the batch.
    pub selector: Option<Selector>,
}

/// How a fleet's new revisions reach its devices.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// The planned batches, in order.
    pub batches: Vec<BatchSpec>,
    /// Share (percent) of a batch that must be SYNCED on the new revision before the next starts.
    pub success_threshold: u8,
    /// A batch that is not done this long after it started pauses the rollout.
    pub progress_deadline_ms: i64,
    /// Most devices updating (moved, not yet SYNCED) at once, fleet-wide.
    pub max_unavailable: Amount,
    /// Most devices updating at once per value of this label, e.g. one per `site`.
    pub max_unavailable_per_label: Option<(String, u32)>,
    /// Share (percent) of a batch NACKing the revision that halts the rollout.
    pub nack_halt_threshold: u8,
    /// Whether offline devices hold a batch back (otherwise they are left out of its count).
    pub offline_blocks: bool,
}

/// A policy field that is out of range, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct PolicyError {
    /// The field, as written in a fleet document (`rollout.maxUnavailable`).
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl Policy {
    /// Checks ranges and that the batches can be planned.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let bad = |field: &str, reason: &str| {
            Err(PolicyError {
                field: field.into(),
                reason: reason.into(),
            })
        };
        if self.batches.is_empty() {
            return bad("rollout.batches", "must list at least one batch");
        }
        for (i, batch) in self.batches.iter().enumerate() {
            match batch.size {
                Amount::Count(0) | Amount::Percent(0) => {
                    return bad(
                        &format!("rollout.batches[{i}]"),
                        "must take at least one device",
                    );
                }
                Amount::Percent(p) if p > 100 => {
                    return bad(
                        &format!("rollout.batches[{i}].percent"),
                        "must be at most 100",
                    );
                }
                _ => {}
            }
        }
        if self.success_threshold == 0 || self.success_threshold > 100 {
            return bad(
                "rollout.successThreshold",
                "must be between 1 and 100 (percent)",
            );
        }
        if self.nack_halt_threshold > 100 {
            return bad("rollout.nackHaltThreshold", "must be at most 100 (percent)");
        }
        match self.max_unavailable {
            Amount::Count(0) | Amount::Percent(0) => {
                return bad("rollout.maxUnavailable", "must allow at least one device");
            }
            Amount::Percent(p) if p > 100 => {
                return bad("rollout.maxUnavailable", "must be at most 100%");
            }
            _ => {}
        }
        if let Some((key, 0)) = &self.max_unavailable_per_label {
            return bad(
                "rollout.maxUnavailablePerLabel",
                &format!("must allow at least one device per {key}"),
            );
        }
        if self.progress_deadline_ms <= 0 {
            return bad("rollout.progressDeadlineSeconds", "must be positive");
        }
        Ok(())
    }
}

/// A device of the fleet as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    /// The device's id.
    pub id: String,
    /// Batches take devices in name order.
    pub name: String,
    /// Its labels, for batch selectors and the per-label budget.
    pub labels: BTreeMap<String, String>,
    /// Moved to the rollout's target revision.
    pub moved: bool,
    /// SYNCED on the target revision.
    pub synced: bool,
    /// NACKed the target revision.
    pub nacked: bool,
    /// Whether it holds a session.
    pub online: bool,
}

/// What is persisted about a rollout's progress.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Progress {
    /// The batch in progress (index into the planned batches plus the implicit last one).
    pub batch: usize,
    /// Device ids of each batch started so far.
    pub members: Vec<Vec<String>>,
    /// When the current batch started, Unix milliseconds.
    pub batch_started_ms: i64,
}

/// What the engine should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start batch `batch` with these members (nothing moves yet).
    StartBatch {
        /// The batch to start.
        batch: usize,
        /// The devices it moves, by id.
        members: Vec<String>,
    },
    /// Move these devices of the current batch to the target revision.
    Move(Vec<String>),
    /// The current batch is done; the next one starts.
    Advance,
    /// Every batch is done.
    Complete,
    /// Stop until an operator resumes, saying why.
    Pause(String),
    /// Nothing to do until devices answer.
    Wait,
}

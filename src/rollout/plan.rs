//! The planner: which devices of a fleet move next, when a batch is done, and when a rollout must
//! pause — from the persisted progress and the devices' live state, with no I/O.

use super::{Decision, DeviceState, Policy, Progress};
use std::collections::{BTreeMap, BTreeSet};

/// Batches a policy runs over a fleet: the planned ones plus the implicit last batch.
pub fn batch_count(policy: &Policy) -> usize {
    policy.batches.len() + 1
}

/// The members of batch `index`: devices not in an earlier batch, matching its selector, by name.
fn choose_members(
    policy: &Policy,
    index: usize,
    devices: &[DeviceState],
    taken: &BTreeSet<&str>,
) -> Vec<String> {
    let mut candidates: Vec<&DeviceState> = devices
        .iter()
        .filter(|d| !taken.contains(d.id.as_str()))
        .collect();
    candidates.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));
    match policy.batches.get(index) {
        Some(spec) => {
            let size = spec.size.of(devices.len());
            candidates
                .into_iter()
                .filter(|d| spec.selector.as_ref().is_none_or(|s| s.matches(&d.labels)))
                .take(size)
                .map(|d| d.id.clone())
                .collect()
        }
        // The implicit last batch: everything left.
        None => candidates.into_iter().map(|d| d.id.clone()).collect(),
    }
}

/// Devices moved but not yet SYNCED on the target (offline or NACKing ones included): the ones
/// the disruption budget counts.
fn updating(devices: &[DeviceState]) -> impl Iterator<Item = &DeviceState> {
    devices.iter().filter(|d| d.moved && !d.synced)
}

fn percent(part: usize, whole: usize) -> usize {
    (part * 100).checked_div(whole).unwrap_or(100)
}

/// Decides the next step of a rollout.
pub fn plan(
    policy: &Policy,
    devices: &[DeviceState],
    progress: &Progress,
    now_ms: i64,
) -> Decision {
    let total_batches = batch_count(policy);
    if progress.batch >= total_batches {
        return Decision::Complete;
    }
    let Some(members) = progress.members.get(progress.batch) else {
        let taken: BTreeSet<&str> = progress
            .members
            .iter()
            .flatten()
            .map(String::as_str)
            .collect();
        return Decision::StartBatch {
            batch: progress.batch,
            members: choose_members(policy, progress.batch, devices, &taken),
        };
    };
    let by_id: BTreeMap<&str, &DeviceState> = devices.iter().map(|d| (d.id.as_str(), d)).collect();
    // Members that left the fleet meanwhile are no longer counted.
    let batch: Vec<&DeviceState> = members
        .iter()
        .filter_map(|id| by_id.get(id.as_str()).copied())
        .collect();

    let nacked = batch.iter().filter(|d| d.nacked).count();
    if nacked > 0 && percent(nacked, batch.len()) >= policy.nack_halt_threshold as usize {
        return Decision::Pause(format!(
            "batch {}: {nacked} of {} devices rejected the revision",
            progress.batch + 1,
            batch.len()
        ));
    }

    let done = batch.iter().filter(|d| d.synced).count();
    let counted = if policy.offline_blocks {
        batch.len()
    } else {
        batch.iter().filter(|d| d.online || d.synced).count()
    };
    let all_moved = batch
        .iter()
        .all(|d| d.moved || (!policy.offline_blocks && !d.online));
    if all_moved && percent(done, counted) >= policy.success_threshold as usize {
        return if progress.batch + 1 >= total_batches {
            Decision::Complete
        } else {
            Decision::Advance
        };
    }

    let elapsed = now_ms - progress.batch_started_ms;
    if elapsed > policy.progress_deadline_ms {
        return Decision::Pause(format!(
            "batch {} missed its progress deadline: {done} of {counted} devices synced, {} needed",
            progress.batch + 1,
            (policy.success_threshold as usize * counted).div_ceil(100)
        ));
    }

    // Move as many waiting members as the disruption budget allows.
    let in_flight: Vec<&DeviceState> = updating(devices).collect();
    let mut budget = policy
        .max_unavailable
        .of(devices.len())
        .max(1)
        .saturating_sub(in_flight.len());
    let mut per_label: BTreeMap<String, u32> = BTreeMap::new();
    if let Some((key, _)) = &policy.max_unavailable_per_label {
        for d in &in_flight {
            *per_label
                .entry(d.labels.get(key).cloned().unwrap_or_default())
                .or_default() += 1;
        }
    }
    let mut moves = Vec::new();
    for device in batch.iter().filter(|d| !d.moved) {
        if budget == 0 {
            break;
        }
        if let Some((key, max)) = &policy.max_unavailable_per_label {
            let group = device.labels.get(key).cloned().unwrap_or_default();
            let used = per_label.entry(group).or_default();
            if *used >= *max {
                continue;
            }
            *used += 1;
        }
        budget -= 1;
        moves.push(device.id.clone());
    }
    if moves.is_empty() {
        Decision::Wait
    } else {
        Decision::Move(moves)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::{Amount, BatchSpec};
    use proptest::prelude::*;

    fn policy(batches: Vec<Amount>) -> Policy {
        Policy {
            batches: batches
                .into_iter()
                .map(|size| BatchSpec {
                    size,
                    selector: None,
                })
                .collect(),
            success_threshold: 100,
            progress_deadline_ms: 60_000,
            max_unavailable: Amount::Count(2),
            max_unavailable_per_label: None,
            nack_halt_threshold: 50,
            offline_blocks: true,
        }
    }

    fn device(i: usize) -> DeviceState {
        DeviceState {
            id: format!("d{i:02}"),
            name: format!("d{i:02}"),
            labels: BTreeMap::from([("site".to_string(), format!("s{}", i % 3))]),
            moved: false,
            synced: false,
            nacked: false,
            online: true,
        }
    }

    #[test]
    fn percentages_round_up_and_counts_are_capped() {
        assert_eq!(Amount::Percent(1).of(10), 1);
        assert_eq!(Amount::Percent(10).of(10), 1);
        assert_eq!(Amount::Percent(11).of(10), 2);
        assert_eq!(Amount::Percent(100).of(7), 7);
        assert_eq!(Amount::Count(5).of(3), 3);
        assert_eq!(Amount::Percent(50).of(0), 0);
    }

    #[test]
    fn bad_policies_are_refused_with_the_field() {
        let mut p = policy(vec![]);
        assert_eq!(p.validate().unwrap_err().field, "rollout.batches");
        p = policy(vec![Amount::Percent(10)]);
        p.success_threshold = 101;
        assert_eq!(p.validate().unwrap_err().field, "rollout.successThreshold");
        p = policy(vec![Amount::Count(0)]);
        assert_eq!(p.validate().unwrap_err().field, "rollout.batches[0]");
        p = policy(vec![Amount::Percent(10)]);
        p.max_unavailable = Amount::Count(0);
        assert_eq!(p.validate().unwrap_err().field, "rollout.maxUnavailable");
        assert!(policy(vec![Amount::Percent(10)]).validate().is_ok());
    }

    #[test]
    fn a_batch_moves_within_budget_then_advances() {
        let p = policy(vec![Amount::Count(3)]);
        let mut devices: Vec<DeviceState> = (0..6).map(device).collect();
        let mut progress = Progress::default();
        let Decision::StartBatch { members, .. } = plan(&p, &devices, &progress, 0) else {
            panic!()
        };
        assert_eq!(members, ["d00", "d01", "d02"]);
        progress.members.push(members);
        assert_eq!(
            plan(&p, &devices, &progress, 1),
            Decision::Move(vec!["d00".into(), "d01".into()])
        );
        devices[0].moved = true;
        devices[1].moved = true;
        assert_eq!(
            plan(&p, &devices, &progress, 2),
            Decision::Wait,
            "budget of 2 used"
        );
        devices[0].synced = true;
        assert_eq!(
            plan(&p, &devices, &progress, 3),
            Decision::Move(vec!["d02".into()])
        );
        devices[1].synced = true;
        devices[2].moved = true;
        devices[2].synced = true;
        assert_eq!(plan(&p, &devices, &progress, 4), Decision::Advance);
        progress.batch = 1;
        let Decision::StartBatch { members, .. } = plan(&p, &devices, &progress, 5) else {
            panic!()
        };
        assert_eq!(
            members,
            ["d03", "d04", "d05"],
            "the implicit last batch takes the rest"
        );
    }

    #[test]
    fn nacks_and_deadlines_pause() {
        let p = policy(vec![Amount::Count(2)]);
        let mut devices: Vec<DeviceState> = (0..4).map(device).collect();
        let progress = Progress {
            batch: 0,
            members: vec![vec!["d00".into(), "d01".into()]],
            batch_started_ms: 0,
        };
        devices[0].moved = true;
        devices[0].nacked = true;
        assert!(
            matches!(plan(&p, &devices, &progress, 1), Decision::Pause(r) if r.contains("rejected"))
        );
        devices[0].nacked = false;
        assert!(
            matches!(plan(&p, &devices, &progress, 60_001), Decision::Pause(r) if r.contains("deadline"))
        );
    }

    #[test]
    fn per_label_budget_spreads_updates() {
        let mut p = policy(vec![Amount::Count(6)]);
        p.max_unavailable = Amount::Count(10);
        p.max_unavailable_per_label = Some(("site".into(), 1));
        let devices: Vec<DeviceState> = (0..6).map(device).collect();
        let progress = Progress {
            batch: 0,
            members: vec![devices.iter().map(|d| d.id.clone()).collect()],
            batch_started_ms: 0,
        };
        let Decision::Move(moves) = plan(&p, &devices, &progress, 1) else {
            panic!()
        };
        assert_eq!(moves, ["d00", "d01", "d02"], "one per site");
    }

    fn amount() -> impl Strategy<Value = Amount> {
        prop_oneof![
            (1u32..8).prop_map(Amount::Count),
            (1u8..=100).prop_map(Amount::Percent),
        ]
    }

    fn arbitrary_policy() -> impl Strategy<Value = Policy> {
        (
            prop::collection::vec(amount(), 1..4),
            1u8..=100,
            amount(),
            prop::option::of(1u32..3),
            1u8..=100,
            any::<bool>(),
        )
            .prop_map(
                |(batches, threshold, budget, per_site, nack, offline_blocks)| Policy {
                    batches: batches
                        .into_iter()
                        .map(|size| BatchSpec {
                            size,
                            selector: None,
                        })
                        .collect(),
                    success_threshold: threshold,
                    progress_deadline_ms: 1000,
                    max_unavailable: budget,
                    max_unavailable_per_label: per_site.map(|m| ("site".to_string(), m)),
                    nack_halt_threshold: nack,
                    offline_blocks,
                },
            )
    }

    proptest! {
        #[test]
        fn percentages_round_up_never_to_zero(p in 1u8..=100, n in 1usize..10_000) {
            let k = Amount::Percent(p).of(n);
            prop_assert!(k >= 1);
            prop_assert_eq!(k, (p as usize * n).div_ceil(100));
            prop_assert!(k <= n);
        }

        /// Whatever the devices do, a batch past its deadline and short of its threshold pauses,
        /// and so does a batch whose NACKs reach the halt threshold.
        #[test]
        fn a_failing_batch_always_pauses(
            policy in arbitrary_policy(),
            states in prop::collection::vec((any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()), 1..20),
        ) {
            let devices: Vec<DeviceState> = states
                .iter()
                .enumerate()
                .map(|(i, (moved, synced, nacked, online))| DeviceState {
                    moved: *moved,
                    synced: *moved && *synced,
                    nacked: *moved && *nacked && !*synced,
                    online: *online,
                    ..device(i)
                })
                .collect();
            let progress = Progress {
                batch: 0,
                members: vec![devices.iter().map(|d| d.id.clone()).collect()],
                batch_started_ms: 0,
            };
            let late = policy.progress_deadline_ms + 1;
            let decision = plan(&policy, &devices, &progress, late);
            let nacked = devices.iter().filter(|d| d.nacked).count();
            let counted = if policy.offline_blocks {
                devices.len()
            } else {
                devices.iter().filter(|d| d.online || d.synced).count()
            };
            let done = devices.iter().filter(|d| d.synced).count();
            let halted = nacked > 0 && percent(nacked, devices.len()) >= policy.nack_halt_threshold as usize;
            let short = percent(done, counted) < policy.success_threshold as usize;
            if halted || short {
                prop_assert!(matches!(decision, Decision::Pause(_)), "{:?}", decision);
            }
        }

        /// Runs whole rollouts with devices that sync, NACK or go offline at random.
        #[test]
        fn the_budget_is_never_exceeded_progress_is_monotonic_and_failures_pause(
            policy in arbitrary_policy(),
            count in 1usize..25,
            behaviour in prop::collection::vec(0u8..10, 25),
            seed in any::<u64>(),
        ) {
            let mut devices: Vec<DeviceState> = (0..count).map(device).collect();
            let mut progress = Progress::default();
            let mut now = 0i64;
            let budget = policy.max_unavailable.of(count).max(1);
            let mut steps = 0;
            loop {
                steps += 1;
                prop_assert!(steps < 10_000, "the rollout terminates");
                now += 100;
                let before = progress.batch;
                match plan(&policy, &devices, &progress, now) {
                    Decision::StartBatch { batch, members } => {
                        prop_assert_eq!(batch, progress.batch);
                        progress.members.push(members);
                        progress.batch_started_ms = now;
                    }
                    Decision::Move(ids) => {
                        let in_flight = devices.iter().filter(|d| d.moved && !d.synced).count();
                        prop_assert!(in_flight + ids.len() <= budget, "budget exceeded");
                        if let Some((key, max)) = &policy.max_unavailable_per_label {
                            let mut groups: BTreeMap<String, u32> = BTreeMap::new();
                            for d in devices.iter().filter(|d| (d.moved && !d.synced) || ids.contains(&d.id)) {
                                *groups.entry(d.labels[key].clone()).or_default() += 1;
                            }
                            prop_assert!(groups.values().all(|n| n <= max), "per-label budget exceeded");
                        }
                        for id in ids {
                            let d = devices.iter_mut().find(|d| d.id == id).unwrap();
                            prop_assert!(!d.moved, "never moved twice");
                            d.moved = true;
                        }
                    }
                    Decision::Advance => {
                        progress.batch += 1;
                        prop_assert_eq!(progress.batch, before + 1);
                    }
                    Decision::Complete => {
                        let moved = devices.iter().filter(|d| d.moved).count();
                        let online = devices.iter().filter(|d| d.online).count();
                        prop_assert!(moved >= online.min(count) || !policy.offline_blocks || moved == count);
                        break;
                    }
                    Decision::Pause(reason) => {
                        let failing = devices.iter().any(|d| d.nacked) || reason.contains("deadline");
                        prop_assert!(failing, "paused without a failure: {}", reason);
                        break;
                    }
                    Decision::Wait => {}
                }
                prop_assert!(progress.batch >= before, "progress never goes back");
                // Moved devices settle one way or another.
                for (i, d) in devices.iter_mut().enumerate() {
                    if d.moved && !d.synced && !d.nacked && d.online {
                        match (behaviour[i] as u64 + seed + now as u64) % 10 {
                            0 => d.nacked = true,
                            1 => d.online = false,
                            2..=5 => d.synced = true,
                            _ => {}
                        }
                    }
                }
            }
        }
    }
}

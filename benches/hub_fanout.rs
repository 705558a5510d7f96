//! What a fan-out to a large fleet costs one replica's hub for the devices other replicas hold:
//! taking in their renders, taking in their answers from the change feed (one lock per device,
//! and a few hundred per lock), and the next metrics scrape, which settles every one of them
//! (beside a scrape with nothing to settle).
//! Run with `cargo bench --bench hub_fanout`; the figures are in BENCHMARKS.md.
// A benchmark stops at the first failure of its setup, with the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::measurement::WallTime;
use criterion::{
    BatchSize, BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main,
};
use flotilla::hub::{Hub, RemoteSession, RenderOutcome, Rendered, Seed};
use flotilla::spec::{DeviceSpec, FileSpec};
use std::sync::Arc;
use std::time::Duration;

/// The fleet of the load harness's largest run.
const DEVICES: usize = 100_000;

fn rendered(content: &str) -> Arc<Rendered> {
    Rendered::new(DeviceSpec {
        files: vec![FileSpec::new("/etc/fleet.conf", content)],
        ..Default::default()
    })
}

fn device_ids() -> Vec<String> {
    (0..DEVICES)
        .map(|i| format!("0f6f2f44-0000-4000-8000-{i:012}"))
        .collect()
}

/// Every device held by replica `b` and running `rendered("0")`, as a replica sees the fleet
/// before a fan-out.
fn fleet_held_elsewhere(ids: &[String]) -> Hub {
    let hub = Hub::new();
    let running = rendered("0");
    hub.load(
        ids.iter()
            .map(|id| Seed {
                device_id: id.clone(),
                desired: Ok(running.clone()),
                acked_version: Some(running.version.clone()),
                nacked: None,
                last_seen_ms: None,
                report: None,
            })
            .collect(),
    );
    hub.note_remotes(answers(ids, &running));
    hub.summary(0);
    hub
}

/// Replica `b`'s record of every device acknowledging `version`.
fn answers(ids: &[String], version: &Rendered) -> Vec<RemoteSession> {
    ids.iter()
        .map(|id| RemoteSession {
            device_id: id.clone(),
            holder: Some("b".into()),
            acked_version: Some(version.version.clone()),
            nacked: None,
        })
        .collect()
}

/// Every device's new render.
fn renders(ids: &[String], next: &Arc<Rendered>) -> Vec<(String, Option<RenderOutcome>)> {
    ids.iter()
        .map(|id| (id.clone(), Some(Ok(next.clone()))))
        .collect()
}

/// A scrape's pass over the hub; every device is in sync.
fn scrape(hub: Hub) -> Hub {
    assert_eq!(hub.summary(1).synced, DEVICES);
    hub
}

/// Times `routine` on what `setup` prepared: a fresh fleet each iteration, dropped untimed.
fn timed<S, O>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    mut setup: impl FnMut() -> S,
    mut routine: impl FnMut(S) -> O,
) {
    group.bench_function(name, |b| {
        b.iter_batched(&mut setup, &mut routine, BatchSize::PerIteration)
    });
}

fn fan_out_elsewhere(c: &mut Criterion) {
    let ids = device_ids();
    let next = rendered("1");
    let mut group = c.benchmark_group("fan-out held elsewhere");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .throughput(Throughput::Elements(DEVICES as u64));
    timed(
        &mut group,
        "renders taken",
        || (fleet_held_elsewhere(&ids), renders(&ids, &next)),
        |(hub, renders)| {
            hub.apply_renders(renders);
            hub
        },
    );
    timed(
        &mut group,
        "answers taken one by one",
        || (fleet_held_elsewhere(&ids), answers(&ids, &next)),
        |(hub, answers)| {
            for answer in answers {
                hub.note_remotes(vec![answer]);
            }
            hub
        },
    );
    timed(
        &mut group,
        "answers taken in batches",
        || (fleet_held_elsewhere(&ids), answers(&ids, &next)),
        |(hub, answers)| {
            hub.note_remotes(answers);
            hub
        },
    );
    timed(
        &mut group,
        "scrape after the fan-out",
        || {
            let hub = fleet_held_elsewhere(&ids);
            hub.apply_renders(renders(&ids, &next));
            hub.note_remotes(answers(&ids, &next));
            hub
        },
        scrape,
    );
    timed(
        &mut group,
        "scrape with nothing changed",
        || scrape(fleet_held_elsewhere(&ids)),
        scrape,
    );
    group.finish();
}

criterion_group!(benches, fan_out_elsewhere);
criterion_main!(benches);

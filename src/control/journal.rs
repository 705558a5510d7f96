//! Write-behind for device bookkeeping (session starts, last seen, acknowledged versions): the live
//! state is in memory, so these facts are queued and written in batches — one transaction for
//! whatever arrived meanwhile — instead of one database round trip per session or ACK. A reconnect
//! storm of ten thousand agents becomes a few dozen transactions. While the database is away the
//! facts wait, folded to the last of each kind per device (so an outage costs memory by devices,
//! not by events), and are written when it returns; shutdown flushes the queue.

use crate::store::{DeviceFact, Store};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Most facts written in one transaction.
const BATCH: usize = 4096;
/// First wait before writing again after the database refused a batch.
const RETRY: Duration = Duration::from_millis(500);

enum Entry {
    Fact(DeviceFact),
    Flush(oneshot::Sender<()>),
}

/// The queue's sending side. Cheap to clone.
#[derive(Clone)]
pub(super) struct Journal {
    tx: mpsc::UnboundedSender<Entry>,
}

/// The queue's receiving side, until the writer starts.
pub(super) struct JournalWriter {
    rx: mpsc::UnboundedReceiver<Entry>,
}

pub(super) fn journal() -> (Journal, JournalWriter) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Journal { tx }, JournalWriter { rx })
}

impl Journal {
    pub(super) fn record(&self, fact: DeviceFact) {
        // Only fails once the writer is gone, at the very end of shutdown.
        let _ = self.tx.send(Entry::Fact(fact));
    }

    /// Waits until every fact recorded before this call is written.
    pub(super) async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Entry::Flush(done)).is_ok() {
            let _ = wait.await;
        }
    }
}

impl JournalWriter {
    /// Writes batches until every `Journal` is dropped.
    pub(super) async fn run(mut self, store: Store) {
        let mut batch = Vec::new();
        let mut flushes = Vec::new();
        while let Some(first) = self.rx.recv().await {
            self.take(first, &mut batch, &mut flushes);
            self.drain(&mut batch, &mut flushes, BATCH);
            let mut wait = RETRY;
            let mut logged = false;
            while !batch.is_empty() {
                // Device rows in id order (a stable sort keeps each device's facts in order), as
                // issuances write them: concurrent transactions then never deadlock on them.
                batch.sort_by(|a, b| kind(a).0.cmp(kind(b).0));
                match store.record_device_facts(batch.clone()).await {
                    Ok(()) => batch.clear(),
                    Err(error) => {
                        if !logged {
                            tracing::warn!(%error, facts = batch.len(), "could not write device bookkeeping; keeping it and retrying");
                            logged = true;
                        }
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(10));
                        self.drain(&mut batch, &mut flushes, usize::MAX);
                        coalesce(&mut batch);
                    }
                }
            }
            for done in flushes.drain(..) {
                let _ = done.send(());
            }
        }
    }

    fn take(
        &self,
        entry: Entry,
        batch: &mut Vec<DeviceFact>,
        flushes: &mut Vec<oneshot::Sender<()>>,
    ) {
        match entry {
            Entry::Fact(fact) => batch.push(fact),
            Entry::Flush(done) => flushes.push(done),
        }
    }

    /// Moves what is queued now into `batch`, until it holds `limit` facts.
    fn drain(
        &mut self,
        batch: &mut Vec<DeviceFact>,
        flushes: &mut Vec<oneshot::Sender<()>>,
        limit: usize,
    ) {
        while batch.len() < limit {
            match self.rx.try_recv() {
                Ok(entry) => self.take(entry, batch, flushes),
                Err(_) => return,
            }
        }
    }
}

/// Facts of one kind write the same columns; a device's later fact of a kind overwrites every
/// column an earlier one of that kind wrote.
fn kind(fact: &DeviceFact) -> (&str, u8) {
    match fact {
        DeviceFact::Session {
            id,
            running_version: Some(_),
            ..
        } => (id, 0),
        DeviceFact::Session { id, .. } => (id, 1),
        DeviceFact::LastSeen { id, .. } => (id, 2),
        DeviceFact::Sync { id, .. } => (id, 3),
        DeviceFact::Report { id, .. } => (id, 4),
    }
}

/// Keeps only the last fact of each kind per device, in their order. Every column ends with the
/// value the full sequence would have given it: the last fact writing a column is the last of its
/// kind, and relative order is kept.
fn coalesce(batch: &mut Vec<DeviceFact>) {
    let mut seen = std::collections::HashSet::new();
    let mut kept: Vec<DeviceFact> = batch
        .drain(..)
        .rev()
        .filter(|fact| {
            let (id, kind) = kind(fact);
            seen.insert((id.to_string(), kind))
        })
        .collect();
    kept.reverse();
    *batch = kept;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// What a sequence of facts leaves in the columns they write.
    fn apply(facts: &[DeviceFact]) -> BTreeMap<(String, &'static str), Option<String>> {
        let mut row = BTreeMap::new();
        for fact in facts {
            match fact {
                DeviceFact::Session {
                    id,
                    agent_version,
                    running_version,
                    seen_ms,
                } => {
                    row.insert((id.clone(), "agent"), Some(agent_version.clone()));
                    if let Some(v) = running_version {
                        row.insert((id.clone(), "acked"), Some(v.clone()));
                    }
                    row.insert((id.clone(), "seen"), Some(seen_ms.to_string()));
                }
                DeviceFact::LastSeen { id, seen_ms } => {
                    row.insert((id.clone(), "seen"), Some(seen_ms.to_string()));
                }
                DeviceFact::Sync {
                    id,
                    acked_version,
                    nacked,
                } => {
                    row.insert((id.clone(), "acked"), acked_version.clone());
                    row.insert((id.clone(), "nacked"), nacked.as_ref().map(|n| n.0.clone()));
                }
                DeviceFact::Report { id, report } => {
                    row.insert((id.clone(), "report"), Some(report.reported_ms.to_string()));
                }
            }
        }
        row
    }

    fn session(id: &str, running: Option<&str>, seen_ms: i64) -> DeviceFact {
        DeviceFact::Session {
            id: id.into(),
            agent_version: format!("agent@{seen_ms}"),
            running_version: running.map(str::to_string),
            seen_ms,
        }
    }

    fn sync(id: &str, acked: &str) -> DeviceFact {
        DeviceFact::Sync {
            id: id.into(),
            acked_version: Some(acked.into()),
            nacked: None,
        }
    }

    fn seen(id: &str, seen_ms: i64) -> DeviceFact {
        DeviceFact::LastSeen {
            id: id.into(),
            seen_ms,
        }
    }

    #[test]
    fn coalescing_leaves_every_column_as_the_whole_sequence_would() {
        let sequences = vec![
            vec![
                sync("a", "v3"),
                session("a", Some("v2"), 1),
                session("a", None, 2),
            ],
            vec![
                session("a", Some("v1"), 1),
                sync("a", "v2"),
                seen("a", 3),
                session("a", Some("v2"), 4),
            ],
            vec![
                sync("a", "v1"),
                sync("b", "v1"),
                seen("a", 2),
                sync("a", "v2"),
                seen("b", 5),
                seen("a", 6),
            ],
            vec![
                session("a", None, 1),
                sync("a", "v9"),
                session("a", Some("v8"), 2),
                sync("a", "v7"),
            ],
        ];
        for facts in sequences {
            let mut folded = facts.clone();
            coalesce(&mut folded);
            assert_eq!(apply(&folded), apply(&facts), "{facts:?} → {folded:?}");
        }
    }

    #[test]
    fn an_outage_costs_a_few_facts_per_device() {
        let mut facts = Vec::new();
        for round in 0..1000 {
            for device in ["a", "b", "c"] {
                facts.push(session(device, Some("v1"), round));
                facts.push(sync(device, &format!("v{round}")));
                facts.push(seen(device, round));
            }
        }
        let whole = apply(&facts);
        coalesce(&mut facts);
        assert_eq!(facts.len(), 9);
        assert_eq!(apply(&facts), whole);
    }

    proptest::proptest! {
        #[test]
        fn coalescing_any_sequence_keeps_the_outcome(
            steps in proptest::collection::vec((0u8..3, 0u8..4, 0u8..5), 0..60)
        ) {
            let facts: Vec<DeviceFact> = steps
                .iter()
                .enumerate()
                .map(|(at, &(device, kind, version))| {
                    let id = ["a", "b", "c"][device as usize];
                    let version = format!("v{version}");
                    match kind {
                        0 => session(id, Some(&version), at as i64),
                        1 => session(id, None, at as i64),
                        2 => seen(id, at as i64),
                        _ => sync(id, &version),
                    }
                })
                .collect();
            let mut folded = facts.clone();
            coalesce(&mut folded);
            proptest::prop_assert!(folded.len() <= 12);
            proptest::prop_assert_eq!(apply(&folded), apply(&facts));
        }
    }
}

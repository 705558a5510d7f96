//! Write-behind for device bookkeeping (session starts, last seen, acknowledged versions): the live
//! state is in memory, so these facts are queued and written in batches — one transaction for
//! whatever arrived meanwhile — instead of one database round trip per session or ACK. A reconnect
//! storm of ten thousand agents becomes a few dozen transactions. Facts wait (in order) while the
//! database is away and are written when it returns; shutdown flushes the queue.

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
pub struct Journal {
    tx: mpsc::UnboundedSender<Entry>,
}

/// The queue's receiving side, until the writer starts.
pub struct JournalWriter {
    rx: mpsc::UnboundedReceiver<Entry>,
}

pub fn journal() -> (Journal, JournalWriter) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Journal { tx }, JournalWriter { rx })
}

impl Journal {
    pub fn record(&self, fact: DeviceFact) {
        // Only fails once the writer is gone, at the very end of shutdown.
        let _ = self.tx.send(Entry::Fact(fact));
    }

    /// Waits until every fact recorded before this call is written.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Entry::Flush(done)).is_ok() {
            let _ = wait.await;
        }
    }
}

impl JournalWriter {
    /// Writes batches until every `Journal` is dropped.
    pub async fn run(mut self, store: Store) {
        let mut batch = Vec::new();
        let mut flushes = Vec::new();
        while let Some(first) = self.rx.recv().await {
            let mut next = Some(first);
            while let Some(entry) = next.take() {
                match entry {
                    Entry::Fact(fact) => batch.push(fact),
                    Entry::Flush(done) => flushes.push(done),
                }
                if batch.len() < BATCH {
                    next = self.rx.try_recv().ok();
                }
            }
            write(&store, &mut batch).await;
            for done in flushes.drain(..) {
                let _ = done.send(());
            }
        }
    }
}

/// Writes `batch`, retrying (with the batch kept, in order) until the database takes it.
async fn write(store: &Store, batch: &mut Vec<DeviceFact>) {
    let mut wait = RETRY;
    let mut logged = false;
    while !batch.is_empty() {
        match store.record_device_facts(batch.clone()).await {
            Ok(()) => batch.clear(),
            Err(error) => {
                if !logged {
                    tracing::warn!(%error, facts = batch.len(), "could not write device bookkeeping; keeping it and retrying");
                    logged = true;
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        }
    }
}

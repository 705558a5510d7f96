//! Group commit for certificate writes: issuances, and the supersessions that retire a renewed
//! certificate once its successor is used. Every such write is one audit record or more, and audit
//! records chain, so they are written one after another; written one transaction each, ten
//! thousand devices renewing at once would queue behind ten thousand database commits (twice: once
//! to issue, once more when each reconnects with its new certificate). Instead, writes wait here
//! and one writer records whatever has gathered — in order, each with its own savepoint — in a
//! single transaction, and tells each caller its outcome.

use crate::audit::AuditEntry;
use crate::store::{
    AuditSeal, CertificateRecord, CertificateWrite, CertificateWritten, IssuanceRules,
    RecordedIssuance, Store, StoreError,
};
use std::sync::Arc;
use tokio::sync::{Mutex, mpsc, oneshot};

/// Most writes recorded in one transaction.
const BATCH: usize = 512;

struct Pending {
    write: CertificateWrite,
    done: oneshot::Sender<Result<CertificateWritten, StoreError>>,
}

/// The sending side. Cheap to clone.
#[derive(Clone)]
pub(super) struct Issuances {
    tx: mpsc::UnboundedSender<Pending>,
}

/// The writer, until it is started.
pub(super) struct IssuanceWriter {
    rx: mpsc::UnboundedReceiver<Pending>,
}

pub(super) fn issuances() -> (Issuances, IssuanceWriter) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Issuances { tx }, IssuanceWriter { rx })
}

/// A writer answered with the outcome of another kind of write than it was given.
fn mismatched() -> StoreError {
    StoreError::Unavailable("certificate writer answered out of kind".into())
}

impl Issuances {
    async fn submit(&self, write: CertificateWrite) -> Result<CertificateWritten, StoreError> {
        let (done, outcome) = oneshot::channel();
        let gone = || StoreError::Unavailable("the control plane is stopping".into());
        self.tx.send(Pending { write, done }).map_err(|_| gone())?;
        outcome.await.map_err(|_| gone())?
    }

    /// Records `certificate` with its audit record, if `rules` hold; returns once it is
    /// committed.
    pub(super) async fn record(
        &self,
        certificate: CertificateRecord,
        entry: AuditEntry,
        rules: IssuanceRules,
    ) -> Result<RecordedIssuance, StoreError> {
        match self
            .submit(CertificateWrite::Issue {
                certificate,
                entry,
                rules,
            })
            .await?
        {
            CertificateWritten::Issued(recorded) => Ok(recorded),
            CertificateWritten::Superseded(_) => Err(mismatched()),
        }
    }

    /// Supersedes the device's valid certificates other than `keep` (audited); returns them once
    /// committed.
    pub(super) async fn supersede(
        &self,
        device_id: &str,
        keep: &str,
        actor: String,
        now_ms: i64,
    ) -> Result<Vec<CertificateRecord>, StoreError> {
        match self
            .submit(CertificateWrite::Supersede {
                device_id: device_id.to_string(),
                keep: keep.to_string(),
                actor,
                now_ms,
            })
            .await?
        {
            CertificateWritten::Superseded(superseded) => Ok(superseded),
            CertificateWritten::Issued(_) => Err(mismatched()),
        }
    }
}

impl IssuanceWriter {
    /// Records batches until every `Issuances` is dropped. `order` is the lock every audit append
    /// holds, so batches chain in line with revocations and refusals.
    pub(super) async fn run(
        mut self,
        store: Store,
        seal: Arc<dyn AuditSeal>,
        order: Arc<Mutex<()>>,
    ) {
        let mut batch = Vec::new();
        while self.rx.recv_many(&mut batch, BATCH).await > 0 {
            // Device rows in id order, as the journal writes them: two batches touching the same
            // devices then wait for each other instead of deadlocking (PostgreSQL).
            batch.sort_by(|a, b| a.write.device_id().cmp(b.write.device_id()));
            let (writes, waiting): (Vec<_>, Vec<_>) =
                batch.drain(..).map(|p| (p.write, p.done)).unzip();
            let outcomes = {
                let _order = order.lock().await;
                store.record_certificate_writes(writes, seal.clone()).await
            };
            match outcomes {
                Ok(outcomes) => {
                    for (done, outcome) in waiting.into_iter().zip(outcomes) {
                        let _ = done.send(outcome);
                    }
                }
                Err(error) => {
                    let message = error.to_string();
                    for done in waiting {
                        let _ = done.send(Err(StoreError::Unavailable(message.clone())));
                    }
                }
            }
        }
    }
}

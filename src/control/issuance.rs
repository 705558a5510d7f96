//! Group commit for certificate issuances. Every issuance is one audit record, and audit records
//! chain, so they are written one after another; written one transaction each, ten thousand
//! devices renewing at once would queue behind ten thousand database round trips. Instead, signed
//! certificates wait here and one writer records whatever has gathered — in order, each with its
//! own savepoint — in a single transaction, and tells each caller its outcome.

use crate::audit::AuditEntry;
use crate::store::{
    AuditSeal, CertificateRecord, IssuanceRules, RecordedIssuance, Store, StoreError,
};
use std::sync::Arc;
use tokio::sync::{Mutex, mpsc, oneshot};

/// Most issuances recorded in one transaction.
const BATCH: usize = 512;

struct Pending {
    certificate: CertificateRecord,
    entry: AuditEntry,
    rules: IssuanceRules,
    done: oneshot::Sender<Result<RecordedIssuance, StoreError>>,
}

/// The sending side. Cheap to clone.
#[derive(Clone)]
pub struct Issuances {
    tx: mpsc::UnboundedSender<Pending>,
}

/// The writer, until it is started.
pub struct IssuanceWriter {
    rx: mpsc::UnboundedReceiver<Pending>,
}

pub fn issuances() -> (Issuances, IssuanceWriter) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Issuances { tx }, IssuanceWriter { rx })
}

impl Issuances {
    /// Records `certificate` with its audit record, if `rules` hold; returns once it is
    /// committed.
    pub async fn record(
        &self,
        certificate: CertificateRecord,
        entry: AuditEntry,
        rules: IssuanceRules,
    ) -> Result<RecordedIssuance, StoreError> {
        let (done, outcome) = oneshot::channel();
        let gone = || StoreError::Unavailable("the control plane is stopping".into());
        self.tx
            .send(Pending {
                certificate,
                entry,
                rules,
                done,
            })
            .map_err(|_| gone())?;
        outcome.await.map_err(|_| gone())?
    }
}

impl IssuanceWriter {
    /// Records batches until every `Issuances` is dropped. `order` is the lock every audit append
    /// holds, so batches chain in line with revocations and refusals.
    pub async fn run(mut self, store: Store, seal: Arc<dyn AuditSeal>, order: Arc<Mutex<()>>) {
        let mut batch = Vec::new();
        while self.rx.recv_many(&mut batch, BATCH).await > 0 {
            // Device rows in id order, as the journal writes them: two batches touching the same
            // devices then wait for each other instead of deadlocking (PostgreSQL).
            batch.sort_by(|a, b| a.certificate.device_id.cmp(&b.certificate.device_id));
            let (records, waiting): (Vec<_>, Vec<_>) = batch
                .drain(..)
                .map(|p| ((p.certificate, p.entry, p.rules), p.done))
                .unzip();
            let outcomes = {
                let _order = order.lock().await;
                store.record_issuances(records, seal.clone()).await
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

//! Leadership for work that must happen on one replica at a time (the rollout engine, pruning the
//! change feed): a PostgreSQL session-level advisory lock held on a connection of its own. When
//! the leader dies its connection closes, PostgreSQL releases the lock, and a waiting replica
//! takes over at once. On SQLite the only process leads.

use super::{Backend, Store};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The advisory lock the leader holds.
const LEADER_LOCK: i64 = 0x466c_6f74_0003;

impl Store {
    /// Keeps `leading` true exactly while this replica holds the leader lock, competing for it
    /// for as long as the process runs.
    pub fn contend_for_leadership(&self, leading: Arc<AtomicBool>) {
        let Backend::Postgres(url) = self.backend().clone() else {
            leading.store(true, Ordering::Release);
            return;
        };
        let replica = self.replica().to_string();
        super::dedicated::keep_connected("leader lock", move || {
            let (url, leading, replica) = (url.clone(), leading.clone(), replica.clone());
            async move { lead_once(&url, &leading, &replica).await }
        });
    }
}

/// Waits for the lock on a new connection, then leads until that connection ends.
async fn lead_once(
    url: &str,
    leading: &AtomicBool,
    replica: &str,
) -> Result<(), tokio_postgres::Error> {
    let (client, connection) = super::dedicated::config(url, None)?
        .connect(tokio_postgres::NoTls)
        .await?;
    let mut connection = tokio::spawn(connection);
    let lock = format!("SELECT pg_advisory_lock({LEADER_LOCK})");
    tokio::select! {
        locked = client.batch_execute(&lock) => locked?,
        _ = &mut connection => return Ok(()),
    }
    leading.store(true, Ordering::Release);
    tracing::info!(replica = %replica, "this replica now leads (rollouts, feed pruning)");
    let _ = connection.await;
    drop(client);
    leading.store(false, Ordering::Release);
    tracing::warn!(replica = %replica, "lost the leader lock");
    Ok(())
}

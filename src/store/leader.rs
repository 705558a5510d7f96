//! Leadership for work that must happen on one replica at a time (the rollout engine, pruning the
//! change feed): a PostgreSQL session-level advisory lock held on a connection of its own. When
//! the leader dies its connection closes, PostgreSQL releases the lock, and a waiting replica
//! takes over at once. On SQLite the only process leads.

use super::{Backend, Store};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The advisory lock the leader holds.
const LEADER_LOCK: i64 = 0x466c_6f74_0003;
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Store {
    /// Keeps `leading` true exactly while this replica holds the leader lock, competing for it
    /// for as long as the process runs.
    pub fn contend_for_leadership(&self, leading: Arc<AtomicBool>) {
        let Backend::Postgres(url) = self.backend().clone() else {
            leading.store(true, Ordering::Release);
            return;
        };
        let replica = self.replica().to_string();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                match lead_once(&url, &leading, &replica).await {
                    Ok(()) => backoff = Duration::from_millis(200),
                    Err(error) => {
                        tracing::debug!(%error, "leader lock connection failed; retrying");
                    }
                }
                if leading.swap(false, Ordering::AcqRel) {
                    tracing::warn!(replica = %replica, "lost the leader lock");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        });
    }
}

/// Waits for the lock on a new connection, then leads until that connection ends.
async fn lead_once(
    url: &str,
    leading: &AtomicBool,
    replica: &str,
) -> Result<(), tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = url.parse()?;
    config.keepalives_idle(super::feed::KEEPALIVE_IDLE);
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
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
    Ok(())
}

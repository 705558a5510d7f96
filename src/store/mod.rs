//! The store: the only module that touches Diesel. One code path for SQLite (the embedded default)
//! and PostgreSQL, synchronous Diesel on a pooled connection inside `spawn_blocking`.

mod audit;
mod certificate_batch;
mod certificates;
mod connection;
mod credentials;
mod dedicated;
mod devices;
mod enrollments;
mod feed;
mod fleets;
mod identity;
mod leader;
mod lock;
mod reachability;
mod releases;
mod rollouts;
mod schema;
mod tpm;

pub use audit::{AuditQuery, AuditSeal, Audited};
pub use certificates::{
    CertificateRecord, CertificateWrite, CertificateWritten, IssuanceRules, RecordedIssuance,
    Revocation,
};
pub use connection::{Backend, DbConnection};
pub use credentials::{
    CredentialCertificate, CredentialRecord, CredentialRevocation, StoredCredential,
};
pub use devices::{DeviceChange, DeviceFact, DeviceOwner, DeviceRecord, NewDevice, SessionFacts};
pub use enrollments::{EnrollmentRecord, EnrollmentState, NewEnrollment, SystemInfo};
pub use feed::{ALL_DEVICES, Change, ChangeKind, FeedLane};
pub use fleets::{FleetRecord, FleetRevision, FleetRollout, FleetWrite};
pub use identity::StartLock;
pub use lock::{ProcessLock, lock_path};
pub use reachability::{Reachability, outage_log};
pub use releases::ReleaseRecord;
pub use rollouts::{Pins, RolloutEventRecord, RolloutRecord};
pub use tpm::TpmChallengeRecord;

use connection::{Manager, Pool};
use diesel::r2d2::R2D2Connection;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How long an operation waits for a pooled connection before the database counts as down.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A uniqueness constraint refused the write.
    #[error("{0}")]
    Conflict(String),
    /// A condition the write depends on no longer holds.
    #[error("{0}")]
    Precondition(String),
    /// A stored value does not parse.
    #[error("stored {what} is corrupt: {detail}")]
    Corrupt {
        /// What was read.
        what: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// The database refused a query.
    #[error("database error: {0}")]
    Query(DieselError),
    /// The schema could not be migrated.
    #[error("migration failed: {0}")]
    Migration(String),
    /// Another process holds the embedded database.
    #[error("{0}")]
    InUse(String),
}

impl From<DieselError> for StoreError {
    fn from(error: DieselError) -> Self {
        match &error {
            DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, info) => {
                StoreError::Conflict(info.message().to_string())
            }
            DieselError::DatabaseError(DatabaseErrorKind::ClosedConnection, info) => {
                StoreError::Unavailable(info.message().to_string())
            }
            _ => StoreError::Query(error),
        }
    }
}

/// A handle to the database; clones share one pool.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    backend: Arc<Backend>,
    queries: Arc<AtomicU64>,
    reachability: Arc<Reachability>,
    /// One per pooled connection: operations wait for one here, in async code, rather than on a
    /// blocking thread for the pool. A burst (ten thousand renewals at once) then queues cheaply,
    /// and a pool checkout that times out means the database cannot be reached, not that it is
    /// busy.
    permits: Arc<tokio::sync::Semaphore>,
    /// On SQLite, the lock that keeps other processes off the file while any clone is alive.
    _process_lock: Option<Arc<ProcessLock>>,
    /// This replica's name in the change feed and in session records; unique per process.
    replica: Arc<str>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend.redacted())
            .finish_non_exhaustive()
    }
}

/// Pooled PostgreSQL connections per replica unless configured.
pub const DEFAULT_POSTGRES_POOL: u32 = 16;

impl Store {
    /// Opens a pool on `backend`. Fails at once, with the backend's own message, if no connection
    /// can be made within a few seconds.
    pub fn open(backend: Backend) -> Result<Store, StoreError> {
        Store::open_as(backend, "replica")
    }

    /// Opens a pool on `backend` for the replica called `name` (a random suffix makes it unique
    /// per process, so a restarted replica never mistakes its predecessor's sessions for its own).
    pub fn open_as(backend: Backend, name: &str) -> Result<Store, StoreError> {
        Store::open_pooled(backend, name, DEFAULT_POSTGRES_POOL)
    }

    /// As [`Store::open_as`], with at most `postgres_pool` pooled connections on PostgreSQL
    /// (replicas × pool, plus two dedicated connections each, must fit the server's
    /// `max_connections`). SQLite always uses one.
    pub fn open_pooled(
        backend: Backend,
        name: &str,
        postgres_pool: u32,
    ) -> Result<Store, StoreError> {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let replica: Arc<str> = Arc::from(format!("{name}-{}", &suffix[..8]));
        // SQLite has one writer at a time anyway; with several connections, a transaction that
        // read before it wrote fails at once with "database is locked" (SQLITE_BUSY_SNAPSHOT, no
        // busy wait) whenever another connection committed in between. One connection serialises
        // everything in order instead; batching (journal, group commit) keeps the queue short.
        let process_lock = match &backend {
            Backend::Sqlite(path) => lock::lock_sqlite(path)?.map(Arc::new),
            Backend::Postgres(_) => None,
        };
        let max_size = match backend {
            Backend::Postgres(_) => postgres_pool.max(1),
            Backend::Sqlite(_) => 1,
        };
        // No idle minimum: the pool never opens connections in the background, so nothing is
        // half-way through a libpq/TLS handshake when the process exits. Connectivity is proven
        // here by one checkout instead.
        let pool = Pool::builder()
            .max_size(max_size)
            .min_idle(Some(0))
            .connection_timeout(CONNECTION_TIMEOUT)
            // Failures are logged by the store, rate-limited; r2d2's own handler logs every retry.
            .error_handler(Box::new(diesel::r2d2::NopErrorHandler))
            .build_unchecked(Manager::new(backend.clone(), replica.clone()));
        pool.get()
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok(Store {
            pool,
            backend: Arc::new(backend),
            queries: Arc::new(AtomicU64::new(0)),
            reachability: Arc::default(),
            permits: Arc::new(tokio::sync::Semaphore::new(max_size as usize)),
            _process_lock: process_lock,
            replica,
        })
    }

    /// This replica's unique name.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Which database this is.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// How many store operations have run since the store was opened (each is one or a few
    /// statements). Lets tests prove that an idle fleet costs no database work.
    pub fn operation_count(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    /// Applies pending migrations; returns how many ran.
    pub async fn migrate(&self) -> Result<usize, StoreError> {
        self.run("migrate", |conn| {
            connection::run_migrations(conn).map_err(StoreError::Migration)
        })
        .await
    }

    /// Runs `op` (named `operation` in metrics) on a pooled connection on the blocking pool.
    async fn run<T, F>(&self, operation: &'static str, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut DbConnection) -> Result<T, StoreError> + Send + 'static,
    {
        self.queries.fetch_add(1, Ordering::Relaxed);
        self.refuse_while_unreachable()?;
        let pool = self.pool.clone();
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Unavailable("the store is closed".into()))?;
        // It may have gone down while this operation waited for its turn.
        self.refuse_while_unreachable()?;
        let started = tokio::time::Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            // Held until the operation is over, even if the caller stops waiting for it.
            let _permit = permit;
            let mut conn = pool
                .get()
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            let result = op(&mut conn);
            if result.is_err() && conn.ping().is_err() {
                return Err(StoreError::Unavailable(
                    "the database connection broke".into(),
                ));
            }
            result
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("store task failed: {e}")))?;
        crate::telemetry::store_operation(operation, started.elapsed());
        if let Err(StoreError::Unavailable(reason)) = &result {
            self.unreachable(reason);
        }
        result
    }

    /// Fails fast while the database is known to be down.
    fn refuse_while_unreachable(&self) -> Result<(), StoreError> {
        if self.reachability.is_reachable() {
            return Ok(());
        }
        Err(StoreError::Unavailable(format!(
            "the database is unreachable ({})",
            self.reachability.reason()
        )))
    }

    /// Whether the database answered the last time it was needed.
    pub fn reachability(&self) -> &Reachability {
        &self.reachability
    }

    /// Marks the database down and starts the one probe that waits for it to answer again.
    fn unreachable(&self, reason: &str) {
        if !self.reachability.mark_down(reason) {
            return;
        }
        let (pool, reachability) = (self.pool.clone(), self.reachability.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(reachability::PROBE_INTERVAL).await;
                let pool = pool.clone();
                let answered = tokio::task::spawn_blocking(move || {
                    pool.get_timeout(CONNECTION_TIMEOUT)
                        .is_ok_and(|mut conn| conn.ping().is_ok())
                })
                .await
                .unwrap_or(false);
                if answered {
                    reachability.mark_up();
                    return;
                }
            }
        });
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    // Maps of strings and plain structs always serialise.
    serde_json::to_string(value).unwrap_or_default()
}

fn from_json<T: serde::de::DeserializeOwned>(
    what: &'static str,
    text: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt {
        what,
        detail: e.to_string(),
    })
}

//! One connection type for both backends (Diesel's MultiConnection), the pool that hands them out,
//! and the embedded migrations.

use diesel::connection::SimpleConnection;
use diesel::r2d2::{self, ManageConnection, R2D2Connection};
use diesel::{Connection, ConnectionError, PgConnection, RunQueryDsl, SqliteConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use std::sync::Arc;

const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

/// A connection to whichever backend the store was opened on.
#[derive(diesel::MultiConnection)]
pub enum DbConnection {
    /// A PostgreSQL connection.
    Postgres(PgConnection),
    /// A SQLite connection.
    Sqlite(SqliteConnection),
}

/// Where the data lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// A PostgreSQL URL (`postgres://…`).
    Postgres(String),
    /// A SQLite database file.
    Sqlite(String),
}

impl Backend {
    /// `postgres://` and `postgresql://` URLs select PostgreSQL; `sqlite://PATH` or a bare path
    /// selects SQLite.
    pub fn from_url(url: &str) -> Backend {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres(url.to_string())
        } else {
            Backend::Sqlite(url.trim_start_matches("sqlite://").to_string())
        }
    }

    /// `sqlite` or `postgres`.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Postgres(_) => "postgres",
            Backend::Sqlite(_) => "sqlite",
        }
    }

    /// The location without credentials, for logs.
    pub fn redacted(&self) -> String {
        match self {
            Backend::Sqlite(path) => path.clone(),
            Backend::Postgres(url) => match url.split_once('@') {
                Some((_, host)) => format!("postgres://…@{host}"),
                None => url.clone(),
            },
        }
    }
}

/// Establishes connections of exactly the configured backend. (MultiConnection's own `establish`
/// tries every backend in turn, which would turn a PostgreSQL outage into a stray SQLite file.)
#[derive(Debug, Clone)]
pub(super) struct Manager {
    backend: Backend,
    /// Recorded by the change-feed triggers as the origin of what this connection writes.
    replica: Arc<str>,
}

impl Manager {
    pub(super) fn new(backend: Backend, replica: Arc<str>) -> Self {
        Manager { backend, replica }
    }
}

/// The journal, the feed and the fleet writers find their devices by a list of ids. At PostgreSQL's
/// default cost of a random page (4, for disks) a list of a few thousand out of 100,000 devices
/// was planned as a scan of the whole table — three per journal batch (lock, update, feed row), a
/// third of the database's work in a fan-out. A fleet's rows fit in memory, where a random page
/// costs about what a sequential one does, so this is what the planner is told (a list of most of
/// the table is still scanned).
const POSTGRES_SETTINGS: &str = "SET random_page_cost = 1.1";

const SQLITE_PRAGMAS: &str = "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
     PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;";

impl ManageConnection for Manager {
    type Connection = DbConnection;
    type Error = ConnectionError;

    fn connect(&self) -> Result<DbConnection, ConnectionError> {
        match &self.backend {
            Backend::Postgres(url) => {
                let mut conn = PgConnection::establish(url)?;
                diesel::sql_query("SELECT set_config('flotilla.replica', $1, false)")
                    .bind::<diesel::sql_types::Text, _>(&*self.replica)
                    .execute(&mut conn)
                    .map_err(ConnectionError::CouldntSetupConfiguration)?;
                conn.batch_execute(POSTGRES_SETTINGS)
                    .map_err(ConnectionError::CouldntSetupConfiguration)?;
                Ok(DbConnection::Postgres(conn))
            }
            Backend::Sqlite(path) => {
                private_database_file(path).map_err(|e| {
                    ConnectionError::BadConnection(format!("database file {path}: {e}"))
                })?;
                let mut conn = SqliteConnection::establish(path)?;
                conn.batch_execute(SQLITE_PRAGMAS)
                    .map_err(ConnectionError::CouldntSetupConfiguration)?;
                Ok(DbConnection::Sqlite(conn))
            }
        }
    }

    fn is_valid(&self, conn: &mut DbConnection) -> Result<(), ConnectionError> {
        conn.ping()
            .map_err(ConnectionError::CouldntSetupConfiguration)
    }

    fn has_broken(&self, _conn: &mut DbConnection) -> bool {
        false
    }
}

pub(super) type Pool = r2d2::Pool<Manager>;

/// Creates the SQLite file (if new) and its WAL companions readable by the owner only (0600),
/// whatever the umask: device specs in it may be secrets. SQLite gives the `-wal` and `-shm`
/// files the main file's permissions.
fn private_database_file(path: &str) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if path == ":memory:" || path.starts_with("file:") {
        return Ok(());
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?
        .set_permissions(std::fs::Permissions::from_mode(0o600))?;
    for suffix in ["-wal", "-shm"] {
        let companion = format!("{path}{suffix}");
        if std::path::Path::new(&companion).exists() {
            std::fs::set_permissions(&companion, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
}

/// Applies every pending migration of the connection's backend; returns how many ran.
pub(super) fn run_migrations(conn: &mut DbConnection) -> Result<usize, String> {
    let applied = match conn {
        DbConnection::Postgres(c) => c.run_pending_migrations(POSTGRES_MIGRATIONS),
        DbConnection::Sqlite(c) => c.run_pending_migrations(SQLITE_MIGRATIONS),
    };
    applied.map(|v| v.len()).map_err(|e| e.to_string())
}

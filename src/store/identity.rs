//! What every replica on one database must share, recorded by the first start (the CA's public-key
//! fingerprint), and the lock that lets exactly one replica at a time do first-start work.

use super::schema::deployment_identity as di;
use super::{Backend, Store, StoreError};
use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::{Connection, PgConnection};

/// The PostgreSQL advisory lock (session level) held while a replica migrates the database and
/// creates or checks the shared identity, so replicas starting together do this one at a time.
const START_LOCK: i64 = 0x466c_6f74_0001;

/// Held while a replica migrates and claims the deployment identity; released when dropped (on
/// PostgreSQL by closing its own connection). On SQLite the process lock already excludes others.
pub struct StartLock {
    _connection: Option<PgConnection>,
}

impl Store {
    /// Waits until no other replica is in its first-start section, then holds the section.
    pub async fn start_lock(&self) -> Result<StartLock, StoreError> {
        let Backend::Postgres(url) = self.backend().clone() else {
            return Ok(StartLock { _connection: None });
        };
        tokio::task::spawn_blocking(move || {
            let mut conn = PgConnection::establish(&url)
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            diesel::sql_query(format!("SELECT pg_advisory_lock({START_LOCK})"))
                .execute(&mut conn)?;
            Ok(StartLock {
                _connection: Some(conn),
            })
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("start lock task failed: {e}")))?
    }

    /// Records `value` under `key` unless a value is already recorded; returns the recorded one.
    /// The first writer wins, also when several replicas race.
    pub async fn claim_identity(
        &self,
        key: &str,
        value: &str,
        now_ms: i64,
    ) -> Result<String, StoreError> {
        let (key, value) = (key.to_string(), value.to_string());
        self.run("claim_identity", move |conn| {
            let recorded = |conn: &mut super::DbConnection| {
                di::table
                    .find(&key)
                    .select(di::value)
                    .first::<String>(conn)
                    .optional()
            };
            if let Some(existing) = recorded(conn)? {
                return Ok(existing);
            }
            let inserted = diesel::insert_into(di::table)
                .values((
                    di::key.eq(&key),
                    di::value.eq(&value),
                    di::created_ms.eq(now_ms),
                ))
                .execute(conn);
            match inserted {
                Ok(_) => Ok(value),
                Err(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _)) => {
                    recorded(conn)?.ok_or_else(|| {
                        StoreError::Conflict(format!("deployment identity {key} vanished"))
                    })
                }
                Err(error) => Err(error.into()),
            }
        })
        .await
    }
}

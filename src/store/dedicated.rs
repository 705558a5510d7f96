//! Connections of their own, outside the pool, for what must wait on PostgreSQL rather than ask
//! it (LISTEN for the change feed, the leader's advisory lock): how they are configured, and the
//! loop that re-establishes one whenever it ends.

use std::future::Future;
use std::time::Duration;

/// Idle time before TCP keepalives probe a dedicated connection, so a vanished server is noticed
/// instead of waited on forever.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The configuration of a dedicated connection to `url`, named `application` in
/// `pg_stat_activity` when given.
pub(super) fn config(
    url: &str,
    application: Option<&str>,
) -> Result<tokio_postgres::Config, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = url.parse()?;
    config.keepalives_idle(KEEPALIVE_IDLE);
    if let Some(application) = application {
        config.application_name(application);
    }
    Ok(config)
}

/// Runs `session` (one connection, from connect until it ends) again and again for as long as the
/// process lives, waiting between attempts with a backoff that doubles up to 5 s while they fail.
/// One warning per run of failures.
pub(super) fn keep_connected<F, Fut>(what: &'static str, mut session: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), tokio_postgres::Error>> + Send,
{
    tokio::spawn(async move {
        let mut backoff = FIRST_BACKOFF;
        let mut failing = false;
        loop {
            match session().await {
                Ok(()) => {
                    backoff = FIRST_BACKOFF;
                    failing = false;
                }
                Err(error) => {
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(%error, "{what}: connection failed; reconnecting");
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    });
}

//! The change feed between replicas on PostgreSQL: rows the triggers write in the transaction of
//! every change (see the `change_feed` migration), read in id order after the last one applied,
//! and a LISTEN connection that wakes the reader when another replica commits. Waiting costs no
//! queries; a lost connection is re-established and followed by a catch-up read.

use super::devices::batch_devices;
use super::schema::changes;
use super::{Backend, DeviceOwner, SessionFacts, Store, StoreError};
use diesel::dsl::sql;
use diesel::prelude::*;
use diesel::sql_types::Bool;
use futures::StreamExt;
use std::sync::Arc;
use tokio::sync::Notify;

/// The channel the triggers notify.
pub(super) const CHANNEL: &str = "flotilla_changes";
/// The transaction-level advisory lock every feed writer takes before its row gets an id (the
/// same key as in the `change_feed` migration's trigger function).
pub(super) const FEED_LOCK: i64 = 5076548640735657985;
/// The transaction setting under which the row triggers leave session facts to the journal, which
/// writes their change rows itself in bulk (`2026-12-08-000001_session_feed_in_bulk`).
pub(super) const FEED_WRITTEN: &str = "flotilla.feed_written";
/// The application name prefix of a replica's LISTEN connection.
const APPLICATION_PREFIX: &str = "flotilla:";

/// What a change touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// The device itself: created, deleted, or changed in what renders or identifies it.
    Device,
    /// Only what the device answered or which replica holds its session (`session_facts`).
    Session,
    /// A fleet (subject: its name).
    Fleet,
    /// A certificate (subject: its serial).
    Certificate,
    /// A rollout (subject: its id).
    Rollout,
    /// An enrollment request (subject: its name).
    Enrollment,
    /// A credential of the admin API (subject: its name) or one of its certificates.
    Credential,
    /// An operator asked for the device's certificate to be renewed now (the replica holding its
    /// session asks it); written by `request_renewals`, not by a trigger.
    Renewal,
}

/// The kind of session facts, as the triggers write it.
const SESSION: &str = "session";

/// The subject of a `session` or `device` change that carries the facts or owners of a batch's
/// devices; as the subject of a `Change`, one whose devices must all be re-read (a batch that
/// could not be read).
pub const ALL_DEVICES: &str = "";

/// The feed's two lanes, each followed in id order on its own. A change either names a subject
/// whose current state is re-read or carries what it committed of one lane's columns only (session
/// facts; a device's owner and revision), so the lanes need no order between them: session facts
/// (the bulk of the feed, one per device per session and push) never hold up a fleet or device
/// change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedLane {
    /// `session` changes.
    Sessions,
    /// Every other kind.
    Others,
}

/// One committed change, as the feed recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Its position in the feed.
    pub id: i64,
    /// What it touched.
    pub kind: ChangeKind,
    /// The device id, fleet name, certificate serial, rollout id or enrollment name.
    pub subject: String,
    /// Made by this replica (already applied to its memory).
    pub own: bool,
    /// When it was committed, Unix milliseconds.
    pub created_ms: i64,
    /// For a `session` change the journal wrote in bulk: the device's session facts as it
    /// committed (the others are re-read).
    pub facts: Option<Box<SessionFacts>>,
    /// For a `device` change of its owner alone: the owner and revision it committed (other
    /// `device` changes are re-read).
    pub moved_to: Option<DeviceOwner>,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = changes)]
struct ChangeRow {
    id: i64,
    kind: String,
    subject: String,
    origin: String,
    created_ms: i64,
    facts: Option<String>,
}

fn kind_of(text: &str) -> Option<ChangeKind> {
    Some(match text {
        "device" => ChangeKind::Device,
        SESSION => ChangeKind::Session,
        "fleet" => ChangeKind::Fleet,
        "certificate" => ChangeKind::Certificate,
        "rollout" => ChangeKind::Rollout,
        "enrollment" => ChangeKind::Enrollment,
        "credential" => ChangeKind::Credential,
        "renewal" => ChangeKind::Renewal,
        _ => return None,
    })
}

/// The changes one row records: a batch's row (`session` facts or `device` owners, its subject
/// empty) one per device it names, with the row's id; any other row itself. Only what another
/// replica committed carries facts to apply; a batch whose facts cannot be read is one change of
/// no device (`ALL_DEVICES`).
fn expand(row: ChangeRow, replica: &str) -> Vec<Change> {
    let Some(kind) = kind_of(&row.kind) else {
        return Vec::new();
    };
    let own = row.origin == replica;
    let change =
        |subject: String, facts: Option<SessionFacts>, moved_to: Option<DeviceOwner>| Change {
            id: row.id,
            kind,
            own,
            subject,
            created_ms: row.created_ms,
            facts: facts.map(Box::new),
            moved_to,
        };
    let batch = row.subject == ALL_DEVICES;
    match (row.facts.as_deref(), kind, own) {
        (Some(text), ChangeKind::Session | ChangeKind::Device, true) if batch => {
            let ids = batch_devices(text);
            if ids.is_empty() {
                // Still a change, so the reader's position moves past the row.
                return vec![change(String::new(), None, None)];
            }
            ids.into_iter().map(|id| change(id, None, None)).collect()
        }
        (Some(text), ChangeKind::Session, false) if batch => {
            match SessionFacts::batch_from_feed(text) {
                Some(batch) => batch
                    .into_iter()
                    .map(|facts| change(facts.id.clone(), Some(facts), None))
                    .collect(),
                None => vec![change(String::new(), None, None)],
            }
        }
        (Some(text), ChangeKind::Session, false) => {
            let facts = SessionFacts::from_feed(&row.subject, text);
            vec![change(row.subject.clone(), facts, None)]
        }
        (Some(text), ChangeKind::Device, false) if batch => {
            match DeviceOwner::batch_from_feed(text) {
                Some(batch) => batch
                    .into_iter()
                    .map(|(id, owner)| change(id, None, Some(owner)))
                    .collect(),
                None => vec![change(String::new(), None, None)],
            }
        }
        (Some(text), ChangeKind::Device, false) => {
            let owner = DeviceOwner::from_feed(&row.subject, text);
            vec![change(row.subject.clone(), None, owner)]
        }
        _ => vec![change(row.subject.clone(), None, None)],
    }
}

impl Store {
    /// Whether this store shares its database with other replicas (PostgreSQL).
    pub fn has_change_feed(&self) -> bool {
        matches!(self.backend(), Backend::Postgres(_))
    }

    /// The id of the newest change (0 on an empty feed).
    pub async fn latest_change_id(&self) -> Result<i64, StoreError> {
        self.run("latest_change_id", |conn| {
            Ok(changes::table
                .select(diesel::dsl::max(changes::id))
                .first::<Option<i64>>(conn)?
                .unwrap_or(0))
        })
        .await
    }

    /// Up to `limit` changes after `after` in one lane of the feed (`None`: both), oldest first.
    /// Rows of kinds this build does not know (written by a newer replica) are skipped with their
    /// id still counted.
    pub async fn changes_after(
        &self,
        after: i64,
        limit: i64,
        lane: Option<FeedLane>,
    ) -> Result<Vec<Change>, StoreError> {
        let replica = self.replica.clone();
        self.run("changes_after", move |conn| {
            let mut query = changes::table
                .filter(changes::id.gt(after))
                .order(changes::id.asc())
                .limit(limit)
                .select(ChangeRow::as_select())
                .into_boxed();
            // Written out rather than bound, so PostgreSQL matches them to the lanes' partial
            // indexes (a bound value cannot be proven to satisfy an index's predicate).
            query = match lane {
                Some(FeedLane::Sessions) => query.filter(sql::<Bool>("kind = 'session'")),
                Some(FeedLane::Others) => query.filter(sql::<Bool>("kind <> 'session'")),
                None => query,
            };
            let rows: Vec<ChangeRow> = query.load(conn)?;
            Ok(rows
                .into_iter()
                .flat_map(|row| expand(row, &replica))
                .collect())
        })
        .await
    }

    /// Asks the replicas holding these devices' sessions to have them renew now.
    pub async fn request_renewals(&self, device_ids: Vec<String>) -> Result<(), StoreError> {
        let replica = self.replica.clone();
        self.run("request_renewals", move |conn| {
            let super::DbConnection::Postgres(conn) = conn else {
                return Ok(());
            };
            conn.transaction(|conn| {
                diesel::sql_query(format!("SELECT pg_advisory_xact_lock({FEED_LOCK})"))
                    .execute(conn)?;
                let now = crate::clock::now_millis();
                for chunk in device_ids.chunks(1000) {
                    let rows: Vec<_> = chunk
                        .iter()
                        .map(|id| {
                            (
                                changes::kind.eq("renewal"),
                                changes::subject.eq(id),
                                changes::origin.eq(&*replica),
                                changes::created_ms.eq(now),
                            )
                        })
                        .collect();
                    diesel::insert_into(changes::table)
                        .values(rows)
                        .execute(conn)?;
                }
                diesel::sql_query(format!("SELECT pg_notify('{CHANNEL}', '')")).execute(conn)?;
                Ok(())
            })
        })
        .await
    }

    /// Deletes changes older than `before_ms`, keeping the newest row so ids never restart.
    pub async fn prune_changes(&self, before_ms: i64) -> Result<usize, StoreError> {
        self.run("prune_changes", move |conn| {
            let newest: Option<i64> = changes::table
                .select(diesel::dsl::max(changes::id))
                .first(conn)?;
            Ok(diesel::delete(
                changes::table
                    .filter(changes::created_ms.lt(before_ms))
                    .filter(changes::id.lt(newest.unwrap_or(0))),
            )
            .execute(conn)?)
        })
        .await
    }

    /// Replicas that hold a LISTEN connection to the database now (alive), by name.
    pub async fn live_replicas(&self) -> Result<Vec<String>, StoreError> {
        self.run("live_replicas", |conn| {
            let super::DbConnection::Postgres(pg) = conn else {
                return Ok(Vec::new());
            };
            #[derive(QueryableByName)]
            struct Name {
                #[diesel(sql_type = diesel::sql_types::Text)]
                name: String,
            }
            let names: Vec<Name> = diesel::sql_query(format!(
                "SELECT DISTINCT substr(application_name, {}) AS name FROM pg_stat_activity \
                 WHERE application_name LIKE '{APPLICATION_PREFIX}%'",
                APPLICATION_PREFIX.len() + 1
            ))
            .load(pg)?;
            Ok(names.into_iter().map(|n| n.name).collect())
        })
        .await
    }

    /// Replicas recorded as holding some device's session.
    pub async fn session_holders(&self) -> Result<Vec<String>, StoreError> {
        use super::schema::device_sessions as ds;
        self.run("session_holders", |conn| {
            Ok(ds::table.select(ds::replica).distinct().load(conn)?)
        })
        .await
    }

    /// Forgets the sessions recorded for replicas that are gone; returns how many devices.
    pub async fn clear_sessions_of(&self, replicas: Vec<String>) -> Result<usize, StoreError> {
        use super::schema::device_sessions as ds;
        self.run("clear_sessions_of", move |conn| {
            Ok(diesel::delete(ds::table.filter(ds::replica.eq_any(&replicas))).execute(conn)?)
        })
        .await
    }

    /// Listens for changes committed by any replica and wakes `wake` for each burst, and once
    /// after every (re)connection so the reader catches up on what it may have missed. Runs until
    /// the process ends; does nothing on SQLite.
    pub fn listen_for_changes(&self, wake: Vec<Arc<Notify>>) {
        let Backend::Postgres(url) = self.backend().clone() else {
            return;
        };
        let application = format!("{APPLICATION_PREFIX}{}", self.replica());
        super::dedicated::keep_connected("change feed LISTEN", move || {
            let (url, application, wake) = (url.clone(), application.clone(), wake.clone());
            async move { listen_once(&url, &application, &wake).await }
        });
    }
}

/// One LISTEN connection, from connect until it breaks.
async fn listen_once(
    url: &str,
    application: &str,
    wakes: &[Arc<Notify>],
) -> Result<(), tokio_postgres::Error> {
    let wake = || wakes.iter().for_each(|w| w.notify_one());
    // The application name marks this replica alive for the others (see `live_replicas`).
    let (client, mut connection) = super::dedicated::config(url, Some(application))?
        .connect(tokio_postgres::NoTls)
        .await?;
    let (lost_tx, mut lost) = tokio::sync::oneshot::channel::<Option<tokio_postgres::Error>>();
    let (notified_tx, mut notified) = tokio::sync::mpsc::unbounded_channel::<()>();
    // The connection must be polled for the client to make progress; notifications arrive there.
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        let error = loop {
            match messages.next().await {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => {
                    let _ = notified_tx.send(());
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => break Some(error),
                None => break None,
            }
        };
        let _ = lost_tx.send(error);
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    // Anything committed before LISTEN took effect is found by this catch-up.
    wake();
    loop {
        tokio::select! {
            Some(()) = notified.recv() => {
                while notified.try_recv().is_ok() {}
                wake();
            }
            result = &mut lost => {
                return match result {
                    Ok(Some(error)) => Err(error),
                    _ => Ok(()),
                };
            }
        }
    }
}

//! Rollouts: persisted progress (batch, members, timing, state), the events of every transition,
//! and the device revision pins a rollout moves — each change in one transaction.

use super::devices::{Moves, write_revisions};
use super::schema::{rollout_events, rollouts};
use super::{Audited, DbConnection, Store, StoreError, from_json, to_json};
use diesel::prelude::*;

/// A rollout as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutRecord {
    /// The rollout's id.
    pub id: String,
    /// The fleet it rolls out.
    pub fleet: String,
    /// The revision it moves devices from.
    pub from_revision: i64,
    /// The revision it moves devices to.
    pub to_revision: i64,
    /// progressing | paused | completed | superseded
    pub state: String,
    /// The batch in progress, from 0.
    pub batch: i64,
    /// The devices of each batch started so far, by id.
    pub members: Vec<Vec<String>>,
    /// When the current batch started, Unix milliseconds.
    pub batch_started_ms: i64,
    /// Why it paused or ended.
    pub reason: String,
    /// When it started, Unix milliseconds.
    pub created_ms: i64,
    /// When it last changed, Unix milliseconds.
    pub updated_ms: i64,
}

/// One transition of a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutEventRecord {
    /// When, Unix milliseconds.
    pub at_ms: i64,
    /// What happened (`batch-started`, `paused`, …).
    pub event: String,
    /// The detail, in words.
    pub detail: String,
}

/// Pins to write with a rollout change: these devices to this revision (`None`: follow current).
#[derive(Debug, Clone, Default)]
pub struct Pins {
    /// The devices.
    pub devices: Vec<String>,
    /// The revision they stay on; `None` releases them to the fleet's current one.
    pub revision: Option<i64>,
}

#[derive(Queryable, Selectable, Insertable, AsChangeset)]
#[diesel(table_name = rollouts)]
struct RolloutRow {
    id: String,
    fleet: String,
    from_revision: i64,
    to_revision: i64,
    state: String,
    batch: i64,
    members: String,
    batch_started_ms: i64,
    reason: String,
    created_ms: i64,
    updated_ms: i64,
}

impl RolloutRow {
    fn from_record(r: &RolloutRecord) -> RolloutRow {
        RolloutRow {
            id: r.id.clone(),
            fleet: r.fleet.clone(),
            from_revision: r.from_revision,
            to_revision: r.to_revision,
            state: r.state.clone(),
            batch: r.batch,
            members: to_json(&r.members),
            batch_started_ms: r.batch_started_ms,
            reason: r.reason.clone(),
            created_ms: r.created_ms,
            updated_ms: r.updated_ms,
        }
    }

    fn into_record(self) -> Result<RolloutRecord, StoreError> {
        Ok(RolloutRecord {
            members: from_json("rollout members", &self.members)?,
            id: self.id,
            fleet: self.fleet,
            from_revision: self.from_revision,
            to_revision: self.to_revision,
            state: self.state,
            batch: self.batch,
            batch_started_ms: self.batch_started_ms,
            reason: self.reason,
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
        })
    }
}

/// Saves a rollout (insert or update), appends its event and writes its pins, all or nothing; the
/// devices the pins move are added to `moves` (the caller records them last).
pub(super) fn save(
    conn: &mut DbConnection,
    rollout: &RolloutRecord,
    event: &RolloutEventRecord,
    pins: &[Pins],
    moves: &mut Moves,
) -> Result<(), StoreError> {
    let row = RolloutRow::from_record(rollout);
    let updated = diesel::update(rollouts::table.find(&rollout.id))
        .set(&row)
        .execute(conn)?;
    if updated == 0 {
        diesel::insert_into(rollouts::table)
            .values(&row)
            .execute(conn)?;
    }
    let seq: Option<i64> = rollout_events::table
        .filter(rollout_events::rollout_id.eq(&rollout.id))
        .select(diesel::dsl::max(rollout_events::seq))
        .first(conn)?;
    diesel::insert_into(rollout_events::table)
        .values((
            rollout_events::rollout_id.eq(&rollout.id),
            rollout_events::seq.eq(seq.unwrap_or(0) + 1),
            rollout_events::at_ms.eq(event.at_ms),
            rollout_events::event.eq(&event.event),
            rollout_events::detail.eq(&event.detail),
        ))
        .execute(conn)?;
    for pin in pins {
        write_revisions(conn, &pin.devices, pin.revision, moves)?;
    }
    Ok(())
}

impl Store {
    /// Records a rollout transition with its event and the pins it writes, and the records of the
    /// admin call that caused it (if one did).
    pub async fn save_rollout(
        &self,
        rollout: RolloutRecord,
        event: RolloutEventRecord,
        pins: Vec<Pins>,
        audit: Option<Audited>,
    ) -> Result<(), StoreError> {
        self.run("save_rollout", move |conn| {
            conn.transaction(|conn| {
                if audit.is_some() {
                    Audited::begin(conn)?;
                }
                let mut moves = Moves::default();
                save(conn, &rollout, &event, &pins, &mut moves)?;
                if let Some(audit) = audit {
                    audit.commit(conn)?;
                }
                Ok(moves.record(conn)?)
            })
        })
        .await
    }

    /// Rollouts that are progressing or paused (loaded at start).
    pub async fn list_open_rollouts(&self) -> Result<Vec<RolloutRecord>, StoreError> {
        self.run("list_open_rollouts", |conn| {
            rollouts::table
                .filter(rollouts::state.eq_any(["progressing", "paused"]))
                .select(RolloutRow::as_select())
                .load(conn)?
                .into_iter()
                .map(RolloutRow::into_record)
                .collect()
        })
        .await
    }

    /// One rollout by id.
    pub async fn get_rollout(&self, id: &str) -> Result<Option<RolloutRecord>, StoreError> {
        let id = id.to_string();
        self.run("get_rollout", move |conn| {
            rollouts::table
                .find(id)
                .select(RolloutRow::as_select())
                .first(conn)
                .optional()?
                .map(RolloutRow::into_record)
                .transpose()
        })
        .await
    }

    /// The fleet's most recent rollout.
    pub async fn latest_rollout(&self, fleet: &str) -> Result<Option<RolloutRecord>, StoreError> {
        let fleet = fleet.to_string();
        self.run("latest_rollout", move |conn| {
            rollouts::table
                .filter(rollouts::fleet.eq(fleet))
                .order((rollouts::created_ms.desc(), rollouts::id.desc()))
                .select(RolloutRow::as_select())
                .first(conn)
                .optional()?
                .map(RolloutRow::into_record)
                .transpose()
        })
        .await
    }

    /// A rollout's events, oldest first.
    pub async fn rollout_events(&self, id: &str) -> Result<Vec<RolloutEventRecord>, StoreError> {
        let id = id.to_string();
        self.run("rollout_events", move |conn| {
            Ok(rollout_events::table
                .filter(rollout_events::rollout_id.eq(id))
                .order(rollout_events::seq.asc())
                .select((
                    rollout_events::at_ms,
                    rollout_events::event,
                    rollout_events::detail,
                ))
                .load::<(i64, String, String)>(conn)?
                .into_iter()
                .map(|(at_ms, event, detail)| RolloutEventRecord {
                    at_ms,
                    event,
                    detail,
                })
                .collect())
        })
        .await
    }
}

//! Devices: identity, labels, the spec set for them, and the last acknowledged state.

use super::schema::{device_reports, device_sessions, devices};
use super::{Audited, Store, StoreError, from_json, to_json};
use crate::spec::DeviceSpec;
use crate::status::DeviceReport;
use diesel::prelude::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// A device as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRecord {
    /// The device's id (stable; its certificates name it).
    pub id: String,
    /// Its name (unique, what operators use).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its own spec, laid over its fleet's template.
    pub spec: DeviceSpec,
    /// The version it last acknowledged.
    pub acked_version: Option<String>,
    /// The version the device rejected last, and why.
    pub nacked: Option<(String, String)>,
    /// The agent version of its last session.
    pub agent_version: Option<String>,
    /// When it was last heard from, Unix milliseconds.
    pub last_seen_ms: Option<i64>,
    /// Serial of its newest certificate.
    pub cert_serial: Option<String>,
    /// Expiry of its newest certificate, Unix milliseconds.
    pub cert_not_after_ms: Option<i64>,
    /// When it was created, Unix milliseconds.
    pub created_ms: i64,
    /// When it was last changed, Unix milliseconds.
    pub updated_ms: i64,
    /// The fleet that owns the device.
    pub fleet: Option<String>,
    /// The fleet revision the device is held at while a rollout moves the fleet; `None` follows
    /// the fleet's current revision.
    pub fleet_revision: Option<i64>,
    /// The endorsement key of the TPM its key was proven to live in at enrollment.
    pub tpm_ek_fingerprint: Option<String>,
    /// The replica that holds the device's session, as last recorded (PostgreSQL replicas).
    pub session_replica: Option<String>,
}

/// Which fleet owns a device and the revision it is held at: what a `device` change carries when
/// nothing else about the device changed (a fleet created or re-selected, a rollout's batch).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct DeviceOwner {
    /// The owning fleet, if any.
    pub fleet: Option<String>,
    /// The revision it is held at (`None`: the fleet's current one).
    pub revision: Option<i64>,
}

impl DeviceOwner {
    /// The owner a `device` change carries (the `devices_moved` trigger writes it), or `None` if
    /// it cannot be read (the device is then re-read instead).
    pub(super) fn from_feed(device_id: &str, text: &str) -> Option<DeviceOwner> {
        read_carried(device_id, text, "owner")
    }

    /// The owner of every device a batch's `device` change carries (`Moves::record` writes it),
    /// or `None` if they cannot be read (every device is then re-read).
    pub(super) fn batch_from_feed(text: &str) -> Option<Vec<(String, DeviceOwner)>> {
        #[derive(serde::Deserialize)]
        struct Moved {
            id: String,
            #[serde(flatten)]
            owner: DeviceOwner,
        }
        serde_json::from_str::<Vec<Moved>>(text)
            .inspect_err(|error| {
                tracing::warn!(%error, "change feed: unreadable owners of a batch; re-reading every device");
            })
            .ok()
            .map(|moved| moved.into_iter().map(|m| (m.id, m.owner)).collect())
    }
}

/// The devices a batch's change names (of its facts, only their `id`s are read: for this
/// replica's own batches, applied already); empty if they cannot be read.
pub(super) fn batch_devices(text: &str) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Named {
        id: String,
    }
    serde_json::from_str::<Vec<Named>>(text)
        .map(|named| named.into_iter().map(|n| n.id).collect())
        .unwrap_or_default()
}

/// What a change row carries, as JSON; `None`, logged once here, if it cannot be read.
fn read_carried<T: serde::de::DeserializeOwned>(
    device_id: &str,
    text: &str,
    what: &'static str,
) -> Option<T> {
    serde_json::from_str(text)
        .inspect_err(|error| {
            tracing::warn!(device.id = %device_id, %error, carried = what, "change feed: unreadable carried facts; re-reading the device");
        })
        .ok()
}

/// What a device answered last, where its session is and which certificate it holds: the part of
/// a device that changes with sessions, pushes and renewals, apart from what renders it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionFacts {
    /// The device's id.
    pub id: String,
    /// The version it last acknowledged.
    pub acked_version: Option<String>,
    /// The version it last rejected, with the reason.
    pub nacked: Option<(String, String)>,
    /// The agent version of its last session.
    pub agent_version: Option<String>,
    /// The replica holding its session, if any.
    pub session_replica: Option<String>,
    /// Serial of its newest certificate.
    pub cert_serial: Option<String>,
    /// Expiry of its newest certificate, Unix milliseconds.
    pub cert_not_after_ms: Option<i64>,
    /// What the device last reported about itself, if these facts were read with its report
    /// (`None`: not read, so what is known of it stands).
    pub report: Option<Option<Arc<DeviceReport>>>,
}

impl SessionFacts {
    /// The session facts of a whole device record.
    pub fn of(device: &DeviceRecord) -> SessionFacts {
        SessionFacts {
            id: device.id.clone(),
            acked_version: device.acked_version.clone(),
            nacked: device.nacked.clone(),
            agent_version: device.agent_version.clone(),
            session_replica: device.session_replica.clone(),
            cert_serial: device.cert_serial.clone(),
            cert_not_after_ms: device.cert_not_after_ms,
            report: None,
        }
    }

    /// The facts a `session` change carries (`record_session_changes` writes them), or `None`
    /// if they cannot be read (the device is then re-read instead).
    pub(super) fn from_feed(device_id: &str, text: &str) -> Option<SessionFacts> {
        let carried: Carried = read_carried(device_id, text, "session facts")?;
        Some(carried.into_facts(device_id.to_string()))
    }

    /// The facts of every device a batch's `session` change carries, or `None` if they cannot be
    /// read (every device's session facts are then re-read).
    pub(super) fn batch_from_feed(text: &str) -> Option<Vec<SessionFacts>> {
        let read = serde_json::from_str::<Vec<Carried>>(text)
            .map_err(|error| error.to_string())
            .and_then(|carried| {
                carried
                    .into_iter()
                    .map(|c| match c.id.clone() {
                        Some(id) => Ok(c.into_facts(id)),
                        None => Err("facts of no device".to_string()),
                    })
                    .collect()
            });
        read.inspect_err(|error| {
            tracing::warn!(%error, "change feed: unreadable session facts of a batch; re-reading every device's");
        })
        .ok()
    }
}

/// Session facts as a `session` change carries them: one device's (its id is the change's
/// subject), or one of a batch's (named by `id`).
#[derive(serde::Deserialize)]
struct Carried {
    id: Option<String>,
    acked: Option<String>,
    nacked: Option<String>,
    error: Option<String>,
    agent: Option<String>,
    replica: Option<String>,
    serial: Option<String>,
    not_after: Option<i64>,
}

impl Carried {
    fn into_facts(self, id: String) -> SessionFacts {
        SessionFacts {
            id,
            acked_version: self.acked,
            nacked: self.nacked.zip(self.error),
            agent_version: self.agent,
            session_replica: self.replica,
            cert_serial: self.serial,
            cert_not_after_ms: self.not_after,
            report: None,
        }
    }
}

type FactsRow = (
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<String>,
);

/// A stored report; one that cannot be read (written by a newer version, or damaged) is treated
/// as none — reports are informational and the device sends a fresh one on its next session.
fn read_report(device_id: &str, text: &str) -> Option<DeviceReport> {
    match serde_json::from_str(text) {
        Ok(report) => Some(report),
        Err(error) => {
            tracing::warn!(device.id = %device_id, %error, "ignoring an unreadable device report");
            None
        }
    }
}

/// A device about to be created (by approving its enrollment).
#[derive(Debug, Clone)]
pub struct NewDevice {
    /// The device's id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its own spec.
    pub spec: DeviceSpec,
    /// Serial of its first certificate.
    pub cert_serial: String,
    /// Expiry of its first certificate, Unix milliseconds.
    pub cert_not_after_ms: i64,
    /// When it was created, Unix milliseconds.
    pub created_ms: i64,
    /// The fleet that owns it.
    pub fleet: Option<String>,
    /// SHA-256 (hex) of its TPM's endorsement key, when attested.
    pub tpm_ek_fingerprint: Option<String>,
}

impl NewDevice {
    /// The device as it reads back right after insertion.
    pub fn into_record(self) -> DeviceRecord {
        DeviceRecord {
            id: self.id,
            name: self.name,
            labels: self.labels,
            spec: self.spec,
            acked_version: None,
            nacked: None,
            agent_version: None,
            last_seen_ms: None,
            cert_serial: Some(self.cert_serial),
            cert_not_after_ms: Some(self.cert_not_after_ms),
            created_ms: self.created_ms,
            updated_ms: self.created_ms,
            fleet: self.fleet,
            fleet_revision: None,
            tpm_ek_fingerprint: self.tpm_ek_fingerprint,
            session_replica: None,
        }
    }
}

/// Changes to a device; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct DeviceChange {
    /// A new own spec.
    pub spec: Option<DeviceSpec>,
    /// New labels.
    pub labels: Option<BTreeMap<String, String>>,
    /// `Some(None)` clears the owner.
    pub fleet: Option<Option<String>>,
    /// `Some(None)` makes the device follow its fleet's current revision.
    pub fleet_revision: Option<Option<i64>>,
}

#[derive(AsChangeset)]
#[diesel(table_name = devices)]
struct DeviceChangeset {
    spec: Option<String>,
    labels: Option<String>,
    fleet: Option<Option<String>>,
    fleet_revision: Option<Option<i64>>,
    updated_ms: i64,
}

#[derive(Queryable, Selectable, Insertable)]
#[diesel(table_name = devices)]
struct DeviceRow {
    id: String,
    name: String,
    labels: String,
    spec: String,
    acked_version: Option<String>,
    nacked_version: Option<String>,
    last_error: Option<String>,
    agent_version: Option<String>,
    last_seen_ms: Option<i64>,
    cert_serial: Option<String>,
    cert_not_after_ms: Option<i64>,
    created_ms: i64,
    updated_ms: i64,
    fleet: Option<String>,
    fleet_revision: Option<i64>,
    tpm_ek_fingerprint: Option<String>,
}

impl DeviceRow {
    fn into_record(self) -> Result<DeviceRecord, StoreError> {
        Ok(DeviceRecord {
            labels: from_json("device labels", &self.labels)?,
            spec: from_json("device spec", &self.spec)?,
            id: self.id,
            name: self.name,
            acked_version: self.acked_version,
            nacked: self.nacked_version.zip(self.last_error),
            agent_version: self.agent_version,
            last_seen_ms: self.last_seen_ms,
            cert_serial: self.cert_serial,
            cert_not_after_ms: self.cert_not_after_ms,
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
            fleet: self.fleet,
            fleet_revision: self.fleet_revision,
            tpm_ek_fingerprint: self.tpm_ek_fingerprint,
            session_replica: None,
        })
    }
}

pub(super) fn insert_device(
    conn: &mut super::DbConnection,
    device: &NewDevice,
) -> Result<(), StoreError> {
    let row = DeviceRow {
        id: device.id.clone(),
        name: device.name.clone(),
        labels: to_json(&device.labels),
        spec: to_json(&device.spec),
        acked_version: None,
        nacked_version: None,
        last_error: None,
        agent_version: None,
        last_seen_ms: None,
        cert_serial: Some(device.cert_serial.clone()),
        cert_not_after_ms: Some(device.cert_not_after_ms),
        created_ms: device.created_ms,
        updated_ms: device.created_ms,
        fleet: device.fleet.clone(),
        fleet_revision: None,
        tpm_ek_fingerprint: device.tpm_ek_fingerprint.clone(),
    };
    diesel::insert_into(devices::table)
        .values(&row)
        .execute(conn)
        .map_err(|e| match StoreError::from(e) {
            StoreError::Conflict(_) => {
                StoreError::Conflict(format!("a device named {:?} already exists", device.name))
            }
            other => other,
        })?;
    Ok(())
}

/// Devices a transaction moves to another owner or revision. On PostgreSQL the triggers leave
/// these moves alone (`flotilla.feed_written`); `record`, the transaction's last statement, writes
/// them to the change feed, a change per `DEVICES_PER_BATCH_CHANGE` devices carrying each one's
/// owner and revision as they commit — every replica reads every change, and a fleet created over
/// 100,000 devices was 100,000 of them.
#[derive(Debug, Default)]
pub(super) struct Moves {
    ids: BTreeSet<String>,
}

impl Moves {
    /// Records the moves in the change feed, after every row lock the transaction takes (the feed
    /// lock comes last, as the deferred triggers take it). Nothing on SQLite.
    pub(super) fn record(self, conn: &mut super::DbConnection) -> diesel::QueryResult<()> {
        let super::DbConnection::Postgres(pg) = conn else {
            return Ok(());
        };
        if self.ids.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = self.ids.iter().map(String::as_str).collect();
        in_feed_order(pg, |pg| {
            insert_shared_changes(
                pg,
                "device",
                "'fleet', d.fleet, 'revision', d.fleet_revision",
                "",
                &ids,
            )
        })
    }
}

/// Writes change rows as the deferred triggers do: the feed lock first (so ids commit in order),
/// then `write`, then the wake-up of the other replicas. Called last in a transaction, after every
/// row lock it takes.
fn in_feed_order(
    pg: &mut diesel::PgConnection,
    write: impl FnOnce(&mut diesel::PgConnection) -> diesel::QueryResult<()>,
) -> diesel::QueryResult<()> {
    use diesel::sql_types::{BigInt, Text};
    diesel::sql_query("SELECT pg_advisory_xact_lock($1)")
        .bind::<BigInt, _>(super::feed::FEED_LOCK)
        .execute(pg)?;
    write(pg)?;
    diesel::sql_query("SELECT pg_notify($1, '')")
        .bind::<Text, _>(super::feed::CHANNEL)
        .execute(pg)?;
    Ok(())
}

/// The `kind` changes of devices `ids` as shared rows (subject empty), one per
/// `DEVICES_PER_BATCH_CHANGE` devices, each device's entry its `id` and `fields` (SQL `json_build_object`
/// arguments over the device row `d` and whatever `joins` adds) as they commit.
fn insert_shared_changes(
    pg: &mut diesel::PgConnection,
    kind: &str,
    fields: &str,
    joins: &str,
    ids: &[&str],
) -> diesel::QueryResult<()> {
    use diesel::sql_types::{Array, BigInt, Text};
    diesel::sql_query(format!(
        "INSERT INTO changes (kind, subject, origin, created_ms, facts) \
         SELECT $3, '', {ORIGIN_AND_TIME}, \
             json_agg(json_build_object('id', d.id, {fields}) ORDER BY d.id)::text \
         FROM unnest($1::text[]) WITH ORDINALITY AS v(id, n) JOIN devices d ON d.id = v.id {joins} \
         GROUP BY (v.n - 1) / $2 ORDER BY (v.n - 1) / $2"
    ))
    .bind::<Array<Text>, _>(ids)
    .bind::<BigInt, _>(DEVICES_PER_BATCH_CHANGE)
    .bind::<Text, _>(kind)
    .execute(pg)?;
    Ok(())
}

#[derive(QueryableByName)]
struct MovedRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    id: String,
}

/// Runs `statements` with the triggers' recording of device changes switched off
/// (`flotilla.feed_written`): their writer records them itself (`Moves`, `record_session_changes`).
fn unrecorded<T>(
    pg: &mut diesel::PgConnection,
    statements: impl FnOnce(&mut diesel::PgConnection) -> diesel::QueryResult<T>,
) -> diesel::QueryResult<T> {
    use diesel::sql_types::Text;
    diesel::sql_query("SELECT set_config($1, 'on', true)")
        .bind::<Text, _>(super::feed::FEED_WRITTEN)
        .execute(pg)?;
    let result = statements(pg)?;
    diesel::sql_query("SELECT set_config($1, 'off', true)")
        .bind::<Text, _>(super::feed::FEED_WRITTEN)
        .execute(pg)?;
    Ok(result)
}

/// Holds devices `ids` at `revision` (`None`: the fleet's current one), noting each one moved.
pub(super) fn write_revisions(
    conn: &mut super::DbConnection,
    ids: &[String],
    revision: Option<i64>,
    moves: &mut Moves,
) -> Result<(), StoreError> {
    use diesel::sql_types::{Array, BigInt, Nullable, Text};
    // Device rows are locked in id order by every writer (journal, issuance, fleets), so
    // concurrent transactions on PostgreSQL wait for each other instead of deadlocking.
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    let super::DbConnection::Postgres(pg) = conn else {
        for chunk in ids.chunks(500) {
            diesel::update(devices::table.filter(devices::id.eq_any(chunk)))
                .set(devices::fleet_revision.eq(revision))
                .execute(conn)?;
        }
        return Ok(());
    };
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    lock_in_id_order(pg, &ids)?;
    let moved: Vec<MovedRow> = unrecorded(pg, |pg| {
        diesel::sql_query(
            "UPDATE devices SET fleet_revision = $2 WHERE id = ANY($1) \
             AND fleet_revision IS DISTINCT FROM $2 RETURNING id",
        )
        .bind::<Array<Text>, _>(&ids)
        .bind::<Nullable<BigInt>, _>(revision)
        .load(pg)
    })?;
    moves.ids.extend(moved.into_iter().map(|m| m.id));
    Ok(())
}

/// Locks the rows of the devices `ids` (in any order) in id order, as every writer of device rows
/// takes them, so bulk writes never deadlock with each other or with row-by-row writers.
fn lock_in_id_order(pg: &mut diesel::PgConnection, ids: &[&str]) -> diesel::QueryResult<usize> {
    diesel::sql_query("SELECT id FROM devices WHERE id = ANY($1) ORDER BY id FOR UPDATE")
        .bind::<diesel::sql_types::Array<diesel::sql_types::Text>, _>(ids)
        .execute(pg)
}

/// Moves devices to their new owning fleets (a later entry for the same device wins), noting each
/// one moved. On PostgreSQL the rows are locked in id order first, as every writer of device rows
/// locks them (see `write_revisions`), then written by one statement: a fleet that takes in a
/// whole fleet of devices is one round trip, not one per device.
pub(super) fn write_owners(
    conn: &mut super::DbConnection,
    owners: &[(String, Option<String>)],
    moves: &mut Moves,
) -> Result<(), StoreError> {
    use diesel::sql_types::{Array, Nullable, Text};
    let owners: BTreeMap<&str, Option<&str>> = owners
        .iter()
        .map(|(id, fleet)| (id.as_str(), fleet.as_deref()))
        .collect();
    let super::DbConnection::Postgres(pg) = conn else {
        for (id, fleet) in owners {
            diesel::update(devices::table.find(id))
                .set(devices::fleet.eq(fleet))
                .execute(conn)?;
        }
        return Ok(());
    };
    let (ids, fleets): (Vec<&str>, Vec<Option<&str>>) = owners.into_iter().unzip();
    if ids.is_empty() {
        return Ok(());
    }
    lock_in_id_order(pg, &ids)?;
    let moved: Vec<MovedRow> = unrecorded(pg, |pg| {
        diesel::sql_query(
            "UPDATE devices AS d SET fleet = v.fleet \
             FROM unnest($1::text[], $2::text[]) AS v(id, fleet) \
             WHERE d.id = v.id AND d.fleet IS DISTINCT FROM v.fleet RETURNING d.id",
        )
        .bind::<Array<Text>, _>(&ids)
        .bind::<Array<Nullable<Text>>, _>(&fleets)
        .load(pg)
    })?;
    moves.ids.extend(moved.into_iter().map(|m| m.id));
    Ok(())
}

impl Store {
    /// Every device, by name.
    pub async fn list_devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        self.run("list_devices", |conn| {
            let mut devices: Vec<DeviceRecord> = devices::table
                .order(devices::name.asc())
                .select(DeviceRow::as_select())
                .load(conn)?
                .into_iter()
                .map(DeviceRow::into_record)
                .collect::<Result<_, _>>()?;
            let holders: std::collections::HashMap<String, String> = device_sessions::table
                .select((device_sessions::device_id, device_sessions::replica))
                .load::<(String, String)>(conn)?
                .into_iter()
                .collect();
            for device in &mut devices {
                device.session_replica = holders.get(&device.id).cloned();
            }
            Ok(devices)
        })
        .await
    }

    /// The devices with these ids that exist.
    pub async fn get_devices(&self, ids: Vec<String>) -> Result<Vec<DeviceRecord>, StoreError> {
        self.run("get_devices", move |conn| {
            let mut found = Vec::with_capacity(ids.len());
            for chunk in ids.chunks(500) {
                let rows = devices::table
                    .filter(devices::id.eq_any(chunk))
                    .select(DeviceRow::as_select())
                    .load(conn)?;
                let holders: std::collections::HashMap<String, String> = device_sessions::table
                    .filter(device_sessions::device_id.eq_any(chunk))
                    .select((device_sessions::device_id, device_sessions::replica))
                    .load::<(String, String)>(conn)?
                    .into_iter()
                    .collect();
                for row in rows {
                    let mut device = row.into_record()?;
                    device.session_replica = holders.get(&device.id).cloned();
                    found.push(device);
                }
            }
            Ok(found)
        })
        .await
    }

    /// What each of `ids` answered last and which replica holds its session: the columns a
    /// `session` change touches, without the rest of the device. Devices that are gone are left
    /// out.
    pub async fn session_facts(&self, ids: Vec<String>) -> Result<Vec<SessionFacts>, StoreError> {
        self.run("session_facts", move |conn| {
            let mut found = Vec::with_capacity(ids.len());
            for chunk in ids.chunks(500) {
                let rows: Vec<FactsRow> = devices::table
                    .left_join(device_sessions::table)
                    .left_join(device_reports::table)
                    .filter(devices::id.eq_any(chunk))
                    .select((
                        devices::id,
                        devices::acked_version,
                        devices::nacked_version,
                        devices::last_error,
                        devices::agent_version,
                        device_sessions::replica.nullable(),
                        devices::cert_serial,
                        devices::cert_not_after_ms,
                        device_reports::report.nullable(),
                    ))
                    .load(conn)?;
                found.extend(rows.into_iter().map(
                    |(id, acked, nacked, error, agent, replica, serial, not_after_ms, report)| {
                        SessionFacts {
                            report: Some(
                                report
                                    .and_then(|text| read_report(&id, &text))
                                    .map(Arc::new),
                            ),
                            id,
                            acked_version: acked,
                            nacked: nacked.zip(error),
                            agent_version: agent,
                            session_replica: replica,
                            cert_serial: serial,
                            cert_not_after_ms: not_after_ms,
                        }
                    },
                ));
            }
            Ok(found)
        })
        .await
    }

    /// Every device's last report, by device id (at start-up).
    pub async fn device_reports(&self) -> Result<HashMap<String, DeviceReport>, StoreError> {
        self.run("device_reports", move |conn| {
            let rows: Vec<(String, String)> = device_reports::table
                .select((device_reports::device_id, device_reports::report))
                .load(conn)?;
            Ok(rows
                .into_iter()
                .filter_map(|(id, text)| Some((id.clone(), read_report(&id, &text)?)))
                .collect())
        })
        .await
    }

    /// One device by name.
    pub async fn get_device_by_name(&self, name: &str) -> Result<Option<DeviceRecord>, StoreError> {
        let name = name.to_string();
        self.run("get_device_by_name", move |conn| {
            devices::table
                .filter(devices::name.eq(name))
                .select(DeviceRow::as_select())
                .first(conn)
                .optional()?
                .map(DeviceRow::into_record)
                .transpose()
        })
        .await
    }

    /// Changes a device, appending `audit`'s records in the same transaction. Returns the updated
    /// device, or `None` if no device has that name (and appends nothing).
    pub async fn update_device(
        &self,
        name: &str,
        change: DeviceChange,
        now_ms: i64,
        audit: Audited,
    ) -> Result<Option<DeviceRecord>, StoreError> {
        let name = name.to_string();
        let changeset = DeviceChangeset {
            spec: change.spec.as_ref().map(to_json),
            labels: change.labels.as_ref().map(to_json),
            fleet: change.fleet,
            fleet_revision: change.fleet_revision,
            updated_ms: now_ms,
        };
        self.run("update_device", move |conn| {
            conn.transaction(|conn| {
                Audited::begin(conn)?;
                let changed = diesel::update(devices::table.filter(devices::name.eq(&name)))
                    .set(&changeset)
                    .execute(conn)?;
                if changed == 0 {
                    return Ok(None);
                }
                audit.commit(conn)?;
                devices::table
                    .filter(devices::name.eq(&name))
                    .select(DeviceRow::as_select())
                    .first(conn)?
                    .into_record()
                    .map(Some)
            })
        })
        .await
    }

    /// Sets the owning fleet of many devices at once (device id, new owner), in one transaction.
    pub async fn set_device_owners(
        &self,
        owners: Vec<(String, Option<String>)>,
    ) -> Result<(), StoreError> {
        if owners.is_empty() {
            return Ok(());
        }
        self.run("set_device_owners", move |conn| {
            conn.transaction(|conn| {
                let mut moves = Moves::default();
                write_owners(conn, &owners, &mut moves)?;
                Ok(moves.record(conn)?)
            })
        })
        .await
    }

    /// Records what a device reported: the version it acknowledged and the version it rejected
    /// last, with the reason (`None` clears it).
    pub async fn record_device_sync(
        &self,
        id: &str,
        acked_version: Option<String>,
        nacked: Option<(String, String)>,
    ) -> Result<(), StoreError> {
        self.record_device_facts(vec![DeviceFact::Sync {
            id: id.to_string(),
            acked_version,
            nacked,
        }])
        .await
    }

    /// Records when a device was last heard from (at the end of a session).
    pub async fn record_last_seen(&self, id: &str, seen_ms: i64) -> Result<(), StoreError> {
        self.record_device_facts(vec![DeviceFact::LastSeen {
            id: id.to_string(),
            seen_ms,
        }])
        .await
    }

    /// Records the facts of a newly opened session (once per connection, not per heartbeat): the
    /// agent's version and, when it reported one, the spec version it runs.
    pub async fn record_device_session(
        &self,
        id: &str,
        agent_version: String,
        running_version: Option<String>,
        seen_ms: i64,
    ) -> Result<(), StoreError> {
        self.record_device_facts(vec![DeviceFact::Session {
            id: id.to_string(),
            agent_version,
            running_version,
            seen_ms,
        }])
        .await
    }

    /// Writes device bookkeeping facts, in order, in one transaction (facts about devices that no
    /// longer exist change nothing).
    pub async fn record_device_facts(&self, facts: Vec<DeviceFact>) -> Result<(), StoreError> {
        if facts.is_empty() {
            return Ok(());
        }
        let replica = self.has_change_feed().then(|| self.replica.clone());
        self.run("record_device_facts", move |conn| {
            conn.transaction(|conn| Ok(write_facts(conn, &facts, replica.as_deref())?))
        })
        .await
    }
}

/// One piece of device bookkeeping: what the device reported or when it was seen. Written behind
/// the live state (which is in memory), so many are batched into one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceFact {
    /// A session opened: the agent's version and, if it reported one, the version it runs.
    Session {
        /// The device's id.
        id: String,
        /// The agent version.
        agent_version: String,
        /// The version the agent says it runs.
        running_version: Option<String>,
        /// When, Unix milliseconds.
        seen_ms: i64,
    },
    /// The device was last heard from at `seen_ms`.
    LastSeen {
        /// The device's id.
        id: String,
        /// When, Unix milliseconds.
        seen_ms: i64,
    },
    /// The version it acknowledged last and the one it rejected, with the reason.
    Sync {
        /// The device's id.
        id: String,
        /// The version acknowledged last.
        acked_version: Option<String>,
        /// The version rejected last, with the reason.
        nacked: Option<(String, String)>,
    },
    /// What the device reported about itself, when its content changed.
    Report {
        /// The device's id.
        id: String,
        /// The report as it now stands.
        report: Arc<DeviceReport>,
    },
}

impl DeviceFact {
    fn device_id(&self) -> &str {
        match self {
            DeviceFact::Session { id, .. }
            | DeviceFact::LastSeen { id, .. }
            | DeviceFact::Sync { id, .. }
            | DeviceFact::Report { id, .. } => id,
        }
    }
}

/// Writes a batch of facts in their order. On PostgreSQL, a device with a single fact in the
/// batch — every device of a connect storm, a fan-out or a drain — is written by one statement per
/// kind for all of them; the rest one by one. Every device row the batch touches is locked
/// first, in id order, so this never deadlocks with the other writers of device rows (issuance,
/// fleet ownership), which lock in the same order.
fn write_facts(
    conn: &mut super::DbConnection,
    facts: &[DeviceFact],
    replica: Option<&str>,
) -> Result<(), diesel::result::Error> {
    let super::DbConnection::Postgres(pg) = conn else {
        for fact in facts {
            write_fact(conn, fact, replica)?;
        }
        return Ok(());
    };
    let mut per_device: HashMap<&str, usize> = HashMap::new();
    for fact in facts {
        *per_device.entry(fact.device_id()).or_default() += 1;
    }
    let ids: Vec<&str> = per_device.keys().copied().collect();
    lock_in_id_order(pg, &ids)?;
    let (bulk, single): (Vec<&DeviceFact>, Vec<&DeviceFact>) = facts
        .iter()
        .partition(|fact| per_device[fact.device_id()] == 1);
    for fact in single {
        write_fact(conn, fact, replica)?;
    }
    if let super::DbConnection::Postgres(pg) = conn {
        write_in_bulk(pg, &bulk, replica)?;
    }
    Ok(())
}

/// Session starts, answers, reports and session ends of distinct devices, a statement per kind
/// (PostgreSQL).
fn write_in_bulk(
    pg: &mut diesel::PgConnection,
    facts: &[&DeviceFact],
    replica: Option<&str>,
) -> Result<(), diesel::result::Error> {
    use diesel::sql_types::{Array, BigInt, Nullable, Text};
    let mut sessions = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut answers = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut reports = (Vec::new(), Vec::new(), Vec::new());
    let mut ends = (Vec::new(), Vec::new());
    for fact in facts {
        match fact {
            DeviceFact::Session {
                id,
                agent_version,
                running_version,
                seen_ms,
            } => {
                sessions.0.push(id.as_str());
                sessions.1.push(agent_version.as_str());
                sessions.2.push(running_version.as_deref());
                sessions.3.push(*seen_ms);
            }
            DeviceFact::Sync {
                id,
                acked_version,
                nacked,
            } => {
                answers.0.push(id.as_str());
                answers.1.push(acked_version.as_deref());
                answers.2.push(nacked.as_ref().map(|n| n.0.as_str()));
                answers.3.push(nacked.as_ref().map(|n| n.1.as_str()));
            }
            DeviceFact::Report { id, report } => {
                reports.0.push(id.as_str());
                reports.1.push(to_json(report.as_ref()));
                reports.2.push(report.reported_ms);
            }
            DeviceFact::LastSeen { id, seen_ms } => {
                ends.0.push(id.as_str());
                ends.1.push(*seen_ms);
            }
        }
    }
    if facts.is_empty() {
        return Ok(());
    }
    // The triggers would record each row with a PL/pgSQL call and an INSERT at commit; these
    // statements' change rows are written below, shared by the batch's devices.
    unrecorded(pg, |pg| {
        if !reports.0.is_empty() {
            diesel::sql_query(
            "INSERT INTO device_reports (device_id, report, reported_ms) \
             SELECT v.id, v.report, v.at FROM unnest($1::text[], $2::text[], $3::bigint[]) AS v(id, report, at) \
             JOIN devices d ON d.id = v.id \
             ON CONFLICT (device_id) DO UPDATE SET report = EXCLUDED.report, reported_ms = EXCLUDED.reported_ms",
        )
        .bind::<Array<Text>, _>(&reports.0)
        .bind::<Array<Text>, _>(&reports.1)
        .bind::<Array<BigInt>, _>(&reports.2)
        .execute(pg)?;
        }
        if !sessions.0.is_empty() {
            diesel::sql_query(
            "UPDATE devices AS d SET agent_version = v.agent, last_seen_ms = v.seen, \
             acked_version = COALESCE(v.running, d.acked_version) \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) AS v(id, agent, running, seen) \
             WHERE d.id = v.id",
        )
        .bind::<Array<Text>, _>(&sessions.0)
        .bind::<Array<Text>, _>(&sessions.1)
        .bind::<Array<Nullable<Text>>, _>(&sessions.2)
        .bind::<Array<BigInt>, _>(&sessions.3)
        .execute(pg)?;
            if let Some(replica) = replica {
                diesel::sql_query(
                "INSERT INTO device_sessions (device_id, replica, since_ms) \
                 SELECT v.id, $1, v.since FROM unnest($2::text[], $3::bigint[]) AS v(id, since) \
                 JOIN devices d ON d.id = v.id \
                 ON CONFLICT (device_id) DO UPDATE SET replica = EXCLUDED.replica, since_ms = EXCLUDED.since_ms",
            )
            .bind::<Text, _>(replica)
            .bind::<Array<Text>, _>(&sessions.0)
            .bind::<Array<BigInt>, _>(&sessions.3)
            .execute(pg)?;
            }
        }
        if !answers.0.is_empty() {
            diesel::sql_query(
            "UPDATE devices AS d SET acked_version = v.acked, nacked_version = v.nacked, \
             last_error = v.error \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS v(id, acked, nacked, error) \
             WHERE d.id = v.id",
        )
        .bind::<Array<Text>, _>(&answers.0)
        .bind::<Array<Nullable<Text>>, _>(&answers.1)
        .bind::<Array<Nullable<Text>>, _>(&answers.2)
        .bind::<Array<Nullable<Text>>, _>(&answers.3)
        .execute(pg)?;
        }
        if !ends.0.is_empty() {
            diesel::sql_query(
                "UPDATE devices AS d SET last_seen_ms = v.seen \
             FROM unnest($1::text[], $2::bigint[]) AS v(id, seen) WHERE d.id = v.id",
            )
            .bind::<Array<Text>, _>(&ends.0)
            .bind::<Array<BigInt>, _>(&ends.1)
            .execute(pg)?;
            if let Some(replica) = replica {
                // The sessions ended here; a newer one on another replica keeps its record.
                diesel::sql_query(
                    "DELETE FROM device_sessions AS s USING unnest($2::text[]) AS v(id) \
                 WHERE s.device_id = v.id AND s.replica = $1",
                )
                .bind::<Text, _>(replica)
                .bind::<Array<Text>, _>(&ends.0)
                .execute(pg)?;
            }
        }
        Ok(())
    })?;
    record_session_changes(pg, facts)
}

/// Most devices one batch's change carries.
const DEVICES_PER_BATCH_CHANGE: i64 = 1000;

/// A change row's origin and time, as the triggers' function writes them.
const ORIGIN_AND_TIME: &str = "COALESCE(current_setting('flotilla.replica', true), ''), \
     (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT";

/// The `session` changes of the bulk statements: the triggers would have recorded one per device,
/// but every replica reads every change, so the devices of a batch share one (up to
/// `DEVICES_PER_BATCH_CHANGE` each, their facts as a JSON array; its subject is empty). The feed
/// lock comes first (so ids commit in order), origin and time as in the trigger function. Called
/// last in the transaction, after every row lock it takes, as the deferred triggers run.
///
/// The facts carried are the ones the other replicas would otherwise re-read (`SessionFacts`),
/// read under the feed lock, so they are each device's state as this change commits: whoever
/// changes them next commits later, with a later id. A device whose report is in the batch gets a
/// change of its own that carries nothing (reports are not carried; it is re-read whole).
fn record_session_changes(
    pg: &mut diesel::PgConnection,
    facts: &[&DeviceFact],
) -> Result<(), diesel::result::Error> {
    let mut devices: BTreeMap<&str, bool> = BTreeMap::new();
    for fact in facts {
        let reported = devices.entry(fact.device_id()).or_default();
        *reported |= matches!(fact, DeviceFact::Report { .. });
    }
    let (mut reported, mut carried): (Vec<&str>, Vec<&str>) = (Vec::new(), Vec::new());
    for (id, with_report) in devices {
        if with_report {
            reported.push(id);
        } else {
            carried.push(id);
        }
    }
    in_feed_order(pg, |pg| {
        if !carried.is_empty() {
            insert_shared_changes(
                pg,
                "session",
                "'acked', d.acked_version, 'nacked', d.nacked_version, 'error', d.last_error, \
                 'agent', d.agent_version, 'replica', s.replica, 'serial', d.cert_serial, \
                 'not_after', d.cert_not_after_ms",
                "LEFT JOIN device_sessions s ON s.device_id = d.id",
                &carried,
            )?;
        }
        if !reported.is_empty() {
            diesel::sql_query(format!(
                "INSERT INTO changes (kind, subject, origin, created_ms) \
                 SELECT 'session', d.id, {ORIGIN_AND_TIME} \
                 FROM unnest($1::text[]) AS v(id) JOIN devices d ON d.id = v.id ORDER BY d.id"
            ))
            .bind::<diesel::sql_types::Array<diesel::sql_types::Text>, _>(&reported)
            .execute(pg)?;
        }
        Ok(())
    })
}

/// Records that `replica` holds the session of device `id` (if the device still exists).
fn hold_session(
    conn: &mut super::DbConnection,
    id: &str,
    replica: &str,
    since_ms: i64,
) -> Result<(), diesel::result::Error> {
    let exists: i64 = devices::table.find(id).count().get_result(conn)?;
    diesel::delete(device_sessions::table.find(id)).execute(conn)?;
    if exists > 0 {
        diesel::insert_into(device_sessions::table)
            .values((
                device_sessions::device_id.eq(id),
                device_sessions::replica.eq(replica),
                device_sessions::since_ms.eq(since_ms),
            ))
            .execute(conn)?;
    }
    Ok(())
}

/// Writes one fact; `replica` is the replica recording it, when sessions are shared (PostgreSQL).
fn write_fact(
    conn: &mut super::DbConnection,
    fact: &DeviceFact,
    replica: Option<&str>,
) -> Result<(), diesel::result::Error> {
    match fact {
        DeviceFact::Session {
            id,
            agent_version,
            running_version,
            seen_ms,
        } => {
            let target = devices::table.find(id);
            match running_version {
                Some(version) => diesel::update(target)
                    .set((
                        devices::agent_version.eq(agent_version),
                        devices::acked_version.eq(version),
                        devices::last_seen_ms.eq(seen_ms),
                    ))
                    .execute(conn)?,
                None => diesel::update(target)
                    .set((
                        devices::agent_version.eq(agent_version),
                        devices::last_seen_ms.eq(seen_ms),
                    ))
                    .execute(conn)?,
            };
            if let Some(replica) = replica {
                hold_session(conn, id, replica, *seen_ms)?;
            }
        }
        DeviceFact::LastSeen { id, seen_ms } => {
            diesel::update(devices::table.find(id))
                .set(devices::last_seen_ms.eq(seen_ms))
                .execute(conn)?;
            if let Some(replica) = replica {
                // The session ended here; a newer one on another replica keeps its record.
                diesel::delete(
                    device_sessions::table
                        .find(id)
                        .filter(device_sessions::replica.eq(replica)),
                )
                .execute(conn)?;
            }
        }
        DeviceFact::Report { id, report } => {
            let exists: i64 = devices::table.find(id).count().get_result(conn)?;
            diesel::delete(device_reports::table.find(id)).execute(conn)?;
            if exists > 0 {
                diesel::insert_into(device_reports::table)
                    .values((
                        device_reports::device_id.eq(id),
                        device_reports::report.eq(to_json(report.as_ref())),
                        device_reports::reported_ms.eq(report.reported_ms),
                    ))
                    .execute(conn)?;
            }
        }
        DeviceFact::Sync {
            id,
            acked_version,
            nacked,
        } => {
            let (nacked_version, last_error) = nacked.clone().unzip();
            diesel::update(devices::table.find(id))
                .set((
                    devices::acked_version.eq(acked_version),
                    devices::nacked_version.eq(nacked_version),
                    devices::last_error.eq(last_error),
                ))
                .execute(conn)?;
        }
    }
    Ok(())
}

//! Fleets and their immutable template revisions.

use super::devices::{Moves, write_owners, write_revisions};
use super::rollouts::{Pins, RolloutEventRecord, RolloutRecord, save as save_rollout};
use super::schema::{devices, fleet_revisions, fleets};
use super::{Audited, Store, StoreError, from_json, to_json};
use crate::rollout::RolloutSpec;
use crate::spec::DeviceSpec;
use diesel::prelude::*;
use std::collections::BTreeMap;

/// A fleet with its current template.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetRecord {
    /// The fleet's name.
    pub name: String,
    /// Selector text as the operator wrote it (validated before it is stored).
    pub selector: String,
    /// Values of labels a device lacks, as seen by the template.
    pub label_defaults: BTreeMap<String, String>,
    /// Its current template revision.
    pub revision: i64,
    /// Its current template.
    pub template: DeviceSpec,
    /// When it was created, Unix milliseconds.
    pub created_ms: i64,
    /// When it was last changed, Unix milliseconds.
    pub updated_ms: i64,
    /// How new revisions reach its devices; `None`: all at once.
    pub rollout: Option<RolloutSpec>,
}

/// One immutable template revision.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetRevision {
    /// The fleet.
    pub fleet: String,
    /// The revision, from 1.
    pub revision: i64,
    /// The template of that revision.
    pub template: DeviceSpec,
    /// When it was applied, Unix milliseconds.
    pub created_ms: i64,
    /// Who applied it.
    pub created_by: String,
}

/// What a fleet change does to rollouts, written in the same transaction: device revision pins,
/// and rollouts started or superseded (with their events).
#[derive(Debug, Clone, Default)]
pub struct FleetRollout {
    /// Devices pinned to a revision (or released).
    pub pins: Vec<Pins>,
    /// Rollouts to save, each with its event.
    pub saves: Vec<(RolloutRecord, RolloutEventRecord)>,
}

/// A fleet as an operator applies it.
#[derive(Debug, Clone)]
pub struct FleetWrite {
    /// The fleet's name.
    pub name: String,
    /// Its label selector.
    pub selector: String,
    /// Values the template sees for labels a device lacks.
    pub label_defaults: BTreeMap<String, String>,
    /// The spec template.
    pub template: DeviceSpec,
    /// How new revisions reach its devices.
    pub rollout: Option<RolloutSpec>,
    /// Who, for the records.
    pub actor: String,
    /// When, Unix milliseconds.
    pub now_ms: i64,
}

#[derive(Queryable, Selectable, Insertable)]
#[diesel(table_name = fleets)]
struct FleetRow {
    name: String,
    selector: String,
    label_defaults: String,
    revision: i64,
    created_ms: i64,
    updated_ms: i64,
    rollout_policy: Option<String>,
}

#[derive(Queryable, Selectable, Insertable)]
#[diesel(table_name = fleet_revisions)]
struct RevisionRow {
    fleet: String,
    revision: i64,
    template: String,
    created_ms: i64,
    created_by: String,
}

impl RevisionRow {
    fn into_revision(self) -> Result<FleetRevision, StoreError> {
        Ok(FleetRevision {
            template: from_json("fleet template", &self.template)?,
            fleet: self.fleet,
            revision: self.revision,
            created_ms: self.created_ms,
            created_by: self.created_by,
        })
    }
}

fn record(fleet: FleetRow, revision: RevisionRow) -> Result<FleetRecord, StoreError> {
    Ok(FleetRecord {
        label_defaults: from_json("fleet label defaults", &fleet.label_defaults)?,
        template: from_json("fleet template", &revision.template)?,
        rollout: fleet
            .rollout_policy
            .as_deref()
            .map(|p| from_json("fleet rollout policy", p))
            .transpose()?,
        name: fleet.name,
        selector: fleet.selector,
        revision: fleet.revision,
        created_ms: fleet.created_ms,
        updated_ms: fleet.updated_ms,
    })
}

fn load_fleets(
    conn: &mut super::DbConnection,
    name: Option<&str>,
) -> Result<Vec<FleetRecord>, StoreError> {
    let mut query = fleets::table
        .inner_join(
            fleet_revisions::table.on(fleet_revisions::fleet
                .eq(fleets::name)
                .and(fleet_revisions::revision.eq(fleets::revision))),
        )
        .select((FleetRow::as_select(), RevisionRow::as_select()))
        .order(fleets::name.asc())
        .into_boxed();
    if let Some(name) = name {
        query = query.filter(fleets::name.eq(name.to_string()));
    }
    query
        .load::<(FleetRow, RevisionRow)>(conn)?
        .into_iter()
        .map(|(f, r)| record(f, r))
        .collect()
}

impl Store {
    /// Every fleet with its current template, by name.
    pub async fn list_fleets(&self) -> Result<Vec<FleetRecord>, StoreError> {
        self.run("list_fleets", |conn| load_fleets(conn, None))
            .await
    }

    /// One fleet by name.
    pub async fn get_fleet(&self, name: &str) -> Result<Option<FleetRecord>, StoreError> {
        let name = name.to_string();
        self.run("get_fleet", move |conn| {
            Ok(load_fleets(conn, Some(&name))?.pop())
        })
        .await
    }

    /// Creates or updates a fleet and, in the same transaction, moves devices to their new owners
    /// and appends `audit`'s records with the revision written.
    /// A changed template becomes a new revision; an identical one keeps the current revision.
    pub async fn apply_fleet(
        &self,
        write: FleetWrite,
        owners: Vec<(String, Option<String>)>,
        rollout: FleetRollout,
        audit: Audited,
    ) -> Result<FleetRecord, StoreError> {
        self.run("apply_fleet", move |conn| {
            conn.transaction(|conn| {
                Audited::begin(conn)?;
                let existing = load_fleets(conn, Some(&write.name))?.pop();
                let template = to_json(&write.template);
                let revision = match &existing {
                    Some(fleet) if fleet.template == write.template => fleet.revision,
                    Some(fleet) => fleet.revision + 1,
                    None => 1,
                };
                if existing.as_ref().map(|f| f.revision) != Some(revision) {
                    diesel::insert_into(fleet_revisions::table)
                        .values(RevisionRow {
                            fleet: write.name.clone(),
                            revision,
                            template,
                            created_ms: write.now_ms,
                            created_by: write.actor.clone(),
                        })
                        .execute(conn)?;
                }
                let label_defaults = to_json(&write.label_defaults);
                let rollout_policy = write.rollout.as_ref().map(to_json);
                match &existing {
                    Some(_) => {
                        diesel::update(fleets::table.find(&write.name))
                            .set((
                                fleets::selector.eq(&write.selector),
                                fleets::label_defaults.eq(&label_defaults),
                                fleets::revision.eq(revision),
                                fleets::updated_ms.eq(write.now_ms),
                                fleets::rollout_policy.eq(&rollout_policy),
                            ))
                            .execute(conn)?;
                    }
                    None => {
                        diesel::insert_into(fleets::table)
                            .values(FleetRow {
                                name: write.name.clone(),
                                selector: write.selector.clone(),
                                label_defaults,
                                revision,
                                created_ms: write.now_ms,
                                updated_ms: write.now_ms,
                                rollout_policy,
                            })
                            .execute(conn)?;
                    }
                }
                let mut moves = Moves::default();
                write_owners(conn, &owners, &mut moves)?;
                for pin in &rollout.pins {
                    write_revisions(conn, &pin.devices, pin.revision, &mut moves)?;
                }
                for (record, event) in &rollout.saves {
                    save_rollout(conn, record, event, &[], &mut moves)?;
                }
                audit.produced(revision).commit(conn)?;
                let fleet = load_fleets(conn, Some(&write.name))?.pop().ok_or_else(|| {
                    StoreError::Precondition(format!("fleet {:?} vanished", write.name))
                })?;
                moves.record(conn)?;
                Ok(fleet)
            })
        })
        .await
    }

    /// Deletes a fleet and its revisions, releasing its devices to their new owners. Returns false
    /// if there was no such fleet.
    pub async fn delete_fleet(
        &self,
        name: &str,
        owners: Vec<(String, Option<String>)>,
        audit: Audited,
    ) -> Result<bool, StoreError> {
        let name = name.to_string();
        self.run("delete_fleet", move |conn| {
            conn.transaction(|conn| {
                Audited::begin(conn)?;
                let deleted = diesel::delete(fleets::table.find(&name)).execute(conn)?;
                if deleted == 0 {
                    return Ok(false);
                }
                diesel::delete(fleet_revisions::table.filter(fleet_revisions::fleet.eq(&name)))
                    .execute(conn)?;
                let mut moves = Moves::default();
                write_owners(conn, &owners, &mut moves)?;
                // Whatever the caller knew, no device may point at a fleet that is gone.
                diesel::update(devices::table.filter(devices::fleet.eq(&name)))
                    .set(devices::fleet.eq(None::<String>))
                    .execute(conn)?;
                audit.commit(conn)?;
                moves.record(conn)?;
                Ok(true)
            })
        })
        .await
    }

    /// A fleet's revisions, oldest first.
    pub async fn list_fleet_revisions(&self, name: &str) -> Result<Vec<FleetRevision>, StoreError> {
        let name = name.to_string();
        self.run("list_fleet_revisions", move |conn| {
            fleet_revisions::table
                .filter(fleet_revisions::fleet.eq(name))
                .order(fleet_revisions::revision.asc())
                .select(RevisionRow::as_select())
                .load(conn)?
                .into_iter()
                .map(RevisionRow::into_revision)
                .collect()
        })
        .await
    }
}

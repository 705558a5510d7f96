//! Enrollment requests: submitted by agents, decided by operators. Approval creates the device and
//! records its first certificate in the same transaction.

use super::certificates::{CertificateRecord, insert_certificate};
use super::devices::{NewDevice, insert_device};
use super::schema::enrollment_requests as er;
use super::{Audited, Store, StoreError, from_json, to_json};
use diesel::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Where an enrollment request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnrollmentState {
    /// Waiting for a decision.
    Pending,
    /// Approved: the device exists.
    Approved,
    /// Denied.
    Denied,
}

impl EnrollmentState {
    /// `pending`, `approved` or `denied`.
    pub fn as_str(self) -> &'static str {
        match self {
            EnrollmentState::Pending => "pending",
            EnrollmentState::Approved => "approved",
            EnrollmentState::Denied => "denied",
        }
    }

    fn parse(text: &str) -> Result<Self, StoreError> {
        match text {
            "pending" => Ok(EnrollmentState::Pending),
            "approved" => Ok(EnrollmentState::Approved),
            "denied" => Ok(EnrollmentState::Denied),
            other => Err(StoreError::Corrupt {
                what: "enrollment state",
                detail: format!("unknown state {other:?}"),
            }),
        }
    }
}

/// Facts an agent reported about its host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemInfo {
    /// The host name.
    pub hostname: String,
    /// The OS family, as the agent was built for (`linux`).
    pub os: String,
    /// The CPU architecture.
    pub arch: String,
    /// The agent's version.
    pub agent_version: String,
    /// Changes at every boot.
    pub boot_id: String,
}

/// An enrollment request as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct EnrollmentRecord {
    /// The device name asked for (unique among requests).
    pub name: String,
    /// SHA-256 (hex) of the key in the CSR.
    pub key_fingerprint: String,
    /// The CSR (PEM).
    pub csr_pem: String,
    /// The labels asked for.
    pub labels: BTreeMap<String, String>,
    /// What the agent said about its host.
    pub system_info: SystemInfo,
    /// Where it stands.
    pub state: EnrollmentState,
    /// Why it was denied.
    pub reason: Option<String>,
    /// The device's id, once approved.
    pub device_id: Option<String>,
    /// Serial of the device's first certificate, once approved.
    pub certificate_serial: Option<String>,
    /// When it was submitted, Unix milliseconds.
    pub created_ms: i64,
    /// When it was decided, Unix milliseconds.
    pub decided_ms: Option<i64>,
    /// Who decided.
    pub decided_by: Option<String>,
    /// Set when the key was proven to live in a genuine TPM: its endorsement key's fingerprint.
    pub tpm_ek_fingerprint: Option<String>,
    /// Other requests and devices attested by the same endorsement key (filled in by the control
    /// plane, not stored).
    pub same_tpm_as: Vec<String>,
    /// The enrollment credential the request came with ('' before credentials were recorded).
    pub credential: String,
    /// The address the request came from (`203.0.113.7:51234`).
    pub source_address: String,
}

/// An enrollment request to store.
#[derive(Debug, Clone)]
pub struct NewEnrollment {
    /// The device name asked for.
    pub name: String,
    /// SHA-256 (hex) of the key in the CSR.
    pub key_fingerprint: String,
    /// The CSR (PEM).
    pub csr_pem: String,
    /// The labels asked for.
    pub labels: BTreeMap<String, String>,
    /// What the agent said about its host.
    pub system_info: SystemInfo,
    /// When it was submitted, Unix milliseconds.
    pub created_ms: i64,
    /// SHA-256 (hex) of the TPM's endorsement key, when evidence came with it.
    pub tpm_ek_fingerprint: Option<String>,
    /// The enrollment credential it came with.
    pub credential: String,
    /// Where it came from (the TCP peer).
    pub source_address: String,
}

#[derive(Queryable, Selectable, Insertable)]
#[diesel(table_name = er)]
struct EnrollmentRow {
    name: String,
    key_fingerprint: String,
    csr_pem: String,
    labels: String,
    system_info: String,
    state: String,
    reason: Option<String>,
    device_id: Option<String>,
    certificate_serial: Option<String>,
    created_ms: i64,
    decided_ms: Option<i64>,
    decided_by: Option<String>,
    tpm_ek_fingerprint: Option<String>,
    credential: String,
    source_address: String,
}

impl EnrollmentRow {
    fn into_record(self) -> Result<EnrollmentRecord, StoreError> {
        Ok(EnrollmentRecord {
            labels: from_json("enrollment labels", &self.labels)?,
            system_info: from_json("enrollment system info", &self.system_info)?,
            state: EnrollmentState::parse(&self.state)?,
            name: self.name,
            key_fingerprint: self.key_fingerprint,
            csr_pem: self.csr_pem,
            reason: self.reason,
            device_id: self.device_id,
            certificate_serial: self.certificate_serial,
            created_ms: self.created_ms,
            decided_ms: self.decided_ms,
            decided_by: self.decided_by,
            tpm_ek_fingerprint: self.tpm_ek_fingerprint,
            same_tpm_as: Vec::new(),
            credential: self.credential,
            source_address: self.source_address,
        })
    }
}

fn find(
    conn: &mut super::DbConnection,
    name: &str,
) -> Result<Option<EnrollmentRecord>, StoreError> {
    er::table
        .find(name)
        .select(EnrollmentRow::as_select())
        .first(conn)
        .optional()?
        .map(EnrollmentRow::into_record)
        .transpose()
}

fn not_pending(name: &str) -> StoreError {
    StoreError::Precondition(format!("enrollment request {name:?} is no longer pending"))
}

impl Store {
    /// Records a new request, or returns the existing one for the same name and key (idempotent
    /// re-submission). The same name with a different key is a conflict.
    pub async fn submit_enrollment(
        &self,
        new: NewEnrollment,
    ) -> Result<EnrollmentRecord, StoreError> {
        self.run("submit_enrollment", move |conn| {
            conn.transaction(|conn| {
                if let Some(existing) = find(conn, &new.name)? {
                    if existing.key_fingerprint == new.key_fingerprint {
                        // The same request, now with its TPM proven.
                        if existing.tpm_ek_fingerprint.is_none()
                            && new.tpm_ek_fingerprint.is_some()
                            && existing.state == EnrollmentState::Pending
                        {
                            diesel::update(er::table.find(&new.name))
                                .set(er::tpm_ek_fingerprint.eq(&new.tpm_ek_fingerprint))
                                .execute(conn)?;
                            return find(conn, &new.name)?.ok_or_else(|| not_pending(&new.name));
                        }
                        return Ok(existing);
                    }
                    return Err(StoreError::Conflict(format!(
                        "device name {:?} is already requested by a different key",
                        new.name
                    )));
                }
                let row = EnrollmentRow {
                    name: new.name.clone(),
                    key_fingerprint: new.key_fingerprint,
                    csr_pem: new.csr_pem,
                    labels: to_json(&new.labels),
                    system_info: to_json(&new.system_info),
                    state: EnrollmentState::Pending.as_str().to_string(),
                    reason: None,
                    device_id: None,
                    certificate_serial: None,
                    created_ms: new.created_ms,
                    decided_ms: None,
                    decided_by: None,
                    tpm_ek_fingerprint: new.tpm_ek_fingerprint,
                    credential: new.credential,
                    source_address: new.source_address,
                };
                diesel::insert_into(er::table).values(&row).execute(conn)?;
                row.into_record()
            })
        })
        .await
    }

    /// Deletes a request that did not become a device (pending or denied), so its name can enroll
    /// again; `audit`'s records are appended with it. `None` if there is no such request,
    /// `Precondition` if it was approved (the device is deleted instead).
    pub async fn delete_enrollment(
        &self,
        name: &str,
        audit: Audited,
    ) -> Result<Option<EnrollmentRecord>, StoreError> {
        let name = name.to_string();
        self.run("delete_enrollment", move |conn| {
            conn.transaction(|conn| {
                Audited::begin(conn)?;
                let Some(existing) = find(conn, &name)? else {
                    return Ok(None);
                };
                if existing.state == EnrollmentState::Approved {
                    return Err(StoreError::Precondition(format!(
                        "enrollment request {name:?} was approved; delete the device instead"
                    )));
                }
                diesel::delete(er::table.find(&name)).execute(conn)?;
                audit.commit(conn)?;
                Ok(Some(existing))
            })
        })
        .await
    }

    /// One enrollment request by name.
    pub async fn get_enrollment(&self, name: &str) -> Result<Option<EnrollmentRecord>, StoreError> {
        let name = name.to_string();
        self.run("get_enrollment", move |conn| find(conn, &name))
            .await
    }

    /// Requests in `state` (all when `None`), oldest first.
    pub async fn list_enrollments(
        &self,
        state: Option<EnrollmentState>,
    ) -> Result<Vec<EnrollmentRecord>, StoreError> {
        self.run("list_enrollments", move |conn| {
            let mut query = er::table.select(EnrollmentRow::as_select()).into_boxed();
            if let Some(state) = state {
                query = query.filter(er::state.eq(state.as_str()));
            }
            query
                .order((er::created_ms.asc(), er::name.asc()))
                .load(conn)?
                .into_iter()
                .map(EnrollmentRow::into_record)
                .collect()
        })
        .await
    }

    /// Approves a pending request: marks it approved, creates the device and records its first
    /// certificate, all or nothing.
    pub async fn approve_enrollment(
        &self,
        name: &str,
        device: NewDevice,
        certificate: CertificateRecord,
        decided_by: String,
        audit: Audited,
    ) -> Result<EnrollmentRecord, StoreError> {
        let name = name.to_string();
        self.run("approve_enrollment", move |conn| {
            conn.transaction(|conn| {
                Audited::begin(conn)?;
                let changed = diesel::update(
                    er::table
                        .find(&name)
                        .filter(er::state.eq(EnrollmentState::Pending.as_str())),
                )
                .set((
                    er::state.eq(EnrollmentState::Approved.as_str()),
                    er::labels.eq(to_json(&device.labels)),
                    er::device_id.eq(&device.id),
                    er::certificate_serial.eq(&certificate.serial),
                    er::decided_ms.eq(device.created_ms),
                    er::decided_by.eq(&decided_by),
                ))
                .execute(conn)?;
                if changed == 0 {
                    return Err(not_pending(&name));
                }
                insert_device(conn, &device)?;
                insert_certificate(conn, &certificate)?;
                audit.commit(conn)?;
                find(conn, &name)?.ok_or_else(|| not_pending(&name))
            })
        })
        .await
    }

    /// Denies a pending request.
    pub async fn deny_enrollment(
        &self,
        name: &str,
        reason: String,
        decided_by: String,
        now_ms: i64,
        audit: Audited,
    ) -> Result<EnrollmentRecord, StoreError> {
        let name = name.to_string();
        self.run("deny_enrollment", move |conn| {
            conn.transaction(|conn| {
                Audited::begin(conn)?;
                let changed = diesel::update(
                    er::table
                        .find(&name)
                        .filter(er::state.eq(EnrollmentState::Pending.as_str())),
                )
                .set((
                    er::state.eq(EnrollmentState::Denied.as_str()),
                    er::reason.eq(reason),
                    er::decided_ms.eq(now_ms),
                    er::decided_by.eq(decided_by),
                ))
                .execute(conn)?;
                if changed == 0 {
                    return Err(not_pending(&name));
                }
                audit.commit(conn)?;
                find(conn, &name)?.ok_or_else(|| not_pending(&name))
            })
        })
        .await
    }
}

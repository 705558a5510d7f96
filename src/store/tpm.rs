//! TPM attestation state: one-time credential challenges (taken exactly once, so a replayed
//! answer finds nothing), and which requests and devices share an endorsement key.

use super::schema::{devices, enrollment_requests as er, tpm_challenges as tc};
use super::{Store, StoreError};
use diesel::prelude::*;

/// A challenge issued for an enrollment request's TPM evidence.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = tc)]
pub struct TpmChallengeRecord {
    /// The challenge's id.
    pub id: String,
    /// The enrollment request (device name) and key it was issued for.
    pub name: String,
    /// SHA-256 (hex) of the device key.
    pub key_fingerprint: String,
    /// SHA-256 (hex) of the endorsement key.
    pub ek_fingerprint: String,
    /// SHA-256 (hex) of the secret; the secret itself is never stored.
    pub secret_digest: String,
    /// When it stops being accepted, Unix milliseconds.
    pub expires_ms: i64,
    /// When it was issued, Unix milliseconds.
    pub created_ms: i64,
}

impl Store {
    /// Records a challenge, dropping expired ones on the way.
    pub async fn put_tpm_challenge(&self, challenge: TpmChallengeRecord) -> Result<(), StoreError> {
        self.run("put_tpm_challenge", move |conn| {
            diesel::delete(tc::table.filter(tc::expires_ms.lt(challenge.created_ms)))
                .execute(conn)?;
            diesel::insert_into(tc::table)
                .values(&challenge)
                .execute(conn)?;
            Ok(())
        })
        .await
    }

    /// Removes and returns a challenge: each can be answered once, right or wrong.
    pub async fn take_tpm_challenge(
        &self,
        id: &str,
    ) -> Result<Option<TpmChallengeRecord>, StoreError> {
        let id = id.to_string();
        self.run("take_tpm_challenge", move |conn| {
            conn.transaction(|conn| {
                let found = tc::table
                    .find(&id)
                    .select(TpmChallengeRecord::as_select())
                    .first(conn)
                    .optional()?;
                if found.is_some() {
                    diesel::delete(tc::table.find(&id)).execute(conn)?;
                }
                Ok(found)
            })
        })
        .await
    }

    /// Names of enrollment requests and devices, other than `name`, whose key was attested by the
    /// same endorsement key.
    pub async fn names_with_tpm(
        &self,
        ek_fingerprint: &str,
        name: &str,
    ) -> Result<Vec<String>, StoreError> {
        let (ek, name) = (ek_fingerprint.to_string(), name.to_string());
        self.run("names_with_tpm", move |conn| {
            let mut names: Vec<String> = er::table
                .filter(er::tpm_ek_fingerprint.eq(&ek))
                .filter(er::name.ne(&name))
                .select(er::name)
                .load(conn)?;
            names.extend(
                devices::table
                    .filter(devices::tpm_ek_fingerprint.eq(&ek))
                    .filter(devices::name.ne(&name))
                    .select(devices::name)
                    .load::<String>(conn)?,
            );
            names.sort();
            names.dedup();
            Ok(names)
        })
        .await
    }
}

//! Certificates issued to devices: every one is kept, so a serial can always be traced to its device.

use super::schema::certificates;
use super::{Store, StoreError};
use diesel::prelude::*;

#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = certificates)]
pub struct CertificateRecord {
    pub serial: String,
    pub device_id: String,
    pub key_fingerprint: String,
    pub fingerprint: String,
    pub certificate_pem: String,
    pub not_before_ms: i64,
    pub not_after_ms: i64,
    pub issued_ms: i64,
    pub revoked_ms: Option<i64>,
    pub revocation_reason: Option<String>,
}

pub(super) fn insert_certificate(
    conn: &mut super::DbConnection,
    certificate: &CertificateRecord,
) -> Result<(), StoreError> {
    diesel::insert_into(certificates::table)
        .values(certificate)
        .execute(conn)?;
    Ok(())
}

impl Store {
    pub async fn get_certificate(
        &self,
        serial: &str,
    ) -> Result<Option<CertificateRecord>, StoreError> {
        let serial = serial.to_string();
        self.run(move |conn| {
            Ok(certificates::table
                .find(serial)
                .select(CertificateRecord::as_select())
                .first(conn)
                .optional()?)
        })
        .await
    }
}

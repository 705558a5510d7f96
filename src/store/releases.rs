//! Agent releases and the bytes of stored artifacts (1 MiB a row, so neither publishing nor
//! reading holds a whole artifact in memory). A release and its bytes are written in one
//! transaction with the call's audit record.

use super::schema::{agent_releases, artifact_chunks};
use super::{Audited, DbConnection, Store, StoreError};
use diesel::prelude::*;
use std::io::{Read, Write};
use std::path::PathBuf;

/// Bytes per stored row.
const CHUNK_ROW_BYTES: usize = 1024 * 1024;

/// A published release as stored; `signature` is hex.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = agent_releases)]
pub struct ReleaseRecord {
    /// The agent version.
    pub version: String,
    /// SHA-256 (hex) of the binary.
    pub sha256: String,
    /// Its size, bytes.
    pub size: i64,
    /// The release key's signature.
    pub signature: String,
    /// The external download URL ("" for none).
    pub url: String,
    /// Fingerprint of the key that signed, when known.
    pub key_fingerprint: String,
    /// When it was published, Unix milliseconds.
    pub published_ms: i64,
    /// Who published it.
    pub published_by: String,
}

fn io_error(what: &str, error: std::io::Error) -> StoreError {
    StoreError::Corrupt {
        what: "artifact file",
        detail: format!("{what}: {error}"),
    }
}

fn find(conn: &mut DbConnection, version: &str) -> Result<Option<ReleaseRecord>, StoreError> {
    Ok(agent_releases::table
        .find(version)
        .select(ReleaseRecord::as_select())
        .first(conn)
        .optional()?)
}

fn find_by_digest(
    conn: &mut DbConnection,
    sha256: &str,
) -> Result<Option<ReleaseRecord>, StoreError> {
    Ok(agent_releases::table
        .filter(agent_releases::sha256.eq(sha256))
        .select(ReleaseRecord::as_select())
        .first(conn)
        .optional()?)
}

/// Stores the file's bytes as rows of `sha256`, unless they are stored already.
fn store_chunks(conn: &mut DbConnection, sha256: &str, path: &PathBuf) -> Result<(), StoreError> {
    let stored: i64 = artifact_chunks::table
        .filter(artifact_chunks::sha256.eq(sha256))
        .count()
        .get_result(conn)?;
    if stored > 0 {
        return Ok(());
    }
    let mut file = std::fs::File::open(path).map_err(|e| io_error("opening the upload", e))?;
    let mut buffer = vec![0; CHUNK_ROW_BYTES];
    for seq in 0.. {
        let mut filled = 0;
        while filled < buffer.len() {
            let n = file
                .read(&mut buffer[filled..])
                .map_err(|e| io_error("reading the upload", e))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        diesel::insert_into(artifact_chunks::table)
            .values((
                artifact_chunks::sha256.eq(sha256),
                artifact_chunks::seq.eq(seq),
                artifact_chunks::data.eq(&buffer[..filled]),
            ))
            .execute(conn)?;
    }
    Ok(())
}

impl Store {
    /// Stores a release (and the bytes at `artifact`, if any). The same release again returns
    /// the stored one and writes nothing; another build under the version, or the build under
    /// another version, is a conflict.
    pub async fn publish_release(
        &self,
        record: ReleaseRecord,
        artifact: Option<PathBuf>,
        audit: Audited,
    ) -> Result<ReleaseRecord, StoreError> {
        self.run("publish_release", move |conn| {
            conn.transaction(|conn| {
                Audited::begin(conn)?;
                if let Some(existing) = find(conn, &record.version)? {
                    if existing.sha256 == record.sha256
                        && existing.signature == record.signature
                        && existing.url == record.url
                    {
                        return Ok(existing);
                    }
                    return Err(StoreError::Conflict(format!(
                        "agent release {} is published already with other content (SHA-256 {}); delete it first",
                        existing.version, existing.sha256
                    )));
                }
                if let Some(other) = find_by_digest(conn, &record.sha256)? {
                    return Err(StoreError::Conflict(format!(
                        "this build (SHA-256 {}) is published already as version {}",
                        other.sha256, other.version
                    )));
                }
                if let Some(path) = &artifact {
                    store_chunks(conn, &record.sha256, path)?;
                }
                diesel::insert_into(agent_releases::table)
                    .values(&record)
                    .execute(conn)?;
                audit.commit(conn)?;
                Ok(record)
            })
        })
        .await
    }

    /// One release by version.
    pub async fn release(&self, version: &str) -> Result<Option<ReleaseRecord>, StoreError> {
        let version = version.to_string();
        self.run("release", move |conn| find(conn, &version)).await
    }

    /// The release whose binary has this SHA-256.
    pub async fn release_by_digest(
        &self,
        sha256: &str,
    ) -> Result<Option<ReleaseRecord>, StoreError> {
        let sha256 = sha256.to_string();
        self.run("release_by_digest", move |conn| {
            find_by_digest(conn, &sha256)
        })
        .await
    }

    /// Every release, newest first.
    pub async fn list_releases(&self) -> Result<Vec<ReleaseRecord>, StoreError> {
        self.run("list_releases", |conn| {
            Ok(agent_releases::table
                .order((
                    agent_releases::published_ms.desc(),
                    agent_releases::version.asc(),
                ))
                .select(ReleaseRecord::as_select())
                .load(conn)?)
        })
        .await
    }

    /// Deletes a release and its bytes; the deleted release, or `None` if there was none.
    pub async fn delete_release(
        &self,
        version: &str,
        audit: Audited,
    ) -> Result<Option<ReleaseRecord>, StoreError> {
        let version = version.to_string();
        self.run("delete_release", move |conn| {
            conn.transaction(|conn| {
                Audited::begin(conn)?;
                let Some(existing) = find(conn, &version)? else {
                    return Ok(None);
                };
                diesel::delete(agent_releases::table.find(&version)).execute(conn)?;
                diesel::delete(
                    artifact_chunks::table.filter(artifact_chunks::sha256.eq(&existing.sha256)),
                )
                .execute(conn)?;
                audit.commit(conn)?;
                Ok(Some(existing))
            })
        })
        .await
    }

    /// Writes the stored bytes of `sha256` to `path`, a row at a time.
    pub async fn read_artifact(&self, sha256: &str, path: PathBuf) -> Result<u64, StoreError> {
        let sha256 = sha256.to_string();
        self.run("read_artifact", move |conn| {
            let mut file =
                std::fs::File::create(&path).map_err(|e| io_error("creating the cache file", e))?;
            let mut written = 0;
            for seq in 0.. {
                let row: Option<Vec<u8>> = artifact_chunks::table
                    .find((&sha256, seq))
                    .select(artifact_chunks::data)
                    .first(conn)
                    .optional()?;
                let Some(data) = row else { break };
                file.write_all(&data)
                    .map_err(|e| io_error("writing the cache file", e))?;
                written += data.len() as u64;
            }
            file.sync_all()
                .map_err(|e| io_error("syncing the cache file", e))?;
            Ok(written)
        })
        .await
    }
}

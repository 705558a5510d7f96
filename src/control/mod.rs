//! The control plane's use cases: enrollment, devices and device sessions. It ties the store (what
//! is persisted), the hub (who is connected, what they run) and the CA (what they may prove)
//! together. Transport-agnostic: the gRPC services translate to and from it.

mod actions;
mod admission;
mod catalog;
mod certs;
mod credentials;
mod devices;
mod enrollment;
mod fleets;
mod issuance;
mod journal;
mod limits;
mod messages;
mod metrics;
mod releases;
mod replication;
mod rollouts;
mod scope;
mod session;
mod watch;

pub use actions::{Actor, CallRefusal, call_kind};
pub use admission::{AdmissionSettings, OpeningPermit};
pub use certs::{CertificateView, RecoverInput, RecoveryChallenge, RenewalRequested};
pub use credentials::{
    BOOTSTRAP_ADMIN, CredentialView, DEFAULT_CREDENTIAL_VALIDITY, IssuedCredential,
    MAX_CREDENTIAL_VALIDITY, NewCredential,
};
pub use devices::{DeviceUpdate, DeviceView, LabelChange, MAX_PAGE, Page};
pub use enrollment::{EnrollInput, EnrollOutcome, IssuedChallenge, TpmProof};
pub use fleets::{FleetApply, FleetView};
pub use limits::RateLimit;
pub use messages::{CertificateRejected, CertificateRequest, Directive, Hello, SessionEvent};
pub use releases::{CHUNK_BYTES, Download, ReleaseHeader, ReleasePolicy, ReleaseView, Upload};
pub use rollouts::{RolloutCommand, RolloutView};
pub use session::{Outbound, SessionSettings};
pub use watch::{DeviceEvent, DeviceWatch};

use crate::ca::CertificateAuthority;
use crate::ca::audit_key::AuditKey;
use crate::hub::{Debounce, Hub, RemoteSession, Seed};
use crate::render::CompiledTemplate;
use crate::revocation::RevokedSerials;
use crate::selector::Selector;
use crate::store::{FleetRecord, Store, StoreError};
use admission::Admission;
use catalog::{Catalog, FleetEntry};
use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

/// Tunables of the control plane.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Lifetime of device management certificates.
    pub device_cert_validity: Duration,
    /// How long before expiry a certificate is renewed (each certificate a little earlier, by a
    /// jitter of up to a fifth of this, so devices enrolled together do not renew together).
    pub renew_before: Duration,
    /// How long after expiry a device may still recover with its previous key.
    pub recovery_window: Duration,
    /// Suggested interval between agent heartbeats while polling enrollment.
    pub enrollment_poll_interval: Duration,
    /// Timing of sessions.
    pub session: SessionSettings,
    /// How spec changes are coalesced into waves of pushes.
    pub debounce: Debounce,
    /// Limits on new and open sessions.
    pub admission: AdmissionSettings,
    /// TPM attestation at enrollment.
    pub tpm: TpmPolicy,
    /// Certificates one device may be issued (renewals, recoveries) per window.
    pub issuance_limit: RateLimit,
    /// Recovery attempts per device per window.
    pub recovery_limit: RateLimit,
    /// Renewals this replica lets run at once (asked, and not yet back on the new certificate);
    /// the rest wait their turn.
    pub renewal_slots: usize,
    /// Enrollment requests that may wait for a decision at once; new ones beyond it are refused
    /// (the shared enrollment credential cannot fill the database).
    pub max_pending_enrollments: usize,
    /// How often the leader signs and keeps the audit chain's head (when it moved).
    pub audit_head_interval: Duration,
    /// How agent releases are stored and served.
    pub releases: ReleasePolicy,
}

/// What the control plane trusts of TPM evidence.
#[derive(Debug, Clone, Default)]
pub struct TpmPolicy {
    /// TPM manufacturer CA certificates (DER) that endorsement key certificates must chain to;
    /// empty turns TPM attestation off (evidence is refused).
    pub trusted_cas: Vec<Vec<u8>>,
    /// Approve a request at once when its TPM evidence and challenge check out and no other
    /// request or device has the same endorsement key.
    pub auto_approve: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            device_cert_validity: Duration::from_secs(365 * 24 * 3600),
            renew_before: Duration::from_secs(30 * 24 * 3600),
            recovery_window: Duration::from_secs(90 * 24 * 3600),
            enrollment_poll_interval: Duration::from_secs(2),
            session: SessionSettings::default(),
            debounce: Debounce::default(),
            admission: AdmissionSettings::default(),
            tpm: TpmPolicy::default(),
            issuance_limit: RateLimit {
                max: 5,
                window: Duration::from_secs(600),
            },
            recovery_limit: RateLimit {
                max: 10,
                window: Duration::from_secs(600),
            },
            renewal_slots: crate::hub::DEFAULT_RENEWAL_SLOTS,
            max_pending_enrollments: 1000,
            audit_head_interval: actions::HEAD_INTERVAL,
            releases: ReleasePolicy::default(),
        }
    }
}

/// Why a use case refused or failed; `transport::status` maps each to a gRPC code.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    /// A field of the request is wrong.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The field, as the API names it.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No such thing.
    #[error("{0}")]
    NotFound(String),
    /// It exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// Not possible in the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The caller's credential is no longer accepted (revoked or superseded).
    #[error("{0}")]
    Unauthenticated(String),
    /// Not possible right now (loading, shutting down); retry.
    #[error("{0}")]
    Unavailable(String),
    /// Admission control turned the request away; the caller should retry after `retry_after`.
    #[error("{message}")]
    Overloaded {
        /// What to tell the caller.
        message: String,
        /// When to come back.
        retry_after: Duration,
    },
    /// The database could not be reached; the detail is logged, never shown to clients.
    #[error("database unavailable: {0}")]
    DatabaseUnavailable(String),
    /// A fault of the control plane; the detail is logged, never shown to clients.
    #[error("{0}")]
    Internal(String),
}

impl ControlError {
    /// An `InvalidArgument` of `field`.
    pub fn invalid(field: impl Into<String>, reason: impl ToString) -> Self {
        ControlError::InvalidArgument {
            field: field.into(),
            reason: reason.to_string(),
        }
    }
}

impl From<StoreError> for ControlError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable(e) => ControlError::DatabaseUnavailable(e),
            StoreError::Conflict(e) => ControlError::AlreadyExists(e),
            StoreError::Precondition(e) => ControlError::FailedPrecondition(e),
            other => ControlError::Internal(other.to_string()),
        }
    }
}

/// The control plane. Cheap to clone.
#[derive(Clone)]
pub struct ControlPlane {
    store: Store,
    ca: Arc<CertificateAuthority>,
    audit_key: Arc<AuditKey>,
    hub: Arc<Hub>,
    policy: Arc<Policy>,
    catalog: Arc<RwLock<Catalog>>,
    revoked: Arc<RevokedSerials>,
    /// The admin-API credentials the auth layer admits.
    credentials: Arc<crate::credentials::Registry>,
    challenges: Arc<certs::Challenges>,
    issuance_limiter: Arc<limits::Limiter>,
    recovery_limiter: Arc<limits::Limiter>,
    /// Devices that hold a renewed certificate beside their newest one, until the newest is used.
    spares: Arc<Mutex<HashSet<String>>>,
    /// Serialises audit appends, so records chain in the order they are written.
    audit_lock: Arc<tokio::sync::Mutex<()>>,
    enrollment_counts: Arc<metrics::EnrollmentCounts>,
    open_rollouts: Arc<rollouts::OpenRollouts>,
    rollout_changed: Arc<tokio::sync::Notify>,
    shutting_down: Arc<std::sync::atomic::AtomicBool>,
    /// Flips to true when shutdown begins, for the streams (watches) that end then.
    shutdown: tokio::sync::watch::Sender<bool>,
    admission: Arc<Admission>,
    journal: journal::Journal,
    issuances: issuance::Issuances,
    /// The background writers, until `start_writers` starts them.
    writers: Arc<std::sync::Mutex<Option<(journal::JournalWriter, issuance::IssuanceWriter)>>>,
    /// Serialises the use cases that change placement or rendering (fleet and device writes,
    /// approvals), so each computes its plan from the state the previous one left.
    writes: Arc<tokio::sync::Mutex<()>>,
    /// The last change-feed row applied (or seen at load); the feed is read after it.
    feed_position: Arc<std::sync::atomic::AtomicI64>,
    /// How old the last applied feed row was when applied (0 once caught up), milliseconds.
    feed_lag_ms: Arc<std::sync::atomic::AtomicI64>,
    /// Whether this replica drives rollouts (always on SQLite; the lock holder on PostgreSQL).
    leading: Arc<std::sync::atomic::AtomicBool>,
    housekeeping: Arc<Mutex<replication::Housekeeping>>,
    /// Agent release artifacts this replica serves.
    artifacts: Arc<releases::Artifacts>,
    /// When this control plane was created (Unix milliseconds).
    started_ms: i64,
}

/// Which build and replica answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    /// The build's version.
    pub version: &'static str,
    /// This replica's name.
    pub replica: String,
    /// `sqlite` or `postgres`.
    pub database: &'static str,
    /// Whether this replica drives rollouts.
    pub leading: bool,
    /// When it started, Unix milliseconds.
    pub started_ms: i64,
}

impl ControlPlane {
    /// A control plane over `store`, signing with `ca`, pushing through `hub`; nothing is loaded until `load`.
    pub fn new(
        store: Store,
        ca: Arc<CertificateAuthority>,
        audit_key: Arc<AuditKey>,
        hub: Arc<Hub>,
        policy: Policy,
    ) -> Self {
        let (journal, journal_writer) = journal::journal();
        let (issuances, issuance_writer) = issuance::issuances();
        let started_ms = hub.clock().now_millis();
        hub.set_renewal_slots(policy.renewal_slots);
        ControlPlane {
            journal,
            issuances,
            writers: Arc::new(std::sync::Mutex::new(Some((
                journal_writer,
                issuance_writer,
            )))),
            store,
            ca,
            audit_key,
            hub,
            admission: Arc::new(Admission::new(policy.admission.clone())),
            artifacts: Arc::new(releases::Artifacts::new(&policy.releases)),
            started_ms,
            issuance_limiter: Arc::new(limits::Limiter::new(policy.issuance_limit)),
            recovery_limiter: Arc::new(limits::Limiter::new(policy.recovery_limit)),
            spares: Arc::default(),
            policy: Arc::new(policy),
            catalog: Arc::default(),
            revoked: Arc::default(),
            credentials: Arc::default(),
            challenges: Arc::default(),
            audit_lock: Arc::default(),
            enrollment_counts: Arc::default(),
            open_rollouts: Arc::default(),
            rollout_changed: Arc::default(),
            shutting_down: Arc::default(),
            shutdown: tokio::sync::watch::Sender::new(false),
            writes: Arc::default(),
            feed_position: Arc::default(),
            feed_lag_ms: Arc::default(),
            leading: Arc::default(),
            housekeeping: Arc::default(),
        }
    }

    /// The time, from the hub's clock (the system's, or a test's virtual one).
    pub fn now_millis(&self) -> i64 {
        self.hub.clock().now_millis()
    }

    /// The clock the control plane reads, shared with its hub.
    pub fn clock(&self) -> &crate::clock::Clock {
        self.hub.clock()
    }

    /// Which build and replica this is.
    pub fn server_info(&self) -> ServerInfo {
        ServerInfo {
            version: crate::VERSION,
            replica: self.store.replica().to_string(),
            database: self.store.backend().name(),
            leading: self.leading.load(std::sync::atomic::Ordering::Acquire),
            started_ms: self.started_ms,
        }
    }

    /// The CA that signs device, credential and server certificates.
    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    /// The CA certificate (PEM) that signs device and server certificates.
    pub fn ca_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// Marks the control plane as shutting down (readiness turns false).
    pub fn begin_shutdown(&self) {
        self.shutting_down
            .store(true, std::sync::atomic::Ordering::Release);
        self.shutdown.send_replace(true);
    }

    /// Resolves once shutdown has begun: open watches end then, saying why, instead of being cut
    /// when the connections drain.
    pub async fn shutdown_begun(&self) {
        let mut shutdown = self.shutdown.subscribe();
        let _ = shutdown.wait_for(|begun| *begun).await;
    }

    /// The state is loaded and requests are served.
    pub fn is_loaded(&self) -> bool {
        self.revoked.is_loaded()
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Starts the background writers (device bookkeeping, certificate issuances) once.
    fn start_writers(&self) {
        let writers = self
            .writers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some((journal, issuances)) = writers {
            tokio::spawn(journal.run(self.store.clone()));
            tokio::spawn(issuances.run(
                self.store.clone(),
                self.audit_key.clone(),
                self.audit_lock.clone(),
            ));
        }
    }

    /// Waits until device bookkeeping recorded so far is in the database.
    pub async fn flush_journal(&self) {
        self.journal.flush().await;
    }

    /// Lets one more session start opening, or says when to retry.
    pub fn admit_session(&self) -> Result<OpeningPermit, ControlError> {
        self.admission.admit(|| self.hub.connected())
    }

    /// Serials refused on every connection.
    pub fn revoked(&self) -> &Arc<RevokedSerials> {
        &self.revoked
    }

    /// The credentials admitted to the admin API.
    pub fn credentials(&self) -> &Arc<crate::credentials::Registry> {
        &self.credentials
    }

    fn catalog(&self) -> RwLockReadGuard<'_, Catalog> {
        // Catalog updates are plain assignments; a panic cannot leave one half-done.
        self.catalog.read().unwrap_or_else(|p| p.into_inner())
    }

    fn spares(&self) -> MutexGuard<'_, HashSet<String>> {
        self.spares.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn catalog_mut(&self) -> RwLockWriteGuard<'_, Catalog> {
        self.catalog.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The hub of device state.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The tunables.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Loads fleets and devices, settles ownership, renders every device and opens the hub;
    /// until this has run, sessions are refused.
    pub async fn load(&self) -> Result<usize, ControlError> {
        let _writes = self.writes.lock().await;
        self.start_writers();
        // The feed position before anything is read: a change committed while loading is applied
        // again afterwards (harmlessly), never missed.
        if self.store.has_change_feed() {
            let position = self.store.latest_change_id().await?;
            self.feed_position
                .store(position, std::sync::atomic::Ordering::Release);
        }
        // Revocations first: nothing below may hand out a session before they are known.
        self.revoked.extend(self.store.revoked_serials().await?);
        self.load_credentials().await?;
        let spares = self.store.devices_with_spare_certificates().await?;
        self.spares().extend(spares);
        let fleets = self
            .store
            .list_fleets()
            .await?
            .into_iter()
            .map(fleet_entry)
            .collect::<Result<Vec<_>, _>>()?;
        let devices = self.store.list_devices().await?;
        let count = devices.len();
        let fleets = self
            .compile_pinned(fleets, &revisions_held(devices.iter().map(owner_of)))
            .await?;
        let mut catalog = Catalog::new(fleets, devices);
        let changes = catalog.plan_all();
        if !changes.is_empty() {
            tracing::info!(
                devices = changes.len(),
                "fleet membership changed while stopped"
            );
            self.store.set_device_owners(changes.clone()).await?;
        }
        catalog.apply_owners(&changes);
        let ids: Vec<String> = catalog.devices().map(|d| d.id.clone()).collect();
        let mut reports = self.store.device_reports().await?;
        let seeds = ids
            .into_iter()
            .filter_map(|id| {
                let desired = catalog.render(&id)?;
                let device = catalog.device(&id)?;
                Some(Seed {
                    report: reports.remove(&id),
                    device_id: id,
                    desired,
                    acked_version: device.acked_version.clone(),
                    nacked: device.nacked.clone(),
                    last_seen_ms: device.last_seen_ms,
                })
            })
            .collect();
        let certificates: Vec<(String, String, i64)> = catalog
            .devices()
            .filter_map(|d| Some((d.id.clone(), d.cert_serial.clone()?, d.cert_not_after_ms?)))
            .collect();
        // Sessions other replicas hold (PostgreSQL): those devices are online there.
        let shared = self.store.has_change_feed();
        let elsewhere: Vec<_> = catalog
            .devices()
            .filter(|_| shared)
            .filter_map(|d| {
                let holder = d.session_replica.clone()?;
                (holder != self.store.replica()).then(|| RemoteSession {
                    device_id: d.id.clone(),
                    holder: Some(holder),
                    acked_version: d.acked_version.clone(),
                    nacked: d.nacked.clone(),
                })
            })
            .collect();
        *self.catalog_mut() = catalog;
        self.hub.load(seeds);
        self.hub.note_remotes(elsewhere);
        for (device_id, serial, not_after_ms) in certificates {
            self.track_certificate(&device_id, &serial, not_after_ms);
        }
        self.count_enrollments().await?;
        for rollout in self.store.list_open_rollouts().await? {
            self.open_rollouts.set(rollout);
        }
        // Only now does the authentication layer let requests through.
        self.revoked.mark_loaded();
        Ok(count)
    }

    /// Compiles the older revisions devices are held at by rollouts.
    async fn compile_pinned(
        &self,
        mut fleets: Vec<FleetEntry>,
        held_at: &BTreeSet<(String, i64)>,
    ) -> Result<Vec<FleetEntry>, ControlError> {
        for fleet in &mut fleets {
            let wanted: BTreeSet<i64> = held_at
                .iter()
                .filter(|(name, revision)| {
                    *name == fleet.record.name && *revision != fleet.record.revision
                })
                .map(|(_, revision)| *revision)
                .collect();
            if wanted.is_empty() {
                continue;
            }
            for revision in self.store.list_fleet_revisions(&fleet.record.name).await? {
                if wanted.contains(&revision.revision) {
                    let compiled = CompiledTemplate::compile(
                        &fleet.record.name,
                        &revision.template,
                        fleet.record.label_defaults.clone(),
                    )
                    .map_err(|e| ControlError::Internal(format!("stored fleet revision: {e}")))?;
                    fleet.pinned.insert(revision.revision, Arc::new(compiled));
                }
            }
        }
        Ok(fleets)
    }
}

/// The fleet revisions devices are held at, from each device's (fleet, revision): one entry per
/// pair, however many devices share it, so a fleet's older revisions are compiled once each.
fn revisions_held<'a>(
    owners: impl IntoIterator<Item = (Option<&'a str>, Option<i64>)>,
) -> BTreeSet<(String, i64)> {
    let held: BTreeSet<(&str, i64)> = owners
        .into_iter()
        .filter_map(|(fleet, revision)| Some((fleet?, revision?)))
        .collect();
    held.into_iter()
        .map(|(fleet, revision)| (fleet.to_string(), revision))
        .collect()
}

/// A device's (fleet, revision), as `revisions_held` reads them.
fn owner_of(device: &crate::store::DeviceRecord) -> (Option<&str>, Option<i64>) {
    (device.fleet.as_deref(), device.fleet_revision)
}

/// Parses and compiles a stored fleet. Stored fleets were validated when applied, so a failure
/// here means the database was changed behind the control plane's back.
fn fleet_entry(record: FleetRecord) -> Result<FleetEntry, ControlError> {
    let selector = Selector::parse(&record.selector)
        .map_err(|e| ControlError::Internal(format!("stored fleet {:?}: {e}", record.name)))?;
    let template = CompiledTemplate::compile(
        &record.name,
        &record.template,
        record.label_defaults.clone(),
    )
    .map_err(|e| ControlError::Internal(format!("stored fleet {:?}: {e}", record.name)))?;
    Ok(FleetEntry {
        record,
        selector,
        template: Arc::new(template),
        pinned: Default::default(),
    })
}

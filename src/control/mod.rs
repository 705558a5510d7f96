//! The control plane's use cases: enrollment, devices and device sessions. It ties the store (what
//! is persisted), the hub (who is connected, what they run) and the CA (what they may prove)
//! together. Transport-agnostic: the gRPC services translate to and from it.

mod devices;
mod enrollment;
mod session;

pub use devices::{DeviceUpdate, DeviceView};
pub use enrollment::{EnrollInput, EnrollOutcome};
pub use session::SessionSettings;

use crate::ca::CertificateAuthority;
use crate::hub::{Hub, Rendered, Seed};
use crate::store::{Store, StoreError};
use std::sync::Arc;
use std::time::Duration;

/// Tunables of the control plane.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Lifetime of device management certificates.
    pub device_cert_validity: Duration,
    /// Suggested interval between agent heartbeats while polling enrollment.
    pub enrollment_poll_interval: Duration,
    pub session: SessionSettings,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            device_cert_validity: Duration::from_secs(365 * 24 * 3600),
            enrollment_poll_interval: Duration::from_secs(2),
            session: SessionSettings::default(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ControlError {
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
            StoreError::Unavailable(e) => {
                ControlError::Unavailable(format!("database unavailable: {e}"))
            }
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
    hub: Arc<Hub>,
    policy: Arc<Policy>,
}

impl ControlPlane {
    pub fn new(store: Store, ca: Arc<CertificateAuthority>, hub: Arc<Hub>, policy: Policy) -> Self {
        ControlPlane {
            store,
            ca,
            hub,
            policy: Arc::new(policy),
        }
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Loads every device into the hub; until this has run, sessions are refused.
    pub async fn load(&self) -> Result<usize, ControlError> {
        let devices = self.store.list_devices().await?;
        let count = devices.len();
        let seeds = devices
            .into_iter()
            .map(|d| Seed {
                desired: Rendered::new(d.spec),
                device_id: d.id,
                acked_version: d.acked_version,
                nacked: d.nacked,
                last_seen_ms: d.last_seen_ms,
            })
            .collect();
        self.hub.load(seeds);
        Ok(count)
    }
}

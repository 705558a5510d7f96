//! Flotilla: a gRPC control plane for fleets of Linux edge devices.
//!
//! The modules outside the `server` feature are shared with the agent and `flotctl` (the gRPC contract,
//! identities, the device spec, TLS client set-up); everything that only the control plane needs —
//! the store, the CA, the hub of open streams, the services — sits behind the default `server` feature,
//! so the agent links no database code.

#![warn(missing_docs)]

pub mod audit;
pub mod client;
pub mod clock;
pub mod fsutil;
pub mod httpd;
pub mod identity;
pub mod names;
pub mod pki;
pub mod profiles;
pub mod proto;
pub mod release;
pub mod rollout;
pub mod selector;
pub mod signature;
pub mod spec;
pub mod status;
pub mod wire;

#[cfg(feature = "server")]
pub mod authz;
#[cfg(feature = "server")]
pub mod bootstrap;
#[cfg(feature = "server")]
pub mod ca;
#[cfg(feature = "server")]
pub mod control;
#[cfg(feature = "server")]
pub mod credentials;
#[cfg(feature = "server")]
pub mod fleet;
#[cfg(feature = "server")]
pub mod hub;
#[cfg(feature = "server")]
pub mod render;
#[cfg(feature = "server")]
pub mod revocation;
#[cfg(feature = "server")]
pub mod scope;
#[cfg(feature = "server")]
pub mod store;
#[cfg(feature = "server")]
pub mod telemetry;
#[cfg(feature = "server")]
pub mod tpm;
#[cfg(feature = "server")]
pub mod transport;

/// The version of this build, reported by agents in `Hello` and by the server in logs.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

//! The gRPC transport: TLS and authentication, the tonic services (proto ↔ domain), the mapping of
//! domain errors to gRPC statuses, and the assembly of both endpoints.

pub mod admin;
pub mod agent;
pub mod auth;
pub mod convert;
pub mod credentials;
pub mod guard;
pub mod http;
pub mod listen;
pub mod releases;
pub mod revocable;
pub mod rpc_metrics;
pub mod server;
pub mod status;
pub mod tls;

pub use guard::ConnectionLimits;
pub use server::{Endpoints, ServeError, TlsMaterial, serve};

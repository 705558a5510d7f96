//! Opening an mTLS gRPC channel to the control plane, shared by the agent and `flotctl`.

use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_types::StatusExt;

/// Everything needed to reach the control plane as one identity.
#[derive(Clone)]
pub struct ClientCredentials {
    /// The CA bundle that signed the server certificate.
    pub ca_pem: String,
    /// The client certificate and its private key, in PEM.
    pub cert_pem: String,
    /// The private key of `cert_pem`, in PEM.
    pub key_pem: String,
    /// The name the server certificate must carry (e.g. `localhost`).
    pub server_name: String,
}

impl std::fmt::Debug for ClientCredentials {
    // The private key must never reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Why a channel to the control plane could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address is not a URI tonic accepts.
    #[error("invalid server address {address:?}: {source}")]
    Address {
        /// The address as given.
        address: String,
        /// What tonic found wrong with it.
        source: tonic::transport::Error,
    },
    /// Nothing answered at the address, or the TLS handshake failed.
    #[error("cannot connect to {address}: {detail}")]
    Connect {
        /// The address tried.
        address: String,
        /// Why it failed.
        detail: String,
    },
}

/// Settings for a long-lived channel: explicit keepalives so a dead peer is noticed within about a
/// minute even when nothing is being sent.
pub fn endpoint(address: &str, creds: &ClientCredentials) -> Result<Endpoint, ClientError> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&creds.ca_pem))
        .identity(Identity::from_pem(&creds.cert_pem, &creds.key_pem))
        .domain_name(creds.server_name.clone());
    Endpoint::from_shared(address.to_string())
        .map_err(address_error(address))?
        .tls_config(tls)
        .map_err(address_error(address))
        .map(keepalives)
}

fn address_error(address: &str) -> impl Fn(tonic::transport::Error) -> ClientError + '_ {
    move |source| ClientError::Address {
        address: address.to_string(),
        source,
    }
}

fn keepalives(endpoint: Endpoint) -> Endpoint {
    endpoint
        .connect_timeout(Duration::from_secs(10))
        .tcp_keepalive(Some(Duration::from_secs(30)))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
}

/// The same settings for a caller that brings its own TLS (a connector whose key lives in a
/// TPM): the endpoint speaks plain HTTP/2 over whatever the connector returns.
pub fn endpoint_over_own_tls(address: &str) -> Result<Endpoint, ClientError> {
    let plain = match address.strip_prefix("https://") {
        Some(rest) => format!("http://{rest}"),
        None => address.to_string(),
    };
    Endpoint::from_shared(plain)
        .map_err(address_error(address))
        .map(keepalives)
}

/// Connects now, so that an unreachable server or a refused handshake is reported here.
pub async fn connect(address: &str, creds: &ClientCredentials) -> Result<Channel, ClientError> {
    endpoint(address, creds)?
        .connect()
        .await
        .map_err(|e| ClientError::Connect {
            address: address.to_string(),
            detail: error_chain(&e),
        })
}

/// Renders an error with all its sources, because tonic's top-level transport error says only
/// "transport error".
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// When a refusal asks the caller to come back: the control plane's admission control answers
/// RESOURCE_EXHAUSTED with a `google.rpc.RetryInfo` delay (already spread by jitter).
pub fn retry_after(status: &tonic::Status) -> Option<Duration> {
    if status.code() != tonic::Code::ResourceExhausted {
        return None;
    }
    status.get_details_retry_info()?.retry_delay
}

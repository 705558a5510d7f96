//! TLS for both endpoints: our own rustls `ServerConfig` (ring provider) and accept loop, so the
//! identity of every client certificate can be checked by the authentication layer with a clear
//! gRPC status instead of a bare handshake alert.
//!
//! The handshake *requires* a client certificate and checks that the client holds its key (rustls
//! verifies the handshake signature), but defers the chain check to `auth::Authenticator`, which
//! runs before any handler and answers with a clear gRPC status.

use super::guard::{Gate, Guarded};
use crate::pki::certs_from_pem;
use futures::Stream;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keepalive, so a device that vanished without a FIN is noticed even when idle.
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// Why the TLS set-up failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The server certificate is unusable.
    #[error("server certificate: {0}")]
    Certificate(String),
    /// The server key is unusable.
    #[error("server key: {0}")]
    Key(String),
    /// The CA bundle is unusable.
    #[error("CA bundle: {0}")]
    Roots(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The `ring` crypto provider every TLS configuration uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the verifier that checks client chains against the CA.
pub fn client_verifier(ca_pem: &str) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(ca_pem).map_err(|e| TlsError::Roots(e.to_string()))? {
        roots
            .add(cert)
            .map_err(|e| TlsError::Roots(e.to_string()))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsError::Roots(e.to_string()))
}

/// Accepts any client certificate during the handshake (proof of key possession is still checked);
/// the chain is verified per request by the authentication layer.
#[derive(Debug)]
struct DeferredChainCheck {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for DeferredChainCheck {
    fn offer_client_auth(&self) -> bool {
        true
    }

    /// Without a client certificate there is nothing to serve: the handshake fails.
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The server's certificate, which can be replaced while serving: a renewal needs no restart,
/// and each new handshake gets the certificate current then.
#[derive(Debug)]
pub struct ServerCertificate {
    current: std::sync::RwLock<(Arc<CertifiedKey>, String)>,
}

fn certified_key(cert_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = certs_from_pem(cert_pem).map_err(|e| TlsError::Certificate(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| TlsError::Key(e.to_string()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| TlsError::Key(e.to_string()))?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

impl ServerCertificate {
    /// The certificate to serve, from PEM.
    pub fn new(cert_pem: &str, key_pem: &str) -> Result<Arc<ServerCertificate>, TlsError> {
        Ok(Arc::new(ServerCertificate {
            current: std::sync::RwLock::new((
                certified_key(cert_pem, key_pem)?,
                cert_pem.to_string(),
            )),
        }))
    }

    /// Serves `cert_pem` from the next handshake on.
    pub fn replace(&self, cert_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        let key = certified_key(cert_pem, key_pem)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = (key, cert_pem.to_string());
        Ok(())
    }

    /// The certificate served now (PEM).
    pub fn pem(&self) -> String {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }
}

impl ResolvesServerCert for ServerCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .0
                .clone(),
        )
    }
}

/// The server side TLS configuration: our certificate, HTTP/2 only.
pub fn server_config(
    certificate: Arc<ServerCertificate>,
    verifier: Arc<dyn ClientCertVerifier>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(DeferredChainCheck { inner: verifier }))
        .with_cert_resolver(certificate);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

fn tune_socket(stream: &TcpStream) {
    let socket = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(TCP_KEEPALIVE)
        .with_interval(Duration::from_secs(10));
    if let Err(error) = socket.set_tcp_keepalive(&keepalive) {
        tracing::debug!(%error, "could not set TCP keepalive");
    }
    let _ = stream.set_nodelay(true);
}

/// Accepts TCP connections and completes TLS handshakes concurrently (a slow client never delays
/// another), yielding finished TLS streams for `Server::serve_with_incoming`. Every connection
/// passes `gate` first and must authenticate a request before its deadline (see `guard`).
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    gate: Arc<Gate>,
    endpoint: &'static str,
) -> impl Stream<Item = Result<Guarded<TlsStream<TcpStream>>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(256);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            // Beyond the pending limit, connections wait in the kernel's backlog (a storm of
            // devices is served in turn rather than turned away to retry later).
            tokio::select! {
                _ = gate.room() => {}
                _ = tx.closed() => return,
            }
            let (stream, peer): (TcpStream, SocketAddr) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(error) => {
                        // Usually EMFILE: back off briefly instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            if abandoned(&stream) {
                crate::telemetry::connection_refused(endpoint, "abandoned");
                tracing::debug!(%peer, "client gone before its handshake began");
                continue;
            }
            let ticket = match gate.admit(peer.ip()) {
                Ok(ticket) => ticket,
                Err(refusal) => {
                    crate::telemetry::connection_refused(endpoint, refusal.as_str());
                    tracing::debug!(%peer, reason = refusal.as_str(), "connection refused");
                    continue;
                }
            };
            tune_socket(&stream);
            let deadline = Instant::now() + gate.limits().first_request_timeout;
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let handshake = HANDSHAKE_TIMEOUT.min(gate_timeout(deadline));
                match tokio::time::timeout(handshake, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx
                            .send(Ok(Guarded::new(tls, ticket, deadline, endpoint)))
                            .await;
                    }
                    Ok(Err(error)) => {
                        crate::telemetry::connection_refused(endpoint, "handshake_failed");
                        tracing::debug!(%peer, %error, "TLS handshake failed");
                    }
                    Err(_) => {
                        crate::telemetry::connection_refused(endpoint, "timeout");
                        tracing::debug!(%peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Whether the client closed its end before the handshake began: in a storm, connections wait in
/// the listen backlog, and a client whose own deadline passed there has given up and gone. Its
/// ClientHello may still be queued ahead of the close, so only POLLRDHUP tells (a read would
/// return the data first, and tokio's first readiness on a new socket is a guess); answering it
/// would spend a key exchange and a signature on nobody while live clients wait behind it.
fn abandoned(stream: &TcpStream) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let mut fds = [PollFd::new(stream, PollFlags::RDHUP)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match poll(&mut fds, Some(&now)) {
        Ok(_) => fds[0]
            .revents()
            .intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR),
        Err(_) => false,
    }
}

/// Time left until `deadline`.
fn gate_timeout(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

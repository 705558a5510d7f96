//! mTLS to the control plane with a device key that cannot be read: rustls asks the key to sign
//! the handshake (the TPM does it), and tonic speaks HTTP/2 over the resulting stream. Keys kept
//! in files use tonic's own TLS (`flotilla::client::connect`).

use crate::keys::TpmSigner;
use anyhow::{Context, Result};
use flotilla::client::endpoint_over_own_tls;
use hyper_util::rt::TokioIo;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use std::sync::Arc;
use tonic::transport::{Channel, Uri};

impl std::fmt::Debug for TpmSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TpmSigner")
    }
}

impl SigningKey for TpmSigner {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        offered
            .contains(&SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| Box::new(self.clone()) as Box<dyn Signer>)
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ECDSA
    }
}

impl Signer for TpmSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.sign_message(message).map_err(|error| {
            tracing::error!(error = %format!("{error:#}"), "TPM could not sign the TLS handshake");
            rustls::Error::General("the TPM could not sign".into())
        })
    }

    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ECDSA_NISTP256_SHA256
    }
}

#[derive(Debug)]
struct DeviceCertificate(Arc<CertifiedKey>);

impl ResolvesClientCert for DeviceCertificate {
    fn resolve(&self, _hints: &[&[u8]], schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        schemes
            .contains(&SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn client_config(ca_pem: &str, cert_pem: &str, key: TpmSigner) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in flotilla::pki::certs_from_pem(ca_pem)? {
        roots.add(cert).context("CA bundle")?;
    }
    let chain: Vec<CertificateDer<'static>> = flotilla::pki::certs_from_pem(cert_pem)?;
    let certified = CertifiedKey::new(chain, Arc::new(key));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(DeviceCertificate(Arc::new(certified))));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Opens the management channel, the TPM signing the client side of the handshake.
pub(crate) async fn connect_with_tpm_key(
    address: &str,
    ca_pem: &str,
    cert_pem: &str,
    key: TpmSigner,
    server_name: &str,
) -> Result<Channel> {
    let config = Arc::new(client_config(ca_pem, cert_pem, key)?);
    let server_name = ServerName::try_from(server_name.to_string())
        .with_context(|| format!("server name {server_name:?}"))?;
    let connector = tower::service_fn(move |uri: Uri| {
        let (config, server_name) = (config.clone(), server_name.clone());
        async move {
            let host = uri.host().unwrap_or("localhost").to_string();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(server_name, tcp)
                .await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    endpoint_over_own_tls(address)?
        .connect_with_connector(connector)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot connect to {address}: {}",
                flotilla::client::error_chain(&e)
            )
        })
}

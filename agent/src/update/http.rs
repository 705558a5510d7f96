//! Downloading a release published with an external URL: one HTTP/1.1 GET (http, or https
//! trusting the system's CA bundle and the control plane's CA) from an offset, with `Range` so an
//! interrupted download resumes. What arrives is checked like any other download (size, SHA-256,
//! signature): the transport is not what makes a release trustworthy.

use anyhow::{Context, Result, bail};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Where Debian and most distributions keep the system's trusted CAs.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The parts of an http(s) URL a GET needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Target {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, `/` at least.
    pub path: String,
}

pub(super) fn parse_url(url: &str) -> Result<Target> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else {
        bail!("{url:?} is not an http:// or https:// URL");
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        bail!("{url:?} has no usable host");
    }
    let default_port = if tls { 443 } else { 80 };
    let (host, port) = match authority.strip_prefix('[') {
        Some(bracketed) => {
            let (host, after) = bracketed
                .split_once(']')
                .with_context(|| format!("{url:?} has an unclosed [address]"))?;
            match after.strip_prefix(':') {
                Some(port) => (
                    host,
                    port.parse()
                        .with_context(|| format!("{url:?} has a bad port"))?,
                ),
                None => (host, default_port),
            }
        }
        None => match authority.rsplit_once(':') {
            Some((host, port)) => (
                host,
                port.parse()
                    .with_context(|| format!("{url:?} has a bad port"))?,
            ),
            None => (authority, default_port),
        },
    };
    Ok(Target {
        tls,
        host: host.to_string(),
        port,
        path: path.to_string(),
    })
}

fn tls_config(extra_ca_pem: &str) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    if let Ok(bundle) = std::fs::read_to_string(SYSTEM_CA_BUNDLE) {
        for cert in flotilla::pki::certs_from_pem(&bundle).unwrap_or_default() {
            let _ = roots.add(cert);
        }
    }
    for cert in flotilla::pki::certs_from_pem(extra_ca_pem).unwrap_or_default() {
        let _ = roots.add(cert);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A response whose body is still to be read.
pub(super) struct Response {
    /// 206: the body starts at the offset asked for; 200: at byte 0.
    pub partial: bool,
    pub body: hyper::body::Incoming,
}

/// GETs `url` from byte `offset` on.
pub(super) async fn get_from(url: &str, offset: u64, ca_file: &Path) -> Result<Response> {
    let target = parse_url(url)?;
    let address = format!("{}:{}", target.host, target.port);
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&address))
        .await
        .with_context(|| format!("connecting to {address} timed out"))?
        .with_context(|| format!("connecting to {address}"))?;
    let host_header = if (target.tls && target.port == 443) || (!target.tls && target.port == 80) {
        target.host.clone()
    } else {
        address.clone()
    };
    let mut request = hyper::Request::get(target.path.as_str())
        .header(hyper::header::HOST, host_header)
        .header(
            hyper::header::USER_AGENT,
            format!("flotilla-agent/{}", flotilla::VERSION),
        );
    if offset > 0 {
        request = request.header(hyper::header::RANGE, format!("bytes={offset}-"));
    }
    let request = request.body(Empty::<Bytes>::new())?;
    let response = if target.tls {
        let ca_pem = std::fs::read_to_string(ca_file).unwrap_or_default();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_config(&ca_pem)?));
        let name = ServerName::try_from(target.host.clone())
            .with_context(|| format!("{:?} is not a server name", target.host))?;
        let stream = connector
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS to {address}"))?;
        send(TokioIo::new(stream), request).await?
    } else {
        send(TokioIo::new(tcp), request).await?
    };
    let status = response.status();
    if !(status == hyper::StatusCode::OK || status == hyper::StatusCode::PARTIAL_CONTENT) {
        bail!("GET {url} answered {status}");
    }
    Ok(Response {
        partial: status == hyper::StatusCode::PARTIAL_CONTENT,
        body: response.into_body(),
    })
}

async fn send<T>(
    io: T,
    request: hyper::Request<Empty<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender.send_request(request).await?)
}

/// The next piece of a body, or `None` at its end.
pub(super) async fn next_piece(body: &mut hyper::body::Incoming) -> Result<Option<Bytes>> {
    loop {
        match body.frame().await {
            None => return Ok(None),
            Some(frame) => {
                if let Ok(data) = frame?.into_data() {
                    return Ok(Some(data));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_taken_apart() {
        assert_eq!(
            parse_url("https://cdn.example.com/agent/1.4.0").unwrap(),
            Target {
                tls: true,
                host: "cdn.example.com".into(),
                port: 443,
                path: "/agent/1.4.0".into()
            }
        );
        assert_eq!(
            parse_url("http://127.0.0.1:8080").unwrap(),
            Target {
                tls: false,
                host: "127.0.0.1".into(),
                port: 8080,
                path: "/".into()
            }
        );
        assert_eq!(parse_url("http://[::1]:81/x").unwrap().host, "::1");
        assert!(parse_url("ftp://example.com/x").is_err());
        assert!(parse_url("http://user@host/x").is_err());
    }
}

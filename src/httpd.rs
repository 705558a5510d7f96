//! The small plain-HTTP server behind the control plane's operations endpoint and the agent's
//! health endpoint: GET-only routing by path, a header read timeout so idle or slow clients cannot
//! pin connections, and a pause after a failed accept (usually: out of file descriptors) instead of
//! spinning a core.

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// A client must send a request's headers within this time (a scrape or probe sends them at once).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A response: status code, content type and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// `Content-Type` of the body.
    pub content_type: &'static str,
    /// The whole body.
    pub body: String,
}

impl Reply {
    /// A `text/plain` reply.
    pub fn text(status: u16, body: impl Into<String>) -> Reply {
        Reply {
            status,
            content_type: "text/plain",
            body: body.into(),
        }
    }

    /// A Prometheus text exposition.
    pub fn metrics(body: String) -> Reply {
        Reply {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            body,
        }
    }

    /// 404 for a path the endpoint does not serve.
    pub fn not_found() -> Reply {
        Reply::text(404, "not found\n")
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(Bytes::from(self.body)));
        *response.status_mut() =
            hyper::StatusCode::from_u16(self.status).unwrap_or(hyper::StatusCode::OK);
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(self.content_type),
        );
        response
    }
}

/// Serves `route` (request path → reply) on `listener` until `stop` completes. `endpoint` names the
/// server in logs.
pub async fn serve<R>(
    listener: TcpListener,
    endpoint: &'static str,
    route: R,
    stop: impl Future<Output = ()>,
) where
    R: Fn(&str) -> Reply + Send + Sync + 'static,
{
    let route = Arc::new(route);
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, endpoint, "accept failed; pausing");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let route = route.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let reply = route(request.uri().path());
                async move { Ok::<_, Infallible>(reply.into_response()) }
            });
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%error, endpoint, "connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn routes_by_path_and_stops_when_told() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            "test",
            |path| match path {
                "/hello" => Reply::text(200, "hi\n"),
                "/sick" => Reply::text(503, "no\n"),
                _ => Reply::not_found(),
            },
            async {
                let _ = stop_rx.await;
            },
        ));
        let hello = get(addr, "/hello").await;
        assert!(hello.starts_with("HTTP/1.1 200"), "{hello}");
        assert!(hello.contains("content-type: text/plain"), "{hello}");
        assert!(hello.ends_with("hi\n"), "{hello}");
        assert!(get(addr, "/sick").await.starts_with("HTTP/1.1 503"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        stop_tx.send(()).unwrap();
        server.await.unwrap();
        // The listener is gone with the server.
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    // Paused time: the runtime jumps to the header deadline once nothing else is runnable.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_sends_headers_is_dropped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(
            listener,
            "test",
            |_| Reply::text(200, "ok\n"),
            std::future::pending(),
        ));
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut buffer = Vec::new();
        // The server closes the connection once the header timeout passes (a 408 or a bare close).
        let read =
            tokio::time::timeout(HEADER_READ_TIMEOUT * 3, idle.read_to_end(&mut buffer)).await;
        assert!(
            read.is_ok(),
            "the server held a header-less connection open"
        );
    }
}

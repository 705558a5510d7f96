//! The plain-HTTP operations endpoint beside the gRPC ones: `/metrics` (Prometheus exposition,
//! gauges computed from memory at scrape time), `/healthz` (the process answers) and `/readyz`
//! (state loaded and not shutting down).

use crate::control::ControlPlane;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use std::convert::Infallible;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// A client must send a request's headers within this time (a scrape sends them at once), so
/// unfinished requests cannot hold connections open.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed accept (usually: out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

fn text(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

fn route(
    request: &Request<Incoming>,
    control: &ControlPlane,
    metrics: &PrometheusHandle,
) -> Response<Full<Bytes>> {
    match request.uri().path() {
        "/metrics" => {
            crate::telemetry::publish(&control.metrics_snapshot());
            text(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                metrics.render(),
            )
        }
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => {
            let unready = if !control.is_loaded() {
                Some("starting: state not loaded")
            } else if control.is_shutting_down() {
                Some("shutting down")
            } else if !control.store().reachability().is_reachable() {
                Some("database unreachable")
            } else {
                None
            };
            match unready {
                None => text(StatusCode::OK, "text/plain", "ready\n".into()),
                Some(reason) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready: {reason}\n"),
                ),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// Serves the operations endpoint until `stop` turns true.
pub async fn serve_http(
    listener: TcpListener,
    control: ControlPlane,
    metrics: PrometheusHandle,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, _) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Usually EMFILE: back off briefly instead of spinning.
                tracing::warn!(%error, "operations endpoint: accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let (control, metrics) = (control.clone(), metrics.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let response = route(&request, &control, &metrics);
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%error, "operations endpoint: connection ended with an error");
            }
        });
    }
}

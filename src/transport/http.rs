//! The plain-HTTP operations endpoint beside the gRPC ones: `/metrics` (Prometheus exposition,
//! gauges computed from memory at scrape time), `/healthz` (the process answers) and `/readyz`
//! (state loaded and not shutting down).

use crate::control::ControlPlane;
use crate::httpd::{self, Reply};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;

fn route(path: &str, control: &ControlPlane, metrics: &PrometheusHandle) -> Reply {
    match path {
        "/metrics" => {
            crate::telemetry::publish(&control.metrics_snapshot());
            Reply::metrics(metrics.render())
        }
        "/healthz" => Reply::text(200, "ok\n"),
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
                None => Reply::text(200, "ready\n"),
                Some(reason) => Reply::text(503, format!("not ready: {reason}\n")),
            }
        }
        _ => Reply::not_found(),
    }
}

/// Serves the operations endpoint until `stop` turns true.
pub async fn serve_http(
    listener: TcpListener,
    control: ControlPlane,
    metrics: PrometheusHandle,
    mut stop: watch::Receiver<bool>,
) {
    httpd::serve(
        listener,
        "operations",
        move |path| route(path, &control, &metrics),
        async move {
            let _ = stop.wait_for(|s| *s).await;
        },
    )
    .await;
}

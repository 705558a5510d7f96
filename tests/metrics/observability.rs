//! The operations endpoint and health over real connections: `/metrics` exports the catalogue with
//! a number of series that does not grow with the fleet, `/readyz` follows readiness, and the gRPC
//! health service turns NOT_SERVING when the control plane shuts down.

use crate::support;

use flotilla::proto::admin::v1 as admin;
use flotilla::proto::admin::v1::device_service_client::DeviceServiceClient;
use std::collections::BTreeSet;
use std::time::Duration;
use support::sim::SimAgent;
use support::{TestServer, channel, wait_for};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// GET over plain HTTP/1.1 (the operations endpoint is not TLS); returns (status, body).
async fn http_get(base: &str, path: &str) -> (u16, String) {
    try_http_get(base, path)
        .await
        .expect("the operations endpoint answers")
}

/// Like `http_get`, `None` if the endpoint cannot be reached or closes mid-answer.
async fn try_http_get(base: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// The series (name plus labels) of an exposition, without values.
/// The series of an exposition. Store operations are named by a fixed set of `&'static str` in
/// the code, and which of them has run yet depends on timing (the leader's housekeeping, the
/// change feed), so their names are folded into one.
fn series(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.rsplit_once(' ').map(|(s, _)| fold_operation(s)))
        .collect()
}

fn fold_operation(series: &str) -> String {
    match series.split_once("operation=\"") {
        Some((head, rest)) => match rest.split_once('"') {
            Some((_, tail)) => format!("{head}operation=\"*\"{tail}"),
            None => series.to_string(),
        },
        None => series.to_string(),
    }
}

async fn connect_devices(server: &TestServer, prefix: &str, count: usize) -> Vec<SimAgent> {
    let mut agents = Vec::new();
    for i in 0..count {
        let (creds, id) = server.enroll_device(&format!("{prefix}-{i}")).await;
        agents
            .push(SimAgent::connect(&server.agent_url, &creds, &id, Duration::from_secs(5)).await);
    }
    agents
}

async fn all_online(server: &TestServer, expected: usize) {
    let hub = server.control.hub().clone();
    wait_for("every device online", Duration::from_secs(60), || {
        let hub = hub.clone();
        async move { (hub.connected() == expected).then_some(()) }
    })
    .await;
}

/// A listing and a refused call, so the RPC series exist.
async fn admin_traffic(devices: &mut DeviceServiceClient<tonic::transport::Channel>) {
    devices
        .list_devices(admin::ListDevicesRequest::default())
        .await
        .unwrap();
    let _ = devices
        .get_device(admin::GetDeviceRequest {
            name: "ghost".into(),
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_cover_the_catalogue_and_stay_bounded_as_the_fleet_grows() {
    let _alone = crate::ONE_AT_A_TIME.lock().await;
    let server = TestServer::start().await;
    let (code, _) = http_get(&server.metrics_url, "/readyz").await;
    assert_eq!(code, 200);
    assert_eq!(http_get(&server.metrics_url, "/healthz").await.0, 200);
    assert_eq!(http_get(&server.metrics_url, "/nothing").await.0, 404);

    let mut agents = connect_devices(&server, "small", 10).await;
    all_online(&server, 10).await;
    let mut devices =
        DeviceServiceClient::new(channel(&server.admin_url, &server.admin_creds()).await);
    admin_traffic(&mut devices).await;
    let (code, small) = http_get(&server.metrics_url, "/metrics").await;
    assert_eq!(code, 200);
    for name in [
        "flotilla_build_info",
        "flotilla_ready 1",
        "flotilla_agent_sessions 10",
        "flotilla_sessions_opened_total",
        "flotilla_sessions_closed_total{reason=\"silent\"}",
        "flotilla_specs_pushed_total",
        "flotilla_push_ack_seconds_bucket",
        "flotilla_nacks_total",
        "flotilla_devices{sync_state=\"synced\"}",
        "flotilla_devices_connection{state=\"online\"} 10",
        "flotilla_enrollment_requests{state=\"approved\"} 10",
        "flotilla_certificates_total{event=\"issued\"}",
        "flotilla_certificates_expiring{within=\"7d\"} 0",
        "flotilla_certificates_renewal_due 0",
        "flotilla_tpm_attestations_total{result=\"refused\"} 0",
        "flotilla_admin_requests_total{method=\"DeviceService/GetDevice\",code=\"NOT_FOUND\"} 1",
        "flotilla_admin_request_seconds_bucket",
        "flotilla_store_operation_seconds_bucket",
    ] {
        assert!(small.contains(name), "{name} missing from:\n{small}");
    }

    // Twenty times the devices: not one more series.
    agents.extend(connect_devices(&server, "large", 190).await);
    all_online(&server, 200).await;
    admin_traffic(&mut devices).await;
    let (_, large) = http_get(&server.metrics_url, "/metrics").await;
    assert!(large.contains("flotilla_agent_sessions 200"), "{large}");
    let (small, large) = (series(&small), series(&large));
    assert_eq!(
        small.symmetric_difference(&large).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "the series do not depend on the number of devices"
    );
    assert!(
        !large.iter().any(|s| s.contains("large-1")),
        "no device name in any label"
    );
    drop(agents);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_not_serving_and_readyz_503_during_shutdown() {
    let _alone = crate::ONE_AT_A_TIME.lock().await;
    let server = TestServer::start().await;
    let mut health = HealthClient::new(channel(&server.admin_url, &server.admin_creds()).await);
    let mut statuses = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: "flotilla.admin.v1.DeviceService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = statuses.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    let control = server.control.clone();
    let metrics_url = server.metrics_url.clone();
    let stopping = tokio::spawn(server.stop());
    let mut seen = Vec::new();
    while let Ok(Some(update)) = statuses.message().await {
        seen.push(update.status());
        if update.status() == ServingStatus::NotServing {
            break;
        }
    }
    assert_eq!(seen.last(), Some(&ServingStatus::NotServing), "{seen:?}");
    assert!(control.is_shutting_down());
    assert!(!control.metrics_snapshot().ready);
    // The operations endpoint may already be closed; if it answers, it says not ready.
    let probe = tokio::time::timeout(
        Duration::from_secs(2),
        try_http_get(&metrics_url, "/readyz"),
    )
    .await;
    if let Ok(Some((code, _))) = probe {
        assert_eq!(code, 503);
    }
    stopping.await.unwrap();
}

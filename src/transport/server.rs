//! Assembles and runs both endpoints: the agent endpoint (enrollment, sessions) and the admin
//! endpoint (admin API, reflection, health), each TLS with client certificates behind the one
//! authentication layer. Readiness follows the control plane: NOT_SERVING until its state is loaded
//! and again during shutdown.

use super::admin::AdminApi;
use super::agent::AgentApi;
use super::auth::{AuthLayer, Authenticator};
use super::guard::{ConnectionLimits, Gate};
use super::rpc_metrics::RpcMetricsLayer;
use super::tls;
use crate::control::{ControlError, ControlPlane};
use crate::proto::FILE_DESCRIPTOR_SET;
use crate::proto::admin::v1::agent_release_service_server::AgentReleaseServiceServer;
use crate::proto::admin::v1::audit_service_server::AuditServiceServer;
use crate::proto::admin::v1::certificate_service_server::CertificateServiceServer;
use crate::proto::admin::v1::credential_service_server::CredentialServiceServer;
use crate::proto::admin::v1::device_service_server::DeviceServiceServer;
use crate::proto::admin::v1::enrollment_service_server::EnrollmentServiceServer as AdminEnrollmentServer;
use crate::proto::admin::v1::fleet_service_server::FleetServiceServer;
use crate::proto::admin::v1::rollout_service_server::RolloutServiceServer;
use crate::proto::admin::v1::server_service_server::ServerServiceServer;
use crate::proto::agent::v1::agent_service_server::AgentServiceServer;
use crate::proto::agent::v1::enrollment_service_server::EnrollmentServiceServer;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Server;
use tonic_health::ServingStatus;

/// Largest message an agent may send (acks, heartbeats, CSRs are small).
const AGENT_MAX_DECODE: usize = 64 * 1024;
/// Largest admin request: a full spec (1 MiB) plus framing.
const ADMIN_MAX_DECODE: usize = 2 * 1024 * 1024;
/// Largest message the server sends: a full spec plus framing.
const MAX_ENCODE: usize = 2 * 1024 * 1024;
/// Concurrent HTTP/2 streams per agent connection.
const AGENT_MAX_STREAMS: u32 = 8;
/// Receive window per agent stream (HTTP/2 flow control).
const AGENT_STREAM_WINDOW: u32 = 64 * 1024;
/// How long shutdown waits for connections to drain before it stops anyway.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound listeners of both endpoints.
pub struct Endpoints {
    /// The agent endpoint's socket.
    pub agent: TcpListener,
    /// The admin endpoint's socket.
    pub admin: TcpListener,
    /// The plain-HTTP operations endpoint (`/metrics`, `/healthz`, `/readyz`), if wanted.
    pub metrics: Option<TcpListener>,
    /// Bounds on unauthenticated and per-address connections, for each gRPC endpoint alike.
    pub limits: ConnectionLimits,
}

/// The server's certificate and the CA it trusts for clients.
pub struct TlsMaterial {
    /// The CA bundle (PEM).
    pub ca_pem: String,
    /// The server certificate (PEM).
    pub cert_pem: String,
    /// Its private key (PEM).
    pub key_pem: String,
    /// Lifetime of the server certificates issued while serving (renewal once a third is left).
    pub server_cert_validity: Duration,
}

/// Why serving stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The TLS material is unusable.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The reflection service could not be built.
    #[error("reflection: {0}")]
    Reflection(String),
    /// The state could not be loaded.
    #[error("loading state: {0}")]
    Load(#[from] ControlError),
    /// An endpoint failed.
    #[error("{endpoint} endpoint failed: {source}")]
    Transport {
        /// Which: `agent` or `admin`.
        endpoint: &'static str,
        /// What failed.
        source: tonic::transport::Error,
    },
}

fn builder() -> Server {
    Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .timeout(Duration::from_secs(60))
}

/// The agent endpoint holds one long-lived connection per device carrying small messages: one
/// session stream plus the odd enrollment or health call, so few concurrent streams and small
/// receive windows (what an agent sends is acks, heartbeats and CSRs; specs travel the other way
/// under the agent's window). The windows are fixed rather than adaptive, so a connection never
/// grows its buffers after a burst.
fn agent_builder() -> Server {
    builder()
        .max_concurrent_streams(Some(AGENT_MAX_STREAMS))
        .initial_stream_window_size(Some(AGENT_STREAM_WINDOW))
        .initial_connection_window_size(Some(AGENT_STREAM_WINDOW * 2))
        .http2_adaptive_window(Some(false))
        .max_frame_size(Some(16 * 1024))
        .http2_max_header_list_size(Some(16 * 1024))
}

/// The names the health service reports on ("" is the server as a whole).
const HEALTH_SERVICES: &[&str] = &[
    "",
    "flotilla.agent.v1.AgentService",
    "flotilla.agent.v1.EnrollmentService",
    "flotilla.admin.v1.DeviceService",
    "flotilla.admin.v1.EnrollmentService",
    "flotilla.admin.v1.FleetService",
    "flotilla.admin.v1.CertificateService",
    "flotilla.admin.v1.AuditService",
    "flotilla.admin.v1.RolloutService",
    "flotilla.admin.v1.AgentReleaseService",
    "flotilla.admin.v1.ServerService",
];

/// Keeps the server certificate valid while serving: once a third of its lifetime is left, a new
/// one for the same names is issued by the CA and served from the next handshake on.
async fn renew_server_certificate(
    control: ControlPlane,
    certificate: Arc<tls::ServerCertificate>,
    validity: Duration,
) {
    let lifetime = validity.as_secs().max(1) as i64;
    loop {
        let pem = certificate.pem();
        let Ok(info) = crate::pki::cert_info_pem(&pem) else {
            return;
        };
        crate::telemetry::server_certificate_expiry(info.not_after);
        let left = info.not_after - crate::clock::now_millis() / 1000;
        if left * 3 < lifetime {
            // The same names again (the built-in ones are not repeated).
            let names = crate::pki::subject_alt_names_pem(&pem).unwrap_or_default();
            let renewed = crate::bootstrap::server_certificate(control.ca(), &names, validity)
                .map_err(|e| e.to_string())
                .and_then(|(cert, key)| {
                    certificate
                        .replace(&cert, &key)
                        .map(|()| cert)
                        .map_err(|e| e.to_string())
                });
            match renewed {
                Ok(cert) => {
                    let serial = crate::pki::cert_info_pem(&cert)
                        .map(|i| i.serial)
                        .unwrap_or_default();
                    tracing::info!(serial, "server certificate renewed while serving");
                    continue;
                }
                Err(error) => tracing::error!(%error, "could not renew the server certificate"),
            }
        }
        let check = Duration::from_secs((lifetime as u64 / 30).clamp(1, 3600));
        tokio::time::sleep(check).await;
    }
}

/// Runs both endpoints until `shutdown` completes, then drains.
pub async fn serve(
    control: ControlPlane,
    endpoints: Endpoints,
    material: TlsMaterial,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let verifier = tls::client_verifier(&material.ca_pem)?;
    let certificate = tls::ServerCertificate::new(&material.cert_pem, &material.key_pem)?;
    let tls_config = tls::server_config(certificate.clone(), verifier.clone())?;
    let auth = AuthLayer::new(
        Authenticator::new(
            verifier,
            control.revoked().clone(),
            control.credentials().clone(),
        )
        .with_clock(control.clock().clone()),
    )
    .recording_refusals(control.clone());

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;

    let (stop_tx, stop_rx) = watch::channel(false);
    // The operations endpoint outlives the drain, so `/readyz` answers 503 until the very end.
    let (stop_http_tx, stop_rx_http) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let agent_api = AgentApi::new(control.clone());
    let agent_server = agent_builder()
        .layer(auth.clone())
        .add_service(
            AgentServiceServer::new(agent_api)
                .max_decoding_message_size(AGENT_MAX_DECODE)
                .max_encoding_message_size(MAX_ENCODE),
        )
        .add_service(
            EnrollmentServiceServer::new(AgentApi::new(control.clone()))
                .max_decoding_message_size(AGENT_MAX_DECODE),
        )
        .add_service(health_service.clone())
        .serve_with_incoming_shutdown(
            tls::incoming(
                endpoints.agent,
                tls_config.clone(),
                Arc::new(Gate::new(endpoints.limits)),
                "agent",
            ),
            stopped(stop_rx.clone()),
        );

    let admin_server = builder()
        .layer(RpcMetricsLayer)
        .layer(auth)
        .add_service(
            DeviceServiceServer::new(AdminApi::new(control.clone()))
                .max_decoding_message_size(ADMIN_MAX_DECODE)
                .max_encoding_message_size(MAX_ENCODE),
        )
        .add_service(
            AdminEnrollmentServer::new(AdminApi::new(control.clone()))
                .max_decoding_message_size(ADMIN_MAX_DECODE),
        )
        .add_service(
            FleetServiceServer::new(AdminApi::new(control.clone()))
                .max_decoding_message_size(ADMIN_MAX_DECODE)
                .max_encoding_message_size(MAX_ENCODE),
        )
        .add_service(
            CertificateServiceServer::new(AdminApi::new(control.clone()))
                .max_decoding_message_size(ADMIN_MAX_DECODE)
                .max_encoding_message_size(MAX_ENCODE),
        )
        .add_service(
            CredentialServiceServer::new(AdminApi::new(control.clone()))
                .max_decoding_message_size(ADMIN_MAX_DECODE)
                .max_encoding_message_size(MAX_ENCODE),
        )
        .add_service(
            RolloutServiceServer::new(AdminApi::new(control.clone()))
                .max_decoding_message_size(ADMIN_MAX_DECODE)
                .max_encoding_message_size(MAX_ENCODE),
        )
        .add_service(
            AgentReleaseServiceServer::new(AdminApi::new(control.clone()))
                .max_decoding_message_size(ADMIN_MAX_DECODE)
                .max_encoding_message_size(MAX_ENCODE),
        )
        .add_service(
            AuditServiceServer::new(AdminApi::new(control.clone()))
                .max_decoding_message_size(ADMIN_MAX_DECODE)
                .max_encoding_message_size(MAX_ENCODE),
        )
        .add_service(ServerServiceServer::new(AdminApi::new(control.clone())))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(
            tls::incoming(
                endpoints.admin,
                tls_config,
                Arc::new(Gate::new(endpoints.limits)),
                "admin",
            ),
            stopped(stop_rx),
        );

    let agent_task = tokio::spawn(agent_server);
    let admin_task = tokio::spawn(admin_server);
    let metrics = crate::telemetry::install();
    let mut http_task = None;
    if let Some(listener) = endpoints.metrics {
        http_task = Some(tokio::spawn(super::http::serve_http(
            listener,
            control.clone(),
            metrics,
            stop_rx_http,
        )));
    }

    let devices = control.load().await?;
    let waves = {
        let hub = control.hub().clone();
        let debounce = control.policy().debounce;
        tokio::spawn(async move { hub.run_waves(debounce).await })
    };
    let renewals = {
        let control = control.clone();
        tokio::spawn(async move { control.run_renewal_scheduler().await })
    };
    let rollouts = {
        let control = control.clone();
        tokio::spawn(async move { control.run_rollout_engine().await })
    };
    let feed = {
        let control = control.clone();
        tokio::spawn(async move { control.run_change_feed().await })
    };
    let credential_uses = {
        let control = control.clone();
        tokio::spawn(async move { control.run_credential_writer().await })
    };
    let audit_heads = {
        let control = control.clone();
        tokio::spawn(async move { control.run_audit_head_keeper().await })
    };
    let server_renewal = tokio::spawn(renew_server_certificate(
        control.clone(),
        certificate,
        material.server_cert_validity,
    ));
    for service in HEALTH_SERVICES {
        health
            .set_service_status(service, ServingStatus::Serving)
            .await;
    }
    tracing::info!(devices, "control plane ready");

    shutdown.await;
    tracing::info!("shutting down: refusing new work and closing sessions");
    control.begin_shutdown();
    for service in HEALTH_SERVICES {
        health
            .set_service_status(service, ServingStatus::NotServing)
            .await;
    }
    control.hub().close_all();
    waves.abort();
    renewals.abort();
    rollouts.abort();
    feed.abort();
    credential_uses.abort();
    audit_heads.abort();
    server_renewal.abort();
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        let agent = agent_task.await;
        let admin = admin_task.await;
        (agent, admin)
    })
    .await;
    match drained {
        Ok((agent, admin)) => {
            for (endpoint, result) in [("agent", agent), ("admin", admin)] {
                if let Ok(Err(source)) = result {
                    return Err(ServeError::Transport { endpoint, source });
                }
            }
        }
        Err(_) => tracing::warn!("connections did not drain in time; stopping anyway"),
    }
    // Sessions ended above; their last bookkeeping (last seen) is written before we go.
    if tokio::time::timeout(DRAIN_TIMEOUT, control.flush_journal())
        .await
        .is_err()
    {
        tracing::warn!("device bookkeeping could not be written before stopping");
    }
    let _ = stop_http_tx.send(true);
    if let Some(task) = http_task {
        let _ = task.await;
    }
    Ok(())
}

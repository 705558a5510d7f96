//! The device-facing services: enrollment and the management session stream.

use super::auth::{caller, caller_serial, peer_address};
use super::convert;
use crate::clock::timestamp_from_millis;
use crate::control::{ControlPlane, EnrollInput, RecoverInput};
use crate::proto::agent::v1 as pb;
use crate::proto::agent::v1::agent_service_server::AgentService;
use crate::proto::agent::v1::enrollment_service_server::EnrollmentService;
use futures::{Stream, StreamExt};
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// An agent that opens a stream must say Hello within this time.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent endpoint's services: enrollment, recovery, the session, releases.
pub struct AgentApi {
    control: ControlPlane,
}

impl AgentApi {
    /// The services over `control`.
    pub fn new(control: ControlPlane) -> Self {
        AgentApi { control }
    }
}

#[tonic::async_trait]
impl EnrollmentService for AgentApi {
    async fn enroll(
        &self,
        request: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let caller = caller(&request)?;
        let source_address = peer_address(&request)
            .map(|a| a.to_string())
            .unwrap_or_default();
        let request = request.into_inner();
        let outcome = self
            .control
            .enroll(
                &caller,
                EnrollInput {
                    source_address,
                    csr_pem: request.csr_pem,
                    device_name: request.device_name,
                    labels: request.labels,
                    system_info: convert::system_info_from(request.system_info),
                    tpm: convert::tpm_proof(request.tpm_evidence, request.tpm_answer),
                },
            )
            .await?;
        Ok(Response::new(convert::enroll_response(outcome)))
    }

    async fn recovery_challenge(
        &self,
        request: Request<pb::RecoveryChallengeRequest>,
    ) -> Result<Response<pb::RecoveryChallengeResponse>, Status> {
        let caller = caller(&request)?;
        let challenge = self
            .control
            .recovery_challenge(&caller, &request.into_inner().device_id)
            .await?;
        Ok(Response::new(pb::RecoveryChallengeResponse {
            nonce: challenge.nonce,
            expires_at: Some(timestamp_from_millis(challenge.expires_ms)),
        }))
    }

    async fn recover(
        &self,
        request: Request<pb::RecoverRequest>,
    ) -> Result<Response<pb::RecoverResponse>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        let record = self
            .control
            .recover(
                &caller,
                RecoverInput {
                    device_id: request.device_id,
                    nonce: request.nonce,
                    previous_certificate_pem: request.previous_certificate_pem,
                    signature: request.signature,
                    csr_pem: request.csr_pem,
                },
            )
            .await?;
        Ok(Response::new(pb::RecoverResponse {
            certificate_pem: record.certificate_pem,
            ca_bundle_pem: self.control.ca_pem().to_string(),
            not_after: Some(timestamp_from_millis(record.not_after_ms)),
        }))
    }
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::ServerMessage, Status>> + Send>>;
type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::ArtifactChunk, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentApi {
    type SessionStream = SessionStream;
    type DownloadArtifactStream = ChunkStream;

    async fn get_agent_release(
        &self,
        request: Request<pb::GetAgentReleaseRequest>,
    ) -> Result<Response<pb::AgentRelease>, Status> {
        caller(&request)?;
        let release = self
            .control
            .get_release(&request.into_inner().version)
            .await?;
        Ok(Response::new(convert::agent_release(release)))
    }

    async fn download_artifact(
        &self,
        request: Request<pb::DownloadArtifactRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        let mut download = self
            .control
            .open_download(&request.sha256, request.offset)
            .await?;
        tracing::debug!(device.id = %caller.name, artifact = %request.sha256, offset = request.offset, "serving a download");
        // Two chunks in flight: the reader stays just ahead of HTTP/2 flow control, so a slow
        // device holds a bounded amount of memory.
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            loop {
                let next = download.next_chunk().await.map_err(Status::from);
                let item = match next {
                    Ok(Some((offset, data))) => Ok(pb::ArtifactChunk { offset, data }),
                    Ok(None) => return,
                    Err(status) => Err(status),
                };
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
        let caller = caller(&request)?;
        let serial = caller_serial(&request)?;
        // Held until the session is accepted: bounds how many are opening at once.
        let opening = self.control.admit_session()?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 10 seconds"))??;
        let hello = match first.and_then(|m| m.kind) {
            Some(pb::agent_message::Kind::Hello(hello)) => hello,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a session must be Hello",
                ));
            }
        };
        let session = self
            .control
            .open_session(&caller, &serial, &convert::session::hello(hello))
            .await?;
        drop(opening);
        let (tx, rx) = mpsc::channel(4);
        let control = self.control.clone();
        tokio::spawn(async move {
            let inbound = inbound.map(|m| {
                m.map(convert::session::session_event)
                    .map_err(|s| s.message().to_string())
            });
            control.run_session(session, Box::pin(inbound), tx).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(
            |directive| Ok(convert::session::server_message(*directive)),
        ))))
    }
}

//! The admin API's agent release service: proto ↔ the control plane's release use cases. A
//! publication arrives as a stream (a header, then the bytes), written to disk as it comes.

use super::admin::AdminApi;
use super::auth::{actor, caller_scope};
use super::convert;
use crate::control::{ControlError, ReleaseHeader};
use crate::proto::admin::v1 as pb;
use crate::proto::admin::v1::agent_release_service_server::AgentReleaseService;
use crate::proto::admin::v1::publish_agent_release_request::Part;
use crate::proto::agent::v1 as agent;
use tonic::{Request, Response, Status, Streaming};

#[tonic::async_trait]
impl AgentReleaseService for AdminApi {
    async fn publish_agent_release(
        &self,
        request: Request<Streaming<pb::PublishAgentReleaseRequest>>,
    ) -> Result<Response<agent::AgentRelease>, Status> {
        let actor = actor(&request)?;
        let scope = caller_scope(&request)?;
        let mut parts = request.into_inner();
        let header = match parts.message().await?.and_then(|m| m.part) {
            Some(Part::Header(header)) => header,
            _ => {
                return Err(ControlError::invalid(
                    "header",
                    "the first message of a publication must be its header",
                )
                .into());
            }
        };
        let mut upload = None;
        while let Some(message) = parts.message().await? {
            match message.part {
                Some(Part::Chunk(bytes)) => {
                    let upload = match &mut upload {
                        Some(upload) => upload,
                        None => upload.insert(self.control().begin_upload()?),
                    };
                    upload.write(&bytes)?;
                }
                Some(Part::Header(_)) => {
                    return Err(ControlError::invalid("header", "only one header is sent").into());
                }
                None => {}
            }
        }
        let header = ReleaseHeader {
            version: header.version,
            sha256: header.sha256,
            size: header.size,
            signature: header.signature,
            url: header.url,
        };
        let release = self
            .control()
            .publish_release(&actor, &scope, header, upload)
            .await?;
        Ok(Response::new(convert::agent_release(release)))
    }

    async fn list_agent_releases(
        &self,
        _request: Request<pb::ListAgentReleasesRequest>,
    ) -> Result<Response<pb::ListAgentReleasesResponse>, Status> {
        let releases = self.control().list_releases().await?;
        Ok(Response::new(pb::ListAgentReleasesResponse {
            releases: releases.into_iter().map(convert::agent_release).collect(),
        }))
    }

    async fn get_agent_release(
        &self,
        request: Request<agent::GetAgentReleaseRequest>,
    ) -> Result<Response<agent::AgentRelease>, Status> {
        let release = self
            .control()
            .get_release(&request.into_inner().version)
            .await?;
        Ok(Response::new(convert::agent_release(release)))
    }

    async fn delete_agent_release(
        &self,
        request: Request<pb::DeleteAgentReleaseRequest>,
    ) -> Result<Response<pb::DeleteAgentReleaseResponse>, Status> {
        let actor = actor(&request)?;
        let scope = caller_scope(&request)?;
        self.control()
            .delete_release(&actor, &scope, &request.into_inner().version)
            .await?;
        Ok(Response::new(pb::DeleteAgentReleaseResponse {}))
    }
}

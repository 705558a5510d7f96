//! The admin API's credential service: proto ↔ the control plane's credential use cases.

use super::admin::AdminApi;
use super::auth::actor;
use super::convert;
use crate::control::NewCredential;
use crate::credentials::EnrollmentPolicy;
use crate::proto::admin::v1 as pb;
use crate::proto::admin::v1::credential_service_server::CredentialService;
use tonic::{Request, Response, Status};

#[tonic::async_trait]
impl CredentialService for AdminApi {
    async fn create_credential(
        &self,
        request: Request<pb::CreateCredentialRequest>,
    ) -> Result<Response<pb::IssuedCredential>, Status> {
        let actor = actor(&request)?;
        let request = request.into_inner();
        let grant = request.grant.unwrap_or_default();
        let new = NewCredential {
            name: request.name,
            role: convert::credential_role(request.role, "role")?,
            scope: request.scope,
            acts_as: convert::credential_role(grant.acts_as, "grant.acts_as")?,
            methods: grant.methods,
            csr_pem: request.csr_pem,
            validity: request.validity,
            enrollment: request.enrollment.map(|policy| EnrollmentPolicy {
                labels: policy.labels.into_iter().collect(),
                auto_approve: policy.auto_approve,
            }),
        };
        let issued = self.control().create_credential(new, &actor).await?;
        Ok(Response::new(convert::issued_credential(
            issued,
            self.control().ca_pem(),
        )))
    }

    async fn list_credentials(
        &self,
        request: Request<pb::ListCredentialsRequest>,
    ) -> Result<Response<pb::ListCredentialsResponse>, Status> {
        let views = self
            .control()
            .list_credentials(request.into_inner().include_revoked)
            .await?;
        Ok(Response::new(pb::ListCredentialsResponse {
            credentials: views.into_iter().map(convert::credential).collect(),
        }))
    }

    async fn get_credential(
        &self,
        request: Request<pb::GetCredentialRequest>,
    ) -> Result<Response<pb::Credential>, Status> {
        let view = self
            .control()
            .get_credential(&request.into_inner().name)
            .await?;
        Ok(Response::new(convert::credential(view)))
    }

    async fn renew_credential(
        &self,
        request: Request<pb::RenewCredentialRequest>,
    ) -> Result<Response<pb::IssuedCredential>, Status> {
        let actor = actor(&request)?;
        let request = request.into_inner();
        let issued = self
            .control()
            .renew_credential(&request.name, &request.csr_pem, &request.validity, &actor)
            .await?;
        Ok(Response::new(convert::issued_credential(
            issued,
            self.control().ca_pem(),
        )))
    }

    async fn revoke_credential(
        &self,
        request: Request<pb::RevokeCredentialRequest>,
    ) -> Result<Response<pb::Credential>, Status> {
        let actor = actor(&request)?;
        let request = request.into_inner();
        let view = self
            .control()
            .revoke_credential(&request.name, &request.reason, &actor)
            .await?;
        Ok(Response::new(convert::credential(view)))
    }

    async fn renew_own_credential(
        &self,
        request: Request<pb::RenewOwnCredentialRequest>,
    ) -> Result<Response<pb::IssuedCredential>, Status> {
        let actor = actor(&request)?;
        let request = request.into_inner();
        let issued = self
            .control()
            .renew_credential(&actor.identity.name, &request.csr_pem, "", &actor)
            .await?;
        Ok(Response::new(convert::issued_credential(
            issued,
            self.control().ca_pem(),
        )))
    }
}

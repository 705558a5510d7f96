//! The operator-facing admin services: devices and enrollment decisions.

use super::auth::caller;
use super::convert;
use crate::control::{ControlPlane, DeviceUpdate};
use crate::proto::admin::v1 as pb;
use crate::proto::admin::v1::device_service_server::DeviceService;
use crate::proto::admin::v1::enrollment_service_server::EnrollmentService;
use crate::proto::agent::v1::EnrollmentState;
use tonic::{Request, Response, Status};

pub struct AdminApi {
    control: ControlPlane,
}

impl AdminApi {
    pub fn new(control: ControlPlane) -> Self {
        AdminApi { control }
    }
}

#[tonic::async_trait]
impl DeviceService for AdminApi {
    async fn list_devices(
        &self,
        _request: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        let devices = self.control.list_devices().await?;
        Ok(Response::new(pb::ListDevicesResponse {
            devices: devices.into_iter().map(convert::device).collect(),
        }))
    }

    async fn get_device(
        &self,
        request: Request<pb::GetDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        let view = self.control.get_device(&request.into_inner().name).await?;
        Ok(Response::new(convert::device(view)))
    }

    async fn apply_device(
        &self,
        request: Request<pb::ApplyDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        let request = request.into_inner();
        let view = self
            .control
            .apply_device(DeviceUpdate {
                name: request.name,
                spec: request.spec.unwrap_or_default().into(),
                labels: request.labels.map(|l| l.values),
            })
            .await?;
        Ok(Response::new(convert::device(view)))
    }
}

#[tonic::async_trait]
impl EnrollmentService for AdminApi {
    async fn list_enrollments(
        &self,
        request: Request<pb::ListEnrollmentsRequest>,
    ) -> Result<Response<pb::ListEnrollmentsResponse>, Status> {
        let state = EnrollmentState::try_from(request.into_inner().state)
            .map_err(|_| Status::invalid_argument("state: unknown enrollment state"))?;
        let records = self
            .control
            .list_enrollments(convert::enrollment_state_filter(state))
            .await?;
        Ok(Response::new(pb::ListEnrollmentsResponse {
            enrollments: records.into_iter().map(convert::enrollment).collect(),
        }))
    }

    async fn get_enrollment(
        &self,
        request: Request<pb::GetEnrollmentRequest>,
    ) -> Result<Response<pb::Enrollment>, Status> {
        let record = self
            .control
            .get_enrollment(&request.into_inner().name)
            .await?;
        Ok(Response::new(convert::enrollment(record)))
    }

    async fn approve_enrollment(
        &self,
        request: Request<pb::ApproveEnrollmentRequest>,
    ) -> Result<Response<pb::Enrollment>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        let record = self
            .control
            .approve_enrollment(&request.name, request.labels, &caller)
            .await?;
        Ok(Response::new(convert::enrollment(record)))
    }

    async fn deny_enrollment(
        &self,
        request: Request<pb::DenyEnrollmentRequest>,
    ) -> Result<Response<pb::Enrollment>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        let record = self
            .control
            .deny_enrollment(&request.name, &request.reason, &caller)
            .await?;
        Ok(Response::new(convert::enrollment(record)))
    }
}

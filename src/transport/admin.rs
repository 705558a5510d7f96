//! The operator-facing admin services: devices, fleets and enrollment decisions.

use super::auth::{actor, caller_scope};
use super::convert;
use crate::control::{
    ControlError, ControlPlane, DeviceUpdate, FleetApply, LabelChange, RolloutCommand,
};
use crate::proto::admin::v1 as pb;
use crate::proto::admin::v1::audit_service_server::AuditService;
use crate::proto::admin::v1::certificate_service_server::CertificateService;
use crate::proto::admin::v1::device_service_server::DeviceService;
use crate::proto::admin::v1::enrollment_service_server::EnrollmentService;
use crate::proto::admin::v1::fleet_service_server::FleetService;
use crate::proto::admin::v1::rollout_service_server::RolloutService;
use crate::proto::admin::v1::server_service_server::ServerService;
use crate::proto::agent::v1::EnrollmentState;
use crate::rollout::RolloutSpec;
use crate::store::AuditQuery;
use std::pin::Pin;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// Events buffered per watcher before it is considered slow (the watch then waits).
const WATCH_BUFFER: usize = 256;

/// The admin API's services, each a thin call into a control use case.
pub struct AdminApi {
    control: ControlPlane,
}

impl AdminApi {
    /// The services over `control`.
    pub fn new(control: ControlPlane) -> Self {
        AdminApi { control }
    }

    pub(super) fn control(&self) -> &ControlPlane {
        &self.control
    }
}

#[tonic::async_trait]
impl DeviceService for AdminApi {
    type WatchDevicesStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::DeviceEvent, Status>> + Send>>;

    async fn list_devices(
        &self,
        request: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        let scope = caller_scope(&request)?;
        let request = request.into_inner();
        let page = crate::control::Page {
            size: request.page_size as usize,
            after: Some(request.page_token).filter(|t| !t.is_empty()),
        };
        let (devices, next) = self.control.list_devices_page(
            &request.selector,
            &request.field_selector,
            &scope,
            page,
        )?;
        Ok(Response::new(pb::ListDevicesResponse {
            devices: devices.into_iter().map(convert::device).collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn get_device(
        &self,
        request: Request<pb::GetDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        let scope = caller_scope(&request)?;
        let name = request.into_inner().name;
        self.control.ensure_device_in_scope(&name, &scope)?;
        let view = self.control.get_device(&name).await?;
        Ok(Response::new(convert::device(view)))
    }

    async fn apply_device(
        &self,
        request: Request<pb::ApplyDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        let caller = actor(&request)?;
        let scope = caller_scope(&request)?;
        let request = request.into_inner();
        self.control.ensure_device_in_scope(&request.name, &scope)?;
        if let Some(labels) = &request.labels {
            let labels = labels.values.clone().into_iter().collect();
            self.control
                .ensure_labels_in_scope("the new labels", &labels, &scope)?;
        }
        let view = self
            .control
            .apply_device(
                DeviceUpdate {
                    name: request.name,
                    spec: request.spec.unwrap_or_default().into(),
                    labels: request.labels.map(|l| l.values),
                },
                &caller,
            )
            .await?;
        Ok(Response::new(convert::device(view)))
    }

    async fn label_device(
        &self,
        request: Request<pb::LabelDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        let caller = actor(&request)?;
        let scope = caller_scope(&request)?;
        let request = request.into_inner();
        self.control.ensure_device_in_scope(&request.name, &scope)?;
        if !scope.is_everything()
            && let Ok(current) = self.control.get_device(&request.name).await
        {
            let mut labels = current.record.labels;
            labels.extend(request.set.clone());
            for key in &request.remove {
                labels.remove(key);
            }
            self.control
                .ensure_labels_in_scope("the new labels", &labels, &scope)?;
        }
        let view = self
            .control
            .label_device(
                LabelChange {
                    name: request.name,
                    set: request.set.into_iter().collect(),
                    remove: request.remove,
                },
                &caller,
            )
            .await?;
        Ok(Response::new(convert::device(view)))
    }

    async fn watch_devices(
        &self,
        request: Request<pb::WatchDevicesRequest>,
    ) -> Result<Response<Self::WatchDevicesStream>, Status> {
        let scope = caller_scope(&request)?;
        let request = request.into_inner();
        let mut watch =
            self.control
                .watch_devices(&request.selector, &request.field_selector, &scope)?;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let control = self.control.clone();
        tokio::spawn(async move {
            // Ends when the watcher goes away (send fails), the feed closes, or shutdown begins.
            loop {
                let event = tokio::select! {
                    event = watch.next() => event,
                    _ = control.shutdown_begun() => {
                        let _ = tx.send(Err(shutting_down())).await;
                        return;
                    }
                };
                let Some(event) = event else { return };
                if tx.send(Ok(convert::device_event(event))).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delete_device(
        &self,
        request: Request<pb::DeleteDeviceRequest>,
    ) -> Result<Response<pb::DeleteDeviceResponse>, Status> {
        let caller = actor(&request)?;
        let scope = caller_scope(&request)?;
        let name = request.into_inner().name;
        self.control.ensure_device_in_scope(&name, &scope)?;
        let revoked_serials = self.control.delete_device(&name, &caller).await?;
        Ok(Response::new(pb::DeleteDeviceResponse { revoked_serials }))
    }
}

/// How a watch ends when the control plane stops.
fn shutting_down() -> Status {
    Status::unavailable(
        "the control plane is shutting down and closed the watch; watch again (another replica, \
         or this one once it is back)",
    )
}

fn non_empty(s: &str) -> Option<&str> {
    Some(s).filter(|s| !s.is_empty())
}

#[tonic::async_trait]
impl CertificateService for AdminApi {
    async fn list_certificates(
        &self,
        request: Request<pb::ListCertificatesRequest>,
    ) -> Result<Response<pb::ListCertificatesResponse>, Status> {
        let scope = caller_scope(&request)?;
        let request = request.into_inner();
        self.control
            .ensure_device_in_scope(&request.device, &scope)?;
        let certificates = self
            .control
            .list_certificates(non_empty(&request.device))
            .await?;
        Ok(Response::new(pb::ListCertificatesResponse {
            certificates: certificates
                .into_iter()
                .filter(|c| self.control.device_id_in_scope(&c.record.device_id, &scope))
                .map(convert::certificate)
                .collect(),
        }))
    }

    async fn revoke_certificate(
        &self,
        request: Request<pb::RevokeCertificateRequest>,
    ) -> Result<Response<pb::RevokeCertificateResponse>, Status> {
        let caller = actor(&request)?;
        let scope = caller_scope(&request)?;
        let request = request.into_inner();
        self.control
            .ensure_certificate_in_scope(&request.serial, &scope)
            .await?;
        self.control
            .ensure_device_in_scope(&request.device, &scope)?;
        let revoked_serials = self
            .control
            .revoke_certificates(
                non_empty(&request.serial),
                non_empty(&request.device),
                &request.reason,
                &caller,
            )
            .await?;
        Ok(Response::new(pb::RevokeCertificateResponse {
            revoked_serials,
        }))
    }

    async fn renew_certificate(
        &self,
        request: Request<pb::RenewCertificateRequest>,
    ) -> Result<Response<pb::RenewCertificateResponse>, Status> {
        let caller = actor(&request)?;
        let scope = caller_scope(&request)?;
        let mut request = request.into_inner();
        self.control
            .ensure_device_in_scope(&request.device, &scope)?;
        if !request.selector.is_empty()
            && let Some(limit) = scope.selector()
        {
            // Selectors are conjunctions: the caller's and its scope's together.
            request.selector = format!("{},{limit}", request.selector);
        }
        match (request.device.is_empty(), request.selector.is_empty()) {
            (false, true) => {
                self.control.force_renewal(&request.device, &caller).await?;
                Ok(Response::new(pb::RenewCertificateResponse {
                    asked: 1,
                    not_connected: 0,
                }))
            }
            (true, false) => {
                let requested = self
                    .control
                    .force_renewal_matching(&request.selector, &caller)
                    .await?;
                Ok(Response::new(pb::RenewCertificateResponse {
                    asked: convert::count(requested.asked),
                    not_connected: convert::count(requested.not_connected),
                }))
            }
            _ => Err(
                ControlError::invalid("device", "give exactly one of device or selector").into(),
            ),
        }
    }
}

#[tonic::async_trait]
impl AuditService for AdminApi {
    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        let scope = caller_scope(&request)?;
        let request = request.into_inner();
        self.control
            .ensure_device_in_scope(&request.device, &scope)?;
        let millis = |t: Option<prost_types::Timestamp>| {
            t.map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
        };
        let query = AuditQuery {
            device_id: None,
            kind: non_empty(&request.kind).map(str::to_string),
            actor: non_empty(&request.actor).map(str::to_string),
            target: non_empty(&request.target).map(str::to_string),
            since_ms: millis(request.since),
            until_ms: millis(request.until),
            after_seq: request.after_seq,
            limit: i64::from(request.limit),
        };
        let records = self
            .control
            .list_audit(non_empty(&request.device), query)
            .await?;
        Ok(Response::new(pb::ListAuditResponse {
            // A scoped caller sees the records of its devices only.
            records: records
                .into_iter()
                .filter(|r| {
                    scope.is_everything()
                        || self.control.device_id_in_scope(&r.entry.device_id, &scope)
                })
                .map(|r| {
                    let name = self.control.device_name(&r.entry.device_id);
                    convert::audit_record(r, name)
                })
                .collect(),
            audit_public_key_pem: self.control.audit_public_key_pem(),
        }))
    }

    async fn get_audit_head(
        &self,
        _request: Request<pb::GetAuditHeadRequest>,
    ) -> Result<Response<pb::AuditHead>, Status> {
        let head = self.control.sign_audit_head().await?;
        Ok(Response::new(convert::audit_head(head)))
    }

    async fn list_audit_heads(
        &self,
        request: Request<pb::ListAuditHeadsRequest>,
    ) -> Result<Response<pb::ListAuditHeadsResponse>, Status> {
        let limit = request.into_inner().limit as usize;
        let heads = self.control.list_audit_heads(limit).await?;
        Ok(Response::new(pb::ListAuditHeadsResponse {
            heads: heads.into_iter().map(convert::audit_head).collect(),
        }))
    }
}

#[tonic::async_trait]
impl FleetService for AdminApi {
    async fn list_fleets(
        &self,
        request: Request<pb::ListFleetsRequest>,
    ) -> Result<Response<pb::ListFleetsResponse>, Status> {
        let scope = caller_scope(&request)?;
        let fleets = self.control.list_fleets().await?;
        Ok(Response::new(pb::ListFleetsResponse {
            fleets: fleets
                .into_iter()
                .filter(|f| self.control.fleet_in_scope(&f.record.name, &scope))
                .map(convert::fleet)
                .collect(),
        }))
    }

    async fn get_fleet(
        &self,
        request: Request<pb::GetFleetRequest>,
    ) -> Result<Response<pb::Fleet>, Status> {
        let scope = caller_scope(&request)?;
        let name = request.into_inner().name;
        self.control.ensure_fleet_in_scope(&name, &scope)?;
        let view = self.control.get_fleet(&name).await?;
        Ok(Response::new(convert::fleet(view)))
    }

    async fn apply_fleet(
        &self,
        request: Request<pb::ApplyFleetRequest>,
    ) -> Result<Response<pb::Fleet>, Status> {
        let caller = actor(&request)?;
        let scope = caller_scope(&request)?;
        let request = request.into_inner();
        self.control.ensure_fleet_in_scope(&request.name, &scope)?;
        self.control
            .ensure_selector_in_scope(&request.selector, &scope)?;
        let apply = FleetApply {
            name: request.name,
            selector: request.selector,
            label_defaults: request.label_defaults.into_iter().collect(),
            template: request.template.unwrap_or_default().into(),
            rollout: request.rollout.map(RolloutSpec::from),
        };
        let view = self.control.apply_fleet(apply, &caller).await?;
        Ok(Response::new(convert::fleet(view)))
    }

    async fn delete_fleet(
        &self,
        request: Request<pb::DeleteFleetRequest>,
    ) -> Result<Response<pb::DeleteFleetResponse>, Status> {
        let caller = actor(&request)?;
        let scope = caller_scope(&request)?;
        let name = request.into_inner().name;
        self.control.ensure_fleet_in_scope(&name, &scope)?;
        self.control.delete_fleet(&name, &caller).await?;
        Ok(Response::new(pb::DeleteFleetResponse {}))
    }

    async fn list_fleet_revisions(
        &self,
        request: Request<pb::ListFleetRevisionsRequest>,
    ) -> Result<Response<pb::ListFleetRevisionsResponse>, Status> {
        let scope = caller_scope(&request)?;
        let name = request.into_inner().name;
        self.control.ensure_fleet_in_scope(&name, &scope)?;
        let revisions = self.control.list_fleet_revisions(&name).await?;
        Ok(Response::new(pb::ListFleetRevisionsResponse {
            revisions: revisions.into_iter().map(convert::fleet_revision).collect(),
        }))
    }
}

#[tonic::async_trait]
impl EnrollmentService for AdminApi {
    async fn list_enrollments(
        &self,
        request: Request<pb::ListEnrollmentsRequest>,
    ) -> Result<Response<pb::ListEnrollmentsResponse>, Status> {
        let scope = caller_scope(&request)?;
        let state = EnrollmentState::try_from(request.into_inner().state)
            .map_err(|_| Status::invalid_argument("state: unknown enrollment state"))?;
        let records = self
            .control
            .list_enrollments(convert::enrollment_state_filter(state))
            .await?;
        Ok(Response::new(pb::ListEnrollmentsResponse {
            enrollments: records
                .into_iter()
                .filter(|r| scope.covers_labels(&r.labels))
                .map(convert::enrollment)
                .collect(),
        }))
    }

    async fn get_enrollment(
        &self,
        request: Request<pb::GetEnrollmentRequest>,
    ) -> Result<Response<pb::Enrollment>, Status> {
        let scope = caller_scope(&request)?;
        let name = request.into_inner().name;
        self.control
            .ensure_enrollment_in_scope(&name, &Default::default(), &scope)
            .await?;
        let record = self.control.get_enrollment(&name).await?;
        Ok(Response::new(convert::enrollment(record)))
    }

    async fn approve_enrollment(
        &self,
        request: Request<pb::ApproveEnrollmentRequest>,
    ) -> Result<Response<pb::Enrollment>, Status> {
        let caller = actor(&request)?;
        let scope = caller_scope(&request)?;
        let request = request.into_inner();
        let extra = request.labels.clone().into_iter().collect();
        self.control
            .ensure_enrollment_in_scope(&request.name, &extra, &scope)
            .await?;
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
        let caller = actor(&request)?;
        let scope = caller_scope(&request)?;
        let request = request.into_inner();
        self.control
            .ensure_enrollment_in_scope(&request.name, &Default::default(), &scope)
            .await?;
        let record = self
            .control
            .deny_enrollment(&request.name, &request.reason, &caller)
            .await?;
        Ok(Response::new(convert::enrollment(record)))
    }

    async fn delete_enrollment(
        &self,
        request: Request<pb::DeleteEnrollmentRequest>,
    ) -> Result<Response<pb::DeleteEnrollmentResponse>, Status> {
        let caller = actor(&request)?;
        let scope = caller_scope(&request)?;
        let name = request.into_inner().name;
        self.control
            .ensure_enrollment_in_scope(&name, &Default::default(), &scope)
            .await?;
        self.control.delete_enrollment(&name, &caller).await?;
        Ok(Response::new(pb::DeleteEnrollmentResponse {}))
    }
}

impl AdminApi {
    async fn rollout_command(
        &self,
        request: Request<pb::RolloutRequest>,
        command: RolloutCommand,
    ) -> Result<Response<pb::Rollout>, Status> {
        let caller = actor(&request)?;
        let scope = caller_scope(&request)?;
        let request = request.into_inner();
        let fleet = request.fleet;
        self.control.ensure_fleet_in_scope(&fleet, &scope)?;
        let command = match command {
            RolloutCommand::Rollback { .. } => RolloutCommand::Rollback {
                to_revision: Some(request.to_revision).filter(|r| *r > 0),
            },
            other => other,
        };
        let view = self
            .control
            .command_rollout(&fleet, command, &caller)
            .await?;
        Ok(Response::new(convert::rollout(view)))
    }
}

#[tonic::async_trait]
impl RolloutService for AdminApi {
    type WatchRolloutStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::Rollout, Status>> + Send>>;

    async fn get_rollout(
        &self,
        request: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let scope = caller_scope(&request)?;
        let fleet = request.into_inner().fleet;
        self.control.ensure_fleet_in_scope(&fleet, &scope)?;
        let view = self.control.rollout_view(&fleet).await?;
        Ok(Response::new(convert::rollout(view)))
    }

    async fn pause_rollout(
        &self,
        request: Request<pb::RolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        self.rollout_command(request, RolloutCommand::Pause).await
    }

    async fn resume_rollout(
        &self,
        request: Request<pb::RolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        self.rollout_command(request, RolloutCommand::Resume).await
    }

    async fn rollback_rollout(
        &self,
        request: Request<pb::RolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        self.rollout_command(request, RolloutCommand::Rollback { to_revision: None })
            .await
    }

    async fn watch_rollout(
        &self,
        request: Request<pb::RolloutRequest>,
    ) -> Result<Response<Self::WatchRolloutStream>, Status> {
        let scope = caller_scope(&request)?;
        let fleet = request.into_inner().fleet;
        self.control.ensure_fleet_in_scope(&fleet, &scope)?;
        let first = self.control.rollout_view(&fleet).await?;
        let (tx, rx) = mpsc::channel(16);
        let control = self.control.clone();
        tokio::spawn(async move {
            let mut last = first;
            if tx.send(Ok(convert::rollout(last.clone()))).await.is_err() {
                return;
            }
            loop {
                // Counts change with device state too, so look again at least every second.
                tokio::select! {
                    _ = control.rollout_changed(std::time::Duration::from_secs(1)) => {}
                    _ = control.shutdown_begun() => {
                        let _ = tx.send(Err(shutting_down())).await;
                        return;
                    }
                }
                let Ok(view) = control.rollout_view(&fleet).await else {
                    return;
                };
                if view != last {
                    if tx.send(Ok(convert::rollout(view.clone()))).await.is_err() {
                        return;
                    }
                    last = view;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tonic::async_trait]
impl ServerService for AdminApi {
    async fn get_server_info(
        &self,
        _request: Request<pb::GetServerInfoRequest>,
    ) -> Result<Response<pb::ServerInfo>, Status> {
        let info = self.control.server_info();
        Ok(Response::new(pb::ServerInfo {
            version: info.version.to_string(),
            replica: info.replica,
            database: info.database.to_string(),
            leading: info.leading,
            started_at: Some(crate::clock::timestamp_from_millis(info.started_ms)),
        }))
    }
}

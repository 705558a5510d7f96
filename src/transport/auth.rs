//! Authentication and authorisation of every request, as one tower layer in front of all services:
//! verify the client certificate chain against the CA, read the `flotilla://` identity from it,
//! consult `authz` for the method, and hand the verified `Caller` to the handler. Nothing else in
//! the server decides who a caller is.

use super::guard::GuardedInfo;
use super::revocable::Revocable;
use crate::authz::{Grant, authorize, mutates};
use crate::clock::Clock;
use crate::control::{Actor, CallRefusal, ControlPlane};
use crate::credentials::{AdmitError, Registry};
use crate::identity::{Identity, Role};
use crate::pki::cert_info;
use crate::revocation::RevokedSerials;
use crate::scope::Scope;
use rustls::pki_types::UnixTime;
use rustls::server::danger::ClientCertVerifier;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service};

/// The verified caller, in the request extensions of every handler: its identity, the serial of
/// the certificate it presented, what it may call, the scope it is limited to, and the method it
/// called (`FleetService/ApplyFleet`).
#[derive(Debug, Clone)]
pub struct Caller {
    /// Who it is.
    pub identity: Identity,
    /// Serial of the certificate it called with.
    pub serial: String,
    /// What it may call.
    pub grant: Grant,
    /// What it may see and change.
    pub scope: Scope,
    /// The method called (`FleetService/ApplyFleet`).
    pub method: String,
}

fn verified<T>(request: &tonic::Request<T>) -> Result<&Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .ok_or_else(|| Status::unauthenticated("request was not authenticated"))
}

/// Reads the identity a request was authenticated as.
pub fn caller<T>(request: &tonic::Request<T>) -> Result<Identity, Status> {
    verified(request).map(|c| c.identity.clone())
}

/// Reads who called which method, for the audit trail.
pub fn actor<T>(request: &tonic::Request<T>) -> Result<Actor, Status> {
    verified(request).map(|c| Actor::new(c.identity.clone(), c.method.clone()))
}

/// The address a request came from (its TCP peer).
pub fn peer_address<T>(request: &tonic::Request<T>) -> Option<std::net::SocketAddr> {
    request
        .extensions()
        .get::<GuardedInfo<TlsConnectInfo<TcpConnectInfo>>>()
        .and_then(|info| info.inner.get_ref().remote_addr())
}

/// Reads the scope of the credential a request was authenticated with.
pub fn caller_scope<T>(request: &tonic::Request<T>) -> Result<Scope, Status> {
    verified(request).map(|c| c.scope.clone())
}

/// Reads the serial of the certificate a request was authenticated with.
pub fn caller_serial<T>(request: &tonic::Request<T>) -> Result<String, Status> {
    verified(request).map(|c| c.serial.clone())
}

/// Checks client certificates; shared by both endpoints.
#[derive(Clone)]
pub struct Authenticator {
    verifier: Arc<dyn ClientCertVerifier>,
    revoked: Arc<RevokedSerials>,
    credentials: Arc<Registry>,
    /// Certificate validity is checked at its time (the control plane's).
    clock: Clock,
}

fn unix_time(clock: &Clock) -> UnixTime {
    let millis = u64::try_from(clock.now_millis()).unwrap_or(0);
    UnixTime::since_unix_epoch(std::time::Duration::from_millis(millis))
}

/// How a refusal is counted: the caller's role (when known) and why.
fn refused(role: Option<Role>, reason: &'static str, status: Status) -> Status {
    crate::telemetry::request_refused(role.map_or("unknown", Role::kind), reason);
    status
}

impl Authenticator {
    /// Checks chains with `verifier`, refuses `revoked` serials, admits `credentials`.
    pub fn new(
        verifier: Arc<dyn ClientCertVerifier>,
        revoked: Arc<RevokedSerials>,
        credentials: Arc<Registry>,
    ) -> Self {
        Authenticator {
            verifier,
            revoked,
            credentials,
            clock: Clock::system(),
        }
    }

    /// Checks validity at `clock`'s time.
    pub fn with_clock(self, clock: Clock) -> Self {
        Authenticator { clock, ..self }
    }

    /// The set whose changes end open admin calls.
    pub fn revoked(&self) -> &Arc<RevokedSerials> {
        &self.revoked
    }

    /// Decides who sent `request` and whether they may call its method.
    pub fn authenticate<B>(&self, request: &Request<B>) -> Result<Caller, Status> {
        self.authenticate_noting(request, &mut None)
    }

    /// As `authenticate`, noting in `known` who the caller is as soon as its certificate says so
    /// (a refusal after that point is recorded with its identity).
    fn authenticate_noting<B>(
        &self,
        request: &Request<B>,
        known: &mut Option<Identity>,
    ) -> Result<Caller, Status> {
        // Until the revoked serials (and the rest of the state) are loaded, a certificate cannot
        // be trusted and a read would describe an empty world: only health and reflection answer.
        if !self.revoked.is_loaded() && !answers_while_starting(request.uri().path()) {
            return Err(Status::unavailable("starting: state not loaded"));
        }
        let connection = request
            .extensions()
            .get::<GuardedInfo<TlsConnectInfo<TcpConnectInfo>>>();
        let certs = connection
            .and_then(|info| info.inner.peer_certs())
            .filter(|certs| !certs.is_empty())
            .ok_or_else(|| {
                Status::unauthenticated(
                    "a client certificate issued by this control plane is required",
                )
            })?;
        let (end_entity, intermediates) = certs.split_first().ok_or_else(|| {
            Status::unauthenticated("a client certificate issued by this control plane is required")
        })?;
        let rejected = |e: &dyn std::fmt::Display| {
            refused(
                None,
                "unauthenticated",
                Status::unauthenticated(format!("client certificate rejected: {e}")),
            )
        };
        self.verifier
            .verify_client_cert(end_entity, intermediates, unix_time(&self.clock))
            .map_err(|e| rejected(&e))?;
        let identity = Identity::from_certificate_der(end_entity).map_err(|e| rejected(&e))?;
        let serial = cert_info(end_entity).map_err(|e| rejected(&e))?.serial;
        *known = Some(identity.clone());
        let role = identity.role;
        if self.revoked.contains(&serial) {
            return Err(refused(
                Some(role),
                "revoked",
                Status::unauthenticated(format!("client certificate {serial} has been revoked")),
            ));
        }
        let (grant, scope) = match role {
            // Devices are admitted by their certificates (revocation above); every other
            // identity, enrollment credentials included, must be a registered credential.
            Role::Device => (Grant::of(role), Scope::everything()),
            _ => {
                let admitted = self
                    .credentials
                    .admit(&identity, &serial, self.clock.now_millis())
                    .map_err(|e| {
                        let reason = match e {
                            AdmitError::Unknown(_) => "unregistered",
                            AdmitError::Revoked(_) => "revoked",
                        };
                        refused(Some(role), reason, Status::unauthenticated(e.to_string()))
                    })?;
                (admitted.grant, Scope::of(admitted.scope))
            }
        };
        authorize(&grant, request.uri().path()).map_err(|e| {
            refused(
                Some(role),
                "forbidden",
                Status::permission_denied(e.to_string()),
            )
        })?;
        if let Some(connection) = connection {
            // The connection has proven itself: it no longer counts as pending.
            connection.proof.authenticated();
        }
        Ok(Caller {
            identity,
            serial,
            grant,
            scope,
            method: short_method(request.uri().path()).to_string(),
        })
    }
}

/// `FleetService/ApplyFleet` of `/flotilla.admin.v1.FleetService/ApplyFleet`.
fn short_method(path: &str) -> &str {
    let path = path.trim_start_matches('/');
    match path.split_once('/') {
        Some((service, method)) => {
            let service_start = service.rfind('.').map_or(0, |dot| dot + 1);
            &path[service_start..service.len() + 1 + method.len()]
        }
        None => path,
    }
}

/// Health and reflection describe the server itself, so they answer while it is starting.
fn answers_while_starting(path: &str) -> bool {
    path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.")
}

/// The tower layer that authenticates and authorizes every request.
#[derive(Clone)]
pub struct AuthLayer {
    authenticator: Authenticator,
    refusals: Option<ControlPlane>,
}

impl AuthLayer {
    /// The layer over `authenticator`.
    pub fn new(authenticator: Authenticator) -> Self {
        AuthLayer {
            authenticator,
            refusals: None,
        }
    }

    /// Records refused mutating admin calls in the control plane's audit trail: those the
    /// authenticator refuses (a role without the right, a revoked or unregistered credential)
    /// and those a handler refuses with `PERMISSION_DENIED` (outside the caller's scope).
    pub fn recording_refusals(mut self, control: ControlPlane) -> Self {
        self.refusals = Some(control);
        self
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            authenticator: self.authenticator.clone(),
            refusals: self.refusals.clone(),
        }
    }
}

/// A service behind the auth layer.
#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    authenticator: Authenticator,
    refusals: Option<ControlPlane>,
}

async fn record_refusal(
    control: &ControlPlane,
    identity: Identity,
    method: String,
    status: &Status,
) {
    control
        .record_refusal(CallRefusal {
            identity,
            method,
            reason: status.message().to_string(),
        })
        .await;
}

/// The control plane to record a refusal of `method` in, when it mutates.
fn recorder<'a>(refusals: &'a Option<ControlPlane>, method: &str) -> Option<&'a ControlPlane> {
    refusals.as_ref().filter(|_| mutates(method))
}

impl<S> Service<Request<Body>> for AuthService<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = futures::future::Either<
        S::Future,
        futures::future::BoxFuture<'static, Result<Response<Body>, S::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let method = short_method(request.uri().path()).to_string();
        let mut known = None;
        match self.authenticator.authenticate_noting(&request, &mut known) {
            Ok(caller) => {
                // People's and services' calls end when their certificate is revoked; devices'
                // sessions are closed by the hub.
                if matches!(caller.identity.role, Role::Device | Role::Enrollment) {
                    request.extensions_mut().insert(caller);
                    return futures::future::Either::Left(self.inner.call(request));
                }
                let serial = caller.serial.clone();
                let identity = caller.identity.clone();
                request.extensions_mut().insert(caller);
                let call = self.inner.call(request);
                let revoked = self.authenticator.revoked.clone();
                let recorder = recorder(&self.refusals, &method).cloned();
                futures::future::Either::Right(Box::pin(async move {
                    let response = call.await?;
                    if let Some(control) = recorder
                        && let Some(status) = tonic::Status::from_header_map(response.headers())
                        && status.code() == tonic::Code::PermissionDenied
                    {
                        record_refusal(&control, identity, method, &status).await;
                    }
                    Ok(response.map(|body| Revocable::wrap(body, serial, revoked)))
                }))
            }
            Err(status) => {
                tracing::info!(path = request.uri().path(), code = ?status.code(), reason = status.message(), "request refused");
                let recorder = recorder(&self.refusals, &method).cloned();
                futures::future::Either::Right(Box::pin(async move {
                    if let (Some(control), Some(identity)) = (recorder, known) {
                        record_refusal(&control, identity, method, &status).await;
                    }
                    Ok(status.into_http())
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::CertificateAuthority;

    fn authenticator(revoked: Arc<RevokedSerials>) -> Authenticator {
        let (ca, _) =
            CertificateAuthority::generate("test", std::time::Duration::from_secs(60)).unwrap();
        let verifier = super::super::tls::client_verifier(ca.cert_pem()).unwrap();
        Authenticator::new(verifier, revoked, Arc::default())
    }

    fn request(path: &str) -> Request<()> {
        Request::builder().uri(path).body(()).unwrap()
    }

    #[test]
    fn nothing_but_health_and_reflection_answers_before_the_state_is_loaded() {
        let revoked = Arc::new(RevokedSerials::default());
        let auth = authenticator(revoked.clone());
        for path in [
            "/flotilla.admin.v1.DeviceService/ListDevices",
            "/flotilla.agent.v1.AgentService/Session",
            "/flotilla.agent.v1.EnrollmentService/Enroll",
        ] {
            let status = auth.authenticate(&request(path)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unavailable, "{path}");
            assert_eq!(status.message(), "starting: state not loaded");
        }
        // Health passes the gate (and then needs a certificate like everything else).
        let status = auth
            .authenticate(&request("/grpc.health.v1.Health/Check"))
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        revoked.mark_loaded();
        let status = auth
            .authenticate(&request("/flotilla.admin.v1.DeviceService/ListDevices"))
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "past the gate");
    }
}

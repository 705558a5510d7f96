//! Authentication and authorisation of every request, as one tower layer in front of all services:
//! verify the client certificate chain against the CA, read the `flotilla://` identity from it,
//! consult `authz` for the method, and hand the verified `Caller` to the handler. Nothing else in
//! the server decides who a caller is.

use super::guard::GuardedInfo;
use super::revocable::Revocable;
use crate::authz::{Grant, authorize};
use crate::clock::now_millis;
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
/// the certificate it presented, what it may call, and the scope it is limited to.
#[derive(Debug, Clone)]
pub struct Caller {
    pub identity: Identity,
    pub serial: String,
    pub grant: Grant,
    pub scope: Scope,
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
}

/// How a refusal is counted: the caller's role (when known) and why.
fn refused(role: Option<Role>, reason: &'static str, status: Status) -> Status {
    crate::telemetry::request_refused(role.map_or("unknown", Role::kind), reason);
    status
}

impl Authenticator {
    pub fn new(
        verifier: Arc<dyn ClientCertVerifier>,
        revoked: Arc<RevokedSerials>,
        credentials: Arc<Registry>,
    ) -> Self {
        Authenticator {
            verifier,
            revoked,
            credentials,
        }
    }

    /// The set whose changes end open admin calls.
    pub fn revoked(&self) -> &Arc<RevokedSerials> {
        &self.revoked
    }

    /// Decides who sent `request` and whether they may call its method.
    pub fn authenticate<B>(&self, request: &Request<B>) -> Result<Caller, Status> {
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
            .verify_client_cert(end_entity, intermediates, UnixTime::now())
            .map_err(|e| rejected(&e))?;
        let identity = Identity::from_certificate_der(end_entity).map_err(|e| rejected(&e))?;
        let serial = cert_info(end_entity).map_err(|e| rejected(&e))?.serial;
        let role = identity.role;
        if self.revoked.contains(&serial) {
            return Err(refused(
                Some(role),
                "revoked",
                Status::unauthenticated(format!("client certificate {serial} has been revoked")),
            ));
        }
        let (grant, scope) = match role {
            Role::Device | Role::Enrollment => (Grant::of(role), Scope::everything()),
            _ => {
                let admitted = self
                    .credentials
                    .admit(&identity, &serial, now_millis())
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
        })
    }
}

/// Health and reflection describe the server itself, so they answer while it is starting.
fn answers_while_starting(path: &str) -> bool {
    path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.")
}

#[derive(Clone)]
pub struct AuthLayer {
    authenticator: Authenticator,
}

impl AuthLayer {
    pub fn new(authenticator: Authenticator) -> Self {
        AuthLayer { authenticator }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            authenticator: self.authenticator.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    authenticator: Authenticator,
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
        futures::future::Either<
            S::Future,
            futures::future::BoxFuture<'static, Result<Response<Body>, S::Error>>,
        >,
        futures::future::Ready<Result<Response<Body>, S::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        match self.authenticator.authenticate(&request) {
            Ok(caller) => {
                // People's and services' calls end when their certificate is revoked; devices'
                // sessions are closed by the hub.
                let watched = (!matches!(caller.identity.role, Role::Device | Role::Enrollment))
                    .then(|| caller.serial.clone());
                request.extensions_mut().insert(caller);
                let call = self.inner.call(request);
                futures::future::Either::Left(match watched {
                    None => futures::future::Either::Left(call),
                    Some(serial) => {
                        let revoked = self.authenticator.revoked.clone();
                        futures::future::Either::Right(Box::pin(async move {
                            let response = call.await?;
                            Ok(response.map(|body| Revocable::wrap(body, serial, revoked)))
                        }))
                    }
                })
            }
            Err(status) => {
                tracing::info!(path = request.uri().path(), code = ?status.code(), reason = status.message(), "request refused");
                futures::future::Either::Right(futures::future::ready(Ok(status.into_http())))
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

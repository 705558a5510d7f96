//! A tower layer that counts admin RPCs and times them, by method and gRPC status code.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::time::Instant;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tower::{Layer, Service};

/// Records every admin call's method, code and duration.
#[derive(Clone, Default)]
pub struct RpcMetricsLayer;

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics { inner }
    }
}

/// A service behind the metrics layer.
#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
}

/// `Service/Method` of a gRPC path (a bounded set: the methods the server implements, plus
/// `unknown` for anything else, so a caller cannot grow the label set).
fn method_of(path: &str) -> String {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let service = parts.next().unwrap_or_default();
    let method = parts.next().unwrap_or_default();
    let short = service.rsplit('.').next().unwrap_or_default();
    let known = service.starts_with("flotilla.")
        || service.starts_with("grpc.health.")
        || service.starts_with("grpc.reflection.");
    if known && !method.is_empty() && method.len() <= 64 {
        format!("{short}/{method}")
    } else {
        "unknown".to_string()
    }
}

/// The status a response carries in its headers (errors are sent trailers-only); `OK` otherwise.
fn code_of(response: &Response<Body>) -> &'static str {
    let code = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .unwrap_or(0);
    match tonic::Code::from_i32(code) {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

impl<S> Service<Request<Body>> for RpcMetrics<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let method = method_of(request.uri().path());
        let started = Instant::now();
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            crate::telemetry::admin_request(method, code_of(&response), started.elapsed());
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::method_of;

    #[test]
    fn method_labels_are_bounded() {
        assert_eq!(
            method_of("/flotilla.admin.v1.DeviceService/ListDevices"),
            "DeviceService/ListDevices"
        );
        assert_eq!(method_of("/grpc.health.v1.Health/Check"), "Health/Check");
        assert_eq!(method_of("/evil.Service/Anything"), "unknown");
        assert_eq!(method_of("/flotilla.x/"), "unknown");
    }
}

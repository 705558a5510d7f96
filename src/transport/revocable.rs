//! The response body of an admin call, ended the moment the certificate it was made with is
//! revoked: a `watch` open for hours stops at once with `UNAUTHENTICATED` instead of streaming on
//! to a revoked credential (devices' streams are closed by the hub).

use crate::revocation::RevokedSerials;
use http_body::{Body as HttpBody, Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio_stream::Stream;
use tokio_stream::wrappers::WatchStream;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::Bytes;

/// A response body that ends with `UNAUTHENTICATED` once its caller's certificate is revoked.
pub struct Revocable {
    inner: Body,
    serial: String,
    revoked: Arc<RevokedSerials>,
    changes: WatchStream<u64>,
    ended: bool,
}

impl Revocable {
    /// Wraps `inner` for the caller with `serial`.
    pub fn wrap(inner: Body, serial: String, revoked: Arc<RevokedSerials>) -> Body {
        let changes = WatchStream::from_changes(revoked.subscribe());
        Body::new(Revocable {
            inner,
            serial,
            revoked,
            changes,
            ended: false,
        })
    }
}

impl HttpBody for Revocable {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        // Registers for the next change too, so a revocation wakes a call waiting for data.
        while let Poll::Ready(Some(_)) = Pin::new(&mut self.changes).poll_next(cx) {
            if self.revoked.contains(&self.serial) {
                self.ended = true;
                let status = Status::unauthenticated(format!(
                    "client certificate {} has been revoked",
                    self.serial
                ));
                let mut trailers = tonic::codegen::http::HeaderMap::new();
                // Only fails for a message that cannot be a header, which this one can.
                let _ = status.add_header(&mut trailers);
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
        }
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = frame {
            self.ended = true;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

//! Limits on connections that have not proven anything yet. A TLS handshake is not enough: a
//! client that finishes it and then sends nothing (or never a request that authenticates) would
//! hold a descriptor for ever. Every accepted connection is *pending* until its first request
//! passes the authentication layer; pending connections are capped overall (the listener stops
//! accepting until one proves itself or goes, so a legitimate storm queues in the kernel's backlog
//! instead of being turned away) and closed when they stay pending too long, and connections per
//! source address are capped too.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tonic::transport::server::Connected;

/// Bounds on the connections of one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// A connection whose first request has not authenticated by then is closed (this includes
    /// the TLS handshake).
    pub first_request_timeout: Duration,
    /// Connections accepted but not yet authenticated, at most; while this many are pending the
    /// listener accepts nothing more.
    pub max_pending: usize,
    /// Open connections from one source address, at most (0: no limit).
    pub max_per_address: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            first_request_timeout: Duration::from_secs(10),
            max_pending: 256,
            max_per_address: 1024,
        }
    }
}

/// The connection counts of one endpoint.
#[derive(Debug)]
pub struct Gate {
    limits: ConnectionLimits,
    pending: Arc<Pending>,
    per_address: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// The count of pending connections, and a wake-up for the listener when one place frees.
#[derive(Debug, Default)]
struct Pending {
    count: AtomicUsize,
    freed: tokio::sync::Notify,
}

impl Pending {
    fn release(&self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
        self.freed.notify_one();
    }
}

/// Why a connection was turned away at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// As many connections as allowed are still unauthenticated.
    TooManyPending,
    /// The source address has as many open connections as allowed.
    TooManyFromAddress,
}

impl Refusal {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::TooManyPending => "too_many_pending",
            Refusal::TooManyFromAddress => "too_many_from_address",
        }
    }
}

impl Gate {
    /// A gate with `limits`.
    pub fn new(limits: ConnectionLimits) -> Self {
        Gate {
            limits,
            pending: Arc::default(),
            per_address: Arc::default(),
        }
    }

    /// Its limits.
    pub fn limits(&self) -> ConnectionLimits {
        self.limits
    }

    /// Admits a newly accepted connection from `peer`, or says why not.
    pub fn admit(&self, peer: IpAddr) -> Result<Ticket, Refusal> {
        {
            let mut addresses = self.per_address.lock().unwrap_or_else(|p| p.into_inner());
            let open = addresses.entry(peer).or_insert(0);
            if self.limits.max_per_address > 0 && *open >= self.limits.max_per_address {
                return Err(Refusal::TooManyFromAddress);
            }
            if self.pending.count.fetch_add(1, Ordering::AcqRel) >= self.limits.max_pending {
                self.pending.count.fetch_sub(1, Ordering::AcqRel);
                return Err(Refusal::TooManyPending);
            }
            *open += 1;
        }
        Ok(Ticket {
            proof: Arc::new(Proof {
                authenticated: AtomicBool::new(false),
                timed_out: AtomicBool::new(false),
                pending: self.pending.clone(),
            }),
            peer,
            per_address: self.per_address.clone(),
        })
    }

    /// Connections accepted and not yet authenticated.
    pub fn pending(&self) -> usize {
        self.pending.count.load(Ordering::Acquire)
    }

    /// Waits until fewer than the maximum of connections are pending: the listener calls this
    /// before each accept, so connections beyond the limit wait in the backlog.
    pub async fn room(&self) {
        while self.pending() >= self.limits.max_pending {
            self.pending.freed.notified().await;
        }
    }
}

/// Whether a connection has authenticated a request; shared by the connection and its requests.
#[derive(Debug)]
pub struct Proof {
    authenticated: AtomicBool,
    timed_out: AtomicBool,
    pending: Arc<Pending>,
}

impl Proof {
    /// The authentication layer accepted a request on this connection.
    pub fn authenticated(&self) {
        if !self.authenticated.swap(true, Ordering::AcqRel) {
            self.pending.release();
        }
    }

    fn is_authenticated(&self) -> bool {
        self.authenticated.load(Ordering::Acquire)
    }
}

/// A connection's place in the counts, given back when the connection ends.
#[derive(Debug)]
pub struct Ticket {
    proof: Arc<Proof>,
    peer: IpAddr,
    per_address: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // Still pending when it ends: give back its pending place.
        self.proof.authenticated();
        let mut addresses = self.per_address.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(open) = addresses.get_mut(&self.peer) {
            *open -= 1;
            if *open == 0 {
                addresses.remove(&self.peer);
            }
        }
    }
}

/// What requests on a guarded connection see of it (a request extension).
#[derive(Debug, Clone)]
pub struct GuardedInfo<T> {
    /// What the connection would show unguarded.
    pub inner: T,
    /// Marked once the connection has authenticated.
    pub proof: Arc<Proof>,
}

/// A stream that fails its reads once its deadline passes without an authenticated request.
pub struct Guarded<S> {
    inner: S,
    ticket: Ticket,
    deadline: Option<Pin<Box<Sleep>>>,
    endpoint: &'static str,
}

impl<S> Guarded<S> {
    /// Guards `inner`; `deadline` is when the connection must have authenticated a request.
    pub fn new(
        inner: S,
        ticket: Ticket,
        deadline: tokio::time::Instant,
        endpoint: &'static str,
    ) -> Self {
        Guarded {
            inner,
            ticket,
            deadline: Some(Box::pin(tokio::time::sleep_until(deadline))),
            endpoint,
        }
    }

    /// Whether the deadline has passed without an authenticated request.
    fn overdue(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(deadline) = self.deadline.as_mut() else {
            return false;
        };
        if self.ticket.proof.is_authenticated() {
            self.deadline = None;
            return false;
        }
        if deadline.as_mut().poll(cx).is_pending() {
            return false;
        }
        // Counted once; later reads fail the same way.
        if !self.ticket.proof.timed_out.swap(true, Ordering::AcqRel) {
            crate::telemetry::connection_refused(self.endpoint, "timeout");
        }
        true
    }
}

use std::future::Future;

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.overdue(cx) {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no authenticated request in time",
            )));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: Connected> Connected for Guarded<S> {
    type ConnectInfo = GuardedInfo<S::ConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        GuardedInfo {
            inner: self.inner.connect_info(),
            proof: self.ticket.proof.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(max_pending: usize, max_per_address: usize) -> Gate {
        Gate::new(ConnectionLimits {
            first_request_timeout: Duration::from_secs(1),
            max_pending,
            max_per_address,
        })
    }

    #[test]
    fn pending_connections_are_capped_until_they_authenticate() {
        let gate = gate(2, 0);
        let a: IpAddr = [127, 0, 0, 1].into();
        let first = gate.admit(a).unwrap();
        let _second = gate.admit(a).unwrap();
        assert_eq!(gate.admit(a).unwrap_err(), Refusal::TooManyPending);
        first.proof.authenticated();
        first.proof.authenticated();
        assert_eq!(gate.pending(), 1, "authenticating twice counts once");
        let third = gate.admit(a).unwrap();
        drop(third);
        drop(first);
        assert_eq!(gate.pending(), 1);
    }

    #[test]
    fn connections_per_address_are_capped_and_given_back() {
        let gate = gate(100, 2);
        let (a, b): (IpAddr, IpAddr) = ([127, 0, 0, 1].into(), [127, 0, 0, 2].into());
        let first = gate.admit(a).unwrap();
        let _second = gate.admit(a).unwrap();
        assert_eq!(gate.admit(a).unwrap_err(), Refusal::TooManyFromAddress);
        assert!(gate.admit(b).is_ok(), "other addresses are unaffected");
        drop(first);
        assert!(gate.admit(a).is_ok());
    }

    #[tokio::test]
    async fn the_listener_waits_for_room_instead_of_refusing() {
        let gate = Arc::new(gate(1, 0));
        let a: IpAddr = [127, 0, 0, 1].into();
        gate.room().await;
        let first = gate.admit(a).unwrap();
        let waiter = tokio::spawn({
            let gate = gate.clone();
            async move { gate.room().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "room while one of one is pending");
        first.proof.authenticated();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("room once the pending connection authenticated")
            .unwrap();
    }
}

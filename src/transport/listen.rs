//! Listening sockets for the gRPC endpoints, with a backlog deep enough for a fleet that
//! reconnects at once: connections beyond the pending limit wait there (see `guard`), and a
//! shallow backlog would make the kernel drop their handshakes, costing each client a
//! SYN retransmission of a second or more.

use std::net::SocketAddr;
use tokio::net::{TcpListener, TcpSocket};

/// Asked of the kernel; it caps the figure at `net.core.somaxconn`.
const BACKLOG: u32 = 65_535;

/// Binds `addr` (address reuse on, as for any server that restarts in place) and listens.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn binds_and_accepts() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::net::TcpStream::connect(addr);
        let (accepted, connected) = tokio::join!(listener.accept(), client);
        assert!(accepted.is_ok() && connected.is_ok());
        assert!(bind(addr).is_err(), "the address is taken");
    }
}

//! What one client connection may hold: a place among the replica's `--max-connections` (and
//! among its peer address's `--max-connections-per-peer`), and its socket only while it is used:
//! closed when it has sent no request within `--first-request-timeout-secs` of being accepted, or
//! moved no traffic for `--idle-timeout-secs`.
//!
//! Why here and not in tonic: tonic bounds requests (`timeout`, streams per connection) and
//! connection age, but neither the number of connections nor how long one may sit idle; a client
//! that opens thousands of connections, or keeps them open unused, would hold the replica's
//! sockets and memory (issue 27: three silent TCP connections took every place of
//! `--max-connections 3`, for as long as the idle timeout). Places are enforced on the accepted
//! TCP stream, below TLS and HTTP/2; whether a connection has sent a request is told by a layer
//! of the gRPC server ([`Peers::request_on`]), since under TLS the bytes say nothing.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::{Stream, StreamExt};
use parking_lot::{Mutex, RwLock};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

/// How many connections, from whom, and for how long.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// Connections held at once.
    pub max: usize,
    /// Connections held at once from one peer address.
    pub per_peer: usize,
    /// Closed after this long without traffic (keepalive pings aside).
    pub idle: Duration,
    /// Closed when no request came within this long of being accepted.
    pub first_request: Duration,
}

/// The connections held, by peer address, and those that have not sent a request yet. Shared by
/// the accepting loop and the gRPC server's layer that sees requests.
#[derive(Default)]
pub struct Peers {
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Connections yet to send a request: their flag, set (and the entry removed) by the first.
    silent: RwLock<HashMap<SocketAddr, Arc<AtomicBool>>>,
}

impl Peers {
    /// An empty registry.
    pub fn new() -> Arc<Peers> {
        Arc::new(Peers::default())
    }

    /// A request arrived: the connection it came on has sent one. A read of a map that holds
    /// only connections yet to send their first request (write-locked once per connection).
    pub fn request_on<B>(&self, req: &tonic::codegen::http::Request<B>) {
        let ext = req.extensions();
        let Some(addr) = ext
            .get::<TcpConnectInfo>()
            .or_else(|| {
                ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                    .map(TlsConnectInfo::get_ref)
            })
            .and_then(TcpConnectInfo::remote_addr)
        else {
            return;
        };
        if !self.silent.read().contains_key(&addr) {
            return;
        }
        if let Some(flag) = self.silent.write().remove(&addr) {
            flag.store(true, Ordering::Release);
        }
    }

    /// Takes a place for a connection from `ip`, unless its peer holds `per_peer` already.
    fn admit(&self, ip: IpAddr, per_peer: usize) -> bool {
        let mut per_ip = self.per_ip.lock();
        let held = per_ip.entry(ip).or_insert(0);
        if *held >= per_peer {
            return false;
        }
        *held += 1;
        true
    }

    fn release(&self, ip: IpAddr, addr: Option<SocketAddr>) {
        let mut per_ip = self.per_ip.lock();
        if let Some(held) = per_ip.get_mut(&ip) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                per_ip.remove(&ip);
            }
        }
        drop(per_ip);
        if let Some(addr) = addr {
            self.silent.write().remove(&addr);
        }
    }
}

/// The accepted connections within `limits`: past `max`, or past `per_peer` from one address, a
/// new connection is closed as soon as it is accepted (counted and logged).
pub fn limited(
    accepted: impl Stream<Item = Result<TcpStream, io::Error>> + Send + 'static,
    limits: ConnectionLimits,
    peers: Arc<Peers>,
) -> impl Stream<Item = Result<Limited, io::Error>> + Send + 'static {
    let permits = Arc::new(Semaphore::new(limits.max.max(1)));
    accepted.filter_map(move |accepted| {
        let (permits, peers) = (permits.clone(), peers.clone());
        async move {
            let stream = match accepted {
                Ok(s) => s,
                Err(e) => return Some(Err(e)),
            };
            let addr = stream.peer_addr().ok();
            let ip = addr.map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip());
            let Ok(permit) = permits.try_acquire_owned() else {
                metrics::counter!("optout_connections_refused_total", "limit" => "total")
                    .increment(1);
                tracing::warn!(
                    max = limits.max,
                    "connection limit reached; closing a new connection"
                );
                return None;
            };
            if !peers.admit(ip, limits.per_peer) {
                metrics::counter!("optout_connections_refused_total", "limit" => "peer")
                    .increment(1);
                tracing::warn!(
                    per_peer = limits.per_peer,
                    "connection limit of one peer address reached; closing a new connection"
                );
                return None;
            }
            let seen = Arc::new(AtomicBool::new(false));
            if let Some(a) = addr {
                peers.silent.write().insert(a, seen.clone());
            }
            let now = Instant::now();
            Some(Ok(Limited {
                stream,
                _permit: permit,
                peers,
                ip,
                addr,
                seen,
                limits,
                accepted: now,
                last_active: now,
                timer: Box::pin(tokio::time::sleep(limits.first_request.min(limits.idle))),
            }))
        }
    })
}

/// An accepted connection: holds one of the replica's connection places (and one of its peer's)
/// until it closes, and reads as closed once it has sent no request in time or been idle too
/// long.
pub struct Limited {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    peers: Arc<Peers>,
    ip: IpAddr,
    addr: Option<SocketAddr>,
    /// Set when the connection's first request arrives.
    seen: Arc<AtomicBool>,
    limits: ConnectionLimits,
    accepted: Instant,
    last_active: Instant,
    /// Fires at [`Limited::deadline`] as it stood when last set.
    timer: Pin<Box<Sleep>>,
}

impl Drop for Limited {
    fn drop(&mut self) {
        self.peers.release(self.ip, self.addr);
    }
}

/// An HTTP/2 PING frame alone (9-byte header, type 6, 8 bytes of payload): keepalive traffic,
/// which keeps a dead peer from looking alive but must not keep an unused connection open.
fn is_ping(bytes: &[u8]) -> bool {
    bytes.len() == 17 && bytes[3] == 0x6
}

impl Limited {
    /// Traffic moved `bytes`: unless that was keepalive only, the connection is in use.
    fn touch(&mut self, bytes: &[u8]) {
        if !bytes.is_empty() && !is_ping(bytes) {
            self.active();
        }
    }

    fn active(&mut self) {
        self.last_active = Instant::now();
        let at = self.deadline();
        self.timer.as_mut().reset(at);
    }

    /// When the connection is closed unless something happens first: `idle` after its last
    /// traffic, and, until its first request, `first_request` after it was accepted.
    fn deadline(&self) -> Instant {
        let idle = self.last_active + self.limits.idle;
        if self.seen.load(Ordering::Acquire) {
            idle
        } else {
            idle.min(self.accepted + self.limits.first_request)
        }
    }

    /// The timer fired: whether the connection is due to close (else the timer is set again for
    /// the deadline as it stands now: a request came, or traffic moved it).
    fn due(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            let deadline = self.deadline();
            if Instant::now() >= deadline {
                let why = if self.seen.load(Ordering::Acquire) {
                    "idle"
                } else {
                    "no_request"
                };
                metrics::counter!("optout_connections_idle_closed_total", "why" => why)
                    .increment(1);
                tracing::debug!(why, "closing a connection");
                return true;
            }
            self.timer.as_mut().reset(deadline);
        }
    }
}

impl Connected for Limited {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Limited {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let this = &mut *self;
                this.touch(&buf.filled()[before..]);
                Poll::Ready(Ok(()))
            }
            // Idle too long, or no request in time: read as closed, so HTTP/2 closes it.
            Poll::Pending if self.due(cx) => Poll::Ready(Ok(())),
            other => other,
        }
    }
}

impl AsyncWrite for Limited {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written {
            self.touch(&buf[..n]);
        }
        written
    }

    /// Vectored, as the TCP stream is: HTTP/2 then writes frame headers and bodies without
    /// copying them together first.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = written {
            // The bytes written, as far as telling a lone PING apart needs: the first slice
            // when exactly it went out, else "more than a PING".
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &b[..]);
            if n == first.len() {
                self.touch(first);
            } else if n > 0 {
                self.active();
            }
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::is_ping;

    #[test]
    fn only_a_lone_ping_frame_is_keepalive() {
        let mut ping = vec![0, 0, 8, 6, 0, 0, 0, 0, 0];
        ping.extend_from_slice(&[1; 8]);
        assert!(is_ping(&ping));
        let mut ack = ping.clone();
        ack[4] = 1;
        assert!(is_ping(&ack));
        let mut data = ping.clone();
        data[3] = 0;
        assert!(!is_ping(&data));
        ping.push(0);
        assert!(!is_ping(&ping));
    }
}

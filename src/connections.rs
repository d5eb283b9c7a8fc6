//! What one client connection may hold: a place among the replica's `--max-connections`, and
//! its socket only while it is used (`--idle-timeout-secs`).
//!
//! Why here and not in tonic: tonic bounds requests (`timeout`, streams per connection) and
//! connection age, but neither the number of connections nor how long one may sit idle; a client
//! that opens thousands of connections, or keeps them open unused, would hold the replica's
//! sockets and memory. Both are enforced on the accepted TCP stream, below HTTP/2.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::{Stream, StreamExt};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The accepted connections, at most `max` at once: past the cap a new connection is closed as
/// soon as it is accepted (counted and logged). Each closes after `idle` without traffic.
pub fn limited(
    accepted: impl Stream<Item = Result<TcpStream, io::Error>> + Send + 'static,
    max: usize,
    idle: Duration,
) -> impl Stream<Item = Result<Limited, io::Error>> + Send + 'static {
    let permits = Arc::new(Semaphore::new(max.max(1)));
    accepted.filter_map(move |accepted| {
        let permits = permits.clone();
        async move {
            let stream = match accepted {
                Ok(s) => s,
                Err(e) => return Some(Err(e)),
            };
            match permits.try_acquire_owned() {
                Ok(permit) => Some(Ok(Limited {
                    stream,
                    _permit: permit,
                    idle,
                    timer: Box::pin(tokio::time::sleep(idle)),
                })),
                Err(_) => {
                    metrics::counter!("optout_connections_refused_total").increment(1);
                    tracing::warn!(max, "connection limit reached; closing a new connection");
                    None
                }
            }
        }
    })
}

/// An accepted connection: holds one of the replica's connection permits until it closes, and
/// reads as closed once it has been idle too long.
pub struct Limited {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    idle: Duration,
    /// Fires `idle` after the last traffic.
    timer: Pin<Box<Sleep>>,
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
        let at = Instant::now() + self.idle;
        self.timer.as_mut().reset(at);
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
            Poll::Pending if self.timer.as_mut().poll(cx).is_ready() => {
                // Idle too long: read as closed, so HTTP/2 closes the connection.
                metrics::counter!("optout_connections_idle_closed_total").increment(1);
                tracing::debug!("closing a connection idle for longer than the idle timeout");
                Poll::Ready(Ok(()))
            }
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

//! Writes to a TCP socket with send(2) whenever a vectored write carries
//! only one buffer.
//!
//! rustls hands its records to the socket as a vectored write, and the
//! upstream exchange writes a request's head and body the same way; most of
//! the time there is a single buffer. Through writev(2) each such write pays
//! the VFS layer's per-call work (file-position lock, permission and
//! fsnotify hooks, importing the iovec array) before reaching the socket;
//! send(2), which std's `TcpStream::write` uses, goes to the socket
//! directly. Two writes per proxied request take this path (HAProxy uses
//! send(2) for the same reason).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// One write of `bufs`: send(2) when at most one of them has bytes, else writev(2).
pub fn poll_write_slices<W: AsyncWrite + ?Sized>(
    tcp: Pin<&mut W>,
    cx: &mut Context<'_>,
    bufs: &[IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    let mut non_empty = bufs.iter().filter(|buf| !buf.is_empty());
    match (non_empty.next(), non_empty.next()) {
        (Some(only), None) => tcp.poll_write(cx, only),
        (None, _) => Poll::Ready(Ok(0)),
        (Some(_), Some(_)) => tcp.poll_write_vectored(cx, bufs),
    }
}

/// A client's TCP socket under TLS: a `TcpStream` whose vectored writes go
/// through [`poll_write_slices`], and which sends a new connection's TLS
/// 1.3 session tickets together with the first answer.
///
/// rustls queues the tickets the moment it reads the client's Finished, and
/// tokio-rustls flushes them before the handshake future completes: one
/// more send(2) per connection, and one more wake-up of a client that only
/// waits for its answer (nginx writes them alone too). So writes
/// made during the handshake are held, and leave as soon as the handshake
/// would otherwise wait for the client (its next read finds nothing): the
/// server's flight goes out exactly when it did before. What the finished
/// handshake leaves behind, the tickets, may then wait for the first write,
/// shutdown or close after it, when the caller knows the client is not
/// waiting for them (see [`ClientSocket::handshake_done`]).
///
/// It also tells a plain-HTTP client on the HTTPS port from a TLS one by
/// the first byte read, rather than by peeking at it with a system call of
/// its own: a TLS client's is 0x16 (a handshake record), an HTTP method's an
/// upper-case letter. That read fails, so the handshake stops before rustls
/// answers with an alert the client cannot read, and
/// [`ClientSocket::spoke_plain_http`] says why.
pub struct ClientSocket {
    tcp: TcpStream,
    /// Close with a reset, without draining what the client still sends.
    reset: bool,
    /// The client's FIN was read: nothing it sent is left unread, so the
    /// close needs neither a lingering drain nor a separate shutdown(2)
    /// (close(2) sends our FIN after what is queued all the same).
    read_closed: bool,
    /// TLS records written but not yet sent (see above).
    held: Vec<u8>,
    /// Until [`ClientSocket::handshake_done`]: every write is held, and
    /// leaves when a read would wait. After it, what is still held leaves
    /// ahead of the next write.
    handshaking: bool,
    /// Nothing has been read yet: the first byte is still to be checked.
    first_read: bool,
    /// The first byte read began an HTTP method, not a TLS record.
    plain_http: bool,
}

impl ClientSocket {
    pub fn new(tcp: TcpStream) -> Self {
        ClientSocket {
            tcp,
            reset: false,
            read_closed: false,
            held: Vec::new(),
            handshaking: true,
            first_read: true,
            plain_http: false,
        }
    }

    /// The client spoke plain HTTP: its first read failed (see above).
    pub fn spoke_plain_http(&self) -> bool {
        self.plain_http
    }

    /// Called once the TLS handshake is complete: what is still held leaves
    /// with the next write, shutdown or close, or now with [`Self::send_held`].
    pub fn handshake_done(&mut self) {
        self.handshaking = false;
    }

    /// Sends what is held now.
    pub async fn send_held(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_send_held(cx)).await
    }

    /// Sends what is held; `Ready(Ok)` once it is all gone.
    fn poll_send_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.held.is_empty() {
            match Pin::new(&mut self.tcp).poll_write(cx, &self.held) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.held.drain(..n);
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if !self.handshaking {
            // Never needed again: give its capacity back.
            self.held = Vec::new();
        }
        Poll::Ready(Ok(()))
    }

    /// Writes `bufs` after what is held (there is some), in one system
    /// call when it can.
    fn poll_write_after_held(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if bufs.iter().any(|buf| !buf.is_empty()) {
            let mut slices = Vec::with_capacity(bufs.len() + 1);
            slices.push(IoSlice::new(&self.held));
            slices.extend(bufs.iter().map(|buf| IoSlice::new(buf)));
            let written = ready!(Pin::new(&mut self.tcp).poll_write_vectored(cx, &slices))?;
            if written > self.held.len() {
                let ours = written - self.held.len();
                self.held = Vec::new();
                return Poll::Ready(Ok(ours));
            }
            self.held.drain(..written);
        }
        ready!(self.poll_send_held(cx))?;
        poll_write_slices(Pin::new(&mut self.tcp), cx, bufs)
    }
}

/// A client connection that can be told to end with a TCP reset: an
/// abusive client gets no lingering close ([`crate::linger`]), which would
/// keep reading its flood for seconds after the proxy has given up on it.
pub trait ResetOnClose {
    fn reset_on_close(&mut self);
}

impl ResetOnClose for ClientSocket {
    fn reset_on_close(&mut self) {
        self.reset = true;
    }
}

impl ResetOnClose for tokio_rustls::server::TlsStream<ClientSocket> {
    fn reset_on_close(&mut self) {
        self.get_mut().0.reset_on_close();
    }
}

impl Drop for ClientSocket {
    fn drop(&mut self) {
        if self.reset {
            // SO_LINGER 0: the close sends a reset and discards what is queued.
            let _ = socket2::SockRef::from(&self.tcp).set_linger(Some(std::time::Duration::ZERO));
        } else if !self.read_closed {
            if !self.held.is_empty() {
                // Best effort: a handshake's last records (an alert, say)
                // that never met a read or write after them.
                let _ = self.tcp.try_write(&self.held);
            }
            crate::linger::before_close(&self.tcp);
        }
    }
}

impl AsyncRead for ClientSocket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let room = buf.remaining();
        let start = buf.filled().len();
        let polled = Pin::new(&mut self.tcp).poll_read(cx, buf);
        match polled {
            Poll::Ready(Ok(())) if room > 0 && buf.remaining() == room => self.read_closed = true,
            Poll::Ready(Ok(())) if self.first_read && buf.filled().len() > start => {
                self.first_read = false;
                if buf.filled()[start].is_ascii_uppercase() {
                    self.plain_http = true;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "plain HTTP on the HTTPS port",
                    )));
                }
            }
            Poll::Pending if self.handshaking && !self.held.is_empty() => {
                // About to wait for the client: what it waits for goes now.
                if let Poll::Ready(Err(error)) = self.poll_send_held(cx) {
                    return Poll::Ready(Err(error));
                }
            }
            _ => {}
        }
        polled
    }
}

impl AsyncWrite for ClientSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.handshaking {
            for buf in bufs {
                this.held.extend_from_slice(buf);
            }
            Poll::Ready(Ok(bufs.iter().map(|buf| buf.len()).sum()))
        } else if !this.held.is_empty() {
            this.poll_write_after_held(cx, bufs)
        } else {
            poll_write_slices(Pin::new(&mut this.tcp), cx, bufs)
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Not what is held: hyper flushes on every turn, and the tickets are
        // to wait for an answer. Nothing the caller needs delivered is held
        // (the handshake's own flight leaves before any wait for the client).
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send_held(cx))?;
        if self.read_closed {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// `AsyncWrite` for a wrapper that only watches what is read: every write
/// goes to its `io` field unchanged. `pass_writes_through!(Wrapper<IO>)`,
/// or `pass_writes_through!(Wrapper<IO>, ExtraBound)` when the wrapper's
/// `IO` needs one more bound.
macro_rules! pass_writes_through {
    ($wrapper:ident<IO> $(, $bound:path)?) => {
        impl<IO: $($bound +)? tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $wrapper<IO> {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
            }

            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
            }

            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.io.is_write_vectored()
            }
        }
    };
}
pub(crate) use pass_writes_through;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (ClientSocket, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        (ClientSocket::new(accepted.unwrap().0), client.unwrap())
    }

    #[tokio::test]
    async fn a_first_byte_that_begins_an_http_method_fails_the_read() {
        let (mut socket, mut peer) = pair().await;
        peer.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let error = socket.read(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(socket.spoke_plain_http());
    }

    #[tokio::test]
    async fn only_the_first_byte_decides() {
        let (mut socket, mut peer) = pair().await;
        peer.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
        let mut buf = [0u8; 3];
        socket.read_exact(&mut buf).await.unwrap();
        peer.write_all(b"GET").await.unwrap();
        socket.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"GET");
        assert!(!socket.spoke_plain_http());
    }

    #[tokio::test]
    async fn every_shape_of_vectored_write_arrives_in_order() {
        let (mut socket, mut peer) = pair().await;
        let shapes: [&[&[u8]]; 4] = [
            &[b"one"],
            &[b"", b"two", b""],
            &[b"th", b"", b"ree"],
            &[b"", b""],
        ];
        let mut expected = Vec::new();
        for shape in shapes {
            let slices: Vec<IoSlice<'_>> = shape.iter().map(|s| IoSlice::new(s)).collect();
            let total: usize = shape.iter().map(|s| s.len()).sum();
            let written =
                std::future::poll_fn(|cx| Pin::new(&mut socket).poll_write_vectored(cx, &slices))
                    .await
                    .unwrap();
            assert_eq!(written, total, "loopback takes a few bytes whole");
            expected.extend(shape.iter().flat_map(|s| s.iter().copied()));
        }
        socket.shutdown().await.unwrap();
        let mut received = Vec::new();
        peer.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, expected);
        assert_eq!(received, b"onetwothree");
    }

    /// Writes through `socket`'s `AsyncWrite` as tokio-rustls does mid-handshake.
    async fn write_during_handshake(socket: &mut ClientSocket, bytes: &[u8]) {
        let written = std::future::poll_fn(|cx| {
            Pin::new(&mut *socket).poll_write_vectored(cx, &[IoSlice::new(bytes)])
        })
        .await
        .unwrap();
        assert_eq!(written, bytes.len());
    }

    #[tokio::test]
    async fn the_handshake_flight_leaves_when_a_read_would_wait() {
        let (mut socket, mut peer) = pair().await;
        write_during_handshake(&mut socket, b"server flight").await;
        let mut flight = [0u8; 13];
        let mut nothing = [0u8; 16];
        let got = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::select! {
                read = socket.read(&mut nothing) => panic!("the peer sent nothing: {read:?}"),
                got = peer.read_exact(&mut flight) => got,
            }
        })
        .await
        .expect("the held flight was sent when the read had to wait");
        got.unwrap();
        assert_eq!(&flight, b"server flight");
    }

    /// The tickets held past the handshake go out ahead of the answer, and
    /// both arrive whole and in order however the socket splits the
    /// writes: more is held than the socket takes at once, so both the
    /// held bytes and the answer go out in parts.
    #[tokio::test]
    async fn held_records_and_a_large_answer_arrive_whole_and_in_order() {
        let (mut socket, mut peer) = pair().await;
        socket2::SockRef::from(&socket.tcp)
            .set_send_buffer_size(64 * 1024)
            .unwrap();
        let held: Vec<u8> = (0..4 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let answer: Vec<u8> = (0..4 * 1024 * 1024).map(|i| (i % 241) as u8).collect();
        write_during_handshake(&mut socket, &held).await;
        socket.handshake_done();
        let mut received = Vec::new();
        let (written, read) = tokio::time::timeout(Duration::from_secs(20), async {
            tokio::join!(
                async {
                    socket.write_all(&answer).await?;
                    socket.shutdown().await
                },
                peer.read_to_end(&mut received)
            )
        })
        .await
        .expect("everything delivered within 20 s");
        written.unwrap();
        read.unwrap();
        assert_eq!(received.len(), held.len() + answer.len());
        assert!(
            received[..held.len()] == held[..],
            "the held bytes come first"
        );
        assert!(
            received[held.len()..] == answer[..],
            "then the answer, in order"
        );
    }
}

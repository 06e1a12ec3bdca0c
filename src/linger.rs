//! Lingering close: a client connection closed while the client's bytes
//! wait unread is half-closed and drained for a moment instead of closed.
//!
//! When a socket is closed with unread bytes in its receive queue, the
//! kernel answers with a reset rather than a FIN (RFC 1122 §4.2.2.13) and
//! drops whatever of the proxy's answer it had not yet sent; the client,
//! still writing its upload, then sees a broken pipe instead of the early
//! 413 (or upstream answer) it was sent. nginx (`lingering_close`) and
//! Apache do the same: shut the write side, read and discard what the client
//! still sends for a bounded time, then close.
//!
//! Bounded three ways so it cannot be used to hold resources: at most
//! [`MAX_LINGERING`] sockets at once per process (past that, a plain close),
//! [`LINGER_QUIET`] without a byte ends it, and [`LINGER_TOTAL`] ends it in
//! any case.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

pub const MAX_LINGERING: usize = 1024;
pub const LINGER_QUIET: Duration = Duration::from_secs(1);
pub const LINGER_TOTAL: Duration = Duration::from_secs(5);

static LINGERING: AtomicUsize = AtomicUsize::new(0);

/// Called as `tcp` is about to be closed: when the client has sent bytes
/// nobody read, keeps the socket open (half-closed) on a task of its own
/// that drains it. A connection the client closed, or with nothing unread,
/// is left to the plain close.
pub fn before_close(tcp: &TcpStream) {
    let mut probe = [0u8; 1];
    match tcp.try_read(&mut probe) {
        Ok(n) if n > 0 => {}
        _ => return,
    }
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if LINGERING.fetch_add(1, Ordering::Relaxed) >= MAX_LINGERING {
        LINGERING.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    // A second descriptor keeps the socket alive once the original is closed.
    let Ok(fd) = tcp.as_fd().try_clone_to_owned() else {
        LINGERING.fetch_sub(1, Ordering::Relaxed);
        return;
    };
    handle.spawn(async move {
        let guard = Lingering;
        if let Ok(tcp) = TcpStream::from_std(std::net::TcpStream::from(fd)) {
            drain(tcp).await;
        }
        drop(guard);
    });
}

struct Lingering;

impl Drop for Lingering {
    fn drop(&mut self) {
        LINGERING.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn drain(mut tcp: TcpStream) {
    // The FIN goes out after everything already queued: the answer is sent whole.
    if socket2::SockRef::from(&tcp)
        .shutdown(std::net::Shutdown::Write)
        .is_err()
    {
        return;
    }
    let mut sink = vec![0u8; 16 * 1024];
    let _ = tokio::time::timeout(LINGER_TOTAL, async {
        loop {
            match tokio::time::timeout(LINGER_QUIET, tcp.read(&mut sink)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        (accepted.unwrap().0, client.unwrap())
    }

    /// Waits until `tcp` has bytes to read (the peer's write has arrived).
    async fn readable(tcp: &TcpStream) {
        tokio::time::timeout(Duration::from_secs(5), tcp.readable())
            .await
            .expect("the peer's bytes arrive")
            .unwrap();
    }

    #[tokio::test]
    async fn an_answer_written_before_closing_on_unread_bytes_reaches_a_client_still_writing() {
        let (mut server, mut client) = pair().await;
        client.write_all(b"upload part one").await.unwrap();
        readable(&server).await;
        server.write_all(b"413 answer").await.unwrap();
        before_close(&server);
        drop(server);

        // The client keeps writing: no reset, its writes succeed while the
        // proxy drains, and it reads the answer and then a clean end.
        for _ in 0..16 {
            client.write_all(&[b'u'; 4096]).await.unwrap();
        }
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"413 answer");
    }
}

//! The byte stream to one upstream server: TCP, or a Unix socket (the way
//! gunicorn and uWSGI apps are usually run behind a proxy on the same host).
//! Both read and write the same way; only connecting differs.

use std::io::{self, IoSlice};
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::config::ServerAddress;

pub enum UpstreamStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl UpstreamStream {
    /// Connects to `server` (no timeout: the caller bounds it).
    pub async fn connect(server: &ServerAddress) -> io::Result<UpstreamStream> {
        match server {
            ServerAddress::Tcp(authority) => {
                let port = authority.port_u16().unwrap_or(80);
                let host = authority
                    .host()
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                let tcp = TcpStream::connect((host, port)).await?;
                // Best effort: a socket without these options still works.
                let _ = tcp.set_nodelay(true);
                let _ = SockRef::from(&tcp)
                    .set_tcp_keepalive(&TcpKeepalive::new().with_time(Duration::from_secs(60)));
                Ok(UpstreamStream::Tcp(tcp))
            }
            ServerAddress::Unix(path) => Ok(UpstreamStream::Unix(connect_unix(path).await?)),
        }
    }

    /// A read that never waits: `WouldBlock` when nothing has arrived.
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            UpstreamStream::Tcp(tcp) => tcp.try_read(buf),
            UpstreamStream::Unix(unix) => unix.try_read(buf),
        }
    }
}

async fn connect_unix(path: &Path) -> io::Result<UnixStream> {
    UnixStream::connect(path).await
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(tcp) => Pin::new(tcp).poll_read(cx, buf),
            UpstreamStream::Unix(unix) => Pin::new(unix).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Tcp(tcp) => Pin::new(tcp).poll_write(cx, buf),
            UpstreamStream::Unix(unix) => Pin::new(unix).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Tcp(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            UpstreamStream::Unix(unix) => Pin::new(unix).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(tcp) => Pin::new(tcp).poll_flush(cx),
            UpstreamStream::Unix(unix) => Pin::new(unix).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(tcp) => Pin::new(tcp).poll_shutdown(cx),
            UpstreamStream::Unix(unix) => Pin::new(unix).poll_shutdown(cx),
        }
    }
}

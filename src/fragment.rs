//! STUB
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
#[derive(Clone, Default)]
pub struct FragmentLog;
impl FragmentLog {
    pub fn new() -> Self {
        FragmentLog
    }
    pub fn had_fragment(&self, _i: u64) -> bool {
        false
    }
}
pub struct FragmentSniffer<IO> {
    io: IO,
}
impl<IO> FragmentSniffer<IO> {
    pub fn new(io: IO, _log: FragmentLog) -> Self {
        FragmentSniffer { io }
    }
    pub fn get_ref(&self) -> &IO {
        &self.io
    }
}
impl<IO: AsyncRead + Unpin> AsyncRead for FragmentSniffer<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}
impl<IO: AsyncWrite + Unpin> AsyncWrite for FragmentSniffer<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, b)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

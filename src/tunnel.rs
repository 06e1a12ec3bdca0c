//! The WebSocket tunnel: once the upstream has answered `101`, the client's
//! connection and the upstream's are joined and bytes flow both ways
//! untouched, until either side closes — or the tunnel goes quiet for
//! `websocket_idle_timeout`, or a write to the client makes no progress for
//! `send_timeout` (a client that stopped reading would otherwise hold the
//! upstream connection, and its slot, for ever).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::connection::Activity;
use crate::upstream::UpstreamUpgrade;

/// How long a tunnel may be quiet, and a write to the client stalled.
#[derive(Debug, Clone, Copy)]
pub struct TunnelTimeouts {
    pub idle: Duration,
    pub send: Duration,
}

/// Joins the client's and the upstream's upgraded connections, on a task of
/// its own. `activity` is the client connection's: its writes tell a
/// stalled client.
pub fn spawn(
    client: hyper::upgrade::OnUpgrade,
    upstream: UpstreamUpgrade,
    activity: Arc<Activity>,
    timeouts: TunnelTimeouts,
) {
    tokio::spawn(async move {
        let client = match client.await {
            Ok(client) => client,
            Err(error) => {
                tracing::debug!(%error, "upgrade failed");
                return;
            }
        };
        let mut client = hyper_util::rt::TokioIo::new(client);
        let UpstreamUpgrade { stream, early_data } = upstream;
        let started = Instant::now();
        let last_moved = Arc::new(AtomicU64::new(0));
        let mut upstream = Watched {
            stream,
            started,
            last_moved: last_moved.clone(),
        };
        let joined = async {
            if !early_data.is_empty() {
                tokio::io::AsyncWriteExt::write_all(&mut client, &early_data).await?;
            }
            tokio::io::copy_bidirectional(&mut client, &mut upstream).await
        };
        tokio::select! {
            result = joined => {
                if let Err(error) = result {
                    tracing::debug!(%error, "tunnel closed");
                }
            }
            why = watch(started, &last_moved, &activity, timeouts) => {
                tracing::debug!(why, "tunnel closed");
            }
        }
    });
}

/// Resolves when the tunnel has been quiet too long or its client has
/// stopped reading; says which.
async fn watch(
    started: Instant,
    last_moved: &AtomicU64,
    activity: &Activity,
    timeouts: TunnelTimeouts,
) -> &'static str {
    loop {
        let quiet_until =
            started + Duration::from_millis(last_moved.load(Ordering::Relaxed)) + timeouts.idle;
        let stalled_until = activity.send_deadline(timeouts.send);
        let now = Instant::now();
        if quiet_until <= now {
            return "websocket_idle_timeout";
        }
        if stalled_until.is_some_and(|at| at <= now) {
            return "send_timeout";
        }
        // A stall can begin while this sleeps: look again at least that often.
        let next = stalled_until
            .unwrap_or(quiet_until)
            .min(quiet_until)
            .min(now + timeouts.send);
        tokio::time::sleep_until(next).await;
    }
}

/// The upstream side, noting when bytes last moved either way: everything
/// the client sends is written here, everything it receives is read here.
struct Watched {
    stream: crate::upstream::UpstreamStream,
    started: Instant,
    last_moved: Arc<AtomicU64>,
}

impl Watched {
    fn moved(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_moved.store(ms, Ordering::Relaxed);
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.moved();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.moved();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

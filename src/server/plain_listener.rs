//! Accepting on the two small plain-HTTP listeners, the redirect listener
//! and the admin listener. Each has its own connection cap: a permit is
//! taken before `accept`, so connections past the cap wait in the kernel
//! backlog, and a flood on port 80 (or on the admin port) cannot take the
//! file descriptors and memory the HTTPS listener needs. Both also close a
//! connection that sends no request head within their header-read timeout
//! (hyper's, set where each serves its connections).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// Connections the redirect listener serves at once (never more than
/// `max_connections`): browsers open a few each, and every one is answered
/// with a single 308.
pub const REDIRECT_MAX_CONNECTIONS: usize = 1024;
/// Connections the admin listener serves at once (never more than
/// `max_connections`): a scraper and a probe or two.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

/// A listener's permits: its own cap, and never more than the HTTPS
/// listener's `max_connections`.
pub fn permits(cap: usize, max_connections: usize) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(cap.min(max_connections).max(1)))
}

/// The next connection, with the permit it holds for its life; `None` once
/// the proxy shuts down.
pub async fn accept(
    listener: &TcpListener,
    permits: &Arc<Semaphore>,
    shutdown: &CancellationToken,
    which: &'static str,
) -> Option<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    let permit = tokio::select! {
        permit = permits.clone().acquire_owned() => permit.ok()?,
        () = shutdown.cancelled() => return None,
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => return Some((tcp, peer, permit)),
                Err(error) => {
                    // Out of descriptors, say: back off rather than spin.
                    tracing::warn!(%error, listener = which, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = shutdown.cancelled() => return None,
        }
    }
}

//! The upstream leg: pooled HTTP/1.1 keep-alive connections to the plain-HTTP
//! application, with the connect and response-head timeouts of `[upstream]`.
//!
//! One pool per worker thread: each worker runs its own single-threaded
//! runtime, so a connection and every request it carries stay on one thread
//! and the pool's lock is never contended. The pool is a stack of idle
//! sockets (most recently used first, so the warm ones are reused and the
//! cold ones age out).
//!
//! The exchange runs inside the request's own task: the request head is
//! written, the request body streamed and the response head read by one
//! future polling the socket directly, and the response body reads from the
//! same socket as the client's side of the proxy asks for more. A general
//! HTTP client puts each connection in a task of its own and reaches it over
//! channels; here that hand-off (two task wake-ups, a channel and a one-shot
//! per request) cost more CPU than the whole HTTP/1 codec, and the proxy only
//! ever needs one request at a time per connection. The wire format itself
//! is in `codec.rs`.
//!
//! A connection goes back on the stack when its response body has been read
//! to the end and nothing about the exchange makes it doubtful (an early
//! response to an unfinished request body, `Connection: close`, framing that
//! ends at close or was ambiguous); an upgraded connection becomes the
//! upstream half of the tunnel. A pooled connection the upstream closed while
//! it was idle is noticed before use (its socket reads as closed) or when the
//! request fails before any response byte; the request is then retried on
//! another connection if nothing of it can have been acted on: it was not
//! written at all, or it is idempotent and has no body.
//!
//! Files: `pool.rs` (the per-worker stack, checkout, connect, the retry of a
//! stale connection), `exchange.rs` (one request on one connection: writing
//! it, reading the response head), `response_body.rs` (the body read on from
//! the connection, and its return to the pool), `codec.rs` (the wire format).

// pub for fuzzing (fuzz/fuzz_targets/upstream_response.rs).
#[doc(hidden)]
pub mod codec;
mod exchange;
mod pool;
mod response_body;

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use tokio::net::TcpStream;

use crate::config::Upstream;
use crate::forward::ProxyFields;
use crate::policy::limits::is_body_too_large;
use crate::reject::{Rejection, UpstreamErrorKind};

use exchange::ExchangeError;
use pool::Pool;

pub use response_body::UpstreamResponseBody;

pub type UpstreamBody = crate::request_body::RequestBody;

/// What the pipeline hands to the upstream leg.
pub struct UpstreamRequest {
    /// The client's request as forwarded: normalized target, the client's
    /// headers less hop-by-hop and replaced ones.
    pub request: Request<UpstreamBody>,
    /// Host and X-Forwarded-*, written after the client's headers.
    pub fields: ProxyFields,
    /// A WebSocket upgrade: a 101 hands the connection to a tunnel.
    pub upgrade: bool,
}

#[derive(Clone)]
pub struct UpstreamClient {
    pool: Arc<Pool>,
}

/// The upstream's half of a WebSocket tunnel, taken from the body of a
/// `101 Switching Protocols` response ([`UpstreamResponseBody::take_upgrade`]).
pub struct UpstreamUpgrade {
    pub tcp: TcpStream,
    /// Bytes the upstream sent after its 101 head, already read: they belong
    /// to the tunnel.
    pub early_data: Bytes,
}

/// Why a request never got a response head.
#[derive(Debug)]
enum SendError {
    Connect(String),
    /// The request's own body failed (too large, or the client went away).
    Body(Box<dyn std::error::Error + Send + Sync>),
    Exchange(ExchangeError),
}

impl UpstreamClient {
    pub fn new(config: &Upstream) -> Self {
        UpstreamClient {
            pool: Arc::new(Pool::new(config)),
        }
    }

    /// Sends the request; the answer is the upstream's response head (the body
    /// streams on), or why the upstream failed as a [`Rejection`]. After a
    /// `101`, the body holds the connection as an [`UpstreamUpgrade`].
    pub async fn send(
        &self,
        request: UpstreamRequest,
    ) -> Result<Response<UpstreamResponseBody>, Rejection> {
        let sent = tokio::time::timeout(self.pool.timeout, self.pool.send(request)).await;
        let error = match sent {
            Err(_elapsed) => return Err(Rejection::Upstream(UpstreamErrorKind::Timeout)),
            Ok(Ok(response)) => return Ok(response),
            Ok(Err(error)) => error,
        };
        let (kind, text) = match error {
            SendError::Connect(text) => (UpstreamErrorKind::Connect, text),
            SendError::Body(error) => {
                if is_body_too_large(error.as_ref()) {
                    return Err(Rejection::BodyTooLarge);
                }
                tracing::debug!(%error, "the client stopped sending its request body");
                return Err(Rejection::ClientAborted);
            }
            SendError::Exchange(error) => (UpstreamErrorKind::Reset, error.to_string()),
        };
        tracing::warn!(error = %text, kind = kind.as_str(), "upstream request failed");
        Err(Rejection::Upstream(kind))
    }

    /// Closes connections idle for longer than `pool_idle_timeout`, and those
    /// the upstream has closed. Called periodically from any thread.
    pub fn sweep(&self) {
        self.pool.sweep();
    }

    /// Idle connections in the pool now (for tests and diagnostics).
    pub fn idle_connections(&self) -> usize {
        self.pool.idle_connections()
    }
}

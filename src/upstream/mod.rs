//! The upstream leg: pooled HTTP/1.1 keep-alive connections to the plain-HTTP
//! application's servers, over TCP or a Unix socket, with the connect and
//! response-head timeouts of `[upstream]`.
//!
//! A group (`[upstream]`, or `[upstreams.NAME]`) is one app's servers.
//! `group.rs` chooses a server for each request (`balance.rs`: least
//! request, round robin, random, or rendezvous hashing on the client's
//! address), sends it there, and tries another server when that failed and
//! the request is safe to send again. `health.rs` keeps whether each server
//! takes requests: active checks on a thread of their own, passive
//! ejections after failures seen by requests; workers share it through
//! atomics, never a lock taken per request.
//!
//! One pool per worker thread and server: each worker runs its own
//! single-threaded runtime, so a connection and every request it carries
//! stay on one thread and the pool's lock is never contended. The pool is a
//! stack of idle connections (most recently used first, so the warm ones are
//! reused and the cold ones age out).
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
//! Files: `group.rs` (groups, choosing and retrying), `balance.rs`,
//! `health.rs`, `pool.rs` (the per-worker stack, checkout, connect, the
//! retry of a stale connection), `stream.rs` (TCP or Unix socket),
//! `exchange.rs` (one request on one connection: writing it, reading the
//! response head), `response_body.rs` (the body read on from the
//! connection, and its return to the pool), `codec.rs` (the wire format).

// pub for fuzzing (fuzz/fuzz_targets/upstream_response.rs).
mod balance;
#[doc(hidden)]
pub mod codec;
mod exchange;
mod group;
mod health;
mod pool;
mod response_body;
mod stream;

use bytes::Bytes;
use http::Request;

use crate::forward::ProxyFields;

use exchange::ExchangeError;

pub use group::{MAX_SERVERS, Upstreams};
pub use response_body::UpstreamResponseBody;
pub use stream::UpstreamStream;

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

/// The upstream's half of a WebSocket tunnel, taken from the body of a
/// `101 Switching Protocols` response ([`UpstreamResponseBody::take_upgrade`]).
pub struct UpstreamUpgrade {
    pub stream: UpstreamStream,
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

//! The upstream leg: pooled HTTP/1.1 keep-alive connections to the plain-HTTP
//! application, with the connect and response-head timeouts of `[upstream]`.
//!
//! One pool per worker thread: each worker runs its own single-threaded
//! runtime, so a connection and every request it carries stay on one thread
//! and the pool's lock is never contended. The pool is a stack of hyper's
//! bare `http1::SendRequest`s (most recently used first, so the warm ones are
//! reused and the cold ones age out): hyper-util's general-purpose client
//! cost about a third of the proxy's CPU per request here, in checkout
//! futures, keyed maps and per-request clones that a single-upstream,
//! single-thread pool has no use for.
//!
//! A connection goes back on the stack when its response body has been read
//! to the end (then hyper has already made it ready for the next request); a
//! body dropped half-read takes its connection with it, as do upgrades.
//! A request that a pooled connection could not even start to send (the
//! upstream closed it while idle) is retried on another connection: nothing
//! of it reached the upstream, so this is safe for any method.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HOST;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

use crate::config::Upstream;
use crate::policy::limits::{LimitedBody, is_body_too_large};
use crate::reject::{Rejection, UpstreamErrorKind};

pub type UpstreamBody = LimitedBody<Incoming>;

type Sender = http1::SendRequest<UpstreamBody>;

/// Idle connections kept per worker; more are closed when they come back.
const MAX_IDLE_PER_WORKER: usize = 1024;

/// How many pooled connections a request tries before it opens a new one:
/// each try that fails found a connection the upstream had already closed.
const MAX_STALE_RETRIES: usize = 3;

#[derive(Clone)]
pub struct UpstreamClient {
    pool: Arc<Pool>,
}

struct Pool {
    /// `host:port` to connect to.
    address: String,
    /// Sent when the client's request carried no Host (HTTP/1.0).
    default_host: Option<HeaderValue>,
    connect_timeout: Duration,
    timeout: Duration,
    idle_timeout: Duration,
    idle: Mutex<Vec<IdleConnection>>,
}

struct IdleConnection {
    sender: Sender,
    since: Instant,
}

/// Why a request never got a response head.
enum SendError {
    Connect(String),
    Request(hyper::Error),
}

impl UpstreamClient {
    pub fn new(config: &Upstream) -> Self {
        let authority = &config.authority;
        let address = match authority.port_u16() {
            Some(_) => authority.as_str().to_owned(),
            None => format!("{}:80", authority.host()),
        };
        UpstreamClient {
            pool: Arc::new(Pool {
                default_host: HeaderValue::from_str(authority.as_str()).ok(),
                address,
                connect_timeout: config.connect_timeout,
                timeout: config.timeout,
                idle_timeout: config.pool_idle_timeout,
                idle: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Sends the request; the answer is the upstream's response head (the body
    /// streams on), or why the upstream failed as a [`Rejection`].
    pub async fn send(
        &self,
        mut request: Request<UpstreamBody>,
    ) -> Result<Response<UpstreamResponseBody>, Rejection> {
        if !request.headers().contains_key(HOST)
            && let Some(host) = &self.pool.default_host
        {
            request.headers_mut().insert(HOST, host.clone());
        }
        let sent = tokio::time::timeout(self.pool.timeout, self.pool.send(request)).await;
        let error = match sent {
            Err(_elapsed) => return Err(Rejection::Upstream(UpstreamErrorKind::Timeout)),
            Ok(Ok(response)) => return Ok(response),
            Ok(Err(error)) => error,
        };
        let (kind, text) = match error {
            SendError::Connect(text) => (UpstreamErrorKind::Connect, text),
            SendError::Request(error) => {
                if is_body_too_large(&error) {
                    return Err(Rejection::BodyTooLarge);
                }
                (UpstreamErrorKind::Reset, error_chain(&error))
            }
        };
        tracing::warn!(error = %text, kind = kind.as_str(), "upstream request failed");
        Err(Rejection::Upstream(kind))
    }

    /// Closes connections idle for longer than `pool_idle_timeout`, and those
    /// the upstream has closed. Called periodically from any thread.
    pub fn sweep(&self) {
        let now = Instant::now();
        let expired: Vec<IdleConnection> = {
            let mut idle = self.pool.lock();
            let (keep, expired) = std::mem::take(&mut *idle).into_iter().partition(|c| {
                !c.sender.is_closed() && now.duration_since(c.since) < self.pool.idle_timeout
            });
            *idle = keep;
            expired
        };
        // Dropped outside the lock: each ends a connection task.
        drop(expired);
    }

    /// Idle connections in the pool now (for tests and diagnostics).
    pub fn idle_connections(&self) -> usize {
        self.pool.lock().len()
    }
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, Vec<IdleConnection>> {
        // A panic while holding the lock cannot leave the stack inconsistent
        // (push and pop are the only operations): keep using it.
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn send(
        self: &Arc<Self>,
        mut request: Request<UpstreamBody>,
    ) -> Result<Response<UpstreamResponseBody>, SendError> {
        let mut stale_retries = 0;
        loop {
            let pooled = if stale_retries < MAX_STALE_RETRIES {
                self.checkout()
            } else {
                None
            };
            let reused = pooled.is_some();
            let mut sender = match pooled {
                Some(sender) => sender,
                // Boxed: connecting is the rare path, and its state (name
                // resolution, TCP connect, hyper's handshake) would otherwise
                // be part of every request's future, copied with it.
                None => Box::pin(self.connect()).await?,
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let keep = response.status() != StatusCode::SWITCHING_PROTOCOLS;
                    let give_back = keep.then(|| (sender, self.clone()));
                    return Ok(response.map(|body| UpstreamResponseBody { body, give_back }));
                }
                Err(mut error) => match error.take_message() {
                    Some(unsent) if reused => {
                        stale_retries += 1;
                        request = unsent;
                    }
                    _ => return Err(SendError::Request(error.into_error())),
                },
            }
        }
    }

    /// The most recently returned connection that is ready for a request.
    fn checkout(&self) -> Option<Sender> {
        let mut idle = self.lock();
        let mut now = None;
        while let Some(connection) = idle.pop() {
            if connection.sender.is_closed() {
                continue;
            }
            let now = *now.get_or_insert_with(Instant::now);
            if now.duration_since(connection.since) >= self.idle_timeout {
                continue;
            }
            if connection.sender.is_ready() {
                return Some(connection.sender);
            }
            // Still finishing its previous exchange (rare: connections come
            // back only after their body ends); leave it for later.
            idle.insert(0, connection);
            return None;
        }
        None
    }

    fn give_back(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        if idle.len() < MAX_IDLE_PER_WORKER {
            idle.push(IdleConnection {
                sender,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self) -> Result<Sender, SendError> {
        let tcp = match tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect(self.address.as_str()),
        )
        .await
        {
            Err(_elapsed) => {
                return Err(SendError::Connect(format!(
                    "connecting to {} timed out after {:?}",
                    self.address, self.connect_timeout
                )));
            }
            Ok(Err(error)) => {
                return Err(SendError::Connect(format!(
                    "cannot connect to {}: {error}",
                    self.address
                )));
            }
            Ok(Ok(tcp)) => tcp,
        };
        // Best effort: a socket without these options still works.
        let _ = tcp.set_nodelay(true);
        let _ = SockRef::from(&tcp)
            .set_tcp_keepalive(&TcpKeepalive::new().with_time(Duration::from_secs(60)));
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(SendError::Request)?;
        // On the worker's own runtime: the connection never changes threads.
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%error, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}

/// The upstream's response body; gives its connection back to the pool when
/// read to the end.
pub struct UpstreamResponseBody {
    body: Incoming,
    give_back: Option<(Sender, Arc<Pool>)>,
}

impl UpstreamResponseBody {
    fn release(&mut self) {
        if let Some((sender, pool)) = self.give_back.take() {
            pool.give_back(sender);
        }
    }
}

impl Body for UpstreamResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.body.is_end_stream() => self.release(),
            // An error leaves the connection unusable: it goes with the body.
            Poll::Ready(Some(Err(_))) => self.give_back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for UpstreamResponseBody {
    fn drop(&mut self) {
        // Bodies with nothing to read (HEAD, 204, 304) are often dropped
        // unpolled; their connection is as good as one read to the end.
        if self.body.is_end_stream() {
            self.release();
        }
    }
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut current = error.source();
    while let Some(e) = current {
        text.push_str(": ");
        text.push_str(&e.to_string());
        current = e.source();
    }
    text
}

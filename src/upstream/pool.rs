//! One server's pool on one worker: a stack of idle connections, most
//! recently used on top, and the loop that sends one request over it —
//! check a connection out (or connect a new one), run the exchange, and
//! retry on another connection when a pooled one turns out to have been
//! closed by the server and nothing of the request can have been acted on.
//! Whether a failed request may go to another server is left in
//! [`Outgoing::resendable`] for the group ([`super::group`]) to decide.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Response};
use http_body::Body;

use crate::config::{ServerAddress, Upstream};
use crate::forward::{HostField, ProxyFields};

use super::codec::{self, RequestFraming};
use super::exchange::{Exchange, ExchangeError};
use super::response_body::{self, UpstreamResponseBody};
use super::stream::UpstreamStream;
use super::{SendError, UpstreamBody, UpstreamRequest};

/// Idle connections kept per worker and server; more are closed when they come back.
const MAX_IDLE_PER_WORKER: usize = 1024;

/// How many pooled connections a request tries before it opens a new one:
/// each try that fails found a connection the upstream had already closed.
const MAX_STALE_RETRIES: usize = 3;

/// A head buffer larger than this (after an unusually large request head)
/// is not kept on an idle connection.
const MAX_KEPT_HEAD_BUFFER: usize = 4 * 1024;

pub(super) struct Pool {
    server: ServerAddress,
    connect_timeout: Duration,
    idle_timeout: Duration,
    idle: Mutex<Vec<IdleConnection>>,
    /// This worker's requests to this server not finished yet (their
    /// response body still streaming included): `least_request` compares it.
    pub(super) in_flight: AtomicUsize,
}

/// An upstream connection between exchanges: nothing unread, nothing owed.
pub(super) struct Connection {
    pub(super) stream: UpstreamStream,
    /// Bytes read and not yet consumed; empty (and unallocated) while idle.
    pub(super) read_buffer: BytesMut,
    /// Where request heads are encoded; kept between requests (a few hundred
    /// bytes) so that encoding one allocates nothing.
    head_buffer: Vec<u8>,
}

struct IdleConnection {
    connection: Connection,
    since: Instant,
}

/// One request on its way, kept whole between attempts on different
/// servers: its head is encoded once, and its body is only taken from once
/// an attempt starts streaming it (after which it is never sent again).
pub(super) struct Outgoing {
    parts: Parts,
    body: UpstreamBody,
    fields: ProxyFields,
    /// The group's `Host`, for a request that carried none (HTTP/1.0) only:
    /// cloning it for every request would bump a reference count that
    /// every worker shares.
    fallback_host: Option<HeaderValue>,
    framing: RequestFraming,
    head: Option<Vec<u8>>,
    /// Once the head is encoded the request's header map is free: the
    /// response's fields go into its memory.
    spare_headers: HeaderMap,
    upgrade: bool,
    /// Safe to send again after a server may have acted on it: GET, HEAD,
    /// OPTIONS, PUT or DELETE without a body.
    replayable: bool,
    /// After a failed attempt: whether another server may be sent it.
    pub(super) resendable: bool,
}

impl Outgoing {
    pub(super) fn new(
        UpstreamRequest {
            request,
            fields,
            upgrade,
        }: UpstreamRequest,
        default_host: &HeaderValue,
    ) -> Self {
        let (parts, body) = request.into_parts();
        let framing = if body.is_end_stream() {
            RequestFraming::Empty
        } else {
            match body.size_hint().exact() {
                Some(length) => RequestFraming::Length(length),
                None => RequestFraming::Chunked,
            }
        };
        let replayable = framing == RequestFraming::Empty && is_replayable(&parts.method);
        let fallback_host = matches!(fields.host, HostField::Missing).then(|| default_host.clone());
        Outgoing {
            parts,
            body,
            fields,
            fallback_host,
            framing,
            head: None,
            spare_headers: HeaderMap::new(),
            upgrade,
            replayable,
            resendable: false,
        }
    }

    pub(super) fn method(&self) -> &Method {
        &self.parts.method
    }
}

impl Pool {
    pub(super) fn new(server: ServerAddress, config: &Upstream) -> Self {
        Pool {
            server,
            connect_timeout: config.connect_timeout,
            idle_timeout: config.pool_idle_timeout,
            idle: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
        }
    }

    /// Whether this pool can serve `config`'s group as it is: a reload
    /// keeps it (and its warm connections) then.
    pub(super) fn fits(&self, server: &ServerAddress, config: &Upstream) -> bool {
        self.server == *server
            && self.connect_timeout == config.connect_timeout
            && self.idle_timeout == config.pool_idle_timeout
    }

    pub(super) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Closes connections idle for longer than `pool_idle_timeout`, and those
    /// the upstream has closed.
    pub(super) fn sweep(&self) {
        let now = Instant::now();
        let expired: Vec<IdleConnection> = {
            let mut idle = self.lock();
            let (keep, expired) = std::mem::take(&mut *idle).into_iter().partition(|c| {
                now.duration_since(c.since) < self.idle_timeout && c.connection.looks_open()
            });
            *idle = keep;
            expired
        };
        // Closed outside the lock.
        drop(expired);
    }

    pub(super) fn idle_connections(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<IdleConnection>> {
        // A panic while holding the lock cannot leave the stack inconsistent
        // (push and pop are the only operations): keep using it.
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// One attempt on this server. On failure, [`Outgoing::resendable`]
    /// says whether nothing of the request can have been acted on (or it is
    /// safe to act on twice), so another server may be sent it.
    /// Sends `out` on a pooled connection or a new one; `now` is the
    /// caller's clock reading for the request, which dates idle connections.
    pub(super) async fn send(
        self: &Arc<Self>,
        out: &mut Outgoing,
        now: Instant,
    ) -> Result<Response<UpstreamResponseBody>, SendError> {
        out.resendable = false;
        let mut stale_retries = 0;
        loop {
            let pooled = if stale_retries < MAX_STALE_RETRIES {
                self.checkout(now)
            } else {
                None
            };
            let reused = pooled.is_some();
            let mut connection = match pooled {
                Some(connection) => connection,
                // Boxed: connecting is the rare path, and its state would
                // otherwise be part of every request's future.
                None => match Box::pin(self.connect()).await {
                    Ok(connection) => connection,
                    Err(error) => {
                        out.resendable = true;
                        return Err(error);
                    }
                },
            };
            let Outgoing {
                parts,
                body,
                fields,
                fallback_host,
                framing,
                head,
                spare_headers,
                upgrade,
                replayable,
                resendable,
            } = &mut *out;
            let head = head.get_or_insert_with(|| {
                let mut buffer = std::mem::take(&mut connection.head_buffer);
                buffer.clear();
                let host = match &fields.host {
                    HostField::InMap => None,
                    HostField::Write(host) => Some(host),
                    HostField::Missing => fallback_host.as_ref(),
                };
                codec::encode_request_head(
                    &mut buffer,
                    &parts.method,
                    &parts.uri,
                    &parts.headers,
                    *framing,
                    &codec::ProxyFields {
                        host,
                        forwarded_for: &fields.forwarded_for,
                        forwarded_host: fields.forwarded_host.as_ref(),
                    },
                );
                *spare_headers = std::mem::take(&mut parts.headers);
                buffer
            });
            let mut exchange = Exchange::new(
                &mut connection,
                head,
                body,
                *framing,
                &parts.method,
                spare_headers,
            );
            let outcome = poll_fn(|cx| exchange.poll(cx)).await;
            let request_finished = exchange.request_finished();
            let (body_started, wrote_nothing) = (exchange.body_started, exchange.written == 0);
            let response_started = exchange.response_started;
            // Nothing reached the server, or what did is safe to repeat.
            let repeatable = !response_started && !body_started && (wrote_nothing || *replayable);
            match outcome {
                Ok(response_head) => {
                    connection.head_buffer = std::mem::take(head);
                    return response_body::response(
                        self,
                        connection,
                        response_head,
                        request_finished,
                        *upgrade,
                    );
                }
                Err(SendError::Exchange(error))
                    if reused && repeatable && is_connection_failure(&error) =>
                {
                    tracing::debug!(%error, "pooled upstream connection was stale; retrying");
                    stale_retries += 1;
                }
                Err(error) => {
                    *resendable = repeatable && matches!(error, SendError::Exchange(_));
                    return Err(error);
                }
            }
        }
    }

    /// The most recently returned connection that still looks usable.
    fn checkout(&self, now: Instant) -> Option<Connection> {
        let mut idle = self.lock();
        while let Some(idle_connection) = idle.pop() {
            if now.saturating_duration_since(idle_connection.since) >= self.idle_timeout {
                continue;
            }
            if idle_connection.connection.looks_open() {
                return Some(idle_connection.connection);
            }
        }
        None
    }

    pub(super) fn give_back(&self, mut connection: Connection) {
        // Unread bytes after a complete response: the upstream is confused.
        if !connection.read_buffer.is_empty() {
            return;
        }
        // The buffer's memory is shared with body pieces still on their way
        // to the client; an idle connection holds none.
        connection.read_buffer = BytesMut::new();
        if connection.head_buffer.capacity() > MAX_KEPT_HEAD_BUFFER {
            connection.head_buffer = Vec::new();
        }
        let mut idle = self.lock();
        if idle.len() < MAX_IDLE_PER_WORKER {
            idle.push(IdleConnection {
                connection,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self) -> Result<Connection, SendError> {
        let stream =
            match tokio::time::timeout(self.connect_timeout, UpstreamStream::connect(&self.server))
                .await
            {
                Err(_elapsed) => {
                    return Err(SendError::Connect(format!(
                        "connecting to {} timed out after {:?}",
                        self.server, self.connect_timeout
                    )));
                }
                Ok(Err(error)) => {
                    return Err(SendError::Connect(format!(
                        "cannot connect to {}: {error}",
                        self.server
                    )));
                }
                Ok(Ok(stream)) => stream,
            };
        Ok(Connection {
            stream,
            read_buffer: BytesMut::new(),
            head_buffer: Vec::new(),
        })
    }
}

impl Connection {
    /// False when the upstream has closed the idle connection (or sent bytes
    /// nobody asked for). Costs no system call while the socket has not
    /// become readable.
    fn looks_open(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Reads more into the buffer; `Ok(0)` is the upstream closing.
    pub(super) fn poll_read_more(
        &mut self,
        cx: &mut Context<'_>,
        reserve: usize,
    ) -> Poll<io::Result<usize>> {
        if self.read_buffer.capacity() - self.read_buffer.len() < reserve / 4 {
            self.read_buffer.reserve(reserve);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.read_buffer)
    }
}

/// Methods whose request, without a body, may reach a server twice (SPEC,
/// "Several upstream servers"; RFC 9110's idempotent methods less TRACE,
/// which nobody forwards on purpose).
fn is_replayable(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    )
}

/// Failures that mean the connection was dead, not that the upstream
/// answered something wrong.
fn is_connection_failure(error: &ExchangeError) -> bool {
    matches!(
        error,
        ExchangeError::Write(_) | ExchangeError::Read(_) | ExchangeError::Closed
    )
}

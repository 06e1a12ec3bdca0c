//! The per-worker pool: a stack of idle upstream connections, most recently
//! used on top, and the loop that sends one request over it — check a
//! connection out (or connect a new one), run the exchange, and retry on
//! another connection when a pooled one turns out to have been closed by the
//! upstream and nothing of the request can have been acted on.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use http::{HeaderMap, HeaderValue, Method, Response};
use http_body::Body;
use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

use crate::config::Upstream;
use crate::forward::HostField;

use super::codec::{self, RequestFraming};
use super::exchange::{Exchange, ExchangeError};
use super::response_body::{self, UpstreamResponseBody};
use super::{SendError, UpstreamRequest};

/// Idle connections kept per worker; more are closed when they come back.
const MAX_IDLE_PER_WORKER: usize = 1024;

/// How many pooled connections a request tries before it opens a new one:
/// each try that fails found a connection the upstream had already closed.
const MAX_STALE_RETRIES: usize = 3;

/// A head buffer larger than this (after an unusually large request head)
/// is not kept on an idle connection.
const MAX_KEPT_HEAD_BUFFER: usize = 4 * 1024;

pub(super) struct Pool {
    /// `host:port` to connect to.
    address: String,
    /// Sent when the client's request carried no Host (HTTP/1.0).
    default_host: Option<HeaderValue>,
    connect_timeout: Duration,
    pub(super) timeout: Duration,
    idle_timeout: Duration,
    idle: Mutex<Vec<IdleConnection>>,
}

/// An upstream connection between exchanges: nothing unread, nothing owed.
pub(super) struct Connection {
    pub(super) tcp: TcpStream,
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

impl Pool {
    pub(super) fn new(config: &Upstream) -> Self {
        let authority = &config.authority;
        let address = match authority.port_u16() {
            Some(_) => authority.as_str().to_owned(),
            None => format!("{}:80", authority.host()),
        };
        Pool {
            default_host: HeaderValue::from_str(authority.as_str()).ok(),
            address,
            connect_timeout: config.connect_timeout,
            timeout: config.timeout,
            idle_timeout: config.pool_idle_timeout,
            idle: Mutex::new(Vec::new()),
        }
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

    pub(super) async fn send(
        self: &Arc<Self>,
        UpstreamRequest {
            request,
            fields,
            upgrade,
        }: UpstreamRequest,
    ) -> Result<Response<UpstreamResponseBody>, SendError> {
        let (mut parts, mut body) = request.into_parts();
        let host = match &fields.host {
            HostField::InMap => None,
            HostField::Write(host) => Some(host),
            // Sent when the client's request carried no Host (HTTP/1.0).
            HostField::Missing => self.default_host.as_ref(),
        };
        let framing = if body.is_end_stream() {
            RequestFraming::Empty
        } else {
            match body.size_hint().exact() {
                Some(length) => RequestFraming::Length(length),
                None => RequestFraming::Chunked,
            }
        };
        // Idempotent and bodiless: the upstream can safely see it twice.
        let replayable = framing == RequestFraming::Empty && is_idempotent(&parts.method);
        // Encoded once, on the first connection's buffer; kept for retries.
        let mut head: Option<Vec<u8>> = None;
        // Once the head is encoded the request's header map is free: the
        // response's fields go into its memory.
        let mut spare_headers = HeaderMap::new();

        let mut stale_retries = 0;
        loop {
            let pooled = if stale_retries < MAX_STALE_RETRIES {
                self.checkout()
            } else {
                None
            };
            let reused = pooled.is_some();
            let mut connection = match pooled {
                Some(connection) => connection,
                // Boxed: connecting is the rare path, and its state would
                // otherwise be part of every request's future.
                None => Box::pin(self.connect()).await?,
            };
            let head = head.get_or_insert_with(|| {
                let mut buffer = std::mem::take(&mut connection.head_buffer);
                buffer.clear();
                codec::encode_request_head(
                    &mut buffer,
                    &parts.method,
                    &parts.uri,
                    &parts.headers,
                    framing,
                    &codec::ProxyFields {
                        host,
                        forwarded_for: &fields.forwarded_for,
                        forwarded_host: fields.forwarded_host.as_ref(),
                    },
                );
                spare_headers = std::mem::take(&mut parts.headers);
                buffer
            });
            let mut exchange = Exchange::new(
                &mut connection,
                head,
                &mut body,
                framing,
                &parts.method,
                &mut spare_headers,
            );
            let outcome = poll_fn(|cx| exchange.poll(cx)).await;
            let request_finished = exchange.request_finished();
            let (retry_allowed, body_started, wrote_nothing) =
                (replayable, exchange.body_started, exchange.written == 0);
            let response_started = exchange.response_started;
            match outcome {
                Ok(response_head) => {
                    connection.head_buffer = std::mem::take(head);
                    return response_body::response(
                        self,
                        connection,
                        response_head,
                        request_finished,
                        upgrade,
                    );
                }
                Err(SendError::Exchange(error))
                    if reused
                        && !response_started
                        && !body_started
                        && (wrote_nothing || retry_allowed)
                        && is_connection_failure(&error) =>
                {
                    tracing::debug!(%error, "pooled upstream connection was stale; retrying");
                    stale_retries += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// The most recently returned connection that still looks usable.
    fn checkout(&self) -> Option<Connection> {
        let mut idle = self.lock();
        let mut now = None;
        while let Some(idle_connection) = idle.pop() {
            let now = *now.get_or_insert_with(Instant::now);
            if now.duration_since(idle_connection.since) >= self.idle_timeout {
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
        Ok(Connection {
            tcp,
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
        matches!(self.tcp.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
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
        tokio_util::io::poll_read_buf(Pin::new(&mut self.tcp), cx, &mut self.read_buffer)
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
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

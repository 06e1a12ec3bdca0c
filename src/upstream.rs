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

mod codec;

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

use crate::config::Upstream;
use crate::forward::{HostField, ProxyFields};
use crate::policy::limits::is_body_too_large;
use crate::reject::{Rejection, UpstreamErrorKind};

use codec::{BodyFraming, ChunkedDecoder, Decoded, RequestFraming};

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

/// Idle connections kept per worker; more are closed when they come back.
const MAX_IDLE_PER_WORKER: usize = 1024;

/// How many pooled connections a request tries before it opens a new one:
/// each try that fails found a connection the upstream had already closed.
const MAX_STALE_RETRIES: usize = 3;

/// Read buffer reserved for a response: most heads and small bodies arrive
/// in one read.
const READ_BUFFER_BYTES: usize = 8 * 1024;
/// Reads of a large body.
const BODY_READ_BYTES: usize = 32 * 1024;
/// A head buffer larger than this (after an unusually large request head)
/// is not kept on an idle connection.
const MAX_KEPT_HEAD_BUFFER: usize = 4 * 1024;
/// Request body pieces queued for one vectored write.
const MAX_WRITE_SLICES: usize = 16;

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

/// An upstream connection between exchanges: nothing unread, nothing owed.
struct Connection {
    tcp: TcpStream,
    /// Bytes read and not yet consumed; empty (and unallocated) while idle.
    read_buffer: BytesMut,
    /// Where request heads are encoded; kept between requests (a few hundred
    /// bytes) so that encoding one allocates nothing.
    head_buffer: Vec<u8>,
}

struct IdleConnection {
    connection: Connection,
    since: Instant,
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

#[derive(Debug, thiserror::Error)]
enum ExchangeError {
    #[error("writing the request: {0}")]
    Write(io::Error),
    #[error("reading the response: {0}")]
    Read(io::Error),
    #[error("the upstream closed the connection before a response")]
    Closed,
    #[error("{0}")]
    Head(#[from] codec::HeadError),
    #[error("101 Switching Protocols to a request that asked for no upgrade")]
    UnaskedUpgrade,
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
                (
                    UpstreamErrorKind::Reset,
                    format!("reading the client's request body: {error}"),
                )
            }
            SendError::Exchange(error) => (UpstreamErrorKind::Reset, error.to_string()),
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
                now.duration_since(c.since) < self.pool.idle_timeout && c.connection.looks_open()
            });
            *idle = keep;
            expired
        };
        // Closed outside the lock.
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
            let mut exchange = Exchange {
                connection: &mut connection,
                head,
                head_written: 0,
                body: &mut body,
                framing,
                body_pending: Vec::new(),
                body_started: false,
                body_done: framing == RequestFraming::Empty,
                written: 0,
                response_started: false,
                method: &parts.method,
                spare_headers: &mut spare_headers,
                write_error: None,
            };
            let outcome = poll_fn(|cx| exchange.poll(cx)).await;
            let request_finished = exchange.request_finished();
            let (retry_allowed, body_started, wrote_nothing) =
                (replayable, exchange.body_started, exchange.written == 0);
            let response_started = exchange.response_started;
            match outcome {
                Ok(response_head) => {
                    connection.head_buffer = std::mem::take(head);
                    return self.response(connection, response_head, request_finished, upgrade);
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

    /// The response with its body reading on from `connection`.
    fn response(
        self: &Arc<Self>,
        connection: Connection,
        head: codec::ResponseHead,
        request_finished: bool,
        upgrade: bool,
    ) -> Result<Response<UpstreamResponseBody>, SendError> {
        let mut response = Response::new(UpstreamResponseBody::empty());
        *response.status_mut() = head.status;
        *response.version_mut() = head.version;
        *response.headers_mut() = head.headers;
        if head.status == StatusCode::SWITCHING_PROTOCOLS {
            if !upgrade {
                return Err(SendError::Exchange(ExchangeError::UnaskedUpgrade));
            }
            *response.body_mut() = UpstreamResponseBody {
                connection: Some(connection),
                decoding: Decoding::Upgraded,
                give_back: None,
            };
            return Ok(response);
        }
        // An upstream that answered before it had the whole request body
        // leaves the connection in an unknown state.
        let reusable = head.keep_alive && request_finished;
        let decoding = match head.framing {
            BodyFraming::Empty => Decoding::Done,
            BodyFraming::Length(0) => Decoding::Done,
            BodyFraming::Length(left) => Decoding::Length(left),
            BodyFraming::Chunked => Decoding::Chunked(ChunkedDecoder::default()),
            BodyFraming::UntilClose => Decoding::UntilClose,
        };
        let mut body = UpstreamResponseBody {
            connection: Some(connection),
            decoding,
            give_back: reusable.then(|| self.clone()),
        };
        if body.is_end_stream() {
            body.release();
        }
        *response.body_mut() = body;
        Ok(response)
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

    fn give_back(&self, mut connection: Connection) {
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
    fn poll_read_more(&mut self, cx: &mut Context<'_>, reserve: usize) -> Poll<io::Result<usize>> {
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

/// One request on one connection: writes the head and streams the body
/// while reading the response head, so an upstream that answers early (a
/// 413 before reading a large upload) is heard at once.
struct Exchange<'a> {
    connection: &'a mut Connection,
    head: &'a [u8],
    /// How much of `head` the socket has accepted.
    head_written: usize,
    body: &'a mut UpstreamBody,
    framing: RequestFraming,
    /// Body bytes (with chunk framing) taken from the client, not yet written.
    body_pending: Vec<Bytes>,
    body_started: bool,
    body_done: bool,
    /// Request bytes the socket has accepted.
    written: usize,
    response_started: bool,
    method: &'a Method,
    /// Memory for the response's header map.
    spare_headers: &'a mut HeaderMap,
    /// Why the request could not be written in full; the response is still
    /// read.
    write_error: Option<io::Error>,
}

impl Exchange<'_> {
    fn request_finished(&self) -> bool {
        self.head_written == self.head.len() && self.body_pending.is_empty() && self.body_done
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<codec::ResponseHead, SendError>> {
        if self.write_error.is_none() && !self.request_finished() {
            // Pending here only means the request waits (on the socket or the
            // client's body); the response may still come.
            match self.poll_write_request(cx) {
                // An upstream that answered and closed before taking the
                // whole request (a 413 to a large upload) makes the write
                // fail; its answer may be waiting to be read all the same.
                Poll::Ready(Err(SendError::Exchange(ExchangeError::Write(error)))) => {
                    self.write_error = Some(error);
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Ready(Ok(())) | Poll::Pending => {}
            }
        }
        match self.poll_read_head(cx) {
            // No answer after all: the write's failure is the one to report
            // (it decides whether a stale pooled connection is retried).
            Poll::Ready(Err(_)) if self.write_error.is_some() => {
                let error = self
                    .write_error
                    .take()
                    .unwrap_or_else(|| io::ErrorKind::BrokenPipe.into());
                Poll::Ready(Err(SendError::Exchange(ExchangeError::Write(error))))
            }
            polled => polled,
        }
    }

    fn poll_write_request(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        loop {
            let head_rest = &self.head[self.head_written..];
            if !head_rest.is_empty() || !self.body_pending.is_empty() {
                let written = {
                    let mut slices = [io::IoSlice::new(&[]); MAX_WRITE_SLICES + 1];
                    let mut count = 0;
                    if !head_rest.is_empty() {
                        slices[0] = io::IoSlice::new(head_rest);
                        count = 1;
                    }
                    for piece in self.body_pending.iter().take(MAX_WRITE_SLICES) {
                        slices[count] = io::IoSlice::new(piece);
                        count += 1;
                    }
                    ready!(crate::socket::poll_write_slices(
                        Pin::new(&mut self.connection.tcp),
                        cx,
                        &slices[..count]
                    ))
                    .map_err(|e| SendError::Exchange(ExchangeError::Write(e)))?
                };
                if written == 0 {
                    return Poll::Ready(Err(SendError::Exchange(ExchangeError::Write(
                        io::ErrorKind::WriteZero.into(),
                    ))));
                }
                self.written += written;
                self.consume_written(written);
                continue;
            }
            if self.body_done {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut *self.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    self.body_started = true;
                    // Trailers are not forwarded: few HTTP/1.1 upstreams read them.
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        if self.framing == RequestFraming::Chunked {
                            self.body_pending
                                .push(Bytes::from(format!("{:x}\r\n", data.len())));
                            self.body_pending.push(data);
                            self.body_pending.push(Bytes::from_static(b"\r\n"));
                        } else {
                            self.body_pending.push(data);
                        }
                    }
                }
                None => {
                    self.body_done = true;
                    if self.framing == RequestFraming::Chunked {
                        self.body_pending.push(Bytes::from_static(b"0\r\n\r\n"));
                    }
                }
                Some(Err(error)) => {
                    self.body_started = true;
                    return Poll::Ready(Err(SendError::Body(error)));
                }
            }
        }
    }

    fn consume_written(&mut self, mut written: usize) {
        let from_head = written.min(self.head.len() - self.head_written);
        self.head_written += from_head;
        written -= from_head;
        let mut whole = 0;
        for piece in &mut self.body_pending {
            if written == 0 {
                break;
            }
            let taken = written.min(piece.len());
            piece.advance(taken);
            written -= taken;
            if piece.is_empty() {
                whole += 1;
            }
        }
        self.body_pending.drain(..whole);
    }

    fn poll_read_head(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<codec::ResponseHead, SendError>> {
        loop {
            if !self.connection.read_buffer.is_empty() {
                self.response_started = true;
                match codec::parse_response_head(
                    &mut self.connection.read_buffer,
                    self.method,
                    self.spare_headers,
                ) {
                    Ok(Some(head))
                        if head.status.is_informational()
                            && head.status != StatusCode::SWITCHING_PROTOCOLS =>
                    {
                        // 100 Continue, 103 Early Hints: the final answer follows.
                        continue;
                    }
                    Ok(Some(head)) => return Poll::Ready(Ok(head)),
                    Ok(None) => {}
                    Err(error) => {
                        return Poll::Ready(Err(SendError::Exchange(error.into())));
                    }
                }
            }
            let read = ready!(self.connection.poll_read_more(cx, READ_BUFFER_BYTES))
                .map_err(|e| SendError::Exchange(ExchangeError::Read(e)))?;
            if read == 0 {
                return Poll::Ready(Err(SendError::Exchange(ExchangeError::Closed)));
            }
        }
    }
}

enum Decoding {
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
    Done,
    /// After a 101: no body; the connection is the tunnel's.
    Upgraded,
}

/// The upstream's response body, read from its connection as the client
/// side asks for it; gives the connection back to the pool when read to the
/// end.
pub struct UpstreamResponseBody {
    connection: Option<Connection>,
    decoding: Decoding,
    /// Set when the connection may carry another request afterwards.
    give_back: Option<Arc<Pool>>,
}

impl UpstreamResponseBody {
    fn empty() -> Self {
        UpstreamResponseBody {
            connection: None,
            decoding: Decoding::Done,
            give_back: None,
        }
    }

    /// The upstream connection after a `101 Switching Protocols`.
    pub fn take_upgrade(&mut self) -> Option<UpstreamUpgrade> {
        if !matches!(self.decoding, Decoding::Upgraded) {
            return None;
        }
        let mut connection = self.connection.take()?;
        Some(UpstreamUpgrade {
            early_data: connection.read_buffer.split().freeze(),
            tcp: connection.tcp,
        })
    }

    fn release(&mut self) {
        let connection = self.connection.take();
        if let (Some(connection), Some(pool)) = (connection, self.give_back.take()) {
            pool.give_back(connection);
        }
    }

    fn fail(&mut self, error: io::Error) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.give_back = None;
        self.connection = None;
        self.decoding = Decoding::Done;
        Poll::Ready(Some(Err(error)))
    }
}

fn invalid_data(error: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error.to_string())
}

impl Body for UpstreamResponseBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        loop {
            let Some(connection) = this.connection.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.decoding {
                Decoding::Upgraded => return Poll::Ready(None),
                Decoding::Done => {
                    this.release();
                    return Poll::Ready(None);
                }
                Decoding::Length(left) => {
                    let buffer = &mut connection.read_buffer;
                    if !buffer.is_empty() {
                        let take =
                            usize::try_from(*left).map_or(buffer.len(), |l| l.min(buffer.len()));
                        let data = buffer.split_to(take).freeze();
                        *left -= take as u64;
                        if *left == 0 {
                            this.decoding = Decoding::Done;
                            this.release();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Decoding::Chunked(decoder) => match decoder.decode(&mut connection.read_buffer) {
                    Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Decoded::Done) => {
                        this.decoding = Decoding::Done;
                        continue;
                    }
                    Ok(Decoded::NeedMore) => {}
                    Err(error) => return this.fail(invalid_data(error)),
                },
                Decoding::UntilClose => {
                    if !connection.read_buffer.is_empty() {
                        let data = connection.read_buffer.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
            }
            let Some(connection) = this.connection.as_mut() else {
                return Poll::Ready(None);
            };
            match ready!(connection.poll_read_more(cx, BODY_READ_BYTES)) {
                Ok(0) if matches!(this.decoding, Decoding::UntilClose) => {
                    this.decoding = Decoding::Done;
                    this.give_back = None;
                }
                Ok(0) => {
                    return this.fail(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the upstream closed the connection before the end of the body",
                    ));
                }
                Ok(_) => {}
                Err(error) => return this.fail(error),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.decoding, Decoding::Done | Decoding::Upgraded)
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoding {
            Decoding::Done | Decoding::Upgraded => SizeHint::with_exact(0),
            Decoding::Length(left) => SizeHint::with_exact(left),
            _ => SizeHint::default(),
        }
    }
}

//! `portcullis mock-upstream`: the built-in plain-HTTP application that
//! `portcullis demo` puts behind the proxy and integration tests forward to.
//!
//! Every request is answered with JSON describing what arrived (method, path,
//! query, headers, body size), so a test can see exactly what the proxy
//! forwarded. A few paths add behaviour a proxy must cope with:
//!
//! | path | answer |
//! |---|---|
//! | `/set-cookie?name=value&...` | the echo, plus one `Set-Cookie` per pair (percent-decoded) |
//! | `/headers?Name=value&...` | the echo, plus each pair (percent-decoded) as a response header; a name given twice is sent twice (framing headers → 400) |
//! | `/status/NNN` | the echo with that status (1xx or invalid → 400; no body for 204/304) |
//! | `/delay/MS` | the echo after MS milliseconds (at most 60 s) |
//! | `/download/BYTES` | BYTES of `application/octet-stream` (at most 1 GiB); byte `i` is `i % 256` |
//! | `/ws` | a WebSocket echo for a valid upgrade request, the echo otherwise |
//! | `/no-upgrade` | the echo (`200`) even for an upgrade request |
//!
//! Bodies are streamed both ways and never held whole, so tests can push and
//! pull tens of megabytes through the proxy. Every response carries
//! `x-mock-request-count` (requests seen by this server) and
//! `x-mock-connection-requests` (requests seen on this TCP connection), which
//! lets tests check that the proxy reuses upstream connections; and, as an
//! application would leak them, `Server` and `X-Powered-By` (unless
//! `/headers` names them), which the proxy's default `[headers] remove`
//! drops.
//!
//! [`serve_with`] can also hand every request to a recorder
//! ([`RecordedRequest`]: its head, body length and first 64 KiB of body),
//! which is how the integration tests see what the proxy forwarded.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde::Serialize;
use serde::ser::SerializeMap;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};

/// `/delay/MS` is capped so a typo cannot park a connection for hours.
const MAX_DELAY_MS: u64 = 60_000;
/// `/download/BYTES` is capped so a typo cannot stream forever.
const MAX_DOWNLOAD_BYTES: u64 = 1 << 30;
const CHUNK_BYTES: usize = 64 * 1024;
/// How long in-flight requests may run on after shutdown is asked for; a
/// pending `/delay/60000` must not hold up Ctrl-C for a minute.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Pause after a failed accept (typically EMFILE) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// How much of a request body a [`RecordedRequest`] keeps.
pub const RECORDED_BODY_BYTES: usize = 64 * 1024;
/// The `Server` header on every answer, as an application would send one.
pub const SERVER: &str = concat!("portcullis-mock-upstream/", env!("CARGO_PKG_VERSION"));
/// The `X-Powered-By` header on every answer, as a framework would add one.
pub const POWERED_BY: &str = "hyper";

/// Every download chunk is a slice of this one static buffer, so a download
/// allocates nothing per chunk. As the length is a multiple of 256, byte `i`
/// of any download is `i % 256` across chunk boundaries, which lets tests
/// check that nothing was lost or reordered.
static PATTERN: [u8; CHUNK_BYTES] = pattern();

const fn pattern() -> [u8; CHUNK_BYTES] {
    let mut bytes = [0u8; CHUNK_BYTES];
    let mut i = 0;
    while i < CHUNK_BYTES {
        bytes[i] = i as u8;
        i += 1;
    }
    bytes
}

/// One request as the mock received it, handed to [`Options::recorder`]
/// once its body has been read and before it is answered.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: Method,
    /// Path and query exactly as received on the wire.
    pub target: String,
    pub headers: HeaderMap,
    /// The whole body's length.
    pub body_len: u64,
    /// The body's first [`RECORDED_BODY_BYTES`] bytes.
    pub body: Vec<u8>,
    /// Which TCP connection it came on: 1 for the server's first, counted
    /// as connections are accepted.
    pub connection: u64,
}

/// Receives every request the mock answers (see [`RecordedRequest`]).
pub type Recorder = Arc<dyn Fn(RecordedRequest) + Send + Sync>;

/// What [`serve_with`] adds to [`serve`].
#[derive(Clone, Default)]
pub struct Options {
    /// Called with each request before it is answered. Bodies are still
    /// streamed: only their first [`RECORDED_BODY_BYTES`] are kept.
    pub recorder: Option<Recorder>,
    /// Counts the TCP connections accepted, whether or not a request came
    /// on them (and numbers [`RecordedRequest::connection`]): keep a clone
    /// to read it while the mock runs.
    pub connections: Arc<AtomicU64>,
}

/// State shared by every connection of one `serve` call.
struct Shared {
    /// Counted per server rather than per process so that tests running
    /// several servers in one process can make exact assertions; in the
    /// binary there is one server, so it is the process-wide count.
    requests: AtomicU64,
    /// Connections accepted so far, numbering [`RecordedRequest::connection`].
    connections: Arc<AtomicU64>,
    recorder: Option<Recorder>,
    /// Changes (its sender is dropped) when the server shuts down; upgraded
    /// WebSocket connections are outside hyper's graceful shutdown and
    /// watch this instead.
    stop: watch::Receiver<()>,
}

impl Shared {
    /// Hands the request to the recorder, if there is one.
    fn record(&self, head: &Parts, body_len: u64, body: Vec<u8>, connection: u64) {
        let Some(recorder) = &self.recorder else {
            return;
        };
        recorder(RecordedRequest {
            method: head.method.clone(),
            target: head
                .uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned()),
            headers: head.headers.clone(),
            body_len,
            body,
            connection,
        });
    }
}

/// One TCP connection's place and count.
struct Connection {
    ordinal: u64,
    requests: AtomicU64,
}

/// Serves the mock app on an already-bound listener until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, shutdown, Options::default()).await
}

/// As [`serve`], with [`Options`].
pub async fn serve_with(
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    options: Options,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(());
    let shared = Arc::new(Shared {
        requests: AtomicU64::new(0),
        connections: options.connections,
        recorder: options.recorder,
        stop: stop_rx,
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let mut shutdown = pin!(shutdown);

    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(err) => {
                    tracing::warn!(error = %err, "mock-upstream: accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        // Small JSON answers must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let on_connection = Arc::new(Connection {
            ordinal: shared.connections.fetch_add(1, Ordering::Relaxed) + 1,
            requests: AtomicU64::new(0),
        });
        let shared = Arc::clone(&shared);
        let service = service_fn(move |request| {
            handle(request, Arc::clone(&shared), Arc::clone(&on_connection))
        });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "mock-upstream: connection ended with an error");
            }
        });
    }

    drop(listener);
    drop(stop_tx);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("mock-upstream: in-flight requests cut short by shutdown");
    }
    Ok(())
}

/// Binds `addr`, prints "mock-upstream listening on http://ADDR" to stderr,
/// serves until Ctrl-C/SIGTERM.
pub async fn run(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("mock-upstream: cannot listen on {addr}"))?;
    // The bound address, not `addr`, so that port 0 prints the real port.
    let local = listener.local_addr().unwrap_or(addr);
    eprintln!("mock-upstream listening on http://{local}");
    serve(listener, shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            // Without a handler there is no Ctrl-C to wait for; that must
            // not be mistaken for one.
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    () = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => ctrl_c.await,
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await;
}

async fn handle(
    request: Request<Incoming>,
    shared: Arc<Shared>,
    connection: Arc<Connection>,
) -> Result<Response<MockBody>, Infallible> {
    let total = shared.requests.fetch_add(1, Ordering::Relaxed) + 1;
    let here = connection.requests.fetch_add(1, Ordering::Relaxed) + 1;
    let mut response = route(request, &shared, connection.ordinal).await;
    let headers = response.headers_mut();
    headers.insert("x-mock-request-count", HeaderValue::from(total));
    headers.insert("x-mock-connection-requests", HeaderValue::from(here));
    // `/headers` may have named these; its values stand.
    headers
        .entry(header::SERVER)
        .or_insert(HeaderValue::from_static(SERVER));
    headers
        .entry("x-powered-by")
        .or_insert(HeaderValue::from_static(POWERED_BY));
    Ok(response)
}

/// What the answer should look like besides the description itself.
struct Plan {
    status: StatusCode,
    /// Added to the answer; each name replaces the answer's own value.
    headers: Vec<(HeaderName, HeaderValue)>,
    delay: Option<Duration>,
    /// `/download/BYTES` instead of the echo.
    download: Option<u64>,
}

async fn route(request: Request<Incoming>, shared: &Shared, connection: u64) -> Response<MockBody> {
    let mut plan = Plan {
        status: StatusCode::OK,
        headers: Vec::new(),
        delay: None,
        download: None,
    };
    let path = request.uri().path();
    if path == "/ws" {
        match websocket_key(request.headers(), request.method()) {
            Upgrade::Valid(key) => {
                // An upgrade request has no body; the upgrade itself rides
                // in the extensions, which survive the round trip.
                let (head, body) = request.into_parts();
                shared.record(&head, 0, Vec::new(), connection);
                return accept_websocket(Request::from_parts(head, body), &key, shared);
            }
            Upgrade::Invalid => plan.status = StatusCode::BAD_REQUEST,
            Upgrade::NotAsked => {}
        }
    } else if let Some(length) = path.strip_prefix("/download/") {
        match parse_digits(length) {
            Some(length) => plan.download = Some(length.min(MAX_DOWNLOAD_BYTES)),
            None => plan.status = StatusCode::BAD_REQUEST,
        }
    } else if let Some(code) = path.strip_prefix("/status/") {
        plan.status = parse_status(code).unwrap_or(StatusCode::BAD_REQUEST);
    } else if let Some(ms) = path.strip_prefix("/delay/") {
        match parse_digits(ms) {
            Some(ms) => plan.delay = Some(Duration::from_millis(ms.min(MAX_DELAY_MS))),
            None => plan.status = StatusCode::BAD_REQUEST,
        }
    } else if path == "/set-cookie" {
        match set_cookies(request.uri().query()) {
            Some(cookies) => plan.headers = cookies,
            None => plan.status = StatusCode::BAD_REQUEST,
        }
    } else if path == "/headers" {
        match response_headers(request.uri().query()) {
            Some(headers) => plan.headers = headers,
            None => plan.status = StatusCode::BAD_REQUEST,
        }
    }
    // `/no-upgrade` and every other path: the echo, upgrade request or not;
    // hyper only switches protocols on a 101.

    let (head, body) = request.into_parts();
    let keep = if shared.recorder.is_some() {
        RECORDED_BODY_BYTES
    } else {
        0
    };
    let (body_bytes, first_bytes) = read_body(body, keep).await;
    shared.record(&head, body_bytes, first_bytes, connection);
    if let Some(length) = plan.download {
        return download(length);
    }
    if let Some(delay) = plan.delay {
        tokio::time::sleep(delay).await;
    }
    echo_response(&head, body_bytes, plan)
}

/// Reads the request body to its end, streaming: returns its length and its
/// first `keep` bytes.
async fn read_body(mut body: Incoming, keep: usize) -> (u64, Vec<u8>) {
    let mut total = 0u64;
    let mut first = Vec::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    total += data.len() as u64;
                    let room = keep - first.len();
                    first.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            // The client went away mid-body; nobody is left to read an answer.
            Err(_) => break,
        }
    }
    (total, first)
}

fn echo_response(head: &Parts, body_bytes: u64, plan: Plan) -> Response<MockBody> {
    let echo = Echo {
        method: head.method.as_str(),
        path: head.uri.path(),
        query: head.uri.query(),
        version: version_name(head.version),
        headers: OrderedHeaders(&head.headers),
        body_bytes,
    };
    let no_body = plan.status == StatusCode::NO_CONTENT || plan.status == StatusCode::NOT_MODIFIED;
    let body = if no_body {
        MockBody::empty()
    } else {
        match serde_json::to_vec(&echo) {
            Ok(json) => MockBody::bytes(Bytes::from(json)),
            // Serializing strings and numbers into memory cannot fail;
            // an empty body is the least surprising fallback all the same.
            Err(_) => MockBody::empty(),
        }
    };
    let mut response = Response::new(body);
    *response.status_mut() = plan.status;
    let headers = response.headers_mut();
    if !no_body {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    for (name, _) in &plan.headers {
        headers.remove(name);
    }
    for (name, value) in plan.headers {
        headers.append(name, value);
    }
    response
}

/// The JSON description of a request.
#[derive(Serialize)]
struct Echo<'a> {
    method: &'a str,
    path: &'a str,
    query: Option<&'a str>,
    version: &'static str,
    headers: OrderedHeaders<'a>,
    body_bytes: u64,
}

/// Headers as a JSON object in arrival order (serde_json's own map would
/// sort them): a repeated header becomes an array of its values.
struct OrderedHeaders<'a>(&'a HeaderMap);

impl Serialize for OrderedHeaders<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.keys_len()))?;
        for name in self.0.keys() {
            let mut values = self.0.get_all(name).iter().map(|v| {
                // Header values may be any bytes; JSON strings may not.
                String::from_utf8_lossy(v.as_bytes())
            });
            let first = values.next().unwrap_or_default();
            let rest: Vec<_> = values.collect();
            if rest.is_empty() {
                map.serialize_entry(name.as_str(), &first)?;
            } else {
                let all: Vec<_> = std::iter::once(first).chain(rest).collect();
                map.serialize_entry(name.as_str(), &all)?;
            }
        }
        map.end()
    }
}

fn version_name(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "unknown",
    }
}

/// Digits only: `u64::from_str` would also take a leading `+`.
fn parse_digits(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // All digits yet unparsable means too large: treat as "very large" so the
    // caller's cap applies.
    Some(text.parse().unwrap_or(u64::MAX))
}

/// Three digits, 200..=599 (1xx would not be a final answer).
fn parse_status(code: &str) -> Option<StatusCode> {
    if code.len() != 3 {
        return None;
    }
    let code = u16::try_from(parse_digits(code)?).ok()?;
    if !(200..=599).contains(&code) {
        return None;
    }
    StatusCode::from_u16(code).ok()
}

/// The `&`-separated parts of a query, empty ones left out.
fn query_parts(query: Option<&str>) -> impl Iterator<Item = &str> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|part| !part.is_empty())
}

fn header_value(encoded: &str) -> Option<HeaderValue> {
    HeaderValue::from_maybe_shared(Bytes::from(percent_decode(encoded))).ok()
}

/// One `Set-Cookie` per `&`-separated pair, percent-decoded; `None` when a
/// decoded value cannot be a header (a control character, say).
fn set_cookies(query: Option<&str>) -> Option<Vec<(HeaderName, HeaderValue)>> {
    query_parts(query)
        .map(|pair| Some((header::SET_COOKIE, header_value(pair)?)))
        .collect()
}

/// One header per `Name=value` pair, both percent-decoded; `None` when one
/// cannot be a header, or names `Content-Length` or `Transfer-Encoding`
/// (the body the mock sends is framed by hyper, not by the query).
fn response_headers(query: Option<&str>) -> Option<Vec<(HeaderName, HeaderValue)>> {
    query_parts(query)
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let name = HeaderName::from_bytes(&percent_decode(name)).ok()?;
            if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
                return None;
            }
            Some((name, header_value(value)?))
        })
        .collect()
}

/// `%XX` becomes the byte XX; anything else, a malformed escape included, is
/// kept as it is. `+` stays `+`, since cookie values (base64) use it.
fn percent_decode(text: &str) -> Vec<u8> {
    use crate::path::hex_value as hex;
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push(hi << 4 | lo);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

fn download(length: u64) -> Response<MockBody> {
    let mut response = Response::new(MockBody::Pattern { remaining: length });
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    response
}

enum Upgrade {
    NotAsked,
    Invalid,
    Valid(HeaderValue),
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// Checks an RFC 6455 opening handshake and returns its key.
fn websocket_key(headers: &HeaderMap, method: &Method) -> Upgrade {
    if !headers.contains_key(header::UPGRADE) {
        return Upgrade::NotAsked;
    }
    let version_ok = headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v.as_bytes().trim_ascii() == b"13");
    let key = headers.get(header::SEC_WEBSOCKET_KEY);
    match key {
        Some(key)
            if method == Method::GET
                && version_ok
                && has_token(headers, header::CONNECTION, "upgrade")
                && has_token(headers, header::UPGRADE, "websocket") =>
        {
            Upgrade::Valid(key.clone())
        }
        _ => Upgrade::Invalid,
    }
}

fn accept_websocket(
    request: Request<Incoming>,
    key: &HeaderValue,
    shared: &Shared,
) -> Response<MockBody> {
    let accept = derive_accept_key(key.as_bytes().trim_ascii());
    let stop = shared.stop.clone();
    tokio::spawn(async move {
        match hyper::upgrade::on(request).await {
            Ok(upgraded) => {
                let socket =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                        .await;
                echo_websocket(socket, stop).await;
            }
            Err(err) => tracing::debug!(error = %err, "mock-upstream: upgrade failed"),
        }
    });

    let mut response = Response::new(MockBody::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    match HeaderValue::from_str(&accept) {
        Ok(accept) => {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        // base64 is always a valid header value; should that ever change,
        // a 500 is better than a handshake the client will reject.
        Err(_) => *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR,
    }
    response
}

/// Echoes text and binary messages until the peer closes. tungstenite
/// answers pings and close frames by itself; they go out on the next read
/// or flush.
async fn echo_websocket<S>(mut socket: WebSocketStream<S>, mut stop: watch::Receiver<()>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let message = tokio::select! {
            message = socket.next() => message,
            _ = stop.changed() => {
                let _ = socket
                    .close(Some(CloseFrame {
                        code: CloseCode::Away,
                        reason: "mock-upstream shutting down".into(),
                    }))
                    .await;
                return;
            }
        };
        let sent = match message {
            Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                socket.send(message).await
            }
            Some(Ok(Message::Ping(_))) => socket.flush().await,
            Some(Ok(Message::Pong(_) | Message::Close(_) | Message::Frame(_))) => Ok(()),
            Some(Err(_)) | None => return,
        };
        if sent.is_err() {
            return;
        }
    }
}

/// Response bodies: a JSON echo held in one buffer, or a generated download.
enum MockBody {
    Once(Option<Bytes>),
    Pattern { remaining: u64 },
}

impl MockBody {
    fn empty() -> Self {
        MockBody::Once(None)
    }

    fn bytes(bytes: Bytes) -> Self {
        if bytes.is_empty() {
            MockBody::empty()
        } else {
            MockBody::Once(Some(bytes))
        }
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            MockBody::Once(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            MockBody::Pattern { remaining } => {
                if *remaining == 0 {
                    return Poll::Ready(None);
                }
                let n = usize::try_from(*remaining).map_or(CHUNK_BYTES, |r| r.min(CHUNK_BYTES));
                *remaining -= n as u64;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&PATTERN[..n])))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            MockBody::Once(bytes) => bytes.is_none(),
            MockBody::Pattern { remaining } => *remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            MockBody::Once(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            MockBody::Pattern { remaining } => SizeHint::with_exact(*remaining),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};
    use hyper::client::conn::http1;
    use serde_json::Value;
    use std::time::Instant;
    use tokio::net::TcpStream;
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    struct Server {
        addr: SocketAddr,
        stop: Option<oneshot::Sender<()>>,
        task: JoinHandle<std::io::Result<()>>,
    }

    impl Server {
        async fn start() -> Server {
            Self::start_with(Options::default()).await
        }

        async fn start_with(options: Options) -> Server {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (stop, stopped) = oneshot::channel::<()>();
            let shutdown = async move {
                let _ = stopped.await;
            };
            let task = tokio::spawn(serve_with(listener, shutdown, options));
            Server {
                addr,
                stop: Some(stop),
                task,
            }
        }

        async fn connect<B>(&self) -> http1::SendRequest<B>
        where
            B: Body + Send + 'static,
            B::Data: Send,
            B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        {
            let stream = TcpStream::connect(self.addr).await.unwrap();
            let (sender, connection) = http1::handshake(TokioIo::new(stream)).await.unwrap();
            tokio::spawn(connection);
            sender
        }

        async fn stop(mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            tokio::time::timeout(Duration::from_secs(10), self.task)
                .await
                .expect("serve returns after shutdown")
                .unwrap()
                .unwrap();
        }
    }

    fn get(uri: &str) -> Request<Full<Bytes>> {
        Request::get(uri)
            .header(header::HOST, "mock.test")
            .body(Full::default())
            .unwrap()
    }

    async fn send(
        sender: &mut http1::SendRequest<Full<Bytes>>,
        request: Request<Full<Bytes>>,
    ) -> (http::response::Parts, Bytes) {
        let response = sender.send_request(request).await.unwrap();
        let (head, body) = response.into_parts();
        (head, body.collect().await.unwrap().to_bytes())
    }

    fn json(body: &[u8]) -> Value {
        serde_json::from_slice(body).unwrap()
    }

    fn header_str<'a>(head: &'a http::response::Parts, name: &str) -> &'a str {
        head.headers.get(name).unwrap().to_str().unwrap()
    }

    #[tokio::test]
    async fn echo_describes_the_request() {
        let server = Server::start().await;
        let mut client = server.connect().await;
        let request = Request::post("/some/path?b=2&a=1")
            .header(header::HOST, "mock.test")
            .header("x-zeta", "last-alphabetically")
            .header("X-Multi", "one")
            .header("x-multi", "two")
            .header("x-bytes", HeaderValue::from_bytes(b"caf\xe9").unwrap())
            .body(Full::new(Bytes::from_static(b"hello")))
            .unwrap();
        let (head, body) = send(&mut client, request).await;
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(header_str(&head, "content-type"), "application/json");
        let echo = json(&body);
        assert_eq!(echo["method"], "POST");
        assert_eq!(echo["path"], "/some/path");
        assert_eq!(echo["query"], "b=2&a=1");
        assert_eq!(echo["version"], "HTTP/1.1");
        assert_eq!(echo["body_bytes"], 5);
        assert_eq!(
            echo["headers"]["x-multi"],
            serde_json::json!(["one", "two"])
        );
        assert_eq!(echo["headers"]["x-bytes"], "caf\u{fffd}");
        assert_eq!(echo["headers"]["content-length"], "5");

        // Arrival order, not alphabetical: check the raw JSON text.
        let text = String::from_utf8(body.to_vec()).unwrap();
        let host = text.find("\"host\"").unwrap();
        let zeta = text.find("\"x-zeta\"").unwrap();
        let multi = text.find("\"x-multi\"").unwrap();
        assert!(host < zeta && zeta < multi, "{text}");

        let (_, body) = send(&mut client, get("/plain")).await;
        let echo = json(&body);
        assert_eq!(echo["query"], Value::Null);
        assert_eq!(echo["body_bytes"], 0);
        server.stop().await;
    }

    #[tokio::test]
    async fn streamed_body_is_counted() {
        const CHUNKS: usize = 160;
        let server = Server::start().await;
        let mut client = server.connect().await;
        // No length given, so this goes out chunked and the server can only
        // count it by streaming.
        let chunks = futures_util::stream::iter(
            (0..CHUNKS).map(|_| Ok::<_, Infallible>(Frame::data(Bytes::from_static(&PATTERN)))),
        );
        let request = Request::put("/upload")
            .header(header::HOST, "mock.test")
            .body(StreamBody::new(chunks))
            .unwrap();
        let response = client.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let echo = json(&body);
        assert_eq!(echo["body_bytes"], (CHUNKS * CHUNK_BYTES) as u64);
        assert_eq!(echo["headers"]["transfer-encoding"], "chunked");
        server.stop().await;
    }

    /// A recorder that keeps every request in order.
    fn recording() -> (Options, Arc<std::sync::Mutex<Vec<RecordedRequest>>>) {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        let recorder: Recorder = Arc::new(move |request| sink.lock().unwrap().push(request));
        let options = Options {
            recorder: Some(recorder),
            ..Options::default()
        };
        (options, seen)
    }

    #[tokio::test]
    async fn a_recorder_sees_each_request_before_its_answer() {
        const CHUNKS: usize = 40;
        let (options, seen) = recording();
        let server = Server::start_with(options).await;
        let mut client = server.connect().await;
        // Streamed (chunked) and larger than what is kept.
        let chunks = futures_util::stream::iter(
            (0..CHUNKS).map(|_| Ok::<_, Infallible>(Frame::data(Bytes::from_static(&PATTERN)))),
        );
        let request = Request::post("/upload?x=%20")
            .header(header::HOST, "mock.test")
            .header("x-seen", "yes")
            .body(StreamBody::new(chunks))
            .unwrap();
        let response = client.send_request(request).await.unwrap();
        // Recorded by the time the answer arrives.
        let upload = seen.lock().unwrap().last().cloned().expect("recorded");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(json(&body)["body_bytes"], (CHUNKS * CHUNK_BYTES) as u64);
        assert_eq!(upload.method, Method::POST);
        assert_eq!(upload.target, "/upload?x=%20");
        assert_eq!(upload.headers["x-seen"], "yes");
        assert_eq!(upload.body_len, (CHUNKS * CHUNK_BYTES) as u64);
        assert_eq!(upload.body, PATTERN[..RECORDED_BODY_BYTES]);
        assert_eq!(upload.connection, 1);

        // A second connection, a WebSocket upgrade and a download are recorded too.
        let mut other: http1::SendRequest<Full<Bytes>> = server.connect().await;
        send(&mut other, get("/download/10")).await;
        let (_socket, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", server.addr))
            .await
            .unwrap();
        let seen: Vec<_> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|r| (r.target.clone(), r.connection, r.body_len))
            .collect();
        assert_eq!(
            seen,
            [
                ("/upload?x=%20".to_owned(), 1, (CHUNKS * CHUNK_BYTES) as u64),
                ("/download/10".to_owned(), 2, 0),
                ("/ws".to_owned(), 3, 0),
            ]
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn answers_carry_server_headers_unless_headers_names_them() {
        let server = Server::start().await;
        let mut client = server.connect().await;
        let (head, _) = send(&mut client, get("/")).await;
        assert_eq!(header_str(&head, "server"), SERVER);
        assert_eq!(header_str(&head, "x-powered-by"), POWERED_BY);
        let (head, _) = send(&mut client, get("/headers?Server=app%2F2")).await;
        assert_eq!(header_str(&head, "server"), "app/2");
        assert_eq!(header_str(&head, "x-powered-by"), POWERED_BY);
        server.stop().await;
    }

    #[tokio::test]
    async fn headers_answers_with_the_named_headers() {
        let server = Server::start().await;
        let mut client = server.connect().await;
        let (head, body) = send(
            &mut client,
            get("/headers?X-Frame-Options=SAMEORIGIN&Cache-Control=public%2C%20max-age%3D60&&Cache-Control=immutable&X-Empty&Content-Type=text%2Fplain"),
        )
        .await;
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(header_str(&head, "x-frame-options"), "SAMEORIGIN");
        let all = |name: &str| -> Vec<&str> {
            let values = head.headers.get_all(name).iter();
            values.map(|v| v.to_str().unwrap()).collect()
        };
        assert_eq!(all("cache-control"), ["public, max-age=60", "immutable"]);
        assert_eq!(all("x-empty"), [""]);
        // Named, it replaces the mock's own value rather than joining it.
        assert_eq!(all("content-type"), ["text/plain"]);
        assert_eq!(json(&body)["path"], "/headers");

        for bad in [
            "/headers?Content-Length=5",
            "/headers?transfer-encoding=chunked",
            "/headers?X-Bad=a%0D%0AX-Injected:%201",
            "/headers?Bad%20Name=1",
        ] {
            let (head, _) = send(&mut client, get(bad)).await;
            assert_eq!(head.status, StatusCode::BAD_REQUEST, "{bad}");
            assert!(head.headers.get("x-injected").is_none(), "{bad}");
        }
        server.stop().await;
    }

    #[tokio::test]
    async fn counts_requests_per_server_and_per_connection() {
        let server = Server::start().await;
        let mut first = server.connect().await;
        let mut second = server.connect().await;
        let mut seen = Vec::new();
        for use_second in [false, false, true, false] {
            let client = if use_second { &mut second } else { &mut first };
            let (head, _) = send(client, get("/")).await;
            seen.push((
                header_str(&head, "x-mock-request-count").to_owned(),
                header_str(&head, "x-mock-connection-requests").to_owned(),
            ));
        }
        let expected = [("1", "1"), ("2", "2"), ("3", "1"), ("4", "3")];
        let seen: Vec<_> = seen.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_eq!(seen, expected);
        server.stop().await;
    }

    #[tokio::test]
    async fn set_cookie_answers_one_header_per_pair() {
        let server = Server::start().await;
        let mut client = server.connect().await;
        let (head, body) = send(
            &mut client,
            get("/set-cookie?a=1&b=x%3B%20SameSite%3DStrict&&c=1;%20Secure"),
        )
        .await;
        assert_eq!(head.status, StatusCode::OK);
        let cookies: Vec<_> = head
            .headers
            .get_all(header::SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(cookies, ["a=1", "b=x; SameSite=Strict", "c=1; Secure"]);
        assert_eq!(json(&body)["path"], "/set-cookie");

        let (head, _) = send(&mut client, get("/set-cookie?a=1%0D%0AX-Injected:%201")).await;
        assert_eq!(head.status, StatusCode::BAD_REQUEST);
        assert!(head.headers.get(header::SET_COOKIE).is_none());
        server.stop().await;
    }

    #[tokio::test]
    async fn status_answers_that_status() {
        let server = Server::start().await;
        let mut client = server.connect().await;
        let (head, body) = send(&mut client, get("/status/418")).await;
        assert_eq!(head.status, StatusCode::IM_A_TEAPOT);
        assert_eq!(json(&body)["path"], "/status/418");

        let (head, body) = send(&mut client, get("/status/204")).await;
        assert_eq!(head.status, StatusCode::NO_CONTENT);
        assert!(body.is_empty());

        for bad in [
            "/status/100",
            "/status/600",
            "/status/abc",
            "/status/+99",
            "/status/",
        ] {
            let (head, _) = send(&mut client, get(bad)).await;
            assert_eq!(head.status, StatusCode::BAD_REQUEST, "{bad}");
        }
        // The connection survived all of the above.
        let (head, _) = send(&mut client, get("/")).await;
        assert_eq!(header_str(&head, "x-mock-connection-requests"), "8");
        server.stop().await;
    }

    #[tokio::test]
    async fn delay_waits_before_answering() {
        let server = Server::start().await;
        let mut client = server.connect().await;
        let started = Instant::now();
        let (head, body) = send(&mut client, get("/delay/150")).await;
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(json(&body)["path"], "/delay/150");
        let (head, _) = send(&mut client, get("/delay/soon")).await;
        assert_eq!(head.status, StatusCode::BAD_REQUEST);
        server.stop().await;
    }

    #[tokio::test]
    async fn download_streams_the_pattern() {
        const LENGTH: u64 = 3 * CHUNK_BYTES as u64 * 16 + 17;
        let server = Server::start().await;
        let mut client = server.connect().await;
        let response = client
            .send_request(get(&format!("/download/{LENGTH}")))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/octet-stream"
        );
        assert_eq!(
            response.headers()[header::CONTENT_LENGTH],
            LENGTH.to_string().as_str()
        );
        let mut body = response.into_body();
        let mut offset = 0u64;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                for (i, byte) in data.iter().enumerate() {
                    assert_eq!(*byte, (offset + i as u64) as u8);
                }
                offset += data.len() as u64;
            }
        }
        assert_eq!(offset, LENGTH);
        server.stop().await;
    }

    #[tokio::test]
    async fn websocket_echoes() {
        let server = Server::start().await;
        let (mut socket, response) =
            tokio_tungstenite::connect_async(format!("ws://{}/ws", server.addr))
                .await
                .unwrap();
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);

        socket.send(Message::text("hello")).await.unwrap();
        assert_eq!(
            socket.next().await.unwrap().unwrap(),
            Message::text("hello")
        );
        socket
            .send(Message::binary(vec![0u8, 1, 2, 255]))
            .await
            .unwrap();
        assert_eq!(
            socket.next().await.unwrap().unwrap(),
            Message::binary(vec![0u8, 1, 2, 255])
        );
        socket.send(Message::Ping("p".into())).await.unwrap();
        assert_eq!(
            socket.next().await.unwrap().unwrap(),
            Message::Pong("p".into())
        );
        socket.close(None).await.unwrap();
        // The server answers the close and ends the stream.
        loop {
            match socket.next().await {
                Some(Ok(Message::Close(_))) => {}
                Some(Ok(other)) => panic!("unexpected {other:?}"),
                Some(Err(_)) | None => break,
            }
        }
        server.stop().await;
    }

    #[tokio::test]
    async fn websocket_is_closed_on_shutdown() {
        let server = Server::start().await;
        let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", server.addr))
            .await
            .unwrap();
        server.stop().await;
        match socket.next().await {
            Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Away),
            other => panic!("expected a close frame, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn upgrade_requests_that_are_not_accepted_get_the_echo() {
        let server = Server::start().await;
        let mut client = server.connect().await;
        let upgrade = |path: &str| {
            Request::get(path)
                .header(header::HOST, "mock.test")
                .header(header::CONNECTION, "Upgrade")
                .header(header::UPGRADE, "websocket")
                .header(header::SEC_WEBSOCKET_VERSION, "13")
                .header(header::SEC_WEBSOCKET_KEY, "dGhlIHNhbXBsZSBub25jZQ==")
                .body(Full::default())
                .unwrap()
        };
        let (head, body) = send(&mut client, upgrade("/no-upgrade")).await;
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(json(&body)["headers"]["upgrade"], "websocket");

        // A plain request to /ws is described like any other.
        let (head, body) = send(&mut client, get("/ws")).await;
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(json(&body)["path"], "/ws");

        // An upgrade request missing its key is refused, not upgraded.
        let mut broken = upgrade("/ws");
        broken.headers_mut().remove(header::SEC_WEBSOCKET_KEY);
        let (head, _) = send(&mut client, broken).await;
        assert_eq!(head.status, StatusCode::BAD_REQUEST);

        let (head, _) = send(&mut client, get("/")).await;
        assert_eq!(header_str(&head, "x-mock-connection-requests"), "4");
        server.stop().await;
    }

    #[tokio::test]
    async fn websocket_accept_key_is_rfc6455s() {
        let server = Server::start().await;
        let mut client: http1::SendRequest<Full<Bytes>> = server.connect().await;
        let request = Request::get("/ws")
            .header(header::HOST, "mock.test")
            .header(header::CONNECTION, "keep-alive, Upgrade")
            .header(header::UPGRADE, "WebSocket")
            .header(header::SEC_WEBSOCKET_VERSION, "13")
            .header(header::SEC_WEBSOCKET_KEY, "dGhlIHNhbXBsZSBub25jZQ==")
            .body(Full::default())
            .unwrap();
        let response = client.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        // The example from RFC 6455 section 1.3.
        assert_eq!(
            response.headers()[header::SEC_WEBSOCKET_ACCEPT],
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        server.stop().await;
    }

    /// `portcullis demo` and the integration tests spawn these on a runtime.
    #[tokio::test]
    async fn futures_are_send() {
        fn assert_send<T: Send>(_: &T) {}
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        assert_send(&serve(listener, async {}));
        assert_send(&run("127.0.0.1:0".parse().unwrap()));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("a=1%3B%20SameSite%3DStrict"),
            b"a=1; SameSite=Strict"
        );
        assert_eq!(percent_decode("100%"), b"100%");
        assert_eq!(percent_decode("%zz%4"), b"%zz%4");
        assert_eq!(percent_decode("a+b%2b"), b"a+b+");
        assert_eq!(percent_decode("%C3%A9"), "é".as_bytes());
    }

    #[test]
    fn digits_and_statuses() {
        assert_eq!(parse_digits("0"), Some(0));
        assert_eq!(parse_digits("99999999999999999999999"), Some(u64::MAX));
        assert_eq!(parse_digits("+1"), None);
        assert_eq!(parse_digits(""), None);
        assert_eq!(parse_status("599"), StatusCode::from_u16(599).ok());
        assert_eq!(parse_status("199"), None);
        assert_eq!(parse_status("0200"), None);
    }
}

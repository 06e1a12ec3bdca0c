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
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde::Serialize;
use serde::ser::SerializeMap;
use tokio::net::TcpListener;
use tokio::sync::watch;

mod body;
#[cfg(test)]
mod tests;
mod websocket;

use body::{MockBody, download};
use websocket::{Upgrade, accept_websocket, websocket_key};

/// `/delay/MS` is capped so a typo cannot park a connection for hours.
const MAX_DELAY_MS: u64 = 60_000;
/// `/download/BYTES` is capped so a typo cannot stream forever.
const MAX_DOWNLOAD_BYTES: u64 = 1 << 30;
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

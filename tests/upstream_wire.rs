//! The upstream leg on the wire: the proxy's own HTTP/1.1 client
//! (`src/upstream.rs`, `src/upstream/codec.rs`) against a hand-written raw-TCP
//! upstream that writes exact bytes, with what a TLS client (HTTP/1.1 or
//! HTTP/2) sees asserted end to end: response framings (chunked with
//! extensions and trailers, until close, `Connection: close`, interim 1xx,
//! HEAD), malformed or hostile responses (502 and the proxy serving on), a
//! body cut short, an early answer to an unfinished upload, and the framing
//! of request bodies the upstream receives.
//!
//! The proxy runs with one worker here, so it has one upstream pool and the
//! count of upstream connections says exactly which were reused.

mod common;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{Proxy, TlsClient};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Any single read by the raw upstream, or any wait for an answer.
const WAIT: Duration = Duration::from_secs(10);
/// The most the raw upstream buffers of one request.
const MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;
/// Requests the raw upstream serves on one connection before closing it.
const MAX_REQUESTS_PER_CONNECTION: usize = 100;

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

// ------------------------------------------------------------ raw upstream

/// One request as the raw upstream read it off the wire.
#[derive(Debug, Clone, Default)]
struct Seen {
    method: String,
    target: String,
    /// Names lower-cased, in arrival order.
    headers: Vec<(String, String)>,
    /// The body, chunked framing removed.
    body: Vec<u8>,
    /// The body bytes exactly as they were on the wire.
    raw_body: Vec<u8>,
}

impl Seen {
    fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// What to do with the connection after the reply.
#[derive(Clone, Copy, PartialEq, Eq)]
enum After {
    /// Read the next request.
    KeepAlive,
    /// Close it.
    Close,
    /// Keep it open but never read from it again (until the test ends).
    Hold,
}

struct Reply {
    /// Written one after another, each with its own write.
    pieces: Vec<Vec<u8>>,
    /// Read the request body (by its framing) before replying.
    read_body: bool,
    after: After,
}

fn reply(bytes: impl Into<Vec<u8>>) -> Reply {
    Reply {
        pieces: vec![bytes.into()],
        read_body: true,
        after: After::KeepAlive,
    }
}

fn reply_in_pieces(pieces: &[&[u8]]) -> Reply {
    Reply {
        pieces: pieces.iter().map(|p| p.to_vec()).collect(),
        read_body: true,
        after: After::KeepAlive,
    }
}

impl Reply {
    fn then(mut self, after: After) -> Self {
        self.after = after;
        self
    }
    fn without_reading_the_body(mut self) -> Self {
        self.read_body = false;
        self
    }
}

type Handler = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

/// A plain-TCP upstream that reads each request head, asks `handler` what
/// to write, and writes exactly that.
struct RawUpstream {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Connections kept open unread ([`After::Hold`]).
    held: Arc<Mutex<Vec<TcpStream>>>,
}

impl RawUpstream {
    async fn start(handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = RawUpstream {
            addr: listener.local_addr().unwrap(),
            connections: Arc::new(AtomicUsize::new(0)),
            seen: Arc::new(Mutex::new(Vec::new())),
            held: Arc::new(Mutex::new(Vec::new())),
        };
        let handler: Handler = Arc::new(handler);
        let (connections, seen, held) = (
            upstream.connections.clone(),
            upstream.seen.clone(),
            upstream.held.clone(),
        );
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                connections.fetch_add(1, Ordering::SeqCst);
                let _ = tcp.set_nodelay(true);
                tokio::spawn(serve(
                    Wire {
                        tcp,
                        buf: Vec::new(),
                    },
                    handler.clone(),
                    seen.clone(),
                    held.clone(),
                ));
            }
        });
        upstream
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn last(&self, target: &str) -> Seen {
        self.seen()
            .into_iter()
            .rev()
            .find(|s| s.target == target)
            .unwrap_or_else(|| panic!("the upstream saw no request for {target}"))
    }
}

struct Wire {
    tcp: TcpStream,
    buf: Vec<u8>,
}

impl Wire {
    /// Reads more into the buffer; false at EOF, on an error or after [`WAIT`].
    async fn fill(&mut self) -> bool {
        let mut chunk = vec![0u8; 64 * 1024];
        match tokio::time::timeout(WAIT, self.tcp.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            _ => false,
        }
    }

    /// Everything up to and including `delimiter`.
    async fn take_through(&mut self, delimiter: &[u8], max: usize) -> Option<Vec<u8>> {
        loop {
            if let Some(at) = self
                .buf
                .windows(delimiter.len())
                .position(|w| w == delimiter)
            {
                return Some(self.buf.drain(..at + delimiter.len()).collect());
            }
            if self.buf.len() > max || !self.fill().await {
                return None;
            }
        }
    }

    async fn take(&mut self, n: usize) -> Option<Vec<u8>> {
        if n > MAX_REQUEST_BYTES {
            return None;
        }
        while self.buf.len() < n {
            if !self.fill().await {
                return None;
            }
        }
        Some(self.buf.drain(..n).collect())
    }

    async fn read_head(&mut self) -> Option<Seen> {
        let head = self.take_through(b"\r\n\r\n", 64 * 1024).await?;
        let mut fields = [httparse::EMPTY_HEADER; 128];
        let mut request = httparse::Request::new(&mut fields);
        match request.parse(&head) {
            Ok(httparse::Status::Complete(_)) => {}
            _ => return None,
        }
        Some(Seen {
            method: request.method?.to_string(),
            target: request.path?.to_string(),
            headers: request
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect(),
            ..Default::default()
        })
    }

    /// Reads the body by the request's framing; false when it is broken.
    async fn read_body(&mut self, seen: &mut Seen) -> bool {
        let chunked = seen
            .header_all("transfer-encoding")
            .iter()
            .any(|v| v.to_ascii_lowercase().contains("chunked"));
        if chunked {
            return self.read_chunked(seen).await;
        }
        let Some(length) = seen.header_all("content-length").first().copied() else {
            return true;
        };
        let Ok(length) = length.trim().parse::<usize>() else {
            return false;
        };
        let Some(body) = self.take(length).await else {
            return false;
        };
        seen.raw_body = body.clone();
        seen.body = body;
        true
    }

    async fn read_chunked(&mut self, seen: &mut Seen) -> bool {
        while seen.raw_body.len() <= MAX_REQUEST_BYTES {
            let Some(line) = self.take_through(b"\r\n", 4096).await else {
                return false;
            };
            seen.raw_body.extend_from_slice(&line);
            let text = String::from_utf8_lossy(&line[..line.len() - 2]).into_owned();
            let digits = text.split(';').next().unwrap_or("").trim();
            let Ok(size) = usize::from_str_radix(digits, 16) else {
                return false;
            };
            if size == 0 {
                // Trailer lines up to an empty one.
                for _ in 0..100 {
                    let Some(line) = self.take_through(b"\r\n", 4096).await else {
                        return false;
                    };
                    seen.raw_body.extend_from_slice(&line);
                    if line == b"\r\n" {
                        return true;
                    }
                }
                return false;
            }
            let Some(data) = self.take(size + 2).await else {
                return false;
            };
            if !data.ends_with(b"\r\n") {
                return false;
            }
            seen.raw_body.extend_from_slice(&data);
            seen.body.extend_from_slice(&data[..size]);
        }
        false
    }
}

async fn serve(
    mut wire: Wire,
    handler: Handler,
    seen: Arc<Mutex<Vec<Seen>>>,
    held: Arc<Mutex<Vec<TcpStream>>>,
) {
    for _ in 0..MAX_REQUESTS_PER_CONNECTION {
        let Some(mut request) = wire.read_head().await else {
            return;
        };
        let reply = handler(&request);
        if reply.read_body && !wire.read_body(&mut request).await {
            return;
        }
        seen.lock().unwrap().push(request);
        for piece in &reply.pieces {
            if wire.tcp.write_all(piece).await.is_err() || wire.tcp.flush().await.is_err() {
                return;
            }
        }
        match reply.after {
            After::KeepAlive => {}
            After::Close => return,
            After::Hold => {
                held.lock().unwrap().push(wire.tcp);
                return;
            }
        }
    }
}

// ------------------------------------------------------------ proxy and client

/// The proxy with one worker (one upstream pool) in front of `upstream`,
/// with `[upstream] timeout` set to `timeout`.
async fn start_proxy(upstream: SocketAddr, timeout: &str) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let cert = common::make_cert(dir.path(), "cert", &["localhost", "127.0.0.1"]);
    let toml = format!(
        "[server]\nhttps_listen = \"127.0.0.1:0\"\nworkers = 1\n\n[tls]\ncert = \"cert.pem\"\nkey = \"cert.key\"\n\n[upstream]\nurl = \"http://{upstream}\"\ntimeout = \"{timeout}\"\n\n[log]\nformat = \"json\"\nlevel = \"info\"\n"
    );
    let config_path = dir.path().join("proxy.toml");
    std::fs::write(&config_path, toml).unwrap();
    Proxy::spawn(dir, cert, config_path, &[]).await
}

/// What the client got: the head, the body bytes, and the error that ended
/// the body early, if one did.
struct Got {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
    error: Option<String>,
}

/// Short: header values and the body cut to 80 bytes.
impl std::fmt::Debug for Got {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cut = |bytes: &[u8]| {
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(80)]).into_owned();
            if bytes.len() > 80 {
                format!("{text}... ({} bytes)", bytes.len())
            } else {
                text
            }
        };
        let headers: Vec<String> = self
            .headers
            .iter()
            .map(|(n, v)| format!("{n}: {}", cut(v.as_bytes())))
            .collect();
        f.debug_struct("Got")
            .field("status", &self.status)
            .field("headers", &headers)
            .field("body", &cut(&self.body))
            .field("error", &self.error)
            .finish()
    }
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// A complete response: asserts the body ended cleanly.
    fn complete(self) -> Self {
        assert!(
            self.error.is_none(),
            "the body ended with an error: {:?} after {} bytes",
            self.error,
            self.body.len()
        );
        self
    }
}

async fn got(response: Response<Incoming>) -> Got {
    let (parts, mut body) = response.into_parts();
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut data = Vec::new();
    let error = loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => break Some("timed out reading the body".to_string()),
            Ok(None) => break None,
            Ok(Some(Err(error))) => break Some(error.to_string()),
            Ok(Some(Ok(frame))) => {
                if let Some(bytes) = frame.data_ref() {
                    data.extend_from_slice(bytes);
                }
            }
        }
    };
    Got {
        status: parts.status,
        headers: parts.headers,
        body: data,
        error,
    }
}

type H1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;
type H2 = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// The response, or why none came (the request failed or was reset).
async fn try_answer<F>(sending: F) -> Result<Got, String>
where
    F: Future<Output = hyper::Result<Response<Incoming>>>,
{
    let response = tokio::time::timeout(WAIT, sending)
        .await
        .expect("a response head in time")
        .map_err(|error| format!("{error:?}"))?;
    Ok(got(response).await)
}

async fn answer<F>(sending: F) -> Got
where
    F: Future<Output = hyper::Result<Response<Incoming>>>,
{
    try_answer(sending).await.expect("a response")
}

fn h1_request(method: Method, path: &str, body: &'static [u8]) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::from_static(body)))
        .unwrap()
}

fn h2_request(
    proxy: &Proxy,
    method: Method,
    path: &str,
    body: &'static [u8],
) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(format!("https://localhost:{}{path}", proxy.https.port()))
        .body(Full::new(Bytes::from_static(body)))
        .unwrap()
}

async fn h1_send(sender: &mut H1, method: Method, path: &str, body: &'static [u8]) -> Got {
    answer(sender.send_request(h1_request(method, path, body))).await
}

async fn h2_send(
    sender: &mut H2,
    proxy: &Proxy,
    method: Method,
    path: &str,
    body: &'static [u8],
) -> Got {
    answer(sender.send_request(h2_request(proxy, method, path, body))).await
}

/// Two requests, one after the other, over one HTTP/1.1 client connection to
/// a fresh proxy in front of `upstream`: their complete answers. Whether the
/// proxy reused its upstream connection shows in `upstream.connections()`.
async fn twice_over_one_h1_connection(
    upstream: &RawUpstream,
    method: Method,
    path: &str,
    body: &'static [u8],
) -> [Got; 2] {
    let proxy = start_proxy(upstream.addr, "10s").await;
    let mut sender = proxy.client().h1().await;
    let first = h1_send(&mut sender, method.clone(), path, body)
        .await
        .complete();
    let second = h1_send(&mut sender, method, path, body).await.complete();
    [first, second]
}

async fn get(client: &TlsClient, path: &str) -> Got {
    let mut sender = client.h1().await;
    h1_send(&mut sender, Method::GET, path, b"").await
}

/// The proxy's own 502, as for an unreachable upstream.
fn assert_proxy_502(got: &Got, upstream: SocketAddr, what: &str) {
    assert_eq!(got.status, 502, "{what}: {got:?}");
    assert!(
        got.header("content-type")
            .is_some_and(|v| v.starts_with("application/json")),
        "{what}: {got:?}"
    );
    let json: serde_json::Value = serde_json::from_slice(&got.body)
        .unwrap_or_else(|_| panic!("{what}: the 502 body is not JSON: {}", got.text()));
    assert_eq!(json["error"], "upstream_unreachable", "{what}");
    assert!(
        json["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {json}"
    );
    assert!(
        !got.text().contains(&upstream.port().to_string()),
        "{what}: the 502 leaks upstream internals: {}",
        got.text()
    );
}

// ------------------------------------------------------------ 1. chunked

/// 100 000 bytes that are not all the same.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| b'a' + (i % 26) as u8).collect()
}

/// A chunked response with chunk extensions (one quoted, one after BWS), an
/// upper-case hex size, a chunk larger than the proxy's reads, trailers, and
/// writes split mid size line, mid data and mid CRLF.
fn chunked_reply() -> Reply {
    let big = pattern(100_000); // 0x186A0
    let mut big_chunk = b"186A0\r\n".to_vec();
    big_chunk.extend_from_slice(&big);
    big_chunk.extend_from_slice(b"\r\n");
    Reply {
        pieces: vec![
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n".to_vec(),
            b"5;name=va".to_vec(),
            b"lue\r\nhel".to_vec(),
            b"lo\r".to_vec(),
            b"\n1;a=b;quoted=\"x;y\"\r\n,\r\n".to_vec(),
            big_chunk,
            b"7 ; ext\r\n world!\r\n".to_vec(),
            b"0\r\nx-checksum: abc\r\n".to_vec(),
            b"x-more: 1\r\n\r\n".to_vec(),
        ],
        read_body: true,
        after: After::KeepAlive,
    }
}

fn chunked_expected() -> Vec<u8> {
    let mut expected = b"hello,".to_vec();
    expected.extend_from_slice(&pattern(100_000));
    expected.extend_from_slice(b" world!");
    expected
}

fn assert_chunked_answer(got: Got, what: &str) {
    let got = got.complete();
    assert_eq!(got.status, 200, "{what}");
    assert_eq!(got.header("content-type"), Some("text/plain"), "{what}");
    assert!(
        got.body == chunked_expected(),
        "{what}: body of {} bytes differs from the {} sent; starts {:?}",
        got.body.len(),
        chunked_expected().len(),
        String::from_utf8_lossy(&got.body[..got.body.len().min(40)])
    );
    // The trailers are not turned into header fields.
    assert!(
        got.header("x-checksum").is_none(),
        "{what}: {:?}",
        got.headers
    );
    assert!(got.header("x-more").is_none(), "{what}: {:?}", got.headers);
}

#[tokio::test]
async fn chunked_response_reaches_an_h1_client_intact_and_the_connection_is_reused() {
    let upstream = RawUpstream::start(|_| chunked_reply()).await;
    let answers = twice_over_one_h1_connection(&upstream, Method::GET, "/chunked", b"").await;
    for (i, got) in answers.into_iter().enumerate() {
        assert_chunked_answer(got, &format!("HTTP/1.1 request {i}"));
    }
    assert_eq!(upstream.seen().len(), 2);
    assert_eq!(
        upstream.connections(),
        1,
        "two sequential requests after complete chunked responses used more than one upstream connection"
    );
}

#[tokio::test]
async fn chunked_response_reaches_an_h2_client_intact_and_the_connection_is_reused() {
    let upstream = RawUpstream::start(|_| chunked_reply()).await;
    let proxy = start_proxy(upstream.addr, "10s").await;
    let mut sender = proxy.client().h2().await;
    for i in 0..2 {
        let got = h2_send(&mut sender, &proxy, Method::GET, "/chunked", b"").await;
        assert_chunked_answer(got, &format!("HTTP/2 request {i}"));
    }
    assert_eq!(upstream.seen().len(), 2);
    assert_eq!(upstream.connections(), 1);
}

// ------------------------------------------------------------ 2. until close

#[tokio::test]
async fn body_ending_at_close_arrives_intact_and_the_connection_is_not_reused() {
    let upstream = RawUpstream::start(|_| {
        let mut bytes = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n".to_vec();
        bytes.extend_from_slice(&pattern(100_000));
        reply(bytes).then(After::Close)
    })
    .await;
    let answers = twice_over_one_h1_connection(&upstream, Method::GET, "/until-close", b"").await;
    for (i, got) in answers.iter().enumerate() {
        assert_eq!(got.status, 200, "request {i}");
        assert!(
            got.body == pattern(100_000),
            "request {i}: {} bytes, not the 100000 sent",
            got.body.len()
        );
    }
    assert_eq!(upstream.connections(), 2);
}

// ------------------------------------------------------------ 3. connection: close

/// The upstream says `Connection: close` but (misbehaving) keeps serving: only
/// the proxy's honouring of the header keeps it from reusing the connection.
#[tokio::test]
async fn connection_close_response_is_relayed_and_the_connection_is_not_reused() {
    let upstream = RawUpstream::start(|_| {
        reply(&b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 5\r\n\r\nhello"[..])
    })
    .await;
    // On the same client connection: the upstream's `Connection: close` is
    // not the client's.
    let answers = twice_over_one_h1_connection(&upstream, Method::GET, "/close", b"").await;
    for (i, got) in answers.iter().enumerate() {
        assert_eq!(got.status, 200, "request {i}");
        assert_eq!(got.text(), "hello", "request {i}");
    }
    assert_eq!(upstream.seen().len(), 2);
    assert_eq!(
        upstream.connections(),
        2,
        "a connection the upstream answered `Connection: close` on was reused"
    );
}

// ------------------------------------------------------------ 4. 1xx

#[tokio::test]
async fn interim_responses_are_skipped_and_the_final_one_relayed() {
    let upstream = RawUpstream::start(|_| {
        reply_in_pieces(&[
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nx-final: yes\r\ncontent-length: 5\r\n\r\nfinal",
        ])
    })
    .await;
    let answers =
        twice_over_one_h1_connection(&upstream, Method::POST, "/continue", b"payload").await;
    for (i, got) in answers.iter().enumerate() {
        assert_eq!(got.status, 200, "request {i}");
        assert_eq!(got.header("x-final"), Some("yes"), "request {i}");
        assert_eq!(got.text(), "final", "request {i}");
    }
    assert_eq!(upstream.last("/continue").body, b"payload");
    assert_eq!(upstream.connections(), 1);
}

/// An upstream that sends interim responses without end never gets to hold
/// the request: past a handful, the client gets the proxy's 502 and the
/// connection is not reused.
#[tokio::test]
async fn endless_interim_responses_are_502() {
    let upstream = RawUpstream::start(|seen| match seen.target.as_str() {
        "/interim" => {
            let mut pieces: Vec<&[u8]> = vec![b"HTTP/1.1 100 Continue\r\n\r\n"; 50];
            pieces.push(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal");
            reply_in_pieces(&pieces)
        }
        _ => reply(OK),
    })
    .await;
    let proxy = start_proxy(upstream.addr, "10s").await;
    for got in [
        get(&proxy.client(), "/interim").await,
        h2_send(
            &mut proxy.client().h2().await,
            &proxy,
            Method::GET,
            "/interim",
            b"",
        )
        .await,
    ] {
        assert_proxy_502(&got, upstream.addr, "50 interim responses");
    }
    let got = get(&proxy.client(), "/ok").await.complete();
    assert_eq!(got.status, 200);
    assert_eq!(
        upstream.connections(),
        3,
        "a connection left mid-response was reused"
    );
}

// ------------------------------------------------------------ 5. bad lengths

/// The rest of every bad response stays on the (kept-open) upstream
/// connection: were it reused, `/ok` would read it as its response.
#[tokio::test]
async fn conflicting_content_lengths_are_502_and_the_proxy_serves_on() {
    let upstream = RawUpstream::start(|seen| match seen.target.as_str() {
        "/two-fields" => {
            reply(&b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!"[..])
        }
        "/one-list" => reply(&b"HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\nhello!"[..]),
        "/not-a-number" => reply(&b"HTTP/1.1 200 OK\r\ncontent-length: 5x\r\n\r\nhello"[..]),
        "/same-twice" => {
            reply(&b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\nhello"[..])
        }
        _ => reply(OK),
    })
    .await;
    let proxy = start_proxy(upstream.addr, "10s").await;
    let client = proxy.client();
    for path in ["/two-fields", "/one-list", "/not-a-number"] {
        let got = get(&client, path).await;
        assert_proxy_502(&got, upstream.addr, path);
        let got = get(&client, "/ok").await.complete();
        assert_eq!(got.status, 200, "after {path}: {got:?}");
        assert_eq!(got.text(), "ok", "after {path}");
    }
    // One length said twice is one length.
    let got = get(&client, "/same-twice").await.complete();
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), "hello");
}

/// Content-Length beside `Transfer-Encoding: chunked`: chunked wins (RFC 9112
/// 6.3), and a connection with such a confused upstream is not reused.
#[tokio::test]
async fn content_length_beside_chunked_is_read_as_chunked_and_not_reused() {
    let upstream = RawUpstream::start(|_| {
        reply(
            &b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"[..],
        )
    })
    .await;
    let answers = twice_over_one_h1_connection(&upstream, Method::GET, "/both", b"").await;
    for (i, got) in answers.iter().enumerate() {
        assert_eq!(got.status, 200, "request {i}");
        assert_eq!(got.text(), "hello", "request {i}");
        assert_ne!(got.header("content-length"), Some("3"), "request {i}");
    }
    assert_eq!(upstream.connections(), 2);
}

// ------------------------------------------------------------ 6. garbage

#[tokio::test]
async fn malformed_response_heads_are_502_and_the_proxy_serves_on() {
    let cases: &[(&str, &[u8])] = &[
        ("/not-http", b"HELLO WORLD\r\n\r\n"),
        (
            "/bad-code",
            b"HTTP/1.1 2x0 OK\r\ncontent-length: 2\r\n\r\nok",
        ),
        (
            "/short-code",
            b"HTTP/1.1 20 OK\r\ncontent-length: 2\r\n\r\nok",
        ),
        ("/http2", b"HTTP/2.0 200 OK\r\ncontent-length: 2\r\n\r\nok"),
        (
            "/bad-field",
            b"HTTP/1.1 200 OK\r\nno colon here\r\ncontent-length: 2\r\n\r\nok",
        ),
        ("/binary", b"\x00\x01\x02\xff\xfe garbage\r\n\r\n"),
        ("/head-cut", b"HTTP/1.1 200 OK\r\ncontent-le"),
    ];
    let table: Vec<(String, Vec<u8>)> = cases
        .iter()
        .map(|(p, b)| (p.to_string(), b.to_vec()))
        .collect();
    let upstream =
        RawUpstream::start(
            move |seen| match table.iter().find(|(path, _)| *path == seen.target) {
                Some((_, bytes)) => reply(bytes.clone()).then(After::Close),
                None => reply(OK),
            },
        )
        .await;
    let proxy = start_proxy(upstream.addr, "10s").await;
    let client = proxy.client();
    for (path, _) in cases {
        let got = get(&client, path).await;
        assert_proxy_502(&got, upstream.addr, path);
        let got = get(&client, "/ok").await.complete();
        assert_eq!(got.status, 200, "after {path}: {got:?}");
        assert_eq!(got.text(), "ok", "after {path}");
    }
}

// ------------------------------------------------------------ 7. cut short

/// Both promise 100 bytes, send 10 and close: one by Content-Length (which
/// the proxy passes on), one inside a chunk (no length the client could
/// check: only the proxy can tell the body is cut short).
fn truncating_upstream_handler(seen: &Seen) -> Reply {
    match seen.target.as_str() {
        "/truncated" => reply(&b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789"[..])
            .then(After::Close),
        "/truncated-chunked" => {
            reply(&b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n64\r\n0123456789"[..])
                .then(After::Close)
        }
        _ => reply(OK),
    }
}

const TRUNCATED: [&str; 2] = ["/truncated", "/truncated-chunked"];

/// Either no response at all (the request failed: connection closed, stream
/// reset) or a 200 whose body ends in an error before 100 bytes.
fn assert_aborted(outcome: Result<Got, String>, what: &str) {
    let Ok(got) = outcome else {
        return;
    };
    assert_eq!(got.status, 200, "{what}: {got:?}");
    assert!(
        got.error.is_some() && got.body.len() < 100,
        "{what}: the client got a complete response ({} bytes, no error) from a cut-short upstream body",
        got.body.len()
    );
}

#[tokio::test]
async fn upstream_closing_mid_body_aborts_the_h1_response() {
    let upstream = RawUpstream::start(truncating_upstream_handler).await;
    let proxy = start_proxy(upstream.addr, "10s").await;
    let client = proxy.client();

    for path in TRUNCATED {
        // The proxy aborts the response: whether the head got out first or
        // not, the client must not see a complete one.
        let mut sender = client.h1().await;
        let outcome = try_answer(sender.send_request(h1_request(Method::GET, path, b""))).await;
        assert_aborted(outcome, &format!("HTTP/1.1 {path}"));

        // On the wire: the connection is closed before 100 body bytes (and
        // not ended with a terminating chunk either).
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        let (text, closed) = client.raw_until_closed(request.as_bytes(), WAIT).await;
        assert!(
            closed,
            "{path}: the client connection stayed open: {text:?}"
        );
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            assert!(head.starts_with("HTTP/1.1 200"), "{path}: {text:?}");
            assert!(
                !body.ends_with("0\r\n\r\n") && body.len() < 100,
                "{path}: the response looks complete: {text:?}"
            );
        }
    }

    let got = get(&client, "/ok").await.complete();
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), "ok");
}

#[tokio::test]
async fn upstream_closing_mid_body_resets_the_h2_stream() {
    let upstream = RawUpstream::start(truncating_upstream_handler).await;
    let proxy = start_proxy(upstream.addr, "10s").await;
    let mut sender = proxy.client().h2().await;
    for path in TRUNCATED {
        let outcome =
            try_answer(sender.send_request(h2_request(&proxy, Method::GET, path, b""))).await;
        assert_aborted(outcome, &format!("HTTP/2 {path}"));
        // The stream was reset, not the connection: it carries the next request.
        let got = h2_send(&mut sender, &proxy, Method::GET, "/ok", b"")
            .await
            .complete();
        assert_eq!(got.status, 200, "after {path}");
        assert_eq!(got.text(), "ok", "after {path}");
    }
}

/// Chunk-size lines outside RFC 9112's grammar: a CR or form feed before
/// `;`, an extension without a name, an unterminated quoted value. Each
/// could be read as another chunk boundary by some other parser, so the
/// response is aborted and the connection never reused.
#[tokio::test]
async fn chunk_lines_outside_the_grammar_abort_the_response() {
    const BAD: [(&str, &[u8]); 4] = [
        ("/cr", b"3\r;x\r\nabc\r\n0\r\n\r\n"),
        ("/form-feed", b"3\x0c;x\r\nabc\r\n0\r\n\r\n"),
        ("/no-name", b"3;=v\r\nabc\r\n0\r\n\r\n"),
        ("/open-quote", b"3;a=\"x\r\nabc\r\n0\r\n\r\n"),
    ];
    let upstream =
        RawUpstream::start(
            |seen| match BAD.iter().find(|(path, _)| *path == seen.target) {
                Some((_, body)) => reply_in_pieces(&[
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                    body,
                ]),
                None => reply(OK),
            },
        )
        .await;
    let proxy = start_proxy(upstream.addr, "10s").await;
    let client = proxy.client();
    for (path, _) in BAD {
        let mut sender = client.h1().await;
        let outcome = try_answer(sender.send_request(h1_request(Method::GET, path, b""))).await;
        assert_aborted(outcome, &format!("HTTP/1.1 {path}"));
        let got = get(&client, "/ok").await.complete();
        assert_eq!(
            (got.status, got.text().as_str()),
            (StatusCode::OK, "ok"),
            "after {path}"
        );
    }
    assert_eq!(
        upstream.connections(),
        BAD.len() + 1,
        "a connection left mid-chunk was reused"
    );
}

// ------------------------------------------------------------ 8. early response

const UPLOAD_BYTES: u64 = 2 * 1024 * 1024;
const UPLOAD_CHUNK: u64 = 64 * 1024;

/// An upload whose first half is sent at once and whose second half waits
/// for `gate`: the request cannot be finished when the upstream answers.
fn gated_upload(gate: tokio::sync::oneshot::Receiver<()>) -> common::UploadBody {
    let stream = futures_util::stream::unfold((0u64, Some(gate)), |(sent, mut gate)| async move {
        if sent >= UPLOAD_BYTES {
            return None;
        }
        if sent >= UPLOAD_BYTES / 2
            && let Some(gate) = gate.take()
        {
            let _ = gate.await;
        }
        let n = UPLOAD_CHUNK.min(UPLOAD_BYTES - sent);
        Some((
            Ok::<_, io::Error>(Frame::data(Bytes::from(vec![b'u'; n as usize]))),
            (sent + n, gate),
        ))
    });
    StreamBody::new(stream).boxed()
}

/// Answers `/upload` with a 413 as soon as the head is in, reading none of
/// the body, then does `after` with the connection; anything else is `ok`.
async fn early_413_upstream(after: After) -> RawUpstream {
    RawUpstream::start(move |seen| match seen.target.as_str() {
        "/upload" => reply(
            &b"HTTP/1.1 413 Payload Too Large\r\nx-from: upstream\r\ncontent-length: 0\r\n\r\n"[..],
        )
        .without_reading_the_body()
        .then(after),
        _ => reply(OK),
    })
    .await
}

#[tokio::test]
async fn early_response_to_an_unfinished_upload_is_relayed_and_the_connection_dropped() {
    // Keeps the connection open: were it reused, the next request would
    // never be answered.
    let upstream = early_413_upstream(After::Hold).await;
    let proxy = start_proxy(upstream.addr, "3s").await;
    let client = proxy.client();

    let (open_gate, gate) = tokio::sync::oneshot::channel();
    let mut sender = client.h1_streaming().await;
    let request = Request::builder()
        .method(Method::POST)
        .uri("/upload")
        .header("host", "localhost")
        .header("content-length", UPLOAD_BYTES)
        .body(gated_upload(gate))
        .unwrap();
    let got = answer(sender.send_request(request)).await;
    drop(open_gate);
    assert_eq!(got.status, 413, "{got:?}");
    assert_eq!(got.header("x-from"), Some("upstream"), "{:?}", got.headers);
    assert!(got.body.is_empty(), "{}", got.text());
    let seen = upstream.last("/upload");
    assert_eq!(
        seen.header_all("content-length"),
        [UPLOAD_BYTES.to_string().as_str()]
    );
    drop(sender);

    let started = std::time::Instant::now();
    let got = get(&client, "/after").await.complete();
    assert_eq!(
        got.status,
        200,
        "the request after an early response failed after {:?}: {got:?}",
        started.elapsed()
    );
    assert_eq!(got.text(), "ok");
    assert_eq!(
        upstream.connections(),
        2,
        "the connection left mid-upload was reused"
    );
}

#[tokio::test]
async fn an_answer_sent_before_closing_on_an_unread_upload_is_relayed() {
    // The upstream answers after the head and closes with the body unread
    // (the kernel then resets the connection), while the proxy is still
    // writing the upload: its write fails, and the answer that arrived
    // before the reset must still reach the client rather than a 502.
    let upstream = early_413_upstream(After::Close).await;
    let proxy = start_proxy(upstream.addr, "5s").await;
    let got = upload_reading_the_answer_meanwhile(&proxy.client(), 8 * 1024 * 1024).await;
    assert_eq!(got.status, 413, "{got:?}");
    assert_eq!(got.header("x-from"), Some("upstream"), "{:?}", got.headers);
    let got = get(&proxy.client(), "/after").await.complete();
    assert_eq!(got.status, 200, "{got:?}");
}

/// POSTs `/upload` with `bytes` of body over a raw HTTP/1.1 TLS connection,
/// as curl does: the answer is read while the upload is written, and a
/// write that fails once the proxy has answered and closed (a conforming
/// client may see a broken pipe or a reset there) does not hide the answer.
async fn upload_reading_the_answer_meanwhile(
    client: &TlsClient,
    bytes: usize,
) -> common::RawResponse {
    let tls = client.connect(&[b"http/1.1"]).await;
    let (mut reader, mut writer) = tokio::io::split(tls);
    let writing = tokio::spawn(async move {
        let head =
            format!("POST /upload HTTP/1.1\r\nhost: localhost\r\ncontent-length: {bytes}\r\n\r\n");
        writer.write_all(head.as_bytes()).await?;
        let chunk = vec![b'u'; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            writer.write_all(&chunk[..n]).await?;
            left -= n;
        }
        Ok::<_, io::Error>(writer)
    });
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut read = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let answer = loop {
        if let Some(answer) = common::parse_responses(&String::from_utf8_lossy(&read))
            .into_iter()
            .next()
        {
            break answer;
        }
        match tokio::time::timeout_at(deadline, reader.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => read.extend_from_slice(&buf[..n]),
            other => panic!(
                "no complete answer ({other:?}) after {:?}",
                String::from_utf8_lossy(&read)
            ),
        }
    };
    writing.abort();
    answer
}

// ------------------------------------------------------------ 9. HEAD

#[tokio::test]
async fn head_response_has_the_length_but_no_body_and_the_connection_is_reused() {
    let upstream = RawUpstream::start(|seen| match seen.method.as_str() {
        "HEAD" => reply(
            &b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 1234\r\n\r\n"[..],
        ),
        _ => reply(&b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nbody"[..]),
    })
    .await;
    let proxy = start_proxy(upstream.addr, "10s").await;

    let mut sender = proxy.client().h1().await;
    let got = h1_send(&mut sender, Method::HEAD, "/head", b"")
        .await
        .complete();
    assert_eq!(got.status, 200);
    assert_eq!(
        got.header("content-length"),
        Some("1234"),
        "{:?}",
        got.headers
    );
    assert!(got.body.is_empty());
    let got = h1_send(&mut sender, Method::GET, "/get", b"")
        .await
        .complete();
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), "body");
    assert_eq!(upstream.connections(), 1);

    // The same over HTTP/2, still on the one upstream connection.
    let mut sender = proxy.client().h2().await;
    let got = h2_send(&mut sender, &proxy, Method::HEAD, "/head", b"")
        .await
        .complete();
    assert_eq!(got.status, 200);
    assert_eq!(
        got.header("content-length"),
        Some("1234"),
        "{:?}",
        got.headers
    );
    assert!(got.body.is_empty());
    let got = h2_send(&mut sender, &proxy, Method::GET, "/get", b"")
        .await
        .complete();
    assert_eq!(got.text(), "body");
    assert_eq!(upstream.seen().len(), 4);
    assert_eq!(upstream.connections(), 1);
}

// ------------------------------------------------------------ 10. big head

fn head_with_filler(fields: usize, value_len: usize) -> Vec<u8> {
    let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
    for i in 0..fields {
        head.extend_from_slice(format!("x-filler-{i}: ").as_bytes());
        head.extend(std::iter::repeat_n(b'f', value_len));
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"content-length: 2\r\n\r\nok");
    head
}

#[tokio::test]
async fn response_head_over_64_kib_is_502() {
    let upstream = RawUpstream::start(|seen| match seen.target.as_str() {
        // One 70 KiB field.
        "/one-big" => reply(head_with_filler(1, 70 * 1024)).then(After::Close),
        // 90 fields of 800 bytes: 72 KB, under the field count limit.
        "/many" => reply(head_with_filler(90, 800)).then(After::Close),
        // 40 KiB: under the limit, relayed.
        "/under" => reply(head_with_filler(1, 40 * 1024)),
        _ => reply(OK),
    })
    .await;
    let proxy = start_proxy(upstream.addr, "10s").await;
    let client = proxy.client();
    for path in ["/one-big", "/many"] {
        let got = get(&client, path).await;
        assert_proxy_502(&got, upstream.addr, path);
        let got = get(&client, "/ok").await.complete();
        assert_eq!(got.status, 200, "after {path}");
    }
    let got = get(&client, "/under").await.complete();
    assert_eq!(got.status, 200);
    assert_eq!(got.header("x-filler-0").map(str::len), Some(40 * 1024));
    assert_eq!(got.text(), "ok");
}

// ------------------------------------------------------------ 11. request framing

fn assert_length_framed(seen: &Seen, length: usize, what: &str) {
    let expected = length.to_string();
    assert_eq!(
        seen.header_all("content-length"),
        [expected.as_str()],
        "{what}: {seen:?}"
    );
    assert!(
        seen.header_all("transfer-encoding").is_empty(),
        "{what}: {seen:?}"
    );
    assert_eq!(seen.body.len(), length, "{what}");
}

fn assert_chunk_framed(seen: &Seen, what: &str) {
    assert_eq!(
        seen.header_all("transfer-encoding"),
        ["chunked"],
        "{what}: {seen:?}"
    );
    assert!(
        seen.header_all("content-length").is_empty(),
        "{what}: {seen:?}"
    );
    assert!(seen.raw_body.ends_with(b"0\r\n\r\n"), "{what}: {seen:?}");
}

#[tokio::test]
async fn request_bodies_reach_the_upstream_with_exact_framing() {
    let upstream = RawUpstream::start(|_| reply(OK)).await;
    let proxy = start_proxy(upstream.addr, "10s").await;
    let client = proxy.client();

    // Chunked from an HTTP/1.1 client (extensions and a trailer included),
    // on the wire.
    let (text, _) = client
        .raw_until_closed(
            b"POST /raw-chunked HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
              5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nx-trailer: t\r\n\r\n",
            WAIT,
        )
        .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
    let seen = upstream.last("/raw-chunked");
    assert_chunk_framed(&seen, "raw chunked");
    assert_eq!(seen.body, b"hello, world");

    // A streamed hyper body of unknown length: many chunks.
    let mut sender = client.h1_streaming().await;
    let request = Request::builder()
        .method(Method::PUT)
        .uri("/streamed")
        .header("host", "localhost")
        .body(common::generated_body(200_000))
        .unwrap();
    let got = answer(sender.send_request(request)).await.complete();
    assert_eq!(got.status, 200);
    let seen = upstream.last("/streamed");
    assert_chunk_framed(&seen, "h1 streamed");
    let mut expected = vec![0u8; 65536];
    expected.extend(vec![1u8; 65536]);
    expected.extend(vec![2u8; 65536]);
    expected.extend(vec![3u8; 200_000 - 3 * 65536]);
    assert!(
        seen.body == expected,
        "h1 streamed: {} bytes",
        seen.body.len()
    );

    // HTTP/2 without content-length: chunked to the upstream.
    let tls = client.connect(&[b"h2"]).await;
    let (mut h2_streaming, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, common::UploadBody>(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let frames = vec![
        Ok::<_, io::Error>(Frame::data(Bytes::from_static(b"h2 "))),
        Ok(Frame::data(Bytes::from_static(b"streamed"))),
    ];
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!(
            "https://localhost:{}/h2-streamed",
            proxy.https.port()
        ))
        .body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
        .unwrap();
    let got = answer(h2_streaming.send_request(request)).await.complete();
    assert_eq!(got.status, 200);
    let seen = upstream.last("/h2-streamed");
    assert_chunk_framed(&seen, "h2 streamed");
    assert_eq!(seen.body, b"h2 streamed");

    // With a content-length: exactly that one, no transfer-encoding.
    let mut sender = client.h1().await;
    let got = h1_send(&mut sender, Method::POST, "/length", b"exactly this")
        .await
        .complete();
    assert_eq!(got.status, 200);
    let seen = upstream.last("/length");
    assert_length_framed(&seen, 12, "h1 content-length");
    assert_eq!(seen.body, b"exactly this");
    let (text, _) = client
        .raw_until_closed(
            b"PATCH /raw-length HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nConnection: close\r\n\r\nabcde",
            WAIT,
        )
        .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
    let seen = upstream.last("/raw-length");
    assert_length_framed(&seen, 5, "raw content-length");
    assert_eq!(seen.body, b"abcde");
    let mut h2 = client.h2().await;
    let got = h2_send(&mut h2, &proxy, Method::PUT, "/h2-length", b"sized")
        .await
        .complete();
    assert_eq!(got.status, 200);
    let seen = upstream.last("/h2-length");
    assert_length_framed(&seen, 5, "h2 content-length");
    assert_eq!(seen.body, b"sized");

    // Empty POSTs: content-length 0, whether the client said so or not.
    for (path, request) in [
        (
            "/empty-no-length",
            &b"POST /empty-no-length HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"[..],
        ),
        (
            "/empty-zero",
            &b"POST /empty-zero HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"[..],
        ),
    ] {
        let (text, _) = client.raw_until_closed(request, WAIT).await;
        assert!(text.starts_with("HTTP/1.1 200"), "{path}: {text:?}");
        assert_length_framed(&upstream.last(path), 0, path);
    }
    let got = h2_send(&mut h2, &proxy, Method::POST, "/h2-empty", b"")
        .await
        .complete();
    assert_eq!(got.status, 200);
    assert_length_framed(&upstream.last("/h2-empty"), 0, "h2 empty POST");

    // A GET without a body has no framing headers at all.
    let got = h1_send(&mut sender, Method::GET, "/get", b"")
        .await
        .complete();
    assert_eq!(got.status, 200);
    let seen = upstream.last("/get");
    assert!(
        seen.header_all("content-length").is_empty()
            && seen.header_all("transfer-encoding").is_empty(),
        "{seen:?}"
    );
}

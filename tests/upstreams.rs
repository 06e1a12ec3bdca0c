//! Issue 24, several upstream servers (SPEC `[upstream] servers`, `balance`,
//! `retries`, `health_check`, `eject`, `[upstreams.NAME]`, route `upstream`,
//! `unix:` URLs, and "Fine points" → "Several upstream servers"), through the
//! real binary over TLS, against upstream servers of this file's own on
//! loopback sockets that can be stopped, restarted on the same port, made to
//! answer 503, to reset every connection after reading the request head, or
//! to hang every connect (a listener whose accept queue is full).
//!
//! What this file proves:
//!
//! * each balance policy spreads sequential keep-alive requests over three
//!   servers (round robin evenly, `random` and `least_request` within a
//!   stated tolerance); `least_request` sends little to a slow server;
//!   `client_ip` keeps each client address on one server, spreads different
//!   addresses, and a reload that removes another server (and reorders the
//!   rest) moves no client whose server stayed;
//! * a stopped server costs no GET its 200, is skipped once unhealthy, and
//!   is used again only after `healthy` successful health checks once it is
//!   back on its port; health changes show in `/metrics` and on stderr;
//! * a server answering 503 is ejected after `consecutive_failures` for
//!   about `duration`, then used again; with every server answering 503 at
//!   most one of three is ejected at a time (the upstream's 503 is relayed,
//!   never the proxy's own 502);
//! * a POST or a PUT with a body whose upstream resets after reading it is
//!   never replayed on another server (the client gets the JSON 502), while a
//!   GET or a DELETE without a body is retried once elsewhere (200);
//! * a route's `upstream = "billing"` reaches only that group, with the
//!   route's policies (methods, JWT) applied as on any route;
//! * reloads from two servers to three and back under HTTP/1.1 and HTTP/2
//!   load fail no request;
//! * with every server unhealthy (connects hanging) the answer is the JSON
//!   502 well under `connect_timeout`, `/readyz` is 503 naming `default`, and
//!   both recover;
//! * `unix:` upstreams, alone and mixed with TCP servers in one group;
//! * `portcullis_upstream_requests_total`, `portcullis_upstream_healthy` and
//!   `portcullis_upstream_in_flight` with `upstream` and `server` labels;
//! * `portcullis check` names the bad key and its line for each invalid
//!   upstream setting.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::{Answer, BIN, Proxy, TlsClient, eventually, make_cert};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

// ---------------------------------------------------------------------------
// Upstream servers of our own

/// Answers every request with a JSON echo naming the server (`backend`);
/// `/status/N` answers N, `/delay/MS` waits first.
const ECHO: u8 = 0;
/// Answers every request (health checks included) with 503.
const FAIL: u8 = 1;
/// Reads the request head, records it, then resets the connection (SO_LINGER 0).
const RESET: u8 = 2;

/// One request a server received, as it arrived.
#[derive(Clone, Debug)]
struct Seen {
    backend: usize,
    method: Method,
    /// Path and query as received.
    target: String,
    headers: HeaderMap,
    at: Instant,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Every request every server of one test received, in arrival order.
type Journal = Arc<Mutex<Vec<Seen>>>;

struct State {
    index: usize,
    /// The server as written in the proxy's configuration.
    url: String,
    mode: AtomicU8,
    /// Milliseconds to wait before each answer (ECHO mode).
    delay_ms: AtomicU64,
    journal: Journal,
}

impl State {
    fn record(&self, method: Method, target: String, headers: HeaderMap) {
        self.journal.lock().unwrap().push(Seen {
            backend: self.index,
            method,
            target,
            headers,
            at: Instant::now(),
        });
    }
}

struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// One upstream server. Stopping it closes its listener and every open
/// connection, and keeps its port bound (not listening, so connecting is
/// refused) until it is restarted on the same port.
struct Backend {
    /// `None` for a Unix socket server.
    addr: Option<SocketAddr>,
    state: Arc<State>,
    running: Option<Running>,
    /// Holds the port while stopped (bound, not listening), or, blackholed,
    /// a listener with a backlog of 0 whose accept queue is full.
    holder: Option<socket2::Socket>,
    /// The connection that fills a blackholed listener's accept queue.
    filler: Option<TcpStream>,
}

impl Backend {
    async fn tcp(index: usize, journal: Journal) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            index,
            url: format!("http://{addr}"),
            mode: AtomicU8::new(ECHO),
            delay_ms: AtomicU64::new(0),
            journal,
        });
        let mut backend = Backend {
            addr: Some(addr),
            state,
            running: None,
            holder: None,
            filler: None,
        };
        backend.serve_tcp(listener);
        backend
    }

    fn unix(index: usize, journal: Journal, path: &Path) -> Backend {
        let listener = UnixListener::bind(path).unwrap();
        let state = Arc::new(State {
            index,
            url: format!("unix:{}", path.display()),
            mode: AtomicU8::new(ECHO),
            delay_ms: AtomicU64::new(0),
            journal,
        });
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(accept_unix(listener, state.clone(), stopped));
        Backend {
            addr: None,
            state,
            running: Some(Running { stop, task }),
            holder: None,
            filler: None,
        }
    }

    fn serve_tcp(&mut self, listener: TcpListener) {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(accept_tcp(listener, self.state.clone(), stopped));
        self.running = Some(Running { stop, task });
    }

    /// Closes the listener and every connection (the proxy sees them closed),
    /// and returns once they are; connecting is refused from then on.
    async fn stop(&mut self) {
        let running = self.running.take().expect("the server is running");
        let _ = running.stop.send(());
        running.task.await.unwrap();
        let addr = self.addr.expect("a TCP server");
        self.holder = Some(hold_port(addr));
    }

    /// Stops the server, then makes its port hang every connect: a listener
    /// with a backlog of 0 and one connection waiting in its accept queue,
    /// so that the kernel drops further SYNs.
    async fn blackhole(&mut self) {
        self.stop().await;
        let addr = self.addr.unwrap();
        self.holder.as_ref().unwrap().listen(0).unwrap();
        let filler = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
            .await
            .expect("the filler connects")
            .unwrap();
        self.filler = Some(filler);
        // The premise of the tests that use this: connecting now hangs.
        let probe =
            tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await;
        assert!(
            probe.is_err(),
            "a blackholed port answered a connect: {probe:?}"
        );
    }

    /// Serves again on the same port.
    async fn restart(&mut self) {
        assert!(self.running.is_none(), "the server is already running");
        let addr = self.addr.unwrap();
        let socket = if self.filler.take().is_some() {
            // A listening holder cannot be reused: close it, bind afresh.
            self.holder = None;
            hold_port(addr)
        } else {
            self.holder.take().expect("a stopped server holds its port")
        };
        socket.listen(1024).unwrap();
        socket.set_nonblocking(true).unwrap();
        let listener = TcpListener::from_std(std::net::TcpListener::from(socket)).unwrap();
        self.serve_tcp(listener);
    }
}

/// A socket bound to `addr` (SO_REUSEADDR, for the connections the stopped
/// server left in TIME_WAIT) and not listening: the port stays ours and
/// connecting to it is refused.
fn hold_port(addr: SocketAddr) -> socket2::Socket {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket
        .bind(&addr.into())
        .unwrap_or_else(|e| panic!("cannot keep hold of {addr}: {e}"));
    socket
}

async fn accept_tcp(listener: TcpListener, state: Arc<State>, mut stop: oneshot::Receiver<()>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                if state.mode.load(Ordering::SeqCst) == RESET {
                    connections.spawn(reset_after_head(tcp, state.clone()));
                } else {
                    connections.spawn(serve_http(tcp, state.clone()));
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

async fn accept_unix(listener: UnixListener, state: Arc<State>, mut stop: oneshot::Receiver<()>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                connections.spawn(serve_http(stream, state.clone()));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

async fn serve_http<IO>(io: IO, state: Arc<State>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| answer(request, state.clone()));
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), service)
        .await;
}

async fn answer(
    request: Request<Incoming>,
    state: Arc<State>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (head, body) = request.into_parts();
    let target = head
        .uri
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned());
    state.record(head.method.clone(), target, head.headers.clone());
    let body_bytes = body
        .collect()
        .await
        .map(|c| c.to_bytes().len())
        .unwrap_or(0);
    let path = head.uri.path();
    let mut status = StatusCode::OK;
    let delay = state.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if state.mode.load(Ordering::SeqCst) == FAIL {
        status = StatusCode::SERVICE_UNAVAILABLE;
    } else if let Some(code) = path.strip_prefix("/status/") {
        status = code
            .parse::<u16>()
            .ok()
            .filter(|c| *c >= 200)
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::BAD_REQUEST);
    } else if let Some(ms) = path.strip_prefix("/delay/") {
        let ms = ms.parse::<u64>().unwrap_or(0).min(30_000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let host = head
        .headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let echo = serde_json::json!({
        "backend": state.url,
        "method": head.method.as_str(),
        "path": path,
        "host": host,
        "body_bytes": body_bytes,
    });
    let mut response = Response::new(Full::new(Bytes::from(echo.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// Reads one request head, records it, and resets the connection without answering.
async fn reset_after_head(mut tcp: TcpStream, state: Arc<State>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    // Bounded: a request head here is far below 64 KiB.
    while buf.len() < 64 * 1024 {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&buf[..end]).into_owned();
            let mut lines = text.split("\r\n");
            let mut request_line = lines.next().unwrap_or_default().split_whitespace();
            let method = Method::from_bytes(request_line.next().unwrap_or("GET").as_bytes())
                .unwrap_or(Method::GET);
            let target = request_line.next().unwrap_or("/").to_string();
            let mut headers = HeaderMap::new();
            for line in lines {
                if let Some((name, value)) = line.split_once(':')
                    && let (Ok(name), Ok(value)) = (
                        HeaderName::from_bytes(name.trim().as_bytes()),
                        HeaderValue::from_str(value.trim()),
                    )
                {
                    headers.append(name, value);
                }
            }
            state.record(method, target, headers);
            break;
        }
        match tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    drop(tcp);
}

/// The servers of one test and what they received.
struct Farm {
    journal: Journal,
    backends: Vec<Backend>,
}

impl Farm {
    async fn start(n: usize) -> Farm {
        let journal = Journal::default();
        let mut backends = Vec::new();
        for index in 0..n {
            backends.push(Backend::tcp(index, journal.clone()).await);
        }
        Farm { journal, backends }
    }

    fn add_unix(&mut self, path: &Path) -> usize {
        let index = self.backends.len();
        self.backends
            .push(Backend::unix(index, self.journal.clone(), path));
        index
    }

    fn url(&self, i: usize) -> String {
        self.backends[i].state.url.clone()
    }

    fn index_of(&self, url: &str) -> Option<usize> {
        self.backends.iter().position(|b| b.state.url == url)
    }

    /// `servers = ["...", ...]` for these servers, in this order.
    fn servers(&self, which: &[usize]) -> String {
        let list: Vec<String> = which
            .iter()
            .map(|&i| format!("\"{}\"", self.url(i)))
            .collect();
        format!("servers = [{}]", list.join(", "))
    }

    fn set_mode(&self, i: usize, mode: u8) {
        self.backends[i].state.mode.store(mode, Ordering::SeqCst);
    }

    fn set_delay(&self, i: usize, ms: u64) {
        self.backends[i].state.delay_ms.store(ms, Ordering::SeqCst);
    }

    async fn stop(&mut self, i: usize) {
        self.backends[i].stop().await;
    }

    async fn blackhole(&mut self, i: usize) {
        self.backends[i].blackhole().await;
    }

    async fn restart(&mut self, i: usize) {
        self.backends[i].restart().await;
    }

    /// How many requests all servers received so far (a mark for [`Farm::since`]).
    fn mark(&self) -> usize {
        self.journal.lock().unwrap().len()
    }

    /// Requests received after `mark`, in arrival order.
    fn since(&self, mark: usize) -> Vec<Seen> {
        self.journal.lock().unwrap()[mark..].to_vec()
    }

    /// Requests whose target starts with `prefix`, all servers, in arrival order.
    fn seen(&self, prefix: &str) -> Vec<Seen> {
        self.journal
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.target.starts_with(prefix))
            .cloned()
            .collect()
    }

    fn count(&self, i: usize, prefix: &str) -> usize {
        self.journal
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.backend == i && s.target.starts_with(prefix))
            .count()
    }

    fn counts(&self, prefix: &str) -> Vec<usize> {
        (0..self.backends.len())
            .map(|i| self.count(i, prefix))
            .collect()
    }

    /// Requests for exactly `target` that server `i` received.
    fn exact(&self, i: usize, target: &str) -> usize {
        self.journal
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.backend == i && s.target == target)
            .count()
    }

    /// The server whose echo `answer` is.
    fn served(&self, answer: &Answer) -> usize {
        let echo = answer.json();
        let url = echo["backend"].as_str().unwrap_or_default();
        self.index_of(url)
            .unwrap_or_else(|| panic!("not one of our servers' echo: {echo}"))
    }
}

// ---------------------------------------------------------------------------
// The proxy

fn config_text(upstream: &str, rest: &str) -> String {
    format!(
        "[server]\nhttps_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nworkers = 2\n\n[tls]\ncert = \"cert.pem\"\nkey = \"cert.key\"\n\n[upstream]\n{upstream}\n\n[log]\nformat = \"json\"\nlevel = \"info\"\n\n{rest}\n"
    )
}

/// Starts the proxy with `upstream` as the body of `[upstream]` and `rest` after.
async fn start_proxy(upstream: &str, rest: &str, env: &[(&str, &str)]) -> Proxy {
    start_proxy_with(&config_text(upstream, rest), env).await
}

/// Starts the proxy on the configuration `text` (see [`config_text`]).
async fn start_proxy_with(text: &str, env: &[(&str, &str)]) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let cert = make_cert(dir.path(), "cert", &["localhost", "127.0.0.1", "::1"]);
    let config_path = dir.path().join("proxy.toml");
    std::fs::write(&config_path, text).unwrap();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Proxy::spawn(dir, cert, config_path, &env).await
}

fn reloads(proxy: &Proxy) -> usize {
    proxy
        .stderr
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("configuration reloaded"))
        .count()
}

/// Writes `text` as the proxy's configuration, sends SIGHUP and waits until
/// the proxy says it reloaded.
async fn reload(proxy: &Proxy, text: &str) {
    let before = reloads(proxy);
    std::fs::write(&proxy.config_path, text).unwrap();
    proxy.signal("HUP");
    let applied = eventually(Duration::from_secs(10), || reloads(proxy) > before).await;
    assert!(
        applied,
        "reload not applied; stderr:\n{}",
        proxy.stderr_text()
    );
}

/// The last lines of the proxy's standard error, for failure messages.
fn tail(proxy: &Proxy) -> String {
    let lines = proxy.stderr.lock().unwrap();
    let from = lines.len().saturating_sub(40);
    lines[from..].join("\n")
}

/// An HTTP/1.1 keep-alive connection to the proxy that reconnects when the
/// proxy closed it between requests.
struct Conn {
    client: TlsClient,
    sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

impl Conn {
    fn new(client: TlsClient) -> Conn {
        Conn {
            client,
            sender: None,
        }
    }

    async fn send(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Answer, String> {
        let usable = match self.sender.as_mut() {
            Some(sender) => !sender.is_closed() && sender.ready().await.is_ok(),
            None => false,
        };
        if !usable {
            self.sender = Some(self.client.h1().await);
        }
        let sender = self.sender.as_mut().unwrap();
        let mut builder = Request::builder().method(method.clone()).uri(path);
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            builder = builder.header("host", "localhost");
        }
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let request = builder.body(Full::new(body)).unwrap();
        match sender.send_request(request).await {
            Ok(response) => Ok(common::collect(response).await),
            Err(error) => {
                self.sender = None;
                Err(format!("{method} {path}: {error}"))
            }
        }
    }

    async fn get(&mut self, path: &str) -> Result<Answer, String> {
        self.send(Method::GET, path, &[], Bytes::new()).await
    }
}

/// A GET that must be answered 200 by one of the servers.
async fn get_200(conn: &mut Conn, path: &str, proxy: &Proxy) -> Answer {
    let answer = conn
        .get(path)
        .await
        .unwrap_or_else(|e| panic!("{e}; stderr:\n{}", tail(proxy)));
    assert_eq!(
        answer.status,
        200,
        "GET {path}: {}; stderr:\n{}",
        answer.text(),
        tail(proxy)
    );
    answer
}

async fn h2_get(
    sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    port: u16,
    path: &str,
) -> Result<Answer, String> {
    let request = Request::get(format!("https://localhost:{port}{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    match sender.send_request(request).await {
        Ok(response) => Ok(common::collect(response).await),
        Err(error) => Err(format!("h2 GET {path}: {error}")),
    }
}

/// An HTTP/1.1 connection to the proxy from the local address `ip` (any of 127/8).
async fn h1_from(
    client: &TlsClient,
    ip: Ipv4Addr,
) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(IpAddr::V4(ip), 0))
        .unwrap_or_else(|e| panic!("cannot bind a client socket to {ip}: {e}"));
    let tcp = socket.connect(client.addr).await.unwrap();
    let tls = client.tls_over(tcp, &[b"http/1.1"]).await;
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

// ---------------------------------------------------------------------------
// Metrics

async fn metrics(proxy: &Proxy) -> String {
    let (status, body) = common::plain_get(proxy.admin.expect("admin listener"), "/metrics").await;
    assert_eq!(status, 200);
    body
}

/// `name="value",...` as in the Prometheus text format.
fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let bytes = text.as_bytes();
    let mut at = 0;
    while at < bytes.len() {
        let Some(eq) = text[at..].find("=\"") else {
            break;
        };
        let name = text[at..at + eq].trim_matches(|c: char| c == ',' || c.is_whitespace());
        let mut value = String::new();
        let mut i = at + eq + 2;
        while i < bytes.len() && bytes[i] != b'"' {
            if bytes[i] == b'\\' && i + 1 < bytes.len() {
                i += 1;
                value.push(if bytes[i] == b'n' {
                    '\n'
                } else {
                    bytes[i] as char
                });
            } else {
                value.push(bytes[i] as char);
            }
            i += 1;
        }
        labels.insert(name.to_string(), value);
        at = i + 1;
    }
    labels
}

/// Every sample of `name`: its labels and value.
fn samples(metrics: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric, labels) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.strip_suffix('}').unwrap_or(rest)),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        if let Ok(value) = value.trim().parse::<f64>() {
            out.push((parse_labels(labels), value));
        }
    }
    out
}

/// The sum of the samples of `name` that carry all these labels; `None` when none does.
fn metric_sum(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> = samples(metrics, name)
        .into_iter()
        .filter(|(found, _)| {
            labels
                .iter()
                .all(|(k, v)| found.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, value)| value)
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}

fn upstream_lines(metrics: &str) -> String {
    metrics
        .lines()
        .filter(|l| l.contains("portcullis_upstream"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Polls `/metrics` until `check` holds; panics with what was last seen.
async fn wait_metrics(proxy: &Proxy, what: &str, within: Duration, check: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + within;
    let mut last = String::new();
    // Bounded by the deadline; each turn is one request to the admin port.
    for _ in 0..100_000 {
        last = metrics(proxy).await;
        if check(&last) {
            return;
        }
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{what}: not seen within {within:?}; upstream metrics:\n{}\nstderr:\n{}",
        upstream_lines(&last),
        tail(proxy)
    );
}

/// Waits until `portcullis_upstream_healthy{upstream=group,server=url}` is
/// `value` for every one of `urls`.
async fn wait_healthy(proxy: &Proxy, group: &str, urls: &[String], value: f64, within: Duration) {
    let what =
        format!("portcullis_upstream_healthy{{upstream=\"{group}\"}} = {value} for {urls:?}");
    wait_metrics(proxy, &what, within, |m| {
        urls.iter().all(|url| {
            metric_sum(
                m,
                "portcullis_upstream_healthy",
                &[("upstream", group), ("server", url)],
            ) == Some(value)
        })
    })
    .await;
}

/// The index of the first line of the proxy's diagnostics, from line
/// `from` on, that names `url` with the word "unhealthy" (`unhealthy`) or
/// the word "healthy" other than as part of "unhealthy" (`!unhealthy`).
fn health_line(proxy: &Proxy, url: &str, unhealthy: bool, from: usize) -> Option<usize> {
    let lines = proxy.stderr.lock().unwrap();
    (from..lines.len()).find(|&i| {
        let line = &lines[i];
        if !line.contains(url) {
            return false;
        }
        let lower = line.to_ascii_lowercase();
        if unhealthy {
            lower.contains("unhealthy")
        } else {
            lower.replace("unhealthy", "").contains("healthy")
        }
    })
}

// ---------------------------------------------------------------------------
// 1. Balance policies

/// 150 sequential GETs over one keep-alive connection to three servers
/// balanced by `policy`; returns what each server received.
async fn spread(policy: &str) -> Vec<usize> {
    let farm = Farm::start(3).await;
    let upstream = format!("{}\nbalance = \"{policy}\"\n", farm.servers(&[0, 1, 2]));
    let proxy = start_proxy(&upstream, "", &[]).await;
    let mut conn = Conn::new(proxy.client());
    for i in 0..150 {
        let path = format!("/spread/{i}");
        let answer = get_200(&mut conn, &path, &proxy).await;
        assert_eq!(answer.json()["path"], path.as_str());
    }
    let counts = farm.counts("/spread/");
    eprintln!("{policy}: {counts:?}");
    assert_eq!(
        counts.iter().sum::<usize>(),
        150,
        "{policy}: each request reached exactly one server: {counts:?}"
    );
    counts
}

#[tokio::test]
async fn round_robin_spreads_evenly_over_three_servers() {
    let counts = spread("round_robin").await;
    // One client connection, nothing else running: round robin is exact, give or take one.
    assert!(
        counts.iter().all(|&n| (45..=55).contains(&n)),
        "round_robin: 150 requests over 3 servers: {counts:?}"
    );
}

#[tokio::test]
async fn random_spreads_over_three_servers() {
    let counts = spread("random").await;
    // A fair share is 50; fewer than 25 (4 standard deviations below) is
    // not chance but a server left out or favoured.
    assert!(
        counts.iter().all(|&n| n >= 25),
        "random: 150 requests over 3 servers: {counts:?}"
    );
}

/// `random` draws from a source of its own in each process: two proxies
/// started on the same configuration do not make the same 40 choices (one
/// worker each, so that both client connections meet the same worker's
/// choices; truly random picks agree 40 times in 3^40).
#[tokio::test]
async fn random_choices_differ_between_two_proxies() {
    let farm = Farm::start(3).await;
    let upstream = format!("{}\nbalance = \"random\"\n", farm.servers(&[0, 1, 2]));
    let text = config_text(&upstream, "").replace("workers = 2", "workers = 1");
    let mut sequences = Vec::new();
    for run in 0..2 {
        let proxy = start_proxy_with(&text, &[]).await;
        let mut conn = Conn::new(proxy.client());
        let mut picks = Vec::new();
        for i in 0..40 {
            let answer = get_200(&mut conn, &format!("/sequence/{run}/{i}"), &proxy).await;
            picks.push(farm.served(&answer));
        }
        sequences.push(picks);
    }
    assert_ne!(
        sequences[0], sequences[1],
        "two proxy processes made the same 40 \"random\" choices: \
         the random source is seeded alike in every process"
    );
}

#[tokio::test]
async fn least_request_spreads_sequential_requests_over_three_servers() {
    // Sequential requests find every server idle: ties must not all go to
    // the same server.
    let counts = spread("least_request").await;
    assert!(
        counts.iter().all(|&n| n >= 25),
        "least_request: 150 sequential requests over 3 idle servers: {counts:?}"
    );
}

#[tokio::test]
async fn least_request_is_the_default_and_sends_little_to_a_slow_server() {
    let farm = Farm::start(2).await;
    // Server 0 takes a second over every answer.
    farm.set_delay(0, 1000);
    // No `balance`: least_request is the default.
    let proxy = start_proxy(&farm.servers(&[0, 1]), "", &[]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = JoinSet::new();
    // Four clients in a loop for three seconds: while the slow server has a
    // request in flight and the fast one has none, the next request goes to
    // the fast one.
    for task in 0..4 {
        let client = proxy.client();
        let stop = stop.clone();
        tasks.spawn(async move {
            let mut conn = Conn::new(client);
            for i in 0..100_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let answer = conn.get(&format!("/lr/{task}/{i}")).await?;
                if answer.status != 200 {
                    return Err(format!("{}: {}", answer.status, answer.text()));
                }
            }
            Ok::<(), String>(())
        });
    }
    // A measured run, not a wait for an event.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    while let Some(result) = tasks.join_next().await {
        result
            .unwrap()
            .unwrap_or_else(|e| panic!("{e}; stderr:\n{}", tail(&proxy)));
    }
    let counts = farm.counts("/lr/");
    eprintln!("least_request with a slow server 0: {counts:?}");
    let total: usize = counts.iter().sum();
    assert!(total >= 20, "too few requests to judge: {counts:?}");
    // Round robin or random would give the slow server half.
    assert!(
        counts[0] * 4 < total,
        "least_request sent {} of {total} requests to the server that takes 1 s: {counts:?}",
        counts[0]
    );
}

/// Which server the client at `ip` is sent to: two connections from that
/// address, two requests on each, all of which must land on one server
/// (and reach it with that address in `X-Forwarded-For`).
async fn placement(farm: &Farm, proxy: &Proxy, ip: Ipv4Addr, tag: &str) -> usize {
    let mut servers = BTreeSet::new();
    for c in 0..2 {
        let mut sender = h1_from(&proxy.client(), ip).await;
        for r in 0..2 {
            let path = format!("/ip/{tag}/{ip}/{c}/{r}");
            let answer = common::send(&mut sender, Method::GET, &path, &[], Bytes::new()).await;
            assert_eq!(
                answer.status,
                200,
                "{path}: {}; stderr:\n{}",
                answer.text(),
                tail(proxy)
            );
            servers.insert(farm.served(&answer));
            let seen = farm.seen(&path);
            assert_eq!(seen.len(), 1, "{path} reached the servers once: {seen:?}");
            assert_eq!(
                seen[0].header("x-forwarded-for"),
                Some(ip.to_string().as_str()),
                "the proxy saw the client's own address"
            );
        }
    }
    assert_eq!(
        servers.len(),
        1,
        "client_ip: the requests of {ip} went to servers {servers:?}"
    );
    *servers.first().unwrap()
}

#[tokio::test]
async fn client_ip_keeps_each_client_on_one_server_and_removing_another_does_not_move_it() {
    let farm = Farm::start(3).await;
    let upstream = |which: &[usize]| format!("{}\nbalance = \"client_ip\"\n", farm.servers(which));
    let proxy = start_proxy(&upstream(&[0, 1, 2]), "", &[]).await;
    // 127.0.0.1 (the test's own client) and eleven more loopback addresses.
    let ips: Vec<Ipv4Addr> = std::iter::once(Ipv4Addr::LOCALHOST)
        .chain((10..21).map(|n| Ipv4Addr::new(127, 0, 0, n)))
        .collect();
    let mut before = Vec::new();
    for &ip in &ips {
        before.push(placement(&farm, &proxy, ip, "before").await);
    }
    // And a keep-alive connection of 127.0.0.1 for 20 more requests.
    let mut conn = Conn::new(proxy.client());
    for i in 0..20 {
        let answer = get_200(&mut conn, &format!("/ip/keepalive/{i}"), &proxy).await;
        assert_eq!(farm.served(&answer), before[0], "127.0.0.1 moved");
    }
    let used: BTreeSet<usize> = before.iter().copied().collect();
    assert!(
        used.len() >= 2,
        "twelve client addresses all hashed to one server: {before:?}"
    );

    // Remove a server that is not 127.0.0.1's, preferably one some client
    // uses, and list the other two in reverse order.
    let chosen = before[0];
    let removed = (0..3)
        .filter(|&s| s != chosen)
        .max_by_key(|&s| before.iter().filter(|&&b| b == s).count())
        .unwrap();
    let mut kept: Vec<usize> = (0..3).filter(|&s| s != removed).collect();
    kept.reverse();
    reload(&proxy, &config_text(&upstream(&kept), "")).await;

    let mut after = Vec::new();
    for &ip in &ips {
        after.push(placement(&farm, &proxy, ip, "after").await);
    }
    eprintln!("client_ip: removed {removed}; before {before:?}, after {after:?}");
    for (i, ip) in ips.iter().enumerate() {
        if before[i] != removed {
            assert_eq!(
                after[i], before[i],
                "{ip} moved from server {} to {} when server {removed} was removed \
                 (rendezvous hashing moves only the removed server's clients); \
                 before {before:?}, after {after:?}",
                before[i], after[i]
            );
        }
    }
    assert_eq!(
        farm.count(removed, "/ip/after/"),
        0,
        "the removed server still got requests"
    );
}

// ---------------------------------------------------------------------------
// 2. A server stops, then comes back

#[tokio::test]
async fn a_stopped_server_costs_no_get_and_comes_back_after_healthy_checks() {
    let mut farm = Farm::start(3).await;
    let urls: Vec<String> = (0..3).map(|i| farm.url(i)).collect();
    let upstream = format!(
        "{}\nbalance = \"round_robin\"\nhealth_check = {{ path = \"/healthz\", interval = \"100ms\", timeout = \"500ms\", healthy = 2, unhealthy = 2 }}\neject = {{ consecutive_failures = 1000, duration = \"1s\" }}\n",
        farm.servers(&[0, 1, 2])
    );
    let proxy = start_proxy(&upstream, "", &[]).await;
    wait_healthy(&proxy, "default", &urls, 1.0, Duration::from_secs(10)).await;
    let mut conn = Conn::new(proxy.client());
    for i in 0..30 {
        get_200(&mut conn, &format!("/before/{i}"), &proxy).await;
    }
    let before = farm.counts("/before/");
    assert!(before.iter().all(|&n| n >= 6), "{before:?}");
    assert!(
        eventually(Duration::from_secs(5), || farm.count(1, "/healthz") >= 1).await,
        "the health check reaches the servers at its path"
    );

    // Server 1 stops: its listener and its connections (some pooled by the
    // proxy) are closed. Not one GET fails meanwhile.
    farm.stop(1).await;
    // Right away, before the health checks notice: a connection refused
    // (or a pooled one found closed before anything was written) is
    // retried on another server whatever the method, so even POSTs pass,
    // each delivered once.
    for i in 0..15 {
        let path = format!("/stopped-post/{i}");
        let answer = conn
            .send(Method::POST, &path, &[], Bytes::from("a body"))
            .await
            .unwrap_or_else(|e| panic!("{e}; stderr:\n{}", tail(&proxy)));
        assert_eq!(
            answer.status,
            200,
            "POST {path} with server 1 just stopped: {}; stderr:\n{}",
            answer.text(),
            tail(&proxy)
        );
        let delivered = farm.exact(0, &path) + farm.exact(2, &path);
        assert_eq!(delivered, 1, "POST {path} delivered {delivered} times");
    }
    for i in 0..60 {
        get_200(&mut conn, &format!("/stopped/{i}"), &proxy).await;
    }
    wait_healthy(&proxy, "default", &urls[1..2], 0.0, Duration::from_secs(10)).await;
    let mut unhealthy_at = None;
    eventually(Duration::from_secs(5), || {
        unhealthy_at = health_line(&proxy, &urls[1], true, 0);
        unhealthy_at.is_some()
    })
    .await;
    let unhealthy_at = unhealthy_at.unwrap_or_else(|| {
        panic!(
            "no diagnostic says {} is unhealthy; stderr:\n{}",
            urls[1],
            tail(&proxy)
        )
    });

    // Unhealthy, it is skipped: its share goes to the other two, and no
    // further request is even tried on it.
    let tried = |m: &str| {
        metric_sum(
            m,
            "portcullis_upstream_requests_total",
            &[("upstream", "default"), ("server", &urls[1])],
        )
        .unwrap_or(0.0)
    };
    let tried_before = tried(&metrics(&proxy).await);
    for i in 0..60 {
        get_200(&mut conn, &format!("/skipped/{i}"), &proxy).await;
    }
    let skipped = farm.counts("/skipped/");
    assert!(
        skipped[0] >= 12 && skipped[2] >= 12 && skipped[1] == 0,
        "60 requests with server 1 down: {skipped:?}"
    );
    let tried_after = tried(&metrics(&proxy).await);
    assert_eq!(
        tried_before,
        tried_after,
        "requests were tried on the unhealthy server; upstream metrics:\n{}",
        upstream_lines(&metrics(&proxy).await)
    );

    // Back on its port: it is used again, and only after `healthy` (2)
    // successful health checks.
    let mark = farm.mark();
    farm.restart(1).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    for i in 0..10_000 {
        if farm.count(1, "/back/") > 0 || Instant::now() > deadline {
            break;
        }
        get_200(&mut conn, &format!("/back/{i}"), &proxy).await;
        // Pacing, so that the loop does not hog the two cores.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let since: Vec<Seen> = farm
        .since(mark)
        .into_iter()
        .filter(|s| s.backend == 1)
        .collect();
    let first = since
        .iter()
        .position(|s| s.target.starts_with("/back/"))
        .unwrap_or_else(|| {
            panic!(
                "the restarted server got no request within 10 s; it saw {:?}; stderr:\n{}",
                since.iter().map(|s| &s.target).collect::<Vec<_>>(),
                tail(&proxy)
            )
        });
    let checks = since[..first]
        .iter()
        .filter(|s| s.target == "/healthz" && s.method == Method::GET)
        .count();
    eprintln!("restarted server: first request after {checks} health checks");
    assert!(
        checks >= 2,
        "the restarted server got a request after {checks} health check(s), `healthy = 2`"
    );
    wait_healthy(&proxy, "default", &urls, 1.0, Duration::from_secs(10)).await;
    assert!(
        eventually(Duration::from_secs(5), || {
            health_line(&proxy, &urls[1], false, unhealthy_at + 1).is_some()
        })
        .await,
        "no diagnostic after the unhealthy one says {} is healthy again; stderr:\n{}",
        urls[1],
        tail(&proxy)
    );
    for i in 0..30 {
        get_200(&mut conn, &format!("/after/{i}"), &proxy).await;
    }
    let after = farm.counts("/after/");
    assert!(after.iter().all(|&n| n >= 6), "{after:?}");
}

// ---------------------------------------------------------------------------
// 3. Passive ejection

#[tokio::test]
async fn a_server_answering_503_is_ejected_for_a_while_and_never_more_than_half_are() {
    let farm = Farm::start(3).await;
    farm.set_mode(0, FAIL);
    let upstream = format!(
        "{}\nbalance = \"round_robin\"\neject = {{ consecutive_failures = 3, duration = \"1s\" }}\n",
        farm.servers(&[0, 1, 2])
    );
    let proxy = start_proxy(&upstream, "", &[]).await;
    let mut conn = Conn::new(proxy.client());

    // Until the failing server has had its fourth request: three failures
    // eject it, and it comes back after `duration`.
    let deadline = Instant::now() + Duration::from_secs(20);
    for i in 0..100_000 {
        if farm.count(0, "/e/") >= 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the failing server never came back: {:?}; stderr:\n{}",
            farm.counts("/e/"),
            tail(&proxy)
        );
        let path = format!("/e/{i}");
        let answer = conn
            .get(&path)
            .await
            .unwrap_or_else(|e| panic!("{e}; stderr:\n{}", tail(&proxy)));
        assert!(
            answer.status == 200 || answer.status == 503,
            "{path}: {} {}",
            answer.status,
            answer.text()
        );
    }
    let seen = farm.seen("/e/");
    let failing: Vec<&Seen> = seen.iter().filter(|s| s.backend == 0).collect();
    let (third, fourth) = (failing[2].at, failing[3].at);
    let gap = fourth - third;
    let between = seen
        .iter()
        .filter(|s| s.backend != 0 && s.at > third && s.at < fourth)
        .count();
    eprintln!("ejection: gap {gap:?}, {between} requests to the others in between");
    assert!(
        gap >= Duration::from_millis(800) && between >= 4,
        "after its third 503 the server got another request {gap:?} later, \
         {between} requests to the others in between (ejected for 1 s: expected ≥ 800 ms and ≥ 4)"
    );
    assert!(
        gap <= Duration::from_secs(5),
        "the ejected server came back only after {gap:?} (duration = 1s)"
    );

    // Every server answers 503: at most one of the three is ejected at a
    // time, so requests keep reaching the others and the client gets their
    // 503, never the proxy's own 502.
    farm.set_mode(1, FAIL);
    farm.set_mode(2, FAIL);
    let mark = farm.mark();
    for i in 0..60 {
        let path = format!("/all/{i}");
        let answer = conn
            .get(&path)
            .await
            .unwrap_or_else(|e| panic!("{e}; stderr:\n{}", tail(&proxy)));
        assert_eq!(
            answer.status,
            503,
            "{path}: {} (the upstream's 503 expected: some server stays in rotation)",
            answer.text()
        );
        assert!(
            answer.json()["backend"].is_string(),
            "{path}: the 503 is the upstream's echo: {}",
            answer.text()
        );
    }
    let arrivals: Vec<usize> = farm
        .since(mark)
        .iter()
        .filter(|s| s.target.starts_with("/all/"))
        .map(|s| s.backend)
        .collect();
    assert!(arrivals.len() >= 60, "{arrivals:?}");
    for window in arrivals.windows(6) {
        let servers: BTreeSet<usize> = window.iter().copied().collect();
        assert!(
            servers.len() >= 2,
            "six requests in a row went to one server while all three failed \
             (two of three ejected at once?): {arrivals:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// 4. Retries: never replay a body

#[tokio::test]
async fn a_post_the_upstream_reset_is_not_replayed_and_a_get_is_retried_once_elsewhere() {
    let farm = Farm::start(3).await;
    let resetter = 0;
    farm.set_mode(resetter, RESET);
    let upstream = format!(
        "{}\nbalance = \"round_robin\"\nretries = 1\neject = {{ consecutive_failures = 1000, duration = \"1s\" }}\n",
        farm.servers(&[0, 1, 2])
    );
    let proxy = start_proxy(&upstream, "", &[]).await;
    let mut conn = Conn::new(proxy.client());
    // (method, requests, with a body)
    let plan: [(Method, usize, bool); 4] = [
        (Method::POST, 30, true),
        (Method::PUT, 15, true),
        (Method::DELETE, 15, false),
        (Method::GET, 30, false),
    ];
    for (method, n, with_body) in &plan {
        let mut at_resetter = 0;
        for i in 0..*n {
            let path = format!("/{}/{i}", method.as_str().to_ascii_lowercase());
            let body = if *with_body {
                Bytes::from(format!("payload of {path}"))
            } else {
                Bytes::new()
            };
            let answer = conn
                .send(method.clone(), &path, &[("x-marker", &path)], body)
                .await
                .unwrap_or_else(|e| panic!("{e}; stderr:\n{}", tail(&proxy)));
            let reset = farm.exact(resetter, &path);
            let good = farm.exact(1, &path) + farm.exact(2, &path);
            assert!(reset <= 1, "{path} reached the resetter {reset} times");
            at_resetter += reset;
            if *with_body && reset == 1 {
                assert_eq!(
                    good, 0,
                    "{method} {path} with a body was reset by its upstream and then replayed on another"
                );
                assert_eq!(answer.status, 502, "{path}: {}", answer.text());
                assert!(
                    answer.json()["error"].is_string(),
                    "{path}: the proxy's JSON error: {}",
                    answer.text()
                );
            } else {
                assert_eq!(
                    answer.status,
                    200,
                    "{method} {path} (reached the resetter: {}): {}; stderr:\n{}",
                    reset == 1,
                    answer.text(),
                    tail(&proxy)
                );
                assert_eq!(good, 1, "{path} reached a good server {good} times");
                assert_ne!(farm.served(&answer), resetter);
            }
        }
        eprintln!("{method}: {at_resetter} of {n} reached the resetter");
        // Round robin over three: about a third reach the resetter.
        assert!(
            at_resetter >= n / 5,
            "only {at_resetter} of {n} {method} requests reached the resetter"
        );
    }
}

// ---------------------------------------------------------------------------
// 5. Named upstream groups

const SECRET: &str = "upstreams-integration-test-secret-0123456789abcdef";

fn token(sub: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 300;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({ "sub": sub, "exp": exp }),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn a_route_with_a_named_upstream_reaches_only_that_group_with_its_policies() {
    let farm = Farm::start(3).await;
    let billing = 2;
    let upstream = format!("{}\nbalance = \"round_robin\"\n", farm.servers(&[0, 1]));
    let rest = format!(
        "[upstreams.billing]\nurl = \"{}\"\n\n[jwt]\nalgorithms = [\"HS256\"]\nsecret_env = \"JWT_SECRET\"\n\n[[routes]]\npath = \"/billing\"\nupstream = \"billing\"\nmethods = [\"GET\"]\n\n[[routes]]\npath = \"/billing/admin\"\nupstream = \"billing\"\njwt = true\n\n[[routes]]\npath = \"/api\"\nmethods = [\"GET\"]\n",
        farm.url(billing)
    );
    let proxy = start_proxy(&upstream, &rest, &[("JWT_SECRET", SECRET)]).await;
    let mut conn = Conn::new(proxy.client());
    for i in 0..10 {
        let answer = get_200(&mut conn, &format!("/billing/invoices/{i}"), &proxy).await;
        assert_eq!(farm.served(&answer), billing);
    }
    for i in 0..10 {
        let path = if i % 2 == 0 {
            format!("/api/orders/{i}")
        } else {
            format!("/elsewhere/{i}")
        };
        let answer = get_200(&mut conn, &path, &proxy).await;
        assert_ne!(farm.served(&answer), billing, "{path} reached billing");
    }
    let counts = farm.counts("/billing/");
    assert_eq!(counts, [0, 0, 10], "only billing serves /billing");
    let default: Vec<usize> = (0..3)
        .map(|i| farm.count(i, "/api/") + farm.count(i, "/elsewhere/"))
        .collect();
    assert!(
        default[0] >= 1 && default[1] >= 1 && default[2] == 0,
        "the default group serves the other routes: {default:?}"
    );

    // The billing routes' policies apply as on any route.
    let answer = conn
        .send(Method::POST, "/billing/invoices", &[], Bytes::from("{}"))
        .await
        .unwrap();
    assert_eq!(answer.status, 405, "{}", answer.text());
    assert!(
        answer.header("allow").is_some_and(|a| a.contains("GET")),
        "{:?}",
        answer.headers
    );
    let answer = conn.get("/billing/admin/users").await.unwrap();
    assert_eq!(answer.status, 401, "{}", answer.text());
    assert_eq!(
        farm.count(billing, "/billing/admin")
            + farm.count(0, "/billing")
            + farm.count(1, "/billing"),
        0,
        "a rejected request was forwarded"
    );
    assert_eq!(
        farm.exact(billing, "/billing/invoices"),
        0,
        "the 405 POST was forwarded"
    );
    let bearer = format!("Bearer {}", token("alice"));
    let answer = conn
        .send(
            Method::GET,
            "/billing/admin/users",
            &[("authorization", &bearer)],
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(farm.served(&answer), billing);
    let seen = farm.seen("/billing/admin/users");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("x-auth-subject"), Some("alice"));

    // The metrics name the group and the server.
    let billing_url = farm.url(billing);
    let default_url = farm.url(0);
    wait_metrics(
        &proxy,
        "portcullis_upstream_requests_total for billing and default",
        Duration::from_secs(5),
        |m| {
            metric_sum(
                m,
                "portcullis_upstream_requests_total",
                &[
                    ("upstream", "billing"),
                    ("server", &billing_url),
                    ("status_class", "2xx"),
                ],
            ) == Some(11.0)
                && metric_sum(
                    m,
                    "portcullis_upstream_requests_total",
                    &[
                        ("upstream", "default"),
                        ("server", &default_url),
                        ("status_class", "2xx"),
                    ],
                )
                .is_some_and(|n| n >= 1.0)
        },
    )
    .await;
}

// ---------------------------------------------------------------------------
// 6. Reload under load

#[tokio::test]
async fn reloading_from_two_servers_to_three_and_back_under_load_fails_no_request() {
    let mut farm = Farm::start(3).await;
    let two = config_text(
        &format!("{}\nbalance = \"round_robin\"\n", farm.servers(&[0, 1])),
        "",
    );
    let three = config_text(
        &format!("{}\nbalance = \"round_robin\"\n", farm.servers(&[0, 1, 2])),
        "",
    );
    let proxy = start_proxy_with(&two, &[]).await;

    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = JoinSet::new();
    // Two HTTP/1.1 keep-alive clients and two HTTP/2 clients, in a loop.
    for task in 0..4 {
        let client = proxy.client();
        let (ok, failures, stop) = (ok.clone(), failures.clone(), stop.clone());
        tasks.spawn(async move {
            let port = client.addr.port();
            let mut h1 = Conn::new(client.clone());
            let mut h2 = if task % 2 == 1 {
                Some(client.h2().await)
            } else {
                None
            };
            for i in 0..1_000_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let path = format!("/load/{task}/{i}");
                let result = match h2.as_mut() {
                    Some(sender) => h2_get(sender, port, &path).await,
                    None => h1.get(&path).await,
                };
                match result {
                    Ok(answer) if answer.status == 200 => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(answer) => failures.lock().unwrap().push(format!(
                        "{path}: {} {}",
                        answer.status,
                        answer.text()
                    )),
                    Err(error) => {
                        failures.lock().unwrap().push(error);
                        if h2.is_some() {
                            h2 = Some(client.h2().await);
                        }
                    }
                }
            }
        });
    }
    let wait_ok = |more: usize| {
        let target = ok.load(Ordering::SeqCst) + more;
        let ok = ok.clone();
        async move {
            let reached = eventually(Duration::from_secs(20), || {
                ok.load(Ordering::SeqCst) >= target
            })
            .await;
            assert!(reached, "the load stalled below {target} requests");
        }
    };
    wait_ok(40).await;

    reload(&proxy, &three).await;
    assert!(
        eventually(Duration::from_secs(10), || farm.count(2, "/load/") >= 10).await,
        "the added server got no load: {:?}; stderr:\n{}",
        farm.counts("/load/"),
        tail(&proxy)
    );
    wait_ok(40).await;

    reload(&proxy, &two).await;
    // Requests already on their way when the reload landed may still reach it.
    wait_ok(40).await;
    let third = farm.count(2, "/load/");
    wait_ok(80).await;
    assert_eq!(
        farm.count(2, "/load/"),
        third,
        "the removed server still gets requests"
    );
    // Gone for good: its connections (possibly pooled) close. Still no failure.
    farm.stop(2).await;
    wait_ok(80).await;

    stop.store(true, Ordering::SeqCst);
    while let Some(result) = tasks.join_next().await {
        result.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}; stderr:\n{}",
        failures.len(),
        failures.len() + ok.load(Ordering::SeqCst),
        &failures[..failures.len().min(10)],
        tail(&proxy)
    );
    let counts = farm.counts("/load/");
    assert!(counts[0] > 0 && counts[1] > 0, "{counts:?}");
}

// ---------------------------------------------------------------------------
// 7. No healthy server

#[tokio::test]
async fn with_every_server_unhealthy_the_answer_is_502_at_once_and_readyz_names_the_group() {
    let mut farm = Farm::start(2).await;
    let urls: Vec<String> = (0..2).map(|i| farm.url(i)).collect();
    let upstream = format!(
        "{}\nconnect_timeout = \"5s\"\nhealth_check = {{ path = \"/healthz\", interval = \"100ms\", timeout = \"300ms\", healthy = 2, unhealthy = 2 }}\neject = {{ consecutive_failures = 1000, duration = \"1s\" }}\n",
        farm.servers(&[0, 1])
    );
    let proxy = start_proxy(&upstream, "", &[]).await;
    let admin = proxy.admin.expect("admin listener");
    wait_healthy(&proxy, "default", &urls, 1.0, Duration::from_secs(10)).await;
    let mut conn = Conn::new(proxy.client());
    get_200(&mut conn, "/up", &proxy).await;
    let (status, body) = common::plain_get(admin, "/readyz").await;
    assert_eq!(status, 200, "{body}");

    // Both servers now hang every connect: a request that tried one would
    // wait for connect_timeout (5 s).
    farm.blackhole(0).await;
    farm.blackhole(1).await;
    wait_healthy(&proxy, "default", &urls, 0.0, Duration::from_secs(15)).await;
    let mut readyz = (0, String::new());
    let deadline = Instant::now() + Duration::from_secs(10);
    for _ in 0..1000 {
        readyz = common::plain_get(admin, "/readyz").await;
        if readyz.0 == 503 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        readyz.0, 503,
        "/readyz with no healthy server: {}",
        readyz.1
    );
    assert!(
        readyz.1.contains("default"),
        "/readyz names the group without a healthy server: {}",
        readyz.1
    );
    for i in 0..5 {
        let path = format!("/down/{i}");
        let started = Instant::now();
        let answer = conn
            .get(&path)
            .await
            .unwrap_or_else(|e| panic!("{e}; stderr:\n{}", tail(&proxy)));
        let took = started.elapsed();
        eprintln!("{path}: {} in {took:?}", answer.status);
        assert_eq!(answer.status, 502, "{path}: {}", answer.text());
        assert!(
            answer.json()["error"].is_string(),
            "{path}: the proxy's JSON error: {}",
            answer.text()
        );
        assert!(
            took < Duration::from_secs(1),
            "{path}: the 502 took {took:?} (connect_timeout = 5s; no healthy server means at once)"
        );
    }

    // Both back: healthy again, ready again, served again.
    farm.restart(0).await;
    farm.restart(1).await;
    wait_healthy(&proxy, "default", &urls, 1.0, Duration::from_secs(15)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    for _ in 0..1000 {
        readyz = common::plain_get(admin, "/readyz").await;
        if readyz.0 == 200 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(readyz.0, 200, "/readyz once both are back: {}", readyz.1);
    for i in 0..4 {
        get_200(&mut conn, &format!("/again/{i}"), &proxy).await;
    }
    assert_eq!(
        farm.count(0, "/down/") + farm.count(1, "/down/"),
        0,
        "nothing of the 502'd requests was forwarded"
    );
}

// ---------------------------------------------------------------------------
// 8. `portcullis check`

const VALID: &str = r#"[server]
https_listen = "127.0.0.1:0"

[tls]
cert = "cert.pem"
key = "cert.key"

[upstream]
servers = ["http://127.0.0.1:3001", "http://127.0.0.1:3002", "unix:/run/app.sock"]
balance = "round_robin"
retries = 1
health_check = { path = "/healthz", interval = "5s", timeout = "1s", healthy = 2, unhealthy = 3 }
eject = { consecutive_failures = 5, duration = "30s" }

[upstreams.billing]
url = "http://127.0.0.1:4000"

[[routes]]
path = "/billing"
upstream = "billing"
"#;

/// Runs `portcullis check` on `text` (next to a certificate): exit code and stderr.
fn check(text: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    make_cert(dir.path(), "cert", &["localhost"]);
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, text).unwrap();
    let output = std::process::Command::new(BIN)
        .args(["check", "--config", config.to_str().unwrap()])
        .env_remove("PORTCULLIS_CONFIG")
        .env_remove("JWT_SECRET")
        .output()
        .expect("run portcullis check");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// 1-based line of the first occurrence of `needle` in `text`.
fn line_of(text: &str, needle: &str) -> usize {
    let offset = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in {text}"));
    text[..offset].matches('\n').count() + 1
}

/// `check` exits 2 with a `proxy.toml:LINE:COL: KEY: why` line whose LINE
/// is the line of one of `at` and whose KEY contains `key`.
fn assert_check_error(what: &str, text: &str, at: &[&str], key: &str) {
    let (code, err) = check(text);
    assert_eq!(code, Some(2), "{what}: exit status; stderr: {err}");
    let lines: Vec<usize> = at.iter().map(|needle| line_of(text, needle)).collect();
    let found = err.lines().any(|l| {
        let Some((_, rest)) = l.split_once("proxy.toml:") else {
            return false;
        };
        let mut parts = rest.splitn(4, ':');
        let line = parts.next().and_then(|s| s.trim().parse::<usize>().ok());
        let column = parts.next().and_then(|s| s.trim().parse::<usize>().ok());
        let named = parts.next().unwrap_or_default().trim();
        let why = parts.next().unwrap_or_default().trim();
        line.is_some_and(|n| lines.contains(&n))
            && column.is_some()
            && named.contains(key)
            && !why.is_empty()
    });
    assert!(
        found,
        "{what}: expected `proxy.toml:L:C: ...{key}...: why` with L in {lines:?}; stderr: {err}"
    );
}

#[test]
fn check_accepts_several_servers_and_names_each_bad_upstream_setting() {
    let (code, err) = check(VALID);
    assert_eq!(code, Some(0), "the valid configuration: {err}");

    let unknown = VALID.replace("upstream = \"billing\"", "upstream = \"payments\"");
    assert_check_error(
        "a route naming an unknown upstream",
        &unknown,
        &["upstream = \"payments\""],
        "upstream",
    );

    let both = VALID.replace(
        "[upstream]\n",
        "[upstream]\nurl = \"http://127.0.0.1:3000\"\n",
    );
    assert_check_error(
        "url and servers together",
        &both,
        &[
            "[upstream]\n",
            "url = \"http://127.0.0.1:3000\"",
            "servers = [",
        ],
        "upstream",
    );

    let servers_line =
        "servers = [\"http://127.0.0.1:3001\", \"http://127.0.0.1:3002\", \"unix:/run/app.sock\"]";
    assert!(VALID.contains(servers_line));
    let empty = VALID.replace(servers_line, "servers = []");
    assert_check_error(
        "an empty servers list",
        &empty,
        &["servers = []"],
        "servers",
    );

    for bad in [
        "https://127.0.0.1:3002",
        "127.0.0.1:3002",
        "ftp://127.0.0.1:3002",
    ] {
        let line = format!("servers = [\"http://127.0.0.1:3001\", \"{bad}\"]");
        let text = VALID.replace(servers_line, &line);
        assert_check_error(&format!("a server {bad:?}"), &text, &[&line], "servers");
    }

    let text = VALID.replace("consecutive_failures = 5", "consecutive_failures = 0");
    assert_check_error(
        "eject.consecutive_failures = 0",
        &text,
        &["eject = {"],
        "consecutive_failures",
    );

    let text = VALID.replace("healthy = 2", "healthy = 0");
    assert_check_error(
        "health_check.healthy = 0",
        &text,
        &["health_check = {"],
        "health_check.healthy",
    );

    let text = VALID.replace("unhealthy = 3", "unhealthy = 0");
    assert_check_error(
        "health_check.unhealthy = 0",
        &text,
        &["health_check = {"],
        "unhealthy",
    );

    let text = VALID.replace("balance = \"round_robin\"", "balance = \"fastest\"");
    assert_check_error(
        "an unknown balance",
        &text,
        &["balance = \"fastest\""],
        "balance",
    );

    let text = VALID.replace(
        "[upstreams.billing]\nurl = \"http://127.0.0.1:4000\"",
        "[upstreams.billing]\nservers = []",
    );
    assert_check_error(
        "a named group with an empty servers list",
        &text,
        &["servers = []"],
        "billing",
    );
}

// ---------------------------------------------------------------------------
// 9. Unix sockets

#[tokio::test]
async fn a_unix_socket_upstream_gets_the_request_with_the_clients_host() {
    let dir = tempfile::tempdir().unwrap();
    let mut farm = Farm {
        journal: Journal::default(),
        backends: Vec::new(),
    };
    let app = farm.add_unix(&dir.path().join("app.sock"));
    let proxy = start_proxy(&format!("url = \"{}\"\n", farm.url(app)), "", &[]).await;
    // A Host the proxy could not make up.
    let host = format!("localhost:{}", proxy.https.port());
    let mut conn = Conn::new(proxy.client());
    for i in 0..3 {
        let path = format!("/unix/{i}?q=1");
        let answer = conn
            .send(Method::GET, &path, &[("host", &host)], Bytes::new())
            .await
            .unwrap();
        assert_eq!(
            answer.status,
            200,
            "{}; stderr:\n{}",
            answer.text(),
            tail(&proxy)
        );
        assert_eq!(farm.served(&answer), app);
        let seen = farm.seen(&path);
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].header("host"), Some(host.as_str()));
        assert_eq!(seen[0].header("x-forwarded-proto"), Some("https"));
    }
    let answer = conn
        .send(Method::POST, "/unix/post", &[], Bytes::from("twelve bytes"))
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["body_bytes"], 12);
}

#[tokio::test]
async fn unix_and_tcp_servers_share_one_group() {
    let dir = tempfile::tempdir().unwrap();
    let mut farm = Farm::start(1).await;
    let app = farm.add_unix(&dir.path().join("app.sock"));
    let upstream = format!("{}\nbalance = \"round_robin\"\n", farm.servers(&[app, 0]));
    let proxy = start_proxy(&upstream, "", &[]).await;
    let mut conn = Conn::new(proxy.client());
    for i in 0..20 {
        get_200(&mut conn, &format!("/mixed/{i}"), &proxy).await;
    }
    let counts = farm.counts("/mixed/");
    assert!(
        counts.iter().all(|&n| n >= 5),
        "20 requests over a TCP and a Unix socket server: {counts:?}"
    );
    let unix_url = farm.url(app);
    wait_metrics(
        &proxy,
        "requests_total for the unix server",
        Duration::from_secs(5),
        |m| {
            metric_sum(
                m,
                "portcullis_upstream_requests_total",
                &[("upstream", "default"), ("server", &unix_url)],
            )
            .is_some_and(|n| n >= 5.0)
        },
    )
    .await;
}

// ---------------------------------------------------------------------------
// 10. Metrics

#[tokio::test]
async fn upstream_metrics_count_per_group_and_server() {
    let farm = Farm::start(2).await;
    let urls: Vec<String> = (0..2).map(|i| farm.url(i)).collect();
    let upstream = format!("{}\nbalance = \"round_robin\"\n", farm.servers(&[0, 1]));
    let proxy = start_proxy(&upstream, "", &[]).await;
    let mut conn = Conn::new(proxy.client());
    for i in 0..10 {
        get_200(&mut conn, &format!("/m/{i}"), &proxy).await;
    }
    let answer = conn.get("/status/404").await.unwrap();
    assert_eq!(answer.status, 404);
    let counts = farm.counts("/m/");
    let requests = |m: &str, server: &str, class: &str| {
        metric_sum(
            m,
            "portcullis_upstream_requests_total",
            &[
                ("upstream", "default"),
                ("server", server),
                ("status_class", class),
            ],
        )
        .unwrap_or(0.0)
    };
    wait_metrics(
        &proxy,
        "portcullis_upstream_requests_total per server and status class",
        Duration::from_secs(5),
        |m| {
            requests(m, &urls[0], "2xx") == counts[0] as f64
                && requests(m, &urls[1], "2xx") == counts[1] as f64
                && requests(m, &urls[0], "4xx") + requests(m, &urls[1], "4xx") == 1.0
        },
    )
    .await;
    let m = metrics(&proxy).await;
    for url in &urls {
        assert_eq!(
            metric_sum(
                &m,
                "portcullis_upstream_healthy",
                &[("upstream", "default"), ("server", url)]
            ),
            Some(1.0),
            "{}",
            upstream_lines(&m)
        );
    }

    // One slow request in flight on some server, then none.
    let client = proxy.client();
    let slow = tokio::spawn(async move { client.get("/delay/1500").await });
    let in_flight = |m: &str| {
        urls.iter()
            .map(|url| {
                metric_sum(
                    m,
                    "portcullis_upstream_in_flight",
                    &[("upstream", "default"), ("server", url)],
                )
                .unwrap_or(0.0)
            })
            .sum::<f64>()
    };
    wait_metrics(
        &proxy,
        "portcullis_upstream_in_flight = 1",
        Duration::from_secs(5),
        |m| in_flight(m) == 1.0,
    )
    .await;
    let answer = slow.await.unwrap();
    assert_eq!(answer.status, 200);
    wait_metrics(
        &proxy,
        "portcullis_upstream_in_flight = 0",
        Duration::from_secs(5),
        |m| in_flight(m) == 0.0,
    )
    .await;
}

/// A reload keeps what the health checks learnt about the servers that
/// stay: a server found unhealthy stays out of rotation in the new
/// generation before any of that generation's checks could judge it.
#[tokio::test]
async fn a_reload_keeps_the_health_of_servers_that_stay() {
    let mut farm = Farm::start(3).await;
    let checks = |interval: &str| {
        format!(
            "health_check = {{ path = \"/healthz\", interval = \"{interval}\", timeout = \"200ms\", healthy = 2, unhealthy = 2 }}\neject = {{ consecutive_failures = 1000, duration = \"1s\" }}"
        )
    };
    let before = format!("{}\n{}", farm.servers(&[0, 1]), checks("100ms"));
    let proxy = start_proxy(&before, "", &[]).await;
    farm.stop(1).await;
    let down = farm.url(1);
    wait_healthy(
        &proxy,
        "default",
        std::slice::from_ref(&down),
        0.0,
        Duration::from_secs(10),
    )
    .await;

    // The new generation checks once at its start, then hourly: one failed
    // check cannot make a server unhealthy (unhealthy = 2), and a server
    // starts healthy, so only the kept state keeps server 1 out.
    let after = config_text(
        &format!("{}\n{}", farm.servers(&[0, 1, 2]), checks("1h")),
        "",
    );
    reload(&proxy, &after).await;
    let down_errors = [
        ("upstream", "default"),
        ("server", down.as_str()),
        ("status_class", "error"),
    ];
    let m = metrics(&proxy).await;
    let healthy = |url: &str| {
        metric_sum(
            &m,
            "portcullis_upstream_healthy",
            &[("upstream", "default"), ("server", url)],
        )
    };
    assert_eq!(healthy(&down), Some(0.0), "{}", upstream_lines(&m));
    assert_eq!(healthy(&farm.url(2)), Some(1.0), "{}", upstream_lines(&m));
    let errors_before =
        metric_sum(&m, "portcullis_upstream_requests_total", &down_errors).unwrap_or(0.0);

    let mut conn = Conn::new(proxy.client());
    for i in 0..30 {
        get_200(&mut conn, &format!("/kept/{i}"), &proxy).await;
    }
    let m = metrics(&proxy).await;
    let errors_after =
        metric_sum(&m, "portcullis_upstream_requests_total", &down_errors).unwrap_or(0.0);
    assert_eq!(
        errors_after,
        errors_before,
        "the proxy tried the server it knew to be down: {}",
        upstream_lines(&m)
    );
    assert!(
        farm.count(2, "/kept/") > 0,
        "the added server took no request: {:?}",
        farm.counts("/kept/")
    );
}

//! Test harness: starts the real `portcullis` binary on loopback ports with a
//! generated certificate and configuration, the library's mock upstream
//! (recording what it receives) for it to forward to, and real TLS clients
//! (rustls) that speak HTTP/1.1 and HTTP/2 to it.
//! Nothing here sleeps to synchronise: waits poll with a deadline.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis::cmd::mock_upstream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

pub const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

/// Polls `check` until it is true or `within` has passed.
pub async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A self-signed certificate for the given names, written as `<stem>.pem` / `<stem>.key`.
pub struct TestCert {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub der: CertificateDer<'static>,
    pub pem: String,
}

impl TestCert {
    /// One that something else wrote (`gen-cert`, `demo`): the first
    /// certificate in `cert_path`, its key at `key_path`. `None` while the
    /// file is missing or holds no certificate.
    pub fn read(cert_path: PathBuf, key_path: PathBuf) -> Option<TestCert> {
        let pem = std::fs::read_to_string(&cert_path).ok()?;
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
        Some(TestCert {
            cert_path,
            key_path,
            der,
            pem,
        })
    }
}

pub fn make_cert(dir: &Path, stem: &str, names: &[&str]) -> TestCert {
    let certified =
        rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("generate certificate");
    let cert_path = dir.join(format!("{stem}.pem"));
    let key_path = dir.join(format!("{stem}.key"));
    std::fs::write(&cert_path, certified.cert.pem()).unwrap();
    std::fs::write(&key_path, certified.signing_key.serialize_pem()).unwrap();
    TestCert {
        cert_path,
        key_path,
        der: certified.cert.der().clone(),
        pem: certified.cert.pem(),
    }
}

/// Pieces of `proxy.toml` a test adds to the generated one.
#[derive(Default, Clone)]
pub struct ProxyConfig {
    /// Extra lines inside `[server]`.
    pub server: String,
    /// Extra lines inside `[tls]`.
    pub tls: String,
    /// Extra lines inside `[upstream]`.
    pub upstream: String,
    /// Other sections (`[hsts]`, `[[routes]]`, ...), written after the rest.
    pub rest: String,
    pub env: Vec<(String, String)>,
    /// Leave out `http_listen` / `admin_listen`.
    pub no_http: bool,
}

pub struct Proxy {
    pub child: Option<Child>,
    pub https: SocketAddr,
    pub http: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub dir: tempfile::TempDir,
    pub cert: TestCert,
    pub config_path: PathBuf,
    pub stdout: Arc<Mutex<Vec<String>>>,
    pub stderr: Arc<Mutex<Vec<String>>>,
}

impl Proxy {
    /// Starts the proxy in front of `upstream` and waits until it listens.
    pub async fn start(upstream: SocketAddr, config: ProxyConfig) -> Proxy {
        Self::start_with_log(upstream, config, "json").await
    }

    /// As [`Proxy::start`], with `[log] format` set to `log_format`.
    pub async fn start_with_log(
        upstream: SocketAddr,
        config: ProxyConfig,
        log_format: &str,
    ) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let cert = make_cert(dir.path(), "cert", &["localhost", "127.0.0.1", "::1"]);
        let listeners = if config.no_http {
            String::new()
        } else {
            "http_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n".to_string()
        };
        let toml = format!(
            "[server]\nhttps_listen = \"127.0.0.1:0\"\n{listeners}workers = 2\n{}\n\n[tls]\ncert = \"cert.pem\"\nkey = \"cert.key\"\n{}\n\n[upstream]\nurl = \"http://{upstream}\"\n{}\n\n[log]\nformat = \"{log_format}\"\nlevel = \"info\"\n\n{}\n",
            config.server, config.tls, config.upstream, config.rest
        );
        let config_path = dir.path().join("proxy.toml");
        std::fs::write(&config_path, toml).unwrap();
        Self::spawn(dir, cert, config_path, &config.env).await
    }

    /// Starts the binary on an existing config file in `dir`.
    pub async fn spawn(
        dir: tempfile::TempDir,
        cert: TestCert,
        config_path: PathBuf,
        env: &[(String, String)],
    ) -> Proxy {
        let mut command = Command::new(BIN);
        command
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .env_remove("PORTCULLIS_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("start portcullis");
        let stdout = pump(child.stdout.take().unwrap());
        let stderr = pump(child.stderr.take().unwrap());
        let mut proxy = Proxy {
            child: Some(child),
            https: "127.0.0.1:1".parse().unwrap(),
            http: None,
            admin: None,
            dir,
            cert,
            config_path,
            stdout,
            stderr,
        };
        let found = eventually(Duration::from_secs(20), || {
            proxy.find_addr("https listening on").is_some() || proxy.exited()
        })
        .await;
        let Some(https) = proxy.find_addr("https listening on") else {
            panic!(
                "proxy did not start (found={found}); stderr:\n{}",
                proxy.stderr_text()
            );
        };
        proxy.https = https;
        proxy.http = proxy.find_addr("http (redirect) listening on");
        proxy.admin = proxy.find_addr("admin listening on");
        proxy
    }

    fn find_addr(&self, marker: &str) -> Option<SocketAddr> {
        self.stderr.lock().unwrap().iter().find_map(|line| {
            line.split_once(marker)
                .and_then(|(_, rest)| rest.trim().parse().ok())
        })
    }

    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Every JSON line on stdout so far.
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lock()
            .unwrap()
            .iter()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|_| panic!("stdout line is not JSON: {line}"))
            })
            .collect()
    }

    /// Waits for an event matching `pred` on stdout.
    pub async fn wait_event(&self, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let mut found = None;
        eventually(Duration::from_secs(10), || {
            found = self.events().into_iter().find(|e| pred(e));
            found.is_some()
        })
        .await;
        found.unwrap_or_else(|| {
            panic!(
                "no matching event; stdout:\n{}",
                self.stdout.lock().unwrap().join("\n")
            )
        })
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit and returns its exit code.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let mut code = None;
        let child = self.child.as_mut()?;
        eventually(within, || {
            if let Ok(Some(status)) = child.try_wait() {
                code = status.code();
                true
            } else {
                false
            }
        })
        .await;
        code
    }

    /// Resident memory in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    pub fn client(&self) -> TlsClient {
        TlsClient::new(&self.cert, self.https)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

/// The lines of a child's output pipe, as they come: read to its end on a
/// thread of their own, so the child never blocks on a full pipe.
pub fn pump(stream: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let into = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            match line {
                Ok(line) => into.lock().unwrap().push(line),
                Err(_) => break,
            }
        }
    });
    lines
}

/// A rustls client that trusts the proxy's test certificate.
#[derive(Clone)]
pub struct TlsClient {
    pub addr: SocketAddr,
    pub roots: Arc<rustls::RootCertStore>,
    pub server_name: String,
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("body is not JSON: {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl TlsClient {
    pub fn new(cert: &TestCert, addr: SocketAddr) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der.clone()).unwrap();
        TlsClient {
            addr,
            roots: Arc::new(roots),
            server_name: "localhost".into(),
        }
    }

    pub fn config(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
        alpn: &[&[u8]],
    ) -> rustls::ClientConfig {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(self.roots.clone())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config
    }

    pub async fn connect_with(
        &self,
        config: rustls::ClientConfig,
        server_name: &str,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.addr).await?;
        let connector = TlsConnector::from(Arc::new(config));
        let name = ServerName::try_from(server_name.to_string()).unwrap();
        connector.connect(name, tcp).await
    }

    pub async fn connect(&self, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
        let config = self.config(rustls::DEFAULT_VERSIONS, alpn);
        self.connect_with(config, &self.server_name.clone())
            .await
            .expect("TLS connect")
    }

    /// TLS over a socket the test connected itself (bound to a chosen
    /// address, or with small buffers).
    pub async fn tls_over(&self, tcp: TcpStream, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
        let config = self.config(rustls::DEFAULT_VERSIONS, alpn);
        let name = ServerName::try_from(self.server_name.clone()).unwrap();
        TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .expect("TLS connect")
    }

    /// An HTTP/1.1 connection; send several requests on it.
    pub async fn h1(&self) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
        let tls = self.connect(&[b"http/1.1"]).await;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn.with_upgrades());
        sender
    }

    pub async fn h2(&self) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
        let tls = self.connect(&[b"h2"]).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender
    }

    /// One request on a fresh HTTP/1.1 connection.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Answer {
        let mut sender = self.h1().await;
        send(&mut sender, method, path, headers, body).await
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.request(Method::GET, path, &[], Bytes::new()).await
    }
}

/// Reads until `text` holds `count` complete responses (see
/// [`parse_responses`]), the server closes, or `within` has passed: an
/// event to wait on, where a quiet spell would be a guess.
pub async fn read_responses(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    count: usize,
    within: Duration,
) -> String {
    let deadline = tokio::time::Instant::now() + within;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let text = String::from_utf8_lossy(&out);
        let responses = parse_responses(&text);
        if responses.len() >= count && responses.iter().all(|r| r.complete) {
            break;
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub async fn read_until_quiet(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    quiet: Duration,
) -> String {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(quiet, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub async fn send(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Answer {
    let mut builder = Request::builder().method(method).uri(path);
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        builder = builder.header("host", "localhost");
    }
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let request = builder.body(Full::new(body.into())).unwrap();
    let response = sender.send_request(request).await.expect("send request");
    collect(response).await
}

pub async fn collect(response: Response<Incoming>) -> Answer {
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// One request the recording upstream received (the mock's record of it).
pub use portcullis::cmd::mock_upstream::RecordedRequest as Recorded;

/// The library's mock upstream (`portcullis mock-upstream`: a JSON echo of
/// each request, `/status/N`, `/delay/MS`, `/set-cookie?...`,
/// `/headers?Name=value&...`, `/download/N`, `/ws`, ...) on a loopback
/// port, recording every request it answers.
#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    connections: Arc<std::sync::atomic::AtomicU64>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts the recording upstream on a given address.
    pub async fn start_on(addr: SocketAddr) -> Upstream {
        Self::serve(tokio::net::TcpListener::bind(addr).await.unwrap())
    }

    /// Starts the recording upstream on a port that refused connections
    /// until now (one a proxy was already pointed at), without letting go of
    /// the port in between.
    pub async fn start_on_dead_port(port: DeadPort) -> Upstream {
        port.socket.listen(1024).unwrap();
        port.socket.set_nonblocking(true).unwrap();
        let listener = std::net::TcpListener::from(port.socket);
        Self::serve(tokio::net::TcpListener::from_std(listener).unwrap())
    }

    /// Serves until the test's runtime ends.
    fn serve(listener: tokio::net::TcpListener) -> Upstream {
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let sink = requests.clone();
        let options = mock_upstream::Options {
            recorder: Some(Arc::new(move |request| sink.lock().unwrap().push(request))),
            ..Default::default()
        };
        let connections = options.connections.clone();
        tokio::spawn(mock_upstream::serve_with(
            listener,
            std::future::pending(),
            options,
        ));
        Upstream {
            addr,
            requests,
            connections,
        }
    }

    pub fn recorded(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    pub fn last(&self) -> Recorded {
        self.requests
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("upstream received a request")
    }

    /// The TCP connections accepted so far, whether or not a request came.
    pub fn connections(&self) -> u64 {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Asserts that `answer` is the mock upstream's `200` echo of a request for
/// `target` (its path; a query is not compared), and not, say, a page of the
/// proxy's own; returns the echo.
pub fn assert_echo(answer: &Answer, target: &str, what: &str) -> serde_json::Value {
    let path = target.split('?').next().unwrap_or_default();
    assert_eq!(
        answer.status,
        200,
        "{what}: expected 200, got {} {}",
        answer.status,
        answer.text()
    );
    let echo = answer.json();
    assert_eq!(echo["path"], path, "{what}: the upstream's echo: {echo}");
    echo
}

/// A port nothing answers on: connecting is refused. The socket is bound
/// but does not listen, and holds the port: one merely closed again could be
/// handed to a listener of a test running in parallel (it once was, and the
/// "dead" upstream answered 308).
pub struct DeadPort {
    socket: socket2::Socket,
    pub addr: SocketAddr,
}

pub fn dead_port() -> DeadPort {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    DeadPort { socket, addr }
}

/// A [`dead_port`] held for the rest of the test run.
pub fn dead_addr() -> SocketAddr {
    let port = dead_port();
    let addr = port.addr;
    std::mem::forget(port.socket);
    addr
}

/// One HTTP/1.1 response parsed from raw bytes (see [`parse_responses`]).
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    /// Names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// The whole body as framed arrived (a response without framing is
    /// complete only when the connection closed, which this cannot see).
    pub complete: bool,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|_| panic!("body is not JSON: {:?}", self.body))
    }
}

/// Every complete response in `text` (what a raw connection read), in order.
/// Bodies framed by `Content-Length` or chunked are read; a response with
/// neither (and not 1xx/204/304) takes the rest of the text.
pub fn parse_responses(text: &str) -> Vec<RawResponse> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(head_end) = rest.find("\r\n\r\n") {
        let head = &rest[..head_end];
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let Some(status) = status_line
            .strip_prefix("HTTP/1.1 ")
            .or_else(|| status_line.strip_prefix("HTTP/1.0 "))
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse::<u16>().ok())
        else {
            break;
        };
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let find = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        let after = &rest[head_end + 4..];
        let mut complete = true;
        let (body, consumed) = if (100..200).contains(&status) || status == 204 || status == 304 {
            (String::new(), 0)
        } else if let Some(length) = find("content-length").and_then(|v| v.parse::<usize>().ok()) {
            complete = after.len() >= length;
            let length = length.min(after.len());
            (after[..length].to_string(), length)
        } else if find("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            let mut body = String::new();
            let mut at = 0;
            loop {
                let Some(line_end) = after[at..].find("\r\n") else {
                    at = after.len();
                    complete = false;
                    break;
                };
                let size_text = after[at..at + line_end].split(';').next().unwrap_or("");
                let size = usize::from_str_radix(size_text.trim(), 16).unwrap_or(0);
                at += line_end + 2;
                if size == 0 {
                    // Trailers (none expected) end with an empty line.
                    complete = at + 2 <= after.len();
                    at = (at + 2).min(after.len());
                    break;
                }
                let end = (at + size).min(after.len());
                body.push_str(&after[at..end]);
                at = (end + 2).min(after.len());
            }
            (body, at)
        } else {
            complete = false;
            (after.to_string(), after.len())
        };
        out.push(RawResponse {
            status,
            headers,
            body,
            complete,
        });
        rest = &after[consumed..];
    }
    out
}

/// Reads until the peer closes the connection (EOF, or an error such as a
/// reset or a TLS stream cut without close_notify), for at most `within`.
/// Returns what was read and whether the connection was seen closed.
pub async fn read_until_closed(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    within: Duration,
) -> (String, bool) {
    let deadline = tokio::time::Instant::now() + within;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let closed = loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

impl TlsClient {
    /// Writes raw bytes over TLS (HTTP/1.1), then reads until the server
    /// closes the connection or `within` has passed. Returns what came back
    /// and whether the server closed.
    pub async fn raw_until_closed(&self, bytes: &[u8], within: Duration) -> (String, bool) {
        let mut tls = self.connect(&[b"http/1.1"]).await;
        tls.write_all(bytes).await.unwrap();
        read_until_closed(&mut tls, within).await
    }
}

/// A request body type for streamed uploads (see [`TlsClient::h1_streaming`]).
pub type UploadBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// `total` bytes in 64 KiB chunks, generated as they are sent and never held
/// whole: chunk `i` is filled with the byte `i % 251`.
pub fn generated_body(total: u64) -> UploadBody {
    const CHUNK: u64 = 64 * 1024;
    let stream = futures_util::stream::unfold(0u64, move |sent| async move {
        if sent >= total {
            return None;
        }
        let n = (total - sent).min(CHUNK);
        let fill = ((sent / CHUNK) % 251) as u8;
        Some((
            Ok::<_, std::io::Error>(hyper::body::Frame::data(Bytes::from(vec![
                fill;
                n as usize
            ]))),
            sent + n,
        ))
    });
    http_body_util::StreamBody::new(stream).boxed()
}

impl TlsClient {
    /// An HTTP/1.1 connection whose request bodies are streamed ([`generated_body`]).
    pub async fn h1_streaming(&self) -> hyper::client::conn::http1::SendRequest<UploadBody> {
        let tls = self.connect(&[b"http/1.1"]).await;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender
    }
}

/// One plain-HTTP GET (admin listener, redirect listener) on a fresh
/// connection: the status and the body.
pub async fn plain_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut raw))
        .await
        .expect("admin answers")
        .unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The process's open sockets (listeners, client and upstream connections).
pub fn open_sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|entry| std::fs::read_link(entry.path()).ok())
                .filter(|target| target.to_string_lossy().starts_with("socket:"))
                .count()
        })
        .unwrap_or(0)
}

/// `portcullis_active_connections` from the admin listener.
pub async fn active_connections(admin: SocketAddr) -> Option<i64> {
    let mut tcp = TcpStream::connect(admin).await.ok()?;
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let (text, _) = read_until_closed(&mut tcp, Duration::from_secs(5)).await;
    text.lines()
        .find_map(|l| l.strip_prefix("portcullis_active_connections "))
        .and_then(|v| v.trim().parse().ok())
}

/// Waits until the admin gauge reads `want`; returns the last reading.
pub async fn wait_active(admin: SocketAddr, want: i64, within: Duration) -> Option<i64> {
    let deadline = Instant::now() + within;
    let mut last = None;
    // Bounded by the deadline; each reading is one request to the admin port.
    for _ in 0..10_000 {
        last = active_connections(admin).await;
        if last == Some(want) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    last
}

/// The shipped `proxy.toml` on free ports, in a fresh directory.
pub fn shipped_config_on_free_ports(dir: &Path) -> (PathBuf, u16) {
    let (https, http, admin, upstream) = (
        loopback_port(),
        loopback_port(),
        loopback_port(),
        loopback_port(),
    );
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml")).unwrap();
    let text = shipped
        .replace("127.0.0.1:8443", &format!("127.0.0.1:{https}"))
        .replace(
            "redirect_https_port = 8443",
            &format!("redirect_https_port = {https}"),
        )
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{http}"))
        .replace("127.0.0.1:9901", &format!("127.0.0.1:{admin}"))
        .replace("127.0.0.1:3000", &format!("127.0.0.1:{upstream}"));
    for old in ["8443", "8080", "9901", "3000"] {
        assert!(
            !text
                .lines()
                .any(|l| l.split('#').next().unwrap().contains(old)),
            "port {old} left in the config"
        );
    }
    let config = dir.join("proxy.toml");
    std::fs::write(&config, text).unwrap();
    copy_shipped_schemas(dir);
    (config, https)
}

/// Copies the files the shipped `proxy.toml` names besides certificates
/// (the schema routes' schemas) into `dir`.
pub fn copy_shipped_schemas(dir: &Path) {
    let schemas = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    std::fs::create_dir_all(dir.join("schemas")).unwrap();
    for entry in std::fs::read_dir(&schemas).expect("the shipped schemas/") {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join("schemas").join(entry.file_name())).unwrap();
    }
}

/// Polls until something accepts TCP connections on `addr`, for at most `within`.
pub async fn wait_listening(addr: SocketAddr, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if TcpStream::connect(addr).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A loopback port that binds now, below the kernel's ephemeral range
/// (32768 and up here): no outgoing connection and no `127.0.0.1:0` bind
/// (what the other tests' listeners use) can be handed it while its owner
/// is down (Redis killed, Pebble stopped, a proxy restarting), so it can be
/// written into a config file before anything listens on it. Within one
/// test binary the stride (prime to 12,000) from one starting point never
/// returns a port twice. (The starting point was once drawn again at every
/// call, from the clock: two calls a few microseconds apart could then land
/// on the same port, and Pebble's management port once came out equal to
/// its DNS server's.)
pub fn loopback_port() -> u16 {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};
    static SEED: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    // Different test binaries, and runs, start at different places.
    let seed = *SEED.get_or_init(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64
            ^ (u64::from(std::process::id()) << 20)
    });
    for _ in 0..1000 {
        let n = seed.wrapping_add(NEXT.fetch_add(7919, Ordering::Relaxed));
        let port = 20_000 + (n % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between 20000 and 32000");
}

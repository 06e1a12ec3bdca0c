//! `[acme]`: certificates from an ACME CA, obtained, cached, and renewed by
//! the proxy itself. Every test starts its own real CA (Debian's Pebble, see
//! tests/common/pebble.rs; every name resolves to 127.0.0.1) and the real
//! binary; nothing is mocked but the upstream.
//!
//! What this file proves, through TLS clients that trust *only* Pebble's
//! root, `/metrics`, the cache directory and the proxy's diagnostics (JSON
//! lines on its standard error):
//!
//! * over http-01, and over tls-alpn-01 without an HTTP listener, the proxy
//!   obtains one certificate for both domains and serves it (with its chain)
//!   over HTTP/1.1 and HTTP/2; the cache files are private (0600 in a 0700
//!   directory); an unknown challenge token is a plain 404 the upstream
//!   never sees;
//! * a restart with the cache serves the same certificate at once, with no
//!   new account or order at the CA;
//! * with the CA down at start, clients get a temporary certificate (and
//!   answers) until the CA is up, then the real one;
//! * a renewal swaps the certificate under a request in flight, which still
//!   completes, and new connections get the new certificate;
//! * two instances sharing one Redis place one order between them, the
//!   instance that did not order answers the CA's validation, and both
//!   serve the same certificate;
//! * a CA that requires external account binding refuses a proxy without
//!   it and issues to one with `eab_kid` and the key from the environment,
//!   which never reaches a log or `check`'s output.
//!
//! Each test is skipped (with a note) when Pebble is not installed.

mod common;
#[path = "common/pebble.rs"]
mod pebble;
#[path = "common/redis_server.rs"]
mod redis_server;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::{Proxy, TlsClient, Upstream, assert_echo, collect, make_cert, parse_responses};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use pebble::{Pebble, PebbleOptions, loopback_port};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DOMAIN_A: &str = "a.portcullis.test";
const DOMAIN_B: &str = "b.portcullis.test";

/// How long a first certificate may take with the CA up (an order, two
/// validations, finalization, in a debug build next to other tests).
const FIRST_CERT: Duration = Duration::from_secs(60);

const OBTAINED: &str = "acme: certificate obtained";
const USING_CACHED: &str = "acme: using the cached certificate";
const ORDER_FAILED: &str = "acme: order failed";

// ---------------------------------------------------------------------------
// A proxy with `[acme]` in front of the mock upstream, and its CA

#[derive(Clone, Copy, PartialEq, Debug)]
enum Challenge {
    Http01,
    TlsAlpn01,
}

/// Ports, upstream, Pebble (not yet started) and the proxy's config file.
/// The config lives in a directory of the setup's own, so that the cache
/// (`acme/`, next to it) outlives each proxy process.
struct Setup {
    work: tempfile::TempDir,
    config_path: PathBuf,
    https_port: u16,
    /// The proxy's `http_listen` (http-01 only).
    http_port: Option<u16>,
    upstream: Upstream,
    pebble: Pebble,
}

impl Setup {
    async fn new(challenge: Challenge, renew_before: &str, validity_secs: Option<u64>) -> Setup {
        let https_port = loopback_port();
        let http_port = (challenge == Challenge::Http01).then(loopback_port);
        let pebble = Pebble::new(PebbleOptions {
            // With tls-alpn-01 nothing listens on it: Pebble never uses it.
            http_port: http_port.unwrap_or_else(loopback_port),
            tls_port: https_port,
            validity_secs,
            eab: None,
        });
        let upstream = Upstream::start().await;
        let work = tempfile::tempdir().unwrap();
        let toml = InstanceConfig {
            https_port,
            http_port,
            upstream: upstream.addr,
            challenge,
            renew_before,
            cache_dir: "acme",
            extra: "",
        }
        .toml(&pebble);
        let config_path = work.path().join("proxy.toml");
        std::fs::write(&config_path, toml).unwrap();
        Setup {
            work,
            config_path,
            https_port,
            http_port,
            upstream,
            pebble,
        }
    }

    /// The proxy on the setup's config (again after a stop: same cache).
    async fn proxy(&self) -> Proxy {
        // Proxy::spawn wants a directory and a certificate of its own; the
        // certificate is never served (the config names none).
        let scratch = tempfile::tempdir().unwrap();
        let unused = make_cert(scratch.path(), "unused", &["localhost"]);
        Proxy::spawn(scratch, unused, self.config_path.clone(), &[]).await
    }

    fn https(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.https_port))
    }

    fn cache_dir(&self) -> PathBuf {
        self.work.path().join("acme")
    }

    /// A client of the proxy that trusts only the root of this run of
    /// Pebble, and sends SNI `a.portcullis.test`.
    async fn pebble_client(&self) -> TlsClient {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.pebble.root_der().await).unwrap();
        TlsClient {
            addr: self.https(),
            roots: Arc::new(roots),
            server_name: DOMAIN_A.into(),
        }
    }

    /// Waits until the proxy serves, for `name`, a chain that verifies
    /// against Pebble's root (the event may be logged a moment before the
    /// swap); returns that chain.
    async fn wait_pebble_signed(&self, proxy: &Proxy, name: &str) -> Vec<CertificateDer<'static>> {
        let root = self.pebble.root_der().await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let last = match served_chain(self.https(), name, &[b"http/1.1"]).await {
                Ok((chain, _)) => match verify_chain(&chain, &root, name) {
                    Ok(()) => return chain,
                    Err(e) => format!("{e} (serial {})", serial_hex(&chain[0])),
                },
                Err(e) => e,
            };
            assert!(
                Instant::now() < deadline,
                "the proxy does not serve a Pebble-signed certificate for {name} within 10 s \
                 ({last}); stderr:\n{}",
                tail(&proxy.stderr_text(), 40)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The whole story for a failure message: proxy and Pebble logs.
    fn logs(&self, proxy: &Proxy) -> String {
        format!(
            "proxy stderr (last lines):\n{}\n\nPebble (last lines):\n{}",
            tail(&proxy.stderr_text(), 60),
            tail(&self.pebble.log_text(), 60)
        )
    }
}

/// One proxy's `proxy.toml` for the ACME tests.
struct InstanceConfig<'a> {
    https_port: u16,
    http_port: Option<u16>,
    upstream: SocketAddr,
    challenge: Challenge,
    renew_before: &'a str,
    cache_dir: &'a str,
    /// More sections (`[redis]`).
    extra: &'a str,
}

impl InstanceConfig<'_> {
    fn toml(&self, pebble: &Pebble) -> String {
        let http_listen = self
            .http_port
            .map(|port| format!("http_listen = \"127.0.0.1:{port}\"\n"))
            .unwrap_or_default();
        let challenge = match self.challenge {
            Challenge::Http01 => "http-01",
            Challenge::TlsAlpn01 => "tls-alpn-01",
        };
        format!(
            "[server]\n\
             https_listen = \"127.0.0.1:{https_port}\"\n\
             {http_listen}\
             admin_listen = \"127.0.0.1:0\"\n\
             workers = 2\n\
             \n\
             [upstream]\n\
             url = \"http://{upstream}\"\n\
             \n\
             [log]\n\
             format = \"json\"\n\
             level = \"info\"\n\
             \n\
             {extra}\n\
             [acme]\n\
             domains = [\"{DOMAIN_A}\", \"{DOMAIN_B}\"]\n\
             email = \"ops@portcullis.test\"\n\
             directory = \"{directory}\"\n\
             challenge = \"{challenge}\"\n\
             cache_dir = \"{cache_dir}\"\n\
             renew_before = \"{renew_before}\"\n\
             directory_ca = \"{ca}\"\n",
            https_port = self.https_port,
            upstream = self.upstream,
            extra = self.extra,
            cache_dir = self.cache_dir,
            renew_before = self.renew_before,
            directory = pebble.directory_url(),
            ca = pebble.ca_pem_path().display(),
        )
    }
}

// ---------------------------------------------------------------------------
// The proxy's diagnostics

/// The JSON lines on the proxy's standard error.
fn diagnostics(proxy: &Proxy) -> Vec<serde_json::Value> {
    diagnostics_of(&proxy.stderr)
}

fn diagnostics_of(stderr: &Mutex<Vec<String>>) -> Vec<serde_json::Value> {
    stderr
        .lock()
        .unwrap()
        .iter()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

fn message_has(event: &serde_json::Value, text: &str) -> bool {
    event["message"].as_str().is_some_and(|m| m.contains(text))
}

/// A field of an event: flattened JSON puts it at the top level; under
/// `fields` too, should that change.
fn field(event: &serde_json::Value, name: &str) -> Option<String> {
    event
        .get(name)
        .or_else(|| event.get("fields").and_then(|f| f.get(name)))
        .and_then(|v| v.as_str())
        .map(str::to_string)
}

/// Every "certificate obtained" event so far.
fn obtained(stderr: &Mutex<Vec<String>>) -> Vec<serde_json::Value> {
    diagnostics_of(stderr)
        .into_iter()
        .filter(|e| message_has(e, OBTAINED))
        .collect()
}

/// The serials (normalized) of every certificate obtained so far.
fn obtained_serials(stderr: &Mutex<Vec<String>>) -> Vec<String> {
    obtained(stderr)
        .iter()
        .map(|e| {
            let serial = field(e, "serial")
                .unwrap_or_else(|| panic!("`{OBTAINED}` without a `serial` field: {e}"));
            normalize_serial(&serial)
        })
        .collect()
}

/// Waits (at most `within`) for a diagnostic matching `pred`.
async fn wait_diagnostic(
    setup: &Setup,
    proxy: &Proxy,
    within: Duration,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut found = None;
    common::eventually(within, || {
        found = diagnostics(proxy).into_iter().find(|e| pred(e));
        found.is_some()
    })
    .await;
    found.unwrap_or_else(|| panic!("no {what} within {within:?}; {}", setup.logs(proxy)))
}

async fn wait_obtained(setup: &Setup, proxy: &Proxy, within: Duration) -> serde_json::Value {
    let event = wait_diagnostic(setup, proxy, within, "certificate obtained", |e| {
        message_has(e, OBTAINED)
    })
    .await;
    assert!(
        field(&event, "serial").is_some() && field(&event, "not_after").is_some(),
        "`{OBTAINED}` should carry `serial` and `not_after`: {event}"
    );
    event
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------
// Certificates as a client sees them

/// Accepts any certificate (the temporary one a proxy serves before its
/// first ACME certificate), still checking the handshake's signatures.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn accept_any_config(alpn: &[&[u8]]) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

type AnyCertStream = tokio_rustls::client::TlsStream<TcpStream>;

/// A TLS connection (SNI `name`) that accepts whatever certificate comes,
/// and the chain that came.
async fn connect_any(
    addr: SocketAddr,
    name: &str,
    alpn: &[&[u8]],
) -> Result<(AnyCertStream, Vec<CertificateDer<'static>>), String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(accept_any_config(alpn)));
    let server_name = ServerName::try_from(name.to_string()).unwrap();
    let tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(server_name, tcp))
        .await
        .map_err(|_| format!("no TLS handshake with {addr} within 10 s"))?
        .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
    let chain = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|certs| certs.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    Ok((tls, chain))
}

/// The chain served for SNI `name`, and the ALPN protocol negotiated.
async fn served_chain(
    addr: SocketAddr,
    name: &str,
    alpn: &[&[u8]],
) -> Result<(Vec<CertificateDer<'static>>, Option<Vec<u8>>), String> {
    let (tls, chain) = connect_any(addr, name, alpn).await?;
    let protocol = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    if chain.is_empty() {
        return Err("no certificate served".into());
    }
    Ok((chain, protocol))
}

/// An HTTP/1.1 connection accepting any certificate, and the chain served.
async fn h1_any(
    addr: SocketAddr,
    name: &str,
) -> (
    hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    Vec<CertificateDer<'static>>,
) {
    let (tls, chain) = connect_any(addr, name, &[b"http/1.1"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    (sender, chain)
}

/// Whether `chain` (leaf first) verifies for `name` against `root` alone,
/// as a browser trusting only that root would check it.
fn verify_chain(
    chain: &[CertificateDer<'static>],
    root: &CertificateDer<'static>,
    name: &str,
) -> Result<(), rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
    let server_name = ServerName::try_from(name.to_string()).unwrap();
    verifier
        .verify_server_cert(&chain[0], &chain[1..], &server_name, &[], UnixTime::now())
        .map(|_| ())
}

/// A certificate's serial number as lower-case hex without leading zeros:
/// Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version
/// OPTIONAL, serialNumber INTEGER, ... }, ... }.
fn serial_hex(cert: &CertificateDer<'_>) -> String {
    let (_, certificate, _) = der_item(cert, 0x30).expect("a certificate is a SEQUENCE");
    let (_, tbs, _) = der_item(certificate, 0x30).expect("tbsCertificate is a SEQUENCE");
    let after_version = match der_item(tbs, 0xa0) {
        Some((_, _, rest)) => rest,
        None => tbs,
    };
    let (_, serial, _) = der_item(after_version, 0x02).expect("serialNumber is an INTEGER");
    let hex: String = serial.iter().map(|b| format!("{b:02x}")).collect();
    normalize_serial(&hex)
}

/// One DER item with tag `tag` at the start of `input`: (tag, contents,
/// what follows); `None` when another tag is there.
fn der_item(input: &[u8], tag: u8) -> Option<(u8, &[u8], &[u8])> {
    let (&found, rest) = input.split_first()?;
    if found != tag {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        let bytes = rest.get(..n)?;
        let len = bytes.iter().fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[n..])
    };
    Some((found, rest.get(..len)?, &rest[len..]))
}

/// Serials as hex compare equal however written: case, colons, leading zeros.
fn normalize_serial(serial: &str) -> String {
    let hex: String = serial
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".into()
    } else {
        trimmed.into()
    }
}

// ---------------------------------------------------------------------------
// Plain HTTP, metrics, files

/// One GET on a fresh plain-HTTP connection, read until the server closes:
/// the parsed response (headers included, unlike `common::plain_get`).
async fn raw_get(addr: SocketAddr, path: &str, host: &str) -> common::RawResponse {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut raw))
        .await
        .expect("the HTTP listener answers within 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    parse_responses(&text)
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no HTTP response to GET {path}: {text:?}"))
}

/// The value of one series (`name{labels}` exactly as exposed) in `/metrics`.
async fn metric(proxy: &Proxy, series: &str) -> Option<f64> {
    let admin = proxy.admin.expect("the admin listener");
    let (status, body) = common::plain_get(admin, "/metrics").await;
    assert_eq!(status, 200, "/metrics: {body}");
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Waits (10 s) until `series` reads at least `min`; returns the last reading.
async fn wait_metric_at_least(proxy: &Proxy, series: &str, min: f64) -> Option<f64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let value = metric(proxy, series).await;
        if value.is_some_and(|v| v >= min) || Instant::now() > deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const RENEWALS_OK: &str = "portcullis_acme_renewals_total{result=\"success\"}";
const RENEWALS_FAILED: &str = "portcullis_acme_renewals_total{result=\"failure\"}";
const EXPIRY: &str = "portcullis_cert_expiry_seconds{name=\"a.portcullis.test\"}";

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// The cache is private: the directory 0700, its files 0600.
fn assert_private_cache(cache: &Path) {
    assert_eq!(mode(cache), 0o700, "mode of {}", cache.display());
    for file in ["account.json", "cert.pem", "key.pem"] {
        let path = cache.join(file);
        assert_eq!(mode(&path), 0o600, "mode of {}", path.display());
    }
}

/// Seconds from now until an RFC 3339 time (UTC: `Z` or `+00:00`).
fn seconds_until(rfc3339: &str) -> f64 {
    let at = humantime::parse_rfc3339_weak(rfc3339)
        .unwrap_or_else(|e| panic!("not_after {rfc3339:?} is not RFC 3339 UTC: {e}"));
    match at.duration_since(SystemTime::now()) {
        Ok(left) => left.as_secs_f64(),
        Err(past) => -past.duration().as_secs_f64(),
    }
}

/// A request through `client` (HTTP/1.1 and HTTP/2) reaches the upstream.
async fn assert_served_over_h1_and_h2(client: &TlsClient, https_port: u16, what: &str) {
    let answer = client.get("/hello").await;
    assert_echo(&answer, "/hello", &format!("{what}, HTTP/1.1"));
    let mut h2 = client.h2().await;
    let request = http::Request::get(format!("https://{DOMAIN_A}:{https_port}/hello"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let answer = collect(h2.send_request(request).await.expect("h2 request")).await;
    assert_echo(&answer, "/hello", &format!("{what}, HTTP/2"));
}

// ---------------------------------------------------------------------------
// The harness itself

#[tokio::test]
async fn pebble_starts_and_serves_its_directory() {
    if !pebble::installed() {
        return;
    }
    let mut pebble = Pebble::new(PebbleOptions {
        http_port: loopback_port(),
        tls_port: loopback_port(),
        validity_secs: Some(3600),
        eab: None,
    });
    // Prepared, not started: nothing answers on the directory's port.
    assert!(
        pebble.get(pebble.dir_port, "/dir").await.is_err(),
        "Pebble answers before it was started"
    );
    pebble.start().await;
    let (status, body) = pebble.get(pebble.dir_port, "/dir").await.unwrap();
    assert_eq!(status, 200);
    let directory: serde_json::Value = serde_json::from_slice(&body).unwrap();
    for key in ["newAccount", "newNonce", "newOrder"] {
        let url = directory[key].as_str().unwrap_or_default();
        assert!(
            url.starts_with(&format!("https://127.0.0.1:{}/", pebble.dir_port)),
            "directory[{key}] = {url:?}: {directory}"
        );
    }
    assert!(
        pebble
            .log_text()
            .contains("Using certificate validity period of 3600 seconds"),
        "certificateValidityPeriod not taken:\n{}",
        pebble.log_text()
    );
    assert!(
        pebble.log_text().contains("Disabling random VA sleeps"),
        "PEBBLE_VA_NOSLEEP not taken:\n{}",
        pebble.log_text()
    );
    let first_root = pebble.root_der().await;
    assert_eq!((pebble.accounts(), pebble.orders()), (0, 0));
    assert!(pebble.issued().is_empty());

    // Stopped: refused. Started again on the same ports: a new issuing root.
    pebble.stop();
    assert!(
        pebble.get(pebble.dir_port, "/dir").await.is_err(),
        "Pebble answers after stop()"
    );
    pebble.start().await;
    let (status, _) = pebble.get(pebble.dir_port, "/dir").await.unwrap();
    assert_eq!(status, 200, "Pebble restarted on its port");
    assert_ne!(
        pebble.root_der().await,
        first_root,
        "a restarted Pebble has a new root"
    );
}

// ---------------------------------------------------------------------------
// a. http-01

#[tokio::test]
async fn a_certificate_over_http_01_is_served_and_trusted() {
    if !pebble::installed() {
        return;
    }
    let mut setup = Setup::new(Challenge::Http01, "30d", None).await;
    setup.pebble.start().await;
    let proxy = setup.proxy().await;
    let http = SocketAddr::from(([127, 0, 0, 1], setup.http_port.unwrap()));

    // A token the proxy never published: a plain 404, not the usual
    // redirect to HTTPS, and nothing for the upstream.
    let unknown = raw_get(http, "/.well-known/acme-challenge/no-such-token", DOMAIN_A).await;
    assert_eq!(unknown.status, 404, "unknown challenge token: {unknown:?}");
    assert_eq!(
        unknown.header("location"),
        None,
        "unknown token: {unknown:?}"
    );
    assert_eq!(
        unknown.header("strict-transport-security"),
        None,
        "unknown token: {unknown:?}"
    );

    let event = wait_obtained(&setup, &proxy, FIRST_CERT).await;
    let serial = normalize_serial(&field(&event, "serial").unwrap());
    let not_after = field(&event, "not_after").unwrap();

    // The served chain is Pebble's, for both names, and the one logged.
    let chain = setup.wait_pebble_signed(&proxy, DOMAIN_A).await;
    let root = setup.pebble.root_der().await;
    verify_chain(&chain, &root, DOMAIN_B)
        .unwrap_or_else(|e| panic!("the certificate does not cover {DOMAIN_B}: {e}"));
    assert_eq!(
        serial_hex(&chain[0]),
        serial,
        "served serial vs the `{OBTAINED}` event"
    );
    let issued: Vec<String> = setup
        .pebble
        .issued()
        .iter()
        .map(|s| normalize_serial(s))
        .collect();
    assert!(
        issued.contains(&serial),
        "serial {serial} not among Pebble's issued {issued:?}"
    );

    let client = setup.pebble_client().await;
    assert_served_over_h1_and_h2(&client, setup.https_port, "Pebble-trusting client").await;

    assert!(
        !setup
            .upstream
            .recorded()
            .iter()
            .any(|r| r.target.contains("acme-challenge")),
        "a challenge request reached the upstream: {:?}",
        setup
            .upstream
            .recorded()
            .iter()
            .map(|r| r.target.clone())
            .collect::<Vec<_>>()
    );
    assert_private_cache(&setup.cache_dir());

    let ok = wait_metric_at_least(&proxy, RENEWALS_OK, 1.0).await;
    assert!(ok.is_some_and(|v| v >= 1.0), "{RENEWALS_OK} = {ok:?}");
    let expiry = metric(&proxy, EXPIRY)
        .await
        .unwrap_or_else(|| panic!("no {EXPIRY}"));
    let expected = seconds_until(&not_after);
    assert!(
        expiry > 0.0 && (expiry - expected).abs() < 300.0,
        "{EXPIRY} = {expiry}, but not_after {not_after} is {expected:.0} s away"
    );
}

// ---------------------------------------------------------------------------
// b. tls-alpn-01, no HTTP listener

#[tokio::test]
async fn a_certificate_over_tls_alpn_01_is_served_and_h2_still_negotiated() {
    if !pebble::installed() {
        return;
    }
    let mut setup = Setup::new(Challenge::TlsAlpn01, "30d", None).await;
    setup.pebble.start().await;
    let proxy = setup.proxy().await;
    assert_eq!(
        proxy.http, None,
        "no http_listen configured, yet an HTTP listener"
    );

    let event = wait_obtained(&setup, &proxy, FIRST_CERT).await;
    let serial = normalize_serial(&field(&event, "serial").unwrap());
    let chain = setup.wait_pebble_signed(&proxy, DOMAIN_A).await;
    let root = setup.pebble.root_der().await;
    verify_chain(&chain, &root, DOMAIN_B)
        .unwrap_or_else(|e| panic!("the certificate does not cover {DOMAIN_B}: {e}"));
    assert_eq!(
        serial_hex(&chain[0]),
        serial,
        "served serial vs the `{OBTAINED}` event"
    );

    let client = setup.pebble_client().await;
    assert_served_over_h1_and_h2(&client, setup.https_port, "Pebble-trusting client").await;

    // An ordinary client offering both gets h2 (acme-tls/1 is for the CA
    // only), and one offering only HTTP/1.1 gets that.
    let tls = client.connect(&[b"h2", b"http/1.1"]).await;
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "h2 + http/1.1 offered"
    );
    let tls = client.connect(&[b"http/1.1"]).await;
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"http/1.1"[..]),
        "http/1.1 offered"
    );

    assert_private_cache(&setup.cache_dir());
}

// ---------------------------------------------------------------------------
// c. a restart with the cache

#[tokio::test]
async fn a_restart_with_the_cache_makes_no_new_order_or_account() {
    if !pebble::installed() {
        return;
    }
    let mut setup = Setup::new(Challenge::Http01, "30d", None).await;
    setup.pebble.start().await;
    let mut proxy = setup.proxy().await;
    let event = wait_obtained(&setup, &proxy, FIRST_CERT).await;
    let serial = normalize_serial(&field(&event, "serial").unwrap());
    setup.wait_pebble_signed(&proxy, DOMAIN_A).await;
    let (accounts, orders) = (setup.pebble.accounts(), setup.pebble.orders());
    let issued = setup.pebble.issued().len();
    assert!(
        accounts >= 1 && orders >= 1,
        "Pebble saw {accounts} accounts, {orders} orders"
    );

    proxy.signal("TERM");
    let code = proxy.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(code, Some(0), "exit after SIGTERM; {}", setup.logs(&proxy));
    drop(proxy);

    let proxy = setup.proxy().await;
    // At once: the first connection after "listening" gets the cached one.
    let (chain, _) = served_chain(setup.https(), DOMAIN_A, &[b"http/1.1"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        serial_hex(&chain[0]),
        serial,
        "the first certificate served after a restart is not the cached one; {}",
        setup.logs(&proxy)
    );
    wait_diagnostic(
        &setup,
        &proxy,
        Duration::from_secs(10),
        "cached-certificate event",
        |e| message_has(e, USING_CACHED),
    )
    .await;
    let client = setup.pebble_client().await;
    assert_echo(
        &client.get("/hello").await,
        "/hello",
        "after a restart with the cache",
    );

    // A reload that leaves [acme] alone keeps its certificate and task: no
    // temporary certificate in between, no order.
    proxy.signal("HUP");
    wait_diagnostic(
        &setup,
        &proxy,
        Duration::from_secs(10),
        "reload event",
        |e| message_has(e, "configuration reloaded"),
    )
    .await;
    let (chain, _) = served_chain(setup.https(), DOMAIN_A, &[b"http/1.1"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(serial_hex(&chain[0]), serial, "after a reload");

    assert_eq!(
        setup.pebble.accounts(),
        accounts,
        "a new account after the restart"
    );
    assert_eq!(
        setup.pebble.orders(),
        orders,
        "a new order after the restart"
    );
    assert_eq!(
        setup.pebble.issued().len(),
        issued,
        "a new certificate after the restart"
    );
    assert!(
        !diagnostics(&proxy).iter().any(|e| message_has(e, OBTAINED)),
        "the restarted proxy obtained a certificate despite its cache; {}",
        setup.logs(&proxy)
    );
}

// ---------------------------------------------------------------------------
// d. the CA down at start

#[tokio::test]
async fn a_ca_down_at_start_gets_a_temporary_certificate_then_the_real_one() {
    if !pebble::installed() {
        return;
    }
    let mut setup = Setup::new(Challenge::Http01, "30d", None).await;
    let proxy = setup.proxy().await;

    // Served meanwhile, on a certificate of the proxy's own.
    let (mut sender, temporary) = h1_any(setup.https(), DOMAIN_A).await;
    let answer = common::send(&mut sender, http::Method::GET, "/hello", &[], Bytes::new()).await;
    assert_echo(
        &answer,
        "/hello",
        "with the CA down, through the temporary certificate",
    );

    let failed = wait_diagnostic(
        &setup,
        &proxy,
        Duration::from_secs(20),
        "order failure",
        |e| message_has(e, ORDER_FAILED),
    )
    .await;
    assert_eq!(
        failed["level"], "WARN",
        "an order failure is a warning: {failed}"
    );
    let failures = wait_metric_at_least(&proxy, RENEWALS_FAILED, 1.0).await;
    assert!(
        failures.is_some_and(|v| v >= 1.0),
        "{RENEWALS_FAILED} = {failures:?}"
    );

    // The CA comes up on the configured ports; the retries (back-off at
    // most 60 s) reach it.
    setup.pebble.start().await;
    wait_obtained(&setup, &proxy, Duration::from_secs(90)).await;
    setup.wait_pebble_signed(&proxy, DOMAIN_A).await;
    let client = setup.pebble_client().await;
    assert_echo(&client.get("/hello").await, "/hello", "once the CA is up");

    let root = setup.pebble.root_der().await;
    assert!(
        verify_chain(&temporary, &root, DOMAIN_A).is_err(),
        "the temporary certificate verifies against Pebble's root"
    );
    assert_ne!(
        temporary[0],
        client_leaf(&setup).await,
        "still the temporary certificate"
    );
}

async fn client_leaf(setup: &Setup) -> CertificateDer<'static> {
    let (chain, _) = served_chain(setup.https(), DOMAIN_A, &[b"http/1.1"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    chain[0].clone()
}

// ---------------------------------------------------------------------------
// e. renewal under load

/// Pebble's certificate life in the renewal test.
const VALIDITY_SECS: u64 = 100;

/// A `/delay/3000` request on a connection opened with one certificate:
/// what the client saw, and which certificates the proxy had obtained when
/// it began and when its answer was complete.
struct HeldRequest {
    serial: String,
    before: Vec<String>,
    after: Vec<String>,
    status: Result<u16, String>,
}

impl HeldRequest {
    /// Opened on an ACME certificate, and a newer one was obtained while
    /// the request waited for its answer.
    fn spans_a_swap(&self) -> bool {
        self.before.contains(&self.serial) && self.after.iter().any(|s| !self.before.contains(s))
    }
}

async fn held_request(addr: SocketAddr, stderr: Arc<Mutex<Vec<String>>>) -> HeldRequest {
    let (mut sender, chain) = h1_any(addr, DOMAIN_A).await;
    let serial = serial_hex(&chain[0]);
    let before = obtained_serials(&stderr);
    let request = http::Request::get("/delay/3000")
        .header("host", DOMAIN_A)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let status =
        match tokio::time::timeout(Duration::from_secs(20), sender.send_request(request)).await {
            Ok(Ok(response)) => {
                let answer = collect(response).await;
                Ok(answer.status.as_u16())
            }
            Ok(Err(e)) => Err(format!("request failed: {e}")),
            Err(_) => Err("no answer within 20 s".into()),
        };
    let after = obtained_serials(&stderr);
    HeldRequest {
        serial,
        before,
        after,
        status,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_swaps_the_certificate_without_dropping_a_request() {
    if !pebble::installed() {
        return;
    }
    // renew_before is longer than a certificate's whole life: each one is
    // due at once, and renewals follow each other as fast as the proxy's
    // pacing allows (a minimum interval between orders: a tenth of the
    // life, 10 s at least, so about 10 s here).
    let mut setup = Setup::new(Challenge::Http01, "2h", Some(VALIDITY_SECS)).await;
    setup.pebble.start().await;
    let started = Instant::now();
    let proxy = setup.proxy().await;
    let first = wait_obtained(&setup, &proxy, FIRST_CERT).await;
    let first_serial = normalize_serial(&field(&first, "serial").unwrap());

    // A held request every 500 ms until one has spanned a swap (bounded:
    // 300 launches, 150 s).
    let mut held = tokio::task::JoinSet::new();
    let mut done: Vec<HeldRequest> = Vec::new();
    for _ in 0..300 {
        if done.iter().any(HeldRequest::spans_a_swap) {
            break;
        }
        held.spawn(held_request(setup.https(), proxy.stderr.clone()));
        tokio::time::sleep(Duration::from_millis(500)).await;
        while let Some(result) = held.try_join_next() {
            done.push(result.expect("held request task"));
        }
    }
    while let Some(result) = held.join_next().await {
        done.push(result.expect("held request task"));
    }
    let serials = obtained_serials(&proxy.stderr);
    assert!(
        done.iter().any(HeldRequest::spans_a_swap),
        "no renewal under a held request in {} requests (obtained: {serials:?}); {}",
        done.len(),
        setup.logs(&proxy)
    );
    for request in &done {
        assert_eq!(
            request.status,
            Ok(200),
            "a request held across renewals (opened on serial {}) did not complete",
            request.serial
        );
    }
    assert!(
        serials.iter().any(|s| *s != first_serial),
        "no second certificate with a new serial: {serials:?}"
    );

    // New connections: a renewed certificate, Pebble-signed.
    let chain = setup.wait_pebble_signed(&proxy, DOMAIN_A).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut leaf = serial_hex(&chain[0]);
    while leaf == first_serial && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        leaf = serial_hex(&client_leaf(&setup).await);
    }
    assert_ne!(
        leaf, first_serial,
        "new connections still get the first certificate"
    );
    let serials = obtained_serials(&proxy.stderr);
    assert!(
        serials.contains(&leaf),
        "served serial {leaf} was never logged: {serials:?}"
    );
    let ok = wait_metric_at_least(&proxy, RENEWALS_OK, 2.0).await;
    assert!(ok.is_some_and(|v| v >= 2.0), "{RENEWALS_OK} = {ok:?}");

    // Paced: at most about one order a second (the back-off starts at 1 s),
    // never a tight loop.
    let elapsed = started.elapsed().as_secs();
    let orders = setup.pebble.orders();
    assert!(
        orders <= elapsed + 2,
        "{orders} orders in {elapsed} s: the proxy renews in a tight loop"
    );
}

// ---------------------------------------------------------------------------
// f. Two instances, one Redis, one order

/// Stands for the load balancer in front of two instances, as the CA's
/// validator reaches it: each connection goes to the instance that is *not*
/// ordering (the one that logged `acme: account created` is; the other
/// can answer only through Redis). Counts the connections each instance got.
async fn validation_balancer(
    listener: tokio::net::TcpListener,
    instances: [(Arc<Mutex<Vec<String>>>, SocketAddr); 2],
    sent: Arc<Mutex<[u32; 2]>>,
) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            return;
        };
        let ordering = instances.iter().position(|(stderr, _)| {
            stderr
                .lock()
                .unwrap()
                .iter()
                .any(|line| line.contains("acme: account created"))
        });
        let target = match ordering {
            Some(index) => 1 - index,
            None => 0,
        };
        sent.lock().unwrap()[target] += 1;
        let addr = instances[target].1;
        tokio::spawn(async move {
            if let Ok(mut outbound) = TcpStream::connect(addr).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

#[tokio::test]
async fn two_instances_sharing_redis_place_one_order_and_serve_the_same_certificate() {
    if !pebble::installed() || !redis_server::redis_server_installed() {
        return;
    }
    let redis = redis_server::RedisServer::start().await;
    let balancer = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let https_ports = [loopback_port(), loopback_port()];
    let http_ports = [loopback_port(), loopback_port()];
    let mut pebble = Pebble::new(PebbleOptions {
        http_port: balancer.local_addr().unwrap().port(),
        tls_port: loopback_port(),
        validity_secs: None,
        eab: None,
    });
    pebble.start().await;
    let upstream = Upstream::start().await;
    let work = tempfile::tempdir().unwrap();
    let extra = format!(
        "[redis]\nurl = \"{}\"\nkey_prefix = \"acme-test\"\n",
        redis.url()
    );
    let mut proxies = Vec::new();
    for (i, name) in ["a", "b"].iter().enumerate() {
        let toml = InstanceConfig {
            https_port: https_ports[i],
            http_port: Some(http_ports[i]),
            upstream: upstream.addr,
            challenge: Challenge::Http01,
            renew_before: "30d",
            cache_dir: &format!("acme-{name}"),
            extra: &extra,
        }
        .toml(&pebble);
        let config_path = work.path().join(format!("{name}.toml"));
        std::fs::write(&config_path, toml).unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let unused = make_cert(scratch.path(), "unused", &["localhost"]);
        proxies.push(Proxy::spawn(scratch, unused, config_path, &[]).await);
    }
    let sent = Arc::new(Mutex::new([0u32; 2]));
    tokio::spawn(validation_balancer(
        balancer,
        [
            (
                proxies[0].stderr.clone(),
                SocketAddr::from(([127, 0, 0, 1], http_ports[0])),
            ),
            (
                proxies[1].stderr.clone(),
                SocketAddr::from(([127, 0, 0, 1], http_ports[1])),
            ),
        ],
        sent.clone(),
    ));

    // Both end up serving one Pebble-signed certificate.
    let root = pebble.root_der().await;
    let mut serials = [String::new(), String::new()];
    let deadline = Instant::now() + FIRST_CERT;
    for (i, port) in https_ports.iter().enumerate() {
        let addr = SocketAddr::from(([127, 0, 0, 1], *port));
        loop {
            if let Ok((chain, _)) = served_chain(addr, DOMAIN_A, &[b"http/1.1"]).await
                && verify_chain(&chain, &root, DOMAIN_B).is_ok()
            {
                serials[i] = serial_hex(&chain[0]);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "instance {i} serves no Pebble-signed certificate within {FIRST_CERT:?}; \
                 a:\n{}\nb:\n{}\nPebble:\n{}",
                tail(&proxies[0].stderr_text(), 30),
                tail(&proxies[1].stderr_text(), 30),
                tail(&pebble.log_text(), 30)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(
        serials[0], serials[1],
        "the two instances serve different certificates"
    );
    assert_eq!(
        pebble.orders(),
        1,
        "orders at the CA:\n{}",
        tail(&pebble.log_text(), 40)
    );
    assert_eq!(pebble.accounts(), 1, "accounts at the CA");

    // The one that ordered obtained it; the other took it from Redis, and
    // answered every validation the CA sent (through the balancer).
    let orderers: Vec<usize> = (0..2)
        .filter(|&i| !obtained(&proxies[i].stderr).is_empty())
        .collect();
    assert_eq!(
        orderers.len(),
        1,
        "exactly one instance ordered: {orderers:?}"
    );
    let other = 1 - orderers[0];
    let adopted = diagnostics(&proxies[other])
        .iter()
        .any(|e| message_has(e, "acme: using the certificate another instance obtained"));
    assert!(
        adopted,
        "instance {other} did not take the shared certificate"
    );
    let sent = *sent.lock().unwrap();
    assert!(
        sent[other] >= 1 && sent[orderers[0]] == 0,
        "validations reached a {} b {}: the non-ordering instance must have answered them",
        sent[0],
        sent[1]
    );

    // A client of either gets the app through the shared certificate.
    for port in https_ports {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root.clone()).unwrap();
        let client = TlsClient {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            roots: Arc::new(roots),
            server_name: DOMAIN_B.into(),
        };
        assert_echo(
            &client.get("/shared").await,
            "/shared",
            "through either instance",
        );
    }
}

// ---------------------------------------------------------------------------
// g. External account binding

#[tokio::test]
async fn a_ca_that_requires_external_account_binding_gets_it() {
    if !pebble::installed() {
        return;
    }
    const KID: &str = "portcullis-test-kid";
    // base64url of 32 bytes: what a CA hands out as the MAC key.
    const MAC_KEY: &str = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
    let https_port = loopback_port();
    let http_port = loopback_port();
    let mut pebble = Pebble::new(PebbleOptions {
        http_port,
        tls_port: https_port,
        validity_secs: None,
        eab: Some((KID, MAC_KEY)),
    });
    pebble.start().await;
    let upstream = Upstream::start().await;
    let work = tempfile::tempdir().unwrap();
    let base = InstanceConfig {
        https_port,
        http_port: Some(http_port),
        upstream: upstream.addr,
        challenge: Challenge::Http01,
        renew_before: "30d",
        cache_dir: "acme",
        extra: "",
    }
    .toml(&pebble);
    let spawn = |toml: String, env: Vec<(String, String)>| {
        let config_path = work.path().join("proxy.toml");
        std::fs::write(&config_path, toml).unwrap();
        async move {
            let scratch = tempfile::tempdir().unwrap();
            let unused = make_cert(scratch.path(), "unused", &["localhost"]);
            Proxy::spawn(scratch, unused, config_path, &env).await
        }
    };

    // Without the binding the CA refuses the account: retried, never issued.
    let mut without = spawn(base.clone(), Vec::new()).await;
    let failed = wait_metric_at_least(&without, RENEWALS_FAILED, 1.0).await;
    assert!(
        failed.is_some_and(|v| v >= 1.0) && obtained(&without.stderr).is_empty(),
        "{RENEWALS_FAILED} = {failed:?}; stderr:\n{}",
        tail(&without.stderr_text(), 20)
    );
    assert!(
        diagnostics(&without)
            .iter()
            .any(|e| message_has(e, ORDER_FAILED)),
        "no `{ORDER_FAILED}` event"
    );
    without.signal("TERM");
    without.wait_exit(Duration::from_secs(15)).await;

    let with = format!("{base}eab_kid = \"{KID}\"\neab_hmac_key_env = \"ACME_EAB_KEY\"\n");
    let env = vec![("ACME_EAB_KEY".to_owned(), MAC_KEY.to_owned())];
    // `check` names the binding, never the key.
    std::fs::write(work.path().join("proxy.toml"), &with).unwrap();
    let check = Command::new(common::BIN)
        .args(["check", "--config"])
        .arg(work.path().join("proxy.toml"))
        .env("ACME_EAB_KEY", MAC_KEY)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(check.status.success(), "check: {printed}");
    assert!(
        printed.contains(&format!("external account {KID} (key from $ACME_EAB_KEY)"))
            && !printed.contains(MAC_KEY),
        "check: {printed}"
    );

    let proxy = spawn(with, env).await;
    let deadline = Instant::now() + FIRST_CERT;
    while obtained(&proxy.stderr).is_empty() {
        assert!(
            Instant::now() < deadline,
            "no certificate with the binding; stderr:\n{}\nPebble:\n{}",
            tail(&proxy.stderr_text(), 30),
            tail(&pebble.log_text(), 30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pebble.root_der().await).unwrap();
    let client = TlsClient {
        addr: SocketAddr::from(([127, 0, 0, 1], https_port)),
        roots: Arc::new(roots),
        server_name: DOMAIN_A.into(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok((chain, _)) = served_chain(client.addr, DOMAIN_A, &[b"http/1.1"]).await
            && verify_chain(&chain, &pebble.root_der().await, DOMAIN_A).is_ok()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the bound account's certificate is not served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_echo(&client.get("/bound").await, "/bound", "with the binding");
    assert!(
        !proxy.stderr_text().contains(MAC_KEY) && !without.stderr_text().contains(MAC_KEY),
        "the MAC key reached a log"
    );
}

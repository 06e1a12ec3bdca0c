//! SPEC "What a client sees" → Forwarding and the upstream errors: what the
//! upstream receives (method, path, query, body, Host, X-Forwarded-*, no
//! hop-by-hop headers), pooled upstream connections, streamed 50 MB bodies
//! both ways within a memory bound, and 502 / 504 with the proxy serving on.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{Proxy, ProxyConfig, Recorded, Upstream, dead_addr, dead_port};
use http::{Method, Request};
use http_body_util::{BodyExt, Full};

fn header<'a>(recorded: &'a Recorded, name: &str) -> Option<&'a str> {
    recorded.headers.get(name).and_then(|v| v.to_str().ok())
}

/// Every value of a header the upstream received.
fn header_all<'a>(recorded: &'a Recorded, name: &str) -> Vec<&'a str> {
    recorded
        .headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect()
}

#[tokio::test]
async fn upstream_sees_the_exact_method_path_query_body_and_host() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let client = proxy.client();
    // The query is passed on untouched: no decoding (not even of `%7E`), no re-encoding.
    let target = "/api/items/42?a=1&b=%20x&c=%2Fy&d=&e=a+b&f=%7E";
    let methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"];
    for method in methods {
        let body: &[u8] = match method {
            "GET" | "DELETE" | "OPTIONS" | "HEAD" => b"",
            _ => b"{\"name\": \"caf\xc3\xa9\", \"n\": 1}\x00\xff",
        };
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let answer = client
            .request(
                method.clone(),
                target,
                &[("host", "app.example.test:8443")],
                Bytes::from_static(body),
            )
            .await;
        assert_eq!(answer.status, 200, "{method}: {}", answer.text());
        let seen = upstream.last();
        assert_eq!(seen.method, method);
        assert_eq!(seen.target, target, "{method}");
        assert_eq!(seen.body, body, "{method}");
        assert_eq!(seen.body_len, body.len() as u64, "{method}");
        assert_eq!(
            header_all(&seen, "host"),
            ["app.example.test:8443"],
            "{method}"
        );
    }
    assert_eq!(upstream.count(), methods.len());
}

#[tokio::test]
async fn x_forwarded_headers_from_an_untrusted_client() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let answer = proxy
        .client()
        .request(
            Method::GET,
            "/xff",
            &[
                ("host", "shop.example.test"),
                ("x-forwarded-for", "1.2.3.4"),
                ("x-forwarded-proto", "http"),
                ("x-forwarded-host", "evil.example.test"),
                ("forwarded", "for=1.2.3.4;proto=http"),
                ("x-real-ip", "1.2.3.4"),
            ],
            Bytes::new(),
        )
        .await;
    assert_eq!(answer.status, 200);
    let seen = upstream.last();
    assert_eq!(header_all(&seen, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(header_all(&seen, "x-forwarded-proto"), ["https"]);
    assert_eq!(header_all(&seen, "x-forwarded-host"), ["shop.example.test"]);
    assert_eq!(header_all(&seen, "host"), ["shop.example.test"]);
    // Other spellings of "the client's address" cannot be spoofed either.
    assert!(
        seen.headers.get("forwarded").is_none(),
        "{:?}",
        seen.headers
    );
    assert!(
        seen.headers.get("x-real-ip").is_none(),
        "{:?}",
        seen.headers
    );
}

/// HTTP/1.0 allows a request without Host: the upstream still gets one (its
/// own authority, as a client of it would send) and no X-Forwarded-Host,
/// since the client named no host.
#[tokio::test]
async fn an_http10_request_without_host_gets_the_upstreams_authority_as_host() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    // HTTP/1.0 without keep-alive: the proxy closes after its answer.
    let (answer, closed) = proxy
        .client()
        .raw_until_closed(
            b"GET /ten HTTP/1.0\r\nX-Forwarded-Host: evil.example.test\r\n\r\n",
            Duration::from_secs(10),
        )
        .await;
    assert!(closed, "{answer}");
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    let seen = upstream.last();
    assert_eq!(seen.target, "/ten");
    assert_eq!(
        header_all(&seen, "host"),
        [upstream.addr.to_string().as_str()]
    );
    assert!(
        seen.headers.get("x-forwarded-host").is_none(),
        "{:?}",
        seen.headers
    );
    assert_eq!(header_all(&seen, "x-forwarded-for"), ["127.0.0.1"]);
}

/// RFC 9112 3.2.2: a target in absolute form reaches the upstream in
/// origin form, with "/" for an empty path (`http://host?q` too).
#[tokio::test]
async fn an_absolute_form_target_is_forwarded_in_origin_form() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    for (target, forwarded) in [
        (
            "http://app.example.test/abs/path?q=1&r=%7E",
            "/abs/path?q=1&r=%7E",
        ),
        ("http://app.example.test?q=1", "/?q=1"),
        ("http://app.example.test", "/"),
        ("http://app.example.test/a/./b/../c?x", "/a/c?x"),
    ] {
        let request =
            format!("GET {target} HTTP/1.1\r\nHost: app.example.test\r\nConnection: close\r\n\r\n");
        let (answer, closed) = proxy
            .client()
            .raw_until_closed(request.as_bytes(), Duration::from_secs(10))
            .await;
        assert!(closed, "{target}: {answer}");
        assert!(answer.starts_with("HTTP/1.1 200"), "{target}: {answer}");
        assert_eq!(upstream.last().target, forwarded, "{target}");
    }
}

/// RFC 9112 3.2: an HTTP/1.1 request without Host, with two, or with an
/// invalid one is answered 400. SPEC: "400 malformed request"; the upstream
/// must get the client's Host, and there is none to give it.
#[tokio::test]
async fn missing_duplicate_or_malformed_host_is_400_and_not_forwarded() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    for head in [
        "GET /nohost HTTP/1.1\r\nConnection: close\r\n\r\n",
        "GET /two HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\nConnection: close\r\n\r\n",
        "GET /space HTTP/1.1\r\nHost: a b\r\nConnection: close\r\n\r\n",
        "GET /at HTTP/1.1\r\nHost: x@y\r\nConnection: close\r\n\r\n",
    ] {
        let (text, _) = proxy
            .client()
            .raw_until_closed(head.as_bytes(), Duration::from_secs(10))
            .await;
        let responses = common::parse_responses(&text);
        assert_eq!(responses.len(), 1, "{head:?}: {text}");
        assert_eq!(responses[0].status, 400, "{head:?}: {text}");
        assert_eq!(responses[0].json()["error"], "bad_request", "{head:?}");
        assert!(
            responses[0].header("strict-transport-security").is_some(),
            "{text}"
        );
    }
    let seen: Vec<String> = upstream.recorded().into_iter().map(|r| r.target).collect();
    assert!(seen.is_empty(), "forwarded: {seen:?}");
}

#[tokio::test]
async fn x_forwarded_for_is_appended_for_a_trusted_proxy() {
    let upstream = Upstream::start().await;
    let config = ProxyConfig {
        server: "trusted_proxies = [\"127.0.0.1/32\"]".into(),
        ..Default::default()
    };
    let proxy = Proxy::start(upstream.addr, config).await;
    let client = proxy.client();
    let answer = client
        .request(
            Method::GET,
            "/xff",
            &[("x-forwarded-for", "1.2.3.4")],
            Bytes::new(),
        )
        .await;
    assert_eq!(answer.status, 200);
    let seen = upstream.last();
    assert_eq!(header_all(&seen, "x-forwarded-for"), ["1.2.3.4, 127.0.0.1"]);
    assert_eq!(header_all(&seen, "x-forwarded-proto"), ["https"]);

    // Several incoming XFF fields are one list, in order.
    let answer = client
        .request(
            Method::GET,
            "/xff",
            &[
                ("x-forwarded-for", "1.2.3.4, 5.6.7.8"),
                ("x-forwarded-for", "9.9.9.9"),
            ],
            Bytes::new(),
        )
        .await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        header_all(&upstream.last(), "x-forwarded-for"),
        ["1.2.3.4, 5.6.7.8, 9.9.9.9, 127.0.0.1"]
    );

    // Without an incoming XFF, the trusted peer's own address is the value.
    let answer = client.get("/no-xff").await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        header_all(&upstream.last(), "x-forwarded-for"),
        ["127.0.0.1"]
    );
}

/// Written by hand so that exactly these headers are on the wire.
#[tokio::test]
async fn hop_by_hop_headers_are_not_passed_on() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let request = "POST /hop?x=1 HTTP/1.1\r\n\
                   Host: localhost\r\n\
                   Connection: close, X-Secret, x-other-secret\r\n\
                   X-Secret: s3cr3t\r\n\
                   X-Other-Secret: also\r\n\
                   Keep-Alive: timeout=5, max=100\r\n\
                   TE: trailers\r\n\
                   Trailer: X-Checksum\r\n\
                   Upgrade: h2c\r\n\
                   Proxy-Connection: keep-alive\r\n\
                   X-Kept: yes\r\n\
                   Content-Length: 5\r\n\
                   \r\n\
                   hello";
    let (text, _) = proxy
        .client()
        .raw_until_closed(request.as_bytes(), Duration::from_secs(10))
        .await;
    let responses = common::parse_responses(&text);
    assert_eq!(responses.len(), 1, "{text}");
    assert_eq!(responses[0].status, 200, "{text}");
    let seen = upstream.last();
    assert_eq!(seen.target, "/hop?x=1");
    assert_eq!(seen.body, b"hello");
    for name in [
        "connection",
        "x-secret",
        "x-other-secret",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
    ] {
        assert!(
            seen.headers.get(name).is_none(),
            "upstream saw {name}: {:?}",
            seen.headers
        );
    }
    assert_eq!(header(&seen, "x-kept"), Some("yes"));
}

#[tokio::test]
async fn a_chunked_request_body_arrives_intact() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let request = "POST /chunked HTTP/1.1\r\n\
                   Host: localhost\r\n\
                   Transfer-Encoding: chunked\r\n\
                   Connection: close\r\n\
                   \r\n\
                   5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n";
    let (text, _) = proxy
        .client()
        .raw_until_closed(request.as_bytes(), Duration::from_secs(10))
        .await;
    let responses = common::parse_responses(&text);
    assert_eq!(responses.len(), 1, "{text}");
    assert_eq!(responses[0].status, 200, "{text}");
    let seen = upstream.last();
    assert_eq!(seen.target, "/chunked");
    assert_eq!(seen.body, b"hello, world");
}

/// The same rule on the way back: the upstream's hop-by-hop response headers
/// stay between it and the proxy.
#[tokio::test]
async fn hop_by_hop_response_headers_are_not_passed_back() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let answer = proxy
        .client()
        .get("/headers?Connection=X-Internal&X-Internal=1&Keep-Alive=timeout%3D5&Proxy-Connection=keep-alive&Trailer=X-Sum&Upgrade=h2c&X-Kept=yes")
        .await;
    assert_eq!(answer.status, 200);
    for name in [
        "x-internal",
        "keep-alive",
        "proxy-connection",
        "trailer",
        "upgrade",
    ] {
        assert!(
            answer.headers.get(name).is_none(),
            "client saw {name}: {:?}",
            answer.headers
        );
    }
    assert_eq!(answer.header("x-kept"), Some("yes"));
}

#[tokio::test]
async fn upstream_connections_are_pooled_and_reused() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let client = proxy.client();

    // One client connection (one worker): its requests share one upstream connection.
    let mut sender = client.h1().await;
    for i in 0..10 {
        let answer = common::send(
            &mut sender,
            Method::GET,
            &format!("/same/{i}"),
            &[],
            Bytes::new(),
        )
        .await;
        assert_eq!(answer.status, 200);
    }
    let after_one_connection = upstream.connections();
    assert!(
        (1..=2).contains(&after_one_connection),
        "10 requests on one client connection opened {after_one_connection} upstream connections"
    );

    // A fresh client connection per request, spread over both workers:
    // still one or two upstream connections per worker.
    for i in 0..20 {
        let answer = client.get(&format!("/fresh/{i}")).await;
        assert_eq!(answer.status, 200);
    }
    // A client's `Connection: close` ends its own connection, not the
    // pooled upstream one.
    for i in 0..10 {
        let request =
            format!("GET /close/{i} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        let (text, closed) = client
            .raw_until_closed(request.as_bytes(), Duration::from_secs(10))
            .await;
        assert!(closed, "{text}");
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    }
    assert_eq!(upstream.count(), 40);
    let total = upstream.connections();
    assert!(
        total <= 4,
        "40 sequential requests opened {total} upstream connections"
    );
}

#[tokio::test]
async fn upstream_down_is_502_json_without_internals() {
    let dead = dead_addr();
    let proxy = Proxy::start(dead, ProxyConfig::default()).await;
    let answer = proxy.client().get("/anything").await;
    assert_eq!(answer.status, 502);
    assert!(
        answer
            .header("content-type")
            .is_some_and(|v| v.starts_with("application/json")),
        "{:?}",
        answer.headers
    );
    let json = answer.json();
    assert_eq!(json["error"], "upstream_unreachable");
    assert!(json["message"].as_str().is_some_and(|m| !m.is_empty()));
    let text = answer.text();
    assert!(
        !text.contains(&dead.port().to_string()) && !text.contains("refused"),
        "the 502 leaks upstream internals: {text}"
    );
}

/// One proxy: upstream down (502), upstream back (200), upstream too slow
/// (504), and a normal request after each.
#[tokio::test]
async fn after_502_and_504_the_proxy_keeps_serving() {
    let port = dead_port();
    let addr = port.addr;
    let config = ProxyConfig {
        upstream: "timeout = \"500ms\"".into(),
        ..Default::default()
    };
    let proxy = Proxy::start(addr, config).await;
    let client = proxy.client();

    let answer = client.get("/first").await;
    assert_eq!(answer.status, 502);
    assert_eq!(answer.json()["error"], "upstream_unreachable");

    let upstream = Upstream::start_on_dead_port(port).await;
    let answer = client.get("/").await;
    assert_eq!(answer.status, 200, "{}", answer.text());

    let started = std::time::Instant::now();
    let answer = client.get("/delay/3000").await;
    let waited = started.elapsed();
    assert_eq!(answer.status, 504, "{}", answer.text());
    assert!(
        answer
            .header("content-type")
            .is_some_and(|v| v.starts_with("application/json"))
    );
    let json = answer.json();
    assert_eq!(json["error"], "upstream_timeout");
    assert!(json["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(
        waited < Duration::from_millis(2500),
        "the 504 came after {waited:?}, not after the 500ms timeout"
    );

    // On the same client connection and on a fresh one.
    let mut sender = client.h1().await;
    for _ in 0..3 {
        let answer = common::send(&mut sender, Method::GET, "/after", &[], Bytes::new()).await;
        common::assert_echo(&answer, "/after", "after the timeout, on one connection");
    }
    assert_eq!(client.get("/after").await.status, 200);
    assert_eq!(upstream.last().target, "/after");
}

#[tokio::test]
async fn an_http2_request_is_forwarded_over_http11_with_host_from_authority() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let mut h2 = proxy.client().h2().await;
    let authority = format!("localhost:{}", proxy.https.port());
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("https://{authority}/h2/path?q=1&r=%20"))
        .header("x-kept", "yes")
        .body(Full::new(Bytes::from_static(b"h2 body")))
        .unwrap();
    let answer = common::collect(h2.send_request(request).await.unwrap()).await;
    let echo = common::assert_echo(&answer, "/h2/path", "h2 forwarded");
    assert_eq!(echo["version"], "HTTP/1.1", "{echo}");
    let seen = upstream.last();
    assert_eq!(seen.method, Method::POST);
    assert_eq!(seen.target, "/h2/path?q=1&r=%20");
    assert_eq!(seen.body, b"h2 body");
    assert_eq!(header_all(&seen, "host"), [authority.as_str()]);
    assert_eq!(header_all(&seen, "x-forwarded-host"), [authority.as_str()]);
    assert_eq!(header_all(&seen, "x-forwarded-proto"), ["https"]);
    assert_eq!(header_all(&seen, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(header(&seen, "x-kept"), Some("yes"));
}

// ---------------------------------------------------------------- 50 MB both ways

const FIFTY_MB: u64 = 50 * 1024 * 1024;
const MAX_GROWTH_KIB: u64 = 20 * 1024;

/// Samples the proxy's resident memory from a baseline until stopped.
struct RssSampler {
    pid: u32,
    baseline: u64,
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    fn start(proxy: &Proxy) -> Self {
        let pid = proxy.pid();
        let baseline = proxy.rss_kib();
        assert!(baseline > 0, "cannot read the proxy's RSS");
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let (stop, peak) = (stop.clone(), peak.clone());
            async move {
                while !stop.load(Ordering::SeqCst) {
                    peak.fetch_max(common::rss_kib(pid), Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        });
        RssSampler {
            pid,
            baseline,
            stop,
            peak,
            task,
        }
    }

    /// Stops sampling; the peak grew less than [`MAX_GROWTH_KIB`] over the
    /// baseline during `what`.
    async fn assert_bounded(self, what: &str) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap();
        self.peak
            .fetch_max(common::rss_kib(self.pid), Ordering::SeqCst);
        let (baseline, peak) = (self.baseline, self.peak.load(Ordering::SeqCst));
        assert!(
            peak.saturating_sub(baseline) < MAX_GROWTH_KIB,
            "RSS grew from {baseline} KiB to {peak} KiB during {what}"
        );
    }
}

async fn big_body_proxy(upstream: &Upstream) -> Proxy {
    let config = ProxyConfig {
        server: "max_body_bytes = \"100MiB\"".into(),
        ..Default::default()
    };
    let proxy = Proxy::start(upstream.addr, config).await;
    // Warm up both workers (TLS, pools, allocator) before the baseline.
    for _ in 0..4 {
        let answer = proxy
            .client()
            .request(Method::POST, "/warm", &[], vec![b'w'; 256 * 1024])
            .await;
        assert_eq!(answer.status, 200);
    }
    proxy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mb_upload_is_streamed_through() {
    let upstream = Upstream::start().await;
    let proxy = big_body_proxy(&upstream).await;
    let sampler = RssSampler::start(&proxy);
    let mut sender = proxy.client().h1_streaming().await;
    let request = Request::builder()
        .method(Method::PUT)
        .uri("/upload")
        .header("host", "localhost")
        .header("content-length", FIFTY_MB)
        .body(common::generated_body(FIFTY_MB))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(120), async {
        let response = sender.send_request(request).await.expect("upload sent");
        common::collect(response).await
    })
    .await
    .expect("the upload finishes within 120 s");
    sampler.assert_bounded("a 50 MB upload").await;

    assert_eq!(response.status, 200, "{}", response.text());
    let seen = upstream.last();
    assert_eq!(seen.method, Method::PUT);
    assert_eq!(seen.target, "/upload");
    assert_eq!(seen.body_len, FIFTY_MB);
    // The first 64 KiB are the first chunk, byte for byte.
    assert_eq!(seen.body, vec![0u8; 64 * 1024]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mb_download_is_streamed_through() {
    let upstream = Upstream::start().await;
    let proxy = big_body_proxy(&upstream).await;
    let sampler = RssSampler::start(&proxy);
    let mut sender = proxy.client().h1().await;
    let request = Request::builder()
        .uri(format!("/download/{FIFTY_MB}"))
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, length_header, received, in_pattern) =
        tokio::time::timeout(Duration::from_secs(120), async {
            let response = sender.send_request(request).await.expect("request sent");
            let status = response.status();
            let length_header = response
                .headers()
                .get("content-length")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let mut body = response.into_body();
            let mut received = 0u64;
            // The mock's byte `i` is `i % 256`.
            let mut in_pattern = true;
            while let Some(frame) = body.frame().await {
                let frame = frame.expect("body frame");
                if let Some(data) = frame.data_ref() {
                    in_pattern &= data
                        .iter()
                        .zip(received..)
                        .all(|(&byte, i)| byte == i as u8);
                    received += data.len() as u64;
                }
            }
            (status, length_header, received, in_pattern)
        })
        .await
        .expect("the download finishes within 120 s");
    sampler.assert_bounded("a 50 MB download").await;

    assert_eq!(status, 200);
    assert_eq!(received, FIFTY_MB);
    assert!(in_pattern, "the body was altered on the way");
    if let Some(length) = length_header {
        assert_eq!(length, FIFTY_MB.to_string());
    }
}

/// An upstream that answers one request per connection and then closes it
/// without saying so (no `Connection: close`): what a server does when its
/// keep-alive timeout fires just after a response.
async fn closing_upstream() -> (std::net::SocketAddr, Arc<AtomicU64>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicU64::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                // Dropped here: closed with no warning.
            });
        }
    });
    (addr, connections)
}

#[tokio::test]
async fn pooled_connections_the_upstream_closed_are_not_used() {
    let (upstream, connections) = closing_upstream().await;
    let proxy = Proxy::start(upstream, ProxyConfig::default()).await;
    let client = proxy.client();
    // Every request after the first finds its pooled connection closed by
    // the upstream: it must get a fresh one, never a 502.
    let mut sender = client.h1().await;
    for i in 0..30 {
        let answer = common::send(
            &mut sender,
            Method::GET,
            &format!("/r/{i}"),
            &[],
            Bytes::new(),
        )
        .await;
        assert_eq!(answer.status, 200, "request {i}: {}", answer.text());
        assert_eq!(answer.text(), "ok");
    }
    assert_eq!(connections.load(Ordering::SeqCst), 30);
}

#[tokio::test]
async fn pooled_connections_idle_past_pool_idle_timeout_are_replaced() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(
        upstream.addr,
        ProxyConfig {
            upstream: "pool_idle_timeout = \"200ms\"\n".into(),
            ..Default::default()
        },
    )
    .await;
    let client = proxy.client();
    let mut sender = client.h1().await;
    let answer = common::send(&mut sender, Method::GET, "/first", &[], Bytes::new()).await;
    assert_eq!(answer.status, 200);
    assert_eq!(upstream.connections(), 1);
    // Straight away the pooled connection is reused...
    let answer = common::send(&mut sender, Method::GET, "/second", &[], Bytes::new()).await;
    assert_eq!(answer.status, 200);
    assert_eq!(upstream.connections(), 1);
    // ...but not once it has been idle for longer than pool_idle_timeout (the
    // waiting is the behaviour under test, not synchronisation).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let answer = common::send(&mut sender, Method::GET, "/third", &[], Bytes::new()).await;
    assert_eq!(answer.status, 200);
    assert_eq!(upstream.connections(), 2);
}

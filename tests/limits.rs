//! SPEC `[server]` limits and route limits (issue 3): 431, 413 (global and
//! per route, with and without Content-Length), 405 with `Allow`, request
//! smuggling framings, slowloris, a client that never handshakes, idle
//! keep-alive, and `max_connections`.
//!
//! Nothing sleeps to synchronise: a sleep only paces a deliberately slow
//! client; everything else polls or waits with a deadline.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::{
    Proxy, ProxyConfig, Upstream, active_connections, eventually, parse_responses, read_responses,
    read_until_closed,
};

async fn proxy_with(upstream: &Upstream, server: &str, rest: &str) -> Proxy {
    let config = ProxyConfig {
        server: server.into(),
        rest: rest.into(),
        ..Default::default()
    };
    Proxy::start(upstream.addr, config).await
}

fn hsts(answer: &common::RawResponse) -> bool {
    answer
        .header("strict-transport-security")
        .is_some_and(|v| v.starts_with("max-age="))
}

// ---------------------------------------------------------------- 431

#[tokio::test]
async fn a_head_over_max_header_bytes_gets_431_json_with_hsts() {
    let upstream = Upstream::start().await;
    let proxy = proxy_with(&upstream, "max_header_bytes = \"4KiB\"", "").await;
    let client = proxy.client();

    let big = "a".repeat(5000);
    let answer = client
        .request(Method::GET, "/big", &[("x-big", &big)], Bytes::new())
        .await;
    assert_eq!(answer.status, 431);
    assert_eq!(answer.json()["error"], "header_too_large");
    assert!(answer.header("strict-transport-security").is_some());

    // Many small headers add up the same way.
    let mut sender = client.h1().await;
    let small = "b".repeat(100);
    let names: Vec<String> = (0..60).map(|i| format!("x-h{i}")).collect();
    let headers: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), small.as_str())).collect();
    let answer = common::send(&mut sender, Method::GET, "/many", &headers, Bytes::new()).await;
    assert_eq!(answer.status, 431);
    assert_eq!(answer.json()["error"], "header_too_large");

    // Far over the limit (beyond what the proxy buffers to judge it): still 431.
    let huge = "c".repeat(20 * 1024);
    let request = format!("GET /huge HTTP/1.1\r\nHost: localhost\r\nX-Huge: {huge}\r\n\r\n");
    let (text, _) = client
        .raw_until_closed(request.as_bytes(), Duration::from_secs(10))
        .await;
    let responses = parse_responses(&text);
    assert_eq!(responses.first().map(|r| r.status), Some(431), "{text:?}");

    // Just under the limit passes.
    let fine = "d".repeat(3000);
    let answer = client
        .request(Method::GET, "/fine", &[("x-fine", &fine)], Bytes::new())
        .await;
    assert_eq!(answer.status, 200);
    assert_eq!(upstream.count(), 1);
    assert_eq!(upstream.last().target, "/fine");
}

// ---------------------------------------------------------------- 413

#[tokio::test]
async fn content_length_over_the_global_limit_gets_413_before_the_body_is_sent() {
    let upstream = Upstream::start().await;
    let proxy = proxy_with(&upstream, "max_body_bytes = \"1KiB\"", "").await;
    // Only the head: a proxy that waited for the body would never answer.
    let head = b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5000\r\n\r\n";
    let mut tls = proxy.client().connect(&[b"http/1.1"]).await;
    tls.write_all(head).await.unwrap();
    let (text, closed) = read_until_closed(&mut tls, Duration::from_secs(10)).await;
    let responses = parse_responses(&text);
    assert_eq!(responses.len(), 1, "{text:?}");
    assert_eq!(responses[0].status, 413, "{text:?}");
    assert_eq!(responses[0].json()["error"], "body_too_large");
    assert!(hsts(&responses[0]));
    assert!(closed, "the connection with an unread body is closed");
    assert_eq!(upstream.count(), 0);

    // At the limit: forwarded whole.
    let body = vec![b'x'; 1024];
    let answer = proxy
        .client()
        .request(Method::POST, "/upload", &[], body)
        .await;
    assert_eq!(answer.status, 200);
    assert_eq!(upstream.last().body_len, 1024);
}

/// A chunked request body that grows past `limit` while streaming.
fn chunked_request(path: &str, chunk: usize, chunks: usize) -> Vec<u8> {
    let mut bytes = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..chunks {
        bytes.extend_from_slice(format!("{chunk:x}\r\n").as_bytes());
        bytes.extend(std::iter::repeat_n(b'y', chunk));
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(b"0\r\n\r\n");
    bytes
}

#[tokio::test]
async fn a_chunked_body_over_the_global_limit_gets_413() {
    let upstream = Upstream::start().await;
    let proxy = proxy_with(&upstream, "max_body_bytes = \"1KiB\"", "").await;
    let (text, closed) = proxy
        .client()
        .raw_until_closed(&chunked_request("/stream", 700, 2), Duration::from_secs(10))
        .await;
    let responses = parse_responses(&text);
    assert_eq!(responses.len(), 1, "{text:?}");
    assert_eq!(responses[0].status, 413, "{text:?}");
    assert_eq!(responses[0].json()["error"], "body_too_large");
    assert!(hsts(&responses[0]));
    assert!(closed);
    // Streaming means the upstream may have seen the start; never more than the limit.
    for recorded in upstream.recorded() {
        assert!(recorded.body_len <= 1024, "{recorded:?}");
    }

    // Under the limit, chunked: forwarded whole.
    let (text, _) = proxy
        .client()
        .raw_until_closed(
            &chunked_request("/stream-ok", 500, 2),
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(parse_responses(&text)[0].status, 200, "{text:?}");
    assert_eq!(upstream.last().target, "/stream-ok");
    assert_eq!(upstream.last().body_len, 1000);
}

#[tokio::test]
async fn a_route_max_body_bytes_overrides_the_global_limit() {
    let upstream = Upstream::start().await;
    let proxy = proxy_with(
        &upstream,
        "max_body_bytes = \"1MiB\"",
        "[[routes]]\npath = \"/small\"\nmax_body_bytes = \"100\"\n",
    )
    .await;
    let client = proxy.client();
    let body = vec![b'z'; 200];

    // With Content-Length: answered from the head alone.
    let (text, _) = client
        .raw_until_closed(
            b"POST /small/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 200\r\n\r\n",
            Duration::from_secs(10),
        )
        .await;
    let responses = parse_responses(&text);
    assert_eq!(responses.len(), 1, "{text:?}");
    assert_eq!(responses[0].status, 413, "{text:?}");
    assert_eq!(responses[0].json()["error"], "body_too_large");
    assert!(hsts(&responses[0]));
    assert_eq!(upstream.count(), 0);

    // Other paths keep the global limit.
    let answer = client.request(Method::POST, "/smaller", &[], body).await;
    assert_eq!(answer.status, 200);
    assert_eq!(upstream.last().body_len, 200);
    let answer = client
        .request(Method::POST, "/small", &[], vec![b'z'; 100])
        .await;
    assert_eq!(answer.status, 200);
    assert_eq!(upstream.last().body_len, 100);

    // Without Content-Length (chunked), counted while streaming.
    let (text, _) = client
        .raw_until_closed(&chunked_request("/small", 80, 2), Duration::from_secs(10))
        .await;
    let responses = parse_responses(&text);
    assert_eq!(responses.first().map(|r| r.status), Some(413), "{text:?}");
    for recorded in upstream.recorded() {
        if recorded.target == "/small" {
            assert!(recorded.body_len <= 100, "{recorded:?}");
        }
    }
}

/// SPEC "Fine points": a Content-Length above the limit gets 413 before the method check.
#[tokio::test]
async fn the_body_limit_is_judged_before_the_method() {
    let upstream = Upstream::start().await;
    let proxy = proxy_with(
        &upstream,
        "",
        "[[routes]]\npath = \"/small\"\nmethods = [\"GET\"]\nmax_body_bytes = \"10\"\n",
    )
    .await;
    let (text, _) = proxy
        .client()
        .raw_until_closed(
            b"PUT /small HTTP/1.1\r\nHost: localhost\r\nContent-Length: 50\r\n\r\n",
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(parse_responses(&text)[0].status, 413, "{text:?}");
    let answer = proxy
        .client()
        .request(Method::PUT, "/small", &[], vec![b'q'; 5])
        .await;
    assert_eq!(answer.status, 405);
    assert_eq!(upstream.count(), 0);
}

// ---------------------------------------------------------------- 405

#[tokio::test]
async fn a_method_not_listed_gets_405_with_allow() {
    let upstream = Upstream::start().await;
    let proxy = proxy_with(
        &upstream,
        "",
        "[[routes]]\npath = \"/admin\"\nmethods = [\"GET\", \"POST\"]\n",
    )
    .await;
    let client = proxy.client();
    for method in [Method::DELETE, Method::PUT, Method::PATCH] {
        let answer = client
            .request(method.clone(), "/admin/users", &[], Bytes::new())
            .await;
        assert_eq!(answer.status, 405, "{method}");
        assert_eq!(answer.header("allow"), Some("GET, POST"), "{method}");
        assert_eq!(answer.json()["error"], "method_not_allowed");
        assert!(answer.header("strict-transport-security").is_some());
    }
    assert_eq!(upstream.count(), 0);
    for method in [Method::GET, Method::POST] {
        let answer = client
            .request(method.clone(), "/admin/users", &[], Bytes::new())
            .await;
        assert_eq!(answer.status, 200, "{method}");
    }
    assert_eq!(upstream.count(), 2);
    proxy
        .wait_event(|e| e["reason"] == "method_not_allowed")
        .await;
}

// ---------------------------------------------------------------- smuggling

const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n";

/// Writes `bytes` on one connection and returns every response and whether
/// the server closed the connection.
async fn smuggle(proxy: &Proxy, bytes: &str) -> (Vec<common::RawResponse>, String, bool) {
    let (text, closed) = proxy
        .client()
        .raw_until_closed(bytes.as_bytes(), Duration::from_secs(10))
        .await;
    (parse_responses(&text), text, closed)
}

/// Requests carrying both `Content-Length` and `Transfer-Encoding: chunked`,
/// each hiding a second request that one of the two framings would see.
fn cl_te_requests() -> Vec<String> {
    // Under chunked framing the first body ends at `0\r\n\r\n` and a second
    // request follows; under Content-Length it is all one body.
    let hidden = format!("0\r\n\r\n{SMUGGLED}");
    vec![
        format!(
            "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{hidden}",
            hidden.len()
        ),
        format!(
            "POST / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nContent-Length: {}\r\n\r\n{hidden}",
            hidden.len()
        ),
        // TE.CL: under a short Content-Length the chunk's data is a second request.
        format!(
            "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n",
            SMUGGLED.len()
        ),
    ]
}

/// SPEC/issue 3: "Requests with both Content-Length and Transfer-Encoding
/// ... are rejected and nothing reaches the upstream."
#[tokio::test]
async fn content_length_with_transfer_encoding_is_rejected_and_nothing_is_forwarded() {
    let upstream = Upstream::start().await;
    let proxy = proxy_with(&upstream, "", "").await;
    for bytes in cl_te_requests() {
        let (responses, text, closed) = smuggle(&proxy, &bytes).await;
        assert!(!responses.is_empty(), "no answer to {bytes:?}");
        assert_eq!(responses[0].status, 400, "{bytes:?} → {text:?}");
        assert_eq!(responses.len(), 1, "{bytes:?} → {text:?}");
        assert!(closed, "connection left open after {bytes:?}");
        assert_eq!(
            upstream.count(),
            0,
            "forwarded from {bytes:?}: {:?}",
            upstream.recorded()
        );
    }
}

/// Belt and braces: whatever happens to the first request, the hidden second
/// one never reaches the upstream, and the connection is closed after one answer.
#[tokio::test]
async fn content_length_with_transfer_encoding_never_smuggles_a_second_request() {
    let upstream = Upstream::start().await;
    let proxy = proxy_with(&upstream, "", "").await;
    for bytes in cl_te_requests() {
        let (responses, text, closed) = smuggle(&proxy, &bytes).await;
        assert_eq!(responses.len(), 1, "{bytes:?} → {text:?}");
        assert!(closed, "connection left open after {bytes:?}");
        for recorded in upstream.recorded() {
            assert_eq!(recorded.target, "/", "smuggled: {recorded:?}");
            assert!(
                recorded.headers.get("content-length").is_none()
                    || recorded.headers.get("transfer-encoding").is_none(),
                "both framings forwarded: {recorded:?}"
            );
        }
    }
}

/// A request the sniffer cannot follow past (an `Upgrade` that does not
/// happen, a body with a malformed chunk) ends the connection: were it kept
/// alive, the next request on it would skip the fragment and CL+TE checks.
#[tokio::test]
async fn no_request_after_an_unfollowable_one_is_served_on_the_same_connection() {
    let upstream = Upstream::start().await;
    let proxy = proxy_with(&upstream, "", "").await;
    let after = "GET /after#frag HTTP/1.1\r\nHost: localhost\r\n\r\n";
    for first in [
        "GET /first HTTP/1.1\r\nHost: localhost\r\nUpgrade: x\r\n\r\n".to_string(),
        "GET /first HTTP/1.1\r\nHost: localhost\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n".to_string(),
        format!("POST /first HTTP/1.1\r\nHost: localhost\r\nUpgrade: x\r\nContent-Length: {}\r\n\r\n{SMUGGLED}", SMUGGLED.len()),
    ] {
        let before = upstream.count();
        let (responses, text, closed) = smuggle(&proxy, &format!("{first}{after}")).await;
        assert!(closed, "connection left open after {first:?}: {text:?}");
        assert_eq!(responses.len(), 1, "{first:?} → {text:?}");
        assert_eq!(responses[0].status, 200, "{text:?}");
        assert_eq!(responses[0].header("connection"), Some("close"), "{text:?}");
        let seen: Vec<String> = upstream.recorded()[before..]
            .iter()
            .map(|r| r.target.clone())
            .collect();
        assert_eq!(seen, ["/first"], "after {first:?}");
    }
    // A CONNECT is not something a reverse proxy in front of an app tunnels.
    let (responses, text, closed) = smuggle(
        &proxy,
        "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    )
    .await;
    assert!(closed, "{text:?}");
    assert_eq!(responses.first().map(|r| r.status), Some(400), "{text:?}");
    assert!(
        !upstream
            .recorded()
            .iter()
            .any(|r| r.method == http::Method::CONNECT)
    );
}

#[tokio::test]
async fn conflicting_content_lengths_are_rejected_and_nothing_is_forwarded() {
    let upstream = Upstream::start().await;
    let proxy = proxy_with(&upstream, "", "").await;
    let smuggled = SMUGGLED;
    let cases = [
        format!(
            "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nContent-Length: {}\r\n\r\nhello{smuggled}",
            5 + smuggled.len()
        ),
        format!(
            "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nContent-Length: 5\r\n\r\nhello{smuggled}",
            5 + smuggled.len()
        ),
        format!(
            "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5, {}\r\n\r\nhello{smuggled}",
            5 + smuggled.len()
        ),
    ];
    for bytes in cases {
        let (responses, text, closed) = smuggle(&proxy, &bytes).await;
        assert!(!responses.is_empty(), "no answer to {bytes:?}");
        assert_eq!(responses[0].status, 400, "{bytes:?} → {text:?}");
        assert_eq!(responses.len(), 1, "{bytes:?} → {text:?}");
        assert!(closed, "connection left open after {bytes:?}");
        assert_eq!(
            upstream.count(),
            0,
            "forwarded from {bytes:?}: {:?}",
            upstream.recorded()
        );
    }
    // Two equal Content-Lengths are harmless either way; the proxy stays usable.
    assert_eq!(proxy.client().get("/after").await.status, 200);
}

// ---------------------------------------------------------------- slow clients

#[tokio::test]
async fn slowloris_is_disconnected_within_header_read_timeout_while_others_are_served() {
    let upstream = Upstream::start().await;
    let proxy = proxy_with(&upstream, "header_read_timeout = \"1s\"", "").await;
    let header_read_timeout = Duration::from_secs(1);

    let tls = proxy.client().connect(&[b"http/1.1"]).await;
    let sent = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicBool::new(false));
    let slow = {
        let sent = sent.clone();
        let closed = closed.clone();
        tokio::spawn(async move {
            let (mut reader, mut writer) = tokio::io::split(tls);
            let head = format!(
                "GET /slow HTTP/1.1\r\nHost: localhost\r\nX-Padding: {}\r\n\r\n",
                "a".repeat(100)
            );
            let start = Instant::now();
            let mut buf = [0u8; 4096];
            let mut bytes = head.bytes();
            let mut pace = tokio::time::interval(Duration::from_millis(300));
            let outcome = loop {
                tokio::select! {
                    read = reader.read(&mut buf) => match read {
                        Ok(0) | Err(_) => break Some(start.elapsed()),
                        Ok(_) => continue, // an error response, say; wait for the close
                    },
                    // Pacing of the slow client, not synchronisation.
                    _ = pace.tick() => {
                        let Some(byte) = bytes.next() else { break None };
                        if writer.write_all(&[byte]).await.is_err() {
                            break Some(start.elapsed());
                        }
                        sent.fetch_add(1, Ordering::SeqCst);
                    }
                }
            };
            closed.store(true, Ordering::SeqCst);
            outcome
        })
    };

    // Another client is served while the slow one is still connected.
    assert!(eventually(Duration::from_secs(5), || sent.load(Ordering::SeqCst) >= 2).await);
    let answer = proxy.client().get("/other").await;
    assert_eq!(answer.status, 200);
    assert!(
        !closed.load(Ordering::SeqCst),
        "the slow client was cut before the other was served"
    );

    let elapsed = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .expect("slow client task ended")
        .unwrap()
        .expect("the slow client sent its whole head without being disconnected");
    assert!(
        elapsed <= header_read_timeout + Duration::from_secs(2),
        "disconnected after {elapsed:?}"
    );
    assert!(
        elapsed >= header_read_timeout - Duration::from_millis(200),
        "disconnected too early, after {elapsed:?}"
    );
    assert!(sent.load(Ordering::SeqCst) < 20);
    assert_eq!(upstream.count(), 1);
    assert_eq!(upstream.last().target, "/other");
    proxy.wait_event(|e| e["reason"] == "header_timeout").await;
}

/// The header timer also bounds a later head on a keep-alive connection that
/// has been idle a while, even though the idle timer (60 s by default) is far
/// longer and was the one running when the head started.
/// Reads one complete response, the mock upstream's `200` echo for `path`,
/// and nothing after it.
async fn read_one_echo(stream: &mut (impl tokio::io::AsyncRead + Unpin), path: &str) {
    let text = read_responses(stream, 1, Duration::from_secs(10)).await;
    let responses = parse_responses(&text);
    assert_eq!(responses.len(), 1, "{text:?}");
    let response = &responses[0];
    assert!(response.complete, "{text:?}");
    assert_eq!(response.status, 200, "{text:?}");
    assert_eq!(response.json()["path"], path, "{text:?}");
}

#[tokio::test]
async fn slowloris_on_a_keep_alive_connection_is_disconnected_within_header_read_timeout() {
    let upstream = Upstream::start().await;
    let proxy = proxy_with(&upstream, "header_read_timeout = \"1s\"", "").await;
    let mut tls = proxy.client().connect(&[b"http/1.1"]).await;
    tls.write_all(b"GET /first HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    read_one_echo(&mut tls, "/first").await;
    let mut buf = [0u8; 4096];

    // Idle for longer than header_read_timeout: an idle keep-alive
    // connection answers to idle_timeout, not to the header timer.
    let quiet = tokio::time::timeout(Duration::from_millis(1500), tls.read(&mut buf)).await;
    assert!(
        quiet.is_err(),
        "idle connection closed or answered: {quiet:?}"
    );

    // Then the next head starts, and dribbles.
    let start = Instant::now();
    let mut head = b"GET /second HTTP/1.1\r\nHost: localhost\r\nX-Padding: ".iter();
    let mut pace = tokio::time::interval(Duration::from_millis(300));
    let elapsed = loop {
        tokio::select! {
            read = tls.read(&mut buf) => match read {
                Ok(0) | Err(_) => break start.elapsed(),
                Ok(_) => continue,
            },
            // Pacing of the slow client, not synchronisation.
            _ = pace.tick() => {
                let byte = head.next().copied().unwrap_or(b'a');
                if tls.write_all(&[byte]).await.is_err() {
                    break start.elapsed();
                }
                assert!(start.elapsed() < Duration::from_secs(10), "never disconnected");
            }
        }
    };
    assert!(
        elapsed <= Duration::from_secs(3),
        "disconnected after {elapsed:?}"
    );
    assert_eq!(upstream.count(), 1);
}

#[tokio::test]
async fn a_client_that_never_starts_the_tls_handshake_is_disconnected() {
    let upstream = Upstream::start().await;
    let proxy = proxy_with(&upstream, "header_read_timeout = \"1s\"", "").await;
    let mut tcp = tokio::net::TcpStream::connect(proxy.https).await.unwrap();
    let start = Instant::now();
    let (_, closed) = read_until_closed(&mut tcp, Duration::from_secs(10)).await;
    let elapsed = start.elapsed();
    assert!(closed, "still connected after 10 s");
    // The kernel holds a silent connection up to 1 s before the proxy
    // accepts it (TCP_DEFER_ACCEPT), then header_read_timeout runs.
    assert!(
        elapsed <= Duration::from_secs(3),
        "disconnected after {elapsed:?}"
    );
    // Meanwhile, a real client is fine.
    assert_eq!(proxy.client().get("/").await.status, 200);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_idle_timeout() {
    let upstream = Upstream::start().await;
    let proxy = proxy_with(&upstream, "idle_timeout = \"1s\"", "").await;
    let idle_timeout = Duration::from_secs(1);
    let mut tls = proxy.client().connect(&[b"http/1.1"]).await;
    tls.write_all(b"GET /one HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    read_one_echo(&mut tls, "/one").await;
    let served = Instant::now();
    let mut buf = [0u8; 4096];

    // Shortly after the response it is still open (and silent).
    let early = tokio::time::timeout(Duration::from_millis(400), tls.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "closed or answered {:?} after {:?}",
        early,
        served.elapsed()
    );

    let (rest, closed) = read_until_closed(&mut tls, idle_timeout + Duration::from_secs(2)).await;
    let elapsed = served.elapsed();
    assert!(closed, "still open {elapsed:?} after the response");
    assert!(rest.is_empty(), "unexpected bytes {rest:?}");
    assert!(
        elapsed <= idle_timeout + Duration::from_secs(2),
        "closed after {elapsed:?}"
    );
    assert_eq!(upstream.count(), 1);
}

#[tokio::test]
async fn a_connection_that_keeps_working_is_not_closed_by_the_idle_timer() {
    let upstream = Upstream::start().await;
    let proxy = proxy_with(&upstream, "idle_timeout = \"1s\"", "").await;
    let mut sender = proxy.client().h1().await;
    // Requests back to back for longer than idle_timeout, on one connection.
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_millis(1500) {
        let answer = common::send(&mut sender, Method::GET, "/delay/100", &[], Bytes::new()).await;
        assert_eq!(answer.status, 200);
        n += 1;
    }
    assert_eq!(upstream.count(), n);
    assert!(!sender.is_closed(), "the busy connection was closed");
}

// ---------------------------------------------------------------- max_connections

/// An upstream that counts requests in flight and remembers the peak.
#[derive(Clone, Default)]
struct Concurrency {
    in_flight: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    total: Arc<AtomicUsize>,
}

async fn counting_upstream(delay: Duration) -> (SocketAddr, Concurrency) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Concurrency::default();
    let shared = counts.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let counts = shared.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let counts = counts.clone();
                        async move {
                            let _ = req.into_body().collect().await;
                            let now = counts.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                            counts.peak.fetch_max(now, Ordering::SeqCst);
                            tokio::time::sleep(delay).await;
                            counts.in_flight.fetch_sub(1, Ordering::SeqCst);
                            counts.total.fetch_add(1, Ordering::SeqCst);
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                Bytes::from_static(b"delayed"),
                            )))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (addr, counts)
}

/// How the limit is measured: each of the 200 clients opens its own
/// connection and sends exactly one request, which the upstream holds for
/// 200 ms. A connection the proxy has accepted and is serving therefore has
/// its request in flight at the upstream for most of its life, so the peak of
/// requests in flight at the upstream (counted exactly, with an atomic
/// fetch_max, not sampled) is the peak number of client connections being
/// served at once. Were the limit not enforced, 200 handshakes finishing in
/// a few milliseconds would put far more than 50 requests in flight
/// together. The admin gauge `portcullis_active_connections` (which counts
/// connections from accept, before the handshake, across both workers) is
/// sampled as well, as a second, independent check; sampling can miss a
/// peak, which is why it is not the only one.
#[tokio::test]
async fn max_connections_bounds_concurrent_connections_and_every_client_is_served() {
    const LIMIT: usize = 50;
    const CLIENTS: usize = 200;
    let (addr, counts) = counting_upstream(Duration::from_millis(200)).await;
    let config = ProxyConfig {
        server: format!("max_connections = {LIMIT}"),
        ..Default::default()
    };
    let proxy = Proxy::start(addr, config).await;
    let admin = proxy.admin.expect("admin listener");

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut peak = 0i64;
            let mut samples = 0usize;
            while !stop.load(Ordering::SeqCst) {
                if let Some(active) = active_connections(admin).await {
                    peak = peak.max(active);
                    samples += 1;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (peak, samples)
        })
    };

    let client = proxy.client();
    let started = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .request(
                        Method::GET,
                        "/delay/200",
                        &[("connection", "close")],
                        Bytes::new(),
                    )
                    .await
                    .status
            })
        })
        .collect();
    let mut ok = 0;
    for task in tasks {
        let status = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("every client is served within 60 s")
            .unwrap();
        assert_eq!(status, 200);
        ok += 1;
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let (gauge_peak, samples) = sampler.await.unwrap();

    eprintln!(
        "{CLIENTS} clients in {elapsed:?}; peak in flight at the upstream {}, \
         peak active_connections gauge {gauge_peak} over {samples} samples",
        counts.peak.load(Ordering::SeqCst)
    );
    assert_eq!(ok, CLIENTS);
    assert_eq!(counts.total.load(Ordering::SeqCst), CLIENTS);
    let peak = counts.peak.load(Ordering::SeqCst);
    assert!(peak <= LIMIT, "{peak} requests in flight at once");
    // The limit was actually reached (or nearly): the test measured something.
    assert!(
        peak >= LIMIT / 2,
        "peak only {peak}; the test did not load the proxy"
    );
    assert!(samples > 0, "the admin gauge was never read");
    assert!(
        gauge_peak <= LIMIT as i64,
        "active_connections reached {gauge_peak}"
    );
    // 200 clients, 50 at a time, 200 ms each: at least 4 rounds.
    assert!(elapsed >= Duration::from_millis(780), "done in {elapsed:?}");
}

/// With fewer connection slots than workers, a worker must not sit on a slot
/// waiting for a connection on its own listener while connections queue on
/// another worker's: clients one after another are all served.
#[tokio::test]
async fn max_connections_below_the_worker_count_still_serves_every_client() {
    let upstream = Upstream::start().await;
    // The harness runs 2 workers, each with its own SO_REUSEPORT listener.
    let proxy = proxy_with(&upstream, "max_connections = 1", "").await;
    let client = proxy.client();
    for i in 0..12 {
        let path = format!("/seq/{i}");
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            client.request(Method::GET, &path, &[("connection", "close")], Bytes::new()),
        )
        .await
        .unwrap_or_else(|_| panic!("client {i} was not served within 5 s"));
        assert_eq!(answer.status, 200);
    }
    assert_eq!(upstream.count(), 12);
}

/// `send_timeout`: a client that stops reading a large response is cut off
/// once no write to it has made progress for that long, and the upstream
/// connection feeding it is released (closed), not held for ever.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_after_send_timeout_and_the_upstream_released() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let (released_tx, released) = tokio::sync::oneshot::channel::<Duration>();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(n > 0, "the proxy closed before sending a request");
            head.extend_from_slice(&buf[..n]);
        }
        tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000000000\r\n\r\n")
            .await
            .unwrap();
        let chunk = vec![b'x'; 64 * 1024];
        let started = Instant::now();
        // Bounded: the proxy must release the connection long before 1 TB.
        loop {
            match tokio::time::timeout(Duration::from_secs(30), tcp.write_all(&chunk)).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => break,
                Err(_) => panic!("the upstream write stalled for 30 s: the proxy holds it"),
            }
        }
        let _ = released_tx.send(started.elapsed());
    });
    let config = ProxyConfig {
        server: "send_timeout = \"1s\"".into(),
        ..Default::default()
    };
    let proxy = Proxy::start(upstream, config).await;
    let mut tls = proxy.client().connect(&[b"http/1.1"]).await;
    tls.write_all(b"GET /huge HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    // Read nothing: the proxy's writes stall once the buffers are full.
    let held_for = tokio::time::timeout(Duration::from_secs(30), released)
        .await
        .expect("the upstream connection was never released")
        .expect("the upstream task ended without a verdict");
    assert!(held_for < Duration::from_secs(30));
    // The client's connection was closed too: reading it ends.
    let (text, closed) = read_until_closed(&mut tls, Duration::from_secs(10)).await;
    assert!(
        closed,
        "the client connection stayed open ({} bytes read)",
        text.len()
    );
}

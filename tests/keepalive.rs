//! HTTP/1.1 keep-alive framing through the proxy: pipelined requests, heads
//! split over several writes, large heads and bodies after an idle spell.
//! portcullis frees hyper's read and write buffers while a connection idles
//! (vendor/hyper.portcullis.patch); these tests hold the framing to what
//! the client sent whatever the buffers went through.

mod common;

use std::time::Duration;

use common::{Proxy, ProxyConfig, Upstream, parse_responses, read_responses};
use tokio::io::AsyncWriteExt;

/// The most any answer may take.
const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn pipelined_requests_in_one_write_are_all_answered_in_order() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let mut tls = proxy.client().connect(&[b"http/1.1"]).await;
    let mut bytes = Vec::new();
    for i in 0..5 {
        bytes.extend_from_slice(
            format!("GET /status/20{i} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes(),
        );
    }
    bytes.extend_from_slice(
        b"POST /post HTTP/1.1\r\nHost: localhost\r\nContent-Length: 11\r\n\r\nhello world",
    );
    // Enough further requests that the whole write is larger than one read.
    for i in 0..100 {
        bytes.extend_from_slice(
            format!(
                "GET /many/{i}?{} HTTP/1.1\r\nHost: localhost\r\n\r\n",
                "q".repeat(40)
            )
            .as_bytes(),
        );
    }
    assert!(bytes.len() > 8 * 1024);
    tls.write_all(&bytes).await.unwrap();
    let text = read_responses(&mut tls, 106, WAIT).await;
    let responses = parse_responses(&text);
    assert_eq!(responses.len(), 106, "{text}");
    for (i, response) in responses.iter().take(5).enumerate() {
        assert_eq!(response.status, 200 + i as u16);
    }
    assert_eq!(responses[5].status, 200);
    assert!(responses.iter().all(|r| r.status < 300));
    let recorded = upstream.recorded();
    let post = recorded
        .iter()
        .find(|r| r.target == "/post")
        .expect("POST forwarded");
    assert_eq!(post.body, b"hello world");
    for i in 0..100 {
        assert!(
            recorded
                .iter()
                .any(|r| r.target.starts_with(&format!("/many/{i}?"))),
            "request {i} not forwarded"
        );
    }
}

#[tokio::test]
async fn a_head_split_over_several_writes_is_read_whole() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let mut tls = proxy.client().connect(&[b"http/1.1"]).await;
    // Each part is flushed as its own TLS record; the proxy may see them in
    // one read or several.
    for part in [
        &b"GET /split/he"[..],
        b"ad HTTP/1.1\r\nHost: loc",
        b"alhost\r\nX-Part: thr",
        b"ee\r\n\r\n",
    ] {
        tls.write_all(part).await.unwrap();
        tls.flush().await.unwrap();
    }
    let text = read_responses(&mut tls, 1, WAIT).await;
    let responses = parse_responses(&text);
    assert_eq!(responses.len(), 1, "{text}");
    assert_eq!(responses[0].status, 200);
    let last = upstream.last();
    assert_eq!(last.target, "/split/head");
    assert_eq!(last.headers["x-part"], "three");
}

#[tokio::test]
async fn a_large_head_and_an_upload_after_an_idle_spell_on_the_same_connection() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(
        upstream.addr,
        ProxyConfig {
            server: "max_header_bytes = \"64KiB\"\n".into(),
            ..Default::default()
        },
    )
    .await;
    let mut sender = proxy.client().h1().await;
    let first = common::send(
        &mut sender,
        http::Method::GET,
        "/first",
        &[],
        bytes::Bytes::new(),
    )
    .await;
    assert_eq!(first.status, 200);
    // The connection idles (its buffers are released), then a head larger
    // than one read arrives, then a body larger than any buffer.
    let cookie = "c".repeat(20 * 1024);
    let large = common::send(
        &mut sender,
        http::Method::GET,
        "/large-head",
        &[("cookie", &format!("big={cookie}"))],
        bytes::Bytes::new(),
    )
    .await;
    assert_eq!(large.status, 200);
    assert_eq!(
        upstream.last().headers["cookie"].len(),
        "big=".len() + cookie.len()
    );
    let body = vec![b'u'; 900 * 1024];
    let upload = common::send(
        &mut sender,
        http::Method::POST,
        "/upload",
        &[],
        bytes::Bytes::from(body),
    )
    .await;
    assert_eq!(upload.status, 200);
    assert_eq!(upstream.last().body_len, 900 * 1024);
    let after = common::send(
        &mut sender,
        http::Method::GET,
        "/after",
        &[],
        bytes::Bytes::new(),
    )
    .await;
    assert_eq!(after.status, 200);
    assert_eq!(upstream.count(), 4);
}

//! SPEC "What a client sees" → Redirect: plain HTTP on `http_listen` gets a
//! `308` to the same URL on HTTPS; a missing or malformed Host gets 400; the
//! HTTP listener never sends HSTS.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Proxy, ProxyConfig, RawResponse, Upstream};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Writes `request` to the HTTP listener as is and returns the one response.
async fn plain(addr: SocketAddr, request: &str) -> RawResponse {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let (text, closed) = common::read_until_closed(&mut tcp, Duration::from_secs(10)).await;
    assert!(closed, "the connection was not closed: {text:?}");
    let mut responses = common::parse_responses(&text);
    assert_eq!(responses.len(), 1, "{text:?}");
    responses.remove(0)
}

async fn proxy_with(upstream: &Upstream, server: &str) -> Proxy {
    let config = ProxyConfig {
        server: server.into(),
        ..Default::default()
    };
    Proxy::start(upstream.addr, config).await
}

fn assert_redirect(response: &RawResponse, location: &str) {
    assert_eq!(response.status, 308, "{response:?}");
    assert_eq!(response.header("location"), Some(location), "{response:?}");
    assert_eq!(
        response
            .headers
            .iter()
            .filter(|(n, _)| n == "location")
            .count(),
        1
    );
    assert!(
        response.header("strict-transport-security").is_none(),
        "HSTS on the HTTP listener: {response:?}"
    );
}

#[tokio::test]
async fn get_and_post_are_redirected_to_the_https_port_with_path_and_query() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let http = proxy.http.expect("http listener");
    let port = proxy.https.port();

    let response = plain(
        http,
        "GET /shop/cart?item=42&q=a%20b HTTP/1.1\r\nHost: example.test:8080\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_redirect(
        &response,
        &format!("https://example.test:{port}/shop/cart?item=42&q=a%20b"),
    );

    let response = plain(
        http,
        "GET /shop/cart HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_redirect(&response, &format!("https://example.test:{port}/shop/cart"));

    let response = plain(
        http,
        "POST /orders?draft=1 HTTP/1.1\r\nHost: example.test:8080\r\nContent-Type: application/json\r\nContent-Length: 11\r\nConnection: close\r\n\r\n{\"a\": true}",
    )
    .await;
    assert_redirect(
        &response,
        &format!("https://example.test:{port}/orders?draft=1"),
    );

    let response = plain(
        http,
        "POST /orders HTTP/1.1\r\nHost: example.test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_redirect(&response, &format!("https://example.test:{port}/orders"));

    let response = plain(
        http,
        "GET / HTTP/1.1\r\nHost: [::1]:8080\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_redirect(&response, &format!("https://[::1]:{port}/"));

    // Nothing reaches the upstream.
    assert_eq!(upstream.count(), 0);
}

#[tokio::test]
async fn several_redirects_on_one_keep_alive_connection() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let port = proxy.https.port();
    let mut tcp = TcpStream::connect(proxy.http.unwrap()).await.unwrap();
    tcp.write_all(
        b"GET /a HTTP/1.1\r\nHost: example.test\r\n\r\n\
          POST /b?c=d HTTP/1.1\r\nHost: example.test\r\nContent-Length: 3\r\n\r\nxyz\
          GET /e HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let (text, _) = common::read_until_closed(&mut tcp, Duration::from_secs(10)).await;
    let responses = common::parse_responses(&text);
    assert_eq!(responses.len(), 3, "{text:?}");
    assert_redirect(&responses[0], &format!("https://example.test:{port}/a"));
    assert_redirect(&responses[1], &format!("https://example.test:{port}/b?c=d"));
    assert_redirect(&responses[2], &format!("https://example.test:{port}/e"));
}

#[tokio::test]
async fn redirect_https_port_443_is_omitted() {
    let upstream = Upstream::start().await;
    let proxy = proxy_with(&upstream, "redirect_https_port = 443").await;
    let http = proxy.http.unwrap();
    let response = plain(
        http,
        "GET /login?next=%2Fhome HTTP/1.1\r\nHost: example.test:8080\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_redirect(&response, "https://example.test/login?next=%2Fhome");
    let response = plain(
        http,
        "POST / HTTP/1.1\r\nHost: example.test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_redirect(&response, "https://example.test/");
}

#[tokio::test]
async fn redirect_https_port_other_than_443_is_written() {
    let upstream = Upstream::start().await;
    let proxy = proxy_with(&upstream, "redirect_https_port = 8443").await;
    let response = plain(
        proxy.http.unwrap(),
        "GET /x?y=1 HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_redirect(&response, "https://example.test:8443/x?y=1");
}

#[tokio::test]
async fn missing_host_is_400() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let http = proxy.http.unwrap();
    for request in [
        "GET /a HTTP/1.1\r\nConnection: close\r\n\r\n",
        "GET /a HTTP/1.0\r\n\r\n",
        "GET /a HTTP/1.1\r\nHost: \r\nConnection: close\r\n\r\n",
    ] {
        let response = plain(http, request).await;
        assert_eq!(response.status, 400, "{request:?}: {response:?}");
        assert!(response.header("location").is_none(), "{response:?}");
        assert!(
            response.header("strict-transport-security").is_none(),
            "{response:?}"
        );
    }
}

#[tokio::test]
async fn malformed_host_is_400() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let http = proxy.http.unwrap();
    for host in [
        "a b",
        "x@y",
        "user@evil.test",
        "evil.test/path",
        "evil.test:notaport",
    ] {
        let request = format!("GET /a HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let response = plain(http, &request).await;
        assert_eq!(response.status, 400, "Host {host:?}: {response:?}");
        assert!(response.header("location").is_none(), "{response:?}");
        assert!(
            response.header("strict-transport-security").is_none(),
            "{response:?}"
        );
    }
}

#[tokio::test]
async fn two_host_headers_are_400_not_a_redirect_to_either() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let http = proxy.http.unwrap();
    for hosts in [
        "Host: good.test\r\nHost: evil.test\r\n",
        "Host: good.test\r\nhost: good.test\r\n",
    ] {
        let request = format!("GET /a HTTP/1.1\r\n{hosts}Connection: close\r\n\r\n");
        let response = plain(http, &request).await;
        assert_eq!(response.status, 400, "{hosts:?}: {response:?}");
        assert!(response.header("location").is_none(), "{response:?}");
    }
}

/// The redirect listener has its own connection cap (never more than
/// `max_connections`): a flood of idle connections on it leaves the HTTPS
/// listener serving, and a client past the cap is served once a slot frees.
#[tokio::test]
async fn a_flood_on_the_redirect_listener_is_capped_and_leaves_https_serving() {
    use tokio::io::AsyncReadExt;
    let upstream = Upstream::start().await;
    let proxy = proxy_with(
        &upstream,
        "max_connections = 4\nheader_read_timeout = \"30s\"",
    )
    .await;
    let http = proxy.http.unwrap();
    // Four idle connections hold the listener's four slots.
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(http).await.unwrap());
    }
    // A fifth client waits in the backlog with its request sent...
    let mut waiting = TcpStream::connect(http).await.unwrap();
    waiting
        .write_all(b"GET /late HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(500), waiting.read(&mut first)).await;
    assert!(early.is_err(), "served past the cap: {early:?}");
    // ...while HTTPS serves as ever.
    assert_eq!(proxy.client().get("/https").await.status, 200);
    // A slot frees: the waiting client gets its redirect.
    drop(idle.pop());
    let (text, closed) = common::read_until_closed(&mut waiting, Duration::from_secs(10)).await;
    assert!(closed, "{text:?}");
    let responses = common::parse_responses(&text);
    assert_eq!(responses.len(), 1, "{text:?}");
    let location = format!("https://example.test:{}/late", proxy.https.port());
    assert_redirect(&responses[0], &location);
}

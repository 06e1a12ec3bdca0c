//! SPEC "Forwarding": a WebSocket upgrade is passed through both ways once
//! the upstream answers 101; any other answer is relayed as a normal response
//! and the connection stays HTTP; route policies apply to the upgrade
//! request (issue 3). The upstream is the built-in mock (`/ws` echoes,
//! `/no-upgrade` answers an upgrade request with 200), run in-process
//! (`common::Upstream`).

mod common;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::{self, Message};

use common::{
    Proxy, ProxyConfig, RawResponse, Upstream, active_connections, parse_responses, wait_active,
};

async fn proxy(rest: &str) -> Proxy {
    let upstream = Upstream::start().await.addr;
    let config = ProxyConfig {
        rest: rest.into(),
        ..Default::default()
    };
    Proxy::start(upstream, config).await
}

async fn next_message(
    socket: &mut (impl futures_util::Stream<Item = Result<Message, tungstenite::Error>> + Unpin),
) -> Message {
    tokio::time::timeout(Duration::from_secs(10), socket.next())
        .await
        .expect("an echo within 10 s")
        .expect("the socket is open")
        .expect("a valid message")
}

#[tokio::test]
async fn websocket_echo_through_the_proxy() {
    let proxy = proxy("").await;
    let tls = proxy.client().connect(&[b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let url = format!("wss://localhost:{}/ws", proxy.https.port());
    let (mut socket, response) = tokio_tungstenite::client_async(url, tls)
        .await
        .expect("WebSocket handshake through the proxy");
    assert_eq!(response.status(), 101);
    assert!(response.headers().contains_key("sec-websocket-accept"));

    socket
        .send(Message::text("hello, portcullis"))
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut socket).await,
        Message::text("hello, portcullis")
    );

    let binary: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    socket.send(Message::binary(binary.clone())).await.unwrap();
    assert_eq!(next_message(&mut socket).await, Message::binary(binary));

    // Several messages in a row come back in order.
    for i in 0..20 {
        socket.send(Message::text(format!("m{i}"))).await.unwrap();
    }
    for i in 0..20 {
        assert_eq!(
            next_message(&mut socket).await,
            Message::text(format!("m{i}"))
        );
    }

    socket.close(None).await.unwrap();
    // The close handshake completes through the tunnel.
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(message)) = socket.next().await {
            if message.is_close() {
                break;
            }
        }
    })
    .await;
    assert!(end.is_ok(), "no close frame back");
}

const UPGRADE_HEAD: &str = "Connection: Upgrade\r\nUpgrade: websocket\r\n\
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

/// Reads responses from `stream` until `count` complete ones have arrived.
async fn read_responses(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    received: &mut Vec<u8>,
    count: usize,
) -> Vec<RawResponse> {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let text = String::from_utf8_lossy(received).into_owned();
        let responses = parse_responses(&text);
        // A response is complete once its JSON body parses.
        if responses.len() >= count
            && responses[..count]
                .iter()
                .all(|r| serde_json::from_str::<serde_json::Value>(&r.body).is_ok())
        {
            return responses;
        }
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("only got {text:?}"))
            .unwrap_or(0);
        assert!(n > 0, "connection closed; got {text:?}");
        received.extend_from_slice(&buf[..n]);
    }
}

/// An upgrade the upstream refuses (200) is relayed as a normal response,
/// and the connection is closed behind it rather than turned into a tunnel
/// or kept alive: the proxy's request sniffer cannot vouch for what follows
/// an `Upgrade` head, so no later request on it is served unchecked.
#[tokio::test]
async fn an_upgrade_answered_200_is_relayed_and_the_connection_is_not_a_tunnel() {
    let proxy = proxy("").await;
    let mut tls = proxy.client().connect(&[b"http/1.1"]).await;
    let mut received = Vec::new();

    tls.write_all(
        format!("GET /no-upgrade HTTP/1.1\r\nHost: localhost\r\n{UPGRADE_HEAD}\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let responses = read_responses(&mut tls, &mut received, 1).await;
    assert_eq!(responses[0].status, 200, "{responses:?}");
    assert_eq!(responses[0].json()["path"], "/no-upgrade");
    assert_eq!(responses[0].header("connection"), Some("close"));

    // Bytes sent after it reach nobody: not the upstream raw (a tunnel),
    // not the proxy as a request. The connection ends.
    let _ = tls
        .write_all(b"GET /second HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    let (rest, closed) = common::read_until_closed(&mut tls, Duration::from_secs(10)).await;
    assert!(closed, "the connection stayed open: {rest:?}");
    assert!(parse_responses(&rest).is_empty(), "{rest:?}");
    let count = proxy
        .client()
        .get("/count")
        .await
        .header("x-mock-request-count")
        .map(str::to_owned);
    assert_eq!(count.as_deref(), Some("2"), "the upstream saw /second");
}

#[tokio::test]
async fn route_policies_apply_to_the_upgrade_request() {
    let proxy = proxy("[[routes]]\npath = \"/ws\"\nmethods = [\"POST\"]\n").await;
    let tls = proxy.client().connect(&[b"http/1.1"]).await;
    let url = format!("wss://localhost:{}/ws", proxy.https.port());
    match tokio_tungstenite::client_async(url, tls).await {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 405);
            assert_eq!(response.headers().get("allow").unwrap(), "POST");
        }
        Err(other) => panic!("expected a 405 answer, got {other}"),
        Ok((_, response)) => panic!("upgrade went through: {response:?}"),
    }
    // The refused upgrade never reached the upstream: the next request is its first.
    let answer = proxy.client().get("/after").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("x-mock-request-count"), Some("1"));
}

#[tokio::test]
async fn a_rejected_path_refuses_the_upgrade_too() {
    let proxy = proxy("").await;
    let tls = proxy.client().connect(&[b"http/1.1"]).await;
    let url = format!("wss://localhost:{}/ws%2f..", proxy.https.port());
    match tokio_tungstenite::client_async(url, tls).await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 400),
        Err(other) => panic!("expected a 400 answer, got {other}"),
        Ok((_, response)) => panic!("upgrade went through: {response:?}"),
    }
    let answer = proxy.client().get("/after").await;
    assert_eq!(answer.header("x-mock-request-count"), Some("1"));
}

/// A WebSocket is a client connection like any other: it counts in
/// `portcullis_active_connections` (and so against `max_connections`, the
/// same slot) for as long as it is open, not only until the upgrade.
#[tokio::test]
async fn an_open_websocket_counts_as_a_connection() {
    let proxy = proxy("").await;
    let admin = proxy.admin.unwrap();
    let tls = proxy.client().connect(&[b"http/1.1"]).await;
    let url = format!("wss://localhost:{}/ws", proxy.https.port());
    let (mut socket, _) = tokio_tungstenite::client_async(url, tls).await.unwrap();
    socket.send(Message::text("one")).await.unwrap();
    assert_eq!(next_message(&mut socket).await, Message::text("one"));
    assert_eq!(active_connections(admin).await, Some(1));

    socket.close(None).await.unwrap();
    drop(socket);
    let last = wait_active(admin, 0, Duration::from_secs(10)).await;
    assert_eq!(last, Some(0), "the closed WebSocket is still counted");
}

/// `websocket_idle_timeout`: a tunnel with no bytes either way is closed;
/// one that keeps talking is not.
#[tokio::test]
async fn a_quiet_tunnel_is_closed_after_websocket_idle_timeout() {
    let upstream = Upstream::start().await.addr;
    let config = ProxyConfig {
        server: "websocket_idle_timeout = \"1s\"".into(),
        ..Default::default()
    };
    let proxy = Proxy::start(upstream, config).await;
    let url = format!("wss://localhost:{}/ws", proxy.https.port());

    // Talking every 300 ms (a deliberately paced client) for 2.4 s: open throughout.
    let tls = proxy.client().connect(&[b"http/1.1"]).await;
    let (mut chatty, _) = tokio_tungstenite::client_async(url.clone(), tls)
        .await
        .expect("handshake");
    let mut pace = tokio::time::interval(Duration::from_millis(300));
    for i in 0..8 {
        pace.tick().await;
        chatty
            .send(Message::text(format!("ping {i}")))
            .await
            .unwrap();
        assert_eq!(
            next_message(&mut chatty).await,
            Message::text(format!("ping {i}"))
        );
    }

    // Quiet after one exchange: closed by the proxy, well before 10 s.
    let tls = proxy.client().connect(&[b"http/1.1"]).await;
    let (mut quiet, _) = tokio_tungstenite::client_async(url, tls)
        .await
        .expect("handshake");
    quiet.send(Message::text("once")).await.unwrap();
    assert_eq!(next_message(&mut quiet).await, Message::text("once"));
    let started = std::time::Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), quiet.next())
        .await
        .expect("the quiet tunnel was still open after 10 s");
    assert!(
        matches!(ended, None | Some(Err(_)) | Some(Ok(Message::Close(_)))),
        "unexpected message {ended:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed after {:?}, before the idle timeout",
        started.elapsed()
    );
}

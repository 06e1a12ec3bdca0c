//! SPEC "What a client sees" → TLS: versions, ALPN, SNI, plain HTTP on the HTTPS port.

mod common;

use common::{Proxy, ProxyConfig, TlsClient, Upstream, make_cert};
use http::Method;

#[tokio::test]
async fn tls12_and_tls13_succeed_and_http2_is_served() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let client = proxy.client();
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let config = client.config(&[version], &[b"http/1.1"]);
        let tls = client
            .connect_with(config, "localhost")
            .await
            .expect("handshake");
        assert_eq!(tls.get_ref().1.protocol_version(), Some(version.version));
    }
    let mut h2 = client.h2().await;
    let request = http::Request::builder()
        .uri(format!("https://localhost:{}/hello", proxy.https.port()))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let answer = common::collect(h2.send_request(request).await.unwrap()).await;
    common::assert_echo(&answer, "/hello", "h2 over TLS");
    assert_eq!(upstream.last().target, "/hello");
    assert_eq!(
        upstream.last().headers.get("host").unwrap(),
        &format!("localhost:{}", proxy.https.port())
    );
}

#[tokio::test]
async fn min_version_13_refuses_a_tls12_client() {
    let upstream = Upstream::start().await;
    let config = ProxyConfig {
        tls: "min_version = \"1.3\"".into(),
        ..Default::default()
    };
    let proxy = Proxy::start(upstream.addr, config).await;
    let client = proxy.client();
    let only12 = client.config(&[&rustls::version::TLS12], &[b"http/1.1"]);
    assert!(client.connect_with(only12, "localhost").await.is_err());
    let only13 = client.config(&[&rustls::version::TLS13], &[b"http/1.1"]);
    assert!(client.connect_with(only13, "localhost").await.is_ok());
}

/// rustls cannot speak TLS 1.1, so the ClientHello is written by hand: a
/// TLS 1.1 hello must get an alert or a closed connection, never a ServerHello.
#[tokio::test]
async fn tls11_handshake_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let mut hello = vec![
        0x03, 0x02, // client_version TLS 1.1
    ];
    hello.extend_from_slice(&[0x11; 32]); // random
    hello.push(0); // session id
    hello.extend_from_slice(&[0x00, 0x04, 0xc0, 0x13, 0x00, 0x2f]); // ECDHE-RSA-AES128-SHA, AES128-SHA
    hello.extend_from_slice(&[0x01, 0x00]); // compression: null
    let mut handshake = vec![0x01, 0x00, (hello.len() >> 8) as u8, hello.len() as u8];
    handshake.extend_from_slice(&hello);
    let mut record = vec![
        0x16,
        0x03,
        0x01,
        (handshake.len() >> 8) as u8,
        handshake.len() as u8,
    ];
    record.extend_from_slice(&handshake);
    let mut tcp = tokio::net::TcpStream::connect(proxy.https).await.unwrap();
    tcp.write_all(&record).await.unwrap();
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read(&mut answer))
        .await
        .expect("the server answers or closes")
        .unwrap_or(0);
    // 0x15 = alert record; 0 bytes = closed. 0x16 would be a ServerHello.
    assert!(
        n == 0 || answer[0] == 0x15,
        "unexpected answer {:?}",
        &answer[..n]
    );
}

#[tokio::test]
async fn sni_picks_the_extra_certificate() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let api = make_cert(dir.path(), "api", &["api.example.com"]);
    let config = ProxyConfig {
        rest: format!(
            "[[tls.sni]]\nserver_name = \"api.example.com\"\ncert = \"{}\"\nkey = \"{}\"\n",
            api.cert_path.display(),
            api.key_path.display()
        ),
        ..Default::default()
    };
    let proxy = Proxy::start(upstream.addr, config).await;
    // A client that trusts only the API certificate can connect by that name.
    let api_client = TlsClient::new(&api, proxy.https);
    let tls = api_client
        .connect_with(
            api_client.config(rustls::DEFAULT_VERSIONS, &[b"http/1.1"]),
            "api.example.com",
        )
        .await
        .expect("SNI certificate served");
    let served = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(served, api.der);
    // The default name still gets the default certificate.
    let default = proxy.client().connect(&[b"http/1.1"]).await;
    assert_eq!(
        default.get_ref().1.peer_certificates().unwrap()[0],
        proxy.cert.der
    );
    // Both are watched: seconds left of each, by name (rcgen's default
    // validity runs to 4096, so far more than a year).
    let admin = proxy.admin.expect("admin listener");
    let (status, metrics) = common::plain_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    for name in ["default", "api.example.com"] {
        let series = format!("portcullis_cert_expiry_seconds{{name=\"{name}\"}} ");
        let left: f64 = metrics
            .lines()
            .find_map(|line| line.strip_prefix(series.as_str()))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in:\n{metrics}"));
        assert!(left > 365.0 * 86_400.0, "{series}{left}");
    }
    drop(dir);
}

#[tokio::test]
async fn plain_http_on_the_https_port_gets_400_and_nothing_is_forwarded() {
    use tokio::io::AsyncWriteExt;
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let mut tcp = tokio::net::TcpStream::connect(proxy.https).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let answer = common::read_until_quiet(&mut tcp, std::time::Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("https://"), "{answer}");
    assert_eq!(upstream.count(), 0);
    let _ = Method::GET;
}

/// `[tls] alpn` narrows what is offered: with only http/1.1, a client
/// asking for h2 first still gets HTTP/1.1, and requests are served.
#[tokio::test]
async fn alpn_list_is_what_is_offered() {
    let upstream = Upstream::start().await;
    let config = ProxyConfig {
        tls: "alpn = [\"http/1.1\"]".into(),
        ..Default::default()
    };
    let proxy = Proxy::start(upstream.addr, config).await;
    let tls = proxy.client().connect(&[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(proxy.client().get("/one").await.status, 200);
}

/// A client that offers no ALPN gets HTTP/1.1: the protocol is the one ALPN
/// chose, and without ALPN that is HTTP/1.1 (RFC 9113 §3.2).
#[tokio::test]
async fn a_client_without_alpn_is_served_http11() {
    use tokio::io::AsyncWriteExt;
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let client = proxy.client();
    let config = client.config(rustls::DEFAULT_VERSIONS, &[]);
    let mut tls = client.connect_with(config, "localhost").await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);
    tls.write_all(b"GET /no-alpn HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let text = common::read_responses(&mut tls, 1, std::time::Duration::from_secs(10)).await;
    let responses = common::parse_responses(&text);
    assert_eq!(responses.len(), 1, "{text}");
    assert_eq!(responses[0].status, 200);
    assert_eq!(upstream.last().target, "/no-alpn");
}

/// The server's cipher order wins (AES-128-GCM first), whatever the client
/// lists first; every suite negotiated is a forward-secret AEAD one.
#[tokio::test]
async fn the_server_picks_the_cipher_suite_by_its_own_order() {
    use rustls::CipherSuite;
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let client = proxy.client();
    for (version, expected) in [
        (
            &rustls::version::TLS13,
            CipherSuite::TLS13_AES_128_GCM_SHA256,
        ),
        (
            &rustls::version::TLS12,
            CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ),
    ] {
        // aws-lc-rs's default client order lists AES-256-GCM first.
        let config = client.config(&[version], &[b"http/1.1"]);
        let tls = client.connect_with(config, "localhost").await.unwrap();
        let suite = tls.get_ref().1.negotiated_cipher_suite().unwrap().suite();
        assert_eq!(suite, expected, "{version:?}");
    }
    // A client that only has AES-256-GCM still gets it.
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider
        .cipher_suites
        .retain(|s| s.suite() == CipherSuite::TLS13_AES_256_GCM_SHA384);
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(client.roots.clone())
        .with_no_client_auth();
    let tls = client.connect_with(config, "localhost").await.unwrap();
    assert_eq!(
        tls.get_ref().1.negotiated_cipher_suite().unwrap().suite(),
        CipherSuite::TLS13_AES_256_GCM_SHA384
    );
}

/// One connection of a blocking rustls client sharing `config`'s session
/// store: `early` is written before the handshake, so it leaves in the same
/// write as the client's Finished (as a browser's first request usually
/// does). With `early`, reads to the end of the answer; without, reads
/// until the session tickets have arrived. Every read has a 5 s deadline,
/// so anything the proxy holds back fails the test instead of hanging it.
fn blocking_connection(
    addr: std::net::SocketAddr,
    config: std::sync::Arc<rustls::ClientConfig>,
    early: Option<&[u8]>,
) -> (rustls::HandshakeKind, Vec<u8>) {
    use std::io::{Read, Write};
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(config, name).unwrap();
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    if let Some(early) = early {
        conn.writer().write_all(early).unwrap();
    }
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).expect("handshake");
    }
    let kind = conn.handshake_kind().unwrap();
    let mut answer = Vec::new();
    if early.is_some() {
        rustls::Stream::new(&mut conn, &mut tcp)
            .read_to_end(&mut answer)
            .expect("the answer, then close_notify");
    } else if conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3) {
        // The tickets are the only thing the proxy sends now.
        conn.read_tls(&mut tcp)
            .expect("session tickets without a request");
        conn.process_new_packets().unwrap();
    }
    (kind, answer)
}

async fn resumes(
    addr: std::net::SocketAddr,
    config: rustls::ClientConfig,
    early: Option<&'static [u8]>,
) -> (rustls::HandshakeKind, rustls::HandshakeKind, Vec<u8>) {
    let config = std::sync::Arc::new(config);
    tokio::task::spawn_blocking(move || {
        let (first, answer) = blocking_connection(addr, config.clone(), early);
        let (second, _) = blocking_connection(addr, config, early);
        (first, second, answer)
    })
    .await
    .unwrap()
}

/// The proxy sends a new connection's TLS 1.3 session tickets together with
/// its first answer when the request came with the client's Finished; they
/// must still arrive, and a second connection must resume with them.
#[tokio::test]
async fn tls13_tickets_held_for_the_first_answer_still_arrive_and_resume() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let config = proxy
        .client()
        .config(&[&rustls::version::TLS13], &[b"http/1.1"]);
    let request: &[u8] = b"GET /early HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let (first, second, answer) = resumes(proxy.https, config, Some(request)).await;
    assert_eq!(first, rustls::HandshakeKind::Full);
    assert_eq!(second, rustls::HandshakeKind::Resumed);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(upstream.last().target, "/early");
    assert_eq!(upstream.count(), 2);
}

/// A client that sends nothing after the handshake (a resumption check such
/// as `openssl s_client -sess_out`) gets its tickets at once.
#[tokio::test]
async fn tls13_tickets_reach_a_client_that_sends_nothing_and_resume() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let config = proxy
        .client()
        .config(&[&rustls::version::TLS13], &[b"http/1.1"]);
    let (first, second, _) = resumes(proxy.https, config, None).await;
    assert_eq!(first, rustls::HandshakeKind::Full);
    assert_eq!(second, rustls::HandshakeKind::Resumed);
}

/// Under TLS 1.2 the server's last flight ends the handshake: the client
/// waits for it, whether or not its request is already on the way.
#[tokio::test]
async fn tls12_handshakes_complete_with_or_without_a_waiting_request_and_resume() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let config = proxy
        .client()
        .config(&[&rustls::version::TLS12], &[b"http/1.1"]);
    let (first, second, _) = resumes(proxy.https, config.clone(), None).await;
    assert_eq!(first, rustls::HandshakeKind::Full);
    assert_eq!(second, rustls::HandshakeKind::Resumed);
    let request: &[u8] = b"GET /twelve HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let (_, _, answer) = resumes(proxy.https, config, Some(request)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(upstream.last().target, "/twelve");
}

/// A client that closes with close_notify gets one back (RFC 8446 §6.1);
/// one that just drops its TCP connection gets a plain close, as from
/// nginx: a close_notify to a socket nobody reads only provokes a reset.
#[tokio::test]
async fn close_notify_is_answered_only_to_a_client_that_sent_one() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    let client = proxy.client();

    let mut clean = client.connect(&[b"http/1.1"]).await;
    clean.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        clean.read_to_end(&mut rest),
    )
    .await
    .expect("closed within 5 s");
    assert!(read.is_ok(), "no close_notify back: {read:?}");
    assert!(rest.is_empty());

    let mut vanished = client.connect(&[b"http/1.1"]).await;
    vanished.get_mut().0.shutdown().await.unwrap();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        vanished.read_to_end(&mut rest),
    )
    .await
    .expect("closed within 5 s");
    let error = read.expect_err("a close_notify was sent to a client that sent none");
    assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof);
}

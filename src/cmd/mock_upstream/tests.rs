//! The mock over real loopback sockets: the echo, each special path, bodies
//! streamed both ways, the recorder, upgrades and shutdown.

use super::body::{CHUNK_BYTES, PATTERN};
use super::*;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{Full, StreamBody};
use hyper::body::{Body, Frame};
use hyper::client::conn::http1;
use serde_json::Value;
use std::time::Instant;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start() -> Server {
        Self::start_with(Options::default()).await
    }

    async fn start_with(options: Options) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let task = tokio::spawn(serve_with(listener, shutdown, options));
        Server {
            addr,
            stop: Some(stop),
            task,
        }
    }

    async fn connect<B>(&self) -> http1::SendRequest<B>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream = TcpStream::connect(self.addr).await.unwrap();
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(connection);
        sender
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("serve returns after shutdown")
            .unwrap()
            .unwrap();
    }
}

fn get(uri: &str) -> Request<Full<Bytes>> {
    Request::get(uri)
        .header(header::HOST, "mock.test")
        .body(Full::default())
        .unwrap()
}

async fn send(
    sender: &mut http1::SendRequest<Full<Bytes>>,
    request: Request<Full<Bytes>>,
) -> (http::response::Parts, Bytes) {
    let response = sender.send_request(request).await.unwrap();
    let (head, body) = response.into_parts();
    (head, body.collect().await.unwrap().to_bytes())
}

fn json(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap()
}

fn header_str<'a>(head: &'a http::response::Parts, name: &str) -> &'a str {
    head.headers.get(name).unwrap().to_str().unwrap()
}

#[tokio::test]
async fn echo_describes_the_request() {
    let server = Server::start().await;
    let mut client = server.connect().await;
    let request = Request::post("/some/path?b=2&a=1")
        .header(header::HOST, "mock.test")
        .header("x-zeta", "last-alphabetically")
        .header("X-Multi", "one")
        .header("x-multi", "two")
        .header("x-bytes", HeaderValue::from_bytes(b"caf\xe9").unwrap())
        .body(Full::new(Bytes::from_static(b"hello")))
        .unwrap();
    let (head, body) = send(&mut client, request).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(header_str(&head, "content-type"), "application/json");
    let echo = json(&body);
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/some/path");
    assert_eq!(echo["query"], "b=2&a=1");
    assert_eq!(echo["version"], "HTTP/1.1");
    assert_eq!(echo["body_bytes"], 5);
    assert_eq!(
        echo["headers"]["x-multi"],
        serde_json::json!(["one", "two"])
    );
    assert_eq!(echo["headers"]["x-bytes"], "caf\u{fffd}");
    assert_eq!(echo["headers"]["content-length"], "5");

    // Arrival order, not alphabetical: check the raw JSON text.
    let text = String::from_utf8(body.to_vec()).unwrap();
    let host = text.find("\"host\"").unwrap();
    let zeta = text.find("\"x-zeta\"").unwrap();
    let multi = text.find("\"x-multi\"").unwrap();
    assert!(host < zeta && zeta < multi, "{text}");

    let (_, body) = send(&mut client, get("/plain")).await;
    let echo = json(&body);
    assert_eq!(echo["query"], Value::Null);
    assert_eq!(echo["body_bytes"], 0);
    server.stop().await;
}

#[tokio::test]
async fn streamed_body_is_counted() {
    const CHUNKS: usize = 160;
    let server = Server::start().await;
    let mut client = server.connect().await;
    // No length given, so this goes out chunked and the server can only
    // count it by streaming.
    let chunks = futures_util::stream::iter(
        (0..CHUNKS).map(|_| Ok::<_, Infallible>(Frame::data(Bytes::from_static(&PATTERN)))),
    );
    let request = Request::put("/upload")
        .header(header::HOST, "mock.test")
        .body(StreamBody::new(chunks))
        .unwrap();
    let response = client.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let echo = json(&body);
    assert_eq!(echo["body_bytes"], (CHUNKS * CHUNK_BYTES) as u64);
    assert_eq!(echo["headers"]["transfer-encoding"], "chunked");
    server.stop().await;
}

/// A recorder that keeps every request in order.
fn recording() -> (Options, Arc<std::sync::Mutex<Vec<RecordedRequest>>>) {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    let recorder: Recorder = Arc::new(move |request| sink.lock().unwrap().push(request));
    let options = Options {
        recorder: Some(recorder),
        ..Options::default()
    };
    (options, seen)
}

#[tokio::test]
async fn a_recorder_sees_each_request_before_its_answer() {
    const CHUNKS: usize = 40;
    let (options, seen) = recording();
    let server = Server::start_with(options).await;
    let mut client = server.connect().await;
    // Streamed (chunked) and larger than what is kept.
    let chunks = futures_util::stream::iter(
        (0..CHUNKS).map(|_| Ok::<_, Infallible>(Frame::data(Bytes::from_static(&PATTERN)))),
    );
    let request = Request::post("/upload?x=%20")
        .header(header::HOST, "mock.test")
        .header("x-seen", "yes")
        .body(StreamBody::new(chunks))
        .unwrap();
    let response = client.send_request(request).await.unwrap();
    // Recorded by the time the answer arrives.
    let upload = seen.lock().unwrap().last().cloned().expect("recorded");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(json(&body)["body_bytes"], (CHUNKS * CHUNK_BYTES) as u64);
    assert_eq!(upload.method, Method::POST);
    assert_eq!(upload.target, "/upload?x=%20");
    assert_eq!(upload.headers["x-seen"], "yes");
    assert_eq!(upload.body_len, (CHUNKS * CHUNK_BYTES) as u64);
    assert_eq!(upload.body, PATTERN[..RECORDED_BODY_BYTES]);
    assert_eq!(upload.connection, 1);

    // A second connection, a WebSocket upgrade and a download are recorded too.
    let mut other: http1::SendRequest<Full<Bytes>> = server.connect().await;
    send(&mut other, get("/download/10")).await;
    let (_socket, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", server.addr))
        .await
        .unwrap();
    let seen: Vec<_> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|r| (r.target.clone(), r.connection, r.body_len))
        .collect();
    assert_eq!(
        seen,
        [
            ("/upload?x=%20".to_owned(), 1, (CHUNKS * CHUNK_BYTES) as u64),
            ("/download/10".to_owned(), 2, 0),
            ("/ws".to_owned(), 3, 0),
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn answers_carry_server_headers_unless_headers_names_them() {
    let server = Server::start().await;
    let mut client = server.connect().await;
    let (head, _) = send(&mut client, get("/")).await;
    assert_eq!(header_str(&head, "server"), SERVER);
    assert_eq!(header_str(&head, "x-powered-by"), POWERED_BY);
    let (head, _) = send(&mut client, get("/headers?Server=app%2F2")).await;
    assert_eq!(header_str(&head, "server"), "app/2");
    assert_eq!(header_str(&head, "x-powered-by"), POWERED_BY);
    server.stop().await;
}

#[tokio::test]
async fn headers_answers_with_the_named_headers() {
    let server = Server::start().await;
    let mut client = server.connect().await;
    let (head, body) = send(
        &mut client,
        get("/headers?X-Frame-Options=SAMEORIGIN&Cache-Control=public%2C%20max-age%3D60&&Cache-Control=immutable&X-Empty&Content-Type=text%2Fplain"),
    )
    .await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(header_str(&head, "x-frame-options"), "SAMEORIGIN");
    let all = |name: &str| -> Vec<&str> {
        let values = head.headers.get_all(name).iter();
        values.map(|v| v.to_str().unwrap()).collect()
    };
    assert_eq!(all("cache-control"), ["public, max-age=60", "immutable"]);
    assert_eq!(all("x-empty"), [""]);
    // Named, it replaces the mock's own value rather than joining it.
    assert_eq!(all("content-type"), ["text/plain"]);
    assert_eq!(json(&body)["path"], "/headers");

    for bad in [
        "/headers?Content-Length=5",
        "/headers?transfer-encoding=chunked",
        "/headers?X-Bad=a%0D%0AX-Injected:%201",
        "/headers?Bad%20Name=1",
    ] {
        let (head, _) = send(&mut client, get(bad)).await;
        assert_eq!(head.status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(head.headers.get("x-injected").is_none(), "{bad}");
    }
    server.stop().await;
}

#[tokio::test]
async fn counts_requests_per_server_and_per_connection() {
    let server = Server::start().await;
    let mut first = server.connect().await;
    let mut second = server.connect().await;
    let mut seen = Vec::new();
    for use_second in [false, false, true, false] {
        let client = if use_second { &mut second } else { &mut first };
        let (head, _) = send(client, get("/")).await;
        seen.push((
            header_str(&head, "x-mock-request-count").to_owned(),
            header_str(&head, "x-mock-connection-requests").to_owned(),
        ));
    }
    let expected = [("1", "1"), ("2", "2"), ("3", "1"), ("4", "3")];
    let seen: Vec<_> = seen.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    assert_eq!(seen, expected);
    server.stop().await;
}

#[tokio::test]
async fn set_cookie_answers_one_header_per_pair() {
    let server = Server::start().await;
    let mut client = server.connect().await;
    let (head, body) = send(
        &mut client,
        get("/set-cookie?a=1&b=x%3B%20SameSite%3DStrict&&c=1;%20Secure"),
    )
    .await;
    assert_eq!(head.status, StatusCode::OK);
    let cookies: Vec<_> = head
        .headers
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(cookies, ["a=1", "b=x; SameSite=Strict", "c=1; Secure"]);
    assert_eq!(json(&body)["path"], "/set-cookie");

    let (head, _) = send(&mut client, get("/set-cookie?a=1%0D%0AX-Injected:%201")).await;
    assert_eq!(head.status, StatusCode::BAD_REQUEST);
    assert!(head.headers.get(header::SET_COOKIE).is_none());
    server.stop().await;
}

#[tokio::test]
async fn status_answers_that_status() {
    let server = Server::start().await;
    let mut client = server.connect().await;
    let (head, body) = send(&mut client, get("/status/418")).await;
    assert_eq!(head.status, StatusCode::IM_A_TEAPOT);
    assert_eq!(json(&body)["path"], "/status/418");

    let (head, body) = send(&mut client, get("/status/204")).await;
    assert_eq!(head.status, StatusCode::NO_CONTENT);
    assert!(body.is_empty());

    for bad in [
        "/status/100",
        "/status/600",
        "/status/abc",
        "/status/+99",
        "/status/",
    ] {
        let (head, _) = send(&mut client, get(bad)).await;
        assert_eq!(head.status, StatusCode::BAD_REQUEST, "{bad}");
    }
    // The connection survived all of the above.
    let (head, _) = send(&mut client, get("/")).await;
    assert_eq!(header_str(&head, "x-mock-connection-requests"), "8");
    server.stop().await;
}

#[tokio::test]
async fn delay_waits_before_answering() {
    let server = Server::start().await;
    let mut client = server.connect().await;
    let started = Instant::now();
    let (head, body) = send(&mut client, get("/delay/150")).await;
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(json(&body)["path"], "/delay/150");
    let (head, _) = send(&mut client, get("/delay/soon")).await;
    assert_eq!(head.status, StatusCode::BAD_REQUEST);
    server.stop().await;
}

#[tokio::test]
async fn download_streams_the_pattern() {
    const LENGTH: u64 = 3 * CHUNK_BYTES as u64 * 16 + 17;
    let server = Server::start().await;
    let mut client = server.connect().await;
    let response = client
        .send_request(get(&format!("/download/{LENGTH}")))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "application/octet-stream"
    );
    assert_eq!(
        response.headers()[header::CONTENT_LENGTH],
        LENGTH.to_string().as_str()
    );
    let mut body = response.into_body();
    let mut offset = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            for (i, byte) in data.iter().enumerate() {
                assert_eq!(*byte, (offset + i as u64) as u8);
            }
            offset += data.len() as u64;
        }
    }
    assert_eq!(offset, LENGTH);
    server.stop().await;
}

#[tokio::test]
async fn websocket_echoes() {
    let server = Server::start().await;
    let (mut socket, response) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws", server.addr))
            .await
            .unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);

    socket.send(Message::text("hello")).await.unwrap();
    assert_eq!(
        socket.next().await.unwrap().unwrap(),
        Message::text("hello")
    );
    socket
        .send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    assert_eq!(
        socket.next().await.unwrap().unwrap(),
        Message::binary(vec![0u8, 1, 2, 255])
    );
    socket.send(Message::Ping("p".into())).await.unwrap();
    assert_eq!(
        socket.next().await.unwrap().unwrap(),
        Message::Pong("p".into())
    );
    socket.close(None).await.unwrap();
    // The server answers the close and ends the stream.
    loop {
        match socket.next().await {
            Some(Ok(Message::Close(_))) => {}
            Some(Ok(other)) => panic!("unexpected {other:?}"),
            Some(Err(_)) | None => break,
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn websocket_is_closed_on_shutdown() {
    let server = Server::start().await;
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", server.addr))
        .await
        .unwrap();
    server.stop().await;
    match socket.next().await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Away),
        other => panic!("expected a close frame, got {other:?}"),
    }
}

#[tokio::test]
async fn upgrade_requests_that_are_not_accepted_get_the_echo() {
    let server = Server::start().await;
    let mut client = server.connect().await;
    let upgrade = |path: &str| {
        Request::get(path)
            .header(header::HOST, "mock.test")
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "websocket")
            .header(header::SEC_WEBSOCKET_VERSION, "13")
            .header(header::SEC_WEBSOCKET_KEY, "dGhlIHNhbXBsZSBub25jZQ==")
            .body(Full::default())
            .unwrap()
    };
    let (head, body) = send(&mut client, upgrade("/no-upgrade")).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(json(&body)["headers"]["upgrade"], "websocket");

    // A plain request to /ws is described like any other.
    let (head, body) = send(&mut client, get("/ws")).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(json(&body)["path"], "/ws");

    // An upgrade request missing its key is refused, not upgraded.
    let mut broken = upgrade("/ws");
    broken.headers_mut().remove(header::SEC_WEBSOCKET_KEY);
    let (head, _) = send(&mut client, broken).await;
    assert_eq!(head.status, StatusCode::BAD_REQUEST);

    let (head, _) = send(&mut client, get("/")).await;
    assert_eq!(header_str(&head, "x-mock-connection-requests"), "4");
    server.stop().await;
}

#[tokio::test]
async fn websocket_accept_key_is_rfc6455s() {
    let server = Server::start().await;
    let mut client: http1::SendRequest<Full<Bytes>> = server.connect().await;
    let request = Request::get("/ws")
        .header(header::HOST, "mock.test")
        .header(header::CONNECTION, "keep-alive, Upgrade")
        .header(header::UPGRADE, "WebSocket")
        .header(header::SEC_WEBSOCKET_VERSION, "13")
        .header(header::SEC_WEBSOCKET_KEY, "dGhlIHNhbXBsZSBub25jZQ==")
        .body(Full::default())
        .unwrap();
    let response = client.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    // The example from RFC 6455 section 1.3.
    assert_eq!(
        response.headers()[header::SEC_WEBSOCKET_ACCEPT],
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
    server.stop().await;
}

/// `portcullis demo` and the integration tests spawn these on a runtime.
#[tokio::test]
async fn futures_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    assert_send(&serve(listener, async {}));
    assert_send(&run("127.0.0.1:0".parse().unwrap()));
}

#[test]
fn percent_decoding() {
    assert_eq!(
        percent_decode("a=1%3B%20SameSite%3DStrict"),
        b"a=1; SameSite=Strict"
    );
    assert_eq!(percent_decode("100%"), b"100%");
    assert_eq!(percent_decode("%zz%4"), b"%zz%4");
    assert_eq!(percent_decode("a+b%2b"), b"a+b+");
    assert_eq!(percent_decode("%C3%A9"), "é".as_bytes());
}

#[test]
fn digits_and_statuses() {
    assert_eq!(parse_digits("0"), Some(0));
    assert_eq!(parse_digits("99999999999999999999999"), Some(u64::MAX));
    assert_eq!(parse_digits("+1"), None);
    assert_eq!(parse_digits(""), None);
    assert_eq!(parse_status("599"), StatusCode::from_u16(599).ok());
    assert_eq!(parse_status("199"), None);
    assert_eq!(parse_status("0200"), None);
}

//! The sniffer against hand-written streams, against hyper itself (the same
//! requests served by hyper must be the ones flagged), and against
//! generated and arbitrary bytes in pieces of every size.

use super::framing::{State, Tracker};
use super::*;
use proptest::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

fn flagged(log: &AnomalyLog) -> Vec<u64> {
    log.shared
        .flagged
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter(|(_, anomaly)| *anomaly == Anomaly::Fragment)
        .map(|&(index, _)| index)
        .collect()
}

#[test]
fn content_length_with_transfer_encoding_is_recorded_for_its_request() {
    let log = AnomalyLog::new();
    let mut tracker = Tracker::default();
    tracker.feed(
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
          POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        &log,
    );
    assert_eq!(log.anomaly(0), None);
    assert_eq!(log.anomaly(1), Some(Anomaly::LengthAndTransferEncoding));
}

/// Feeds `stream` to a fresh tracker in pieces of `piece_len` bytes.
fn scan_in_pieces(stream: &[u8], piece_len: usize) -> (Vec<u64>, Tracker) {
    let log = AnomalyLog::new();
    let mut tracker = Tracker::default();
    for piece in stream.chunks(piece_len.max(1)) {
        tracker.feed(piece, &log);
    }
    (flagged(&log), tracker)
}

fn scan(stream: &[u8]) -> Vec<u64> {
    scan_in_pieces(stream, stream.len()).0
}

/// Reads through a sniffer with a small read buffer, asserting that the
/// bytes come out unchanged, and returns what was flagged.
async fn read_through_sniffer(stream: &[u8], read_len: usize) -> Vec<u64> {
    let (mut client, server) = tokio::io::duplex(64);
    let log = AnomalyLog::new();
    let mut sniffer = RequestHeadSniffer::new(server, log.clone());
    let written = stream.to_vec();
    let writer = tokio::spawn(async move {
        client.write_all(&written).await?;
        client.shutdown().await
    });
    let mut received = Vec::new();
    let mut buffer = vec![0; read_len];
    loop {
        let read = sniffer.read(&mut buffer).await.expect("read");
        if read == 0 {
            break;
        }
        received.extend_from_slice(&buffer[..read]);
    }
    writer.await.expect("join").expect("write");
    assert_eq!(received, stream, "bytes must pass through unchanged");
    flagged(&log)
}

const PIPELINED: &[u8] =
    b"POST /a#one HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\nhello world\
    POST /b HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n\
    5;name=val#ue\r\nGET /\r\n12\r\n /x#y HTTP/1.1\r\n\r\n\r\n0\r\nX-Trailer: #t\r\n\r\n\
    GET /c?q=1#three HTTP/1.1\r\nHost: h\r\n\r\n";

#[tokio::test]
async fn flags_first_and_third_of_three_pipelined_requests() {
    assert_eq!(read_through_sniffer(PIPELINED, 7).await, vec![0, 2]);
    assert_eq!(read_through_sniffer(PIPELINED, 4096).await, vec![0, 2]);

    let log = AnomalyLog::new();
    Tracker::default().feed(PIPELINED, &log);
    assert!(log.had_fragment(0));
    assert!(!log.had_fragment(1));
    assert!(log.had_fragment(2));
    assert!(!log.had_fragment(3));
}

#[test]
fn every_split_point_of_two_requests_gives_the_same_answer() {
    let stream: &[u8] = b"GET /a HTTP/1.1\r\nContent-Length: 3\r\n\r\n#b#\
        PUT /c#d HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n#x\r\n0\r\n\r\n\
        GET /e#f HTTP/1.1\r\n\r\n";
    let expected = vec![1, 2];
    for split in 0..=stream.len() {
        let log = AnomalyLog::new();
        let mut tracker = Tracker::default();
        tracker.feed(&stream[..split], &log);
        tracker.feed(&stream[split..], &log);
        assert_eq!(flagged(&log), expected, "split at {split}");
        assert_eq!(tracker.state, State::BeforeRequest);
        assert_eq!(tracker.request_index, 3);
    }
    assert_eq!(scan_in_pieces(stream, 1).0, expected);
}

/// Hands out one byte per read, like a peer that sends a byte per TLS
/// record.
struct OneBytePerRead {
    data: Vec<u8>,
    position: usize,
}

impl AsyncRead for OneBytePerRead {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(&byte) = this.data.get(this.position) {
            buf.put_slice(&[byte]);
            this.position += 1;
        }
        Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn one_byte_per_read() {
    let log = AnomalyLog::new();
    let mut sniffer = RequestHeadSniffer::new(
        OneBytePerRead {
            data: PIPELINED.to_vec(),
            position: 0,
        },
        log.clone(),
    );
    let mut received = Vec::new();
    sniffer.read_to_end(&mut received).await.expect("read");
    assert_eq!(received, PIPELINED);
    assert_eq!(flagged(&log), vec![0, 2]);
    assert_eq!(sniffer.get_ref().position, PIPELINED.len());
}

#[test]
fn request_lines_inside_bodies_are_not_flagged() {
    let stream: &[u8] = b"POST /a HTTP/1.1\r\nContent-Length: 21\r\n\r\nGET /x#y HTTP/1.1\r\n\r\n\
        POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n15\r\nGET /x#y HTTP/1.1\r\n\r\n\r\n0\r\n\r\n\
        GET /c HTTP/1.1\r\n\r\n\
        GET /d#e HTTP/1.1\r\n\r\n";
    assert_eq!(scan(stream), vec![3]);
    assert_eq!(scan_in_pieces(stream, 1).0, vec![3]);
}

#[test]
fn hashes_outside_the_target_are_not_flagged() {
    let stream: &[u8] = b"GET /a HTTP/1.1\r\nReferer: https://example.com/#top\r\nX-#: 1\r\n\r\n\
        GET /b HTTP/1.1#\r\n\r\n\
        GET /c#d HTTP/1.1\r\n\r\n";
    assert_eq!(scan(stream), vec![2]);
}

#[test]
fn several_hashes_in_one_target_are_recorded_once() {
    let log = AnomalyLog::new();
    Tracker::default().feed(b"GET /a#b#c#d HTTP/1.1\r\n\r\n", &log);
    assert_eq!(flagged(&log), vec![0]);
}

#[test]
fn leading_empty_lines_are_skipped() {
    assert_eq!(scan(b"\r\n\r\n\nGET /a#b HTTP/1.1\r\n\r\n"), vec![0]);
    assert_eq!(
        scan(b"GET /a HTTP/1.1\r\n\r\n\r\nGET /b#c HTTP/1.1\r\n\r\n"),
        vec![1]
    );
}

#[test]
fn bare_lf_line_ends_are_read_as_httparse_does() {
    assert_eq!(
        scan(b"POST /a HTTP/1.1\nContent-Length: 2\n\n#x\nGET /b#c HTTP/1.1\n\n"),
        vec![1]
    );
}

#[test]
fn framing_headers_are_recognised_case_insensitively() {
    let stream: &[u8] =
        b"POST /a HTTP/1.1\r\ncontent-LENGTH:   4  \r\nContent-Length: 4\r\n\r\n#x#y\
        POST /b HTTP/1.1\r\ntransfer-encoding: gzip\r\nTRANSFER-ENCODING: gzip ,\tChunked \r\n\r\n\
        A\r\n#123456789\r\n0\r\n\r\n\
        GET /c#d HTTP/1.1\r\n\r\n";
    assert_eq!(scan(stream), vec![2]);
}

#[test]
fn chunk_size_whitespace_and_extensions_follow_hyper() {
    let stream: &[u8] = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
        002 \t;a=\"#\";b\r\n#x\r\n0;last\r\nA: 1\r\nB: #\r\n\r\n\
        GET /b#c HTTP/1.1\r\n\r\n";
    assert_eq!(scan(stream), vec![1]);
}

#[test]
fn upgrade_connect_and_http2_stop_tracking() {
    let follow_up: &[u8] = b"GET /x#y HTTP/1.1\r\n\r\n";
    for head in [
        &b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"[..],
        b"GET /ws HTTP/1.1\r\nupgrade: h2c\r\n\r\n",
        b"CONNECT example.com:443 HTTP/1.1\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ] {
        let (flags, tracker) = scan_in_pieces(&[head, follow_up].concat(), 3);
        assert_eq!(
            flags,
            Vec::<u64>::new(),
            "{}",
            String::from_utf8_lossy(head)
        );
        assert_eq!(tracker.state, State::Passthrough);
    }
    // Where following stops: after the upgrading head (it was read
    // whole), at the CONNECT or preface itself.
    let log_of = |bytes: &[u8]| {
        let log = AnomalyLog::new();
        let mut tracker = Tracker::default();
        tracker.feed(bytes, &log);
        log
    };
    let log = log_of(b"GET /a HTTP/1.1\r\n\r\nGET /ws HTTP/1.1\r\nUpgrade: x\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.1\r\n\r\n");
    assert!(log.followed(0) && log.followed(1) && !log.followed(2));
    assert!(!log.last_followed(0) && log.last_followed(1));
    let log = log_of(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n");
    assert!(!log.followed(0));
    let log = log_of(b"GET /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n");
    assert!(
        log.followed(0) && !log.followed(1),
        "a malformed chunk ends following"
    );
    let log = log_of(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n");
    assert!(log.followed(5) && !log.last_followed(1));
    // The upgrading request itself is still judged.
    assert_eq!(
        scan(b"GET /ws#x HTTP/1.1\r\nUpgrade: websocket\r\n\r\nGET /x#y HTTP/1.1\r\n\r\n"),
        vec![0]
    );
    // Lowercase `connect` is an ordinary extension method to hyper.
    assert_eq!(
        scan(b"connect /a HTTP/1.1\r\n\r\nGET /x#y HTTP/1.1\r\n\r\n"),
        vec![1]
    );
}

#[test]
fn confusing_heads_stop_tracking() {
    let follow_up: &[u8] = b"GET /x#y HTTP/1.1\r\n\r\n";
    for head in [
        &b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chun ked\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 5 5\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length:\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 5\x01\r\n\r\n",
        b"POST / HTTP/1.1\r\nX-A: 1\r\n Content-Length: 5\r\n\r\n",
        b"POST / HTTP/1.1\r\nNoColon\r\n\r\n",
        b"POST / HTTP/1.1\r\n: empty name\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nx\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1 1\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1;ext\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\n",
        b" GET / HTTP/1.1\r\n\r\n",
        b"GET\r\n",
        b"GET /a\r\n",
    ] {
        let (flags, tracker) = scan_in_pieces(&[head, follow_up].concat(), 5);
        assert_eq!(
            flags,
            Vec::<u64>::new(),
            "{}",
            String::from_utf8_lossy(head)
        );
        assert_eq!(
            tracker.state,
            State::Passthrough,
            "{}",
            String::from_utf8_lossy(head)
        );
    }
}

#[test]
fn trailer_lines_end_only_at_crlf_as_in_hyper() {
    // hyper's chunked decoder keeps a bare LF inside a trailer line, so
    // the would-be request below is still trailer to it, and to us.
    let stream: &[u8] = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
        0\r\nA: 1\n\r\nGET /x#y HTTP/1.1\r\n\r\n\
        GET /z#z HTTP/1.1\r\n\r\n";
    let (flags, tracker) = scan_in_pieces(stream, 2);
    assert_eq!(flags, vec![1]);
    assert_eq!(tracker.state, State::BeforeRequest);
}

#[tokio::test]
async fn hyper_reads_those_trailer_lines_the_same_way() {
    let stream = b"POST /r0 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
        0\r\nA: 1\n\r\nGET /x#y HTTP/1.1\r\n\r\n\
        GET /r1#z HTTP/1.1\r\n\r\n";
    let served = serve_with_hyper(stream.to_vec(), 3).await;
    assert_eq!(
        served,
        vec![("/r0".to_owned(), false), ("/r1".to_owned(), true)]
    );
}

#[test]
fn large_bodies_are_skipped_without_looking_at_them() {
    let mut stream = b"POST /a HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n".to_vec();
    stream.extend(b"GET /x#y HTTP/1.1\r\n\r\n".repeat(1_000_000 / 21));
    stream.resize(stream.len() + 1_000_000 % 21, b'#');
    stream.extend_from_slice(b"GET /b#c HTTP/1.1\r\n\r\n");
    assert_eq!(scan_in_pieces(&stream, 16 * 1024).0, vec![1]);
}

#[test]
fn answers_for_lower_indices_are_forgotten() {
    let log = AnomalyLog::new();
    for index in [1, 3, 4] {
        log.record(index, Anomaly::Fragment);
    }
    assert!(!log.had_fragment(0));
    assert!(log.had_fragment(1));
    assert!(log.had_fragment(1));
    assert!(!log.had_fragment(2));
    assert_eq!(flagged(&log), vec![3, 4]);
    assert!(log.had_fragment(4));
    assert_eq!(flagged(&log), vec![4]);
    assert!(!log.had_fragment(5));
    assert!(flagged(&log).is_empty());
}

#[test]
fn the_log_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync + Clone>() {}
    assert_send_sync::<AnomalyLog>();
}

#[tokio::test]
async fn writes_pass_through_unchanged() {
    let (mut client, server) = tokio::io::duplex(1024);
    let mut sniffer = RequestHeadSniffer::new(server, AnomalyLog::new());
    assert_eq!(
        sniffer.is_write_vectored(),
        sniffer.get_ref().is_write_vectored()
    );
    sniffer
        .write_all(b"HTTP/1.1 200 OK\r\n")
        .await
        .expect("write");
    let slices = [io::IoSlice::new(b"a: #\r\n"), io::IoSlice::new(b"\r\n")];
    let written = sniffer.write_vectored(&slices).await.expect("write");
    sniffer.flush().await.expect("flush");
    sniffer.shutdown().await.expect("shutdown");
    let mut received = Vec::new();
    client.read_to_end(&mut received).await.expect("read");
    let expected = b"HTTP/1.1 200 OK\r\na: #\r\n\r\n";
    assert_eq!(received, expected[..17 + written]);
}

/// One request of a generated stream, in a form hyper accepts.
#[derive(Debug, Clone)]
struct GeneratedRequest {
    fragment: bool,
    body: GeneratedBody,
    leading_empty_lines: u8,
    bare_lf: bool,
    hash_in_header: bool,
    upgrade: bool,
    expect_continue: bool,
}

#[derive(Debug, Clone)]
enum GeneratedBody {
    None,
    Length {
        body: Vec<u8>,
        duplicate_header: bool,
    },
    Chunked {
        chunks: Vec<Vec<u8>>,
        with_extensions: bool,
        trailers: bool,
        gzip_first: bool,
    },
    LengthAndChunked {
        chunks: Vec<Vec<u8>>,
    },
}

impl GeneratedRequest {
    /// hyper serves the request but this tracker gives up after it.
    fn stops_tracking(&self) -> bool {
        self.upgrade || matches!(self.body, GeneratedBody::LengthAndChunked { .. })
    }

    fn write(&self, index: usize, out: &mut Vec<u8>) {
        let newline: &[u8] = if self.bare_lf { b"\n" } else { b"\r\n" };
        for _ in 0..self.leading_empty_lines {
            out.extend_from_slice(newline);
        }
        let fragment = if self.fragment { "#frag" } else { "" };
        out.extend_from_slice(format!("POST /r{index}?q=1{fragment} HTTP/1.1").as_bytes());
        let mut header = |line: &str| {
            out.extend_from_slice(newline);
            out.extend_from_slice(line.as_bytes());
        };
        header("Host: example.com");
        if self.hash_in_header {
            header("Referer: https://example.com/page#section");
        }
        if self.upgrade {
            header("Connection: upgrade");
            header("Upgrade: websocket");
        }
        if self.expect_continue {
            header("Expect: 100-continue");
        }
        let chunk_body = |chunks: &[Vec<u8>], extensions: bool, trailers: bool| {
            let mut body = Vec::new();
            for chunk in chunks.iter().filter(|chunk| !chunk.is_empty()) {
                let extension = if extensions { ";n=\"#v\"" } else { "" };
                body.extend_from_slice(format!("{:x}{extension}\r\n", chunk.len()).as_bytes());
                body.extend_from_slice(chunk);
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(b"0\r\n");
            if trailers {
                body.extend_from_slice(b"X-Checksum: #1\r\n");
            }
            body.extend_from_slice(b"\r\n");
            body
        };
        let body = match &self.body {
            GeneratedBody::None => Vec::new(),
            GeneratedBody::Length {
                body,
                duplicate_header,
            } => {
                header(&format!("content-length: {}", body.len()));
                if *duplicate_header {
                    header(&format!("Content-Length: {} ", body.len()));
                }
                body.clone()
            }
            GeneratedBody::Chunked {
                chunks,
                with_extensions,
                trailers,
                gzip_first,
            } => {
                if *gzip_first {
                    header("Transfer-Encoding: gzip, chunked");
                } else {
                    header("transfer-encoding: CHUNKED");
                }
                chunk_body(chunks, *with_extensions, *trailers)
            }
            GeneratedBody::LengthAndChunked { chunks } => {
                header("Content-Length: 3");
                header("Transfer-Encoding: chunked");
                chunk_body(chunks, false, false)
            }
        };
        out.extend_from_slice(newline);
        out.extend_from_slice(newline);
        out.extend_from_slice(&body);
    }
}

/// Body bytes that look like requests with fragments.
fn decoy_body() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        prop_oneof![
            Just(&b"GET /s#x HTTP/1.1\r\n\r\n"[..]),
            Just(&b"\r\n"[..]),
            Just(&b"0\r\n\r\n"[..]),
            Just(&b"#"[..]),
            Just(&b"abc"[..]),
        ],
        0..6,
    )
    .prop_map(|pieces| pieces.concat())
}

fn generated_request() -> impl Strategy<Value = GeneratedRequest> {
    let body = prop_oneof![
        3 => Just(GeneratedBody::None),
        3 => (decoy_body(), any::<bool>()).prop_map(|(body, duplicate_header)| {
            GeneratedBody::Length { body, duplicate_header }
        }),
        3 => (proptest::collection::vec(decoy_body(), 0..4), any::<bool>(), any::<bool>(), any::<bool>())
            .prop_map(|(chunks, with_extensions, trailers, gzip_first)| GeneratedBody::Chunked {
                chunks,
                with_extensions,
                trailers,
                gzip_first,
            }),
        1 => proptest::collection::vec(decoy_body(), 0..3)
            .prop_map(|chunks| GeneratedBody::LengthAndChunked { chunks }),
    ];
    (
        any::<bool>(),
        body,
        0..3u8,
        any::<bool>(),
        any::<bool>(),
        proptest::bool::weighted(0.05),
        proptest::bool::weighted(0.1),
    )
        .prop_map(
            |(
                fragment,
                body,
                leading_empty_lines,
                bare_lf,
                hash_in_header,
                upgrade,
                expect_continue,
            )| {
                GeneratedRequest {
                    fragment,
                    body,
                    leading_empty_lines,
                    bare_lf,
                    hash_in_header,
                    upgrade,
                    expect_continue,
                }
            },
        )
}

/// Serves `stream` with hyper behind a sniffer and returns, for each
/// request hyper handed to the service, its path and what the log said.
async fn serve_with_hyper(stream: Vec<u8>, write_len: usize) -> Vec<(String, bool)> {
    use http_body_util::BodyExt;

    let (client, server) = tokio::io::duplex(1 << 20);
    let log = AnomalyLog::new();
    let served = Arc::new(Mutex::new(Vec::new()));
    let next_index = Arc::new(AtomicU64::new(0));
    let sniffer = RequestHeadSniffer::new(server, log.clone());
    let service = {
        let served = served.clone();
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let index = next_index.fetch_add(1, Ordering::Relaxed);
            let had_fragment = log.had_fragment(index);
            served
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((request.uri().path().to_owned(), had_fragment));
            async move {
                let _ = request.into_body().collect().await;
                Ok::<_, std::convert::Infallible>(hyper::Response::new(String::new()))
            }
        })
    };
    let client_task = tokio::spawn(async move {
        let (mut reader, mut writer) = tokio::io::split(client);
        for piece in stream.chunks(write_len.max(1)) {
            writer.write_all(piece).await?;
        }
        writer.shutdown().await?;
        let mut responses = Vec::new();
        reader.read_to_end(&mut responses).await
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(sniffer), service)
        .await;
    let _ = client_task.await;
    let served = served.lock().unwrap_or_else(PoisonError::into_inner);
    served.clone()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// hyper is the oracle: every request it serves must be judged
    /// exactly as generated, until a request after which the tracker is
    /// documented to give up, and never flagged after that.
    #[test]
    fn agrees_with_hyper(
        requests in proptest::collection::vec(generated_request(), 1..6),
        write_len in 1usize..64,
    ) {
        let mut stream = Vec::new();
        for (index, request) in requests.iter().enumerate() {
            request.write(index, &mut stream);
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let served = runtime.block_on(serve_with_hyper(stream, write_len));

        let mut tracking = true;
        for (index, (path, had_fragment)) in served.iter().enumerate() {
            prop_assert_eq!(path, &format!("/r{index}"), "hyper and the generator disagree");
            let request = &requests[index];
            let expected = tracking && request.fragment;
            prop_assert_eq!(*had_fragment, expected, "request {}", index);
            tracking &= !request.stops_tracking();
        }
        // Only a request that makes hyper close may cut the stream short.
        let served_all = served.len() == requests.len();
        let closed_early = requests.iter().take(served.len()).any(|r| {
            r.upgrade || matches!(r.body, GeneratedBody::LengthAndChunked { .. })
        });
        prop_assert!(served_all || closed_early, "served {} of {}", served.len(), requests.len());
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_pieces_do_not_matter(
        stream in proptest::collection::vec(
            prop_oneof![
                Just(&b"GET /a#b HTTP/1.1\r\n"[..]),
                Just(&b"Content-Length: 3\r\n"[..]),
                Just(&b"Transfer-Encoding: chunked\r\n"[..]),
                Just(&b"\r\n"[..]),
                Just(&b"3\r\n"[..]),
                Just(&b"0\r\n"[..]),
                Just(&b"#"[..]),
                Just(&b" "[..]),
                Just(&b"\n"[..]),
            ],
            0..40,
        ).prop_map(|pieces| pieces.concat()),
        noise in proptest::collection::vec(any::<u8>(), 0..64),
        piece_len in 1usize..17,
    ) {
        for candidate in [stream.clone(), [stream, noise].concat()] {
            let (whole, _) = scan_in_pieces(&candidate, candidate.len());
            let (pieces, _) = scan_in_pieces(&candidate, piece_len);
            prop_assert_eq!(whole, pieces);
        }
    }
}

//! The HTTP/1 request-head sniffer (`portcullis::sniffer`) against hyper's
//! HTTP/1 server, configured as the proxy configures it, on the same bytes.
//!
//! The sniffer's log is keyed by position: the n-th request hyper hands to
//! the service must be the n-th head the sniffer saw, or a flag lands on the
//! wrong request (`src/sniffer/mod.rs`, "The invariant that ties it to hyper").
//! hyper does not tell a handler whether a head had a `#fragment`, so the
//! stream carries markers whose truth is known: every 0xFF byte of the input
//! becomes `GET /s?NONCE#f HTTP/1.1` (a fragment: must be flagged), every
//! 0xFE byte `GET /c?NONCE HTTP/1.1` (clean: must not be), and one fragment
//! marker ends the stream. NONCE is a hash of the input, so no other request
//! reaches hyper's service with that path and query. Wherever a marker
//! lands (a body, a half-written head, after an `Upgrade`), if hyper serves
//! it as its k-th request and `AnomalyLog::followed(k)` says the sniffer
//! followed it, `anomaly(k)` must be exactly its truth; a request the
//! sniffer stopped following is refused by the pipeline, so is not checked.
//!
//! The sniffer alone is also checked: bytes pass through unchanged, and one
//! read, reads of the lengths the input chooses and one byte per read leave
//! the same log (every anomaly and `followed` answer).
//!
//! Input: byte 0's low 4 bits say how many piece lengths follow (1-64 bytes
//! each, used in turn); the rest is the stream.
//!
//! Run with `cargo +nightly fuzz run request_sniffer` from the repository root.

#![no_main]

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use portcullis::sniffer::{Anomaly, AnomalyLog, RequestHeadSniffer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client: hands out the stream in pieces; what is written back is
/// dropped.
struct Client {
    stream: Vec<u8>,
    at: usize,
    lengths: Vec<u8>,
    turn: usize,
}

impl Client {
    fn new(stream: &[u8], lengths: &[u8]) -> Self {
        Client {
            stream: stream.to_vec(),
            at: 0,
            lengths: lengths.to_vec(),
            turn: 0,
        }
    }
}

impl AsyncRead for Client {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let left = this.stream.len() - this.at;
        let mut length = left.min(buf.remaining());
        if !this.lengths.is_empty() {
            let piece = usize::from(this.lengths[this.turn % this.lengths.len()] % 64) + 1;
            this.turn += 1;
            length = length.min(piece);
        }
        buf.put_slice(&this.stream[this.at..this.at + length]);
        this.at += length;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Client {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Reads the whole stream through a sniffer, in the client's pieces, and
/// returns what the log says about every request index that could exist.
fn sniff(stream: &[u8], lengths: &[u8], read_len: usize) -> Vec<(Option<Anomaly>, bool)> {
    let log = AnomalyLog::new();
    let mut sniffer = RequestHeadSniffer::new(Client::new(stream, lengths), log.clone());
    let mut received = Vec::with_capacity(stream.len());
    let mut buffer = vec![0u8; read_len];
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        let mut read = ReadBuf::new(&mut buffer);
        match Pin::new(&mut sniffer).poll_read(&mut cx, &mut read) {
            Poll::Ready(Ok(())) if read.filled().is_empty() => break,
            Poll::Ready(Ok(())) => received.extend_from_slice(read.filled()),
            other => panic!("the client never blocks or fails: {other:?}"),
        }
    }
    assert_eq!(received, stream, "bytes must pass through unchanged");
    // Every head ends in a LF: there are at most that many requests.
    let most = stream.iter().filter(|&&b| b == b'\n').count() as u64 + 2;
    (0..most)
        .map(|index| (log.anomaly(index), log.followed(index)))
        .collect()
}

/// A request the service saw: its index, whether it is one of ours (and
/// which), and what the log said about it.
#[derive(Debug)]
struct Served {
    path: String,
    marker: Option<bool>,
    followed: bool,
    anomaly: Option<Anomaly>,
}

/// Serves `stream` with hyper's HTTP/1 server (built as `server/worker.rs`
/// builds it) behind a sniffer, and returns each request the service got.
fn serve(stream: &[u8], lengths: &[u8], nonce: &str) -> Vec<Served> {
    thread_local! {
        static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
    }
    let log = AnomalyLog::new();
    let served = Arc::new(Mutex::new(Vec::new()));
    let sniffer = RequestHeadSniffer::new(Client::new(stream, lengths), log.clone());
    let service = {
        let served = served.clone();
        let nonce = nonce.to_owned();
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let mut served = served.lock().unwrap();
            let index = served.len() as u64;
            let marker = match (request.uri().path(), request.uri().query()) {
                ("/s", Some(query)) if query == nonce => Some(true),
                ("/c", Some(query)) if query == nonce => Some(false),
                _ => None,
            };
            // As the pipeline asks: in order, while the request is served.
            let followed = log.followed(index);
            let anomaly = log.anomaly(index);
            served.push(Served {
                path: request.uri().to_string(),
                marker,
                followed,
                anomaly,
            });
            async move {
                let _ = request.into_body().collect().await;
                Ok::<_, std::convert::Infallible>(hyper::Response::new(String::new()))
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .keep_alive(true)
        .max_buf_size(16 * 1024 * 2 + 4096)
        .header_read_timeout(None);
    RUNTIME.with(|runtime| {
        let _ = runtime.block_on(
            builder
                .serve_connection(hyper_util::rt::TokioIo::new(sniffer), service)
                .with_upgrades(),
        );
    });
    std::mem::take(&mut *served.lock().unwrap())
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let count = usize::from(control & 15).min(rest.len());
    let (lengths, raw) = rest.split_at(count);
    let nonce = format!("{:016x}", fnv1a(data));
    let fragment_marker = format!("GET /s?{nonce}#f HTTP/1.1\r\nHost: x\r\n\r\n");
    let clean_marker = format!("GET /c?{nonce} HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut stream = Vec::with_capacity(raw.len() + 64);
    for &byte in raw {
        match byte {
            0xff => stream.extend_from_slice(fragment_marker.as_bytes()),
            0xfe => stream.extend_from_slice(clean_marker.as_bytes()),
            _ => stream.push(byte),
        }
    }
    stream.extend_from_slice(fragment_marker.as_bytes());

    let whole = sniff(&stream, &[], 1 << 16);
    assert_eq!(whole, sniff(&stream, lengths, 4096), "pieces {lengths:?}");
    assert_eq!(whole, sniff(&stream, &[0], 4096), "one byte per read");
    // Once the sniffer stops following, it follows nothing after.
    if let Some(stop) = whole.iter().position(|&(_, followed)| !followed) {
        assert!(whole[stop..].iter().all(|&(_, followed)| !followed));
    }

    let served = serve(&stream, lengths, &nonce);
    for (index, request) in served.iter().enumerate() {
        let Some(fragment) = request.marker else {
            continue;
        };
        if !request.followed {
            continue;
        }
        let expected = fragment.then_some(Anomaly::Fragment);
        assert_eq!(
            request.anomaly, expected,
            "hyper's request {index} ({}) is judged by another head's flags; served: {served:#?}",
            request.path
        );
    }
});

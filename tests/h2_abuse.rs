//! HTTP/2 under abuse (the hardening issue): rapid reset (CVE-2023-44487),
//! at once and paced past h2's own limit, a CONTINUATION flood
//! (CVE-2024-27316 family), a client that opens every stream it may and
//! never opens its flow-control window, SETTINGS, PING and PRIORITY floods
//! (cut off past 1,000 in 10 s), and
//! `send_timeout` against a client that stops reading.
//!
//! The abusive client is a raw HTTP/2 client over real TLS (ALPN h2) that
//! writes frames by hand (below: a frame encoder and a tiny HPACK encoder
//! using literal-without-indexing fields), while a reader task parses what
//! the proxy sends back (SETTINGS, ACKs, HEADERS, DATA, RST_STREAM, GOAWAY,
//! the close). For each scenario the test checks that the abusive
//! connection is closed or otherwise bounded, that other clients are served
//! on their own connections, that the proxy's resident memory stays bounded
//! and that the upstream does not get an unbounded number of requests.
//!
//! Nothing sleeps to synchronise: waits are on the reader's observations or
//! the upstream's records, each with a deadline, and every flood is bounded
//! in frames and in time. The only sleeps pace the memory sampler thread.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Request};
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::client::TlsStream;

use common::{Proxy, ProxyConfig, Upstream, eventually, open_sockets};

// ---------------------------------------------------------------- frames

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const PRIORITY: u8 = 0x2;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;

const CANCEL: u32 = 0x8;
const REFUSED_STREAM: u32 = 0x7;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// The default (and minimum) SETTINGS_MAX_FRAME_SIZE: no larger frame is
/// ever sent here.
const MAX_FRAME: usize = 16_384;

fn put_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len();
    assert!(len <= MAX_FRAME, "frame of {len} bytes");
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + payload.len());
    put_frame(&mut out, kind, flags, stream, payload);
    out
}

/// An HPACK integer with an N-bit prefix (RFC 7541 §5.1).
fn hpack_int(out: &mut Vec<u8>, prefix_bits: u32, first_byte: u8, value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(first_byte | value as u8);
        return;
    }
    out.push(first_byte | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// A "literal header field without indexing — new name" (RFC 7541 §6.2.2),
/// neither string Huffman-coded: the simplest field to write by hand.
fn hpack_literal(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0x00);
    hpack_int(out, 7, 0x00, name.len());
    out.extend_from_slice(name.as_bytes());
    hpack_int(out, 7, 0x00, value.len());
    out.extend_from_slice(value);
}

/// The header block of `GET path`.
fn request_block(path: &str) -> Vec<u8> {
    let mut block = Vec::new();
    hpack_literal(&mut block, ":method", b"GET");
    hpack_literal(&mut block, ":scheme", b"https");
    hpack_literal(&mut block, ":authority", b"localhost");
    hpack_literal(&mut block, ":path", path.as_bytes());
    block
}

fn window_update(stream: u32, increment: u32) -> Vec<u8> {
    frame(WINDOW_UPDATE, 0, stream, &increment.to_be_bytes())
}

fn settings_payload(settings: &[(u16, u32)]) -> Vec<u8> {
    let mut payload = Vec::new();
    for (id, value) in settings {
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend_from_slice(&value.to_be_bytes());
    }
    payload
}

// ---------------------------------------------------------------- the reader

#[derive(Debug, Clone)]
struct GoAway {
    last_stream: u32,
    code: u32,
    debug: String,
    at: Instant,
}

/// What the proxy sent on the raw connection so far.
#[derive(Debug, Clone, Default)]
struct Seen {
    frames: u64,
    bytes: u64,
    /// The parameters of the proxy's first SETTINGS frame.
    server_settings: Option<Vec<(u16, u32)>>,
    settings_acks: u64,
    ping_acks: u64,
    /// Response HEADERS frames, and those whose first field is the indexed
    /// `:status 200` (0x88, which is how hyper's encoder writes it).
    responses: u64,
    ok_responses: u64,
    data_bytes: u64,
    resets: u64,
    /// RST_STREAM error codes, counted by code.
    reset_codes: std::collections::BTreeMap<u32, u64>,
    goaway: Option<GoAway>,
    /// When and how the connection ended (EOF or a read error).
    closed: Option<(Instant, String)>,
}

impl Seen {
    fn setting(&self, id: u16) -> Option<u32> {
        self.server_settings
            .as_ref()?
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, v)| *v)
    }

    fn ended(&self) -> bool {
        self.goaway.is_some() || self.closed.is_some()
    }

    /// Parses every complete frame at the front of `buf`.
    fn absorb(&mut self, buf: &mut BytesMut) {
        while buf.len() >= 9 {
            let len = (buf[0] as usize) << 16 | (buf[1] as usize) << 8 | buf[2] as usize;
            if buf.len() < 9 + len {
                return;
            }
            let kind = buf[3];
            let flags = buf[4];
            buf.advance(9);
            let payload = buf.split_to(len);
            self.frames += 1;
            match kind {
                SETTINGS if flags & ACK != 0 => self.settings_acks += 1,
                SETTINGS if self.server_settings.is_none() => {
                    self.server_settings = Some(
                        payload
                            .chunks_exact(6)
                            .map(|c| {
                                (
                                    u16::from_be_bytes([c[0], c[1]]),
                                    u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                                )
                            })
                            .collect(),
                    );
                }
                PING if flags & ACK != 0 => self.ping_acks += 1,
                HEADERS => {
                    self.responses += 1;
                    if payload.first() == Some(&0x88) {
                        self.ok_responses += 1;
                    }
                }
                DATA => self.data_bytes += len as u64,
                RST_STREAM if payload.len() == 4 => {
                    self.resets += 1;
                    let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                    *self.reset_codes.entry(code).or_default() += 1;
                }
                GOAWAY if payload.len() >= 8 => {
                    self.goaway = Some(GoAway {
                        last_stream: u32::from_be_bytes([
                            payload[0], payload[1], payload[2], payload[3],
                        ]) & 0x7fff_ffff,
                        code: u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]),
                        debug: String::from_utf8_lossy(&payload[8..]).into_owned(),
                        at: Instant::now(),
                    });
                }
                _ => {}
            }
        }
    }
}

async fn read_frames(mut read: ReadHalf<TlsStream<TcpStream>>, seen: watch::Sender<Seen>) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        buf.reserve(32 * 1024);
        match read.read_buf(&mut buf).await {
            Ok(0) => {
                seen.send_modify(|s| s.closed = Some((Instant::now(), "EOF".into())));
                return;
            }
            Err(error) => {
                seen.send_modify(|s| s.closed = Some((Instant::now(), error.to_string())));
                return;
            }
            Ok(n) => seen.send_modify(|s| {
                s.bytes += n as u64;
                s.absorb(&mut buf);
            }),
        }
    }
}

// ---------------------------------------------------------------- the raw client

/// A TLS connection offering only h2, on a socket whose SO_SNDBUF and
/// SO_RCVBUF may be set small (the kernel doubles them), so that what the
/// kernel holds in flight stays small and the bytes written say how far the
/// proxy read.
async fn connect_h2(
    proxy: &Proxy,
    send_buffer: Option<u32>,
    recv_buffer: Option<u32>,
) -> TlsStream<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(size) = send_buffer {
        socket.set_send_buffer_size(size).unwrap();
    }
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).unwrap();
    }
    let tcp = socket.connect(proxy.https).await.unwrap();
    let tls = proxy.client().tls_over(tcp, &[b"h2"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    tls
}

/// A raw HTTP/2 connection: the test writes frames, a task reads them.
struct RawH2 {
    write: WriteHalf<TlsStream<TcpStream>>,
    seen: watch::Receiver<Seen>,
    /// Bytes of frames handed to TLS so far.
    written: u64,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for RawH2 {
    /// The client leaves: the reading half goes too, so the socket closes.
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl RawH2 {
    /// Connects with ALPN h2, sends the preface and `settings`, waits for
    /// the proxy's SETTINGS and acknowledges them.
    async fn open(proxy: &Proxy, settings: &[(u16, u32)]) -> RawH2 {
        Self::open_with(proxy, settings, None).await
    }

    /// As [`RawH2::open`], with the client socket's SO_SNDBUF set (see
    /// [`connect_h2`]).
    async fn open_with(proxy: &Proxy, settings: &[(u16, u32)], send_buffer: Option<u32>) -> RawH2 {
        let tls = connect_h2(proxy, send_buffer, None).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (read, write) = tokio::io::split(tls);
        let (tx, rx) = watch::channel(Seen::default());
        let reader = tokio::spawn(read_frames(read, tx));
        let mut h2 = RawH2 {
            write,
            seen: rx,
            written: 0,
            reader,
        };
        let mut hello = PREFACE.to_vec();
        put_frame(&mut hello, SETTINGS, 0, 0, &settings_payload(settings));
        h2.send(&hello, Duration::from_secs(5)).await.unwrap();
        let (ok, seen) = h2
            .wait(Duration::from_secs(10), |s| s.server_settings.is_some())
            .await;
        assert!(ok, "no SETTINGS from the proxy: {seen:?}");
        h2.send(&frame(SETTINGS, ACK, 0, &[]), Duration::from_secs(5))
            .await
            .unwrap();
        let (ok, seen) = h2
            .wait(Duration::from_secs(10), |s| s.settings_acks >= 1)
            .await;
        assert!(ok, "the proxy did not acknowledge our SETTINGS: {seen:?}");
        h2
    }

    async fn send(&mut self, bytes: &[u8], within: Duration) -> std::io::Result<()> {
        let write = async {
            self.write.write_all(bytes).await?;
            self.write.flush().await
        };
        let result = tokio::time::timeout(within, write).await;
        // Let the reader task look at what came back before the next write
        // (this runtime has one thread, and a socket that always takes more
        // would otherwise keep the writer going).
        tokio::task::yield_now().await;
        match result {
            Ok(Ok(())) => {
                self.written += bytes.len() as u64;
                Ok(())
            }
            Ok(Err(error)) => Err(error),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "write stalled",
            )),
        }
    }

    fn seen(&self) -> Seen {
        self.seen.borrow().clone()
    }

    /// Waits until `check` holds for what was read, or `within` has passed,
    /// or the reader ended. Returns whether it held, and what was read.
    async fn wait(
        &mut self,
        within: Duration,
        mut check: impl FnMut(&Seen) -> bool,
    ) -> (bool, Seen) {
        let _ = tokio::time::timeout(within, self.seen.wait_for(|s| check(s))).await;
        let seen = self.seen();
        (check(&seen), seen)
    }
}

// ---------------------------------------------------------------- helpers

/// Samples a process's resident memory every 10 ms on its own thread (the
/// sleep paces the sampler; nothing waits on it) and keeps the peak.
struct RssPeak {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssPeak {
    fn start(pid: u32) -> RssPeak {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(common::rss_kib(pid)));
        let thread = {
            let (stop, peak) = (stop.clone(), peak.clone());
            std::thread::spawn(move || {
                // At most 10 minutes of samples, whatever happens.
                for _ in 0..60_000 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    peak.fetch_max(common::rss_kib(pid), Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        RssPeak {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
        self.peak.load(Ordering::SeqCst)
    }
}

/// SO_SNDBUF of a flooding client (the kernel doubles it).
const SMALL_SEND_BUFFER: u32 = 32 * 1024;

/// Growth allowed for resident memory in any scenario.
const RSS_BOUND_KIB: u64 = 64 * 1024;

/// A normal client on its own connections is served, over HTTP/1.1 and
/// over HTTP/2, each within 10 s.
async fn assert_served(proxy: &Proxy, when: &str) {
    let client = proxy.client();
    let answer = tokio::time::timeout(Duration::from_secs(10), client.get("/normal-h1"))
        .await
        .unwrap_or_else(|_| panic!("{when}: an HTTP/1.1 client was not served within 10 s"));
    common::assert_echo(&answer, "/normal-h1", &format!("{when}: HTTP/1.1 client"));
    let h2_request = async {
        let mut sender = client.h2().await;
        let request = Request::builder()
            .method(Method::GET)
            .uri(format!(
                "https://localhost:{}/normal-h2",
                proxy.https.port()
            ))
            .body(Full::new(Bytes::new()))
            .unwrap();
        common::collect(sender.send_request(request).await.expect("h2 request")).await
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), h2_request)
        .await
        .unwrap_or_else(|_| panic!("{when}: an HTTP/2 client was not served within 10 s"));
    common::assert_echo(&answer, "/normal-h2", &format!("{when}: HTTP/2 client"));
}

fn upstream_count(upstream: &Upstream, prefix: &str) -> usize {
    upstream
        .recorded()
        .iter()
        .filter(|r| r.target.starts_with(prefix))
        .count()
}

async fn start(upstream: &Upstream) -> Proxy {
    let proxy = Proxy::start(upstream.addr, ProxyConfig::default()).await;
    // Warm up both protocols, so that the baseline memory includes them.
    assert_served(&proxy, "before the abuse").await;
    proxy
}

fn describe_end(seen: &Seen, started: Instant) -> String {
    let goaway = match &seen.goaway {
        Some(g) => format!(
            "GOAWAY(code {:#x}, last stream {}, debug {:?}) after {:?}",
            g.code,
            g.last_stream,
            g.debug,
            g.at - started
        ),
        None => "no GOAWAY".into(),
    };
    let closed = match &seen.closed {
        Some((at, how)) => format!("closed ({how}) after {:?}", *at - started),
        None => "not closed".into(),
    };
    format!("{goaway}; {closed}")
}

// ---------------------------------------------------------------- 1. rapid reset

/// CVE-2023-44487: HEADERS immediately followed by RST_STREAM, 20,000
/// streams, written as fast as the socket takes them. The proxy must cut the
/// connection off (GOAWAY ENHANCE_YOUR_CALM and a close), forward only a
/// handful of those requests, stay within bounded memory and serve others.
#[tokio::test]
async fn rapid_reset_is_cut_off_and_others_are_served() {
    const STREAMS: u32 = 20_000;
    const PER_WRITE: u32 = 100;
    let upstream = Upstream::start().await;
    let proxy = start(&upstream).await;
    let rss_before = proxy.rss_kib();
    let peak = RssPeak::start(proxy.pid());

    let mut h2 = RawH2::open_with(&proxy, &[], Some(SMALL_SEND_BUFFER)).await;
    let block = request_block("/rapid-reset");
    let started = Instant::now();
    let deadline = started + Duration::from_secs(10);
    let mut sent = 0u32;
    let mut batch = Vec::new();
    let mut write_error = None;
    while sent < STREAMS && Instant::now() < deadline && !h2.seen().ended() {
        batch.clear();
        let end = (sent + PER_WRITE).min(STREAMS);
        for i in sent..end {
            let id = 2 * i + 1;
            put_frame(&mut batch, HEADERS, END_STREAM | END_HEADERS, id, &block);
            put_frame(&mut batch, RST_STREAM, 0, id, &CANCEL.to_be_bytes());
        }
        if let Err(error) = h2.send(&batch, Duration::from_secs(5)).await {
            write_error = Some(error.to_string());
            break;
        }
        sent = end;
    }
    let flood_time = started.elapsed();

    // Others are served on their own connections.
    assert_served(&proxy, "after the rapid reset").await;

    let (ended, seen) = h2.wait(Duration::from_secs(10), |s| s.ended()).await;
    let (_, seen_closed) = h2
        .wait(Duration::from_secs(10), |s| s.closed.is_some())
        .await;
    let peak_kib = peak.stop();
    let forwarded = upstream_count(&upstream, "/rapid-reset");
    eprintln!(
        "rapid reset: {sent} of {STREAMS} HEADERS+RST_STREAM pairs written in {flood_time:?} \
         (write error: {write_error:?}); {}; {} responses, {} RST_STREAM from the proxy {:?}; \
         upstream got {forwarded} of them; RSS {rss_before} KiB before, peak {peak_kib} KiB \
         (+{} KiB)",
        describe_end(&seen_closed, started),
        seen.responses,
        seen.resets,
        seen.reset_codes,
        peak_kib.saturating_sub(rss_before),
    );
    assert!(
        ended,
        "the proxy neither sent GOAWAY nor closed the connection after {sent} rapid resets"
    );
    assert!(
        seen_closed.closed.is_some(),
        "GOAWAY sent but the connection was not closed: {}",
        describe_end(&seen_closed, started)
    );
    let goaway = seen.goaway.as_ref().unwrap_or_else(|| {
        panic!(
            "closed without GOAWAY: {}",
            describe_end(&seen_closed, started)
        )
    });
    assert_eq!(goaway.code, ENHANCE_YOUR_CALM, "{goaway:?}");
    // The last stream the proxy took: how far into the flood it read.
    assert!(
        goaway.last_stream <= 2 * 1_000,
        "the proxy took {} streams before it gave up",
        goaway.last_stream.div_ceil(2)
    );
    // A few streams may have reached the upstream before their reset was
    // read; the flood as a whole must not.
    assert!(
        forwarded <= 200,
        "the upstream got {forwarded} of the {sent} reset streams"
    );
    assert!(
        peak_kib.saturating_sub(rss_before) < RSS_BOUND_KIB,
        "resident memory grew from {rss_before} KiB to {peak_kib} KiB"
    );
}

/// Rapid reset paced so that the proxy has taken every stream before it is
/// reset: 100 HEADERS and a PING, the PING's ACK (the proxy has read the
/// HEADERS, and hyper accepts streams as it reads them), then the 100
/// RST_STREAM; up to 200 rounds, 20,000 streams. h2's rapid-reset limit
/// (`max_pending_accept_reset_streams`, 20) only counts streams reset
/// before they were accepted, so it never triggers, and every stream starts
/// an upstream exchange that the reset then tears down. Expected: the
/// connection is ended long before 20,000 such streams, and the upstream
/// sees at most 1,000 requests or connections from them.
///
/// A reset can land before the upstream's head came back or after it, while
/// the body streams; both must count, and which one happens used to depend
/// on the machine's speed: on a fast one most streams already had their
/// answer's head when their reset arrived, and a proxy counting only
/// requests dropped before their answer let all 200 rounds through (the
/// upstream got 13,484 requests over 14,295 new connections, each reset
/// dropping its upstream connection mid-body). Each case has its own test,
/// with an upstream that makes it certain.
#[tokio::test]
async fn rapid_reset_of_accepted_streams_is_cut_off() {
    // The upstream answers after 10 s: every reset lands before the head.
    paced_reset("/delay/10000", Pace::AfterPingAck).await;
}

#[tokio::test]
async fn rapid_reset_of_streams_whose_answer_has_begun_is_cut_off() {
    // 1 MB each, past the client's 64 KiB windows, which it never opens:
    // every reset lands after the head, with the body still streaming.
    paced_reset("/download/1000000", Pace::AfterResponseHeads).await;
}

/// When a round's streams are reset.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Pace {
    /// Once the proxy has read their HEADERS.
    AfterPingAck,
    /// Once their response HEADERS have come back.
    AfterResponseHeads,
}

async fn paced_reset(path: &str, pace: Pace) {
    const ROUNDS: u32 = 200;
    const PER_ROUND: u32 = 100;
    let upstream = Upstream::start().await;
    let proxy = start(&upstream).await;
    let rss_before = proxy.rss_kib();
    let peak = RssPeak::start(proxy.pid());
    let connections_before = upstream.connections();

    let mut h2 = RawH2::open(&proxy, &[]).await;
    let block = request_block(path);
    let started = Instant::now();
    let mut streams = 0u32;
    let mut rounds = 0u32;
    let mut batch = Vec::new();
    while rounds < ROUNDS && !h2.seen().ended() && started.elapsed() < Duration::from_secs(30) {
        batch.clear();
        let first = streams;
        for _ in 0..PER_ROUND {
            put_frame(
                &mut batch,
                HEADERS,
                END_STREAM | END_HEADERS,
                2 * streams + 1,
                &block,
            );
            streams += 1;
        }
        put_frame(&mut batch, PING, 0, 0, &u64::from(rounds).to_be_bytes());
        if h2.send(&batch, Duration::from_secs(5)).await.is_err() {
            break;
        }
        let acked = u64::from(rounds) + 1;
        let answered = u64::from(streams);
        let (ok, _) = h2
            .wait(Duration::from_secs(5), |s| {
                s.ended()
                    || match pace {
                        Pace::AfterPingAck => s.ping_acks >= acked,
                        Pace::AfterResponseHeads => s.responses >= answered,
                    }
            })
            .await;
        if !ok {
            break;
        }
        batch.clear();
        for i in first..streams {
            put_frame(&mut batch, RST_STREAM, 0, 2 * i + 1, &CANCEL.to_be_bytes());
        }
        if h2.send(&batch, Duration::from_secs(5)).await.is_err() {
            break;
        }
        rounds += 1;
    }
    let elapsed = started.elapsed();
    assert_served(&proxy, "after the paced rapid reset").await;
    let (_, seen) = h2.wait(Duration::from_secs(5), |s| s.ended()).await;
    let peak_kib = peak.stop();
    let requests = upstream_count(&upstream, path);
    let connections = upstream.connections() - connections_before;
    eprintln!(
        "paced rapid reset ({pace:?}, {path}): {rounds} rounds, {streams} streams in \
         {elapsed:?}; {}; {} responses; the upstream got {requests} requests over {connections} \
         new connections; RSS {rss_before} KiB before, peak {peak_kib} KiB",
        describe_end(&seen, started),
        seen.responses
    );
    if pace == Pace::AfterResponseHeads {
        assert!(
            rounds >= 1,
            "not one round of 100 streams got its response heads: {}",
            describe_end(&seen, started)
        );
    }
    assert!(
        peak_kib.saturating_sub(rss_before) < RSS_BOUND_KIB,
        "resident memory grew from {rss_before} KiB to {peak_kib} KiB"
    );
    assert!(
        requests <= 1_000 && connections <= 1_000,
        "{streams} reset streams made the upstream get {requests} requests over {connections} \
         connections"
    );
    assert!(
        seen.ended() && rounds < ROUNDS,
        "the connection is still served after {streams} streams reset once accepted: {}",
        describe_end(&seen, started)
    );
}

// ---------------------------------------------------------------- 2. CONTINUATION flood

/// Sends HEADERS without END_HEADERS, then CONTINUATION frames without
/// END_HEADERS (each `frame_len` bytes of header block) until `total` bytes
/// are written, the proxy ends the connection or 10 s pass. Returns the
/// frames and bytes written and what the reader saw.
async fn continuation_flood(
    proxy: &Proxy,
    frame_len: usize,
    total: u64,
) -> (u64, u64, Seen, Instant) {
    let mut h2 = RawH2::open_with(proxy, &[], Some(SMALL_SEND_BUFFER)).await;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(10);
    // The block starts with the pseudo-headers and one more field whose
    // value is announced as 16 MiB long: the CONTINUATION frames carry that
    // value, so every byte of the flood is valid HPACK and only a limit on
    // the block itself can stop it.
    let mut first = request_block("/continuation");
    first.push(0x00);
    hpack_int(&mut first, 7, 0x00, "x-flood".len());
    first.extend_from_slice(b"x-flood");
    hpack_int(&mut first, 7, 0x00, 16 << 20);
    h2.send(
        &frame(HEADERS, END_STREAM, 1, &first),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let filler = vec![b'a'; frame_len];
    let mut batch = Vec::new();
    assert!(total < 16 << 20);
    let per_write = (64 * 1024 / (frame_len + 9)).max(1);
    let mut frames = 0u64;
    let mut written = 0u64;
    while written < total && Instant::now() < deadline && !h2.seen().ended() {
        batch.clear();
        for _ in 0..per_write {
            put_frame(&mut batch, CONTINUATION, 0, 1, &filler);
        }
        if h2.send(&batch, Duration::from_secs(5)).await.is_err() {
            break;
        }
        frames += per_write as u64;
        written += batch.len() as u64;
    }
    let (_, seen) = h2
        .wait(Duration::from_secs(10), |s| s.closed.is_some())
        .await;
    (frames, written, seen, started)
}

/// A header block that never ends: HEADERS, then CONTINUATION after
/// CONTINUATION, up to 10 MB, in full-size (16 KiB) frames and in tiny
/// (1-byte) ones. The proxy must end the connection long before 10 MB, and
/// nothing reaches the upstream.
#[tokio::test]
async fn continuation_flood_is_cut_off_early() {
    const TOTAL: u64 = 10 * 1024 * 1024;
    let upstream = Upstream::start().await;
    let proxy = start(&upstream).await;
    let rss_before = proxy.rss_kib();
    let peak = RssPeak::start(proxy.pid());

    for frame_len in [MAX_FRAME, 1] {
        let (frames, written, seen, started) = continuation_flood(&proxy, frame_len, TOTAL).await;
        eprintln!(
            "CONTINUATION flood ({frame_len}-byte frames): {frames} frames, {written} bytes \
             written before the writer stopped; {}",
            describe_end(&seen, started)
        );
        assert!(
            seen.closed.is_some(),
            "{frame_len}-byte CONTINUATION frames: the connection was not closed: {}",
            describe_end(&seen, started)
        );
        let goaway = seen.goaway.as_ref().unwrap_or_else(|| {
            panic!(
                "{frame_len}-byte CONTINUATION frames: closed without GOAWAY: {}",
                describe_end(&seen, started)
            )
        });
        assert_eq!(goaway.code, ENHANCE_YOUR_CALM, "{goaway:?}");
        // With a small send buffer, the bytes written bound what the proxy
        // read (plus its own receive buffer).
        assert!(
            written < 2 * 1024 * 1024,
            "{written} bytes of CONTINUATION were taken before the proxy reacted"
        );
        assert_served(&proxy, "after a CONTINUATION flood").await;
    }
    let peak_kib = peak.stop();
    eprintln!(
        "CONTINUATION flood: RSS {rss_before} KiB before, peak {peak_kib} KiB (+{} KiB)",
        peak_kib.saturating_sub(rss_before)
    );
    assert_eq!(upstream_count(&upstream, "/continuation"), 0);
    assert!(
        peak_kib.saturating_sub(rss_before) < RSS_BOUND_KIB,
        "resident memory grew from {rss_before} KiB to {peak_kib} KiB"
    );
}

// ---------------------------------------------------------------- 3. streams never read

/// A client opens as many streams as the proxy's SETTINGS allow, each a
/// download of 64 MiB, and never sends WINDOW_UPDATE: the proxy can send it
/// no more than the initial 65,535-byte connection window. The upstream
/// gets one request per stream and no more (streams beyond the limit are
/// refused), memory stays bounded while the upstream has far more to send,
/// other clients are served, and when the client leaves, the upstream
/// connections it held are closed.
#[tokio::test]
async fn streams_that_are_never_read_stay_bounded() {
    const BODY: u64 = 64 * 1024 * 1024;
    const EXTRA: u32 = 20;
    let upstream = Upstream::start().await;
    let proxy = start(&upstream).await;
    let rss_before = proxy.rss_kib();
    let sockets_before = open_sockets(proxy.pid());
    let peak = RssPeak::start(proxy.pid());

    let mut h2 = RawH2::open(&proxy, &[]).await;
    let max = h2
        .seen()
        .setting(SETTINGS_MAX_CONCURRENT_STREAMS)
        .expect("the proxy announces SETTINGS_MAX_CONCURRENT_STREAMS");
    assert!((1..=1000).contains(&max), "max_concurrent_streams {max}");
    let window = h2.seen().setting(SETTINGS_INITIAL_WINDOW_SIZE);
    let path = format!("/download/{BODY}");
    let block = request_block(&path);
    let mut batch = Vec::new();
    for i in 0..max {
        put_frame(
            &mut batch,
            HEADERS,
            END_STREAM | END_HEADERS,
            2 * i + 1,
            &block,
        );
    }
    let started = Instant::now();
    h2.send(&batch, Duration::from_secs(5)).await.unwrap();

    // Every stream is forwarded and answered.
    let (answered, seen) = h2
        .wait(Duration::from_secs(15), |s| s.responses >= max as u64)
        .await;
    assert!(
        answered,
        "{} of {max} streams answered within 15 s: {seen:?}",
        seen.responses
    );
    assert_eq!(seen.ok_responses, max as u64);
    assert!(!seen.ended(), "{}", describe_end(&seen, started));

    // Streams beyond the limit are refused, not forwarded.
    batch.clear();
    for i in max..max + EXTRA {
        put_frame(
            &mut batch,
            HEADERS,
            END_STREAM | END_HEADERS,
            2 * i + 1,
            &block,
        );
    }
    h2.send(&batch, Duration::from_secs(5)).await.unwrap();
    let (refused, seen) = h2
        .wait(Duration::from_secs(10), |s| {
            s.resets >= EXTRA as u64 || s.ended()
        })
        .await;
    assert!(refused, "streams over the limit were not refused: {seen:?}");

    // Others are served while the streams are stuck, several times over
    // (which also gives the proxy time to show unbounded buffering, if it
    // did that: the upstream has 64 MiB per stream to send it).
    for round in 0..5 {
        assert_served(
            &proxy,
            &format!("while {max} streams are stuck (round {round})"),
        )
        .await;
    }
    let seen = h2.seen();
    let forwarded = upstream_count(&upstream, "/download/");
    let rss_stuck = proxy.rss_kib();
    let sockets_stuck = open_sockets(proxy.pid());
    eprintln!(
        "stuck streams: max_concurrent_streams {max}, initial window {window:?}; {} responses, \
         {} DATA bytes sent to the client, RST_STREAM {:?}; upstream got {forwarded} downloads; \
         open sockets {sockets_before} -> {sockets_stuck}; RSS {rss_before} KiB -> {rss_stuck} KiB while stuck",
        seen.responses, seen.data_bytes, seen.reset_codes
    );
    assert!(
        seen.data_bytes <= 65_535,
        "{} DATA bytes sent beyond the connection window",
        seen.data_bytes
    );
    assert_eq!(
        forwarded, max as usize,
        "the upstream got {forwarded} downloads for {max} streams allowed"
    );
    assert!(
        seen.reset_codes.get(&REFUSED_STREAM).copied().unwrap_or(0) >= EXTRA as u64
            || seen.goaway.is_some(),
        "streams over the limit: {:?}",
        seen.reset_codes
    );

    // Opening the window lets data flow again: the streams were held by
    // flow control, not lost.
    let mut opened = window_update(0, 1 << 20);
    opened.extend(window_update(1, 1 << 20));
    h2.send(&opened, Duration::from_secs(5)).await.unwrap();
    let before = seen.data_bytes;
    let (flowed, seen) = h2
        .wait(Duration::from_secs(10), |s| {
            s.data_bytes >= before + 512 * 1024
        })
        .await;
    assert!(
        flowed,
        "{} DATA bytes after opening the window by 1 MiB (before: {before})",
        seen.data_bytes
    );

    // The client leaves: the upstream connections it held are let go.
    drop(h2);
    let released = eventually(Duration::from_secs(10), || {
        open_sockets(proxy.pid()) <= sockets_before + 8
    })
    .await;
    let sockets_after = open_sockets(proxy.pid());
    let peak_kib = peak.stop();
    eprintln!(
        "stuck streams: after the client left, open sockets {sockets_after}; peak RSS {peak_kib} KiB \
         (+{} KiB)",
        peak_kib.saturating_sub(rss_before)
    );
    assert!(
        released,
        "the proxy still holds {sockets_after} sockets (before: {sockets_before}) 10 s after the client left"
    );
    assert!(
        peak_kib.saturating_sub(rss_before) < RSS_BOUND_KIB,
        "resident memory grew from {rss_before} KiB to {peak_kib} KiB"
    );
    assert_served(&proxy, "after the stuck client left").await;
}

// ---------------------------------------------------------------- 4. SETTINGS and PING floods

/// Which count of [`Seen`] answers a flood's frames.
type Answers = fn(&Seen) -> u64;

/// Writes `count` copies of `one` in batches, as fast as the proxy takes
/// them, while the reader counts the answers; stops early when the proxy
/// ends the connection or after 15 s. Returns how many were written and
/// what was read once the answers stop coming (or all arrived).
async fn control_flood(
    proxy: &Proxy,
    one: &[u8],
    count: u64,
    answers: Answers,
) -> (u64, Seen, Instant, Duration) {
    const PER_WRITE: u64 = 1_000;
    let mut h2 = RawH2::open(proxy, &[]).await;
    let baseline = answers(&h2.seen());
    let batch: Vec<u8> = one.repeat(PER_WRITE as usize);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(15);
    let mut sent = 0u64;
    while sent < count && Instant::now() < deadline && !h2.seen().ended() {
        if h2.send(&batch, Duration::from_secs(5)).await.is_err() {
            break;
        }
        sent += PER_WRITE;
    }
    let flood_time = started.elapsed();
    let (_, seen) = h2
        .wait(Duration::from_secs(15), |s| {
            answers(s) >= baseline + sent || s.ended()
        })
        .await;
    (sent, seen, started, flood_time)
}

/// 100,000 SETTINGS frames, then 100,000 PING frames, then 100,000
/// PRIORITY frames, each on a connection whose client reads what comes
/// back: the proxy closes each connection once it has taken its budget of
/// control frames (1,000 in 10 s), memory stays bounded and others are
/// served.
#[tokio::test]
async fn settings_ping_and_priority_floods_are_cut_off_within_bounded_memory() {
    const COUNT: u64 = 100_000;
    let upstream = Upstream::start().await;
    let proxy = start(&upstream).await;
    let rss_before = proxy.rss_kib();
    let peak = RssPeak::start(proxy.pid());

    let settings = frame(
        SETTINGS,
        0,
        0,
        &settings_payload(&[(SETTINGS_MAX_FRAME_SIZE, MAX_FRAME as u32)]),
    );
    let ping = frame(PING, 0, 0, b"abusive!");
    let priority = frame(PRIORITY, 0, 1, &[0, 0, 0, 0, 16]);
    let floods: [(&str, &[u8], Answers); 3] = [
        ("SETTINGS", &settings, |s| s.settings_acks),
        ("PING", &ping, |s| s.ping_acks),
        ("PRIORITY", &priority, |_| 0),
    ];
    for (name, one, answers) in floods {
        let (sent, seen, started, flood_time) = control_flood(&proxy, one, COUNT, answers).await;
        eprintln!(
            "{name} flood: {sent} frames written in {flood_time:?}; {} ACKs back after {:?}; {}",
            answers(&seen),
            started.elapsed(),
            describe_end(&seen, started)
        );
        assert!(
            seen.closed.is_some(),
            "{name} flood: {sent} frames sent, the connection is still open: {}",
            describe_end(&seen, started)
        );
        // The budget, and what h2 had read before the guard's verdict: far
        // from the whole flood.
        assert!(
            answers(&seen) <= 2 * u64::from(portcullis::h2_flood::MAX_CONTROL_FRAMES) + 1_000,
            "{name} flood: {} frames answered before the cut-off",
            answers(&seen)
        );
        assert_served(&proxy, &format!("after the {name} flood")).await;
    }
    let peak_kib = peak.stop();
    eprintln!(
        "SETTINGS/PING/PRIORITY floods (reading client): RSS {rss_before} KiB before, peak \
         {peak_kib} KiB (+{} KiB)",
        peak_kib.saturating_sub(rss_before)
    );
    assert!(
        peak_kib.saturating_sub(rss_before) < RSS_BOUND_KIB,
        "resident memory grew from {rss_before} KiB to {peak_kib} KiB"
    );
}

/// A client that stays under the budget (900 PINGs and 90 SETTINGS at
/// once) gets every ACK and keeps its connection: its next request is
/// answered on it.
#[tokio::test]
async fn control_frames_under_the_budget_keep_the_connection() {
    let upstream = Upstream::start().await;
    let proxy = start(&upstream).await;
    let mut h2 = RawH2::open(&proxy, &[]).await;
    let before = h2.seen();
    let mut batch = Vec::new();
    for i in 0..900u64 {
        put_frame(&mut batch, PING, 0, 0, &i.to_be_bytes());
    }
    for _ in 0..90 {
        put_frame(&mut batch, SETTINGS, 0, 0, &[]);
    }
    h2.send(&batch, Duration::from_secs(5)).await.unwrap();
    let (ok, seen) = h2
        .wait(Duration::from_secs(10), |s| {
            (s.ping_acks >= before.ping_acks + 900 && s.settings_acks >= before.settings_acks + 90)
                || s.ended()
        })
        .await;
    assert!(ok && !seen.ended(), "ACKs not all back: {seen:?}");
    let block = request_block("/under-budget");
    h2.send(
        &frame(HEADERS, END_STREAM | END_HEADERS, 1, &block),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let (ok, seen) = h2
        .wait(Duration::from_secs(10), |s| {
            s.ok_responses >= 1 || s.ended()
        })
        .await;
    assert!(
        ok && seen.ok_responses == 1,
        "no 200 on the same connection: {seen:?}"
    );
}

/// The same floods from a client that never reads its ACKs: the proxy
/// resets the connection once the budget is spent (no lingering drain of
/// the rest), queues nothing, and keeps serving others.
#[tokio::test]
async fn ping_and_settings_floods_from_a_client_that_never_reads_stay_bounded() {
    const COUNT: u64 = 1_000_000;
    const PER_WRITE: u64 = 1_000;
    /// A write that does not complete in this time: the proxy stopped reading.
    const STALLED: Duration = Duration::from_secs(1);
    let upstream = Upstream::start().await;
    let proxy = start(&upstream).await;
    let rss_before = proxy.rss_kib();
    let peak = RssPeak::start(proxy.pid());

    let ping = frame(PING, 0, 0, b"abusive!");
    let settings = frame(SETTINGS, 0, 0, &[]);
    for (name, one) in [("PING", &ping), ("SETTINGS", &settings)] {
        let tls = connect_h2(&proxy, Some(SMALL_SEND_BUFFER), Some(SMALL_SEND_BUFFER)).await;
        // The reading half is kept and never read.
        let (_read, mut write) = tokio::io::split(tls);
        let mut hello = PREFACE.to_vec();
        put_frame(&mut hello, SETTINGS, 0, 0, &[]);
        write.write_all(&hello).await.unwrap();
        let batch = one.repeat(PER_WRITE as usize);
        let started = Instant::now();
        let deadline = started + Duration::from_secs(12);
        let mut sent = 0u64;
        let mut stop = String::from("all written");
        let mut held_back = false;
        while sent < COUNT {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left.min(STALLED), write.write_all(&batch)).await {
                Ok(Ok(())) => sent += PER_WRITE,
                Ok(Err(error)) => {
                    stop = format!("write error: {error}");
                    held_back = true;
                    break;
                }
                Err(_) => {
                    stop = format!("writes stalled for {STALLED:?}");
                    held_back = true;
                    break;
                }
            }
            if Instant::now() >= deadline {
                stop = "12 s deadline".into();
                break;
            }
        }
        eprintln!(
            "{name} flood, client never reads: {sent} frames ({} bytes) written in {:?}: {stop}; \
             proxy RSS {} KiB",
            sent * one.len() as u64,
            started.elapsed(),
            proxy.rss_kib()
        );
        assert_served(
            &proxy,
            &format!("during the {name} flood of a client that never reads"),
        )
        .await;
        // The proxy ended the connection with a reset once the budget was
        // spent, rather than queueing answers nobody reads or draining.
        assert!(
            held_back && stop.starts_with("write error"),
            "{name}: {sent} frames taken from a client that reads none of the ACKs ({stop})"
        );
        drop(write);
    }
    let peak_kib = peak.stop();
    eprintln!(
        "SETTINGS/PING floods (client never reads): RSS {rss_before} KiB before, peak \
         {peak_kib} KiB (+{} KiB)",
        peak_kib.saturating_sub(rss_before)
    );
    assert!(
        peak_kib.saturating_sub(rss_before) < RSS_BOUND_KIB,
        "resident memory grew from {rss_before} KiB to {peak_kib} KiB"
    );
}

// ---------------------------------------------------------------- 3b. send_timeout

/// Opens `streams` downloads of 64 MiB on a raw connection; the client
/// announces `initial_window` and, when `open_connection_window`, opens the
/// connection window as wide as it goes. Waits until the upstream got them
/// all.
async fn stuck_downloads(
    upstream: &Upstream,
    streams: u32,
    initial_window: u32,
    open_connection_window: bool,
    write: &mut WriteHalf<TlsStream<TcpStream>>,
) {
    let mut out = PREFACE.to_vec();
    put_frame(
        &mut out,
        SETTINGS,
        0,
        0,
        &settings_payload(&[(SETTINGS_INITIAL_WINDOW_SIZE, initial_window)]),
    );
    if open_connection_window {
        out.extend(window_update(0, 0x7fff_ffff - 65_535));
    }
    let block = request_block("/download/67108864");
    for i in 0..streams {
        put_frame(
            &mut out,
            HEADERS,
            END_STREAM | END_HEADERS,
            2 * i + 1,
            &block,
        );
    }
    write.write_all(&out).await.unwrap();
    write.flush().await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || {
            upstream_count(upstream, "/download/") == streams as usize
        })
        .await,
        "{} of {streams} downloads reached the upstream",
        upstream_count(upstream, "/download/")
    );
}

/// A client that opens its flow-control windows wide and then stops
/// reading the socket: the proxy's writes stall, and `send_timeout` closes
/// the connection and releases the upstream connections.
#[tokio::test]
async fn a_client_that_stops_reading_the_socket_is_cut_off_after_send_timeout() {
    const STREAMS: u32 = 16;
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(
        upstream.addr,
        ProxyConfig {
            server: "send_timeout = \"2s\"".into(),
            ..Default::default()
        },
    )
    .await;
    let admin = proxy.admin.expect("admin listener");
    assert_served(&proxy, "before").await;
    let sockets_before = open_sockets(proxy.pid());
    let tls = connect_h2(&proxy, None, Some(SMALL_SEND_BUFFER)).await;
    // The reading half is kept and never read.
    let (_read, mut write) = tokio::io::split(tls);
    stuck_downloads(&upstream, STREAMS, 0x7fff_ffff, true, &mut write).await;
    let stuck = Instant::now();
    // The stall is seen within send_timeout plus one period of the
    // connection's timer (the shortest of its timeouts, 2 s here), after the
    // proxy filled the socket buffers.
    let closed = eventually(Duration::from_secs(15), || {
        open_sockets(proxy.pid()) <= sockets_before + 2
    })
    .await;
    eprintln!(
        "window open, socket unread: {} sockets (before: {sockets_before}) {:?} after the downloads \
         started",
        open_sockets(proxy.pid()),
        stuck.elapsed()
    );
    assert!(
        closed,
        "the connection and its upstream connections are still held {:?} after they stalled \
         (send_timeout = 2s): {} sockets, {sockets_before} before",
        stuck.elapsed(),
        open_sockets(proxy.pid())
    );
    let active = common::plain_get(admin, "/metrics").await.1;
    assert!(
        active
            .lines()
            .any(|l| l.trim() == "portcullis_active_connections 0"),
        "still active: {}",
        active
            .lines()
            .find(|l| l.starts_with("portcullis_active_connections"))
            .unwrap_or("(no gauge)")
    );
    assert_served(&proxy, "after the stalled client was cut off").await;
}

/// The same downloads from a client that reads the socket but never sends
/// WINDOW_UPDATE (what any HTTP/2 client library does when its application
/// stops reading a response body): nothing the proxy may send is left, so
/// no write ever stalls and `send_timeout` never starts. The connection, its
/// slot and one upstream connection per stream (up to 256 per connection)
/// are held for as long as the client stays; `idle_timeout` does not apply
/// with requests in flight (checked: with `idle_timeout` and
/// `header_read_timeout` of 2 s, 16 such streams and their 16 upstream
/// connections were all still there 15 s later). Expected: cut off like a
/// stalled write, after `send_timeout`.
#[tokio::test]
async fn a_client_that_never_opens_its_window_is_cut_off_after_send_timeout() {
    const STREAMS: u32 = 16;
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(
        upstream.addr,
        ProxyConfig {
            server: "send_timeout = \"2s\"".into(),
            ..Default::default()
        },
    )
    .await;
    assert_served(&proxy, "before").await;
    let sockets_before = open_sockets(proxy.pid());
    let tls = connect_h2(&proxy, None, None).await;
    let (read, mut write) = tokio::io::split(tls);
    let (tx, mut seen) = watch::channel(Seen::default());
    let reader = tokio::spawn(read_frames(read, tx));
    stuck_downloads(&upstream, STREAMS, 65_535, false, &mut write).await;
    let stuck = Instant::now();
    let _ = tokio::time::timeout(Duration::from_secs(12), seen.wait_for(|s| s.ended())).await;
    let last = seen.borrow().clone();
    // The streams' tasks let go of their upstream connections as they learn
    // the connection is gone: wait for that, with a deadline.
    let released = common::eventually(Duration::from_secs(10), || {
        open_sockets(proxy.pid()) <= sockets_before + 2
    })
    .await;
    reader.abort();
    assert!(
        last.ended() && released,
        "a client that never opens its window is still served {:?} later (send_timeout = 2s): \
         {}; {} DATA bytes; {} sockets, {sockets_before} before",
        stuck.elapsed(),
        describe_end(&last, stuck),
        last.data_bytes,
        open_sockets(proxy.pid())
    );
}

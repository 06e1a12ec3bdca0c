//! An HTTP/1 request-head sniffer: it reads the client's bytes on their way
//! into hyper and flags what hyper hides from the request handler —
//! `#fragment`s in request targets, and `Content-Length` sent together with
//! `Transfer-Encoding` (hyper drops the `Content-Length` and serves the
//! request chunked; the contract refuses it, since such requests are how
//! proxies and upstreams are made to disagree on where a request ends).
//!
//! The `http` crate, and so hyper, silently drops a fragment while parsing a
//! request target (`/admin#x` arrives as `/admin`), yet the contract answers
//! such a request with a 400, because peers that do see the fragment have
//! been bypassed through it (Envoy CVE-2021-32779, HAProxy CVE-2023-45539).
//! [`RequestHeadSniffer`] therefore sits between the decrypted TLS stream and
//! hyper, follows HTTP/1.1 message framing just far enough to find every
//! request head, and records in an [`AnomalyLog`] which requests on the
//! connection (by 0-based index, in the order hyper serves them) had an
//! [`Anomaly`] in their head.
//!
//! The tracker mirrors the framing rules of hyper 1.x (`httparse` for heads,
//! hyper's own `Content-Length`, `Transfer-Encoding` and chunked decoder),
//! and wherever the two could disagree it stops tracking for the rest of the
//! connection instead of guessing: a request head with both
//! `Content-Length` and `Transfer-Encoding`, differing `Content-Length`s, a
//! malformed chunk, an `Upgrade` header, a `CONNECT`, the HTTP/2 preface.
//! A desync can then only ever cost detections, never flag a request that
//! had no fragment, and the bytes themselves always pass through untouched.
//! Whatever hyper rejects outright closes the connection, so only inputs
//! hyper accepts need to be read exactly as it reads them.
//!
//! Use: wrap the TLS stream with `RequestHeadSniffer::new(tls, log.clone())`
//! before handing it to hyper, count the requests the service receives on
//! that connection from 0, and answer 400 when `log.anomaly(index)` is
//! `Some`. An HTTP/2 connection is recognised by its preface and left alone,
//! so the log answers `None` for every request on it; its `:path` is parsed
//! by the same `http` crate, which drops a fragment there too, and HPACK
//! keeps it out of reach of a byte scanner.
//!
//! # The invariant that ties it to hyper
//!
//! The log is keyed by position only: the n-th call of the service on a
//! connection (the index [`crate::connection::ConnInfo::next_request_index`]
//! hands out) must be the n-th request head the sniffer saw. Nothing checks
//! this at run time; it holds because
//!
//! * the sniffer is the reader hyper reads from, so it sees every byte
//!   hyper sees, in the same order, before hyper parses it: a head's anomaly
//!   is recorded before hyper can call the service for that head;
//! * it ends a message exactly where hyper does (same head and body framing
//!   rules), and stops following wherever the two could disagree;
//! * hyper's HTTP/1 server calls the service once per head it accepts, in
//!   order, and reads the next head only once the previous call's future
//!   has finished (its dispatcher keeps one future in flight), so the index,
//!   taken while that future runs, follows the order of the heads;
//! * a head hyper refuses ends the connection, so no later call is shifted
//!   by a head that was seen but never served.
//!
//! What breaks it: the sniffer ending a message where hyper does not (a
//! framing rule of hyper's that the tracker does not mirror), the index
//! being counted anywhere but once per service call, or more than one
//! HTTP/1 request in flight on a connection. Each would move a flag onto
//! another request. The places where the sniffer stops following on purpose
//! (after an `Upgrade` header — whether or not the upgrade then happens —
//! a `CONNECT`, ambiguous framing, the HTTP/2 preface) are safe: it records
//! nothing more on that connection and marks where following stopped
//! ([`AnomalyLog::followed`]); the pipeline closes the connection after the
//! last followed request and refuses any later one, so no request is served
//! unchecked.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

use crate::path::hex_value;

/// What was wrong with a request head that hyper does not tell the handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Anomaly {
    /// A `#` in the request-target.
    Fragment,
    /// Both `Content-Length` and `Transfer-Encoding`.
    LengthAndTransferEncoding,
}

/// Which requests on one connection had an [`Anomaly`] in their head.
///
/// Shared between the wrapper (writer) and the request handler (reader).
/// Cheap to clone.
#[derive(Clone, Default, Debug)]
pub struct AnomalyLog {
    shared: Arc<LogState>,
}

#[derive(Debug)]
struct LogState {
    /// Indices in increasing order. Anomalies are rare and each one earns a
    /// 400, so this stays short; a Mutex is uncontended because the writer
    /// and the reader run in the same connection task.
    flagged: Mutex<Vec<(u64, Anomaly)>>,
    /// The first request index the sniffer did not follow (`u64::MAX` while
    /// it follows them all).
    unfollowed_from: AtomicU64,
}

impl Default for LogState {
    fn default() -> Self {
        Self {
            flagged: Mutex::new(Vec::new()),
            unfollowed_from: AtomicU64::new(u64::MAX),
        }
    }
}

impl AnomalyLog {
    pub fn new() -> Self {
        Self::default()
    }

    /// true if the request with this 0-based index on the connection had a '#' in its target
    ///
    /// hyper serves the requests of an HTTP/1 connection one after another,
    /// so the handler asks in increasing order; the answers for lower
    /// indices are forgotten here to keep a long keep-alive connection from
    /// accumulating them. Asking again for an index lower than one already
    /// asked about answers `false`.
    pub fn had_fragment(&self, request_index: u64) -> bool {
        self.anomaly(request_index) == Some(Anomaly::Fragment)
    }

    /// The first anomaly of the request with this 0-based index, if any;
    /// asked in increasing order, like [`Self::had_fragment`].
    pub fn anomaly(&self, request_index: u64) -> Option<Anomaly> {
        let mut flagged = self
            .shared
            .flagged
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let answered = flagged.partition_point(|&(index, _)| index < request_index);
        flagged.drain(..answered);
        flagged
            .first()
            .filter(|(index, _)| *index == request_index)
            .map(|&(_, anomaly)| anomaly)
    }

    /// True when the sniffer read this request's head, so [`Self::anomaly`]
    /// speaks for it. A request after the point where the sniffer stopped
    /// following the connection was never checked, and must not be served.
    pub fn followed(&self, request_index: u64) -> bool {
        request_index < self.shared.unfollowed_from.load(Ordering::Relaxed)
    }

    /// True when this request is the last one the sniffer follows (it had an
    /// `Upgrade` header, say): the connection must close after its answer
    /// unless it becomes a tunnel.
    pub fn last_followed(&self, request_index: u64) -> bool {
        request_index.checked_add(1) == Some(self.shared.unfollowed_from.load(Ordering::Relaxed))
    }

    fn stop_following(&self, from_index: u64) {
        self.shared
            .unfollowed_from
            .fetch_min(from_index, Ordering::Relaxed);
    }

    fn record(&self, request_index: u64, anomaly: Anomaly) {
        self.shared
            .flagged
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((request_index, anomaly));
    }
}

/// An I/O wrapper that passes every byte through unchanged and records, in
/// its [`AnomalyLog`], the requests whose head had an [`Anomaly`].
#[derive(Debug)]
pub struct RequestHeadSniffer<IO> {
    io: IO,
    log: AnomalyLog,
    tracker: Tracker,
}

impl<IO> RequestHeadSniffer<IO> {
    pub fn new(io: IO, log: AnomalyLog) -> Self {
        Self {
            io,
            log,
            tracker: Tracker::default(),
        }
    }

    pub fn get_ref(&self) -> &IO {
        &self.io
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for RequestHeadSniffer<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let already_filled = buf.filled().len();
        let result = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            this.tracker
                .feed(&buf.filled()[already_filled..], &this.log);
        }
        result
    }
}

crate::socket::pass_writes_through!(RequestHeadSniffer<IO>);

/// Methods after which the stream stops being a sequence of HTTP/1
/// messages: `PRI` starts the HTTP/2 preface, `CONNECT` a tunnel.
const NON_HTTP1_METHODS: [&[u8]; 2] = [b"PRI", b"CONNECT"];

/// The headers that decide where a request ends, lowercase.
const FRAMING_HEADERS: [&[u8]; 3] = [b"content-length", b"transfer-encoding", b"upgrade"];
/// What each of [`FRAMING_HEADERS`] is, in the same order.
const FRAMING_HEADER_KINDS: [FramingHeader; 3] = [
    FramingHeader::ContentLength,
    FramingHeader::TransferEncoding,
    FramingHeader::Upgrade,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FramingHeader {
    ContentLength,
    TransferEncoding,
    Upgrade,
}

const CHUNKED: &[u8] = b"chunked";

/// The framing state of one connection's incoming byte stream.
#[derive(Debug, Default)]
struct Tracker {
    state: State,
    /// Index of the request whose bytes are being read.
    request_index: u64,
    head: HeadFraming,
}

/// What the current request head has said so far.
#[derive(Debug, Default, Clone, Copy)]
struct HeadFraming {
    fragment_recorded: bool,
    content_length: Option<u64>,
    /// `Some(true)` when the last `Transfer-Encoding` ends in `chunked`.
    transfer_encoding_chunked: Option<bool>,
    /// An `Upgrade` header: after this request's head the bytes may stop
    /// being HTTP/1 (a tunnel), so the sniffer follows no further.
    upgrade: bool,
    /// The head of an upgrading request was read to its end (and judged).
    upgrade_head_read: bool,
}

/// Line ends follow httparse: a head line ends at LF, and a CR is ignored
/// because one not followed by LF makes hyper reject the request and close.
/// The chunked states follow hyper's decoder exactly, since there it is
/// strict and a lenient reading could end a body where hyper does not.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between messages; RFC 9112 section 2.2 lets empty lines precede a
    /// request line.
    #[default]
    BeforeRequest,
    Method(NameMatch),
    /// Between the first and the second space of the request line.
    Target,
    /// The rest of the request line.
    Version,
    HeaderLineStart,
    HeaderName(NameMatch),
    HeaderValue(ValueParser),
    Body {
        remaining: u64,
    },
    ChunkStart,
    ChunkSize {
        size: u64,
    },
    ChunkSizeWhitespace {
        size: u64,
    },
    ChunkExtension {
        size: u64,
    },
    ChunkSizeLf {
        size: u64,
    },
    ChunkData {
        remaining: u64,
    },
    ChunkDataCr,
    ChunkDataLf,
    /// After the last chunk's size line, or a trailer line.
    TrailersLineStart,
    Trailer,
    TrailerLf,
    EndLf,
    /// Tracking has stopped for good.
    Passthrough,
}

impl State {
    /// Reading a request body (its chunk framing included), past its head.
    fn is_in_body(self) -> bool {
        matches!(
            self,
            State::Body { .. }
                | State::ChunkStart
                | State::ChunkSize { .. }
                | State::ChunkSizeWhitespace { .. }
                | State::ChunkExtension { .. }
                | State::ChunkSizeLf { .. }
                | State::ChunkData { .. }
                | State::ChunkDataCr
                | State::ChunkDataLf
                | State::TrailersLineStart
                | State::Trailer
                | State::TrailerLf
                | State::EndLf
        )
    }
}

impl Tracker {
    fn feed(&mut self, mut bytes: &[u8], log: &AnomalyLog) {
        while let Some((&byte, rest)) = bytes.split_first() {
            match self.state {
                State::Passthrough => return,
                // Body bytes are skipped wholesale: they are most of the
                // traffic and carry no framing.
                State::Body { remaining } | State::ChunkData { remaining } => {
                    let available = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
                    let skipped = remaining.min(available);
                    // `skipped <= bytes.len()`, so it fits in usize.
                    let skipped_len = usize::try_from(skipped).unwrap_or(bytes.len());
                    bytes = &bytes[skipped_len..];
                    self.state = self.after_body_bytes(remaining - skipped);
                }
                _ => {
                    // Runs of bytes that cannot change the state (most of a
                    // head: the target, the version, names and values of
                    // headers that carry no framing) are skipped with one
                    // scan; a byte-at-a-time walk over them cost more than
                    // the rest of an HTTP/1.1 request's handling.
                    let skipped = self.skippable(bytes);
                    if skipped > 0 {
                        bytes = &bytes[skipped..];
                        continue;
                    }
                    let in_head = !self.state.is_in_body();
                    self.state = self.step(byte, log);
                    if self.state == State::Passthrough {
                        // A head cut short may be one hyper serves (a
                        // leniency the tracker does not share): it and all
                        // later ones go unchecked, so none may be served.
                        // An Upgrade head was read whole (see end_of_head),
                        // and so was the head of a body that went astray.
                        let from = if self.head.upgrade_head_read || !in_head {
                            self.request_index.saturating_add(1)
                        } else {
                            self.request_index
                        };
                        log.stop_following(from);
                    }
                    bytes = rest;
                }
            }
        }
    }

    /// How many leading bytes of `bytes` the current state would read without
    /// leaving it; `step` would give the same result for each.
    fn skippable(&mut self, bytes: &[u8]) -> usize {
        let until =
            |stop: fn(u8) -> bool| bytes.iter().position(|&b| stop(b)).unwrap_or(bytes.len());
        match &mut self.state {
            State::Target => until(|b| matches!(b, b' ' | b'#' | b'\r' | b'\n')),
            State::Version => until(|b| b == b'\n'),
            State::HeaderValue(ValueParser::Ignored) => {
                until(|b| b == b'\n' || (is_control(b) && b != b'\t' && b != b'\r'))
            }
            State::HeaderName(progress) if progress.matches_none(&FRAMING_HEADERS) => {
                let skipped = until(|b| b == b':' || is_control(b));
                // Only whether the name is empty matters from here on.
                progress.len = progress
                    .len
                    .saturating_add(u8::try_from(skipped).unwrap_or(u8::MAX));
                skipped
            }
            _ => 0,
        }
    }

    fn after_body_bytes(&mut self, remaining: u64) -> State {
        match self.state {
            State::Body { .. } if remaining == 0 => self.end_of_message(),
            State::Body { .. } => State::Body { remaining },
            State::ChunkData { .. } if remaining == 0 => State::ChunkDataCr,
            State::ChunkData { .. } => State::ChunkData { remaining },
            other => other,
        }
    }

    fn step(&mut self, byte: u8, log: &AnomalyLog) -> State {
        match self.state {
            State::BeforeRequest => match byte {
                b'\r' | b'\n' => State::BeforeRequest,
                _ => Self::method_byte(NameMatch::default(), byte),
            },
            State::Method(progress) => Self::method_byte(progress, byte),
            State::Target => match byte {
                b' ' => State::Version,
                b'#' => {
                    if !self.head.fragment_recorded {
                        self.head.fragment_recorded = true;
                        log.record(self.request_index, Anomaly::Fragment);
                    }
                    State::Target
                }
                b'\r' | b'\n' => State::Passthrough,
                _ => State::Target,
            },
            State::Version => match byte {
                b'\n' => State::HeaderLineStart,
                _ => State::Version,
            },
            State::HeaderLineStart => match byte {
                b'\r' => State::HeaderLineStart,
                b'\n' => self.end_of_head(log),
                // Obsolete line folding: hyper refuses it in requests.
                b' ' | b'\t' => State::Passthrough,
                _ => Self::header_name_byte(NameMatch::default(), byte),
            },
            State::HeaderName(progress) => Self::header_name_byte(progress, byte),
            State::HeaderValue(value) => self.header_value_byte(value, byte),
            State::Body { remaining } | State::ChunkData { remaining } => {
                self.after_body_bytes(remaining.saturating_sub(1))
            }
            State::ChunkStart => match hex_value(byte) {
                Some(digit) => State::ChunkSize {
                    size: u64::from(digit),
                },
                None => State::Passthrough,
            },
            State::ChunkSize { size } => match byte {
                b'\t' | b' ' => State::ChunkSizeWhitespace { size },
                b';' => State::ChunkExtension { size },
                b'\r' => State::ChunkSizeLf { size },
                _ => match hex_value(byte)
                    .and_then(|digit| size.checked_mul(16)?.checked_add(u64::from(digit)))
                {
                    Some(size) => State::ChunkSize { size },
                    None => State::Passthrough,
                },
            },
            State::ChunkSizeWhitespace { size } => match byte {
                b'\t' | b' ' => State::ChunkSizeWhitespace { size },
                b';' => State::ChunkExtension { size },
                b'\r' => State::ChunkSizeLf { size },
                _ => State::Passthrough,
            },
            State::ChunkExtension { size } => match byte {
                b'\r' => State::ChunkSizeLf { size },
                b'\n' => State::Passthrough,
                _ => State::ChunkExtension { size },
            },
            State::ChunkSizeLf { size } => match byte {
                b'\n' if size == 0 => State::TrailersLineStart,
                b'\n' => State::ChunkData { remaining: size },
                _ => State::Passthrough,
            },
            State::ChunkDataCr => match byte {
                b'\r' => State::ChunkDataLf,
                _ => State::Passthrough,
            },
            State::ChunkDataLf => match byte {
                b'\n' => State::ChunkStart,
                _ => State::Passthrough,
            },
            State::TrailersLineStart => match byte {
                b'\r' => State::EndLf,
                _ => State::Trailer,
            },
            State::Trailer => match byte {
                b'\r' => State::TrailerLf,
                _ => State::Trailer,
            },
            State::TrailerLf => match byte {
                b'\n' => State::TrailersLineStart,
                _ => State::Passthrough,
            },
            State::EndLf => match byte {
                b'\n' => self.end_of_message(),
                _ => State::Passthrough,
            },
            State::Passthrough => State::Passthrough,
        }
    }

    fn method_byte(progress: NameMatch, byte: u8) -> State {
        match byte {
            // An empty method is refused by hyper.
            b' ' if progress.len == 0 => State::Passthrough,
            b' ' if progress.matched(&NON_HTTP1_METHODS).is_some() => State::Passthrough,
            b' ' => State::Target,
            b'\r' | b'\n' => State::Passthrough,
            // Method names are case-sensitive: `connect` is not CONNECT.
            _ => State::Method(progress.advance(&NON_HTTP1_METHODS, byte)),
        }
    }

    fn header_name_byte(progress: NameMatch, byte: u8) -> State {
        match byte {
            b':' => match progress
                .matched(&FRAMING_HEADERS)
                .and_then(|index| FRAMING_HEADER_KINDS.get(index))
            {
                Some(FramingHeader::ContentLength) => {
                    State::HeaderValue(ValueParser::ContentLength {
                        value: 0,
                        has_digits: false,
                        after_digits: false,
                    })
                }
                Some(FramingHeader::TransferEncoding) => {
                    State::HeaderValue(ValueParser::TransferEncoding(TokenMatch::default()))
                }
                // What follows a successful upgrade is no longer HTTP/1:
                // the head is still read to its end (see end_of_head).
                Some(FramingHeader::Upgrade) => State::HeaderValue(ValueParser::Upgrade),
                None if progress.len == 0 => State::Passthrough,
                None => State::HeaderValue(ValueParser::Ignored),
            },
            // A header line without a colon, or with a control byte in its
            // name, is one hyper either refuses or (with
            // `ignore_invalid_headers`) skips.
            _ if is_control(byte) => State::Passthrough,
            _ => State::HeaderName(progress.advance(&FRAMING_HEADERS, byte.to_ascii_lowercase())),
        }
    }

    fn header_value_byte(&mut self, value: ValueParser, byte: u8) -> State {
        match byte {
            b'\n' => self.end_of_header_line(value),
            b'\r' => State::HeaderValue(value),
            // hyper either refuses such a line or, with
            // `ignore_invalid_headers`, skips it: in both cases it is safer
            // not to have read it as framing.
            _ if is_control(byte) && byte != b'\t' => State::Passthrough,
            _ => value
                .advance(byte)
                .map_or(State::Passthrough, State::HeaderValue),
        }
    }

    fn end_of_header_line(&mut self, value: ValueParser) -> State {
        match value {
            ValueParser::Ignored => State::HeaderLineStart,
            ValueParser::Upgrade => {
                self.head.upgrade = true;
                State::HeaderLineStart
            }
            ValueParser::ContentLength {
                value, has_digits, ..
            } => match self.head.content_length {
                _ if !has_digits => State::Passthrough,
                Some(previous) if previous != value => State::Passthrough,
                _ => {
                    self.head.content_length = Some(value);
                    State::HeaderLineStart
                }
            },
            ValueParser::TransferEncoding(last_token) => {
                // hyper judges by the last `Transfer-Encoding` line alone.
                self.head.transfer_encoding_chunked = Some(last_token.is_chunked());
                State::HeaderLineStart
            }
        }
    }

    fn end_of_head(&mut self, log: &AnomalyLog) -> State {
        let upgrade = self.head.upgrade;
        let index = self.request_index;
        let next = self.end_of_head_framing(log);
        if upgrade {
            // Whether the upgrade happens is the upstream's answer, which
            // the sniffer never sees: it follows no further either way, but
            // this head itself was read whole.
            self.request_index = index;
            self.head.upgrade_head_read = true;
            return State::Passthrough;
        }
        next
    }

    fn end_of_head_framing(&mut self, log: &AnomalyLog) -> State {
        match (
            self.head.content_length,
            self.head.transfer_encoding_chunked,
        ) {
            // hyper lets Transfer-Encoding win; peers differ on it, and
            // requests that send both are attacks more often than not. hyper
            // closes the connection after such a request, so tracking can stop.
            (Some(_), Some(_)) => {
                log.record(self.request_index, Anomaly::LengthAndTransferEncoding);
                State::Passthrough
            }
            (None, Some(true)) => State::ChunkStart,
            // hyper refuses a request whose last encoding is not chunked.
            (None, Some(false)) => State::Passthrough,
            (Some(0) | None, None) => self.end_of_message(),
            (Some(length), None) => State::Body { remaining: length },
        }
    }

    fn end_of_message(&mut self) -> State {
        self.request_index = self.request_index.saturating_add(1);
        self.head = HeadFraming::default();
        State::BeforeRequest
    }
}

/// Incremental, allocation-free comparison of a name against a few
/// candidates, one bit per candidate still matching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NameMatch {
    len: u8,
    candidates: u8,
}

impl Default for NameMatch {
    fn default() -> Self {
        Self {
            len: 0,
            candidates: u8::MAX,
        }
    }
}

impl NameMatch {
    fn advance(self, names: &[&[u8]], byte: u8) -> Self {
        let position = usize::from(self.len);
        let mut candidates = self.candidates;
        for (bit, name) in names.iter().enumerate() {
            if name.get(position) != Some(&byte) {
                candidates &= !(1 << bit);
            }
        }
        Self {
            len: self.len.saturating_add(1),
            candidates,
        }
    }

    /// True when no name can match any more.
    fn matches_none(self, names: &[&[u8]]) -> bool {
        let all = (1u16 << names.len()) - 1;
        u16::from(self.candidates) & all == 0
    }

    fn matched(self, names: &[&[u8]]) -> Option<usize> {
        names.iter().enumerate().find_map(|(bit, name)| {
            (self.candidates & (1 << bit) != 0 && name.len() == usize::from(self.len))
                .then_some(bit)
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ValueParser {
    Ignored,
    /// The value does not matter, only that the header is there.
    Upgrade,
    /// hyper takes the trimmed value as plain decimal digits, no sign, no
    /// list.
    ContentLength {
        value: u64,
        has_digits: bool,
        after_digits: bool,
    },
    /// Only the last comma-separated token matters, as in hyper.
    TransferEncoding(TokenMatch),
}

impl ValueParser {
    fn advance(self, byte: u8) -> Option<Self> {
        match self {
            Self::Ignored => Some(Self::Ignored),
            Self::Upgrade => Some(Self::Upgrade),
            Self::ContentLength {
                value,
                has_digits,
                after_digits,
            } => match byte {
                b' ' | b'\t' => Some(Self::ContentLength {
                    value,
                    has_digits,
                    after_digits: has_digits,
                }),
                b'0'..=b'9' if !after_digits => Some(Self::ContentLength {
                    value: value.checked_mul(10)?.checked_add(u64::from(byte - b'0'))?,
                    has_digits: true,
                    after_digits: false,
                }),
                _ => None,
            },
            Self::TransferEncoding(token) => Some(Self::TransferEncoding(token.advance(byte))),
        }
    }
}

/// Whether the current comma-separated token, trimmed, is `chunked`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct TokenMatch {
    matched: u8,
    started: bool,
    ended: bool,
    mismatch: bool,
}

impl TokenMatch {
    fn advance(self, byte: u8) -> Self {
        match byte {
            b',' => Self::default(),
            b' ' | b'\t' => Self {
                ended: self.started,
                ..self
            },
            _ => {
                let position = usize::from(self.matched);
                let continues = !self.ended
                    && !self.mismatch
                    && CHUNKED.get(position) == Some(&byte.to_ascii_lowercase());
                Self {
                    matched: if continues {
                        self.matched.saturating_add(1)
                    } else {
                        self.matched
                    },
                    started: true,
                    ended: false,
                    mismatch: !continues,
                }
            }
        }
    }

    fn is_chunked(self) -> bool {
        !self.mismatch && usize::from(self.matched) == CHUNKED.len()
    }
}

fn is_control(byte: u8) -> bool {
    byte < 0x20 || byte == 0x7F
}

#[cfg(test)]
mod tests {
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
        let stream: &[u8] =
            b"GET /a HTTP/1.1\r\nReferer: https://example.com/#top\r\nX-#: 1\r\n\r\n\
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
        let stream: &[u8] = b"POST /a HTTP/1.1\r\ncontent-LENGTH:   4  \r\nContent-Length: 4\r\n\r\n#x#y\
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
}

//! Where one connection's HTTP/1.1 requests begin and end: a byte-at-a-time
//! state machine over the client's stream that mirrors hyper's framing
//! (`httparse` line ends, `Content-Length`, `Transfer-Encoding`, hyper's
//! chunked decoder) and stops following for good wherever the two could
//! disagree. It records each head's [`Anomaly`] in the connection's
//! [`AnomalyLog`]; the module above says why the log must stay in step with
//! hyper.

use super::tokens::{NameMatch, TokenMatch, ValueParser, is_control};
use super::{Anomaly, AnomalyLog};
use crate::path::hex_value;

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

/// The framing state of one connection's incoming byte stream.
#[derive(Debug, Default)]
pub(super) struct Tracker {
    pub(super) state: State,
    /// Index of the request whose bytes are being read.
    pub(super) request_index: u64,
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
pub(super) enum State {
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
    pub(super) fn feed(&mut self, mut bytes: &[u8], log: &AnomalyLog) {
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
            State::ChunkSize { size } => match hex_value(byte) {
                Some(digit) => match size
                    .checked_mul(16)
                    .and_then(|s| s.checked_add(u64::from(digit)))
                {
                    Some(size) => State::ChunkSize { size },
                    None => State::Passthrough,
                },
                None => Self::after_chunk_size(size, byte),
            },
            State::ChunkSizeWhitespace { size } => Self::after_chunk_size(size, byte),
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

    /// A chunk size's digits are over: whitespace, an extension or the
    /// line's end may follow, as in hyper's decoder; a digit after
    /// whitespace may not.
    fn after_chunk_size(size: u64, byte: u8) -> State {
        match byte {
            b'\t' | b' ' => State::ChunkSizeWhitespace { size },
            b';' => State::ChunkExtension { size },
            b'\r' => State::ChunkSizeLf { size },
            _ => State::Passthrough,
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

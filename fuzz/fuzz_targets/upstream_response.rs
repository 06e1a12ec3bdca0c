//! The upstream response codec (`portcullis::upstream::codec`) driven the way
//! the exchange drives it: bytes from the upstream arrive in reads, the head
//! parser runs on the read buffer (interim 1xx responses skipped, at most
//! `MAX_INTERIM`), then the body is read by the head's framing (length,
//! chunked, until close; none for HEAD, 1xx, 204, 304; a tunnel after 101).
//!
//! Checks: no panic; every parsed head's framing agrees with its raw fields
//! (read again here with httparse, RFC 9112 6.3) and no hop-by-hop field
//! survives; and the whole exchange (heads, body bytes, how it ended, what
//! is left after it) is the same whether the upstream's bytes arrive in one
//! read or in the pieces the input chooses.
//!
//! Input: byte 0 picks the request method (bits 0-1) and how many piece
//! lengths follow (bits 2-5); those bytes are piece lengths (1-64), used in
//! turn until the stream ends; the rest is what the upstream sends.
//!
//! Run with `cargo +nightly fuzz run upstream_response` from the repository root.

#![no_main]

use bytes::BytesMut;
use http::{HeaderMap, Method, StatusCode, Version};
use libfuzzer_sys::fuzz_target;
use portcullis::upstream::codec::{
    BodyFraming, ChunkedDecoder, Decoded, HeadError, ResponseHead, parse_response_head,
};

/// The exchange's `MAX_INTERIM_RESPONSES`.
const MAX_INTERIM: usize = 8;

const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The upstream's side of the connection: hands out the stream in pieces.
struct Upstream<'a> {
    stream: &'a [u8],
    at: usize,
    lengths: &'a [u8],
    turn: usize,
}

impl Upstream<'_> {
    /// One read: appends the next piece; 0 is the upstream closing.
    fn read(&mut self, buffer: &mut BytesMut) -> usize {
        let length = if self.lengths.is_empty() {
            self.stream.len() - self.at
        } else {
            let length = usize::from(self.lengths[self.turn % self.lengths.len()] % 64) + 1;
            self.turn += 1;
            length.min(self.stream.len() - self.at)
        };
        buffer.extend_from_slice(&self.stream[self.at..self.at + length]);
        self.at += length;
        length
    }

    fn unread(&self) -> &[u8] {
        &self.stream[self.at..]
    }
}

#[derive(Debug, PartialEq, Eq)]
struct HeadSummary {
    status: StatusCode,
    version: Version,
    framing: BodyFraming,
    keep_alive: bool,
    headers: Vec<(String, Vec<u8>)>,
}

#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The head was refused (the proxy answers 502); the kind only, since
    /// httparse may word an error differently on a shorter buffer.
    HeadError(&'static str),
    TooManyInterim,
    /// The upstream closed before a whole head.
    Closed,
    /// 101: the rest of the stream is the tunnel's.
    Upgraded,
    /// The body was read to its end.
    Done,
    BodyError(String),
    /// The upstream closed inside a length- or chunk-framed body.
    BodyEof,
}

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    interim: Vec<HeadSummary>,
    head: Option<HeadSummary>,
    body: Vec<u8>,
    end: End,
    /// After `Done` or `Upgraded`: every byte after the response (the pool
    /// never reuses a connection with any).
    rest: Vec<u8>,
}

fn head_error_kind(error: &HeadError) -> &'static str {
    match error {
        HeadError::Malformed(_) => "malformed",
        HeadError::TooLarge => "too large",
        HeadError::TooManyHeaders => "too many headers",
        HeadError::BadContentLength => "bad content-length",
    }
}

fn summary(head: &ResponseHead) -> HeadSummary {
    HeadSummary {
        status: head.status,
        version: head.version,
        framing: head.framing,
        keep_alive: head.keep_alive,
        headers: head
            .headers
            .iter()
            .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
            .collect(),
    }
}

fn comma_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii)
}

/// Holds a parsed head to its raw bytes, read again with httparse.
fn check_head(raw: &[u8], head: &ResponseHead, method: &Method) {
    let mut fields = [httparse::EMPTY_HEADER; 128];
    let mut response = httparse::Response::new(&mut fields);
    let parsed = response.parse(raw);
    assert!(
        matches!(parsed, Ok(httparse::Status::Complete(n)) if n == raw.len()),
        "a parsed head is not one head to httparse: {parsed:?}"
    );
    let raw_fields: Vec<(String, &[u8])> = response
        .headers
        .iter()
        .map(|f| (f.name.to_ascii_lowercase(), f.value))
        .collect();
    let values = |name: &'static str| {
        raw_fields
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| *v)
    };
    let has_te = values("transfer-encoding").next().is_some();
    let lengths: Vec<&[u8]> = values("content-length").flat_map(comma_items).collect();
    let connection_tokens: Vec<Vec<u8>> = values("connection")
        .flat_map(comma_items)
        .map(<[u8]>::to_ascii_lowercase)
        .collect();
    let status = head.status;
    let version = head.version;

    // Any Content-Length that got through is one valid length, said once or
    // repeated.
    if let Some(first) = lengths.first() {
        assert!(
            lengths.iter().all(|l| l == first)
                && !first.is_empty()
                && first.len() <= 18
                && first.iter().all(u8::is_ascii_digit),
            "Content-Length {lengths:?} accepted"
        );
    }
    let length: Option<u64> = lengths
        .first()
        .map(|l| std::str::from_utf8(l).unwrap().parse().unwrap());

    // RFC 9112 6.3, as the codec applies it.
    let expected = if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        BodyFraming::Empty
    } else if has_te {
        let last = values("transfer-encoding")
            .flat_map(comma_items)
            .filter(|c| !c.is_empty())
            .last();
        if version == Version::HTTP_11 && last.is_some_and(|c| c.eq_ignore_ascii_case(b"chunked")) {
            BodyFraming::Chunked
        } else {
            BodyFraming::UntilClose
        }
    } else if let Some(length) = length {
        BodyFraming::Length(length)
    } else {
        BodyFraming::UntilClose
    };
    assert_eq!(head.framing, expected, "framing of {status} {version:?}");

    if head.keep_alive {
        assert_ne!(
            head.framing,
            BodyFraming::UntilClose,
            "reused after a body ending at close"
        );
        assert!(
            !connection_tokens.iter().any(|t| t == b"close"),
            "reused after Connection: close"
        );
        assert!(
            version == Version::HTTP_11 || connection_tokens.iter().any(|t| t == b"keep-alive"),
            "HTTP/1.0 reused without Connection: keep-alive"
        );
        let framed_by_both = has_te && length.is_some() && expected != BodyFraming::Empty;
        assert!(
            !framed_by_both,
            "reused after Content-Length beside Transfer-Encoding"
        );
    }
    if has_te && length.is_some() {
        assert!(
            !head.headers.contains_key(http::header::CONTENT_LENGTH),
            "Content-Length beside Transfer-Encoding passed on"
        );
    }

    // What is passed on is a subset of what was sent, less hop-by-hop fields
    // (kept as sent on a 101 only).
    for (name, value) in &head.headers {
        assert!(
            raw_fields
                .iter()
                .any(|(n, v)| n == name.as_str() && *v == value.as_bytes()),
            "{name}: {value:?} was not sent"
        );
        if status != StatusCode::SWITCHING_PROTOCOLS {
            assert!(
                !HOP_BY_HOP.contains(&name.as_str()),
                "hop-by-hop {name} passed on"
            );
            assert!(
                !connection_tokens
                    .iter()
                    .any(|t| t == name.as_str().as_bytes()),
                "{name}, named by Connection, passed on"
            );
        }
    }
}

/// One exchange: the response head (after any interim ones), then its body.
fn exchange(upstream: &mut Upstream<'_>, method: &Method, spare: &mut HeaderMap) -> Outcome {
    let mut buffer = BytesMut::new();
    let mut outcome = Outcome {
        interim: Vec::new(),
        head: None,
        body: Vec::new(),
        end: End::Closed,
        rest: Vec::new(),
    };
    let head = loop {
        if !buffer.is_empty() {
            let before = buffer.clone();
            match parse_response_head(&mut buffer, method, spare) {
                Ok(Some(head)) => {
                    let head_len = before.len() - buffer.len();
                    assert_eq!(&before[head_len..], &buffer[..], "the body was touched");
                    check_head(&before[..head_len], &head, method);
                    if head.status.is_informational()
                        && head.status != StatusCode::SWITCHING_PROTOCOLS
                    {
                        outcome.interim.push(summary(&head));
                        if outcome.interim.len() > MAX_INTERIM {
                            outcome.end = End::TooManyInterim;
                            return outcome;
                        }
                        continue;
                    }
                    break head;
                }
                Ok(None) => assert_eq!(before, buffer, "a partial head was consumed"),
                Err(error) => {
                    outcome.end = End::HeadError(head_error_kind(&error));
                    return outcome;
                }
            }
        }
        if upstream.read(&mut buffer) == 0 {
            outcome.end = End::Closed;
            return outcome;
        }
    };
    outcome.head = Some(summary(&head));
    let end = if head.status == StatusCode::SWITCHING_PROTOCOLS {
        End::Upgraded
    } else {
        match head.framing {
            BodyFraming::Empty | BodyFraming::Length(0) => End::Done,
            BodyFraming::Length(mut left) => loop {
                if !buffer.is_empty() {
                    let take = usize::try_from(left).map_or(buffer.len(), |l| l.min(buffer.len()));
                    outcome.body.extend_from_slice(&buffer.split_to(take));
                    left -= take as u64;
                    if left == 0 {
                        break End::Done;
                    }
                }
                if upstream.read(&mut buffer) == 0 {
                    break End::BodyEof;
                }
            },
            BodyFraming::Chunked => {
                let mut decoder = ChunkedDecoder::default();
                loop {
                    match decoder.decode(&mut buffer) {
                        Ok(Decoded::Data(data)) => {
                            assert!(!data.is_empty(), "an empty data piece");
                            outcome.body.extend_from_slice(&data);
                            continue;
                        }
                        Ok(Decoded::Done) => {
                            assert_eq!(decoder.decode(&mut buffer), Ok(Decoded::Done));
                            break End::Done;
                        }
                        Ok(Decoded::NeedMore) => {}
                        Err(error) => break End::BodyError(error.to_string()),
                    }
                    if upstream.read(&mut buffer) == 0 {
                        break End::BodyEof;
                    }
                }
            }
            BodyFraming::UntilClose => {
                while upstream.read(&mut buffer) > 0 {}
                outcome.body.extend_from_slice(&buffer.split());
                End::Done
            }
        }
    };
    if matches!(end, End::Done | End::Upgraded) {
        outcome.rest = [&buffer[..], upstream.unread()].concat();
    }
    outcome.end = end;
    outcome
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let method = match control & 3 {
        0 => Method::GET,
        1 => Method::HEAD,
        2 => Method::POST,
        _ => Method::OPTIONS,
    };
    let count = usize::from(control >> 2 & 15).min(rest.len());
    let (lengths, stream) = rest.split_at(count);

    let whole = exchange(
        &mut Upstream {
            stream,
            at: 0,
            lengths: &[],
            turn: 0,
        },
        &method,
        &mut HeaderMap::new(),
    );
    // The proxy hands the request's own header map in as spare memory: it
    // must come back empty of the request's fields.
    let mut spare = HeaderMap::with_capacity(64);
    spare.insert(
        "x-request-field",
        http::HeaderValue::from_static("left over"),
    );
    let pieces = exchange(
        &mut Upstream {
            stream,
            at: 0,
            lengths,
            turn: 0,
        },
        &method,
        &mut spare,
    );
    assert_eq!(whole, pieces, "one read and reads of {lengths:?} disagree");
    // A single byte per read, the hardest split.
    if stream.len() <= 512 {
        let bytewise = exchange(
            &mut Upstream {
                stream,
                at: 0,
                lengths: &[0],
                turn: 0,
            },
            &method,
            &mut HeaderMap::new(),
        );
        assert_eq!(whole, bytewise, "one read and one byte per read disagree");
    }
    if let (End::Done, Some(head)) = (&whole.end, &whole.head) {
        if let BodyFraming::Length(n) = head.framing {
            assert_eq!(whole.body.len() as u64, n);
        }
        if head.framing == BodyFraming::Empty {
            assert!(whole.body.is_empty());
        }
    }
});

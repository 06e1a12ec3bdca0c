//! HTTP/1.1 on the upstream leg as pure functions over bytes (RFC 9112): the
//! request head the proxy writes, the response head it reads, and the
//! framing of the response body. No I/O here; `upstream.rs` drives the
//! socket, so every rule below is unit-tested without one.
//!
//! The parse is strict where a lenient one would let proxy and upstream
//! disagree on where a response ends (two different Content-Lengths, a
//! Content-Length beside Transfer-Encoding, a malformed chunk size): such a
//! response is refused, or its connection is not reused.

use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, HeaderName, HeaderValue, TRANSFER_ENCODING};
use http::{HeaderMap, Method, StatusCode, Uri, Version};

/// Header fields in one response head; more is refused (hyper's default).
pub const MAX_RESPONSE_HEADERS: usize = 100;
/// Bytes in one response head; more is refused (502).
pub const MAX_RESPONSE_HEAD_BYTES: usize = 64 * 1024;
/// Bytes in one chunk-size line (with extensions), and in all trailers.
const MAX_CHUNK_LINE_BYTES: usize = 4 * 1024;
const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// How the request body is framed on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body at all.
    Empty,
    Length(u64),
    Chunked,
}

/// The fields the proxy sets itself, written after the client's.
pub struct ProxyFields<'a> {
    /// `Host`, unless the client's is in the header map.
    pub host: Option<&'a HeaderValue>,
    pub forwarded_for: &'a HeaderValue,
    pub forwarded_host: Option<&'a HeaderValue>,
}

/// Writes the request head. `Content-Length` and `Transfer-Encoding` come
/// from `framing` only: the client's own were checked by the server side and
/// are replaced, so the upstream sees exactly the framing the proxy sends.
pub fn encode_request_head(
    out: &mut Vec<u8>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    framing: RequestFraming,
    proxy: &ProxyFields<'_>,
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
    out.extend_from_slice(if target.is_empty() {
        b"/"
    } else {
        target.as_bytes()
    });
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if let Some(host) = proxy.host {
        write_field(out, b"host", host.as_bytes());
    }
    for (name, value) in headers {
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
            continue;
        }
        write_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    write_field(out, b"x-forwarded-for", proxy.forwarded_for.as_bytes());
    write_field(out, b"x-forwarded-proto", b"https");
    if let Some(forwarded_host) = proxy.forwarded_host {
        write_field(out, b"x-forwarded-host", forwarded_host.as_bytes());
    }
    match framing {
        RequestFraming::Length(length) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(length.to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        // Upstreams such as nginx answer 411 to a POST without a length.
        RequestFraming::Empty if expects_body(method) => {
            out.extend_from_slice(b"content-length: 0\r\n");
        }
        RequestFraming::Empty => {}
    }
    out.extend_from_slice(b"\r\n");
}

fn write_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn expects_body(method: &Method) -> bool {
    *method == Method::POST || *method == Method::PUT || *method == Method::PATCH
}

/// Where the response body ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body (HEAD, 1xx, 204, 304).
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection.
    UntilClose,
}

#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: BodyFraming,
    /// The connection may carry another request after this response.
    pub keep_alive: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeadError {
    #[error("malformed response head: {0}")]
    Malformed(String),
    #[error("response head larger than {MAX_RESPONSE_HEAD_BYTES} bytes")]
    TooLarge,
    #[error("more than {MAX_RESPONSE_HEADERS} response header fields")]
    TooManyHeaders,
    #[error("invalid or conflicting Content-Length")]
    BadContentLength,
}

/// Parses a response head from the front of `buffer`. `Ok(None)`: not all of
/// it has arrived. On success the head's bytes are split off `buffer` (what
/// follows is body) and the header values point into them, uncopied. The
/// fields go into `spare` when it has room (the proxy passes the request's
/// own map, done with once the request head is written): it is then taken
/// and left empty.
pub fn parse_response_head(
    buffer: &mut BytesMut,
    request_method: &Method,
    spare: &mut HeaderMap,
) -> Result<Option<ResponseHead>, HeadError> {
    // Byte offsets of each field's name and value, resolved against the
    // frozen head once httparse's borrow of the buffer ends.
    let mut offsets = [[0u32; 4]; MAX_RESPONSE_HEADERS];
    let (head_len, field_count, status, version) = {
        // Uninitialized: filling 100 empty fields cost more than parsing.
        let mut raw = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() };
            MAX_RESPONSE_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            buffer,
            &mut raw,
        );
        let head_len = match parsed {
            Ok(httparse::Status::Complete(length)) => length,
            Ok(httparse::Status::Partial) if buffer.len() >= MAX_RESPONSE_HEAD_BYTES => {
                return Err(HeadError::TooLarge);
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
            Err(error) => return Err(HeadError::Malformed(error.to_string())),
        };
        if head_len > MAX_RESPONSE_HEAD_BYTES {
            return Err(HeadError::TooLarge);
        }
        let code = response.code.unwrap_or(0);
        let status = StatusCode::from_u16(code)
            .map_err(|_| HeadError::Malformed(format!("status code {code}")))?;
        let version = match response.version {
            Some(0) => Version::HTTP_10,
            _ => Version::HTTP_11,
        };
        let base = buffer.as_ptr() as usize;
        // Offsets fit in u32: the head is at most MAX_RESPONSE_HEAD_BYTES.
        let offset = |bytes: &[u8]| (bytes.as_ptr() as usize - base) as u32;
        for (slot, field) in offsets.iter_mut().zip(response.headers.iter()) {
            let name = offset(field.name.as_bytes());
            let value = offset(field.value);
            *slot = [
                name,
                name + field.name.len() as u32,
                value,
                value + field.value.len() as u32,
            ];
        }
        (head_len, response.headers.len(), status, version)
    };
    let head = buffer.split_to(head_len).freeze();
    // Room for what the response filters add by default (HSTS and three
    // security headers). Not more: on HTTP/1.1 hyper keeps the response's
    // emptied map for the connection's next request, idle or not, and a map
    // sized for 13 fields holds 2.5 KiB where one for 9 holds 1.3 KiB. The
    // spare map is used only when it is already big enough: growing it
    // rehashes, which costs more than allocating a new one.
    let wanted = field_count + 4;
    let mut headers = if spare.capacity() >= wanted {
        let mut headers = std::mem::take(spare);
        headers.clear();
        headers
    } else {
        HeaderMap::with_capacity(wanted)
    };
    // A 101's Connection and Upgrade are the client's business: kept as sent.
    let keep_hop_by_hop = status == StatusCode::SWITCHING_PROTOCOLS;
    let mut facts = FramingFacts::default();
    for &[name_start, name_end, value_start, value_end] in &offsets[..field_count] {
        let name = &head[name_start as usize..name_end as usize];
        let name = HeaderName::from_bytes(name).map_err(|_| {
            HeadError::Malformed(format!("header name {:?}", String::from_utf8_lossy(name)))
        })?;
        let value =
            HeaderValue::from_maybe_shared(head.slice(value_start as usize..value_end as usize))
                .map_err(|_| HeadError::Malformed(format!("value of {name}")))?;
        // Framing is read and hop-by-hop fields (RFC 9110 7.6.1) are dropped
        // in this one pass, rather than looked up and removed afterwards.
        if !facts.note(&name, &value)? || keep_hop_by_hop {
            headers.append(name, value);
        }
    }
    if !keep_hop_by_hop {
        for name in &facts.named_by_connection {
            headers.remove(name);
        }
    }
    let (framing, framing_reusable) = facts.framing(status, version, request_method);
    if facts.transfer_encoding && facts.content_length.is_some() {
        // Transfer-Encoding wins; a length beside it is not passed on.
        headers.remove(CONTENT_LENGTH);
    }
    let keep_alive =
        framing_reusable && !facts.close && (version == Version::HTTP_11 || facts.keep_alive);
    Ok(Some(ResponseHead {
        status,
        version,
        headers,
        framing,
        keep_alive,
    }))
}

/// What a response head's fields say about its framing and its connection.
#[derive(Default)]
struct FramingFacts {
    transfer_encoding: bool,
    /// Whether the last transfer coding seen is `chunked`.
    chunked_last: bool,
    content_length: Option<u64>,
    /// How the length was written: with its value, the text exactly.
    content_length_digits: usize,
    close: bool,
    keep_alive: bool,
    /// Headers the `Connection` field names as hop-by-hop (rare).
    named_by_connection: Vec<HeaderName>,
}

impl FramingFacts {
    /// Takes in one field; true if it is hop-by-hop (not to be passed on).
    fn note(&mut self, name: &HeaderName, value: &HeaderValue) -> Result<bool, HeadError> {
        let items = || value.as_bytes().split(|&b| b == b',').map(trim_ascii);
        if name == CONTENT_LENGTH {
            // "5, 5" (or two fields of 5) is one length said twice (RFC 9110
            // 8.6). Said twice differently ("12" and "012") it is refused:
            // the fields are passed on, and a parser after ours that compares
            // them as text must not see two lengths.
            for item in items() {
                let parsed = parse_decimal(item).ok_or(HeadError::BadContentLength)?;
                if self
                    .content_length
                    .is_some_and(|l| l != parsed || self.content_length_digits != item.len())
                {
                    return Err(HeadError::BadContentLength);
                }
                self.content_length = Some(parsed);
                self.content_length_digits = item.len();
            }
            return Ok(false);
        }
        if name == TRANSFER_ENCODING {
            self.transfer_encoding = true;
            if let Some(last) = items().rfind(|coding| !coding.is_empty()) {
                self.chunked_last = last.eq_ignore_ascii_case(b"chunked");
            }
            return Ok(true);
        }
        if name == CONNECTION {
            for token in items() {
                if token.eq_ignore_ascii_case(b"close") {
                    self.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    self.keep_alive = true;
                } else if let Ok(named) = HeaderName::from_bytes(token) {
                    self.named_by_connection.push(named);
                }
            }
            return Ok(true);
        }
        Ok(crate::forward::is_hop_by_hop(name))
    }

    /// RFC 9112 6.3. Also says whether the connection can be reused as far as
    /// framing goes: not after a Content-Length beside Transfer-Encoding (a
    /// sign of a confused or hostile upstream), nor after a body that ends at
    /// close.
    fn framing(
        &self,
        status: StatusCode,
        version: Version,
        method: &Method,
    ) -> (BodyFraming, bool) {
        if *method == Method::HEAD
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return (BodyFraming::Empty, true);
        }
        if self.transfer_encoding {
            return if version == Version::HTTP_11 && self.chunked_last {
                (BodyFraming::Chunked, self.content_length.is_none())
            } else {
                (BodyFraming::UntilClose, false)
            };
        }
        match self.content_length {
            Some(length) => (BodyFraming::Length(length), true),
            None => (BodyFraming::UntilClose, false),
        }
    }
}

fn trim_ascii(bytes: &[u8]) -> &[u8] {
    bytes.trim_ascii()
}

/// 1*DIGIT, at most 18 digits (no overflow, and no body is that large).
fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        digits
            .iter()
            .fold(0u64, |n, &d| n * 10 + u64::from(d - b'0')),
    )
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkError {
    #[error("malformed chunk size line")]
    BadSize,
    #[error("chunk data not followed by CRLF")]
    BadDelimiter,
    #[error("chunk size line too long")]
    LineTooLong,
    #[error("trailers too large")]
    TrailersTooLarge,
}

/// What [`ChunkedDecoder::decode`] found in the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// The buffer holds no complete piece; read more.
    NeedMore,
    /// The last chunk and the trailers (dropped) have been read.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines up to an empty one.
    Trailers {
        seen: usize,
    },
    Done,
}

/// Decodes `Transfer-Encoding: chunked` (RFC 9112 7.1), handing out the data
/// as slices of the read buffer. Trailers are read and dropped.
#[derive(Debug)]
pub struct ChunkedDecoder {
    state: ChunkState,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder {
            state: ChunkState::Size,
        }
    }
}

impl ChunkedDecoder {
    #[cfg(test)]
    fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    pub fn decode(&mut self, buffer: &mut BytesMut) -> Result<Decoded, ChunkError> {
        loop {
            match self.state {
                ChunkState::Done => return Ok(Decoded::Done),
                ChunkState::Size => {
                    let Some(line) = take_line(buffer, MAX_CHUNK_LINE_BYTES)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    let size = parse_chunk_size(&line)?;
                    self.state = if size == 0 {
                        ChunkState::Trailers { seen: 0 }
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if buffer.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let take = usize::try_from(left).map_or(buffer.len(), |l| l.min(buffer.len()));
                    let data = buffer.split_to(take).freeze();
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                    return Ok(Decoded::Data(data));
                }
                ChunkState::DataEnd => {
                    if buffer.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buffer[..2] != b"\r\n" {
                        return Err(ChunkError::BadDelimiter);
                    }
                    let _ = buffer.split_to(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers { seen } => {
                    let room = MAX_TRAILER_BYTES.saturating_sub(seen);
                    let line = match take_line(buffer, room) {
                        Ok(Some(line)) => line,
                        Ok(None) => return Ok(Decoded::NeedMore),
                        Err(ChunkError::LineTooLong) => return Err(ChunkError::TrailersTooLarge),
                        Err(error) => return Err(error),
                    };
                    self.state = if line.is_empty() {
                        ChunkState::Done
                    } else {
                        ChunkState::Trailers {
                            seen: seen + line.len() + 2,
                        }
                    };
                }
            }
        }
    }
}

/// Splits one CRLF-terminated line off the buffer (without the CRLF).
fn take_line(buffer: &mut BytesMut, max: usize) -> Result<Option<BytesMut>, ChunkError> {
    let window = &buffer[..buffer.len().min(max + 2)];
    match window.iter().position(|&b| b == b'\n') {
        Some(lf) if lf >= 1 && window[lf - 1] == b'\r' => {
            let mut line = buffer.split_to(lf + 1);
            line.truncate(lf - 1);
            Ok(Some(line))
        }
        Some(_) => Err(ChunkError::BadSize),
        None if buffer.len() > max + 1 => Err(ChunkError::LineTooLong),
        None => Ok(None),
    }
}

/// `chunk-size [ chunk-ext ]` (RFC 9112 §7.1): `1*HEXDIG`, then
/// `*( BWS ";" BWS token [ BWS "=" BWS ( token / quoted-string ) ] )`.
/// Extensions are checked and ignored; white space is only SP and HTAB (a
/// CR or form feed before `;` is how two parsers come to disagree on where
/// a chunk ends).
fn parse_chunk_size(line: &[u8]) -> Result<u64, ChunkError> {
    let digits_end = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let (digits, rest) = line.split_at(digits_end);
    // 15 hex digits: no overflow, and far more than any real chunk.
    if digits.is_empty() || digits.len() > 15 {
        return Err(ChunkError::BadSize);
    }
    if !valid_chunk_extensions(rest) {
        return Err(ChunkError::BadSize);
    }
    Ok(digits.iter().fold(0u64, |n, &d| {
        let value = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => d - b'A' + 10,
        };
        n * 16 + u64::from(value)
    }))
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn skip_bws(bytes: &[u8], mut at: usize) -> usize {
    while at < bytes.len() && matches!(bytes[at], b' ' | b'\t') {
        at += 1;
    }
    at
}

fn skip_token(bytes: &[u8], at: usize) -> Option<usize> {
    let end = at + bytes[at..].iter().take_while(|&&b| is_tchar(b)).count();
    (end > at).then_some(end)
}

/// A `quoted-string` whose opening quote is at `at`; the index after it.
fn skip_quoted(bytes: &[u8], mut at: usize) -> Option<usize> {
    let is_text = |b: u8| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80;
    at += 1;
    while let Some(&b) = bytes.get(at) {
        match b {
            b'"' => return Some(at + 1),
            b'\\' if bytes.get(at + 1).is_some_and(|&e| is_text(e)) => at += 2,
            b'\\' => return None,
            b if is_text(b) => at += 1,
            _ => return None,
        }
    }
    None
}

fn valid_chunk_extensions(rest: &[u8]) -> bool {
    let mut at = 0;
    loop {
        at = skip_bws(rest, at);
        if at == rest.len() {
            return true;
        }
        if rest[at] != b';' {
            return false;
        }
        at = skip_bws(rest, at + 1);
        let Some(end) = skip_token(rest, at) else {
            return false;
        };
        at = skip_bws(rest, end);
        if rest.get(at) == Some(&b'=') {
            at = skip_bws(rest, at + 1);
            let value_end = match rest.get(at) {
                Some(b'"') => skip_quoted(rest, at),
                Some(_) => skip_token(rest, at),
                None => None,
            };
            let Some(value_end) = value_end else {
                return false;
            };
            at = value_end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Option<ResponseHead>, HeadError> {
        parse_response_head(
            &mut BytesMut::from(raw),
            &Method::GET,
            &mut HeaderMap::new(),
        )
    }

    fn head(raw: &[u8]) -> ResponseHead {
        parse(raw).unwrap().unwrap()
    }

    #[test]
    fn request_head_has_one_framing_of_the_proxys_choosing() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("app"));
        headers.insert("content-length", HeaderValue::from_static("999"));
        headers.insert("x-a", HeaderValue::from_static("1"));
        let uri: Uri = "/p?q=1".parse().unwrap();
        let xff = HeaderValue::from_static("192.0.2.1");
        let proxy = ProxyFields {
            host: None,
            forwarded_for: &xff,
            forwarded_host: None,
        };
        let mut out = Vec::new();
        encode_request_head(
            &mut out,
            &Method::PUT,
            &uri,
            &headers,
            RequestFraming::Length(5),
            &proxy,
        );
        assert_eq!(
            out,
            &b"PUT /p?q=1 HTTP/1.1\r\nhost: app\r\nx-a: 1\r\nx-forwarded-for: 192.0.2.1\r\n\
              x-forwarded-proto: https\r\ncontent-length: 5\r\n\r\n"[..]
        );
        out.clear();
        encode_request_head(
            &mut out,
            &Method::POST,
            &uri,
            &headers,
            RequestFraming::Empty,
            &proxy,
        );
        assert!(out.ends_with(b"content-length: 0\r\n\r\n"));
        out.clear();
        encode_request_head(
            &mut out,
            &Method::GET,
            &uri,
            &HeaderMap::new(),
            RequestFraming::Empty,
            &proxy,
        );
        assert_eq!(out, b"GET /p?q=1 HTTP/1.1\r\nx-forwarded-for: 192.0.2.1\r\nx-forwarded-proto: https\r\n\r\n");
        out.clear();
        encode_request_head(
            &mut out,
            &Method::POST,
            &uri,
            &HeaderMap::new(),
            RequestFraming::Chunked,
            &proxy,
        );
        assert!(out.ends_with(b"transfer-encoding: chunked\r\n\r\n"));
    }

    #[test]
    fn partial_head_waits_and_the_body_stays_in_the_buffer() {
        assert!(
            parse(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n")
                .unwrap()
                .is_none()
        );
        let mut buffer =
            BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx: y\r\n\r\nok"[..]);
        let mut spare = HeaderMap::with_capacity(32);
        spare.insert("x-old", HeaderValue::from_static("gone"));
        let head = parse_response_head(&mut buffer, &Method::GET, &mut spare)
            .unwrap()
            .unwrap();
        assert!(!head.headers.contains_key("x-old") && spare.is_empty());
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(head.framing, BodyFraming::Length(2));
        assert!(head.keep_alive);
        assert_eq!(head.headers["x"], "y");
        assert_eq!(&buffer[..], b"ok");
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let te = head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n");
        assert_eq!((te.framing, te.keep_alive), (BodyFraming::Chunked, true));
        // Content-Length beside Transfer-Encoding: TE wins, the length goes,
        // and the connection is not trusted again.
        let both =
            head(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n");
        assert_eq!(
            (both.framing, both.keep_alive),
            (BodyFraming::Chunked, false)
        );
        assert!(!both.headers.contains_key(CONTENT_LENGTH));
        let gzip_only = head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n");
        assert_eq!(
            (gzip_only.framing, gzip_only.keep_alive),
            (BodyFraming::UntilClose, false)
        );
        let no_length = head(b"HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(
            (no_length.framing, no_length.keep_alive),
            (BodyFraming::UntilClose, false)
        );
        assert_eq!(
            head(b"HTTP/1.1 204 No Content\r\n\r\n").framing,
            BodyFraming::Empty
        );
        assert_eq!(
            head(b"HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n").framing,
            BodyFraming::Empty
        );
        let for_head = parse_response_head(
            &mut BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n"[..]),
            &Method::HEAD,
            &mut HeaderMap::new(),
        );
        assert_eq!(for_head.unwrap().unwrap().framing, BodyFraming::Empty);
        assert_eq!(
            head(b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\n").framing,
            BodyFraming::Length(5)
        );
    }

    #[test]
    fn conflicting_or_malformed_lengths_are_refused() {
        for raw in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\n",
            // the same value written two ways (found by fuzzing)
            b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\ncontent-length: 012\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5, 05\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
        ] {
            assert_eq!(
                parse(raw).unwrap_err(),
                HeadError::BadContentLength,
                "{raw:?}"
            );
        }
    }

    #[test]
    fn hop_by_hop_fields_are_dropped_except_from_a_101() {
        let plain = head(
            b"HTTP/1.1 200 OK\r\nconnection: keep-alive, x-secret\r\nkeep-alive: timeout=5\r\n\
              x-secret: 1\r\nupgrade: h2c\r\ntrailer: x\r\ncontent-length: 0\r\nx-app: 2\r\n\r\n",
        );
        let mut names: Vec<&str> = plain.headers.keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-length", "x-app"]);
        let switching = head(
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
        );
        assert_eq!(switching.headers["upgrade"], "websocket");
        assert_eq!(switching.headers["connection"], "upgrade");
    }

    #[test]
    fn connection_reuse() {
        assert!(
            !head(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n").keep_alive
        );
        assert!(!head(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n").keep_alive);
        assert!(
            head(b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n")
                .keep_alive
        );
    }

    #[test]
    fn bad_heads_are_refused() {
        assert!(matches!(
            parse(b"HTTP/1.1 2000 OK\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"HTTX/1.1 200 OK\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..=MAX_RESPONSE_HEADERS {
            many.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse(&many).unwrap_err(), HeadError::TooManyHeaders);
        let mut huge = b"HTTP/1.1 200 OK\r\nx: ".to_vec();
        huge.resize(MAX_RESPONSE_HEAD_BYTES + 10, b'a');
        assert_eq!(parse(&huge).unwrap_err(), HeadError::TooLarge);
    }

    fn decode_all(input: &[u8]) -> Result<(Vec<u8>, bool), ChunkError> {
        let mut decoder = ChunkedDecoder::default();
        let mut buffer = BytesMut::new();
        let mut out = Vec::new();
        // One byte at a time: every state must survive a split anywhere.
        for &byte in input {
            buffer.extend_from_slice(&[byte]);
            while let Decoded::Data(data) = decoder.decode(&mut buffer)? {
                out.extend_from_slice(&data);
            }
        }
        Ok((out, decoder.is_done()))
    }

    #[test]
    fn chunked_bodies_decode_across_any_split() {
        let (data, done) =
            decode_all(b"5;ext=1\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nx-t: 1\r\n\r\n")
                .unwrap();
        assert_eq!(data, b"hello 0123456789");
        assert!(done);
        let (data, done) = decode_all(b"3\r\nabc\r\n").unwrap();
        assert_eq!((data.as_slice(), done), (&b"abc"[..], false));
    }

    #[test]
    fn chunk_extensions_follow_rfc_9112() {
        for good in [
            &b"3;name\r\nabc\r\n0\r\n\r\n"[..],
            b"3 ; name = value\r\nabc\r\n0\r\n\r\n",
            b"3\t;a=1;b;c=\"quoted ; \\\" value\"\r\nabc\r\n0\r\n\r\n",
            b"3   \r\nabc\r\n0;last=1\r\n\r\n",
        ] {
            let (data, done) = decode_all(good)
                .unwrap_or_else(|e| panic!("{}: {e:?}", String::from_utf8_lossy(good)));
            assert_eq!((data.as_slice(), done), (&b"abc"[..], true));
        }
    }

    #[test]
    fn malformed_chunks_are_refused() {
        assert_eq!(decode_all(b"zz\r\n").unwrap_err(), ChunkError::BadSize);
        assert_eq!(
            decode_all(b"3\r\nabcX\r\n").unwrap_err(),
            ChunkError::BadDelimiter
        );
        assert_eq!(decode_all(b"3\nabc").unwrap_err(), ChunkError::BadSize);
        assert_eq!(
            decode_all(b"1000000000000000\r\n").unwrap_err(),
            ChunkError::BadSize
        );
        for bad in [
            &b"3\r;x\r\nabc\r\n"[..],
            b"3\x0c;x\r\nabc\r\n",
            b"3 x\r\nabc\r\n",
            b"3;\r\nabc\r\n",
            b"3;=v\r\nabc\r\n",
            b"3;a=\r\nabc\r\n",
            b"3;a=\"open\r\nabc\r\n",
            b"3;a b\r\nabc\r\n",
            b"3;a=b c\r\nabc\r\n",
            b"3;a=\"\x01\"\r\nabc\r\n",
        ] {
            assert_eq!(
                decode_all(bad).unwrap_err(),
                ChunkError::BadSize,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut long = b"1;".to_vec();
        long.resize(MAX_CHUNK_LINE_BYTES + 10, b'a');
        assert_eq!(decode_all(&long).unwrap_err(), ChunkError::LineTooLong);
    }
}

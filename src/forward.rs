//! The upstream request: the client's request with the normalized path,
//! hop-by-hop headers removed, `X-Forwarded-*` set, and identity headers
//! (`forward_claims`) removed from what the client sent before the proxy sets
//! its own from a verified token.

use http::header::{CONNECTION, COOKIE, HOST, HeaderName, TE, TRAILER, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderValue, Uri};

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Headers a `Connection` list may never make the proxy drop: the proxy sets
/// or relies on them itself.
fn protected(name: &HeaderName) -> bool {
    name == HOST
        || *name == X_FORWARDED_FOR
        || *name == X_FORWARDED_PROTO
        || *name == X_FORWARDED_HOST
}

/// A hop-by-hop header by name (RFC 9110 7.6.1); the upstream response
/// parser drops the same set.
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == CONNECTION
        || name == UPGRADE
        || name == TE
        || name == TRAILER
        || name == TRANSFER_ENCODING
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

/// Removes hop-by-hop headers (RFC 9110 7.6.1), those named in `Connection` first.
/// For a WebSocket upgrade, `Upgrade` and `Connection: upgrade` are kept so the
/// upstream can accept it.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none: one pass over the names instead of a hash
    // lookup per hop-by-hop header.
    if !keep_upgrade && !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        // These name headers handled below anyway; skipping them saves
        // building (allocating) a header name for the most common tokens.
        .filter(|token| {
            !["keep-alive", "upgrade", ""]
                .iter()
                .any(|handled| token.eq_ignore_ascii_case(handled))
        })
        .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
        .filter(|name| !protected(name))
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        &CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &TE,
        &TRAILER,
        &TRANSFER_ENCODING,
    ] {
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(UPGRADE);
    }
}

/// A `Host` value as RFC 9110 allows it: a host and an optional numeric
/// port, nothing else (no user info, path or stray characters).
pub fn parse_host(host: &str) -> Option<http::uri::Authority> {
    let authority: http::uri::Authority = host.parse().ok()?;
    is_plain_host(&authority).then_some(authority)
}

/// A `Host` value's syntax (RFC 9110 7.2, RFC 3986 3.2.2): a registered
/// name or an IP literal in brackets, then an optional numeric port that fits
/// in a u16. A byte-level check, stricter than [`parse_host`] and about
/// four times cheaper (it runs on every HTTP/1.1 request); nothing it accepts
/// is refused by [`parse_host`] (a property test holds it to that).
pub fn is_valid_host(host: &str) -> bool {
    let bytes = host.as_bytes();
    let (name, port) = if bytes.first() == Some(&b'[') {
        let Some(close) = bytes.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = &bytes[1..close];
        if literal.len() < 2
            || !literal
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return false;
        }
        (&bytes[..=close], &bytes[close + 1..])
    } else {
        let colon = bytes.iter().position(|&b| b == b':').unwrap_or(bytes.len());
        let (name, port) = bytes.split_at(colon);
        let reg_name_byte = |b: u8| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b);
        if name.is_empty() || !name.iter().all(|&b| reg_name_byte(b)) {
            return false;
        }
        (name, port)
    };
    debug_assert!(!name.is_empty());
    match port.split_first() {
        None => true,
        Some((b':', digits)) => {
            digits.is_empty()
                || (digits.len() <= 5
                    && digits.iter().all(u8::is_ascii_digit)
                    && host[host.len() - digits.len()..].parse::<u16>().is_ok())
        }
        Some(_) => false,
    }
}

fn is_plain_host(authority: &http::uri::Authority) -> bool {
    let text = authority.as_str();
    let stray = |b: u8| matches!(b, b'@' | b'/' | b'?' | b'#' | b'\\');
    if text.bytes().any(stray) || authority.host().is_empty() {
        return false;
    }
    // `Authority` takes any text after the colon; a port is digits (RFC 3986
    // allows none at all) that fit in a u16.
    let port = &text[authority.host().len()..];
    match port.strip_prefix(':') {
        Some(digits) if !digits.is_empty() => {
            digits.bytes().all(|b| b.is_ascii_digit()) && digits.parse::<u16>().is_ok()
        }
        _ => true,
    }
}

/// The host the request is for: the target's authority when it has one
/// (HTTP/2's `:authority`, or an absolute-form target, which RFC 9112 3.2.2
/// says wins over `Host`), else the single `Host` header. Missing (on
/// HTTP/1.1 and HTTP/2), repeated or malformed hosts are refused: proxy and
/// upstream must not be able to disagree on which site a request is for.
pub fn request_host(parts: &http::request::Parts) -> Result<Option<HeaderValue>, &'static str> {
    let mut hosts = parts.headers.get_all(HOST).iter();
    let host_header = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header");
    }
    let header_text = match host_header {
        Some(value) => Some(value.to_str().map_err(|_| "malformed Host header")?),
        None => None,
    };
    if let Some(authority) = parts.uri.authority() {
        if !is_valid_host(authority.as_str()) {
            return Err("malformed request authority");
        }
        if parts.version == http::Version::HTTP_2
            && header_text.is_some_and(|h| !h.eq_ignore_ascii_case(authority.as_str()))
        {
            return Err("Host differs from :authority");
        }
        return HeaderValue::from_str(authority.as_str())
            .map(Some)
            .map_err(|_| "malformed request authority");
    }
    match (host_header, header_text) {
        (Some(value), Some(text)) if is_valid_host(text) => Ok(Some(value.clone())),
        (Some(_), Some(_)) => Err("malformed Host header"),
        _ if parts.version >= http::Version::HTTP_11 => Err("missing Host header"),
        _ => Ok(None),
    }
}

/// True for an HTTP/1.1 WebSocket upgrade request.
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let connection_upgrade = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    connection_upgrade
        && headers
            .get(UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"))
}

/// Removes every header that a `forward_claims` header name could be read as:
/// case-insensitively (HeaderMap is) and with `_` read as `-`, since WSGI/CGI
/// upstreams read `X_Auth_Subject` as `X-Auth-Subject`.
pub fn strip_identity_headers(headers: &mut HeaderMap, names: &[HeaderName]) {
    if names.is_empty() {
        return;
    }
    for name in names {
        headers.remove(name);
    }
    let underscored: Vec<HeaderName> = headers
        .keys()
        .filter(|key| key.as_str().contains('_'))
        .filter(|key| {
            let dashed = key.as_str().replace('_', "-");
            names.iter().any(|n| n.as_str() == dashed)
        })
        .cloned()
        .collect();
    for name in underscored {
        headers.remove(name);
    }
}

/// The fields the proxy itself sets on the upstream request. They are kept
/// out of the request's header map (a client's own are removed from it) and
/// written by the upstream encoder after the client's: that spares a hash
/// map insert per field on every request.
pub struct ProxyFields {
    pub host: HostField,
    /// `X-Forwarded-For`.
    pub forwarded_for: HeaderValue,
    /// `X-Forwarded-Host`: the host the client asked for, when it named one.
    pub forwarded_host: Option<HeaderValue>,
}

/// Where the upstream request's `Host` comes from.
pub enum HostField {
    /// The client's, left in the header map: it is the request's host.
    InMap,
    /// This one, in place of whatever the client sent.
    Write(HeaderValue),
    /// None known (HTTP/1.0 without Host): the upstream's own authority.
    Missing,
}

/// Sets up `Host`, `X-Forwarded-For`, `-Proto` (always `https`) and `-Host`
/// for the upstream and removes the client's versions of them. A client's
/// own XFF (and `Forwarded`, `X-Real-IP`) is kept only when the peer is a
/// trusted proxy. `peer` is the peer's address as header text.
pub fn forwarded_fields(
    headers: &mut HeaderMap,
    peer: &HeaderValue,
    peer_trusted: bool,
    host: Option<HeaderValue>,
) -> ProxyFields {
    // One pass over the names to learn which of the replaced fields the
    // client sent, instead of a lookup (hash) per field.
    let (mut has_host, mut has_xff, mut has_xfp, mut has_xfh, mut has_untrusted) =
        (false, false, false, false, false);
    for name in headers.keys() {
        has_host |= name == HOST;
        has_xff |= *name == X_FORWARDED_FOR;
        has_xfp |= *name == X_FORWARDED_PROTO;
        has_xfh |= *name == X_FORWARDED_HOST;
        has_untrusted |= !peer_trusted && (*name == FORWARDED || *name == X_REAL_IP);
    }
    let forwarded_for = if peer_trusted && has_xff {
        let mut joined: Vec<u8> = Vec::new();
        for previous in headers.get_all(&X_FORWARDED_FOR) {
            joined.extend_from_slice(previous.as_bytes());
            joined.extend_from_slice(b", ");
        }
        joined.extend_from_slice(peer.as_bytes());
        HeaderValue::from_bytes(&joined).unwrap_or_else(|_| peer.clone())
    } else {
        peer.clone()
    };
    for (present, name) in [
        (has_xff, &X_FORWARDED_FOR),
        (has_xfp, &X_FORWARDED_PROTO),
        (has_xfh, &X_FORWARDED_HOST),
        (has_untrusted, &FORWARDED),
        (has_untrusted, &X_REAL_IP),
    ] {
        if present {
            headers.remove(name);
        }
    }
    let host_field = match &host {
        Some(host) if has_host && headers.get(HOST) == Some(host) => HostField::InMap,
        Some(host) => {
            if has_host {
                headers.remove(HOST);
            }
            HostField::Write(host.clone())
        }
        None => {
            if has_host {
                headers.remove(HOST);
            }
            HostField::Missing
        }
    };
    ProxyFields {
        host: host_field,
        forwarded_for,
        forwarded_host: host,
    }
}

/// HTTP/2 lets a client split `Cookie` over several fields; an HTTP/1.1
/// upstream expects one (RFC 9113 8.2.3).
pub fn merge_cookie_headers(headers: &mut HeaderMap) {
    if headers.get_all(COOKIE).iter().nth(1).is_none() {
        return;
    }
    let joined: Vec<&[u8]> = headers
        .get_all(COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    if let Ok(value) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
        headers.insert(COOKIE, value);
    }
}

/// The origin-form request target the upstream gets (`/path?query`): the
/// normalized path, the client's query untouched.
pub fn upstream_uri(path: &str, query: Option<&str>) -> Result<Uri, http::Error> {
    let mut path_and_query = String::with_capacity(path.len() + query.map_or(0, |q| q.len() + 1));
    path_and_query.push_str(path);
    if let Some(query) = query {
        path_and_query.push('?');
        path_and_query.push_str(query);
    }
    Uri::builder().path_and_query(path_and_query).build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret, host"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("host", "example.com"),
            ("accept", "*/*"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert!(
            h.get("x-secret").is_none()
                && h.get("connection").is_none()
                && h.get("upgrade").is_none()
        );
        assert!(h.get("te").is_none() && h.get("keep-alive").is_none());
        assert_eq!(h.get("host").unwrap(), "example.com");
        assert_eq!(h.get("accept").unwrap(), "*/*");
    }

    #[test]
    fn identity_headers_in_every_spelling_go() {
        let mut h = map(&[
            ("X-Auth-Subject", "a"),
            ("x_auth_subject", "b"),
            ("X_Auth_Subject", "c"),
            ("other", "d"),
        ]);
        strip_identity_headers(&mut h, &[HeaderName::from_static("x-auth-subject")]);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn host_syntax() {
        for good in [
            "example.com",
            "example.com:8443",
            "localhost:",
            "my_host.internal",
            "127.0.0.1:80",
            "[::1]",
            "[2001:db8::1]:443",
            "xn--bcher-kva.example",
        ] {
            assert!(is_valid_host(good), "{good}");
            assert!(parse_host(good).is_some(), "{good}");
        }
        for bad in [
            "",
            ":80",
            "a b",
            "user@host",
            "host/path",
            "host?q",
            "host#f",
            "host\\x",
            "host:99999",
            "host:8a",
            "host:80:90",
            "[::1",
            "[]",
            "[zz::1]",
            "[::1]x",
            "h\u{e9}.example",
        ] {
            assert!(!is_valid_host(bad), "{bad:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn the_fast_host_check_accepts_nothing_the_parser_refuses(
            host in "[a-zA-Z0-9.:\\[\\]@/?#%_~!$&'()*+,;= -]{0,24}"
        ) {
            if is_valid_host(&host) {
                proptest::prop_assert!(parse_host(&host).is_some(), "{:?}", host);
            }
        }
    }

    #[test]
    fn xff_replaced_unless_trusted() {
        let peer = HeaderValue::from_static("192.0.2.7");
        let client = &[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", "evil"),
            ("x-real-ip", "1.2.3.4"),
            ("forwarded", "for=1.2.3.4"),
        ];
        let mut h = map(client);
        let fields = forwarded_fields(&mut h, &peer, false, None);
        assert_eq!(fields.forwarded_for, "192.0.2.7");
        assert!(h.is_empty(), "{h:?}");
        assert!(matches!(fields.host, HostField::Missing) && fields.forwarded_host.is_none());
        let mut h = map(client);
        let fields = forwarded_fields(&mut h, &peer, true, None);
        assert_eq!(fields.forwarded_for, "1.2.3.4, 192.0.2.7");
        assert_eq!(
            h.len(),
            2,
            "a trusted proxy's Forwarded and X-Real-IP stay: {h:?}"
        );
    }

    #[test]
    fn host_stays_in_the_map_only_when_it_is_the_requests_host() {
        let peer = HeaderValue::from_static("192.0.2.7");
        let app = HeaderValue::from_static("app.example");
        let mut h = map(&[("host", "app.example")]);
        let fields = forwarded_fields(&mut h, &peer, false, Some(app.clone()));
        assert!(matches!(fields.host, HostField::InMap));
        assert_eq!(h["host"], "app.example");
        assert_eq!(fields.forwarded_host, Some(app.clone()));
        // Absolute-form target: its authority wins over the Host header.
        let mut h = map(&[("host", "other.example")]);
        let fields = forwarded_fields(&mut h, &peer, false, Some(app.clone()));
        assert!(matches!(fields.host, HostField::Write(ref v) if v == app));
        assert!(h.get("host").is_none());
    }
}

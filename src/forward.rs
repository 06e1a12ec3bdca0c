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
static HTTPS: HeaderValue = HeaderValue::from_static("https");

/// Headers a `Connection` list may never make the proxy drop: the proxy sets
/// or relies on them itself.
fn protected(name: &HeaderName) -> bool {
    name == HOST
        || *name == X_FORWARDED_FOR
        || *name == X_FORWARDED_PROTO
        || *name == X_FORWARDED_HOST
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
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

/// The checks of [`parse_host`] on an authority already parsed (HTTP/2's
/// `:authority`), without parsing it again.
fn is_plain_host(authority: &http::uri::Authority) -> bool {
    let text = authority.as_str();
    if text.contains(['@', '/', '?', '#', '\\']) || authority.host().is_empty() {
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
        if !is_plain_host(authority) {
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
        (Some(value), Some(text)) => match parse_host(text) {
            Some(_) => Ok(Some(value.clone())),
            None => Err("malformed Host header"),
        },
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

/// Sets `X-Forwarded-For`, `-Proto` and `-Host`. A client's own XFF (and
/// `Forwarded`, `X-Real-IP`) is kept only when the peer is a trusted proxy.
/// `peer` is the peer's address as header text.
pub fn set_forwarded_headers(
    headers: &mut HeaderMap,
    peer: &HeaderValue,
    peer_trusted: bool,
    host: Option<&HeaderValue>,
) {
    // The three inserts below, at most one growth of the map.
    headers.reserve(4);
    let xff = match (peer_trusted, headers.get(&X_FORWARDED_FOR)) {
        (true, Some(_)) => {
            let mut joined: Vec<u8> = Vec::new();
            for previous in headers.get_all(&X_FORWARDED_FOR) {
                joined.extend_from_slice(previous.as_bytes());
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(peer.as_bytes());
            HeaderValue::from_bytes(&joined).unwrap_or_else(|_| peer.clone())
        }
        _ => peer.clone(),
    };
    if !peer_trusted {
        headers.remove(&FORWARDED);
        headers.remove(&X_REAL_IP);
    }
    headers.insert(X_FORWARDED_FOR.clone(), xff);
    headers.insert(X_FORWARDED_PROTO.clone(), HTTPS.clone());
    match host {
        Some(host) => {
            headers.insert(X_FORWARDED_HOST.clone(), host.clone());
        }
        None => {
            headers.remove(&X_FORWARDED_HOST);
        }
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
    fn xff_replaced_unless_trusted() {
        let peer = HeaderValue::from_static("192.0.2.7");
        let mut h = map(&[("x-forwarded-for", "1.2.3.4")]);
        set_forwarded_headers(&mut h, &peer, false, None);
        assert_eq!(h.get("x-forwarded-for").unwrap(), "192.0.2.7");
        let mut h = map(&[("x-forwarded-for", "1.2.3.4")]);
        set_forwarded_headers(&mut h, &peer, true, None);
        assert_eq!(h.get("x-forwarded-for").unwrap(), "1.2.3.4, 192.0.2.7");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
    }
}

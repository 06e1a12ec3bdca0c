//! CSRF protection from the browser's own signals (`csrf = true`).
//!
//! The algorithm of Go 1.25's `net/http.CrossOriginProtection`: browsers
//! say where a request comes from (`Sec-Fetch-Site` since 2020 in every
//! engine, `Origin` on every unsafe request since long before), so no token
//! has to be planted in the app's forms. In order:
//!
//! 1. GET, HEAD and OPTIONS pass: safe methods are never blocked.
//! 2. `Sec-Fetch-Site: same-origin` or `none` (typed in, a bookmark) passes;
//!    any other value passes only when `Origin` is an allowed origin.
//! 3. Neither `Sec-Fetch-Site` nor `Origin`: not a browser request (curl, a
//!    server), or an old browser on a same-origin request: passes.
//! 4. `Origin` alone (an older browser): passes when it is the request's own
//!    origin (`https://` + Host) or an allowed one.
//!
//! Allowed origins are parsed once, at configuration load ([`Origin::parse`]);
//! the check itself allocates nothing.

use http::header::{HeaderMap, ORIGIN};
use http::{HeaderValue, Method};

const SEC_FETCH_SITE: &str = "sec-fetch-site";

/// A serialized origin, `scheme://host[:port]` (RFC 6454), compared exactly
/// on scheme and port and ASCII case-insensitively on the host. A port that
/// is the scheme's default is dropped, as browsers drop it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// Lower case: `https://example.com:8443`, or `null` (opaque origins).
    serialized: String,
}

impl Origin {
    /// Parses an `allowed_origins` entry: `scheme://host[:port]` exactly, or
    /// `null`. A path (even `/`), query, fragment, user info or wildcard is
    /// refused with the reason.
    pub fn parse(text: &str) -> Result<Origin, String> {
        if text == "null" {
            return Ok(Origin {
                serialized: "null".into(),
            });
        }
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| format!(r#"expected "scheme://host[:port]", got "{text}""#))?;
        if !matches!(scheme, "http" | "https") {
            return Err(format!(
                r#"the scheme must be http or https, got "{scheme}" in "{text}""#
            ));
        }
        if let Some(bad) = rest
            .chars()
            .find(|c| matches!(c, '/' | '?' | '#' | '*' | '@'))
        {
            let what = match bad {
                '/' => "path, not even a trailing slash",
                '?' => "query",
                '#' => "fragment",
                '*' => "wildcard",
                _ => "user information",
            };
            return Err(format!(
                r#"an origin is "scheme://host[:port]" with no {what}: "{text}""#
            ));
        }
        match serialize(scheme, rest) {
            Some(serialized) => Ok(Origin { serialized }),
            None => Err(format!(r#"not a valid host[:port] in "{text}""#)),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.serialized
    }

    /// True when a request's `Origin` header value is this origin.
    fn matches(&self, origin: &[u8]) -> bool {
        same_origin(origin, self.serialized.as_bytes())
    }
}

/// Why a request failed the check: what it said about where it came from,
/// for the security log (an origin is not a secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrossOrigin {
    /// The `Origin` header, or `-` when there was none.
    pub origin: String,
    /// The `Sec-Fetch-Site` header, when there was one.
    pub fetch_site: Option<String>,
}

/// Judges one request. `host` is the request's own authority as the client
/// addressed it (`Host`, or `:authority` over HTTP/2).
pub fn check(
    method: &Method,
    headers: &HeaderMap,
    host: Option<&HeaderValue>,
    allowed: &[Origin],
) -> Result<(), CrossOrigin> {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    let origin = headers.get(ORIGIN).map(HeaderValue::as_bytes);
    let is_allowed = |origin: Option<&[u8]>| {
        origin.is_some_and(|origin| allowed.iter().any(|a| a.matches(origin)))
    };
    let refuse = |fetch_site: Option<&HeaderValue>| CrossOrigin {
        origin: origin.map_or_else(|| "-".into(), |o| String::from_utf8_lossy(o).into_owned()),
        fetch_site: fetch_site.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
    };
    if let Some(fetch_site) = headers.get(SEC_FETCH_SITE) {
        let value = fetch_site.as_bytes();
        if value.eq_ignore_ascii_case(b"same-origin") || value.eq_ignore_ascii_case(b"none") {
            return Ok(());
        }
        return if is_allowed(origin) {
            Ok(())
        } else {
            Err(refuse(Some(fetch_site)))
        };
    }
    let Some(origin_value) = origin else {
        return Ok(());
    };
    if is_own_origin(origin_value, host) || is_allowed(origin) {
        return Ok(());
    }
    Err(refuse(None))
}

/// `Origin` equals `https://` + the request's authority.
fn is_own_origin(origin: &[u8], host: Option<&HeaderValue>) -> bool {
    let Some(host) = host.and_then(|h| h.to_str().ok()) else {
        return false;
    };
    match serialize("https", host) {
        Some(own) => same_origin(origin, own.as_bytes()),
        None => false,
    }
}

/// Compares a request's `Origin` value with a serialized origin from
/// [`serialize`]: the value's host case-insensitively, and a default port
/// written out counts as left out.
fn same_origin(origin: &[u8], serialized: &[u8]) -> bool {
    if origin.eq_ignore_ascii_case(serialized) {
        return true;
    }
    // Rare: a client that wrote the default port. Normalize and compare again.
    let Ok(text) = std::str::from_utf8(origin) else {
        return false;
    };
    text.split_once("://")
        .and_then(|(scheme, rest)| serialize(&scheme.to_ascii_lowercase(), rest))
        .is_some_and(|normalized| normalized.as_bytes() == serialized)
}

/// `scheme://host[:port]` in lower case without the scheme's default port,
/// or `None` when `authority` is not a plain `host[:port]`.
fn serialize(scheme: &str, authority: &str) -> Option<String> {
    let parsed: http::uri::Authority = authority.parse().ok()?;
    if parsed.as_str().contains('@') || parsed.host().is_empty() {
        return None;
    }
    let host = parsed.host().to_ascii_lowercase();
    let default = if scheme == "https" { 443 } else { 80 };
    let port = match authority.rsplit_once(':') {
        // An IPv6 literal's colons are inside the brackets.
        Some((_, digits)) if !digits.ends_with(']') => {
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let port: u16 = digits.parse().ok()?;
            (port != default).then_some(port)
        }
        _ => None,
    };
    Some(match port {
        Some(port) => format!("{scheme}://{host}:{port}"),
        None => format!("{scheme}://{host}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn judge(method: &str, pairs: &[(&str, &str)], allowed: &[&str]) -> Result<(), CrossOrigin> {
        let allowed: Vec<Origin> = allowed.iter().map(|a| Origin::parse(a).unwrap()).collect();
        let host = HeaderValue::from_static("app.example.com:8443");
        check(
            &Method::from_bytes(method.as_bytes()).unwrap(),
            &headers(pairs),
            Some(&host),
            &allowed,
        )
    }

    #[test]
    fn safe_methods_always_pass() {
        for method in ["GET", "HEAD", "OPTIONS"] {
            let hostile = [
                ("sec-fetch-site", "cross-site"),
                ("origin", "https://evil.example"),
            ];
            assert_eq!(judge(method, &hostile, &[]), Ok(()), "{method}");
        }
    }

    #[test]
    fn sec_fetch_site_same_origin_or_none_passes_whatever_the_origin() {
        for site in ["same-origin", "none", "Same-Origin"] {
            let h = [("sec-fetch-site", site), ("origin", "https://evil.example")];
            assert_eq!(judge("POST", &h, &[]), Ok(()), "{site}");
        }
    }

    #[test]
    fn same_site_and_cross_site_fail_unless_the_origin_is_allowed() {
        for site in ["same-site", "cross-site", "something-new"] {
            let h = [
                ("sec-fetch-site", site),
                ("origin", "https://partner.example"),
            ];
            let refused = judge("POST", &h, &[]).unwrap_err();
            assert_eq!(refused.origin, "https://partner.example");
            assert_eq!(refused.fetch_site.as_deref(), Some(site));
            assert_eq!(judge("POST", &h, &["https://partner.example"]), Ok(()));
            // Listed is checked before the own-origin rule: a cross-site
            // request from the app's own host name is still cross-site.
            let own = [
                ("sec-fetch-site", site),
                ("origin", "https://app.example.com:8443"),
            ];
            assert!(judge("DELETE", &own, &[]).is_err());
        }
        // Sec-Fetch-Site without Origin cannot be allowed by the list.
        let h = [("sec-fetch-site", "cross-site")];
        assert!(judge("POST", &h, &["https://partner.example"]).is_err());
    }

    #[test]
    fn no_browser_signal_at_all_passes() {
        assert_eq!(judge("POST", &[], &[]), Ok(()));
        assert_eq!(judge("PUT", &[("content-type", "text/plain")], &[]), Ok(()));
    }

    #[test]
    fn origin_alone_must_be_the_own_origin_or_listed() {
        let ok = |origin: &str| judge("POST", &[("origin", origin)], &[]);
        assert_eq!(ok("https://app.example.com:8443"), Ok(()));
        assert_eq!(
            ok("https://APP.Example.com:8443"),
            Ok(()),
            "host is case-insensitive"
        );
        assert!(
            ok("http://app.example.com:8443").is_err(),
            "scheme is exact"
        );
        assert!(ok("https://app.example.com").is_err(), "port is exact");
        assert!(ok("https://app.example.com:8444").is_err());
        assert!(ok("https://evil.example").is_err());
        assert!(ok("null").is_err());
        assert!(ok("garbage").is_err());
        let listed = |origin: &str, allowed: &[&str]| judge("POST", &[("origin", origin)], allowed);
        assert_eq!(listed("null", &["null"]), Ok(()));
        assert_eq!(
            listed("https://Partner.Example", &["https://partner.example"]),
            Ok(())
        );
        assert!(listed("https://partner.example:444", &["https://partner.example"]).is_err());
    }

    #[test]
    fn a_default_port_counts_as_left_out() {
        let host = HeaderValue::from_static("app.example.com");
        let h = headers(&[("origin", "https://app.example.com:443")]);
        assert_eq!(check(&Method::POST, &h, Some(&host), &[]), Ok(()));
        let h = headers(&[("origin", "https://app.example.com")]);
        let host443 = HeaderValue::from_static("app.example.com:443");
        assert_eq!(check(&Method::POST, &h, Some(&host443), &[]), Ok(()));
        let allowed = [Origin::parse("http://partner.example:80").unwrap()];
        assert_eq!(allowed[0].as_str(), "http://partner.example");
        let h = headers(&[("origin", "http://partner.example")]);
        assert_eq!(check(&Method::POST, &h, Some(&host), &allowed), Ok(()));
    }

    #[test]
    fn without_a_host_only_listed_origins_pass() {
        let h = headers(&[("origin", "https://app.example.com")]);
        assert!(check(&Method::POST, &h, None, &[]).is_err());
    }

    #[test]
    fn allowed_origins_are_exact_scheme_host_port() {
        assert!(Origin::parse("https://a.example").is_ok());
        assert!(Origin::parse("http://127.0.0.1:8080").is_ok());
        assert!(Origin::parse("https://[::1]:8443").is_ok());
        assert_eq!(
            Origin::parse("HTTPS://A.Example:8443").map_err(|_| ()),
            Err(()),
            "the scheme is written in lower case"
        );
        assert_eq!(
            Origin::parse("https://A.Example:8443").unwrap().as_str(),
            "https://a.example:8443"
        );
        for bad in [
            "https://a.example/",
            "https://a.example/app",
            "https://a.example?x=1",
            "https://a.example#top",
            "https://*.example",
            "https://user@a.example",
            "a.example",
            "ftp://a.example",
            "https://",
            "https://a.example:",
            "https://a.example:99999",
        ] {
            assert!(Origin::parse(bad).is_err(), "{bad}");
        }
        assert!(
            Origin::parse("https://a.example/")
                .unwrap_err()
                .contains("trailing slash")
        );
    }
}

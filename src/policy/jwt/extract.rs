//! Where a request's token is: `Authorization: Bearer`, else the
//! `token_cookie` cookie. Pure, over the request's headers; the token is
//! borrowed from them, never copied.

use http::header::{AUTHORIZATION, COOKIE};
use http::{HeaderMap, HeaderValue};

/// Where a request's token is, if anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource<'a> {
    Found(&'a str),
    /// No `Authorization` header and no `token_cookie` cookie (a token in
    /// another cookie counts as none; so does an empty `token_cookie`).
    Missing,
    /// An `Authorization` header that is not a usable Bearer credential: another
    /// scheme, `Bearer` with nothing after it, several `Authorization`
    /// headers, a non-UTF-8 value, or a `token_cookie` that is not UTF-8.
    Invalid,
}

/// Finds the token: `Authorization: Bearer` first (scheme case-insensitive),
/// then the `token_cookie` cookie across every `Cookie` header. Pure.
pub fn extract_token<'a>(headers: &'a HeaderMap, token_cookie: Option<&str>) -> TokenSource<'a> {
    let mut auth = headers.get_all(AUTHORIZATION).iter();
    if let Some(value) = auth.next() {
        if auth.next().is_some() {
            // Two credentials: which one an upstream or another proxy would
            // pick is anyone's guess, so accept neither.
            return TokenSource::Invalid;
        }
        return bearer_token(value);
    }
    match token_cookie {
        Some(name) => cookie_token(headers, name),
        None => TokenSource::Missing,
    }
}

fn bearer_token(value: &HeaderValue) -> TokenSource<'_> {
    let Ok(text) = value.to_str() else {
        return TokenSource::Invalid;
    };
    let text = text.trim_matches([' ', '\t']);
    let Some((scheme, rest)) = text.split_once([' ', '\t']) else {
        return TokenSource::Invalid;
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return TokenSource::Invalid;
    }
    let token = rest.trim_start_matches([' ', '\t']);
    if token.is_empty() || token.contains([' ', '\t']) {
        return TokenSource::Invalid;
    }
    TokenSource::Found(token)
}

fn cookie_token<'a>(headers: &'a HeaderMap, name: &str) -> TokenSource<'a> {
    for value in headers.get_all(COOKIE) {
        for pair in value.as_bytes().split(|b| *b == b';') {
            let Some(eq) = pair.iter().position(|b| *b == b'=') else {
                continue;
            };
            if pair[..eq].trim_ascii() != name.as_bytes() {
                continue;
            }
            let mut v = pair[eq + 1..].trim_ascii();
            if v.len() >= 2 && v.starts_with(b"\"") && v.ends_with(b"\"") {
                v = &v[1..v.len() - 1];
            }
            if v.is_empty() {
                // A cleared cookie (logout) is no token, not a bad one.
                return TokenSource::Missing;
            }
            return match std::str::from_utf8(v) {
                Ok(s) => TokenSource::Found(s),
                Err(_) => TokenSource::Invalid,
            };
        }
    }
    TokenSource::Missing
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::jwt::test_support::*;

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_bytes(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn extract_bearer() {
        use TokenSource::*;
        let cases: &[(&[u8], TokenSource<'_>)] = &[
            (b"Bearer abc.def.ghi", Found("abc.def.ghi")),
            (b"bearer abc", Found("abc")),
            (b"BEARER   abc  ", Found("abc")),
            (b"Bearer ", Invalid),
            (b"Bearer", Invalid),
            (b"Basic dXNlcjpwYXNz", Invalid),
            (b"Bearer a b", Invalid),
            (b"", Invalid),
            (b"Bearer \xff\xfe", Invalid),
        ];
        for (value, want) in cases {
            let h = headers(&[("authorization", value)]);
            assert_eq!(
                extract_token(&h, None),
                *want,
                "{:?}",
                String::from_utf8_lossy(value)
            );
        }
        let h = headers(&[
            ("authorization", b"Bearer a"),
            ("authorization", b"Bearer b"),
        ]);
        assert_eq!(extract_token(&h, None), Invalid);
        assert_eq!(extract_token(&HeaderMap::new(), None), Missing);
        assert_eq!(
            extract_token(&HeaderMap::new(), Some("access_token")),
            Missing
        );
    }

    #[test]
    fn extract_cookie() {
        use TokenSource::*;
        let c = Some("access_token");
        let h = headers(&[("cookie", b"a=1; access_token=tok.en.x; b=2")]);
        assert_eq!(extract_token(&h, c), Found("tok.en.x"));
        // Several Cookie headers (HTTP/2 splits them).
        let h = headers(&[("cookie", b"a=1"), ("cookie", b"b=2;access_token=t")]);
        assert_eq!(extract_token(&h, c), Found("t"));
        let h = headers(&[("cookie", b"access_token=\"q.t\"")]);
        assert_eq!(extract_token(&h, c), Found("q.t"));
        // Another cookie's name, or a name that merely contains ours.
        let h = headers(&[("cookie", b"session=tok; my_access_token=x; Access_Token=y")]);
        assert_eq!(extract_token(&h, c), Missing);
        // Cookie ignored when token_cookie is not configured.
        let h = headers(&[("cookie", b"access_token=t")]);
        assert_eq!(extract_token(&h, None), Missing);
        let h = headers(&[("cookie", b"access_token=")]);
        assert_eq!(extract_token(&h, c), Missing);
        let h = headers(&[("cookie", b"x=\xff; access_token=\xfe\xff")]);
        assert_eq!(extract_token(&h, c), Invalid);
        // A non-UTF-8 byte in another cookie does not hide ours.
        let h = headers(&[("cookie", b"x=\xff; access_token=ok")]);
        assert_eq!(extract_token(&h, c), Found("ok"));
        // Authorization wins over the cookie, even when it is not Bearer.
        let h = headers(&[
            ("authorization", b"Bearer hdr"),
            ("cookie", b"access_token=ck"),
        ]);
        assert_eq!(extract_token(&h, c), Found("hdr"));
        let h = headers(&[
            ("authorization", b"Basic x"),
            ("cookie", b"access_token=ck"),
        ]);
        assert_eq!(extract_token(&h, c), Invalid);
    }

    #[tokio::test]
    async fn token_from_cookie_verifies() {
        let v = verifier(hs_settings());
        let t = hs(&claims());
        let value = format!("other=1; access_token={t}");
        let h = headers(&[("cookie", value.as_bytes())]);
        let TokenSource::Found(found) = extract_token(&h, Some("access_token")) else {
            panic!("no token");
        };
        assert!(v.verify(found).await.is_ok());
    }
}

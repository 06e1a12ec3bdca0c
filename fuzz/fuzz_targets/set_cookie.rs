//! `portcullis::filters::cookies::rewrite_set_cookie` on arbitrary header
//! values, under every `[cookies]` policy (input byte 0: bit 0 `secure`,
//! bit 1 `http_only`, bits 2-3 `same_site`).
//!
//! Checks, on any bytes: no panic; attributes are only appended (the
//! original, less trailing blanks and `;`, is a prefix of the output); a
//! rewritten value needs no second rewrite. On values a header can carry
//! (what the upstream codec passes on), read as a browser reads a
//! Set-Cookie line (RFC 6265bis 5.6: split at `;`, names trimmed of SP and
//! HTAB, compared case-insensitively, the last SameSite wins): the output is
//! still a valid header value; the cookie's name=value is unchanged;
//! `Secure` and `HttpOnly` are there once when the policy asks and the
//! upstream set none (and never added when it set one); a `SameSite` is
//! added only where there was none, so there are never two unless the
//! upstream wrote two; and `SameSite=None` always comes with `Secure`.
//!
//! Run with `cargo +nightly fuzz run set_cookie` from the repository root.

#![no_main]

use http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use portcullis::filters::cookies::{CookiePolicy, SameSite, rewrite_set_cookie};

fn trim_wsp(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

/// A Set-Cookie line as a browser reads it.
#[derive(Debug, Default)]
struct Browser<'a> {
    name: &'a [u8],
    value: &'a [u8],
    secure: usize,
    http_only: usize,
    same_site: usize,
    /// The value of the last SameSite attribute.
    last_same_site: Option<&'a [u8]>,
}

fn browser_reads(line: &[u8]) -> Browser<'_> {
    let (pair, attributes) = match line.iter().position(|&b| b == b';') {
        Some(semi) => (&line[..semi], Some(&line[semi + 1..])),
        None => (line, None),
    };
    let (name, value) = match pair.iter().position(|&b| b == b'=') {
        Some(eq) => (trim_wsp(&pair[..eq]), trim_wsp(&pair[eq + 1..])),
        None => (&b""[..], trim_wsp(pair)),
    };
    let mut cookie = Browser {
        name,
        value,
        ..Browser::default()
    };
    for attribute in attributes.into_iter().flat_map(|a| a.split(|&b| b == b';')) {
        let (name, value) = match attribute.iter().position(|&b| b == b'=') {
            Some(eq) => (trim_wsp(&attribute[..eq]), trim_wsp(&attribute[eq + 1..])),
            None => (trim_wsp(attribute), &b""[..]),
        };
        if name.eq_ignore_ascii_case(b"secure") {
            cookie.secure += 1;
        } else if name.eq_ignore_ascii_case(b"httponly") {
            cookie.http_only += 1;
        } else if name.eq_ignore_ascii_case(b"samesite") {
            cookie.same_site += 1;
            cookie.last_same_site = Some(value);
        }
    }
    cookie
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, input)) = data.split_first() else {
        return;
    };
    let policy = CookiePolicy {
        secure: control & 1 != 0,
        http_only: control & 2 != 0,
        same_site: match control >> 2 & 3 {
            0 => SameSite::Strict,
            1 => SameSite::Lax,
            2 => SameSite::None,
            _ => SameSite::Keep,
        },
    };
    let output = rewrite_set_cookie(input, &policy);
    let effective: &[u8] = output.as_deref().unwrap_or(input);

    if let Some(out) = &output {
        let kept = input.trim_ascii_end();
        let kept_len = kept
            .iter()
            .rposition(|&b| b != b';' && !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        assert!(
            kept_len > 0,
            "a value of blanks and separators was rewritten"
        );
        assert_eq!(&out[..kept_len], &input[..kept_len], "not append-only");
        assert_eq!(rewrite_set_cookie(out, &policy), None, "not idempotent");
    }

    if HeaderValue::from_bytes(input).is_err() {
        return;
    }
    assert!(
        HeaderValue::from_bytes(effective).is_ok(),
        "the rewritten value cannot be sent: {effective:?}"
    );
    let before = browser_reads(input);
    let after = browser_reads(effective);
    assert_eq!(
        (before.name, before.value),
        (after.name, after.value),
        "the cookie's name=value changed"
    );
    if after.name.is_empty() && after.value.is_empty() {
        // No cookie at all: the browser ignores the line.
        return;
    }
    let same_site_none = |c: &Browser<'_>| {
        c.last_same_site
            .is_some_and(|v| v.eq_ignore_ascii_case(b"none"))
    };
    let wants_secure = policy.secure || same_site_none(&after);
    let expected_secure = if wants_secure {
        before.secure.max(1)
    } else {
        before.secure
    };
    assert_eq!(after.secure, expected_secure, "Secure");
    let expected_http_only = if policy.http_only {
        before.http_only.max(1)
    } else {
        before.http_only
    };
    assert_eq!(after.http_only, expected_http_only, "HttpOnly");
    let expected_same_site = match (before.same_site, policy.same_site) {
        (0, SameSite::Keep) => 0,
        (0, _) => 1,
        (n, _) => n,
    };
    assert_eq!(after.same_site, expected_same_site, "SameSite");
    if same_site_none(&after) {
        assert!(after.secure > 0, "SameSite=None without Secure");
    }
});

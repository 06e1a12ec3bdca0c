//! Hardening of upstream `Set-Cookie` headers (SPEC: `[cookies]` and
//! "What a client sees" → Cookies).
//!
//! The proxy fronts applications it cannot change, so every cookie they set
//! is decorated on the way out with `Secure`, `HttpOnly` and a `SameSite`
//! default, without ever overriding a choice the application made itself.
//!
//! This module is pure and works on raw header bytes: a header value is not
//! required to be UTF-8, and whatever the upstream wrote is passed on byte for
//! byte, with new attributes only ever appended at the end.

/// The `SameSite` value added to cookies that carry none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameSite {
    Strict,
    Lax,
    None,
    /// Add no `SameSite` attribute; the browser's default applies.
    Keep,
}

impl SameSite {
    fn attribute(self) -> Option<&'static [u8]> {
        match self {
            SameSite::Strict => Some(b"; SameSite=Strict"),
            SameSite::Lax => Some(b"; SameSite=Lax"),
            SameSite::None => Some(b"; SameSite=None"),
            SameSite::Keep => None,
        }
    }
}

/// What `[cookies]` asks for.
#[derive(Debug, Clone)]
pub struct CookiePolicy {
    pub secure: bool,
    pub http_only: bool,
    pub same_site: SameSite,
}

impl Default for CookiePolicy {
    /// The SPEC's defaults, which are what a missing `[cookies]` section means.
    fn default() -> Self {
        CookiePolicy {
            secure: true,
            http_only: true,
            same_site: SameSite::Lax,
        }
    }
}

const SECURE: &[u8] = b"; Secure";
const HTTP_ONLY: &[u8] = b"; HttpOnly";

/// The longest attribute value a browser reads; longer ones it ignores.
const MAX_ATTRIBUTE_VALUE: usize = 1024;

/// What the upstream already wrote, by attribute name.
#[derive(Default)]
struct Present {
    secure: bool,
    http_only: bool,
    /// `Some(is_none)` when a `SameSite` attribute is present.
    same_site: Option<bool>,
}

fn scan(attributes: &[u8]) -> Present {
    let mut present = Present::default();
    for attribute in attributes.split(|&b| b == b';') {
        let (name, value) = match attribute.iter().position(|&b| b == b'=') {
            Some(eq) => (&attribute[..eq], &attribute[eq + 1..]),
            None => (attribute, &b""[..]),
        };
        // RFC 6265bis §5.6: a browser ignores an attribute whose value is
        // longer than 1024 bytes, so `Secure=<1025 bytes>` is not Secure.
        if value.len() > MAX_ATTRIBUTE_VALUE {
            continue;
        }
        let name = name.trim_ascii();
        if name.eq_ignore_ascii_case(b"secure") {
            present.secure = true;
        } else if name.eq_ignore_ascii_case(b"httponly") {
            present.http_only = true;
        } else if name.eq_ignore_ascii_case(b"samesite") {
            // Browsers honour the last SameSite they see, so the last one
            // decides whether Secure is mandatory.
            present.same_site = Some(value.trim_ascii().eq_ignore_ascii_case(b"none"));
        }
    }
    present
}

/// Rewrites one Set-Cookie header value. Returns None when nothing needs to
/// change (the common case must not allocate).
///
/// Attributes count as present by name alone, case-insensitively
/// (`secure`, `HTTPONLY`, `samesite=strict`), so they are never duplicated,
/// and a `SameSite` written by the upstream is kept whatever its value.
/// `SameSite=None`, whoever chose it, always comes with `Secure`, because
/// browsers reject such a cookie otherwise. The cookie's own `name=value`
/// (everything before the first `;`) is never read as an attribute.
pub fn rewrite_set_cookie(value: &[u8], policy: &CookiePolicy) -> Option<Vec<u8>> {
    // Trailing separators and blanks are empty attributes; dropping them
    // keeps the appended ones from producing `a=1;; Secure`.
    let kept = value.trim_ascii_end();
    let kept = match kept
        .iter()
        .rposition(|&b| b != b';' && !b.is_ascii_whitespace())
    {
        Some(last) => &kept[..=last],
        // Nothing but blanks and separators: there is no cookie to harden.
        None => return None,
    };
    let attributes = match kept.iter().position(|&b| b == b';') {
        Some(semi) => &kept[semi + 1..],
        None => &b""[..],
    };
    let present = scan(attributes);

    let add_same_site = match present.same_site {
        Some(_) => None,
        None => policy.same_site.attribute(),
    };
    let same_site_none = match present.same_site {
        Some(is_none) => is_none,
        None => policy.same_site == SameSite::None,
    };
    let add_secure = !present.secure && (policy.secure || same_site_none);
    let add_http_only = policy.http_only && !present.http_only;

    if !add_secure && !add_http_only && add_same_site.is_none() {
        return None;
    }

    let mut out = Vec::with_capacity(
        kept.len() + SECURE.len() + HTTP_ONLY.len() + add_same_site.map_or(0, <[u8]>::len),
    );
    out.extend_from_slice(kept);
    if add_secure {
        out.extend_from_slice(SECURE);
    }
    if add_http_only {
        out.extend_from_slice(HTTP_ONLY);
    }
    if let Some(same_site) = add_same_site {
        out.extend_from_slice(same_site);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(secure: bool, http_only: bool, same_site: SameSite) -> CookiePolicy {
        CookiePolicy {
            secure,
            http_only,
            same_site,
        }
    }

    /// Name, input, policy, expected output (`None`: left untouched).
    type Case<'a> = (&'a str, &'a [u8], CookiePolicy, Option<&'a [u8]>);

    #[test]
    fn table() {
        let all_lax = policy(true, true, SameSite::Lax);
        let nothing = policy(false, false, SameSite::Keep);
        let cases: &[Case] = &[
            (
                "plain cookie",
                b"id=abc",
                all_lax.clone(),
                Some(b"id=abc; Secure; HttpOnly; SameSite=Lax"),
            ),
            (
                "already hardened, canonical case",
                b"id=abc; Secure; HttpOnly; SameSite=Lax",
                all_lax.clone(),
                None,
            ),
            (
                "already hardened, odd case and no spaces",
                b"id=abc;secure;HTTPONLY;samesite=strict",
                all_lax.clone(),
                None,
            ),
            (
                "Secure present in mixed case, others added",
                b"id=abc; SeCuRe",
                all_lax.clone(),
                Some(b"id=abc; SeCuRe; HttpOnly; SameSite=Lax"),
            ),
            (
                "upstream SameSite=Strict kept",
                b"id=abc; SameSite=Strict",
                all_lax.clone(),
                Some(b"id=abc; SameSite=Strict; Secure; HttpOnly"),
            ),
            (
                "upstream SameSite=None gains Secure even with secure=false",
                b"id=abc; SameSite=None",
                policy(false, false, SameSite::Lax),
                Some(b"id=abc; SameSite=None; Secure"),
            ),
            (
                "upstream samesite=none (lower case) with Secure already",
                b"id=abc; samesite=none; secure",
                policy(false, false, SameSite::Lax),
                None,
            ),
            (
                "configured SameSite=None brings Secure with secure=false",
                b"id=abc",
                policy(false, false, SameSite::None),
                Some(b"id=abc; Secure; SameSite=None"),
            ),
            (
                "keep adds no SameSite",
                b"id=abc",
                policy(true, true, SameSite::Keep),
                Some(b"id=abc; Secure; HttpOnly"),
            ),
            ("everything off", b"id=abc", nothing.clone(), None),
            (
                "value containing HttpOnly is not an attribute",
                b"pref=HttpOnly; Secure",
                all_lax.clone(),
                Some(b"pref=HttpOnly; Secure; HttpOnly; SameSite=Lax"),
            ),
            (
                "cookie named Secure is not an attribute",
                b"Secure=1",
                policy(true, false, SameSite::Keep),
                Some(b"Secure=1; Secure"),
            ),
            (
                "cookie named SameSite with value None is not an attribute",
                b"SameSite=None",
                policy(false, false, SameSite::Keep),
                None,
            ),
            (
                "value merely containing secure",
                b"mode=insecure; Path=/",
                policy(true, false, SameSite::Keep),
                Some(b"mode=insecure; Path=/; Secure"),
            ),
            (
                "trailing semicolon",
                b"id=abc;",
                all_lax.clone(),
                Some(b"id=abc; Secure; HttpOnly; SameSite=Lax"),
            ),
            (
                "trailing semicolons and blanks",
                b"id=abc; Path=/ ; ;  ",
                policy(true, false, SameSite::Keep),
                Some(b"id=abc; Path=/; Secure"),
            ),
            (
                "extra spaces around attributes are preserved",
                b"id=abc ;   Secure  ;  HttpOnly   ; Path=/",
                all_lax.clone(),
                Some(b"id=abc ;   Secure  ;  HttpOnly   ; Path=/; SameSite=Lax"),
            ),
            (
                "spaces around SameSite's equals sign",
                b"id=abc; SameSite = None ",
                policy(false, false, SameSite::Strict),
                Some(b"id=abc; SameSite = None; Secure"),
            ),
            (
                "Expires with a comma date",
                b"id=abc; Expires=Wed, 21 Oct 2015 07:28:00 GMT; Path=/",
                all_lax.clone(),
                Some(b"id=abc; Expires=Wed, 21 Oct 2015 07:28:00 GMT; Path=/; Secure; HttpOnly; SameSite=Lax"),
            ),
            (
                "attribute with a value does not hide Secure",
                b"id=abc; Secure=yes",
                policy(true, false, SameSite::Keep),
                None,
            ),
            (
                "non-UTF-8 bytes pass through",
                b"id=\xff\xfe; Path=/\x80",
                policy(true, false, SameSite::Keep),
                Some(b"id=\xff\xfe; Path=/\x80; Secure"),
            ),
            (
                "empty value",
                b"id=",
                policy(true, false, SameSite::Keep),
                Some(b"id=; Secure"),
            ),
            ("empty header left alone", b"", all_lax.clone(), None),
            ("only separators left alone", b" ; ;", all_lax.clone(), None),
            (
                "quoted value",
                b"id=\"a b\"; Max-Age=60",
                all_lax.clone(),
                Some(b"id=\"a b\"; Max-Age=60; Secure; HttpOnly; SameSite=Lax"),
            ),
            (
                "SameSite with an unknown value is the upstream's choice",
                b"id=abc; SameSite=Bogus",
                policy(false, false, SameSite::Strict),
                None,
            ),
            (
                "last SameSite wins for the Secure rule",
                b"id=abc; SameSite=Lax; SameSite=None",
                policy(false, false, SameSite::Keep),
                Some(b"id=abc; SameSite=Lax; SameSite=None; Secure"),
            ),
        ];
        for (name, input, policy, expected) in cases {
            let got = rewrite_set_cookie(input, policy);
            assert_eq!(
                got.as_deref(),
                *expected,
                "case {name:?}: got {:?}",
                got.as_deref().map(String::from_utf8_lossy)
            );
        }
    }

    #[test]
    fn an_attribute_a_browser_ignores_does_not_count_as_present() {
        let all_lax = policy(true, true, SameSite::Lax);
        let long = "x".repeat(MAX_ATTRIBUTE_VALUE + 1);
        let input = format!("id=abc; Secure={long}; HttpOnly={long}");
        let got = rewrite_set_cookie(input.as_bytes(), &all_lax).unwrap();
        assert_eq!(
            got,
            format!("{input}; Secure; HttpOnly; SameSite=Lax").into_bytes()
        );
        // At the limit the value is still read, and the name decides.
        let at_limit = "x".repeat(MAX_ATTRIBUTE_VALUE);
        let input = format!("id=abc; Secure={at_limit}; HttpOnly; SameSite=Strict");
        assert_eq!(rewrite_set_cookie(input.as_bytes(), &all_lax), None);
    }

    #[test]
    fn default_policy_is_the_spec_default() {
        let policy = CookiePolicy::default();
        assert!(policy.secure && policy.http_only);
        assert_eq!(policy.same_site, SameSite::Lax);
    }

    fn any_policy() -> impl Strategy<Value = CookiePolicy> {
        (
            any::<bool>(),
            any::<bool>(),
            prop_oneof![
                Just(SameSite::Strict),
                Just(SameSite::Lax),
                Just(SameSite::None),
                Just(SameSite::Keep),
            ],
        )
            .prop_map(|(secure, http_only, same_site)| CookiePolicy {
                secure,
                http_only,
                same_site,
            })
    }

    fn cookie_bytes() -> impl Strategy<Value = Vec<u8>> {
        // Biased towards the bytes and words the parser cares about.
        let piece = prop_oneof![
            Just(b";".to_vec()),
            Just(b" ".to_vec()),
            Just(b"=".to_vec()),
            Just(b"Secure".to_vec()),
            Just(b"httponly".to_vec()),
            Just(b"SameSite".to_vec()),
            Just(b"None".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..4),
        ];
        proptest::collection::vec(piece, 0..12).prop_map(|pieces| pieces.concat())
    }

    proptest! {
        /// A rewritten cookie needs no further rewriting, so nothing is ever
        /// added twice, and the original bytes are always kept as a prefix.
        #[test]
        fn idempotent_and_append_only(input in cookie_bytes(), policy in any_policy()) {
            if let Some(out) = rewrite_set_cookie(&input, &policy) {
                prop_assert_eq!(rewrite_set_cookie(&out, &policy), None);
                let kept = input.trim_ascii_end();
                let first = kept.iter().position(|&b| b != b';' && !b.is_ascii_whitespace());
                prop_assert!(first.is_some());
                let trimmed_len = kept
                    .iter()
                    .rposition(|&b| b != b';' && !b.is_ascii_whitespace())
                    .map_or(0, |i| i + 1);
                prop_assert_eq!(&out[..trimmed_len], &input[..trimmed_len]);
            }
        }

        /// The SPEC's invariant: after rewriting, SameSite=None implies Secure.
        #[test]
        fn same_site_none_always_secure(input in cookie_bytes(), policy in any_policy()) {
            let out = rewrite_set_cookie(&input, &policy).unwrap_or_else(|| input.clone());
            let present = match out.iter().position(|&b| b == b';') {
                Some(semi) => scan(&out[semi + 1..]),
                None => Present::default(),
            };
            if present.same_site == Some(true) {
                prop_assert!(present.secure);
            }
        }
    }
}

//! Request-path normalization: the single place that decides which path the
//! policies judge and which path the upstream receives.
//!
//! Path-confusion bypasses (CVE-2019-9901, CVE-2021-29492, CVE-2025-32431,
//! CVE-2025-66490, CVE-2026-26205 and their kin) all come from a proxy judging
//! one spelling of a path while the upstream resolves another. [`normalize`]
//! therefore produces one canonical spelling that is both matched against the
//! routes and forwarded, and rejects outright the spellings whose meaning
//! differs between upstreams (an encoded `/` or `\`, a NUL, a raw `\`, a
//! fragment, `..` above the root), so that no upstream can read a different
//! path than the one the policies saw.
//!
//! The canonical form:
//! - percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are
//!   decoded, every other percent-encoding is kept with uppercase hex, so that
//!   `%2e%2e` is recognised as `..` and `%61dmin` as `admin`;
//! - bytes that may not appear raw in a path (space, `"`, `<`, `>`, `?`, `[`,
//!   `]`, `^`, `` ` ``, `{`, `|`, `}`, control characters and non-ASCII) are
//!   percent-encoded, so two spellings of the same path compare equal and the
//!   forwarded request line can never be split or given a query by the path;
//! - repeated slashes are merged *before* dot-segments are resolved, which is
//!   how nginx, Tomcat and most servers read them, so `/a//..` is `/` and a
//!   leading `//` can never be read as an authority;
//! - `.` and `..` segments are resolved as in RFC 3986 section 5.2.4, except
//!   that a `..` that would climb above the root is an error instead of being
//!   silently clamped: a client that sends one is probing, and clamping would
//!   judge a path the client never asked for;
//! - a trailing slash is kept: `/admin/` and `/admin` may be different
//!   resources to the upstream, and route matching treats both alike.
//!
//! The result is pure ASCII and normalizing it again changes nothing.

use std::fmt;

/// The result of normalizing a request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalizedPath {
    /// What the upstream receives and what is logged: decoded unreserved chars, dot-segments resolved, slashes merged. Always starts with '/'. `;params` are KEPT here.
    pub path: String,
    /// `path` without `;parameters`, when it had any (see [`Self::match_path`]);
    /// `None` saves a copy of the path on almost every request.
    stripped: Option<String>,
}

impl NormalizedPath {
    /// What route matching uses: `path` with each segment's `;parameters` suffix removed (`/admin;jsessionid=1/x` -> `/admin/x`).
    ///
    /// A segment that is nothing but parameters (`/;x/admin`) disappears
    /// entirely, as it does in servlet containers, so it cannot be used to
    /// slip an empty segment in front of a protected prefix.
    pub fn match_path(&self) -> &str {
        self.stripped.as_deref().unwrap_or(&self.path)
    }
}

/// Why a request path was refused; every variant is answered with a 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// `%2F`: upstreams disagree on whether it separates segments.
    EncodedSlash,
    /// `%5C`: some upstreams (IIS, Windows file servers) read it as a separator.
    EncodedBackslash,
    /// A raw NUL or `%00`: C-based upstreams truncate the path there.
    Nul,
    /// A raw `\`: some upstreams read it as a separator.
    Backslash,
    /// A `#`: a fragment is never sent by a conforming client, and parsers
    /// drop it, each at a different place.
    Fragment,
    /// `..%3B...` or `.%3B...`: a dot-segment hidden behind an encoded `;`,
    /// which an upstream that decodes before stripping parameters resolves.
    EncodedDotSegment,
    /// A `..` that would climb above the root.
    AboveRoot,
    /// The path is empty or does not start with `/` (this includes the
    /// asterisk form `*` and the authority form of CONNECT targets, which the
    /// caller must handle before normalizing).
    NotAbsolute,
    /// A `%` not followed by two hexadecimal digits.
    InvalidEncoding,
}

impl PathError {
    /// A human sentence for the JSON error body.
    pub fn message(self) -> &'static str {
        match self {
            Self::EncodedSlash => "the path contains an encoded '/' (%2F)",
            Self::EncodedBackslash => "the path contains an encoded '\\' (%5C)",
            Self::Nul => "the path contains a NUL character (raw or %00)",
            Self::Backslash => "the path contains a '\\'",
            Self::Fragment => "the request target contains a fragment ('#')",
            Self::AboveRoot => "the path uses '..' to climb above the root",
            Self::EncodedDotSegment => {
                "the path hides a '.' or '..' segment behind an encoded ';' (%3B)"
            }
            Self::NotAbsolute => "the path does not start with '/'",
            Self::InvalidEncoding => {
                "the path contains a '%' that is not followed by two hexadecimal digits"
            }
        }
    }
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for PathError {}

/// Normalizes the path component of a request target (without its query).
///
/// Errors are reported for the first offending byte from the left, except
/// that [`PathError::NotAbsolute`] is decided on the first byte alone. An
/// empty path is [`PathError::NotAbsolute`]: HTTP/1.1 and HTTP/2 both require
/// a client to send at least `/`, so an empty one comes from a caller that
/// passed the wrong component.
pub fn normalize(raw_path: &str) -> Result<NormalizedPath, PathError> {
    let raw = raw_path.as_bytes();
    if raw.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }

    // Invariant between segments: `path` ends with '/' and holds only
    // regular segments (non-empty, not a dot-segment), so resolving `..`
    // only ever needs to look back to the previous '/'.
    let mut path = String::with_capacity(raw.len());
    path.push('/');
    let mut segment = SegmentCursor::starting_at(path.len());

    let mut index = 1;
    while let Some(&byte) = raw.get(index) {
        match byte {
            b'/' => {
                segment.finish(&mut path, SegmentEnd::Slash)?;
                segment = SegmentCursor::starting_at(path.len());
            }
            b'%' => {
                let decoded = raw
                    .get(index + 1)
                    .and_then(|&high| hex_value(high))
                    .zip(raw.get(index + 2).and_then(|&low| hex_value(low)))
                    .map(|(high, low)| (high << 4) | low)
                    .ok_or(PathError::InvalidEncoding)?;
                match decoded {
                    b'/' => return Err(PathError::EncodedSlash),
                    b'\\' => return Err(PathError::EncodedBackslash),
                    0 => return Err(PathError::Nul),
                    _ if is_unreserved(decoded) => path.push(char::from(decoded)),
                    // Reserved characters (`%3B`, `%3F`, `%23`, ...) stay
                    // encoded: decoding them would turn data into structure.
                    _ => push_percent_encoded(&mut path, decoded),
                }
                index += 3;
                continue;
            }
            b';' => {
                segment.note_parameters(path.len());
                path.push(';');
            }
            b'\\' => return Err(PathError::Backslash),
            b'#' => return Err(PathError::Fragment),
            0 => return Err(PathError::Nul),
            _ if may_appear_raw(byte) => path.push(char::from(byte)),
            _ => push_percent_encoded(&mut path, byte),
        }
        index += 1;
    }
    segment.finish(&mut path, SegmentEnd::EndOfPath)?;

    let stripped = without_parameters(&path)?;
    Ok(NormalizedPath { path, stripped })
}

/// Where the segment being built starts in the output, and where its
/// `;parameters` start if it has any.
struct SegmentCursor {
    start: usize,
    parameters_start: Option<usize>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SegmentEnd {
    Slash,
    EndOfPath,
}

impl SegmentCursor {
    fn starting_at(start: usize) -> Self {
        Self {
            start,
            parameters_start: None,
        }
    }

    fn note_parameters(&mut self, at: usize) {
        self.parameters_start.get_or_insert(at);
    }

    /// Resolves the segment that occupies `path[self.start..]`.
    fn finish(&self, path: &mut String, end: SegmentEnd) -> Result<(), PathError> {
        let segment = &path.as_bytes()[self.start..];
        if segment.is_empty() {
            // An empty segment is a repeated slash (or the root): merged.
            return Ok(());
        }
        // The dot-segment test ignores `;parameters` because Tomcat and
        // other servlet containers strip them before resolving dot-segments:
        // `/public/..;/admin` is `/admin` to them, so it must be `/admin`
        // here too, or the policies would judge `/public/..;/admin`.
        let name_end = self.parameters_start.unwrap_or(path.len());
        match &path.as_bytes()[self.start..name_end] {
            b"." => path.truncate(self.start),
            b".." => {
                // `self.start - 1` is the '/' before this segment; the one
                // before that begins the parent segment.
                if self.start <= 1 {
                    return Err(PathError::AboveRoot);
                }
                let parent_start = path[..self.start - 1].rfind('/').map_or(1, |at| at + 1);
                path.truncate(parent_start);
            }
            _ => {
                if end == SegmentEnd::Slash {
                    path.push('/');
                }
            }
        }
        Ok(())
    }
}

/// `path` with every segment's `;parameters` removed and the segments that
/// were nothing but parameters dropped. An encoded `;` (`%3B`) starts
/// parameters too: an upstream that decodes before it strips parameters
/// would read `/admin%3Bx` as `/admin`, so the proxy must judge it as that.
fn without_parameters(path: &str) -> Result<Option<String>, PathError> {
    if !path.contains(';') && !path.contains("%3B") {
        return Ok(None);
    }
    let mut stripped = String::with_capacity(path.len());
    let mut segments = path[1..].split('/').peekable();
    while let Some(segment) = segments.next() {
        let name_end = [segment.find(';'), segment.find("%3B")]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(segment.len());
        let name = &segment[..name_end];
        // Raw `;` dot-segments were resolved already; these can only be `%3B` ones.
        if name == "." || name == ".." {
            return Err(PathError::EncodedDotSegment);
        }
        if !name.is_empty() {
            stripped.push('/');
            stripped.push_str(name);
        } else if segments.peek().is_none() {
            // The last segment was only parameters (`/admin/;x`): keep the
            // trailing slash it stood behind.
            stripped.push('/');
        }
    }
    Ok((stripped != path).then_some(stripped))
}

/// The value of one hexadecimal digit; shared by every parser of `%XX` and chunk sizes.
pub(crate) fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

fn push_percent_encoded(path: &mut String, byte: u8) {
    const UPPER_HEX: &[u8; 16] = b"0123456789ABCDEF";
    path.push('%');
    path.push(char::from(UPPER_HEX[usize::from(byte >> 4)]));
    path.push(char::from(UPPER_HEX[usize::from(byte & 0x0F)]));
}

/// RFC 3986 `unreserved`.
fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 `pchar` minus `%` and `;`, which the caller handles itself.
fn may_appear_raw(byte: u8) -> bool {
    is_unreserved(byte)
        || matches!(
            byte,
            b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'=' | b':' | b'@'
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok(path: &str, match_path: &str) -> Result<NormalizedPath, PathError> {
        Ok(NormalizedPath {
            path: path.to_owned(),
            stripped: (match_path != path).then(|| match_path.to_owned()),
        })
    }

    fn same(path: &str) -> Result<NormalizedPath, PathError> {
        ok(path, path)
    }

    #[test]
    fn table() {
        use PathError::*;
        let cases: &[(&str, Result<NormalizedPath, PathError>)] = &[
            // Already canonical.
            ("/", same("/")),
            ("/admin", same("/admin")),
            ("/admin/", same("/admin/")),
            ("/api/v1/orders", same("/api/v1/orders")),
            ("/a-b_c~d.e", same("/a-b_c~d.e")),
            ("/a!$&'()*+,=:@b", same("/a!$&'()*+,=:@b")),
            ("/...", same("/...")),
            ("/.hidden/..x/x..", same("/.hidden/..x/x..")),
            // Unreserved characters are decoded (`/%61dmin` is `/admin`).
            ("/%61dmin", same("/admin")),
            ("/%41%5a%7e%2D%5F", same("/AZ~-_")),
            ("/%30%39", same("/09")),
            // Other encodings stay, uppercased.
            ("/a%3ab", same("/a%3Ab")),
            ("/a%20b", same("/a%20b")),
            ("/%c3%a9", same("/%C3%A9")),
            ("/%25", same("/%25")),
            ("/%252F", same("/%252F")),
            // Raw bytes that may not appear in a path get encoded.
            ("/a b", same("/a%20b")),
            ("/a?b", same("/a%3Fb")),
            ("/é", same("/%C3%A9")),
            ("/{x}|\"", same("/%7Bx%7D%7C%22")),
            ("/a\r\nb", same("/a%0D%0Ab")),
            // Dot-segments are resolved.
            ("/./admin", same("/admin")),
            ("/public/../admin", same("/admin")),
            ("/a/b/../../c", same("/c")),
            ("/a/./b/.", same("/a/b/")),
            ("/a/..", same("/")),
            ("/a/../", same("/")),
            ("/.", same("/")),
            ("/./", same("/")),
            ("/%2e%2e/", Err(AboveRoot)),
            ("/public/%2e%2e/admin", same("/admin")),
            ("/public/.%2E/admin", same("/admin")),
            ("/public/%2e/admin", same("/public/admin")),
            // Repeated slashes are merged, a leading `//` never names a host
            // (CVE-2026-26205).
            ("//admin", same("/admin")),
            ("//evil.example/admin", same("/evil.example/admin")),
            ("///a////b//", same("/a/b/")),
            ("/a//..", same("/")),
            ("//", same("/")),
            // `;parameters`: kept for the upstream, stripped for matching.
            ("/admin;x=1", ok("/admin;x=1", "/admin")),
            (
                "/admin;jsessionid=1/x",
                ok("/admin;jsessionid=1/x", "/admin/x"),
            ),
            ("/a;x;y/b;z", ok("/a;x;y/b;z", "/a/b")),
            ("/;x/admin", ok("/;x/admin", "/admin")),
            ("/admin/;x", ok("/admin/;x", "/admin/")),
            ("/admin;x/", ok("/admin;x/", "/admin/")),
            ("/;x", ok("/;x", "/")),
            // Tomcat reads `..;x` as `..`, so this does too.
            ("/public/..;/admin", same("/admin")),
            ("/public/..;x=1/admin", same("/admin")),
            ("/public/.;x/admin", same("/public/admin")),
            ("/public/%2e%2e;x/admin", same("/admin")),
            ("/..;x/admin", Err(AboveRoot)),
            ("/a/..;", same("/")),
            // Traefik CVE-2025-66490: encoded `;`, `?` and `#` are data, not
            // structure, so they stay encoded and are not parameters.
            // ... but an encoded `;` starts parameters for matching, since an
            // upstream may decode it before stripping them.
            ("/admin%3Bx=1", ok("/admin%3Bx=1", "/admin")),
            ("/admin%3bx", ok("/admin%3Bx", "/admin")),
            ("/admin%3Fx=1", same("/admin%3Fx=1")),
            ("/admin%23x", same("/admin%23x")),
            ("/..%3Bx/admin", Err(EncodedDotSegment)),
            ("/public/..%3B/admin", Err(EncodedDotSegment)),
            ("/admin%2f", Err(EncodedSlash)),
            ("/admin%5c", Err(EncodedBackslash)),
            ("/admin%00", Err(Nul)),
            // Envoy CVE-2019-9901 / CVE-2021-29492: encoded slashes.
            ("/public%2F..%2Fadmin", Err(EncodedSlash)),
            ("/public/..%2fadmin", Err(EncodedSlash)),
            ("/..%2fadmin", Err(EncodedSlash)),
            ("/%2F", Err(EncodedSlash)),
            ("/a%5Cb", Err(EncodedBackslash)),
            // Envoy CVE-2021-32779 and HAProxy CVE-2023-45539: fragments.
            ("/admin#", Err(Fragment)),
            ("/public#/../admin", Err(Fragment)),
            ("/index.html#.png", Err(Fragment)),
            // Traefik CVE-2025-32431: `/../` climbing out.
            ("/../admin", Err(AboveRoot)),
            ("/%2e%2e/admin", Err(AboveRoot)),
            ("/.%2e/admin", Err(AboveRoot)),
            ("/a/../../admin", Err(AboveRoot)),
            ("/./..", Err(AboveRoot)),
            ("/..", Err(AboveRoot)),
            ("//..", Err(AboveRoot)),
            // Raw NUL and backslash.
            ("/admin\0", Err(Nul)),
            ("/a\\b", Err(Backslash)),
            ("/\\admin", Err(Backslash)),
            // Bad encodings.
            ("/%", Err(InvalidEncoding)),
            ("/%4", Err(InvalidEncoding)),
            ("/%zz", Err(InvalidEncoding)),
            ("/%4g", Err(InvalidEncoding)),
            ("/%%41", Err(InvalidEncoding)),
            ("/%é", Err(InvalidEncoding)),
            // Not absolute.
            ("", Err(NotAbsolute)),
            ("admin", Err(NotAbsolute)),
            ("*", Err(NotAbsolute)),
            ("%2Fadmin", Err(NotAbsolute)),
            ("http://example.com/admin", Err(NotAbsolute)),
            // The first problem from the left is the one reported.
            ("/../%2F", Err(AboveRoot)),
            ("/%2F/..", Err(EncodedSlash)),
            ("/a#%zz", Err(Fragment)),
        ];
        let mut failures = Vec::new();
        for (raw, expected) in cases {
            let actual = normalize(raw);
            if &actual != expected {
                failures.push(format!("{raw:?}: expected {expected:?}, got {actual:?}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        assert!(cases.len() >= 40);
    }

    #[test]
    fn messages_are_sentences_without_trailing_period() {
        use PathError::*;
        for error in [
            EncodedSlash,
            EncodedBackslash,
            Nul,
            Backslash,
            Fragment,
            AboveRoot,
            EncodedDotSegment,
            NotAbsolute,
            InvalidEncoding,
        ] {
            let message = error.message();
            assert!(message.starts_with("the "), "{message}");
            assert!(!message.ends_with('.'), "{message}");
            assert_eq!(error.to_string(), message);
        }
    }

    fn assert_canonical(path: &str) {
        assert!(path.starts_with('/'), "{path:?}");
        assert!(path.is_ascii(), "{path:?}");
        assert!(!path.contains("//"), "{path:?}");
        for segment in path.split('/') {
            let name = segment.split(';').next().unwrap_or_default();
            assert!(name != "." && name != "..", "{path:?}");
        }
    }

    fn check_properties(raw: &str) {
        let Ok(normalized) = normalize(raw) else {
            return;
        };
        assert_canonical(&normalized.path);
        assert_canonical(normalized.match_path());
        assert!(!normalized.match_path().contains(';'), "{normalized:?}");
        assert_eq!(normalize(&normalized.path), Ok(normalized.clone()));
    }

    /// Strings built from the pieces that matter to normalization, so that
    /// most generated cases are near-valid paths rather than noise.
    fn path_like() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("/"),
            Just("."),
            Just(".."),
            Just(";"),
            Just(";x=1"),
            Just("a"),
            Just("B"),
            Just("%2e"),
            Just("%2E"),
            Just("%2f"),
            Just("%5C"),
            Just("%00"),
            Just("%3b"),
            Just("%41"),
            Just("%7e"),
            Just("%c3"),
            Just("%"),
            Just("%4"),
            Just("#"),
            Just("\\"),
            Just("\0"),
            Just("?"),
            Just(" "),
            Just("é"),
        ];
        proptest::collection::vec(piece, 0..24).prop_map(|pieces| pieces.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn arbitrary_strings_never_panic_and_results_are_canonical(raw in any::<String>()) {
            check_properties(&raw);
            check_properties(&format!("/{raw}"));
        }

        #[test]
        fn path_like_strings_are_canonical_and_idempotent(raw in path_like()) {
            check_properties(&raw);
            check_properties(&format!("/{raw}"));
        }

        #[test]
        fn canonical_paths_are_fixed_points(
            segments in proptest::collection::vec("[a-zA-Z0-9._~!$&'()*+,=:@-]{1,8}(;[a-z=]{0,4})?", 0..8),
            trailing_slash in any::<bool>(),
        ) {
            let regular: Vec<_> = segments
                .into_iter()
                .filter(|segment| {
                    let name = segment.split(';').next().unwrap_or_default();
                    name != "." && name != ".."
                })
                .collect();
            let mut path = format!("/{}", regular.join("/"));
            if trailing_slash && !path.ends_with('/') {
                path.push('/');
            }
            let normalized = normalize(&path);
            prop_assert_eq!(normalized.map(|n| n.path), Ok(path));
        }
    }
}

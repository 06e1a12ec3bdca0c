//! Reading JSON text in place: a string between its quotes (compared,
//! decoded), a number where it is written, the bytes between values.

use std::cmp::Ordering;

use serde_json::Number;

/// A string in the text: between its quotes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Str {
    pub(super) start: u32,
    /// The closing quote.
    pub(super) end: u32,
    pub(super) escaped: bool,
}

pub(super) fn to_pos(at: usize) -> u32 {
    u32::try_from(at).unwrap_or(u32::MAX)
}

/// The byte at `at`, NUL past the end (NUL never stands outside a string).
pub(super) fn byte(bytes: &[u8], at: u32) -> u8 {
    bytes.get(at as usize).copied().unwrap_or(0)
}

pub(super) fn skip_ws(bytes: &[u8], mut at: u32) -> u32 {
    // Indentation, eight spaces at a time.
    while bytes.get(at as usize..(at as usize).saturating_add(8)) == Some(b"        ") {
        at += 8;
    }
    while matches!(byte(bytes, at), b' ' | b'\t' | b'\n' | b'\r') {
        at += 1;
    }
    at
}

/// Past the whitespace and the comma after a value.
pub(super) fn after_comma(bytes: &[u8], end: u32) -> u32 {
    let at = skip_ws(bytes, end);
    if byte(bytes, at) == b',' { at + 1 } else { at }
}

/// The string whose opening quote is at `quote`.
pub(super) fn string_at(bytes: &[u8], quote: u32) -> Str {
    let start = quote.saturating_add(1);
    let mut at = start as usize;
    let mut escaped = false;
    loop {
        let rest = bytes.get(at..).unwrap_or_default();
        let Some(offset) = memchr::memchr2(b'"', b'\\', rest) else {
            return Str {
                start,
                end: to_pos(bytes.len()),
                escaped,
            };
        };
        at += offset;
        // Escapes often come in runs: read them here rather than search
        // again for each.
        loop {
            match bytes.get(at) {
                Some(b'"') => {
                    return Str {
                        start,
                        end: to_pos(at),
                        escaped,
                    };
                }
                // A backslash and the character it escapes; `\u`'s four hex
                // digits are neither a quote nor a backslash.
                Some(b'\\') => {
                    escaped = true;
                    at += 2;
                }
                _ => break,
            }
        }
    }
}

pub(super) fn raw(bytes: &[u8], string: Str) -> &[u8] {
    bytes
        .get(string.start as usize..string.end as usize)
        .unwrap_or_default()
}

/// Orders two strings of the text by their decoded bytes.
pub(super) fn compare(bytes: &[u8], left: Str, right: Str) -> Ordering {
    let (left_raw, right_raw) = (raw(bytes, left), raw(bytes, right));
    if left.escaped || right.escaped {
        Decoded::new(left_raw).cmp(Decoded::new(right_raw))
    } else {
        left_raw.cmp(right_raw)
    }
}

/// Orders a string of the text against `key` by decoded bytes.
pub(super) fn compare_key(bytes: &[u8], string: Str, key: &str) -> Ordering {
    let raw = raw(bytes, string);
    if string.escaped {
        Decoded::new(raw).cmp(key.bytes())
    } else {
        raw.cmp(key.as_bytes())
    }
}

/// Orders two strings by the positions of their opening quotes. Without
/// escapes the raw bytes order them, so it reads only as far as the first
/// difference, which sorting a table of names mostly finds early.
pub(super) fn compare_quotes(bytes: &[u8], left: u32, right: u32) -> Ordering {
    let (mut at_left, mut at_right) = (left.saturating_add(1), right.saturating_add(1));
    loop {
        let (this, that) = (byte(bytes, at_left), byte(bytes, at_right));
        if this == b'\\' || that == b'\\' {
            return compare(bytes, string_at(bytes, left), string_at(bytes, right));
        }
        // A NUL is past the end: raw, it cannot be in a string.
        match (matches!(this, b'"' | 0), matches!(that, b'"' | 0)) {
            (true, true) => return Ordering::Equal,
            (true, false) => return Ordering::Less,
            (false, true) => return Ordering::Greater,
            (false, false) if this != that => return this.cmp(&that),
            (false, false) => {}
        }
        at_left += 1;
        at_right += 1;
    }
}

/// Orders the string whose opening quote is at `quote` against `key`, as
/// [`compare_quotes`] does.
pub(super) fn compare_quote_key(bytes: &[u8], quote: u32, key: &str) -> Ordering {
    let mut at = quote.saturating_add(1);
    for &wanted in key.as_bytes() {
        match byte(bytes, at) {
            b'\\' => return compare_key(bytes, string_at(bytes, quote), key),
            b'"' | 0 => return Ordering::Less,
            found if found != wanted => return found.cmp(&wanted),
            _ => at += 1,
        }
    }
    match byte(bytes, at) {
        b'\\' => compare_key(bytes, string_at(bytes, quote), key),
        b'"' | 0 => Ordering::Equal,
        _ => Ordering::Greater,
    }
}

/// The number written at `pos` of `text`, as `serde_json` reads it.
/// `policy::json_dense` reads its numbers here too, so that both
/// representations show the validator the same values.
pub(in crate::policy) fn number_at(text: &str, pos: u32) -> Option<Number> {
    let bytes = text.as_bytes();
    if let Some(number) = small_integer(bytes, pos) {
        return Some(number);
    }
    // The rest (fractions, exponents, -0, integers past 18 digits) as
    // `serde_json` reads them, so that a `Value` would hold the same.
    let raw = text.get(pos as usize..scalar_end(bytes, pos) as usize)?;
    serde_json::from_str(raw).ok()
}

/// Where a number, `true`, `false` or `null` at `at` ends (exclusive).
pub(super) fn scalar_end(bytes: &[u8], mut at: u32) -> u32 {
    while matches!(byte(bytes, at), b'0'..=b'9' | b'a'..=b'z' | b'E' | b'+' | b'-' | b'.') {
        at += 1;
    }
    at
}

/// The number at `at`, if it is an integer `serde_json` holds as a `u64`
/// or an `i64`, read in one pass without its parser: up to 19 digits, or a
/// minus sign and up to 18 digits other than `-0` (which it holds as the
/// float -0.0).
pub(in crate::policy) fn small_integer(bytes: &[u8], at: u32) -> Option<Number> {
    let negative = byte(bytes, at) == b'-';
    let first = if negative { at + 1 } else { at };
    let mut end = first;
    let mut value = 0_u64;
    while let digit @ b'0'..=b'9' = byte(bytes, end) {
        // Wraps only past 19 digits, which are refused below.
        value = value.wrapping_mul(10).wrapping_add(u64::from(digit - b'0'));
        end += 1;
    }
    let digits = end - first;
    let longest = if negative { 18 } else { 19 };
    if digits == 0 || digits > longest || matches!(byte(bytes, end), b'.' | b'e' | b'E') {
        return None;
    }
    if !negative {
        return Some(Number::from(value));
    }
    if value == 0 {
        return None;
    }
    // 18 digits are below 10^18, well inside i64.
    i64::try_from(value).ok().map(|value| Number::from(-value))
}

/// Whether two strings' contents (the raw text between their quotes) are
/// the same string: byte for byte, or decoded when either has an escape.
pub(in crate::policy) fn same_content(left: &[u8], right: &[u8], escaped: bool) -> bool {
    if escaped {
        Decoded::new(left).eq(Decoded::new(right))
    } else {
        left == right
    }
}

/// The decoded bytes of a string's content, without allocating: what
/// comparing and ordering names need.
pub(in crate::policy) struct Decoded<'s> {
    rest: &'s [u8],
    pending: [u8; 4],
    pending_at: u8,
    pending_len: u8,
}

impl<'s> Decoded<'s> {
    pub(in crate::policy) fn new(raw: &'s [u8]) -> Self {
        Decoded {
            rest: raw,
            pending: [0; 4],
            pending_at: 0,
            pending_len: 0,
        }
    }
}

impl Iterator for Decoded<'_> {
    type Item = u8;

    fn next(&mut self) -> Option<u8> {
        if self.pending_at < self.pending_len {
            let next = self.pending.get(usize::from(self.pending_at)).copied();
            self.pending_at += 1;
            return next;
        }
        let (&first, rest) = self.rest.split_first()?;
        if first != b'\\' {
            self.rest = rest;
            return Some(first);
        }
        let (decoded, used) = unescape(self.rest);
        self.rest = self.rest.get(used..).unwrap_or_default();
        let encoded = decoded.encode_utf8(&mut self.pending).len();
        self.pending_len = u8::try_from(encoded).unwrap_or(0);
        self.pending_at = 1;
        self.pending.first().copied()
    }
}

/// The escape at the start of `raw` (a backslash first): the character and
/// how many bytes it took. Lone surrogates never get here (`serde_json`
/// refused them); anything malformed decodes to U+FFFD.
fn unescape(raw: &[u8]) -> (char, usize) {
    let simple = |c| (c, 2);
    match raw.get(1) {
        Some(b'"') => simple('"'),
        Some(b'\\') => simple('\\'),
        Some(b'/') => simple('/'),
        Some(b'b') => simple('\u{8}'),
        Some(b'f') => simple('\u{c}'),
        Some(b'n') => simple('\n'),
        Some(b'r') => simple('\r'),
        Some(b't') => simple('\t'),
        Some(b'u') => {
            let Some(high) = hex4(raw, 2) else {
                return (char::REPLACEMENT_CHARACTER, raw.len().min(6));
            };
            if (0xD800..0xDC00).contains(&high) {
                let low = hex4(raw, 8).filter(|low| (0xDC00..0xE000).contains(low));
                if let (Some(b"\\u"), Some(low)) = (raw.get(6..8), low) {
                    let code = 0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00);
                    return (
                        char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER),
                        12,
                    );
                }
                return (char::REPLACEMENT_CHARACTER, 6);
            }
            (
                char::from_u32(high).unwrap_or(char::REPLACEMENT_CHARACTER),
                6,
            )
        }
        _ => (char::REPLACEMENT_CHARACTER, raw.len().min(2)),
    }
}

fn hex4(raw: &[u8], at: usize) -> Option<u32> {
    let digits = raw.get(at..at + 4)?;
    digits.iter().try_fold(0_u32, |value, &digit| {
        Some(value * 16 + char::from(digit).to_digit(16)?)
    })
}

pub(in crate::policy) fn decode(raw: &[u8]) -> String {
    let mut decoded = Vec::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(at) = memchr::memchr(b'\\', rest) {
        decoded.extend_from_slice(rest.get(..at).unwrap_or_default());
        let escape = rest.get(at..).unwrap_or_default();
        let (character, used) = unescape(escape);
        decoded.extend_from_slice(character.encode_utf8(&mut [0; 4]).as_bytes());
        rest = escape.get(used..).unwrap_or_default();
    }
    decoded.extend_from_slice(rest);
    String::from_utf8(decoded)
        .unwrap_or_else(|invalid| String::from_utf8_lossy(invalid.as_bytes()).into_owned())
}

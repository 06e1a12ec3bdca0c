//! The dense pass's syntax checks, made as `serde_json` makes them but
//! without decoding anything: a string's closing quote and whether it has
//! an escape, an escape's end, a number's end (only where the number is
//! surely inside `f64`'s range).

/// The string whose opening quote is at `quote`, checked as `serde_json`
/// checks it: its closing quote and whether it has an escape.
pub(super) fn scan_string(bytes: &[u8], quote: usize) -> Option<(usize, bool)> {
    let mut at = quote + 1;
    let mut escaped = false;
    loop {
        at = plain_run(bytes, at);
        // One of the next eight bytes needs a look, or the text ends.
        while let Some(&byte) = bytes.get(at)
            && byte != b'"'
            && byte != b'\\'
            && byte >= 0x20
        {
            at += 1;
        }
        match *bytes.get(at)? {
            b'"' => return Some((at, escaped)),
            b'\\' => {
                escaped = true;
                at = escape_end(bytes, at)?;
            }
            // A control character, which must be escaped.
            _ => return None,
        }
    }
}

/// Past the bytes from `at` that need no look: eight at a time while none
/// of them is a quote, a backslash or a control character.
fn plain_run(bytes: &[u8], mut at: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    while let Some(chunk) = bytes.get(at..at + 8) {
        let Ok(chunk) = <[u8; 8]>::try_from(chunk) else {
            break;
        };
        let word = u64::from_le_bytes(chunk);
        let quote = word ^ (ONES * u64::from(b'"'));
        let backslash = word ^ (ONES * u64::from(b'\\'));
        // Each term has a high bit set if and only if some byte is zero
        // (is below 0x20 for the last); a byte of 0x80 or more never is.
        let special = (quote.wrapping_sub(ONES) & !quote)
            | (backslash.wrapping_sub(ONES) & !backslash)
            | (word.wrapping_sub(ONES * 0x20) & !word);
        if special & HIGHS != 0 {
            break;
        }
        at += 8;
    }
    at
}

/// Where the escape at `at` (a backslash) ends, if `serde_json` accepts it:
/// a surrogate must be a high one followed by a low one.
fn escape_end(bytes: &[u8], at: usize) -> Option<usize> {
    match *bytes.get(at + 1)? {
        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Some(at + 2),
        b'u' => match hex4(bytes, at + 2)? {
            0xD800..=0xDBFF => {
                if bytes.get(at + 6..at + 8)? != b"\\u" {
                    return None;
                }
                let low = hex4(bytes, at + 8)?;
                (0xDC00..=0xDFFF).contains(&low).then_some(at + 12)
            }
            0xDC00..=0xDFFF => None,
            _ => Some(at + 6),
        },
        _ => None,
    }
}

fn hex4(bytes: &[u8], at: usize) -> Option<u32> {
    bytes
        .get(at..at + 4)?
        .iter()
        .try_fold(0_u32, |value, &digit| {
            Some(value * 16 + char::from(digit).to_digit(16)?)
        })
}

/// Where the number at `at` ends, if it is written as JSON allows and is
/// surely inside `f64`'s range: at most 200 integer digits and a two-digit
/// exponent (below 10^300). Longer ones are left to the tape.
pub(super) fn scan_number(bytes: &[u8], at: usize) -> Option<usize> {
    let digits = |mut from: usize| {
        while bytes.get(from).is_some_and(u8::is_ascii_digit) {
            from += 1;
        }
        from
    };
    let mut end = at;
    if bytes.get(end) == Some(&b'-') {
        end += 1;
    }
    let integer = end;
    end = match *bytes.get(end)? {
        b'0' => end + 1,
        b'1'..=b'9' => digits(end + 1),
        _ => return None,
    };
    if end - integer > 200 {
        return None;
    }
    if bytes.get(end) == Some(&b'.') {
        let fraction = end + 1;
        end = digits(fraction);
        if end == fraction || end - at > 400 {
            return None;
        }
    }
    if let Some(b'e' | b'E') = bytes.get(end) {
        end += 1;
        if let Some(b'+' | b'-') = bytes.get(end) {
            end += 1;
        }
        let exponent = end;
        end = digits(exponent);
        if end == exponent || end - exponent > 2 {
            return None;
        }
    }
    Some(end)
}

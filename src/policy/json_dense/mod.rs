//! A small request body of a `json_schema` route as a dense tape: one
//! 16-byte entry per value (names included) in document order, built by one
//! pass over the text that also checks its syntax. Walking it follows
//! indices instead of reading the text again, which is what makes a small
//! body quick to validate; [`json_tape::Document`] instead re-reads its
//! small containers each time the validator looks at them.
//!
//! The price is memory: up to 8 bytes per byte of body (`[0,0,...]` is an
//! entry for every two bytes), against under one for the tape. So
//! `policy::schema` uses this only for bodies up to a threshold and the
//! tape past it.
//!
//! The pass accepts only what `serde_json::from_str::<Value>` accepts, and
//! gives up ([`Document::parse`] returns `None`) on whatever it is not sure
//! of: every syntax error, a lone surrogate escape, a number that might be
//! out of `f64`'s range, nesting at `serde_json`'s limit. The caller then
//! parses with the tape, whose strict `serde_json` pass decides, and says
//! where, as before. What this accepts it shows the validator exactly as
//! the tape would: numbers are read by the tape's own function, escapes
//! decoded by its decoder, a repeated name is won by its last occurrence
//! at that occurrence's place, members come in document order.

use std::borrow::Cow;
use std::cmp::Ordering;

use serde_json::Number;

use crate::policy::json_tape::{Decoded, decode, same_content, small_integer};

mod node;
mod scan;
#[cfg(test)]
mod tests;

pub use node::{DenseArray, DenseNode, DenseObject, Elements, Members};
use scan::{scan_number, scan_string};

/// `serde_json` refuses this many nested containers; the pass gives up at
/// it and leaves the refusal (and its message) to the tape.
const MAX_DEPTH: usize = 128;

/// Objects of up to this many members are checked for a repeated name by
/// comparing each name with those after it; larger ones by sorting.
const PAIRWISE_NAMES: usize = 16;

/// The representation, for `jsonschema::options_for::<Dense>()`.
pub struct Dense;

/// A parsed body: its text and an entry per value.
pub struct Document<'a> {
    text: &'a str,
    /// The top-level value first, then each value after the one before it
    /// in the text; an object's members are its name then its value.
    entries: Vec<Entry>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    kind: Kind,
    /// [`ESCAPED`], [`SHADOWED`], [`REPEATS`].
    flags: u8,
    /// Where the value starts: its opening quote or bracket, its first
    /// character.
    pos: u32,
    /// A string: its closing quote. A container: the index of the first
    /// entry after its last descendant. A number: see [`UNSIGNED`].
    end: u32,
    /// A container: its items, or its distinct names. A number: see
    /// [`UNSIGNED`].
    count: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Null,
    True,
    False,
    Number,
    String,
    Array,
    Object,
}

/// A string with an escape: decoded when read.
const ESCAPED: u8 = 1;
/// A name that a later member of its object repeats: that one wins.
const SHADOWED: u8 = 2;
/// An object with a name written twice.
const REPEATS: u8 = 4;
/// A number `serde_json` holds as a `u64`, kept in `end` and `count`.
const UNSIGNED: u8 = 8;
/// A number `serde_json` holds as an `i64`, kept in `end` and `count`.
const SIGNED: u8 = 16;

impl Entry {
    fn is_container(&self) -> bool {
        matches!(self.kind, Kind::Array | Kind::Object)
    }

    /// Keeps a number's integer value in the entry, so that the validator
    /// (which reads most numbers twice: `type`, then `minimum`) reads it
    /// without parsing. Other numbers are parsed when read.
    fn keep_integer(&mut self, number: Option<Number>) {
        let Some(number) = number else { return };
        let bits = if let Some(value) = number.as_u64() {
            self.flags |= UNSIGNED;
            value
        } else if let Some(value) = number.as_i64() {
            self.flags |= SIGNED;
            u64::from_ne_bytes(value.to_ne_bytes())
        } else {
            return;
        };
        // The low half, then the high half.
        self.end = (bits & u64::from(u32::MAX)) as u32;
        self.count = (bits >> 32) as u32;
    }

    /// The integer [`Entry::keep_integer`] kept.
    fn integer(&self) -> Option<Number> {
        let bits = u64::from(self.end) | (u64::from(self.count) << 32);
        if self.flags & UNSIGNED != 0 {
            Some(Number::from(bits))
        } else if self.flags & SIGNED != 0 {
            Some(Number::from(i64::from_ne_bytes(bits.to_ne_bytes())))
        } else {
            None
        }
    }
}

impl<'a> Document<'a> {
    /// Parses `text`, or returns `None` for anything the pass is not sure
    /// `serde_json` accepts (all that it refuses included).
    pub fn parse(text: &'a str) -> Option<Document<'a>> {
        let bytes = text.as_bytes();
        if u32::try_from(bytes.len()).is_err() {
            return None;
        }
        // Every value takes at least one byte of its own and one between it
        // and the next, so this is never outgrown: no reallocation, and a
        // known bound for the caller.
        let mut entries: Vec<Entry> = Vec::with_capacity(bytes.len() / 2 + 1);
        // The open containers, innermost last.
        let mut open: Vec<Open> = Vec::with_capacity(16);
        // Reused by every object checked for repeated names.
        let mut names: Vec<u32> = Vec::new();
        let mut at = skip_ws(bytes, 0);
        'value: loop {
            // A value starts at `at`.
            let first = *bytes.get(at)?;
            let pos = to_pos(at);
            let mut entry = Entry {
                kind: Kind::Null,
                flags: 0,
                pos,
                end: 0,
                count: 0,
            };
            if let Some(parent) = open.last_mut()
                && !parent.object
            {
                parent.count += 1;
            }
            match first {
                b'"' => {
                    let (close, escaped) = scan_string(bytes, at)?;
                    entry.kind = Kind::String;
                    entry.end = to_pos(close);
                    entry.flags = if escaped { ESCAPED } else { 0 };
                    entries.push(entry);
                    at = close + 1;
                }
                b'[' | b'{' => {
                    if open.len() + 1 >= MAX_DEPTH {
                        return None;
                    }
                    entry.kind = if first == b'[' {
                        Kind::Array
                    } else {
                        Kind::Object
                    };
                    open.push(Open {
                        index: to_pos(entries.len()),
                        count: 0,
                        object: first == b'{',
                    });
                    entries.push(entry);
                    at = skip_ws(bytes, at + 1);
                    match (first, *bytes.get(at)?) {
                        (b'[', b']') | (b'{', b'}') => {
                            at += 1;
                            close(bytes, &mut entries, &mut open, &mut names)?;
                        }
                        (b'[', _) => continue 'value,
                        _ => {
                            at = name(bytes, at, &mut entries, &mut open)?;
                            continue 'value;
                        }
                    }
                }
                b't' | b'f' | b'n' => {
                    let (kind, word): (Kind, &[u8]) = match first {
                        b't' => (Kind::True, b"true"),
                        b'f' => (Kind::False, b"false"),
                        _ => (Kind::Null, b"null"),
                    };
                    if bytes.get(at..at + word.len()) != Some(word) {
                        return None;
                    }
                    entry.kind = kind;
                    entries.push(entry);
                    at += word.len();
                }
                _ => {
                    at = scan_number(bytes, at)?;
                    entry.kind = Kind::Number;
                    entry.keep_integer(small_integer(bytes, pos));
                    entries.push(entry);
                }
            }
            // After a value: a comma and the next, or the end of containers.
            loop {
                at = skip_ws(bytes, at);
                let Some(top) = open.last() else {
                    // The top-level value: nothing may follow.
                    return (at == bytes.len()).then_some(Document { text, entries });
                };
                match (*bytes.get(at)?, top.object) {
                    (b',', false) => {
                        at = skip_ws(bytes, at + 1);
                        continue 'value;
                    }
                    (b',', true) => {
                        at = name(bytes, skip_ws(bytes, at + 1), &mut entries, &mut open)?;
                        continue 'value;
                    }
                    (b']', false) | (b'}', true) => {
                        at += 1;
                        close(bytes, &mut entries, &mut open, &mut names)?;
                    }
                    _ => return None,
                }
            }
        }
    }

    pub fn root(&self) -> DenseNode<'_> {
        DenseNode::at(self, 0)
    }

    /// Bytes held besides the text itself.
    pub fn heap_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<Entry>()
    }

    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    fn entry(&self, index: u32) -> Option<&Entry> {
        self.entries.get(index as usize)
    }

    /// The index of the first entry after the value at `index`.
    fn after(&self, index: u32) -> u32 {
        match self.entry(index) {
            Some(entry) if entry.is_container() => entry.end,
            _ => index.saturating_add(1),
        }
    }

    /// The raw text between a string's quotes.
    fn raw(&self, entry: &Entry) -> &'a [u8] {
        raw_string(self.bytes(), entry)
    }

    fn string(&self, entry: &Entry) -> Cow<'a, str> {
        if entry.flags & ESCAPED != 0 {
            return Cow::Owned(decode(self.raw(entry)));
        }
        Cow::Borrowed(
            self.text
                .get(entry.pos as usize + 1..entry.end as usize)
                .unwrap_or_default(),
        )
    }

    fn string_is(&self, entry: &Entry, key: &str) -> bool {
        let raw = self.raw(entry);
        if entry.flags & ESCAPED != 0 {
            Decoded::new(raw).eq(key.bytes())
        } else {
            raw == key.as_bytes()
        }
    }
}

/// A container open while parsing.
struct Open {
    /// Its entry.
    index: u32,
    /// Items, or names written.
    count: u32,
    object: bool,
}

fn to_pos(at: usize) -> u32 {
    u32::try_from(at).unwrap_or(u32::MAX)
}

fn skip_ws(bytes: &[u8], mut at: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = bytes.get(at) {
        at += 1;
    }
    at
}

/// A member's name at `at` (its opening quote) and the colon after it;
/// returns where its value starts.
fn name(bytes: &[u8], at: usize, entries: &mut Vec<Entry>, open: &mut [Open]) -> Option<usize> {
    if bytes.get(at) != Some(&b'"') {
        return None;
    }
    let (close, escaped) = scan_string(bytes, at)?;
    entries.push(Entry {
        kind: Kind::String,
        flags: if escaped { ESCAPED } else { 0 },
        pos: to_pos(at),
        end: to_pos(close),
        count: 0,
    });
    open.last_mut()?.count += 1;
    let colon = skip_ws(bytes, close + 1);
    if bytes.get(colon) != Some(&b':') {
        return None;
    }
    Some(skip_ws(bytes, colon + 1))
}

/// Closes the innermost open container: where it ends, and for an object
/// which of its names a later one repeats.
fn close(
    bytes: &[u8],
    entries: &mut [Entry],
    open: &mut Vec<Open>,
    names: &mut Vec<u32>,
) -> Option<()> {
    let Open {
        index,
        count,
        object,
    } = open.pop()?;
    let end = to_pos(entries.len());
    let container = entries.get_mut(index as usize)?;
    container.end = end;
    container.count = count;
    if !object || count < 2 {
        return Some(());
    }
    // The name after the member whose name is at `name`.
    let next_name = |name: u32| match entries.get(name as usize + 1) {
        Some(value) if value.is_container() => value.end,
        _ => name + 2,
    };
    let same =
        |left: u32, right: u32| match (entries.get(left as usize), entries.get(right as usize)) {
            (Some(left), Some(right)) => same_name(bytes, left, right),
            _ => false,
        };
    let mut shadowed: Vec<u32> = Vec::new();
    if count as usize <= PAIRWISE_NAMES {
        let mut this = index + 1;
        while this < end {
            let mut later = next_name(this);
            while later < end && !same(this, later) {
                later = next_name(later);
            }
            if later < end {
                shadowed.push(this);
            }
            this = next_name(this);
        }
    } else {
        names.clear();
        let mut name = index + 1;
        while name < end {
            names.push(name);
            name = next_name(name);
        }
        // By name, then place: all but the last of each run are shadowed.
        names.sort_unstable_by(|&left, &right| {
            match (entries.get(left as usize), entries.get(right as usize)) {
                (Some(l), Some(r)) => compare_names(bytes, l, r).then(left.cmp(&right)),
                _ => left.cmp(&right),
            }
        });
        for pair in names.windows(2) {
            if let [this, next] = *pair
                && same(this, next)
            {
                shadowed.push(this);
            }
        }
    }
    if shadowed.is_empty() {
        return Some(());
    }
    for &name in &shadowed {
        if let Some(entry) = entries.get_mut(name as usize) {
            entry.flags |= SHADOWED;
        }
    }
    let container = entries.get_mut(index as usize)?;
    container.flags |= REPEATS;
    container.count -= to_pos(shadowed.len());
    Some(())
}

/// Whether two names decode alike. Unescaped ones mostly differ in length
/// or in their first byte, which are looked at before the rest.
fn same_name(bytes: &[u8], left: &Entry, right: &Entry) -> bool {
    let escaped = (left.flags | right.flags) & ESCAPED != 0;
    let (left, right) = (raw_string(bytes, left), raw_string(bytes, right));
    if escaped {
        return same_content(left, right, true);
    }
    left.len() == right.len() && left.first() == right.first() && left == right
}

/// Orders two names by their decoded bytes.
fn compare_names(bytes: &[u8], left: &Entry, right: &Entry) -> Ordering {
    let escaped = (left.flags | right.flags) & ESCAPED != 0;
    let (left, right) = (raw_string(bytes, left), raw_string(bytes, right));
    if escaped {
        Decoded::new(left).cmp(Decoded::new(right))
    } else {
        left.cmp(right)
    }
}

/// The raw text between the quotes of the string `entry` is.
fn raw_string<'b>(bytes: &'b [u8], entry: &Entry) -> &'b [u8] {
    bytes
        .get(entry.pos as usize + 1..entry.end as usize)
        .unwrap_or_default()
}

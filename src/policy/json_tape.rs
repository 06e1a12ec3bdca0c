//! The request body of a `json_schema` route as a read-only JSON document
//! for the validator, at under the body's own size rather than the ~90
//! times a `serde_json::Value` tree takes (1 MiB of `[{"a":1},...]` was
//! 87 MiB as a tree).
//!
//! A node is a byte position in the body. A scalar is read where it is
//! written: a number is parsed when asked for (with `serde_json`'s rules),
//! a string without escapes is borrowed and one with escapes decoded when
//! asked for. So scalars cost nothing, and what is stored is only what
//! cannot be found by reading a few bytes forward, in three sorted arrays:
//!
//! - `entries`, 16 bytes for each container that owns at least
//!   [`OWN_BYTES`] bytes (its span less the spans of the containers inside
//!   it that have an entry), and for each object of [`TABLE_MEMBERS`]
//!   members or more: where it ends and how many items or distinct names it
//!   has. A container without one is skipped or counted by reading its
//!   bytes, which costs under [`OWN_BYTES`] bytes plus one jump over each
//!   child that has an entry. Every byte is owned by one container at most,
//!   so entries take at most 16 / [`OWN_BYTES`] of the body.
//! - `names`, 4 bytes per distinct member of each object with an entry of
//!   [`TABLE_MEMBERS`] members or more: its names, sorted, so that `get` is
//!   a binary search. A member is at least 5 bytes (`"":0,`).
//! - `repeated`, 4 bytes per object with a name written twice: as with
//!   `serde_json::Value`, the last one wins, and the others are skipped.
//!
//! The most measured (the tests, `examples/json_tape_bench.rs`): 0.82 times
//! the body kept and at the peak of the parse, for objects of 16 one-letter
//! names; 16 bytes for 1 MiB of `[{"a":1},...]`. The price is paid in CPU
//! while validating: a value is read again each time the validator looks
//! at it (a string with escapes decoded again), about twice the cost of
//! following a `Value`'s pointers. A parse that allocates nothing per value
//! more than makes up for it on most bodies.
//!
//! Before any of this, `serde_json` parses the text into nothing
//! ([`Strict`]): what is refused, and the line and column of why, are those
//! of `serde_json::from_str::<Value>`, its recursion limit included, and the
//! indexing after it reads known-good JSON. It still never indexes out of
//! bounds or panics, whatever the bytes.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::sync::OnceLock;

use jsonschema::json::{Array, Json, Node, NodeIdentity, Object};
use jsonschema::types::JsonType;
use jsonschema_value::LazyInstance;
use serde::Deserialize;
use serde::de::{MapAccess, SeqAccess, Visitor};
use serde_json::{Number, Value};

use crate::policy::json_in_place::{self, InPlace};

/// A container owning fewer bytes than this has no entry and is read instead.
/// 32 keeps entries under half the body's size while a read stays short.
pub const OWN_BYTES: u32 = 32;

/// An object with this many members or more gets a sorted table of its
/// names. Below it a linear scan is as fast as a binary search, and an
/// object this large owns at least 5 × 16 bytes, more than [`OWN_BYTES`].
pub const TABLE_MEMBERS: u32 = 16;

/// `Entry::names` of an object without a table.
const NO_TABLE: u32 = u32::MAX;
/// `Entry::names` of an object whose table the second pass has yet to build.
const PENDING_TABLE: u32 = u32::MAX - 1;

/// The representation, for `jsonschema::options_for::<Tape>()`.
pub struct Tape;

/// A parsed body: the text and what it takes to walk it.
pub struct Document<'a> {
    text: &'a str,
    /// Where the top-level value starts.
    root: u32,
    /// Sorted by `start`.
    entries: Box<[Entry]>,
    /// Tables of names, each sorted by decoded name: the position of each
    /// surviving name's opening quote.
    names: Box<[u32]>,
    /// Start of each object with a name written twice, sorted.
    repeated: Box<[u32]>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Position of the opening bracket.
    start: u32,
    /// Position of the closing bracket.
    end: u32,
    /// Items of an array; distinct names of an object.
    count: u32,
    /// Offset of the object's table in `Document::names` (of `count` names),
    /// or [`NO_TABLE`].
    names: u32,
}

/// Why a body is not a [`Document`].
#[derive(Debug)]
pub enum ParseError {
    /// Not JSON, as `serde_json` says.
    Syntax(serde_json::Error),
    /// Positions are `u32`: 4 GiB or more cannot be indexed.
    TooLarge,
}

impl<'a> Document<'a> {
    /// Parses `text` as strictly as `serde_json::from_str::<Value>`.
    pub fn parse(text: &'a str) -> Result<Document<'a>, ParseError> {
        if !u32::try_from(text.len()).is_ok_and(|length| length < u32::MAX) {
            return Err(ParseError::TooLarge);
        }
        let mut deserializer = serde_json::Deserializer::from_str(text);
        Strict::deserialize(&mut deserializer).map_err(ParseError::Syntax)?;
        deserializer.end().map_err(ParseError::Syntax)?;
        Ok(index(text))
    }

    pub fn root(&self) -> TapeNode<'_> {
        TapeNode(Repr::Body {
            doc: self,
            pos: self.root,
            slot: 0,
        })
    }

    /// Bytes held besides the text itself.
    pub fn heap_bytes(&self) -> usize {
        std::mem::size_of_val::<[Entry]>(&self.entries)
            + std::mem::size_of_val::<[u32]>(&self.names)
            + std::mem::size_of_val::<[u32]>(&self.repeated)
    }

    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    fn byte(&self, at: u32) -> u8 {
        byte(self.bytes(), at)
    }

    /// The entry of the container at `pos`, if it has one. `slot` is the
    /// index of the first entry starting at or after `pos`.
    fn entry(&self, pos: u32, slot: u32) -> Option<&Entry> {
        self.entries
            .get(slot as usize)
            .filter(|entry| entry.start == pos)
    }

    /// The index of the first entry starting after `end`, from `slot`
    /// (the entry of the container that ends there).
    fn slot_after(&self, slot: u32, end: u32) -> u32 {
        let from = slot as usize + 1;
        let rest = self.entries.get(from..).unwrap_or_default();
        // Galloping: most containers have no entry inside and the next one
        // is past the end, so this reads one entry where a binary search
        // over all those left would miss the cache some 15 times.
        let mut bound = 1;
        while rest.get(bound - 1).is_some_and(|entry| entry.start <= end) {
            bound *= 2;
        }
        let low = bound / 2;
        let skipped = rest
            .get(low..bound.min(rest.len()))
            .map_or(0, |range| range.partition_point(|entry| entry.start <= end));
        to_pos(from + low + skipped)
    }

    /// The index of the first entry starting at or after `pos`.
    fn slot_of(&self, pos: u32) -> u32 {
        to_pos(self.entries.partition_point(|entry| entry.start < pos))
    }

    /// Where the value at `pos` ends (exclusive); moves `slot` past the
    /// entries inside it.
    fn value_end(&self, pos: u32, slot: &mut u32) -> u32 {
        match self.byte(pos) {
            b'"' => string_at(self.bytes(), pos).end.saturating_add(1),
            b'[' | b'{' => self.container_end(pos, slot).saturating_add(1),
            _ => scalar_end(self.bytes(), pos),
        }
    }

    /// The position of the bracket closing the container at `pos`.
    fn container_end(&self, pos: u32, slot: &mut u32) -> u32 {
        if let Some(entry) = self.entry(pos, *slot) {
            *slot = self.slot_after(*slot, entry.end);
            return entry.end;
        }
        let bytes = self.bytes();
        let mut depth = 0_u32;
        let mut at = pos;
        loop {
            match byte(bytes, at) {
                b'"' => {
                    at = string_at(bytes, at).end;
                }
                b'[' | b'{' => {
                    if let Some(entry) = self.entry(at, *slot).filter(|_| at != pos) {
                        *slot = self.slot_after(*slot, entry.end);
                        at = entry.end;
                    } else {
                        depth += 1;
                    }
                }
                b']' | b'}' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        return at;
                    }
                }
                // Only past the end: JSON text has no NUL outside strings.
                0 => return at,
                _ => {}
            }
            at = at.saturating_add(1);
        }
    }

    /// The first item of the container at `pos` and the slot to go with it.
    fn first_child(&self, pos: u32, slot: u32) -> (u32, u32) {
        let slot = if self.entry(pos, slot).is_some() {
            slot + 1
        } else {
            slot
        };
        (pos.saturating_add(1), slot)
    }

    /// The member starting at or after `at` (whitespace first), or `None`
    /// at the closing brace: its name, its value, and where the next one
    /// starts.
    fn member<'d>(&'d self, at: u32, slot: u32) -> Option<Member<'d>> {
        let bytes = self.bytes();
        let quote = skip_ws(bytes, at);
        if byte(bytes, quote) != b'"' {
            return None;
        }
        let name = string_at(bytes, quote);
        let mut value = skip_ws(bytes, name.end.saturating_add(1));
        if byte(bytes, value) == b':' {
            value = skip_ws(bytes, value + 1);
        }
        let mut next_slot = slot;
        let end = self.value_end(value, &mut next_slot);
        Some(Member {
            name,
            value: TapeNode(Repr::Body {
                doc: self,
                pos: value,
                slot,
            }),
            next: after_comma(bytes, end),
            next_slot,
        })
    }

    /// The value of the member whose name's opening quote is at `quote`.
    fn member_value<'d>(&'d self, quote: u32) -> TapeNode<'d> {
        let bytes = self.bytes();
        let mut value = skip_ws(bytes, string_at(bytes, quote).end.saturating_add(1));
        if byte(bytes, value) == b':' {
            value = skip_ws(bytes, value + 1);
        }
        TapeNode(Repr::Body {
            doc: self,
            pos: value,
            slot: self.slot_of(value),
        })
    }

    fn string(&self, string: Str) -> Cow<'a, str> {
        let raw = self
            .text
            .get(string.start as usize..string.end as usize)
            .unwrap_or_default();
        if string.escaped {
            Cow::Owned(decode(raw.as_bytes()))
        } else {
            Cow::Borrowed(raw)
        }
    }

    fn number(&self, pos: u32) -> Option<Number> {
        number_at(self.text, pos)
    }

    /// The object at `pos`: its entry and how its repeated names are found.
    fn object<'d>(&'d self, pos: u32, slot: u32) -> TapeObject<'d> {
        let entry = self.entry(pos, slot).copied();
        let repeated = !self.repeated.is_empty() && self.repeated.binary_search(&pos).is_ok();
        let table = entry.and_then(|entry| {
            let from = entry.names as usize;
            self.names
                .get(from..from.checked_add(entry.count as usize)?)
        });
        TapeObject {
            doc: self,
            pos,
            slot,
            entry,
            table,
            repeated,
        }
    }
}

/// One member found by [`Document::member`].
struct Member<'a> {
    name: Str,
    value: TapeNode<'a>,
    next: u32,
    next_slot: u32,
}

/// A string in the text: between its quotes.
#[derive(Debug, Clone, Copy)]
struct Str {
    start: u32,
    /// The closing quote.
    end: u32,
    escaped: bool,
}

fn to_pos(at: usize) -> u32 {
    u32::try_from(at).unwrap_or(u32::MAX)
}

/// The byte at `at`, NUL past the end (NUL never stands outside a string).
fn byte(bytes: &[u8], at: u32) -> u8 {
    bytes.get(at as usize).copied().unwrap_or(0)
}

fn skip_ws(bytes: &[u8], mut at: u32) -> u32 {
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
fn after_comma(bytes: &[u8], end: u32) -> u32 {
    let at = skip_ws(bytes, end);
    if byte(bytes, at) == b',' { at + 1 } else { at }
}

/// The string whose opening quote is at `quote`.
fn string_at(bytes: &[u8], quote: u32) -> Str {
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

fn raw(bytes: &[u8], string: Str) -> &[u8] {
    bytes
        .get(string.start as usize..string.end as usize)
        .unwrap_or_default()
}

/// Orders two strings of the text by their decoded bytes.
fn compare(bytes: &[u8], left: Str, right: Str) -> Ordering {
    let (left_raw, right_raw) = (raw(bytes, left), raw(bytes, right));
    if left.escaped || right.escaped {
        Decoded::new(left_raw).cmp(Decoded::new(right_raw))
    } else {
        left_raw.cmp(right_raw)
    }
}

/// Orders a string of the text against `key` by decoded bytes.
fn compare_key(bytes: &[u8], string: Str, key: &str) -> Ordering {
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
fn compare_quotes(bytes: &[u8], left: u32, right: u32) -> Ordering {
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
fn compare_quote_key(bytes: &[u8], quote: u32, key: &str) -> Ordering {
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
pub(super) fn number_at(text: &str, pos: u32) -> Option<Number> {
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
fn scalar_end(bytes: &[u8], mut at: u32) -> u32 {
    while matches!(byte(bytes, at), b'0'..=b'9' | b'a'..=b'z' | b'E' | b'+' | b'-' | b'.') {
        at += 1;
    }
    at
}

/// The number at `at`, if it is an integer `serde_json` holds as a `u64`
/// or an `i64`, read in one pass without its parser: up to 19 digits, or a
/// minus sign and up to 18 digits other than `-0` (which it holds as the
/// float -0.0).
pub(super) fn small_integer(bytes: &[u8], at: u32) -> Option<Number> {
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

/// The decoded bytes of a string's content, without allocating: what
/// comparing and ordering names need.
pub(super) struct Decoded<'s> {
    rest: &'s [u8],
    pending: [u8; 4],
    pending_at: u8,
    pending_len: u8,
}

impl<'s> Decoded<'s> {
    pub(super) fn new(raw: &'s [u8]) -> Self {
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

pub(super) fn decode(raw: &[u8]) -> String {
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

/// Parses into nothing, as strictly as `serde_json::Value` parses: every
/// value goes through `deserialize_any`, strings included, so escapes,
/// surrogates, numbers out of range and the recursion limit are checked
/// exactly as they are for a `Value`.
struct Strict;

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Strict;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Strict, E> {
        Ok(Strict)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Strict, E> {
        Ok(Strict)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Strict, E> {
        Ok(Strict)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Strict, E> {
        Ok(Strict)
    }

    fn visit_str<E>(self, _: &str) -> Result<Strict, E> {
        Ok(Strict)
    }

    fn visit_unit<E>(self) -> Result<Strict, E> {
        Ok(Strict)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
        while seq.next_element::<Strict>()?.is_some() {}
        Ok(Strict)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
        while map.next_key::<Strict>()?.is_some() {
            map.next_value::<Strict>()?;
        }
        Ok(Strict)
    }
}

/// A container open while indexing.
struct Frame {
    start: u32,
    /// Bytes of the containers with an entry right inside this one.
    inside: u32,
    /// Items, or names written.
    count: u32,
    /// Where this object's names start in the list of open objects' names;
    /// only objects with fewer than [`TABLE_MEMBERS`] keep theirs there.
    names_from: usize,
    object: bool,
}

/// The pass after `serde_json`'s: brackets matched and counted, entries made.
fn index(text: &str) -> Document<'_> {
    let bytes = text.as_bytes();
    let root = skip_ws(bytes, 0);
    let mut frames: Vec<Frame> = Vec::new();
    let mut entries: Vec<Entry> = Vec::new();
    // Names of the open objects still small enough to be checked for
    // repeats when they close: at most TABLE_MEMBERS each, depth ≤ 128.
    let mut open_names: Vec<u32> = Vec::new();
    let mut repeated: Vec<u32> = Vec::new();
    let mut table_names = 0_usize;
    let mut expect_name = false;
    let mut at = root;
    loop {
        match byte(bytes, at) {
            b' ' | b'\t' | b'\n' | b'\r' => at = skip_ws(bytes, at),
            b':' => at += 1,
            b',' => {
                expect_name = frames.last().is_some_and(|frame| frame.object);
                at += 1;
            }
            b'"' => {
                if let Some(frame) = frames.last_mut() {
                    if !frame.object {
                        frame.count += 1;
                    } else if expect_name {
                        frame.count += 1;
                        expect_name = false;
                        if frame.count < TABLE_MEMBERS {
                            open_names.push(at);
                        } else if frame.count == TABLE_MEMBERS {
                            // From here on the second pass does it, over
                            // all of this object's names at once.
                            open_names.truncate(frame.names_from);
                        }
                    }
                }
                at = string_at(bytes, at).end.saturating_add(1);
                if frames.is_empty() {
                    break;
                }
            }
            opening @ (b'[' | b'{') => {
                if let Some(frame) = frames.last_mut().filter(|frame| !frame.object) {
                    frame.count += 1;
                }
                frames.push(Frame {
                    start: at,
                    inside: 0,
                    count: 0,
                    names_from: open_names.len(),
                    object: opening == b'{',
                });
                expect_name = opening == b'{';
                at += 1;
            }
            b']' | b'}' => {
                let Some(frame) = frames.pop() else { break };
                let span = at - frame.start + 1;
                let mut count = frame.count;
                let mut names = NO_TABLE;
                if frame.object && count >= TABLE_MEMBERS {
                    names = PENDING_TABLE;
                    table_names += count as usize;
                } else if frame.object && count >= 2 {
                    let distinct = distinct_names(bytes, open_names.get(frame.names_from..));
                    if distinct < count {
                        repeated.push(frame.start);
                        count = distinct;
                    }
                }
                open_names.truncate(frame.names_from);
                let has_entry = span.saturating_sub(frame.inside) >= OWN_BYTES || names != NO_TABLE;
                if has_entry {
                    entries.push(Entry {
                        start: frame.start,
                        end: at,
                        count,
                        names,
                    });
                }
                if let Some(parent) = frames.last_mut() {
                    parent.inside += if has_entry { span } else { frame.inside };
                }
                expect_name = false;
                at += 1;
                if frames.is_empty() {
                    break;
                }
            }
            0 => break,
            _ => {
                if let Some(frame) = frames.last_mut().filter(|frame| !frame.object) {
                    frame.count += 1;
                }
                at = scalar_end(bytes, at).max(at + 1);
                if frames.is_empty() {
                    break;
                }
            }
        }
    }
    entries.sort_unstable_by_key(|entry| entry.start);
    let mut document = Document {
        text,
        root,
        entries: entries.into_boxed_slice(),
        names: Box::default(),
        repeated: Box::default(),
    };
    let names = build_tables(&mut document, table_names, &mut repeated);
    repeated.sort_unstable();
    document.names = names.into_boxed_slice();
    document.repeated = repeated.into_boxed_slice();
    document
}

/// How many distinct names a small object has, by comparing each with
/// those after it (fewer than [`TABLE_MEMBERS`] of them).
fn distinct_names(bytes: &[u8], quotes: Option<&[u32]>) -> u32 {
    let quotes = quotes.unwrap_or_default();
    let shadowed = quotes
        .iter()
        .enumerate()
        .filter(|&(index, &quote)| {
            quotes
                .iter()
                .skip(index + 1)
                .any(|&later| compare_quotes(bytes, quote, later) == Ordering::Equal)
        })
        .count();
    to_pos(quotes.len().saturating_sub(shadowed))
}

/// The second pass: for each object of [`TABLE_MEMBERS`] members or more,
/// its names sorted, the last of each repeated one kept. All of them in one
/// allocation sized up front, which is the most this pass holds.
fn build_tables(document: &mut Document<'_>, total: usize, repeated: &mut Vec<u32>) -> Vec<u32> {
    let mut names: Vec<u32> = Vec::with_capacity(total);
    for slot in 0..document.entries.len() {
        let Some(&entry) = document.entries.get(slot) else {
            break;
        };
        if entry.names != PENDING_TABLE {
            continue;
        }
        let from = names.len();
        let (mut at, mut member_slot) = document.first_child(entry.start, to_pos(slot));
        while let Some(member) = document.member(at, member_slot) {
            names.push(member.name.start - 1);
            at = member.next;
            member_slot = member.next_slot;
        }
        let bytes = document.bytes();
        let table = names.get_mut(from..).unwrap_or_default();
        table.sort_unstable_by(|left, right| {
            compare_quotes(bytes, *left, *right).then(left.cmp(right))
        });
        // Sorted by name, then position: the last of a run is the member
        // that wins.
        let mut kept = 0;
        for index in 0..table.len() {
            let last_of_run = match (table.get(index), table.get(index + 1)) {
                (Some(&this), Some(&next)) => compare_quotes(bytes, this, next) != Ordering::Equal,
                _ => true,
            };
            if last_of_run {
                table.swap(kept, index);
                kept += 1;
            }
        }
        if kept < table.len() {
            repeated.push(entry.start);
        }
        names.truncate(from + kept);
        if let Some(entry) = document.entries.get_mut(slot) {
            entry.names = to_pos(from);
            entry.count = to_pos(kept);
        }
    }
    names
}

/// A value of a [`Document`], or a name the validator checks on its own
/// (`propertyNames`).
#[derive(Clone, Copy)]
pub struct TapeNode<'a>(Repr<'a>);

#[derive(Clone, Copy)]
enum Repr<'a> {
    Body {
        doc: &'a Document<'a>,
        pos: u32,
        /// The first entry starting at or after `pos`.
        slot: u32,
    },
    Name(&'a str),
}

impl<'a> TapeNode<'a> {
    /// The value's first byte; a name is a string.
    fn lead(&self) -> u8 {
        match self.0 {
            Repr::Body { doc, pos, .. } => doc.byte(pos),
            Repr::Name(_) => b'"',
        }
    }

    fn object(&self) -> Option<TapeObject<'a>> {
        match self.0 {
            Repr::Body { doc, pos, slot } if doc.byte(pos) == b'{' => Some(doc.object(pos, slot)),
            _ => None,
        }
    }

    fn array(&self) -> Option<TapeArray<'a>> {
        match self.0 {
            Repr::Body { doc, pos, slot } if doc.byte(pos) == b'[' => Some(TapeArray {
                doc,
                pos,
                slot,
                entry: doc.entry(pos, slot).copied(),
            }),
            _ => None,
        }
    }

    fn equals_str(&self, expected: &str) -> bool {
        match self.0 {
            Repr::Body { doc, pos, .. } => {
                doc.byte(pos) == b'"'
                    && compare_quote_key(doc.bytes(), pos, expected) == Ordering::Equal
            }
            Repr::Name(name) => name == expected,
        }
    }

    /// Two strings alike once decoded, compared in the body's bytes when
    /// neither has an escape.
    fn same_string_in_body(&self, other: &TapeNode<'a>) -> bool {
        match (self.0, other.0) {
            (
                Repr::Body { doc, pos, .. },
                Repr::Body {
                    doc: theirs,
                    pos: at,
                    ..
                },
            ) => {
                let (left, right) = (string_at(doc.bytes(), pos), string_at(theirs.bytes(), at));
                let (left_raw, right_raw) = (raw(doc.bytes(), left), raw(theirs.bytes(), right));
                if left.escaped || right.escaped {
                    Decoded::new(left_raw).eq(Decoded::new(right_raw))
                } else {
                    left_raw == right_raw
                }
            }
            (_, Repr::Name(name)) => self.equals_str(name),
            (Repr::Name(name), _) => other.equals_str(name),
        }
    }
}

impl<'a> InPlace<'a, Tape> for TapeNode<'a> {
    fn member(object: &TapeObject<'a>, key: &str) -> Option<Self> {
        object.find(key)
    }

    fn equals_str(&self, expected: &str) -> bool {
        TapeNode::equals_str(self, expected)
    }

    fn same_string(&self, other: &Self) -> bool {
        self.same_string_in_body(other)
    }
}

/// Rebuilds the value starting at the front of `bytes` (the rest of the
/// body from the node on): only for an error someone reads the instance of.
pub(super) fn materialize(bytes: &[u8], _tag: u32) -> Value {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    Value::deserialize(&mut deserializer).unwrap_or(Value::Null)
}

impl Json for Tape {
    type Node<'a> = TapeNode<'a>;
    type PreparedKey = Box<str>;
    type StringBuffer = ();

    // Below TABLE_MEMBERS members a `get` reads every member, so one pass
    // that looks for several names at once is never slower; above it, `get`
    // is a binary search.
    const KEYS_PER_LOOKUP: usize = TABLE_MEMBERS as usize;
    const ACYCLIC: bool = true;

    fn prepare_key(key: &str) -> Box<str> {
        key.into()
    }

    fn with_string_node<T>((): &mut (), string: &str, f: impl FnOnce(TapeNode<'_>) -> T) -> T {
        f(TapeNode(Repr::Name(string)))
    }
}

impl<'a> Node<'a, Tape> for TapeNode<'a> {
    type Object = TapeObject<'a>;
    type Array = TapeArray<'a>;
    type Number = Number;

    fn as_object(&self) -> Option<TapeObject<'a>> {
        self.object()
    }

    fn as_array(&self) -> Option<TapeArray<'a>> {
        self.array()
    }

    fn as_string(&self) -> Option<Cow<'a, str>> {
        match self.0 {
            Repr::Body { doc, pos, .. } if doc.byte(pos) == b'"' => {
                Some(doc.string(string_at(doc.bytes(), pos)))
            }
            Repr::Body { .. } => None,
            Repr::Name(name) => Some(Cow::Borrowed(name)),
        }
    }

    fn as_number(&self) -> Option<Number> {
        match self.0 {
            Repr::Body { doc, pos, .. } if self.is_number() => doc.number(pos),
            _ => None,
        }
    }

    fn as_boolean(&self) -> Option<bool> {
        match self.lead() {
            b't' => Some(true),
            b'f' => Some(false),
            _ => None,
        }
    }

    fn is_null(&self) -> bool {
        self.lead() == b'n'
    }

    fn is_number(&self) -> bool {
        matches!(self.lead(), b'-' | b'0'..=b'9')
    }

    fn is_string(&self) -> bool {
        self.lead() == b'"'
    }

    fn json_type(&self) -> JsonType {
        match self.lead() {
            b'{' => JsonType::Object,
            b'[' => JsonType::Array,
            b'"' => JsonType::String,
            b't' | b'f' => JsonType::Boolean,
            b'n' => JsonType::Null,
            _ => JsonType::Number,
        }
    }

    // `const` and `enum` compare in place: the default builds the node as a
    // `Value`, which for a large node is the tree this module avoids.
    fn equals_value(&self, expected: &Value) -> bool {
        json_in_place::equals_value(self, expected)
    }

    fn to_value(&self) -> Cow<'a, Value> {
        match self.0 {
            Repr::Body { doc, pos, .. } => Cow::Owned(materialize(
                doc.bytes().get(pos as usize..).unwrap_or_default(),
                0,
            )),
            Repr::Name(name) => Cow::Owned(Value::String(name.to_owned())),
        }
    }

    // An error holds its instance unbuilt: built only if read, which
    // `policy::schema` never does.
    fn lazy_value(&self) -> LazyInstance<'a> {
        match self.0 {
            Repr::Body { doc, pos, .. } => LazyInstance::Deferred {
                bytes: doc.bytes().get(pos as usize..).unwrap_or_default(),
                tag: 0,
                make: materialize,
                cell: OnceLock::new(),
            },
            Repr::Name(_) => LazyInstance::Ready(self.to_value()),
        }
    }

    fn identity(&self) -> Option<NodeIdentity> {
        Some(match self.0 {
            // No two values start at the same byte; no position is u32::MAX.
            Repr::Body { doc, pos, .. } => {
                NodeIdentity::tagged(std::ptr::from_ref(doc) as usize, pos)
            }
            Repr::Name(name) => NodeIdentity::tagged(name.as_ptr() as usize, u32::MAX),
        })
    }
}

/// An object of a [`Document`].
pub struct TapeObject<'a> {
    doc: &'a Document<'a>,
    pos: u32,
    slot: u32,
    entry: Option<Entry>,
    /// Its sorted names, when it has a table.
    table: Option<&'a [u32]>,
    /// Whether a name is written twice in it.
    repeated: bool,
}

impl<'a> TapeObject<'a> {
    fn count(&self) -> usize {
        match self.entry {
            Some(entry) => entry.count as usize,
            None => self.members().count(),
        }
    }

    fn find(&self, key: &str) -> Option<TapeNode<'a>> {
        let doc = self.doc;
        if let Some(table) = self.table {
            let bytes = doc.bytes();
            let found = table
                .binary_search_by(|&quote| compare_quote_key(bytes, quote, key))
                .ok()?;
            return table.get(found).map(|&quote| doc.member_value(quote));
        }
        // Every member is read: the last one of a repeated name wins.
        let (mut at, mut slot) = doc.first_child(self.pos, self.slot);
        let mut found = None;
        while let Some(member) = doc.member(at, slot) {
            if compare_key(doc.bytes(), member.name, key) == Ordering::Equal {
                found = Some(member.value);
            }
            at = member.next;
            slot = member.next_slot;
        }
        found
    }

    fn members(&self) -> Members<'a> {
        let (at, slot) = self.doc.first_child(self.pos, self.slot);
        Members {
            doc: self.doc,
            at,
            slot,
            table: self.table,
            repeated: self.repeated,
        }
    }
}

impl<'a> Object<'a, Tape> for TapeObject<'a> {
    type Node = TapeNode<'a>;
    type MemberName = Cow<'a, str>;
    type MembersIter = Members<'a>;

    fn len(&self) -> usize {
        self.count()
    }

    #[allow(clippy::borrowed_box)]
    fn get(&self, key: &Box<str>) -> Option<TapeNode<'a>> {
        self.find(key)
    }

    fn members(&self) -> Members<'a> {
        TapeObject::members(self)
    }
}

/// Members in document order, each name once (its last occurrence).
pub struct Members<'a> {
    doc: &'a Document<'a>,
    at: u32,
    slot: u32,
    table: Option<&'a [u32]>,
    repeated: bool,
}

impl Members<'_> {
    /// Whether a later member of the object has the same name.
    fn shadowed(&self, name: Str) -> bool {
        let doc = self.doc;
        if let Some(table) = self.table {
            let bytes = doc.bytes();
            let quote = name.start.saturating_sub(1);
            return table
                .binary_search_by(|&other| compare_quotes(bytes, other, quote))
                .ok()
                .and_then(|found| table.get(found))
                .is_some_and(|&winner| winner != quote);
        }
        let (mut at, mut slot) = (self.at, self.slot);
        while let Some(member) = doc.member(at, slot) {
            if compare(doc.bytes(), member.name, name) == Ordering::Equal {
                return true;
            }
            at = member.next;
            slot = member.next_slot;
        }
        false
    }
}

impl<'a> Iterator for Members<'a> {
    type Item = (Cow<'a, str>, TapeNode<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let member = self.doc.member(self.at, self.slot)?;
            self.at = member.next;
            self.slot = member.next_slot;
            if self.repeated && self.shadowed(member.name) {
                continue;
            }
            return Some((self.doc.string(member.name), member.value));
        }
    }
}

/// An array of a [`Document`].
pub struct TapeArray<'a> {
    doc: &'a Document<'a>,
    pos: u32,
    slot: u32,
    entry: Option<Entry>,
}

impl<'a> TapeArray<'a> {
    fn count(&self) -> usize {
        match self.entry {
            Some(entry) => entry.count as usize,
            None => self.elements().count(),
        }
    }

    fn elements(&self) -> Elements<'a> {
        let (at, slot) = self.doc.first_child(self.pos, self.slot);
        Elements {
            doc: self.doc,
            at,
            slot,
        }
    }
}

impl<'a> Array<'a, Tape> for TapeArray<'a> {
    type Node = TapeNode<'a>;
    type ElementsIter = Elements<'a>;

    fn len(&self) -> usize {
        self.count()
    }

    fn elements(&self) -> Elements<'a> {
        TapeArray::elements(self)
    }

    // The default builds every element as a `Value`.
    fn is_unique(&self) -> bool {
        json_in_place::is_unique::<Tape, TapeNode<'a>>(self)
    }
}

/// Items of an array in order.
pub struct Elements<'a> {
    doc: &'a Document<'a>,
    at: u32,
    slot: u32,
}

impl<'a> Iterator for Elements<'a> {
    type Item = TapeNode<'a>;

    fn next(&mut self) -> Option<TapeNode<'a>> {
        let bytes = self.doc.bytes();
        let at = skip_ws(bytes, self.at);
        if matches!(byte(bytes, at), b']' | 0) {
            self.at = at;
            return None;
        }
        let node = TapeNode(Repr::Body {
            doc: self.doc,
            pos: at,
            slot: self.slot,
        });
        let end = self.doc.value_end(at, &mut self.slot);
        self.at = after_comma(bytes, end);
        Some(node)
    }
}

// `policy::json_dense` and `policy::schema` test against the same
// documents and schemas.
#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use jsonschema::json::{JsonNumber, cmp};
    use proptest::collection::vec;
    use proptest::prelude::*;
    use serde_json::json;

    fn parse(text: &str) -> Document<'_> {
        Document::parse(text).unwrap()
    }

    /// Walks the document and the `Value` `serde_json` makes of the same
    /// text side by side: every accessor the validator calls must agree.
    fn assert_same(node: TapeNode<'_>, value: &Value) {
        assert_eq!(node.json_type(), JsonType::from(value), "{value}");
        assert_eq!(node.is_number(), value.is_number(), "{value}");
        assert_eq!(node.is_string(), value.is_string(), "{value}");
        assert_eq!(node.is_null(), value.is_null(), "{value}");
        assert_eq!(node.as_boolean(), value.as_bool(), "{value}");
        match value {
            Value::Number(expected) => {
                let number = node.as_number().unwrap();
                // Same variant (u64, i64 or f64) and the same value.
                assert_eq!(&number, expected);
                assert_eq!(number.to_string(), expected.to_string());
                assert_eq!(number.is_integer(), expected.is_integer());
                assert_eq!(
                    number.is_written_as_integer(),
                    expected.is_written_as_integer()
                );
            }
            Value::String(expected) => {
                assert_eq!(node.as_string().unwrap(), *expected);
                assert_eq!(node.string_length(), Some(expected.chars().count() as u64));
            }
            Value::Array(items) => {
                let array = node.as_array().unwrap();
                assert_eq!(Array::len(&array), items.len(), "{value}");
                let elements: Vec<TapeNode<'_>> = Array::elements(&array).collect();
                assert_eq!(elements.len(), items.len(), "{value}");
                for (element, item) in elements.iter().zip(items) {
                    assert_same(*element, item);
                }
                assert_eq!(
                    array.is_unique(),
                    jsonschema::json::unique::is_unique(items),
                    "{value}"
                );
                // Pairwise only where it stays cheap.
                for (index, left) in elements.iter().enumerate().take(32) {
                    for (right, right_value) in elements.iter().zip(items).skip(index + 1).take(32)
                    {
                        assert_eq!(
                            json_in_place::same(left, right),
                            cmp::equal(&items[index], right_value),
                            "{} vs {right_value}",
                            items[index]
                        );
                    }
                }
            }
            Value::Object(map) => {
                let object = node.as_object().unwrap();
                assert_eq!(Object::len(&object), map.len(), "{value}");
                let members: Vec<(Cow<'_, str>, TapeNode<'_>)> = Object::members(&object).collect();
                assert_eq!(members.len(), map.len(), "{value}");
                for (name, member) in &members {
                    assert_same(*member, &map[name.as_ref()]);
                }
                for (name, member) in map {
                    assert_same(object.get(&Tape::prepare_key(name)).unwrap(), member);
                }
                assert!(object.get(&Tape::prepare_key("\u{1}absent")).is_none());
            }
            _ => {}
        }
        assert_eq!(node.to_value().as_ref(), value);
        assert_eq!(node.lazy_value().get().as_ref(), value);
        assert!(node.equals_value(value), "{value}");
    }

    #[test]
    fn passes_the_crates_own_conformance_check() {
        let text = jsonschema_value::conformance::document().to_string();
        let document = parse(&text);
        jsonschema_value::conformance::assert_conformance::<Tape>(&document.root());
    }

    #[test]
    fn the_last_of_a_repeated_name_wins_and_keeps_its_place() {
        let text = r#"{"a": 1, "b": 2, "\u0061": 3, "c": {"x": 0, "x": [1]}}"#;
        let document = parse(text);
        let root = document.root().as_object().unwrap();
        assert_eq!(Object::len(&root), 3);
        let names: Vec<String> = Object::members(&root)
            .map(|(name, _)| name.into_owned())
            .collect();
        assert_eq!(names, ["b", "a", "c"]);
        assert_same(document.root(), &serde_json::from_str(text).unwrap());

        // The same, large enough for a table of names.
        let members: Vec<String> = (0..40).map(|i| format!(r#""k{}": {i}"#, i % 7)).collect();
        let text = format!("{{{}}}", members.join(", "));
        let document = parse(&text);
        let root = document.root().as_object().unwrap();
        assert!(root.table.is_some());
        assert_eq!(Object::len(&root), 7);
        let names: Vec<String> = Object::members(&root)
            .map(|(name, _)| name.into_owned())
            .collect();
        assert_eq!(names, ["k5", "k6", "k0", "k1", "k2", "k3", "k4"]);
        assert_same(document.root(), &serde_json::from_str(&text).unwrap());
    }

    #[test]
    fn numbers_and_spacing_read_as_serde_json_reads_them() {
        for text in [
            "0",
            "-0",
            "-0.0",
            "1.0",
            "1e2",
            "1E+2",
            "-1e-2",
            "9007199254740993",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775808",
            "-9223372036854775809",
            "123456789012345678901234567890",
            "-123456789012345678901234567890",
            "1.7976931348623157e308",
            "4.9e-324",
            "1e-400",
            "0.1",
            "2.5e+10",
            "1234567890123456789",
            "-123456789012345678",
            " \n 1.5 \t",
            "\t[ 1 , {\"a\" : [ ] , \"b\":\"\" } , -0 ]\r\n",
        ] {
            let document = parse(text);
            assert_same(document.root(), &serde_json::from_str(text).unwrap());
        }
    }

    #[test]
    fn names_are_checked_as_string_nodes() {
        Tape::with_string_node(&mut (), "héllo", |node| {
            assert_eq!(node.json_type(), JsonType::String);
            assert_eq!(node.string_length(), Some(5));
            assert!(node.equals_value(&json!("héllo")));
            assert!(node.identity().is_some());
        });
    }

    /// A JSON document to be written out, with the choices `serde_json`
    /// never makes: escapes, spacing, repeated names.
    #[derive(Debug, Clone)]
    pub(crate) enum Doc {
        Null,
        Bool(bool),
        Number(String),
        Text(Vec<(char, bool)>),
        /// Items and the whitespace between them ([`padding`]).
        Array(Vec<Doc>, usize),
        Object(Vec<(Vec<(char, bool)>, Doc)>, usize),
    }

    fn chars(longest: usize) -> impl Strategy<Value = Vec<(char, bool)>> {
        let char = prop_oneof![
            12 => prop::char::range('a', 'd'),
            1 => Just('"'),
            1 => Just('\\'),
            1 => Just('/'),
            1 => prop::char::range('\u{0}', '\u{1f}'),
            1 => Just('é'),
            1 => Just('€'),
            1 => Just('😀'),
            1 => Just('\u{7f}'),
            1 => Just(' '),
            1 => Just('@'),
            1 => Just('-'),
            1 => Just('.'),
        ];
        // `true`: escape it even where it need not be.
        vec((char, prop::bool::weighted(0.2)), 0..longest)
    }

    fn number() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            (0_u64..20).prop_map(|n| n.to_string()),
            (-5_i64..0).prop_map(|n| n.to_string()),
            "-?[1-9][0-9]{18,30}",
            "-?(0|[1-9][0-9]{0,5})\\.[0-9]{1,8}",
            "-?(0|[1-9][0-9]{0,3})(\\.[0-9]{1,3})?[eE][+-]?[0-9]{1,2}",
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| format!("{f:?}")),
            prop::sample::select(vec![
                "-0",
                "-0.0",
                "0.0",
                "1.0",
                "1E2",
                "0.5",
                "1.5",
                "2e0",
                "9007199254740993",
                "18446744073709551615",
                "18446744073709551616",
                "-9223372036854775808",
                "-9223372036854775809",
                "1e19",
                "1.7976931348623157e308",
            ])
            .prop_map(str::to_owned),
        ]
    }

    pub(crate) fn doc() -> impl Strategy<Value = Doc> {
        let leaf = prop_oneof![
            Just(Doc::Null),
            any::<bool>().prop_map(Doc::Bool),
            number().prop_map(Doc::Number),
            chars(8).prop_map(Doc::Text),
        ];
        leaf.prop_recursive(5, 256, 24, |inner| {
            prop_oneof![
                (vec(inner.clone(), 0..24), 0_usize..7)
                    .prop_map(|(items, spaces)| Doc::Array(items, spaces)),
                (vec((chars(3), inner), 0..24), 0_usize..7)
                    .prop_map(|(members, spaces)| Doc::Object(members, spaces)),
            ]
        })
    }

    fn write_string(chars: &[(char, bool)], out: &mut String) {
        out.push('"');
        for &(c, escape) in chars {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\u{8}' if !escape => out.push_str("\\b"),
                '\u{c}' if !escape => out.push_str("\\f"),
                '\n' if !escape => out.push_str("\\n"),
                '\r' if !escape => out.push_str("\\r"),
                '\t' if !escape => out.push_str("\\t"),
                '/' if escape => out.push_str("\\/"),
                c if escape || c < ' ' => {
                    let mut units = [0_u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{unit:04X}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }

    /// Whitespace of a container: `spaces` picks what, and how much.
    fn padding(spaces: usize) -> String {
        match spaces {
            0 => String::new(),
            1 => " ".into(),
            2 => "\n".into(),
            3 => "\r\n\t".into(),
            wide => format!("\n{}", " ".repeat(wide * 3)),
        }
    }

    fn write(doc: &Doc, out: &mut String) {
        match doc {
            Doc::Null => out.push_str("null"),
            Doc::Bool(value) => out.push_str(if *value { "true" } else { "false" }),
            Doc::Number(text) => out.push_str(text),
            Doc::Text(chars) => write_string(chars, out),
            Doc::Array(items, spaces) => {
                let pad = padding(*spaces);
                out.push('[');
                for (index, item) in items.iter().enumerate() {
                    if index > 0 {
                        out.push(',');
                    }
                    out.push_str(&pad);
                    write(item, out);
                }
                out.push_str(&pad);
                out.push(']');
            }
            Doc::Object(members, spaces) => {
                let pad = padding(*spaces);
                out.push('{');
                for (index, (name, value)) in members.iter().enumerate() {
                    if index > 0 {
                        out.push(',');
                    }
                    out.push_str(&pad);
                    write_string(name, out);
                    out.push_str(&pad);
                    out.push(':');
                    out.push_str(&pad);
                    write(value, out);
                }
                out.push_str(&pad);
                out.push('}');
            }
        }
    }

    pub(crate) fn text_of(doc: &Doc) -> String {
        let mut out = String::new();
        write(doc, &mut out);
        out
    }

    pub(crate) fn schemas() -> Vec<Value> {
        vec![
            json!({"type": "object"}),
            json!({"type": ["array", "string"]}),
            json!({"type": "integer"}),
            json!({"items": {"type": "integer"}}),
            json!({"items": {"type": ["number", "string", "null"]}}),
            json!({"required": ["a", "b"], "properties": {"a": {"type": "string"}, "b": {"minimum": 0}}}),
            json!({"properties": {"a": {"type": "number"}, "b": {"maxLength": 2}, "c": {"minLength": 2}}, "additionalProperties": false}),
            json!({"properties": {"a": {"type": "string"}}}),
            json!({"items": {"properties": {"b": {"type": "array"}, "é": {"type": "null"}}}}),
            json!({"additionalProperties": {"type": "string"}}),
            json!({"prefixItems": [{"type": "null"}, {"type": "boolean"}], "items": {"type": "object"}}),
            json!({"enum": [1, "a", [1.0, 2], {"a": 1}, null, []]}),
            json!({"const": {"a": 1, "b": [true]}}),
            json!({"items": {"enum": [0, -1, 1e2, "a", {}, [], "\"", "é"]}}),
            json!({"items": {"const": 1}}),
            json!({"items": {"minimum": -1.5, "maximum": 1e19, "exclusiveMaximum": 18446744073709551615_u64}}),
            json!({"items": {"exclusiveMinimum": -9223372036854775808_i64, "maximum": 9007199254740993_u64}}),
            json!({"items": {"multipleOf": 0.5}}),
            json!({"items": {"multipleOf": 3}}),
            json!({"items": {"minLength": 2, "maxLength": 3}}),
            json!({"items": {"pattern": "^[a-c]+$"}}),
            json!({"uniqueItems": true}),
            json!({"items": {"uniqueItems": true}}),
            json!({"additionalProperties": {"uniqueItems": true}}),
            json!({"items": {"format": "email"}}),
            json!({"items": {"format": "date"}}),
            json!({"oneOf": [{"type": "array"}, {"items": {"type": "number"}}]}),
            json!({"anyOf": [{"type": "object", "required": ["a"]}, {"type": "array", "maxItems": 3}]}),
            json!({"not": {"type": "array", "items": {"type": "string"}}}),
            json!({
                "$defs": {"node": {
                    "properties": {"a": {"$ref": "#/$defs/node"}},
                    "items": {"$ref": "#/$defs/node"},
                    "maxProperties": 3
                }},
                "$ref": "#/$defs/node"
            }),
            json!({
                "$defs": {"n": {"anyOf": [
                    {"type": "object", "additionalProperties": {"$ref": "#/$defs/n"}, "propertyNames": {"maxLength": 2}},
                    {"type": "array", "items": {"$ref": "#/$defs/n"}, "uniqueItems": true},
                    {"type": "string", "minLength": 1, "maxLength": 3},
                    {"type": "integer", "minimum": -100},
                    {"type": "number", "multipleOf": 0.25},
                    {"type": "null"}
                ]}},
                "$ref": "#/$defs/n"
            }),
            json!({"propertyNames": {"maxLength": 1, "pattern": "^[a-c]*$"}}),
            json!({"items": {"propertyNames": {"minLength": 1}}}),
            json!({"dependentRequired": {"a": ["b"], "c": ["a", "d"]}}),
            json!({"properties": {"a": true}, "unevaluatedProperties": {"type": "number"}}),
            json!({"items": {"properties": {"a": true}, "patternProperties": {"^b": {"type": "string"}}, "unevaluatedProperties": false}}),
            json!({"type": "array", "prefixItems": [true], "unevaluatedItems": {"type": "string"}}),
            json!({"contains": {"type": "string"}, "minContains": 2}),
            json!({"items": {"minProperties": 2, "maxProperties": 5, "required": ["a"]}}),
            json!({"items": {"required": ["a", "b", "c"]}}),
            json!({"required": ["a", "b", "c", "d"]}),
            json!({"minItems": 3, "maxItems": 10, "items": {"type": ["object", "array"], "minItems": 1}}),
            json!({"$schema": "http://json-schema.org/draft-04/schema#", "items": {"type": "integer"}}),
            json!({"$schema": "http://json-schema.org/draft-07/schema#", "dependencies": {"a": ["b"], "b": {"required": ["c"]}}}),
            json!({"if": {"type": "array"}, "then": {"items": {"type": "number"}}, "else": {"required": ["a"]}}),
        ]
    }

    type Pair = (
        jsonschema::Validator,
        jsonschema::Validator<Tape>,
        &'static str,
    );

    fn validators() -> &'static [Pair] {
        static VALIDATORS: OnceLock<Vec<Pair>> = OnceLock::new();
        VALIDATORS.get_or_init(|| {
            schemas()
                .into_iter()
                .map(|schema| {
                    let serde = jsonschema::options()
                        .should_validate_formats(true)
                        .build(&schema)
                        .unwrap();
                    let tape = jsonschema::options_for::<Tape>()
                        .should_validate_formats(true)
                        .build(&schema)
                        .unwrap();
                    let name: &'static str = Box::leak(schema.to_string().into_boxed_str());
                    (serde, tape, name)
                })
                .collect()
        })
    }

    /// The verdict and the pointer, keyword and message of each error, for
    /// both representations. Errors come in member order, which is name
    /// order for a `Value` and document order here, so they are compared
    /// sorted; so are the names a message lists (not compared).
    fn assert_same_verdicts(text: &str) {
        let value: Value = serde_json::from_str(text).unwrap();
        let document = parse(text);
        for (serde, tape, schema) in validators() {
            assert_eq!(
                serde.is_valid(&value),
                tape.is_valid(document.root()),
                "{schema} on {text}"
            );
            let describe = |error: jsonschema::ValidationError<'_>| {
                let keyword = error.kind().keyword().to_owned();
                let message = match keyword.as_str() {
                    "additionalProperties" | "unevaluatedProperties" => String::new(),
                    _ => error.to_string(),
                };
                (error.instance_path().to_string(), keyword, message)
            };
            let mut expected: Vec<(String, String, String)> =
                serde.iter_errors(&value).map(describe).collect();
            let mut found: Vec<(String, String, String)> =
                tape.iter_errors(document.root()).map(describe).collect();
            expected.sort();
            found.sort();
            assert_eq!(found, expected, "{schema} on {text}");
        }
    }

    proptest! {
        #[test]
        fn names_order_as_their_decoded_text(left in chars(6), right in chars(6)) {
            let mut text = String::from("[");
            write_string(&left, &mut text);
            let comma = text.len();
            text.push(',');
            write_string(&right, &mut text);
            text.push(']');
            let value: Value = serde_json::from_str(&text).unwrap();
            let (Some(left), Some(right)) = (value[0].as_str(), value[1].as_str()) else {
                panic!("{text}");
            };
            let bytes = text.as_bytes();
            let (left_quote, right_quote) = (1, to_pos(comma + 1));
            prop_assert_eq!(compare_quotes(bytes, left_quote, right_quote), left.cmp(right));
            prop_assert_eq!(compare_quote_key(bytes, left_quote, right), left.cmp(right));
            prop_assert_eq!(
                compare(bytes, string_at(bytes, left_quote), string_at(bytes, right_quote)),
                left.cmp(right)
            );
            prop_assert_eq!(parse(&text).root().as_array().map(|array| {
                Array::elements(&array).filter_map(|node| node.as_string().map(Cow::into_owned)).collect::<Vec<_>>()
            }), Some(vec![left.to_owned(), right.to_owned()]));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn reads_as_a_value_reads(doc in doc()) {
            let text = text_of(&doc);
            let Ok(value) = serde_json::from_str::<Value>(&text) else {
                // An exponent out of range: refused by both.
                prop_assert!(Document::parse(&text).is_err());
                return Ok(());
            };
            assert_same(parse(&text).root(), &value);
        }

        #[test]
        fn validates_as_a_value_validates(doc in doc()) {
            let text = text_of(&doc);
            if serde_json::from_str::<Value>(&text).is_ok() {
                assert_same_verdicts(&text);
            }
        }
    }

    #[test]
    fn validates_large_and_repeated_shapes_as_a_value_validates() {
        let mut texts = vec![
            r#"{"a": "x", "b": 1, "a": 2, "c": "zz", "d": [1, 1.0]}"#.to_owned(),
            r#"[1, 1.0, "a", "\u0061"]"#.to_owned(),
            r#"[{"a": 1, "b": 2}, {"b": 2.0, "a": 1}]"#.to_owned(),
            r#"[[1, {"a": []}], [1.0, {"a": [], "a": []}]]"#.to_owned(),
        ];
        let wide: Vec<String> = (0..100)
            .map(|i| format!(r#""{}": {}"#, ["a", "b", "c", "é", "k"][i % 5], i))
            .collect();
        texts.push(format!("{{{}}}", wide.join(",")));
        let distinct: Vec<String> = (0..100)
            .map(|i| format!(r#""k{i}": [{i}, "{i}"]"#))
            .collect();
        texts.push(format!(r#"{{"a": "x", {}, "b": -1}}"#, distinct.join(", ")));
        let items: Vec<String> = (0..200).map(|i| format!("{}", i % 150)).collect();
        texts.push(format!("[{}]", items.join(",     ")));
        let items: Vec<String> = (0..200)
            .map(|i| format!(r#"{{"a": {i}, "b": [{i}.0]}}"#))
            .collect();
        texts.push(format!("[{}]", items.join(", ")));
        texts.push(format!(
            "[{}, {{\"b\": [3.0], \"a\": 3}}]",
            items.join(", ")
        ));
        for text in &texts {
            assert_same(parse(text).root(), &serde_json::from_str(text).unwrap());
            assert_same_verdicts(text);
        }
    }

    /// Accepted or refused as `serde_json` does, at the same line and
    /// column. Invalid UTF-8 is refused before the parse, as
    /// `policy::schema` does.
    fn assert_refused_alike(bytes: &[u8]) {
        let expected = serde_json::from_slice::<Value>(bytes);
        let Ok(text) = std::str::from_utf8(bytes) else {
            assert!(expected.is_err(), "{bytes:?}");
            return;
        };
        let expected = serde_json::from_str::<Value>(text).map(|_| ());
        match (Document::parse(text), expected) {
            (Ok(_), Ok(())) => {}
            (Err(ParseError::Syntax(found)), Err(expected)) => {
                assert_eq!(
                    (found.line(), found.column(), found.classify()),
                    (expected.line(), expected.column(), expected.classify()),
                    "{text:?}"
                );
            }
            (found, expected) => panic!("{text:?}: {:?} but serde_json: {expected:?}", found.err()),
        }
    }

    #[test]
    fn refuses_what_serde_json_refuses() {
        let cases: &[&[u8]] = &[
            b"",
            b"   ",
            b"nul",
            b"tru",
            b"True",
            b"NaN",
            b"-NaN",
            b"Infinity",
            b"[1,]",
            b"{\"a\":1,}",
            b"[1 2]",
            b"{\"a\" 1}",
            b"{a:1}",
            b"{'a':1}",
            b"01",
            b"-01",
            b"00",
            b"1.",
            b".5",
            b"-",
            b"+1",
            b"1e",
            b"1e+",
            b"0x10",
            b"1e400",
            b"-1e400",
            b"123456789012345678901234567890e300",
            b"\"\\x\"",
            b"\"\\u12\"",
            b"\"\\u12G4\"",
            b"\"\\uD800\"",
            b"\"\\uDC00\"",
            b"\"\\uD800\\u0041\"",
            b"\"\\uD800\\uD800\"",
            b"\"\\uD83D\\uDE00\"",
            b"\"a\tb\"",
            b"\"a\x00b\"",
            b"\"\xff\"",
            b"\"\xc3\"",
            b"\xef\xbb\xbf1",
            b"// comment\n1",
            b"/* comment */ 1",
            b"1 /* comment */",
            b"1 2",
            b"\"a\"x",
            b"[1]]",
            b"{}}",
            b"[",
            b"{\"a\":",
            b"\"abc",
            b"[\"a\\",
            b"{\"a\":1 \"b\":2}",
        ];
        for case in cases {
            assert_refused_alike(case);
        }
    }

    #[test]
    fn nests_as_deep_as_serde_json_and_no_deeper() {
        for depth in [1, 126, 127, 128, 129, 1000] {
            let arrays = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            assert_refused_alike(arrays.as_bytes());
            let objects = format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth));
            assert_refused_alike(objects.as_bytes());
        }
        let deepest = format!("{}{}", "[".repeat(127), "]".repeat(127));
        assert!(Document::parse(&deepest).is_ok());
        let too_deep = format!("{}{}", "[".repeat(128), "]".repeat(128));
        assert!(Document::parse(&too_deep).is_err());
    }

    pub(crate) const INSERTS: &[&[u8]] = &[
        b"{",
        b"}",
        b"[",
        b"]",
        b",",
        b":",
        b"\"",
        b"\\",
        b" ",
        b"0",
        b"1",
        b"-",
        b"+",
        b".",
        b"e",
        b"E",
        b"t",
        b"n",
        b"x",
        b"NaN",
        b"/*",
        b"//",
        b"\\u",
        b"\\uD800",
        b"\x00",
        b"\x1f",
        b"\x7f",
        b"\xc3",
        b"\xc3\xa9",
        b"\xff",
        b"\t",
        b"\n",
        b"00",
        b"1e999",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn mutated_documents_are_refused_as_serde_json_refuses_them(
            doc in doc(),
            edits in vec((any::<prop::sample::Index>(), 0_u8..4, any::<prop::sample::Index>()), 1..4),
        ) {
            let mut bytes = text_of(&doc).into_bytes();
            for (place, edit, insert) in edits {
                let at = place.index(bytes.len() + 1);
                match edit {
                    0 => bytes.truncate(at),
                    1 | 2 => {
                        let insert = INSERTS[insert.index(INSERTS.len())];
                        bytes.splice(at..at, insert.iter().copied());
                    }
                    _ if at < bytes.len() => {
                        bytes.remove(at);
                    }
                    _ => {}
                }
            }
            assert_refused_alike(&bytes);
        }
    }

    pub(crate) fn repeat_to(unit: &str, size: usize, open: &str, close: &str) -> String {
        let mut text = String::with_capacity(size + unit.len() + 2);
        text.push_str(open);
        while text.len() + unit.len() + close.len() < size {
            if text.len() > open.len() {
                text.push(',');
            }
            text.push_str(unit);
        }
        text.push_str(close);
        text
    }

    /// Shapes meant to cost the most per byte, of about `size` bytes each.
    pub(crate) fn costly_shapes(size: usize) -> Vec<(&'static str, String)> {
        let nested = format!("{}0{}", "[".repeat(126), "]".repeat(126));
        let sixteen: Vec<String> = (b'a'..=b'p')
            .map(|c| format!("\"{}\":0", char::from(c)))
            .collect();
        let distinct: Vec<String> = (0..size / 9).map(|i| format!("\"{i:x}\":0")).collect();
        vec![
            ("[{\"a\":1},...]", repeat_to("{\"a\":1}", size, "[", "]")),
            ("[0,0,...]", repeat_to("0", size, "[", "]")),
            ("[[],[],...]", repeat_to("[]", size, "[", "]")),
            ("[[0],[0],...]", repeat_to("[0]", size, "[", "]")),
            (
                "126 nested arrays, repeated",
                repeat_to(&nested, size, "[", "]"),
            ),
            (
                "arrays padded to 32 bytes",
                repeat_to(&format!("[{}0]", " ".repeat(29)), size, "[", "]"),
            ),
            (
                "objects of 16 one-letter names",
                repeat_to(&format!("{{{}}}", sixteen.join(",")), size, "[", "]"),
            ),
            ("{\"\":0,\"\":0,...}", repeat_to("\"\":0", size, "{", "}")),
            (
                "[{\"\":0,\"\":0},...]",
                repeat_to("{\"\":0,\"\":0}", size, "[", "]"),
            ),
            (
                "one object, distinct names",
                format!("{{{}}}", distinct.join(",")),
            ),
            (
                "[\"\\u00e9\",...]",
                repeat_to("\"\\u00e9\"", size, "[", "]"),
            ),
        ]
    }

    #[test]
    fn costly_shapes_read_as_a_value_reads() {
        for (shape, text) in costly_shapes(1 << 15) {
            let value: Value = serde_json::from_str(&text).unwrap();
            let document = parse(&text);
            assert!(!document.entries.is_empty() || text.len() < 64, "{shape}");
            assert_same(document.root(), &value);
        }
    }

    #[test]
    fn a_mebibyte_costs_a_fraction_of_its_size() {
        for (shape, text) in costly_shapes(1 << 20) {
            let document = parse(&text);
            let cost = document.heap_bytes();
            assert!(
                cost * 100 <= text.len() * 85,
                "{shape}: {cost} bytes for {} of text",
                text.len()
            );
        }
        // The one the README quotes: 87 MiB as a `Value`.
        let text = repeat_to("{\"a\":1}", 1 << 20, "[", "]");
        assert!(parse(&text).heap_bytes() <= 64);
    }
}

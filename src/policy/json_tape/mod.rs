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
//!
//! This file builds the document (the strict pass, then the index and the
//! name tables); `text` reads strings and numbers where they are written,
//! `node` is the document as the validator walks it.

use std::borrow::Cow;
use std::cmp::Ordering;

use serde::Deserialize;
use serde::de::{MapAccess, SeqAccess, Visitor};
use serde_json::Number;

mod node;
#[cfg(test)]
pub(super) mod tests;
mod text;

pub(super) use node::materialize;
pub use node::{Elements, Members, TapeArray, TapeNode, TapeObject};
pub(super) use text::{Decoded, decode, number_at, same_content, small_integer};

use node::Repr;
use text::{Str, after_comma, byte, compare_quotes, scalar_end, skip_ws, string_at, to_pos};

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

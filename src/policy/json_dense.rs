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
use std::sync::OnceLock;

use jsonschema::json::{Array, Json, Node, NodeIdentity, Object};
use jsonschema::types::JsonType;
use jsonschema_value::LazyInstance;
use serde_json::{Number, Value};

use crate::policy::json_in_place::{self, InPlace};
use crate::policy::json_tape::{
    Decoded, decode, materialize, number_at, same_content, small_integer,
};

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
        DenseNode(Repr::Body {
            doc: self,
            index: 0,
        })
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
        self.bytes()
            .get(entry.pos as usize + 1..entry.end as usize)
            .unwrap_or_default()
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
    if (left.flags | right.flags) & ESCAPED != 0 {
        return compare_names(bytes, left, right) == Ordering::Equal;
    }
    let raw = |entry: &Entry| {
        bytes
            .get(entry.pos as usize + 1..entry.end as usize)
            .unwrap_or_default()
    };
    let (left, right) = (raw(left), raw(right));
    left.len() == right.len() && left.first() == right.first() && left == right
}

/// Orders two names by their decoded bytes.
fn compare_names(bytes: &[u8], left: &Entry, right: &Entry) -> Ordering {
    let raw = |entry: &Entry| {
        bytes
            .get(entry.pos as usize + 1..entry.end as usize)
            .unwrap_or_default()
    };
    if (left.flags | right.flags) & ESCAPED != 0 {
        Decoded::new(raw(left)).cmp(Decoded::new(raw(right)))
    } else {
        raw(left).cmp(raw(right))
    }
}

/// The string whose opening quote is at `quote`, checked as `serde_json`
/// checks it: its closing quote and whether it has an escape.
fn scan_string(bytes: &[u8], quote: usize) -> Option<(usize, bool)> {
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
fn scan_number(bytes: &[u8], at: usize) -> Option<usize> {
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

/// A value of a [`Document`], or a name the validator checks on its own
/// (`propertyNames`).
#[derive(Clone, Copy)]
pub struct DenseNode<'a>(Repr<'a>);

#[derive(Clone, Copy)]
enum Repr<'a> {
    Body { doc: &'a Document<'a>, index: u32 },
    Name(&'a str),
}

impl<'a> DenseNode<'a> {
    fn at(doc: &'a Document<'a>, index: u32) -> Self {
        DenseNode(Repr::Body { doc, index })
    }

    fn kind(&self) -> Kind {
        match self.0 {
            Repr::Body { doc, index } => doc.entry(index).map_or(Kind::Null, |entry| entry.kind),
            Repr::Name(_) => Kind::String,
        }
    }

    fn container(&self, kind: Kind) -> Option<(&'a Document<'a>, u32, Entry)> {
        match self.0 {
            Repr::Body { doc, index } => doc
                .entry(index)
                .filter(|entry| entry.kind == kind)
                .map(|entry| (doc, index, *entry)),
            Repr::Name(_) => None,
        }
    }

    fn object(&self) -> Option<DenseObject<'a>> {
        self.container(Kind::Object)
            .map(|(doc, index, entry)| DenseObject { doc, index, entry })
    }

    fn array(&self) -> Option<DenseArray<'a>> {
        self.container(Kind::Array)
            .map(|(doc, index, entry)| DenseArray { doc, index, entry })
    }
}

impl<'a> InPlace<'a, Dense> for DenseNode<'a> {
    fn member(object: &DenseObject<'a>, key: &str) -> Option<Self> {
        object.find(key)
    }

    fn equals_str(&self, expected: &str) -> bool {
        match self.0 {
            Repr::Body { doc, index } => doc
                .entry(index)
                .is_some_and(|entry| entry.kind == Kind::String && doc.string_is(entry, expected)),
            Repr::Name(name) => name == expected,
        }
    }

    // In the body's bytes, decoding escapes on the fly: `as_string` would
    // allocate a decoded copy of each string with an escape.
    fn same_string(&self, other: &Self) -> bool {
        match (self.0, other.0) {
            (
                Repr::Body { doc, index },
                Repr::Body {
                    doc: theirs,
                    index: at,
                },
            ) => match (doc.entry(index), theirs.entry(at)) {
                (Some(left), Some(right)) => same_content(
                    doc.raw(left),
                    theirs.raw(right),
                    (left.flags | right.flags) & ESCAPED != 0,
                ),
                _ => self.as_string() == other.as_string(),
            },
            (_, Repr::Name(name)) => self.equals_str(name),
            (Repr::Name(name), _) => other.equals_str(name),
        }
    }
}

impl Json for Dense {
    type Node<'a> = DenseNode<'a>;
    type PreparedKey = Box<str>;
    type StringBuffer = ();

    // A `get` reads the members one by one, so one pass over them that
    // looks for several names at once is never slower. Any object of a
    // body small enough to be dense has fewer members than this.
    const KEYS_PER_LOOKUP: usize = 1 << 16;
    const ACYCLIC: bool = true;

    fn prepare_key(key: &str) -> Box<str> {
        key.into()
    }

    fn with_string_node<T>((): &mut (), string: &str, f: impl FnOnce(DenseNode<'_>) -> T) -> T {
        f(DenseNode(Repr::Name(string)))
    }
}

impl<'a> Node<'a, Dense> for DenseNode<'a> {
    type Object = DenseObject<'a>;
    type Array = DenseArray<'a>;
    type Number = Number;

    fn as_object(&self) -> Option<DenseObject<'a>> {
        self.object()
    }

    fn as_array(&self) -> Option<DenseArray<'a>> {
        self.array()
    }

    fn as_string(&self) -> Option<Cow<'a, str>> {
        match self.0 {
            Repr::Body { doc, index } => doc
                .entry(index)
                .filter(|entry| entry.kind == Kind::String)
                .map(|entry| doc.string(entry)),
            Repr::Name(name) => Some(Cow::Borrowed(name)),
        }
    }

    fn as_number(&self) -> Option<Number> {
        match self.0 {
            Repr::Body { doc, index } => doc
                .entry(index)
                .filter(|entry| entry.kind == Kind::Number)
                .and_then(|entry| entry.integer().or_else(|| number_at(doc.text, entry.pos))),
            Repr::Name(_) => None,
        }
    }

    fn as_boolean(&self) -> Option<bool> {
        match self.kind() {
            Kind::True => Some(true),
            Kind::False => Some(false),
            _ => None,
        }
    }

    fn is_null(&self) -> bool {
        self.kind() == Kind::Null
    }

    fn is_number(&self) -> bool {
        self.kind() == Kind::Number
    }

    fn is_string(&self) -> bool {
        self.kind() == Kind::String
    }

    fn json_type(&self) -> JsonType {
        match self.kind() {
            Kind::Null => JsonType::Null,
            Kind::True | Kind::False => JsonType::Boolean,
            Kind::Number => JsonType::Number,
            Kind::String => JsonType::String,
            Kind::Array => JsonType::Array,
            Kind::Object => JsonType::Object,
        }
    }

    // `const` and `enum` compare in place, without building the node.
    fn equals_value(&self, expected: &Value) -> bool {
        json_in_place::equals_value(self, expected)
    }

    fn to_value(&self) -> Cow<'a, Value> {
        match self.0 {
            Repr::Body { doc, index } => Cow::Owned(materialize(body_from(doc, index), 0)),
            Repr::Name(name) => Cow::Owned(Value::String(name.to_owned())),
        }
    }

    // An error holds its instance unbuilt: built only if read, which
    // `policy::schema` never does.
    fn lazy_value(&self) -> LazyInstance<'a> {
        match self.0 {
            Repr::Body { doc, index } => LazyInstance::Deferred {
                bytes: body_from(doc, index),
                tag: 0,
                make: materialize,
                cell: OnceLock::new(),
            },
            Repr::Name(_) => LazyInstance::Ready(self.to_value()),
        }
    }

    fn identity(&self) -> Option<NodeIdentity> {
        Some(match self.0 {
            // An entry is a value; no index is u32::MAX.
            Repr::Body { doc, index } => {
                NodeIdentity::tagged(std::ptr::from_ref(doc) as usize, index)
            }
            Repr::Name(name) => NodeIdentity::tagged(name.as_ptr() as usize, u32::MAX),
        })
    }
}

/// The body from the value at `index` on, which `materialize` reads the
/// value from.
fn body_from<'a>(doc: &'a Document<'a>, index: u32) -> &'a [u8] {
    let pos = doc.entry(index).map_or(0, |entry| entry.pos);
    doc.bytes().get(pos as usize..).unwrap_or_default()
}

/// An object of a [`Document`].
pub struct DenseObject<'a> {
    doc: &'a Document<'a>,
    index: u32,
    entry: Entry,
}

impl<'a> DenseObject<'a> {
    /// The value of the member named `key` (its last occurrence).
    fn find(&self, key: &str) -> Option<DenseNode<'a>> {
        let doc = self.doc;
        let mut name = self.index + 1;
        while name < self.entry.end {
            let entry = doc.entry(name)?;
            if entry.flags & SHADOWED == 0 && doc.string_is(entry, key) {
                return Some(DenseNode::at(doc, name + 1));
            }
            name = doc.after(name + 1);
        }
        None
    }

    fn members(&self) -> Members<'a> {
        Members {
            doc: self.doc,
            name: self.index + 1,
            end: self.entry.end,
            repeats: self.entry.flags & REPEATS != 0,
        }
    }
}

impl<'a> Object<'a, Dense> for DenseObject<'a> {
    type Node = DenseNode<'a>;
    type MemberName = Cow<'a, str>;
    type MembersIter = Members<'a>;

    fn len(&self) -> usize {
        self.entry.count as usize
    }

    #[allow(clippy::borrowed_box)]
    fn get(&self, key: &Box<str>) -> Option<DenseNode<'a>> {
        self.find(key)
    }

    fn members(&self) -> Members<'a> {
        DenseObject::members(self)
    }
}

/// Members in document order, each name once (at its last occurrence).
pub struct Members<'a> {
    doc: &'a Document<'a>,
    /// The next member's name.
    name: u32,
    end: u32,
    repeats: bool,
}

impl<'a> Iterator for Members<'a> {
    type Item = (Cow<'a, str>, DenseNode<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.name >= self.end {
                return None;
            }
            let doc = self.doc;
            let entry = doc.entry(self.name)?;
            let value = self.name + 1;
            self.name = doc.after(value);
            if self.repeats && entry.flags & SHADOWED != 0 {
                continue;
            }
            return Some((doc.string(entry), DenseNode::at(doc, value)));
        }
    }
}

/// An array of a [`Document`].
pub struct DenseArray<'a> {
    doc: &'a Document<'a>,
    index: u32,
    entry: Entry,
}

impl<'a> DenseArray<'a> {
    fn elements(&self) -> Elements<'a> {
        Elements {
            doc: self.doc,
            next: self.index + 1,
            end: self.entry.end,
        }
    }
}

impl<'a> Array<'a, Dense> for DenseArray<'a> {
    type Node = DenseNode<'a>;
    type ElementsIter = Elements<'a>;

    fn len(&self) -> usize {
        self.entry.count as usize
    }

    fn elements(&self) -> Elements<'a> {
        DenseArray::elements(self)
    }

    fn is_unique(&self) -> bool {
        json_in_place::is_unique::<Dense, DenseNode<'a>>(self)
    }
}

/// Items of an array in order.
pub struct Elements<'a> {
    doc: &'a Document<'a>,
    next: u32,
    end: u32,
}

impl<'a> Iterator for Elements<'a> {
    type Item = DenseNode<'a>;

    fn next(&mut self) -> Option<DenseNode<'a>> {
        if self.next >= self.end {
            return None;
        }
        let node = DenseNode::at(self.doc, self.next);
        self.next = self.doc.after(self.next);
        Some(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::json_tape::tests::{INSERTS, costly_shapes, doc, text_of};
    use crate::policy::json_tape::{self, TapeNode};
    use proptest::collection::vec;
    use proptest::prelude::*;

    /// Walks a dense document and the tape of the same text side by side:
    /// every accessor the validator calls must agree.
    fn assert_alike(dense: DenseNode<'_>, tape: TapeNode<'_>) {
        let value = tape.to_value().into_owned();
        assert_eq!(dense.json_type(), tape.json_type(), "{value}");
        assert_eq!(dense.is_null(), tape.is_null(), "{value}");
        assert_eq!(dense.is_number(), tape.is_number(), "{value}");
        assert_eq!(dense.is_string(), tape.is_string(), "{value}");
        assert_eq!(dense.as_boolean(), tape.as_boolean(), "{value}");
        assert_eq!(dense.as_number(), tape.as_number(), "{value}");
        assert_eq!(dense.as_string(), tape.as_string(), "{value}");
        assert_eq!(dense.string_length(), tape.string_length(), "{value}");
        assert_eq!(dense.to_value().as_ref(), &value);
        assert_eq!(dense.lazy_value().get().as_ref(), &value);
        assert!(dense.equals_value(&value), "{value}");
        if let (Some(dense), Some(tape)) = (dense.as_array(), tape.as_array()) {
            assert_eq!(Array::len(&dense), Array::len(&tape), "{value}");
            assert_eq!(dense.is_unique(), tape.is_unique(), "{value}");
            let elements: Vec<_> = Array::elements(&dense).collect();
            assert_eq!(elements.len(), Array::len(&tape), "{value}");
            for (dense, tape) in elements.into_iter().zip(Array::elements(&tape)) {
                assert_alike(dense, tape);
            }
        } else {
            assert!(dense.as_array().is_none() && tape.as_array().is_none());
        }
        if let (Some(dense), Some(tape)) = (dense.as_object(), tape.as_object()) {
            assert_eq!(Object::len(&dense), Object::len(&tape), "{value}");
            let members: Vec<_> = Object::members(&dense).collect();
            let expected: Vec<_> = Object::members(&tape).collect();
            assert_eq!(members.len(), expected.len(), "{value}");
            for ((name, dense_value), (tape_name, tape_value)) in members.into_iter().zip(expected)
            {
                assert_eq!(name, tape_name, "{value}");
                let found = Object::get(&dense, &Dense::prepare_key(&name));
                assert!(
                    found.is_some_and(|found| json_in_place::same(&found, &dense_value)),
                    "{value}"
                );
                assert_alike(dense_value, tape_value);
            }
            assert!(Object::get(&dense, &Dense::prepare_key("\u{1}absent")).is_none());
        } else {
            assert!(dense.as_object().is_none() && tape.as_object().is_none());
        }
    }

    /// Either the dense pass gives up, or `serde_json` accepts the text and
    /// the dense document reads as the tape does.
    fn assert_sound(bytes: &[u8]) -> bool {
        let Ok(text) = std::str::from_utf8(bytes) else {
            return false;
        };
        let Some(dense) = Document::parse(text) else {
            return false;
        };
        assert!(
            serde_json::from_str::<Value>(text).is_ok(),
            "accepted what serde_json refuses: {text:?}"
        );
        let tape = json_tape::Document::parse(text).unwrap();
        assert_alike(dense.root(), tape.root());
        true
    }

    #[test]
    fn passes_the_crates_own_conformance_check() {
        let text = jsonschema_value::conformance::document().to_string();
        let document = Document::parse(&text).unwrap();
        jsonschema_value::conformance::assert_conformance::<Dense>(&document.root());
    }

    #[test]
    fn the_last_of_a_repeated_name_wins_and_keeps_its_place() {
        let text = r#"{"a": 1, "b": 2, "\u0061": 3, "c": {"x": 0, "x": [1]}}"#;
        let document = Document::parse(text).unwrap();
        let root = document.root().as_object().unwrap();
        assert_eq!(Object::len(&root), 3);
        let names: Vec<String> = Object::members(&root)
            .map(|(name, _)| name.into_owned())
            .collect();
        assert_eq!(names, ["b", "a", "c"]);
        assert!(assert_sound(text.as_bytes()));
        // Past the pairwise check: sorted.
        let members: Vec<String> = (0..40).map(|i| format!(r#""k{}": {i}"#, i % 7)).collect();
        let text = format!("{{{}}}", members.join(", "));
        let document = Document::parse(&text).unwrap();
        let root = document.root().as_object().unwrap();
        assert_eq!(Object::len(&root), 7);
        let names: Vec<String> = Object::members(&root)
            .map(|(name, _)| name.into_owned())
            .collect();
        assert_eq!(names, ["k5", "k6", "k0", "k1", "k2", "k3", "k4"]);
        assert!(assert_sound(text.as_bytes()));
    }

    #[test]
    fn reads_numbers_strings_and_spacing_as_the_tape() {
        for text in [
            "0",
            "-0",
            "-0.0",
            "1.0",
            "1e2",
            "1E+2",
            "-1e-2",
            "1e-99",
            "9007199254740993",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775808",
            "-9223372036854775809",
            "123456789012345678901234567890",
            "0.1",
            "2.5e+10",
            " \n 1.5 \t",
            "\t[ 1 , {\"a\" : [ ] , \"b\":\"\" } , -0 ]\r\n",
            r#"["\u00e9\u20ac\uD83D\uDE00", "\"\\\/\b\f\n\r\t", "é€😀", "\u0000"]"#,
            r#"{"": {}, "[]": [[], {}], "t": [true, false, null]}"#,
        ] {
            assert!(assert_sound(text.as_bytes()), "{text}");
        }
    }

    #[test]
    fn unique_items_compares_strings_and_numbers_as_written_differently() {
        // Pairwise (up to 15 items) and hashed (more), each with a pair that
        // is equal only once decoded, and without one.
        let many = |extra: &str| {
            let items: Vec<String> = (0..20).map(|i| format!(r#""k{i}""#)).collect();
            format!("[{}{extra}]", items.join(","))
        };
        let texts = [
            r#"["a", "\u0061"]"#.to_owned(),
            r#"["ab", "a\u0062", "c"]"#.to_owned(),
            r#"["x\"y", "x\u0022y"]"#.to_owned(),
            r#"["\u00e9", "\u00E9", "é"]"#.to_owned(),
            r#"["\n", "\u000a"]"#.to_owned(),
            r#"["a", "b", "\u0063"]"#.to_owned(),
            r#"[{"s": "\u0061", "n": 1}, {"n": 1.0, "s": "a"}]"#.to_owned(),
            many(r#","\u006b7""#),
            many(r#","\u006b77""#),
            many(r#",{"a": ["\u006b1"]},{"a": ["k1"]}"#),
            many(r#",1,1.0"#),
        ];
        for text in &texts {
            let value: Value = serde_json::from_str(text).unwrap();
            let Some(items) = value.as_array() else {
                panic!("{text}");
            };
            let expected = jsonschema::json::unique::is_unique(items);
            let dense = Document::parse(text).unwrap();
            let dense = dense.root().as_array().unwrap();
            assert_eq!(dense.is_unique(), expected, "{text}");
            let tape = json_tape::Document::parse(text).unwrap();
            let tape = tape.root().as_array().unwrap();
            assert_eq!(tape.is_unique(), expected, "{text}");
        }
    }

    #[test]
    fn gives_up_on_what_it_is_not_sure_of() {
        for text in [
            "",
            " ",
            "nul",
            "[1,]",
            "{\"a\":1,}",
            "[1 2]",
            "{\"a\" 1}",
            "{a:1}",
            "01",
            "1.",
            ".5",
            "-",
            "+1",
            "1e",
            "1e+",
            "1e400",
            "1e100",
            "1e-400",
            "\"\\x\"",
            "\"\\u12\"",
            "\"\\uD800\"",
            "\"\\uDC00\"",
            "\"\\uD800\\u0041\"",
            "\"a\tb\"",
            "\"a\u{0}b\"",
            "\u{feff}1",
            "1 2",
            "\"a\"x",
            "[1]]",
            "{}}",
            "[",
            "{\"a\":",
            "\"abc",
            "[}",
            "{]",
            "{\"a\":1 \"b\":2}",
            "[\"a\\",
        ] {
            assert!(Document::parse(text).is_none(), "{text:?}");
        }
        let long = format!("1{}", "0".repeat(200));
        assert!(Document::parse(&long).is_none());
        assert!(Document::parse(&long[1..]).is_none(), "a leading zero");
        assert!(assert_sound(&long.as_bytes()[..200]));
    }

    #[test]
    fn nests_as_deep_as_serde_json_and_no_deeper() {
        let deepest = format!("{}{}", "[".repeat(127), "]".repeat(127));
        assert!(assert_sound(deepest.as_bytes()));
        let objects = format!("{}1{}", "{\"a\":".repeat(127), "}".repeat(127));
        assert!(assert_sound(objects.as_bytes()));
        for depth in [128, 129, 1000] {
            let arrays = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            assert!(Document::parse(&arrays).is_none());
        }
    }

    #[test]
    fn costs_at_most_eight_bytes_per_byte_of_body() {
        for (shape, text) in costly_shapes(1 << 16) {
            assert!(assert_sound(text.as_bytes()), "{shape}");
            let document = Document::parse(&text).unwrap();
            assert!(
                document.heap_bytes() <= 8 * text.len() + 16,
                "{shape}: {} bytes for {}",
                document.heap_bytes(),
                text.len()
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn reads_as_the_tape_reads(doc in doc()) {
            let text = text_of(&doc);
            if serde_json::from_str::<Value>(&text).is_ok() {
                // Exponents of three digits are the tape's.
                prop_assert!(assert_sound(text.as_bytes()) || text.contains(['e', 'E']));
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn never_accepts_what_serde_json_refuses(
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
            assert_sound(&bytes);
        }
    }

    #[test]
    fn names_are_checked_as_string_nodes() {
        Dense::with_string_node(&mut (), "héllo", |node| {
            assert_eq!(node.json_type(), JsonType::String);
            assert_eq!(node.string_length(), Some(5));
            assert!(node.equals_value(&serde_json::json!("héllo")));
            assert!(node.identity().is_some());
        });
    }
}

//! The tape as `jsonschema` sees it: [`TapeNode`], [`TapeObject`] and
//! [`TapeArray`] over a [`Document`], each answering from the body's bytes.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::sync::OnceLock;

use jsonschema::json::{Array, Json, Node, NodeIdentity, Object};
use jsonschema::types::JsonType;
use jsonschema_value::LazyInstance;
use serde::Deserialize;
use serde_json::{Number, Value};

use super::text::{
    Str, after_comma, byte, compare, compare_key, compare_quote_key, compare_quotes, raw,
    same_content, skip_ws, string_at,
};
use super::{Document, Entry, TABLE_MEMBERS, Tape};
use crate::policy::json_in_place::{self, InPlace};

/// A value of a [`Document`], or a name the validator checks on its own
/// (`propertyNames`).
#[derive(Clone, Copy)]
pub struct TapeNode<'a>(pub(super) Repr<'a>);

#[derive(Clone, Copy)]
pub(super) enum Repr<'a> {
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
}

impl<'a> InPlace<'a, Tape> for TapeNode<'a> {
    fn member(object: &TapeObject<'a>, key: &str) -> Option<Self> {
        object.find(key)
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

    fn same_string(&self, other: &Self) -> bool {
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
                same_content(
                    raw(doc.bytes(), left),
                    raw(theirs.bytes(), right),
                    left.escaped || right.escaped,
                )
            }
            (_, Repr::Name(name)) => self.equals_str(name),
            (Repr::Name(name), _) => other.equals_str(name),
        }
    }
}

/// Rebuilds the value starting at the front of `bytes` (the rest of the
/// body from the node on): only for an error someone reads the instance of.
pub(in crate::policy) fn materialize(bytes: &[u8], _tag: u32) -> Value {
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
    pub(super) doc: &'a Document<'a>,
    pub(super) pos: u32,
    pub(super) slot: u32,
    pub(super) entry: Option<Entry>,
    /// Its sorted names, when it has a table.
    pub(super) table: Option<&'a [u32]>,
    /// Whether a name is written twice in it.
    pub(super) repeated: bool,
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

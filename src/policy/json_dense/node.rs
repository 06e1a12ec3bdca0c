//! What the validator walks: a [`Document`]'s entries seen through
//! jsonschema's `Json`, `Node`, `Object` and `Array` traits, and through
//! `json_in_place` for equality, `const`, `enum` and `uniqueItems`.

use std::borrow::Cow;
use std::sync::OnceLock;

use jsonschema::json::{Array, Json, Node, NodeIdentity, Object};
use jsonschema::types::JsonType;
use jsonschema_value::LazyInstance;
use serde_json::{Number, Value};

use super::{Dense, Document, ESCAPED, Entry, Kind, REPEATS, SHADOWED};
use crate::policy::json_in_place::{self, InPlace};
use crate::policy::json_tape::{materialize, number_at, same_content};

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
    pub(super) fn at(doc: &'a Document<'a>, index: u32) -> Self {
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

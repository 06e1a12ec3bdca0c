//! JSON Schema equality, hashing and `uniqueItems` over a request body's
//! values where they lie in the body, never built as `serde_json::Value`s:
//! the one implementation behind both representations of a `json_schema`
//! body ([`super::json_dense`] and [`super::json_tape`]). Each
//! representation answers the few questions of [`InPlace`]; everything
//! else goes through `jsonschema`'s own node traits.
//!
//! Equality is `jsonschema`'s: numbers by value (1 and 1.0 alike), strings
//! after decoding their escapes, object members in any order (a repeated
//! name counting once, at its last occurrence).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

use ahash::RandomState;

use jsonschema::json::{Array, Json, Node, Object, cmp};
use jsonschema::types::JsonType;
use serde_json::{Number, Value};

/// `jsonschema`'s own threshold: up to this many items `uniqueItems`
/// compares pairwise rather than hashing.
pub(super) const PAIRWISE_UNIQUE: usize = 15;

/// What a representation's node answers beyond `jsonschema`'s traits, so
/// that comparing two nodes never decodes or allocates what it need not.
pub(super) trait InPlace<'a, J: Json>: Node<'a, J, Number = Number> + Copy {
    /// The value of the member named `key` of `object`, at the name's
    /// last occurrence; `jsonschema`'s `get` wants a prepared key instead.
    fn member(object: &Self::Object, key: &str) -> Option<Self>;

    /// Whether this node is a string equal to `expected`.
    fn equals_str(&self, expected: &str) -> bool;

    /// Whether two string nodes hold the same string once decoded, without
    /// decoding either into a copy (`as_string` would, for an escape).
    fn same_string(&self, other: &Self) -> bool;
}

/// JSON Schema equality of two nodes.
pub(super) fn same<'a, J: Json, N: InPlace<'a, J>>(left: &N, right: &N) -> bool {
    let kind = left.json_type();
    if kind != right.json_type() {
        return false;
    }
    match kind {
        JsonType::Null => true,
        JsonType::Boolean => left.as_boolean() == right.as_boolean(),
        JsonType::Number | JsonType::Integer => match (left.as_number(), right.as_number()) {
            (Some(left), Some(right)) => cmp::equal_numbers(&left, &right),
            _ => false,
        },
        JsonType::String => left.same_string(right),
        JsonType::Array => match (left.as_array(), right.as_array()) {
            (Some(left), Some(right)) => {
                left.len() == right.len()
                    && left
                        .elements()
                        .zip(right.elements())
                        .all(|(left, right)| same(&left, &right))
            }
            _ => false,
        },
        JsonType::Object => match (left.as_object(), right.as_object()) {
            (Some(left), Some(right)) => {
                left.len() == right.len()
                    && left.members().all(|(name, value)| {
                        N::member(&right, name.as_ref()).is_some_and(|other| same(&value, &other))
                    })
            }
            _ => false,
        },
    }
}

/// A hash that agrees with [`same`]: numbers by value, object members in
/// any order.
pub(super) fn hash_into<'a, J: Json, N: InPlace<'a, J>>(
    node: &N,
    keys: &RandomState,
    state: &mut impl Hasher,
) {
    match node.json_type() {
        JsonType::Null => state.write_u8(0),
        JsonType::Boolean => state.write_u8(1 + u8::from(node.as_boolean() == Some(true))),
        JsonType::Number | JsonType::Integer => {
            state.write_u8(3);
            if let Some(number) = node.as_number() {
                hash_number(&number, state);
            }
        }
        JsonType::String => {
            state.write_u8(4);
            if let Some(string) = node.as_string() {
                state.write(string.as_bytes());
            }
            state.write_u8(0xff);
        }
        JsonType::Array => {
            state.write_u8(5);
            for element in node
                .as_array()
                .into_iter()
                .flat_map(|array| array.elements())
            {
                hash_into(&element, keys, state);
            }
            state.write_u8(0xfe);
        }
        JsonType::Object => {
            let mut combined = 0_u64;
            for (name, value) in node
                .as_object()
                .into_iter()
                .flat_map(|object| object.members())
            {
                let mut member = keys.build_hasher();
                member.write(name.as_ref().as_bytes());
                member.write_u8(0xff);
                hash_into(&value, keys, &mut member);
                combined ^= member.finish();
            }
            state.write_u8(6);
            state.write_u64(combined);
        }
    }
}

/// Equal numbers (compared exactly, as `jsonschema` compares them) hash
/// alike: integers by their value, whatever the type holding them.
pub(super) fn hash_number(number: &Number, state: &mut impl Hasher) {
    // Past 2^127 every float is whole and no u64 or i64 equals it.
    const I128_RANGE: f64 = 1.7e38;
    if let Some(value) = number.as_u64() {
        state.write_i128(i128::from(value));
    } else if let Some(value) = number.as_i64() {
        state.write_i128(i128::from(value));
    } else if let Some(value) = number.as_f64() {
        if value.fract() == 0.0 && value.abs() < I128_RANGE {
            // Whole and in range, so the conversion is exact.
            state.write_i128(value as i128);
        } else {
            state.write_u64(value.to_bits());
        }
    }
}

/// `const` and `enum`: the node against a schema's value, in place (the
/// trait's default builds the node as a `Value`, which for a large node is
/// the tree both representations exist to avoid).
pub(super) fn equals_value<'a, J: Json, N: InPlace<'a, J>>(node: &N, expected: &Value) -> bool {
    match expected {
        Value::Null => node.is_null(),
        Value::Bool(boolean) => node.as_boolean() == Some(*boolean),
        Value::Number(number) => node
            .as_number()
            .is_some_and(|own| cmp::equal_numbers(&own, number)),
        Value::String(string) => node.equals_str(string),
        Value::Array(items) => node.as_array().is_some_and(|array| {
            array.len() == items.len()
                && array
                    .elements()
                    .zip(items)
                    .all(|(element, item)| equals_value(&element, item))
        }),
        Value::Object(map) => node.as_object().is_some_and(|object| {
            object.len() == map.len()
                && object.members().all(|(name, value)| {
                    map.get(name.as_ref())
                        .is_some_and(|expected| equals_value(&value, expected))
                })
        }),
    }
}

/// `uniqueItems`: pairwise when short, else a 4-byte hash per element and
/// a closer look only at the elements whose hash repeats (the trait's
/// default builds every element as a `Value`).
pub(super) fn is_unique<'a, J: Json, N: InPlace<'a, J>>(array: &N::Array) -> bool {
    let count = array.len();
    if count <= 1 {
        return true;
    }
    if count <= PAIRWISE_UNIQUE {
        // On the stack: small arrays are the common case, often one per item
        // of an outer array.
        let mut elements = array.elements();
        let Some(first) = elements.next() else {
            return true;
        };
        let mut items = [first; PAIRWISE_UNIQUE];
        let mut len = 1;
        for (slot, item) in items.iter_mut().skip(1).zip(elements) {
            *slot = item;
            len += 1;
        }
        let items = items.get(..len).unwrap_or_default();
        return items
            .iter()
            .enumerate()
            .all(|(index, item)| items.iter().skip(index + 1).all(|other| !same(item, other)));
    }
    // Keys drawn per call, so a body cannot be made of colliding items.
    // aHash rather than std's SipHash: keyed as well, and a third of the
    // time a large array of objects took to check went into SipHash.
    let keys = RandomState::new();
    let hash = |item: &N| {
        let mut state = keys.build_hasher();
        hash_into(item, &keys, &mut state);
        // Truncated on purpose: a repeated hash is only a candidate.
        state.finish() as u32
    };
    let mut hashes: Vec<u32> = Vec::with_capacity(count);
    hashes.extend(array.elements().map(|item| hash(&item)));
    hashes.sort_unstable();
    let mut repeated: Vec<u32> = Vec::new();
    for pair in hashes.windows(2) {
        if let [left, right] = pair
            && left == right
            && repeated.last() != Some(left)
        {
            repeated.push(*left);
        }
    }
    drop(hashes);
    if repeated.is_empty() {
        return true;
    }
    let mut candidates: HashMap<u32, Vec<N>> = HashMap::new();
    for item in array.elements() {
        let short = hash(&item);
        if repeated.binary_search(&short).is_err() {
            continue;
        }
        let seen = candidates.entry(short).or_default();
        if seen.iter().any(|other| same(&item, other)) {
            return false;
        }
        seen.push(item);
    }
    true
}

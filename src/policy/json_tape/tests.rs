//! The tape against `serde_json`: every node reads as the `Value` would.
//! `policy::json_dense` and `policy::schema` test against the same
//! documents and schemas.

use std::sync::OnceLock;

use jsonschema::json::{Array, Json, JsonNumber, Node, Object, cmp};
use jsonschema::types::JsonType;
use serde_json::Value;

use super::text::{compare, compare_quote_key};
use super::*;
use crate::policy::json_in_place;
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
                for (right, right_value) in elements.iter().zip(items).skip(index + 1).take(32) {
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

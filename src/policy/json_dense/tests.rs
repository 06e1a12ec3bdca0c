//! The dense document against the tape of the same text (every accessor
//! the validator calls must agree), and against jsonschema's own
//! `uniqueItems` on values written differently.

use jsonschema::json::{Array, Json, Node, Object};
use jsonschema::types::JsonType;
use serde_json::Value;

use super::*;
use crate::policy::json_in_place;
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
        for ((name, dense_value), (tape_name, tape_value)) in members.into_iter().zip(expected) {
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

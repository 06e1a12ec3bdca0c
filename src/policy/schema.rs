//! JSON-schema validation of request bodies (`json_schema = "file"`).
//!
//! The schema is compiled once per configuration load ([`RouteSchema::load`])
//! with the `jsonschema` crate: drafts 4, 6, 7, 2019-09 and 2020-12, the
//! draft taken from `$schema` (2020-12 when absent), `format` asserted.
//! Nothing is fetched: a `$ref` to another document is a configuration
//! error, never a request-time download.
//!
//! The decision is pure: the request's media type ([`check_media_type`]),
//! then the collected body bytes ([`RouteSchema::judge`]). What a client is
//! told names the place (a JSON pointer) and the schema's rule, never a
//! value it sent: a password that fails a `pattern` is not echoed back.
//!
//! The body is never a `serde_json::Value` tree (~90 times the body's
//! size). Up to [`DENSE_MAX_BYTES`] it is a [`json_dense::Document`], an
//! entry per value, quick to walk, at most 8 times the body's size: 512 KiB
//! at the threshold, and a worker judges one body at a time. Past it, or
//! when the dense pass gives up (it leaves every refusal to the tape), it is
//! a [`json_tape::Document`] over its own bytes, slower to walk but under
//! the body's size, so a flood of large bodies costs about their size while
//! they are judged. Both are shown to the validator alike (the tests run
//! both over the same bodies), so which one judged never shows.

use http::HeaderMap;
use http::header::CONTENT_TYPE;
use jsonschema::error::{TypeKind, ValidationErrorKind};
use jsonschema::json::Json;

use crate::policy::json_dense::{self, Dense};
use crate::policy::json_tape::{self, Tape};

/// Violations reported to the client at most.
pub const MAX_DETAILS: usize = 10;

/// Bodies up to this size get every violation (up to [`MAX_DETAILS`]);
/// larger ones the first. Collecting all of them costs a few hundred bytes
/// per violation, so this bounds that walk to about 1 MiB per request.
pub const FULL_REPORT_MAX_BYTES: usize = 8 * 1024;

/// Bodies up to this size are judged as a [`json_dense::Document`]: judging
/// a 1 KiB order took 4.7 µs against the tape's 12 (`examples/schema_bench.rs`),
/// for at most 8 bytes per byte of body (512 KiB here) held while judging,
/// one body per worker at a time. Past it the tape keeps a flood of large
/// uploads at about their own size.
pub const DENSE_MAX_BYTES: usize = 64 * 1024;

/// A compiled schema and the file it came from.
pub struct RouteSchema {
    /// The file name as written in the configuration, for messages.
    pub file: String,
    /// The same schema, compiled for each representation.
    dense: jsonschema::Validator<Dense>,
    tape: jsonschema::Validator<Tape>,
}

impl std::fmt::Debug for RouteSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteSchema")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

/// One way the body fails the schema.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Violation {
    /// Where in the body (RFC 6901), `""` for the whole document.
    pub pointer: String,
    pub message: String,
}

/// Why a body was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaFailure {
    /// Not UTF-8 or not JSON; says where, never what.
    NotJson(String),
    /// Valid JSON that breaks the schema: the first [`MAX_DETAILS`] violations.
    Invalid(Vec<Violation>),
}

impl RouteSchema {
    /// Reads and compiles `path`. `file` is the name written in the
    /// configuration. The error says why, without the file name (the caller
    /// puts the key and the file in front).
    pub fn load(file: &str, path: &std::path::Path) -> Result<RouteSchema, String> {
        let text = std::fs::read(path).map_err(|e| format!("cannot read the file: {e}"))?;
        let schema: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| format!("not a JSON document ({e})"))?;
        Self::compile(file, &schema)
    }

    pub fn compile(file: &str, schema: &serde_json::Value) -> Result<RouteSchema, String> {
        if !(schema.is_object() || schema.is_boolean()) {
            return Err("a schema is a JSON object (or true/false)".into());
        }
        Ok(RouteSchema {
            file: file.to_owned(),
            dense: build(schema)?,
            tape: build(schema)?,
        })
    }

    /// Judges a whole body already read.
    pub fn judge(&self, body: &[u8]) -> Result<(), SchemaFailure> {
        let text = std::str::from_utf8(body).map_err(|e| {
            SchemaFailure::NotJson(format!(
                "the body is not UTF-8 (invalid byte at offset {})",
                e.valid_up_to()
            ))
        })?;
        if let Some(verdict) = self.judge_dense(text) {
            return verdict;
        }
        self.judge_tape(text)
    }

    /// The verdict on a small body the dense pass accepts; `None` for the
    /// tape to judge.
    fn judge_dense(&self, text: &str) -> Option<Result<(), SchemaFailure>> {
        if text.len() > DENSE_MAX_BYTES {
            return None;
        }
        let document = json_dense::Document::parse(text)?;
        Some(verdict(&self.dense, document.root(), text.len()))
    }

    fn judge_tape(&self, text: &str) -> Result<(), SchemaFailure> {
        let document = json_tape::Document::parse(text).map_err(|e| match e {
            json_tape::ParseError::Syntax(e) => {
                let what = match e.classify() {
                    serde_json::error::Category::Eof => "it ends too early",
                    serde_json::error::Category::Data | serde_json::error::Category::Syntax => {
                        "a syntax error"
                    }
                    serde_json::error::Category::Io => "it cannot be read",
                };
                SchemaFailure::NotJson(format!(
                    "the body is not JSON: {what} at line {} column {}",
                    e.line(),
                    e.column()
                ))
            }
            json_tape::ParseError::TooLarge => SchemaFailure::NotJson(
                "the body is too large to be checked against a schema (4 GiB or more)".into(),
            ),
        })?;
        verdict(&self.tape, document.root(), text.len())
    }
}

/// Compiles `schema` for the representation `F`.
fn build<F: Json>(schema: &serde_json::Value) -> Result<jsonschema::Validator<F>, String> {
    jsonschema::options_for::<F>()
        .should_validate_formats(true)
        .build(schema)
        .map_err(|e| match e.kind() {
            ValidationErrorKind::Referencing(inner) => format!(
                "a $ref cannot be resolved ({inner}); remote and file references are never fetched: inline the referenced schema under $defs"
            ),
            _ => format!("not a valid schema: {e}"),
        })
}

/// Validates the body `root` (of `size` bytes) and says what fails.
fn verdict<'i, F: Json>(
    validator: &'i jsonschema::Validator<F>,
    root: F::Node<'i>,
    size: usize,
) -> Result<(), SchemaFailure> {
    if validator.is_valid(root.clone()) {
        return Ok(());
    }
    let violation = |error: jsonschema::ValidationError<'_>| {
        let pointer = error.instance_path().to_string();
        let message = describe(&pointer, error.kind());
        Violation { pointer, message }
    };
    // jsonschema gathers every violation before the first is handed out,
    // a few hundred bytes each: a large body whose every item fails
    // would cost tens of times its size. Past a small body only the first
    // violation is looked for, which stops where it is found.
    let violations: Vec<Violation> = if size <= FULL_REPORT_MAX_BYTES {
        validator
            .iter_errors(root)
            .take(MAX_DETAILS)
            .map(violation)
            .collect()
    } else {
        validator
            .validate(root)
            .err()
            .map(violation)
            .into_iter()
            .collect()
    };
    if violations.is_empty() {
        // is_valid and the error walk disagree only if jsonschema does;
        // refusing without a detail is safer than forwarding.
        return Err(SchemaFailure::Invalid(vec![Violation {
            pointer: String::new(),
            message: "the body does not match the schema".into(),
        }]));
    }
    Err(SchemaFailure::Invalid(violations))
}

/// True when the body is declared JSON: `application/json` or
/// `application/<anything>+json`, parameters allowed, any case.
pub fn check_media_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    if !kind.eq_ignore_ascii_case("application") {
        return false;
    }
    let is_token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    if subtype.eq_ignore_ascii_case("json") {
        return true;
    }
    subtype.len() > 5
        && subtype[subtype.len() - 5..].eq_ignore_ascii_case("+json")
        && is_token(&subtype[..subtype.len() - 5])
}

/// A message from the place and the schema's rule only.
fn describe(pointer: &str, kind: &ValidationErrorKind) -> String {
    use ValidationErrorKind as K;
    let rule = match kind {
        K::Required { property } => format!("lacks the required property {property}"),
        K::Type { kind } => {
            let names: Vec<String> = match kind {
                TypeKind::Single(t) => vec![t.to_string()],
                TypeKind::Multiple(set) => set.iter().map(|t| t.to_string()).collect(),
            };
            format!("must be of type {}", names.join(" or "))
        }
        K::Enum { .. } => "must be one of the values the schema lists".into(),
        K::Constant { .. } => "must equal the value the schema sets".into(),
        K::Minimum { limit } => format!("must be at least {limit}"),
        K::Maximum { limit } => format!("must be at most {limit}"),
        K::ExclusiveMinimum { limit } => format!("must be greater than {limit}"),
        K::ExclusiveMaximum { limit } => format!("must be less than {limit}"),
        K::MultipleOf { multiple_of } => format!("must be a multiple of {multiple_of}"),
        K::MinLength { limit } => format!("must be at least {limit} characters long"),
        K::MaxLength { limit } => format!("must be at most {limit} characters long"),
        K::MinItems { limit } => format!("must have at least {limit} items"),
        K::MaxItems { limit } => format!("must have at most {limit} items"),
        K::AdditionalItems { limit } => format!("must have at most {limit} items"),
        K::MinProperties { limit } => format!("must have at least {limit} properties"),
        K::MaxProperties { limit } => format!("must have at most {limit} properties"),
        K::UniqueItems => "must not contain the same item twice".into(),
        K::Pattern { .. } => "does not match the pattern the schema requires".into(),
        K::Format { format } => format!("is not a valid \"{format}\""),
        K::AdditionalProperties { unexpected } => format!(
            "has {} propert{} the schema does not allow",
            unexpected.len(),
            if unexpected.len() == 1 { "y" } else { "ies" }
        ),
        K::UnevaluatedProperties { .. } => "has properties the schema does not allow".into(),
        K::UnevaluatedItems { .. } => "has items the schema does not allow".into(),
        K::PropertyNames { .. } => "has a property name the schema does not allow".into(),
        K::Contains => "has no item of the kind the schema requires".into(),
        K::FalseSchema => "is not allowed here".into(),
        K::Not { .. } => "matches a schema it must not match".into(),
        K::AnyOf { .. } => "matches none of the alternatives (anyOf)".into(),
        K::OneOfNotValid { .. } => "matches none of the alternatives (oneOf)".into(),
        K::OneOfMultipleValid { .. } => "matches more than one alternative (oneOf)".into(),
        other => format!("fails the schema's \"{}\" rule", other.keyword()),
    };
    let place = if pointer.is_empty() {
        "the body".to_owned()
    } else {
        pointer.to_owned()
    };
    format!("{place} {rule} ({})", kind.keyword())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn order_schema() -> RouteSchema {
        RouteSchema::compile(
            "order.json",
            &json!({
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "type": "object",
                "required": ["items"],
                "additionalProperties": false,
                "properties": {
                    "items": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["sku", "qty"],
                            "properties": {
                                "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]+$"},
                                "qty": {"type": "integer", "minimum": 1}
                            }
                        }
                    },
                    "password": {"type": "string", "pattern": "^[a-z]+$"},
                    "tier": {"enum": ["gold", "silver"]},
                    "email": {"type": "string", "format": "email"}
                }
            }),
        )
        .unwrap()
    }

    fn violations(schema: &RouteSchema, body: &str) -> Vec<Violation> {
        match schema.judge(body.as_bytes()) {
            Err(SchemaFailure::Invalid(v)) => v,
            other => panic!("expected violations, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_body_passes() {
        let schema = order_schema();
        assert_eq!(
            schema.judge(br#"{"items":[{"sku":"ABC-1","qty":2}],"tier":"gold"}"#),
            Ok(())
        );
    }

    #[test]
    fn each_violation_names_its_pointer_and_rule() {
        let schema = order_schema();
        let found = violations(&schema, r#"{"items":[{"sku":"ABC-1","qty":0}]}"#);
        assert_eq!(
            found,
            [Violation {
                pointer: "/items/0/qty".into(),
                message: "/items/0/qty must be at least 1 (minimum)".into()
            }]
        );
        let found = violations(&schema, r#"{"items":[{"qty":"two"}]}"#);
        let pointers: Vec<&str> = found.iter().map(|v| v.pointer.as_str()).collect();
        assert!(pointers.contains(&"/items/0"), "{found:?}");
        assert!(pointers.contains(&"/items/0/qty"), "{found:?}");
        assert!(
            found
                .iter()
                .any(|v| v.message.contains("required property \"sku\"")),
            "{found:?}"
        );
        let found = violations(&schema, "[]");
        assert_eq!(found[0].pointer, "");
        assert!(
            found[0]
                .message
                .starts_with("the body must be of type object")
        );
    }

    #[test]
    fn messages_never_echo_what_the_client_sent() {
        let schema = order_schema();
        let secret = "Hunter2-Secret";
        let body = format!(
            r#"{{"items":[{{"sku":"{secret}","qty":1}}],"password":"{secret}","tier":"{secret}","email":"{secret}","{secret}":1}}"#
        );
        let found = violations(&schema, &body);
        assert!(found.len() >= 5, "{found:?}");
        for violation in &found {
            assert!(!violation.message.contains(secret), "{violation:?}");
            assert!(!violation.message.contains("Hunter"), "{violation:?}");
        }
    }

    #[test]
    fn at_most_ten_violations() {
        let schema = order_schema();
        let items: Vec<String> = (0..30)
            .map(|_| r#"{"sku":1,"qty":0}"#.to_string())
            .collect();
        let found = violations(&schema, &format!(r#"{{"items":[{}]}}"#, items.join(",")));
        assert_eq!(found.len(), MAX_DETAILS);
    }

    #[test]
    fn not_json_says_where_not_what() {
        let schema = order_schema();
        match schema.judge(br#"{"items": [secret-value"#) {
            Err(SchemaFailure::NotJson(why)) => {
                assert!(why.contains("line 1 column"), "{why}");
                assert!(!why.contains("secret"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        match schema.judge(b"{\"a\": \"\xff\xfe\"}") {
            Err(SchemaFailure::NotJson(why)) => assert!(why.contains("not UTF-8"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            schema.judge(b"{\"items\": [1,"),
            Err(SchemaFailure::NotJson(_))
        ));
    }

    #[test]
    fn the_draft_comes_from_dollar_schema() {
        // draft 4: exclusiveMaximum is a boolean beside maximum.
        let draft4 = RouteSchema::compile(
            "d4.json",
            &json!({
                "$schema": "http://json-schema.org/draft-04/schema#",
                "type": "number", "maximum": 10, "exclusiveMaximum": true
            }),
        )
        .unwrap();
        assert!(draft4.judge(b"10").is_err());
        assert_eq!(draft4.judge(b"9"), Ok(()));
        // 2020-12 by default: prefixItems is understood.
        let default = RouteSchema::compile(
            "d.json",
            &json!({"prefixItems": [{"type": "integer"}], "items": false}),
        )
        .unwrap();
        assert_eq!(default.judge(b"[1]"), Ok(()));
        assert!(default.judge(b"[1, 2]").is_err());
    }

    #[test]
    fn bad_schemas_are_refused_with_why() {
        let err = RouteSchema::compile("x.json", &json!({"type": "no-such-type"})).unwrap_err();
        assert!(err.contains("not a valid schema"), "{err}");
        let err = RouteSchema::compile("x.json", &json!([1])).unwrap_err();
        assert!(err.contains("JSON object"), "{err}");
        let err = RouteSchema::compile(
            "x.json",
            &json!({"$ref": "https://schemas.example.com/order.json"}),
        )
        .unwrap_err();
        assert!(err.contains("never fetched"), "{err}");
    }

    #[test]
    fn a_large_body_reports_its_first_violation_only() {
        let schema = order_schema();
        let item = r#"{"sku":"ABC-1","qty":0},"#;
        let count = FULL_REPORT_MAX_BYTES / item.len() + 10;
        let body = format!(
            r#"{{"items":[{}{{"sku":"ABC-1","qty":0}}]}}"#,
            item.repeat(count)
        );
        assert!(body.len() > FULL_REPORT_MAX_BYTES);
        let found = violations(&schema, &body);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].pointer, "/items/0/qty");

        let small = format!(
            r#"{{"items":[{}{{"sku":"ABC-1","qty":0}}]}}"#,
            item.repeat(20)
        );
        assert!(small.len() <= FULL_REPORT_MAX_BYTES);
        assert_eq!(violations(&schema, &small).len(), MAX_DETAILS);
    }

    /// Every schema `json_tape`'s tests validate with, and the order one.
    fn route_schemas() -> &'static [RouteSchema] {
        static SCHEMAS: std::sync::OnceLock<Vec<RouteSchema>> = std::sync::OnceLock::new();
        SCHEMAS.get_or_init(|| {
            let mut schemas = vec![order_schema()];
            for schema in json_tape::tests::schemas() {
                schemas.push(RouteSchema::compile(&schema.to_string(), &schema).unwrap());
            }
            schemas
        })
    }

    /// The dense verdict, when the dense pass takes the body, is the
    /// tape's: the same refusal and the same violations in the same order.
    /// Returns whether it took it.
    fn judged_alike(body: &str) -> bool {
        let mut taken = false;
        for schema in route_schemas() {
            let tape = schema.judge_tape(body);
            if let Some(dense) = schema.judge_dense(body) {
                assert_eq!(dense, tape, "{} on {body}", schema.file);
                taken = true;
            }
            assert_eq!(
                schema.judge(body.as_bytes()),
                tape,
                "{} on {body}",
                schema.file
            );
        }
        taken
    }

    #[test]
    fn both_representations_judge_alike() {
        let item = |i: usize| format!(r#"{{"sku":"ABC-{i}","qty":{}}}"#, i % 3);
        let items = |n: usize| (0..n).map(item).collect::<Vec<_>>().join(",");
        let mut bodies: Vec<String> = [
            r#"{"items":[{"sku":"ABC-1","qty":2}],"tier":"gold"}"#,
            r#"{"items":[{"sku":"ABC-1","qty":0}]}"#,
            r#"{"items":[{"qty":"two"}], "a": 1, "b": "x", "c": [1, 1.0]}"#,
            r#"{"a": "x", "b": 1, "a": 2, "\u0061": "zz", "d": [1, 1.0], "é": null}"#,
            r#"{"items": [], "items": [{"sku": "\u0041BC-1", "qty": 1e0}]}"#,
            r#"[1, 1.0, "a", "\u0061", {"a": 1}, {"a": 1.0}, [], [], null, true]"#,
            r#"["😀", "\uD83D\uDE00", "é€", "\"\\\/\b\f\n\r\t", "\u0000", "ab", "abcd"]"#,
            r#"[18446744073709551615, 18446744073709551616, -9223372036854775809, 1e19, -0, 0.5, 2.5e+10]"#,
            r#"{"a": [{"a": [{"a": {}}]}], "b": [[[[]]]], "c": "", "d": {"e": {"f": 1}}}"#,
            "[]",
            "{}",
            "\"x\"",
            "-1.5",
            "null",
            // Refused: the tape says why, whichever path is tried first.
            "",
            "[1,]",
            r#"{"items": [secret-value"#,
            "{\"items\": [1,",
            "\"\\uD800\"",
            "1e400",
            "[1] x",
        ]
        .map(str::to_owned)
        .to_vec();
        let wide: Vec<String> = (0..100)
            .map(|i| format!(r#""{}": {}"#, ["a", "b", "c", "é", "k", "sku"][i % 6], i))
            .collect();
        bodies.push(format!("{{{}}}", wide.join(",")));
        bodies.push(format!(r#"{{"items":[{}]}}"#, items(30)));
        // Past the full report, and at the dense threshold.
        bodies.push(format!(r#"{{"items":[{}]}}"#, items(600)));
        let mut at_threshold = format!(r#"{{"items":[{}], "note": ""#, items(1500));
        let pad = DENSE_MAX_BYTES - at_threshold.len() - 2;
        at_threshold.push_str(&"n".repeat(pad));
        at_threshold.push_str("\"}");
        assert_eq!(at_threshold.len(), DENSE_MAX_BYTES);
        bodies.push(at_threshold);
        for depth in [10, 127, 128] {
            bodies.push(format!("{}{}", "[".repeat(depth), "]".repeat(depth)));
            bodies.push(format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth)));
        }
        for (_, shape) in json_tape::tests::costly_shapes(1 << 14) {
            bodies.push(shape);
        }
        let mut taken = 0;
        for body in &bodies {
            taken += usize::from(judged_alike(body));
        }
        // All but the refused, the two too deep and 1e400.
        assert!(taken + 10 >= bodies.len(), "{taken} of {}", bodies.len());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        #[test]
        fn generated_bodies_are_judged_alike(
            doc in json_tape::tests::doc(),
            cut in proptest::prelude::any::<proptest::sample::Index>(),
            insert in proptest::prelude::any::<proptest::sample::Index>(),
            edit in 0_u8..4,
        ) {
            let mut body = json_tape::tests::text_of(&doc).into_bytes();
            if edit == 0 {
                let at = cut.index(body.len() + 1);
                let insert = json_tape::tests::INSERTS[insert.index(json_tape::tests::INSERTS.len())];
                body.splice(at..at, insert.iter().copied());
            }
            if let Ok(body) = std::str::from_utf8(&body) {
                judged_alike(body);
            }
        }
    }

    #[test]
    fn json_media_types() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(CONTENT_TYPE, value.parse().unwrap());
            check_media_type(&headers)
        };
        for ok in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            "application/json;charset=UTF-8",
            "application/merge-patch+json",
            "application/vnd.api+JSON ; x=y",
        ] {
            assert!(with(ok), "{ok}");
        }
        for bad in [
            "text/json",
            "application/jsonx",
            "application/+json",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "json",
            "",
        ] {
            assert!(!with(bad), "{bad}");
        }
        assert!(!check_media_type(&HeaderMap::new()));
    }
}

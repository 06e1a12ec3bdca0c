//! Route claim rules (`claims = { "realm_access.roles" = ["admin", "ops"],
//! tenant = "acme" }`): every rule must hold on the verified token, else 403
//! `insufficient_claims`. Runs right after scopes.
//!
//! A rule names a claim by a dotted path that walks into nested objects:
//! `realm_access.roles` is the `roles` member of the `realm_access` object.
//! A segment that itself contains a dot (Auth0's and Okta's namespaced
//! claims are URLs) is written in double quotes inside the key, which TOML
//! lets one write with a literal key: `'"https://example.com/roles"'` is the
//! one claim named `https://example.com/roles`, and
//! `'"https://example.com/app".tier'` walks into it. Inside the quotes, `\"`
//! is a quote and `\\` a backslash.
//!
//! The rule holds when the claim equals the value, or one of the listed
//! values; when the claim is an array, one matching element is enough.
//! Strings, integers and booleans compare by type and value (`"1"` is not
//! `1`, `1.0` is not `1`). A missing claim, or a path that meets anything
//! but an object on its way, fails.
//!
//! Pure: the config layer parses rules with [`ClaimRule::parse`], the
//! pipeline calls [`check`] on the token's claims.

use std::fmt;

use serde_json::{Map, Value};

/// One accepted value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimValue {
    String(String),
    Integer(i64),
    Bool(bool),
}

impl ClaimValue {
    fn matches(&self, value: &Value) -> bool {
        match (self, value) {
            (ClaimValue::String(want), Value::String(got)) => want == got,
            (ClaimValue::Integer(want), Value::Number(got)) => got.as_i64() == Some(*want),
            (ClaimValue::Bool(want), Value::Bool(got)) => want == got,
            _ => false,
        }
    }
}

/// A rule: the claim at `path` must match one of `accepted`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRule {
    /// The key as written in `proxy.toml`: what a 403 and the log name.
    pub name: String,
    path: Vec<String>,
    accepted: Vec<ClaimValue>,
}

/// Why a rule's key cannot be a claim path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimPathError {
    #[error("an empty segment (a leading, trailing or doubled dot)")]
    EmptySegment,
    #[error("a quoted segment without its closing quote")]
    Unterminated,
    #[error("a quoted segment must be followed by a dot or the end")]
    AfterQuote,
    #[error("a quote inside an unquoted segment")]
    StrayQuote,
}

impl ClaimRule {
    /// A rule on the claim `name` (dotted path, quoted segments) accepting
    /// `accepted` (at least one value; the config layer checks that).
    pub fn parse(name: &str, accepted: Vec<ClaimValue>) -> Result<Self, ClaimPathError> {
        Ok(ClaimRule {
            name: name.to_owned(),
            path: parse_path(name)?,
            accepted,
        })
    }
}

/// The claim (by name) whose rule did not hold; never its value in the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedClaim {
    pub claim: String,
}

impl fmt::Display for FailedClaim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.claim)
    }
}

/// `Ok` when every rule holds on `claims`; else the first rule (in the
/// route's order) that did not.
pub fn check(rules: &[ClaimRule], claims: &Map<String, Value>) -> Result<(), FailedClaim> {
    match rules.iter().find(|rule| !holds(rule, claims)) {
        None => Ok(()),
        Some(rule) => Err(FailedClaim {
            claim: rule.name.clone(),
        }),
    }
}

fn holds(rule: &ClaimRule, claims: &Map<String, Value>) -> bool {
    let Some((last, walk)) = rule.path.split_last() else {
        return false;
    };
    let mut object = claims;
    for segment in walk {
        match object.get(segment) {
            Some(Value::Object(inner)) => object = inner,
            _ => return false,
        }
    }
    match object.get(last) {
        Some(Value::Array(items)) => items
            .iter()
            .any(|item| rule.accepted.iter().any(|want| want.matches(item))),
        Some(value) => rule.accepted.iter().any(|want| want.matches(value)),
        None => false,
    }
}

fn parse_path(name: &str) -> Result<Vec<String>, ClaimPathError> {
    let mut segments = Vec::new();
    let mut chars = name.chars().peekable();
    loop {
        let mut segment = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err(ClaimPathError::Unterminated),
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(c @ ('"' | '\\')) => segment.push(c),
                        Some(c) => {
                            segment.push('\\');
                            segment.push(c);
                        }
                        None => return Err(ClaimPathError::Unterminated),
                    },
                    Some(c) => segment.push(c),
                }
            }
            if segment.is_empty() {
                return Err(ClaimPathError::EmptySegment);
            }
            segments.push(segment);
            match chars.next() {
                None => return Ok(segments),
                Some('.') => continue,
                Some(_) => return Err(ClaimPathError::AfterQuote),
            }
        }
        loop {
            match chars.next() {
                None | Some('.') if segment.is_empty() => return Err(ClaimPathError::EmptySegment),
                None => {
                    segments.push(segment);
                    return Ok(segments);
                }
                Some('.') => {
                    segments.push(std::mem::take(&mut segment));
                    break;
                }
                Some('"') => return Err(ClaimPathError::StrayQuote),
                Some(c) => segment.push(c),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rule(name: &str, accepted: &[ClaimValue]) -> ClaimRule {
        ClaimRule::parse(name, accepted.to_vec()).unwrap()
    }

    fn s(v: &str) -> ClaimValue {
        ClaimValue::String(v.into())
    }

    fn claims(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn paths() {
        assert_eq!(parse_path("tenant").unwrap(), ["tenant"]);
        assert_eq!(
            parse_path("realm_access.roles").unwrap(),
            ["realm_access", "roles"]
        );
        assert_eq!(
            parse_path(r#""https://example.com/roles""#).unwrap(),
            ["https://example.com/roles"]
        );
        assert_eq!(
            parse_path(r#""https://example.com/app".tier"#).unwrap(),
            ["https://example.com/app", "tier"]
        );
        assert_eq!(parse_path(r#"a."b.c".d"#).unwrap(), ["a", "b.c", "d"]);
        assert_eq!(
            parse_path(r#""say \"hi\" \\ ok""#).unwrap(),
            [r#"say "hi" \ ok"#]
        );
        for (bad, error) in [
            ("", ClaimPathError::EmptySegment),
            (".a", ClaimPathError::EmptySegment),
            ("a.", ClaimPathError::EmptySegment),
            ("a..b", ClaimPathError::EmptySegment),
            (r#""""#, ClaimPathError::EmptySegment),
            (r#""open"#, ClaimPathError::Unterminated),
            (r#""a"b"#, ClaimPathError::AfterQuote),
            (r#"a"b"#, ClaimPathError::StrayQuote),
        ] {
            assert_eq!(parse_path(bad), Err(error), "{bad:?}");
        }
    }

    #[test]
    fn nested_and_array_claims() {
        let token = claims(json!({
            "realm_access": {"roles": ["user", "ops"]},
            "tenant": "acme",
            "https://example.com/roles": ["billing"],
            "https://example.com/app": {"tier": "gold"},
        }));
        let ok = [
            rule("realm_access.roles", &[s("admin"), s("ops")]),
            rule("tenant", &[s("acme")]),
            rule(r#""https://example.com/roles""#, &[s("billing")]),
            rule(
                r#""https://example.com/app".tier"#,
                &[s("gold"), s("silver")],
            ),
        ];
        assert_eq!(check(&ok, &token), Ok(()));
        assert_eq!(
            check(&[rule("realm_access.roles", &[s("admin")])], &token),
            Err(FailedClaim {
                claim: "realm_access.roles".into()
            })
        );
        assert_eq!(
            check(&[rule("tenant", &[s("other")])], &token)
                .unwrap_err()
                .claim,
            "tenant"
        );
        assert!(check(&[], &token).is_ok(), "no rules, nothing to hold");
    }

    #[test]
    fn types_compare_by_type_and_value() {
        let token = claims(json!({
            "level": 1, "float": 1.0, "text": "1", "verified": true, "flag": "true",
            "big": 9_007_199_254_740_993_i64, "neg": -3, "levels": [1, "2"],
        }));
        let one = ClaimValue::Integer(1);
        assert!(check(&[rule("level", std::slice::from_ref(&one))], &token).is_ok());
        assert!(
            check(&[rule("float", std::slice::from_ref(&one))], &token).is_err(),
            "1.0 is not 1"
        );
        assert!(
            check(&[rule("text", std::slice::from_ref(&one))], &token).is_err(),
            "\"1\" is not 1"
        );
        assert!(
            check(&[rule("level", &[s("1")])], &token).is_err(),
            "1 is not \"1\""
        );
        assert!(check(&[rule("verified", &[ClaimValue::Bool(true)])], &token).is_ok());
        assert!(check(&[rule("flag", &[ClaimValue::Bool(true)])], &token).is_err());
        assert!(check(&[rule("verified", &[s("true")])], &token).is_err());
        assert!(
            check(
                &[rule("big", &[ClaimValue::Integer(9_007_199_254_740_993)])],
                &token
            )
            .is_ok(),
            "integers compare exactly, beyond 2^53"
        );
        assert!(check(&[rule("neg", &[ClaimValue::Integer(-3)])], &token).is_ok());
        assert!(check(&[rule("levels", &[ClaimValue::Integer(2)])], &token).is_err());
        assert!(check(&[rule("levels", &[s("2")])], &token).is_ok());
    }

    #[test]
    fn missing_claims_and_paths_through_non_objects_fail() {
        let token = claims(json!({
            "realm_access": {"roles": ["admin"]},
            "tenant": "acme",
            "null": null,
            "list": [{"role": "admin"}],
            "obj": {"x": 1},
        }));
        for name in [
            "absent",
            "realm_access.absent",
            "tenant.sub",
            "null",
            "list.role",
            "obj",
            "realm_access",
        ] {
            assert_eq!(
                check(&[rule(name, &[s("admin")])], &token),
                Err(FailedClaim { claim: name.into() }),
                "{name}"
            );
        }
        // The first failing rule in the route's order is named.
        let rules = [
            rule("tenant", &[s("acme")]),
            rule("absent", &[s("x")]),
            rule("realm_access.absent", &[s("x")]),
        ];
        assert_eq!(check(&rules, &token).unwrap_err().claim, "absent");
    }
}

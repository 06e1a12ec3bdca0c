//! [`VerifiedToken`]: what a token that passed verification offers the
//! policies after it — the subject for the access log and a rate limit, the
//! scopes, and claims rendered as headers for the upstream.

use std::sync::Arc;

use serde_json::{Map, Value};

/// A token that passed signature and claim checks.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedToken {
    /// Shared: a token verified once is handed out again from the cache.
    pub claims: Arc<Map<String, Value>>,
}

impl VerifiedToken {
    /// The `sub` claim, when it is a string.
    pub fn subject(&self) -> Option<&str> {
        self.claims.get("sub").and_then(Value::as_str)
    }

    /// The granted scopes: the `scope` claim (a space-separated string, or
    /// an array) and the `scp` claim (an array or a string), flattened.
    pub fn scopes(&self) -> Vec<&str> {
        let mut out = Vec::new();
        for name in ["scope", "scp"] {
            match self.claims.get(name) {
                Some(Value::String(s)) => out.extend(s.split(' ').filter(|s| !s.is_empty())),
                Some(Value::Array(items)) => {
                    out.extend(items.iter().filter_map(Value::as_str));
                }
                _ => {}
            }
        }
        out
    }

    /// A claim rendered as a header value: strings as-is, arrays of strings
    /// joined by `' '`, numbers and booleans as JSON text. `None` when the
    /// claim is absent, null, an object, an array holding a non-string, or
    /// when the text has a control character or leading/trailing whitespace
    /// (which an upstream would trim, changing the identity it sees). The
    /// result may hold non-ASCII UTF-8: build the header with
    /// `HeaderValue::try_from(String)`, which accepts it.
    pub fn claim_as_header_value(&self, name: &str) -> Option<String> {
        let text = match self.claims.get(name)? {
            Value::String(s) => s.clone(),
            Value::Array(items) => {
                let parts: Option<Vec<&str>> = items.iter().map(Value::as_str).collect();
                parts?.join(" ")
            }
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Null | Value::Object(_) => return None,
        };
        let clean = !text.chars().any(char::is_control)
            && !text.starts_with([' ', '\t'])
            && !text.ends_with([' ', '\t']);
        clean.then_some(text)
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn verified(c: Value) -> VerifiedToken {
        VerifiedToken {
            claims: Arc::new(c.as_object().unwrap().clone()),
        }
    }

    #[test]
    fn scopes_from_scope_and_scp() {
        assert_eq!(
            verified(serde_json::json!({"scope": "a  b c"})).scopes(),
            ["a", "b", "c"]
        );
        assert_eq!(
            verified(serde_json::json!({"scp": ["a", "b"]})).scopes(),
            ["a", "b"]
        );
        assert_eq!(
            verified(serde_json::json!({"scp": "a b"})).scopes(),
            ["a", "b"]
        );
        assert_eq!(
            verified(serde_json::json!({"scope": ["x"], "scp": "y"})).scopes(),
            ["x", "y"]
        );
        assert!(
            verified(serde_json::json!({"scope": 5}))
                .scopes()
                .is_empty()
        );
        assert!(verified(serde_json::json!({})).scopes().is_empty());
        assert_eq!(
            verified(serde_json::json!({"scp": ["a", 1, "b"]})).scopes(),
            ["a", "b"]
        );
    }

    #[test]
    fn subject_only_when_string() {
        assert_eq!(
            verified(serde_json::json!({"sub": "bob"})).subject(),
            Some("bob")
        );
        assert_eq!(verified(serde_json::json!({"sub": 5})).subject(), None);
        assert_eq!(verified(serde_json::json!({})).subject(), None);
    }

    #[test]
    fn claims_as_header_values() {
        let t = verified(serde_json::json!({
            "sub": "alice", "n": 42, "f": 1.5, "b": true, "arr": ["a", "b"], "mixed": ["a", 1],
            "obj": {"x": 1}, "null": null, "nl": "a\nb", "cr": "a\rb", "tab": "a\tb",
            "lead": " admin", "utf": "Jos\u{e9}", "del": "a\u{7f}"
        }));
        assert_eq!(t.claim_as_header_value("sub").as_deref(), Some("alice"));
        assert_eq!(t.claim_as_header_value("n").as_deref(), Some("42"));
        assert_eq!(t.claim_as_header_value("f").as_deref(), Some("1.5"));
        assert_eq!(t.claim_as_header_value("b").as_deref(), Some("true"));
        assert_eq!(t.claim_as_header_value("arr").as_deref(), Some("a b"));
        assert_eq!(t.claim_as_header_value("utf").as_deref(), Some("Jos\u{e9}"));
        for name in [
            "mixed", "obj", "null", "nl", "cr", "tab", "lead", "del", "absent",
        ] {
            assert_eq!(t.claim_as_header_value(name), None, "{name}");
        }
        let v = t.claim_as_header_value("utf").unwrap();
        assert!(HeaderValue::try_from(v).is_ok());
    }
}

//! Route scope checks: every scope a route lists must have been granted by the
//! verified token (`scope`/`scp`, flattened by `VerifiedToken::scopes`).
//!
//! Pure functions only, so the decision is trivially testable and the request
//! path does no I/O here. A failure carries what the 403's
//! `WWW-Authenticate: Bearer error="insufficient_scope", scope="..."` needs.

use std::fmt;

/// The route's scopes were not all granted. `scope` is the route's whole
/// required list joined by single spaces (RFC 6750 §3 puts the scopes the
/// resource needs in the challenge, not only the missing ones); `missing` is
/// the subset the token lacked, for the security log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingScopes {
    pub scope: String,
    pub missing: Vec<String>,
}

impl MissingScopes {
    /// The full `WWW-Authenticate` value for the 403. Scope tokens are checked
    /// at config load (`is_valid_scope_token`), but `"` and `\` are escaped
    /// anyway so a header can never be broken out of its quoted string.
    pub fn www_authenticate(&self) -> String {
        let mut out = String::with_capacity(48 + self.scope.len());
        out.push_str("Bearer error=\"insufficient_scope\", scope=\"");
        for c in self.scope.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
        out
    }
}

/// Displays the route's required scopes, space-separated: the `scope="..."`
/// value of the challenge (what the pipeline puts in the header).
impl fmt::Display for MissingScopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.scope)
    }
}

impl std::error::Error for MissingScopes {}

/// `Ok` when every `required` scope is in `granted` (exact, case-sensitive
/// match, as OAuth scopes are). An empty `required` always passes.
pub fn check(required: &[String], granted: &[&str]) -> Result<(), MissingScopes> {
    // Routes list a handful of scopes and tokens carry a handful: a linear
    // scan beats building a set and allocates nothing on success.
    if required.iter().all(|r| granted.contains(&r.as_str())) {
        return Ok(());
    }
    Err(MissingScopes {
        scope: required.join(" "),
        missing: required
            .iter()
            .filter(|r| !granted.contains(&r.as_str()))
            .cloned()
            .collect(),
    })
}

/// Whether `s` is a valid RFC 6750 scope-token (`%x21 / %x23-5B / %x5D-7E`,
/// at least one): for the config layer to validate a route's `scopes`, so a
/// listed scope can always be matched and quoted in the challenge.
pub fn is_valid_scope_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| matches!(b, 0x21 | 0x23..=0x5B | 0x5D..=0x7E))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn all_required_granted() {
        assert_eq!(check(&req(&["a", "b"]), &["b", "c", "a"]), Ok(()));
    }

    #[test]
    fn empty_required_always_passes() {
        assert_eq!(check(&[], &[]), Ok(()));
        assert_eq!(check(&[], &["x"]), Ok(()));
    }

    #[test]
    fn one_missing_fails_with_full_list() {
        let err = check(&req(&["admin", "write"]), &["write"]).unwrap_err();
        assert_eq!(err.scope, "admin write");
        assert_eq!(err.missing, vec!["admin".to_string()]);
        assert_eq!(err.to_string(), "admin write");
        assert_eq!(
            err.www_authenticate(),
            r#"Bearer error="insufficient_scope", scope="admin write""#
        );
    }

    #[test]
    fn nothing_granted() {
        let err = check(&req(&["admin"]), &[]).unwrap_err();
        assert_eq!(err.missing, vec!["admin".to_string()]);
    }

    #[test]
    fn match_is_exact_and_case_sensitive() {
        assert!(check(&req(&["admin"]), &["Admin"]).is_err());
        assert!(check(&req(&["admin"]), &["administrator"]).is_err());
        assert!(check(&req(&["admin"]), &["admi"]).is_err());
    }

    #[test]
    fn challenge_escapes_quotes() {
        let m = MissingScopes {
            scope: r#"a"b\c"#.to_string(),
            missing: vec![],
        };
        assert_eq!(
            m.www_authenticate(),
            r#"Bearer error="insufficient_scope", scope="a\"b\\c""#
        );
    }

    #[test]
    fn scope_token_syntax() {
        assert!(is_valid_scope_token("orders:write"));
        assert!(is_valid_scope_token("https://api.example.com/read"));
        assert!(!is_valid_scope_token(""));
        assert!(!is_valid_scope_token("a b"));
        assert!(!is_valid_scope_token("a\"b"));
        assert!(!is_valid_scope_token("a\\b"));
        assert!(!is_valid_scope_token("caf\u{e9}"));
    }
}

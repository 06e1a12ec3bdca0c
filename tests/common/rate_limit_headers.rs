//! Reading the `RateLimit` and `RateLimit-Policy` headers (RFC draft
//! ietf-httpapi-ratelimit-headers) a rate-limited route sends. Shared by
//! tests/rate_limit.rs and tests/shared_limits.rs (`#[path]` module).

#![allow(dead_code)]

use std::collections::HashMap;

use crate::common::Answer;

/// The parameters of a one-item structured-field list such as
/// `"default";r=2;t=1` → `{r: 2, t: 1}` (the item itself under `""`).
pub fn params(value: &str) -> HashMap<String, String> {
    let mut parts = value.split(';');
    let mut out = HashMap::new();
    out.insert(
        String::new(),
        parts.next().unwrap_or_default().trim().to_string(),
    );
    for part in parts {
        if let Some((k, v)) = part.trim().split_once('=') {
            out.insert(k.to_string(), v.to_string());
        }
    }
    out
}

pub fn number(params: &HashMap<String, String>, name: &str, header: &str) -> u64 {
    params
        .get(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{header} has no numeric `{name}`: {params:?}"))
}

/// `RateLimit`'s remaining count (`r`), checking the header is well formed:
/// a quoted policy name and a reset time `t` of at least 1 s.
pub fn remaining(answer: &Answer, what: &str) -> u64 {
    let value = answer
        .header("ratelimit")
        .unwrap_or_else(|| panic!("{what}: no RateLimit header; headers {:?}", answer.headers));
    let p = params(value);
    assert!(
        p[""].starts_with('"') && p[""].ends_with('"'),
        "{what}: RateLimit names its policy: {value}"
    );
    assert!(
        number(&p, "t", "RateLimit") >= 1,
        "{what}: RateLimit t: {value}"
    );
    number(&p, "r", "RateLimit")
}

//! What a rate-limited route's responses carry: `RateLimit-Policy` and
//! `RateLimit` on every answer, `Retry-After` on a 429, and the rounding that
//! turns GCRA's durations into those whole seconds.
//!
//! [`RateLimitInfo::header_values`] follows draft-ietf-httpapi-ratelimit-headers-11,
//! whose field syntax is that of -08 (lists of parameterised Items): two lists,
//! `RateLimit-Policy: "default";q=<burst>;w=<window>` and
//! `RateLimit: "default";r=<remaining>;t=<effective window>`. With GCRA the bucket
//! holds `burst` requests and regains one every `per / count`, so:
//!
//! * `q` is the burst, `w` the seconds a drained bucket takes to fill completely
//!   (`burst * per / count`, rounded up, at least 1);
//! * `r` is what is left after this request;
//! * `t` is, per the draft, the seconds within which the client can use no more than
//!   `r`: on a 429 it equals `Retry-After` (the draft asks that `Retry-After` not end
//!   before that window); on an allowed request it is the emission interval
//!   `per / count` rounded up, which is when the request just counted has certainly
//!   been paid back. It can overstate the exact time of the next refill by less than
//!   one interval — a conservative hint, which the draft permits (a server may
//!   announce a longer window), and governor does not expose the exact state.
//!
//! The constructors are public so that any backend (the in-memory one, a shared one
//! later) rounds and renders identically.

use std::time::Duration;

use http::header::RETRY_AFTER;
use http::{HeaderName, HeaderValue};

/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers).
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit` (draft-ietf-httpapi-ratelimit-headers).
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// The policy identifier in both fields. A route has exactly one policy, so one fixed
/// name links `RateLimit` to `RateLimit-Policy` without revealing the route.
const POLICY_NAME: &str = "default";

/// The fixed shape of a route's limit, as `RateLimit-Policy` advertises it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaPolicy {
    /// `q`: requests the bucket holds (the burst).
    pub quota: u32,
    /// `w`: seconds for a drained bucket to fill completely, rounded up.
    pub window_secs: u64,
}

/// An allowed request's standing, for the `RateLimit` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitInfo {
    /// The burst: requests the bucket holds.
    pub limit: u32,
    /// Requests left right after this one.
    pub remaining: u32,
    /// `t`: seconds within which no more than `remaining` requests will pass.
    pub reset_secs: u64,
    /// The route's advertised policy (`q`, `w`).
    pub policy: QuotaPolicy,
}

impl RateLimitInfo {
    /// An allowed request's info: `remaining` left, the next request paid back within
    /// `refill` (rounded up to whole seconds, at least 1). Public so that another
    /// backend (Redis) renders exactly the same headers.
    pub fn allowed(policy: QuotaPolicy, remaining: u32, refill: Duration) -> Self {
        RateLimitInfo {
            limit: policy.quota,
            remaining: remaining.min(policy.quota),
            reset_secs: ceil_secs(refill).max(1),
            policy,
        }
    }

    /// `RateLimit-Policy` and `RateLimit`, per draft-ietf-httpapi-ratelimit-headers-11,
    /// e.g. `"default";q=20;w=2` and `"default";r=19;t=1`.
    pub fn header_values(&self) -> [(HeaderName, HeaderValue); 2] {
        let policy = format!(
            "\"{POLICY_NAME}\";q={};w={}",
            self.policy.quota, self.policy.window_secs
        );
        let limit = format!(
            "\"{POLICY_NAME}\";r={};t={}",
            self.remaining, self.reset_secs
        );
        [
            (RATELIMIT_POLICY, ascii_header_value(policy)),
            (RATELIMIT, ascii_header_value(limit)),
        ]
    }
}

/// A refused request: answer 429 with these headers, forward nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rate limited: retry after {retry_after_secs} s")]
pub struct RateLimited {
    /// Whole seconds, rounded up, at least 1: a client told "0" would retry at once.
    pub retry_after_secs: u64,
    /// `remaining` is 0 and `reset_secs` equals `retry_after_secs`.
    pub info: RateLimitInfo,
}

impl RateLimited {
    /// A refusal that can be retried after `wait`. Public for the same reason as
    /// [`RateLimitInfo::allowed`].
    pub fn after(policy: QuotaPolicy, wait: Duration) -> Self {
        let retry_after_secs = ceil_secs(wait).max(1);
        RateLimited {
            retry_after_secs,
            info: RateLimitInfo {
                limit: policy.quota,
                remaining: 0,
                reset_secs: retry_after_secs,
                policy,
            },
        }
    }

    /// `Retry-After`, `RateLimit-Policy` and `RateLimit` for the 429.
    pub fn header_values(&self) -> [(HeaderName, HeaderValue); 3] {
        let [policy, limit] = self.info.header_values();
        [
            (RETRY_AFTER, HeaderValue::from(self.retry_after_secs)),
            policy,
            limit,
        ]
    }
}

/// Our values are quotes, letters, digits, `;` and `=`, which `HeaderValue` always
/// accepts; the fallback only keeps this path free of panics.
fn ascii_header_value(s: String) -> HeaderValue {
    HeaderValue::try_from(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn ceil_secs(d: Duration) -> u64 {
    ceil_secs_nanos(d.as_nanos())
}

pub(super) fn ceil_secs_nanos(nanos: u128) -> u64 {
    u64::try_from(nanos.div_ceil(1_000_000_000)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::rate_limit::test_support::{fake, ip};

    fn rendered(pairs: &[(HeaderName, HeaderValue)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
            .collect()
    }

    #[test]
    fn ratelimit_header_values() {
        let (limiter, _clock) = fake("2/s", 3);
        let key = ip("192.0.2.1");
        let first = limiter.check(&key).unwrap();
        assert_eq!(
            rendered(&first.header_values()),
            [
                ("ratelimit-policy".into(), r#""default";q=3;w=2"#.into()),
                ("ratelimit".into(), r#""default";r=2;t=1"#.into()),
            ]
        );
        limiter.check(&key).unwrap();
        limiter.check(&key).unwrap();
        let limited = limiter.check(&key).unwrap_err();
        assert_eq!(
            rendered(&limited.header_values()),
            [
                ("retry-after".into(), "1".into()),
                ("ratelimit-policy".into(), r#""default";q=3;w=2"#.into()),
                ("ratelimit".into(), r#""default";r=0;t=1"#.into()),
            ]
        );

        let (slow, _clock) = fake("5/h", 5);
        let info = slow.check(&key).unwrap();
        assert_eq!(
            rendered(&info.header_values()),
            [
                ("ratelimit-policy".into(), r#""default";q=5;w=3600"#.into()),
                ("ratelimit".into(), r#""default";r=4;t=720"#.into()),
            ]
        );
    }
}

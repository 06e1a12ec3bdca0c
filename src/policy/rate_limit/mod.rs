//! Per-route rate limiting: the decision, not the plumbing.
//!
//! A route with `rate_limit = { rate = "10/s", burst = 20, key = "ip" }` owns one
//! [`RouteLimiter`]: governor's keyed GCRA limiter, one state per client key, so a
//! request is counted only against the route it matched. This module turns request
//! parts (peer address, headers, verified JWT subject) into a [`LimitKey`], decides
//! allow / 429 for it, and says what the response must carry (`Retry-After`,
//! `RateLimit-Policy`, `RateLimit`). It owns no sockets and writes no responses: the
//! server calls [`client_ip`], [`limit_key`] and [`RouteLimiter::check`] and renders
//! the outcome.
//!
//! One file per concept:
//!
//! * `spec.rs`: the route's `rate_limit` table ([`RateLimitSpec`], [`Rate`]) and its
//!   configuration errors;
//! * `key.rs`: which client a request counts against ([`KeySource`], [`LimitKey`],
//!   [`limit_key`], [`client_ip`] behind trusted proxies);
//! * `limiter.rs`: the decision, governor's GCRA ([`RouteLimiter`]);
//! * `store.rs`: where the per-key states live, capped, with the overflow bucket
//!   and the sweep;
//! * `headers.rs`: what the answer carries (`RateLimit-Policy`, `RateLimit`,
//!   `Retry-After`: [`RateLimitInfo`], [`RateLimited`]);
//! * `shared.rs`: the shared (Redis) limiter's decision: cross-instance key
//!   names, the GCRA script and its arguments, replies as the same answers,
//!   `on_error` ([`SharedQuota`], [`shared_key`], [`OnError`]);
//! * `circuit.rs`: when to stop asking a failing Redis and when to probe it
//!   again ([`Circuit`]).
//!
//! # The two backends
//!
//! Without `[redis]`, [`RouteLimiter::check`] decides. With it, the shared
//! limiter (live side: `crate::redis_limits`) runs the same GCRA in one
//! script on Redis, and every rate-limited route keeps its `RouteLimiter`
//! as the `on_error = "local"` fallback. Both start from the request's
//! [`KeyMaterial`] and build their answers with [`RateLimitInfo::allowed`] and
//! [`RateLimited::after`], so `Retry-After` and the headers are rounded and
//! rendered identically.

mod circuit;
mod headers;
mod key;
mod limiter;
mod shared;
mod spec;
mod store;

pub use circuit::{Admit, Circuit, Transition};
pub use headers::{QuotaPolicy, RATELIMIT, RATELIMIT_POLICY, RateLimitInfo, RateLimited};
pub use key::{
    KeyMaterial, KeySource, LimitKey, MAX_INLINE_KEY_BYTES, client_ip, key_material, limit_key,
};
pub use limiter::RouteLimiter;
pub use shared::{GCRA_SCRIPT, OnError, SharedQuota, shared_key};
pub use spec::{Rate, RateLimitConfigError, RateLimitSpec};

/// Builders shared by the unit tests of every file here.
#[cfg(test)]
mod test_support {
    use governor::clock::FakeRelativeClock;

    use super::{LimitKey, RateLimitSpec, RouteLimiter};

    pub(super) fn spec(rate: &str, burst: u32, key: &str) -> RateLimitSpec {
        RateLimitSpec::new(rate.parse().unwrap(), burst, key.parse().unwrap()).unwrap()
    }

    pub(super) fn fake(
        rate: &str,
        burst: u32,
    ) -> (RouteLimiter<FakeRelativeClock>, FakeRelativeClock) {
        fake_capped(rate, burst, RouteLimiter::DEFAULT_MAX_KEYS)
    }

    pub(super) fn fake_capped(
        rate: &str,
        burst: u32,
        max_keys: usize,
    ) -> (RouteLimiter<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let limiter = RouteLimiter::with_clock(spec(rate, burst, "ip"), max_keys, clock.clone());
        (limiter, clock)
    }

    pub(super) fn ip(s: &str) -> LimitKey {
        LimitKey::Ip(s.parse().unwrap())
    }
}

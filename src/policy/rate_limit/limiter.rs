//! The decision: governor's keyed GCRA limiter behind [`RouteLimiter`], one per
//! rate-limited route, shared by every worker thread serving it.
//!
//! GCRA keeps one "theoretical arrival time" per key instead of a counter and a
//! window, so a bucket costs one integer in the [store](super::store) and both
//! answers (allowed with so many left, or refused until a given instant) fall out
//! of it directly. This file only adapts governor's answers to the route's
//! [`RateLimitInfo`] / [`RateLimited`] and logs a full key table.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use governor::RateLimiter;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;

use super::headers::{QuotaPolicy, RateLimitInfo, RateLimited};
use super::key::LimitKey;
use super::spec::RateLimitSpec;
use super::store::{CappedKeyStore, OverflowLog};

/// Per-route limiter: governor's GCRA over a capped key store. `Send + Sync`; one
/// instance is shared by every runtime thread serving the route.
///
/// `C` is the clock: the real one by default, governor's `FakeRelativeClock` in tests.
pub struct RouteLimiter<C: Clock = DefaultClock> {
    spec: RateLimitSpec,
    policy: QuotaPolicy,
    /// `t` of every allowed answer: the emission interval, rounded up.
    refill: Duration,
    route: Box<str>,
    max_keys: usize,
    overflow: Arc<OverflowLog>,
    limiter: RateLimiter<LimitKey, CappedKeyStore, C, StateInformationMiddleware>,
}

impl RouteLimiter {
    /// Tracked keys per route; past it, the keys closest to a full bucket are
    /// evicted to make room (see [`super::store`]). A flood of a million
    /// distinct 64-byte header keys (the largest kept inline) through a full
    /// table raised RSS by ~22 MiB (about 220 bytes a key, the map's spare
    /// capacity and the eviction pass's scratch included).
    pub const DEFAULT_MAX_KEYS: usize = 100_000;

    /// A limiter on the real clock with [`Self::DEFAULT_MAX_KEYS`].
    pub fn new(spec: RateLimitSpec) -> Self {
        Self::with_max_keys(spec, Self::DEFAULT_MAX_KEYS)
    }

    /// A limiter on the real clock tracking at most `max_keys` keys (at least 1).
    pub fn with_max_keys(spec: RateLimitSpec, max_keys: usize) -> Self {
        Self::with_clock(spec, max_keys, DefaultClock::default())
    }
}

impl<C: Clock> RouteLimiter<C> {
    /// A limiter on `clock` (tests pass governor's `FakeRelativeClock`).
    pub fn with_clock(spec: RateLimitSpec, max_keys: usize, clock: C) -> Self {
        let max_keys = max_keys.max(1);
        let overflow = Arc::new(OverflowLog::default());
        let store = CappedKeyStore::new(max_keys, Arc::clone(&overflow));
        RouteLimiter {
            policy: spec.policy(),
            refill: spec.rate.interval(),
            route: "-".into(),
            max_keys,
            overflow,
            limiter: RateLimiter::new(spec.quota(), store, clock),
            spec,
        }
    }

    /// Names the route (its `path`) in this limiter's log events.
    pub fn with_route(mut self, route: &str) -> Self {
        self.route = route.into();
        self
    }

    /// The spec this limiter enforces (a reload compares it with the new one).
    pub fn spec(&self) -> &RateLimitSpec {
        &self.spec
    }

    /// The decision: `Ok(info)` = allowed (and counted); `Err(limited)` = answer 429.
    pub fn check(&self, key: &LimitKey) -> Result<RateLimitInfo, RateLimited> {
        let outcome = self.limiter.check_key(key);
        self.report_overflow();
        match outcome {
            Ok(state) => Ok(RateLimitInfo::allowed(
                self.policy,
                state.remaining_burst_capacity(),
                self.refill,
            )),
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.limiter.clock().now());
                Err(RateLimited::after(self.policy, wait))
            }
        }
    }

    /// Periodic maintenance (the server runs it every ~10 s): forgets keys whose state
    /// equals a fresh one, returns spare map capacity, and re-arms the overflow warning.
    pub fn sweep(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        self.overflow.rearm();
    }

    /// Keys with their own bucket right now (never more than the cap).
    pub fn tracked_keys(&self) -> usize {
        self.limiter.len()
    }

    /// Requests counted against the shared overflow bucket since the limiter was built
    /// (for metrics).
    pub fn overflowed_requests(&self) -> u64 {
        self.overflow.requests()
    }

    /// Keys evicted to make room for new ones since the limiter was built.
    pub fn evicted_keys(&self) -> u64 {
        self.overflow.evicted()
    }

    fn report_overflow(&self) {
        if self.overflow.take_pending() {
            tracing::warn!(
                target: "security",
                reason = "rate_limit_keys_overflow",
                route = %self.route,
                max_keys = self.max_keys,
                evicted_keys = self.overflow.evicted(),
                shared_bucket_requests = self.overflow.requests(),
                rate = %self.spec.rate,
                key = %self.spec.key,
                "rate limit key table full: the keys closest to a full bucket were evicted to make room"
            );
        }
    }
}

impl<C: Clock> fmt::Debug for RouteLimiter<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteLimiter")
            .field("route", &self.route)
            .field("spec", &self.spec)
            .field("max_keys", &self.max_keys)
            .field("tracked_keys", &self.tracked_keys())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::rate_limit::test_support::{fake, ip};
    use governor::clock::FakeRelativeClock;

    // ---- the decision (fake clock) ------------------------------------------

    #[test]
    fn burst_passes_then_the_next_is_limited() {
        let (limiter, _clock) = fake("2/s", 3);
        let key = ip("192.0.2.1");
        let remaining: Vec<u32> = (0..3)
            .map(|_| limiter.check(&key).unwrap().remaining)
            .collect();
        assert_eq!(remaining, [2, 1, 0]);
        let limited = limiter.check(&key).unwrap_err();
        assert_eq!(limited.retry_after_secs, 1);
        assert_eq!(limited.info.remaining, 0);
        assert_eq!(limited.info.limit, 3);
    }

    #[test]
    fn refill_after_one_interval() {
        let (limiter, clock) = fake("2/s", 3);
        let key = ip("192.0.2.1");
        for _ in 0..3 {
            limiter.check(&key).unwrap();
        }
        assert!(limiter.check(&key).is_err());
        clock.advance(Duration::from_millis(499));
        assert!(limiter.check(&key).is_err(), "refilled early");
        clock.advance(Duration::from_millis(1)); // per / count = 500 ms
        assert_eq!(limiter.check(&key).unwrap().remaining, 0);
        assert!(limiter.check(&key).is_err());
        // A full refill takes burst * interval.
        clock.advance(Duration::from_millis(1500));
        let remaining: Vec<u32> = (0..3)
            .map(|_| limiter.check(&key).unwrap().remaining)
            .collect();
        assert_eq!(remaining, [2, 1, 0]);
    }

    #[test]
    fn retry_after_rounds_up_and_is_never_zero() {
        let (per_minute, clock) = fake("1/m", 1);
        let key = ip("192.0.2.1");
        per_minute.check(&key).unwrap();
        assert_eq!(per_minute.check(&key).unwrap_err().retry_after_secs, 60);
        clock.advance(Duration::from_millis(59_500));
        assert_eq!(per_minute.check(&key).unwrap_err().retry_after_secs, 1);
        clock.advance(Duration::from_nanos(499_999_999));
        assert_eq!(per_minute.check(&key).unwrap_err().retry_after_secs, 1); // 1 ns left
        clock.advance(Duration::from_nanos(1));
        assert!(per_minute.check(&key).is_ok());

        let (per_second, _clock) = fake("3/s", 1);
        per_second.check(&key).unwrap();
        assert_eq!(per_second.check(&key).unwrap_err().retry_after_secs, 1); // 333 ms

        let (per_hour, _clock) = fake("1/h", 1);
        per_hour.check(&key).unwrap();
        assert_eq!(per_hour.check(&key).unwrap_err().retry_after_secs, 3600);
    }

    #[test]
    fn rejected_requests_are_not_counted() {
        let (limiter, clock) = fake("1/s", 1);
        let key = ip("192.0.2.1");
        limiter.check(&key).unwrap();
        for _ in 0..100 {
            assert!(limiter.check(&key).is_err());
        }
        clock.advance(Duration::from_secs(1));
        assert!(
            limiter.check(&key).is_ok(),
            "a hammering client stays locked out"
        );
    }

    #[test]
    fn keys_and_routes_have_separate_buckets() {
        let (route_a, _) = fake("1/m", 1);
        let (route_b, _) = fake("1/m", 1);
        let (one, two) = (ip("192.0.2.1"), ip("192.0.2.2"));
        route_a.check(&one).unwrap();
        assert!(route_a.check(&one).is_err());
        assert!(route_a.check(&two).is_ok(), "another client is unaffected");
        assert!(route_b.check(&one).is_ok(), "another route is unaffected");

        let (by_header, _) = fake("1/m", 1);
        let (k1, k2) = (
            LimitKey::Header((*b"key-1").into()),
            LimitKey::Header((*b"key-2").into()),
        );
        by_header.check(&k1).unwrap();
        assert!(by_header.check(&k1).is_err());
        assert!(by_header.check(&k2).is_ok());
        let (s1, s2) = (LimitKey::Sub("alice".into()), LimitKey::Sub("bob".into()));
        by_header.check(&s1).unwrap();
        assert!(by_header.check(&s1).is_err());
        assert!(by_header.check(&s2).is_ok());
    }

    #[test]
    fn route_limiter_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<RouteLimiter>();
        assert_send_sync::<RouteLimiter<FakeRelativeClock>>();
    }
}

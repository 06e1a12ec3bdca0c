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
//! # Who the client is
//!
//! [`client_ip`] believes `X-Forwarded-For` only when the TCP peer is one of the
//! operator's `trusted_proxies`, and then takes the right-most address that is not
//! itself trusted: entries to its left were written by the client and prove nothing,
//! so a client can never choose its own bucket by sending the header. IPv6 clients are
//! keyed by their /64, since one host usually owns a whole /64 and could otherwise
//! rotate through 2^64 fresh buckets.
//!
//! # Bounded memory
//!
//! Keys are client-controlled (any address, any header value), so the number of
//! tracked keys is capped per route ([`RouteLimiter::DEFAULT_MAX_KEYS`]). Beyond the
//! cap, new keys share one overflow bucket (keys already tracked keep their own), and
//! a `security` warning with `reason = "rate_limit_keys_overflow"` is logged — at most
//! once per [`RouteLimiter::sweep`] period, never per request. `sweep`, which the
//! server runs every ~10 s, drops keys whose state is indistinguishable from a fresh
//! one (governor's `retain_recent`) and gives memory back (`shrink_to_fit`). Key
//! values longer than [`MAX_INLINE_KEY_BYTES`] are replaced by a 128-bit keyed digest
//! so that a flood of long header values cannot make each tracked key cost kilobytes.
//!
//! # Response headers
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
//! # Where the shared (Redis) limiter slots in
//!
//! `[redis]` is a later issue. The seam is deliberately small:
//!
//! * a Redis backend runs the same GCRA (a Lua script over `key_prefix`, the route and
//!   the [`LimitKey`]), fed by [`Rate::interval`] and [`RateLimitSpec::burst`], and
//!   builds its answers with [`RateLimitInfo::allowed`] and [`RateLimited::after`], so
//!   both backends round `Retry-After` and render headers identically;
//! * it is async (one round-trip bounded by `redis.timeout`) and therefore lives next
//!   to, not behind, [`RouteLimiter::check`]: every rate-limited route keeps its
//!   `RouteLimiter`, which is also the `on_error = "local"` fallback while Redis fails;
//! * [`LimitKey::Digest`] is keyed per process, so a shared backend must derive its
//!   own cross-instance name for long keys (e.g. SHA-256 of the raw value).

use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{Quota, RateLimiter};
use http::header::RETRY_AFTER;
use http::{HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;

/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers).
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit` (draft-ietf-httpapi-ratelimit-headers).
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
/// `X-Forwarded-For` (not among `http`'s constants).
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The policy identifier in both fields. A route has exactly one policy, so one fixed
/// name links `RateLimit` to `RateLimit-Policy` without revealing the route.
const POLICY_NAME: &str = "default";

/// Key values (`sub`, `header:NAME`) up to this length are stored as they are; longer
/// ones become a [`LimitKey::Digest`], which bounds the memory of one tracked key.
pub const MAX_INLINE_KEY_BYTES: usize = 64;

/// A configuration value this module rejects. The messages are written to follow a
/// `proxy.toml:LINE:COL: routes[i].rate_limit.FIELD: ` prefix added by the config layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateLimitConfigError {
    /// Not `<n>/<s|m|h>`.
    #[error("expected \"<n>/<s|m|h>\", got {0:?}")]
    Rate(String),
    /// `0/s` (or a hand-built rate with no count or period).
    #[error("expected \"<n>/<s|m|h>\" with n at least 1, got {0:?}")]
    ZeroRate(String),
    /// `burst = 0`.
    #[error("burst must be at least 1 (0 would refuse every request), got 0")]
    ZeroBurst,
    /// Not `ip`, `sub` or `header:NAME`.
    #[error("expected \"ip\", \"sub\" or \"header:NAME\", got {0:?}")]
    Key(String),
    /// `header:NAME` with a NAME that is not a valid header name.
    #[error("invalid header name in {0:?}")]
    KeyHeaderName(String),
}

/// A parsed rate: `count` requests per `per` (from "10/s", "100/m", "5/h").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Requests per `per`; at least 1.
    pub count: u32,
    /// 1 s, 1 min or 1 h when parsed.
    pub per: Duration,
}

impl Rate {
    /// The GCRA emission interval: the time one request costs, `per / count`.
    ///
    /// Clamped to at least 1 ns and to `count >= 1` so that a `Rate` built by hand
    /// (bypassing [`FromStr`]) can never divide by zero or build an empty quota.
    pub fn interval(&self) -> Duration {
        (self.per / self.count.max(1)).max(Duration::from_nanos(1))
    }
}

/// `Err` is the message (a [`RateLimitConfigError`] rendered), which the config layer
/// prefixes with the file position and key.
impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Rate::parse(s).map_err(|e| e.to_string())
    }
}

impl Rate {
    /// Parses `"<n>/<s|m|h>"`, `n >= 1`, with a typed error.
    pub fn parse(s: &str) -> Result<Self, RateLimitConfigError> {
        let bad = || RateLimitConfigError::Rate(s.to_owned());
        let (n, unit) = s.trim().split_once('/').ok_or_else(bad)?;
        let per_secs = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            _ => return Err(bad()),
        };
        // u32::from_str also takes "+5"; only plain digits are a count here.
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let count: u32 = n.parse().map_err(|_| bad())?;
        if count == 0 {
            return Err(RateLimitConfigError::ZeroRate(s.to_owned()));
        }
        Ok(Rate {
            count,
            per: Duration::from_secs(per_secs),
        })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.per.as_secs() {
            1 if self.per.subsec_nanos() == 0 => write!(f, "{}/s", self.count),
            60 if self.per.subsec_nanos() == 0 => write!(f, "{}/m", self.count),
            3600 if self.per.subsec_nanos() == 0 => write!(f, "{}/h", self.count),
            _ => write!(f, "{} per {:?}", self.count, self.per),
        }
    }
}

/// What a route's requests are counted by: `"ip"`, `"sub"` or `"header:NAME"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The real client address ([`client_ip`]), IPv6 by /64.
    Ip,
    /// The verified JWT subject.
    Sub,
    /// The value of this request header, else the client address.
    Header(HeaderName),
}

impl KeySource {
    /// Whether the key is the verified JWT subject: such a limit runs right after JWT
    /// verification, and is a configuration error on a route without `jwt = true`.
    pub fn needs_subject(&self) -> bool {
        matches!(self, KeySource::Sub)
    }
}

/// `Err` is the message, as for [`Rate`].
impl FromStr for KeySource {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeySource::parse(s).map_err(|e| e.to_string())
    }
}

impl KeySource {
    /// Parses `"ip"`, `"sub"` or `"header:NAME"`, with a typed error.
    pub fn parse(s: &str) -> Result<Self, RateLimitConfigError> {
        match s {
            "ip" => Ok(KeySource::Ip),
            "sub" => Ok(KeySource::Sub),
            _ => {
                let name = s
                    .strip_prefix("header:")
                    .ok_or_else(|| RateLimitConfigError::Key(s.to_owned()))?;
                HeaderName::from_bytes(name.as_bytes())
                    .map(KeySource::Header)
                    .map_err(|_| RateLimitConfigError::KeyHeaderName(s.to_owned()))
            }
        }
    }
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Ip => f.write_str("ip"),
            KeySource::Sub => f.write_str("sub"),
            KeySource::Header(name) => write!(f, "header:{name}"),
        }
    }
}

/// A route's `rate_limit` table. `PartialEq` lets a reload keep the limiter (and its
/// counts) of every route whose limit did not change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitSpec {
    /// The sustained rate: one request regained every `per / count`.
    pub rate: Rate,
    /// Requests a client may send at once from a full bucket (at least 1).
    pub burst: u32,
    /// What requests are counted by.
    pub key: KeySource,
}

impl RateLimitSpec {
    /// A validated spec: `burst` must be at least 1 (a parsed [`Rate`] already is).
    pub fn new(rate: Rate, burst: u32, key: KeySource) -> Result<Self, RateLimitConfigError> {
        let spec = RateLimitSpec { rate, burst, key };
        spec.validate()?;
        Ok(spec)
    }

    /// Checks what `FromStr` cannot: `burst >= 1`, and a rate built by hand.
    pub fn validate(&self) -> Result<(), RateLimitConfigError> {
        if self.rate.count == 0 || self.rate.per.is_zero() {
            return Err(RateLimitConfigError::ZeroRate(self.rate.to_string()));
        }
        if self.burst == 0 {
            return Err(RateLimitConfigError::ZeroBurst);
        }
        Ok(())
    }

    /// The governor quota: one request per [`Rate::interval`], up to `burst` at once.
    /// An invalid spec (which [`validate`](Self::validate) reports) is clamped to the
    /// nearest valid one instead of panicking.
    pub fn quota(&self) -> Quota {
        let burst = NonZeroU32::new(self.burst).unwrap_or(NonZeroU32::MIN);
        // `interval()` is at least 1 ns, so `with_period` cannot refuse it.
        Quota::with_period(self.rate.interval())
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(burst)
    }

    /// What `RateLimit-Policy` advertises for this spec.
    pub fn policy(&self) -> QuotaPolicy {
        let burst = self.burst.max(1);
        let fill = self.rate.interval().as_nanos() * u128::from(burst);
        QuotaPolicy {
            quota: burst,
            window_secs: ceil_secs_nanos(fill).max(1),
        }
    }
}

/// The fixed shape of a route's limit, as `RateLimit-Policy` advertises it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaPolicy {
    /// `q`: requests the bucket holds (the burst).
    pub quota: u32,
    /// `w`: seconds for a drained bucket to fill completely, rounded up.
    pub window_secs: u64,
}

/// The client key, computed once per request by [`limit_key`].
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum LimitKey {
    /// The client address; IPv6 already masked to its /64, IPv4-mapped IPv6 as IPv4.
    Ip(IpAddr),
    /// The verified JWT subject.
    Sub(Box<str>),
    /// The raw value of the route's key header.
    Header(Box<[u8]>),
    /// A `Sub` or `Header` value longer than [`MAX_INLINE_KEY_BYTES`], as a 128-bit
    /// digest keyed per process (so nobody can aim a collision at another client).
    Digest([u64; 2]),
}

/// Header values may be API keys: never print them (this type can end up in logs).
impl fmt::Debug for LimitKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitKey::Ip(ip) => f.debug_tuple("Ip").field(ip).finish(),
            LimitKey::Sub(sub) => f.debug_tuple("Sub").field(sub).finish(),
            LimitKey::Header(v) => write!(f, "Header(<{} bytes>)", v.len()),
            LimitKey::Digest(_) => f.write_str("Digest(..)"),
        }
    }
}

/// Builds the key of a request for `source`: `Ip` is the client address (IPv6 masked
/// to /64, IPv4-mapped IPv6 as IPv4); `Sub` the verified subject, falling back to the
/// client address when there is none (or it is empty); `Header(name)` that header's
/// raw value (the first, if repeated), falling back to the client address when it is
/// absent or empty. `client_ip` is the resolved real client ([`client_ip`]).
pub fn limit_key(
    source: &KeySource,
    client_ip: IpAddr,
    headers: &HeaderMap,
    subject: Option<&str>,
) -> LimitKey {
    match source {
        KeySource::Ip => ip_key(client_ip),
        KeySource::Sub => match subject {
            Some(sub) if !sub.is_empty() => {
                if sub.len() <= MAX_INLINE_KEY_BYTES {
                    LimitKey::Sub(sub.into())
                } else {
                    digest_key(DigestDomain::Sub, sub.as_bytes())
                }
            }
            _ => ip_key(client_ip),
        },
        KeySource::Header(name) => match headers.get(name) {
            Some(value) if !value.is_empty() => {
                let raw = value.as_bytes();
                if raw.len() <= MAX_INLINE_KEY_BYTES {
                    LimitKey::Header(raw.into())
                } else {
                    digest_key(DigestDomain::Header, raw)
                }
            }
            _ => ip_key(client_ip),
        },
    }
}

fn ip_key(ip: IpAddr) -> LimitKey {
    match ip.to_canonical() {
        IpAddr::V4(v4) => LimitKey::Ip(IpAddr::V4(v4)),
        IpAddr::V6(v6) => LimitKey::Ip(IpAddr::V6(Ipv6Addr::from_bits(
            v6.to_bits() & (u128::MAX << 64),
        ))),
    }
}

#[derive(Hash, Clone, Copy)]
enum DigestDomain {
    Sub,
    Header,
}

fn digest_key(domain: DigestDomain, value: &[u8]) -> LimitKey {
    static KEY: OnceLock<RandomState> = OnceLock::new();
    let key = KEY.get_or_init(RandomState::new);
    // Two outputs of the same keyed SipHash over domain-separated inputs give 128 bits:
    // at 100,000 tracked keys an accidental collision is ~2^-95 likely.
    LimitKey::Digest([
        key.hash_one((0u8, domain, value)),
        key.hash_one((1u8, domain, value)),
    ])
}

/// Resolves the real client address.
///
/// * An untrusted peer is the client, whatever `X-Forwarded-For` says.
/// * A trusted peer's `X-Forwarded-For` (every such header, in order, comma-separated)
///   is walked from the right, and the first address that is not itself trusted is
///   the client. Entries may carry a port (`1.2.3.4:5678`, `[2001:db8::1]:443`);
///   empty list elements are skipped.
/// * The walk stops at an entry that is not an address (`unknown`, garbage): the
///   client is then the last trusted hop walked — the peer, when the garbage is the
///   right-most entry. Such an entry was not written by a proxy of ours (they append
///   the address they saw), so nothing to its left is believed, and whoever wrote it
///   shares the bucket of that trusted hop rather than choosing one.
/// * When every entry is trusted (or there is none), the left-most trusted hop is it.
///
/// IPv4-mapped IPv6 addresses are treated as IPv4 throughout, both for matching
/// `trusted` and in the result.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = peer.to_canonical();
    if !is_trusted(peer, trusted) {
        return peer;
    }
    let mut nearest_trusted = peer;
    for value in headers.get_all(X_FORWARDED_FOR).iter().rev() {
        for entry in value.as_bytes().rsplit(|&b| b == b',') {
            let entry = entry.trim_ascii();
            if entry.is_empty() {
                continue;
            }
            let Some(ip) = parse_forwarded_addr(entry) else {
                return nearest_trusted;
            };
            if !is_trusted(ip, trusted) {
                return ip;
            }
            nearest_trusted = ip;
        }
    }
    nearest_trusted
}

fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    trusted.iter().any(|net| net.contains(&ip))
}

fn parse_forwarded_addr(entry: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(entry).ok()?;
    let ip = s
        .parse::<IpAddr>()
        .or_else(|_| s.parse::<SocketAddr>().map(|sa| sa.ip()))
        .ok()
        .or_else(|| {
            s.strip_prefix('[')?
                .strip_suffix(']')?
                .parse::<Ipv6Addr>()
                .ok()
                .map(IpAddr::V6)
        })?;
    Some(ip.to_canonical())
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

fn ceil_secs_nanos(nanos: u128) -> u64 {
    u64::try_from(nanos.div_ceil(1_000_000_000)).unwrap_or(u64::MAX)
}

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
    /// Tracked keys per route before new keys share the overflow bucket. A full table
    /// of 64-byte header keys (the largest kept inline) measured ~13 MB of RSS.
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
        let store = CappedKeyStore {
            map: DashMapStateStore::default(),
            shared: InMemoryState::default(),
            reserved: AtomicUsize::new(0),
            max_keys,
            overflow: Arc::clone(&overflow),
        };
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
        // Re-arm only after a report, so an overflow noted but not yet logged by its
        // `check` (a different thread) is still logged.
        let _ = self.overflow.state.compare_exchange(
            OVERFLOW_REPORTED,
            OVERFLOW_ARMED,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }

    /// Keys with their own bucket right now (never more than the cap).
    pub fn tracked_keys(&self) -> usize {
        self.limiter.len()
    }

    /// Requests counted against the shared overflow bucket since the limiter was built
    /// (for metrics).
    pub fn overflowed_requests(&self) -> u64 {
        self.overflow.requests.load(Ordering::Relaxed)
    }

    fn report_overflow(&self) {
        // One relaxed load per request; the swap and the log happen once per sweep.
        if self.overflow.state.load(Ordering::Relaxed) == OVERFLOW_PENDING
            && self
                .overflow
                .state
                .compare_exchange(
                    OVERFLOW_PENDING,
                    OVERFLOW_REPORTED,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            tracing::warn!(
                target: "security",
                reason = "rate_limit_keys_overflow",
                route = %self.route,
                max_keys = self.max_keys,
                rate = %self.spec.rate,
                key = %self.spec.key,
                "rate limit key table full: new clients share one overflow bucket until old keys expire"
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

const OVERFLOW_ARMED: u8 = 0;
const OVERFLOW_PENDING: u8 = 1;
const OVERFLOW_REPORTED: u8 = 2;

/// Shared by the store (which notices an overflow) and the limiter (which knows the
/// route and logs it): armed → pending → reported → (sweep) → armed.
#[derive(Default)]
struct OverflowLog {
    state: AtomicU8,
    requests: AtomicU64,
}

/// governor's DashMap store with a cap: past `max_keys` entries, unknown keys are
/// measured against one shared state instead of getting their own.
struct CappedKeyStore {
    map: DashMapStateStore<LimitKey>,
    shared: InMemoryState,
    /// Entries in `map` plus insertions under way. A new key reserves a place here
    /// before inserting, so racing threads can never take the map past `max_keys`.
    reserved: AtomicUsize,
    max_keys: usize,
    overflow: Arc<OverflowLog>,
}

impl CappedKeyStore {
    /// Reserves room for one new key, or says the map is full.
    fn reserve_place(&self) -> bool {
        // The plain load keeps a flood beyond the cap off the contended fetch_add.
        if self.reserved.load(Ordering::Relaxed) >= self.max_keys {
            return false;
        }
        if self.reserved.fetch_add(1, Ordering::AcqRel) >= self.max_keys {
            self.reserved.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    fn measure_shared<T, F, E>(&self, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.overflow.requests.fetch_add(1, Ordering::Relaxed);
        if self.overflow.state.load(Ordering::Relaxed) == OVERFLOW_ARMED {
            let _ = self.overflow.state.compare_exchange(
                OVERFLOW_ARMED,
                OVERFLOW_PENDING,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
        self.shared.measure_and_replace(&NotKeyed::NonKey, f)
    }
}

impl StateStore for CappedKeyStore {
    type Key = LimitKey;

    fn measure_and_replace<T, F, E>(&self, key: &LimitKey, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        if let Some(state) = self.map.get(key) {
            return state.measure_and_replace(&NotKeyed::NonKey, f);
        }
        if !self.reserve_place() {
            return self.measure_shared(f);
        }
        let mut inserted = false;
        let state = self.map.entry(key.clone()).or_insert_with(|| {
            inserted = true;
            InMemoryState::default()
        });
        if !inserted {
            // Another thread inserted the key first, on its own reservation.
            self.reserved.fetch_sub(1, Ordering::AcqRel);
        }
        state.measure_and_replace(&NotKeyed::NonKey, f)
    }
}

impl ShrinkableKeyedStateStore<LimitKey> for CappedKeyStore {
    fn retain_recent(&self, drop_below: Nanos) {
        let mut removed = 0;
        self.map.retain(|_, state| {
            let keep = theoretical_arrival(state).is_some_and(|tat| tat > drop_below);
            removed += usize::from(!keep);
            keep
        });
        self.reserved.fetch_sub(removed, Ordering::AcqRel);
    }

    /// Shrinks only when most of the capacity is unused: rehashing a busy map on every
    /// sweep would cost more than the memory it returns.
    fn shrink_to_fit(&self) {
        if self.map.capacity() > 4 * self.map.len() + 1024 {
            self.map.shrink_to_fit();
        }
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// `InMemoryState` shows its value only to `measure_and_replace`; a closure that
/// declines to update reads it without writing.
fn theoretical_arrival(state: &InMemoryState) -> Option<Nanos> {
    state
        .measure_and_replace(&NotKeyed::NonKey, Err::<((), Nanos), _>)
        .err()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use std::io::Write;
    use std::sync::Mutex;

    fn spec(rate: &str, burst: u32, key: &str) -> RateLimitSpec {
        RateLimitSpec::new(rate.parse().unwrap(), burst, key.parse().unwrap()).unwrap()
    }

    fn fake(rate: &str, burst: u32) -> (RouteLimiter<FakeRelativeClock>, FakeRelativeClock) {
        fake_capped(rate, burst, RouteLimiter::DEFAULT_MAX_KEYS)
    }

    fn fake_capped(
        rate: &str,
        burst: u32,
        max_keys: usize,
    ) -> (RouteLimiter<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let limiter = RouteLimiter::with_clock(spec(rate, burst, "ip"), max_keys, clock.clone());
        (limiter, clock)
    }

    fn ip(s: &str) -> LimitKey {
        LimitKey::Ip(s.parse().unwrap())
    }

    fn addr(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        headers
    }

    fn rendered(pairs: &[(HeaderName, HeaderValue)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
            .collect()
    }

    // ---- parsing -------------------------------------------------------------

    #[test]
    fn rate_parses_the_three_units() {
        assert_eq!(
            "10/s".parse::<Rate>().unwrap(),
            Rate {
                count: 10,
                per: Duration::from_secs(1)
            }
        );
        assert_eq!(
            "100/m".parse::<Rate>().unwrap(),
            Rate {
                count: 100,
                per: Duration::from_secs(60)
            }
        );
        assert_eq!(
            "5/h".parse::<Rate>().unwrap(),
            Rate {
                count: 5,
                per: Duration::from_secs(3600)
            }
        );
        assert_eq!(" 7/s ".parse::<Rate>().unwrap().count, 7);
        assert_eq!("5/h".parse::<Rate>().unwrap().to_string(), "5/h");
    }

    #[test]
    fn rate_errors_name_the_expected_form() {
        assert_eq!(
            "ten".parse::<Rate>().unwrap_err().to_string(),
            r#"expected "<n>/<s|m|h>", got "ten""#
        );
        for bad in [
            "10/d",
            "10/sec",
            "/s",
            "-1/s",
            "+1/s",
            "1.5/s",
            "10 /s",
            "99999999999/s",
            "",
        ] {
            assert!(
                matches!(Rate::parse(bad), Err(RateLimitConfigError::Rate(_))),
                "{bad:?} parsed"
            );
        }
        assert_eq!(
            "0/s".parse::<Rate>().unwrap_err().to_string(),
            r#"expected "<n>/<s|m|h>" with n at least 1, got "0/s""#
        );
    }

    #[test]
    fn key_source_parses_and_displays() {
        assert_eq!("ip".parse::<KeySource>().unwrap(), KeySource::Ip);
        assert_eq!("sub".parse::<KeySource>().unwrap(), KeySource::Sub);
        let header = "header:X-Api-Key".parse::<KeySource>().unwrap();
        assert_eq!(
            header,
            KeySource::Header(HeaderName::from_static("x-api-key"))
        );
        assert_eq!(header.to_string(), "header:x-api-key");
        assert!(KeySource::Sub.needs_subject());
        assert!(!header.needs_subject());
        assert_eq!(
            "cookie".parse::<KeySource>().unwrap_err().to_string(),
            r#"expected "ip", "sub" or "header:NAME", got "cookie""#
        );
        assert_eq!(
            KeySource::parse("header:bad name").unwrap_err(),
            RateLimitConfigError::KeyHeaderName("header:bad name".into())
        );
        assert!("header:".parse::<KeySource>().is_err());
        assert!("IP".parse::<KeySource>().is_err());
    }

    #[test]
    fn burst_zero_is_a_config_error() {
        let err = RateLimitSpec::new("1/s".parse().unwrap(), 0, KeySource::Ip).unwrap_err();
        assert_eq!(err, RateLimitConfigError::ZeroBurst);
        assert!(err.to_string().starts_with("burst must be at least 1"));
    }

    #[test]
    fn a_hand_built_invalid_spec_does_not_panic() {
        let bad = RateLimitSpec {
            rate: Rate {
                count: 0,
                per: Duration::ZERO,
            },
            burst: 0,
            key: KeySource::Ip,
        };
        assert!(bad.validate().is_err());
        let limiter = RouteLimiter::with_clock(bad, 0, FakeRelativeClock::default());
        // Clamped to burst 1, one key: it still decides.
        assert!(limiter.check(&ip("192.0.2.1")).is_ok());
    }

    #[test]
    fn policy_window_is_the_full_refill_rounded_up() {
        let w = |rate: &str, burst| spec(rate, burst, "ip").policy();
        assert_eq!(
            w("2/s", 3),
            QuotaPolicy {
                quota: 3,
                window_secs: 2
            }
        ); // 1.5 s
        assert_eq!(w("10/s", 20).window_secs, 2);
        assert_eq!(w("100/m", 1).window_secs, 1); // 0.6 s, never 0
        assert_eq!(w("5/h", 5).window_secs, 3600);
        assert_eq!(w("1/m", 10).window_secs, 600);
    }

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

    // ---- keys ----------------------------------------------------------------

    #[test]
    fn ip_keys_mask_ipv6_to_64_and_unmap_ipv4() {
        let none = HeaderMap::new();
        let key = |a: &str| limit_key(&KeySource::Ip, addr(a), &none, None);
        assert_eq!(key("192.0.2.7"), ip("192.0.2.7"));
        assert_ne!(key("192.0.2.7"), key("192.0.2.8"));
        assert_eq!(
            key("2001:db8:1:2:aaaa:bbbb:cccc:dddd"),
            ip("2001:db8:1:2::")
        );
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:192.0.2.7"), ip("192.0.2.7"));
    }

    #[test]
    fn sub_keys_fall_back_to_the_client_ip() {
        let none = HeaderMap::new();
        let client = addr("192.0.2.7");
        assert_eq!(
            limit_key(&KeySource::Sub, client, &none, Some("alice")),
            LimitKey::Sub("alice".into())
        );
        assert_eq!(
            limit_key(&KeySource::Sub, client, &none, None),
            ip("192.0.2.7")
        );
        assert_eq!(
            limit_key(&KeySource::Sub, client, &none, Some("")),
            ip("192.0.2.7")
        );
    }

    #[test]
    fn header_keys_use_the_raw_value_or_fall_back() {
        let source: KeySource = "header:X-Api-Key".parse().unwrap();
        let client = addr("2001:db8::5");
        let mut headers = HeaderMap::new();
        assert_eq!(limit_key(&source, client, &headers, None), ip("2001:db8::"));
        headers.insert("x-api-key", HeaderValue::from_static(""));
        assert_eq!(limit_key(&source, client, &headers, None), ip("2001:db8::"));
        headers.insert("x-api-key", HeaderValue::from_static("k-123"));
        headers.append("x-api-key", HeaderValue::from_static("k-456"));
        assert_eq!(
            limit_key(&source, client, &headers, Some("ignored")),
            LimitKey::Header((*b"k-123").into())
        );
        // Opaque bytes are fine: the key is the raw value, not a string.
        headers.insert("x-api-key", HeaderValue::from_bytes(b"caf\xe9").unwrap());
        assert_eq!(
            limit_key(&source, client, &headers, None),
            LimitKey::Header((*b"caf\xe9").into())
        );
    }

    #[test]
    fn long_values_become_digests_and_stay_distinct() {
        let source: KeySource = "header:x-api-key".parse().unwrap();
        let client = addr("192.0.2.7");
        let key_for = |v: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("x-api-key", HeaderValue::from_str(v).unwrap());
            limit_key(&source, client, &headers, None)
        };
        let at_limit = "a".repeat(MAX_INLINE_KEY_BYTES);
        assert!(matches!(key_for(&at_limit), LimitKey::Header(_)));
        let long_a = "a".repeat(4096);
        let long_b = format!("{}b", "a".repeat(4095));
        assert!(matches!(key_for(&long_a), LimitKey::Digest(_)));
        assert_eq!(key_for(&long_a), key_for(&long_a));
        assert_ne!(key_for(&long_a), key_for(&long_b));
        // Same bytes as a subject and as a header are different keys.
        let none = HeaderMap::new();
        assert_ne!(
            limit_key(&KeySource::Sub, client, &none, Some(&long_a)),
            key_for(&long_a)
        );
    }

    #[test]
    fn debug_never_prints_header_values() {
        let key = LimitKey::Header((*b"secret-api-key").into());
        let shown = format!("{key:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert_eq!(shown, "Header(<14 bytes>)");
    }

    // ---- client_ip -----------------------------------------------------------

    #[test]
    fn untrusted_peer_ignores_x_forwarded_for() {
        let trusted = nets(&["10.0.0.0/8"]);
        let peer = addr("203.0.113.9");
        assert_eq!(client_ip(peer, &xff(&["1.2.3.4"]), &trusted), peer);
        assert_eq!(client_ip(peer, &xff(&["1.2.3.4"]), &[]), peer);
    }

    #[test]
    fn spoofed_x_forwarded_for_does_not_buy_a_fresh_bucket() {
        let (limiter, _clock) = fake("1/m", 2);
        let trusted = nets(&["10.0.0.0/8"]);
        let peer = addr("203.0.113.9");
        let mut outcomes = Vec::new();
        for i in 0..5 {
            let headers = xff(&[&format!("198.51.100.{i}")]);
            let key = limit_key(
                &KeySource::Ip,
                client_ip(peer, &headers, &trusted),
                &headers,
                None,
            );
            outcomes.push(limiter.check(&key).is_ok());
        }
        assert_eq!(outcomes, [true, true, false, false, false]);
    }

    #[test]
    fn trusted_peer_takes_the_rightmost_untrusted_address() {
        let trusted = nets(&["10.0.0.0/8", "2001:db8:ffff::/48"]);
        let peer = addr("10.0.0.1");
        // The client prepended a spoofed entry; the proxy appended what it saw.
        assert_eq!(
            client_ip(peer, &xff(&["6.6.6.6, 198.51.100.4"]), &trusted),
            addr("198.51.100.4")
        );
        // A chain of trusted proxies is walked through.
        assert_eq!(
            client_ip(
                peer,
                &xff(&["6.6.6.6, 198.51.100.4, 10.1.1.1, 10.2.2.2"]),
                &trusted
            ),
            addr("198.51.100.4")
        );
        // Several headers form one list, in order.
        assert_eq!(
            client_ip(
                peer,
                &xff(&["6.6.6.6", "198.51.100.4", "10.1.1.1"]),
                &trusted
            ),
            addr("198.51.100.4")
        );
        // Ports, brackets, IPv6 and empty elements.
        assert_eq!(
            client_ip(peer, &xff(&["198.51.100.4:5678, ,"]), &trusted),
            addr("198.51.100.4")
        );
        assert_eq!(
            client_ip(peer, &xff(&["[2001:db8::1]:443"]), &trusted),
            addr("2001:db8::1")
        );
        assert_eq!(
            client_ip(peer, &xff(&["[2001:db8::2], 2001:db8:ffff::1"]), &trusted),
            addr("2001:db8::2")
        );
        // A v4-mapped peer (dual-stack socket) still matches an IPv4 network.
        assert_eq!(
            client_ip(addr("::ffff:10.0.0.1"), &xff(&["198.51.100.4"]), &trusted),
            addr("198.51.100.4")
        );
        assert_eq!(
            client_ip(peer, &xff(&["::ffff:198.51.100.4"]), &trusted),
            addr("198.51.100.4")
        );
    }

    #[test]
    fn trusted_peer_without_a_usable_entry() {
        let trusted = nets(&["10.0.0.0/8"]);
        let peer = addr("10.0.0.1");
        assert_eq!(client_ip(peer, &HeaderMap::new(), &trusted), peer);
        // Every hop is trusted: the left-most one is the client (a health checker, say).
        assert_eq!(
            client_ip(peer, &xff(&["10.9.9.9, 10.8.8.8"]), &trusted),
            addr("10.9.9.9")
        );
        // Garbage stops the walk at the last trusted hop.
        assert_eq!(client_ip(peer, &xff(&["garbage"]), &trusted), peer);
        assert_eq!(client_ip(peer, &xff(&["unknown"]), &trusted), peer);
        assert_eq!(
            client_ip(peer, &xff(&["198.51.100.4, not-an-ip, 10.7.7.7"]), &trusted),
            addr("10.7.7.7")
        );
        assert_eq!(
            client_ip(peer, &xff(&["198.51.100.4, 999.1.1.1"]), &trusted),
            peer
        );
        let opaque = {
            let mut h = HeaderMap::new();
            h.insert(
                "x-forwarded-for",
                HeaderValue::from_bytes(b"\xff\xfe").unwrap(),
            );
            h
        };
        assert_eq!(client_ip(peer, &opaque, &trusted), peer);
    }

    // ---- bounded memory ------------------------------------------------------

    #[test]
    fn overflow_bucket_is_shared_beyond_the_cap_and_sweep_frees_it() {
        let (limiter, clock) = fake_capped("1/m", 1, 2);
        let (a, b, c, d) = (
            ip("192.0.2.1"),
            ip("192.0.2.2"),
            ip("192.0.2.3"),
            ip("192.0.2.4"),
        );
        assert!(limiter.check(&a).is_ok());
        assert!(limiter.check(&b).is_ok());
        assert_eq!(limiter.tracked_keys(), 2);
        assert!(
            limiter.check(&c).is_ok(),
            "first overflow key gets the shared bucket"
        );
        assert!(limiter.check(&d).is_err(), "and a second one shares it");
        assert_eq!(limiter.tracked_keys(), 2);
        assert_eq!(limiter.overflowed_requests(), 2);
        assert!(
            limiter.check(&a).is_err(),
            "tracked keys keep their own state"
        );

        clock.advance(Duration::from_secs(120));
        limiter.sweep();
        assert_eq!(limiter.tracked_keys(), 0);
        assert!(limiter.check(&c).is_ok());
        assert!(
            limiter.check(&d).is_ok(),
            "after the sweep, new keys are tracked again"
        );
        assert_eq!(limiter.tracked_keys(), 2);
    }

    #[test]
    fn sweep_keeps_keys_that_still_matter() {
        let (limiter, clock) = fake("1/m", 1);
        let key = ip("192.0.2.1");
        limiter.check(&key).unwrap();
        clock.advance(Duration::from_secs(30));
        limiter.sweep();
        assert_eq!(limiter.tracked_keys(), 1);
        assert!(
            limiter.check(&key).is_err(),
            "a sweep must not hand out a fresh bucket"
        );
    }

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn overflow_is_logged_once_per_sweep_period() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let (limiter, _clock) = fake_capped("1/m", 1, 1);
        let limiter = limiter.with_route("/api/admin");
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..50 {
                let _ = limiter.check(&LimitKey::Sub(format!("user{i}").into()));
            }
            limiter.sweep(); // nothing expires, but the warning is re-armed
            for i in 50..100 {
                let _ = limiter.check(&LimitKey::Sub(format!("user{i}").into()));
            }
        });
        let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert_eq!(log.matches("rate_limit_keys_overflow").count(), 2, "{log}");
        assert!(log.contains("/api/admin"), "{log}");
        assert!(log.contains("security"), "{log}");
        assert_eq!(limiter.overflowed_requests(), 99);
    }

    #[test]
    fn cap_holds_under_concurrent_inserts() {
        let (limiter, _clock) = fake_capped("1/s", 1, 100);
        let limiter = Arc::new(limiter);
        let threads: Vec<_> = (0..4u32)
            .map(|t| {
                let limiter = Arc::clone(&limiter);
                std::thread::spawn(move || {
                    for i in 0..10_000u32 {
                        let _ =
                            limiter.check(&LimitKey::Ip(IpAddr::from((t << 24 | i).to_be_bytes())));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(limiter.tracked_keys(), 100);
        assert_eq!(limiter.overflowed_requests(), 40_000 - 100);
    }

    #[test]
    fn route_limiter_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<RouteLimiter>();
        assert_send_sync::<RouteLimiter<FakeRelativeClock>>();
    }

    /// A `/proc/self/status` figure in KiB: `VmRSS` (resident now) or `VmHWM` (peak).
    fn proc_status_kib(field: &str) -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with(field))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    fn vm_rss_kib() -> Option<u64> {
        proc_status_kib("VmRSS:")
    }

    /// A flood of 1,000,000 distinct keys (64-byte header values, the largest stored
    /// inline) through one route with the default cap, swept as the server would.
    #[test]
    fn a_million_distinct_keys_stay_bounded() {
        const KEYS: u32 = 1_000_000;
        const CAP: usize = RouteLimiter::DEFAULT_MAX_KEYS;
        let before = vm_rss_kib();
        let (limiter, clock) = fake_capped("10/s", 20, CAP);
        let mut peak = 0;
        for i in 0..KEYS {
            // 1 µs apart: the flood arrives at a million requests a second...
            clock.advance(Duration::from_micros(1));
            let key = LimitKey::Header(format!("{i:064}").into_bytes().into_boxed_slice());
            assert!(limiter.check(&key).is_ok() || limiter.overflowed_requests() > 0);
            if i % 1000 == 0 {
                peak = peak.max(limiter.tracked_keys());
                assert!(limiter.tracked_keys() <= CAP);
            }
            // ...and the server sweeps every 100 ms of it.
            if i % 100_000 == 99_999 {
                limiter.sweep();
            }
        }
        let after = vm_rss_kib();
        let tracked = limiter.tracked_keys();
        let overflowed = limiter.overflowed_requests();
        clock.advance(Duration::from_secs(10));
        limiter.sweep();
        let swept = vm_rss_kib();
        println!(
            "1M distinct keys, cap {CAP}: peak tracked {peak}, tracked at end {tracked}, \
             overflow requests {overflowed}, tracked after idle sweep {}; \
             VmRSS before {before:?} KiB, after flood {after:?} KiB, after idle sweep {swept:?} KiB \
             (process peak VmHWM {:?} KiB, other tests included)",
            limiter.tracked_keys(),
            proc_status_kib("VmHWM:"),
        );
        assert!(peak <= CAP && tracked <= CAP);
        assert!(overflowed > 0, "the cap was reached");
        assert_eq!(limiter.tracked_keys(), 0);
        if let (Some(before), Some(after)) = (before, after) {
            let growth_mib = after.saturating_sub(before) / 1024;
            assert!(growth_mib < 200, "RSS grew by {growth_mib} MiB");
        }
    }
}

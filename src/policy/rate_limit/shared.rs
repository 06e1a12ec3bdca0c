//! The shared (Redis) limiter's decision, without the connection: the key a
//! route and client share across instances, the GCRA script and its
//! arguments, how its reply becomes the same [`RateLimitInfo`] /
//! [`RateLimited`] the in-process limiter gives, and what `on_error` does
//! while Redis fails. The live side (connections, timeouts, the circuit)
//! is `crate::redis_limits`.
//!
//! # Keys
//!
//! `{key_prefix}:rl:{route}:{kind}:{value}`: `ip:` and the address as the
//! in-process limiter keys it (IPv6 by /64); `sub:` and `hdr:` with the
//! first 128 bits of a SHA-256 of the value in hex, so an API key or a
//! subject is never stored in clear and a long one costs Redis no more than
//! a short one. Unlike [`LimitKey::Digest`](super::LimitKey::Digest) (keyed
//! per process) the hash is the same in every instance, which is the point.

use std::fmt::Write as _;
use std::str::FromStr;
use std::time::Duration;

use super::headers::{QuotaPolicy, RateLimitInfo, RateLimited};
use super::key::KeyMaterial;
use super::spec::RateLimitSpec;

/// The GCRA script, run with EVALSHA (loaded once per Redis, again after
/// NOSCRIPT).
pub const GCRA_SCRIPT: &str = include_str!("gcra.lua");

/// What requests on a rate-limited route get while Redis fails (`on_error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnError {
    /// This instance's own limiter, for the same route and key.
    #[default]
    Local,
    /// Through, unlimited.
    Allow,
    /// 503 `rate_limit_unavailable`, nothing forwarded.
    Deny,
}

impl FromStr for OnError {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "local" => Ok(OnError::Local),
            "allow" => Ok(OnError::Allow),
            "deny" => Ok(OnError::Deny),
            _ => Err(format!(r#"expected "local", "allow" or "deny", got "{s}""#)),
        }
    }
}

impl OnError {
    pub fn as_str(self) -> &'static str {
        match self {
            OnError::Local => "local",
            OnError::Allow => "allow",
            OnError::Deny => "deny",
        }
    }
}

/// A route's limit as the script's arguments, computed once per route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedQuota {
    /// `t`: one request's cost, in microseconds (the emission interval
    /// rounded up, so never looser than configured; at least 1).
    pub interval_us: u64,
    /// `tau`: `t * (burst - 1)`, how far ahead of now the bucket may run.
    pub tolerance_us: u64,
    policy: QuotaPolicy,
    refill: Duration,
}

impl SharedQuota {
    pub fn new(spec: &RateLimitSpec) -> Self {
        let refill = spec.rate.interval();
        let interval_us = u64::try_from(refill.as_nanos().div_ceil(1_000))
            .unwrap_or(u64::MAX)
            .max(1);
        SharedQuota {
            interval_us,
            tolerance_us: interval_us.saturating_mul(u64::from(spec.burst.max(1) - 1)),
            policy: spec.policy(),
            refill,
        }
    }

    /// The script's reply, `[1, remaining]` or `[0, wait_us]`, as the
    /// route's answer. `None` for any other shape (a script that is not
    /// ours under the same SHA, a proxy in between): counted as an error.
    pub fn interpret(&self, reply: &[i64]) -> Option<Result<RateLimitInfo, RateLimited>> {
        match *reply {
            [1, remaining] => {
                let remaining = u32::try_from(remaining.max(0)).unwrap_or(u32::MAX);
                Some(Ok(RateLimitInfo::allowed(
                    self.policy,
                    remaining,
                    self.refill,
                )))
            }
            [0, wait_us] => {
                let wait = Duration::from_micros(u64::try_from(wait_us).unwrap_or(0));
                Some(Err(RateLimited::after(self.policy, wait)))
            }
            _ => None,
        }
    }
}

/// The Redis key of `route` and `material` under `prefix`.
pub fn shared_key(prefix: &str, route: &str, material: &KeyMaterial<'_>) -> String {
    let mut key = String::with_capacity(prefix.len() + route.len() + 48);
    key.push_str(prefix);
    key.push_str(":rl:");
    key.push_str(route);
    match *material {
        KeyMaterial::Ip(ip) => {
            let _ = write!(key, ":ip:{ip}");
        }
        KeyMaterial::Sub(sub) => {
            key.push_str(":sub:");
            push_digest(&mut key, b"sub", sub.as_bytes());
        }
        KeyMaterial::Header(raw) => {
            key.push_str(":hdr:");
            push_digest(&mut key, b"hdr", raw);
        }
    }
    key
}

/// 128 bits of SHA-256 over a domain tag and the value, in hex.
fn push_digest(out: &mut String, domain: &[u8], value: &[u8]) {
    let mut context = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    context.update(b"portcullis-rate-limit\0");
    context.update(domain);
    context.update(b"\0");
    context.update(value);
    let digest = context.finish();
    for byte in &digest.as_ref()[..16] {
        let _ = write!(out, "{byte:02x}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::rate_limit::test_support::spec;

    #[test]
    fn keys_name_prefix_route_and_client_and_never_a_header_in_clear() {
        let ip = KeyMaterial::Ip("192.0.2.7".parse().unwrap());
        assert_eq!(shared_key("pc", "/api", &ip), "pc:rl:/api:ip:192.0.2.7");
        let v6 = KeyMaterial::Ip("2001:db8::".parse().unwrap());
        assert_eq!(shared_key("pc", "/", &v6), "pc:rl:/:ip:2001:db8::");

        let secret = b"sk_live_0123456789";
        let header = shared_key("pc", "/api", &KeyMaterial::Header(secret));
        assert!(header.starts_with("pc:rl:/api:hdr:"), "{header}");
        assert_eq!(header.len(), "pc:rl:/api:hdr:".len() + 32);
        assert!(!header.contains("sk_live"), "{header}");
        assert_eq!(
            header,
            shared_key("pc", "/api", &KeyMaterial::Header(secret)),
            "the same in every instance"
        );
        let sub = shared_key("pc", "/api", &KeyMaterial::Sub("sk_live_0123456789"));
        assert_ne!(sub[sub.len() - 32..], header[header.len() - 32..]);
        assert_ne!(
            header,
            shared_key("pc", "/api", &KeyMaterial::Header(b"sk_live_0123456780"))
        );
        let long = vec![b'x'; 10_000];
        assert_eq!(
            shared_key("pc", "/api", &KeyMaterial::Header(&long)).len(),
            header.len(),
            "a long value costs no more than a short one"
        );
    }

    #[test]
    fn quota_arguments_round_the_interval_up() {
        let five_a_minute = SharedQuota::new(&spec("5/m", 5, "ip"));
        assert_eq!(five_a_minute.interval_us, 12_000_000);
        assert_eq!(five_a_minute.tolerance_us, 48_000_000);
        let three_a_second = SharedQuota::new(&spec("3/s", 1, "ip"));
        assert_eq!(three_a_second.interval_us, 333_334);
        assert_eq!(three_a_second.tolerance_us, 0);
        let very_fast = SharedQuota::new(&spec("4000000000/s", 2, "ip"));
        assert_eq!(very_fast.interval_us, 1);
    }

    #[test]
    fn replies_become_the_same_answers_as_the_local_limiter() {
        let quota = SharedQuota::new(&spec("2/s", 3, "ip"));
        let (local, _clock) = crate::policy::rate_limit::test_support::fake("2/s", 3);
        let key = crate::policy::rate_limit::test_support::ip("192.0.2.1");
        assert_eq!(quota.interpret(&[1, 2]), Some(local.check(&key)));
        local.check(&key).unwrap();
        local.check(&key).unwrap();
        assert_eq!(quota.interpret(&[0, 500_000]), Some(local.check(&key)));

        let limited = quota.interpret(&[0, 1_200_000]).unwrap().unwrap_err();
        assert_eq!(limited.retry_after_secs, 2);
        assert_eq!(
            quota
                .interpret(&[0, 1])
                .unwrap()
                .unwrap_err()
                .retry_after_secs,
            1
        );
        assert_eq!(quota.interpret(&[1]), None);
        assert_eq!(quota.interpret(&[2, 0]), None);
        assert_eq!(quota.interpret(&[1, -5]).unwrap().unwrap().remaining, 0);
    }

    #[test]
    fn on_error_values() {
        assert_eq!("local".parse(), Ok(OnError::Local));
        assert_eq!("allow".parse(), Ok(OnError::Allow));
        assert_eq!("deny".parse(), Ok(OnError::Deny));
        assert!("Deny".parse::<OnError>().is_err());
        assert_eq!(OnError::default(), OnError::Local);
    }
}

//! A route's `rate_limit` table: the rate, the burst and the key source,
//! checked when the configuration is loaded, and the governor quota they make.
//! Errors are typed ([`RateLimitConfigError`]) and worded to follow the
//! config layer's `proxy.toml:LINE:COL: key: ` prefix.

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

use governor::Quota;

use super::headers::{QuotaPolicy, ceil_secs_nanos};
use super::key::KeySource;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::rate_limit::RouteLimiter;
    use crate::policy::rate_limit::test_support::{ip, spec};
    use governor::clock::FakeRelativeClock;

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
}

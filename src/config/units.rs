//! The value types of `proxy.toml` that are written as strings: durations
//! (`"250ms"`, `"30s"`), sizes (`65536`, `"64KiB"`, `"10MiB"`).
//!
//! They deserialize straight into checked values, so a bad value is reported
//! by the TOML layer with its exact line and column.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

/// A duration written as `"30s"`, `"250ms"`, `"15m"`, `"1h"`, `"30d"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct DurationValue(pub Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        impl Visitor<'_> for DurationVisitor {
            type Value = DurationValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a duration such as "250ms", "30s" or "15m""#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                parse_duration(v).map(DurationValue).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                // A bare number is ambiguous (seconds? milliseconds?), so it is
                // refused rather than guessed.
                Err(E::custom(format!(
                    r#"expected a duration with a unit such as "{v}s", got the number {v}"#
                )))
            }
        }
        deserializer.deserialize_any(DurationVisitor)
    }
}

/// Parses `"30s"`-style durations; the error names what was expected and what was found.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let expected =
        || format!(r#"expected a duration such as "250ms", "30s" or "15m", got "{text}""#);
    if text.trim() != text || text.is_empty() {
        return Err(expected());
    }
    humantime::parse_duration(text).map_err(|_| expected())
}

/// A size in bytes written as an integer or as `"64KiB"`, `"10MiB"`, `"1GiB"`, `"512B"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SizeValue(pub u64);

impl<'de> Deserialize<'de> for SizeValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = SizeValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a size in bytes, or a string such as "64KiB" or "10MiB""#)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                u64::try_from(v)
                    .map(SizeValue)
                    .map_err(|_| E::custom(format!("expected a size of at least 0 bytes, got {v}")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(SizeValue(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                parse_size(v).map(SizeValue).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// Parses `"64KiB"`-style sizes. Binary units only, plus `KB`/`MB`/`GB` as
/// their decimal meaning, since operators write both.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let expected = || format!(r#"expected a size such as 65536, "64KiB" or "10MiB", got "{text}""#);
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    let number: u64 = number.parse().map_err(|_| expected())?;
    let multiplier: u64 = match unit.trim_start() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(expected()),
    };
    number.checked_mul(multiplier).ok_or_else(expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86400)));
        assert!(parse_duration("ten").unwrap_err().contains(r#"got "ten""#));
        assert!(parse_duration("").is_err());
        assert!(parse_duration(" 5s").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("10MiB"), Ok(10 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("100"), Ok(100));
        assert_eq!(parse_size("2 KiB"), Ok(2048));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("10XB").is_err());
        assert!(parse_size("99999999999999GiB").is_err());
    }
}

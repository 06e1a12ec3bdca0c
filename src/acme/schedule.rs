//! When to order: the pure part of the ACME task, unit-tested without a CA.
//! A certificate is renewed once less than `renew_before` is left, or
//! earlier when the CA's renewal information (ARI, RFC 9773) suggests a
//! window that opens sooner. A failed order is retried with exponential
//! back-off capped at a minute.

use std::time::{Duration, SystemTime};

use crate::cert_info::CertInfo;

/// The first retry after a failed order.
pub const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Retries never wait longer than this (SPEC: at most a minute).
pub const MAX_RETRY: Duration = Duration::from_secs(60);

/// How long to wait before retry number `failures` (1 for the first).
pub fn retry_after(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_RETRY.saturating_mul(1 << doublings).min(MAX_RETRY)
}

/// The shortest time between two orders of this process for one
/// certificate: a `renew_before` longer than the certificate's life means
/// "renew now" at start, not an order after every order. A tenth of the
/// life, between 10 s and an hour.
pub fn min_interval(lifetime: Duration) -> Duration {
    (lifetime / 10).clamp(Duration::from_secs(10), Duration::from_secs(3600))
}

/// When to renew `cert`. `obtained_at` is when this process obtained it
/// (`None` for one found in the cache at start); `ari_window` is the CA's
/// suggested window, if it offers one.
pub fn renew_at(
    cert: &CertInfo,
    renew_before: Duration,
    obtained_at: Option<SystemTime>,
    ari_window: Option<(SystemTime, SystemTime)>,
) -> SystemTime {
    let mut due = cert
        .not_after
        .checked_sub(renew_before)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    if let Some((start, end)) = ari_window
        && start < due
    {
        // The middle of the window: early enough to be within it, without
        // every instance of every user asking at its opening.
        let middle = start + end.duration_since(start).unwrap_or_default() / 2;
        due = due.min(middle);
    }
    match obtained_at {
        Some(obtained) => due.max(obtained + min_interval(cert.lifetime())),
        None => due,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn cert(not_before: SystemTime, lifetime: Duration) -> CertInfo {
        CertInfo {
            names: vec!["a.example.com".into()],
            not_before,
            not_after: not_before + lifetime,
            serial: vec![1],
            authority_key_id: None,
        }
    }

    #[test]
    fn retries_double_from_a_second_up_to_a_minute() {
        let waits: Vec<u64> = (1..=9).map(|n| retry_after(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(retry_after(u32::MAX), MAX_RETRY);
    }

    #[test]
    fn renewal_is_due_renew_before_the_end() {
        let start = SystemTime::UNIX_EPOCH + 1000 * DAY;
        let c = cert(start, 90 * DAY);
        assert_eq!(renew_at(&c, 30 * DAY, None, None), start + 60 * DAY);
        assert_eq!(renew_at(&c, 30 * DAY, Some(start), None), start + 60 * DAY);
    }

    #[test]
    fn renew_before_longer_than_the_life_renews_at_once_then_not_in_a_loop() {
        let start = SystemTime::UNIX_EPOCH + 1000 * DAY;
        let c = cert(start, Duration::from_secs(300));
        // Found in the cache at start: now.
        assert!(renew_at(&c, DAY, None, None) <= start);
        // Just obtained: not before a tenth of its life.
        assert_eq!(
            renew_at(&c, DAY, Some(start), None),
            start + Duration::from_secs(30)
        );
        assert_eq!(
            min_interval(Duration::from_secs(5)),
            Duration::from_secs(10)
        );
        assert_eq!(min_interval(90 * DAY), Duration::from_secs(3600));
    }

    #[test]
    fn an_earlier_ari_window_brings_renewal_forward_and_a_later_one_does_not() {
        let start = SystemTime::UNIX_EPOCH + 1000 * DAY;
        let c = cert(start, 90 * DAY);
        let early = (start + 10 * DAY, start + 12 * DAY);
        assert_eq!(renew_at(&c, 30 * DAY, None, Some(early)), start + 11 * DAY);
        let late = (start + 70 * DAY, start + 80 * DAY);
        assert_eq!(renew_at(&c, 30 * DAY, None, Some(late)), start + 60 * DAY);
    }
}

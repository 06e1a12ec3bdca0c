//! The per-route key store: one GCRA state per client key, in memory, capped.
//!
//! Keys are client-controlled (any address, any header value), so the number of
//! tracked keys is capped per route ([`RouteLimiter::DEFAULT_MAX_KEYS`]). When a
//! new key finds the table full, the store makes room instead of pooling new keys
//! together: it evicts the eighth of its keys with the earliest theoretical
//! arrival times. A key whose bucket has fully refilled has an arrival time in
//! the past and is equivalent to an absent one, so those go first; after them,
//! the keys that owe the least, whose eviction hands their client a bucket
//! barely fuller than its own. An attacker spraying random `X-Api-Key` values
//! therefore never shares a bucket with a legitimate client; the worst an
//! eviction does is forget a light user's last request. One pass over the
//! table buys room for an eighth of it, so the cost per new key stays a few
//! hundred nanoseconds. Keys that arrive while another thread is making room
//! are measured against one shared overflow bucket for that moment; such
//! moments are logged as a `security` warning with
//! `reason = "rate_limit_keys_overflow"`, at most once per
//! [`RouteLimiter::sweep`] period. `sweep`, which the server runs every ~10 s,
//! drops keys whose state is indistinguishable from a fresh one (governor's
//! `retain_recent`) and gives memory back (`shrink_to_fit`).
//!
//! The boundary is governor's own: [`CappedKeyStore`] implements `StateStore` and
//! `ShrinkableKeyedStateStore`, and [`OverflowLog`] is all the limiter shares with
//! it. A shared (Redis) store cannot sit behind these traits — they are
//! synchronous and hand the store a closure over local state — so it slots in next
//! to [`RouteLimiter::check`] instead, as the module documentation of
//! [`rate_limit`](super) describes.
//!
//! [`RouteLimiter::DEFAULT_MAX_KEYS`]: super::RouteLimiter::DEFAULT_MAX_KEYS
//! [`RouteLimiter::sweep`]: super::RouteLimiter::sweep
//! [`RouteLimiter::check`]: super::RouteLimiter::check

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};

use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::{InMemoryState, NotKeyed, StateStore};

use super::key::LimitKey;

/// How long a new key waits for another thread's eviction pass before it is
/// measured against the shared bucket instead (a pass over 100,000 keys
/// takes a few milliseconds).
const MAX_YIELDS_WHILE_EVICTING: usize = 10_000;

const OVERFLOW_ARMED: u8 = 0;
const OVERFLOW_PENDING: u8 = 1;
const OVERFLOW_REPORTED: u8 = 2;

/// Shared by the store (which notices an overflow) and the limiter (which knows the
/// route and logs it): armed → pending → reported → (sweep) → armed.
#[derive(Default)]
pub(super) struct OverflowLog {
    state: AtomicU8,
    requests: AtomicU64,
    evicted: AtomicU64,
}

impl OverflowLog {
    /// The store's side: one request measured against the shared bucket.
    fn note_overflow(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.arm_report();
    }

    /// The store's side: keys evicted to make room.
    fn note_evicted(&self, keys: u64) {
        self.evicted.fetch_add(keys, Ordering::Relaxed);
        self.arm_report();
    }

    fn arm_report(&self) {
        if self.state.load(Ordering::Relaxed) == OVERFLOW_ARMED {
            let _ = self.state.compare_exchange(
                OVERFLOW_ARMED,
                OVERFLOW_PENDING,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
    }

    /// The limiter's side, after every check: true once per armed period, when
    /// the caller is the one to log the overflow.
    pub(super) fn take_pending(&self) -> bool {
        // One relaxed load per request; the swap and the log happen once per sweep.
        self.state.load(Ordering::Relaxed) == OVERFLOW_PENDING
            && self
                .state
                .compare_exchange(
                    OVERFLOW_PENDING,
                    OVERFLOW_REPORTED,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// The sweep's side: lets the next overflow be logged again.
    pub(super) fn rearm(&self) {
        // Re-arm only after a report, so an overflow noted but not yet logged by its
        // `check` (a different thread) is still logged.
        let _ = self.state.compare_exchange(
            OVERFLOW_REPORTED,
            OVERFLOW_ARMED,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }

    /// Requests counted against the shared bucket so far.
    pub(super) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Keys evicted to make room so far.
    pub(super) fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }
}

/// governor's DashMap store with a cap: past `max_keys` entries, unknown keys are
/// measured against one shared state instead of getting their own.
pub(super) struct CappedKeyStore {
    map: DashMapStateStore<LimitKey>,
    shared: InMemoryState,
    /// Entries in `map` plus insertions under way. A new key reserves a place here
    /// before inserting, so racing threads can never take the map past `max_keys`.
    reserved: AtomicUsize,
    max_keys: usize,
    overflow: Arc<OverflowLog>,
    /// One thread makes room at a time.
    evicting: AtomicBool,
}

impl CappedKeyStore {
    /// An empty store tracking at most `max_keys` keys, reporting overflows to `overflow`.
    pub(super) fn new(max_keys: usize, overflow: Arc<OverflowLog>) -> Self {
        CappedKeyStore {
            map: DashMapStateStore::default(),
            shared: InMemoryState::default(),
            reserved: AtomicUsize::new(0),
            max_keys,
            overflow,
            evicting: AtomicBool::new(false),
        }
    }

    /// A place for a new key in a full table: made here, or by the thread
    /// already making room (waited for briefly: one pass over the table).
    fn make_room_and_reserve(&self) -> bool {
        if self.make_room() {
            return self.reserve_place();
        }
        for _ in 0..MAX_YIELDS_WHILE_EVICTING {
            if !self.evicting.load(Ordering::Acquire) {
                return self.reserve_place();
            }
            std::thread::yield_now();
        }
        false
    }

    /// Evicts the eighth of the keys with the earliest theoretical arrival
    /// times (see the module documentation). False when another thread is
    /// already at it.
    fn make_room(&self) -> bool {
        if self
            .evicting
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        let mut arrivals: Vec<u64> = self
            .map
            .iter()
            .map(|entry| theoretical_arrival(entry.value()).map_or(0, |t| t.as_u64()))
            .collect();
        let evict = (arrivals.len() / 8).max(1);
        let removed = if arrivals.is_empty() {
            0
        } else {
            let (_, &mut threshold, _) = arrivals.select_nth_unstable(evict - 1);
            let mut removed = 0;
            self.map.retain(|_, state| {
                let arrival = theoretical_arrival(state).map_or(0, |t| t.as_u64());
                let keep = removed >= evict || arrival > threshold;
                removed += usize::from(!keep);
                keep
            });
            removed
        };
        self.reserved.fetch_sub(removed, Ordering::AcqRel);
        self.overflow.note_evicted(removed as u64);
        self.evicting.store(false, Ordering::Release);
        true
    }

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
        self.overflow.note_overflow();
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
        if !self.reserve_place() && !self.make_room_and_reserve() {
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
    use crate::policy::rate_limit::RouteLimiter;
    use crate::policy::rate_limit::test_support::{fake, fake_capped, ip};
    use std::io::Write;
    use std::net::IpAddr;
    use std::sync::Mutex;
    use std::time::Duration;

    // ---- bounded memory ------------------------------------------------------

    #[test]
    fn a_full_table_evicts_refilled_keys_first_and_never_pools_new_ones() {
        // A cap of 8: an eighth is one key per eviction.
        let (limiter, clock) = fake_capped("1/m", 1, 8);
        let keys: Vec<LimitKey> = (1..=9).map(|i| ip(&format!("192.0.2.{i}"))).collect();
        // Key 0 is seen first and refills after a minute; the others later.
        assert!(limiter.check(&keys[0]).is_ok());
        clock.advance(Duration::from_secs(61));
        for key in &keys[1..8] {
            assert!(limiter.check(key).is_ok());
        }
        assert_eq!(limiter.tracked_keys(), 8);
        // A ninth key gets a bucket of its own, and key 0 (refilled) makes room.
        assert!(limiter.check(&keys[8]).is_ok(), "a new key is never pooled");
        assert!(
            limiter.check(&keys[8]).is_err(),
            "and its own bucket counts its requests"
        );
        assert_eq!(limiter.tracked_keys(), 8);
        assert_eq!(limiter.evicted_keys(), 1);
        assert_eq!(limiter.overflowed_requests(), 0);
        for key in &keys[1..8] {
            assert!(limiter.check(key).is_err(), "a key in debt keeps its state");
        }
        // Key 0 was equivalent to absent: it starts afresh, as it would have.
        assert!(limiter.check(&keys[0]).is_ok());
    }

    #[test]
    fn with_nothing_refilled_the_least_indebted_keys_go() {
        let (limiter, clock) = fake_capped("1/m", 5, 8);
        let heavy = ip("198.51.100.1");
        for _ in 0..5 {
            assert!(limiter.check(&heavy).is_ok());
        }
        assert!(
            limiter.check(&heavy).is_err(),
            "the heavy client is limited"
        );
        // Seven light clients, then a stream of new keys (an attacker's).
        for i in 1..=7 {
            assert!(limiter.check(&ip(&format!("192.0.2.{i}"))).is_ok());
        }
        for i in 0..100 {
            clock.advance(Duration::from_millis(10));
            assert!(limiter.check(&ip(&format!("203.0.113.{i}"))).is_ok());
        }
        assert!(limiter.tracked_keys() <= 8);
        assert!(
            limiter.check(&heavy).is_err(),
            "a flood of new keys does not free the heaviest user"
        );
        assert_eq!(limiter.overflowed_requests(), 0);
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
    fn a_full_table_is_logged_once_per_sweep_period() {
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
        assert_eq!(limiter.evicted_keys(), 99);
        assert_eq!(limiter.overflowed_requests(), 0);
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
        assert!(limiter.tracked_keys() <= 100);
        // A new key meets the shared bucket only while another thread is
        // making room; the rest got buckets of their own.
        assert!(limiter.evicted_keys() > 0);
        assert!(limiter.overflowed_requests() < 40_000 / 2);
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

    /// Set in the process [`a_million_distinct_keys_stay_bounded`] runs its
    /// flood in.
    const FLOOD_PROCESS: &str = "PORTCULLIS_TEST_KEY_FLOOD_PROCESS";

    /// A flood of 1,000,000 distinct keys (64-byte header values, the largest stored
    /// inline) through one route with the default cap, swept as the server would.
    ///
    /// Resident memory is the whole process's, and the other unit tests run
    /// beside this one in threads of the same process: on a loaded machine
    /// their allocations once added 220 MiB to this test's 24. So the flood
    /// runs in a process of its own, this test binary started again for
    /// this one test.
    #[test]
    fn a_million_distinct_keys_stay_bounded() {
        if std::env::var_os(FLOOD_PROCESS).is_some() {
            return key_flood();
        }
        let name = concat!(module_path!(), "::a_million_distinct_keys_stay_bounded");
        let name = name.split_once("::").map_or(name, |(_crate, path)| path);
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([name, "--exact", "--nocapture", "--test-threads=1"])
            .env(FLOOD_PROCESS, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!("{stdout}");
        assert!(
            out.status.success(),
            "the flood's process failed:\n{stderr}"
        );
        assert!(
            stdout.contains("1M distinct keys") && stdout.contains("1 passed"),
            "the flood did not run in its process:\n{stdout}{stderr}"
        );
    }

    fn key_flood() {
        const KEYS: u32 = 1_000_000;
        const CAP: usize = RouteLimiter::DEFAULT_MAX_KEYS;
        let before = vm_rss_kib();
        let (limiter, clock) = fake_capped("10/s", 20, CAP);
        let mut peak = 0;
        for i in 0..KEYS {
            // 1 µs apart: the flood arrives at a million requests a second...
            clock.advance(Duration::from_micros(1));
            let key = LimitKey::Header(format!("{i:064}").into_bytes().into_boxed_slice());
            assert!(limiter.check(&key).is_ok(), "a new key has a full bucket");
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
        let evicted = limiter.evicted_keys();
        clock.advance(Duration::from_secs(10));
        limiter.sweep();
        let swept = vm_rss_kib();
        println!(
            "1M distinct keys, cap {CAP}: peak tracked {peak}, tracked at end {tracked}, \
             evicted {evicted}, tracked after idle sweep {}; \
             VmRSS before {before:?} KiB, after flood {after:?} KiB, after idle sweep {swept:?} KiB \
             (process peak VmHWM {:?} KiB)",
            limiter.tracked_keys(),
            proc_status_kib("VmHWM:"),
        );
        assert!(peak <= CAP && tracked <= CAP);
        assert!(evicted > 0, "the cap was reached");
        assert_eq!(limiter.tracked_keys(), 0);
        // 24 MiB measured (100,000 keys of 64 bytes and their buckets).
        if let (Some(before), Some(after)) = (before, after) {
            let growth_mib = after.saturating_sub(before) / 1024;
            assert!(growth_mib < 64, "RSS grew by {growth_mib} MiB");
        }
    }
}

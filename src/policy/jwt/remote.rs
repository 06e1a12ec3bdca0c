//! Keys that change while the proxy runs (`jwks_url`). A [`KeySource`]
//! fetches a whole key set — over HTTP in production (`jwks_url.rs`), from
//! memory in tests — and [`RemoteKeys`] decides when to fetch and publishes
//! the result: at start, every `jwks_refresh`, and on an unknown `kid`, at
//! most once per `min_refetch_interval` (a minute) with concurrent callers
//! sharing one fetch. A failed fetch keeps the last good set; a successful
//! one replaces it whole. The set is published through an [`ArcSwap`], so
//! the verifier reads it without a lock for a known `kid`. [`KeyFetcher`]
//! runs the refresh; the runtime starts one per configuration.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, Guard};

use super::jwks_url::HttpJwks;
use super::keys::KeySet;
use super::settings::VerifierConfig;

/// Default minimum time between two unknown-`kid` refetches.
pub const DEFAULT_MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(60);

/// Longest a fetch may take by default, connect to last body byte.
const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest wait before retrying while no fetch has ever succeeded (backing
/// off from 1 s); after a success, retries follow `jwks_refresh`.
const MAX_INITIAL_RETRY: Duration = Duration::from_secs(60);
/// The longest a request with an unknown `kid` waits for the fetch it
/// triggered (or found running) before its 401: the fetch itself may take
/// up to its own timeout, and goes on without the requests that wait.
pub const UNKNOWN_KID_WAIT: Duration = Duration::from_secs(2);

/// What [`KeySource::fetch`] returns.
pub type FetchFuture<'a> = Pin<Box<dyn Future<Output = Result<KeySet, String>> + Send + 'a>>;

/// Where keys that change come from. Boxed futures keep the trait object
/// safe; a fetch happens every few minutes, so the allocation is nothing.
pub trait KeySource: Send + Sync {
    /// One fetch of the whole key set; `Err` says why, for the log.
    fn fetch(&self) -> FetchFuture<'_>;
    /// Where the keys come from, for the log.
    fn name(&self) -> &str;
}

/// Knobs that are not `[jwt]` keys; tests shrink them.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Minimum time between two unknown-`kid` refetches (default 60 s).
    pub min_refetch_interval: Duration,
    /// Longest a fetch may take (default 10 s).
    pub fetch_timeout: Duration,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            min_refetch_interval: DEFAULT_MIN_REFETCH_INTERVAL,
            fetch_timeout: DEFAULT_FETCH_TIMEOUT,
        }
    }
}

/// Bookkeeping for fetches; behind an async mutex that is only taken by the
/// refresh task and by unknown-`kid` callers, never on the hot path.
#[derive(Default)]
struct FetchState {
    /// When the last unknown-`kid` refetch started (scheduled and start
    /// fetches do not count).
    last_on_demand: Option<Instant>,
}

/// The last good key set from a [`KeySource`], and the rules for fetching it
/// again.
pub struct RemoteKeys {
    source: Arc<dyn KeySource>,
    refresh: Duration,
    min_refetch_interval: Duration,
    fetch_timeout: Duration,
    keys: ArcSwap<KeySet>,
    /// A fetch has succeeded at least once.
    loaded: AtomicBool,
    /// Held by every fetch from its start to its end (the fetch task
    /// takes it), so waiting for it is waiting for the fetch under way.
    fetch: Arc<tokio::sync::Mutex<FetchState>>,
}

impl RemoteKeys {
    /// Nothing is fetched until the refresh task starts or a `kid` is missed.
    pub fn new(source: Arc<dyn KeySource>, refresh: Duration, options: FetchOptions) -> Self {
        RemoteKeys {
            source,
            refresh,
            min_refetch_interval: options.min_refetch_interval,
            fetch_timeout: options.fetch_timeout,
            keys: ArcSwap::from_pointee(KeySet::default()),
            loaded: AtomicBool::new(false),
            fetch: Arc::new(tokio::sync::Mutex::new(FetchState::default())),
        }
    }

    /// The `jwks_url` keys of `config`, when it names one. Nothing is
    /// fetched until a [`KeyFetcher`] starts or a `kid` is missed.
    pub fn for_jwks_url(config: &VerifierConfig) -> Option<Arc<RemoteKeys>> {
        let url = config.jwks_url.clone()?;
        let source = HttpJwks::new(url, config.allowed);
        Some(Arc::new(RemoteKeys::new(
            Arc::new(source),
            config.jwks_refresh,
            FetchOptions::default(),
        )))
    }

    /// The current set, without a lock; hold it briefly, never across an await.
    pub(super) fn current(&self) -> Guard<Arc<KeySet>> {
        self.keys.load()
    }

    /// The current set, to keep: a later refresh replaces it with another `Arc`.
    pub(super) fn current_full(&self) -> Arc<KeySet> {
        self.keys.load_full()
    }

    pub(super) fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// One fetch; on success it replaces the whole key set. Call with
    /// `fetch` locked, so fetches never overlap.
    async fn fetch_keys(&self, why: &'static str) -> bool {
        let result = match tokio::time::timeout(self.fetch_timeout, self.source.fetch()).await {
            Ok(result) => result,
            Err(_) => Err(format!("timed out after {:?}", self.fetch_timeout)),
        };
        match result {
            Ok(set) => {
                if set.is_empty() {
                    tracing::warn!(jwks_url = %self.source.name(), trigger = why, "JWKS fetched but holds no usable key; tokens from it will be refused");
                } else {
                    tracing::info!(jwks_url = %self.source.name(), trigger = why, keys = set.len(), "JWKS fetched");
                }
                self.keys.store(Arc::new(set));
                self.loaded.store(true, Ordering::Release);
                true
            }
            Err(e) => {
                tracing::warn!(jwks_url = %self.source.name(), trigger = why, error = %e, "JWKS fetch failed; keeping the last good keys");
                false
            }
        }
    }

    /// The unknown-`kid` path: waits for the fetch under way, if any, then,
    /// when the kid is still unknown, starts a refetch of its own unless one
    /// started within `min_refetch_interval`, on a task of its own, and
    /// waits for that. The fetch under way may have started before the key
    /// was published (a refresh, or the start fetch), so it alone does not
    /// settle the question. Concurrent callers share these fetches, and the
    /// whole wait is at most [`UNKNOWN_KID_WAIT`]: an unreachable JWKS
    /// endpoint costs each of them two seconds, not the fetch timeout.
    /// Returns whether a retry of the lookup can succeed.
    pub(super) async fn refetch_for_kid(self: &Arc<Self>, kid: &str) -> bool {
        let deadline = tokio::time::Instant::now() + UNKNOWN_KID_WAIT;
        if self.keys.load().has_kid(kid) {
            return true;
        }
        // The lock is free only between fetches. (Waiting for a fetch's
        // announcement instead, as this once did, could miss one that
        // ended before the wait began while its lock was still held.)
        let Ok(mut state) =
            tokio::time::timeout_at(deadline, self.fetch.clone().lock_owned()).await
        else {
            return self.keys.load().has_kid(kid);
        };
        if self.keys.load().has_kid(kid) {
            return true;
        }
        if state
            .last_on_demand
            .is_some_and(|last| last.elapsed() < self.min_refetch_interval)
        {
            return false;
        }
        state.last_on_demand = Some(Instant::now());
        let remote = Arc::clone(self);
        let own = tokio::spawn(async move {
            let _state = state;
            remote.fetch_keys("unknown kid").await
        });
        // On timeout the fetch goes on, for the requests after this one.
        let _ = tokio::time::timeout_at(deadline, own).await;
        self.keys.load().has_kid(kid)
    }

    /// The refresh task: the start fetch (whose lock `start` already holds,
    /// so requests that arrive meanwhile wait for it instead of fetching
    /// too), then one fetch every `refresh`. Until a first success it
    /// retries sooner, backing off from 1 s.
    async fn run(
        weak: Weak<RemoteKeys>,
        start: Option<tokio::sync::OwnedMutexGuard<FetchState>>,
        refresh: Duration,
    ) {
        let mut ok = {
            let Some(remote) = weak.upgrade() else { return };
            let _guard = match start {
                Some(guard) => guard,
                None => remote.fetch.clone().lock_owned().await,
            };
            remote.fetch_keys("start").await
        };
        let mut backoff = Duration::from_secs(1);
        loop {
            let delay = if ok {
                refresh
            } else {
                let d = backoff.min(refresh).min(MAX_INITIAL_RETRY);
                backoff = backoff.saturating_mul(2);
                d
            };
            tokio::time::sleep(delay).await;
            let Some(remote) = weak.upgrade() else { return };
            let _guard = remote.fetch.lock().await;
            let fetched = remote.fetch_keys("refresh").await;
            ok = fetched || remote.loaded.load(Ordering::Acquire);
        }
    }
}

/// The refresh task of one [`RemoteKeys`]: the start fetch, then one every
/// `jwks_refresh`. Never fatal: a failed start fetch is logged and retried
/// (backing off from 1 s to at most a minute until one succeeds); meanwhile
/// tokens that need those keys are refused as
/// [`super::TokenError::KeyUnavailable`], and requests that arrive during
/// the start fetch wait for it. Dropping the fetcher stops the task.
///
/// The task runs on a thread of its own, with its own small runtime, so it
/// can be started from anywhere — the first configuration is built before
/// any tokio runtime exists — and never competes with requests on a worker.
pub struct KeyFetcher {
    /// Stops the task when dropped: a reload replaces the fetcher with its
    /// runtime generation.
    _task: crate::background::Background,
}

impl KeyFetcher {
    pub fn start(remote: &Arc<RemoteKeys>) -> std::io::Result<KeyFetcher> {
        // Taken here, synchronously, so that the start fetch holds it before
        // any request can run the unknown-kid path. (If an unknown-kid fetch
        // already holds it, the task waits for that one first.)
        let start = remote.fetch.clone().try_lock_owned().ok();
        let weak = Arc::downgrade(remote);
        let refresh = remote.refresh;
        let task = crate::background::Background::start("portcullis-jwks", move || {
            RemoteKeys::run(weak, start, refresh)
        })?;
        Ok(KeyFetcher { _task: task })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::jwt::test_support::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn remote(
        source: &Arc<FakeSource>,
        refresh: Duration,
        min_refetch: Duration,
    ) -> Arc<RemoteKeys> {
        let options = FetchOptions {
            min_refetch_interval: min_refetch,
            fetch_timeout: Duration::from_secs(5),
        };
        Arc::new(RemoteKeys::new(source.clone(), refresh, options))
    }

    #[tokio::test]
    async fn callers_during_the_start_fetch_wait_for_it() {
        let source = FakeSource::new(&["ES256"], jwks(&[ec_a().jwk("a")]));
        source.delay(Duration::from_millis(200));
        let keys = remote(&source, HOUR, Duration::ZERO);
        let _fetcher = KeyFetcher::start(&keys).unwrap();
        assert!(keys.refetch_for_kid("a").await);
        assert_eq!(source.fetches(), 1, "the caller fetched too");
        assert!(keys.is_loaded());
    }

    #[tokio::test]
    async fn the_start_fetch_does_not_use_the_refetch_allowance() {
        let source = FakeSource::new(&["ES256"], jwks(&[ec_a().jwk("a")]));
        let keys = remote(&source, HOUR, HOUR);
        let _fetcher = KeyFetcher::start(&keys).unwrap();
        wait_until("start fetch", || keys.is_loaded()).await;

        // Published after start: fetched on first use.
        source.serve(jwks(&[ec_a().jwk("a"), ec_b().jwk("b")]));
        assert!(keys.refetch_for_kid("b").await);
        assert_eq!(source.fetches(), 2);

        // The allowance is spent for this interval: c is unknown, no fetch.
        source.serve(jwks(&[ec_c().jwk("c")]));
        assert!(!keys.refetch_for_kid("c").await);
        assert_eq!(source.fetches(), 2);
        assert!(keys.current().has_kid("b"));
    }

    /// The fetch under way when the request comes began before the key was
    /// published: the request still gets a refetch of its own after it.
    #[tokio::test]
    async fn a_key_published_during_a_fetch_is_fetched_after_it() {
        let source = FakeSource::new(&["ES256"], jwks(&[ec_a().jwk("a")]));
        source.hold();
        let keys = remote(&source, HOUR, HOUR);
        let _fetcher = KeyFetcher::start(&keys).unwrap();
        wait_until("the start fetch under way", || source.fetches() == 1).await;
        source.serve(jwks(&[ec_a().jwk("a"), ec_b().jwk("b")]));

        let caller = tokio::spawn({
            let keys = keys.clone();
            async move { keys.refetch_for_kid("b").await }
        });
        // On this single-threaded runtime one yield runs the caller up to
        // its first wait, for the lock the start fetch holds.
        tokio::task::yield_now().await;
        source.release();
        assert!(caller.await.unwrap(), "b is known after the refetch");
        assert_eq!(source.fetches(), 2);
        assert!(keys.current().has_kid("b"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_unknown_kids_share_one_refetch() {
        let source = FakeSource::new(&["ES256"], jwks(&[ec_a().jwk("a")]));
        let keys = remote(&source, HOUR, HOUR);
        let _fetcher = KeyFetcher::start(&keys).unwrap();
        wait_until("start fetch", || keys.is_loaded()).await;

        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let keys = keys.clone();
                tokio::spawn(async move { keys.refetch_for_kid(&format!("unknown-{i}")).await })
            })
            .collect();
        for t in tasks {
            assert!(!t.await.unwrap());
        }
        assert_eq!(source.fetches(), 2, "one start fetch + at most one refetch");
    }

    #[tokio::test]
    async fn an_unreachable_jwks_costs_an_unknown_kid_two_seconds_not_the_fetch_timeout() {
        let source = FakeSource::new(&["ES256"], jwks(&[ec_a().jwk("a")]));
        let keys = remote(&source, HOUR, Duration::ZERO);
        source.delay(Duration::from_secs(5));
        let started = Instant::now();
        let waits: Vec<_> = (0..20)
            .map(|i| {
                let keys = keys.clone();
                tokio::spawn(async move { keys.refetch_for_kid(&format!("k{i}")).await })
            })
            .collect();
        for wait in waits {
            assert!(!wait.await.unwrap());
        }
        let waited = started.elapsed();
        assert!(
            waited >= UNKNOWN_KID_WAIT && waited < UNKNOWN_KID_WAIT + Duration::from_secs(2),
            "waited {waited:?}"
        );
        assert_eq!(source.fetches(), 1, "twenty callers, one fetch under way");
    }

    #[tokio::test]
    async fn failed_refreshes_keep_the_last_good_set() {
        let source = FakeSource::new(&["ES256"], jwks(&[ec_a().jwk("a")]));
        let keys = remote(&source, Duration::from_millis(20), Duration::ZERO);
        let _fetcher = KeyFetcher::start(&keys).unwrap();
        wait_until("start fetch", || keys.is_loaded()).await;

        source.fail("status 500");
        let seen = source.fetches();
        wait_until("two failed refreshes", || source.fetches() >= seen + 2).await;
        source.serve(b"<html>maintenance</html>".to_vec());
        let seen = source.fetches();
        wait_until("a non-JWKS refresh", || source.fetches() > seen).await;
        assert!(keys.current().has_kid("a"));
    }

    #[tokio::test]
    async fn a_fetch_that_takes_too_long_fails() {
        let source = FakeSource::new(&["ES256"], jwks(&[ec_a().jwk("a")]));
        source.delay(Duration::from_secs(5));
        let options = FetchOptions {
            min_refetch_interval: Duration::ZERO,
            fetch_timeout: Duration::from_millis(50),
        };
        let keys = Arc::new(RemoteKeys::new(source.clone(), HOUR, options));
        assert!(!keys.refetch_for_kid("a").await);
        assert!(!keys.is_loaded());
        assert!(keys.current().is_empty());
    }

    #[tokio::test]
    async fn dropping_the_fetcher_stops_its_task() {
        let source = FakeSource::new(&["ES256"], jwks(&[ec_a().jwk("a")]));
        let keys = remote(&source, Duration::from_millis(20), HOUR);
        let fetcher = KeyFetcher::start(&keys).unwrap();
        wait_until("two fetches", || source.fetches() >= 2).await;
        drop(fetcher);
        // One fetch may have been under way.
        let seen = source.fetches() + 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(source.fetches() <= seen, "still fetching after the drop");
    }

    #[test]
    fn a_fetcher_needs_no_runtime_where_it_starts() {
        let source = FakeSource::new(&["ES256"], jwks(&[ec_a().jwk("a")]));
        let keys = remote(&source, HOUR, HOUR);
        let _fetcher = KeyFetcher::start(&keys).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !keys.is_loaded() {
            assert!(Instant::now() < deadline, "no start fetch");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(keys.current().has_kid("a"));
    }
}

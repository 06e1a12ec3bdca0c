//! Tokens a worker thread verified lately. A client sends the same token
//! with every request until it expires, and verifying it again (jsonwebtoken
//! parses the header three times and the claims twice, and sets the key up
//! per call) cost more than the rest of a protected route's work. Envoy's
//! jwt_authn keeps the same kind of cache.
//!
//! Only successes are cached, keyed by the whole token; a hit checks `exp`
//! against the clock again; an entry lives at most [`VERIFIED_CACHE_TTL`].
//! An entry is stale at once when the fetched key set it was verified under
//! is replaced (a key rotated out), and a verifier built by a reload never
//! sees its predecessor's entries. Per thread, so a lookup takes no lock.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::keys::KeySet;
use super::remote::RemoteKeys;
use super::verified::VerifiedToken;

/// How long a verified token is served from the cache before it is verified
/// again: bounds how long a key removed from a JWKS is still honoured.
const VERIFIED_CACHE_TTL: Duration = Duration::from_secs(60);
/// Tokens cached per worker thread; a full cache is emptied, not scanned.
const VERIFIED_CACHE_ENTRIES: usize = 4096;

struct CachedToken {
    token: VerifiedToken,
    exp: u64,
    verified_at: Instant,
    /// The fetched key set at verification time: a refresh that replaces it
    /// (a key rotated out) makes the entry stale at once.
    remote_keys: Option<Arc<KeySet>>,
}

#[derive(Default)]
struct VerifiedCache {
    /// The [`TokenCache::id`] the entries belong to.
    verifier: u64,
    entries: HashMap<Box<str>, CachedToken>,
}

thread_local! {
    static VERIFIED: RefCell<VerifiedCache> = RefCell::default();
}

static NEXT_VERIFIER_ID: AtomicU64 = AtomicU64::new(1);

/// One verifier's view of the per-thread cache.
pub(super) struct TokenCache {
    /// Tells this verifier's entries from those of the verifier a reload
    /// replaced: a thread holds one verifier's entries at a time.
    id: u64,
    leeway_secs: u64,
}

impl TokenCache {
    pub(super) fn new(leeway_secs: u64) -> TokenCache {
        TokenCache {
            id: NEXT_VERIFIER_ID.fetch_add(1, Ordering::Relaxed),
            leeway_secs,
        }
    }

    /// A token this thread verified within the last minute, under the key
    /// set `remote` holds now, and that has not expired since.
    pub(super) fn get(&self, token: &str, remote: Option<&RemoteKeys>) -> Option<VerifiedToken> {
        VERIFIED.with_borrow_mut(|cache| {
            if cache.verifier != self.id {
                return None;
            }
            let entry = cache.entries.get(token)?;
            let same_keys = match (remote, &entry.remote_keys) {
                (Some(remote), Some(keys)) => Arc::ptr_eq(&remote.current(), keys),
                (None, None) => true,
                _ => false,
            };
            let fresh = same_keys
                && entry.verified_at.elapsed() < VERIFIED_CACHE_TTL
                && entry.exp.saturating_add(self.leeway_secs)
                    >= jsonwebtoken::get_current_timestamp();
            if fresh {
                return Some(entry.token.clone());
            }
            cache.entries.remove(token);
            None
        })
    }

    /// Caches `verified`, verified under the fetched set `remote_keys`.
    pub(super) fn put(
        &self,
        token: &str,
        verified: &VerifiedToken,
        remote_keys: Option<Arc<KeySet>>,
    ) {
        // Verified tokens always carry an integer `exp` (it is required).
        let Some(exp) = verified.claims.get("exp").and_then(Value::as_u64) else {
            return;
        };
        VERIFIED.with_borrow_mut(|cache| {
            if cache.verifier != self.id || cache.entries.len() >= VERIFIED_CACHE_ENTRIES {
                cache.entries.clear();
                cache.verifier = self.id;
            }
            cache.entries.insert(
                token.into(),
                CachedToken {
                    token: verified.clone(),
                    exp,
                    verified_at: Instant::now(),
                    remote_keys,
                },
            );
        });
    }
}

/// Whether this thread's cache holds `token`, fresh or not.
#[cfg(test)]
pub(super) fn holds(token: &str) -> bool {
    VERIFIED.with_borrow(|c| c.entries.contains_key(token))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::policy::jwt::remote::FetchOptions;
    use crate::policy::jwt::test_support::*;

    fn token(exp: i64) -> VerifiedToken {
        VerifiedToken {
            claims: Arc::new(
                serde_json::json!({ "sub": "alice", "exp": exp })
                    .as_object()
                    .unwrap()
                    .clone(),
            ),
        }
    }

    #[test]
    fn a_put_token_is_got_back() {
        let cache = TokenCache::new(30);
        let t = token(now() + 300);
        assert!(cache.get("a.b.c", None).is_none());
        cache.put("a.b.c", &t, None);
        assert_eq!(cache.get("a.b.c", None), Some(t));
        assert!(cache.get("a.b.d", None).is_none());
    }

    #[test]
    fn an_expired_or_old_entry_is_dropped() {
        let cache = TokenCache::new(30);
        // The token's `exp` passed while it sat in the cache.
        cache.put("t", &token(now() - 31), None);
        assert!(cache.get("t", None).is_none());
        assert!(!holds("t"), "a stale entry is dropped");
        // Within leeway: still served.
        cache.put("t", &token(now() - 10), None);
        assert!(cache.get("t", None).is_some());
        // Verified longer ago than the cache's lifetime.
        VERIFIED.with_borrow_mut(|c| {
            let entry = c.entries.get_mut("t").unwrap();
            entry.verified_at = Instant::now()
                .checked_sub(VERIFIED_CACHE_TTL + Duration::from_secs(1))
                .unwrap();
        });
        assert!(cache.get("t", None).is_none());
    }

    #[test]
    fn a_new_verifier_does_not_inherit_the_cache() {
        let old = TokenCache::new(30);
        let t = token(now() + 300);
        old.put("t", &t, None);
        let new = TokenCache::new(30);
        assert!(new.get("t", None).is_none());
        // The new verifier's first entry clears the old one's.
        new.put("u", &t, None);
        assert!(!holds("t"));
    }

    #[tokio::test]
    async fn a_replaced_key_set_makes_its_entries_stale() {
        let source = FakeSource::new(&["ES256"], jwks(&[ec_a().jwk("a")]));
        let remote = RemoteKeys::new(
            source.clone(),
            Duration::from_secs(3600),
            FetchOptions {
                min_refetch_interval: Duration::ZERO,
                ..FetchOptions::default()
            },
        );
        let remote = std::sync::Arc::new(remote);
        assert!(remote.refetch_for_kid("a").await);
        let cache = TokenCache::new(30);
        let t = token(now() + 300);
        cache.put("t", &t, Some(remote.current_full()));
        assert!(cache.get("t", Some(&remote)).is_some());
        // An entry verified without fetched keys is not one verified with them.
        assert!(cache.get("t", None).is_none());
        cache.put("t", &t, Some(remote.current_full()));
        // A fetch replaces the set, even with the same keys in it.
        assert!(!remote.refetch_for_kid("b").await);
        assert!(cache.get("t", Some(&remote)).is_none());
    }
}

//! Short-lived memory of store lookups every request makes: which version a policy name points at, the parsed
//! policy of a version, and which API key a secret belongs to.
//!
//! Without it each `/v1/classify` asked the store two or three times before doing any work, each a round trip to
//! SQLite's worker thread or to PostgreSQL: most of what the server added to a fast backend's latency. Versions
//! are immutable (the id is the body's hash), so they are kept until evicted. Name pins and keys can change from
//! elsewhere (another server on the same database, `safeguard keys revoke`), so they are trusted only for
//! `ttl`; changes made through this server forget the entry at once.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use safeguard_policy::Policy;

use crate::auth::Caller;

/// A bounded map whose entries expire `ttl` after they were stored.
pub(crate) struct TtlCache<K, V> {
    ttl: Duration,
    capacity: usize,
    entries: Mutex<HashMap<K, (V, Instant)>>,
}

impl<K: Eq + Hash + Clone, V: Clone> TtlCache<K, V> {
    /// `ttl` zero: nothing is remembered, every lookup goes to the store.
    pub(crate) fn new(ttl: Duration, capacity: usize) -> Self {
        TtlCache { ttl, capacity: capacity.max(1), entries: Mutex::new(HashMap::new()) }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<K, (V, Instant)>> {
        // A panic while holding the lock leaves a map that is still consistent: every operation is one call.
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if self.ttl.is_zero() {
            return None;
        }
        let mut entries = self.entries();
        match entries.get(key) {
            Some((value, stored)) if stored.elapsed() < self.ttl => Some(value.clone()),
            Some(_) => {
                entries.remove(key);
                None
            }
            None => None,
        }
    }

    pub(crate) fn put(&self, key: K, value: V) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.entries();
        if entries.len() >= self.capacity && !entries.contains_key(&key) {
            let ttl = self.ttl;
            entries.retain(|_, (_, stored)| stored.elapsed() < ttl);
            // Still full of live entries: a burst of distinct keys. Starting over costs one lookup each.
            if entries.len() >= self.capacity {
                entries.clear();
            }
        }
        entries.insert(key, (value, Instant::now()));
    }

    pub(crate) fn forget<Q>(&self, key: &Q)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries().remove(key);
    }
}

/// The lookups a request makes before any work, remembered across requests.
pub(crate) struct Lookups {
    /// Parsed policy versions by hash. Immutable, so they never go stale.
    pub(crate) versions: TtlCache<String, Policy>,
    /// Policy name → the hash its pin pointed at.
    pub(crate) active: TtlCache<String, String>,
    /// `hash_api_key(secret)` → the caller. Keyed by hash so no secret outlives its request.
    pub(crate) keys: TtlCache<String, Caller>,
}

impl Lookups {
    pub(crate) fn new(ttl: Duration) -> Self {
        Lookups {
            versions: TtlCache::new(Duration::MAX, 4096),
            active: TtlCache::new(ttl, 4096),
            keys: TtlCache::new(ttl, 4096),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_after_ttl() {
        let cache = TtlCache::new(Duration::from_millis(30), 8);
        cache.put("a".to_string(), 1);
        assert_eq!(cache.get(&"a".to_string()), Some(1));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(cache.get(&"a".to_string()), None);
    }

    #[test]
    fn zero_ttl_remembers_nothing() {
        let cache = TtlCache::new(Duration::ZERO, 8);
        cache.put("a".to_string(), 1);
        assert_eq!(cache.get(&"a".to_string()), None);
    }

    #[test]
    fn stays_within_capacity_and_forgets_on_request() {
        let cache = TtlCache::new(Duration::from_secs(60), 3);
        for i in 0..10 {
            cache.put(i, i * 10);
            assert!(cache.entries().len() <= 3);
        }
        assert_eq!(cache.get(&9), Some(90), "the newest entry survives eviction");
        cache.forget(&9);
        assert_eq!(cache.get(&9), None);
    }
}

//! Short-lived memory of store lookups every request makes: which version a policy name points at, the parsed
//! policy of a version, and which API key a secret belongs to.
//!
//! Without it each `/v1/classify` asked the store two or three times before doing any work, each a round trip to
//! SQLite's worker thread or to PostgreSQL: most of what the server added to a fast backend's latency. Versions
//! are immutable (the id is the body's hash), but each is read from the store again hourly, the read recording it in
//! use for retention (`safeguard_store::POLICY_USE_RESOLUTION_MS`). Name pins and keys can change from
//! elsewhere (another server on the same database, `safeguard keys revoke`), so they are trusted only for
//! `ttl`; changes made through this server forget the entry at once.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use safeguard_policy::Policy;

use crate::auth::Caller;

/// A bounded map whose entries expire `ttl` after they were stored, and which holds at most `capacity` entries
/// weighing at most `max_weight` together (by `weigh`; every entry weighs 1 unless told otherwise).
pub(crate) struct TtlCache<K, V> {
    ttl: Duration,
    capacity: usize,
    max_weight: usize,
    weigh: fn(&V) -> usize,
    entries: Mutex<Entries<K, V>>,
}

struct Entries<K, V> {
    map: HashMap<K, Entry<V>>,
    weight: usize,
}

struct Entry<V> {
    value: V,
    stored: Instant,
    weight: usize,
}

impl<K: Eq + Hash + Clone, V: Clone> TtlCache<K, V> {
    /// `ttl` zero: nothing is remembered, every lookup goes to the store.
    pub(crate) fn new(ttl: Duration, capacity: usize) -> Self {
        Self::weighed(ttl, capacity, usize::MAX, |_| 1)
    }

    /// A cache whose values differ much in size: bounded by their total `weigh`, too. A value heavier than
    /// `max_weight` on its own is not kept.
    pub(crate) fn weighed(ttl: Duration, capacity: usize, max_weight: usize, weigh: fn(&V) -> usize) -> Self {
        TtlCache {
            ttl,
            capacity: capacity.max(1),
            max_weight,
            weigh,
            entries: Mutex::new(Entries { map: HashMap::new(), weight: 0 }),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Entries<K, V>> {
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
        match entries.map.get(key) {
            Some(entry) if entry.stored.elapsed() < self.ttl => Some(entry.value.clone()),
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
        let weight = (self.weigh)(&value);
        if weight > self.max_weight {
            return;
        }
        let mut entries = self.entries();
        entries.remove(&key);
        let fits = |entries: &Entries<K, V>| {
            entries.map.len() < self.capacity && entries.weight.saturating_add(weight) <= self.max_weight
        };
        if !fits(&entries) {
            let ttl = self.ttl;
            let expired: Vec<K> =
                entries.map.iter().filter(|(_, entry)| entry.stored.elapsed() >= ttl).map(|(k, _)| k.clone()).collect();
            for key in &expired {
                entries.remove(key);
            }
        }
        if !fits(&entries) {
            // Still full of live entries: a burst of distinct keys. The oldest go first, so that a flood of one-off
            // values (inline policies) passes through without taking every long-lived entry with it at once.
            let mut by_age: Vec<(Instant, K)> =
                entries.map.iter().map(|(key, entry)| (entry.stored, key.clone())).collect();
            by_age.sort_unstable_by_key(|(stored, _)| *stored);
            for (_, key) in by_age {
                if fits(&entries) {
                    break;
                }
                entries.remove(&key);
            }
        }
        entries.weight += weight;
        entries.map.insert(key, Entry { value, stored: Instant::now(), weight });
    }

    pub(crate) fn forget<Q>(&self, key: &Q)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries().remove(key);
    }
}

impl<K: Eq + Hash, V> Entries<K, V> {
    fn remove<Q>(&mut self, key: &Q)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some(entry) = self.map.remove(key) {
            self.weight -= entry.weight;
        }
    }
}

/// Versions never change, but each is read from the store again this often: the read records that the version is
/// in use, which is what keeps retention from pruning a version this server may name in its next decision.
const VERSIONS_TTL: Duration = Duration::from_millis(safeguard_store::POLICY_USE_RESOLUTION_MS as u64);

/// Memory the parsed policies named by requests may hold: room for a thousand policies of 100 KiB.
const VERSIONS_MAX_BYTES: usize = 256 << 20;
/// Memory the parsed inline policies may hold: room for the hundreds of distinct ones a deployment that sends its
/// policies inline uses.
const INLINE_MAX_BYTES: usize = 64 << 20;

/// The lookups a request makes before any work, remembered across requests.
pub(crate) struct Lookups {
    /// Parsed policy versions by hash, as requests that name a policy or a version reach them. Immutable, so
    /// they never go stale; kept for `VERSIONS_TTL`.
    pub(crate) versions: TtlCache<String, Policy>,
    /// Parsed versions clients sent inline, apart from `versions`: every client with the classify scope may send
    /// new ones, each up to a megabyte, and a flood of them must neither hold unbounded memory nor push out the
    /// versions every request names.
    pub(crate) inline: TtlCache<String, Policy>,
    /// Versions recorded in use lately (`Store::touch_policy`), so that the record is written at most every half
    /// hour per version, not on every lookup that misses a cache.
    pub(crate) touched: TtlCache<String, ()>,
    /// Policy name → the hash its pin pointed at.
    pub(crate) active: TtlCache<String, String>,
    /// `hash_api_key(secret)` → the caller. Keyed by hash so no secret outlives its request.
    pub(crate) keys: TtlCache<String, Caller>,
}

impl Lookups {
    pub(crate) fn new(ttl: Duration) -> Self {
        Lookups {
            versions: TtlCache::weighed(VERSIONS_TTL, 4096, VERSIONS_MAX_BYTES, Policy::approx_heap_bytes),
            inline: TtlCache::weighed(VERSIONS_TTL, 1024, INLINE_MAX_BYTES, Policy::approx_heap_bytes),
            touched: TtlCache::new(VERSIONS_TTL / 2, 65_536),
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
            assert!(cache.entries().map.len() <= 3);
        }
        assert_eq!(cache.get(&9), Some(90), "the newest entry survives eviction");
        assert_eq!(cache.get(&8), Some(80), "only as many as must go are evicted");
        cache.forget(&9);
        assert_eq!(cache.get(&9), None);
    }

    #[test]
    fn stays_within_its_weight_oldest_first() {
        let cache: TtlCache<u32, Vec<u8>> = TtlCache::weighed(Duration::from_secs(60), 100, 10, Vec::len);
        cache.put(1, vec![0; 4]);
        std::thread::sleep(Duration::from_millis(2));
        cache.put(2, vec![0; 4]);
        std::thread::sleep(Duration::from_millis(2));
        cache.put(3, vec![0; 4]);
        assert_eq!(cache.entries().weight, 8, "the first entry went to make room");
        assert_eq!((cache.get(&1), cache.get(&2).map(|v| v.len())), (None, Some(4)));
        cache.put(4, vec![0; 11]);
        assert_eq!(cache.get(&4), None, "a value heavier than the whole cache is not kept");
        cache.put(3, vec![0; 1]);
        assert_eq!(cache.entries().weight, 5, "replacing an entry replaces its weight");
        cache.forget(&2);
        assert_eq!(cache.entries().weight, 1);
    }
}

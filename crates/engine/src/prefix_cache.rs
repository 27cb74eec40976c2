//! A byte-bounded LRU keyed by exact prefix tokens. Values are opaque (llama.cpp sequence states in practice).

use std::collections::HashMap;
use std::sync::Arc;

use crate::PrefixCacheStats;

struct Entry<V> {
    value: Arc<V>,
    bytes: usize,
    last_used: u64,
}

pub struct PrefixCache<V> {
    budget_bytes: usize,
    entries: HashMap<Vec<u32>, Entry<V>>,
    bytes: usize,
    clock: u64,
    hits: u64,
    misses: u64,
    evictions: u64,
}

impl<V> PrefixCache<V> {
    pub fn new(budget_bytes: usize) -> Self {
        PrefixCache { budget_bytes, entries: HashMap::new(), bytes: 0, clock: 0, hits: 0, misses: 0, evictions: 0 }
    }

    /// Looks a prefix up, counting the hit or miss and refreshing its recency.
    pub fn get(&mut self, prefix: &[u32]) -> Option<Arc<V>> {
        self.clock += 1;
        match self.entries.get_mut(prefix) {
            Some(entry) => {
                entry.last_used = self.clock;
                self.hits += 1;
                Some(Arc::clone(&entry.value))
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// Stores a state, evicting the least recently used ones to stay within budget.
    /// Returns false when the state alone is larger than the whole budget (it is then not kept).
    pub fn insert(&mut self, prefix: Vec<u32>, value: Arc<V>, bytes: usize) -> bool {
        if bytes > self.budget_bytes {
            return false;
        }
        self.clock += 1;
        if let Some(old) = self.entries.remove(&prefix) {
            self.bytes -= old.bytes;
        }
        while self.bytes + bytes > self.budget_bytes {
            let Some(oldest) = self.entries.iter().min_by_key(|(_, e)| e.last_used).map(|(k, _)| k.clone()) else {
                break;
            };
            if let Some(evicted) = self.entries.remove(&oldest) {
                self.bytes -= evicted.bytes;
                self.evictions += 1;
            }
        }
        self.bytes += bytes;
        self.entries.insert(prefix, Entry { value, bytes, last_used: self.clock });
        true
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    pub fn stats(&self) -> PrefixCacheStats {
        PrefixCacheStats {
            entries: self.entries.len(),
            bytes: self.bytes,
            hits: self.hits,
            misses: self.misses,
            evictions: self.evictions,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_after_insert_and_miss_for_a_different_prefix() {
        let mut cache = PrefixCache::new(100);
        assert!(cache.get(&[1, 2]).is_none());
        assert!(cache.insert(vec![1, 2], Arc::new("a"), 10));
        assert_eq!(*cache.get(&[1, 2]).unwrap(), "a");
        assert!(cache.get(&[1, 2, 3]).is_none());
        assert!(cache.get(&[1]).is_none());
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses, stats.entries, stats.bytes), (1, 3, 1, 10));
    }

    #[test]
    fn evicts_least_recently_used_to_stay_within_budget() {
        let mut cache = PrefixCache::new(25);
        cache.insert(vec![1], Arc::new(1), 10);
        cache.insert(vec![2], Arc::new(2), 10);
        cache.get(&[1]); // 2 is now the oldest
        cache.insert(vec![3], Arc::new(3), 10);
        assert!(cache.get(&[2]).is_none());
        assert!(cache.get(&[1]).is_some());
        assert!(cache.get(&[3]).is_some());
        assert_eq!(cache.stats().bytes, 20);
        assert_eq!(cache.stats().evictions, 1);
    }

    #[test]
    fn refuses_states_larger_than_the_budget_and_replaces_same_key() {
        let mut cache = PrefixCache::new(10);
        assert!(!cache.insert(vec![1], Arc::new(1), 11));
        assert_eq!(cache.stats().entries, 0);
        assert!(cache.insert(vec![1], Arc::new(1), 6));
        assert!(cache.insert(vec![1], Arc::new(2), 8));
        assert_eq!(cache.stats().bytes, 8);
        assert_eq!(*cache.get(&[1]).unwrap(), 2);
        let mut disabled = PrefixCache::new(0);
        assert!(!disabled.insert(vec![1], Arc::new(1), 1));
    }
}

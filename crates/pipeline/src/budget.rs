//! Token buckets for reasoning calls and for the tokens they spend: over budget, work waits instead of being
//! dropped or allowed.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Reasoning prompts per second, with a burst allowance.
#[derive(Debug)]
pub struct ReasoningBudget {
    rate_per_sec: f64,
    burst: f64,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled_at: Instant,
}

impl ReasoningBudget {
    pub fn new(rate_per_sec: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate_per_sec: rate_per_sec.max(f64::MIN_POSITIVE),
            burst,
            state: Mutex::new(Bucket { tokens: burst, refilled_at: Instant::now() }),
        }
    }

    /// Takes `n` calls' worth of budget, or says how long until it may. Every call is paid for, but admission
    /// needs only `min(n, burst)` in the bucket, so an item with more policies than the burst is not starved
    /// forever: it takes the rest as debt, which the items after it wait out. `n = 0` only checks that the bucket
    /// is not in debt (how the token budget admits an item before anyone knows what it will spend).
    pub fn try_take(&self, n: usize) -> Result<(), Duration> {
        self.try_take_at(n, Instant::now())
    }

    /// Takes `n` calls' worth of budget now, in debt if need be. For work an item already started (its
    /// escalation): deferring it would throw away the reasoning already paid for, and retrying would pay again.
    pub fn take_owed(&self, n: usize) {
        let mut bucket = self.refilled(Instant::now());
        bucket.tokens -= n as f64;
    }

    fn try_take_at(&self, n: usize, now: Instant) -> Result<(), Duration> {
        let mut bucket = self.refilled(now);
        let admit = (n as f64).min(self.burst);
        if bucket.tokens >= admit {
            bucket.tokens -= n as f64;
            Ok(())
        } else {
            // A rate so low that the wait overflows a Duration waits "forever" rather than panicking.
            Err(Duration::try_from_secs_f64((admit - bucket.tokens) / self.rate_per_sec).unwrap_or(Duration::MAX))
        }
    }

    fn refilled(&self, now: Instant) -> std::sync::MutexGuard<'_, Bucket> {
        let mut bucket = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(bucket.refilled_at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate_per_sec).min(self.burst);
        bucket.refilled_at = now;
        bucket
    }

    /// Calls available right now (rounded down), for the queue-depth view.
    pub fn available(&self) -> usize {
        let bucket = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = bucket.refilled_at.elapsed().as_secs_f64();
        (bucket.tokens + elapsed * self.rate_per_sec).min(self.burst) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spends_the_burst_then_refills_at_the_rate() {
        let budget = ReasoningBudget::new(2.0, 3);
        let t0 = Instant::now();
        assert!(budget.try_take_at(2, t0).is_ok());
        assert!(budget.try_take_at(1, t0).is_ok());
        let wait = budget.try_take_at(1, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        assert!(budget.try_take_at(1, t0 + Duration::from_millis(500)).is_ok());
    }

    #[test]
    fn a_request_larger_than_the_burst_is_admitted_when_full_and_pays_in_full() {
        let budget = ReasoningBudget::new(1.0, 2);
        let t0 = Instant::now();
        assert!(budget.try_take_at(5, t0).is_ok());
        // Five calls were made on a two-call bucket: three are owed, then the next needs its two.
        let wait = budget.try_take_at(1, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 4.0).abs() < 1e-6, "{wait:?}");
        assert!(budget.try_take_at(5, t0 + Duration::from_secs(4)).is_err());
        assert!(budget.try_take_at(5, t0 + Duration::from_secs(5)).is_ok());
    }

    #[test]
    fn owed_calls_are_always_granted_and_delay_the_next_item() {
        let budget = ReasoningBudget::new(2.0, 2);
        let t0 = Instant::now();
        assert!(budget.try_take_at(2, t0).is_ok());
        budget.take_owed(3);
        let wait = budget.try_take_at(1, Instant::now()).unwrap_err();
        assert!(wait > Duration::from_millis(1900), "three owed calls plus one at 2/s: {wait:?}");
    }
}

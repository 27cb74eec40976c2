//! A token bucket for reasoning calls: over budget, work waits instead of being dropped or allowed.

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

    /// Takes `n` calls' worth of budget, or says how long until that much is available.
    /// Asking for more than the burst is capped at the burst, so one large item is never starved forever.
    pub fn try_take(&self, n: usize) -> Result<(), Duration> {
        self.try_take_at(n, Instant::now())
    }

    fn try_take_at(&self, n: usize, now: Instant) -> Result<(), Duration> {
        let mut bucket = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(bucket.refilled_at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate_per_sec).min(self.burst);
        bucket.refilled_at = now;
        let need = (n as f64).min(self.burst);
        if bucket.tokens >= need {
            bucket.tokens -= need;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((need - bucket.tokens) / self.rate_per_sec))
        }
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
    fn a_request_larger_than_the_burst_is_served_once_the_bucket_is_full() {
        let budget = ReasoningBudget::new(1.0, 2);
        let t0 = Instant::now();
        assert!(budget.try_take_at(5, t0).is_ok());
        assert!(budget.try_take_at(5, t0).is_err());
        assert!(budget.try_take_at(5, t0 + Duration::from_secs(2)).is_ok());
    }
}

//! A circuit breaker per endpoint: stop sending work to a server that keeps failing, probe it again later.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    /// Refusing requests until the cooldown ends.
    Open,
    /// The cooldown ended; one probe request decides whether to close again.
    HalfOpen,
}

#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    consecutive_failures: u32,
    opened_at: Option<Instant>,
    probe_in_flight: bool,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self { threshold: threshold.max(1), cooldown, consecutive_failures: 0, opened_at: None, probe_in_flight: false }
    }

    pub fn state(&self, now: Instant) -> BreakerState {
        match self.opened_at {
            None => BreakerState::Closed,
            Some(at) if now.duration_since(at) < self.cooldown => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// Whether a request may go out now. In half-open state only one probe is let through at a time.
    pub fn try_acquire(&mut self, now: Instant) -> bool {
        match self.state(now) {
            BreakerState::Closed => true,
            BreakerState::Open => false,
            BreakerState::HalfOpen if self.probe_in_flight => false,
            BreakerState::HalfOpen => {
                self.probe_in_flight = true;
                true
            }
        }
    }

    pub fn on_success(&mut self) {
        self.consecutive_failures = 0;
        self.opened_at = None;
        self.probe_in_flight = false;
    }

    /// The request that took the probe slot was given up before it finished: it says nothing about the
    /// server, but the next request must be free to probe.
    pub fn on_abandoned(&mut self) {
        self.probe_in_flight = false;
    }

    pub fn on_failure(&mut self, now: Instant) {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let failed_probe = self.probe_in_flight;
        self.probe_in_flight = false;
        if failed_probe || self.consecutive_failures >= self.threshold {
            self.opened_at = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_probes_after_cooldown_and_recloses() {
        let t0 = Instant::now();
        let mut b = Breaker::new(3, Duration::from_secs(10));
        for _ in 0..2 {
            assert!(b.try_acquire(t0));
            b.on_failure(t0);
        }
        assert_eq!(b.state(t0), BreakerState::Closed);
        b.on_failure(t0);
        assert_eq!(b.state(t0), BreakerState::Open);
        assert!(!b.try_acquire(t0 + Duration::from_secs(5)));

        let later = t0 + Duration::from_secs(11);
        assert!(b.try_acquire(later), "one probe after the cooldown");
        assert!(!b.try_acquire(later), "only one probe at a time");
        b.on_success();
        assert_eq!(b.state(later), BreakerState::Closed);
    }

    #[test]
    fn an_abandoned_probe_frees_the_slot_without_closing() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, Duration::from_secs(1));
        b.on_failure(t0);
        let later = t0 + Duration::from_secs(2);
        assert!(b.try_acquire(later));
        b.on_abandoned();
        assert_eq!(b.state(later), BreakerState::HalfOpen);
        assert!(b.try_acquire(later), "the next request may probe");
    }

    #[test]
    fn a_failed_probe_reopens_at_once() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, Duration::from_secs(1));
        b.on_failure(t0);
        let later = t0 + Duration::from_secs(2);
        assert!(b.try_acquire(later));
        b.on_failure(later);
        assert_eq!(b.state(later), BreakerState::Open);
    }
}

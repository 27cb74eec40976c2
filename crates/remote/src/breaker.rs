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

/// The breaker's leave for one request to go out, handed back when the request ends. Only the request that took
/// the probe slot may free it or decide the half-open breaker: a request sent while the breaker was closed that
/// ends after it opened says nothing about the server as it is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ticket {
    /// Sent while the breaker was closed.
    Regular,
    /// The one request let through a half-open breaker.
    Probe,
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

    /// Whether a request may go out now, and as what. In half-open state only one probe is let through at a time.
    pub fn try_acquire(&mut self, now: Instant) -> Option<Ticket> {
        match self.state(now) {
            BreakerState::Closed => Some(Ticket::Regular),
            BreakerState::Open => None,
            BreakerState::HalfOpen if self.probe_in_flight => None,
            BreakerState::HalfOpen => {
                self.probe_in_flight = true;
                Some(Ticket::Probe)
            }
        }
    }

    /// Whether a request that got its leave while the breaker was closed must not go out now: the breaker opened
    /// while it waited (for a connection permit, say). Only the probe goes to a server the breaker gave up on.
    pub fn opened_since(&self, ticket: Ticket) -> bool {
        ticket == Ticket::Regular && self.opened_at.is_some()
    }

    pub fn on_success(&mut self, ticket: Ticket) {
        match ticket {
            Ticket::Probe => {
                self.consecutive_failures = 0;
                self.opened_at = None;
                self.probe_in_flight = false;
            }
            // Once the breaker has opened, only its probe may close it.
            Ticket::Regular if self.opened_at.is_none() => self.consecutive_failures = 0,
            Ticket::Regular => {}
        }
    }

    /// A request given up before it finished: it says nothing about the server, but if it held the probe slot,
    /// the next request must be free to probe.
    pub fn on_abandoned(&mut self, ticket: Ticket) {
        if ticket == Ticket::Probe {
            self.probe_in_flight = false;
        }
    }

    pub fn on_failure(&mut self, ticket: Ticket, now: Instant) {
        match ticket {
            Ticket::Probe => {
                self.probe_in_flight = false;
                self.opened_at = Some(now);
            }
            Ticket::Regular => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                // Already open, the breaker waits for its probe; a late failure must not restart the cooldown.
                if self.opened_at.is_none() && self.consecutive_failures >= self.threshold {
                    self.opened_at = Some(now);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leave_taken_before_the_breaker_opened_is_void_once_it_has() {
        let now = Instant::now();
        let mut breaker = Breaker::new(2, Duration::from_secs(30));
        let waiting = breaker.try_acquire(now).unwrap();
        assert!(!breaker.opened_since(waiting));
        breaker.on_failure(Ticket::Regular, now);
        breaker.on_failure(Ticket::Regular, now);
        assert!(breaker.opened_since(waiting), "opened while it waited");
        let probe = breaker.try_acquire(now + Duration::from_secs(31)).unwrap();
        assert_eq!(probe, Ticket::Probe);
        assert!(!breaker.opened_since(probe), "the probe is what goes out to an open breaker's server");
        assert!(breaker.opened_since(waiting), "half open, only the probe goes");
        breaker.on_success(probe);
        assert!(!breaker.opened_since(waiting), "closed again");
    }

    #[test]
    fn opens_after_threshold_probes_after_cooldown_and_recloses() {
        let t0 = Instant::now();
        let mut b = Breaker::new(3, Duration::from_secs(10));
        for _ in 0..2 {
            assert_eq!(b.try_acquire(t0), Some(Ticket::Regular));
            b.on_failure(Ticket::Regular, t0);
        }
        assert_eq!(b.state(t0), BreakerState::Closed);
        b.on_failure(Ticket::Regular, t0);
        assert_eq!(b.state(t0), BreakerState::Open);
        assert_eq!(b.try_acquire(t0 + Duration::from_secs(5)), None);

        let later = t0 + Duration::from_secs(11);
        assert_eq!(b.try_acquire(later), Some(Ticket::Probe), "one probe after the cooldown");
        assert_eq!(b.try_acquire(later), None, "only one probe at a time");
        b.on_success(Ticket::Probe);
        assert_eq!(b.state(later), BreakerState::Closed);
    }

    #[test]
    fn an_abandoned_probe_frees_the_slot_without_closing() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, Duration::from_secs(1));
        b.on_failure(Ticket::Regular, t0);
        let later = t0 + Duration::from_secs(2);
        let probe = b.try_acquire(later);
        assert_eq!(probe, Some(Ticket::Probe));
        b.on_abandoned(Ticket::Probe);
        assert_eq!(b.state(later), BreakerState::HalfOpen);
        assert_eq!(b.try_acquire(later), Some(Ticket::Probe), "the next request may probe");
    }

    #[test]
    fn a_failed_probe_reopens_at_once() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, Duration::from_secs(1));
        b.on_failure(Ticket::Regular, t0);
        let later = t0 + Duration::from_secs(2);
        assert_eq!(b.try_acquire(later), Some(Ticket::Probe));
        b.on_failure(Ticket::Probe, later);
        assert_eq!(b.state(later), BreakerState::Open);
    }

    /// Requests sent while the breaker was closed and ending after it went half-open neither free the probe's
    /// slot nor decide the breaker: only the probe does.
    #[test]
    fn requests_from_before_the_breaker_opened_leave_the_probe_alone() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, Duration::from_secs(1));
        let old: Vec<Ticket> = (0..3).filter_map(|_| b.try_acquire(t0)).collect();
        assert_eq!(old, [Ticket::Regular; 3]);
        b.on_failure(Ticket::Regular, t0);
        let later = t0 + Duration::from_secs(2);
        assert_eq!(b.try_acquire(later), Some(Ticket::Probe));

        b.on_abandoned(old[0]);
        assert_eq!(b.try_acquire(later), None, "an old request dropped does not free the probe's slot");
        b.on_success(old[1]);
        assert_eq!(b.state(later), BreakerState::HalfOpen, "an old request's success does not close the breaker");
        assert_eq!(b.try_acquire(later), None, "nor free the probe's slot");
        b.on_failure(old[2], later);
        assert_eq!(b.state(later), BreakerState::HalfOpen, "an old request's failure does not restart the cooldown");
        assert_eq!(b.try_acquire(later), None, "nor free the probe's slot");

        b.on_success(Ticket::Probe);
        assert_eq!(b.state(later), BreakerState::Closed, "the probe decides");
        assert_eq!(b.try_acquire(later), Some(Ticket::Regular));
    }
}

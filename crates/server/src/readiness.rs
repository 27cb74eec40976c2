//! `/readyz`: whether this server can do its work, and what it depends on as last seen. The database always
//! counts. The NATS worker (with `--nats`) and the reasoning backends (with `--backend`) are always reported,
//! and count once they have been down for longer than their grace, when one is set: readiness also decides
//! whether HTTP traffic reaches this server, and much of that traffic (triage, reviews, decisions already made)
//! needs neither.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use safeguard_core::EndpointHealth;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::AppState;

/// Since when something this server depends on has been down, read on every probe: a clock reading in an atomic
/// rather than a round trip to what it watches.
pub(crate) struct DownClock {
    epoch: Instant,
    /// When it went down, in milliseconds since `epoch` plus one; 0 while it is up.
    down_since: AtomicU64,
}

impl DownClock {
    /// Down from the start, for what must first get going (the NATS worker connects and sets up its consumer).
    pub(crate) fn down() -> Self {
        Self { epoch: Instant::now(), down_since: AtomicU64::new(1) }
    }

    /// Up from the start, for what is presumed to work until seen failing (the backends, before their first probe).
    pub(crate) fn up() -> Self {
        Self { epoch: Instant::now(), down_since: AtomicU64::new(0) }
    }

    fn now(&self) -> u64 {
        millis(self.epoch.elapsed()).saturating_add(1)
    }

    pub(crate) fn serving(&self) {
        self.down_since.store(0, Ordering::Relaxed);
    }

    /// Keeps the first time: failing again while down has been down since then.
    pub(crate) fn stopped(&self) {
        let _ = self.down_since.compare_exchange(0, self.now(), Ordering::Relaxed, Ordering::Relaxed);
    }

    pub(crate) fn observe(&self, serving: bool) {
        if serving { self.serving() } else { self.stopped() }
    }

    /// How long it has been down; `None` while it is up.
    pub(crate) fn down_for(&self) -> Option<Duration> {
        match self.down_since.load(Ordering::Relaxed) {
            0 => None,
            since => Some(Duration::from_millis(self.now().saturating_sub(since))),
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Whether something down for `down_for` still leaves the server ready: always without a grace.
fn within_grace(down_for: Option<Duration>, grace: Option<Duration>) -> bool {
    match (down_for, grace) {
        (Some(down), Some(grace)) => down <= grace,
        _ => true,
    }
}

/// How many of `endpoints` could take a request now. A half-open breaker counts: it lets the next request through
/// to find out, and a recovered backend with no traffic stays half-open until one comes, so counting it out would
/// keep a server unready (and so without traffic) for good. The cost: a backend that answers its probe but fails
/// every request counts as usable for a moment after each cooldown, so a grace longer than the breaker's cooldown
/// does not fail readiness for it.
pub(crate) fn usable(endpoints: &[EndpointHealth]) -> usize {
    endpoints.iter().filter(|endpoint| endpoint.usable()).count()
}

pub(crate) async fn ready(State(state): State<AppState>) -> Response {
    let db = state.store.ping(Duration::from_secs(2)).await;
    let mut body = json!({"database": db, "model": state.reasoner.model_id()});
    let mut why = Vec::new();
    if !db {
        why.push("the database does not answer".to_string());
    }
    let mut ready = db;
    if state.config.nats.is_some() {
        let down_for = state.nats_health.down_for();
        let grace = state.config.nats_ready_grace;
        body["nats"] = json!({"serving": down_for.is_none(), "down_for_ms": down_for.map(millis)});
        if !within_grace(down_for, grace) {
            why.push(format!(
                "the NATS worker has not been serving for {:.1}s (allowed: {:.1}s); see the server's log",
                down_for.unwrap_or_default().as_secs_f64(),
                grace.unwrap_or_default().as_secs_f64()
            ));
            ready = false;
        }
    }
    if let Some(endpoints) = state.reasoner.backends() {
        let usable = usable(&endpoints);
        // Read here as well as after each probe: a breaker opened by failing requests since counts at once.
        state.backend_health.observe(usable > 0);
        let down_for = state.backend_health.down_for();
        let grace = state.config.backend_ready_grace;
        // Counts only: anyone who reaches the server reads this, and the endpoints' addresses are internal ones.
        // Each endpoint is on /metrics, which can ask for a key.
        body["backends"] = json!({"usable": usable, "total": endpoints.len(), "down_for_ms": down_for.map(millis)});
        if !within_grace(down_for, grace) {
            why.push(format!(
                "no reasoning backend has been usable for {:.1}s (allowed: {:.1}s): items that need the model go \
                 to people meanwhile",
                down_for.unwrap_or_default().as_secs_f64(),
                grace.unwrap_or_default().as_secs_f64()
            ));
            ready = false;
        }
    }
    body["ready"] = json!(ready);
    if !why.is_empty() {
        body["why"] = json!(why);
    }
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(body)).into_response()
}

/// Probes the reasoning backends every `interval` until `stop`, the first time at once: without probes an
/// endpoint that went away stays "answering", and requests keep being routed to it until its breaker opens.
pub(crate) async fn probe_backends(state: AppState, interval: Duration, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = state.reasoner.probe_backends() => {}
        }
        if let Some(endpoints) = state.reasoner.backends() {
            state.backend_health.observe(usable(&endpoints) > 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_is_down_from_its_first_failure_until_it_serves_again() {
        let health = DownClock::down();
        assert!(health.down_for().is_some(), "down until it has started");
        health.serving();
        assert_eq!(health.down_for(), None);
        health.stopped();
        std::thread::sleep(Duration::from_millis(20));
        health.observe(false);
        assert!(health.down_for().is_some_and(|d| d >= Duration::from_millis(20)), "since the first failure");
        health.observe(true);
        assert_eq!(health.down_for(), None);
        assert_eq!(DownClock::up().down_for(), None);
    }

    #[test]
    fn down_counts_against_readiness_only_past_a_grace() {
        let second = Duration::from_secs(1);
        assert!(within_grace(Some(second * 100), None), "without a grace it is only reported");
        assert!(within_grace(None, Some(second)));
        assert!(within_grace(Some(second), Some(second)));
        assert!(!within_grace(Some(second * 2), Some(second)));
    }
}

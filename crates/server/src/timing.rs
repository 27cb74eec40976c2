//! Per-stage durations of one request, sent back in a W3C `Server-Timing` header.
//!
//! Where the service spends its time is otherwise invisible to a client: a slow reply could be the policy
//! lookup, the model, or the commit. Browsers' developer tools show the header, and `safeguard bench server`
//! reads it to split the overhead it measures by stage.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use axum::http::HeaderValue;
use axum::http::header::HeaderName;

pub(crate) const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");

/// Stages in the order they ran, each the time since the previous mark.
pub(crate) struct StageTimer {
    started: Instant,
    last: Instant,
    stages: Vec<(&'static str, Duration)>,
}

impl StageTimer {
    pub(crate) fn start() -> Self {
        let now = Instant::now();
        StageTimer { started: now, last: now, stages: Vec::with_capacity(4) }
    }

    /// Closes the stage that just ran.
    pub(crate) fn mark(&mut self, stage: &'static str) {
        let now = Instant::now();
        self.stages.push((stage, now - self.last));
        self.last = now;
    }

    /// `policy;dur=0.081, reason;dur=1.204, store;dur=0.390, total;dur=1.690`, durations in milliseconds.
    pub(crate) fn header(&self) -> (HeaderName, HeaderValue) {
        let mut value = String::with_capacity(24 * (self.stages.len() + 1));
        for (stage, took) in self.stages.iter().chain([&("total", self.started.elapsed())]) {
            if !value.is_empty() {
                value.push_str(", ");
            }
            let _ = write!(value, "{stage};dur={:.3}", took.as_secs_f64() * 1e3);
        }
        // Stage names are fixed ASCII identifiers and the numbers are digits, so the value is always valid.
        (SERVER_TIMING, HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("total")))
    }
}

/// `Server-Timing` → `(stage, milliseconds)`, skipping entries without a duration.
pub fn parse_server_timing(header: &str) -> Vec<(String, f64)> {
    header
        .split(',')
        .filter_map(|entry| {
            let mut parts = entry.split(';').map(str::trim);
            let name = parts.next().filter(|n| !n.is_empty())?;
            let dur = parts.find_map(|p| p.strip_prefix("dur="))?.parse().ok()?;
            Some((name.to_string(), dur))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_lists_stages_in_order_and_parses_back() {
        let mut timer = StageTimer::start();
        std::thread::sleep(Duration::from_millis(2));
        timer.mark("policy");
        timer.mark("reason");
        let (name, value) = timer.header();
        assert_eq!(name, SERVER_TIMING);
        let parsed = parse_server_timing(value.to_str().unwrap());
        let names: Vec<&str> = parsed.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["policy", "reason", "total"]);
        assert!(parsed[0].1 >= 2.0, "{parsed:?}");
        assert!(parsed[2].1 >= parsed[0].1 + parsed[1].1 - 1e-3, "total covers the stages: {parsed:?}");
    }

    #[test]
    fn parse_skips_entries_without_duration() {
        let parsed = parse_server_timing("cache;desc=hit, db;dur=1.5, ;dur=2, bad;dur=x");
        assert_eq!(parsed, vec![("db".to_string(), 1.5)]);
    }
}

//! Prometheus metrics. The recorder is process-global, so it is installed once and shared by every server
//! started in the process (tests start several).

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use safeguard_core::{PromptObserver, PromptTrace, Usage};
use safeguard_harmony::Effort;
use safeguard_pipeline::Stage;

use serde_json::{Value, json};

use crate::AppState;
use crate::auth::Caller;
use crate::error::ApiError;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Up to ten minutes: a reasoning step may take the whole `--reason-timeout` (300 s by default) on a CPU.
const LATENCY_BUCKETS: [f64; 14] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0, 300.0, 600.0];

pub(crate) fn handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_string()), &LATENCY_BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (an embedding program); then ours just renders empty.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics shows only what it records here");
            }
            handle
        })
        .clone()
}

/// The estimated cost of `billed_tokens` (see [`Usage::billed_tokens`]) at `cost_per_1k_tokens`.
fn price(billed_tokens: u64, cost_per_1k_tokens: f64) -> f64 {
    billed_tokens as f64 / 1000.0 * cost_per_1k_tokens
}

/// Cost and latency per policy and effort, from every prompt the classifier finished, whichever path asked (a
/// direct classification, a cascade step, a job, the NATS stream): what a policy costs to enforce at each effort.
/// Recorded on `/metrics` and kept as totals since start for `GET /v1/stats/prompts`. A prompt holding several
/// policies (combined mode) is labelled with their names joined by `+`; chat completions are labelled `(chat)`.
/// The cost estimate is a running total (a gauge that only grows until a restart).
#[derive(Debug)]
pub(crate) struct PromptMetrics {
    cost_per_1k_tokens: f64,
    totals: Mutex<BTreeMap<(String, String), PromptTotals>>,
}

/// One policy and effort's prompts since start.
#[derive(Debug, Default, Clone)]
struct PromptTotals {
    answered: u64,
    failed: u64,
    uncached_prompt_tokens: u64,
    cached_prompt_tokens: u64,
    completion_tokens: u64,
    latency_sum_secs: f64,
    latency_max_secs: f64,
    /// Answered prompts per [`LATENCY_BUCKETS`] bucket (the last counts those above every bound).
    latency_buckets: [u64; LATENCY_BUCKETS.len() + 1],
}

impl PromptTotals {
    /// The `q` quantile of the latency, as the upper bound of the bucket it falls in (the slowest prompt's
    /// latency where that is lower, or falls past the last bound).
    fn latency_quantile(&self, q: f64) -> Option<f64> {
        let rank = (q * self.answered as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, count) in self.latency_buckets.iter().enumerate() {
            seen += count;
            if seen >= rank {
                let bound = LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY);
                return Some(bound.min(self.latency_max_secs));
            }
        }
        None
    }
}

impl PromptMetrics {
    pub(crate) fn new(cost_per_1k_tokens: f64) -> Self {
        Self { cost_per_1k_tokens: cost_per_1k_tokens.max(0.0), totals: Mutex::default() }
    }

    fn cost_of(&self, billed_tokens: u64) -> f64 {
        price(billed_tokens, self.cost_per_1k_tokens)
    }

    /// Every policy and effort seen since start, most expensive first (by billed tokens).
    pub(crate) fn snapshot(&self) -> Value {
        let totals = self.totals.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut rows: Vec<((String, String), PromptTotals)> = totals.into_iter().collect();
        let billed = |t: &PromptTotals| t.uncached_prompt_tokens + t.completion_tokens;
        rows.sort_by(|a, b| billed(&b.1).cmp(&billed(&a.1)).then_with(|| a.0.cmp(&b.0)));
        let rows: Vec<Value> = rows
            .into_iter()
            .map(|((policy, effort), t)| {
                let answered = t.answered.max(1) as f64;
                json!({
                    "policy": policy,
                    "effort": effort,
                    "prompts": t.answered + t.failed,
                    "failed": t.failed,
                    "tokens": {
                        "prompt": t.uncached_prompt_tokens,
                        "cached_prompt": t.cached_prompt_tokens,
                        "completion": t.completion_tokens,
                        "completion_per_prompt": t.completion_tokens as f64 / answered,
                    },
                    "cost_estimate": self.cost_of(billed(&t)),
                    "cost_per_prompt": self.cost_of(billed(&t)) / answered,
                    "latency_seconds": (t.answered > 0).then(|| json!({
                        "mean": t.latency_sum_secs / answered,
                        "p50": t.latency_quantile(0.5),
                        "p95": t.latency_quantile(0.95),
                        "max": t.latency_max_secs,
                    })),
                })
            })
            .collect();
        json!({"cost_per_1k_tokens": self.cost_per_1k_tokens, "since_start": rows})
    }
}

impl PromptObserver for PromptMetrics {
    fn observe(&self, effort: Effort, prompt: &PromptTrace) {
        // Sorted, so that one set of policies is one series whatever order a request named them in.
        let mut names: Vec<&str> = prompt.policies.iter().map(String::as_str).collect();
        names.sort_unstable();
        let (policy, effort) = (safeguard_core::policy_label(&names.join("+")), effort.to_string());
        let result = if prompt.error.is_some() { "failed" } else { "answered" };
        metrics::counter!("safeguard_prompts_total", "policy" => policy.clone(), "effort" => effort.clone(), "result" => result)
            .increment(1);
        let mut totals = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        let row = totals.entry((policy.clone(), effort.clone())).or_default();
        if prompt.error.is_some() {
            // Nothing came back to measure; the failure is counted above.
            row.failed += 1;
            return;
        }
        let usage = prompt.usage;
        let uncached = usage.uncached_prompt_tokens();
        let latency = prompt.timings.total_ms / 1e3;
        row.answered += 1;
        row.uncached_prompt_tokens += uncached as u64;
        row.cached_prompt_tokens += usage.cached_prompt_tokens as u64;
        row.completion_tokens += usage.completion_tokens as u64;
        row.latency_sum_secs += latency;
        row.latency_max_secs = row.latency_max_secs.max(latency);
        row.latency_buckets[LATENCY_BUCKETS.partition_point(|bound| *bound < latency)] += 1;
        drop(totals);
        for (kind, tokens) in [
            ("prompt", uncached),
            ("cached_prompt", usage.cached_prompt_tokens),
            ("completion", usage.completion_tokens),
        ] {
            metrics::counter!("safeguard_prompt_tokens_total", "policy" => policy.clone(), "effort" => effort.clone(), "kind" => kind)
                .increment(tokens as u64);
        }
        metrics::histogram!("safeguard_prompt_latency_seconds", "policy" => policy.clone(), "effort" => effort.clone())
            .record(latency);
        if self.cost_per_1k_tokens > 0.0 {
            // A running total kept as a gauge: the metrics facade's counters count whole units only.
            let cost = self.cost_of(usage.billed_tokens() as u64);
            metrics::gauge!("safeguard_prompt_cost_estimate", "policy" => policy, "effort" => effort).increment(cost);
        }
    }
}

/// `GET /v1/stats/prompts`: cost and latency per policy and effort since the server started, for readers without
/// a Prometheus (the same figures are on `/metrics`).
pub(crate) async fn prompt_stats(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require("review").or_else(|_| caller.require("audit"))?;
    Ok(Json(state.prompts.snapshot()))
}

/// What each decided item cost and how long it took, for the per-item means on /metrics. Histograms carry
/// the distributions; these totals give the means since start.
#[derive(Debug)]
pub(crate) struct ItemStats {
    cost_per_1k_tokens: f64,
    totals: Mutex<ItemTotals>,
}

#[derive(Debug, Default, Clone, Copy)]
struct ItemTotals {
    items: u64,
    reasoning_tokens: u64,
    billed_tokens: u64,
    latency_secs: f64,
}

impl ItemStats {
    pub(crate) fn new(cost_per_1k_tokens: f64) -> Self {
        Self { cost_per_1k_tokens: cost_per_1k_tokens.max(0.0), totals: Mutex::default() }
    }

    /// Counts one decided item. `route` says how it was decided: direct, cascade, moderate or nats.
    pub(crate) fn observe(&self, route: &'static str, usage: Usage, elapsed_secs: f64) {
        let reasoning = usage.completion_tokens as u64;
        let billed = usage.billed_tokens() as u64;
        let cost = price(billed, self.cost_per_1k_tokens);
        metrics::counter!("safeguard_items_total", "route" => route).increment(1);
        metrics::histogram!("safeguard_item_latency_seconds", "route" => route).record(elapsed_secs);
        metrics::histogram!("safeguard_item_reasoning_tokens", "route" => route).record(reasoning as f64);
        metrics::histogram!("safeguard_item_cost", "route" => route).record(cost);
        let mut totals = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        totals.items += 1;
        totals.reasoning_tokens += reasoning;
        totals.billed_tokens += billed;
        totals.latency_secs += elapsed_secs;
    }

    fn publish(&self) {
        let totals = *self.totals.lock().unwrap_or_else(|p| p.into_inner());
        let cost = price(totals.billed_tokens, self.cost_per_1k_tokens);
        metrics::gauge!("safeguard_cost_per_1k_tokens").set(self.cost_per_1k_tokens);
        metrics::gauge!("safeguard_cost_estimate_total").set(cost);
        if totals.items > 0 {
            let n = totals.items as f64;
            metrics::gauge!("safeguard_reasoning_tokens_per_item").set(totals.reasoning_tokens as f64 / n);
            metrics::gauge!("safeguard_billed_tokens_per_item").set(totals.billed_tokens as f64 / n);
            metrics::gauge!("safeguard_cost_per_item").set(cost / n);
            metrics::gauge!("safeguard_latency_per_item_seconds").set(totals.latency_secs / n);
        }
    }
}

const CASCADE_STAGES: [Stage; 4] = [Stage::Triage, Stage::ReasoningLow, Stage::ReasoningMedium, Stage::ReasoningHigh];

pub(crate) async fn render(
    State(state): State<AppState>,
    request: axum::extract::Request,
) -> Result<impl IntoResponse, ApiError> {
    // Off by default, since most scrapers are set up without a key; on, the counts per policy, the review backlog
    // and the policy names clients chose are for a key with the `metrics` scope only.
    if state.config.metrics_require_key {
        let (mut parts, _) = request.into_parts();
        let caller =
            <Caller as axum::extract::FromRequestParts<AppState>>::from_request_parts(&mut parts, &state).await?;
        caller.require("metrics")?;
    }
    // One scrape at a time reads the database; scrapes that come meanwhile (anyone who reaches the route may
    // send them, as often as they like) show the figures as last read instead of each taking a connection.
    if let Ok(_reading) = state.store_figures.try_lock() {
        read_store_figures(&state).await;
    }
    state.items.publish();
    // Read at the scrape, not at the last probe: a breaker opened by failing requests since shows at once.
    if let Some(endpoints) = state.reasoner.backends() {
        metrics::gauge!("safeguard_backends_usable").set(crate::readiness::usable(&endpoints) as f64);
        for endpoint in endpoints {
            let usable = f64::from(u8::from(endpoint.usable()));
            metrics::gauge!("safeguard_backend_usable", "endpoint" => endpoint.url.clone()).set(usable);
            metrics::gauge!("safeguard_backend_in_flight", "endpoint" => endpoint.url).set(endpoint.in_flight as f64);
        }
    }
    let cascade = state.cascade.stats.snapshot();
    if let Some(rate) = cascade.skip_rate() {
        metrics::gauge!("safeguard_pipeline_skip_rate").set(rate);
    }
    for stage in CASCADE_STAGES {
        if let Some(rate) = cascade.escalation_rate(stage) {
            metrics::gauge!("safeguard_pipeline_escalation_rate", "stage" => stage.as_str()).set(rate);
        }
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()))
}

/// The figures `/metrics` reads from the database: the job queue and the review queue. Each keeps its last value
/// when the database does not answer; `safeguard_metrics_store_errors_total` is how a dashboard tells them stale.
async fn read_store_figures(state: &AppState) {
    let stale = |what: &str, e: &safeguard_store::StoreError| {
        tracing::warn!("metrics: cannot read the {what}: {e}");
        metrics::counter!("safeguard_metrics_store_errors_total").increment(1);
    };
    match state.store.queue_depth().await {
        Ok(depth) => {
            metrics::gauge!("safeguard_jobs", "status" => "pending").set(depth.pending as f64);
            metrics::gauge!("safeguard_jobs", "status" => "running").set(depth.running as f64);
            metrics::gauge!("safeguard_jobs", "status" => "failed").set(depth.failed as f64);
        }
        Err(e) => stale("job queue", &e),
    }
    // From the database, so it survives restarts. A review of an item the model left undecided is counted
    // apart: the person supplied the answer the model did not, which is neither agreement nor override.
    let reviews = state.store.review_stats().await;
    if let Err(e) = &reviews {
        stale("review queue", e);
    }
    if let Ok(reviews) = reviews {
        metrics::gauge!("safeguard_reviews_pending").set(reviews.pending as f64);
        metrics::gauge!("safeguard_reviews_overdue").set(reviews.overdue as f64);
        let agreed = (reviews.decided - reviews.model_undecided - reviews.overrides).max(0);
        for (model, count) in
            [("agreed", agreed), ("overridden", reviews.overrides), ("undecided", reviews.model_undecided)]
        {
            metrics::gauge!("safeguard_reviews_decided", "model" => model).set(count as f64);
        }
        if let Some(rate) = crate::reviews::agreement_rate(&reviews) {
            metrics::gauge!("safeguard_review_agreement_rate").set(rate);
        }
        // Audits of triage, apart from the agreement with the model: overturned ones are triage's mistakes.
        let confirmed = (reviews.audits_decided - reviews.audits_overturned).max(0);
        for (result, count) in [("confirmed", confirmed), ("overturned", reviews.audits_overturned)] {
            metrics::gauge!("safeguard_triage_audits_decided", "result" => result).set(count as f64);
        }
    }
}

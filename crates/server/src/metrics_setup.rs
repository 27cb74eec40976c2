//! Prometheus metrics. The recorder is process-global, so it is installed once and shared by every server
//! started in the process (tests start several).

use std::sync::OnceLock;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::AppState;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

const LATENCY_BUCKETS: [f64; 12] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0];

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

pub(crate) async fn render(State(state): State<AppState>) -> impl IntoResponse {
    if let Ok(depth) = state.store.queue_depth().await {
        metrics::gauge!("safeguard_jobs", "status" => "pending").set(depth.pending as f64);
        metrics::gauge!("safeguard_jobs", "status" => "running").set(depth.running as f64);
        metrics::gauge!("safeguard_jobs", "status" => "failed").set(depth.failed as f64);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}

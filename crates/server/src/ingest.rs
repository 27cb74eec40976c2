//! The NATS JetStream worker inside `safeguard serve`: content events in, decisions out, every decision
//! stored in the server's database like any other (one record per item, source `nats:<stage that settled
//! it>`) and queued for a person when it ends there.
//!
//! Exactly-once in the database rests on the worker's ledger: a decision is stored under the id the ledger
//! holds for its idempotency key, and storing is idempotent by that id, so a redelivery after a crash (or a
//! restart mid-stream) stores nothing twice and loses nothing.

use std::sync::Arc;
use std::time::Duration;

use safeguard_pipeline::Pipeline;
use safeguard_pipeline::nats::{Bus, HostError, NatsConfig, SettledItem, Worker, WorkerHost};
use safeguard_policy::Policy;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::AppState;
use crate::error::ApiError;
use crate::moderate::store_cascade_item;
use crate::policies::stored_policy;

/// Where the worker reads content events and which policies apply when an event names none.
#[derive(Debug, Clone)]
pub struct NatsIngest {
    pub config: NatsConfig,
    /// Policy names (or `sha256:` versions) for events without `"policies"`; empty means the starter library.
    pub policies: Vec<String>,
}

impl NatsIngest {
    pub fn new(config: NatsConfig) -> Self {
        Self { config, policies: Vec::new() }
    }
}

struct ServerHost {
    state: AppState,
    default_policies: Vec<String>,
}

fn unavailable(e: impl std::fmt::Display) -> HostError {
    HostError::Unavailable(e.to_string())
}

impl ServerHost {
    async fn resolve(&self, reference: &str) -> Result<Policy, HostError> {
        match stored_policy(&self.state, reference).await {
            Ok(Some(policy)) => Ok(policy),
            Ok(None) => Err(HostError::Rejected(format!("no policy {reference:?} is stored"))),
            // The store being down is worth a redelivery; a stored version that no longer parses is not.
            Err(ApiError::Store(e)) => Err(unavailable(e)),
            Err(e) => Err(HostError::Rejected(e.to_string())),
        }
    }
}

#[async_trait::async_trait]
impl WorkerHost for ServerHost {
    async fn prepare(&self, requested: &[String]) -> Result<(Vec<Policy>, Pipeline), HostError> {
        let names: Vec<String> = match (requested.is_empty(), self.default_policies.is_empty()) {
            (false, _) => requested.to_vec(),
            (true, false) => self.default_policies.clone(),
            (true, true) => safeguard_policy::STARTER_POLICIES
                .iter()
                .map(|s| s.file_name.trim_end_matches(".md").to_string())
                .collect(),
        };
        let limit = self.state.config.limits.max_policies;
        if names.len() > limit {
            return Err(HostError::Rejected(format!("{} policies named; the limit is {limit}", names.len())));
        }
        let mut policies = Vec::with_capacity(names.len());
        for name in &names {
            policies.push(self.resolve(name).await?);
        }
        let pipeline = self.state.cascade.pipeline(&self.state, &policies, None);
        Ok((policies, pipeline))
    }

    async fn record(&self, item: SettledItem<'_>) -> Result<(), HostError> {
        let decision = item.decision;
        // The policies as judged, by version: a redelivery must queue the review under the same ones.
        let mut policies = Vec::with_capacity(decision.policies.len());
        for route in &decision.policies {
            match self.resolve(&route.policy_hash).await {
                Ok(policy) => policies.push(policy),
                Err(HostError::Rejected(why)) => warn!(key = item.key, "{why}; its review is queued without it"),
                Err(e) => return Err(e),
            }
        }
        let source = format!("nats:{}", decision.decided_by.as_str());
        let origin = json!({"nats": {"key": item.key, "item_id": item.item_id}});
        let stored = store_cascade_item(&self.state, decision, &policies, item.content, &source, origin)
            .await
            .map_err(|e: ApiError| unavailable(e))?;
        if stored.fresh {
            self.state.items.observe("nats", decision.usage, decision.total_ms / 1e3);
        }
        Ok(())
    }
}

/// Runs the worker until `stop`, reconnecting with backoff while NATS is unreachable.
pub(crate) async fn run(state: AppState, ingest: NatsIngest, stop: CancellationToken) {
    let host: Arc<dyn WorkerHost> = Arc::new(ServerHost { state, default_policies: ingest.policies.clone() });
    let mut backoff = Duration::from_millis(500);
    while !stop.is_cancelled() {
        match Bus::connect(ingest.config.clone()).await {
            Ok(bus) => {
                info!(url = %ingest.config.url, stream = %ingest.config.work_stream, "deciding NATS content events");
                match Worker::with_host(bus, host.clone()).run(stop.clone()).await {
                    Ok(()) => return,
                    Err(e) => warn!("the NATS worker stopped: {e}; restarting"),
                }
                backoff = Duration::from_millis(500);
            }
            Err(e) => warn!("NATS: {e}; retrying in {backoff:?}"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

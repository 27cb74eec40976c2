//! The NATS JetStream worker inside `safeguard serve`: content events in, decisions out, every decision
//! stored in the server's database like any other (one record per item, source `nats:<stage that settled
//! it>`) and queued for a person when it ends there.
//!
//! Exactly-once in the database rests on the worker's ledger: a decision is stored under the id the ledger
//! holds for its idempotency key, and storing is idempotent by that id, so a redelivery after a crash (or a
//! restart mid-stream) stores nothing twice and loses nothing.
//!
//! The worker is supervised: whatever ends it while the server runs (NATS going away, an error, a panic) is
//! logged and it is started again with backoff; `/readyz` reports whether it is serving ([`DownClock`]), and
//! fails once it has been down for longer than [`crate::ServerConfig::nats_ready_grace`], when one is set.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use safeguard_pipeline::Pipeline;
use safeguard_pipeline::nats::{
    APPEAL_SUFFIX, Bus, ContentLimits, HostError, NatsConfig, NatsError, ReviewedItem, SettledItem, Worker, WorkerHost,
};
use safeguard_policy::Policy;
use safeguard_store::{DecisionRecord, ReviewRecord};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::AppState;
use crate::classify::Origin;
use crate::error::ApiError;
use crate::moderate::store_cascade_item;
use crate::policies::stored_policy;
use crate::readiness::DownClock;

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
            Ok(None) => Err(HostError::NotStored(format!("no policy {reference:?} is stored"))),
            // The store being down is worth a redelivery; a stored version that no longer parses, or whose row is
            // corrupt, is not.
            Err(ApiError::Store(e)) if !e.is_unreadable_data() => Err(unavailable(e)),
            Err(e) => Err(HostError::Rejected(e.to_string())),
        }
    }

    /// `id`, the decision the worker's ledger says a bus appeal appeals, if it is the appealed item's: stored,
    /// decided from the bus under the appeal's key less `:appeal`, on the same content. Linked, the appeal sets
    /// that decision's pending review aside, so an event must not be able to do that to another item's review,
    /// nor put other content before the person in the item's place. Not linked (and then stored as before, beside
    /// the item's review) when any of it does not hold, also when the item's own decision is not stored yet.
    async fn appealed_item<'a>(&self, id: &'a str, item: &SettledItem<'_>) -> Result<Option<&'a str>, HostError> {
        let Some(original) = self.state.store.get_decision(id).await.map_err(unavailable)? else {
            debug!(key = ?item.key, decision = id, "the appealed decision is not stored yet; not linked");
            return Ok(None);
        };
        let item_key = item.key.strip_suffix(APPEAL_SUFFIX);
        let same_item = original.source.starts_with(NATS_SOURCE)
            && item_key.is_some()
            && original.sampling["nats"]["key"].as_str() == item_key;
        let same_content =
            item.content.and_then(|c| serde_json::to_value(c).ok()).is_some_and(|c| c == original.content);
        if !(same_item && same_content) {
            let why = "a bus appeal of another item, or of other content; not linked";
            warn!(key = ?item.key, decision = id, same_item, same_content, "{why}");
            return Ok(None);
        }
        Ok(Some(id))
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
            match self.resolve(name).await {
                Ok(policy) => policies.push(policy),
                // The server's own list (`--nats-policy`, else the starter library) failing is its configuration,
                // not the event's fault: rejected, the event would stay rejected (the ledger answers a resend of it
                // with the rejection) after the flag is fixed or the policy stored. It waits instead.
                Err(HostError::Rejected(why) | HostError::NotStored(why)) if requested.is_empty() => {
                    error!(
                        "the server's default NATS policy {name:?} cannot be used: {why}; events naming no policies \
                         wait (store it, or fix --nats-policy)"
                    );
                    metrics::counter!("safeguard_nats_default_policy_missing_total").increment(1);
                    return Err(HostError::Unavailable(format!("default policy {name:?}: {why}")));
                }
                Err(e) => return Err(e),
            }
        }
        let pipeline = self.state.cascade.queued_pipeline(&self.state, &policies);
        Ok((policies, pipeline))
    }

    async fn record(&self, item: SettledItem<'_>) -> Result<(), HostError> {
        let decision = item.decision;
        // The policies as judged, by version: a redelivery must queue the review under the same ones.
        let mut policies = Vec::with_capacity(decision.policies.len());
        for route in &decision.policies {
            match self.resolve(&route.policy_hash).await {
                Ok(policy) => policies.push(policy),
                Err(HostError::Rejected(why) | HostError::NotStored(why)) => {
                    warn!(key = item.key, "{why}; its review is queued without it")
                }
                Err(e) => return Err(e),
            }
        }
        let source = format!("{NATS_SOURCE}{}", decision.decided_by.as_str());
        let bus_item = json!({"nats": {"key": item.key, "item_id": item.item_id}});
        // The bus asks for no key: its items have no owner, so any client key may appeal their decisions.
        let origin = Origin { source: &source, submitted_by: None };
        let appeal_of = match item.appeal_of {
            Some(id) => self.appealed_item(id, &item).await?,
            None => None,
        };
        let stored = store_cascade_item(&self.state, decision, &policies, item.content, origin, bus_item, appeal_of)
            .await
            .map_err(|e: ApiError| match e {
                // Worth waiting out: the worker keeps trying while it holds the reasoning.
                ApiError::Store(_) | ApiError::Unavailable(_) => unavailable(e),
                // Fails the same way every time: given back at once, on the redelivery backoff.
                other => HostError::Rejected(other.to_string()),
            })?;
        if stored.fresh {
            self.state.items.observe("nats", decision.usage, decision.total_ms / 1e3);
        }
        if let Some(review) = &stored.answered_by {
            self.announce_answer(&item, review).await?;
        }
        Ok(())
    }
}

impl ServerHost {
    /// Publishes on a bus appeal's subject the answer to the appeal made before it of the same decision (over
    /// HTTP, say), which answers it ([`crate::moderate::store_cascade_item`]), if a person has given it. Announced
    /// before this appeal was stored, that answer went out on the other subjects only; announced after, the
    /// announcer finds this appeal too ([`bus_origins`]). The review is read again here, after this appeal was
    /// stored, so one of the two always sees the other. Not connected, or not published: the worker records the
    /// item again (idempotent) until it is, so the producer holding the appeal is never left waiting.
    async fn announce_answer(&self, item: &SettledItem<'_>, review: &ReviewRecord) -> Result<(), HostError> {
        let store = &self.state.store;
        let Some(review) = store.get_review(&review.id).await.map_err(unavailable)? else { return Ok(()) };
        if review.status != "decided" {
            return Ok(());
        }
        let Some(appeal) = store.get_decision(&review.decision_id).await.map_err(unavailable)? else { return Ok(()) };
        let Some(reviewed) = reviewed_item(&appeal, &review) else { return Ok(()) };
        let bus = nats_out(&self.state).ok_or_else(|| unavailable("not connected to NATS"))?;
        bus.publish_review(item.key, item.item_id.map(str::to_string), reviewed).await.map_err(unavailable)
    }
}

/// What `review`, a person's decision on `decision`, tells the producers; `None` before it has an outcome.
fn reviewed_item(decision: &DecisionRecord, review: &ReviewRecord) -> Option<ReviewedItem> {
    Some(ReviewedItem {
        decision_id: decision.id.clone(),
        appeal_of: decision.replay_of.clone().filter(|_| is_appeal_source(&decision.source)),
        review_id: review.id.clone(),
        outcome: review.outcome.clone()?,
        rule_id: review.rule_id.clone(),
        policy_hash: review.policy_hash.clone(),
        decided_at: review.decided_at,
    })
}

/// Runs the worker until `stop`, reconnecting with backoff while NATS is unreachable and starting it again
/// whenever it ends before then (an error, a panic).
pub(crate) async fn run(state: AppState, ingest: NatsIngest, stop: CancellationToken) {
    let host: Arc<dyn WorkerHost> =
        Arc::new(ServerHost { state: state.clone(), default_policies: ingest.policies.clone() });
    // Dropped with this task, so a server that is aborted stops announcing too.
    let _announcer = crate::AbortOnDrop(tokio::spawn(announce_reviews(state.clone(), stop.clone())));
    let (state, ingest, host, stop_ref) = (&state, &ingest, &host, &stop);
    let health = &state.nats_health;
    supervise(&stop, health, RESTART_FIRST, move || serve_once(state, ingest, host, stop_ref)).await;
}

/// The first pause before the worker is started again; doubled for each start in a row that fails, up to
/// [`RESTART_MAX`].
const RESTART_FIRST: Duration = Duration::from_millis(500);
const RESTART_MAX: Duration = Duration::from_secs(30);

/// A worker that served this long was not failing at start: the next start waits [`RESTART_FIRST`] again.
const SERVED_STEADILY: Duration = Duration::from_secs(60);

/// How one start of the worker ended.
enum Ended {
    /// NATS could not be reached: nothing was started.
    Unreachable(String),
    /// The worker ran and returned: told to stop, or failing.
    Ran(Result<(), NatsError>),
}

/// Starts the worker again each time `start`'s run ends or panics before `stop`, pausing longer each time in a
/// row. A panic is caught here too: left to unwind, it would end ingestion for good while the server (and its
/// `/readyz`) carried on as if nothing had happened.
async fn supervise<F, Fut>(stop: &CancellationToken, health: &DownClock, first: Duration, mut start: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Ended>,
{
    let mut backoff = first;
    while !stop.is_cancelled() {
        let began = Instant::now();
        let ended = AssertUnwindSafe(start()).catch_unwind().await;
        health.stopped();
        if stop.is_cancelled() {
            return;
        }
        if began.elapsed() >= SERVED_STEADILY {
            backoff = first;
        }
        match ended {
            Ok(Ended::Unreachable(e)) => warn!("NATS: {e}; retrying in {backoff:?}"),
            Ok(Ended::Ran(ran)) => {
                match ran {
                    Ok(()) => error!("the NATS worker stopped unexpectedly; restarting it in {backoff:?}"),
                    Err(e) => error!("the NATS worker stopped: {e}; restarting it in {backoff:?}"),
                }
                metrics::counter!("safeguard_nats_worker_restarts_total", "reason" => "ended").increment(1);
            }
            Err(panic) => {
                error!(
                    panic = safeguard_pipeline::nats::panic_message(panic.as_ref()),
                    "the NATS worker panicked (a bug); restarting it in {backoff:?}"
                );
                metrics::counter!("safeguard_nats_worker_restarts_total", "reason" => "panicked").increment(1);
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(RESTART_MAX);
    }
}

/// One start of the worker: connects, then runs it until it ends.
async fn serve_once(
    state: &AppState,
    ingest: &NatsIngest,
    host: &Arc<dyn WorkerHost>,
    stop: &CancellationToken,
) -> Ended {
    let bus = match Bus::connect(ingest.config.clone()).await {
        Ok(bus) => bus,
        Err(e) => return Ended::Unreachable(e.to_string()),
    };
    info!(url = %ingest.config.shown_url(), stream = %ingest.config.work_stream, "deciding NATS content events");
    set_nats_out(state, Some(bus.clone()));
    // Cleared however the worker ends, a panic included.
    let _connected = ClearNatsOut(state);
    let health = state.nats_health.clone();
    // The bus is held to the limits HTTP clients are: content a request could not send is not decided either.
    let limits = &state.config.limits;
    let worker = Worker::with_host(bus, host.clone())
        .with_limits(ContentLimits { max_chars: limits.max_content_chars, max_tokens: Some(limits.max_content_tokens) })
        .on_started(move || health.serving());
    Ended::Ran(worker.run(stop.clone()).await)
}

struct ClearNatsOut<'a>(&'a AppState);

impl Drop for ClearNatsOut<'_> {
    fn drop(&mut self) {
        set_nats_out(self.0, None);
    }
}

fn set_nats_out(state: &AppState, bus: Option<Bus>) {
    *state.nats_out.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = bus;
}

/// The worker's connection, while it has one.
fn nats_out(state: &AppState) -> Option<Bus> {
    state.nats_out.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
}

/// How often decided reviews whose outcome could not be published yet are tried again.
const ANNOUNCE_EVERY: Duration = Duration::from_secs(5);

/// Publishes a person's decision on an item that came in as a NATS event, so that a producer holding it on its
/// `needs_review` decision can let it go or take it down. Only reviews and appeals are announced (an
/// active-learning sample of a settled item changes nothing the producer was told), and only items from the
/// bus. Once published, the review is marked; until then [`announce_pending`] tries again, so a review decided
/// while NATS is away is announced when it is back.
pub(crate) async fn announce_review(state: &AppState, decision: &DecisionRecord, review: &ReviewRecord) {
    if !matches!(review.kind.as_str(), "review" | "appeal") {
        return;
    }
    let origins = bus_origins(state, decision).await;
    if origins.is_empty() {
        return;
    }
    let Some(reviewed) = reviewed_item(decision, review) else { return };
    let keyed: Vec<(&str, Option<String>)> = origins
        .iter()
        .filter_map(|origin| Some((origin["key"].as_str()?, origin["item_id"].as_str().map(str::to_string))))
        .collect();
    if keyed.is_empty() {
        // No subject to publish on, now or later: marked, so the sweep does not read it again every few seconds.
        warn!(review = %review.id, decision = %decision.id, "a NATS decision without its event key: not announced");
        if let Err(e) = state.store.mark_review_announced(&review.id).await {
            warn!(review = %review.id, "cannot mark the review announced: {e}");
        }
        return;
    }
    let Some(bus) = nats_out(state) else {
        debug!(review = %review.id, "not connected to NATS; the review is announced once it is");
        return;
    };
    let mut published_all = true;
    for (key, item_id) in keyed {
        if let Err(e) = bus.publish_review(key, item_id, reviewed.clone()).await {
            warn!(key, review = %review.id, "cannot publish the review decision yet: {e}");
            metrics::counter!("safeguard_nats_review_publish_failures_total").increment(1);
            published_all = false;
        }
    }
    // Announced again later if any subject missed it: the event's Nats-Msg-Id names the review and the key, so a
    // quick repeat on a subject that has it is dropped.
    if published_all && let Err(e) = state.store.mark_review_announced(&review.id).await {
        warn!(review = %review.id, "cannot mark the review announced: {e}");
    }
}

/// The source prefix of decisions on items that came in as NATS events.
pub(crate) const NATS_SOURCE: &str = "nats:";

/// Whether a decision with this source that names another in `replay_of` is an appeal of it: made over HTTP, or
/// on the bus (the host links a bus decision to another only when it appeals it).
pub(crate) fn is_appeal_source(source: &str) -> bool {
    source == "appeal" || source.starts_with(NATS_SOURCE)
}

/// The events a decision answers on the bus: the one it was decided from, if any, and, for an appeal, the item it
/// appeals if that came from the bus. A producer may hold, or have released, the item on what it was told, so the
/// person's answer to an appeal is published on the item's subject as a review of the item itself is (whose own
/// review the appeal set aside). An appeal made over HTTP also answers a bus appeal of the same decision that came
/// after it ([`crate::moderate::store_cascade_item`]). What `Store::reviews_to_announce` selects, so that the sweep
/// never keeps reading a review it will not announce.
async fn bus_origins(state: &AppState, decision: &DecisionRecord) -> Vec<serde_json::Value> {
    let mut origins = Vec::new();
    if decision.source.starts_with(NATS_SOURCE) {
        origins.push(decision.sampling["nats"].clone());
    }
    let Some(appealed) = decision.replay_of.as_deref().filter(|_| is_appeal_source(&decision.source)) else {
        return origins;
    };
    let original = match state.store.get_decision(appealed).await {
        Ok(Some(original)) if original.source.starts_with(NATS_SOURCE) => original,
        Ok(_) => return origins,
        Err(e) => {
            // Not marked: the sweep tries again.
            warn!(decision = %decision.id, "cannot read the appealed decision: {e}");
            return Vec::new();
        }
    };
    origins.push(original.sampling["nats"].clone());
    if decision.source == "appeal" {
        match answered_bus_appeal(state, &original).await {
            Ok(Some(origin)) => origins.push(origin),
            Ok(None) => {}
            Err(e) => {
                // Not marked: the sweep tries again, rather than leave a producer holding the bus appeal.
                warn!(decision = %decision.id, "cannot look for a bus appeal of the appealed decision: {e}");
                return Vec::new();
            }
        }
    }
    origins
}

/// The event of a bus appeal of `original` (a bus decision) stored without a review of its own because `original`
/// had been appealed over HTTP before: the appeal under `<key>:appeal` in the ledger, stored linked to `original`.
/// The ledger names the appeal's decision, so nothing is scanned. Not connected, there is nothing to look up with,
/// nor to announce on: [`announce_review`] stops there without marking the review.
async fn answered_bus_appeal(state: &AppState, original: &DecisionRecord) -> Result<Option<serde_json::Value>, String> {
    let (Some(bus), Some(key)) = (nats_out(state), original.sampling["nats"]["key"].as_str()) else { return Ok(None) };
    let appeal_key = format!("{key}{APPEAL_SUFFIX}");
    let settled = bus.decided(&appeal_key).await.map_err(|e| e.to_string())?;
    let Some(id) = settled.filter(|e| e.key == appeal_key).and_then(|e| e.decision.map(|d| d.id.to_string())) else {
        return Ok(None);
    };
    // Not stored yet: the worker storing it publishes the answer itself once it is (`ServerHost::announce_answer`).
    let Some(appeal) = state.store.get_decision(&id).await.map_err(|e| e.to_string())? else { return Ok(None) };
    let linked = appeal.source.starts_with(NATS_SOURCE) && appeal.replay_of.as_deref() == Some(original.id.as_str());
    Ok(linked.then(|| appeal.sampling["nats"].clone()))
}

/// Announces every decided review still waiting to be, while connected.
async fn announce_pending(state: &AppState) -> Result<(), safeguard_store::StoreError> {
    if nats_out(state).is_none() {
        return Ok(());
    }
    for review in state.store.reviews_to_announce(100).await? {
        match state.store.get_decision(&review.decision_id).await? {
            Some(decision) => announce_review(state, &decision, &review).await,
            // The query found the decision an instant ago; it was purged since. Nothing is left to announce.
            None => state.store.mark_review_announced(&review.id).await?,
        }
    }
    Ok(())
}

async fn announce_reviews(state: AppState, stop: CancellationToken) {
    sweep_every(&stop, ANNOUNCE_EVERY, || announce_pending(&state)).await;
}

/// Runs `sweep` every `every` until `stop`. A sweep that fails or panics is logged and the next one runs as
/// usual: one bad row must not end the announcing of every later review for the life of the process.
async fn sweep_every<F, Fut>(stop: &CancellationToken, every: Duration, mut sweep: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), safeguard_store::StoreError>>,
{
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match AssertUnwindSafe(sweep()).catch_unwind().await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!("cannot read the reviews to announce: {e}"),
            Err(panic) => {
                error!(
                    panic = safeguard_pipeline::nats::panic_message(panic.as_ref()),
                    "announcing decided reviews panicked (a bug); trying again in {every:?}"
                );
                metrics::counter!("safeguard_review_announcer_panics_total").increment(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_sweep_that_fails_or_panics_does_not_end_the_announcer() {
        let stop = CancellationToken::new();
        let sweeps = AtomicUsize::new(0);
        let sweep = || {
            let n = sweeps.fetch_add(1, Ordering::SeqCst);
            let stop = stop.clone();
            async move {
                match n {
                    0 => panic!("a bug while announcing"),
                    1 => Err(safeguard_store::StoreError::WriterStopped),
                    _ => {
                        stop.cancel();
                        Ok(())
                    }
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(60), sweep_every(&stop, Duration::from_secs(5), sweep))
            .await
            .expect("the announcer sweeps again after a panic and an error, and stops when told");
        assert_eq!(sweeps.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_worker_that_ends_or_panics_is_started_again_until_the_server_stops() {
        let stop = CancellationToken::new();
        let health = DownClock::down();
        let starts = AtomicUsize::new(0);
        let start = || {
            let n = starts.fetch_add(1, Ordering::SeqCst);
            let (stop, health) = (stop.clone(), &health);
            async move {
                match n {
                    0 => {
                        health.serving();
                        panic!("a bug in the worker")
                    }
                    1 => Ended::Ran(Err(NatsError::Stream("the connection went away".into()))),
                    2 => Ended::Unreachable("connection refused".into()),
                    3 => Ended::Ran(Ok(())),
                    _ => {
                        health.serving();
                        stop.cancel();
                        Ended::Ran(Ok(()))
                    }
                }
            }
        };
        let supervised = supervise(&stop, &health, Duration::from_millis(1), start);
        // A liveness bound, not a timing claim: under RUST_BACKTRACE the panic's backtrace is symbolized, which takes
        // seconds on a loaded 2-core machine (a full run once passed 5 s here).
        tokio::time::timeout(Duration::from_secs(60), supervised).await.expect("returns once stopped");
        assert_eq!(starts.load(Ordering::SeqCst), 5, "started again after a panic, an error and an early end");
        assert!(health.down_for().is_some(), "a stopped worker is not serving");
    }
}

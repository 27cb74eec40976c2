//! Async ingestion over NATS JetStream: content events in, decisions out.
//!
//! Delivery is at-least-once, decisions are exactly-once per idempotency key:
//! - content arrives on `{prefix}.content.>` in the work stream, read by a shared durable pull consumer, so any
//!   number of workers split the load;
//! - each event's idempotency key (the `Nats-Msg-Id` header, else the payload's `id`) is looked up in a ledger
//!   stream of settled decisions (one subject per key). A redelivered event whose decision exists is re-published, not re-decided;
//! - a new decision is written to the ledger with `Nats-Expected-Last-Subject-Sequence: 0`, which the server
//!   refuses if another worker got there first (then that one's decision stands), published to `{prefix}.decisions.{key}` with the key as `Nats-Msg-Id` (the
//!   stream's duplicate window drops a re-publish), and only then is the event acked;
//! - an event with `"appeal": true` is decided under the key `<key>:appeal`, apart from the item it appeals;
//! - a `pending` status is published on receipt, so producers can hold the content until the decision comes;
//!   an item that ends with a person is published as `decided` with outcome `needs_review`, and then as
//!   `reviewed` when a person decides it (by the host: `safeguard serve` publishes it from its review API);
//! - when the reasoning budget is spent the event is NAKed with the budget's retry delay and the worker
//!   pauses pulling: back-pressure instead of dropping or allowing;
//! - while an item is being decided the worker tells the server it is still working on it (progress acks),
//!   so a slow decision is not handed to a second worker after `ack_wait`;
//! - the program the worker runs in ([`WorkerHost`]) chooses the policies and pipeline per event and records
//!   each settled decision (e.g. in `safeguard serve`'s database) before the event is acked. A redelivered
//!   event whose decision is already in the ledger is recorded again, so the host must be idempotent by the
//!   decision id: that makes its record exactly-once too.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, consumer, stream};
use futures::StreamExt;
use safeguard_core::input::{InputLimits, parse_item};
use safeguard_harmony::Content;
use safeguard_policy::Policy;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::cascade::{CascadeDecision, Pipeline, RouteContext};

/// Names of everything the worker creates or uses; workers sharing these share the work.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    pub url: String,
    /// Subject prefix: content on `{prefix}.content.>`, decisions on `{prefix}.decisions.>`.
    pub prefix: String,
    pub work_stream: String,
    pub decision_stream: String,
    pub consumer: String,
    pub decided_stream: String,
    /// How long an unacked event waits before it is delivered again (to this or another worker).
    pub ack_wait: Duration,
    /// Events pulled at a time per worker; small keeps back-pressure tight.
    pub batch: usize,
}

impl NatsConfig {
    pub fn new(url: impl Into<String>, prefix: impl Into<String>) -> Self {
        let prefix = prefix.into();
        let tag = prefix.replace(['.', '-', '*', '>'], "_").to_ascii_uppercase();
        Self {
            url: url.into(),
            work_stream: format!("{tag}_CONTENT"),
            decision_stream: format!("{tag}_DECISIONS"),
            consumer: format!("{tag}_workers"),
            decided_stream: format!("{tag}_DECIDED"),
            prefix,
            ack_wait: Duration::from_secs(60),
            batch: 4,
        }
    }

    /// Names the streams after `name` instead of the prefix: the work stream is `name`, the decisions and the
    /// ledger `name_DECISIONS` and `name_DECIDED`, the shared consumer `name_workers`.
    pub fn with_stream(mut self, name: &str) -> Self {
        self.work_stream = name.to_string();
        self.decision_stream = format!("{name}_DECISIONS");
        self.decided_stream = format!("{name}_DECIDED");
        self.consumer = format!("{name}_workers");
        self
    }

    pub fn content_subject(&self, key: &str) -> String {
        format!("{}.content.{key}", self.prefix)
    }

    pub fn decision_subject(&self, key: &str) -> String {
        format!("{}.decisions.{key}", self.prefix)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("cannot connect to NATS at {url}: {detail}")]
    Connect { url: String, detail: String },
    #[error("JetStream setup failed: {0}")]
    Setup(String),
    #[error("JetStream: {0}")]
    Stream(String),
}

fn setup_err(e: impl std::fmt::Display) -> NatsError {
    NatsError::Setup(e.to_string())
}

/// What the worker publishes for each event: first `pending`, then `decided` (or `rejected` for an event
/// that can never be decided, such as invalid JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionEvent {
    pub key: String,
    /// The producer's own item id, when the event had one.
    pub item_id: Option<String>,
    pub status: EventStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<CascadeDecision>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Set on `reviewed` events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review: Option<ReviewedItem>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventStatus {
    Pending,
    Decided,
    Rejected,
    /// A person decided an item the cascade handed to them (its `decided` event said `needs_review`).
    Reviewed,
}

/// What a person decided about an item that came in as an event: the end of its hold for a producer that
/// waits on a `needs_review` decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReviewedItem {
    pub decision_id: String,
    pub review_id: String,
    /// `allow` or `violation`.
    pub outcome: String,
    /// The policy rule the person applied, and the version it is from.
    pub rule_id: Option<String>,
    pub policy_hash: Option<String>,
    /// Unix milliseconds.
    pub decided_at: Option<i64>,
}

/// Connected JetStream handles for one worker (or a producer/observer in tests).
#[derive(Clone)]
pub struct Bus {
    pub config: NatsConfig,
    pub js: jetstream::Context,
    /// The ledger of settled keys: one message per key, written only if none exists yet.
    pub decided: stream::Stream,
}

impl Bus {
    /// Connects and creates the work, decision and ledger streams if they do not exist yet.
    pub async fn connect(config: NatsConfig) -> Result<Bus, NatsError> {
        let client = async_nats::connect(&config.url)
            .await
            .map_err(|e| NatsError::Connect { url: config.url.clone(), detail: e.to_string() })?;
        let js = jetstream::new(client);
        js.get_or_create_stream(stream::Config {
            name: config.work_stream.clone(),
            subjects: vec![format!("{}.content.>", config.prefix)],
            // An event leaves the work stream once a worker acks it.
            retention: stream::RetentionPolicy::WorkQueue,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .map_err(|e| NatsError::Setup(format!("work stream: {e}")))?;
        js.get_or_create_stream(stream::Config {
            name: config.decision_stream.clone(),
            subjects: vec![format!("{}.decisions.>", config.prefix)],
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .map_err(|e| NatsError::Setup(format!("decision stream: {e}")))?;
        let decided = js
            .get_or_create_stream(stream::Config {
                name: config.decided_stream.clone(),
                subjects: vec![format!("{}.decided.>", config.prefix)],
                max_messages_per_subject: 1,
                ..Default::default()
            })
            .await
            .map_err(|e| NatsError::Setup(format!("decided ledger: {e}")))?;
        Ok(Bus { config, js, decided })
    }

    /// Publishes one content event (what a producer does). `key` is the idempotency key.
    pub async fn publish_content(&self, key: &str, payload: &Value) -> Result<(), NatsError> {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", key);
        let body = serde_json::to_vec(payload).map_err(|e| NatsError::Stream(e.to_string()))?;
        self.js
            .publish_with_headers(self.config.content_subject(&subject_token(key)), headers, body.into())
            .await
            .map_err(|e| NatsError::Stream(e.to_string()))?
            .await
            .map_err(|e| NatsError::Stream(e.to_string()))?;
        Ok(())
    }

    /// The settled decision for an idempotency key, if any.
    pub async fn decided(&self, key: &str) -> Result<Option<DecisionEvent>, NatsError> {
        let subject = format!("{}.decided.{}", self.config.prefix, subject_token(key));
        match self.decided.get_last_raw_message_by_subject(&subject).await {
            Ok(message) => Ok(serde_json::from_slice(&message.payload).ok()),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(NatsError::Stream(e.to_string())),
        }
    }

    /// Writes the key's settled event unless one exists. `Ok(false)`: another worker settled it first.
    async fn record_once(&self, event: &DecisionEvent) -> Result<bool, NatsError> {
        let subject = format!("{}.decided.{}", self.config.prefix, subject_token(&event.key));
        let body = serde_json::to_vec(event).map_err(|e| NatsError::Stream(e.to_string()))?;
        let mut headers = HeaderMap::new();
        // The server refuses the write if the subject already holds a message: an atomic create.
        headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
        let ack = self
            .js
            .publish_with_headers(subject, headers, body.into())
            .await
            .map_err(|e| NatsError::Stream(e.to_string()))?
            .await;
        match ack {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => Ok(false),
            Err(e) => Err(NatsError::Stream(e.to_string())),
        }
    }

    /// Announces a person's decision on an item that came in as an event with idempotency key `key`.
    pub async fn publish_review(
        &self,
        key: &str,
        item_id: Option<String>,
        review: ReviewedItem,
    ) -> Result<(), NatsError> {
        let event = DecisionEvent {
            key: key.to_string(),
            item_id,
            status: EventStatus::Reviewed,
            decision: None,
            error: None,
            review: Some(review),
        };
        self.publish_event(&event).await
    }

    async fn publish_event(&self, event: &DecisionEvent) -> Result<(), NatsError> {
        let token = subject_token(&event.key);
        let mut headers = HeaderMap::new();
        // The duplicate window drops a second publish of the same status for the same key (of the same review:
        // an appeal can be reviewed again).
        let id = match &event.review {
            Some(review) => format!("{token}:{:?}:{}", event.status, review.review_id),
            None => format!("{token}:{:?}", event.status),
        };
        headers.insert("Nats-Msg-Id", id.as_str());
        let body = serde_json::to_vec(event).map_err(|e| NatsError::Stream(e.to_string()))?;
        self.js
            .publish_with_headers(self.config.decision_subject(&token), headers, body.into())
            .await
            .map_err(|e| NatsError::Stream(e.to_string()))?
            .await
            .map_err(|e| NatsError::Stream(e.to_string()))?;
        Ok(())
    }
}

/// A subject token for any idempotency key: the user's key may hold characters subjects do not allow.
pub fn subject_token(key: &str) -> String {
    let clean =
        !key.is_empty() && key.len() <= 64 && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if clean { key.to_string() } else { format!("h{}", &hex::encode(Sha256::digest(key.as_bytes()))[..40]) }
}

/// Why a host could not serve an event.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The event can never be decided as it is (e.g. it names an unknown policy): it is rejected.
    #[error("{0}")]
    Rejected(String),
    /// Not now (e.g. the database is down): the event is delivered again later.
    #[error("{0}")]
    Unavailable(String),
}

/// A settled decision, handed to the host to record.
#[derive(Debug, Clone, Copy)]
pub struct SettledItem<'a> {
    pub key: &'a str,
    pub item_id: Option<&'a str>,
    /// `None` only if a redelivered event's payload no longer parses (it parsed when it was decided).
    pub content: Option<&'a Content>,
    pub decision: &'a CascadeDecision,
}

/// The program a worker runs in: where policies come from and where decisions go.
#[async_trait::async_trait]
pub trait WorkerHost: Send + Sync {
    /// The policies an event is judged under and the pipeline to judge them with. `requested` is what the
    /// event named in `"policies"` (names or `sha256:` versions); empty means the host's default set.
    async fn prepare(&self, requested: &[String]) -> Result<(Vec<Policy>, Pipeline), HostError>;

    /// Records a settled decision before its event is acked. Called again for the same decision when an
    /// event is redelivered after a crash, so it must be idempotent by `item.decision.id`.
    async fn record(&self, item: SettledItem<'_>) -> Result<(), HostError>;
}

/// A fixed pipeline and policy list, recording nothing: decisions only go out on the decision stream.
struct StaticHost {
    pipeline: Pipeline,
    policies: Vec<Policy>,
}

#[async_trait::async_trait]
impl WorkerHost for StaticHost {
    async fn prepare(&self, requested: &[String]) -> Result<(Vec<Policy>, Pipeline), HostError> {
        Ok((select_policies(&self.policies, requested)?, self.pipeline.clone()))
    }

    async fn record(&self, _item: SettledItem<'_>) -> Result<(), HostError> {
        Ok(())
    }
}

/// What an appeal's idempotency key ends with.
const APPEAL_SUFFIX: &str = ":appeal";

/// Tries of the host's record before an event is given back: 0.2 + 0.4 + 0.8 + 1.6 s of pauses between them.
const RECORD_ATTEMPTS: u32 = 5;

/// One worker: pulls content events and routes them through the pipeline until `stop` is set.
pub struct Worker {
    bus: Bus,
    host: Arc<dyn WorkerHost>,
    limits: InputLimits,
}

impl Worker {
    pub fn new(bus: Bus, pipeline: Pipeline, policies: Vec<Policy>) -> Self {
        Self::with_host(bus, Arc::new(StaticHost { pipeline, policies }))
    }

    pub fn with_host(bus: Bus, host: Arc<dyn WorkerHost>) -> Self {
        Self { bus, host, limits: InputLimits::default() }
    }

    pub async fn run(&self, stop: CancellationToken) -> Result<(), NatsError> {
        let cfg = &self.bus.config;
        let stream = self.bus.js.get_stream(&cfg.work_stream).await.map_err(setup_err)?;
        let consumer: consumer::PullConsumer = stream
            .get_or_create_consumer(
                &cfg.consumer,
                consumer::pull::Config {
                    durable_name: Some(cfg.consumer.clone()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: cfg.ack_wait,
                    ..Default::default()
                },
            )
            .await
            .map_err(setup_err)?;
        info!(consumer = %cfg.consumer, "NATS worker started");
        while !stop.is_cancelled() {
            let batch = consumer
                .fetch()
                .max_messages(cfg.batch.max(1))
                .expires(Duration::from_millis(500))
                .messages()
                .await
                .map_err(|e| NatsError::Stream(e.to_string()))?;
            let mut batch = std::pin::pin!(batch);
            while let Some(message) = batch.next().await {
                let message = match message {
                    Ok(message) => message,
                    Err(e) => {
                        warn!("pull failed: {e}");
                        break;
                    }
                };
                if let Some(pause) = self.handle(&message).await {
                    // Back-pressure: stop pulling until the budget refills; the NAKed event waits in the stream.
                    tokio::time::sleep(pause).await;
                    break;
                }
                if stop.is_cancelled() {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Handles one event; returns how long to pause pulling when the reasoning budget is spent.
    async fn handle(&self, message: &jetstream::Message) -> Option<Duration> {
        let payload: Option<Value> = serde_json::from_slice(&message.payload).ok();
        let item_id = payload.as_ref().and_then(|p| p.get("id")).and_then(Value::as_str).map(str::to_string);
        let key = message
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.as_str().to_string())
            .or_else(|| item_id.clone());
        let Some(key) = key else {
            return self
                .reject(message, "unknown".into(), None, "the event has neither a Nats-Msg-Id header nor an \"id\"")
                .await;
        };
        let appeal = payload.as_ref().and_then(|p| p.get("appeal")).and_then(Value::as_bool).unwrap_or(false);
        // An appeal of an item is a decision of its own: under the item's key the ledger would answer it with
        // the decision being appealed.
        // A producer may name the appeal's key itself (it must, to send it under the item's Nats-Msg-Id header
        // within the stream's duplicate window); the suffix is then not added twice.
        let key = if appeal && !key.ends_with(APPEAL_SUFFIX) { format!("{key}{APPEAL_SUFFIX}") } else { key };
        let line = String::from_utf8_lossy(&message.payload);
        let item = parse_item(&line, &self.limits);

        // Settled already (a redelivery after a crash between deciding and acking): record and publish again, ack.
        match self.bus.decided(&key).await {
            Ok(Some(event)) => {
                debug!(%key, "already decided; recording and publishing again");
                let content = item.as_ref().ok().map(|i| &i.content);
                if !self.record(message, &event, content).await {
                    return None;
                }
                if self.bus.publish_event(&event).await.is_ok() {
                    ack(message, AckKind::Ack).await;
                }
                return None;
            }
            Ok(None) => {}
            Err(e) => {
                warn!(%key, "cannot read the decided ledger: {e}");
                ack(message, AckKind::Nak(Some(Duration::from_secs(1)))).await;
                return None;
            }
        }

        let item = match item {
            Ok(item) => item,
            Err(e) => return self.reject(message, key, item_id, &e.to_string()).await,
        };
        let requested = match requested_policies(payload.as_ref()) {
            Ok(requested) => requested,
            Err(why) => return self.reject(message, key, item_id, &why).await,
        };
        let (policies, pipeline) = match self.host.prepare(&requested).await {
            Ok(prepared) => prepared,
            Err(HostError::Rejected(why)) => return self.reject(message, key, item_id, &why).await,
            Err(HostError::Unavailable(why)) => {
                warn!(%key, "cannot prepare the event now: {why}");
                ack(message, AckKind::Nak(Some(Duration::from_secs(1)))).await;
                return None;
            }
        };
        let _ = self
            .bus
            .publish_event(&DecisionEvent {
                key: key.clone(),
                item_id: item_id.clone(),
                status: EventStatus::Pending,
                decision: None,
                error: None,
                review: None,
            })
            .await;
        let ctx = RouteContext {
            appeal,
            // For the host's record (reviewers read it); taken out before the ledger and the decision stream.
            include_reasoning: true,
        };
        let decided = keep_alive(message, self.bus.config.ack_wait, pipeline.decide(&policies, &item.content, &ctx));
        let mut decision = match decided.await {
            Ok(decision) => decision,
            Err(deferred) => {
                ack(message, AckKind::Nak(Some(deferred.retry_after))).await;
                return Some(deferred.retry_after);
            }
        };
        let reasoning = strip_reasoning(&mut decision);
        let event = DecisionEvent {
            key: key.clone(),
            item_id,
            status: EventStatus::Decided,
            decision: Some(decision),
            error: None,
            review: None,
        };
        self.settle(message, event, Some(&item.content), reasoning).await;
        None
    }

    /// Hands a settled decision to the host; on failure the event is NAKed and `false` returned.
    ///
    /// A host that is unavailable (its database restarting) is asked again here a few times first: the chain of
    /// thought exists only in this worker's memory, so a redelivery could record the decision but not it.
    async fn record(&self, message: &jetstream::Message, event: &DecisionEvent, content: Option<&Content>) -> bool {
        let Some(decision) = &event.decision else { return true };
        let settled = SettledItem { key: &event.key, item_id: event.item_id.as_deref(), content, decision };
        let attempts = async {
            let mut pause = Duration::from_millis(200);
            for _ in 1..RECORD_ATTEMPTS {
                match self.host.record(settled).await {
                    Err(HostError::Unavailable(e)) => {
                        debug!(key = %event.key, "cannot record the decision yet, trying again: {e}");
                        tokio::time::sleep(pause).await;
                        pause *= 2;
                    }
                    done => return done,
                }
            }
            self.host.record(settled).await
        };
        match keep_alive(message, self.bus.config.ack_wait, attempts).await {
            Ok(()) => true,
            Err(e) => {
                warn!(key = %event.key, "cannot record the decision yet: {e}");
                ack(message, AckKind::Nak(Some(Duration::from_secs(1)))).await;
                false
            }
        }
    }

    async fn reject(
        &self,
        message: &jetstream::Message,
        key: String,
        item_id: Option<String>,
        error: &str,
    ) -> Option<Duration> {
        warn!(%key, %error, "rejecting a content event");
        let event = DecisionEvent {
            key,
            item_id,
            status: EventStatus::Rejected,
            decision: None,
            error: Some(error.to_string()),
            review: None,
        };
        self.settle(message, event, None, None).await;
        None
    }

    /// Records the event's final state exactly once in the ledger, hands it to the host, publishes it, then
    /// acks. `reasoning` is the chain of thought kept out of the ledger and the published event, for the host.
    async fn settle(
        &self,
        message: &jetstream::Message,
        event: DecisionEvent,
        content: Option<&Content>,
        reasoning: Option<Vec<Vec<String>>>,
    ) {
        let ours = event_id(&event);
        let stored = match self.bus.record_once(&event).await {
            Ok(true) => event,
            Ok(false) => {
                // Another worker decided the same key first; its decision is the one.
                match self.bus.decided(&event.key).await {
                    Ok(Some(theirs)) => theirs,
                    _ => return,
                }
            }
            Err(e) => {
                warn!(key = %event.key, "cannot record the decision: {e}");
                ack(message, AckKind::Nak(Some(Duration::from_secs(1)))).await;
                return;
            }
        };
        let mut for_host = stored.clone();
        if let (Some(decision), Some(reasoning)) = (for_host.decision.as_mut(), reasoning)
            && Some(decision.id) == ours
        {
            for (step, chain) in decision.reasoning.iter_mut().zip(reasoning) {
                step.reasoning = chain;
            }
        }
        if !self.record(message, &for_host, content).await {
            return;
        }
        match self.bus.publish_event(&stored).await {
            Ok(()) => ack(message, AckKind::Ack).await,
            // Recorded but not announced: the redelivery will find it in the ledger and publish it.
            Err(e) => warn!(key = %stored.key, "cannot publish the decision: {e}"),
        }
    }
}

async fn ack(message: &jetstream::Message, kind: AckKind) {
    if let Err(e) = message.ack_with(kind).await {
        warn!("ack failed (the event will be redelivered): {e}");
    }
}

fn event_id(event: &DecisionEvent) -> Option<uuid::Uuid> {
    event.decision.as_ref().map(|d| d.id)
}

/// Takes the chain of thought out of a decision (per reasoning step), so that it goes to the host's
/// access-controlled record but not into the ledger or onto the decision stream, which any subscriber reads.
fn strip_reasoning(decision: &mut CascadeDecision) -> Option<Vec<Vec<String>>> {
    let taken: Vec<Vec<String>> = decision.reasoning.iter_mut().map(|d| std::mem::take(&mut d.reasoning)).collect();
    taken.iter().any(|r| !r.is_empty()).then_some(taken)
}

/// Runs `work` while telling the server every half `ack_wait` that the event is still being worked on.
async fn keep_alive<T>(message: &jetstream::Message, ack_wait: Duration, work: impl Future<Output = T>) -> T {
    let mut work = std::pin::pin!(work);
    let period = (ack_wait / 2).max(Duration::from_millis(100));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = ticker.tick() => {
                if let Err(e) = message.ack_with(AckKind::Progress).await {
                    debug!("progress ack failed: {e}");
                }
            }
        }
    }
}

/// The policies an event names: `"policies": "name"` or `["name" | "sha256:…", …]`; empty when it names none.
/// Anything else is an error, not a reason to fall back to the default set: an event judged under policies it
/// did not ask for could be allowed without the one it named ever being checked.
fn requested_policies(payload: Option<&Value>) -> Result<Vec<String>, String> {
    let kind = |value: &Value| match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object (inline policies are not accepted on the bus; store the policy first)",
    };
    match payload.and_then(|p| p.get("policies")) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(name)) => Ok(vec![name.clone()]),
        Some(Value::Array(names)) => names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                name.as_str().map(str::to_string).ok_or_else(|| {
                    format!("\"policies\"[{i}] is {}, not a policy name or \"sha256:…\" version", kind(name))
                })
            })
            .collect(),
        Some(other) => Err(format!("\"policies\" is {}; expected a policy name or a list of them", kind(other))),
    }
}

/// The named policies out of `all`, or all of them when none are named. A name that is not among them is an
/// error: deciding on the others alone would answer for a policy that was never checked.
fn select_policies(all: &[Policy], names: &[String]) -> Result<Vec<Policy>, HostError> {
    if names.is_empty() {
        return Ok(all.to_vec());
    }
    names
        .iter()
        .map(|name| {
            all.iter()
                .find(|p| *name == p.meta.name || *name == p.hash.to_string())
                .cloned()
                .ok_or_else(|| HostError::Rejected(format!("this worker does not serve a policy {name:?}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_names_its_policies_or_is_refused() {
        let requested = |payload: Value| requested_policies(Some(&payload));
        assert_eq!(requested(serde_json::json!({"text": "x"})), Ok(vec![]));
        assert_eq!(requested(serde_json::json!({"policies": "hate"})), Ok(vec!["hate".to_string()]));
        assert_eq!(
            requested(serde_json::json!({"policies": ["hate", "sha256:ab"]})),
            Ok(vec!["hate".to_string(), "sha256:ab".to_string()])
        );
        let mixed = requested(serde_json::json!({"policies": ["hate", 7]})).unwrap_err();
        assert!(mixed.contains("[1] is a number"), "{mixed}");
        let inline = requested(serde_json::json!({"policies": [{"text": "# P"}]})).unwrap_err();
        assert!(inline.contains("inline policies"), "{inline}");
        assert!(requested(serde_json::json!({"policies": {"name": "hate"}})).is_err());

        let spam = Policy::parse("---\nname: spam\noutput: binary\n---\n# Spam\nReturn 1 for spam, else 0.").unwrap();
        let all = [spam.clone()];
        assert_eq!(select_policies(&all, &[]).unwrap().len(), 1);
        assert_eq!(select_policies(&all, &[spam.hash.to_string()]).unwrap()[0].meta.name, "spam");
        let missing = select_policies(&all, &["spam".into(), "hate".into()]).unwrap_err();
        assert!(matches!(&missing, HostError::Rejected(why) if why.contains("\"hate\"")), "{missing:?}");
    }

    #[test]
    fn tokens_are_safe_for_subjects() {
        assert_eq!(subject_token("item-42_a"), "item-42_a");
        let hashed = subject_token("user/123 ?*>");
        assert!(hashed.starts_with('h') && hashed.len() == 41 && hashed.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_eq!(hashed, subject_token("user/123 ?*>"), "stable");
        assert_ne!(subject_token(""), "");
    }
}

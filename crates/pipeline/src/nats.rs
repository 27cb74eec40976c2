//! Async ingestion over NATS JetStream: content events in, decisions out.
//!
//! Delivery is at-least-once, decisions are exactly-once per idempotency key:
//! - content arrives on `{prefix}.content.>` in the work stream, read by a shared durable pull consumer, so any
//!   number of workers split the load;
//! - each event's idempotency key (the `Nats-Msg-Id` header, else the payload's `id`) is looked up in a ledger
//!   stream of settled decisions (one subject per key). A redelivered event whose decision exists is re-published, not re-decided;
//! - a ledger entry holds the digest of the body it judged ([`body_digest`]: the content and the policies named). A key
//!   settled for another body (an edited post sent again under its id) is never answered with that decision: the
//!   new body is decided and goes to a person, apart from the ledger; an entry from before digests matches any body;
//! - a new decision is written to the ledger with `Nats-Expected-Last-Subject-Sequence: 0`, which the server
//!   refuses if another worker got there first (then that one's decision stands), published to `{prefix}.decisions.{key}` with the key as `Nats-Msg-Id` (the
//!   stream's duplicate window drops a re-publish), then handed to the host, and only then is the event acked.
//!   Published before it is recorded: a person can only review what the host recorded, so a producer always
//!   hears `decided` before `reviewed`. A redelivery whose key's subject already ends with a person's word on
//!   that decision does not publish `decided` again (past the duplicate window it would put the producer back on
//!   hold); the check and the publish are one step, the publish conditional on the subject's last message being
//!   the one checked, so a `reviewed` published in between by another server is never followed;
//! - an event with `"appeal": true` is decided under the key `<key>:appeal`, apart from the item it appeals, and
//!   handed to the host with the decision it appeals ([`SettledItem::appeal_of`], read from the ledger);
//! - a `pending` status is published on receipt, so producers can hold the content until the decision comes;
//!   an item that ends with a person is published as `decided` with outcome `needs_review`, and then as
//!   `reviewed` when a person decides it (by the host: `safeguard serve` publishes it from its review API);
//! - when the reasoning budget is spent the event is NAKed with the budget's retry delay and the worker
//!   pauses pulling: back-pressure instead of dropping or allowing;
//! - while an item is being decided the worker tells the server it is still working on it (progress acks),
//!   and so it does for the fetched events waiting their turn behind it, so a slow decision is not handed to a
//!   second worker after `ack_wait`;
//! - a ledger entry that cannot be read, or that belongs to another key, is never taken as "not decided" or as
//!   this item's decision: the first holds the event back (NAKs with a growing delay), the second sends the
//!   item to a person. An event without any key is rejected under its stream sequence, outside the ledger;
//! - a decision too large for NATS is settled as `needs_review` without its evidence (the host records it
//!   whole), since given back it would be decided again forever;
//! - a panic while deciding an item (a bug, in a reasoner say) settles it as `needs_review` for a person, as a
//!   failed stage would: given back, it would take down every worker it reached in turn. A panic anywhere else
//!   in handling an event gives the event back with the growing delay, and the worker goes on;
//! - once the ledger holds a decision, the host or NATS being unavailable is waited out (the event kept alive,
//!   for up to [`PERSIST_FOR`] or until the worker stops): the chain of thought exists only in this worker's
//!   memory, and a redelivery would record the ledger's copy without it. A ledger write that fails is not
//!   waited out: the event is given back and decided again;
//! - an event is held to the worker's [`ContentLimits`] (the server passes its own), in characters and tokens,
//!   and to the model's context at the most effort its route can reach; an appeal whose content fits as an item
//!   but not at high effort goes to a person without the model, as content the route accepts;
//! - the program the worker runs in ([`WorkerHost`]) chooses the policies and pipeline per event and records
//!   each settled decision (e.g. in `safeguard serve`'s database) before the event is acked. A redelivered
//!   event whose decision is already in the ledger is recorded again, so the host must be idempotent by the
//!   decision id: that makes its record exactly-once too.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, consumer, stream};
use futures::{FutureExt, Stream, StreamExt};
use safeguard_core::input::{InputLimits, check_length, parse_item};
use safeguard_harmony::{Content, Tokenizer, user_message_text};
use safeguard_policy::Policy;
use safeguard_verdict::Outcome;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::cascade::{CascadeDecision, Escalation, Pipeline, PolicyRoute, RouteContext, Stage};

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
    /// How long the decision stream and the ledger keep what they hold (`serve --retain-days`); `None` keeps it
    /// for good. A key whose ledger entry has aged out is decided again if it is ever sent again.
    pub retain: Option<Duration>,
}

impl NatsConfig {
    /// The server address(es) as errors and logs may show them: without the `user:password@` or `token@` a NATS
    /// URL may carry. A comma-separated list of servers stays a list.
    pub fn shown_url(&self) -> String {
        let shown = self.url.split(',').map(|server| {
            let server = server.trim();
            let (scheme, rest) = server.split_once("://").map_or(("", server), |(scheme, rest)| (scheme, rest));
            let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
            if scheme.is_empty() { host.to_string() } else { format!("{scheme}://{host}") }
        });
        shown.collect::<Vec<_>>().join(",")
    }

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
            retain: None,
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

    /// Whether NATS would take these names, said before connecting: a stream named `a.b` or a subject prefix
    /// with a space is refused only at setup, and a server would retry that setup every 30 s forever.
    pub fn check_names(&self) -> Result<(), String> {
        let tokens_ok = !self.prefix.is_empty()
            && self.prefix.split('.').all(|token| {
                !token.is_empty() && !token.contains(['*', '>']) && !token.chars().any(char::is_whitespace)
            });
        if !tokens_ok {
            return Err(format!(
                "subject prefix {:?}: dot-separated tokens, each non-empty, without spaces, `*` or `>`",
                self.prefix
            ));
        }
        let bad = |c: char| c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>' | '/' | '\\');
        for name in [&self.work_stream, &self.decision_stream, &self.decided_stream, &self.consumer] {
            if name.is_empty() || name.len() > 255 || name.contains(bad) {
                return Err(format!(
                    "stream or consumer name {name:?}: at most 255 characters, without spaces, `.`, `*`, `>`, `/` or `\\`"
                ));
            }
        }
        Ok(())
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
    /// More than NATS (`max_payload`) or the stream (`max_msg_size`) takes: sending it again cannot succeed.
    #[error("too large for NATS: {0}")]
    TooLarge(String),
    /// The ledger holds something for the key that is not a settled event: neither "decided" nor "not decided".
    #[error("the decided ledger's entry for {key:?} does not parse: {detail}")]
    BadLedgerEntry { key: String, detail: String },
}

fn setup_err(e: impl std::fmt::Display) -> NatsError {
    NatsError::Setup(e.to_string())
}

fn publish_err(e: jetstream::context::PublishError) -> NatsError {
    if too_large(&e) { NatsError::TooLarge(e.to_string()) } else { NatsError::Stream(e.to_string()) }
}

/// Whether a publish was refused for its size: by the client against the server's `max_payload`, or by the
/// stream against its `max_msg_size`.
fn too_large(e: &jetstream::context::PublishError) -> bool {
    e.kind() == jetstream::context::PublishErrorKind::MaxPayloadExceeded
        || std::error::Error::source(e)
            .and_then(|source| source.downcast_ref::<jetstream::Error>())
            .is_some_and(|api| api.error_code() == jetstream::ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM)
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
    /// What was judged under the key ([`body_digest`]), on settled events: a later event under the key with
    /// another body is not this decision's. Ledger entries written before it existed have none; they answer for
    /// any body under their key, as they did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_digest: Option<String>,
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
    /// The decision the person decided: the item's own, or for an appeal made over HTTP, the appeal's.
    pub decision_id: String,
    /// For an appeal, the decision it appealed: the one the producer was told about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub appeal_of: Option<String>,
    pub review_id: String,
    /// `allow` or `violation`.
    pub outcome: String,
    /// The policy rule the person applied, and the version it is from.
    pub rule_id: Option<String>,
    pub policy_hash: Option<String>,
    /// Unix milliseconds.
    pub decided_at: Option<i64>,
}

/// The stream named in `config`, created if it does not exist yet. Two processes starting together (workers
/// sharing a stream, a producer and a server) both find it missing and both create it; NATS then refuses the
/// later create (as overlapping the earlier one's subjects, or as a name in use), though the stream is there as
/// asked. So a refused create is followed by a look: the stream found then is the one to use.
async fn open_stream(js: &jetstream::Context, config: stream::Config, what: &str) -> Result<stream::Stream, NatsError> {
    let name = config.name.clone();
    let mut attempts = 0;
    loop {
        attempts += 1;
        match js.get_or_create_stream(config.clone()).await {
            Ok(stream) => return Ok(stream),
            Err(e) if attempts < 3 => {
                if let Ok(stream) = js.get_stream(&name).await {
                    debug!(stream = %name, "the {what} was created by another process meanwhile: {e}");
                    return Ok(stream);
                }
                tokio::time::sleep(Duration::from_millis(100 * attempts)).await;
            }
            Err(e) => return Err(NatsError::Setup(format!("{what}: {e}"))),
        }
    }
}

/// A stream created before (by another worker, or before `--retain-days` was set) keeps the age limit it was made
/// with; this one gives it the retention asked for (`None` leaves it as it is: a worker started without
/// `--retain-days` must not lift the limit others set).
async fn keep_for(
    js: &jetstream::Context,
    mut stream: stream::Stream,
    retain: Option<Duration>,
    what: &str,
) -> Result<stream::Stream, NatsError> {
    let config = &stream.cached_info().config;
    let Some(max_age) = retain.filter(|max_age| *max_age != config.max_age) else { return Ok(stream) };
    tracing::info!(stream = %config.name, from = ?config.max_age, to = ?max_age, "changing how long the {what} keeps messages");
    let changed = stream::Config { max_age, ..config.clone() };
    // Not being allowed to change it (credentials without STREAM.UPDATE) leaves the stream as it was; the bus
    // works the same, it only keeps messages longer than asked.
    match js.update_stream(&changed).await {
        Ok(_) => {
            stream.info().await.map_err(|e| NatsError::Setup(format!("{what}: {e}")))?;
        }
        Err(e) => tracing::warn!(stream = %changed.name, "cannot change how long the {what} keeps messages: {e}"),
    }
    Ok(stream)
}

/// Connected JetStream handles for one worker (or a producer/observer in tests).
#[derive(Clone)]
pub struct Bus {
    pub config: NatsConfig,
    pub js: jetstream::Context,
    /// The ledger of settled keys: one message per key, written only if none exists yet.
    pub decided: stream::Stream,
    /// The decision stream, read back to see whether a person's decision on an item is already out.
    decision_log: stream::Stream,
}

impl Bus {
    /// Connects and creates the work, decision and ledger streams if they do not exist yet.
    pub async fn connect(config: NatsConfig) -> Result<Bus, NatsError> {
        let client = async_nats::connect(&config.url)
            .await
            .map_err(|e| NatsError::Connect { url: config.shown_url(), detail: e.to_string() })?;
        let js = jetstream::new(client);
        let work = stream::Config {
            name: config.work_stream.clone(),
            subjects: vec![format!("{}.content.>", config.prefix)],
            // An event leaves the work stream once a worker acks it.
            retention: stream::RetentionPolicy::WorkQueue,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        open_stream(&js, work, "work stream").await?;
        let max_age = config.retain.unwrap_or_default();
        let decisions = stream::Config {
            name: config.decision_stream.clone(),
            subjects: vec![format!("{}.decisions.>", config.prefix)],
            duplicate_window: Duration::from_secs(120),
            max_age,
            ..Default::default()
        };
        let decision_log = open_stream(&js, decisions, "decision stream").await?;
        let decision_log = keep_for(&js, decision_log, config.retain, "decision stream").await?;
        let ledger = stream::Config {
            name: config.decided_stream.clone(),
            subjects: vec![format!("{}.decided.>", config.prefix)],
            max_messages_per_subject: 1,
            max_age,
            ..Default::default()
        };
        let decided = open_stream(&js, ledger, "decided ledger").await?;
        let decided = keep_for(&js, decided, config.retain, "decided ledger").await?;
        Ok(Bus { config, js, decided, decision_log })
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
            // Read as "not decided", an entry that does not parse would have the item decided again, and the ledger
            // would refuse that decision's write anyway.
            Ok(message) => serde_json::from_slice(&message.payload)
                .map(Some)
                .map_err(|e| NatsError::BadLedgerEntry { key: key.to_string(), detail: e.to_string() }),
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
        let ack = self.js.publish_with_headers(subject, headers, body.into()).await.map_err(publish_err)?.await;
        match ack {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => Ok(false),
            Err(e) => Err(publish_err(e)),
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
            body_digest: None,
        };
        self.publish_event(&event).await
    }

    async fn publish_event(&self, event: &DecisionEvent) -> Result<(), NatsError> {
        self.publish_as(&subject_token(&event.key), &status_msg_id(event), event).await
    }

    /// Publishes `event` on its key's decision subject under the message id `id`, unless the subject already ends
    /// with an event that `answered` says answers it (a person's word, published by the announcer of any server).
    /// The check and the publish are one step: the publish is conditional on the subject's last message being the
    /// one read (`Nats-Expected-Last-Subject-Sequence`), so an event published in between cannot end up before
    /// this one; refused, the subject is read again and the check made anew. A subject that cannot be read is
    /// published on all the same: a producer that never heard the event would wait for good.
    async fn publish_unless(
        &self,
        id: &str,
        event: &DecisionEvent,
        answered: impl Fn(&DecisionEvent) -> bool,
    ) -> Result<Published, NatsError> {
        let token = subject_token(&event.key);
        for _ in 0..CONDITIONAL_TRIES {
            let Some((sequence, last)) = self.last_on_subject(&event.key).await else {
                self.publish_as(&token, id, event).await?;
                return Ok(Published::Sent);
            };
            if last.as_ref().is_some_and(&answered) {
                return Ok(Published::Answered);
            }
            if self.publish_after(&token, id, event, Some(sequence)).await? {
                return Ok(Published::Sent);
            }
            debug!(key = ?event.key, "the decision subject moved on since it was read; reading it again");
        }
        // Events keep landing on the subject: given back to the caller, which tries again after a pause.
        Err(NatsError::Stream(format!("the decision subject of {:?} kept changing while publishing on it", event.key)))
    }

    /// The sequence of the last message on `key`'s decision subject (0 when there is none) and that message as
    /// an event (`None` if it does not parse); `None` when the subject cannot be read.
    async fn last_on_subject(&self, key: &str) -> Option<(u64, Option<DecisionEvent>)> {
        let subject = self.config.decision_subject(&subject_token(key));
        match self.decision_log.get_last_raw_message_by_subject(&subject).await {
            Ok(last) => Some((last.sequence, serde_json::from_slice::<DecisionEvent>(&last.payload).ok())),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Some((0, None)),
            Err(e) => {
                debug!(?key, "cannot read the decision subject back: {e}");
                None
            }
        }
    }

    /// Publishes `event` on `{prefix}.decisions.{subject}` under the message id `id`.
    async fn publish_as(&self, subject: &str, id: &str, event: &DecisionEvent) -> Result<(), NatsError> {
        self.publish_after(subject, id, event, None).await.map(|_| ())
    }

    /// [`Self::publish_as`], only if the subject's last message is still `last` (its sequence; 0: none) when one
    /// is given. `Ok(false)`: it is not, and nothing was published.
    async fn publish_after(
        &self,
        subject: &str,
        id: &str,
        event: &DecisionEvent,
        last: Option<u64>,
    ) -> Result<bool, NatsError> {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", id);
        if let Some(last) = last {
            headers.insert("Nats-Expected-Last-Subject-Sequence", last.to_string().as_str());
        }
        let body = serde_json::to_vec(event).map_err(|e| NatsError::Stream(e.to_string()))?;
        let ack = self
            .js
            .publish_with_headers(self.config.decision_subject(subject), headers, body.into())
            .await
            .map_err(publish_err)?
            .await;
        match ack {
            Ok(_) => Ok(true),
            Err(e) if last.is_some() && e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                Ok(false)
            }
            Err(e) => Err(publish_err(e)),
        }
    }
}

/// How often [`Bus::publish_unless`] reads a subject again that moved on since it was read.
const CONDITIONAL_TRIES: usize = 4;

/// What [`Bus::publish_unless`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Published {
    Sent,
    /// Not published: the subject's last event answers it already.
    Answered,
}

/// Whether `last`, the last event on a settled event's decision subject, is a person's decision on that event's
/// decision (`id`), or on an appeal of it. Such a decision was announced before it could be reviewed (it is
/// published before the host records it); announced again now, it would follow the person's word and hold the
/// item once more.
fn reviews_decision(last: &DecisionEvent, id: uuid::Uuid) -> bool {
    let id = id.to_string();
    last.status == EventStatus::Reviewed
        && last.review.as_ref().is_some_and(|r| r.decision_id == id || r.appeal_of.as_deref() == Some(id.as_str()))
}

/// The `Nats-Msg-Id` of a key's event: the duplicate window drops a second publish of the same status for the same
/// key (of the same review: an appeal can be reviewed again).
fn status_msg_id(event: &DecisionEvent) -> String {
    let token = subject_token(&event.key);
    match &event.review {
        Some(review) => format!("{token}:{:?}:{}", event.status, review.review_id),
        None => format!("{token}:{:?}", event.status),
    }
}

/// A subject token for any idempotency key: the user's key may hold characters subjects do not allow.
///
/// One token per key and one key per token (a key's ledger slot is its token's): a key that is already a clean
/// token is used as it is, unless it has the shape of a hashed one, `h` and 40 hex digits, which could be another
/// key's hash; such a key is hashed too.
pub fn subject_token(key: &str) -> String {
    let clean = !key.is_empty()
        && key.len() <= 64
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && !looks_hashed(key);
    if clean { key.to_string() } else { format!("h{}", &hex::encode(Sha256::digest(key.as_bytes()))[..40]) }
}

fn looks_hashed(token: &str) -> bool {
    token.len() == 41
        && token.starts_with('h')
        && token.bytes().skip(1).all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Why a host could not serve an event.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The event can never be decided as it is (e.g. it names more policies than allowed): it is rejected.
    #[error("{0}")]
    Rejected(String),
    /// A policy the event names is not stored, or not yet: the event is rejected, but not for good. The rejection
    /// goes to the producer and not into the ledger, so the event sent again once the policy is stored is decided
    /// (as a request over HTTP would be).
    #[error("{0}")]
    NotStored(String),
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
    /// For an appeal (its key ends with `:appeal`), the decision the ledger holds under the item's own key,
    /// which it appeals; `None` when the bus never decided the item. Only as good as the ledger: a host that acts
    /// on it checks that the decision is the item's.
    pub appeal_of: Option<&'a str>,
}

/// The program a worker runs in: where policies come from and where decisions go.
#[async_trait::async_trait]
pub trait WorkerHost: Send + Sync {
    /// The policies an event is judged under and the pipeline to judge them with. `requested` is what the
    /// event named in `"policies"` (names or `sha256:` versions); empty means the host's default set.
    async fn prepare(&self, requested: &[String]) -> Result<(Vec<Policy>, Pipeline), HostError>;

    /// Records a settled decision once it is published, before its event is acked. Called again for the same
    /// decision when an event is redelivered after a crash, so it must be idempotent by `item.decision.id`.
    /// [`HostError::Unavailable`] is asked again (with growing pauses) until it succeeds or the worker stops.
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
pub const APPEAL_SUFFIX: &str = ":appeal";

/// The first pause before a decision in hand is recorded or published again, doubled per try up to
/// [`PERSIST_PAUSE_MAX`].
const PERSIST_PAUSE_FIRST: Duration = Duration::from_millis(200);
const PERSIST_PAUSE_MAX: Duration = Duration::from_secs(5);

/// How long a decision in hand is kept trying before its event is given back (NAK) as before: long enough for a
/// database restart or a failover, short enough that a failure that repeats every time (a bug, a deleted stream)
/// does not hold this worker, and the events it has fetched, until shutdown.
const PERSIST_FOR: Duration = Duration::from_secs(300);

/// What a content event may hold. The server passes its own HTTP limits, so that the bus is no way around them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentLimits {
    /// Longest content in characters (all messages together), checked before anything is tokenized.
    pub max_chars: usize,
    /// Longest content in the model's tokens (of the user message the model reads); `None` checks none.
    pub max_tokens: Option<usize>,
}

impl Default for ContentLimits {
    /// What a bare worker allows: the item parser's character limit, no token limit.
    fn default() -> Self {
        Self { max_chars: InputLimits::default().max_chars, max_tokens: None }
    }
}

impl ContentLimits {
    /// Why `content` is over the token limit, if it is.
    fn over_tokens(&self, content: &Content) -> Option<String> {
        let limit = self.max_tokens?;
        let tokens = Tokenizer::shared().count(&user_message_text(content));
        (tokens > limit).then(|| format!("the content is {tokens} tokens; the limit is {limit}"))
    }
}

/// Why an item goes to a person when deciding it panicked.
pub const DECIDE_PANICKED: &str = "deciding the item panicked (a bug)";

/// One worker: pulls content events and routes them through the pipeline until `stop` is set.
pub struct Worker {
    bus: Bus,
    host: Arc<dyn WorkerHost>,
    limits: ContentLimits,
    started: Option<Box<dyn Fn() + Send + Sync>>,
    /// What events are kept alive against, in milliseconds: the shorter of this worker's `ack_wait` and the one
    /// the server holds for the consumer (the durable consumer keeps the setting of the worker that created it).
    ack_wait_ms: std::sync::atomic::AtomicU64,
}

impl Worker {
    pub fn new(bus: Bus, pipeline: Pipeline, policies: Vec<Policy>) -> Self {
        Self::with_host(bus, Arc::new(StaticHost { pipeline, policies }))
    }

    pub fn with_host(bus: Bus, host: Arc<dyn WorkerHost>) -> Self {
        let ack_wait_ms = std::sync::atomic::AtomicU64::new(millis(bus.config.ack_wait));
        Self { bus, host, limits: ContentLimits::default(), started: None, ack_wait_ms }
    }

    /// Holds events to `limits` instead of [`ContentLimits::default`]; one over them is rejected.
    pub fn with_limits(mut self, limits: ContentLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Called once the worker's consumer is in place and it starts pulling: how a host tells a worker that is
    /// serving from one still connecting, or failing at setup over and over.
    pub fn on_started(mut self, hook: impl Fn() + Send + Sync + 'static) -> Self {
        self.started = Some(Box::new(hook));
        self
    }

    /// How long the server waits for an event's ack before it hands the event to another worker.
    fn ack_wait(&self) -> Duration {
        Duration::from_millis(self.ack_wait_ms.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Pulls and decides events until `stop`. Returns an error when pulling fails (the consumer deleted, the
    /// stream gone, a status JetStream does not retry): pulling again at once would fail the same way in a tight
    /// loop, and the host's supervisor starts the worker again after a pause, which sets the consumer up anew.
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
        // Kept alive against the shorter of the two: the server's is what redelivers, and a longer one set here
        // must not let events lapse to another worker.
        let held = consumer.cached_info().config.ack_wait;
        if held != cfg.ack_wait {
            warn!(
                consumer = %cfg.consumer,
                "the consumer's ack wait is {held:?} (set by the worker that created it), not the {:?} asked for; \
                 keeping events alive against the shorter",
                cfg.ack_wait
            );
        }
        let effective = if held.is_zero() { cfg.ack_wait } else { held.min(cfg.ack_wait) };
        self.ack_wait_ms.store(millis(effective), std::sync::atomic::Ordering::Relaxed);
        info!(consumer = %cfg.consumer, "NATS worker started");
        if let Some(started) = &self.started {
            started();
        }
        while !stop.is_cancelled() {
            let batch = consumer
                .fetch()
                .max_messages(cfg.batch.max(1))
                .expires(FETCH_EXPIRES)
                .messages()
                .await
                .map_err(|e| NatsError::Stream(e.to_string()))?;
            match self.work_through(batch, &stop).await {
                Worked::On => {}
                Worked::Pause(pause) => {
                    // Back-pressure: stop pulling until the budget refills; the NAKed events wait in the stream. A
                    // pause can last up to an hour, so it ends early when the worker is stopped.
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
                Worked::PullFailed(e) => return Err(NatsError::Stream(format!("pulling events failed: {e}"))),
            }
        }
        Ok(())
    }

    /// Handles a fetched batch, one event after another; says whether to pull again, pause pulling (the reasoning
    /// budget is spent) or stop (pulling failed).
    ///
    /// Every event of a batch is delivered, and its `ack_wait` running, from the moment it is fetched: those
    /// waiting their turn are kept alive (progress acks) while the ones ahead of them are decided, else a slow
    /// item ahead would have them handed to another worker and decided twice. Those not started when the worker
    /// stops or pauses go back to the stream at once.
    async fn work_through<E: std::fmt::Display>(
        &self,
        batch: impl Stream<Item = Result<jetstream::Message, E>>,
        stop: &CancellationToken,
    ) -> Worked {
        let mut batch = std::pin::pin!(batch);
        // Whether the fetch may still deliver; a finished stream is not polled again.
        let mut open = true;
        // A pull that failed while an event was being handled: the worker stops once what it holds is done.
        let mut failed: Option<String> = None;
        let mut waiting: VecDeque<jetstream::Message> = VecDeque::new();
        let period = keep_alive_period(self.ack_wait());
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if stop.is_cancelled() {
                give_back(waiting, batch.as_mut(), open, None).await;
                return Worked::On;
            }
            let message = match waiting.pop_front() {
                Some(message) => message,
                None if open => match batch.next().await {
                    Some(Ok(message)) => message,
                    // Nothing is held: every event fetched before it was handled.
                    Some(Err(e)) => return Worked::PullFailed(e.to_string()),
                    None => return Worked::On,
                },
                None => return failed.map_or(Worked::On, Worked::PullFailed),
            };
            let handled = {
                let mut handling = std::pin::pin!(AssertUnwindSafe(self.handle(&message, stop)).catch_unwind());
                loop {
                    tokio::select! {
                        biased;
                        handled = &mut handling => break handled,
                        next = batch.next(), if open => match next {
                            Some(Ok(next)) => waiting.push_back(next),
                            Some(Err(e)) => {
                                failed = Some(e.to_string());
                                open = false;
                            }
                            None => open = false,
                        },
                        // The event in hand too, for the whole of its handling: the steps' own keep-alives each
                        // start a full period late, and the reads and publishes between them have none.
                        _ = ticker.tick() => {
                            for held in std::iter::once(&message).chain(&waiting) {
                                progress(held).await;
                            }
                        }
                    }
                }
            };
            let handled = match handled {
                Ok(handled) => handled,
                Err(panic) => {
                    // A bug outside deciding (in the host's record, say). Unwinding on would end the worker and
                    // leave this event and those waiting unanswered until `ack_wait`; given back with the growing
                    // delay, a fault that lasts costs a look now and then instead.
                    let sequence = message.info().map(|info| info.stream_sequence).ok();
                    error!(
                        ?sequence,
                        panic = panic_message(panic.as_ref()),
                        "handling a content event panicked; giving it back"
                    );
                    metrics::counter!("safeguard_nats_handle_panics_total").increment(1);
                    retry(&message, GivenBack::HandlePanicked).await;
                    None
                }
            };
            if let Some(pause) = handled {
                // The rest would only find the budget spent too: back to the stream, to come again after the pause.
                give_back(waiting, batch.as_mut(), open, Some(pause)).await;
                return Worked::Pause(pause);
            }
        }
    }

    /// Handles one event; returns how long to pause pulling when the reasoning budget is spent. Every way out
    /// acks the event, NAKs it, or (for one that can never be settled) terminates it.
    async fn handle(&self, message: &jetstream::Message, stop: &CancellationToken) -> Option<Duration> {
        let payload: Option<Value> = serde_json::from_slice(&message.payload).ok();
        // A number is an id as over HTTP (`"id": 42` is item "42"), not a missing one.
        let item_id = payload.as_ref().and_then(|p| p.get("id")).and_then(|id| match id {
            Value::String(id) => Some(id.clone()),
            Value::Number(id) => Some(id.to_string()),
            _ => None,
        });
        let key = message
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.as_str().to_string())
            .filter(|key| !key.is_empty())
            .or_else(|| item_id.clone().filter(|id| !id.is_empty()));
        let Some(key) = key else {
            return self.reject_unkeyed(message, "the event has neither a Nats-Msg-Id header nor an \"id\"").await;
        };
        // Every event about the key carries it whole: one of a megabyte could never be written to the ledger, and
        // the producer would hear nothing at all.
        if key.len() > MAX_KEY_BYTES {
            let error = format!(
                "the event's key (its Nats-Msg-Id, else its \"id\") is {} bytes; at most {MAX_KEY_BYTES}",
                key.len()
            );
            return self.reject_unkeyed(message, &error).await;
        }
        // Left out when longer than a key may be, for the same reason; a prefix would be another item's id. The
        // producer finds the answer under the key.
        let item_id = item_id.filter(|id| id.len() <= MAX_KEY_BYTES);
        // Before the ledger is read: it would answer "appeal": "true" with the decision being appealed.
        if let Err(why) = event_fields_read_as_sent(payload.as_ref()) {
            return self.reject_malformed(message, key, item_id, &why).await;
        }
        let appeal = payload.as_ref().and_then(|p| p.get("appeal")).and_then(Value::as_bool).unwrap_or(false);
        // An appeal of an item is a decision of its own: under the item's key the ledger would answer it with
        // the decision being appealed.
        // A producer may name the appeal's key itself (it must, to send it under the item's Nats-Msg-Id header
        // within the stream's duplicate window); the suffix is then not added twice.
        let key = if appeal && !key.ends_with(APPEAL_SUFFIX) { format!("{key}{APPEAL_SUFFIX}") } else { key };
        let line = String::from_utf8_lossy(&message.payload);
        // Read without this worker's length limit, so that the body's digest, and the ledger's answer for it, is the
        // same on every worker: one with a lower limit (a rolling deploy that lowered it) would take a redelivery of
        // a body decided elsewhere for another body, and reject it over a decision nobody recorded. The limit is
        // applied once the ledger is read, as the token limit is. The payload is bounded by the bus's own limit.
        let item = parse_item(&line, &InputLimits { max_chars: usize::MAX });
        let requested = requested_policies(payload.as_ref());
        let digest = body_digest(
            item.as_ref().map(|i| &i.content).map_err(|_| &message.payload[..]),
            &requested,
            payload.as_ref(),
            appeal,
        );

        // Whether the key's ledger entry is another body's (or another key's): the subject's last word is then not
        // this body's, and must not silence what is said about this one.
        let mut slot_answers_another = false;
        // Settled already (a redelivery after a crash between deciding and acking): publish and record again, ack.
        match self.bus.decided(&key).await {
            Ok(Some(event)) if event.key == key && same_body(&event, Some(&digest)) => {
                debug!(?key, "already decided; publishing and recording again");
                let content = item.as_ref().ok().map(|i| &i.content);
                self.finish(message, &event, &status_msg_id(&event), &event, content, true, stop).await;
                return None;
            }
            Ok(Some(event)) if event.key == key => {
                // The key was settled for another body (an edited item sent again under its id): that decision is
                // not this body's. It is decided, and settled apart for a person when its ledger write is refused.
                warn!(?key, "the key is settled for another body; deciding this one for a person");
                slot_answers_another = true;
            }
            Ok(Some(other)) => {
                // Another key's entry in this key's slot (written before keys shaped like a hashed token were
                // hashed themselves) says nothing about this item. It is decided, and settled for a person.
                error!(?key, other = ?other.key, "the decided ledger holds another key's entry in this key's slot");
                slot_answers_another = true;
            }
            Ok(None) => {}
            Err(e) => {
                let why = match &e {
                    NatsError::BadLedgerEntry { .. } => {
                        error!(?key, "not deciding the event: {e}");
                        GivenBack::LedgerEntryUnreadable
                    }
                    _ => {
                        warn!(?key, "cannot read the decided ledger: {e}");
                        GivenBack::LedgerUnavailable
                    }
                };
                retry(message, why).await;
                return None;
            }
        }

        // What tells this body's settled word on the key's subject, for every answer given below.
        let this_body = Settled { digest: &digest, slot_answers_another };
        if slot_answers_another && self.settled_apart_before(message, &key, this_body, item.as_ref().ok(), stop).await {
            return None;
        }
        // Rejections for what this worker holds or allows (its limits, its policies, its model's context) are not
        // the body's to keep: another worker, or this one reconfigured, may take the same body sent again. Only
        // what is wrong with the event itself goes in the ledger.
        let item = match item {
            Ok(item) => item,
            Err(e) => return self.reject(message, key, item_id, &e.to_string(), digest, stop).await,
        };
        if let Err(e) = check_length(&item.content, &InputLimits { max_chars: self.limits.max_chars }) {
            return self.reject_for_now(message, key, item_id, &e.to_string(), this_body).await;
        }
        if let Some(why) = self.limits.over_tokens(&item.content) {
            return self.reject_for_now(message, key, item_id, &why, this_body).await;
        }
        let requested = match requested {
            Ok(requested) => requested,
            Err(why) => return self.reject(message, key, item_id, &why, digest, stop).await,
        };
        let (policies, pipeline) = match self.host.prepare(&requested).await {
            Ok(prepared) => prepared,
            Err(HostError::Rejected(why) | HostError::NotStored(why)) => {
                return self.reject_for_now(message, key, item_id, &why, this_body).await;
            }
            Err(HostError::Unavailable(why)) => {
                warn!(?key, "cannot prepare the event now: {why}");
                retry(message, GivenBack::HostUnavailable).await;
                return None;
            }
        };
        let ctx = RouteContext {
            appeal,
            // For the host's record (reviewers read it); taken out before the ledger and the decision stream.
            include_reasoning: true,
        };
        // Content the model cannot read whole under these policies is rejected like content over the token limit:
        // deciding it would fail in the engine, after the budget paid for it. An appeal of content that fits as an
        // item, but not at an appeal's high effort, was decided and must still be heard: it goes to a person without
        // the model, as an appeal over HTTP does.
        let unreasoned = match pipeline.check_fits_context(&policies, &item.content, &ctx) {
            Ok(()) => None,
            Err(overflow) => {
                let as_an_item = RouteContext { appeal: false, ..ctx.clone() };
                if !appeal || pipeline.check_fits_context(&policies, &item.content, &as_an_item).is_err() {
                    return self.reject_for_now(message, key, item_id, &overflow.to_string(), this_body).await;
                }
                Some(format!("not reasoned about: {overflow}"))
            }
        };
        let pending = DecisionEvent {
            key: key.clone(),
            item_id: item_id.clone(),
            status: EventStatus::Pending,
            decision: None,
            error: None,
            review: None,
            body_digest: None,
        };
        // Not published is no harm: `pending` only tells the producer to hold the item until the decision comes.
        // Nor on top of a decision another worker published since this one read the ledger (a redelivery, or a
        // second copy of an event sent without a Nats-Msg-Id, racing the first's worker): the decision's own
        // republish is a duplicate the stream drops, so the subject would end on `pending` and the producer hold
        // the item for good. Nor on top of a person's answer to an earlier delivery's decision, which it would hide
        // from the check that keeps `decided` from following it.
        // Only this body's settled events count: a key reused for an edited post still gets its `pending` over the
        // old body's decision. A person's answer carries no digest, and counts unless the key's entry is another
        // body's.
        let answered = |last: &DecisionEvent| match (&last.status, &last.body_digest) {
            (EventStatus::Pending, _) => false,
            (_, Some(theirs)) => *theirs == digest,
            (EventStatus::Decided | EventStatus::Reviewed, None) => this_body.answered_by(&key, last),
            // A rejection until a policy is stored answers nothing: the event is here again to be decided.
            (EventStatus::Rejected, None) => false,
        };
        let _ = self.bus.publish_unless(&status_msg_id(&pending), &pending, answered).await;
        let started = Instant::now();
        // A panic here is a bug (in a reasoner, say). Given back, the event would come again after `ack_wait` and
        // panic in the next worker too: it is settled for a person instead, as the server's jobs are.
        let mut decision = match unreasoned {
            Some(why) => undecided_for_a_person(&policies, appeal, started, &why),
            None => match keep_alive(
                message,
                self.ack_wait(),
                AssertUnwindSafe(pipeline.decide(&policies, &item.content, &ctx)).catch_unwind(),
            )
            .await
            {
                Ok(Ok(decision)) => decision,
                Ok(Err(deferred)) => {
                    ack(message, AckKind::Nak(Some(deferred.retry_after))).await;
                    return Some(deferred.retry_after);
                }
                Err(panic) => {
                    error!(
                        ?key,
                        panic = panic_message(panic.as_ref()),
                        "deciding the event panicked; it goes to a person"
                    );
                    metrics::counter!("safeguard_nats_decide_panics_total").increment(1);
                    undecided_for_a_person(&policies, appeal, started, DECIDE_PANICKED)
                }
            },
        };
        let reasoning = strip_reasoning(&mut decision);
        let event = DecisionEvent {
            key: key.clone(),
            item_id,
            status: EventStatus::Decided,
            decision: Some(decision),
            error: None,
            review: None,
            body_digest: Some(digest),
        };
        self.settle(message, event, Some(&item.content), reasoning, stop).await;
        None
    }

    /// Publishes a settled event (unless a person's decision on it is already out, when `may_be_reviewed`), hands
    /// it to the host (`for_host`: the same decision, with what the bus does not carry) and acks its content event.
    ///
    /// In this order: a person can only review a decision the host recorded, and the producer must hear the
    /// decision before the person's word on it, never after (it would hold the item again, for good). A redelivery
    /// after a failure at any step publishes the ledger's decision again, under the same message id.
    #[allow(clippy::too_many_arguments)]
    async fn finish(
        &self,
        message: &jetstream::Message,
        published: &DecisionEvent,
        msg_id: &str,
        for_host: &DecisionEvent,
        content: Option<&Content>,
        may_be_reviewed: bool,
        stop: &CancellationToken,
    ) {
        if !self.announce(message, published, msg_id, may_be_reviewed, stop).await {
            return;
        }
        if !self.record(message, for_host, content, stop).await {
            return;
        }
        ack(message, AckKind::Ack).await;
    }

    /// Publishes a settled event under `msg_id`; on failure the event is NAKed and `false` returned.
    ///
    /// NATS refusing for a moment is waited out while the event is kept alive (for up to [`PERSIST_FOR`]): given
    /// back, the event would be recorded from the ledger, without the chain of thought held here.
    async fn announce(
        &self,
        message: &jetstream::Message,
        event: &DecisionEvent,
        msg_id: &str,
        may_be_reviewed: bool,
        stop: &CancellationToken,
    ) -> bool {
        let token = &subject_token(&event.key);
        let lasting = |e: &NatsError| matches!(e, NatsError::TooLarge(_));
        // A decision this worker has just written to the ledger is its alone only until its first publish fails:
        // the ledger's copy is then any worker's to announce on a redelivery, and a person may have answered it
        // before this worker is heard again (minutes later, past the duplicate window).
        let mut tried = false;
        let publishing = persist(stop, "publish the decision", &event.key, lasting, || {
            let conditional = may_be_reviewed || std::mem::replace(&mut tried, true);
            async move {
                match event_id(event).filter(|_| conditional) {
                    Some(id) => self.bus.publish_unless(msg_id, event, |last| reviews_decision(last, id)).await,
                    // Nobody has seen this decision yet: nobody can have reviewed it.
                    None => self.bus.publish_as(token, msg_id, event).await.map(|()| Published::Sent),
                }
            }
        });
        match keep_alive(message, self.ack_wait(), publishing).await {
            Ok(Published::Sent) => true,
            Ok(Published::Answered) => {
                debug!(key = ?event.key, "a person's decision on it is out already; not publishing the decision again");
                true
            }
            Err(NatsError::TooLarge(e)) => {
                // Never announceable, however often it is given back: recorded and acked all the same.
                error!(key = ?event.key, "the settled event is too large to publish: {e}");
                true
            }
            Err(e) => {
                warn!(key = ?event.key, "cannot publish the settled event: {e}");
                retry(message, GivenBack::PublishFailed).await;
                false
            }
        }
    }

    /// Hands a settled decision to the host; on failure the event is NAKed and `false` returned.
    ///
    /// A host that is unavailable (its database restarting) is asked again, with growing pauses, for up to
    /// [`PERSIST_FOR`] or until the worker stops, the event kept alive meanwhile: the chain of thought exists only
    /// in this worker's memory, so a redelivery could record the decision but not it.
    async fn record(
        &self,
        message: &jetstream::Message,
        event: &DecisionEvent,
        content: Option<&Content>,
        stop: &CancellationToken,
    ) -> bool {
        self.record_or(message, event, content, stop, false).await
    }

    /// [`record`](Self::record); with `drop_lasting`, a refusal no retry can change (the host rejects the
    /// decision) is logged and `true` returned instead: for an event that can never be settled, where a
    /// redelivery would only decide it again, at the budget's cost, to be refused again.
    async fn record_or(
        &self,
        message: &jetstream::Message,
        event: &DecisionEvent,
        content: Option<&Content>,
        stop: &CancellationToken,
        drop_lasting: bool,
    ) -> bool {
        let Some(decision) = &event.decision else { return true };
        let lasting = |e: &HostError| matches!(e, HostError::Rejected(_) | HostError::NotStored(_));
        let recording = persist(stop, "record the decision", &event.key, lasting, || async {
            let appeal_of = if decision.is_appeal() { self.appealed(&event.key).await? } else { None };
            let item_id = event.item_id.as_deref();
            let settled = SettledItem { key: &event.key, item_id, content, decision, appeal_of: appeal_of.as_deref() };
            self.host.record(settled).await
        });
        match keep_alive(message, self.ack_wait(), recording).await {
            Ok(()) => true,
            Err(e) if drop_lasting && lasting(&e) => {
                error!(key = ?event.key, "the host refuses the decision, and the event can never be settled: {e}");
                true
            }
            Err(e) => {
                warn!(key = ?event.key, "cannot record the decision: {e}");
                retry(message, GivenBack::RecordFailed).await;
                false
            }
        }
    }

    /// The decision an appeal's key appeals: the one in the ledger under the item's own key. Read when the
    /// appeal is recorded, so that the host can link the two (and set the item's pending review aside for the
    /// appeal's); a ledger that cannot be read now is waited out like the host.
    async fn appealed(&self, key: &str) -> Result<Option<String>, HostError> {
        let Some(item_key) = key.strip_suffix(APPEAL_SUFFIX) else { return Ok(None) };
        match self.bus.decided(item_key).await {
            // Another key's entry in the item's slot (see `handle`) is not the item's decision.
            Ok(settled) => {
                Ok(settled.filter(|e| e.key == item_key).as_ref().and_then(event_id).map(|id| id.to_string()))
            }
            // It will not parse on any later try either: recorded unlinked, as an appeal of an unknown item is.
            Err(e @ NatsError::BadLedgerEntry { .. }) => {
                warn!(key = ?item_key, "the appeal is recorded without a link to the decision it appeals: {e}");
                Ok(None)
            }
            Err(e) => Err(HostError::Unavailable(format!("cannot read the decision appealed: {e}"))),
        }
    }

    async fn reject(
        &self,
        message: &jetstream::Message,
        key: String,
        item_id: Option<String>,
        error: &str,
        digest: String,
        stop: &CancellationToken,
    ) -> Option<Duration> {
        // Debug-formatted: the key and the reason can hold the producer's text, line breaks included.
        warn!(?key, ?error, "rejecting a content event");
        let event = DecisionEvent { body_digest: Some(digest), ..rejected(key, item_id, error) };
        self.settle(message, event, None, None, stop).await;
        None
    }

    /// Rejects an event for what this worker holds or allows now (a policy not stored, or not served here; a limit;
    /// the model's context), not for what it is: published, never written to the ledger, so the key stays free for
    /// the same event sent again. Not published over this body's
    /// settled word (another delivery's decision, settled meanwhile; a decision it was settled apart under, or a
    /// person's answer to that): the producer's last word stays the settled one. Over another body's it is: an
    /// edited post the worker cannot judge yet must not pass on the old body's `allow`.
    async fn reject_for_now(
        &self,
        message: &jetstream::Message,
        key: String,
        item_id: Option<String>,
        error: &str,
        this_body: Settled<'_>,
    ) -> Option<Duration> {
        warn!(?key, ?error, "rejecting a content event for what this worker holds now");
        let event = rejected(key, item_id, error);
        let id = per_delivery_id(message, &event);
        // With no ledger entry for the key (it never had one, or it aged out under --retain-days while a person's
        // later word outlived it), nothing ties a word without a digest to this body: the key sent again is a new
        // item and hears its rejection. While the entry is another body's, a word on a decision this body was
        // settled apart under is its own.
        let settled = |last: &DecisionEvent| match (&last.status, &last.body_digest) {
            (EventStatus::Decided, Some(theirs)) => theirs.as_str() == this_body.digest,
            (EventStatus::Decided | EventStatus::Reviewed, None) => {
                this_body.slot_answers_another && this_body.answered_apart(&event.key, last)
            }
            _ => false,
        };
        let published = self.bus.publish_unless(&id, &event, settled).await.map(|_| ());
        ack_published(message, &event.key, published).await;
        None
    }

    /// Rejects an event with a field it should not have, or one of the wrong kind
    /// ([`event_fields_read_as_sent`]): never written to the ledger (a redelivery is refused the same way), and
    /// published whatever the key's subject last said, since no settled word there answers this event.
    async fn reject_malformed(
        &self,
        message: &jetstream::Message,
        key: String,
        item_id: Option<String>,
        error: &str,
    ) -> Option<Duration> {
        warn!(?key, ?error, "rejecting a malformed content event");
        let event = rejected(key, item_id, error);
        let published =
            self.bus.publish_as(&subject_token(&event.key), &per_delivery_id(message, &event), &event).await;
        ack_published(message, &event.key, published).await;
        None
    }

    /// Rejects an event with no usable key (no `Nats-Msg-Id` and no `"id"`, or one too long to keep), for `error`,
    /// under its place in the stream.
    ///
    /// It gets no ledger slot: every slot may be a real key's (a fixed stand-in such as "unknown" was shared by
    /// every keyless event and by the item keyed "unknown"), and a rejection needs no arbitration: a redelivery
    /// rejects it the same way. It goes out on `{prefix}.decisions.unkeyed.{sequence}`, two tokens where each
    /// key's subject has one, so no key's subject or message id can equal it.
    async fn reject_unkeyed(&self, message: &jetstream::Message, error: &str) -> Option<Duration> {
        let place = stream_place(message);
        let subject = format!("unkeyed.{place}");
        warn!(%subject, %error, "rejecting a content event");
        let event = rejected(subject.clone(), None, error);
        let published = self.bus.publish_as(&subject, &format!("{subject}:{:?}", event.status), &event).await;
        ack_published(message, &subject, published).await;
        None
    }

    /// Records the event's final state exactly once in the ledger, publishes it, hands it to the host, then
    /// acks. `reasoning` is the chain of thought kept out of the ledger and the published event, for the host.
    ///
    /// A decision too large for NATS (megabytes of evidence) could never be written, and given back it would be
    /// decided again forever: it is settled instead as `needs_review`, the ledger's copy without the evidence and
    /// verdicts, the host's copy whole.
    async fn settle(
        &self,
        message: &jetstream::Message,
        event: DecisionEvent,
        content: Option<&Content>,
        reasoning: Option<Vec<Vec<String>>>,
        stop: &CancellationToken,
    ) {
        let ours = event_id(&event);
        let key = event.key.clone();
        let mut candidate = event;
        // The host's copy, where it differs from the ledger's by more than the chain of thought.
        let mut whole = None;
        // Whether this worker wrote the key's entry: a decision nobody has seen yet cannot have been reviewed.
        let (stored, fresh) = loop {
            match claim(&self.bus, &candidate).await {
                Ok(Claim::Ours) => break (candidate, true),
                Ok(Claim::Theirs(theirs)) if same_body(&theirs, candidate.body_digest.as_deref()) => {
                    break (theirs, false);
                }
                Ok(Claim::Theirs(_)) => {
                    // Settled meanwhile for another body under this key: not this body's decision, nor is this
                    // body's content that decision's to record.
                    warn!(?key, "the key was settled for another body meanwhile; a person decides this one");
                    let event = whole.unwrap_or(candidate);
                    let id = reused_id(&key, event.body_digest.as_deref().unwrap_or_default());
                    return self.settle_apart(message, event, KEY_REUSED, id, content, reasoning, stop).await;
                }
                Ok(Claim::Conflict(other)) => {
                    error!(?key, other = ?other.key, "the key's ledger slot holds another key's entry; a person decides");
                    let event = whole.unwrap_or(candidate);
                    let detail =
                        format!("ledger conflict: this key's ledger slot holds the entry of key {:?}", other.key);
                    let id = conflict_id(&key, event.body_digest.as_deref().unwrap_or_default());
                    return self.settle_apart(message, event, &detail, id, content, reasoning, stop).await;
                }
                Err(NatsError::TooLarge(why)) if whole.is_none() && candidate.decision.is_some() => {
                    error!(?key, "the decision is too large for the ledger ({why}); it goes to a person instead");
                    let detail = clip(&format!("the decision was too large to settle on NATS: {why}"), MAX_DETAIL);
                    whole = Some(for_person(&candidate, &detail, false));
                    candidate = for_person(&candidate, &detail, true);
                }
                Err(NatsError::TooLarge(why)) => {
                    // Nothing left to leave out (the key itself may be that large, or the policies many): no retry
                    // can ever settle it. The host still gets the decision for a person when there is one, so that
                    // someone judges the item although nothing on the bus says so.
                    error!(?key, "the event can never be settled, it is too large for NATS ({why}); dropping it");
                    if let Some(mut whole) = whole.take() {
                        restore_reasoning(&mut whole, reasoning);
                        if !self.record_or(message, &whole, content, stop, true).await {
                            return;
                        }
                    }
                    ack(message, AckKind::Term).await;
                    return;
                }
                Err(e) => {
                    warn!(?key, "cannot write the decision to the ledger: {e}");
                    retry(message, GivenBack::LedgerWriteFailed).await;
                    return;
                }
            }
        };
        let mut for_host = match whole {
            Some(whole) if event_id(&stored) == ours => whole,
            _ => stored.clone(),
        };
        if event_id(&for_host) == ours {
            restore_reasoning(&mut for_host, reasoning);
        }
        self.finish(message, &stored, &status_msg_id(&stored), &for_host, content, !fresh, stop).await;
    }

    /// Whether this body, sent under a key whose ledger entry is another body's, was settled apart before (a
    /// resend of an edited post): its decision is then the subject's last word, announced and recorded again as a
    /// ledger match is, or a person's answer to it is, and the event is acked. Deciding it again would pay the
    /// budget for a decision the host, idempotent by its id, throws away.
    async fn settled_apart_before(
        &self,
        message: &jetstream::Message,
        key: &str,
        this_body: Settled<'_>,
        item: Option<&safeguard_core::input::Item>,
        stop: &CancellationToken,
    ) -> bool {
        let Some((_, Some(last))) = self.bus.last_on_subject(key).await else { return false };
        match (&last.status, last.body_digest.as_deref(), event_id(&last)) {
            (EventStatus::Decided, Some(theirs), Some(id)) if theirs == this_body.digest => {
                debug!(?key, "this body was settled apart before; publishing and recording it again");
                let msg_id = format!("{}:{:?}:{id}", subject_token(key), last.status);
                self.finish(message, &last, &msg_id, &last, item.map(|i| &i.content), true, stop).await;
                true
            }
            (EventStatus::Reviewed, None, _) if this_body.answered_by(key, &last) => {
                debug!(?key, "a person answered this body's decision already");
                ack(message, AckKind::Ack).await;
                true
            }
            _ => false,
        }
    }

    /// Settles an event that its key's ledger entry does not answer for, and whose own entry cannot be written
    /// there: the slot holds another key's entry, or this key's entry for another body. A rejection is published
    /// as it is; a decision goes to a person for `detail`, under `id` (derived from the key, and the body: a
    /// redelivery records the same one again, not a second), published and recorded by the host with this event's
    /// content, but not in the ledger.
    #[allow(clippy::too_many_arguments)]
    async fn settle_apart(
        &self,
        message: &jetstream::Message,
        event: DecisionEvent,
        detail: &str,
        id: uuid::Uuid,
        content: Option<&Content>,
        reasoning: Option<Vec<Vec<String>>>,
        stop: &CancellationToken,
    ) {
        let token = subject_token(&event.key);
        if event.decision.is_none() {
            let msg_id = format!("{token}:{:?}:{id}", event.status);
            ack_published(message, &event.key, self.bus.publish_as(&token, &msg_id, &event).await).await;
            return;
        }
        let detail = clip(detail, MAX_DETAIL);
        let mut whole = for_person(&event, &detail, false);
        let mut published = for_person(&event, &detail, true);
        for settled in [&mut whole, &mut published] {
            if let Some(decision) = settled.decision.as_mut() {
                decision.id = id;
            }
        }
        restore_reasoning(&mut whole, reasoning);
        // Not `{token}:Decided`: the key's entry (or the other key's) may have used that message id within the
        // duplicate window.
        let msg_id = format!("{token}:{:?}:{id}", published.status);
        // Its id is the same for every delivery of this body, so a person may have decided it already.
        self.finish(message, &published, &msg_id, &whole, content, true, stop).await;
    }
}

/// Where an event sits in the stream (its sequence), for the ids of answers it gets outside the ledger; a fresh
/// id where the message cannot say.
fn stream_place(message: &jetstream::Message) -> String {
    match message.info() {
        Ok(info) => info.stream_sequence.to_string(),
        Err(_) => uuid::Uuid::new_v4().simple().to_string(),
    }
}

/// The event that rejects a content event, for `error`.
/// The message id of an event published once per delivery: a resend is answered again, a duplicate publish of
/// this one is not.
fn per_delivery_id(message: &jetstream::Message, event: &DecisionEvent) -> String {
    format!("{}:{:?}:{}", subject_token(&event.key), event.status, stream_place(message))
}

fn rejected(key: String, item_id: Option<String>, error: &str) -> DecisionEvent {
    DecisionEvent {
        key,
        item_id,
        status: EventStatus::Rejected,
        decision: None,
        // A reason can quote the producer's text (a policy name of any length): clipped, it always fits the ledger.
        error: Some(clip(error, MAX_REJECTION)),
        review: None,
        body_digest: None,
    }
}

/// The decision on an item the cascade did not decide (it panicked, or an appeal the model cannot read whole at
/// high effort): every policy goes to a person with the reason a failed stage gives; an appeal stays an appeal.
fn undecided_for_a_person(policies: &[Policy], appeal: bool, started: Instant, why: &str) -> CascadeDecision {
    let routes = policies
        .iter()
        .map(|policy| {
            let mut escalations = Vec::with_capacity(2);
            if appeal {
                escalations.push(Escalation::Appeal);
            }
            escalations.push(Escalation::StageFailed { detail: why.to_string() });
            PolicyRoute {
                policy: policy.meta.name.clone(),
                policy_hash: policy.hash.to_string(),
                outcome: Outcome::NeedsReview,
                decided_by: Stage::HumanReview,
                triage: None,
                verdict: None,
                engine_confidence: None,
                escalations,
            }
        })
        .collect();
    CascadeDecision {
        id: uuid::Uuid::now_v7(),
        outcome: Outcome::NeedsReview,
        decided_by: Stage::HumanReview,
        policies: routes,
        stages: Vec::new(),
        reasoning: Vec::new(),
        usage: Default::default(),
        total_ms: started.elapsed().as_secs_f64() * 1e3,
    }
}

/// What a panic said, for the log.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not a message)")
}

/// Why an event goes to a person when its key is settled for another body.
const KEY_REUSED: &str =
    "idempotency key reused with a different body: the key's decision is another body's; a person decides this one";

/// The digest of what an event asks to have judged: `sha256:` of the canonical JSON (keys sorted, no spaces) of
/// its content as parsed (or, when it does not parse, the sha256 of its payload), the policies it named (as
/// named, sorted: a redelivery must match its own entry whatever a name points to by then; or, when the list
/// cannot be read, the `"policies"` value itself) and whether it is an appeal. The item id and other fields of
/// the payload are not part of it: they do not change what is judged.
fn body_digest(
    content: Result<&Content, &[u8]>,
    requested: &Result<Vec<String>, String>,
    payload: Option<&Value>,
    appeal: bool,
) -> String {
    let content = match content {
        Ok(content) => serde_json::to_value(content).unwrap_or(Value::Null),
        Err(raw) => serde_json::json!({ "unparsed": hex::encode(Sha256::digest(raw)) }),
    };
    let policies = match requested {
        Ok(names) => {
            let mut names = names.clone();
            names.sort();
            names.dedup();
            serde_json::json!(names)
        }
        Err(_) => serde_json::json!({ "unreadable": payload.and_then(|p| p.get("policies")) }),
    };
    let body = serde_json::json!({ "content": content, "policies": policies, "appeal": appeal });
    let mut canonical = String::new();
    write_canonical(&body, &mut canonical);
    format!("sha256:{}", hex::encode(Sha256::digest(canonical.as_bytes())))
}

/// `value` as JSON with object keys sorted, whatever order the map keeps them in.
fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(value, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Whether a ledger entry answers for a body with `digest`: an entry (or an event) without a digest, written
/// before they were kept, is taken to, as it always was.
fn same_body(entry: &DecisionEvent, digest: Option<&str>) -> bool {
    match (entry.body_digest.as_deref(), digest) {
        (Some(settled), Some(digest)) => settled == digest,
        _ => true,
    }
}

/// How long a fetch waits for events; also the most a stopping worker waits for a fetch's stragglers.
const FETCH_EXPIRES: Duration = Duration::from_millis(500);

/// The first NAK delay of an event that could not be settled now, doubled per delivery up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// The longest reason written into a decision handed to a person by the worker itself.
const MAX_DETAIL: usize = 300;

/// The longest key an event may have, in bytes: a producer's item id or message id, never text to judge.
const MAX_KEY_BYTES: usize = 1024;

/// The longest reason a rejection gives, in bytes: room for any message of ours with a producer's name in it.
const MAX_REJECTION: usize = 2048;

/// The most entries kept of each list inside a trimmed decision's escalations.
const MAX_TRIMMED_LIST: usize = 4;

/// What the ledger holds for a key once a worker tried to write its entry.
enum Claim {
    /// The entry written is this worker's.
    Ours,
    /// Another worker settled the key first: its entry stands.
    Theirs(DecisionEvent),
    /// The key's slot holds another key's entry.
    Conflict(DecisionEvent),
}

/// The ledger as [`claim`] uses it: the [`Bus`], or in tests one that loses a write's acknowledgement.
#[async_trait::async_trait]
trait Ledger: Sync {
    /// Writes the key's entry unless it has one; `Ok(false)` when it has.
    async fn create(&self, event: &DecisionEvent) -> Result<bool, NatsError>;
    /// The key's entry, if any.
    async fn entry(&self, key: &str) -> Result<Option<DecisionEvent>, NatsError>;
}

#[async_trait::async_trait]
impl Ledger for Bus {
    async fn create(&self, event: &DecisionEvent) -> Result<bool, NatsError> {
        self.record_once(event).await
    }

    async fn entry(&self, key: &str) -> Result<Option<DecisionEvent>, NatsError> {
        self.decided(key).await
    }
}

/// Writes `event` as its key's ledger entry unless the key has one; what the ledger holds for it then.
///
/// A write that failed may still have landed (its acknowledgement timed out): the entry is read back, and one that
/// carries this event's decision is this worker's. Taken as "not settled", it would be given back, and the
/// redelivery would record the ledger's copy, without the chain of thought held here.
async fn claim(ledger: &impl Ledger, event: &DecisionEvent) -> Result<Claim, NatsError> {
    let failed = match ledger.create(event).await {
        Ok(true) => return Ok(Claim::Ours),
        Ok(false) => None,
        Err(e @ NatsError::TooLarge(_)) => return Err(e),
        Err(e) => Some(e),
    };
    let entry = match ledger.entry(&event.key).await {
        Ok(entry) => entry,
        // The write's own failure says more than the read's.
        Err(e) => return Err(failed.unwrap_or(e)),
    };
    match entry {
        Some(entry) if entry.key == event.key && event_id(&entry).is_some() && event_id(&entry) == event_id(event) => {
            Ok(Claim::Ours)
        }
        Some(theirs) if theirs.key == event.key => Ok(Claim::Theirs(theirs)),
        Some(other) => Ok(Claim::Conflict(other)),
        // Not written: not settled; tried again later. Refused as taken yet nothing there: purged in between.
        None => Err(failed.unwrap_or_else(|| {
            NatsError::Stream(format!("the ledger refused {:?}'s entry but holds none", event.key))
        })),
    }
}

/// Tries `attempt` until it succeeds, fails for good (`lasting`), has failed for [`PERSIST_FOR`] or the worker is
/// stopped, pausing longer after each failure (up to [`PERSIST_PAUSE_MAX`]); `what` and `key` are for the log.
async fn persist<T, E, F, Fut>(
    stop: &CancellationToken,
    what: &str,
    key: &str,
    lasting: impl Fn(&E) -> bool,
    mut attempt: F,
) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut pause = PERSIST_PAUSE_FIRST;
    let mut tries = 0u32;
    let started = tokio::time::Instant::now();
    loop {
        let failed = match attempt().await {
            Err(e) if !lasting(&e) && !stop.is_cancelled() => e,
            done => return done,
        };
        if started.elapsed() >= PERSIST_FOR {
            warn!(?key, tries, "could not {what} for {PERSIST_FOR:?}; the event is given back: {failed}");
            return Err(failed);
        }
        tries += 1;
        if tries == 1 {
            warn!(?key, "cannot {what} yet; trying again until it can or the worker stops: {failed}");
        } else {
            debug!(?key, tries, "cannot {what} yet: {failed}");
        }
        tokio::select! {
            _ = stop.cancelled() => return Err(failed),
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(PERSIST_PAUSE_MAX);
    }
}

/// A settled event's decision handed to a person for `detail`: every policy `needs_review` at the human stage,
/// whatever the cascade said. `trim` leaves out what can make a decision large (triage evidence, verdicts, the
/// reasoning steps, long lists and texts in escalations, a long item id), for the ledger and the bus.
fn for_person(event: &DecisionEvent, detail: &str, trim: bool) -> DecisionEvent {
    let mut event = event.clone();
    if let Some(decision) = event.decision.as_mut() {
        decision.outcome = Outcome::NeedsReview;
        decision.decided_by = Stage::HumanReview;
        if trim {
            decision.reasoning.clear();
        }
        for route in &mut decision.policies {
            route.outcome = Outcome::NeedsReview;
            route.decided_by = Stage::HumanReview;
            if trim {
                trim_route(route);
            }
            route.escalations.push(Escalation::StageFailed { detail: detail.to_string() });
        }
    }
    if trim {
        event.item_id = event.item_id.filter(|id| id.len() <= MAX_DETAIL);
    }
    event
}

fn trim_route(route: &mut PolicyRoute) {
    route.triage = None;
    route.verdict = None;
    let trim_list = |list: &mut Vec<String>| {
        list.truncate(MAX_TRIMMED_LIST);
        for entry in list.iter_mut() {
            *entry = clip(entry, MAX_DETAIL);
        }
    };
    for escalation in &mut route.escalations {
        match escalation {
            Escalation::TriageFlagged { rules } => trim_list(rules),
            Escalation::NeedsReview { flags } => trim_list(flags),
            Escalation::HighRiskCategory { cited } => trim_list(cited),
            Escalation::StageFailed { detail } => *detail = clip(detail, MAX_DETAIL),
            _ => {}
        }
    }
}

/// `text` cut to at most `max` bytes, on a character boundary, marked when cut.
fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// What tells whether the last event on a key's subject is this body's settled word.
#[derive(Clone, Copy)]
struct Settled<'d> {
    digest: &'d str,
    /// The key's ledger entry is another body's (or another key's): this body, if settled, was settled apart.
    slot_answers_another: bool,
}

impl Settled<'_> {
    /// Whether `last`, an event carrying no body digest (a person's answer, or a decision from before digests),
    /// answers this body. Any does while the key's entry is this body's; otherwise only a person's answer to the
    /// decision this body was settled apart under (one id per key and body, for either reason).
    fn answered_by(&self, key: &str, last: &DecisionEvent) -> bool {
        !self.slot_answers_another || self.answered_apart(key, last)
    }

    /// Whether `last` is a person's answer to a decision this body was settled apart under.
    fn answered_apart(&self, key: &str, last: &DecisionEvent) -> bool {
        let apart = [reused_id(key, self.digest), conflict_id(key, self.digest), legacy_conflict_id(key)]
            .map(|id| id.to_string());
        last.review.as_ref().is_some_and(|review| {
            apart.contains(&review.decision_id) || review.appeal_of.as_ref().is_some_and(|of| apart.contains(of))
        })
    }
}

/// The id of the decision a person gets for a key whose ledger slot holds another key's entry: one per key and body,
/// so the host, idempotent by id, records each delivery of it once, and an edited body sent again under the key is
/// neither recorded as the first body's decision nor answered by a person's word on it.
fn conflict_id(key: &str, digest: &str) -> uuid::Uuid {
    derived_id(&format!("safeguard ledger conflict\0{key}\0{digest}"))
}

/// [`conflict_id`] as it was before it named the body: a person's answer given under it still answers the key.
fn legacy_conflict_id(key: &str) -> uuid::Uuid {
    derived_id(&format!("safeguard ledger conflict\0{key}"))
}

/// The id of the decision a person gets for a body sent under a key settled for another body: one per key and
/// body, so a redelivery records it once and another body under the key gets one of its own.
fn reused_id(key: &str, digest: &str) -> uuid::Uuid {
    derived_id(&format!("safeguard key reused\0{key}\0{digest}"))
}

fn derived_id(seed: &str) -> uuid::Uuid {
    let digest = Sha256::digest(seed.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// Puts the chain of thought taken out by [`strip_reasoning`] back, for the host.
fn restore_reasoning(event: &mut DecisionEvent, reasoning: Option<Vec<Vec<String>>>) {
    if let (Some(decision), Some(reasoning)) = (event.decision.as_mut(), reasoning) {
        for (step, chain) in decision.reasoning.iter_mut().zip(reasoning) {
            step.reasoning = chain;
        }
    }
}

async fn ack(message: &jetstream::Message, kind: AckKind) {
    if let Err(e) = message.ack_with(kind).await {
        warn!("ack failed (the event will be redelivered): {e}");
    }
}

/// Acks a content event once its settled event is published; NAKs it if that could not be done now.
async fn ack_published(message: &jetstream::Message, key: &str, published: Result<(), NatsError>) {
    match published {
        Ok(()) => ack(message, AckKind::Ack).await,
        Err(NatsError::TooLarge(e)) => {
            // Settled and recorded, but never announceable: given back, it would fail the same way every time.
            error!(?key, "the settled event is too large to publish: {e}");
            ack(message, AckKind::Ack).await;
        }
        // Not announced: the redelivery settles it the same way and publishes it.
        Err(e) => {
            warn!(?key, "cannot publish the settled event: {e}");
            retry(message, GivenBack::PublishFailed).await;
        }
    }
}

async fn progress(message: &jetstream::Message) {
    if let Err(e) = message.ack_with(AckKind::Progress).await {
        debug!("progress ack failed: {e}");
    }
}

/// Why an event was given back to be tried again: the label of `safeguard_nats_events_given_back_total`.
#[derive(Debug, Clone, Copy)]
enum GivenBack {
    /// The ledger could not be read (NATS unavailable).
    LedgerUnavailable,
    /// The ledger holds something for the key that does not parse (written by a newer version, say): the event
    /// is held until a worker that reads it comes, never decided as if nothing were there.
    LedgerEntryUnreadable,
    HostUnavailable,
    LedgerWriteFailed,
    PublishFailed,
    RecordFailed,
    HandlePanicked,
}

impl GivenBack {
    fn as_str(self) -> &'static str {
        match self {
            GivenBack::LedgerUnavailable => "ledger_unavailable",
            GivenBack::LedgerEntryUnreadable => "ledger_entry_unreadable",
            GivenBack::HostUnavailable => "host_unavailable",
            GivenBack::LedgerWriteFailed => "ledger_write_failed",
            GivenBack::PublishFailed => "publish_failed",
            GivenBack::RecordFailed => "record_failed",
            GivenBack::HandlePanicked => "handle_panicked",
        }
    }
}

/// Deliveries after which an event given back again is reported as stuck: by then it has waited out the whole
/// growing delay, so the fault is lasting, not a blip.
const STUCK_AFTER_DELIVERIES: i64 = 10;

/// Gives an event back to be tried again, the later the more often it was delivered: a fault that lasts (a
/// ledger entry that does not parse, a host that stays down) is looked at now and then, not in a tight loop.
/// Such an event is never dropped (it holds a producer's item pending), so it is made visible instead: counted
/// by reason, and logged as stuck once it has come back often, then about hourly.
async fn retry(message: &jetstream::Message, why: GivenBack) {
    let (delivered, sequence) = message.info().map_or((1, None), |info| (info.delivered, Some(info.stream_sequence)));
    metrics::counter!("safeguard_nats_events_given_back_total", "reason" => why.as_str()).increment(1);
    if is_stuck_report(delivered) {
        error!(
            ?sequence,
            delivered,
            reason = why.as_str(),
            "a content event keeps being given back; it is held, not dropped, until the fault is fixed"
        );
    }
    ack(message, AckKind::Nak(Some(retry_delay(delivered)))).await;
}

/// Whether this delivery reports the event as stuck: the first time it counts as stuck, then once per
/// [`RETRY_MAX`]-spaced hour.
fn is_stuck_report(delivered: i64) -> bool {
    let hourly = (3600 / RETRY_MAX.as_secs()).max(1) as i64;
    delivered == STUCK_AFTER_DELIVERIES
        || (delivered > STUCK_AFTER_DELIVERIES && (delivered - STUCK_AFTER_DELIVERIES) % hourly == 0)
}

fn retry_delay(delivered: i64) -> Duration {
    let doublings = u32::try_from(delivered.saturating_sub(1)).unwrap_or(0).min(6);
    (RETRY_FIRST * 2u32.pow(doublings)).min(RETRY_MAX)
}

/// Gives fetched events that were not started back to the stream (not before `delay`), and with them those the
/// fetch still delivers (it ends within its expiry).
async fn give_back<E: std::fmt::Display>(
    waiting: VecDeque<jetstream::Message>,
    mut batch: std::pin::Pin<&mut impl Stream<Item = Result<jetstream::Message, E>>>,
    open: bool,
    delay: Option<Duration>,
) {
    for message in &waiting {
        ack(message, AckKind::Nak(delay)).await;
    }
    if !open {
        return;
    }
    let stragglers = async {
        while let Some(next) = batch.next().await {
            match next {
                Ok(message) => ack(&message, AckKind::Nak(delay)).await,
                Err(e) => {
                    debug!("pull failed while giving events back: {e}");
                    return;
                }
            }
        }
    };
    // A fetch ends by itself within its expiry; the margin covers a server that went quiet.
    let _ = tokio::time::timeout(FETCH_EXPIRES * 4, stragglers).await;
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

/// What the worker does after a fetched batch.
enum Worked {
    /// Pull again.
    On,
    /// The reasoning budget is spent: pull again after this long.
    Pause(Duration),
    /// Pulling failed; the worker stops, to be started again after a pause.
    PullFailed(String),
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// How often an event in hand, or fetched and waiting its turn, tells the server it is still being worked on.
fn keep_alive_period(ack_wait: Duration) -> Duration {
    (ack_wait / 2).max(Duration::from_millis(100))
}

/// Runs `work` while telling the server every half `ack_wait` that the event is still being worked on.
async fn keep_alive<T>(message: &jetstream::Message, ack_wait: Duration, work: impl Future<Output = T>) -> T {
    let mut work = std::pin::pin!(work);
    let period = keep_alive_period(ack_wait);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = ticker.tick() => progress(message).await,
        }
    }
}

/// The fields a content event may carry; a null stands for one left out.
const EVENT_FIELDS: [&str; 7] = ["id", "text", "messages", "prompt", "response", "policies", "appeal"];

/// Whether every field of an event is one the worker reads, of a kind it reads as sent. Over HTTP such a request is
/// refused; on the bus it would be decided otherwise than asked: a misspelt `"policy"` under the default set
/// (without the one it named), `"appeal": "true"` as no appeal at all.
fn event_fields_read_as_sent(payload: Option<&Value>) -> Result<(), String> {
    let Some(Value::Object(fields)) = payload else { return Ok(()) };
    if let Some((field, _)) =
        fields.iter().find(|(field, value)| !value.is_null() && !EVENT_FIELDS.contains(&field.as_str()))
    {
        return Err(format!(
            "the event has a field {field:?} the worker does not read; it reads {}",
            EVENT_FIELDS.join(", ")
        ));
    }
    match fields.get("appeal") {
        None | Some(Value::Null | Value::Bool(_)) => Ok(()),
        Some(other) => Err(format!("\"appeal\" must be true or false, not {other}")),
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
    fn names_nats_would_refuse_are_caught_before_connecting() {
        assert_eq!(NatsConfig::new("x", "safeguard").check_names(), Ok(()));
        assert_eq!(NatsConfig::new("x", "team.moderation").with_stream("MOD_CONTENT").check_names(), Ok(()));
        for prefix in ["", "a..b", "has space", "a.*", "a.>"] {
            assert!(NatsConfig::new("x", prefix).check_names().is_err(), "{prefix:?}");
        }
        for stream in ["my.stream", "with space", "a/b", ""] {
            let error = NatsConfig::new("x", "safeguard").with_stream(stream).check_names().unwrap_err();
            assert!(error.contains("stream or consumer name"), "{stream:?}: {error}");
        }
    }

    #[test]
    fn nats_urls_are_shown_without_their_credentials() {
        let shown = |url: &str| NatsConfig::new(url, "safeguard").shown_url();
        assert_eq!(shown("nats://alice:s3cret@nats1:4222"), "nats://nats1:4222");
        assert_eq!(shown("nats://t0ken@nats1:4222, tls://bob:pw@nats2:4222"), "nats://nats1:4222,tls://nats2:4222");
        assert_eq!(shown("127.0.0.1:4222"), "127.0.0.1:4222");
    }

    /// The error is logged on every reconnect attempt.
    #[tokio::test]
    async fn a_failed_connection_does_not_name_the_credentials() {
        // Port 1: nothing listens there, so the connection is refused at once.
        let config = NatsConfig::new("nats://alice:s3cret@127.0.0.1:1", "safeguard");
        let connected = tokio::time::timeout(Duration::from_secs(30), Bus::connect(config)).await;
        let error = connected.expect("refused, not hung").err().expect("nothing listens on port 1");
        assert!(error.to_string().contains("127.0.0.1:1") && !error.to_string().contains("s3cret"), "{error}");
    }

    /// A failure that repeats every time holds the worker for [`PERSIST_FOR`], then the event is given back.
    #[tokio::test(start_paused = true)]
    async fn a_decision_that_cannot_be_kept_is_given_back_after_a_while() {
        let stop = CancellationToken::new();
        let tries = std::sync::atomic::AtomicUsize::new(0);
        let started = tokio::time::Instant::now();
        let result: Result<(), String> = persist(
            &stop,
            "record the decision",
            "k",
            |_| false,
            || {
                tries.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async { Err("the store is down".to_string()) }
            },
        )
        .await;
        assert_eq!(result, Err("the store is down".to_string()));
        let waited = started.elapsed();
        assert!(waited >= PERSIST_FOR && waited <= PERSIST_FOR + PERSIST_PAUSE_MAX, "{waited:?}");
        assert!(tries.load(std::sync::atomic::Ordering::SeqCst) > 10);
    }

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

    /// A clean key used to be its own token even when it was exactly another key's hash: two keys, one slot.
    #[test]
    fn a_key_shaped_like_a_hash_does_not_share_the_hashed_keys_token() {
        let hashed = subject_token("user/123 ?*>");
        let lookalike = subject_token(&hashed);
        assert_ne!(lookalike, hashed);
        assert!(looks_hashed(&lookalike), "hashed in turn: {lookalike}");
        // Ordinary keys keep their tokens, those close to the shape included.
        for key in [
            "h".to_string() + &"A".repeat(40),
            "h".to_string() + &"a".repeat(39),
            "x".to_string() + &"a".repeat(40),
            "h".to_string() + &"a".repeat(41),
            "hello".to_string(),
        ] {
            assert_eq!(subject_token(&key), key);
        }
    }

    #[test]
    fn retries_back_off_per_delivery() {
        let delays: Vec<u64> = [-1, 0, 1, 2, 3, 4, 6, 7, 1_000].map(|n| retry_delay(n).as_secs()).to_vec();
        assert_eq!(delays, [1, 1, 1, 2, 4, 8, 32, 60, 60]);
    }

    #[test]
    fn an_event_given_back_for_good_is_reported_first_after_ten_deliveries_then_hourly() {
        let reported: Vec<i64> = (0..200).filter(|&n| is_stuck_report(n)).collect();
        // One minute apart once the delay is at its longest: an hour is 60 deliveries.
        assert_eq!(reported, [10, 70, 130, 190]);
    }

    #[test]
    fn publishes_refused_for_their_size_are_told_apart() {
        use jetstream::context::{PublishError, PublishErrorKind};
        assert!(too_large(&PublishError::new(PublishErrorKind::MaxPayloadExceeded)));
        let refused_by_stream: jetstream::Error = serde_json::from_value(serde_json::json!({
            "code": 400, "err_code": 10054, "description": "message size exceeds maximum allowed"
        }))
        .unwrap();
        assert!(too_large(&PublishError::with_source(PublishErrorKind::Other, refused_by_stream)));
        let other: jetstream::Error =
            serde_json::from_value(serde_json::json!({"code": 503, "err_code": 10077, "description": "busy"})).unwrap();
        assert!(!too_large(&PublishError::with_source(PublishErrorKind::Other, other)));
        assert!(!too_large(&PublishError::new(PublishErrorKind::TimedOut)));
        assert!(matches!(publish_err(PublishError::new(PublishErrorKind::MaxPayloadExceeded)), NatsError::TooLarge(_)));
    }

    /// What the old evidence made of "kill " x 20,000: a span and a flagged rule per match.
    fn oversized_event() -> DecisionEvent {
        use safeguard_triage::rules::RuleAction;
        use safeguard_triage::{Band, RuleDecision, RuleMatch, Span, SpanKind, TriageResult};
        let spans: Vec<Span> = (0..20_000)
            .map(|i| Span {
                start: i * 5,
                end: i * 5 + 4,
                rule: "violence: kill".into(),
                kind: SpanKind::Keyword,
                action: RuleAction::Flag,
            })
            .collect();
        let route = PolicyRoute {
            policy: "spam".into(),
            policy_hash: format!("sha256:{}", "a".repeat(64)),
            outcome: Outcome::Allow,
            decided_by: Stage::ReasoningLow,
            triage: Some(TriageResult {
                score: None,
                calibrated_probability: None,
                band: Band::Uncertain,
                rule_match: Some(RuleMatch {
                    decision: RuleDecision::None,
                    evidence: spans,
                    matches: Default::default(),
                }),
                embedding: None,
                model: None,
            }),
            verdict: None,
            engine_confidence: Some(0.99),
            escalations: vec![
                Escalation::TriageFlagged { rules: vec!["violence: kill".into(); 20_000] },
                Escalation::StageFailed { detail: "é".repeat(5_000) },
            ],
        };
        DecisionEvent {
            key: "item-1".into(),
            item_id: Some("item-1".into()),
            status: EventStatus::Decided,
            decision: Some(CascadeDecision {
                id: uuid::Uuid::now_v7(),
                outcome: Outcome::Allow,
                decided_by: Stage::ReasoningLow,
                policies: vec![route],
                stages: Vec::new(),
                reasoning: Vec::new(),
                usage: Default::default(),
                total_ms: 12.0,
            }),
            error: None,
            review: None,
            body_digest: None,
        }
    }

    #[test]
    fn a_decision_too_large_to_settle_goes_to_a_person_trimmed_for_the_bus_and_whole_for_the_host() {
        let event = oversized_event();
        assert!(serde_json::to_vec(&event).unwrap().len() > 1 << 20, "larger than NATS's default max_payload");
        let detail = "too large";
        let trimmed = for_person(&event, detail, true);
        let size = serde_json::to_vec(&trimmed).unwrap().len();
        assert!(size < 2_048, "{size} bytes: {trimmed:?}");
        let decision = trimmed.decision.as_ref().unwrap();
        assert_eq!(decision.id, event.decision.as_ref().unwrap().id, "the same decision, settled differently");
        assert_eq!((decision.outcome, decision.decided_by), (Outcome::NeedsReview, Stage::HumanReview));
        let route = &decision.policies[0];
        assert_eq!((route.outcome, route.decided_by), (Outcome::NeedsReview, Stage::HumanReview));
        assert!(route.triage.is_none() && route.verdict.is_none(), "no evidence");
        assert_eq!(route.escalations.last(), Some(&Escalation::StageFailed { detail: detail.into() }), "the reason");
        assert!(
            matches!(&route.escalations[0], Escalation::TriageFlagged { rules } if rules.len() == MAX_TRIMMED_LIST)
        );
        assert!(matches!(&route.escalations[1], Escalation::StageFailed { detail } if detail.len() <= MAX_DETAIL));
        assert_eq!((trimmed.key.as_str(), trimmed.item_id.as_deref()), ("item-1", Some("item-1")));

        let whole = for_person(&event, detail, false);
        let route = &whole.decision.as_ref().unwrap().policies[0];
        assert_eq!(
            (route.outcome, whole.decision.as_ref().unwrap().outcome),
            (Outcome::NeedsReview, Outcome::NeedsReview)
        );
        assert_eq!(route.triage, event.decision.as_ref().unwrap().policies[0].triage, "the host keeps the evidence");

        let mut long_id = event.clone();
        long_id.item_id = Some("x".repeat(100_000));
        assert_eq!(for_person(&long_id, detail, true).item_id, None);
    }

    #[test]
    fn a_body_digest_covers_what_is_judged_and_old_entries_match_any_body() {
        let text = Content::text("hello");
        let digest = |content: Result<&Content, &[u8]>, payload: Value, appeal: bool| {
            body_digest(content, &requested_policies(Some(&payload)), Some(&payload), appeal)
        };
        let plain = digest(Ok(&text), serde_json::json!({}), false);
        assert!(plain.starts_with("sha256:") && plain.len() == 7 + 64, "{plain}");
        assert_eq!(plain, digest(Ok(&text), serde_json::json!({"id": "other", "at": 1}), false), "not the id");
        assert_ne!(plain, digest(Ok(&Content::text("hello!")), serde_json::json!({}), false));
        assert_ne!(plain, digest(Ok(&Content::Prompt { prompt: "hello".into() }), serde_json::json!({}), false));
        assert_ne!(plain, digest(Ok(&text), serde_json::json!({}), true), "an appeal");
        let named = digest(Ok(&text), serde_json::json!({"policies": ["spam", "hate"]}), false);
        assert_ne!(plain, named);
        assert_eq!(named, digest(Ok(&text), serde_json::json!({"policies": ["hate", "spam"]}), false), "a set");
        assert_eq!(
            digest(Ok(&text), serde_json::json!({"policies": "spam"}), false),
            digest(Ok(&text), serde_json::json!({"policies": ["spam"]}), false)
        );
        assert_ne!(
            digest(Ok(&text), serde_json::json!({"policies": 7}), false),
            digest(Ok(&text), serde_json::json!({"policies": 8}), false)
        );
        assert_ne!(
            digest(Err(b"{not json"), serde_json::json!({}), false),
            digest(Err(b"{not json!"), serde_json::json!({}), false)
        );
        let mut canonical = String::new();
        write_canonical(&serde_json::json!({"b": [1, {"d": "\"", "c": null}], "a": true}), &mut canonical);
        assert_eq!(canonical, r#"{"a":true,"b":[1,{"c":null,"d":"\""}]}"#);

        let mut entry = rejected("k".into(), None, "why");
        entry.body_digest = Some(plain.clone());
        assert!(same_body(&entry, Some(&plain)));
        assert!(!same_body(&entry, Some(&named)));
        // An entry written before digests were kept reads as it did, and answers for any body as it did.
        let old: DecisionEvent =
            serde_json::from_value(serde_json::json!({"key": "k", "item_id": null, "status": "rejected"})).unwrap();
        assert_eq!(old.body_digest, None);
        assert!(same_body(&old, Some(&named)));
        assert_ne!(reused_id("k", &plain), reused_id("k", &named));
        assert_ne!(reused_id("k", &plain), conflict_id("k", &plain));
        assert_eq!(reused_id("k", &plain), reused_id("k", &plain));
    }

    #[test]
    fn an_item_whose_deciding_panicked_goes_to_a_person_for_every_policy() {
        let spam = Policy::parse("---\nname: spam\noutput: binary\n---\n# Spam\nReturn 1 for spam, else 0.").unwrap();
        let decision = undecided_for_a_person(std::slice::from_ref(&spam), false, Instant::now(), DECIDE_PANICKED);
        assert_eq!((decision.outcome, decision.decided_by), (Outcome::NeedsReview, Stage::HumanReview));
        let route = &decision.policies[0];
        assert_eq!((route.policy.as_str(), route.policy_hash.clone()), ("spam", spam.hash.to_string()));
        assert_eq!((route.outcome, route.decided_by), (Outcome::NeedsReview, Stage::HumanReview));
        assert_eq!(route.escalations, [Escalation::StageFailed { detail: DECIDE_PANICKED.into() }]);
        let appeal = undecided_for_a_person(&[spam], true, Instant::now(), DECIDE_PANICKED);
        assert_eq!(appeal.policies[0].escalations[0], Escalation::Appeal, "still an appeal, for the review queue");
        assert_eq!(panic_message(&"a bug"), "a bug");
        assert_eq!(panic_message(&String::from("a bug")), "a bug");
        assert_eq!(panic_message(&7), "(not a message)");
    }

    /// A ledger whose writes all fail, as a publish whose acknowledgement timed out does; `lands` says whether the
    /// write reached the stream all the same.
    struct LostAck {
        entry: std::sync::Mutex<Option<DecisionEvent>>,
        lands: bool,
    }

    #[async_trait::async_trait]
    impl Ledger for LostAck {
        async fn create(&self, event: &DecisionEvent) -> Result<bool, NatsError> {
            let mut entry = self.entry.lock().unwrap();
            if self.lands && entry.is_none() {
                *entry = Some(event.clone());
            }
            Err(NatsError::Stream("timed out waiting for the publish acknowledgement".into()))
        }

        async fn entry(&self, _key: &str) -> Result<Option<DecisionEvent>, NatsError> {
            Ok(self.entry.lock().unwrap().clone())
        }
    }

    fn ledger(lands: bool, entry: Option<DecisionEvent>) -> LostAck {
        LostAck { entry: std::sync::Mutex::new(entry), lands }
    }

    /// A ledger write whose acknowledgement was lost used to give the event back: the redelivery found this
    /// worker's own entry and recorded it without the chain of thought, which only this worker held.
    #[tokio::test]
    async fn a_ledger_write_that_landed_without_its_acknowledgement_is_this_workers() {
        let mut event = oversized_event();
        event.decision.as_mut().unwrap().policies.clear();
        assert!(matches!(claim(&ledger(true, None), &event).await, Ok(Claim::Ours)));

        // Not written: not settled, given back to be decided again.
        assert!(matches!(claim(&ledger(false, None), &event).await, Err(NatsError::Stream(_))));

        // Another worker's decision got there first: it stands, whatever became of this write.
        let mut theirs = event.clone();
        theirs.decision.as_mut().unwrap().id = uuid::Uuid::now_v7();
        match claim(&ledger(true, Some(theirs.clone())), &event).await {
            Ok(Claim::Theirs(entry)) => assert_eq!(entry, theirs),
            other => panic!("{:?}", other.map(|_| "not theirs")),
        }
        // Another key's entry in the slot is still a conflict, not this key's decision.
        let mut other = theirs.clone();
        other.key = "someone-else".into();
        assert!(matches!(claim(&ledger(false, Some(other)), &event).await, Ok(Claim::Conflict(_))));
        // A rejection carries no decision to know it by: it is read back as the key's entry, which answers for it.
        let rejection = rejected("item-1".into(), None, "why");
        assert!(matches!(claim(&ledger(true, None), &rejection).await, Ok(Claim::Theirs(_))));
    }

    #[test]
    fn a_rejection_fits_the_ledger_whatever_it_quotes() {
        let quoting = format!("no policy {:?} is stored", "\"".repeat(300_000));
        let event = rejected("k".into(), None, &quoting);
        let error = event.error.unwrap_or_default();
        assert!(error.len() <= MAX_REJECTION && error.starts_with("no policy"), "{}", error.len());
    }

    #[test]
    fn clipping_keeps_characters_whole() {
        assert_eq!(clip("short", 10), "short");
        let clipped = clip(&"é".repeat(100), 11);
        assert!(clipped.len() <= 11 && clipped.ends_with('…') && clipped.starts_with("éé"), "{clipped}");
        assert_eq!(conflict_id("k", "d"), conflict_id("k", "d"), "one id per key and body, whatever the delivery");
        assert_ne!(conflict_id("k", "d"), conflict_id("k2", "d"));
        assert_ne!(conflict_id("k", "d"), conflict_id("k", "d2"), "an edited body is not the first one");
    }

    #[test]
    fn a_persons_word_answers_only_the_body_settled_apart_under_its_decision() {
        let review = |decision_id: uuid::Uuid| DecisionEvent {
            key: "k".into(),
            item_id: None,
            status: EventStatus::Reviewed,
            decision: None,
            error: None,
            review: Some(ReviewedItem {
                decision_id: decision_id.to_string(),
                appeal_of: None,
                review_id: "r".into(),
                outcome: "allow".into(),
                rule_id: None,
                policy_hash: None,
                decided_at: None,
            }),
            body_digest: None,
        };
        let first = Settled { digest: "d1", slot_answers_another: true };
        let edited = Settled { digest: "d2", slot_answers_another: true };
        for id in [conflict_id("k", "d1"), reused_id("k", "d1")] {
            assert!(first.answered_by("k", &review(id)));
            assert!(!edited.answered_by("k", &review(id)), "an edited body is not answered by the first one's review");
            assert!(!first.answered_by("k2", &review(id)), "nor another key");
        }
        assert!(edited.answered_by("k", &review(legacy_conflict_id("k"))), "answers given before ids named the body");
        let own_slot = Settled { digest: "d2", slot_answers_another: false };
        assert!(own_slot.answered_by("k", &review(uuid::Uuid::nil())), "the key's own entry: any word is this body's");
    }

    /// A redelivery outside the duplicate window read the item's subject, found no person's word yet, and published
    /// `decided` after another server's announcer had published `reviewed` in between: the producer held the item
    /// again, for good. The publish is now conditional on the last message it read.
    #[tokio::test]
    async fn a_decision_is_not_published_over_a_persons_word_that_came_in_between() {
        let nats = "127.0.0.1:4222";
        if std::net::TcpStream::connect_timeout(&nats.parse().unwrap(), Duration::from_secs(1)).is_err() {
            eprintln!("skipped: NATS is not reachable at {nats} (bash scripts/setup.sh starts it)");
            return;
        }
        let prefix = format!("sgcond{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        let bus = Bus::connect(NatsConfig::new(nats, prefix)).await.unwrap();
        let mut decided = oversized_event();
        decided.decision.as_mut().unwrap().policies.clear();
        let key = decided.key.clone();
        let id = event_id(&decided).unwrap();
        let token = subject_token(&key);
        let review = |decision_id: String| ReviewedItem {
            decision_id,
            appeal_of: None,
            review_id: "review-1".into(),
            outcome: "allow".into(),
            rule_id: None,
            policy_hash: None,
            decided_at: None,
        };

        // Nothing on the subject yet: published, conditional on its being empty.
        let first_id = status_msg_id(&decided);
        let published = bus.publish_unless(&first_id, &decided, |last| reviews_decision(last, id)).await;
        assert_eq!(published.unwrap(), Published::Sent);
        let (read, last) = bus.last_on_subject(&key).await.unwrap();
        assert_eq!(last.map(|e| e.status), Some(EventStatus::Decided));

        // The interleaving: a person's word lands after the subject was read, before the decision goes out again
        // (under another message id, as past the duplicate window: nothing else drops it).
        bus.publish_review(&key, None, review(id.to_string())).await.unwrap();
        let again = bus.publish_after(&token, "decided-again", &decided, Some(read)).await.unwrap();
        assert!(!again, "refused: the subject moved on since it was read");
        let published = bus.publish_unless("decided-again", &decided, |last| reviews_decision(last, id)).await;
        assert_eq!(published.unwrap(), Published::Answered, "read again, the person's word answers it");
        let (_, last) = bus.last_on_subject(&key).await.unwrap();
        assert_eq!(last.map(|e| e.status), Some(EventStatus::Reviewed), "the person's word is still the last");

        // A person's word on another decision answers nothing: published after it.
        bus.publish_review(&key, None, ReviewedItem { review_id: "review-2".into(), ..review("other".into()) })
            .await
            .unwrap();
        let published = bus.publish_unless("decided-third", &decided, |last| reviews_decision(last, id)).await;
        assert_eq!(published.unwrap(), Published::Sent);
        let (_, last) = bus.last_on_subject(&key).await.unwrap();
        assert_eq!(last.map(|e| e.status), Some(EventStatus::Decided));

        for name in [&bus.config.work_stream, &bus.config.decision_stream, &bus.config.decided_stream] {
            let _ = bus.js.delete_stream(name).await;
        }
    }

    /// `--retain-days` reaches the decision stream and the ledger, also when they were made before without it; a
    /// worker started without it leaves the limit others set.
    #[tokio::test]
    async fn the_retention_asked_for_holds_on_streams_made_before() {
        let nats = "127.0.0.1:4222";
        if std::net::TcpStream::connect_timeout(&nats.parse().unwrap(), Duration::from_secs(1)).is_err() {
            eprintln!("skipped: NATS is not reachable at {nats} (bash scripts/setup.sh starts it)");
            return;
        }
        let prefix = format!("sgretain{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        let ages = |bus: Bus| async move {
            let mut ages = Vec::new();
            for name in [&bus.config.decision_stream, &bus.config.decided_stream] {
                ages.push(bus.js.get_stream(name).await.unwrap().info().await.unwrap().config.max_age);
            }
            ages
        };
        let kept = Bus::connect(NatsConfig::new(nats, prefix.clone())).await.unwrap();
        assert_eq!(ages(kept).await, [Duration::ZERO; 2], "kept for good unless asked");
        let day = Duration::from_secs(86_400);
        let retained = Bus::connect(NatsConfig { retain: Some(day), ..NatsConfig::new(nats, prefix.clone()) });
        assert_eq!(ages(retained.await.unwrap()).await, [day; 2]);
        let bus = Bus::connect(NatsConfig::new(nats, prefix)).await.unwrap();
        assert_eq!(ages(bus.clone()).await, [day; 2], "a worker without --retain-days leaves it");
        for name in [&bus.config.work_stream, &bus.config.decision_stream, &bus.config.decided_stream] {
            let _ = bus.js.delete_stream(name).await;
        }
    }
}

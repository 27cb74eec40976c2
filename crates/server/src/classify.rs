//! `/v1/classify` and `/v1/classify/batch`, and the decision path shared by jobs, replay and moderations:
//! parse and bound the request, resolve policies to immutable versions, classify, record, count.
//!
//! `/v1/classify` has two routes. By default (no `effort`, or `"route": "cascade"`) the item goes through
//! the cascade: triage, then reasoning at low effort, then high, then a person; the reply keeps the shape of
//! a direct decision and adds which stage settled each policy. A pinned `effort` (or `"route": "direct"`, or
//! `"mode": "combined"`, which only direct reasoning honours) reasons once at that effort, as before.

use std::time::Instant;

use axum::Json;
use axum::extract::State;
use axum::response::IntoResponse;
use safeguard_core::input::{InputLimits, parse_item};
use safeguard_core::{ClassifyOptions, ContextOverflow, Decision, Mode};
use safeguard_engine::Sampling;
use safeguard_harmony::{Content, Effort, Tokenizer, user_message_text};
use safeguard_pipeline::{CascadeDecision, RouteContext};
use safeguard_policy::Policy;
use safeguard_store::{DecisionRecord, NewReview, now_ms};
use safeguard_verdict::Outcome;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiJson};
use crate::moderate::{StoredItem, deferred_error, stages_json, store_cascade_item};
use crate::policies::{InlineText, inline_conflict, keep_inline, resolve_policy};
use crate::timing::StageTimer;

/// How `/v1/classify` decides an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClassifyRoute {
    /// Triage → reasoning at low effort → high effort → a person, per policy.
    #[default]
    Cascade,
    /// Reasoning once, at the request's effort (or the server's default effort).
    Direct,
}

impl ClassifyRoute {
    pub fn as_str(self) -> &'static str {
        match self {
            ClassifyRoute::Cascade => "cascade",
            ClassifyRoute::Direct => "direct",
        }
    }
}

impl std::str::FromStr for ClassifyRoute {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cascade" => Ok(ClassifyRoute::Cascade),
            "direct" => Ok(ClassifyRoute::Direct),
            other => Err(format!("unknown route {other:?}; use cascade or direct")),
        }
    }
}

/// The route a classify request asks for. Pinning an effort or combined mode means direct reasoning: the
/// cascade chooses its own efforts and asks about each policy apart.
fn route_of(state: &AppState, body: &Value) -> Result<ClassifyRoute, ApiError> {
    let present = |key: &str| body.get(key).is_some_and(|v| !v.is_null());
    let pins_direct = present("effort")
        || present("reasoning_effort")
        || body.get("mode").and_then(Value::as_str) == Some("combined");
    match body.get("route") {
        None | Some(Value::Null) => Ok(if pins_direct { ClassifyRoute::Direct } else { state.config.classify_route }),
        Some(Value::String(route)) => {
            match route.parse::<ClassifyRoute>().map_err(|e| ApiError::bad("invalid_route", e))? {
                ClassifyRoute::Cascade if pins_direct => Err(ApiError::bad(
                    "invalid_route",
                    "\"route\": \"cascade\" chooses efforts itself and asks about each policy apart; drop \"effort\" (or \"mode\": \"combined\"), or use \"route\": \"direct\"",
                )),
                route => Ok(route),
            }
        }
        Some(_) => Err(ApiError::bad("invalid_route", "\"route\" must be \"cascade\" or \"direct\"")),
    }
}

/// How to decide, independent of what is decided. Stored with jobs so that a job decides exactly what
/// was asked, with the policy versions resolved at submission.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Settings {
    pub effort: Effort,
    pub mode: Mode,
    pub max_tokens: Option<usize>,
}

impl Settings {
    /// The prompts deciding `items` items under `policies` policies costs: one per policy each, or one per item
    /// when the policies share a combined prompt.
    pub fn prompts(&self, policies: usize, items: usize) -> usize {
        match self.mode {
            Mode::Separate => policies * items,
            Mode::Combined => items.min(policies * items),
        }
    }
}

/// The fields that hold an item's content; a body gives `content` or the others.
const CONTENT_FIELDS: [&str; 5] = ["text", "prompt", "response", "messages", "content"];
/// How to decide it, on the routes that reason directly.
const SETTINGS_FIELDS: [&str; 6] = ["policies", "effort", "reasoning_effort", "mode", "max_tokens", "return_reasoning"];

/// The fields `/v1/classify` reads.
pub(crate) const CLASSIFY_FIELDS: [&[&str]; 3] = [&CONTENT_FIELDS, &SETTINGS_FIELDS, &["route"]];
/// The fields `/v1/classify/batch` reads; each of its items holds content fields only.
const BATCH_FIELDS: [&[&str]; 2] = [&SETTINGS_FIELDS, &["items"]];
/// The fields `/v1/jobs` reads: a job reasons directly, so it has no `route`.
pub(crate) const JOB_FIELDS: [&[&str]; 3] = [&CONTENT_FIELDS, &SETTINGS_FIELDS, &["webhook_url"]];
/// The fields `/v1/moderate` reads: the cascade chooses its own efforts and asks about each policy apart.
pub(crate) const MODERATE_FIELDS: [&[&str]; 2] =
    [&CONTENT_FIELDS, &["policies", "max_tokens", "return_reasoning", "appeal"]];

/// Parses and checks a request body: its content, policy references and settings.
pub(crate) struct Parsed {
    pub content: Content,
    pub policies: NamedPolicies,
    pub settings: Settings,
    pub return_reasoning: bool,
}

pub(crate) fn parse_content(state: &AppState, body: &Value) -> Result<Content, ApiError> {
    let limits = &state.config.limits;
    let object = body.as_object().ok_or_else(|| ApiError::bad("invalid_request", "expected a JSON object"))?;
    // Only the content fields go to the shared item parser; the rest of the request is ours.
    let mut content_fields = serde_json::Map::new();
    for key in CONTENT_FIELDS.into_iter().filter(|&key| key != "content") {
        if let Some(value) = object.get(key) {
            content_fields.insert(key.to_string(), value.clone());
        }
    }
    let content = if let Some(explicit) = object.get("content") {
        if !content_fields.is_empty() {
            return Err(ApiError::bad("invalid_content", "give either \"content\" or text/prompt/response/messages"));
        }
        let content = serde_json::from_value::<Content>(explicit.clone())
            .map_err(|e| ApiError::bad("invalid_content", format!("\"content\": {e}")))?;
        // Held to what the other fields are: blank content (no messages, only spaces) is no item to decide.
        safeguard_core::input::check_content(&content, &InputLimits { max_chars: limits.max_content_chars })
            .map_err(|e| ApiError::bad("invalid_content", format!("\"content\": {e}")))?;
        content
    } else {
        let item = parse_item(
            &Value::Object(content_fields).to_string(),
            &InputLimits { max_chars: limits.max_content_chars },
        )
        .map_err(|e| ApiError::bad("invalid_content", e.to_string()))?;
        item.content
    };
    check_content_tokens(state, &content)?;
    Ok(content)
}

fn check_content_tokens(state: &AppState, content: &Content) -> Result<(), ApiError> {
    check_prompt_size(state, content, "")
}

/// The content limits, applied to the content and the caller's own `instructions` (a chat's system and developer
/// messages) together: both are prompt the model must read.
pub(crate) fn check_prompt_size(state: &AppState, content: &Content, instructions: &str) -> Result<(), ApiError> {
    let limits = &state.config.limits;
    let what = if instructions.is_empty() { "the content is" } else { "the content and instructions are" };
    let chars = content.prompt_chars().saturating_add(instructions.chars().count());
    if chars > limits.max_content_chars {
        return Err(ApiError::bad(
            "content_too_long",
            format!("{what} {chars} characters; the limit is {}", limits.max_content_chars),
        ));
    }
    let tokenizer = Tokenizer::shared();
    let tokens = tokenizer.count(&user_message_text(content)) + tokenizer.count(instructions);
    if tokens > limits.max_content_tokens {
        return Err(ApiError::bad(
            "content_too_long",
            format!("{what} {tokens} tokens; the limit is {}", limits.max_content_tokens),
        ));
    }
    Ok(())
}

/// Content whose prompts would not fit the model's context with room for their answers is refused (400
/// `content_too_long`) before anything is admitted: the engine would fail every such call, and the item would
/// reach a person only after calls paid at their caps.
pub(crate) fn refuse_overflow(checked: Result<(), ContextOverflow>) -> Result<(), ApiError> {
    checked.map_err(|overflow| ApiError::bad("content_too_long", overflow.to_string()))
}

pub(crate) fn parse_settings(state: &AppState, body: &Value) -> Result<(Settings, bool), ApiError> {
    let effort = match ApiError::either_field(body, "effort", "reasoning_effort")? {
        None | Some(Value::Null) => state.config.default_effort,
        Some(Value::String(s)) => s
            .parse::<Effort>()
            .map_err(|_| ApiError::bad("invalid_effort", format!("unknown effort {s:?}; use low, medium or high")))?,
        Some(_) => return Err(ApiError::bad("invalid_effort", "\"effort\" must be a string")),
    };
    let mode = match body.get("mode") {
        None | Some(Value::Null) => Mode::default(),
        Some(Value::String(s)) => s.parse::<Mode>().map_err(|e| ApiError::bad("invalid_mode", e))?,
        Some(_) => return Err(ApiError::bad("invalid_mode", "\"mode\" must be a string")),
    };
    let max_tokens = parse_max_tokens(state, body)?;
    let return_reasoning = ApiError::flag(body, "return_reasoning")?;
    Ok((Settings { effort, mode, max_tokens }, return_reasoning))
}

/// A request's completion-token cap per reasoning step (`max_tokens`), within the server's limit; `None` leaves
/// it to the server's setting.
pub(crate) fn parse_max_tokens(state: &AppState, body: &Value) -> Result<Option<usize>, ApiError> {
    match body.get("max_tokens") {
        None | Some(Value::Null) => Ok(None),
        Some(value) => {
            let n = value
                .as_u64()
                .ok_or_else(|| ApiError::bad("invalid_max_tokens", "\"max_tokens\" must be a positive integer"))?;
            let cap = state.config.limits.max_tokens;
            if n == 0 || n as usize > cap {
                return Err(ApiError::bad(
                    "max_tokens_exceeded",
                    format!("\"max_tokens\" must be between 1 and {cap}"),
                ));
            }
            Ok(Some(n as usize))
        }
    }
}

pub(crate) async fn parse_policies(state: &AppState, body: &Value, caller: &Caller) -> Result<NamedPolicies, ApiError> {
    let refs = match body.get("policies") {
        Some(Value::Array(refs)) if !refs.is_empty() => refs.clone(),
        Some(Value::String(single)) => vec![Value::String(single.clone())],
        _ => {
            return Err(ApiError::bad(
                "missing_policies",
                "\"policies\" must list at least one policy: a name, a \"sha256:…\" version, or {\"text\": \"…\"}",
            ));
        }
    };
    let limit = state.config.limits.max_policies;
    if refs.len() > limit {
        return Err(ApiError::bad("too_many_policies", format!("{} policies given; the limit is {limit}", refs.len())));
    }
    let mut policies = Vec::with_capacity(refs.len());
    let mut inline = Vec::with_capacity(refs.len());
    for reference in &refs {
        let (policy, sent) = resolve_policy(state, reference, caller).await?;
        policies.push(policy);
        inline.push(sent);
    }
    Ok(NamedPolicies { policies, inline })
}

/// The policies a request names, resolved, with the inline ones not stored yet: checks that need the policies (does
/// the content fit the model's context beside them?) run on [`list`](Self::list), and [`keep`](Self::keep) stores
/// the inline ones once the request has passed them, so that a refused request stores nothing.
pub(crate) struct NamedPolicies {
    policies: Vec<Policy>,
    /// Beside each policy: what it was sent as, when it came inline.
    inline: Vec<Option<InlineText>>,
}

impl NamedPolicies {
    pub(crate) fn list(&self) -> &[Policy] {
        &self.policies
    }

    /// [`keep`](Self::keep), once `content` is found to fit the model's context beside these policies when reasoned
    /// about directly with `settings` (400 `content_too_long` when it does not).
    pub(crate) async fn keep_if_it_fits(
        self,
        state: &AppState,
        content: &Content,
        settings: &Settings,
    ) -> Result<Vec<Policy>, ApiError> {
        refuse_overflow(state.classifier.check_fits_context(&self.policies, content, &options(settings)))?;
        self.keep(state).await
    }

    /// Stores the inline policies and gives back every policy, in the order named. A conflict (a body known under
    /// other front matter) is looked for in all of them first, so that a request refused for one stores none.
    pub(crate) async fn keep(self, state: &AppState) -> Result<Vec<Policy>, ApiError> {
        let sent = || {
            let pairs = self.policies.iter().zip(&self.inline).enumerate();
            pairs.filter_map(|(at, (policy, sent))| Some((at, policy, sent.as_ref()?)))
        };
        for (at, policy, _) in sent() {
            inline_conflict(state, policy, &self.policies[..at]).await?;
        }
        for (_, policy, sent) in sent() {
            keep_inline(state, policy, sent).await?;
        }
        Ok(self.policies)
    }
}

pub(crate) async fn parse_request(state: &AppState, body: &Value, caller: &Caller) -> Result<Parsed, ApiError> {
    let content = parse_content(state, body)?;
    let (settings, return_reasoning) = parse_settings(state, body)?;
    if return_reasoning {
        caller.require("audit")?;
    }
    let policies = parse_policies(state, body, caller).await?;
    Ok(Parsed { content, policies, settings, return_reasoning })
}

pub(crate) fn options(settings: &Settings) -> ClassifyOptions {
    ClassifyOptions {
        effort: settings.effort,
        date: None,
        mode: settings.mode,
        max_tokens: settings.max_tokens,
        // Always kept: it is stored apart, readable with the audit scope, and stripped from replies.
        include_reasoning: true,
        sampling: Sampling::Greedy,
    }
}

fn sampling_json(sampling: &Sampling) -> Value {
    match sampling {
        Sampling::Greedy => json!({"kind": "greedy"}),
        Sampling::Seeded { seed, temperature, top_p } => {
            json!({"kind": "seeded", "seed": seed, "temperature": temperature, "top_p": top_p})
        }
    }
}

pub(crate) fn outcome_str(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Allow => "allow",
        Outcome::Violation => "violation",
        Outcome::NeedsReview => "needs_review",
    }
}

/// Where a decision comes from: the way in that stored it (its `source`, a metric label too) and the API key that
/// submitted the item, its owner (`None` for the bus and a keyless server).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Origin<'a> {
    pub source: &'a str,
    pub submitted_by: Option<&'a str>,
}

impl<'a> Origin<'a> {
    pub(crate) fn of(caller: &'a Caller, source: &'a str) -> Self {
        Origin { source, submitted_by: caller.submitter() }
    }
}

/// The stored form of a decision. The reasoning is returned apart, for its own table.
pub(crate) fn record_of(
    decision: &Decision,
    policies: &[Policy],
    content: &Content,
    settings: &Settings,
    origin: Origin<'_>,
    job_id: Option<&str>,
) -> (DecisionRecord, Vec<String>) {
    let wire = serde_json::to_value(decision).unwrap_or(Value::Null);
    let errors: Vec<String> = decision.prompts.iter().filter_map(|p| p.error.clone()).collect();
    let prompt_hashes: Vec<&str> = decision.prompts.iter().filter_map(|p| p.prompt_sha256.as_deref()).collect();
    let record = DecisionRecord {
        id: decision.id.to_string(),
        created_at: now_ms(),
        policy_hashes: policies.iter().map(|p| p.hash.to_string()).collect(),
        policy_names: policies.iter().map(|p| p.meta.name.clone()).collect(),
        model_id: decision.model.clone(),
        effort: settings.effort.to_string(),
        prompt_hash: (!prompt_hashes.is_empty()).then(|| prompt_hashes.join(",")),
        sampling: json!({"sampling": sampling_json(&options(settings).sampling), "mode": settings.mode, "max_tokens": settings.max_tokens}),
        content: serde_json::to_value(content).unwrap_or(Value::Null),
        verdicts: wire.get("verdicts").cloned().unwrap_or(Value::Array(Vec::new())),
        outcome: outcome_str(decision.outcome).to_string(),
        failure_reason: (!errors.is_empty()).then(|| errors.join("; ")),
        timings: json!({"total": decision.timings, "prompts": wire.get("prompts").cloned().unwrap_or(Value::Null)}),
        prompt_tokens: stored_count(decision.usage.prompt_tokens),
        cached_prompt_tokens: stored_count(decision.usage.cached_prompt_tokens),
        completion_tokens: stored_count(decision.usage.completion_tokens),
        source: origin.source.to_string(),
        job_id: job_id.map(str::to_string),
        replay_of: None,
        submitted_by: origin.submitted_by.map(str::to_string),
    };
    (record, decision.reasoning.clone())
}

pub(crate) fn count_decision(decision: &Decision, source: &str, elapsed_secs: f64) {
    count_reasoning(decision);
    count_outcome(decision.outcome, source, elapsed_secs);
}

/// What one reasoning step judged and spent: per policy and effort, and tokens.
pub(crate) fn count_reasoning(decision: &Decision) {
    let effort = decision.effort.to_string();
    for verdict in &decision.verdicts {
        metrics::counter!("safeguard_decisions_total",
            "policy" => safeguard_core::policy_label(&verdict.policy), "outcome" => outcome_str(verdict.outcome), "effort" => effort.clone())
        .increment(1);
    }
    let usage = decision.usage;
    metrics::counter!("safeguard_tokens_total", "kind" => "prompt").increment(usage.prompt_tokens as u64);
    metrics::counter!("safeguard_tokens_total", "kind" => "completion").increment(usage.completion_tokens as u64);
    metrics::counter!("safeguard_prompt_cache_hit_tokens_total").increment(usage.cached_prompt_tokens as u64);
}

/// One item's outcome and how long it took, once per item whatever number of steps decided it.
pub(crate) fn count_outcome(outcome: Outcome, source: &str, elapsed_secs: f64) {
    metrics::counter!("safeguard_outcomes_total", "outcome" => outcome_str(outcome), "source" => source.to_string())
        .increment(1);
    metrics::histogram!("safeguard_decision_latency_seconds", "source" => source.to_string()).record(elapsed_secs);
}

/// Reasons about one item and stores the decision before it is returned, with the review `review_of` says it
/// needs (classify: one if the model left it undecided; an appeal: always the appeal) in the same transaction.
/// Marks `reason` and `store` on `timer`; returns the review's id with the decision.
pub(crate) async fn reason_and_store(
    state: &AppState,
    policies: &[Policy],
    content: &Content,
    settings: &Settings,
    origin: Origin<'_>,
    timer: &mut StageTimer,
    review_of: impl FnOnce(&Decision, &DecisionRecord) -> Option<NewReview>,
) -> Result<(Decision, DecisionRecord, Option<String>), ApiError> {
    let (decision, record, reasoning, elapsed) = reason_one(state, policies, content, settings, origin).await?;
    timer.mark("reason");
    let review = review_of(&decision, &record);
    let review_id = crate::reviews::store_decision(state, &record, &reasoning, review.as_ref()).await?;
    // Counted once stored: a decision that failed to store is made again by the client's retry, and the model's
    // cost is counted per prompt by the prompt observer either way.
    count_decision(&decision, origin.source, elapsed);
    state.items.observe("direct", decision.usage, elapsed);
    timer.mark("store");
    Ok((decision, record, review_id))
}

/// What every single-item path does before it stores: admits the prompts, reasons, pays, and builds the record
/// (with its chain of thought apart). Returns the seconds the model took too.
pub(crate) async fn reason_one(
    state: &AppState,
    policies: &[Policy],
    content: &Content,
    settings: &Settings,
    origin: Origin<'_>,
) -> Result<(Decision, DecisionRecord, Vec<String>, f64), ApiError> {
    let mut step =
        state.cascade.admit(settings.prompts(policies.len(), 1), settings.effort, settings.max_tokens).await?;
    let started = Instant::now();
    let decision = state.classifier.classify(policies, content, &options(settings)).await;
    step.pay(&decision, settings.max_tokens);
    let elapsed = started.elapsed().as_secs_f64();
    let (record, reasoning) = record_of(&decision, policies, content, settings, origin, None);
    Ok((decision, record, reasoning, elapsed))
}

/// Reasons about several items in one batch and stores their decisions all or none, each with the review it
/// needs if the model left it undecided: a request answered with an error has stored nothing for its retry to
/// repeat. Returns each item's decision and record, in order.
pub(crate) async fn decide_and_store_many(
    state: &AppState,
    policies: &[Policy],
    contents: &[Content],
    settings: &Settings,
    origin: Origin<'_>,
) -> Result<Vec<(Decision, DecisionRecord)>, ApiError> {
    let prompts = settings.prompts(policies.len(), contents.len());
    let mut step = state.cascade.admit(prompts, settings.effort, settings.max_tokens).await?;
    let started = Instant::now();
    let decisions = state.classifier.classify_many(policies, contents, &options(settings)).await;
    step.pay_all(&decisions, settings.max_tokens);
    let elapsed = started.elapsed().as_secs_f64();
    let records: Vec<_> = decisions
        .iter()
        .zip(contents)
        .map(|(decision, content)| {
            let (record, reasoning) = record_of(decision, policies, content, settings, origin, None);
            let review = crate::reviews::review_if_undecided(decision, &record, policies);
            (record, reasoning, review)
        })
        .collect();
    crate::reviews::store_decisions(state, &records).await?;
    // Counted once stored: a batch that fails is stored by its retry, and counting both would count it twice.
    for decision in &decisions {
        count_decision(decision, origin.source, elapsed);
        state.items.observe("direct", decision.usage, elapsed / contents.len().max(1) as f64);
    }
    Ok(decisions.into_iter().zip(records.into_iter().map(|(record, _, _)| record)).collect())
}

/// The reply body for a decision: core's decision JSON plus what the service adds.
pub(crate) fn decision_reply(decision: &Decision, record: &DecisionRecord, with_reasoning: bool) -> Value {
    let mut value = serde_json::to_value(decision).unwrap_or(Value::Null);
    if let Some(object) = value.as_object_mut() {
        if !with_reasoning {
            object.remove("reasoning");
        }
        object.insert("decision_id".into(), json!(record.id));
        object.insert(
            "policies".into(),
            json!(
                record
                    .policy_names
                    .iter()
                    .zip(&record.policy_hashes)
                    .map(|(n, h)| json!({"name": n, "hash": h}))
                    .collect::<Vec<_>>()
            ),
        );
        if let Some(reason) = &record.failure_reason {
            object.insert("failure_reason".into(), json!(reason));
        }
    }
    value
}

pub(crate) async fn classify(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<Value>,
) -> Result<impl IntoResponse, ApiError> {
    let mut timer = StageTimer::start();
    caller.require("classify")?;
    ApiError::refuse_unknown_fields(&body, &CLASSIFY_FIELDS)?;
    let route = route_of(&state, &body)?;
    let parsed = parse_request(&state, &body, &caller).await?;
    if route == ClassifyRoute::Direct {
        let policies = parsed.policies.keep_if_it_fits(&state, &parsed.content, &parsed.settings).await?;
        timer.mark("policy");
        let review_of = |decision: &Decision, record: &DecisionRecord| {
            crate::reviews::review_if_undecided(decision, record, &policies)
        };
        let origin = Origin::of(&caller, "api");
        let (decision, record, _) =
            reason_and_store(&state, &policies, &parsed.content, &parsed.settings, origin, &mut timer, review_of)
                .await?;
        let mut reply = decision_reply(&decision, &record, parsed.return_reasoning);
        reply["route"] = json!(route.as_str());
        return Ok(([timer.header()], Json(reply)));
    }
    let ctx = RouteContext { appeal: false, include_reasoning: true };
    let pipeline = state.cascade.pipeline(&state, parsed.policies.list(), parsed.settings.max_tokens);
    refuse_overflow(pipeline.check_fits_context(parsed.policies.list(), &parsed.content, &ctx))?;
    let policies = parsed.policies.keep(&state).await?;
    timer.mark("policy");
    let started = Instant::now();
    let cascade = pipeline.decide(&policies, &parsed.content, &ctx).await.map_err(deferred_error)?;
    let elapsed = started.elapsed().as_secs_f64();
    timer.mark("cascade");
    let origin = Origin::of(&caller, "api");
    let stored =
        store_cascade_item(&state, &cascade, &policies, Some(&parsed.content), origin, Value::Null, None).await?;
    state.items.observe("cascade", cascade.usage, elapsed);
    timer.mark("store");
    Ok(([timer.header()], Json(cascade_reply(&cascade, &stored, parsed.return_reasoning))))
}

/// A cascade decision in the shape of a direct one (`decision_id`, `outcome`, `verdicts`, `usage`, `timings`,
/// `model`, `effort`, `mode`, `prompts`, `policies`, `failure_reason`, `reasoning` when asked), plus
/// `route`, `decided_by` (the furthest stage any policy needed) and `stages`. Each verdict carries `stage`
/// (where that policy was settled), `escalations` and `triage`.
pub(crate) fn cascade_reply(cascade: &CascadeDecision, stored: &StoredItem, with_reasoning: bool) -> Value {
    let record = &stored.record;
    let prompts: Vec<Value> = cascade
        .reasoning
        .iter()
        .flat_map(|d| {
            d.prompts.iter().map(move |p| {
                let mut prompt = serde_json::to_value(p).unwrap_or(Value::Null);
                prompt["effort"] = json!(d.effort);
                prompt
            })
        })
        .collect();
    let mut reply = json!({
        "id": cascade.id,
        "decision_id": record.id,
        "outcome": outcome_str(cascade.outcome),
        "verdicts": record.verdicts,
        "usage": cascade.usage,
        "timings": {"total_ms": cascade.total_ms, "work": record.timings.get("work")},
        "model": record.model_id,
        "effort": record.effort,
        "mode": "separate",
        "prompts": prompts,
        "policies": record.policy_names.iter().zip(&record.policy_hashes)
            .map(|(n, h)| json!({"name": n, "hash": h})).collect::<Vec<_>>(),
        "route": ClassifyRoute::Cascade.as_str(),
        "decided_by": cascade.decided_by,
        "stages": stages_json(cascade),
    });
    if let Some(reason) = &record.failure_reason {
        reply["failure_reason"] = json!(reason);
    }
    if with_reasoning && !stored.reasoning.is_empty() {
        reply["reasoning"] = json!(stored.reasoning);
    }
    reply
}

/// `{"items": [{content…}, …], "policies": …, "effort": …}` → one result per item, in order: a decision, or
/// the error for that item. Valid items are decided together in one `reason_batch`.
pub(crate) async fn classify_batch(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    caller.require("classify")?;
    ApiError::refuse_unknown_fields(&body, &BATCH_FIELDS)?;
    let items = body
        .get("items")
        .and_then(Value::as_array)
        .filter(|items| !items.is_empty())
        .ok_or_else(|| ApiError::bad("missing_items", "\"items\" must be a non-empty array of contents"))?;
    let limit = state.config.limits.max_batch_items;
    if items.len() > limit {
        return Err(ApiError::bad("too_many_items", format!("{} items given; the limit is {limit}", items.len())));
    }
    let (settings, return_reasoning) = parse_settings(&state, &body)?;
    if return_reasoning {
        caller.require("audit")?;
    }
    let named = parse_policies(&state, &body, &caller).await?;
    let parsed: Vec<Result<Content, ApiError>> = items
        .iter()
        .map(|item| {
            ApiError::refuse_unknown_fields(item, &[&CONTENT_FIELDS])?;
            let content = parse_content(&state, item)?;
            refuse_overflow(state.classifier.check_fits_context(named.list(), &content, &options(&settings)))?;
            Ok(content)
        })
        .collect();
    let valid: Vec<Content> = parsed.iter().filter_map(|p| p.as_ref().ok().cloned()).collect();
    // Items are refused one by one; with none left, nothing is decided or stored, an inline policy included.
    let decided = if valid.is_empty() {
        Vec::new()
    } else {
        let policies = named.keep(&state).await?;
        decide_and_store_many(&state, &policies, &valid, &settings, Origin::of(&caller, "batch")).await?
    };
    let mut stored = decided.iter();
    let mut results = Vec::with_capacity(items.len());
    for item in parsed {
        results.push(match item {
            Err(error) => json!({"error": {"message": error.to_string()}}),
            Ok(_) => match stored.next() {
                Some((decision, record)) => decision_reply(decision, record, return_reasoning),
                None => json!({"error": {"message": "no decision was produced for this item"}}),
            },
        });
    }
    Ok(Json(json!({"results": results})))
}

/// A token count as the store keeps it. Counts saturate at `usize::MAX` (they come from backends this process does
/// not control), and `as` would store that as -1.
pub(crate) fn stored_count(tokens: usize) -> i64 {
    i64::try_from(tokens).unwrap_or(i64::MAX)
}

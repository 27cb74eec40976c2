//! The cascade in the service. Triage settles what it is sure of, the model reasons about the rest at low
//! effort, shaky answers are asked again at high effort, and what is still unsure is queued for a person.
//!
//! `POST /v1/moderate` (the cascade's own view, source `cascade:<stage>`), `POST /v1/classify` (its default
//! route) and the NATS worker all store one decision per item ([`store_cascade_item`]): the verdict each policy
//! ended with, the stage that settled it and why it left every stage before, all reasoning steps' chains of
//! thought and usage together. An item that ends with a person is queued for review, and a settled item that
//! would teach triage the most may be queued at low priority (active learning).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use safeguard_core::{Decision, Timings};
use safeguard_harmony::{Content, Effort};
use safeguard_pipeline::{
    ActiveLearning, Budgets, CascadeDecision, CascadeStats, Escalation, Pipeline, PolicyRoute, ReasoningBudget,
    RouteContext, RoutingConfig, SampleReason, Stage, TriageLibrary, UnpaidStep,
};
use safeguard_policy::Policy;
use safeguard_store::{DecisionRecord, NewReview, ReviewRecord, now_ms};
use safeguard_verdict::Outcome;
use serde_json::{Value, json};
use tracing::debug;

use crate::AppState;
use crate::auth::Caller;
use crate::classify::{
    Origin, count_outcome, count_reasoning, outcome_str, parse_content, parse_max_tokens, parse_policies,
    refuse_overflow,
};
use crate::error::{ApiError, ApiJson};

/// Sampled items wait behind everything a person must see.
const SAMPLE_PRIORITY: i64 = 0;

/// What the cascade needs beyond the classifier, shared by all requests.
pub(crate) struct CascadeState {
    pub routing: RoutingConfig,
    pub triage: TriageLibrary,
    /// Every way into the model takes from these: the cascade, and the direct paths through [`Self::admit`].
    pub budgets: Budgets,
    /// The same buckets for queued work (jobs, the NATS stream), held to `--queue-share` of them.
    pub queue_budgets: Budgets,
    pub stats: Arc<CascadeStats>,
    pub active_learning: ActiveLearning,
}

impl CascadeState {
    pub(crate) fn new(
        routing: RoutingConfig,
        triage: TriageLibrary,
        reasoning_per_sec: Option<f64>,
        reasoning_tokens_per_sec: Option<f64>,
        queue_share: f64,
        active_learning: ActiveLearning,
        completion_caps: safeguard_core::TokenBudgets,
    ) -> Self {
        // One second's worth of burst: enough for one item's worth of calls; tokens are paid after the fact.
        let bucket =
            |rate: f64| Arc::new(ReasoningBudget::new(rate, rate.ceil().clamp(1.0, f64::from(u32::MAX)) as u32));
        let budgets = Budgets::new(reasoning_per_sec.map(bucket), reasoning_tokens_per_sec.map(bucket))
            .with_completion_caps(completion_caps);
        let queue_budgets = budgets.for_queue(queue_share);
        Self { routing, triage, budgets, queue_budgets, stats: Arc::new(CascadeStats::new()), active_learning }
    }

    /// Admits `prompts` prompts on a path outside the cascade (a pinned effort, a batch, moderations, chat, a
    /// replay, an appeal): the budget guards the model, so no way in may spend past it. Over budget the caller is
    /// told to come back (429 with `Retry-After`), after waiting at most `--max-budget-wait`; nothing is decided.
    /// Admitted, the step is the caller's to pay once its decisions are known ([`UnpaidStep::pay`]: what they
    /// spent, failed prompts at their completion cap, the cascade's rule too); dropped unpaid (the client hung
    /// up), it pays every prompt's cap.
    pub(crate) async fn admit(
        &self,
        prompts: usize,
        effort: Effort,
        max_tokens: Option<usize>,
    ) -> Result<UnpaidStep, ApiError> {
        self.budgets.admit(prompts, self.routing.max_budget_wait).await.map_err(deferred_error)?;
        Ok(self.budgets.step_of(prompts, effort, max_tokens))
    }

    /// The cascade for these policies, for a request waiting on its answer; `max_tokens` overrides the configured
    /// completion budget per prompt.
    pub(crate) fn pipeline(&self, state: &AppState, policies: &[Policy], max_tokens: Option<usize>) -> Pipeline {
        self.pipeline_on(state, policies, max_tokens).with_budgets(self.budgets.clone())
    }

    /// The cascade for queued work (the NATS stream), held to the queue's share of the budget.
    pub(crate) fn queued_pipeline(&self, state: &AppState, policies: &[Policy]) -> Pipeline {
        self.pipeline_on(state, policies, None).with_budgets(self.queue_budgets.clone())
    }

    fn pipeline_on(&self, state: &AppState, policies: &[Policy], max_tokens: Option<usize>) -> Pipeline {
        let mut routing = self.routing.clone();
        if max_tokens.is_some() {
            routing.max_tokens = max_tokens;
        }
        let mut pipeline = Pipeline::new(state.classifier.clone(), routing).with_stats(self.stats.clone());
        for policy in policies {
            if let Some(triage) = self.triage.for_policy(policy) {
                pipeline = pipeline.with_triage(policy.hash.to_string(), triage);
            }
        }
        pipeline
    }
}

/// Over budget: the caller holds the item and retries; nothing is allowed by default.
pub(crate) fn deferred_error(deferred: safeguard_pipeline::Deferred) -> ApiError {
    ApiError::RateLimited { retry_after_secs: deferred.retry_after.as_secs().max(1) }
}

pub(crate) async fn moderate(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    caller.require("classify")?;
    ApiError::refuse_unknown_fields(&body, &crate::classify::MODERATE_FIELDS)?;
    // A refused request leaves nothing behind: the inline policies it names are stored only once it has passed
    // every check (`NamedPolicies::keep`).
    let return_reasoning = ApiError::flag(&body, "return_reasoning")?;
    if return_reasoning {
        caller.require("audit")?;
    }
    let appeal = ApiError::flag(&body, "appeal")?;
    // An appeal here names no decision, so nothing ties it to one the caller made, and it goes to the head of the
    // queue with the appeal's short deadline: a key that may only classify could put anything there. Such a
    // client appeals its own decisions with `POST /v1/decisions/{id}/appeal`.
    if appeal {
        caller.require("review")?;
    }
    let content = parse_content(&state, &body)?;
    let max_tokens = parse_max_tokens(&state, &body)?;
    let named = parse_policies(&state, &body, &caller).await?;
    let ctx = RouteContext {
        appeal,
        // Kept for the reviewers and the audit log; stripped from the reply unless asked for.
        include_reasoning: true,
    };
    let pipeline = state.cascade.pipeline(&state, named.list(), max_tokens);
    refuse_overflow(pipeline.check_fits_context(named.list(), &content, &ctx))?;
    let policies = named.keep(&state).await?;
    let started = std::time::Instant::now();
    let cascade = pipeline.decide(&policies, &content, &ctx).await.map_err(deferred_error)?;
    let elapsed = started.elapsed().as_secs_f64();
    let source = format!("cascade:{}", cascade.decided_by.as_str());
    let stored = store_cascade_item(
        &state,
        &cascade,
        &policies,
        Some(&content),
        Origin::of(&caller, &source),
        Value::Null,
        None,
    )
    .await?;
    state.items.observe("moderate", cascade.usage, elapsed);

    let mut reply = serde_json::to_value(&cascade).unwrap_or(Value::Null);
    if let Some(object) = reply.as_object_mut() {
        if !return_reasoning && let Some(Value::Array(decisions)) = object.get_mut("reasoning") {
            for decision in decisions.iter_mut().filter_map(Value::as_object_mut) {
                decision.remove("reasoning");
            }
        }
        // The reasoning steps are stored inside the item's one decision, not under ids of their own.
        object.insert("stages".into(), stages_json(&cascade));
        object.insert("decision_id".into(), json!(stored.record.id));
    }
    Ok(Json(reply))
}

/// Why each policy that ended with a person got there.
fn person_reasons(cascade: &CascadeDecision) -> String {
    let reasons: Vec<String> = cascade
        .policies
        .iter()
        .filter(|r| r.decided_by == Stage::HumanReview)
        // The reason a reviewer reads in the queue: plain words, not the enum's Rust name.
        .map(|r| {
            format!("{}: {}", r.policy, r.escalations.last().map_or_else(|| "undecided".into(), |e| e.to_string()))
        })
        .collect();
    // An escalation's words may hold a "; " of their own (a backend's error text).
    reasons.join(" | ")
}

/// Queues a settled decision for a person at low priority if active learning draws it: as a `sample` where
/// triage and the model disagree or were unsure, and as an `audit` of what triage settled alone. Apart, because
/// only the audit is a uniform draw: `safeguard triage audit` estimates triage's error rate from audits alone, and
/// a sample chosen for disagreement would bias it.
async fn queue_sample(state: &AppState, cascade: &CascadeDecision, decision_id: &str) -> Result<(), ApiError> {
    let (audits, samples): (Vec<_>, Vec<_>) = state
        .cascade
        .active_learning
        .pick(cascade)
        .into_iter()
        .partition(|picked| matches!(picked.why, SampleReason::TriageAudit { .. }));
    for (kind, picked) in [("sample", samples), ("audit", audits)] {
        if picked.is_empty() {
            continue;
        }
        let reason = picked.iter().map(|p| format!("{}: {}", p.policy, p.why)).collect::<Vec<_>>().join(" | ");
        // Each asks about one policy version, and the person's answer must be for it.
        let asked = picked.first().map(|picked| picked.policy_hash.clone());
        let review = NewReview {
            decision_id: decision_id.to_string(),
            kind: kind.into(),
            priority: SAMPLE_PRIORITY,
            reason: Some(format!("active learning: {reason}")),
            sla_ms: None,
            policy_hash: asked,
        };
        // A redelivered event draws the same sample (the draw hashes the decision id): counted once.
        if !state.store.queue_review(&review).await?.fresh {
            continue;
        }
        for picked in &picked {
            metrics::counter!("safeguard_active_learning_samples_total", "reason" => picked.why.kind()).increment(1);
        }
        crate::reviews::count_queued(&review);
    }
    Ok(())
}

/// Stores one cascade decision as one decision record (id = the cascade's id), with its review in the same
/// transaction if it ended with a person, or then queues it as an active-learning sample if drawn. Idempotent by
/// id: storing the same cascade decision again (a redelivered NATS event) inserts nothing and returns
/// `fresh = false`; the review is queued again in case the decision came from a copy stored without it (queuing
/// is idempotent per decision).
///
/// An appeal linked to the decision it appeals (`appeal_of`: a bus appeal the host has checked) is stored as an
/// HTTP appeal is ([`safeguard_store::Store::insert_appeal`]): a decision is appealed once. If it was appealed
/// already (over HTTP, say), this appeal is stored linked but without a review of its own, and the appeal made
/// before answers it too ([`StoredItem::answered_by`]): a second pending appeal review would let two people
/// answer the same appeal differently, both announced on the item's subject and both exported as corrections.
pub(crate) async fn store_cascade_item(
    state: &AppState,
    cascade: &CascadeDecision,
    policies: &[Policy],
    content: Option<&Content>,
    origin: Origin<'_>,
    sampling_extra: Value,
    appeal_of: Option<&str>,
) -> Result<StoredItem, ApiError> {
    let (mut record, reasoning) =
        cascade_record(cascade, content, origin, state.cascade.routing.max_tokens, sampling_extra);
    if cascade.is_appeal() {
        // The link that sets the appealed decision's pending reviews aside for the appeal's, when both are stored.
        record.replay_of = appeal_of.map(str::to_string);
    }
    let review = (cascade.decided_by == Stage::HumanReview).then(|| {
        let review = if cascade.is_appeal() {
            crate::reviews::appeal_review(&record.id, policies, format!("appeal: {}", person_reasons(cascade)))
        } else {
            crate::reviews::review_for_person(&record.id, policies, person_reasons(cascade))
        };
        // A bus item is recorded without the policies that can no longer be read.
        if policies.len() < cascade.policies.len() { crate::reviews::due_by_default_at_latest(review) } else { review }
    });
    let (fresh, answered_by) = if let Some(stored) = state.store.get_decision(&record.id).await? {
        // Stored already, perhaps by a worker that had only the ledger's copy, without the chain of thought.
        state.store.add_missing_reasoning(&record.id, &reasoning).await?;
        // The link as stored (the first worker's, which may have found the appealed decision not stored yet).
        (false, answering_appeal(state, &stored).await?)
    } else {
        match (record.replay_of.as_deref(), review.as_ref()) {
            (Some(original), Some(review)) => store_linked_appeal(state, &record, &reasoning, review, original).await?,
            _ => (store_once(state, &record, &reasoning, review.as_ref()).await?, None),
        }
    };
    if fresh {
        // Each step's verdicts and tokens; the item's outcome once, settled by triage or by three steps alike.
        for decision in &cascade.reasoning {
            count_reasoning(decision);
        }
        count_outcome(cascade.outcome, "cascade", cascade.total_ms / 1e3);
    }
    // Queued with the decision when it was stored fresh; queued again (a no-op when it is there) for a decision
    // stored before, in case the worker that stored it stopped before queuing it. Not when an appeal made before
    // answers this one: queuing this one's would make it two.
    if let Some(review) = review.as_ref().filter(|_| !fresh && answered_by.is_none())
        && state.store.queue_review(review).await?.fresh
    {
        crate::reviews::count_queued(review);
    }
    // An item a person sees anyway is no disagreement sample (`pick` leaves those out), but the policies triage
    // settled on it are still audited: skipping them would leave the harder items out of the audit.
    if !cascade.is_appeal() {
        // The decision is stored: failing the request now would have the client send it again, and a second
        // decision be made and paid for. A sample is worth less than that.
        if let Err(e) = queue_sample(state, cascade, &record.id).await {
            tracing::warn!(decision = %record.id, "cannot queue the active-learning sample: {e}");
        }
    }
    Ok(StoredItem { record, reasoning, fresh, answered_by })
}

/// Stores `record` (with `review`, if any) unless another worker stores it first; returns whether this call did.
async fn store_once(
    state: &AppState,
    record: &DecisionRecord,
    reasoning: &[String],
    review: Option<&NewReview>,
) -> Result<bool, ApiError> {
    match crate::reviews::store_decision(state, record, reasoning, review).await {
        Ok(_) => Ok(true),
        // Another worker stored the same decision between our read and our write: theirs stands, with our
        // chain of thought if it came without one.
        Err(e) => {
            if state.store.get_decision(&record.id).await?.is_none() {
                return Err(e);
            }
            state.store.add_missing_reasoning(&record.id, reasoning).await?;
            Ok(false)
        }
    }
}

/// Stores an appeal linked to `original` under the store's one-appeal-per-decision lock; returns whether this
/// call stored it and, when `original` was appealed before by another decision, that appeal's review.
async fn store_linked_appeal(
    state: &AppState,
    record: &DecisionRecord,
    reasoning: &[String],
    review: &NewReview,
    original: &str,
) -> Result<(bool, Option<ReviewRecord>), ApiError> {
    let queued = match state.store.insert_appeal(record, Some(reasoning), review).await {
        Ok(queued) => queued,
        // The appealed decision was pruned since the host linked it: an appeal of its own, as an unlinked one is.
        Err(safeguard_store::StoreError::DecisionNotFound(_)) => {
            let unlinked = DecisionRecord { replay_of: None, ..record.clone() };
            return Ok((store_once(state, &unlinked, reasoning, Some(review)).await?, None));
        }
        Err(other) => return Err(other.into()),
    };
    if queued.fresh {
        crate::reviews::count_queued(review);
        return Ok((true, None));
    }
    if queued.review.decision_id == record.id {
        // Another worker stored this same decision, with its review, since we looked.
        state.store.add_missing_reasoning(&record.id, reasoning).await?;
        return Ok((false, None));
    }
    // Appealed before (over HTTP, or on the bus under another id). Stored all the same, linked: the ledger has
    // published this decision, so the host must hold it (exactly once), and the link is how the announcer finds
    // it when a person answers the appeal made before ([`crate::ingest`]). No review: that appeal's answers both.
    debug!(decision = %record.id, original, appeal = %queued.review.decision_id, "appealed already; answered by that appeal");
    let fresh = store_once(state, record, reasoning, None).await?;
    Ok((fresh, Some(queued.review)))
}

/// For a stored appeal linked to the decision it appeals, the review of another appeal of that decision made
/// before it, which answers this one too (see [`store_linked_appeal`]); `None` when this appeal has its own.
async fn answering_appeal(state: &AppState, stored: &DecisionRecord) -> Result<Option<ReviewRecord>, ApiError> {
    let Some(original) = stored.replay_of.as_deref() else { return Ok(None) };
    Ok(state.store.appeal_of(original).await?.filter(|review| review.decision_id != stored.id))
}

pub(crate) struct StoredItem {
    pub record: DecisionRecord,
    pub reasoning: Vec<String>,
    /// False when the decision was stored before (a redelivery).
    pub fresh: bool,
    /// For an appeal of a decision appealed before: the review of that earlier appeal, which answers this one.
    pub answered_by: Option<ReviewRecord>,
}

/// One record for a whole cascade decision: per policy the verdict it ended with, the stage that settled it,
/// why it left each stage before, and what triage saw; the reasoning steps' usage, prompts and chains of
/// thought together. The reasoning (all steps, in order) is returned apart for its own table.
pub(crate) fn cascade_record(
    cascade: &CascadeDecision,
    content: Option<&Content>,
    origin: Origin<'_>,
    max_tokens: Option<usize>,
    sampling_extra: Value,
) -> (DecisionRecord, Vec<String>) {
    let last = cascade.reasoning.last();
    let mut errors: Vec<String> = Vec::new();
    for error in cascade.reasoning.iter().flat_map(|d| d.prompts.iter().filter_map(|p| p.error.clone())) {
        if !errors.contains(&error) {
            errors.push(error);
        }
    }
    let prompt_hashes: Vec<&str> =
        cascade.reasoning.iter().flat_map(|d| d.prompts.iter().filter_map(|p| p.prompt_sha256.as_deref())).collect();
    let mut sampling =
        json!({"route": "cascade", "sampling": {"kind": "greedy"}, "mode": "separate", "max_tokens": max_tokens});
    if let (Some(object), Value::Object(extra)) = (sampling.as_object_mut(), sampling_extra) {
        object.extend(extra);
    }
    let record = DecisionRecord {
        id: cascade.id.to_string(),
        created_at: now_ms(),
        policy_hashes: cascade.policies.iter().map(|r| r.policy_hash.clone()).collect(),
        policy_names: cascade.policies.iter().map(|r| r.policy.clone()).collect(),
        model_id: last.map_or_else(|| "triage".to_string(), |d| d.model.clone()),
        // The highest effort any step reasoned at: a replay at it re-asks the hardest question asked. (Steps run
        // per effort and per policy, so the last step is not always the highest.)
        effort: cascade.reasoning.iter().map(|d| d.effort).max().map_or_else(|| "none".to_string(), |e| e.to_string()),
        prompt_hash: (!prompt_hashes.is_empty()).then(|| prompt_hashes.join(",")),
        sampling,
        content: content.and_then(|c| serde_json::to_value(c).ok()).unwrap_or(Value::Null),
        verdicts: Value::Array(cascade.policies.iter().map(route_verdict).collect()),
        outcome: outcome_str(cascade.outcome).to_string(),
        failure_reason: (!errors.is_empty()).then(|| errors.join("; ")),
        timings: json!({"total_ms": cascade.total_ms, "work": work_timings(&cascade.reasoning), "stages": stages_json(cascade)}),
        prompt_tokens: crate::classify::stored_count(cascade.usage.prompt_tokens),
        cached_prompt_tokens: crate::classify::stored_count(cascade.usage.cached_prompt_tokens),
        completion_tokens: crate::classify::stored_count(cascade.usage.completion_tokens),
        source: origin.source.to_string(),
        job_id: None,
        replay_of: None,
        submitted_by: origin.submitted_by.map(str::to_string),
    };
    let reasoning = cascade.reasoning.iter().flat_map(|d| d.reasoning.iter().cloned()).collect();
    (record, reasoning)
}

fn work_timings(reasoning: &[Decision]) -> Timings {
    let mut timings = Timings::default();
    for decision in reasoning {
        timings.add_work(&decision.timings);
        timings.total_ms += decision.timings.total_ms;
    }
    timings
}

/// The stages the item went through, without the ids of the reasoning steps (stored together, not apart).
pub(crate) fn stages_json(cascade: &CascadeDecision) -> Value {
    Value::Array(
        cascade
            .stages
            .iter()
            .map(|s| json!({"stage": s.stage, "policies": s.policies, "elapsed_ms": s.elapsed_ms}))
            .collect(),
    )
}

/// What triage did with a policy the model gave no verdict for. Triage settles only what it decided itself;
/// a likely violation that the policy (`triage: {on_violation: review}`) sends to a person is not settled, the
/// person's word is still to come.
fn triage_rationale(route: &PolicyRoute) -> Option<String> {
    let triage = route.triage.as_ref()?;
    Some(if route.decided_by == Stage::Triage {
        format!("settled by triage ({:?})", triage.band)
    } else if route.escalations.contains(&Escalation::TriageViolationToReview) {
        let found = match triage.calibrated_probability {
            Some(p) => format!("triage found a likely violation (probability {p:.3})"),
            None => "a triage deny rule matched".to_string(),
        };
        format!("{found}; the policy sends triage violations to a person to confirm")
    } else if let Some(detail) = route.escalations.iter().find_map(|e| match e {
        Escalation::StageFailed { detail } => Some(detail),
        _ => None,
    }) {
        format!("not settled: {detail}; triage had said {:?}", triage.band)
    } else {
        format!("not settled: triage ({:?}) sent it on and no model verdict came back", triage.band)
    })
}

/// A policy's final verdict in the stored shape of a direct decision's verdict, plus where it was settled.
/// Where triage settled it, the verdict is triage's: `violation` is its outcome, so a reviewer's agreement
/// is measured against what the service decided.
pub(crate) fn route_verdict(route: &PolicyRoute) -> Value {
    let mut verdict = match &route.verdict {
        Some(verdict) => serde_json::to_value(verdict).unwrap_or_else(|_| json!({})),
        None => json!({
            "policy": route.policy, "policy_hash": route.policy_hash,
            "violation": match route.outcome {
                Outcome::Violation => Some(true),
                Outcome::Allow => Some(false),
                Outcome::NeedsReview => None,
            },
            "label": null, "category": null, "rule_ids": [], "severity": null, "confidence": null, "action": null,
            "rationale": triage_rationale(route),
            "flags": [],
        }),
    };
    if let Some(object) = verdict.as_object_mut() {
        if let Some(model) = &route.verdict
            && model.outcome != route.outcome
        {
            // The cascade overrode the model's own outcome (an appeal, or the end of the line): keep both.
            object.insert("model_outcome".into(), json!(model.outcome));
        }
        object.insert("outcome".into(), json!(route.outcome));
        object.insert("engine_confidence".into(), json!(route.engine_confidence));
        object.insert("stage".into(), json!(route.decided_by));
        object.insert("escalations".into(), json!(route.escalations));
        object.insert("triage".into(), json!(route.triage));
    }
    verdict
}

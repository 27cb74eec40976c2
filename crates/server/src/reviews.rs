//! Human review: the queue of items the model could not settle and of appeals, a person's decision on each
//! (an outcome, a rationale and the rule it applies), and the review page at `/review`.
//!
//! The `review` scope may read the chain of thought of queued items: reviewing without it would mean
//! judging the model's answer blind. Everything else about reasoning still needs `audit`.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use axum::Json;
use axum::extract::State;
use axum::response::Html;
use safeguard_core::Decision;
use safeguard_harmony::Effort;
use safeguard_pipeline::Escalation;
use safeguard_pipeline::cascade::Stage;
use safeguard_pipeline::flywheel::stored_verdict_stage;
use safeguard_policy::{Policy, RuleSide};
use safeguard_store::{DecisionRecord, NewReview, ReviewDecision, ReviewRecord, ReviewStats};
use safeguard_verdict::{Flag, Outcome};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::Caller;
use crate::classify::{Origin, Settings, count_decision, decision_reply};
use crate::decisions::record_reply;
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use crate::policies::stored_policy;

/// How long a queued item may wait before it counts as overdue.
const REVIEW_SLA_MS: i64 = 24 * 3_600_000;
/// Appeals are answered first and faster: a user is waiting on them.
const APPEAL_SLA_MS: i64 = 4 * 3_600_000;
const APPEAL_PRIORITY: i64 = 10;
/// The rule a person cites when the policies an item was judged under define no rule ids (or none of them can be
/// loaded any more): a failed job, an appeal of one, a policy written without ids. Without it such an item could
/// never leave the queue.
const NO_RULE: &str = "none";

/// The review a decision needs because the model left it undecided, if it did.
pub(crate) fn review_if_undecided(
    decision: &Decision,
    record: &DecisionRecord,
    policies: &[Policy],
) -> Option<NewReview> {
    undecided_reason(decision).map(|reason| review_for_person(&record.id, policies, reason))
}

/// Stores a decision with the review it needs, if any, in one transaction (an item meant for a person is never
/// in the log without being in the queue), and returns the review's id.
pub(crate) async fn store_decision(
    state: &AppState,
    record: &DecisionRecord,
    reasoning: &[String],
    review: Option<&NewReview>,
) -> Result<Option<String>, ApiError> {
    let Some(review) = review else {
        state.store.insert_decision(record, Some(reasoning)).await?;
        return Ok(None);
    };
    let review_id = state.store.insert_decision_with_review(record, Some(reasoning), review).await?;
    count_queued(review);
    Ok(Some(review_id))
}

/// Stores decisions, each with the review it needs, all or none (one transaction).
pub(crate) async fn store_decisions(
    state: &AppState,
    rows: &[(DecisionRecord, Vec<String>, Option<NewReview>)],
) -> Result<(), ApiError> {
    let borrowed: Vec<_> =
        rows.iter().map(|(record, reasoning, review)| (record, Some(reasoning.as_slice()), review.as_ref())).collect();
    state.store.insert_decisions_together(&borrowed).await?;
    for review in rows.iter().filter_map(|(_, _, review)| review.as_ref()) {
        count_queued(review);
    }
    Ok(())
}

/// Why a decision needs a person (each undecided policy with its flags), or `None` when the model settled it.
pub(crate) fn undecided_reason(decision: &Decision) -> Option<String> {
    if decision.outcome != Outcome::NeedsReview {
        return None;
    }
    let reasons: Vec<String> = decision
        .verdicts
        .iter()
        .filter(|v| v.outcome == Outcome::NeedsReview)
        .map(|v| {
            let flags: Vec<&str> = v.flags.iter().map(Flag::kind).collect();
            format!("{}: {}", v.policy, if flags.is_empty() { "undecided".to_string() } else { flags.join(", ") })
        })
        .collect();
    // A decision with no verdict at all (every prompt failed) still names why it is undecided.
    Some(if reasons.is_empty() { "undecided".to_string() } else { reasons.join("; ") })
}

/// An appeal's review: before every other review, due within the appeal SLA or a policy's own, if shorter (an
/// appeal is never due later than the item's first review was).
pub(crate) fn appeal_review(decision_id: &str, policies: &[Policy], reason: String) -> NewReview {
    NewReview {
        decision_id: decision_id.to_string(),
        kind: "appeal".into(),
        priority: APPEAL_PRIORITY,
        reason: Some(reason),
        sla_ms: Some(soonest_due(policies, REVIEW_SLA_MS).min(APPEAL_SLA_MS)),
        policy_hash: None,
    }
}

/// The review a person gets for a decision: high-risk policies jump the queue, and the item is due within the
/// shortest SLA of its policies (each policy's `review_sla`, else the default). Stored with the decision in one
/// transaction ([`store_decision`], a job's finish).
pub(crate) fn review_for_person(decision_id: &str, policies: &[Policy], reason: String) -> NewReview {
    let high_risk = policies.iter().any(|p| p.meta.high_risk);
    NewReview {
        decision_id: decision_id.to_string(),
        kind: "review".into(),
        priority: if high_risk { 5 } else { 1 },
        reason: Some(reason),
        sla_ms: Some(soonest_due(policies, REVIEW_SLA_MS)),
        policy_hash: None,
    }
}

/// `review` for an item judged under policies some of which could not be read (a version gone, a corrupt row):
/// their SLAs are unknown, so it is due no later than the default.
pub(crate) fn due_by_default_at_latest(mut review: NewReview) -> NewReview {
    review.sla_ms = review.sla_ms.map(|sla| sla.min(REVIEW_SLA_MS));
    review
}

/// The shortest of the policies' SLAs, in milliseconds: each policy's own `review_sla`, or `default` for one that
/// sets none. A policy may give its items longer than the default (`review_sla: 2d`) as well as shorter.
fn soonest_due(policies: &[Policy], default: i64) -> i64 {
    let each = policies.iter().map(|policy| policy.meta.review_sla_secs.map_or(default, |secs| secs as i64 * 1000));
    each.min().unwrap_or(default)
}

/// Share of the decided reviews that agree with the model, among those where the model had an answer to agree
/// with; `None` before there is one.
pub(crate) fn agreement_rate(stats: &ReviewStats) -> Option<f64> {
    let judged = stats.decided - stats.model_undecided;
    (judged > 0).then(|| (judged - stats.overrides).max(0) as f64 / judged as f64)
}

/// Counts a review put in the queue, by its kind.
pub(crate) fn count_queued(review: &NewReview) {
    metrics::counter!("safeguard_reviews_queued_total", "kind" => kind_label(&review.kind)).increment(1);
}

/// A review's kind as a metric label: one of a fixed few.
fn kind_label(kind: &str) -> &'static str {
    match kind {
        "appeal" => "appeal",
        "sample" => "sample",
        "audit" => "audit",
        _ => "review",
    }
}

#[derive(Deserialize)]
pub(crate) struct ListQuery {
    #[serde(default = "pending")]
    status: String,
    #[serde(default = "fifty")]
    limit: i64,
    /// Decided and superseded reviews come latest first, a page at a time: the `next_page` of the reply before
    /// (its last row's `decided_at` and id).
    before: Option<i64>,
    before_id: Option<String>,
}

fn pending() -> String {
    "pending".into()
}

fn fifty() -> i64 {
    50
}

fn review_json(review: &ReviewRecord, decision: Option<&DecisionRecord>) -> Value {
    let mut value = serde_json::to_value(review).unwrap_or(Value::Null);
    if let (Some(object), Some(d)) = (value.as_object_mut(), decision) {
        object.insert(
            "decision".into(),
            json!({
                "id": d.id, "outcome": d.outcome, "policies": d.policy_names, "created_at": d.created_at,
                "excerpt": excerpt(&excerpt_text(&d.content), 140),
            }),
        );
    }
    value
}

pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require("review")?;
    if !matches!(query.status.as_str(), "pending" | "decided" | "superseded") {
        return Err(ApiError::bad("invalid_status", "status is \"pending\", \"decided\" or \"superseded\""));
    }
    let pending = query.status == "pending";
    let before = match (query.before, query.before_id.as_deref()) {
        (None, None) => None,
        _ if pending => {
            return Err(ApiError::bad(
                "invalid_query",
                "the pending queue is worked from its head; before and before_id page decided and superseded reviews",
            ));
        }
        (Some(at), Some(id)) => Some((at, id)),
        _ => {
            return Err(ApiError::bad("invalid_query", "before and before_id go together (the next_page of a reply)"));
        }
    };
    let reviews = if pending {
        state.store.list_reviews(&query.status, query.limit).await?
    } else {
        state.store.list_settled_reviews(&query.status, before, query.limit).await?
    };
    // A full page may have more behind it; the queue itself has no pages (its order changes as it is worked).
    let next_page = match reviews.last() {
        Some(last) if !pending && reviews.len() as i64 >= query.limit.clamp(1, safeguard_store::MAX_REVIEW_PAGE) => {
            json!({"before": last.decided_at, "before_id": last.id})
        }
        _ => Value::Null,
    };
    let mut items = Vec::with_capacity(reviews.len());
    for review in &reviews {
        let decision = state.store.get_decision(&review.decision_id).await?;
        items.push(review_json(review, decision.as_ref()));
    }
    let stats = state.store.review_stats().await?;
    let mut stats_json = serde_json::to_value(stats).unwrap_or(Value::Null);
    stats_json["agreement_rate"] = json!(agreement_rate(&stats));
    // `you`: the key id claims are held under, so that a page can tell its own claims from others'.
    Ok(Json(json!({"reviews": items, "stats": stats_json, "next_page": next_page, "you": caller.key_id})))
}

pub(crate) async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require("review")?;
    let review = state.store.get_review(&id).await?.ok_or_else(|| ApiError::NotFound(format!("review {id}")))?;
    let decision = state
        .store
        .get_decision(&review.decision_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("decision {}", review.decision_id)))?;
    // The chain of thought is the reviewer's to read while the item waits for them; afterwards it is audit data.
    let reasoning = if review.status == "pending" || caller.has("audit") {
        state.store.get_reasoning(&decision.id).await?.unwrap_or_default()
    } else {
        Vec::new()
    };
    let mut policies = Vec::new();
    let mut defines_rules = false;
    // An audit's or a sample's answer may apply only the rules of the policy asked about (`decide`): the page
    // offers no others.
    for hash in judged_policies(&review, &decision) {
        match stored_policy(&state, hash).await {
            Ok(Some(policy)) => {
                defines_rules |= !policy.rule_ids.is_empty();
                // Which side each rule is on, where the headings say: the page offers a decision only the rules of
                // its side, as `decide` accepts only those.
                let sides = policy.rule_sides();
                let rule_sides: serde_json::Map<String, Value> = policy
                    .rule_ids
                    .iter()
                    .filter_map(|id| sides.side(id).map(|side| (id.clone(), json!(side_name(side)))))
                    .collect();
                policies.push(json!({
                    "name": policy.meta.name, "hash": hash, "body": policy.body, "rule_ids": policy.rule_ids,
                    "rule_sides": rule_sides,
                }));
            }
            Ok(None) => {}
            // A version this build no longer parses is still worth reading: shown as stored, without rule ids.
            Err(ApiError::Unavailable(why)) => {
                tracing::warn!(policy = %hash, reason = %why, "review shows a policy that no longer parses");
                if let Some(stored) = state.store.get_policy(hash).await? {
                    policies.push(json!({"name": stored.name, "hash": hash, "body": stored.body, "rule_ids": []}));
                }
            }
            Err(e) => return Err(e),
        }
    }
    // What triage scored, so the page can mark its evidence where it was found; `None` for content this build
    // cannot read (there is then nothing the stored offsets could point into).
    let content = stored_content(&decision.content);
    let judged_text = content.as_ref().map(safeguard_harmony::judged_text);
    let mut value = review_json(&review, None);
    if let Some(object) = value.as_object_mut() {
        object.insert(
            "decision".into(),
            json!({
                "id": decision.id, "outcome": decision.outcome, "content": decision.content,
                "text": shown_text(content.as_ref(), &decision.content),
                "verdicts": verdicts_for_review(&decision.verdicts, judged_text),
                "judged_text": judged_text,
                "model": decision.model_id, "effort": decision.effort, "created_at": decision.created_at,
                "failure_reason": decision.failure_reason,
            }),
        );
        object.insert("reasoning".into(), json!(reasoning));
        object.insert("policies".into(), json!(policies));
        // The page offers it as the rule to cite exactly when `decide` accepts it.
        object.insert("no_rule_id".into(), if defines_rules { Value::Null } else { json!(NO_RULE) });
    }
    Ok(Json(value))
}

/// The stored verdicts with what the review page shows beside them, where a verdict has them: its escalations in
/// words (`escalation_reasons`) and triage's rule evidence as offsets into `judged` that JavaScript can slice by
/// (`triage_highlights`). The stored fields are passed on as they are.
fn verdicts_for_review(verdicts: &Value, judged: Option<&str>) -> Value {
    let Some(list) = verdicts.as_array() else {
        return verdicts.clone();
    };
    let annotated = list.iter().map(|verdict| {
        let mut verdict = verdict.clone();
        let Some(object) = verdict.as_object_mut() else {
            return verdict;
        };
        let reasons = object
            .get("escalations")
            .and_then(Value::as_array)
            .map(|escalations| escalations.iter().map(escalation_reason).collect::<Vec<_>>());
        let evidence = object
            .get("triage")
            .and_then(|triage| triage.get("rule_match"))
            .and_then(|rules| rules.get("evidence"))
            .and_then(Value::as_array);
        let highlights = evidence.zip(judged).map(|(evidence, text)| utf16_spans(text, evidence));
        if let Some(reasons) = reasons {
            object.insert("escalation_reasons".into(), json!(reasons));
        }
        if let Some(highlights) = highlights {
            object.insert("triage_highlights".into(), Value::Array(highlights));
        }
        verdict
    });
    Value::Array(annotated.collect())
}

/// A stored escalation in words. One this build no longer reads (written by another version) still says what it
/// was by its `kind`, rather than vanishing from the item's story.
fn escalation_reason(stored: &Value) -> String {
    match Escalation::deserialize(stored) {
        Ok(escalation) => escalation.to_string(),
        Err(_) => stored.get("kind").and_then(Value::as_str).map_or_else(|| stored.to_string(), str::to_string),
    }
}

/// Triage's evidence spans, stored as byte offsets into `text` (what Rust slices by), as UTF-16 code units (what
/// a JavaScript string is indexed by): before a multi-byte character the two differ, and the page would mark the
/// wrong letters. A span that does not fall on `text`'s characters (content changed since, a hand-edited row) is
/// left out, as is an empty one: marking either would cut a character or mark nothing.
fn utf16_spans(text: &str, evidence: &[Value]) -> Vec<Value> {
    let offset = |span: &Value, key: &str| span.get(key).and_then(Value::as_u64).and_then(|n| usize::try_from(n).ok());
    let spans: Vec<(usize, usize, &Value)> = evidence
        .iter()
        .filter_map(|span| Some((offset(span, "start")?, offset(span, "end")?, span)))
        .filter(|&(start, end, _)| start < end)
        .collect();
    let wanted: BTreeSet<usize> = spans.iter().flat_map(|&(start, end, _)| [start, end]).collect();
    let units = utf16_positions(text, &wanted);
    spans
        .into_iter()
        .filter_map(|(start, end, span)| {
            let (start, end) = (*units.get(&start)?, *units.get(&end)?);
            Some(json!({
                "start": start, "end": end,
                "rule": span.get("rule"), "action": span.get("action"), "kind": span.get("kind"),
            }))
        })
        .collect()
}

/// The UTF-16 offset of each byte offset in `bytes` that is a character boundary of `text` (its end included);
/// the others are missing. One pass over the text for all of them: evidence may hold thousands of spans.
fn utf16_positions(text: &str, bytes: &BTreeSet<usize>) -> BTreeMap<usize, usize> {
    let mut positions = BTreeMap::new();
    let mut wanted = bytes.iter().copied().peekable();
    let mut units = 0;
    let boundaries = text.char_indices().map(|(at, c)| (at, c.len_utf16())).chain([(text.len(), 0)]);
    for (at, width) in boundaries {
        while let Some(byte) = wanted.next_if(|&byte| byte <= at) {
            if byte == at {
                positions.insert(byte, units);
            }
        }
        units += width;
    }
    positions
}

/// The policy version a pending review asks about, whose rules alone its answer may apply: an audit's or an
/// active-learning sample's, set when it was queued. (Once decided, the column holds the version the answer
/// applied.)
fn asked_policy(review: &ReviewRecord) -> Option<&str> {
    (review.status == "pending").then_some(review.policy_hash.as_deref()).flatten()
}

/// The policy versions a person's answer to `review` may apply the rules of: the one it asks about, if any, else
/// every one the item was judged under.
fn judged_policies<'a>(review: &'a ReviewRecord, decision: &'a DecisionRecord) -> impl Iterator<Item = &'a String> {
    let asked = asked_policy(review);
    decision.policy_hashes.iter().filter(move |hash| asked.is_none_or(|asked| asked == hash.as_str()))
}

/// A rule's side as the review page reads it: the outcome a decision applying it has.
fn side_name(side: RuleSide) -> &'static str {
    match side {
        RuleSide::Violates => "violation",
        RuleSide::Allowed => "allow",
    }
}

#[derive(Deserialize)]
pub(crate) struct DecideBody {
    outcome: String,
    rationale: String,
    rule_id: String,
    /// The reviewer's name (e.g. the person signed in to the review tool); stored with the key's id beside it.
    reviewer: Option<String>,
}

pub(crate) async fn decide(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<DecideBody>,
) -> Result<Json<Value>, ApiError> {
    caller.require("review")?;
    let outcome = match body.outcome.as_str() {
        "allow" | "violation" => body.outcome.clone(),
        other => {
            return Err(ApiError::bad("invalid_outcome", format!("outcome {other:?}: use \"allow\" or \"violation\"")));
        }
    };
    ApiError::refuse_nul("rationale", &body.rationale)?;
    ApiError::refuse_nul("rule_id", &body.rule_id)?;
    ApiError::refuse_nul("reviewer", body.reviewer.as_deref().unwrap_or_default())?;
    let rationale = body.rationale.trim();
    if rationale.len() < 3 {
        return Err(ApiError::bad("rationale_required", "a review decision needs a rationale"));
    }
    let rule_id = body.rule_id.trim();
    if rule_id.is_empty() {
        return Err(ApiError::bad(
            "rule_required",
            format!(
                "a review decision names the rule it applies (\"{NO_RULE}\" when the policies the item was judged \
                 under define no rule ids)"
            ),
        ));
    }
    let review = state.store.get_review(&id).await?.ok_or_else(|| ApiError::NotFound(format!("review {id}")))?;
    // An admin key (a lead taking an item over) decides whoever holds it.
    if let Some(holder) = review.claim_holder(safeguard_store::now_ms()).filter(|holder| *holder != caller.key_id)
        && !caller.has("admin")
    {
        return Err(held_by_another(&review, holder));
    }
    let decision = state
        .store
        .get_decision(&review.decision_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("decision {}", review.decision_id)))?;
    // The rule must exist in one of the policy versions the item was judged under; in the one asked about, for an
    // audit or a sample: an answer about another policy would leave that one unanswered.
    let asked = asked_policy(&review);
    let judged_hashes: Vec<&String> = judged_policies(&review, &decision).collect();
    let mut policy_hash = None;
    let mut defines_rules = false;
    // Why the rule was refused by a policy that defines it on the other side, should no other policy take it.
    let mut other_side: Option<ApiError> = None;
    for hash in judged_hashes.iter().copied() {
        let policy = match stored_policy(&state, hash).await {
            Ok(Some(policy)) => policy,
            // Gone, or no longer parses: no rule of it can be checked, so none counts. A store outage still fails.
            Ok(None) | Err(ApiError::Unavailable(_)) => continue,
            Err(e) => return Err(e),
        };
        defines_rules |= !policy.rule_ids.is_empty();
        if policy.rule_ids.contains(rule_id) {
            // A "violation" that applies an exception, or an "allow" that applies a violating rule, would go into
            // training data as a label that contradicts its own reason. Where the headings do not say which side
            // a rule is on, the person's word stands; where another of the item's policies defines the same id
            // on the outcome's side, that is the rule applied.
            if policy.rule_side(rule_id).is_some_and(|side| side_name(side) != outcome) {
                let side = if outcome == "allow" { "violates" } else { "does not violate" };
                other_side.get_or_insert_with(|| {
                    ApiError::bad(
                        "rule_on_other_side",
                        format!(
                            "rule {rule_id:?} describes content that {side} policy {:?}; an {outcome:?} decision \
                             applies a rule from the other side",
                            policy.meta.name
                        ),
                    )
                });
                continue;
            }
            policy_hash = Some(hash.clone());
            break;
        }
    }
    if let (None, Some(refused)) = (&policy_hash, other_side) {
        return Err(refused);
    }
    let cites_no_rule = policy_hash.is_none() && rule_id == NO_RULE && !defines_rules;
    if policy_hash.is_none() && !cites_no_rule {
        let hint = if defines_rules {
            format!("cite one of their rule ids (\"{NO_RULE}\" is only for items whose policies define none)")
        } else {
            format!("they define no rule ids (or can no longer be loaded): cite \"{NO_RULE}\"")
        };
        let judged = match asked {
            Some(hash) => format!("the policy this {} is about ({hash})", review.kind),
            None => "the policies this item was judged under".to_string(),
        };
        return Err(ApiError::bad("unknown_rule", format!("rule {rule_id:?} is not defined in {judged}; {hint}")));
    }
    // Citing no rule, the one policy of the item (or of the audit) still says whose verdict the person agrees
    // with; of several, none does.
    if cites_no_rule && judged_hashes.len() == 1 {
        policy_hash = judged_hashes.first().map(|hash| hash.to_string());
    }
    // A person deciding what the model left undecided neither agrees nor disagrees with it.
    let judged = policy_hash.as_deref().and_then(|hash| decision.verdict_for(hash));
    let model_view = judged.and_then(model_outcome);
    // Whose answer the person checked, so agreement can be told apart per stage: a triage audit's overrides are
    // triage's misses, which no other figure shows.
    let judged_stage = judged.and_then(|verdict| stored_verdict_stage(verdict, &decision.effort).ok());
    let overrides_model = model_view.as_deref().map(|model| model != outcome.as_str());
    // A name the client states is kept with the key that vouched for it, so an override can always be traced to
    // a credential, whatever a client claims.
    let reviewer = match body.reviewer.as_deref().map(str::trim).filter(|r| !r.is_empty()) {
        Some(name) if name != caller.key_id => format!("{name} (key {})", caller.key_id),
        _ => caller.key_id.clone(),
    };
    let verdict = ReviewDecision {
        reviewer,
        outcome,
        rationale: rationale.to_string(),
        rule_id: rule_id.to_string(),
        policy_hash,
        overrides_model,
    };
    let decided_at = safeguard_store::now_ms();
    let delivery = job_delivery(&state, &decision, &review, &verdict, decided_at).await?;
    // An admin key decides whoever holds it; checked again as the review is decided, since a claim may have been
    // granted since it was read above.
    let decider = (!caller.has("admin")).then_some(caller.key_id.as_str());
    let Some(decided) =
        state.store.decide_review_and_deliver(&id, &verdict, decided_at, delivery.as_ref(), decider).await?
    else {
        let now = state.store.get_review(&id).await?;
        return Err(match now {
            Some(review) if review.status == "superseded" => ApiError::Conflict(format!(
                "review {id} was superseded by an appeal of its decision: decide the appeal instead"
            )),
            Some(review) if review.status == "pending" => {
                let holder = review.claim_holder(decided_at).unwrap_or("another reviewer").to_string();
                held_by_another(&review, &holder)
            }
            _ => ApiError::Conflict(format!("review {id} was already decided")),
        });
    };
    let agreement = match overrides_model {
        None => "model_undecided",
        Some(false) => "agree",
        Some(true) => "override",
    };
    let stage = judged_stage.map_or("unknown", Stage::as_str);
    let kind = kind_label(&review.kind);
    metrics::counter!("safeguard_review_decisions_total", "agreement" => agreement, "stage" => stage, "kind" => kind)
        .increment(1);
    crate::ingest::announce_review(&state, &decision, &decided).await;
    Ok(Json(serde_json::to_value(decided).unwrap_or(Value::Null)))
}

/// What a job's webhook hears when a person decides its item, or an appeal of it (`job.reviewed`): the job's
/// `job.completed` said `needs_review`, and a client that waits on its webhook would otherwise never hear the
/// answer. Stored with the decision of the review in one transaction; `None` when no job with a webhook waits.
async fn job_delivery(
    state: &AppState,
    decision: &DecisionRecord,
    review: &ReviewRecord,
    verdict: &ReviewDecision,
    decided_at: i64,
) -> Result<Option<safeguard_store::NewDelivery>, ApiError> {
    // An appeal's answer is the answer for the item the job decided, stored under the appealed decision.
    let job_decision = match review.kind.as_str() {
        "appeal" => appealed_item(state, decision).await?,
        "review" => Cow::Borrowed(decision),
        _ => return Ok(None),
    };
    let Some(job_id) = &job_decision.job_id else { return Ok(None) };
    let Some(job) = state.store.get_job(job_id).await? else {
        tracing::warn!(job = %job_id, "a person decided a job's item, but the job is no longer stored to tell");
        return Ok(None);
    };
    let Some(url) = job.webhook_url else { return Ok(None) };
    let body = json!({
        "type": "job.reviewed",
        "job_id": job.id,
        "decision_id": job_decision.id,
        "review_id": review.id,
        "kind": review.kind,
        "appeal_decision_id": (decision.id != job_decision.id).then(|| decision.id.clone()),
        "outcome": verdict.outcome,
        "rule_id": verdict.rule_id,
        "policy_hash": verdict.policy_hash,
        "decided_at": decided_at,
    });
    Ok(Some(safeguard_store::NewDelivery { job_id: job.id, url, body: body.to_string() }))
}

/// The item an appeal decision appeals: back through appeals (over HTTP or the bus) only, never through a replay,
/// which decides the item anew. `decision` itself when it is no appeal. Appeals made before appeals of an appeal
/// were refused can form a chain; a decision pruned from under one ends the walk where it is.
pub(crate) async fn appealed_item<'a>(
    state: &AppState,
    decision: &'a DecisionRecord,
) -> Result<Cow<'a, DecisionRecord>, ApiError> {
    let mut item = Cow::Borrowed(decision);
    // Bounded: each step goes to an older decision, but a hand-edited database could hold a loop.
    for _ in 0..16 {
        if !crate::ingest::is_appeal_source(&item.source) {
            break;
        }
        let Some(appealed) = &item.replay_of else { break };
        let Some(earlier) = state.store.get_decision(appealed).await? else { break };
        item = Cow::Owned(earlier);
    }
    Ok(item)
}

/// How long a claim holds an item: time to read it and write a rationale. The page renews its claim while the
/// item stays on screen, so a reviewer who stays on it keeps it.
const REVIEW_CLAIM_MS: i64 = 10 * 60 * 1000;

/// `POST /v1/reviews/{id}/claim`: the caller works this item for [`REVIEW_CLAIM_MS`]. Others are refused it (409)
/// meanwhile, and deciding it too; the review page moves them past it. Claiming one's own item again renews it.
pub(crate) async fn claim(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require("review")?;
    let now = safeguard_store::now_ms();
    let review = state
        .store
        .claim_review(&id, &caller.key_id, now.saturating_add(REVIEW_CLAIM_MS), now)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("review {id}")))?;
    if review.status != "pending" {
        return Err(ApiError::Conflict(format!("review {id} is {}: there is nothing left to claim", review.status)));
    }
    match review.claim_holder(now) {
        Some(holder) if holder == caller.key_id => Ok(Json(json!({
            "review_id": review.id, "claimed_by": holder, "claimed_until": review.claimed_until,
        }))),
        holder => Err(held_by_another(&review, holder.unwrap_or("another reviewer"))),
    }
}

/// The refusal of an item another reviewer holds, saying who and until when.
fn held_by_another(review: &ReviewRecord, holder: &str) -> ApiError {
    let until = review.claimed_until.unwrap_or_default();
    ApiError::Conflict(format!(
        "review {} is being worked by another reviewer (key {holder}) until {until} (unix ms); take another item",
        review.id
    ))
}

/// What the model said in one verdict, as an outcome a person can agree with; `None` if it said nothing clear.
fn model_outcome(verdict: &Value) -> Option<String> {
    match verdict.get("violation")?.as_bool()? {
        true => Some("violation".into()),
        false => Some("allow".into()),
    }
}

#[derive(Deserialize, Default)]
pub(crate) struct AppealBody {
    #[serde(default)]
    reason: Option<String>,
}

/// An appeal re-runs the item at high effort under the same policy versions, then goes to a person whatever
/// the model says this time. A decision is appealed once: appealing it again (a client's retry of a request
/// whose reply it never got) answers with the appeal already made, pending or decided, and stores nothing. So
/// does appealing the appeal's own decision: an item has one appeal, and a chain of them would take the pending
/// appeal from the reviewer answering it each time, and hide the answer from a job's webhook and a bus producer,
/// who follow one appeal back to their item.
pub(crate) async fn appeal(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    caller.require("classify")?;
    // The body is optional: an empty POST appeals without a stated reason.
    let body: AppealBody = if body.iter().all(u8::is_ascii_whitespace) {
        AppealBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::bad("invalid_json", format!("appeal body: {e}")))?
    };
    ApiError::refuse_nul("reason", body.reason.as_deref().unwrap_or_default())?;
    // Another client's decision answers as a missing one: its verdicts are not this caller's to read, nor its
    // reasoning budget theirs to spend.
    let named = state
        .store
        .get_decision(&id)
        .await?
        .filter(|decision| caller.may_act_for(decision.submitted_by.as_deref()))
        .ok_or_else(|| ApiError::NotFound(format!("decision {id}")))?;
    let original = Some(appealed_item(&state, &named).await?.into_owned())
        .filter(|item| caller.may_act_for(item.submitted_by.as_deref()))
        .ok_or_else(|| ApiError::NotFound(format!("decision {id}")))?;
    let id = original.id.clone();
    // Looked up before reasoning, so a retry neither pays for the model again nor waits for it.
    if let Some(existing) = state.store.appeal_of(&id).await? {
        return existing_appeal(&state, &id, &existing).await;
    }
    let (content, policies) = crate::decisions::content_and_policies(&state, &original).await?;
    let settings = Settings { effort: Effort::High, mode: safeguard_core::Mode::Separate, max_tokens: None };
    let reason = format!("appeal of {id}: {}", body.reason.as_deref().unwrap_or("appeal"));
    let origin = Origin::of(&caller, "appeal");
    // Content accepted at a lower effort may not fit the context at high, beside the high budget: the model is not
    // asked (it would fail after the budget paid for it), and the appeal goes to a person with the reason.
    let options = crate::classify::options(&settings);
    let fits = state.classifier.check_fits_context(&policies, &content, &options);
    let reasoned = fits.is_ok();
    let (decision, mut record, reasoning, elapsed) = match fits {
        Ok(()) => crate::classify::reason_one(&state, &policies, &content, &settings, origin).await?,
        Err(overflow) => {
            let reason = format!("not reasoned about: {overflow}");
            let model = state.reasoner.model_id();
            let decision = Decision::unreasoned(&policies, &options, model, &reason);
            let (record, reasoning) =
                crate::classify::record_of(&decision, &policies, &content, &settings, origin, None);
            (decision, record, reasoning, 0.0)
        }
    };
    // The link a retry finds the appeal by.
    record.replay_of = Some(id.clone());
    // One review, the appeal, whatever the model said: a second "undecided" review of the same item would be
    // left pending once a person answers the appeal.
    let review = appeal_review(&record.id, &policies, reason);
    let stored = match state.store.insert_appeal(&record, Some(&reasoning), &review).await {
        Ok(stored) => stored,
        // Pruned while the appeal was reasoned.
        Err(safeguard_store::StoreError::DecisionNotFound(_)) => {
            return Err(ApiError::NotFound(format!("no decision {id}")));
        }
        Err(other) => return Err(other.into()),
    };
    if !stored.fresh {
        // Another request appealed the same decision while this one was reasoning; its appeal is the one.
        return existing_appeal(&state, &id, &stored.review).await;
    }
    if reasoned {
        count_decision(&decision, "appeal", elapsed);
        state.items.observe("direct", decision.usage, elapsed);
    } else {
        // No reasoning step ran: an outcome, and nothing for the per-effort and per-item cost figures.
        crate::classify::count_outcome(decision.outcome, "appeal", elapsed);
    }
    count_queued(&review);
    Ok(Json(json!({
        "appeal_of": id, "review_id": stored.review.id, "decision": decision_reply(&decision, &record, false),
    })))
}

/// The reply to an appeal of a decision appealed before: the stored appeal, in the shape a fresh one has (its
/// `decision_id`, outcome, verdicts and policies), marked `repeated`.
async fn existing_appeal(state: &AppState, id: &str, review: &ReviewRecord) -> Result<Json<Value>, ApiError> {
    let record = state
        .store
        .get_decision(&review.decision_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("decision {}", review.decision_id)))?;
    let mut decision = record_reply(&record, None);
    decision["decision_id"] = json!(record.id);
    Ok(Json(json!({"appeal_of": id, "review_id": review.id, "repeated": true, "decision": decision})))
}

const REVIEW_PAGE: &str = include_str!("../assets/review.html");

/// The review page shows hostile text (reported content, the model's reasoning about it, policies from API
/// callers). Escaping keeps it text; the policy is the second line: only the page's own script and style run
/// (pinned by hash), it talks to this server only, loads nothing, and no other site may frame it (its keyboard
/// shortcuts decide reviews).
pub(crate) async fn page() -> impl axum::response::IntoResponse {
    use axum::http::header;
    static POLICY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let pinned = |open: &str, close: &str| {
            let body = REVIEW_PAGE.split_once(open).and_then(|(_, rest)| rest.split_once(close)).map(|(body, _)| body);
            body.map_or_else(
                || "'none'".to_string(),
                |body| {
                    use base64::Engine;
                    use sha2::Digest;
                    let digest = sha2::Sha256::digest(body.as_bytes());
                    format!("'sha256-{}'", base64::engine::general_purpose::STANDARD.encode(digest))
                },
            )
        };
        format!(
            "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; base-uri 'none'; \
             form-action 'none'; frame-ancestors 'none'",
            pinned("<script>", "</script>"),
            pinned("<style>", "</style>"),
        )
    });
    (
        [
            (header::CONTENT_SECURITY_POLICY, POLICY.as_str()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Html(REVIEW_PAGE),
    )
}

/// What a queue row shows of its item: the part judged (the prompt, the response, a conversation's last message).
/// The user message starts, for every kind but plain text, with the same sentence of framing, longer than the
/// excerpt: every row would read alike.
fn excerpt_text(content: &Value) -> String {
    stored_content(content).map_or_else(|| content.to_string(), |parsed| parsed.judged_text().to_string())
}

/// Stored content as this build reads it; `None` for content it cannot.
fn stored_content(content: &Value) -> Option<safeguard_harmony::Content> {
    serde_json::from_value(content.clone()).ok()
}

/// What a reviewer reads of the content: the user message the model saw, or the stored JSON where this build
/// cannot read it.
fn shown_text(parsed: Option<&safeguard_harmony::Content>, raw: &Value) -> String {
    parsed.map_or_else(|| raw.to_string(), safeguard_harmony::user_message_text)
}

fn excerpt(text: &str, chars: usize) -> String {
    match text.char_indices().nth(chars) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(front_matter: &str) -> Policy {
        let text = format!("---\nname: p\noutput: binary\n{front_matter}---\n# P\n\n## VIOLATES (1)\n- P1.a Spam.\n");
        Policy::parse(&text).unwrap()
    }

    #[test]
    fn a_policys_sla_sets_when_its_items_are_due_longer_or_shorter_than_the_default() {
        let (day, hour) = (REVIEW_SLA_MS, 3_600_000);
        let (relaxed, urgent, unset) = (policy("review_sla: 2d\n"), policy("review_sla: 90m\n"), policy(""));
        let due = |policies: &[Policy]| review_for_person("d", policies, "r".into()).sla_ms;
        assert_eq!(due(std::slice::from_ref(&relaxed)), Some(2 * day), "a policy may allow longer than a day");
        assert_eq!(due(&[relaxed.clone(), unset.clone()]), Some(day), "one without its own SLA keeps the default");
        assert_eq!(due(&[relaxed.clone(), urgent.clone()]), Some(90 * 60_000));
        assert_eq!(due(&[]), Some(day));
        let appeal = |policies: &[Policy]| appeal_review("d", policies, "r".into()).sla_ms;
        assert_eq!(appeal(&[relaxed]), Some(4 * hour), "an appeal is never due later than its own four hours");
        assert_eq!(appeal(&[urgent]), Some(90 * 60_000));
        let unknown_too = due_by_default_at_latest(review_for_person("d", &[policy("review_sla: 2d\n")], "r".into()));
        assert_eq!(unknown_too.sla_ms, Some(day), "a policy that could not be read may have wanted it sooner");
    }
}

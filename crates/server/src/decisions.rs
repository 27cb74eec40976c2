//! The audit trail: list and read stored decisions; replay one against the same policy versions.

use std::time::Instant;

use axum::Json;
use axum::extract::State;
use safeguard_harmony::{Content, Effort};
use safeguard_policy::Policy;
use safeguard_store::{DecisionFilter, DecisionRecord};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::Caller;
use crate::classify::{Origin, Settings, count_decision, options, record_of};
use crate::error::{ApiError, ApiPath, ApiQuery};
use crate::policies::stored_policy;

pub(crate) fn record_reply(record: &DecisionRecord, reasoning: Option<Vec<String>>) -> Value {
    let mut value = json!({
        "id": record.id,
        "created_at": record.created_at,
        "outcome": record.outcome,
        "verdicts": record.verdicts,
        "policies": record.policy_names.iter().zip(&record.policy_hashes).map(|(n, h)| json!({"name": n, "hash": h})).collect::<Vec<_>>(),
        "model": record.model_id,
        "effort": record.effort,
        "prompt_hash": record.prompt_hash,
        "sampling": record.sampling,
        "usage": {"prompt_tokens": record.prompt_tokens, "cached_prompt_tokens": record.cached_prompt_tokens,
                  "completion_tokens": record.completion_tokens},
        "timings": record.timings,
        "source": record.source,
        "job_id": record.job_id,
        "replay_of": record.replay_of,
        "submitted_by": record.submitted_by,
        "failure_reason": record.failure_reason,
    });
    if let Some(reasoning) = reasoning {
        value["reasoning"] = json!(reasoning);
    }
    value
}

#[derive(Debug, Deserialize)]
pub(crate) struct ListQuery {
    outcome: Option<String>,
    policy: Option<String>,
    /// Unix milliseconds.
    since: Option<i64>,
    before: Option<i64>,
    /// With `before`: the id of the last decision seen, so that a page ending inside a millisecond loses
    /// nothing of it (the reply's `next_page` carries both).
    before_id: Option<String>,
    limit: Option<i64>,
}

pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require("review").or_else(|_| caller.require("audit"))?;
    if let Some(outcome) = &query.outcome
        && !["allow", "violation", "needs_review"].contains(&outcome.as_str())
    {
        return Err(ApiError::bad("invalid_query", "outcome is allow, violation or needs_review"));
    }
    if query.before_id.is_some() && query.before.is_none() {
        return Err(ApiError::bad("invalid_query", "before_id goes with before (the next_page of a previous reply)"));
    }
    let filter = DecisionFilter {
        outcome: query.outcome,
        policy: query.policy,
        since: query.since,
        before: query.before,
        before_id: query.before_id,
        limit: query.limit.unwrap_or(50).clamp(1, 1000),
    };
    let decisions = state.store.list_decisions(&filter).await?;
    // A full page may have more behind it; the cursor is the last decision's place in the order.
    let next_page = match decisions.last() {
        Some(last) if decisions.len() as i64 == filter.limit => {
            json!({"before": last.created_at, "before_id": last.id})
        }
        _ => Value::Null,
    };
    Ok(Json(json!({
        "decisions": decisions.iter().map(|d| record_reply(d, None)).collect::<Vec<_>>(),
        "next_page": next_page,
    })))
}

pub(crate) async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require("review").or_else(|_| caller.require("audit"))?;
    let record = state.store.get_decision(&id).await?.ok_or_else(|| ApiError::NotFound(format!("no decision {id}")))?;
    // The chain of thought is for auditors only.
    let reasoning = if caller.has("audit") { state.store.get_reasoning(&id).await? } else { None };
    Ok(Json(record_reply(&record, reasoning)))
}

/// A stored decision's content and the exact policy versions (front matter included) it was judged under, to
/// judge it again (a replay, an appeal). What a decision holds cannot change, so content this server cannot read,
/// or a version that is gone or no longer parses, is a conflict that a retry cannot fix (409, not 404 or 503);
/// only a store outage stays a 503.
pub(crate) async fn content_and_policies(
    state: &AppState,
    original: &DecisionRecord,
) -> Result<(Content, Vec<Policy>), ApiError> {
    let id = &original.id;
    let content: Content = serde_json::from_value(original.content.clone())
        .map_err(|e| ApiError::Conflict(format!("decision {id} holds content this server cannot read: {e}")))?;
    let mut policies = Vec::new();
    for hash in &original.policy_hashes {
        match stored_policy(state, hash).await {
            Ok(Some(policy)) => policies.push(policy),
            Ok(None) => {
                return Err(ApiError::Conflict(format!(
                    "decision {id} was judged under policy {hash}, which is no longer stored"
                )));
            }
            Err(ApiError::Unavailable(why)) => return Err(ApiError::Conflict(why)),
            Err(e) => return Err(e),
        }
    }
    Ok((content, policies))
}

/// Re-runs a stored decision with the same content, policy versions, effort and mode; says whether the
/// outcome or any verdict changed. The replay is stored too (`replay_of` points at the original).
pub(crate) async fn replay(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require("audit")?;
    let original =
        state.store.get_decision(&id).await?.ok_or_else(|| ApiError::NotFound(format!("no decision {id}")))?;
    let (content, policies) = content_and_policies(&state, &original).await?;
    // A failed job's decision may name none (its request was unreadable): there is nothing to re-run it under.
    if policies.is_empty() {
        return Err(ApiError::Conflict(format!("decision {id} names no policy version to re-run it under")));
    }
    let effort: Effort = original.effort.parse().unwrap_or_default();
    let mode = original.sampling.get("mode").cloned().and_then(|m| serde_json::from_value(m).ok()).unwrap_or_default();
    let max_tokens = original.sampling.get("max_tokens").and_then(Value::as_u64).map(|n| n as usize);
    let settings = Settings { effort, mode, max_tokens };
    // Stored content need not fit now: the engine's context may have shrunk since, or it is an appeal that was
    // never reasoned about for that reason.
    crate::classify::refuse_overflow(state.classifier.check_fits_context(&policies, &content, &options(&settings)))?;
    let mut step = state.cascade.admit(settings.prompts(policies.len(), 1), effort, settings.max_tokens).await?;
    let started = Instant::now();
    let decision = state.classifier.classify(&policies, &content, &options(&settings)).await;
    step.pay(&decision, settings.max_tokens);
    let elapsed = started.elapsed().as_secs_f64();
    let (mut record, reasoning) =
        record_of(&decision, &policies, &content, &settings, Origin::of(&caller, "replay"), None);
    record.replay_of = Some(original.id.clone());
    match state.store.insert_replay(&record, Some(&reasoning)).await {
        Ok(()) => {}
        // Pruned while the replay was reasoned.
        Err(safeguard_store::StoreError::DecisionNotFound(_)) => {
            return Err(ApiError::NotFound(format!("no decision {id}")));
        }
        Err(other) => return Err(other.into()),
    }
    count_decision(&decision, "replay", elapsed);
    let verdict_summary = |verdicts: &Value| -> Vec<(Value, Value)> {
        verdicts
            .as_array()
            .map(|vs| {
                vs.iter()
                    .map(|v| {
                        (
                            v.get("policy_hash").cloned().unwrap_or(Value::Null),
                            v.get("outcome").cloned().unwrap_or(Value::Null),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let outcome_changed = original.outcome != record.outcome;
    let verdicts_changed = verdict_summary(&original.verdicts) != verdict_summary(&record.verdicts);
    Ok(Json(json!({
        "original": record_reply(&original, None),
        "replay": record_reply(&record, None),
        "outcome_changed": outcome_changed,
        "changed": outcome_changed || verdicts_changed,
        "model_changed": original.model_id != record.model_id,
    })))
}

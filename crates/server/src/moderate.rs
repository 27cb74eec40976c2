//! `POST /v1/moderate`: the cascade as a service. Triage settles what it is sure of, the model reasons about
//! the rest at low effort, shaky answers are asked again at high effort, and what is still unsure is queued
//! for a person. Every reasoning step is stored as a decision like any other (source `cascade:<stage>`).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use safeguard_pipeline::{
    CascadeDecision, Pipeline, ReasoningBudget, RouteContext, RoutingConfig, Stage, TriageLibrary,
};
use safeguard_policy::Policy;
use safeguard_store::{DecisionRecord, now_ms};
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::Caller;
use crate::classify::{Settings, count_decision, parse_content, parse_policies, record_of};
use crate::error::{ApiError, ApiJson};

/// What the cascade needs beyond the classifier, shared by all requests.
pub(crate) struct CascadeState {
    pub routing: RoutingConfig,
    pub triage: TriageLibrary,
    pub budget: Option<Arc<ReasoningBudget>>,
}

impl CascadeState {
    pub(crate) fn new(routing: RoutingConfig, triage: TriageLibrary, reasoning_per_sec: Option<f64>) -> Self {
        let budget = reasoning_per_sec.map(|rate| Arc::new(ReasoningBudget::new(rate, rate.ceil().max(1.0) as u32)));
        Self { routing, triage, budget }
    }

    fn pipeline(&self, state: &AppState, policies: &[Policy]) -> Pipeline {
        let mut pipeline = Pipeline::new(state.classifier.clone(), self.routing.clone());
        for policy in policies {
            if let Some(triage) = self.triage.for_policy(policy) {
                pipeline = pipeline.with_triage(policy.hash.to_string(), triage);
            }
        }
        if let Some(budget) = &self.budget {
            pipeline = pipeline.with_budget(budget.clone());
        }
        pipeline
    }
}

pub(crate) async fn moderate(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    caller.require("classify")?;
    let content = parse_content(&state, &body)?;
    let policies = parse_policies(&state, &body, &caller).await?;
    let return_reasoning = body.get("return_reasoning").and_then(Value::as_bool).unwrap_or(false);
    if return_reasoning {
        caller.require("audit")?;
    }
    let ctx = RouteContext {
        appeal: body.get("appeal").and_then(Value::as_bool).unwrap_or(false),
        // Kept for the reviewers and the audit log; stripped from the reply unless asked for.
        include_reasoning: true,
    };
    let started = std::time::Instant::now();
    let cascade =
        state.cascade.pipeline(&state, &policies).decide(&policies, &content, &ctx).await.map_err(|deferred| {
            // Over budget: the caller holds the item and retries; nothing is allowed by default.
            ApiError::RateLimited { retry_after_secs: deferred.retry_after.as_secs().max(1) }
        })?;
    let decision_ids = store_cascade(&state, &cascade, &policies, &content, started.elapsed().as_secs_f64()).await?;

    let mut reply = serde_json::to_value(&cascade).unwrap_or(Value::Null);
    if let Some(object) = reply.as_object_mut() {
        if !return_reasoning && let Some(Value::Array(decisions)) = object.get_mut("reasoning") {
            for decision in decisions.iter_mut().filter_map(Value::as_object_mut) {
                decision.remove("reasoning");
            }
        }
        object.insert("decision_ids".into(), json!(decision_ids));
    }
    Ok(Json(reply))
}

/// Stores each reasoning step, and queues the item for a person when the cascade ended there.
async fn store_cascade(
    state: &AppState,
    cascade: &CascadeDecision,
    policies: &[Policy],
    content: &safeguard_harmony::Content,
    elapsed_secs: f64,
) -> Result<Vec<String>, ApiError> {
    let reasoning_stages = cascade.stages.iter().filter(|s| s.stage != Stage::Triage);
    let mut ids = Vec::new();
    for (decision, stage) in cascade.reasoning.iter().zip(reasoning_stages) {
        let judged: Vec<Policy> = policies.iter().filter(|p| stage.policies.contains(&p.meta.name)).cloned().collect();
        let settings =
            Settings { effort: decision.effort, mode: decision.mode, max_tokens: state.cascade.routing.max_tokens };
        let source = format!("cascade:{}", stage.stage.as_str());
        let (record, reasoning) = record_of(decision, &judged, content, &settings, &source, None);
        state.store.insert_decision(&record, Some(&reasoning)).await?;
        count_decision(decision, "cascade", elapsed_secs);
        ids.push(record.id);
    }
    if cascade.decided_by == Stage::HumanReview {
        let decision_id = match ids.last() {
            Some(id) => id.clone(),
            // Triage sent it straight to a person: record that as a decision of its own, so the review has one.
            None => {
                let record = triage_record(cascade, policies, content);
                state.store.insert_decision(&record, None).await?;
                ids.push(record.id.clone());
                record.id
            }
        };
        let reasons: Vec<String> = cascade
            .policies
            .iter()
            .filter(|r| r.decided_by == Stage::HumanReview)
            .map(|r| format!("{}: {}", r.policy, r.escalations.last().map_or("undecided".into(), |e| format!("{e:?}"))))
            .collect();
        crate::reviews::queue_for_person(state, &decision_id, policies, reasons.join("; ")).await?;
    }
    Ok(ids)
}

fn triage_record(
    cascade: &CascadeDecision,
    policies: &[Policy],
    content: &safeguard_harmony::Content,
) -> DecisionRecord {
    DecisionRecord {
        id: cascade.id.to_string(),
        created_at: now_ms(),
        policy_hashes: policies.iter().map(|p| p.hash.to_string()).collect(),
        policy_names: policies.iter().map(|p| p.meta.name.clone()).collect(),
        model_id: "triage".into(),
        effort: "none".into(),
        prompt_hash: None,
        sampling: Value::Null,
        content: serde_json::to_value(content).unwrap_or(Value::Null),
        verdicts: json!(
            cascade
                .policies
                .iter()
                .map(|r| json!({"policy": r.policy, "policy_hash": r.policy_hash,
            "outcome": r.outcome, "triage": r.triage}))
                .collect::<Vec<_>>()
        ),
        outcome: "needs_review".into(),
        failure_reason: None,
        timings: json!({"total_ms": cascade.total_ms}),
        prompt_tokens: 0,
        cached_prompt_tokens: 0,
        completion_tokens: 0,
        source: "cascade:triage".into(),
        job_id: None,
        replay_of: None,
    }
}

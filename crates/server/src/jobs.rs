//! Asynchronous jobs: persisted before the 202, decided by a worker pool that claims them with a lease,
//! finished exactly once (the store refuses a finish from a worker that lost its lease).

use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use safeguard_harmony::Content;
use safeguard_policy::Policy;
use safeguard_store::{JobRecord, JobStatus, NewDelivery, NewJob};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::auth::Caller;
use crate::classify::{Settings, count_decision, options, parse_request, record_of};
use crate::error::{ApiError, ApiJson};
use crate::policies::stored_policy;

/// What a job row holds: everything resolved, so the worker decides exactly what was accepted.
#[derive(Debug, Serialize, Deserialize)]
struct JobRequest {
    content: Content,
    policy_hashes: Vec<String>,
    settings: Settings,
}

fn job_reply(job: &JobRecord) -> Value {
    json!({
        "id": job.id,
        "status": job.status,
        "attempts": job.attempts,
        "decision_id": job.result_decision_id,
        "error": job.error,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
    })
}

pub(crate) async fn submit(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    caller.require("classify")?;
    let parsed = parse_request(&state, &body, &caller).await?;
    let webhook_url = match body.get("webhook_url") {
        None | Some(Value::Null) => None,
        Some(Value::String(url)) if url.starts_with("http://") || url.starts_with("https://") => Some(url.clone()),
        Some(_) => return Err(ApiError::bad("invalid_webhook_url", "\"webhook_url\" must be an http(s) URL")),
    };
    let idempotency_key = match headers.get("idempotency-key") {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .filter(|k| !k.is_empty() && k.len() <= 255)
                .ok_or_else(|| {
                    ApiError::bad("invalid_idempotency_key", "Idempotency-Key must be 1-255 visible ASCII characters")
                })?
                .to_string(),
        ),
    };
    let request = JobRequest {
        content: parsed.content,
        policy_hashes: parsed.policies.iter().map(|p| p.hash.to_string()).collect(),
        settings: parsed.settings,
    };
    let request_json = serde_json::to_value(&request).map_err(|e| ApiError::bad("invalid_request", e.to_string()))?;
    let (job, created) = state
        .store
        .enqueue_job(&NewJob { request: request_json.clone(), idempotency_key, webhook_url: webhook_url.clone() })
        .await?;
    if !created && (job.request != request_json || job.webhook_url != webhook_url) {
        return Err(ApiError::Conflict("this Idempotency-Key was already used for a different request".into()));
    }
    if created {
        metrics::counter!("safeguard_jobs_submitted_total").increment(1);
        state.jobs_waiting.notify_one();
    }
    let status = if created { StatusCode::ACCEPTED } else { StatusCode::OK };
    Ok((status, Json(job_reply(&job))).into_response())
}

pub(crate) async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require("classify")?;
    let job = state.store.get_job(&id).await?.ok_or_else(|| ApiError::NotFound(format!("no job {id}")))?;
    let mut reply = job_reply(&job);
    // Until decided, the content's outcome is `pending`: it must not be shown as allowed.
    reply["outcome"] = json!("pending");
    if let Some(decision_id) = &job.result_decision_id
        && let Some(decision) = state.store.get_decision(decision_id).await?
    {
        reply["outcome"] = json!(decision.outcome);
        reply["decision"] = crate::decisions::record_reply(&decision, None);
    }
    if job.status == JobStatus::Failed {
        reply["outcome"] = json!("needs_review");
    }
    Ok(Json(reply))
}

/// One worker: claim, decide, finish; until shutdown. The job in hand is always finished before exiting.
///
/// Over the reasoning budget (or the queue's share of it, `--queue-share`) a worker claims nothing: the jobs wait
/// in the queue, unclaimed (another server with budget to spare may take them), until the model may be asked
/// again. Nothing is dropped or decided by default.
pub(crate) async fn worker(state: AppState, index: usize, shutdown: CancellationToken) {
    let lease_ms = state.config.job_lease.as_millis() as i64;
    tracing::debug!(index, "job worker started");
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        // The queue is looked at before a call is taken: an idle worker that took one to find nothing would hold
        // it, however briefly, from a request that needs it.
        match state.store.has_claimable_job().await {
            Ok(true) => {}
            Ok(false) => {
                // Jobs also arrive from other server processes and from expired leases, so the wait is bounded.
                if !rest(&shutdown, Duration::from_millis(500), Some(state.jobs_waiting.as_ref())).await {
                    break;
                }
                continue;
            }
            Err(err) => {
                tracing::warn!(error = %err, "looking for jobs failed; retrying");
                if !rest(&shutdown, Duration::from_secs(1), None).await {
                    break;
                }
                continue;
            }
        }
        // One call is taken before claiming, atomically: workers that only looked would all see the same spare call
        // and claim a job each. The rest of the job's prompts are owed once its policies are known.
        if let Err(wait) = state.cascade.queue_budgets.try_admit(1) {
            metrics::counter!("safeguard_jobs_budget_waits_total").increment(1);
            // Looked at again at least once a second: other workers and paths share the bucket.
            if !rest(&shutdown, wait.min(Duration::from_secs(1)), None).await {
                break;
            }
            continue;
        }
        match state.store.claim_job(lease_ms).await {
            Ok(Some(job)) => process(&state, job).await,
            // Another worker took the job seen a moment ago.
            Ok(None) => state.cascade.queue_budgets.give_back_calls(1),
            Err(err) => {
                state.cascade.queue_budgets.give_back_calls(1);
                tracing::warn!(error = %err, "claiming a job failed; retrying");
                if !rest(&shutdown, Duration::from_secs(1), None).await {
                    break;
                }
            }
        }
    }
    tracing::debug!(index, "job worker stopped");
}

/// Waits `pause`, or less when `wake` is notified (a job was submitted to this server); false once it shuts down.
async fn rest(shutdown: &CancellationToken, pause: Duration, wake: Option<&Notify>) -> bool {
    let woken = async {
        match wake {
            Some(wake) => wake.notified().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = woken => true,
        _ = tokio::time::sleep(pause) => true,
    }
}

async fn load_policies(state: &AppState, hashes: &[String]) -> Result<Vec<Policy>, String> {
    let mut policies = Vec::with_capacity(hashes.len());
    for hash in hashes {
        // The job's failure reason names the store's own error, without the HTTP wrapper's prefix.
        let policy = stored_policy(state, hash).await.map_err(|e| match e {
            ApiError::Store(e) => e.to_string(),
            other => other.to_string(),
        })?;
        policies.push(policy.ok_or_else(|| format!("policy {hash} is not stored"))?);
    }
    Ok(policies)
}

#[tracing::instrument(skip_all, fields(job_id = %job.id, attempt = job.attempts))]
async fn process(state: &AppState, job: JobRecord) {
    // A job that fails before the model is asked hands back the call its worker took.
    let unused_call = || state.cascade.queue_budgets.give_back_calls(1);
    let Some(token) = job.lease_token.clone() else { return unused_call() };
    let request: JobRequest = match serde_json::from_value(job.request.clone()) {
        Ok(request) => request,
        Err(err) => {
            let _ = state.store.fail_job(&job.id, &token, &format!("stored request is unreadable: {err}")).await;
            return unused_call();
        }
    };
    let policies = match load_policies(state, &request.policy_hashes).await {
        Ok(policies) => policies,
        Err(err) => {
            let _ = state.store.fail_job(&job.id, &token, &err).await;
            return unused_call();
        }
    };
    // Keep the lease alive while the model works, so a slow decision is not handed to a second worker.
    let renew = {
        let store = state.store.clone();
        let (id, token) = (job.id.clone(), token.clone());
        let lease = state.config.job_lease;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(lease / 3).await;
                if !matches!(store.renew_lease(&id, &token, lease.as_millis() as i64).await, Ok(true)) {
                    break;
                }
            }
        })
    };
    // One call was taken before the claim; the rest are paid now, in debt if need be.
    state.cascade.queue_budgets.owe_calls(request.settings.prompts(policies.len(), 1).saturating_sub(1));
    let started = Instant::now();
    let decision = state.classifier.classify(&policies, &request.content, &options(&request.settings)).await;
    state.cascade.charge_queued(&decision, request.settings.max_tokens);
    renew.abort();
    count_decision(&decision, "job", started.elapsed().as_secs_f64());
    let (record, reasoning) =
        record_of(&decision, &policies, &request.content, &request.settings, "job", Some(&job.id));
    let review = crate::reviews::undecided_reason(&decision)
        .map(|reason| crate::reviews::review_for_person(&record.id, &policies, reason));
    let webhook = job.webhook_url.as_ref().map(|url| NewDelivery {
        job_id: job.id.clone(),
        url: url.clone(),
        body: json!({
            "type": "job.completed",
            "job_id": job.id,
            "decision_id": record.id,
            "outcome": record.outcome,
            "verdicts": record.verdicts,
            "failure_reason": record.failure_reason,
        })
        .to_string(),
    });
    match state.store.finish_job(&job.id, &token, &record, Some(&reasoning), review.as_ref(), webhook.as_ref()).await {
        Ok(true) => {
            metrics::counter!("safeguard_jobs_finished_total").increment(1);
            if review.is_some() {
                crate::reviews::count_queued("review");
            }
            tracing::debug!(decision_id = %record.id, "job finished");
        }
        Ok(false) => tracing::warn!("job lease was lost before finishing; another worker owns it"),
        // Nothing was written; the lease expires and the job is decided again.
        Err(err) => tracing::error!(error = %err, "storing the job result failed"),
    }
}

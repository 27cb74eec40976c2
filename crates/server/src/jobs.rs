//! Asynchronous jobs: persisted before the 202, decided by a worker pool that claims them with a lease,
//! finished exactly once (the store refuses a finish from a worker that lost its lease).

use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use safeguard_harmony::Content;
use safeguard_policy::Policy;
use safeguard_store::{DecisionRecord, JobRecord, JobStatus, NewDelivery, NewJob, ReviewRecord, now_ms};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Digest;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::auth::Caller;
use crate::classify::{Origin, Settings, count_decision, options, parse_request, record_of};
use crate::error::{ApiError, ApiJson, ApiPath};
use crate::policies::stored_policy;

/// What a job row holds: everything resolved, so the worker decides exactly what was accepted.
#[derive(Debug, Serialize, Deserialize)]
struct JobRequest {
    content: Content,
    policy_hashes: Vec<String>,
    settings: Settings,
    /// sha256 of the body as the client sent it: what a retry under the same Idempotency-Key is compared by. The
    /// rest of this request holds the server's choices (the version a policy name resolved to, the default
    /// effort), which may change between a request and its retry, or differ between servers. Absent in jobs
    /// queued before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    body_sha256: Option<String>,
}

/// A person's review of a job's item as the job's client sees it: where it stands and what was decided.
fn review_summary(review: &ReviewRecord) -> Value {
    json!({
        "id": review.id,
        "kind": review.kind,
        "decision_id": review.decision_id,
        "status": review.status,
        "outcome": review.outcome,
        "rule_id": review.rule_id,
        "policy_hash": review.policy_hash,
        "due_at": review.due_at,
        "decided_at": review.decided_at,
    })
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
    ApiError::refuse_unknown_fields(&body, &crate::classify::JOB_FIELDS)?;
    // Checked first, as cheap refusals; a refused job leaves nothing behind, since the inline policies it names are
    // stored only once it has passed every check (`NamedPolicies::keep`).
    let webhook_url = match body.get("webhook_url") {
        None | Some(Value::Null) => None,
        Some(Value::String(url)) => {
            ApiError::refuse_nul("webhook_url", url)?;
            state
                .config
                .webhook_targets
                .check_url(url)
                .map_err(|why| ApiError::bad("invalid_webhook_url", format!("\"webhook_url\" {why}")))?;
            Some(url.clone())
        }
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
    let parsed = parse_request(&state, &body, &caller).await?;
    let policies = parsed.policies.keep_if_it_fits(&state, &parsed.content, &parsed.settings).await?;
    // serde_json's maps are sorted (no `preserve_order`), so the digest does not depend on the order of the keys.
    let body_sha256 = hex::encode(sha2::Sha256::digest(body.to_string().as_bytes()));
    let request = JobRequest {
        content: parsed.content,
        policy_hashes: policies.iter().map(|p| p.hash.to_string()).collect(),
        settings: parsed.settings,
        body_sha256: Some(body_sha256.clone()),
    };
    let request_json = serde_json::to_value(&request).map_err(|e| ApiError::bad("invalid_request", e.to_string()))?;
    let (job, created) = state
        .store
        .enqueue_job(&NewJob {
            request: request_json.clone(),
            idempotency_key,
            webhook_url: webhook_url.clone(),
            submitted_by: caller.submitter().map(str::to_string),
        })
        .await?;
    let same_request = match job.request.get("body_sha256").and_then(Value::as_str) {
        Some(stored) => stored == body_sha256,
        // Queued before the digest was kept: compared as it was then, without it.
        None => {
            let mut without = request_json.clone();
            if let Some(object) = without.as_object_mut() {
                object.remove("body_sha256");
            }
            job.request == without && job.webhook_url == webhook_url
        }
    };
    if !created && !same_request {
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
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require("classify")?;
    let job = state
        .store
        .get_job(&id)
        .await?
        .filter(|job| caller.may_act_for(job.submitted_by.as_deref()))
        .ok_or_else(|| ApiError::NotFound(format!("no job {id}")))?;
    let mut reply = job_reply(&job);
    // Until decided, the content's outcome is `pending`: it must not be shown as allowed.
    reply["outcome"] = json!("pending");
    if let Some(decision_id) = &job.result_decision_id
        && let Some(decision) = state.store.get_decision(decision_id).await?
    {
        reply["outcome"] = json!(decision.outcome);
        reply["decision"] = crate::decisions::record_reply(&decision, None);
        // An item that went to a person is answered by them: the client reads the answer here too, not only on
        // its webhook (`job.reviewed`). Who the reviewer was stays with the review scope.
        if let Some(review) = state.store.review_of(decision_id, "review").await? {
            reply["review"] = review_summary(&review);
        }
        if let Some(appeal) = state.store.appeal_of(decision_id).await? {
            reply["appeal"] = review_summary(&appeal);
        }
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
    let lease_ms = i64::try_from(state.config.job_lease.as_millis()).unwrap_or(i64::MAX);
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
        // and claim a job each. The rest of the job's prompts are owed once its policies are known. Taken in the
        // budget's line (a second at most), so requests waiting for calls do not keep a job from its turn for good.
        let admitted = tokio::select! {
            admitted = state.cascade.queue_budgets.admit(1, Duration::from_secs(1)) => admitted,
            () = shutdown.cancelled() => break,
        };
        if let Err(deferred) = admitted {
            metrics::counter!("safeguard_jobs_budget_waits_total").increment(1);
            // Looked at again at least once a second: other workers and paths share the bucket.
            if !rest(&shutdown, deferred.retry_after.min(Duration::from_secs(1)), None).await {
                break;
            }
            continue;
        }
        match state.store.claim_job(lease_ms).await {
            Ok(Some(job)) => {
                if process(&state, job).await && !rest(&shutdown, Duration::from_secs(1), None).await {
                    break;
                }
            }
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

/// Why a job's policies could not be loaded.
enum LoadError {
    /// The store failed (an outage, a lock): the job is fine and is decided once the store answers again.
    Transient(String),
    /// The job can never be decided as accepted: a version is gone, no longer parses, or its stored row is corrupt.
    Permanent(String),
}

async fn load_policies(state: &AppState, hashes: &[String]) -> Result<Vec<Policy>, LoadError> {
    let mut policies = Vec::with_capacity(hashes.len());
    for hash in hashes {
        // The job's failure reason names the store's own error, without the HTTP wrapper's prefix.
        let policy = stored_policy(state, hash).await.map_err(|e| match e {
            ApiError::Store(e) if !e.is_unreadable_data() => LoadError::Transient(e.to_string()),
            ApiError::Store(e) => LoadError::Permanent(e.to_string()),
            other => LoadError::Permanent(other.to_string()),
        })?;
        policies.push(policy.ok_or_else(|| LoadError::Permanent(format!("policy {hash} is not stored")))?);
    }
    Ok(policies)
}

/// What a job's webhook says once the job has its decision, whether decided or failed.
fn completed_webhook(job: &JobRecord, record: &DecisionRecord) -> Option<NewDelivery> {
    job.webhook_url.as_ref().map(|url| NewDelivery {
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
    })
}

/// Fails a job that can never be decided as it was accepted. The item still needs a decision: it is stored as
/// `needs_review` with the reason, queued for a person and announced to the webhook, all with the failure.
async fn fail(state: &AppState, job: &JobRecord, token: &str, error: String) {
    let request = &job.request;
    // Whatever of the request can still be read goes on the record, for the person who settles it.
    let policy_hashes: Vec<String> = request
        .get("policy_hashes")
        .and_then(Value::as_array)
        .map(|hashes| hashes.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default();
    let mut policy_names = Vec::with_capacity(policy_hashes.len());
    // Those that still load: a high-risk one puts the failed job at the front of the queue, as it would any item.
    let mut policies = Vec::with_capacity(policy_hashes.len());
    for hash in &policy_hashes {
        // A name is a label here; without one the hash stands in, and the failure is recorded all the same.
        match stored_policy(state, hash).await {
            Ok(Some(policy)) => {
                policy_names.push(policy.meta.name.clone());
                policies.push(policy);
            }
            // Failed while the store is out, the item would reach the queue without its policy's priority and
            // SLA: left leased instead, the job is failed again once the lease runs out, with the store back.
            Err(ApiError::Store(err)) if !err.is_unreadable_data() => {
                tracing::warn!(error = %err, "reading the failed job's policies failed; it is failed again later");
                return;
            }
            Ok(None) | Err(_) => policy_names.push(hash.clone()),
        }
    }
    let settings = request.get("settings");
    let effort = settings.and_then(|s| s.get("effort")).and_then(Value::as_str).map(str::to_string);
    let record = DecisionRecord {
        id: uuid::Uuid::now_v7().to_string(),
        created_at: now_ms(),
        policy_hashes,
        policy_names,
        model_id: state.reasoner.model_id(),
        effort: effort.unwrap_or_else(|| state.config.default_effort.to_string()),
        prompt_hash: None,
        sampling: json!({
            "mode": settings.and_then(|s| s.get("mode")),
            "max_tokens": settings.and_then(|s| s.get("max_tokens")),
        }),
        content: request.get("content").cloned().unwrap_or(Value::Null),
        verdicts: json!([]),
        outcome: "needs_review".into(),
        failure_reason: Some(error.clone()),
        timings: json!({}),
        prompt_tokens: 0,
        cached_prompt_tokens: 0,
        completion_tokens: 0,
        source: "job".into(),
        job_id: Some(job.id.clone()),
        replay_of: None,
        submitted_by: job.submitted_by.clone(),
    };
    let mut review = crate::reviews::review_for_person(&record.id, &policies, format!("job failed: {error}"));
    if policies.len() < record.policy_hashes.len() {
        review = crate::reviews::due_by_default_at_latest(review);
    }
    let webhook = completed_webhook(job, &record);
    match state.store.fail_job(&job.id, token, &error, &record, &review, webhook.as_ref()).await {
        Ok(true) => {
            metrics::counter!("safeguard_jobs_failed_total").increment(1);
            crate::reviews::count_queued(&review);
            tracing::warn!(error = %error, decision_id = %record.id, "job failed; queued for a person");
        }
        Ok(false) => tracing::warn!("job lease was lost before failing it; another worker owns it"),
        // Nothing was written; the lease expires and the job is tried again.
        Err(err) => tracing::error!(error = %err, "storing the job failure failed"),
    }
}

/// Decides one claimed job. Returns true when the worker should pause before claiming again: the store failed,
/// and claiming the job straight back would only fail the same way.
#[tracing::instrument(skip_all, fields(job_id = %job.id, attempt = job.attempts))]
async fn process(state: &AppState, job: JobRecord) -> bool {
    // A job that fails before the model is asked hands back the call its worker took.
    let unused_call = || state.cascade.queue_budgets.give_back_calls(1);
    let Some(token) = job.lease_token.clone() else {
        unused_call();
        return false;
    };
    let earlier_claims = job.attempts - 1;
    if earlier_claims >= state.config.job_max_attempts {
        let error = format!(
            "gave up after {earlier_claims} attempts: each worker that took the job stopped before storing its \
             decision (a crash, running out of memory, a decision slower than the lease, or a store that refused it)"
        );
        fail(state, &job, &token, error).await;
        unused_call();
        return false;
    }
    let request: JobRequest = match serde_json::from_value(job.request.clone()) {
        Ok(request) => request,
        Err(err) => {
            fail(state, &job, &token, format!("stored request is unreadable: {err}")).await;
            unused_call();
            return false;
        }
    };
    let policies = match load_policies(state, &request.policy_hashes).await {
        Ok(policies) => policies,
        Err(LoadError::Permanent(err)) => {
            fail(state, &job, &token, err).await;
            unused_call();
            return false;
        }
        Err(LoadError::Transient(err)) => {
            tracing::warn!(error = %err, "loading the job's policies failed; handing the job back");
            hand_back(state, &job.id, &token, "its policies could not be loaded").await;
            unused_call();
            return true;
        }
    };
    // Keep the lease alive while the model works, so a slow decision is not handed to a second worker. Aborted when
    // dropped: a worker that dies mid-decision must not keep its job leased forever.
    let renew = {
        let store = state.store.clone();
        let (id, token) = (job.id.clone(), token.clone());
        let lease = state.config.job_lease;
        crate::AbortOnDrop(tokio::spawn(async move {
            loop {
                tokio::time::sleep(lease / 3).await;
                match store.renew_lease(&id, &token, lease.as_millis() as i64).await {
                    Ok(true) => {}
                    // Another worker owns the job now (or it is finished): nothing left to keep.
                    Ok(false) => break,
                    // A passing store error: the lease still has two ticks to run, so try again at the next one.
                    Err(err) => tracing::warn!(error = %err, "renewing the job's lease failed; retrying"),
                }
            }
        }))
    };
    // One call was taken before the claim; the rest are paid now, in debt if need be.
    let prompts = request.settings.prompts(policies.len(), 1);
    state.cascade.queue_budgets.owe_calls(prompts.saturating_sub(1));
    // Abandoned at shutdown or lost to a panic, the step still pays: the engine may go on decoding it.
    let mut step = state.cascade.queue_budgets.step_of(prompts, request.settings.effort, request.settings.max_tokens);
    let started = Instant::now();
    let options = options(&request.settings);
    // A panic in a reasoner is a bug, but it must not take the worker down with the job still held: the job goes
    // to a person, and the worker goes on to the next.
    let classify = std::panic::AssertUnwindSafe(state.classifier.classify(&policies, &request.content, &options));
    let decision = tokio::select! {
        decision = futures::FutureExt::catch_unwind(classify) => decision,
        () = state.jobs_abandoned.cancelled() => {
            drop(renew);
            hand_back(state, &job.id, &token, "the server is shutting down").await;
            return false;
        }
    };
    drop(renew);
    let Ok(decision) = decision else {
        tracing::error!(job_id = %job.id, "deciding the job panicked; it goes to a person");
        fail(state, &job, &token, "deciding the job panicked (a bug in the reasoner)".into()).await;
        return false;
    };
    step.pay(&decision, request.settings.max_tokens);
    let elapsed = started.elapsed().as_secs_f64();
    let origin = Origin { source: "job", submitted_by: job.submitted_by.as_deref() };
    let (record, reasoning) =
        record_of(&decision, &policies, &request.content, &request.settings, origin, Some(&job.id));
    let review = crate::reviews::review_if_undecided(&decision, &record, &policies);
    let webhook = completed_webhook(&job, &record);
    match state.store.finish_job(&job.id, &token, &record, Some(&reasoning), review.as_ref(), webhook.as_ref()).await {
        Ok(true) => {
            // Counted once stored: a job whose lease was lost or whose store failed is decided again.
            count_decision(&decision, "job", elapsed);
            metrics::counter!("safeguard_jobs_finished_total").increment(1);
            if let Some(review) = &review {
                crate::reviews::count_queued(review);
            }
            tracing::debug!(decision_id = %record.id, "job finished");
        }
        Ok(false) => tracing::warn!("job lease was lost before finishing; another worker owns it"),
        // Nothing was written. The job stays claimed until its lease runs out, and is then decided again as after
        // a worker that never came back, its claim counted: handed back at once, uncounted, a store that keeps
        // refusing the result (a full disk that still takes the small update handing the job back) had it decided
        // at the model's cost forever; and the lease spaces the tries out, where a store down for seconds would
        // have every worker spend the job's attempts within as many decisions. This worker pauses.
        Err(err) => {
            tracing::error!(error = %err, "storing the job result failed; the job is decided again once its lease ends");
            return true;
        }
    }
    false
}

/// Hands a claimed job back to the queue untried; if even that fails, its lease runs out and it is claimed again.
async fn hand_back(state: &AppState, job_id: &str, token: &str, why: &str) {
    match state.store.release_job(job_id, token).await {
        Ok(_) => tracing::info!(job_id, why, "job handed back to the queue"),
        Err(err) => tracing::warn!(error = %err, why, "handing the job back failed; it returns when its lease expires"),
    }
}

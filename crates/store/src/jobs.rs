//! Durable jobs: persisted before the API answers, claimed with a lease, finished exactly once.

use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::decisions::insert_decision_tx;
use crate::reviews::{NewReview, insert_review_tx};
use crate::webhooks::{NewDelivery, insert_delivery_tx};
use crate::{Backend, DecisionRecord, Result, Store, bounded_delay_ms, from_json, new_id, now_ms, to_json};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Pending,
    Running,
    Done,
    Failed,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Running => "running",
            JobStatus::Done => "done",
            JobStatus::Failed => "failed",
        }
    }

    /// `None` for a status this version does not know (one a newer server wrote, during a rolling upgrade): read
    /// as pending, a job a newer server had settled would be shown to its client as still waiting.
    fn parse(text: &str) -> Option<JobStatus> {
        match text {
            "pending" => Some(JobStatus::Pending),
            "running" => Some(JobStatus::Running),
            "done" => Some(JobStatus::Done),
            "failed" => Some(JobStatus::Failed),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewJob {
    pub request: serde_json::Value,
    pub idempotency_key: Option<String>,
    pub webhook_url: Option<String>,
    /// The client (API key name) that submitted the job; its idempotency key is unique among that client's jobs
    /// only.
    pub submitted_by: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobRecord {
    pub id: String,
    /// As stored: scoped by the submitter ([`scoped_idempotency_key`]).
    pub idempotency_key: Option<String>,
    pub status: JobStatus,
    pub request: serde_json::Value,
    pub attempts: i64,
    /// Proves which claim owns a running job; a finish with a stale token is refused.
    #[serde(skip)]
    pub lease_token: Option<String>,
    pub locked_until: Option<i64>,
    pub result_decision_id: Option<String>,
    pub error: Option<String>,
    pub webhook_url: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub submitted_by: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct QueueDepth {
    pub pending: i64,
    pub running: i64,
    pub done: i64,
    pub failed: i64,
}

const COLUMNS: &str = "id, idempotency_key, status, request, attempts, lease_token, locked_until, result_decision_id, \
    error, webhook_url, created_at, updated_at, submitted_by";

fn row_to_job(row: &AnyRow) -> Result<JobRecord> {
    Ok(JobRecord {
        id: row.try_get("id")?,
        idempotency_key: row.try_get("idempotency_key")?,
        status: {
            let status = row.try_get::<String, _>("status")?;
            JobStatus::parse(&status).ok_or(crate::StoreError::UnknownValue { what: "jobs.status", value: status })?
        },
        request: from_json(&row.try_get::<String, _>("request")?, "jobs.request")?,
        attempts: row.try_get("attempts")?,
        lease_token: row.try_get("lease_token")?,
        locked_until: row.try_get("locked_until")?,
        result_decision_id: row.try_get("result_decision_id")?,
        error: row.try_get("error")?,
        webhook_url: row.try_get("webhook_url")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        submitted_by: row.try_get("submitted_by")?,
    })
}

/// An Idempotency-Key as stored: the submitter's name and the key, so two clients that number their requests
/// alike never meet. The column stays unique on its own (see migration 0005), and jobs without an owner keep the
/// bare key, as before that migration. A name with a colon in it cannot pose as another's: the scoped key starts
/// with the length of the name.
pub fn scoped_idempotency_key(submitted_by: Option<&str>, key: &str) -> String {
    match submitted_by {
        Some(owner) => format!("{}:{owner}:{key}", owner.len()),
        None => key.to_string(),
    }
}

/// [`Store::has_claimable_job`]'s query: a row when a lease has lapsed or a job is pending.
fn claimable_sql(backend: Backend) -> String {
    let now = backend.now_ms_sql();
    format!(
        "SELECT 1 AS claimable WHERE EXISTS (SELECT 1 FROM jobs WHERE status = 'running' AND locked_until < {now}) \
           OR EXISTS (SELECT 1 FROM jobs WHERE status = 'pending')"
    )
}

/// [`Store::claim_job`]'s statement; binds the lease token, the lease in ms and the process's now (`updated_at`).
fn claim_sql(backend: Backend) -> String {
    let now = backend.now_ms_sql();
    let lock = if backend == Backend::Postgres { "FOR UPDATE SKIP LOCKED" } else { "" };
    format!(
        "UPDATE jobs SET status = 'running', attempts = attempts + 1, lease_token = $1, \
           locked_until = {now} + $2, updated_at = $3 \
         WHERE id = COALESCE( \
             (SELECT id FROM jobs WHERE status = 'running' AND locked_until < {now} \
                ORDER BY locked_until LIMIT 1 {lock}), \
             (SELECT id FROM jobs WHERE status = 'pending' ORDER BY created_at, id LIMIT 1 {lock})) \
         AND (status = 'pending' OR (status = 'running' AND locked_until < {now})) \
         RETURNING {COLUMNS}"
    )
}

impl Store {
    /// Persists a job. With an idempotency key its submitter already used, returns the existing job and `false`.
    #[tracing::instrument(skip_all)]
    pub async fn enqueue_job(&self, job: &NewJob) -> Result<(JobRecord, bool)> {
        let id = new_id();
        let now = now_ms();
        let idempotency_key =
            job.idempotency_key.as_deref().map(|key| scoped_idempotency_key(job.submitted_by.as_deref(), key));
        let inserted = sqlx::query(sql!(
            "INSERT INTO jobs ({COLUMNS}) VALUES ($1, $2, 'pending', $3, 0, NULL, NULL, NULL, NULL, $4, $5, $5, $6) \
             ON CONFLICT (idempotency_key) DO NOTHING"
        ))
        .bind(&id)
        .bind(idempotency_key.as_deref())
        .bind(to_json(&job.request))
        .bind(job.webhook_url.as_deref())
        .bind(now)
        .bind(job.submitted_by.as_deref())
        .execute(&self.pool)
        .await?
        .rows_affected()
            == 1;
        let stored = if inserted {
            self.get_job(&id).await?
        } else {
            let row = sqlx::query(sql!("SELECT {COLUMNS} FROM jobs WHERE idempotency_key = $1"))
                .bind(idempotency_key.as_deref())
                .fetch_optional(&self.pool)
                .await?;
            row.as_ref().map(row_to_job).transpose()?
        };
        let stored = stored.ok_or(sqlx::Error::RowNotFound)?;
        Ok((stored, inserted))
    }

    pub async fn get_job(&self, id: &str) -> Result<Option<JobRecord>> {
        let row =
            sqlx::query(sql!("SELECT {COLUMNS} FROM jobs WHERE id = $1")).bind(id).fetch_optional(&self.pool).await?;
        row.as_ref().map(row_to_job).transpose()
    }

    /// Whether [`claim_job`](Self::claim_job) would find a job now: a pending one, or a running one whose lease
    /// ran out. A look, not a claim: another worker may take the job first. Two probes of one index range each,
    /// as the claim's, rather than one `OR` that no index serves.
    pub async fn has_claimable_job(&self) -> Result<bool> {
        let row = sqlx::query(sqlx::AssertSqlSafe(claimable_sql(self.backend))).fetch_optional(&self.pool).await?;
        Ok(row.is_some())
    }

    /// Claims a running job whose lease ran out (its worker died), else the oldest pending job, for `lease_ms`
    /// by the database's clock. Each claim counts one attempt.
    ///
    /// Lapsed leases come first. They are few (at most one per worker that died) and were claimed when they were
    /// the oldest pending, so they are nearly always older than anything still pending, as the single
    /// `ORDER BY created_at` this replaces would have put them; and taking pending jobs first would leave a dead
    /// worker's job behind the whole backlog, which under steady load never empties. Each branch is one range
    /// of its own index (`jobs_by_lease`, `jobs_by_status`): one `WHERE pending OR lapsed ORDER BY created_at`
    /// sorts the whole backlog, under SQLite's write lock, on every claim. It stays one conditional UPDATE, so
    /// a claim is atomic: COALESCE looks at the pending jobs only when no lease has lapsed.
    #[tracing::instrument(skip(self))]
    pub async fn claim_job(&self, lease_ms: i64) -> Result<Option<JobRecord>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(claim_sql(self.backend)))
            .bind(new_id())
            .bind(bounded_delay_ms(lease_ms))
            .bind(now_ms())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(row_to_job).transpose()
    }

    /// Extends a running job's lease to `lease_ms` from now by the database's clock, while its worker is still
    /// busy with it. False if the lease was lost.
    pub async fn renew_lease(&self, job_id: &str, lease_token: &str, lease_ms: i64) -> Result<bool> {
        let now = self.backend.now_ms_sql();
        let updated = sqlx::query(sql!(
            "UPDATE jobs SET locked_until = {now} + $1, updated_at = $2 \
             WHERE id = $3 AND status = 'running' AND lease_token = $4"
        ))
        .bind(bounded_delay_ms(lease_ms))
        .bind(now_ms())
        .bind(job_id)
        .bind(lease_token)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(updated == 1)
    }

    /// Writes the decision, the review it needs (if any) and the webhook delivery, and marks the job done, in
    /// one transaction, only if `lease_token` still owns the job. Returns false (and writes nothing) when another
    /// worker took it over or it is already finished: that is what makes each job's decision exactly-once even
    /// when leases expire or processes die mid-way, and what keeps an undecided job from finishing without a
    /// person being asked.
    #[tracing::instrument(skip_all, fields(job_id))]
    pub async fn finish_job(
        &self,
        job_id: &str,
        lease_token: &str,
        decision: &DecisionRecord,
        reasoning: Option<&[String]>,
        review: Option<&NewReview>,
        webhook: Option<&NewDelivery>,
    ) -> Result<bool> {
        self.settle_job(job_id, lease_token, JobStatus::Done, None, decision, reasoning, review, webhook).await
    }

    /// Marks a job failed (a request that can never be decided, e.g. a policy that vanished or no longer parses),
    /// with its `needs_review` decision, the review that puts it before a person and its webhook delivery, in one
    /// transaction, as [`finish_job`](Self::finish_job) does: a failed job is still an item someone must settle,
    /// so it must never end without a person or the caller hearing of it. A transient failure is not this: such
    /// a job goes back to the queue ([`release_job`](Self::release_job)).
    #[tracing::instrument(skip_all, fields(job_id))]
    pub async fn fail_job(
        &self,
        job_id: &str,
        lease_token: &str,
        error: &str,
        decision: &DecisionRecord,
        review: &NewReview,
        webhook: Option<&NewDelivery>,
    ) -> Result<bool> {
        self.settle_job(job_id, lease_token, JobStatus::Failed, Some(error), decision, None, Some(review), webhook)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn settle_job(
        &self,
        job_id: &str,
        lease_token: &str,
        status: JobStatus,
        error: Option<&str>,
        decision: &DecisionRecord,
        reasoning: Option<&[String]>,
        review: Option<&NewReview>,
        webhook: Option<&NewDelivery>,
    ) -> Result<bool> {
        let now = now_ms();
        let mut tx = self.begin_read_committed().await?;
        let updated = sqlx::query(
            "UPDATE jobs SET status = $1, error = $2, result_decision_id = $3, locked_until = NULL, updated_at = $4 \
             WHERE id = $5 AND status = 'running' AND lease_token = $6",
        )
        .bind(status.as_str())
        .bind(error)
        .bind(&decision.id)
        .bind(now)
        .bind(job_id)
        .bind(lease_token)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        insert_decision_tx(&mut tx, decision, reasoning).await?;
        if let Some(review) = review {
            insert_review_tx(&mut tx, decision, review, now).await?;
        }
        if let Some(delivery) = webhook {
            insert_delivery_tx(&mut tx, self.backend, delivery, now).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Hands a running job back to the queue, untried (its policies could not be loaded for a moment). The claim
    /// is not counted as an attempt: `attempts` counts the claims a worker never came back from, which is what
    /// the server's cap on them (a job that crashes every worker that takes it) is about.
    pub async fn release_job(&self, job_id: &str, lease_token: &str) -> Result<bool> {
        let updated = sqlx::query(
            "UPDATE jobs SET status = 'pending', attempts = attempts - 1, lease_token = NULL, locked_until = NULL, \
             updated_at = $1 WHERE id = $2 AND status = 'running' AND lease_token = $3",
        )
        .bind(now_ms())
        .bind(job_id)
        .bind(lease_token)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(updated == 1)
    }

    pub async fn queue_depth(&self) -> Result<QueueDepth> {
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status").fetch_all(&self.pool).await?;
        let mut depth = QueueDepth::default();
        for row in rows {
            let n: i64 = row.try_get("n")?;
            // A status this version does not know is counted nowhere rather than as waiting.
            match JobStatus::parse(&row.try_get::<String, _>("status")?) {
                Some(JobStatus::Pending) => depth.pending += n,
                Some(JobStatus::Running) => depth.running += n,
                Some(JobStatus::Done) => depth.done += n,
                Some(JobStatus::Failed) => depth.failed += n,
                None => {}
            }
        }
        Ok(depth)
    }

    /// How many decisions were written for a job; exactly-once means 0 until done, then 1.
    pub async fn decisions_for_job(&self, job_id: &str) -> Result<i64> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM decisions WHERE job_id = $1")
            .bind(job_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>("n")?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each branch of the claim is a range of its own index, and the outer update finds its row by primary key:
    /// nothing reads or sorts the backlog.
    #[tokio::test]
    async fn claims_read_one_index_range_per_branch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("plan.db")).await.unwrap();
        let plan = crate::tests::query_plan(&store, &claim_sql(Backend::Sqlite)).await;
        assert!(
            plan.iter().any(|step| step.contains("USING INDEX jobs_by_lease (status=? AND locked_until<?)")),
            "{plan:#?}"
        );
        assert!(plan.iter().any(|step| step.contains("USING INDEX jobs_by_status (status=?)")), "{plan:#?}");
        assert!(
            plan.iter().any(|step| step.starts_with("SEARCH jobs USING INDEX sqlite_autoindex_jobs_")),
            "{plan:#?}"
        );
        assert!(
            !plan.iter().any(|step| step.starts_with("SCAN") || step == "USE TEMP B-TREE FOR ORDER BY"),
            "{plan:#?}"
        );
        let plan = crate::tests::query_plan(&store, &claimable_sql(Backend::Sqlite)).await;
        assert!(plan.iter().any(|step| step.contains("jobs_by_lease")), "{plan:#?}");
        assert!(!plan.iter().any(|step| step.starts_with("SCAN") && step != "SCAN CONSTANT ROW"), "{plan:#?}");
        store.close().await;
    }
}

//! Retention: deleting what is older than an operator keeps. Decisions hold the content users sent, up to 100k
//! characters each, with its reasoning, and nothing else ever deletes them; a deployment that must not keep user
//! content forever (or only has so much disk) prunes on a schedule (`safeguard prune`, `serve --retain-days`).
//!
//! What is never deleted, however old: an item a person still has to decide (a pending review), a person's
//! decision on a bus item not yet announced to its producer, a decision a kept appeal replays, a job not yet
//! finished or whose webhook is still being sent, and a policy version that is active or that a kept decision or
//! an unfinished job names. Rows go a batch at a time, each batch in its own transaction, so that a large first
//! prune never holds SQLite's write lock for long.

use sqlx::Row;

use crate::{Backend, Result, Store};

/// What to prune, and up to when.
#[derive(Debug, Clone)]
pub struct Retention {
    /// Rows created (jobs and deliveries: last changed) before this unix-millisecond time go.
    pub before_ms: i64,
    /// Keep decisions a person decided, however old: the corrections triage retrains on.
    pub keep_reviewed: bool,
    /// Also delete policy versions that are not active and that nothing kept names (old drafts, the versions
    /// clients sent inline). Off unless asked: an inactive version may be one an operator means to roll back to.
    pub policies: bool,
    /// Rows per transaction.
    pub batch: i64,
}

impl Retention {
    pub fn before(before_ms: i64) -> Self {
        Retention { before_ms, keep_reviewed: false, policies: false, batch: 500 }
    }
}

/// How many rows a prune deleted (or, counting only, would delete).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Pruned {
    pub decisions: u64,
    pub jobs: u64,
    pub webhook_deliveries: u64,
    pub policies: u64,
}

/// A decision `d` that may go: old enough, and nothing kept still needs it.
fn decision_prunable(keep_reviewed: bool) -> String {
    let reviewed = if keep_reviewed { "OR r.status = 'decided'" } else { "" };
    format!(
        "d.created_at < $1 \
         AND NOT EXISTS (SELECT 1 FROM reviews r WHERE r.decision_id = d.id \
             AND (r.status = 'pending' OR (r.status = 'decided' AND r.announced_at IS NULL) {reviewed})) \
         AND NOT EXISTS (SELECT 1 FROM decisions a WHERE a.replay_of = d.id AND a.created_at >= $1) \
         AND (d.job_id IS NULL OR NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = d.job_id))"
    )
}

/// A finished job `j` that may go, with its deliveries: none of them is still being sent.
const JOB_PRUNABLE: &str = "j.status IN ('done', 'failed') AND j.created_at < $1 AND j.updated_at < $1 \
     AND NOT EXISTS (SELECT 1 FROM webhook_deliveries w WHERE w.job_id = j.id AND w.status = 'pending')";

/// A delivery `w` that may go: sent, or given up on (its job may be kept; its record of attempts is not).
const DELIVERY_PRUNABLE: &str = "w.status <> 'pending' AND w.created_at < $1 AND w.updated_at < $1";

/// A policy version `p` that may go: inactive and named by nothing kept (a review names its decision's versions).
/// Jobs hold their request as JSON, so an unfinished one's reference is found in its text.
const POLICY_PRUNABLE: &str = "p.created_at < $1 \
     AND NOT EXISTS (SELECT 1 FROM policy_pins pin WHERE pin.hash = p.hash) \
     AND NOT EXISTS (SELECT 1 FROM decision_policies dp WHERE dp.policy_hash = p.hash) \
     AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.status IN ('pending', 'running') \
         AND j.request LIKE '%' || p.hash || '%')";

fn placeholders(from: usize, count: usize) -> String {
    (from..from + count).map(|n| format!("${n}")).collect::<Vec<_>>().join(", ")
}

impl Store {
    /// Deletes what `retention` says may go, a batch at a time, and says how much went. Jobs go before decisions
    /// (a job's decision is kept while its job is), deliveries before jobs; policies last, once the decisions
    /// that named them are gone.
    #[tracing::instrument(skip(self))]
    pub async fn prune(&self, retention: &Retention) -> Result<Pruned> {
        let mut pruned = Pruned::default();
        let batch = retention.batch.max(1);
        let before = retention.before_ms;
        pruned.webhook_deliveries =
            self.prune_table("webhook_deliveries w", "w.id", DELIVERY_PRUNABLE, before, batch, &[]).await?;
        pruned.jobs = self
            .prune_table("jobs j", "j.id", JOB_PRUNABLE, before, batch, &[("webhook_deliveries", "job_id")])
            .await?;
        pruned.decisions = self
            .prune_table(
                "decisions d",
                "d.id",
                &decision_prunable(retention.keep_reviewed),
                before,
                batch,
                &[
                    ("reviews", "decision_id"),
                    ("decision_reasoning", "decision_id"),
                    ("decision_policies", "decision_id"),
                ],
            )
            .await?;
        if retention.policies {
            pruned.policies = self.prune_table("policies p", "p.hash", POLICY_PRUNABLE, before, batch, &[]).await?;
        }
        Ok(pruned)
    }

    /// Counts what [`Store::prune`] would delete now, deleting nothing. A decision that only goes once its job
    /// has gone is not counted.
    pub async fn count_prunable(&self, retention: &Retention) -> Result<Pruned> {
        let count = |from: &'static str, condition: String| async move {
            let row = sqlx::query(sql!("SELECT COUNT(*) AS n FROM {from} WHERE {condition}"))
                .bind(retention.before_ms)
                .fetch_one(&self.pool)
                .await?;
            Ok::<u64, crate::StoreError>(row.try_get::<i64, _>("n")?.max(0) as u64)
        };
        Ok(Pruned {
            webhook_deliveries: count("webhook_deliveries w", DELIVERY_PRUNABLE.to_string()).await?,
            jobs: count("jobs j", JOB_PRUNABLE.to_string()).await?,
            decisions: count("decisions d", decision_prunable(retention.keep_reviewed)).await?,
            policies: if retention.policies { count("policies p", POLICY_PRUNABLE.to_string()).await? } else { 0 },
        })
    }

    /// Deletes the rows of `table` (aliased, e.g. `decisions d`) that meet `condition`, and the rows of each
    /// `(child, column)` that point at them, `batch` at a time. The condition is checked again inside each batch's
    /// transaction, with the write lock held (SQLite) or the rows locked (PostgreSQL), so that a row that gained a
    /// reason to stay between the look and the delete (an appeal, say) stays.
    async fn prune_table(
        &self,
        table: &'static str,
        key: &'static str,
        condition: &str,
        before: i64,
        batch: i64,
        children: &[(&'static str, &'static str)],
    ) -> Result<u64> {
        let (name, alias) = table.split_once(' ').unwrap_or((table, table));
        let bare_key = key.split_once('.').map_or(key, |(_, column)| column);
        let mut deleted = 0u64;
        loop {
            let candidates: Vec<String> = sqlx::query(sql!(
                "SELECT {key} AS k FROM {table} WHERE {condition} ORDER BY {alias}.created_at LIMIT $2"
            ))
            .bind(before)
            .bind(batch)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| row.try_get::<String, _>("k"))
            .collect::<std::result::Result<_, _>>()?;
            if candidates.is_empty() {
                return Ok(deleted);
            }
            let mut tx = match self.backend {
                Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
                Backend::Postgres => self.pool.begin().await?,
            };
            let lock = if self.backend == Backend::Postgres { "FOR UPDATE" } else { "" };
            let list = placeholders(2, candidates.len());
            let mut recheck =
                sqlx::query(sql!("SELECT {key} AS k FROM {table} WHERE {key} IN ({list}) AND {condition} {lock}"))
                    .bind(before);
            for candidate in &candidates {
                recheck = recheck.bind(candidate);
            }
            let going: Vec<String> = recheck
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|row| row.try_get::<String, _>("k"))
                .collect::<std::result::Result<_, _>>()?;
            if !going.is_empty() {
                let list = placeholders(1, going.len());
                for (child, column) in children {
                    let mut delete = sqlx::query(sql!("DELETE FROM {child} WHERE {column} IN ({list})"));
                    for id in &going {
                        delete = delete.bind(id);
                    }
                    delete.execute(&mut *tx).await?;
                }
                let mut delete = sqlx::query(sql!("DELETE FROM {name} WHERE {bare_key} IN ({list})"));
                for id in &going {
                    delete = delete.bind(id);
                }
                deleted += delete.execute(&mut *tx).await?.rows_affected();
            }
            tx.commit().await?;
            // Fewer than a batch: that was the last of them. (A batch whose rows all gained a reason to stay since
            // the look would otherwise be looked at again and again.)
            if (candidates.len() as i64) < batch || going.is_empty() {
                return Ok(deleted);
            }
        }
    }
}

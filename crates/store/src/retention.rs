//! Retention: deleting what is older than an operator keeps. Decisions hold the content users sent, up to 100k
//! characters each, with its reasoning, and nothing else ever deletes them; a deployment that must not keep user
//! content forever (or only has so much disk) prunes on a schedule (`safeguard prune`, `serve --retain-days`).
//!
//! What is never deleted, however old: an item a person still has to decide (a pending review), a person's
//! decision on a bus item not yet announced to its producer, or made within the period (its age is the answer's),
//! a decision any stored appeal or replay names (it goes on a later run, once they have gone), a job not yet
//! finished or whose webhook is still being sent or failed within the period. Policy versions go only when asked, and only one that is not active, that no kept decision
//! or unfinished job names, and that no server has read to decide with for the whole period (servers record that
//! at least hourly while they hold a version: `Store::touch_policy`). Rows go a batch at a time, each batch in its
//! own transaction, so that a large first prune never holds SQLite's write lock for long.

use std::collections::HashSet;

use sqlx::Row;

use crate::{Backend, Result, Store};

/// What to prune, and up to when.
#[derive(Debug, Clone)]
pub struct Retention {
    /// Rows created (jobs and deliveries: last changed too) before this unix-millisecond time go.
    pub before_ms: i64,
    /// Keep decisions a person decided, however old: the corrections triage retrains on.
    pub keep_reviewed: bool,
    /// Also delete policy versions nothing uses any more (old drafts, versions clients sent inline). Off unless
    /// asked: an inactive version may be one an operator means to roll back to.
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

/// A decision `d` that may go: old enough, and nothing kept still needs it. An appeal or replay is always newer
/// than what it names, so the named decision waits for it to go first. A person's answer counts as new: a
/// correction made today of last month's decision stays for the period, for the exports that retrain on it.
fn decision_prunable(keep_reviewed: bool) -> String {
    let reviewed = if keep_reviewed { "OR r.status = 'decided'" } else { "" };
    format!(
        "d.created_at < $1 \
         AND NOT EXISTS (SELECT 1 FROM reviews r WHERE r.decision_id = d.id \
             AND (r.status = 'pending' OR (r.status = 'decided' AND r.announced_at IS NULL) \
                  OR r.decided_at >= $1 {reviewed})) \
         AND NOT EXISTS (SELECT 1 FROM decisions a WHERE a.replay_of = d.id) \
         AND (d.job_id IS NULL OR NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = d.job_id))"
    )
}

/// A finished job `j` that may go, with its deliveries: none is still being sent, nor failed within the period
/// (`safeguard webhooks retry` may still want it), and no person still has to decide its item or an appeal of
/// it (the answer goes to the job's webhook, and the job's client reads it from the job).
const JOB_PRUNABLE: &str = "j.status IN ('done', 'failed') AND j.created_at < $1 AND j.updated_at < $1 \
     AND NOT EXISTS (SELECT 1 FROM webhook_deliveries w WHERE w.job_id = j.id \
         AND (w.status = 'pending' OR w.updated_at >= $1)) \
     AND NOT EXISTS (SELECT 1 FROM reviews r WHERE r.status = 'pending' \
         AND (r.decision_id = j.result_decision_id \
              OR r.decision_id IN (SELECT a.id FROM decisions a WHERE a.replay_of = j.result_decision_id)))";

/// A delivery `w` that may go: sent, or given up on, before the period (its job may be kept; its record of
/// attempts is not).
const DELIVERY_PRUNABLE: &str = "w.status <> 'pending' AND w.created_at < $1 AND w.updated_at < $1";

/// A policy version `p` that may go is not active and not read to decide with within the period; and once the
/// prune's decisions have gone, named by no decision left (a review names its decision's versions). (Nor named
/// by an unfinished job: see [`Store::policies_of_unfinished_jobs`].)
const POLICY_UNUSED: &str = "p.created_at < $1 AND COALESCE(p.used_at, p.created_at) < $1 \
     AND NOT EXISTS (SELECT 1 FROM policy_pins pin WHERE pin.hash = p.hash)";
const POLICY_NAMED_BY_NO_DECISION: &str =
    "NOT EXISTS (SELECT 1 FROM decision_policies dp WHERE dp.policy_hash = p.hash)";

/// One table's part of a prune: its rows (`name alias`), their key, what makes one prunable, and the tables whose
/// rows point at them and go with them.
struct Pruning<'a> {
    table: &'static str,
    alias: &'static str,
    key: &'static str,
    condition: &'a str,
    children: &'a [(&'static str, &'static str)],
    /// Keys kept whatever the condition says.
    spared: Option<&'a HashSet<String>>,
    /// PostgreSQL only: rows elsewhere that the condition reads and that another writer locks instead of this
    /// table's, as a statement locking them given the list of candidate keys' placeholders. Locked before this
    /// table's rows, so that what their lock holder committed is seen by the check.
    lock_first: Option<fn(&str) -> String>,
}

/// The decisions of candidate jobs: an appeal locks its decision (`FOR UPDATE`) and a review's insert takes a key
/// share lock on it, neither of which waits for a lock on the job. Without it, an appeal committed after the
/// check's snapshot was missed, and the job its answer must reach deleted.
fn lock_job_decisions(list: &str) -> String {
    format!(
        "SELECT d.id FROM decisions d WHERE d.id IN (SELECT j.result_decision_id FROM jobs j WHERE j.id IN ({list})) \
         ORDER BY d.id FOR UPDATE"
    )
}

fn placeholders(from: usize, count: usize) -> String {
    (from..from + count).map(|n| format!("${n}")).collect::<Vec<_>>().join(", ")
}

impl Store {
    /// Deletes what `retention` says may go, a batch at a time, and says how much went. Deliveries go first, then
    /// jobs (with theirs), then decisions (a job's decision is kept while its job is).
    #[tracing::instrument(skip(self))]
    pub async fn prune(&self, retention: &Retention) -> Result<Pruned> {
        let decisions = decision_prunable(retention.keep_reviewed);
        let webhook_deliveries = self
            .prune_table(
                &Pruning {
                    table: "webhook_deliveries",
                    alias: "w",
                    key: "id",
                    condition: DELIVERY_PRUNABLE,
                    children: &[],
                    spared: None,
                    lock_first: None,
                },
                retention,
            )
            .await?;
        let jobs = self
            .prune_table(
                &Pruning {
                    table: "jobs",
                    alias: "j",
                    key: "id",
                    condition: JOB_PRUNABLE,
                    children: &[("webhook_deliveries", "job_id")],
                    spared: None,
                    lock_first: Some(lock_job_decisions),
                },
                retention,
            )
            .await?;
        let decisions = self
            .prune_table(
                &Pruning {
                    table: "decisions",
                    alias: "d",
                    key: "id",
                    condition: &decisions,
                    children: &[
                        ("reviews", "decision_id"),
                        ("decision_reasoning", "decision_id"),
                        ("decision_policies", "decision_id"),
                    ],
                    spared: None,
                    lock_first: None,
                },
                retention,
            )
            .await?;
        // Last: a version goes only once the decisions that named it have.
        let policies = if retention.policies {
            let in_jobs = self.policies_of_unfinished_jobs().await?;
            let condition = format!("{POLICY_UNUSED} AND {POLICY_NAMED_BY_NO_DECISION}");
            let pruning = Pruning {
                table: "policies",
                alias: "p",
                key: "hash",
                condition: &condition,
                children: &[],
                spared: Some(&in_jobs),
                lock_first: None,
            };
            self.prune_table(&pruning, retention).await?
        } else {
            0
        };
        Ok(Pruned { decisions, jobs, webhook_deliveries, policies })
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
            policies: if retention.policies { self.count_prunable_policies(retention).await? } else { 0 },
        })
    }

    /// A prune deletes decisions before versions, so a version named only by decisions that go with it goes
    /// too: counted as such, not as kept by them.
    async fn count_prunable_policies(&self, retention: &Retention) -> Result<u64> {
        let in_jobs = self.policies_of_unfinished_jobs().await?;
        let condition = format!(
            "{POLICY_UNUSED} AND NOT EXISTS (SELECT 1 FROM decision_policies dp \
               JOIN decisions d ON d.id = dp.decision_id WHERE dp.policy_hash = p.hash AND NOT ({}))",
            decision_prunable(retention.keep_reviewed)
        );
        let prunable = sqlx::query(sql!("SELECT p.hash AS k FROM policies p WHERE {condition}"))
            .bind(retention.before_ms)
            .fetch_all(&self.pool)
            .await?;
        let mut count = 0;
        for row in prunable {
            count += u64::from(!in_jobs.contains(&row.try_get::<String, _>("k")?));
        }
        Ok(count)
    }

    /// The policy versions unfinished jobs were queued with (their request's `policy_hashes`), read once per
    /// prune: a job queued while it runs records its versions in use as it is queued, so they are not prunable
    /// anyway. Only that field of each request is read, never its content.
    async fn policies_of_unfinished_jobs(&self) -> Result<HashSet<String>> {
        let hashes = match self.backend {
            Backend::Sqlite => "json_extract(request, '$.policy_hashes')",
            // PostgreSQL refuses to read JSON holding `\u0000` (content with a NUL is stored so), as `jsonb` and as
            // `json` alike. Made a space first: the same six characters' shape, so what parsed still parses, and
            // an escaped backslash before a `u0000` stays one.
            Backend::Postgres => "(replace(request, E'\\\\u0000', E'\\\\u0020')::jsonb -> 'policy_hashes')::text",
        };
        let rows = sqlx::query(sql!("SELECT {hashes} AS hashes FROM jobs WHERE status IN ('pending', 'running')"))
            .fetch_all(&self.pool)
            .await?;
        let mut in_jobs = HashSet::new();
        for row in rows {
            let Some(text) = row.try_get::<Option<String>, _>("hashes")? else { continue };
            let listed: serde_json::Value = crate::from_json(&text, "jobs.request.policy_hashes")?;
            let listed = listed.as_array().into_iter().flatten().filter_map(serde_json::Value::as_str);
            in_jobs.extend(listed.map(str::to_string));
        }
        Ok(in_jobs)
    }

    /// Deletes one table's prunable rows and the rows that point at them, `batch` at a time, oldest first. Each
    /// batch's rows are locked (SQLite: the write lock; PostgreSQL: the rows) before their condition is checked
    /// again, in a statement of its own, so that a row that gained a reason to stay since the look (an appeal, a
    /// review) stays. The look goes on from where the last batch ended, so rows kept on purpose are read once per
    /// prune, not once per batch.
    async fn prune_table(&self, pruning: &Pruning<'_>, retention: &Retention) -> Result<u64> {
        let Pruning { table, alias, key, condition, children, spared, lock_first } = *pruning;
        let batch = retention.batch.max(1);
        let mut after: (i64, String) = (i64::MIN, String::new());
        let mut deleted = 0u64;
        loop {
            let candidates: Vec<(i64, String)> = sqlx::query(sql!(
                "SELECT {alias}.created_at AS at, {alias}.{key} AS k FROM {table} {alias} WHERE {condition} \
                 AND {alias}.created_at >= $2 \
                 AND ({alias}.created_at > $2 OR ({alias}.created_at = $2 AND {alias}.{key} > $3)) \
                 ORDER BY {alias}.created_at, {alias}.{key} LIMIT $4"
            ))
            // (`created_at >= $2` alone starts PostgreSQL's index scan at the cursor; the OR does not.)
            .bind(retention.before_ms)
            .bind(after.0)
            .bind(&after.1)
            .bind(batch)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| Ok((row.try_get::<i64, _>("at")?, row.try_get::<String, _>("k")?)))
            .collect::<Result<_>>()?;
            let Some(last) = candidates.last().cloned() else { return Ok(deleted) };
            let whole_batch = candidates.len() as i64 >= batch;
            let candidates: Vec<(i64, String)> = match spared {
                Some(spared) => candidates.into_iter().filter(|(_, id)| !spared.contains(id)).collect(),
                None => candidates,
            };
            if candidates.is_empty() {
                if !whole_batch {
                    return Ok(deleted);
                }
                after = last;
                continue;
            }
            let mut tx = self.begin_locking().await?;
            if self.backend == Backend::Postgres {
                // Locked first (in key order, so two servers pruning at once cannot deadlock) and checked after, in
                // a new statement: a check in the locking statement would read the snapshot from before the lock
                // was granted, and miss what the lock's holder committed.
                let list = placeholders(1, candidates.len());
                let own = format!("SELECT {key} FROM {table} WHERE {key} IN ({list}) ORDER BY {key} FOR UPDATE");
                for statement in lock_first.map(|lock| lock(&list)).into_iter().chain([own]) {
                    let mut lock = sqlx::query(sqlx::AssertSqlSafe(statement));
                    for (_, id) in &candidates {
                        lock = lock.bind(id);
                    }
                    lock.fetch_all(&mut *tx).await?;
                }
            }
            let list = placeholders(2, candidates.len());
            let mut recheck = sqlx::query(sql!(
                "SELECT {alias}.{key} AS k FROM {table} {alias} WHERE {alias}.{key} IN ({list}) AND {condition}"
            ))
            .bind(retention.before_ms);
            for (_, id) in &candidates {
                recheck = recheck.bind(id);
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
                let mut delete = sqlx::query(sql!("DELETE FROM {table} WHERE {key} IN ({list})"));
                for id in &going {
                    delete = delete.bind(id);
                }
                deleted += delete.execute(&mut *tx).await?.rows_affected();
            }
            tx.commit().await?;
            if !whole_batch {
                return Ok(deleted);
            }
            after = last;
        }
    }
}

//! Every decision, with its inputs recorded well enough to replay it; the reasoning kept apart.

use std::sync::LazyLock;

use serde::{Deserialize, Serialize};
use sqlx::any::{AnyArguments, AnyRow};
use sqlx::pool::PoolConnection;
use sqlx::query::Query;
use sqlx::{Any, Connection, Row, Transaction};

use crate::reviews::{NewReview, insert_review_tx};
use crate::{Result, Store, StoreError, from_json, now_ms, to_json};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    pub id: String,
    pub created_at: i64,
    pub policy_hashes: Vec<String>,
    pub policy_names: Vec<String>,
    pub model_id: String,
    pub effort: String,
    /// sha256 of the exact prompt tokens, when the reasoner reports it.
    pub prompt_hash: Option<String>,
    pub sampling: serde_json::Value,
    /// The judged content, kept so that a decision can be replayed.
    pub content: serde_json::Value,
    pub verdicts: serde_json::Value,
    pub outcome: String,
    /// Why the decision fell back to needs_review (engine failure, timeout, …).
    pub failure_reason: Option<String>,
    pub timings: serde_json::Value,
    pub prompt_tokens: i64,
    pub cached_prompt_tokens: i64,
    pub completion_tokens: i64,
    /// "api", "job", "batch", "moderations", "replay", …
    pub source: String,
    pub job_id: Option<String>,
    pub replay_of: Option<String>,
    /// The client that submitted the item: its API key's name; `None` where no key was asked for (the bus, a
    /// keyless server, decisions stored before this was recorded).
    pub submitted_by: Option<String>,
}

impl DecisionRecord {
    /// The stored verdict for one policy version, if the decision has one that names it.
    pub fn verdict_for(&self, policy_hash: &str) -> Option<&serde_json::Value> {
        let verdicts = self.verdicts.as_array()?;
        verdicts.iter().find(|verdict| verdict.get("policy_hash").and_then(|hash| hash.as_str()) == Some(policy_hash))
    }
}

#[derive(Debug, Clone, Default)]
pub struct DecisionFilter {
    pub outcome: Option<String>,
    /// A policy name or a "sha256:…" hash.
    pub policy: Option<String>,
    /// Only decisions at or after this time (unix ms).
    pub since: Option<i64>,
    /// Only decisions strictly before this time (unix ms); for paging backwards.
    pub before: Option<i64>,
    /// With `before`: also the decisions at exactly that time whose id sorts before this one. Paging by time
    /// alone skips the rest of a millisecond a page ends in (a batch stores its items within one), so the next
    /// page starts after the last decision seen, `(created_at, id)`, in the list's order.
    pub before_id: Option<String>,
    pub limit: i64,
}

pub(crate) const COLUMNS: &str = "id, created_at, policy_hashes, policy_names, model_id, effort, prompt_hash, sampling, content, \
    verdicts, outcome, failure_reason, timings, prompt_tokens, cached_prompt_tokens, completion_tokens, source, job_id, \
    replay_of, submitted_by";

/// Values bound per row of `decisions`, in `COLUMNS` order ([`decision_values`]).
const DECISION_VALUES: usize = 20;

/// `$n, $n+1, …` for `count` values, advancing `next` past them.
fn placeholders(next: &mut usize, count: usize) -> String {
    let list: Vec<String> = (*next..*next + count).map(|n| format!("${n}")).collect();
    *next += count;
    list.join(", ")
}

/// The statements that store one decision, numbering their parameters from `next` on. sqlx sends them to either
/// database; rusqlite binds them by position too, because SQLite numbers `$n` parameters in order of first use.
fn insert_decision_sql(next: &mut usize) -> String {
    format!("INSERT INTO decisions ({COLUMNS}) VALUES ({})", placeholders(next, DECISION_VALUES))
}
/// A link carries its decision's time (the listing by policy pages on it), read from the decision just inserted
/// rather than bound: it cannot disagree with the decision, and every writer binds the same three values.
fn insert_policy_link_sql(next: &mut usize) -> String {
    let decision_id = *next;
    format!(
        "INSERT INTO decision_policies (decision_id, policy_hash, policy_name, created_at) \
         VALUES ({}, (SELECT created_at FROM decisions WHERE id = ${decision_id})) ON CONFLICT DO NOTHING",
        placeholders(next, 3)
    )
}
fn insert_reasoning_sql(next: &mut usize) -> String {
    format!("INSERT INTO decision_reasoning (decision_id, reasoning) VALUES ({})", placeholders(next, 2))
}

/// Each statement alone, numbered from `$1`.
pub(crate) static INSERT_DECISION: LazyLock<String> = LazyLock::new(|| insert_decision_sql(&mut 1));
pub(crate) static INSERT_POLICY_LINK: LazyLock<String> = LazyLock::new(|| insert_policy_link_sql(&mut 1));
pub(crate) static INSERT_REASONING: LazyLock<String> = LazyLock::new(|| insert_reasoning_sql(&mut 1));

/// One bound value of a stored decision; sqlx ([`bind`]) and rusqlite (`sqlite_commit`) each bind these.
pub(crate) enum ColumnValue<'a> {
    Text(&'a str),
    OptionalText(Option<&'a str>),
    Json(String),
    Integer(i64),
}

/// A decision's values in `COLUMNS` order: the one place that order is written down for binding.
pub(crate) fn decision_values(decision: &DecisionRecord) -> [ColumnValue<'_>; DECISION_VALUES] {
    use ColumnValue::{Integer, Json, OptionalText, Text};
    [
        Text(&decision.id),
        Integer(decision.created_at),
        Json(to_json(&decision.policy_hashes)),
        Json(to_json(&decision.policy_names)),
        Text(&decision.model_id),
        Text(&decision.effort),
        OptionalText(decision.prompt_hash.as_deref()),
        Json(to_json(&decision.sampling)),
        Json(to_json(&decision.content)),
        Json(to_json(&decision.verdicts)),
        Text(&decision.outcome),
        OptionalText(decision.failure_reason.as_deref()),
        Json(to_json(&decision.timings)),
        Integer(decision.prompt_tokens),
        Integer(decision.cached_prompt_tokens),
        Integer(decision.completion_tokens),
        Text(&decision.source),
        OptionalText(decision.job_id.as_deref()),
        OptionalText(decision.replay_of.as_deref()),
        OptionalText(decision.submitted_by.as_deref()),
    ]
}

/// The policy name beside each of a decision's policy hashes ("" where the record names fewer).
pub(crate) fn policy_links(decision: &DecisionRecord) -> impl Iterator<Item = (&str, &str)> {
    decision
        .policy_hashes
        .iter()
        .enumerate()
        .map(|(index, hash)| (hash.as_str(), decision.policy_names.get(index).map(String::as_str).unwrap_or("")))
}

fn bind<'q, 'a>(
    query: Query<'q, Any, AnyArguments>,
    values: impl IntoIterator<Item = ColumnValue<'a>>,
) -> Query<'q, Any, AnyArguments> {
    values.into_iter().fold(query, |query, value| match value {
        ColumnValue::Text(text) => query.bind(text),
        ColumnValue::OptionalText(text) => query.bind(text),
        ColumnValue::Json(json) => query.bind(json),
        ColumnValue::Integer(number) => query.bind(number),
    })
}

pub(crate) fn row_to_decision(row: &AnyRow) -> Result<DecisionRecord> {
    Ok(DecisionRecord {
        id: row.try_get("id")?,
        created_at: row.try_get("created_at")?,
        policy_hashes: from_json(&row.try_get::<String, _>("policy_hashes")?, "decisions.policy_hashes")?,
        policy_names: from_json(&row.try_get::<String, _>("policy_names")?, "decisions.policy_names")?,
        model_id: row.try_get("model_id")?,
        effort: row.try_get("effort")?,
        prompt_hash: row.try_get("prompt_hash")?,
        sampling: from_json(&row.try_get::<String, _>("sampling")?, "decisions.sampling")?,
        content: from_json(&row.try_get::<String, _>("content")?, "decisions.content")?,
        verdicts: from_json(&row.try_get::<String, _>("verdicts")?, "decisions.verdicts")?,
        outcome: row.try_get("outcome")?,
        failure_reason: row.try_get("failure_reason")?,
        timings: from_json(&row.try_get::<String, _>("timings")?, "decisions.timings")?,
        prompt_tokens: row.try_get("prompt_tokens")?,
        cached_prompt_tokens: row.try_get("cached_prompt_tokens")?,
        completion_tokens: row.try_get("completion_tokens")?,
        source: row.try_get("source")?,
        job_id: row.try_get("job_id")?,
        replay_of: row.try_get("replay_of")?,
        submitted_by: row.try_get("submitted_by")?,
    })
}

pub(crate) async fn insert_decision_tx(
    tx: &mut Transaction<'static, Any>,
    decision: &DecisionRecord,
    reasoning: Option<&[String]>,
) -> Result<()> {
    bind(sqlx::query(sqlx::AssertSqlSafe(INSERT_DECISION.as_str())), decision_values(decision))
        .execute(&mut **tx)
        .await?;
    for (hash, name) in policy_links(decision) {
        let link = sqlx::query(sqlx::AssertSqlSafe(INSERT_POLICY_LINK.as_str()));
        link.bind(&decision.id).bind(hash).bind(name).execute(&mut **tx).await?;
    }
    if let Some(reasoning) = reasoning.filter(|r| !r.is_empty()) {
        let statement = sqlx::query(sqlx::AssertSqlSafe(INSERT_REASONING.as_str()));
        statement.bind(&decision.id).bind(to_json(&reasoning)).execute(&mut **tx).await?;
    }
    Ok(())
}

/// SQLite: decisions (with their policy links and reasoning) written as one multi-statement query inside a
/// `BEGIN IMMEDIATE` transaction.
///
/// sqlx runs every statement on the connection's own thread, and each statement sent separately is a round trip
/// there and back: five for one decision in a transaction, which was most of what storing a decision cost once
/// commits stopped waiting for the disk. One query for all the inserts keeps it at three trips (begin, inserts,
/// commit) whatever the batch size. The numbered parameters (`$n`) address the bound values across all
/// statements of the query.
///
/// The transaction is sqlx's own rather than `BEGIN …; COMMIT;` inside that query. When the caller's future is
/// dropped (a handler's deadline), sqlx's SQLite thread stops at the first statement whose result nobody takes:
/// a `BEGIN` sent as text would stay open on the pooled connection and hold the write lock for good. A tracked
/// transaction is rolled back by sqlx when it is dropped unfinished, and a `BEGIN` nobody was left to receive
/// is undone on the spot.
pub(crate) async fn insert_decisions_sqlite(
    conn: &mut PoolConnection<Any>,
    rows: &[(&DecisionRecord, Option<&[String]>)],
) -> Result<()> {
    let rows: Vec<DecisionToStore<'_>> =
        rows.iter().map(|(decision, reasoning)| (*decision, *reasoning, None)).collect();
    insert_rows_sqlite(conn, &rows).await.map(drop)
}

/// [`insert_decisions_sqlite`] with a review for the rows that have one; returns each row's review id.
async fn insert_rows_sqlite(
    conn: &mut PoolConnection<Any>,
    rows: &[DecisionToStore<'_>],
) -> Result<Vec<Option<String>>> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let review_ids: Vec<Option<String>> = rows.iter().map(|(_, _, review)| review.map(|_| crate::new_id())).collect();
    let mut sql = String::new();
    let mut next = 1;
    for (decision, reasoning, review) in rows {
        sql.push_str(&insert_decision_sql(&mut next));
        sql.push_str(";\n");
        for _ in &decision.policy_hashes {
            sql.push_str(&insert_policy_link_sql(&mut next));
            sql.push_str(";\n");
        }
        if reasoning.is_some_and(|r| !r.is_empty()) {
            sql.push_str(&insert_reasoning_sql(&mut next));
            sql.push_str(";\n");
        }
        if let Some(review) = review {
            sql.push_str(&crate::reviews::insert_review_sql(&mut next));
            sql.push_str(";\n");
            if crate::reviews::superseded_by(decision, review).is_some() {
                sql.push_str(&crate::reviews::supersede_sql(&mut next));
                sql.push_str(";\n");
            }
        }
    }

    // Bound in exactly the order the placeholders were numbered above.
    let now = now_ms();
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).persistent(rows.len() == 1);
    for ((decision, reasoning, review), review_id) in rows.iter().zip(&review_ids) {
        query = bind(query, decision_values(decision));
        for (hash, name) in policy_links(decision) {
            query = query.bind(&decision.id).bind(hash).bind(name);
        }
        if let Some(reasoning) = reasoning.filter(|r| !r.is_empty()) {
            query = query.bind(&decision.id).bind(to_json(&reasoning));
        }
        if let (Some(review), Some(id)) = (review, review_id) {
            query = crate::reviews::bind_review(query, id, review, now);
            if let Some(appealed) = crate::reviews::superseded_by(decision, review) {
                query = crate::reviews::bind_supersede(query, id, appealed, now);
            }
        }
    }

    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    // A failed statement leaves the transaction open; dropping `tx` on the way out rolls it back.
    query.execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(review_ids)
}

enum Arg {
    Text(String),
    Int(i64),
}

/// The values bound to a listing query: placeholder `$n` is the n-th.
#[derive(Default)]
struct Args(Vec<Arg>);

impl Args {
    fn bind(&mut self, arg: Arg) -> String {
        self.0.push(arg);
        format!("${}", self.0.len())
    }
}

/// [`Store::list_decisions`]' query and its values.
fn list_decisions_sql(filter: &DecisionFilter) -> (String, Args) {
    let mut args = Args::default();
    if let Some(policy) = &filter.policy {
        let sql = policy_decisions_sql(policy, filter, &mut args);
        return (sql, args);
    }
    let mut conditions: Vec<String> = Vec::new();
    if let Some(outcome) = &filter.outcome {
        conditions.push(format!("outcome = {}", args.bind(Arg::Text(outcome.clone()))));
    }
    if let Some(since) = filter.since {
        conditions.push(format!("created_at >= {}", args.bind(Arg::Int(since))));
    }
    match (filter.before, &filter.before_id) {
        (Some(before), Some(before_id)) => {
            let (at, id) = (args.bind(Arg::Int(before)), args.bind(Arg::Text(before_id.clone())));
            // `created_at <= at` on its own is where the time index's read starts; the keyset's OR alone is a
            // filter, and a page deep in the history would read every newer decision first.
            conditions.push(format!("created_at <= {at} AND (created_at < {at} OR (created_at = {at} AND id < {id}))"));
        }
        (Some(before), None) => conditions.push(format!("created_at < {}", args.bind(Arg::Int(before)))),
        (None, _) => {}
    }
    let where_clause =
        if conditions.is_empty() { String::new() } else { format!("WHERE {}", conditions.join(" AND ")) };
    let limit = args.bind(Arg::Int(filter.limit.clamp(1, 1000)));
    (format!("SELECT {COLUMNS} FROM decisions {where_clause} ORDER BY created_at DESC, id DESC LIMIT {limit}"), args)
}

/// One page of a policy's decisions, read from the link indexes `(policy_name | policy_hash, created_at,
/// decision_id)` newest first: each of the two reads stops after a page of matches, so a page costs about its own
/// size however many decisions the policy has. (Gathering all of the policy's links and sorting their decisions,
/// as before, cost that on every page.) The time, cursor and outcome filters apply inside each read, or a read
/// that stopped at a page of links could hold fewer matches than the page needs.
fn policy_decisions_sql(policy: &str, filter: &DecisionFilter, args: &mut Args) -> String {
    let policy = args.bind(Arg::Text(policy.to_string()));
    let mut conditions = String::new();
    if let Some(since) = filter.since {
        conditions += &format!(" AND dp.created_at >= {}", args.bind(Arg::Int(since)));
    }
    match (filter.before, &filter.before_id) {
        (Some(before), Some(before_id)) => {
            // As a row value, the cursor is where the index read starts; as `<` OR `=` it would be a filter on
            // everything newer than the page.
            let (at, id) = (args.bind(Arg::Int(before)), args.bind(Arg::Text(before_id.clone())));
            conditions += &format!(" AND (dp.created_at, dp.decision_id) < ({at}, {id})");
        }
        (Some(before), None) => conditions += &format!(" AND dp.created_at < {}", args.bind(Arg::Int(before))),
        (None, _) => {}
    }
    if let Some(outcome) = &filter.outcome {
        let outcome = args.bind(Arg::Text(outcome.clone()));
        conditions +=
            &format!(" AND EXISTS (SELECT 1 FROM decisions d WHERE d.id = dp.decision_id AND d.outcome = {outcome})");
    }
    let limit = args.bind(Arg::Int(filter.limit.clamp(1, 1000)));
    // A decision that names two versions of one policy has two links under its name, next to each other in the
    // index: counted twice, they would push a later decision out of the page.
    let read = |column: &str, distinct: &str| {
        format!(
            "SELECT decision_id, link_at FROM (SELECT {distinct}dp.decision_id, dp.created_at AS link_at \
             FROM decision_policies dp WHERE dp.{column} = {policy}{conditions} \
             ORDER BY dp.created_at DESC, dp.decision_id DESC LIMIT {limit}) by_{column}"
        )
    };
    // UNION: a decision found by both name and hash (a name that is also a hash) is listed once.
    format!(
        "SELECT {COLUMNS} FROM ({} UNION {}) page JOIN decisions ON decisions.id = page.decision_id \
         ORDER BY page.link_at DESC, page.decision_id DESC LIMIT {limit}",
        read("policy_name", "DISTINCT "),
        read("policy_hash", "")
    )
}

/// A decision, its chain of thought and the review it needs, as [`Store::insert_decisions_together`] takes them.
pub type DecisionToStore<'a> = (&'a DecisionRecord, Option<&'a [String]>, Option<&'a NewReview>);

impl Store {
    /// Stores a decision and (separately) its reasoning, atomically, and returns once they are committed.
    /// Concurrent inserts share a transaction ([`GroupCommit`](crate::GroupCommit)).
    #[tracing::instrument(skip_all, fields(id = %decision.id, outcome = %decision.outcome))]
    pub async fn insert_decision(&self, decision: &DecisionRecord, reasoning: Option<&[String]>) -> Result<()> {
        self.decision_writer.insert(&self.pool, decision, reasoning).await
    }

    /// Stores a decision and the review that puts it before a person in one transaction, and returns the review's
    /// id. Two writes would let a store error between them leave an item meant for a person in the log with
    /// nobody asked to settle it. Group commit is not used: items for a person are the few.
    pub async fn insert_decision_with_review(
        &self,
        decision: &DecisionRecord,
        reasoning: Option<&[String]>,
        review: &NewReview,
    ) -> Result<String> {
        let ids = self.insert_decisions_together(&[(decision, reasoning, Some(review))]).await?;
        ids.into_iter().flatten().next().ok_or(StoreError::Db(sqlx::Error::RowNotFound))
    }

    /// Stores several decisions, each with its review if it has one, all or none (one transaction): a batch
    /// answered with an error has stored nothing, so the caller's retry does not queue its items twice. Returns
    /// each review's id, in order.
    pub async fn insert_decisions_together(&self, rows: &[DecisionToStore<'_>]) -> Result<Vec<Option<String>>> {
        if self.backend == crate::Backend::Sqlite {
            // One multi-statement query: the write lock is held for one round trip, not one per statement.
            return insert_rows_sqlite(&mut self.pool.acquire().await?, rows).await;
        }
        let now = now_ms();
        let mut tx = self.begin_read_committed().await?;
        let mut review_ids = Vec::with_capacity(rows.len());
        for (decision, reasoning, review) in rows {
            insert_decision_tx(&mut tx, decision, *reasoning).await?;
            review_ids.push(match review {
                Some(review) => Some(insert_review_tx(&mut tx, decision, review, now).await?),
                None => None,
            });
        }
        tx.commit().await?;
        Ok(review_ids)
    }

    pub async fn get_decision(&self, id: &str) -> Result<Option<DecisionRecord>> {
        let row = sqlx::query(sql!("SELECT {COLUMNS} FROM decisions WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(row_to_decision).transpose()
    }

    /// Stores a decision's chain of thought if it has none yet; one already stored is kept. For a decision
    /// stored first from a copy without its reasoning (another worker's, from the NATS ledger), when the
    /// worker that reasoned stores it too.
    pub async fn add_missing_reasoning(&self, decision_id: &str, reasoning: &[String]) -> Result<()> {
        if reasoning.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO decision_reasoning (decision_id, reasoning) VALUES ($1, $2) ON CONFLICT (decision_id) DO NOTHING",
        )
        .bind(decision_id)
        .bind(to_json(&reasoning))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The chain of thought behind a decision; callers must check the audit scope first.
    pub async fn get_reasoning(&self, decision_id: &str) -> Result<Option<Vec<String>>> {
        let row = sqlx::query("SELECT reasoning FROM decision_reasoning WHERE decision_id = $1")
            .bind(decision_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| from_json(&r.try_get::<String, _>("reasoning")?, "decision_reasoning.reasoning")).transpose()
    }

    /// Decisions matching the filter, newest first.
    pub async fn list_decisions(&self, filter: &DecisionFilter) -> Result<Vec<DecisionRecord>> {
        let (sql, args) = list_decisions_sql(filter);
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for arg in args.0 {
            query = match arg {
                Arg::Text(text) => query.bind(text),
                Arg::Int(number) => query.bind(number),
            };
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(row_to_decision).collect()
    }

    /// Queues a decision for human review (the review workflow itself lives elsewhere). A decision already
    /// queued keeps its review, whose id is returned: reviews are unique per decision and kind.
    pub async fn enqueue_review(&self, decision_id: &str, priority: i64) -> Result<String> {
        sqlx::query(
            "INSERT INTO reviews (id, decision_id, status, priority, created_at) VALUES ($1, $2, 'pending', $3, $4) \
             ON CONFLICT (decision_id, kind) DO NOTHING",
        )
        .bind(crate::new_id())
        .bind(decision_id)
        .bind(priority)
        .bind(crate::now_ms())
        .execute(&self.pool)
        .await?;
        let row = sqlx::query("SELECT id FROM reviews WHERE decision_id = $1 AND kind = 'review'")
            .bind(decision_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("id")?)
    }

    pub async fn count_reviews(&self, status: &str) -> Result<i64> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM reviews WHERE status = $1")
            .bind(status)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>("n")?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page of one policy's decisions is read from the link indexes in order, with every filter applied there:
    /// nothing reads all of the policy's links or sorts them (only the page's own few rows are sorted).
    #[tokio::test]
    async fn a_policy_page_reads_the_link_indexes_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("plan.db")).await.unwrap();
        let filters = [
            DecisionFilter { policy: Some("spam".into()), limit: 50, ..DecisionFilter::default() },
            DecisionFilter {
                policy: Some("spam".into()),
                outcome: Some("block".into()),
                since: Some(1),
                before: Some(2),
                before_id: Some("x".into()),
                limit: 50,
            },
        ];
        for filter in filters {
            let (sql, _) = list_decisions_sql(&filter);
            let plan = crate::tests::query_plan(&store, &sql).await;
            for index in ["decision_policies_by_name_time", "decision_policies_by_hash_time"] {
                let read = format!("SEARCH dp USING COVERING INDEX {index}");
                assert!(plan.iter().any(|step| step.starts_with(&read)), "{index}: {plan:#?}");
            }
            if filter.before_id.is_some() {
                let cursor = plan.iter().filter(|step| step.contains("(created_at,decision_id)<(?,?)"));
                assert_eq!(cursor.count(), 2, "the cursor is where each read starts: {plan:#?}");
            }
            // Only the reads' own results are scanned; the decisions are read by key.
            let subqueries = ["SCAN by_policy_name", "SCAN by_policy_hash", "SCAN page"];
            let scans = plan.iter().filter(|step| step.starts_with("SCAN") && !subqueries.contains(&step.as_str()));
            assert_eq!(scans.count(), 0, "{plan:#?}");
            assert!(plan.iter().all(|step| !step.contains("FOR DISTINCT")), "{plan:#?}");
            let sorts = plan.iter().filter(|step| step.contains("TEMP B-TREE FOR ORDER BY"));
            assert_eq!(sorts.count(), 1, "only the page itself is sorted: {plan:#?}");
        }
        store.close().await;
    }
}

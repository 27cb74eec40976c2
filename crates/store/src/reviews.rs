//! The human review queue: items the cascade could not settle, and appeals. A person's decision needs a
//! rationale and the rule it applies; whether it overrides the model is recorded for agreement metrics.

use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use crate::{DecisionRecord, Result, Store, StoreError, now_ms};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReviewRecord {
    pub id: String,
    pub decision_id: String,
    /// "pending" or "decided".
    pub status: String,
    /// "review" (the cascade could not settle it), "appeal", or an active-learning draw: "sample" (triage and the
    /// model disagreed, or were unsure) or "audit" (a uniform share of what triage settled alone).
    pub kind: String,
    /// Higher first.
    pub priority: i64,
    pub reason: Option<String>,
    pub created_at: i64,
    /// When the SLA says it must be decided (unix ms).
    pub due_at: Option<i64>,
    pub reviewer: Option<String>,
    pub rationale: Option<String>,
    pub rule_id: Option<String>,
    pub policy_hash: Option<String>,
    /// The person's outcome: "allow" or "violation".
    pub outcome: Option<String>,
    /// Whether the person's outcome differs from the model's; `None` when the model gave no answer.
    pub overrides_model: Option<bool>,
    pub decided_at: Option<i64>,
    /// Who is working the item ([`Store::claim_review`]; an API key's id) and until when (unix ms). A claim past
    /// its time holds nothing.
    pub claimed_by: Option<String>,
    pub claimed_until: Option<i64>,
}

impl ReviewRecord {
    /// Who holds the item at `now`, if anyone: a pending review's live claim.
    pub fn claim_holder(&self, now: i64) -> Option<&str> {
        (self.status == "pending" && self.claimed_until.is_some_and(|until| until > now))
            .then_some(self.claimed_by.as_deref())
            .flatten()
    }
}

#[derive(Debug, Clone)]
pub struct NewReview {
    pub decision_id: String,
    pub kind: String,
    pub priority: i64,
    pub reason: Option<String>,
    /// How long the SLA gives a person, from now.
    pub sla_ms: Option<i64>,
    /// The one policy version the review is about, where it is about one: an audit of a policy triage settled.
    /// The person's answer must then apply that policy's rules (the decision records it here again).
    pub policy_hash: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ReviewDecision {
    pub reviewer: String,
    pub outcome: String,
    pub rationale: String,
    pub rule_id: String,
    pub policy_hash: Option<String>,
    /// `None` when the model gave no answer to agree or disagree with (it left the item undecided).
    pub overrides_model: Option<bool>,
}

/// The queue, and reviewer agreement with the model over decided reviews. Audits of triage are counted apart:
/// a person overturning what triage settled says nothing of the model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ReviewStats {
    /// Pending reviews of every kind, audits included.
    pub pending: i64,
    pub overdue: i64,
    /// Decided reviews, audits left out.
    pub decided: i64,
    pub overrides: i64,
    /// Decided reviews of items the model left undecided: neither agreements nor overrides.
    #[serde(default)]
    pub model_undecided: i64,
    /// Decided audits of what triage settled alone, and of those, how many the person decided the other way.
    #[serde(default)]
    pub audits_decided: i64,
    #[serde(default)]
    pub audits_overturned: i64,
}

/// The most reviews one listing returns ([`Store::list_reviews`], [`Store::list_settled_reviews`]).
pub const MAX_REVIEW_PAGE: i64 = 1000;

pub(crate) const COLUMNS: &str = "id, decision_id, status, kind, priority, reason, created_at, due_at, reviewer, rationale, rule_id, \
    policy_hash, outcome, overrides_model, decided_at, claimed_by, claimed_until";

/// The row of review `id`, read through `executor`: the pool, or a transaction that must see its own writes.
async fn review_row<'e, 'c: 'e, E>(executor: E, id: &'e str) -> Result<Option<AnyRow>>
where
    E: 'e + sqlx::Executor<'c, Database = Any>,
{
    Ok(sqlx::query(sql!("SELECT {COLUMNS} FROM reviews WHERE id = $1")).bind(id).fetch_optional(executor).await?)
}

pub(crate) fn row_to_review(row: &AnyRow) -> Result<ReviewRecord> {
    Ok(ReviewRecord {
        id: row.try_get("id")?,
        decision_id: row.try_get("decision_id")?,
        status: row.try_get("status")?,
        kind: row.try_get("kind")?,
        priority: row.try_get("priority")?,
        reason: row.try_get("reason")?,
        created_at: row.try_get("created_at")?,
        due_at: row.try_get("due_at")?,
        reviewer: row.try_get("reviewer")?,
        rationale: row.try_get("rationale")?,
        rule_id: row.try_get("rule_id")?,
        policy_hash: row.try_get("policy_hash")?,
        outcome: row.try_get("outcome")?,
        // Stored as 0/1: booleans do not travel the same way through both drivers.
        overrides_model: row.try_get::<Option<i64>, _>("overrides_model")?.map(|v| v != 0),
        decided_at: row.try_get("decided_at")?,
        claimed_by: row.try_get("claimed_by")?,
        claimed_until: row.try_get("claimed_until")?,
    })
}

/// Whether the review in the `reviews` row at hand is one the bus must hear of: a review or an appeal (an
/// active-learning sample changes nothing a producer was told) of a decision on an item that came in over NATS,
/// or of an appeal made over HTTP of such a decision. What the server's `bus_origins` (`ingest.rs`) publishes for;
/// migration 0006 spells the same test out. Each decision is found by primary key, so the test never scans them.
const ANNOUNCEABLE: &str = "reviews.kind IN ('review', 'appeal') AND EXISTS (SELECT 1 FROM decisions d \
    WHERE d.id = reviews.decision_id AND (d.source LIKE 'nats:%' OR (d.source = 'appeal' AND EXISTS \
      (SELECT 1 FROM decisions o WHERE o.id = d.replay_of AND o.source LIKE 'nats:%'))))";

/// [`Store::reviews_to_announce`]'s query; binds the limit.
fn to_announce_sql() -> String {
    format!(
        "SELECT {COLUMNS} FROM reviews WHERE status = 'decided' AND announced_at IS NULL AND {ANNOUNCEABLE} \
         ORDER BY decided_at LIMIT $1"
    )
}

/// The statement that queues one review, numbering its parameters from `next` on (see [`bind_review`]).
pub(crate) fn insert_review_sql(next: &mut usize) -> String {
    let n = *next;
    *next += 8;
    format!(
        "INSERT INTO reviews (id, decision_id, status, kind, priority, reason, created_at, due_at, policy_hash) \
         VALUES (${n}, ${}, 'pending', ${}, ${}, ${}, ${}, ${}, ${})",
        n + 1,
        n + 2,
        n + 3,
        n + 4,
        n + 5,
        n + 6,
        n + 7
    )
}

/// Binds a review's values in the order [`insert_review_sql`] numbers them.
pub(crate) fn bind_review<'q>(
    query: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments>,
    id: &'q str,
    review: &'q NewReview,
    now: i64,
) -> sqlx::query::Query<'q, Any, sqlx::any::AnyArguments> {
    query
        .bind(id)
        .bind(&review.decision_id)
        .bind(&review.kind)
        .bind(review.priority)
        .bind(&review.reason)
        .bind(now)
        .bind(review.sla_ms.map(|ms| now + ms))
        .bind(&review.policy_hash)
}

/// The decision whose pending reviews `review` supersedes: an appeal's review supersedes those of the decision
/// it appeals (`replay_of`), however the appeal came in (HTTP or the bus). A person answering the appeal sees the
/// item again at high effort, with the reason it was appealed; an older review of the same decision still
/// pending would let a second, less informed answer overrule the appeal's (announced last, exported as the
/// later correction).
pub(crate) fn superseded_by<'a>(decision: &'a DecisionRecord, review: &NewReview) -> Option<&'a str> {
    if review.kind == "appeal" { decision.replay_of.as_deref() } else { None }
}

/// The statement that marks an appealed decision's pending reviews `superseded`, numbering its parameters from
/// `next` on (see [`bind_supersede`]).
pub(crate) fn supersede_sql(next: &mut usize) -> String {
    let n = *next;
    *next += 3;
    format!(
        "UPDATE reviews SET status = 'superseded', decided_at = ${n}, rationale = ${} \
         WHERE decision_id = ${} AND status = 'pending'",
        n + 1,
        n + 2
    )
}

/// Binds in the order [`supersede_sql`] numbers them: when, the appeal's review, the decision appealed.
pub(crate) fn bind_supersede<'q>(
    query: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments>,
    appeal_review_id: &str,
    appealed: &'q str,
    now: i64,
) -> sqlx::query::Query<'q, Any, sqlx::any::AnyArguments> {
    query.bind(now).bind(format!("superseded by appeal review {appeal_review_id}")).bind(appealed)
}

/// Inserts a pending review inside a caller's transaction, so that a decision and the review it needs are
/// stored together or not at all, and supersedes what the review supersedes ([`superseded_by`]). Returns the
/// review's id.
pub(crate) async fn insert_review_tx(
    tx: &mut Transaction<'static, Any>,
    decision: &DecisionRecord,
    review: &NewReview,
    now: i64,
) -> Result<String> {
    let id = crate::new_id();
    let sql = insert_review_sql(&mut 1);
    bind_review(sqlx::query(sqlx::AssertSqlSafe(sql)), &id, review, now).execute(&mut **tx).await?;
    if let Some(appealed) = superseded_by(decision, review) {
        let sql = supersede_sql(&mut 1);
        bind_supersede(sqlx::query(sqlx::AssertSqlSafe(sql)), &id, appealed, now).execute(&mut **tx).await?;
    }
    Ok(id)
}

/// The review a decision has in the queue for one kind.
#[derive(Debug, Clone)]
pub struct QueuedReview {
    pub review: ReviewRecord,
    /// False when the decision had this kind of review already (queued again by a redelivery or a retry).
    pub fresh: bool,
}

/// The appeal review of an appeal of `original`: the review of kind `appeal` whose decision is an appeal
/// re-running `original` (`replay_of`), made over HTTP (`source = 'appeal'`) or on the bus (`nats:…`). Reviews
/// are few beside decisions, and each is matched to its decision by primary key, so this never scans the
/// decisions.
async fn find_appeal<'e, E>(executor: E, original: &str) -> Result<Option<ReviewRecord>>
where
    E: sqlx::Executor<'e, Database = Any>,
{
    let row = sqlx::query(sql!(
        "SELECT {COLUMNS} FROM reviews WHERE kind = 'appeal' AND EXISTS (SELECT 1 FROM decisions d \
           WHERE d.id = reviews.decision_id AND (d.source = 'appeal' OR d.source LIKE 'nats:%') \
             AND d.replay_of = $1) \
         ORDER BY created_at, id LIMIT 1"
    ))
    .bind(original)
    .fetch_optional(executor)
    .await?;
    row.as_ref().map(row_to_review).transpose()
}

impl Store {
    /// Queues a decision for a person. One review per decision and kind: queuing again returns the existing
    /// one, pending or decided, so that storing a decision again (a redelivered event) never asks a person to
    /// decide what a person already decided.
    ///
    /// The unique index on (decision_id, kind) settles races: two workers storing the same decision at once
    /// both insert, one insert does nothing, and both read back the one row.
    pub async fn queue_review(&self, review: &NewReview) -> Result<QueuedReview> {
        let sql = format!("{} ON CONFLICT (decision_id, kind) DO NOTHING", insert_review_sql(&mut 1));
        let id = crate::new_id();
        let inserted =
            bind_review(sqlx::query(sqlx::AssertSqlSafe(sql)), &id, review, now_ms()).execute(&self.pool).await?;
        let stored = self.review_of(&review.decision_id, &review.kind).await?;
        let review = stored.ok_or(StoreError::Db(sqlx::Error::RowNotFound))?;
        Ok(QueuedReview { review, fresh: inserted.rows_affected() > 0 })
    }

    /// A decision's review of one kind (`review`, `sample`, `appeal`), if it has one: there is at most one.
    pub async fn review_of(&self, decision_id: &str, kind: &str) -> Result<Option<ReviewRecord>> {
        let row = sqlx::query(sql!("SELECT {COLUMNS} FROM reviews WHERE decision_id = $1 AND kind = $2"))
            .bind(decision_id)
            .bind(kind)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(row_to_review).transpose()
    }

    pub async fn get_review(&self, id: &str) -> Result<Option<ReviewRecord>> {
        review_row(&self.pool, id).await?.as_ref().map(row_to_review).transpose()
    }

    /// The queue in working order: pending reviews past their SLA first, the longest overdue first; then highest
    /// priority, the earliest deadline, the oldest. Priority alone would keep an overdue item waiting behind every
    /// new item of a higher priority, its promise broken further by each.
    pub async fn list_reviews(&self, status: &str, limit: i64) -> Result<Vec<ReviewRecord>> {
        let rows = sqlx::query(sql!(
            "SELECT {COLUMNS} FROM reviews WHERE status = $1 \
             ORDER BY CASE WHEN status = 'pending' AND due_at < $3 THEN due_at END NULLS LAST, \
               priority DESC, CASE WHEN due_at IS NULL THEN 1 ELSE 0 END, due_at, created_at LIMIT $2"
        ))
        .bind(status)
        .bind(limit.clamp(1, MAX_REVIEW_PAGE))
        .bind(now_ms())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(row_to_review).collect()
    }

    /// Holds pending review `id` for `claimant` until `until` (unix ms), unless someone else's claim on it is still
    /// live at `now`: a reviewer working an item, so that others are moved past it instead of writing a rationale
    /// for an item they will be refused. Claiming again renews one's own claim. Returns the review as it stands
    /// after the attempt (`claim_holder` says who holds it), or `None` if there is no such review.
    pub async fn claim_review(&self, id: &str, claimant: &str, until: i64, now: i64) -> Result<Option<ReviewRecord>> {
        sqlx::query(
            "UPDATE reviews SET claimed_by = $1, claimed_until = $2 WHERE id = $3 AND status = 'pending' \
             AND (claimed_by IS NULL OR claimed_by = $1 OR claimed_until IS NULL OR claimed_until <= $4)",
        )
        .bind(claimant)
        .bind(until)
        .bind(id)
        .bind(now)
        .execute(&self.pool)
        .await?;
        self.get_review(id).await
    }

    /// Reviews people answered (`decided`) or an appeal set aside (`superseded`), the latest first, a page at a
    /// time: `before` is the last row's `(decided_at, id)` of the page before. The queue's order (priority first)
    /// with a row cap would keep every answer past the first thousand out of reach.
    pub async fn list_settled_reviews(
        &self,
        status: &str,
        before: Option<(i64, &str)>,
        limit: i64,
    ) -> Result<Vec<ReviewRecord>> {
        // The first page starts past every row: no decided_at reaches i64::MAX.
        let (at, id) = before.unwrap_or((i64::MAX, ""));
        // (`decided_at <= $2` alone starts PostgreSQL's index scan at the cursor; the OR does not.)
        let rows = sqlx::query(sql!(
            "SELECT {COLUMNS} FROM reviews WHERE status = $1 AND decided_at <= $2 \
             AND (decided_at < $2 OR id < $3) ORDER BY decided_at DESC, id DESC LIMIT $4"
        ))
        .bind(status)
        .bind(at)
        .bind(id)
        .bind(limit.clamp(1, MAX_REVIEW_PAGE))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(row_to_review).collect()
    }

    /// Records a person's decision once; `Ok(None)` if the review is unknown, was already decided, or was
    /// superseded by an appeal of its decision.
    ///
    /// A review nobody on the bus waits for is marked announced in the same statement, so that only those still
    /// to be published stay in [`reviews_to_announce`](Self::reviews_to_announce)'s index: left unmarked, every
    /// review decided over HTTP would be read again by every sweep, for good.
    pub async fn decide_review(&self, id: &str, decision: &ReviewDecision) -> Result<Option<ReviewRecord>> {
        self.decide_review_and_deliver(id, decision, now_ms(), None, None).await
    }

    /// [`decide_review`](Self::decide_review) at `decided_at`, queueing `delivery` (a job's webhook hearing the
    /// answer) in the same transaction: a review is never decided without its job's client being told, nor told
    /// of a decision that was not made.
    ///
    /// `decider` is the deciding key: a review another key holds by a claim live at `decided_at` is not decided
    /// (`Ok(None)`, as for one decided already). The claim is checked in the statement that decides, so that one
    /// granted while the caller was checking the rule and the policies still holds. `None` decides whoever holds
    /// it (a lead taking an item over).
    pub async fn decide_review_and_deliver(
        &self,
        id: &str,
        decision: &ReviewDecision,
        decided_at: i64,
        delivery: Option<&crate::NewDelivery>,
        decider: Option<&str>,
    ) -> Result<Option<ReviewRecord>> {
        let mut tx = self.begin_locking().await?;
        let updated = sqlx::query(sql!(
            "UPDATE reviews SET status = 'decided', reviewer = $1, outcome = $2, rationale = $3, rule_id = $4, \
             policy_hash = $5, overrides_model = $6, decided_at = $7, \
             announced_at = CASE WHEN {ANNOUNCEABLE} THEN NULL ELSE $7 END \
             WHERE id = $8 AND status = 'pending' \
             AND ($9 IS NULL OR claimed_by IS NULL OR claimed_by = $9 OR claimed_until IS NULL OR claimed_until <= $7)"
        ))
        .bind(&decision.reviewer)
        .bind(&decision.outcome)
        .bind(&decision.rationale)
        .bind(&decision.rule_id)
        .bind(&decision.policy_hash)
        .bind(decision.overrides_model.map(i64::from))
        .bind(decided_at)
        .bind(id)
        .bind(decider)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(None);
        }
        if let Some(delivery) = delivery {
            crate::webhooks::insert_delivery_tx(&mut tx, self.backend, delivery, decided_at).await?;
        }
        // Read before the commit: read after it, a failure would report a decision that was made as not made, and
        // the person's retry would be refused as a decision already taken. Decoded after it: a row this version
        // cannot decode must not stop a person's decision.
        let row = review_row(&mut *tx, id).await?;
        tx.commit().await?;
        row.as_ref().map(row_to_review).transpose()
    }

    /// Decided reviews and appeals of decisions that came in over NATS whose outcome has not been published yet,
    /// oldest first: the outbox that makes sure a producer holding an item hears what a person decided.
    ///
    /// Read through the partial index `reviews_unannounced` (migration 0006), which holds only decided reviews
    /// not yet marked: those of bus items, since [`decide_review`](Self::decide_review) marks the rest. A sweep
    /// costs what is waiting to be published, not the size of the decisions table; the decision of each review
    /// is checked by primary key (`ANNOUNCEABLE`), for reviews decided by a server from before that migration.
    pub async fn reviews_to_announce(&self, limit: i64) -> Result<Vec<ReviewRecord>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(to_announce_sql()))
            .bind(limit.clamp(1, 1000))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(row_to_review).collect()
    }

    /// Records that a review's outcome was published.
    pub async fn mark_review_announced(&self, id: &str) -> Result<()> {
        sqlx::query("UPDATE reviews SET announced_at = $1 WHERE id = $2 AND announced_at IS NULL")
            .bind(now_ms())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The appeal already made of decision `original`, if any (pending or decided): its review, whose
    /// `decision_id` is the appeal's decision. An appeal that a later appeal of its own decision set aside (a
    /// chain, stored before an appeal's decision counted as its item's) answers with the appeal at the chain's
    /// end: the one a person answers.
    pub async fn appeal_of(&self, original: &str) -> Result<Option<ReviewRecord>> {
        match find_appeal(&self.pool, original).await? {
            Some(appeal) => self.live_appeal(appeal).await.map(Some),
            None => Ok(None),
        }
    }

    /// `appeal`, or, if a later appeal of its own decision set it aside, the appeal at the end of that chain.
    async fn live_appeal(&self, mut appeal: ReviewRecord) -> Result<ReviewRecord> {
        // Bounded: each step goes to a newer appeal, but a hand-edited database could hold a loop.
        for _ in 0..16 {
            if appeal.status != "superseded" {
                break;
            }
            match find_appeal(&self.pool, &appeal.decision_id).await? {
                Some(later) => appeal = later,
                None => break,
            }
        }
        Ok(appeal)
    }

    /// Stores an appeal's decision (`decision.replay_of` names the decision appealed) with its review, and marks
    /// the appealed decision's reviews still pending `superseded` (the appeal is the one a person answers), unless
    /// that decision has an appeal already: then nothing is stored and the existing appeal's review comes back
    /// with `fresh: false`. A client that retries an appeal whose reply it never got (a proxy's timeout while the
    /// model was still reasoning) must not queue the item twice. Concurrent appeals of one decision are settled
    /// by a lock: SQLite's write lock, taken when the transaction begins, or on PostgreSQL the appealed
    /// decision's row. A decision without `replay_of` has nothing to be keyed on and is always stored.
    pub async fn insert_appeal(
        &self,
        decision: &DecisionRecord,
        reasoning: Option<&[String]>,
        review: &NewReview,
    ) -> Result<QueuedReview> {
        let mut tx = self.begin_locking().await?;
        if let Some(original) = decision.replay_of.as_deref() {
            // Pruned while the appeal was being reasoned (it was read before): an appeal of nothing is refused,
            // not stored pointing nowhere.
            if !self.lock_decision(&mut tx, original).await? {
                tx.rollback().await?;
                return Err(StoreError::DecisionNotFound(original.to_string()));
            }
            if let Some(existing) = find_appeal(&mut *tx, original).await? {
                tx.rollback().await?;
                // The live end of an old chain, as `appeal_of` answers.
                return Ok(QueuedReview { review: self.live_appeal(existing).await?, fresh: false });
            }
        }
        crate::decisions::insert_decision_tx(&mut tx, decision, reasoning).await?;
        let now = now_ms();
        let id = insert_review_tx(&mut tx, decision, review, now).await?;
        tx.commit().await?;
        let review = self.get_review(&id).await?.ok_or(StoreError::Db(sqlx::Error::RowNotFound))?;
        Ok(QueuedReview { review, fresh: true })
    }

    /// Stores a replay (`decision.replay_of` names the decision re-run) unless that decision went while the
    /// replay was reasoned: stored then, it would point nowhere. Locked as [`insert_appeal`](Self::insert_appeal)
    /// is, so a prune either sees the replay and keeps what it names, or deletes that first and the replay is
    /// refused (`DecisionNotFound`).
    pub async fn insert_replay(&self, decision: &DecisionRecord, reasoning: Option<&[String]>) -> Result<()> {
        let mut tx = self.begin_locking().await?;
        if let Some(original) = decision.replay_of.as_deref()
            && !self.lock_decision(&mut tx, original).await?
        {
            tx.rollback().await?;
            return Err(StoreError::DecisionNotFound(original.to_string()));
        }
        crate::decisions::insert_decision_tx(&mut tx, decision, reasoning).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Whether decision `id` is still stored, locking its row against a prune on PostgreSQL until the transaction
    /// ends (on SQLite the transaction holds the write lock already).
    async fn lock_decision(&self, tx: &mut Transaction<'static, Any>, id: &str) -> Result<bool> {
        let lock = if self.backend == crate::Backend::Postgres { "FOR UPDATE" } else { "" };
        let found = sqlx::query(sql!("SELECT id FROM decisions WHERE id = $1 {lock}"))
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?;
        Ok(found.is_some())
    }

    pub async fn review_stats(&self) -> Result<ReviewStats> {
        let now = now_ms();
        let row = sqlx::query(
            "SELECT \
               SUM(CASE WHEN status = 'pending' THEN 1 ELSE 0 END) AS pending, \
               SUM(CASE WHEN status = 'pending' AND due_at IS NOT NULL AND due_at < $1 THEN 1 ELSE 0 END) AS overdue, \
               SUM(CASE WHEN status = 'decided' AND kind <> 'audit' THEN 1 ELSE 0 END) AS decided, \
               SUM(CASE WHEN status = 'decided' AND kind <> 'audit' AND overrides_model = 1 THEN 1 ELSE 0 END) \
                 AS overrides, \
               SUM(CASE WHEN status = 'decided' AND kind <> 'audit' AND overrides_model IS NULL THEN 1 ELSE 0 END) \
                 AS model_undecided, \
               SUM(CASE WHEN status = 'decided' AND kind = 'audit' THEN 1 ELSE 0 END) AS audits_decided, \
               SUM(CASE WHEN status = 'decided' AND kind = 'audit' AND overrides_model = 1 THEN 1 ELSE 0 END) \
                 AS audits_overturned \
             FROM reviews",
        )
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        let get = |name: &str| -> Result<i64> { Ok(row.try_get::<Option<i64>, _>(name)?.unwrap_or(0)) };
        Ok(ReviewStats {
            pending: get("pending")?,
            overdue: get("overdue")?,
            decided: get("decided")?,
            overrides: get("overrides")?,
            model_undecided: get("model_undecided")?,
            audits_decided: get("audits_decided")?,
            audits_overturned: get("audits_overturned")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The announcer's sweep reads its partial index, in order, and each review's decision by primary key: its
    /// cost is what waits to be published, whatever the size of the decisions table.
    #[tokio::test]
    async fn the_sweep_reads_no_decisions_but_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("plan.db")).await.unwrap();
        let plan = crate::tests::query_plan(&store, &to_announce_sql()).await;
        assert!(
            plan.iter().any(|step| step.starts_with("SEARCH reviews USING INDEX reviews_unannounced")),
            "{plan:#?}"
        );
        // Nothing is read whole: not the reviews, not the decisions (`d`, `o`).
        assert!(!plan.iter().any(|step| step.starts_with("SCAN")), "{plan:#?}");
        assert!(!plan.iter().any(|step| step.contains("TEMP B-TREE")), "read in index order: {plan:#?}");
        let lookups = plan.iter().filter(|step| step.contains("USING INDEX sqlite_autoindex_decisions_1 (id=?)"));
        assert_eq!(lookups.count(), 2, "the decision and the one it appeals, by key: {plan:#?}");
        store.close().await;
    }
}

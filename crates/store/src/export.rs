//! Whole-table reads for dataset export: unlike the listing methods they are not capped, because an export
//! that silently stops at a page size would train on a biased sample.

use sqlx::Row;

use crate::{DecisionRecord, Result, ReviewRecord, Store};

impl Store {
    /// Every decided review with the decision it judged, for decisions made at or after `since` (unix ms),
    /// oldest decision first.
    #[tracing::instrument(skip(self))]
    pub async fn decided_reviews_with_decisions(
        &self,
        since: Option<i64>,
    ) -> Result<Vec<(ReviewRecord, DecisionRecord)>> {
        let rows = sqlx::query(
            // A correction made today of last month's decision is new today: an incremental export must hold it.
            "SELECT r.id AS review_id FROM reviews r JOIN decisions d ON d.id = r.decision_id \
             WHERE r.status = 'decided' AND (d.created_at >= $1 OR r.decided_at >= $1) ORDER BY d.created_at, r.id",
        )
        .bind(since.unwrap_or(i64::MIN))
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let review_id: String = row.try_get("review_id")?;
            // A row deleted between the two reads is simply no longer part of the export.
            let Some(review) = self.get_review(&review_id).await? else { continue };
            let Some(decision) = self.get_decision(&review.decision_id).await? else { continue };
            out.push((review, decision));
        }
        Ok(out)
    }

    /// Every decision made at or after `since` (unix ms), oldest first.
    #[tracing::instrument(skip(self))]
    pub async fn decisions_since(&self, since: Option<i64>) -> Result<Vec<DecisionRecord>> {
        let rows = sqlx::query("SELECT id FROM decisions WHERE created_at >= $1 ORDER BY created_at, id")
            .bind(since.unwrap_or(i64::MIN))
            .fetch_all(&self.pool)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: String = row.try_get("id")?;
            if let Some(decision) = self.get_decision(&id).await? {
                out.push(decision);
            }
        }
        Ok(out)
    }
}

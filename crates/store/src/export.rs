//! Whole-table reads for dataset export: unlike the listing methods they are not capped, because an export
//! that silently stops at a page size would train on a biased sample.

use sqlx::Row;

use crate::decisions::{COLUMNS, row_to_decision};
use crate::{DecisionRecord, Result, ReviewRecord, Store};

/// Decisions read per query by [`Store::decisions_since`].
const EXPORT_PAGE: i64 = 1000;

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

    /// Every decision made at or after `since` (unix ms), oldest first. Read whole, a page at a time (one
    /// query per [`EXPORT_PAGE`] decisions, not one per decision), each page after the last one's
    /// `(created_at, id)`, so that decisions stored meanwhile neither shift nor repeat a page.
    #[tracing::instrument(skip(self))]
    pub async fn decisions_since(&self, since: Option<i64>) -> Result<Vec<DecisionRecord>> {
        let mut out = Vec::new();
        let mut after: (i64, String) = (i64::MIN, String::new());
        loop {
            let rows = sqlx::query(sql!(
                "SELECT {COLUMNS} FROM decisions WHERE created_at >= $1 \
                   AND (created_at > $2 OR (created_at = $2 AND id > $3)) \
                 ORDER BY created_at, id LIMIT $4"
            ))
            .bind(since.unwrap_or(i64::MIN))
            .bind(after.0)
            .bind(&after.1)
            .bind(EXPORT_PAGE)
            .fetch_all(&self.pool)
            .await?;
            let full = rows.len() as i64 == EXPORT_PAGE;
            for row in &rows {
                out.push(row_to_decision(row)?);
            }
            match out.last() {
                Some(last) if full => after = (last.created_at, last.id.clone()),
                _ => return Ok(out),
            }
        }
    }
}

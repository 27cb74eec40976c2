//! Whole-table reads for dataset export, a page at a time. Unlike the listing methods they have no overall cap,
//! because an export that silently stops at a page size would train on a biased sample; and unlike reading the
//! table into memory, they let an export of millions of decisions hold one page at once.
//!
//! Each page starts after the last one's [`ExportCursor`], so rows stored meanwhile neither shift nor repeat a
//! page, and can end at a cursor `through`: an export that reads the same rows twice (once to choose, once to
//! write) reads the same set both times, whatever was stored in between. Each page query also bounds the time
//! column on its own (`>= after`, `<= through`): the keyset's OR alone does not start an index scan at the
//! cursor, and every page would read the table from its start again.

use crate::decisions::{COLUMNS, row_to_decision};
use crate::reviews::{COLUMNS as REVIEW_COLUMNS, row_to_review};
use crate::{DecisionRecord, Result, ReviewRecord, Store};

/// Rows read per query.
const EXPORT_PAGE: i64 = 500;

/// A place in an export's order: a decision's `(created_at, id)`, or a review's `(decided_at, id)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportCursor {
    pub at: i64,
    pub id: String,
}

/// One page of an export read.
#[derive(Debug)]
pub struct ExportPage<T> {
    pub rows: Vec<T>,
    /// Where the next page starts: after the last row this page read (which may not be in `rows`, when it was
    /// deleted between two queries). `None` when the page read nothing.
    pub end: Option<ExportCursor>,
    /// Whether this is the last page: nothing more up to `through`.
    pub last: bool,
}

/// Which rows an export reads: those of `since` (unix ms) or later, up to and including `through`.
#[derive(Debug, Clone, Default)]
pub struct ExportRange {
    pub since: Option<i64>,
    pub through: Option<ExportCursor>,
}

impl ExportRange {
    /// The keyset bounds a page query binds: after `after` (from the start when `None`), up to `through`
    /// (to the end when `None`).
    fn bounds(&self, after: Option<&ExportCursor>) -> (i64, String, i64, String) {
        let (after_at, after_id) = after.map_or((i64::MIN, String::new()), |c| (c.at, c.id.clone()));
        // No row is stamped i64::MAX, so every row is before an open end whatever its id.
        let (through_at, through_id) =
            self.through.as_ref().map_or((i64::MAX, String::new()), |c| (c.at, c.id.clone()));
        (after_at, after_id, through_at, through_id)
    }
}

/// A review counts as of `since` when it was decided then or later, or its decision was made then or later.
const SINCE: &str = "(decided_at >= $1 OR EXISTS (SELECT 1 FROM decisions d \
                     WHERE d.id = reviews.decision_id AND d.created_at >= $1))";

/// Which audits of triage [`Store::audits_page`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditState {
    /// A person answered the audit.
    Decided,
    /// An appeal of the audited decision came first and superseded it: the appeal's answer stands for it.
    Superseded,
}

impl Store {
    /// Decided reviews with the decision each judged, in the order people decided them (`decided_at`, then id,
    /// which breaks ties within a millisecond the same way in every read; a decided review without a
    /// `decided_at`, which only a hand-written row has, is not read):
    /// those decided, or of a decision made, in `range`'s `since` or later (a correction made today of last
    /// month's decision is new today: an incremental export must hold it). The page after `after`.
    #[tracing::instrument(skip(self))]
    pub async fn decided_reviews_page(
        &self,
        range: &ExportRange,
        after: Option<&ExportCursor>,
    ) -> Result<ExportPage<(ReviewRecord, DecisionRecord)>> {
        self.reviews_page(None, range, after).await
    }

    /// Audits of triage (reviews of kind `audit`) in the order of their `decided_at`, with the decision each is
    /// of: those a person answered ([`AuditState::Decided`], bounded by `range` as
    /// [`decided_reviews_page`](Self::decided_reviews_page) bounds its reviews), or those an appeal of their
    /// decision superseded before anyone answered ([`AuditState::Superseded`], ordered by when that happened;
    /// `range.since` is not applied to them, since the appeal's answer, which is what counts, may come later).
    /// Reads only audits, through the same index as the export.
    #[tracing::instrument(skip(self))]
    pub async fn audits_page(
        &self,
        state: AuditState,
        range: &ExportRange,
        after: Option<&ExportCursor>,
    ) -> Result<ExportPage<(ReviewRecord, DecisionRecord)>> {
        self.reviews_page(Some(state), range, after).await
    }

    /// Decided reviews of every kind (`audits: None`), or the audits in one state.
    async fn reviews_page(
        &self,
        audits: Option<AuditState>,
        range: &ExportRange,
        after: Option<&ExportCursor>,
    ) -> Result<ExportPage<(ReviewRecord, DecisionRecord)>> {
        // Fixed strings of this file, never input. Superseded audits take `since` without applying it: every page
        // query binds the same parameters.
        let (status, kind, since) = match audits {
            None => ("decided", "", SINCE),
            Some(AuditState::Decided) => ("decided", "AND kind = 'audit'", SINCE),
            Some(AuditState::Superseded) => ("superseded", "AND kind = 'audit'", "$1 = $1"),
        };
        let rows = self
            .page_rows(
                sql!(
                    "SELECT {REVIEW_COLUMNS} FROM reviews WHERE status = '{status}' {kind} \
               AND decided_at >= $2 AND decided_at <= $4 \
               AND (decided_at > $2 OR (decided_at = $2 AND id > $3)) \
               AND (decided_at < $4 OR (decided_at = $4 AND id <= $5)) \
               AND {since} \
             ORDER BY decided_at, id LIMIT $6"
                ),
                range,
                after,
            )
            .await?;
        let last = (rows.len() as i64) < EXPORT_PAGE;
        let reviews = rows.iter().map(row_to_review).collect::<Result<Vec<_>>>()?;
        let end = reviews.last().map(|r| ExportCursor { at: r.decided_at.unwrap_or_default(), id: r.id.clone() });
        let mut decisions = self.decisions_by_id(reviews.iter().map(|r| r.decision_id.as_str())).await?;
        // A decision deleted between the two reads is simply no longer part of the export.
        let rows = reviews.into_iter().filter_map(|r| decisions.remove(&r.decision_id).map(|d| (r, d))).collect();
        Ok(ExportPage { rows, end, last })
    }

    /// Decisions made in `range`, oldest first (`created_at`, then id): the page after `after`.
    #[tracing::instrument(skip(self))]
    pub async fn decisions_page(
        &self,
        range: &ExportRange,
        after: Option<&ExportCursor>,
    ) -> Result<ExportPage<DecisionRecord>> {
        let rows = self
            .page_rows(
                sql!(
                    "SELECT {COLUMNS} FROM decisions WHERE created_at >= $1 \
               AND created_at >= $2 AND created_at <= $4 \
               AND (created_at > $2 OR (created_at = $2 AND id > $3)) \
               AND (created_at < $4 OR (created_at = $4 AND id <= $5)) \
             ORDER BY created_at, id LIMIT $6"
                ),
                range,
                after,
            )
            .await?;
        let last = (rows.len() as i64) < EXPORT_PAGE;
        let rows = rows.iter().map(row_to_decision).collect::<Result<Vec<_>>>()?;
        let end = rows.last().map(|d| ExportCursor { at: d.created_at, id: d.id.clone() });
        Ok(ExportPage { rows, end, last })
    }

    /// Runs a page query: `$1` is `since`, `$2`/`$3` the cursor after which the page starts, `$4`/`$5` the one it
    /// ends at or before, `$6` the page size.
    async fn page_rows(
        &self,
        query: sqlx::AssertSqlSafe<String>,
        range: &ExportRange,
        after: Option<&ExportCursor>,
    ) -> Result<Vec<sqlx::any::AnyRow>> {
        let (after_at, after_id, through_at, through_id) = range.bounds(after);
        Ok(sqlx::query(query)
            .bind(range.since.unwrap_or(i64::MIN))
            .bind(after_at)
            .bind(after_id)
            .bind(through_at)
            .bind(through_id)
            .bind(EXPORT_PAGE)
            .fetch_all(&self.pool)
            .await?)
    }

    /// The decisions with these ids that exist, by id: one query for a page's worth.
    async fn decisions_by_id<'a>(
        &self,
        ids: impl Iterator<Item = &'a str>,
    ) -> Result<std::collections::HashMap<String, DecisionRecord>> {
        let ids: std::collections::BTreeSet<&str> = ids.collect();
        if ids.is_empty() {
            return Ok(Default::default());
        }
        let placeholders: Vec<String> = (1..=ids.len()).map(|n| format!("${n}")).collect();
        let sql = format!("SELECT {COLUMNS} FROM decisions WHERE id IN ({})", placeholders.join(", "));
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for id in ids {
            query = query.bind(id);
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(|row| row_to_decision(row).map(|d| (d.id.clone(), d))).collect()
    }
}

//! Webhook deliveries: written in the same transaction as the job result, then retried until delivered.

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use crate::{Backend, Result, Store, bounded_delay_ms, new_id, now_ms};

#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub job_id: String,
    pub url: String,
    /// The exact bytes that get signed and sent.
    pub body: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Delivery {
    pub id: String,
    pub job_id: String,
    pub url: String,
    pub body: String,
    pub status: String,
    pub attempts: i64,
    pub next_at: i64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
}

const COLUMNS: &str = "id, job_id, url, body, status, attempts, next_at, last_status, last_error";

fn row_to_delivery(row: &AnyRow) -> Result<Delivery> {
    Ok(Delivery {
        id: row.try_get("id")?,
        job_id: row.try_get("job_id")?,
        url: row.try_get("url")?,
        body: row.try_get("body")?,
        status: row.try_get("status")?,
        attempts: row.try_get("attempts")?,
        next_at: row.try_get("next_at")?,
        last_status: row.try_get("last_status")?,
        last_error: row.try_get("last_error")?,
    })
}

/// Queues a delivery, due at once by the database's clock (a server whose clock runs ahead would otherwise hold
/// it back by as much).
pub(crate) async fn insert_delivery_tx(
    tx: &mut Transaction<'static, Any>,
    backend: Backend,
    delivery: &NewDelivery,
    now: i64,
) -> Result<()> {
    sqlx::query(sql!(
        "INSERT INTO webhook_deliveries (id, job_id, url, body, status, attempts, next_at, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, 'pending', 0, {}, $5, $5)",
        backend.now_ms_sql()
    ))
    .bind(new_id())
    .bind(&delivery.job_id)
    .bind(&delivery.url)
    .bind(&delivery.body)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl Store {
    /// Takes one due delivery, pushing its `next_at` out by `lease_ms` so no other sender picks it meanwhile. Due
    /// and lease are by the database's clock, which every server shares.
    ///
    /// The `next_at` returned is the claim's fencing token ([`record_delivery_attempt`](Self::record_delivery_attempt)).
    /// A claim needs `next_at <= now` and sets `now + lease`, so with a lease of at least 1 ms each claim's token
    /// is above every earlier one's: a sender whose lease ran out never holds the current token.
    pub async fn claim_delivery(&self, lease_ms: i64) -> Result<Option<Delivery>> {
        let now = self.backend.now_ms_sql();
        let lock = if self.backend == Backend::Postgres { "FOR UPDATE SKIP LOCKED" } else { "" };
        let row = sqlx::query(sql!(
            "UPDATE webhook_deliveries SET next_at = {now} + $1, updated_at = $2 \
             WHERE id = (SELECT id FROM webhook_deliveries WHERE status = 'pending' AND next_at <= {now} \
                 ORDER BY next_at LIMIT 1 {lock}) \
             AND status = 'pending' AND next_at <= {now} \
             RETURNING {COLUMNS}"
        ))
        .bind(bounded_delay_ms(lease_ms).max(1))
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(row_to_delivery).transpose()
    }

    /// Records one attempt on a delivery as [`claim_delivery`](Self::claim_delivery) returned it. `retry_in_ms`
    /// None with a failure means: give up; otherwise the delivery is due again that long from now by the
    /// database's clock. Only the current claim records: a sender whose lease ran out while it was still sending
    /// finds the delivery claimed again (or settled) by another and changes nothing, so its late "failed" cannot
    /// overwrite the other's "delivered". Returns whether the attempt was recorded.
    pub async fn record_delivery_attempt(
        &self,
        claimed: &Delivery,
        delivered: bool,
        http_status: Option<u16>,
        error: Option<&str>,
        retry_in_ms: Option<i64>,
    ) -> Result<bool> {
        let status = if delivered {
            "delivered"
        } else if retry_in_ms.is_some() {
            "pending"
        } else {
            "failed"
        };
        // A retry at least 1 ms out: every earlier claim's token had lapsed when the current claim was taken, at
        // or before now, so the new `next_at` is above all of them and no sender left over from one can match it.
        let next_at = match retry_in_ms {
            Some(_) => format!("{} + $4", self.backend.now_ms_sql()),
            None => "$4".to_string(),
        };
        let recorded = sqlx::query(sql!(
            "UPDATE webhook_deliveries SET status = $1, attempts = attempts + 1, last_status = $2, last_error = $3, \
             next_at = {next_at}, updated_at = $5 WHERE id = $6 AND next_at = $7 AND status = 'pending'"
        ))
        .bind(status)
        .bind(http_status.map(i64::from))
        .bind(error)
        .bind(retry_in_ms.map_or(0, |ms| bounded_delay_ms(ms).max(1)))
        .bind(now_ms())
        .bind(&claimed.id)
        .bind(claimed.next_at)
        .execute(&self.pool)
        .await?;
        Ok(recorded.rows_affected() > 0)
    }

    /// Deliveries that were given up on, the most recently failed first.
    pub async fn failed_deliveries(&self, limit: i64) -> Result<Vec<Delivery>> {
        let rows = sqlx::query(sql!(
            "SELECT {COLUMNS} FROM webhook_deliveries WHERE status = 'failed' ORDER BY updated_at DESC, id LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(row_to_delivery).collect()
    }

    /// Puts failed deliveries (all, or one job's) back in the queue, due now and with a fresh run of attempts, for
    /// a receiver that was down longer than the retries lasted. A running server's sender takes them from there.
    /// Returns how many.
    pub async fn retry_failed_deliveries(&self, job_id: Option<&str>) -> Result<u64> {
        let retried = sqlx::query(sql!(
            "UPDATE webhook_deliveries SET status = 'pending', attempts = 0, next_at = {}, updated_at = $1 \
             WHERE status = 'failed' AND ($2 IS NULL OR job_id = $2)",
            self.backend.now_ms_sql()
        ))
        .bind(now_ms())
        .bind(job_id)
        .execute(&self.pool)
        .await?;
        Ok(retried.rows_affected())
    }

    pub async fn deliveries_for_job(&self, job_id: &str) -> Result<Vec<Delivery>> {
        let rows = sqlx::query(sql!("SELECT {COLUMNS} FROM webhook_deliveries WHERE job_id = $1 ORDER BY created_at"))
            .bind(job_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(row_to_delivery).collect()
    }
}

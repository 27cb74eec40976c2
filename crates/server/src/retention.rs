//! `serve --retain-days`: prunes the store on a schedule (see `safeguard_store::Retention` for what stays).
//! Every server sharing a database may run it; each batch re-checks its rows under a lock, so two servers pruning
//! at once delete each row once.

use std::time::Duration;

use safeguard_store::Retention;
use tokio_util::sync::CancellationToken;

use crate::AppState;

/// What to prune, and how often.
#[derive(Debug, Clone)]
pub struct RetentionConfig {
    /// Decisions, jobs and webhook deliveries older than this go.
    pub keep_for: Duration,
    /// Keep decisions a person reviewed, however old.
    pub keep_reviewed: bool,
    /// Also delete policy versions nothing uses any more.
    pub policies: bool,
    /// Time between prunes; the first runs a minute after start, when the server has settled.
    pub every: Duration,
}

impl RetentionConfig {
    pub fn new(keep_for: Duration) -> Self {
        RetentionConfig { keep_for, keep_reviewed: false, policies: false, every: Duration::from_secs(3600) }
    }

    fn retention(&self) -> Retention {
        let keep_for = i64::try_from(self.keep_for.as_millis()).unwrap_or(i64::MAX);
        Retention {
            keep_reviewed: self.keep_reviewed,
            policies: self.policies,
            ..Retention::before(safeguard_store::now_ms().saturating_sub(keep_for))
        }
    }
}

const FIRST_PRUNE_AFTER: Duration = Duration::from_secs(60);

pub(crate) async fn prune_periodically(state: AppState, config: RetentionConfig, shutdown: CancellationToken) {
    let mut wait = FIRST_PRUNE_AFTER.min(config.every);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        wait = config.every;
        let retention = config.retention();
        match state.store.prune(&retention).await {
            Ok(pruned) => {
                for (table, rows) in [
                    ("decisions", pruned.decisions),
                    ("jobs", pruned.jobs),
                    ("webhook_deliveries", pruned.webhook_deliveries),
                    ("policies", pruned.policies),
                ] {
                    metrics::counter!("safeguard_pruned_rows_total", "table" => table).increment(rows);
                }
                tracing::info!(?pruned, before_ms = retention.before_ms, "pruned what is past the retention period");
            }
            // Tried again next time; nothing is lost by waiting.
            Err(err) => {
                metrics::counter!("safeguard_prune_errors_total").increment(1);
                tracing::error!(error = %err, "pruning the store failed");
            }
        }
    }
}

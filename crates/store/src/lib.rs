//! Durable storage on SQLite or PostgreSQL: policies, decisions, jobs, reviews, keys.
//!
//! One code path serves both databases through sqlx's `Any` driver: every statement is portable SQL with
//! `$N` placeholders (SQLite accepts them too), times are unix milliseconds, JSON is stored as text. The only
//! dialect switch is `FOR UPDATE SKIP LOCKED` when claiming jobs on PostgreSQL.

/// Dynamic SQL in this crate is only ever assembled from our own constants (column lists, dialect switches),
/// never from input; input always travels as bound parameters.
macro_rules! sql {
    ($($fmt:tt)*) => {
        sqlx::AssertSqlSafe(format!($($fmt)*))
    };
}

mod decisions;
mod export;
mod group_commit;
mod jobs;
mod keys;
mod migrate;
mod policies;
mod reviews;
mod webhooks;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Executor};

pub use decisions::{DecisionFilter, DecisionRecord};
pub use group_commit::{GroupCommit, GroupCommitStats};
pub use jobs::{JobRecord, JobStatus, NewJob, QueueDepth};
pub use keys::{ApiKeyRecord, hash_api_key};
pub use policies::StoredPolicy;
pub use reviews::{NewReview, ReviewDecision, ReviewRecord, ReviewStats};
pub use webhooks::{Delivery, NewDelivery};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("stored JSON in {what} is corrupt: {source}")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("unsupported database URL {0:?}: use sqlite://PATH or postgres://USER@HOST/DB")]
    UnsupportedUrl(String),
    #[error("invalid schema name {0:?}: use lowercase letters, digits and underscores")]
    InvalidSchema(String),
    #[error("policy {0} is not stored")]
    PolicyNotFound(String),
    #[error("policy {hash} is named {actual:?}, not {requested:?}")]
    PolicyNameMismatch { hash: String, actual: String, requested: String },
    #[error("the decision writer stopped before confirming the write; the decision may or may not be stored")]
    WriterStopped,
    #[error("migration {version} failed: {source}")]
    Migration {
        version: i64,
        #[source]
        source: sqlx::Error,
    },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// PostgreSQL only: keep every table in this schema (created if missing). Lets several deployments, or test
    /// runs, share one database without colliding.
    pub schema: Option<String>,
    pub max_connections: u32,
    /// How decision inserts share transactions.
    pub group_commit: GroupCommit,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { schema: None, max_connections: 8, group_commit: GroupCommit::default() }
    }
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    decision_writer: group_commit::DecisionWriter,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("backend", &self.backend).finish_non_exhaustive()
    }
}

/// Milliseconds since the unix epoch; the one clock every table uses.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

pub(crate) fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

pub(crate) fn to_json(value: &impl serde::Serialize) -> String {
    // Serializing plain data (Value, Vec<String>) cannot fail.
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_string())
}

pub(crate) fn from_json<T: serde::de::DeserializeOwned>(text: &str, what: &'static str) -> Result<T> {
    serde_json::from_str(text).map_err(|source| StoreError::Json { what, source })
}

impl Store {
    /// Opens (creating if needed) a SQLite file in WAL mode and applies migrations.
    pub async fn open_sqlite(path: &Path) -> Result<Store> {
        let url = format!("sqlite://{}?mode=rwc", path.display());
        Store::connect(&url, StoreOptions::default()).await
    }

    /// Connects to `sqlite://…` or `postgres://…` and applies migrations.
    #[tracing::instrument(skip_all, fields(backend))]
    pub async fn connect(url: &str, options: StoreOptions) -> Result<Store> {
        install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            return Err(StoreError::UnsupportedUrl(redact_url(url)));
        };
        tracing::Span::current().record("backend", format_args!("{backend:?}"));
        if let Some(schema) = &options.schema
            && !valid_schema_name(schema)
        {
            return Err(StoreError::InvalidSchema(schema.clone()));
        }
        let pool_options = AnyPoolOptions::new().max_connections(options.max_connections.max(1));
        let pool = match (backend, options.schema.clone()) {
            (Backend::Postgres, Some(schema)) => {
                let bootstrap = AnyPoolOptions::new().max_connections(1).connect(url).await?;
                bootstrap.execute(sqlx::AssertSqlSafe(format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))).await?;
                bootstrap.close().await;
                pool_options
                    .after_connect(move |conn, _meta| {
                        let statement = format!("SET search_path TO \"{schema}\"");
                        Box::pin(async move {
                            conn.execute(sqlx::AssertSqlSafe(statement)).await?;
                            Ok(())
                        })
                    })
                    .connect(url)
                    .await?
            }
            (Backend::Sqlite, _) => {
                pool_options
                    .after_connect(|conn, _meta| {
                        Box::pin(async move {
                            // WAL lets readers proceed during writes; busy_timeout turns writer contention into waiting.
                            conn.execute("PRAGMA journal_mode = WAL").await?;
                            conn.execute("PRAGMA busy_timeout = 10000").await?;
                            conn.execute("PRAGMA synchronous = FULL").await?;
                            Ok(())
                        })
                    })
                    .connect(url)
                    .await?
            }
            (Backend::Postgres, None) => pool_options.connect(url).await?,
        };
        let decision_writer = group_commit::DecisionWriter::start(pool.clone(), options.group_commit);
        let store = Store { pool, backend, decision_writer };
        migrate::run(&store).await?;
        Ok(store)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// How many transactions the decision writer committed, for how many rows.
    pub fn group_commit_stats(&self) -> GroupCommitStats {
        self.decision_writer.stats()
    }

    /// True when a trivial query round-trips within `timeout`.
    pub async fn ping(&self, timeout: Duration) -> bool {
        matches!(tokio::time::timeout(timeout, sqlx::query("SELECT 1").execute(&self.pool)).await, Ok(Ok(_)))
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// PostgreSQL only: drops a schema and everything in it (test cleanup).
    pub async fn drop_schema(url: &str, schema: &str) -> Result<()> {
        install_default_drivers();
        if !valid_schema_name(schema) {
            return Err(StoreError::InvalidSchema(schema.to_string()));
        }
        let pool = AnyPoolOptions::new().max_connections(1).connect(url).await?;
        pool.execute(sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))).await?;
        pool.close().await;
        Ok(())
    }
}

fn valid_schema_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
}

/// Never echo a password from a connection string into logs or errors.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***{}", &url[..scheme_end], &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_validated() {
        assert!(valid_schema_name("sg_test_1"));
        assert!(!valid_schema_name("Bad"));
        assert!(!valid_schema_name("x\"; drop"));
        assert!(!valid_schema_name("1abc"));
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("postgres://u:secret@h/db"), "postgres://***@h/db");
        assert_eq!(redact_url("sqlite://x.db"), "sqlite://x.db");
    }
}

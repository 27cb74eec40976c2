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
use std::sync::{Arc, Weak};
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
    /// SQLite only: when a commit counts as done. PostgreSQL's is its server's `synchronous_commit`.
    pub sqlite_sync: SqliteSync,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            schema: None,
            max_connections: 8,
            group_commit: GroupCommit::default(),
            sqlite_sync: SqliteSync::default(),
        }
    }
}

/// What a committed SQLite transaction survives.
///
/// On this class of VM a flush to disk takes about 4 ms, so flushing every commit makes the disk the floor
/// under every decision's latency. In WAL mode without the flush, a commit is in the operating system's page
/// cache the moment it returns: it survives `kill -9`, a panic or an OOM kill of safeguard, and is lost only if
/// the machine itself goes down before the OS writes it out (the database is never corrupted either way). That
/// is the usual choice for WAL (Rails' default, for one); `Full` is there when a power cut must not lose the last
/// decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SqliteSync {
    /// `synchronous = NORMAL`: durable across crashes of the process.
    #[default]
    Normal,
    /// `synchronous = FULL`: every commit waits for the disk; durable across power loss.
    Full,
}

impl SqliteSync {
    fn pragma(self) -> &'static str {
        match self {
            SqliteSync::Normal => "PRAGMA synchronous = NORMAL",
            SqliteSync::Full => "PRAGMA synchronous = FULL",
        }
    }
}

impl std::str::FromStr for SqliteSync {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "normal" => Ok(SqliteSync::Normal),
            "full" => Ok(SqliteSync::Full),
            other => Err(format!("unknown SQLite sync mode {other:?}; use normal or full")),
        }
    }
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    decision_writer: group_commit::DecisionWriter,
    /// Background tasks of this store (the SQLite checkpointer) stop once the last clone is dropped.
    _alive: Arc<()>,
}

/// How often the SQLite checkpointer folds the write-ahead log back into the database. Each checkpoint flushes
/// the database file, and on ext4 that flush briefly holds up every other write to the file system, commits
/// included. At 1000 decisions/s on the 2-core test VM (`examples/insert_latency`): every 500 ms gave p99 3–4 ms,
/// every 5 s made each stall long (max 50 ms), every 2 s gave p99 1.2–4 ms depending on the machine's other load.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);
/// SQLite's own checkpoint trigger, in pages (4 KiB), kept only as a bound in case the checkpointer cannot run:
/// 2 s at 1000 decisions/s is about 8000 pages.
const WAL_AUTOCHECKPOINT_PAGES: u32 = 100_000;

/// SQLite: checkpoints off the commit path.
///
/// By default SQLite checkpoints inside whichever commit pushes the write-ahead log past 1000 pages, and a
/// checkpoint flushes the log and the database to disk (about 4 ms each here) even with `synchronous = NORMAL`.
/// With several pages per decision that was one request in a few hundred waiting: p99 56 ms for decisions stored
/// at 1000/s. A passive checkpoint on its own connection lets commits go on meanwhile.
fn start_checkpointer(pool: AnyPool, alive: Weak<()>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if alive.strong_count() == 0 || pool.is_closed() {
                break;
            }
            if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&pool).await {
                tracing::warn!(%error, "WAL checkpoint failed; SQLite's own checkpoint still bounds the log");
            }
        }
    });
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
        Store::open_sqlite_with(path, StoreOptions::default()).await
    }

    /// [`open_sqlite`](Self::open_sqlite) with options other than the defaults.
    pub async fn open_sqlite_with(path: &Path, options: StoreOptions) -> Result<Store> {
        let url = format!("sqlite://{}?mode=rwc", path.display());
        Store::connect(&url, options).await
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
                let sync = options.sqlite_sync.pragma();
                pool_options
                    // An embedded database has no connection to lose; the check would be one more round trip to
                    // the connection's thread on every query.
                    .test_before_acquire(false)
                    .after_connect(move |conn, _meta| {
                        Box::pin(async move {
                            // WAL lets readers proceed during writes; busy_timeout turns writer contention into waiting.
                            conn.execute("PRAGMA journal_mode = WAL").await?;
                            conn.execute("PRAGMA busy_timeout = 10000").await?;
                            conn.execute(sync).await?;
                            conn.execute(sqlx::AssertSqlSafe(format!(
                                "PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}"
                            )))
                            .await?;
                            Ok(())
                        })
                    })
                    .connect(url)
                    .await?
            }
            (Backend::Postgres, None) => pool_options.connect(url).await?,
        };
        let decision_writer = group_commit::DecisionWriter::start(pool.clone(), backend, options.group_commit);
        let alive = Arc::new(());
        if backend == Backend::Sqlite {
            start_checkpointer(pool.clone(), Arc::downgrade(&alive));
        }
        let store = Store { pool, backend, decision_writer, _alive: alive };
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

    #[tokio::test]
    async fn sqlite_pragmas_reach_every_connection() {
        let dir = tempfile::tempdir().unwrap();
        for (sync, expected) in [(SqliteSync::Normal, 1_i64), (SqliteSync::Full, 2)] {
            let path = dir.path().join(format!("{sync:?}.db"));
            let store = Store::open_sqlite_with(&path, StoreOptions { sqlite_sync: sync, ..StoreOptions::default() })
                .await
                .unwrap();
            // Hold several connections at once so more than the first one is checked.
            let mut held = Vec::new();
            for _ in 0..3 {
                let mut conn = store.pool().acquire().await.unwrap();
                let row = sqlx::query("PRAGMA synchronous").fetch_one(&mut *conn).await.unwrap();
                let level: i64 = sqlx::Row::try_get(&row, 0).unwrap();
                assert_eq!(level, expected, "{sync:?}");
                // Checkpoints belong to the background checkpointer, not to whichever commit fills the log.
                let row = sqlx::query("PRAGMA wal_autocheckpoint").fetch_one(&mut *conn).await.unwrap();
                let pages: i64 = sqlx::Row::try_get(&row, 0).unwrap();
                assert_eq!(pages, i64::from(WAL_AUTOCHECKPOINT_PAGES));
                held.push(conn);
            }
        }
        assert_eq!("FULL".parse::<SqliteSync>(), Ok(SqliteSync::Full));
        assert!("fsync".parse::<SqliteSync>().is_err());
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("postgres://u:secret@h/db"), "postgres://***@h/db");
        assert_eq!(redact_url("sqlite://x.db"), "sqlite://x.db");
    }
}

//! Durable storage on SQLite or PostgreSQL: policies, decisions, jobs, reviews, keys.
//!
//! Both databases share one code path through sqlx's `Any` driver where they can: statements are portable SQL
//! with `$N` placeholders (SQLite accepts them too), times are unix milliseconds, JSON is stored as text.
//! Where they differ, the code says which it is on:
//! - on a SQLite file, decisions are committed by the inserting callers themselves on one rusqlite connection
//!   (`sqlite_commit.rs`), and a batch of decisions stored together is one multi-statement query (`decisions.rs`);
//! - SQLite transactions that write take the write lock up front with `BEGIN IMMEDIATE` (those batches,
//!   migrations in `migrate.rs`, appeals in `reviews.rs`);
//! - PostgreSQL claims jobs and webhook deliveries with `FOR UPDATE SKIP LOCKED`, locks an appealed decision
//!   `FOR UPDATE`, and serialises migrations with an advisory lock.

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
mod retention;
mod reviews;
mod sqlite_commit;
mod webhooks;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Executor, Row};

use sqlite_commit::SqliteWriter;

pub use decisions::{DecisionFilter, DecisionRecord, DecisionToStore};
pub use export::{AuditState, ExportCursor, ExportPage, ExportRange};
pub use group_commit::{GroupCommit, GroupCommitStats};
pub use jobs::{JobRecord, JobStatus, NewJob, QueueDepth, scoped_idempotency_key};
pub use keys::{ApiKeyRecord, KeyInstall, hash_api_key};
pub use policies::{MAX_POLICY_PAGE, POLICY_USE_RESOLUTION_MS, PolicyListing, PolicySummary, StoredPolicy};
pub use retention::{Pruned, Retention};
pub use reviews::{MAX_REVIEW_PAGE, NewReview, QueuedReview, ReviewDecision, ReviewRecord, ReviewStats};
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
    #[error("decision {0} is not stored (pruned, or never was)")]
    DecisionNotFound(String),
    #[error("policy {hash} is named {actual:?}, not {requested:?}")]
    PolicyNameMismatch { hash: String, actual: String, requested: String },
    #[error("the decision writer stopped before confirming the write; the decision may or may not be stored")]
    WriterStopped,
    #[error("the database did not confirm the write within {0:?}; the decision may or may not be stored")]
    CommitTimedOut(std::time::Duration),
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot open the SQLite decision writer's connection to {0}")]
    SqliteOpen(String),
    #[error("the store is closed")]
    Closed,
    #[error(
        "the store lacks migrations {} that this safeguard applies: start `safeguard serve` of this version on it \
         once, or run this command with the version that runs there",
        versions.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
    )]
    PendingMigrations { versions: Vec<i64> },
    #[error("no safeguard store here (no migrations table): give the store a server was started with")]
    NoStore,
    #[error("stored {what} {value:?} is not one this version knows (written by a newer server?)")]
    UnknownValue { what: &'static str, value: String },
    #[error("migration {version} failed: {source}")]
    Migration {
        version: i64,
        #[source]
        source: sqlx::Error,
    },
    /// The group commit this write was part of failed for a reason no single row caused (a lock held too long,
    /// a lost connection); every caller in it gets the reason.
    #[error("database error: {0}")]
    BatchFailed(String),
}

impl StoreError {
    /// Whether what is stored cannot be read as this version reads it (corrupt JSON, a value it does not know, a
    /// column of the wrong type): asking again gets the same answer, where an outage or a lock passes.
    pub fn is_unreadable_data(&self) -> bool {
        match self {
            StoreError::Json { .. } | StoreError::UnknownValue { .. } => true,
            StoreError::Db(e) => matches!(
                e,
                sqlx::Error::ColumnDecode { .. }
                    | sqlx::Error::Decode(_)
                    | sqlx::Error::ColumnNotFound(_)
                    | sqlx::Error::TypeNotFound { .. }
            ),
            StoreError::Sqlite(e) => matches!(
                e,
                rusqlite::Error::FromSqlConversionFailure(..)
                    | rusqlite::Error::InvalidColumnType(..)
                    | rusqlite::Error::IntegralValueOutOfRange(..)
            ),
            _ => false,
        }
    }

    /// Whether the error comes from one row's values (a duplicate id, a constraint), so that the row's neighbours
    /// in a batch would have been written without it.
    pub(crate) fn is_row_specific(&self) -> bool {
        use sqlx::error::ErrorKind;
        match self {
            StoreError::Db(sqlx::Error::Database(e)) => matches!(
                e.kind(),
                ErrorKind::UniqueViolation
                    | ErrorKind::ForeignKeyViolation
                    | ErrorKind::NotNullViolation
                    | ErrorKind::CheckViolation
            ),
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                e.code == rusqlite::ErrorCode::ConstraintViolation
            }
            StoreError::Json { .. } => true,
            _ => false,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backend a `sqlite:` or `postgres://` URL names.
    fn of(url: &str) -> Result<Backend> {
        if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else {
            Err(StoreError::UnsupportedUrl(redact_url(url)))
        }
    }

    /// SQL for "now" in unix milliseconds by the database's clock, the same value wherever it appears in one
    /// statement. Leases and due times are written and compared with it, never with [`now_ms`]: servers sharing
    /// one PostgreSQL database each have their own clock, and one running ahead by more than a lease would take
    /// jobs and deliveries that others are still working on.
    ///
    /// SQLite fixes `'now'` for the whole of one `sqlite3_step`, which is all of an UPDATE (with or without
    /// RETURNING) and the first row of a SELECT; julianday holds it in whole milliseconds, and ROUND undoes the
    /// float's error (up to ~20 µs at today's dates), which a bare CAST would truncate to the millisecond below.
    /// PostgreSQL's `statement_timestamp()` is fixed for the statement (unlike `clock_timestamp()`), and is not
    /// the transaction's start (`now()`), which a long transaction would leave behind.
    pub fn now_ms_sql(self) -> &'static str {
        match self {
            Backend::Sqlite => "CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER)",
            Backend::Postgres => "CAST(EXTRACT(EPOCH FROM statement_timestamp()) * 1000 AS BIGINT)",
        }
    }
}

/// A lease or delay in milliseconds as it is bound into `now + $n`: bounded so that the sum cannot overflow (on
/// PostgreSQL an error, on SQLite a float in an integer column), however the length was configured.
pub(crate) fn bounded_delay_ms(ms: i64) -> i64 {
    /// About a century: longer than anything is ever leased or put off.
    const MAX_DELAY_MS: i64 = 100 * 365 * 86_400_000;
    ms.clamp(-MAX_DELAY_MS, MAX_DELAY_MS)
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
    /// SQLite only: how often the background checkpointer runs ([`CHECKPOINT_EVERY`]).
    pub checkpoint_every: Duration,
    /// SQLite only: the size of the write-ahead log, in pages, at which a commit checkpoints it itself
    /// ([`WAL_LIMIT_PAGES`]). A bound for when the background checkpointer falls behind, never reached otherwise.
    pub wal_limit_pages: u32,
    /// Whether opening brings the schema up to this version. Only a server migrates: a command that reads or
    /// edits what a server stored opens with [`Migrations::RequireApplied`], so that it never changes the schema
    /// under a server of another version still running on it.
    pub migrations: Migrations,
}

/// What [`Store::connect`] does about migrations this version knows and the store has not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Migrations {
    /// Apply them (and create the schema, on PostgreSQL).
    #[default]
    Apply,
    /// Refuse the store ([`StoreError::PendingMigrations`], or [`StoreError::NoStore`] when none was made).
    RequireApplied,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            schema: None,
            max_connections: 8,
            group_commit: GroupCommit::default(),
            sqlite_sync: SqliteSync::default(),
            checkpoint_every: CHECKPOINT_EVERY,
            wal_limit_pages: WAL_LIMIT_PAGES,
            migrations: Migrations::Apply,
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
    checkpoints: Arc<CheckpointCounters>,
    /// Background tasks of this store (the SQLite checkpointer) stop once the last clone is dropped.
    _alive: Arc<()>,
}

/// How often the SQLite checkpointer folds the write-ahead log back into the database. Each checkpoint flushes
/// the database file, and on ext4 that flush briefly holds up every other write to the file system, commits
/// included. At 1000 decisions/s on the 2-core test VM: every 500 ms gave p99 3–4 ms, every 5 s made each stall
/// long (max 50 ms), every 2 s gave p99 1.2–4 ms depending on the machine's other load (`examples/insert_latency`);
/// with the log restarted each time, 250 ms and 500 ms were again worse than 2 s (`safeguard bench server
/// --checkpoint-ms`).
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);
/// The write-ahead log's bound, in pages, in case the checkpointer cannot run: 2 s at 1000 decisions/s is about
/// 36,000 pages of 1 KiB. Pooled connections leave it to SQLite's own trigger (a checkpoint inside the commit
/// that crosses it, on sqlx's connection thread); the decision writer checkpoints on a blocking thread instead.
pub const WAL_LIMIT_PAGES: u32 = 100_000;
/// How long the restarting checkpoint may hold new commits back while it waits for the current writer and for
/// readers of the old log. Past it the checkpoint gives up until the next tick; commits waiting meanwhile
/// stall for at most this long.
const RESTART_WAIT_MS: u32 = 20;
/// Page size of new SQLite databases, in bytes.
///
/// Every commit writes each page it touched to the write-ahead log in full, and storing one decision touches
/// about 13 (three tables and their eight indexes). With SQLite's default 4 KiB pages that was 53 KiB of log per
/// decision, 50 MB/s at 1000 decisions/s, all of which a checkpoint has to flush. 1 KiB pages write 18 KiB per
/// decision: rows of a few KiB spill into overflow pages, which costs reads of big rows a little, and the commit
/// path, which every request waits on, much less (store p99 at 1000/s: 1.4–2.3 ms against 2.0–2.8 ms).
const SQLITE_PAGE_SIZE: u32 = 1024;
/// What every SQLite connection waits for a lock before it reports the database busy.
const BUSY_TIMEOUT_MS: u32 = 10_000;

/// What the SQLite checkpointer did since the store opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckpointStats {
    /// Ticks that ran a checkpoint.
    pub checkpoints: u64,
    /// Checkpoints after which the next commit starts the write-ahead log from its beginning again.
    pub restarts: u64,
    /// Restarts given up because a writer or a reader held on longer than the checkpointer may wait.
    pub busy: u64,
    /// Pages in the write-ahead log at the last checkpoint.
    pub last_log_pages: u64,
}

#[derive(Default)]
struct CheckpointCounters {
    checkpoints: AtomicU64,
    restarts: AtomicU64,
    busy: AtomicU64,
    last_log_pages: AtomicU64,
}

/// SQLite: checkpoints off the commit path, and a write-ahead log that starts over.
///
/// By default SQLite checkpoints inside whichever commit pushes the write-ahead log past 1000 pages, and a
/// checkpoint flushes the log and the database to disk (about 4 ms each here) even with `synchronous = NORMAL`.
/// With several pages per decision that was one request in a few hundred waiting: p99 56 ms for decisions stored
/// at 1000/s. So a background task checkpoints instead, in two steps:
///
/// 1. A passive checkpoint copies the bulk of the log into the database while commits go on.
/// 2. A second passive one copies what arrived during the first, still beside the commits.
/// 3. A restarting one copies what arrived meanwhile and makes the next commit write the log from its start.
///    It holds new commits back while it runs, so it waits at most [`RESTART_WAIT_MS`] for the lock. What it
///    holds them for is its copy and flush; after the second pass there is little left to copy or flush (stored
///    alone at 1000/s, p99 median 2.1 → 1.2 ms over 7 interleaved pairs).
///
/// Passive checkpoints alone never restart the log while commits keep arriving: each one ends behind the
/// newest commit, so the log file only grows (350 MB after 15 s at 1000 decisions/s, measured), and every
/// append grows the file, which on ext4 waits behind the checkpoint's flush.
fn start_checkpointer(pool: AnyPool, every: Duration, counters: Arc<CheckpointCounters>, alive: Weak<()>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if alive.strong_count() == 0 || pool.is_closed() {
                break;
            }
            if let Err(error) = checkpoint(&pool, &counters).await {
                tracing::warn!(%error, "WAL checkpoint failed; SQLite's own checkpoint still bounds the log");
            }
        }
    });
}

#[tracing::instrument(skip_all)]
async fn checkpoint(pool: &AnyPool, counters: &CheckpointCounters) -> std::result::Result<(), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let passive = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").fetch_one(&mut *conn).await?;
    let log_pages: i64 = passive.try_get(1)?;
    sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").fetch_one(&mut *conn).await?;
    counters.checkpoints.fetch_add(1, Ordering::Relaxed);
    counters.last_log_pages.store(log_pages.max(0) as u64, Ordering::Relaxed);

    conn.execute(sqlx::AssertSqlSafe(format!("PRAGMA busy_timeout = {RESTART_WAIT_MS}"))).await?;
    let restart = sqlx::query("PRAGMA wal_checkpoint(RESTART)").fetch_one(&mut *conn).await;
    let restored = conn.execute(sqlx::AssertSqlSafe(format!("PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}"))).await;
    if restored.is_err() {
        // A connection that would give up on locks after 20 ms must not serve the next query.
        conn.close_on_drop();
    }
    let busy: i64 = restart?.try_get(0)?;
    if busy == 0 {
        counters.restarts.fetch_add(1, Ordering::Relaxed);
    } else {
        counters.busy.fetch_add(1, Ordering::Relaxed);
    }
    tracing::debug!(log_pages, busy, "checkpointed");
    restored?;
    Ok(())
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("backend", &self.backend).finish_non_exhaustive()
    }
}

/// Milliseconds since the unix epoch by this process's clock: when things happened (`created_at`, `decided_at`).
/// Leases and due times use the database's clock instead ([`Backend::now_ms_sql`]).
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A fresh unique id (UUIDv7: time-ordered, its last 62 bits random).
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// The file behind a `sqlite:` URL; `None` for an in-memory database, which only the pool's connections share.
fn sqlite_file(url: &str) -> Result<Option<std::path::PathBuf>> {
    use std::str::FromStr;
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)?;
    let path = options.get_filename();
    let in_memory = url.contains(":memory:") || url.contains("mode=memory");
    // A name starting `file:` is a SQLite URI (sqlx's own in-memory databases are `file:sqlx-in-memory-N`); the
    // writer's connection would read it as a plain file name, another file than the pool's, so leave it to the
    // pool. (`Path::starts_with` compares whole components and would miss `file:name`.)
    let uri = path.to_string_lossy().starts_with("file:");
    Ok((!in_memory && !uri).then(|| path.to_path_buf()))
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
        let mode = match options.migrations {
            Migrations::Apply => "rwc",
            Migrations::RequireApplied => "rw",
        };
        Store::connect(&format!("sqlite://{}?mode={mode}", path.display()), options).await
    }

    /// Connects to `sqlite://…` or `postgres://…` and applies migrations.
    #[tracing::instrument(skip_all, fields(backend))]
    pub async fn connect(url: &str, options: StoreOptions) -> Result<Store> {
        install_default_drivers();
        let backend = Backend::of(url)?;
        tracing::Span::current().record("backend", format_args!("{backend:?}"));
        if let Some(schema) = &options.schema
            && !valid_schema_name(schema)
        {
            return Err(StoreError::InvalidSchema(schema.clone()));
        }
        if backend == Backend::Sqlite
            && options.migrations == Migrations::RequireApplied
            && sqlite_file(url)?.is_some_and(|path| !path.exists())
        {
            return Err(StoreError::NoStore);
        }
        let pool_options = AnyPoolOptions::new().max_connections(options.max_connections.max(1));
        let pool = match (backend, options.schema.clone()) {
            (Backend::Postgres, Some(schema)) => {
                if options.migrations == Migrations::Apply {
                    create_schema(url, &schema).await?;
                }
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
                let wal_limit_pages = options.wal_limit_pages;
                pool_options
                    // An embedded database has no connection to lose; the check would be one more round trip to
                    // the connection's thread on every query.
                    .test_before_acquire(false)
                    .after_connect(move |conn, _meta| {
                        Box::pin(async move {
                            // Takes effect only when this creates the file; an existing database keeps its size.
                            conn.execute(sqlx::AssertSqlSafe(format!("PRAGMA page_size = {SQLITE_PAGE_SIZE}"))).await?;
                            // WAL lets readers proceed during writes; busy_timeout turns writer contention into waiting.
                            conn.execute("PRAGMA journal_mode = WAL").await?;
                            conn.execute(sqlx::AssertSqlSafe(format!("PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")))
                                .await?;
                            conn.execute(sync).await?;
                            conn.execute(sqlx::AssertSqlSafe(format!("PRAGMA wal_autocheckpoint = {wal_limit_pages}")))
                                .await?;
                            Ok(())
                        })
                    })
                    .connect(url)
                    .await?
            }
            (Backend::Postgres, None) => pool_options.connect(url).await?,
        };
        let sqlite_file = match backend {
            Backend::Sqlite => sqlite_file(url)?,
            Backend::Postgres => None,
        };
        let decision_writer = group_commit::DecisionWriter::start(
            pool.clone(),
            backend,
            options.group_commit,
            sqlite_file.as_deref().map(|path| SqliteWriter {
                path,
                sync: options.sqlite_sync,
                wal_limit_pages: options.wal_limit_pages,
            }),
        );
        let alive = Arc::new(());
        let checkpoints = Arc::new(CheckpointCounters::default());
        // A command that only reads or edits a server's store leaves checkpoints to the server: its own would
        // hold the server's commits back every few seconds.
        if backend == Backend::Sqlite && options.migrations == Migrations::Apply {
            start_checkpointer(
                pool.clone(),
                options.checkpoint_every,
                Arc::clone(&checkpoints),
                Arc::downgrade(&alive),
            );
        }
        let store = Store { pool, backend, decision_writer, checkpoints, _alive: alive };
        match options.migrations {
            Migrations::Apply => migrate::run(&store).await?,
            Migrations::RequireApplied => migrate::require_applied(&store).await?,
        }
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

    /// What the SQLite checkpointer did; all zero on PostgreSQL.
    pub fn checkpoint_stats(&self) -> CheckpointStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        CheckpointStats {
            checkpoints: load(&self.checkpoints.checkpoints),
            restarts: load(&self.checkpoints.restarts),
            busy: load(&self.checkpoints.busy),
            last_log_pages: load(&self.checkpoints.last_log_pages),
        }
    }

    /// The database's clock in unix milliseconds ([`Backend::now_ms_sql`]): what leases and due times are
    /// measured against.
    pub async fn database_now_ms(&self) -> Result<i64> {
        let row = sqlx::query(sql!("SELECT {} AS now_ms", self.backend.now_ms_sql())).fetch_one(&self.pool).await?;
        Ok(row.try_get("now_ms")?)
    }

    /// True when a trivial query round-trips within `timeout`.
    pub async fn ping(&self, timeout: Duration) -> bool {
        matches!(tokio::time::timeout(timeout, sqlx::query("SELECT 1").execute(&self.pool)).await, Ok(Ok(_)))
    }

    /// A transaction for a check-then-write that must not race another (a prune against an appeal): on SQLite it
    /// takes the write lock as it begins; on PostgreSQL it reads, after a row lock, what the lock's last holder
    /// committed (READ COMMITTED, whatever the database's default).
    pub(crate) async fn begin_locking(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>> {
        Ok(match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin_with("BEGIN ISOLATION LEVEL READ COMMITTED").await?,
        })
    }

    /// A transaction that behaves alike on both backends whatever PostgreSQL's configured default: READ COMMITTED
    /// there, where REPEATABLE READ would fail a second writer of the same row with a serialization error (a 500)
    /// instead of letting its statement see the first's commit and change nothing (a 409); SQLite's deferred
    /// transaction serialises writers anyway.
    pub(crate) async fn begin_read_committed(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>> {
        Ok(match self.backend {
            Backend::Sqlite => self.pool.begin().await?,
            Backend::Postgres => self.pool.begin_with("BEGIN ISOLATION LEVEL READ COMMITTED").await?,
        })
    }

    pub async fn close(&self) {
        self.decision_writer.close().await;
        // A connection whose peer went silent (a commit that timed out on it is still rolling back) would hold
        // the close until the kernel gives up on it, about 15 minutes; past the deadline it is left to the OS.
        if tokio::time::timeout(CLOSE_TIMEOUT, self.pool.close()).await.is_err() {
            tracing::warn!(
                "the database did not confirm closing within {CLOSE_TIMEOUT:?}; its connections are dropped"
            );
        }
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

/// How long [`Store::close`] waits for the database to see its connections closed.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether a store was ever made at `url` (in `schema`, on PostgreSQL): its SQLite file exists, or its PostgreSQL
/// schema holds the migration table. Opening creates what is missing, which a command that only reads or changes
/// what a server stored must not do: a mistyped path or schema would read as an empty store, with all well.
pub async fn store_exists(url: &str, schema: Option<&str>) -> Result<bool> {
    install_default_drivers();
    if Backend::of(url)? == Backend::Sqlite {
        return Ok(sqlite_file(url)?.is_none_or(|path| path.exists()));
    }
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(url).await?;
    let found = sqlx::query(
        "SELECT 1 FROM information_schema.tables WHERE table_name = 'safeguard_migrations' \
         AND table_schema = COALESCE(CAST($1 AS TEXT), current_schema())",
    )
    .bind(schema)
    .fetch_optional(&mut conn)
    .await;
    sqlx::Connection::close(conn).await?;
    Ok(found?.is_some())
}

/// `CREATE SCHEMA IF NOT EXISTS` is not safe to run concurrently on PostgreSQL: two servers that both find the
/// schema missing both insert it into `pg_namespace`, and the second fails on the unique index. Taking the
/// migrations' lock first makes the second find it. One connection of its own, so that the statement runs in
/// the session that holds the lock.
async fn create_schema(url: &str, schema: &str) -> Result<()> {
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(url).await?;
    let created = async {
        conn.execute(sql!("SELECT pg_advisory_lock({})", migrate::PG_MIGRATION_LOCK)).await?;
        conn.execute(sql!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"")).await?;
        conn.execute(sql!("SELECT pg_advisory_unlock({})", migrate::PG_MIGRATION_LOCK)).await
    }
    .await;
    // Ending the session releases the lock too, should the statements above have failed while holding it.
    let closed = sqlx::Connection::close(conn).await;
    created?;
    closed?;
    Ok(())
}

fn valid_schema_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
}

/// Never echo a password from a connection string into logs or errors: neither in the user info (everything up to
/// the last `@` before the query, as URL parsers read it, since a password may hold `@`) nor as libpq's
/// `password=` parameter.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else { return url.to_string() };
    let (scheme, rest) = url.split_at(scheme_end + "://".len());
    let (location, query) = rest.split_at(rest.find('?').unwrap_or(rest.len()));
    let location = match location.rfind('@') {
        Some(at) => format!("***{}", &location[at..]),
        None => location.to_string(),
    };
    let query = query.split_inclusive(['?', '&']).map(|part| {
        let (name, _) = part.split_once('=').unwrap_or((part, ""));
        if name.eq_ignore_ascii_case("password") {
            let separator = if part.ends_with('&') { "&" } else { "" };
            format!("{name}=***{separator}")
        } else {
            part.to_string()
        }
    });
    format!("{scheme}{location}{}", query.collect::<String>())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SQLite's plan for `sql` (parameters unbound), one `detail` line per step: what the planning tests assert on.
    pub(crate) async fn query_plan(store: &Store, sql: &str) -> Vec<String> {
        let rows = sqlx::query(sql!("EXPLAIN QUERY PLAN {sql}")).fetch_all(store.pool()).await.unwrap();
        rows.iter().map(|row| row.try_get::<String, _>("detail").unwrap()).collect()
    }

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
                assert_eq!(pages, i64::from(WAL_LIMIT_PAGES));
                held.push(conn);
            }
        }
        assert_eq!("FULL".parse::<SqliteSync>(), Ok(SqliteSync::Full));
        assert!("fsync".parse::<SqliteSync>().is_err());
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("postgres://u:secret@h/db"), "postgres://***@h/db");
        assert_eq!(redact_url("postgres://app:p@ss@db/prod"), "postgres://***@db/prod");
        assert_eq!(
            redact_url("postgres://u:a/b@c@h:5432/db?sslmode=require"),
            "postgres://***@h:5432/db?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://h/db?user=u&password=s3cret&sslmode=require"),
            "postgres://h/db?user=u&password=***&sslmode=require"
        );
        assert_eq!(redact_url("postgres://h/db?PASSWORD=x"), "postgres://h/db?PASSWORD=***");
        assert_eq!(redact_url("sqlite://x.db"), "sqlite://x.db");
    }

    /// Only a plain file gets the writer's own connection; what SQLite would read as a URI or keep in memory
    /// stays with the pool.
    #[test]
    fn only_plain_files_get_the_writers_connection() {
        let file = |url: &str| sqlite_file(url).unwrap();
        assert_eq!(file("sqlite:///tmp/x.db?mode=rwc"), Some(std::path::PathBuf::from("/tmp/x.db")));
        assert_eq!(file("sqlite://data/x.db"), Some(std::path::PathBuf::from("data/x.db")));
        assert_eq!(file("sqlite::memory:"), None);
        assert_eq!(file("sqlite://shared?mode=memory"), None);
        assert_eq!(file("sqlite://file:x.db"), None);
    }
}

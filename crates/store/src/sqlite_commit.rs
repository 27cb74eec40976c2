//! SQLite decision commits made by the inserting callers themselves, in turn, on one connection.
//!
//! A background writer task costs every decision four hand-offs: handler → writer task → sqlx's connection
//! thread → writer task → handler, two of which wake a sleeping OS thread. With the server, its clients and its
//! backend sharing a few cores, those wake-ups waited for a core and made the tail of the store stage.
//!
//! Here the caller that finds the connection free becomes the leader: it commits every row that is waiting, its
//! own among them, on its own thread, and answers the others. A caller that finds the connection taken queues
//! its row and waits; the leader looks at the queue again after it lets go, so no row is left behind. Batches
//! still form by themselves, as with the task: whatever queued during one commit goes into the next.
//!
//! A commit here runs synchronously inside the leader's poll, so it cannot be cut off part-way when a client
//! disconnects and its handler is dropped. It also blocks a runtime worker, which is fine only while a commit is
//! a write to the log: with `synchronous = FULL` (a disk flush per commit), and whenever SQLite's write lock is
//! held by someone else (the checkpointer's restart, a job or review update), the rows go to a blocking thread
//! that may wait.
//!
//! For the same reason SQLite's own checkpoint trigger is off on this connection: it would run a checkpoint (a
//! copy of the whole log and a flush) inside whichever commit crossed it, on a runtime worker. The connection's
//! WAL hook reports the log's size after each commit instead, and once it reaches the limit the next rows go to a
//! blocking thread, which checkpoints before it commits. The background checkpointer keeps the log far below that
//! limit; this is the bound for when it falls behind.
//!
//! The connection is rusqlite's over the same libsqlite3 that sqlx links, so the process has one SQLite library
//! and one set of file locks.

use std::cell::Cell;
use std::collections::VecDeque;
use std::ffi::c_int;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::Duration;

use rusqlite::hooks::Wal;
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, ErrorCode, OpenFlags, ToSql, TransactionBehavior, params, params_from_iter};

use crate::decisions::{
    ColumnValue, INSERT_DECISION, INSERT_POLICY_LINK, INSERT_REASONING, decision_values, policy_links,
};
use crate::group_commit::{Counters, Pending, Settled, settle};
use crate::{BUSY_TIMEOUT_MS, DecisionRecord, Result, SqliteSync, StoreError, to_json};

/// Batches one runtime-worker leader commits before it passes the rest to a blocking thread, so that a caller
/// who happened to lead during a burst gets its own answer without waiting for the burst to end.
const INLINE_ROUNDS: usize = 4;

/// Where and how the decision writer commits.
pub(crate) struct SqliteWriter<'a> {
    pub(crate) path: &'a Path,
    pub(crate) sync: SqliteSync,
    /// Log size, in pages, at which the writer checkpoints before its next commit.
    pub(crate) wal_limit_pages: u32,
}

pub(crate) struct SqliteCommitter {
    path: PathBuf,
    sync: SqliteSync,
    wal_limit_pages: u32,
    /// Pages in the write-ahead log after the last commit on this connection (as its WAL hook said), or 0 after
    /// a checkpoint that copied the whole log, which the next commit then starts over.
    log_pages: AtomicU32,
    max_batch: usize,
    queue: Mutex<VecDeque<Pending>>,
    connection: Mutex<Slot>,
    /// A blocking-thread leader has been asked for and has not taken the connection yet; until it does, callers
    /// leave their rows to it instead of trying (and failing) the write lock themselves.
    waiting_leader: AtomicBool,
    counters: Arc<Counters>,
}

enum Slot {
    Unopened,
    Open(Connection),
    Closed,
}

/// How long a leader may wait for SQLite's write lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Patience {
    /// On a runtime worker: not at all.
    None,
    /// On a thread that may block: the store's busy timeout.
    Wait,
}

/// Why a batch was not committed by this leader.
enum Deferred {
    /// The write lock was taken and this leader may not wait; nothing was written.
    Busy(Vec<Pending>),
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding either lock leaves nothing half-done that matters: the queue is a list, and an open
    // transaction on the connection rolls back when the connection is next used or closed.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SqliteCommitter {
    pub(crate) fn new(writer: SqliteWriter<'_>, max_batch: usize, counters: Arc<Counters>) -> Arc<Self> {
        Arc::new(SqliteCommitter {
            path: writer.path.to_path_buf(),
            sync: writer.sync,
            wal_limit_pages: writer.wal_limit_pages,
            log_pages: AtomicU32::new(0),
            max_batch: max_batch.max(1),
            queue: Mutex::new(VecDeque::new()),
            connection: Mutex::new(Slot::Unopened),
            waiting_leader: AtomicBool::new(false),
            counters,
        })
    }

    /// Stores one decision; returns once the transaction that holds it committed.
    pub(crate) async fn insert(
        self: &Arc<Self>,
        decision: &DecisionRecord,
        reasoning: Option<&[String]>,
    ) -> Result<()> {
        let (committed, outcome) = tokio::sync::oneshot::channel();
        lock(&self.queue).push_back(Pending {
            decision: decision.clone(),
            reasoning: reasoning.map(<[String]>::to_vec),
            committed,
        });
        if self.waiting_leader.load(Ordering::SeqCst) {
            // A blocking-thread leader is on its way and takes every queued row once it holds the connection.
        } else if self.sync == SqliteSync::Full || self.log_is_full() {
            self.hand_off();
        } else {
            self.lead_inline();
        }
        // A dropped reply means the committer went away with the row queued; it was not written.
        outcome.await.unwrap_or(Err(StoreError::WriterStopped))
    }

    /// Closes the connection; rows queued now, and inserts from now on, fail with [`StoreError::Closed`].
    pub(crate) fn close(&self) {
        *lock(&self.connection) = Slot::Closed;
        let queued: Vec<Pending> = lock(&self.queue).drain(..).collect();
        for pending in queued {
            let _ = pending.committed.send(Err(StoreError::Closed));
        }
    }

    /// Leads on a runtime worker if the connection is free; otherwise its holder will see the queued row.
    fn lead_inline(self: &Arc<Self>) {
        let mut rounds = 0;
        loop {
            let mut connection = match self.connection.try_lock() {
                Ok(connection) => connection,
                Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
                Err(TryLockError::WouldBlock) => return,
            };
            loop {
                if rounds == INLINE_ROUNDS || self.log_is_full() {
                    drop(connection);
                    if !lock(&self.queue).is_empty() {
                        self.hand_off();
                    }
                    return;
                }
                let batch = self.take_batch();
                if batch.is_empty() {
                    break;
                }
                rounds += 1;
                if let Err(Deferred::Busy(batch)) = self.commit(&mut connection, batch, Patience::None) {
                    self.requeue(batch);
                    drop(connection);
                    self.hand_off();
                    return;
                }
            }
            drop(connection);
            // Rows queued while this leader held the connection were left to it by callers that found it taken.
            // A blocking-thread leader on its way takes them instead.
            if lock(&self.queue).is_empty() || self.waiting_leader.load(Ordering::SeqCst) {
                return;
            }
        }
    }

    /// Asks a blocking thread to lead, waiting for the connection and for SQLite's write lock as long as needed.
    fn hand_off(self: &Arc<Self>) {
        self.waiting_leader.store(true, Ordering::SeqCst);
        let this = Arc::clone(self);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn_blocking(move || this.lead_patiently());
            }
            // No runtime to lend a thread: this caller's thread is the one that may block.
            Err(_) => this.lead_patiently(),
        }
    }

    fn lead_patiently(&self) {
        loop {
            let mut connection = lock(&self.connection);
            // From here every queued row is this leader's to commit, so callers may lead again themselves.
            self.waiting_leader.store(false, Ordering::SeqCst);
            loop {
                if self.log_is_full() {
                    self.checkpoint(&mut connection);
                }
                let batch = self.take_batch();
                if batch.is_empty() {
                    break;
                }
                // A patient leader is never deferred.
                let _ = self.commit(&mut connection, batch, Patience::Wait);
            }
            drop(connection);
            if lock(&self.queue).is_empty() {
                return;
            }
        }
    }

    fn log_is_full(&self) -> bool {
        self.log_pages.load(Ordering::Relaxed) >= self.wal_limit_pages
    }

    /// Copies the log into the database, as SQLite's own trigger would have inside the commit: passively, so it
    /// neither waits for nor holds back readers. If a reader still needs part of the log, the next commit (again
    /// on a blocking thread) tries again.
    fn checkpoint(&self, slot: &mut Slot) {
        let Ok(connection) = self.open(slot) else {
            // The commit that follows reports why the connection is missing.
            return;
        };
        let copied = connection
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?)));
        self.counters.log_limit_checkpoints.fetch_add(1, Ordering::Relaxed);
        match copied {
            Ok((log, copied)) if copied >= log => self.log_pages.store(0, Ordering::Relaxed),
            Ok((log, copied)) => tracing::debug!(log, copied, "the log's limit checkpoint left frames a reader needs"),
            Err(error) => tracing::warn!(%error, "the write-ahead log is over its limit and could not be checkpointed"),
        }
    }

    fn take_batch(&self) -> Vec<Pending> {
        let mut queue = lock(&self.queue);
        let take = queue.len().min(self.max_batch);
        queue.drain(..take).collect()
    }

    fn requeue(&self, batch: Vec<Pending>) {
        let mut queue = lock(&self.queue);
        for pending in batch.into_iter().rev() {
            queue.push_front(pending);
        }
    }

    /// Commits `batch` in one transaction and answers each caller; one bad row (a duplicate id, say) is found by
    /// writing the rows one by one, so that it fails alone.
    fn commit(&self, slot: &mut Slot, batch: Vec<Pending>, patience: Patience) -> std::result::Result<(), Deferred> {
        let connection = match self.open(slot) {
            Ok(connection) => connection,
            Err(failure) => {
                for pending in batch {
                    let _ = pending.committed.send(Err(failure.to_error()));
                }
                return Ok(());
            }
        };
        let result = write(connection, &batch, patience);
        self.note_log_pages();
        if is_busy(&result) && patience == Patience::None {
            return Err(Deferred::Busy(batch));
        }
        self.counters.commits.fetch_add(1, Ordering::Relaxed);
        self.counters.rows.fetch_add(batch.len() as u64, Ordering::Relaxed);
        if let Settled::RetryOneByOne(batch) = settle(batch, result.map_err(StoreError::from)) {
            let mut rows = batch.into_iter();
            while let Some(pending) = rows.next() {
                let result = write(connection, std::slice::from_ref(&pending), patience);
                self.note_log_pages();
                if is_busy(&result) && patience == Patience::None {
                    return Err(Deferred::Busy(std::iter::once(pending).chain(rows).collect()));
                }
                let _ = pending.committed.send(result.map_err(StoreError::from));
            }
        }
        Ok(())
    }

    /// Takes what the WAL hook reported for the commit that just ran on this thread, if it wrote to the log.
    fn note_log_pages(&self) {
        if let Some(pages) = LOG_PAGES_AFTER_COMMIT.take() {
            self.log_pages.store(pages, Ordering::Relaxed);
        }
    }

    fn open<'slot>(&self, slot: &'slot mut Slot) -> std::result::Result<&'slot mut Connection, OpenFailure> {
        // A failed statement rolls its transaction back; should the rollback itself have failed, the connection
        // was left inside a transaction, and only closing it ends that.
        if matches!(slot, Slot::Open(connection) if !connection.is_autocommit()) {
            *slot = Slot::Unopened;
        }
        if matches!(slot, Slot::Unopened) {
            *slot = Slot::Open(open_connection(&self.path, self.sync).map_err(OpenFailure::Failed)?);
        }
        match slot {
            Slot::Open(connection) => Ok(connection),
            Slot::Closed | Slot::Unopened => Err(OpenFailure::Closed),
        }
    }
}

/// Why the writer has no connection, told to every caller of the batch.
enum OpenFailure {
    Closed,
    Failed(String),
}

impl OpenFailure {
    fn to_error(&self) -> StoreError {
        match self {
            OpenFailure::Closed => StoreError::Closed,
            OpenFailure::Failed(why) => StoreError::SqliteOpen(why.clone()),
        }
    }
}

thread_local! {
    /// Set by [`record_log_pages`] inside a commit, taken right after it on the same thread
    /// ([`SqliteCommitter::note_log_pages`]). The hook is a plain function, so this is how its number gets out.
    static LOG_PAGES_AFTER_COMMIT: Cell<Option<u32>> = const { Cell::new(None) };
}

/// The writer connection's WAL hook: SQLite calls it after each commit that wrote to the log, with the log's size.
/// Registering it replaces SQLite's own checkpoint trigger (itself a WAL hook) on this connection.
fn record_log_pages(_log: &Wal, pages: c_int) -> rusqlite::Result<()> {
    LOG_PAGES_AFTER_COMMIT.set(Some(u32::try_from(pages).unwrap_or(0)));
    Ok(())
}

/// The writer's connection, set up as the pool's connections are (see `Store::connect`), minus the page size,
/// which only a new file takes and the pool has set by now, and with the log's limit kept by the committer
/// rather than by SQLite's trigger.
fn open_connection(path: &Path, sync: SqliteSync) -> std::result::Result<Connection, String> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let open = || -> rusqlite::Result<(Connection, String)> {
        let connection = Connection::open_with_flags(path, flags)?;
        // sqlx turns foreign keys on for its connections; this one must hold rows to the same rules.
        connection.execute_batch(&format!("PRAGMA foreign_keys = ON; {};", sync.pragma()))?;
        let mode: String = connection.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
        connection.wal_hook(Some(record_log_pages));
        Ok((connection, mode))
    };
    let failed = |why: String| format!("{}: {why}", path.display());
    let (connection, mode) = open().map_err(|error| failed(error.to_string()))?;
    if !mode.eq_ignore_ascii_case("wal") {
        // Readers would block the writer and the checkpointer would do nothing: not the database we set up.
        return Err(failed(format!("journal mode is {mode}, not WAL")));
    }
    Ok(connection)
}

fn is_busy(result: &rusqlite::Result<()>) -> bool {
    matches!(result, Err(rusqlite::Error::SqliteFailure(error, _))
        if matches!(error.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked))
}

fn write(connection: &mut Connection, rows: &[Pending], patience: Patience) -> rusqlite::Result<()> {
    connection.busy_timeout(match patience {
        Patience::None => Duration::ZERO,
        Patience::Wait => Duration::from_millis(u64::from(BUSY_TIMEOUT_MS)),
    })?;
    // Dropped without a commit (any `?` below), the transaction rolls back.
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    for Pending { decision, reasoning, .. } in rows {
        transaction.prepare_cached(&INSERT_DECISION)?.execute(params_from_iter(decision_values(decision)))?;
        let mut link = transaction.prepare_cached(&INSERT_POLICY_LINK)?;
        for (hash, name) in policy_links(decision) {
            link.execute(params![decision.id, hash, name])?;
        }
        drop(link);
        if let Some(reasoning) = reasoning.as_deref().filter(|r| !r.is_empty()) {
            transaction.prepare_cached(&INSERT_REASONING)?.execute(params![decision.id, to_json(&reasoning)])?;
        }
    }
    transaction.commit()
}

impl ToSql for ColumnValue<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            ColumnValue::Text(text) | ColumnValue::OptionalText(Some(text)) => ValueRef::Text(text.as_bytes()),
            ColumnValue::OptionalText(None) => ValueRef::Null,
            ColumnValue::Json(json) => ValueRef::Text(json.as_bytes()),
            ColumnValue::Integer(number) => ValueRef::Integer(*number),
        }))
    }
}

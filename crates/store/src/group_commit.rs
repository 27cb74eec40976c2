//! Group commit for decision inserts.
//!
//! Every decision is stored before it is answered, and a commit may be a disk flush (SQLite with
//! `synchronous = FULL`, PostgreSQL's WAL flush with `synchronous_commit = on`). One transaction per decision
//! makes that flush the cost of every request. Instead, one writer at a time takes every insert that is waiting,
//! writes them in one transaction and commits once; each caller still awaits its own row's commit, so nothing is
//! acknowledged before it is durable.
//!
//! Batches form by themselves: whatever arrived while the previous commit ran goes into the next one, so the
//! slower the commit, the bigger the batch, and an idle server pays no waiting. The writer can also linger for
//! more rows once a second one is waiting; that is off by default, because a tokio timer rounds up to a whole
//! millisecond, more than a commit costs unless every commit waits for the disk.
//!
//! On a SQLite file there is no writer task: the inserting callers commit in turn on a connection of their own
//! (see [`crate::sqlite_commit`]). The task serves PostgreSQL, whose commits are network round trips that must
//! not be cut off by a dropped handler, and in-memory SQLite, which only sqlx's pool can reach.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::AnyPool;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::decisions::{insert_decision_tx, insert_decisions_sqlite};
use crate::sqlite_commit::{SqliteCommitter, SqliteWriter};
use crate::{Backend, DecisionRecord, Result, StoreError};

/// How decision inserts are batched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupCommit {
    /// Most rows in one transaction.
    pub max_batch: usize,
    /// Once a second insert is already waiting, how long to gather more before committing (the writer task
    /// only; on a SQLite file the committing caller never waits for more).
    pub linger: Duration,
    /// Off: every insert is its own transaction (as before group commit), e.g. to compare the two.
    pub enabled: bool,
    /// How long one transaction on a pooled connection (PostgreSQL, in-memory SQLite) may take before its callers
    /// hear that its outcome is unknown ([`COMMIT_TIMEOUT`]).
    pub commit_timeout: Duration,
}

impl Default for GroupCommit {
    fn default() -> Self {
        GroupCommit { max_batch: 128, linger: Duration::ZERO, enabled: true, commit_timeout: COMMIT_TIMEOUT }
    }
}

pub(crate) struct Pending {
    pub(crate) decision: DecisionRecord,
    pub(crate) reasoning: Option<Vec<String>>,
    pub(crate) committed: oneshot::Sender<Result<()>>,
}

/// Transactions and rows written by group commit since the store opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupCommitStats {
    pub commits: u64,
    pub rows: u64,
    /// SQLite file only: checkpoints the decision writer ran because the write-ahead log reached its limit
    /// (`StoreOptions::wal_limit_pages`), i.e. the background checkpointer had fallen behind.
    pub log_limit_checkpoints: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) commits: AtomicU64,
    pub(crate) rows: AtomicU64,
    pub(crate) log_limit_checkpoints: AtomicU64,
}

/// The handle inserts go through; cheap to clone with the store.
#[derive(Clone)]
pub(crate) struct DecisionWriter {
    route: Route,
    counters: Arc<Counters>,
    backend: Backend,
    commit_timeout: Duration,
}

#[derive(Clone)]
enum Route {
    /// Group commit off, or no runtime to run the writer task on: each insert is its own transaction.
    OneByOne,
    /// A background task commits whatever is waiting on a pooled connection.
    Task(mpsc::UnboundedSender<Pending>),
    /// A SQLite file: the callers commit in turn on the committer's connection.
    Inline(Arc<SqliteCommitter>),
}

impl DecisionWriter {
    /// Sets up group commit: inline on a SQLite file (`sqlite_file`), otherwise a writer task on the current
    /// tokio runtime. With group commit off, or without a runtime for the task, inserts commit one by one.
    pub(crate) fn start(
        pool: AnyPool,
        backend: Backend,
        config: GroupCommit,
        sqlite_file: Option<SqliteWriter<'_>>,
    ) -> Self {
        let counters = Arc::new(Counters::default());
        let route = match sqlite_file {
            _ if !config.enabled => Route::OneByOne,
            Some(writer) => Route::Inline(SqliteCommitter::new(writer, config.max_batch, Arc::clone(&counters))),
            None if tokio::runtime::Handle::try_current().is_err() => Route::OneByOne,
            None => {
                let (sender, receiver) = mpsc::unbounded_channel();
                tokio::spawn(run(pool, backend, receiver, config, Arc::clone(&counters)));
                Route::Task(sender)
            }
        };
        DecisionWriter { route, counters, backend, commit_timeout: config.commit_timeout }
    }

    /// Stops inline commits (the task stops by itself when the pool closes).
    ///
    /// Closing waits for the connection, which a blocking-thread leader may hold for as long as the busy timeout
    /// while another writer has the lock. That wait happens on a blocking thread, not on a runtime worker.
    pub(crate) async fn close(&self) {
        if let Route::Inline(committer) = &self.route {
            let committer = Arc::clone(committer);
            if tokio::task::spawn_blocking(move || committer.close()).await.is_err() {
                tracing::warn!("closing the SQLite decision writer panicked; its connection is dropped with the store");
            }
        }
    }

    pub(crate) fn stats(&self) -> GroupCommitStats {
        GroupCommitStats {
            commits: self.counters.commits.load(Ordering::Relaxed),
            rows: self.counters.rows.load(Ordering::Relaxed),
            log_limit_checkpoints: self.counters.log_limit_checkpoints.load(Ordering::Relaxed),
        }
    }

    /// Stores one decision through the writer; returns once its transaction committed.
    pub(crate) async fn insert(
        &self,
        pool: &AnyPool,
        decision: &DecisionRecord,
        reasoning: Option<&[String]>,
    ) -> Result<()> {
        let sender = match &self.route {
            Route::OneByOne => return write(pool, self.backend, self.commit_timeout, &[(decision, reasoning)]).await,
            Route::Inline(committer) => return committer.insert(decision, reasoning).await,
            Route::Task(sender) => sender,
        };
        let (committed, outcome) = oneshot::channel();
        let pending = Pending { decision: decision.clone(), reasoning: reasoning.map(<[String]>::to_vec), committed };
        if let Err(mpsc::error::SendError(pending)) = sender.send(pending) {
            // The writer's runtime is gone (a store kept past it): write directly.
            let row = (&pending.decision, pending.reasoning.as_deref());
            return write(pool, self.backend, self.commit_timeout, &[row]).await;
        }
        // A dropped reply means the writer stopped mid-batch; whether the row landed is unknown, so it is not
        // acknowledged.
        outcome.await.unwrap_or(Err(StoreError::WriterStopped))
    }
}

async fn run(
    pool: AnyPool,
    backend: Backend,
    mut receiver: mpsc::UnboundedReceiver<Pending>,
    config: GroupCommit,
    counters: Arc<Counters>,
) {
    let max_batch = config.max_batch.max(1);
    let closing = pool.close_event();
    tokio::pin!(closing);
    loop {
        let first = tokio::select! {
            next = receiver.recv() => next,
            // An insert after `Pool::close` must find the writer gone and report the closed pool rather than wait
            // on a writer that will not answer.
            () = &mut closing => None,
        };
        let Some(first) = first else { break };
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match receiver.try_recv() {
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
        if batch.len() > 1 && !config.linger.is_zero() {
            let deadline = Instant::now() + config.linger;
            while batch.len() < max_batch {
                match tokio::time::timeout_at(deadline, receiver.recv()).await {
                    Ok(Some(pending)) => batch.push(pending),
                    Ok(None) | Err(_) => break,
                }
            }
        }
        counters.commits.fetch_add(1, Ordering::Relaxed);
        counters.rows.fetch_add(batch.len() as u64, Ordering::Relaxed);
        commit(&pool, backend, config.commit_timeout, batch).await;
    }
}

/// How long one commit may take by default before its callers hear that its outcome is unknown. A connection
/// whose packets vanish (no reply, no reset) would otherwise hold the one writer, and every insert queued behind
/// it, until the kernel gives up on the TCP connection: about 15 minutes.
pub(crate) const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Writes `rows` in one transaction on a pooled connection, or gives up after `timeout`.
async fn write(
    pool: &AnyPool,
    backend: Backend,
    timeout: Duration,
    rows: &[(&DecisionRecord, Option<&[String]>)],
) -> Result<()> {
    tokio::time::timeout(timeout, write_now(pool, backend, rows))
        .await
        .unwrap_or(Err(StoreError::CommitTimedOut(timeout)))
}

async fn write_now(pool: &AnyPool, backend: Backend, rows: &[(&DecisionRecord, Option<&[String]>)]) -> Result<()> {
    if backend == Backend::Sqlite {
        return insert_decisions_sqlite(&mut pool.acquire().await?, rows).await;
    }
    let mut tx = pool.begin().await?;
    for (decision, reasoning) in rows {
        insert_decision_tx(&mut tx, decision, *reasoning).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// What a group commit's result means for its callers.
pub(crate) enum Settled {
    /// Every caller has its answer.
    Answered,
    /// The batch failed as a whole: its rows must be written one by one, so that a bad row (a duplicate id, say)
    /// fails alone instead of failing its neighbours.
    RetryOneByOne(Vec<Pending>),
}

pub(crate) fn settle(batch: Vec<Pending>, result: Result<()>) -> Settled {
    match result {
        Ok(()) => {
            for pending in batch {
                let _ = pending.committed.send(Ok(()));
            }
            Settled::Answered
        }
        Err(error) if batch.len() == 1 => {
            if let Some(pending) = batch.into_iter().next() {
                let _ = pending.committed.send(Err(error));
            }
            Settled::Answered
        }
        Err(error) if error.is_row_specific() => {
            tracing::debug!(%error, rows = batch.len(), "group commit failed; writing its rows one by one");
            Settled::RetryOneByOne(batch)
        }
        // A lock or an outage fails every row alike: trying them one by one would make the last caller wait out
        // the same failure once per row.
        Err(error) => {
            tracing::warn!(%error, rows = batch.len(), "group commit failed");
            let shared = error.to_string();
            for pending in batch {
                let _ = pending.committed.send(Err(StoreError::BatchFailed(shared.clone())));
            }
            Settled::Answered
        }
    }
}

#[tracing::instrument(skip_all, fields(rows = batch.len()))]
async fn commit(pool: &AnyPool, backend: Backend, timeout: Duration, batch: Vec<Pending>) {
    let result = {
        let rows: Vec<_> = batch.iter().map(|p| (&p.decision, p.reasoning.as_deref())).collect();
        write(pool, backend, timeout, &rows).await
    };
    if let Settled::RetryOneByOne(batch) = settle(batch, result) {
        for pending in batch {
            let result = write(pool, backend, timeout, &[(&pending.decision, pending.reasoning.as_deref())]).await;
            let _ = pending.committed.send(result);
        }
    }
}

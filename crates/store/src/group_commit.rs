//! Group commit for decision inserts.
//!
//! Every decision is stored before it is answered, and a commit may be a disk flush (SQLite with
//! `synchronous = FULL`, PostgreSQL's WAL flush with `synchronous_commit = on`). One transaction per decision
//! makes that flush the cost of every request. Instead, one background writer takes every insert that is
//! waiting, writes them in one transaction and commits once; each caller still awaits its own row's commit, so
//! nothing is acknowledged before it is durable.
//!
//! Batches form by themselves: whatever arrived while the previous commit ran goes into the next one, so the
//! slower the commit, the bigger the batch, and an idle server pays no waiting. The writer can also linger for
//! more rows once a second one is waiting; that is off by default, because a tokio timer rounds up to a whole
//! millisecond, more than a commit costs unless every commit waits for the disk.
//!
//! On SQLite the writer keeps one connection for all its commits. A SQLite connection empties its page cache
//! whenever another connection wrote since its own last transaction, and the pool hands out its idle
//! connections in turn, so each commit on a pooled connection first read back every page it was about to
//! change (about 13 per decision, one system call each) and emptied its cache again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyPool};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::decisions::{insert_decision_tx, insert_decisions_sqlite};
use crate::{Backend, DecisionRecord, Result, StoreError};

/// How decision inserts are batched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupCommit {
    /// Most rows in one transaction.
    pub max_batch: usize,
    /// Once a second insert is already waiting, how long to gather more before committing.
    pub linger: Duration,
    /// Off: every insert is its own transaction (as before group commit), e.g. to compare the two.
    pub enabled: bool,
}

impl Default for GroupCommit {
    fn default() -> Self {
        GroupCommit { max_batch: 128, linger: Duration::ZERO, enabled: true }
    }
}

struct Pending {
    decision: DecisionRecord,
    reasoning: Option<Vec<String>>,
    committed: oneshot::Sender<Result<()>>,
}

/// Transactions and rows written by group commit since the store opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupCommitStats {
    pub commits: u64,
    pub rows: u64,
}

#[derive(Default)]
struct Counters {
    commits: AtomicU64,
    rows: AtomicU64,
}

/// The handle inserts go through; cheap to clone with the store.
#[derive(Clone)]
pub(crate) struct DecisionWriter {
    sender: Option<mpsc::UnboundedSender<Pending>>,
    counters: Arc<Counters>,
    backend: Backend,
}

impl DecisionWriter {
    /// Starts the writer on the current tokio runtime. Without one (or with group commit off), inserts
    /// commit one by one.
    pub(crate) fn start(pool: AnyPool, backend: Backend, config: GroupCommit) -> Self {
        let counters = Arc::new(Counters::default());
        if !config.enabled || tokio::runtime::Handle::try_current().is_err() {
            return DecisionWriter { sender: None, counters, backend };
        }
        let (sender, receiver) = mpsc::unbounded_channel();
        tokio::spawn(run(pool, backend, receiver, config, Arc::clone(&counters)));
        DecisionWriter { sender: Some(sender), counters, backend }
    }

    pub(crate) fn stats(&self) -> GroupCommitStats {
        GroupCommitStats {
            commits: self.counters.commits.load(Ordering::Relaxed),
            rows: self.counters.rows.load(Ordering::Relaxed),
        }
    }

    /// Stores one decision through the writer; returns once its transaction committed.
    pub(crate) async fn insert(
        &self,
        pool: &AnyPool,
        decision: &DecisionRecord,
        reasoning: Option<&[String]>,
    ) -> Result<()> {
        let Some(sender) = &self.sender else {
            return write_one(pool, self.backend, decision, reasoning).await;
        };
        let (committed, outcome) = oneshot::channel();
        let pending = Pending { decision: decision.clone(), reasoning: reasoning.map(<[String]>::to_vec), committed };
        if let Err(mpsc::error::SendError(pending)) = sender.send(pending) {
            // The writer's runtime is gone (a store kept past it): write directly.
            return write_one(pool, self.backend, &pending.decision, pending.reasoning.as_deref()).await;
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
    // With a single connection in the pool, holding it would starve every other query.
    let mut writer_connection =
        WriterConnection { held: None, keep: backend == Backend::Sqlite && pool.options().get_max_connections() > 1 };
    let closing = pool.close_event();
    tokio::pin!(closing);
    loop {
        let first = tokio::select! {
            next = receiver.recv() => next,
            // `Pool::close` waits for every connection to come back, the held one included.
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
        commit(&pool, backend, &mut writer_connection, batch).await;
    }
    // The queue goes first: once the held connection is back, `Pool::close` returns, and an insert after that
    // must find the writer gone and report the closed pool rather than wait on a writer that will not answer.
    drop(receiver);
    drop(writer_connection);
}

/// Where the writer's transactions run: on SQLite, one connection taken from the pool at the first commit and
/// kept while commits succeed (see the module docs); on PostgreSQL, whichever connection the pool hands out.
struct WriterConnection {
    held: Option<PoolConnection<Any>>,
    keep: bool,
}

impl WriterConnection {
    /// For an insert made without the writer: nothing is kept after it.
    fn unkept() -> Self {
        WriterConnection { held: None, keep: false }
    }

    /// Writes `rows` in one transaction.
    async fn write(
        &mut self,
        pool: &AnyPool,
        backend: Backend,
        rows: &[(&DecisionRecord, Option<&[String]>)],
    ) -> Result<()> {
        if backend == Backend::Postgres {
            let mut tx = pool.begin().await?;
            for (decision, reasoning) in rows {
                insert_decision_tx(&mut tx, decision, *reasoning).await?;
            }
            tx.commit().await?;
            return Ok(());
        }
        let mut conn = match self.held.take() {
            Some(conn) => conn,
            None => pool.acquire().await?,
        };
        let result = insert_decisions_sqlite(&mut conn, rows).await;
        // After a failure the connection is marked to close; dropping it here does that, and the next commit
        // takes a fresh one.
        if result.is_ok() && self.keep {
            self.held = Some(conn);
        }
        result
    }
}

#[tracing::instrument(skip_all, fields(rows = batch.len()))]
async fn commit(pool: &AnyPool, backend: Backend, writer: &mut WriterConnection, batch: Vec<Pending>) {
    let result = {
        let rows: Vec<_> = batch.iter().map(|p| (&p.decision, p.reasoning.as_deref())).collect();
        writer.write(pool, backend, &rows).await
    };
    match result {
        Ok(()) => {
            for pending in batch {
                let _ = pending.committed.send(Ok(()));
            }
        }
        Err(error) if batch.len() == 1 => {
            if let Some(pending) = batch.into_iter().next() {
                let _ = pending.committed.send(Err(error));
            }
        }
        Err(error) => {
            // One bad row (a duplicate id, say) must not fail its neighbours: write each alone so that every
            // caller gets its own answer.
            tracing::debug!(%error, "group commit failed; writing its rows one by one");
            for pending in batch {
                let result = writer.write(pool, backend, &[(&pending.decision, pending.reasoning.as_deref())]).await;
                let _ = pending.committed.send(result);
            }
        }
    }
}

pub(crate) async fn write_one(
    pool: &AnyPool,
    backend: Backend,
    decision: &DecisionRecord,
    reasoning: Option<&[String]>,
) -> Result<()> {
    WriterConnection::unkept().write(pool, backend, &[(decision, reasoning)]).await
}

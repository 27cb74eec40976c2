//! Every test runs against SQLite and, when reachable, PostgreSQL (in a throwaway schema).

use std::sync::Arc;

use safeguard_store::{
    DecisionFilter, DecisionRecord, JobStatus, Migrations, NewDelivery, NewJob, NewReview, PolicyListing, Store,
    StoreError, StoreOptions, now_ms,
};
use serde_json::json;

const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

struct TestStore {
    store: Store,
    label: &'static str,
    _dir: Option<tempfile::TempDir>,
    pg_schema: Option<(String, String)>,
}

impl TestStore {
    async fn cleanup(self) {
        self.store.close().await;
        if let Some((url, schema)) = self.pg_schema {
            Store::drop_schema(&url, &schema).await.expect("drop test schema");
        }
    }
}

async fn stores() -> Vec<TestStore> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Store::open_sqlite(&dir.path().join("test.db")).await.unwrap();
    let mut out = vec![TestStore { store: sqlite, label: "sqlite", _dir: Some(dir), pg_schema: None }];
    let url = std::env::var("SAFEGUARD_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_string());
    let schema = format!(
        "sgtest_{}_{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
    );
    let options = StoreOptions { schema: Some(schema.clone()), max_connections: 8, ..Default::default() };
    match tokio::time::timeout(std::time::Duration::from_secs(5), Store::connect(&url, options)).await {
        Ok(Ok(store)) => out.push(TestStore { store, label: "postgres", _dir: None, pg_schema: Some((url, schema)) }),
        Ok(Err(err)) => {
            eprintln!("SKIPPING PostgreSQL half of this test: {url} unreachable: {err}")
        }
        Err(_) => eprintln!("SKIPPING PostgreSQL half of this test: {url} timed out"),
    }
    out
}

fn decision(id: &str, outcome: &str, policy: &str, job_id: Option<&str>) -> DecisionRecord {
    DecisionRecord {
        id: id.to_string(),
        created_at: now_ms(),
        policy_hashes: vec![format!("sha256:{policy}hash")],
        policy_names: vec![policy.to_string()],
        model_id: "tiny".into(),
        effort: "low".into(),
        prompt_hash: Some("abc".into()),
        sampling: json!({"greedy": true}),
        content: json!({"kind": "text", "text": "hello"}),
        verdicts: json!([{"policy": policy, "outcome": outcome}]),
        outcome: outcome.into(),
        failure_reason: None,
        timings: json!({"total_ms": 1.5}),
        prompt_tokens: 10,
        cached_prompt_tokens: 4,
        completion_tokens: 3,
        source: "api".into(),
        job_id: job_id.map(str::to_string),
        replay_of: None,
        submitted_by: None,
    }
}

/// Concurrent inserts share transactions, every caller's row is stored with its reasoning once its insert
/// returns, and a bad row (a duplicate id) fails alone without failing the rows committed beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_decision_inserts_are_group_committed() {
    for t in stores().await {
        let s = Arc::new(t.store.clone());
        let before = s.group_commit_stats();
        s.insert_decision(&decision("gc-dup", "allow", "spam", None), None).await.unwrap();
        // On a SQLite file the callers commit in turn, and only rows that arrive during a commit join the next one;
        // a scheduler that happens to run the tasks one after another leaves nothing to group (seen: up to 201
        // commits for 201 rows, one run in ten). Another writer holding the lock makes every insert arrive during
        // one. PostgreSQL's writer task groups them as they come.
        let mut other_writer = None;
        if t.label == "sqlite" {
            let mut conn = s.pool().acquire().await.unwrap();
            sqlx::Executor::execute(&mut *conn, "BEGIN IMMEDIATE").await.unwrap();
            other_writer = Some(conn);
        }
        let mut tasks = Vec::new();
        for i in 0..200 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                // Every 50th insert reuses an id that is already stored.
                let id = if i % 50 == 49 { "gc-dup".to_string() } else { format!("gc-{i}") };
                let reasoning = vec![format!("thought {i}")];
                let result = s.insert_decision(&decision(&id, "allow", "spam", None), Some(&reasoning)).await;
                if result.is_ok() {
                    // Acknowledged means readable now, reasoning included.
                    let stored = s.get_decision(&id).await.unwrap().expect("acknowledged row is stored");
                    assert_eq!(stored.id, id);
                    assert_eq!(s.get_reasoning(&id).await.unwrap(), Some(reasoning));
                }
                (id, result.is_ok())
            }));
        }
        if let Some(mut conn) = other_writer {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            sqlx::Executor::execute(&mut *conn, "COMMIT").await.unwrap();
        }
        let mut failed = Vec::new();
        for task in tasks {
            let (id, ok) = task.await.unwrap();
            if !ok {
                failed.push(id);
            }
        }
        assert_eq!(failed, vec!["gc-dup"; 4], "only the duplicates fail ({})", t.label);
        let stored = s.list_decisions(&DecisionFilter { limit: 1000, ..Default::default() }).await.unwrap();
        assert_eq!(stored.len(), 197, "{}", t.label);
        let after = s.group_commit_stats();
        let (commits, rows) = (after.commits - before.commits, after.rows - before.rows);
        assert_eq!(rows, 201, "{}", t.label);
        assert!(commits < rows / 2, "{commits} commits for {rows} rows: inserts were not grouped ({})", t.label);
        t.cleanup().await;
    }
}

/// `safeguard serve` and `safeguard keys create` started together on a new data folder both migrate the same new
/// file: the second finds the first's work instead of failing on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_opening_a_new_sqlite_file_both_get_it() {
    for round in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.db");
        let (a, b) = tokio::join!(Store::open_sqlite(&path), Store::open_sqlite(&path));
        let (a, b) =
            (a.unwrap_or_else(|e| panic!("round {round}: {e}")), b.unwrap_or_else(|e| panic!("round {round}: {e}")));
        a.insert_decision(&decision(&format!("d-{round}"), "allow", "spam", None), None).await.unwrap();
        assert!(b.get_decision(&format!("d-{round}")).await.unwrap().is_some());
        a.close().await;
        b.close().await;
    }
}

#[tokio::test]
async fn group_commit_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("off.db").display());
    let options = StoreOptions {
        group_commit: safeguard_store::GroupCommit { enabled: false, ..Default::default() },
        ..Default::default()
    };
    let s = Store::connect(&url, options).await.unwrap();
    s.insert_decision(&decision("off-1", "allow", "spam", None), None).await.unwrap();
    assert!(s.get_decision("off-1").await.unwrap().is_some());
    assert_eq!(s.group_commit_stats(), safeguard_store::GroupCommitStats::default());
}

/// SQLite: decisions are committed on the writer's own connection, not a pooled one, so every pooled connection
/// stays free for reads (the single one included); closing the store closes that connection too, and an insert
/// after close says the store is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_writer_takes_no_pooled_connection_and_closes_with_the_store() {
    use std::time::Duration;
    for max_connections in [1, 3] {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("writer.db").display());
        let options =
            StoreOptions { max_connections, checkpoint_every: Duration::from_secs(3600), ..Default::default() };
        let s = Store::connect(&url, options).await.unwrap();
        let mut taken = Vec::new();
        for i in 0..20 {
            let id = format!("w-{max_connections}-{i}");
            tokio::time::timeout(
                Duration::from_secs(10),
                s.insert_decision(&decision(&id, "allow", "spam", None), Some(&[format!("thought {i}")])),
            )
            .await
            .expect("an insert finishes within 10 s")
            .unwrap();
            let read = tokio::time::timeout(Duration::from_secs(10), s.get_reasoning(&id)).await;
            assert_eq!(read.expect("a read finishes within 10 s").unwrap(), Some(vec![format!("thought {i}")]));
        }
        // Every pooled connection can be taken at once while inserts go on.
        for _ in 0..max_connections {
            let conn = tokio::time::timeout(Duration::from_secs(10), s.pool().acquire()).await;
            taken.push(conn.expect("a free connection is handed out at once").unwrap());
        }
        let held = decision(&format!("w-{max_connections}-held"), "allow", "spam", None);
        let insert = s.insert_decision(&held, None);
        tokio::time::timeout(Duration::from_secs(10), insert)
            .await
            .expect("inserts need no pooled connection")
            .unwrap();
        drop(taken);
        assert_eq!(s.group_commit_stats().rows, 21);
        tokio::time::timeout(Duration::from_secs(10), s.close()).await.expect("closing finishes within 10 s");
        let err = s.insert_decision(&decision("after-close", "allow", "spam", None), None).await.unwrap_err();
        assert!(err.to_string().contains("closed"), "{err}");
    }
}

/// SQLite: while another connection holds the write lock (a checkpoint's restart, a job update), inserts wait for
/// it rather than fail, and all land once it is released; with `synchronous = FULL` as with NORMAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_inserts_wait_out_another_writer() {
    use std::time::Duration;
    for sqlite_sync in [safeguard_store::SqliteSync::Normal, safeguard_store::SqliteSync::Full] {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("busy.db").display());
        let options = StoreOptions { sqlite_sync, checkpoint_every: Duration::from_secs(3600), ..Default::default() };
        let s = Arc::new(Store::connect(&url, options).await.unwrap());
        s.insert_decision(&decision("before", "allow", "spam", None), None).await.unwrap();

        let mut other_writer = s.pool().acquire().await.unwrap();
        sqlx::Executor::execute(&mut *other_writer, "BEGIN IMMEDIATE").await.unwrap();
        let inserts: Vec<_> = (0..10)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    s.insert_decision(&decision(&format!("b-{i}"), "allow", "spam", None), None).await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(inserts.iter().all(|t| !t.is_finished()), "{sqlite_sync:?}: an insert got past another writer's lock");
        sqlx::Executor::execute(&mut *other_writer, "COMMIT").await.unwrap();
        drop(other_writer);
        for insert in inserts {
            tokio::time::timeout(Duration::from_secs(10), insert)
                .await
                .expect("inserts finish once the lock is free")
                .unwrap()
                .unwrap();
        }
        for i in 0..10 {
            assert!(s.get_decision(&format!("b-{i}")).await.unwrap().is_some(), "{sqlite_sync:?}: b-{i}");
        }
        // And the inline path is back once the lock is free.
        s.insert_decision(&decision("after", "allow", "spam", None), None).await.unwrap();
        s.close().await;
    }
}

/// Closing the store while a commit waits out another writer's lock waits for that commit, but off the runtime's
/// thread: on a one-thread runtime, other tasks keep running meanwhile (a blocked thread would stall them until
/// the 10 s busy timeout), and the waiting row still lands.
#[tokio::test(flavor = "current_thread")]
async fn closing_waits_for_a_blocked_commit_without_blocking_the_runtime() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("close.db").display());
    let options = StoreOptions { checkpoint_every: Duration::from_secs(3600), ..Default::default() };
    let s = Arc::new(Store::connect(&url, options).await.unwrap());
    s.insert_decision(&decision("before", "allow", "spam", None), None).await.unwrap();

    let mut other_writer = s.pool().acquire().await.unwrap();
    sqlx::Executor::execute(&mut *other_writer, "BEGIN IMMEDIATE").await.unwrap();
    let waiting = tokio::spawn({
        let s = s.clone();
        async move { s.insert_decision(&decision("waiting", "allow", "spam", None), None).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "the insert got past another writer's lock");

    let closing = tokio::spawn({
        let s = s.clone();
        async move { s.close().await }
    });
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "closing held the runtime's thread for {:?}",
        started.elapsed()
    );
    assert!(!closing.is_finished(), "closing did not wait for the commit in progress");

    sqlx::Executor::execute(&mut *other_writer, "COMMIT").await.unwrap();
    drop(other_writer);
    tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiting insert finishes once the lock is free")
        .unwrap()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), closing).await.expect("closing finishes").unwrap();
    let err = s.insert_decision(&decision("after-close", "allow", "spam", None), None).await.unwrap_err();
    assert!(err.to_string().contains("closed"), "{err}");
}

async fn page_size(store: &Store) -> i64 {
    let row = sqlx::query("PRAGMA page_size").fetch_one(store.pool()).await.unwrap();
    sqlx::Row::try_get::<i64, _>(&row, 0).unwrap()
}

/// Passive checkpoints alone never catch up with a writer that never pauses, and the log file then grows for as
/// long as the load lasts. The checkpointer restarts the log instead: its file stays the size of one interval's
/// commits, far below what all of them wrote, and no connection is left with the checkpointer's short lock wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_ahead_log_starts_over_under_continuous_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("busy.db");
    let options = StoreOptions { checkpoint_every: std::time::Duration::from_millis(40), ..Default::default() };
    let store = Store::open_sqlite_with(&path, options).await.unwrap();
    let writing = std::time::Instant::now();
    let mut writers = Vec::new();
    for writer in 0..2 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while writing.elapsed() < std::time::Duration::from_secs(3) {
                let id = format!("w{writer}-{i}");
                store.insert_decision(&decision(&id, "allow", "spam", None), Some(&["r".into()])).await.unwrap();
                i += 1;
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let stats = store.checkpoint_stats();
    assert!(stats.restarts >= 2, "the log was never restarted: {stats:?}");
    let commits = store.group_commit_stats().commits;
    let page_size = page_size(&store).await as u64;
    // Each commit writes at least 9 pages (three tables, their indexes); without restarts the file holds them all.
    let wal = std::fs::metadata(dir.path().join("busy.db-wal")).unwrap().len();
    let written_at_least = commits * 9 * page_size;
    // The file keeps the size of the longest stretch between two restarts. On a loaded machine (the whole test
    // suite at once) one restart can wait out a second of disk stalls, so a third of the run was seen to land in
    // one stretch; without restarts the file would hold at least everything written.
    assert!(wal * 2 < written_at_least, "log file {wal} B after {commits} commits ({written_at_least} B written)");
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut conn = store.pool().acquire().await.unwrap();
        let row = sqlx::query("PRAGMA busy_timeout").fetch_one(&mut *conn).await.unwrap();
        assert_eq!(sqlx::Row::try_get::<i64, _>(&row, 0).unwrap(), 10_000);
        held.push(conn);
    }
}

/// Should the background checkpointer fall behind, the log still stops at its limit: the decision writer
/// checkpoints it itself, on a blocking thread (SQLite's own trigger, which would copy and flush the whole log
/// inside a commit on a runtime worker, is off on its connection), and the log starts over. No row is lost.
#[tokio::test(flavor = "current_thread")]
async fn the_writer_bounds_the_log_when_the_checkpointer_falls_behind() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("limit.db");
    let limit = 200;
    let options = StoreOptions {
        checkpoint_every: std::time::Duration::from_secs(3600),
        wal_limit_pages: limit,
        ..Default::default()
    };
    let store = Store::open_sqlite_with(&path, options).await.unwrap();
    // The checkpointer's first tick runs at once; it is let finish before the pool closes below.
    let started = std::time::Instant::now();
    while store.checkpoint_stats().checkpoints == 0 {
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "the checkpointer never ran");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let page_size = page_size(&store).await as u64;
    // No checkpoint can start the log over while another connection still reads it, and an idle pooled
    // connection may keep its last read open (seen here in 2 to 6 runs of 25 under load). The writer needs no
    // pooled connection, so the pool closes and the log is the writer's alone.
    store.pool().close().await;
    let rows = 300;
    for i in 0..rows {
        store.insert_decision(&decision(&format!("d{i}"), "allow", "spam", None), Some(&["r".into()])).await.unwrap();
    }
    let stats = store.group_commit_stats();
    assert_eq!(stats.rows, rows);
    // Each commit writes at least 9 pages, so 300 of them fill a 200-page log at least 13 times over.
    assert!(stats.log_limit_checkpoints >= 10, "{stats:?}");

    // The file never grew past the limit and one commit: its size is the most the log ever held.
    let frame = page_size + 24;
    let one_commit = 40; // pages; a decision with reasoning writes about 13
    let wal = std::fs::metadata(dir.path().join("limit.db-wal")).unwrap().len();
    let bound = 32 + (u64::from(limit) + one_commit) * frame;
    assert!(wal <= bound, "log file {wal} B, over the limit's {bound} B");
    store.close().await;
    let reopened = Store::open_sqlite(&path).await.unwrap();
    let row = sqlx::query("SELECT COUNT(*) FROM decisions").fetch_one(reopened.pool()).await.unwrap();
    assert_eq!(sqlx::Row::try_get::<i64, _>(&row, 0).unwrap(), rows as i64);
    reopened.close().await;
}

/// New SQLite databases get small pages (each commit writes whole pages to the log); a database created with
/// other pages keeps them and works as before.
#[tokio::test]
async fn new_sqlite_databases_get_small_pages_and_existing_ones_keep_theirs() {
    let dir = tempfile::tempdir().unwrap();
    let fresh = Store::open_sqlite(&dir.path().join("fresh.db")).await.unwrap();
    assert_eq!(page_size(&fresh).await, 1024);

    let old_path = dir.path().join("old.db");
    {
        use sqlx::Connection;
        let mut conn =
            sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=rwc", old_path.display())).await.unwrap();
        sqlx::query("PRAGMA page_size = 4096").execute(&mut conn).await.unwrap();
        sqlx::query("CREATE TABLE before_safeguard (x INTEGER)").execute(&mut conn).await.unwrap();
        conn.close().await.unwrap();
    }
    let old = Store::open_sqlite(&old_path).await.unwrap();
    assert_eq!(page_size(&old).await, 4096);
    old.insert_decision(&decision("old-1", "allow", "spam", None), None).await.unwrap();
    assert!(old.get_decision("old-1").await.unwrap().is_some());
}

#[tokio::test]
async fn migrations_are_idempotent_and_ping_works() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("again.db");
    let first = Store::open_sqlite(&path).await.unwrap();
    first.close().await;
    let second = Store::open_sqlite(&path).await.unwrap();
    assert!(second.ping(std::time::Duration::from_secs(2)).await);
    let err = Store::connect("mysql://x", StoreOptions::default()).await.unwrap_err();
    assert!(err.to_string().contains("unsupported database URL"), "{err}");
}

#[tokio::test]
async fn policy_versions_are_immutable_and_pinned() {
    for t in stores().await {
        let s = &t.store;
        let (v1, created) =
            s.put_policy("sha256:aaa", "spam", "body one", &json!({"name": "spam"}), true).await.unwrap();
        assert!(created, "{}", t.label);
        assert!(v1.active, "first version is active ({})", t.label);
        let (again, created) = s.put_policy("sha256:aaa", "spam", "body one", &json!({}), true).await.unwrap();
        assert!(!created, "{}", t.label);
        assert_eq!(again.meta, json!({"name": "spam"}), "original meta kept ({})", t.label);
        let (v2, _) =
            s.put_policy("sha256:bbb", "spam", "body two", &json!({"meta": {"version": 2}}), true).await.unwrap();
        assert!(!v2.active, "{}", t.label);
        assert_eq!(s.active_policy("spam").await.unwrap().unwrap().hash, "sha256:aaa");
        s.activate_policy("spam", "sha256:bbb").await.unwrap();
        assert_eq!(s.active_policy("spam").await.unwrap().unwrap().hash, "sha256:bbb", "{}", t.label);
        assert!(!s.get_policy("sha256:aaa").await.unwrap().unwrap().active);
        let list = |name, only_active, limit, after| async move {
            let listing = PolicyListing { name, only_active, limit, after };
            s.policy_summaries(&listing).await.unwrap()
        };
        assert_eq!(list(Some("spam"), false, 10, None).await.len(), 2);
        let all = list(None, false, 10, None).await;
        let version = |hash: &str| all.iter().find(|p| p.hash == hash).map(|p| p.version.clone());
        assert_eq!(
            version("sha256:bbb"),
            Some(Some(json!(2))),
            "the version as the front matter gave it ({})",
            t.label
        );
        assert_eq!(version("sha256:aaa"), Some(None), "{}", t.label);
        let active = list(None, true, 10, None).await;
        assert_eq!(active.iter().map(|p| (p.hash.as_str(), p.active)).collect::<Vec<_>>(), [("sha256:bbb", true)]);
        let first = list(None, false, 1, None).await;
        let second = list(None, false, 1, Some(first[0].hash.as_str())).await;
        assert_eq!((first.len(), second.len()), (1, 1), "{}", t.label);
        assert_ne!(first[0].hash, second[0].hash, "the second page goes on where the first ended ({})", t.label);
        assert!(list(None, false, 1, Some(second[0].hash.as_str())).await.is_empty(), "{}", t.label);
        assert!(list(Some("nobody"), false, 10, None).await.is_empty());
        s.put_policy("sha256:ccc", "other", "x", &json!({}), true).await.unwrap();
        assert!(s.activate_policy("spam", "sha256:ccc").await.is_err(), "name mismatch refused ({})", t.label);
        assert!(s.activate_policy("spam", "sha256:nope").await.is_err());
        assert!(s.active_policy("missing").await.unwrap().is_none());
        assert_eq!(s.active_policy_names(None, 10).await.unwrap(), ["other", "spam"], "{}", t.label);
        assert_eq!(s.active_policy_names(None, 1).await.unwrap(), ["other"], "{}", t.label);
        assert_eq!(s.active_policy_names(Some("other"), 1).await.unwrap(), ["spam"], "{}", t.label);
        assert!(s.active_policy_names(Some("spam"), 10).await.unwrap().is_empty(), "{}", t.label);
        let (inline, _) = s.put_policy("sha256:ddd", "inline", "y", &json!({}), false).await.unwrap();
        assert!(!inline.active && s.active_policy("inline").await.unwrap().is_none(), "unpinned ({})", t.label);
        t.cleanup().await;
    }
}

#[tokio::test]
async fn decisions_round_trip_and_filter() {
    for t in stores().await {
        let s = &t.store;
        let a = decision("d-a", "allow", "spam", None);
        s.insert_decision(&a, Some(&["thinking about spam".to_string()])).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
        let b = decision("d-b", "violation", "hate", None);
        s.insert_decision(&b, None).await.unwrap();
        let got = s.get_decision("d-a").await.unwrap().unwrap();
        assert_eq!(got, a, "{}", t.label);
        assert_eq!(s.get_reasoning("d-a").await.unwrap().unwrap(), vec!["thinking about spam"]);
        assert!(s.get_reasoning("d-b").await.unwrap().is_none());
        let all = s.list_decisions(&DecisionFilter { limit: 10, ..Default::default() }).await.unwrap();
        assert_eq!(all.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["d-b", "d-a"], "{}", t.label);
        let violations = s
            .list_decisions(&DecisionFilter { outcome: Some("violation".into()), limit: 10, ..Default::default() })
            .await
            .unwrap();
        assert_eq!(violations.len(), 1);
        let by_policy = s
            .list_decisions(&DecisionFilter { policy: Some("spam".into()), limit: 10, ..Default::default() })
            .await
            .unwrap();
        assert_eq!(by_policy[0].id, "d-a");
        let by_hash = s
            .list_decisions(&DecisionFilter { policy: Some("sha256:hatehash".into()), limit: 10, ..Default::default() })
            .await
            .unwrap();
        assert_eq!(by_hash[0].id, "d-b");
        let recent = s
            .list_decisions(&DecisionFilter {
                since: Some(b.created_at),
                outcome: Some("violation".into()),
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(recent.len(), 1, "{}", t.label);
        let none = s
            .list_decisions(&DecisionFilter { since: Some(now_ms() + 60_000), limit: 10, ..Default::default() })
            .await
            .unwrap();
        assert!(none.is_empty());
        s.enqueue_review("d-a", 1).await.unwrap();
        assert_eq!(s.count_reviews("pending").await.unwrap(), 1);
        t.cleanup().await;
    }
}

#[tokio::test]
async fn jobs_are_idempotent_leased_and_finished_once() {
    for t in stores().await {
        let s = &t.store;
        assert!(!s.has_claimable_job().await.unwrap(), "an empty queue ({})", t.label);
        let new = NewJob {
            request: json!({"text": "hi"}),
            idempotency_key: Some("k1".into()),
            webhook_url: None,
            submitted_by: None,
        };
        let (job, created) = s.enqueue_job(&new).await.unwrap();
        assert!(created);
        assert!(s.has_claimable_job().await.unwrap(), "a pending job ({})", t.label);
        assert_eq!(job.status, JobStatus::Pending);
        let (same, created) = s.enqueue_job(&new).await.unwrap();
        assert!(!created, "{}", t.label);
        assert_eq!(same.id, job.id);

        let claimed = s.claim_job(60_000).await.unwrap().expect("claim");
        assert_eq!(claimed.id, job.id);
        assert_eq!(claimed.attempts, 1);
        assert!(s.claim_job(60_000).await.unwrap().is_none(), "leased job not claimable ({})", t.label);
        assert!(!s.has_claimable_job().await.unwrap(), "nor seen as claimable ({})", t.label);

        let token = claimed.lease_token.clone().unwrap();
        let d = decision("dj-1", "allow", "spam", Some(&job.id));
        let hook = NewDelivery { job_id: job.id.clone(), url: "http://127.0.0.1:9/hook".into(), body: "{}".into() };
        let review = NewReview {
            decision_id: d.id.clone(),
            kind: "review".into(),
            priority: 1,
            reason: Some("spam: undecided".into()),
            sla_ms: Some(60_000),
            policy_hash: None,
        };
        assert!(!s.finish_job(&job.id, "stale-token", &d, None, Some(&review), None).await.unwrap(), "{}", t.label);
        assert_eq!(s.count_reviews("pending").await.unwrap(), 0, "a refused finish queues nothing ({})", t.label);
        assert!(s.finish_job(&job.id, &token, &d, None, Some(&review), Some(&hook)).await.unwrap());
        let queued = s.list_reviews("pending", 10).await.unwrap();
        assert_eq!(queued.len(), 1, "the job's review is stored with its decision ({})", t.label);
        assert_eq!((queued[0].decision_id.as_str(), queued[0].reason.as_deref()), ("dj-1", Some("spam: undecided")));
        assert!(queued[0].due_at.is_some());
        let d2 = decision("dj-2", "allow", "spam", Some(&job.id));
        assert!(!s.finish_job(&job.id, &token, &d2, None, None, None).await.unwrap(), "second finish refused");
        assert_eq!(s.decisions_for_job(&job.id).await.unwrap(), 1);
        let done = s.get_job(&job.id).await.unwrap().unwrap();
        assert_eq!(done.status, JobStatus::Done);
        assert_eq!(done.result_decision_id.as_deref(), Some("dj-1"));
        assert_eq!(s.deliveries_for_job(&job.id).await.unwrap().len(), 1);

        // An expired lease (dead worker) is reclaimed, and the dead worker's late finish is refused.
        let (j2, _) = s
            .enqueue_job(&NewJob { request: json!({}), idempotency_key: None, webhook_url: None, submitted_by: None })
            .await
            .unwrap();
        let first = s.claim_job(-1).await.unwrap().unwrap();
        assert_eq!(first.id, j2.id);
        assert!(s.has_claimable_job().await.unwrap(), "an expired lease is claimable ({})", t.label);
        let second = s.claim_job(60_000).await.unwrap().expect("expired lease reclaimed");
        assert_eq!(second.id, j2.id);
        assert_eq!(second.attempts, 2);
        assert!(!s.renew_lease(&j2.id, first.lease_token.as_deref().unwrap(), 1000).await.unwrap());
        assert!(s.renew_lease(&j2.id, second.lease_token.as_deref().unwrap(), 1000).await.unwrap());
        let late = decision("dj-late", "allow", "spam", Some(&j2.id));
        assert!(!s.finish_job(&j2.id, first.lease_token.as_deref().unwrap(), &late, None, None, None).await.unwrap());
        assert!(s.release_job(&j2.id, second.lease_token.as_deref().unwrap()).await.unwrap());
        let depth = s.queue_depth().await.unwrap();
        assert_eq!((depth.pending, depth.running, depth.done), (1, 0, 1), "{}", t.label);
        let third = s.claim_job(60_000).await.unwrap().unwrap();
        assert_eq!(third.attempts, 2, "a job handed back untried is not an attempt ({})", t.label);
        let failed = decision("dj-failed", "needs_review", "spam", Some(&j2.id));
        let review = NewReview {
            decision_id: failed.id.clone(),
            kind: "review".into(),
            priority: 1,
            reason: Some("job failed: bad".into()),
            sla_ms: None,
            policy_hash: None,
        };
        assert!(
            s.fail_job(&j2.id, third.lease_token.as_deref().unwrap(), "bad", &failed, &review, None).await.unwrap()
        );
        assert_eq!(s.get_job(&j2.id).await.unwrap().unwrap().status, JobStatus::Failed);
        t.cleanup().await;
    }
}

/// A job that can never be decided still reaches a person and its caller: its `needs_review` decision, the
/// review and the webhook delivery are written with the failure, in one transaction, only by the lease's owner.
#[tokio::test]
async fn a_failed_job_is_queued_for_a_person_and_announced() {
    for t in stores().await {
        let s = &t.store;
        let (job, _) = s
            .enqueue_job(&NewJob {
                request: json!({}),
                idempotency_key: None,
                webhook_url: Some("http://x/h".into()),
                submitted_by: None,
            })
            .await
            .unwrap();
        let claimed = s.claim_job(60_000).await.unwrap().unwrap();
        let failed = decision("df-1", "needs_review", "spam", Some(&job.id));
        let review = NewReview {
            decision_id: failed.id.clone(),
            kind: "review".into(),
            priority: 1,
            reason: Some("job failed: policy gone".into()),
            sla_ms: Some(60_000),
            policy_hash: None,
        };
        let hook = NewDelivery {
            job_id: job.id.clone(),
            url: "http://x/h".into(),
            body: "{\"outcome\":\"needs_review\"}".into(),
        };
        assert!(
            !s.fail_job(&job.id, "stale-token", "policy gone", &failed, &review, Some(&hook)).await.unwrap(),
            "{}",
            t.label
        );
        assert_eq!(s.decisions_for_job(&job.id).await.unwrap(), 0, "a refused failure writes nothing ({})", t.label);
        let token = claimed.lease_token.as_deref().unwrap();
        assert!(s.fail_job(&job.id, token, "policy gone", &failed, &review, Some(&hook)).await.unwrap());
        let stored = s.get_job(&job.id).await.unwrap().unwrap();
        assert_eq!(stored.status, JobStatus::Failed, "{}", t.label);
        assert_eq!(
            (stored.error.as_deref(), stored.result_decision_id.as_deref()),
            (Some("policy gone"), Some("df-1")),
            "{}",
            t.label
        );
        assert_eq!(s.get_decision("df-1").await.unwrap().unwrap().outcome, "needs_review");
        let queued = s.list_reviews("pending", 10).await.unwrap();
        assert_eq!(queued.len(), 1, "{}", t.label);
        assert_eq!(queued[0].decision_id, "df-1");
        let deliveries = s.deliveries_for_job(&job.id).await.unwrap();
        assert_eq!(deliveries.len(), 1, "{}", t.label);
        assert!(deliveries[0].body.contains("needs_review"));
        assert!(!s.fail_job(&job.id, token, "again", &failed, &review, None).await.unwrap(), "failed once");
        t.cleanup().await;
    }
}

/// An inline policy is stored unpinned; publishing the same body later pins its name if the name has none, and a
/// version named only by the inline fallback takes the name it is published with.
#[tokio::test]
async fn a_version_tried_inline_is_pinned_once_published() {
    for t in stores().await {
        let s = &t.store;
        let (tried, _) = s.put_policy("sha256:tried", "tried", "body", &json!({}), false).await.unwrap();
        assert!(!tried.active && s.active_policy("tried").await.unwrap().is_none(), "{}", t.label);
        let (published, created) = s.put_policy("sha256:tried", "tried", "body", &json!({}), true).await.unwrap();
        assert!(!created && published.active, "pinned though already stored ({})", t.label);
        assert_eq!(s.active_policy("tried").await.unwrap().unwrap().hash, "sha256:tried");
        let (other, _) = s.put_policy("sha256:tried2", "tried", "body 2", &json!({}), true).await.unwrap();
        assert!(!other.active, "a pinned name keeps its version ({})", t.label);

        s.put_policy("sha256:anon", "inline", "anon", &json!({"fallback_name": "inline"}), false).await.unwrap();
        let (again, _) = s.put_policy("sha256:anon", "raffle", "anon", &json!({}), true).await.unwrap();
        assert!(!again.active && again.name == "inline", "not pinned under another name ({})", t.label);
        let renamed = s.rename_unpinned_policy("sha256:anon", "inline", "raffle", &json!({"v": 2})).await.unwrap();
        let renamed = renamed.expect("renamed");
        assert_eq!((renamed.name.as_str(), renamed.active, &renamed.meta), ("raffle", true, &json!({"v": 2})));
        assert_eq!(s.active_policy("raffle").await.unwrap().unwrap().hash, "sha256:anon", "{}", t.label);
        assert!(s.rename_unpinned_policy("sha256:anon", "inline", "x", &json!({})).await.unwrap().is_none());
        t.cleanup().await;
    }
}

#[tokio::test]
async fn concurrent_workers_finish_each_job_exactly_once() {
    for t in stores().await {
        let s = Arc::new(t.store.clone());
        let mut ids = Vec::new();
        for i in 0..20 {
            let (job, _) = s
                .enqueue_job(&NewJob {
                    request: json!({"i": i}),
                    idempotency_key: Some(format!("c{i}")),
                    webhook_url: None,
                    submitted_by: None,
                })
                .await
                .unwrap();
            ids.push(job.id);
        }
        let mut workers = Vec::new();
        for w in 0..4 {
            let s = s.clone();
            workers.push(tokio::spawn(async move {
                let mut finished = 0;
                while let Some(job) = s.claim_job(30_000).await.unwrap() {
                    let d = decision(&format!("w{w}-{}", job.id), "allow", "spam", Some(&job.id));
                    if s.finish_job(&job.id, job.lease_token.as_deref().unwrap(), &d, None, None, None).await.unwrap() {
                        finished += 1;
                    }
                }
                finished
            }));
        }
        let mut total = 0;
        for w in workers {
            total += w.await.unwrap();
        }
        assert_eq!(total, 20, "{}", t.label);
        for id in &ids {
            assert_eq!(s.decisions_for_job(id).await.unwrap(), 1, "{}", t.label);
        }
        t.cleanup().await;
    }
}

/// An Idempotency-Key is each client's own: another client's "k1" is another job, a client's retry finds its own,
/// a job without an owner keeps the bare key, and a name with a colon cannot pose as another client's key.
#[tokio::test]
async fn idempotency_keys_are_scoped_by_their_client() {
    for t in stores().await {
        let s = &t.store;
        let new = |owner: Option<&str>| NewJob {
            request: json!({"text": "hi"}),
            idempotency_key: Some("k1".into()),
            webhook_url: None,
            submitted_by: owner.map(str::to_string),
        };
        let mut jobs = Vec::new();
        for owner in [None, Some("shop"), Some("forum"), Some("shop:k1"), Some("shop"), None] {
            let (job, created) = s.enqueue_job(&new(owner)).await.unwrap();
            jobs.push((job.id, created, job.submitted_by));
        }
        let created: Vec<bool> = jobs.iter().map(|(_, created, _)| *created).collect();
        assert_eq!(created, [true, true, true, true, false, false], "{}", t.label);
        assert_eq!((&jobs[4].0, &jobs[5].0), (&jobs[1].0, &jobs[0].0), "{}", t.label);
        assert_eq!(jobs[1].2.as_deref(), Some("shop"));
        t.cleanup().await;
    }
}

#[tokio::test]
async fn webhook_deliveries_retry_then_settle() {
    for t in stores().await {
        let s = &t.store;
        let (job, _) = s
            .enqueue_job(&NewJob { request: json!({}), idempotency_key: None, webhook_url: None, submitted_by: None })
            .await
            .unwrap();
        let claimed = s.claim_job(60_000).await.unwrap().unwrap();
        let hook = NewDelivery { job_id: job.id.clone(), url: "http://x/hook".into(), body: "{\"a\":1}".into() };
        s.finish_job(
            &job.id,
            claimed.lease_token.as_deref().unwrap(),
            &decision("dw", "allow", "p", Some(&job.id)),
            None,
            None,
            Some(&hook),
        )
        .await
        .unwrap();
        let d = s.claim_delivery(30_000).await.unwrap().expect("due");
        assert_eq!(d.body, "{\"a\":1}");
        assert!(s.claim_delivery(30_000).await.unwrap().is_none(), "claimed delivery hidden ({})", t.label);
        assert!(s.record_delivery_attempt(&d, false, Some(500), Some("boom"), Some(0)).await.unwrap());
        // A retry is at least 1 ms out (it keeps the claims' fencing tokens apart).
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let again = s.claim_delivery(30_000).await.unwrap().expect("retry due");
        assert_eq!(again.attempts, 1);
        assert_eq!(again.last_status, Some(500));
        assert!(s.record_delivery_attempt(&again, true, Some(200), None, None).await.unwrap());
        assert!(s.claim_delivery(30_000).await.unwrap().is_none());
        assert_eq!(s.deliveries_for_job(&job.id).await.unwrap()[0].status, "delivered", "{}", t.label);
        // The first sender, its lease long gone, comes back late with a failure: the delivery stays delivered.
        assert!(!s.record_delivery_attempt(&d, false, None, Some("timed out"), Some(0)).await.unwrap());
        let settled = &s.deliveries_for_job(&job.id).await.unwrap()[0];
        assert_eq!((settled.status.as_str(), settled.attempts), ("delivered", 2), "{}", t.label);
        t.cleanup().await;
    }
}

/// A delivery given up on stays listed as failed until an operator sends it again: then it is due at once, with a
/// fresh run of attempts, and only the job asked for (or every failed one) goes back.
#[tokio::test]
async fn failed_webhook_deliveries_can_be_sent_again() {
    for t in stores().await {
        let s = &t.store;
        let mut jobs = Vec::new();
        for i in 0..2 {
            let new = NewJob { request: json!({"i": i}), idempotency_key: None, webhook_url: None, submitted_by: None };
            let (job, _) = s.enqueue_job(&new).await.unwrap();
            let claimed = s.claim_job(60_000).await.unwrap().unwrap();
            let hook = NewDelivery { job_id: job.id.clone(), url: "http://x/hook".into(), body: format!("{i}") };
            let record = decision(&format!("dr{i}"), "allow", "p", Some(&job.id));
            s.finish_job(&job.id, claimed.lease_token.as_deref().unwrap(), &record, None, None, Some(&hook))
                .await
                .unwrap();
            let d = s.claim_delivery(30_000).await.unwrap().expect("due");
            assert!(s.record_delivery_attempt(&d, false, Some(503), Some("down"), None).await.unwrap());
            jobs.push(job.id);
        }
        assert!(s.claim_delivery(30_000).await.unwrap().is_none(), "failed deliveries are not retried on their own");
        assert_eq!(s.failed_deliveries(10).await.unwrap().len(), 2, "{}", t.label);
        assert_eq!(s.retry_failed_deliveries(Some(&jobs[1])).await.unwrap(), 1, "{}", t.label);
        let again = s.claim_delivery(30_000).await.unwrap().expect("due again");
        assert_eq!((again.job_id.as_str(), again.attempts, again.status.as_str()), (jobs[1].as_str(), 0, "pending"));
        let failed = s.failed_deliveries(10).await.unwrap();
        assert_eq!(failed.iter().map(|d| d.job_id.as_str()).collect::<Vec<_>>(), [jobs[0].as_str()]);
        assert_eq!(failed[0].last_error.as_deref(), Some("down"));
        assert_eq!(s.retry_failed_deliveries(None).await.unwrap(), 1, "{}", t.label);
        assert!(s.failed_deliveries(10).await.unwrap().is_empty());
        t.cleanup().await;
    }
}

#[tokio::test]
async fn api_keys_are_hashed_scoped_and_revocable() {
    for t in stores().await {
        let s = &t.store;
        let (record, secret) = s.create_api_key("ci", &["classify".to_string()]).await.unwrap();
        assert!(secret.starts_with("sg_") && secret.len() > 40);
        let found = s.authenticate(&secret).await.unwrap().expect("authenticates");
        assert_eq!(found.id, record.id);
        assert!(found.has_scope("classify") && !found.has_scope("audit"));
        assert!(s.authenticate("sg_wrong").await.unwrap().is_none());
        let admin = s.insert_api_key("admin", &["admin".to_string()], "chosen-admin-secret").await.unwrap();
        let again = s.insert_api_key("admin", &["admin".to_string()], "chosen-admin-secret").await.unwrap();
        assert_eq!(admin.id, again.id, "bootstrap key is idempotent ({})", t.label);
        assert!(admin.has_scope("audit"), "admin implies all scopes");
        // The plaintext is never stored.
        let raw: Vec<String> = sqlx::query_scalar("SELECT key_hash FROM api_keys").fetch_all(s.pool()).await.unwrap();
        assert!(raw.iter().all(|h| h.len() == 64 && !h.contains("chosen")));
        assert!(s.revoke_api_key(&record.id).await.unwrap());
        assert!(s.authenticate(&secret).await.unwrap().is_none());
        assert_eq!(s.list_api_keys().await.unwrap().len(), 2);
        t.cleanup().await;
    }
}

#[tokio::test]
async fn reviews_queue_in_priority_and_sla_order_and_are_decided_once() {
    use safeguard_store::ReviewDecision;
    for t in stores().await {
        let s = &t.store;
        for (id, outcome) in
            [("r-a", "needs_review"), ("r-b", "needs_review"), ("r-c", "violation"), ("r-d", "needs_review")]
        {
            s.insert_decision(&decision(id, outcome, "spam", None), None).await.unwrap();
        }
        let queue = |decision_id: &str, kind: &str, priority: i64, sla_ms: Option<i64>| NewReview {
            decision_id: decision_id.into(),
            kind: kind.into(),
            priority,
            reason: Some("needs_review".into()),
            sla_ms,
            policy_hash: None,
        };
        let low = s.queue_review(&queue("r-a", "review", 1, Some(7_200_000))).await.unwrap();
        assert!(low.fresh, "{}", t.label);
        let low = low.review;
        let urgent = s.queue_review(&queue("r-b", "review", 1, Some(3_600_000))).await.unwrap().review;
        let appeal = s.queue_review(&queue("r-c", "appeal", 5, None)).await.unwrap().review;
        // Queued with a deadline already behind it: overdue, the way an item left waiting a day is.
        let overdue = s.queue_review(&queue("r-d", "review", 1, Some(-60_000))).await.unwrap().review;
        let again = s.queue_review(&queue("r-a", "review", 9, None)).await.unwrap();
        assert!(!again.fresh, "{}: queued before", t.label);
        assert_eq!(again.review.id, low.id, "{}: one pending review per decision and kind", t.label);

        // Overdue before a higher priority; then priority, then the earlier deadline.
        let order: Vec<String> = s.list_reviews("pending", 10).await.unwrap().into_iter().map(|r| r.id).collect();
        let expected = [overdue.id.as_str(), appeal.id.as_str(), urgent.id.as_str(), low.id.as_str()];
        assert_eq!(order, expected, "{}", t.label);
        assert_eq!(s.review_stats().await.unwrap().overdue, 1, "{}", t.label);

        let verdict = ReviewDecision {
            reviewer: "alice".into(),
            outcome: "allow".into(),
            rationale: "A personal message, not promotion.".into(),
            rule_id: "SP0.a".into(),
            policy_hash: Some("sha256:spamhash".into()),
            overrides_model: Some(true),
        };
        let decided = s.decide_review(&appeal.id, &verdict).await.unwrap().unwrap();
        assert_eq!(decided.status, "decided");
        assert_eq!(decided.overrides_model, Some(true), "{}", t.label);
        assert_eq!(decided.reviewer.as_deref(), Some("alice"));
        assert!(s.decide_review(&appeal.id, &verdict).await.unwrap().is_none(), "{}: decided once", t.label);

        let stats = s.review_stats().await.unwrap();
        assert_eq!((stats.pending, stats.decided, stats.overrides), (3, 1, 1), "{}", t.label);
        // A person deciding what the model left undecided: neither agreement nor override.
        let undecided = ReviewDecision { overrides_model: None, ..verdict.clone() };
        let decided = s.decide_review(&urgent.id, &undecided).await.unwrap().unwrap();
        assert_eq!(decided.overrides_model, None, "{}", t.label);
        let stats = s.review_stats().await.unwrap();
        let counts = (stats.pending, stats.decided, stats.overrides, stats.model_undecided);
        assert_eq!(counts, (2, 2, 1, 1), "{}", t.label);
        // Only decided reviews of items that came in over NATS wait to be published, once; samples never.
        assert!(s.reviews_to_announce(10).await.unwrap().is_empty(), "{}: none came from NATS", t.label);
        let mut from_bus = decision("r-n", "needs_review", "spam", None);
        from_bus.source = "nats:human_review".into();
        s.insert_decision(&from_bus, None).await.unwrap();
        // Stored first from a copy without its chain of thought; the worker that reasoned fills it in, once.
        assert_eq!(s.get_reasoning("r-n").await.unwrap(), None, "{}", t.label);
        s.add_missing_reasoning("r-n", &["first".to_string()]).await.unwrap();
        s.add_missing_reasoning("r-n", &["second".to_string()]).await.unwrap();
        assert_eq!(s.get_reasoning("r-n").await.unwrap(), Some(vec!["first".to_string()]), "{}", t.label);
        let held = s.queue_review(&queue("r-n", "review", 1, None)).await.unwrap().review;
        let sampled = s.queue_review(&queue("r-n", "sample", 0, None)).await.unwrap().review;
        assert!(s.reviews_to_announce(10).await.unwrap().is_empty(), "{}: pending ones wait for a person", t.label);
        let decided_held = ReviewDecision { overrides_model: None, ..verdict.clone() };
        s.decide_review(&held.id, &decided_held).await.unwrap().unwrap();
        s.decide_review(&sampled.id, &decided_held).await.unwrap().unwrap();
        let outbox: Vec<String> = s.reviews_to_announce(10).await.unwrap().into_iter().map(|r| r.id).collect();
        assert_eq!(outbox, vec![held.id.clone()], "{}", t.label);
        s.mark_review_announced(&held.id).await.unwrap();
        assert!(s.reviews_to_announce(10).await.unwrap().is_empty(), "{}: published once", t.label);
        // An appeal of a bus item is answered on the item's subject too; one of an item from elsewhere is not.
        let mut appealed = decision("r-n-appeal", "needs_review", "spam", None);
        (appealed.source, appealed.replay_of) = ("appeal".into(), Some("r-n".into()));
        let bus_appeal = s.insert_appeal(&appealed, None, &queue("r-n-appeal", "appeal", 2, None)).await.unwrap();
        let mut elsewhere = decision("r-b-appeal", "needs_review", "spam", None);
        (elsewhere.source, elsewhere.replay_of) = ("appeal".into(), Some("r-b".into()));
        let http_appeal = s.insert_appeal(&elsewhere, None, &queue("r-b-appeal", "appeal", 2, None)).await.unwrap();
        for appeal in [&bus_appeal.review, &http_appeal.review] {
            s.decide_review(&appeal.id, &decided_held).await.unwrap().unwrap();
        }
        let outbox: Vec<String> = s.reviews_to_announce(10).await.unwrap().into_iter().map(|r| r.id).collect();
        assert_eq!(outbox, vec![bus_appeal.review.id.clone()], "{}", t.label);
        s.mark_review_announced(&bus_appeal.review.id).await.unwrap();
        // Queuing a decided item again (its decision stored again after a redelivery) asks nobody twice.
        let requeued = s.queue_review(&queue("r-b", "review", 1, Some(1_000))).await.unwrap();
        assert!(!requeued.fresh, "{}", t.label);
        let requeued = requeued.review;
        assert_eq!((requeued.id, requeued.status.as_str()), (urgent.id.clone(), "decided"), "{}", t.label);
        assert_eq!(s.review_stats().await.unwrap().pending, 2, "{}", t.label);
        // An audit of what triage settled is counted apart: overturning triage says nothing of the model.
        let before = s.review_stats().await.unwrap();
        let audit = s.queue_review(&queue("r-c", "audit", 0, None)).await.unwrap().review;
        s.decide_review(&audit.id, &verdict).await.unwrap().unwrap();
        let after = s.review_stats().await.unwrap();
        assert_eq!((after.decided, after.overrides), (before.decided, before.overrides), "{}", t.label);
        assert_eq!((after.audits_decided, after.audits_overturned), (1, 1), "{}", t.label);
        t.cleanup().await;
    }
}

/// Two workers storing the same decision at once (the NATS host does) both queue its review: exactly one review
/// comes of it, and every caller gets that one back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_queue_review_calls_make_one_review() {
    for t in stores().await {
        let s = Arc::new(t.store.clone());
        for round in 0..10 {
            let id = format!("qr-{round}");
            s.insert_decision(&decision(&id, "needs_review", "spam", None), None).await.unwrap();
            let barrier = Arc::new(tokio::sync::Barrier::new(4));
            let callers: Vec<_> = (0..4)
                .map(|priority| {
                    let (s, barrier, id) = (s.clone(), barrier.clone(), id.clone());
                    tokio::spawn(async move {
                        barrier.wait().await;
                        s.queue_review(&NewReview {
                            decision_id: id,
                            kind: "review".into(),
                            priority,
                            reason: Some("needs_review".into()),
                            sla_ms: None,
                            policy_hash: None,
                        })
                        .await
                    })
                })
                .collect();
            let mut ids = Vec::new();
            let mut fresh = 0;
            for caller in callers {
                let queued = caller.await.unwrap().unwrap();
                fresh += usize::from(queued.fresh);
                ids.push(queued.review.id);
            }
            ids.dedup();
            assert_eq!(ids.len(), 1, "{}: every caller gets the one review of {id}", t.label);
            assert_eq!(fresh, 1, "{}: exactly one caller queued it", t.label);
        }
        let pending = s.list_reviews("pending", 100).await.unwrap();
        assert_eq!(pending.len(), 10, "{}: one review per decision", t.label);
        t.cleanup().await;
    }
}

/// A store opened without migrating refuses what this version has not migrated, and changes nothing: the
/// pending migration stays pending, and a database with no store gets none.
#[tokio::test]
async fn opening_without_migrating_refuses_a_store_with_pending_migrations() {
    for t in stores().await {
        let s = &t.store;
        let reopen = |migrations: Migrations| {
            let (dir, pg) = (&t._dir, &t.pg_schema);
            async move {
                match (dir, pg) {
                    (Some(dir), _) => {
                        let options = StoreOptions { migrations, ..Default::default() };
                        Store::open_sqlite_with(&dir.path().join("test.db"), options).await
                    }
                    (None, Some((url, schema))) => {
                        let options = StoreOptions {
                            schema: Some(schema.clone()),
                            max_connections: 2,
                            migrations,
                            ..Default::default()
                        };
                        Store::connect(url, options).await
                    }
                    (None, None) => unreachable!(),
                }
            }
        };
        let current = reopen(Migrations::RequireApplied).await.unwrap();
        assert!(current.ping(std::time::Duration::from_secs(2)).await, "{}", t.label);
        current.close().await;

        let latest: i64 =
            sqlx::query_scalar("SELECT MAX(version) FROM safeguard_migrations").fetch_one(s.pool()).await.unwrap();
        sqlx::query("DELETE FROM safeguard_migrations WHERE version = $1")
            .bind(latest)
            .execute(s.pool())
            .await
            .unwrap();
        let err = reopen(Migrations::RequireApplied).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::PendingMigrations { versions } if versions == &[latest]),
            "{}: {err}",
            t.label
        );
        assert!(err.to_string().contains(&format!("lacks migrations {latest} ")), "{err}");
        let still_pending = sqlx::query("SELECT version FROM safeguard_migrations WHERE version = $1")
            .bind(latest)
            .fetch_optional(s.pool())
            .await
            .unwrap();
        assert!(still_pending.is_none(), "{}", t.label);
        let migrated = reopen(Migrations::Apply).await.unwrap();
        migrated.close().await;
        reopen(Migrations::RequireApplied).await.unwrap().close().await;
    }
    // A database nothing made: a SQLite file someone else's, and a PostgreSQL schema that does not exist.
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions { migrations: Migrations::RequireApplied, ..Default::default() };
    let err = Store::open_sqlite_with(&dir.path().join("other.db"), options).await.unwrap_err();
    assert!(matches!(err, StoreError::NoStore), "{err}");
    let url = std::env::var("SAFEGUARD_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_string());
    let options = StoreOptions {
        schema: Some(format!("sgtest_none_{}", std::process::id())),
        migrations: Migrations::RequireApplied,
        ..Default::default()
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), Store::connect(&url, options)).await {
        Ok(Err(StoreError::Db(e))) if e.to_string().contains("connect") => eprintln!("SKIPPING PostgreSQL: {e}"),
        Ok(result) => assert!(matches!(result, Err(StoreError::NoStore)), "{result:?}"),
        Err(_) => eprintln!("SKIPPING PostgreSQL half: timed out"),
    }
}

/// The migration that makes reviews unique per decision and kind removes the duplicates earlier versions could
/// leave: a person's decision survives, otherwise the earliest review does.
#[tokio::test]
async fn the_unique_review_migration_keeps_one_review_per_decision_and_kind() {
    for t in stores().await {
        let s = &t.store;
        for id in ["m-a", "m-b"] {
            s.insert_decision(&decision(id, "needs_review", "spam", None), None).await.unwrap();
        }
        // Back to the schema before migration 4, with the duplicates it allowed.
        for statement in [
            "DROP INDEX reviews_one_per_decision_kind",
            "CREATE INDEX reviews_by_decision ON reviews (decision_id)",
            "DELETE FROM safeguard_migrations WHERE version = 4",
        ] {
            sqlx::query(statement).execute(s.pool()).await.unwrap();
        }
        for (id, decision_id, kind, status, created_at) in [
            ("m-a-1", "m-a", "review", "pending", 100),
            ("m-a-2", "m-a", "review", "pending", 50),
            ("m-a-3", "m-a", "review", "decided", 200),
            ("m-b-1", "m-b", "review", "pending", 20),
            ("m-b-2", "m-b", "review", "pending", 10),
            ("m-b-3", "m-b", "appeal", "pending", 30),
        ] {
            sqlx::query(
                "INSERT INTO reviews (id, decision_id, status, kind, priority, created_at) VALUES ($1, $2, $3, $4, 1, $5)",
            )
            .bind(id)
            .bind(decision_id)
            .bind(status)
            .bind(kind)
            .bind(created_at as i64)
            .execute(s.pool())
            .await
            .unwrap();
        }

        let reopened = match (&t._dir, &t.pg_schema) {
            (Some(dir), _) => Store::open_sqlite(&dir.path().join("test.db")).await.unwrap(),
            (None, Some((url, schema))) => {
                let options = StoreOptions { schema: Some(schema.clone()), max_connections: 2, ..Default::default() };
                Store::connect(url, options).await.unwrap()
            }
            (None, None) => unreachable!("a test store is a file or a schema"),
        };
        let rows = sqlx::query("SELECT id FROM reviews ORDER BY id").fetch_all(reopened.pool()).await.unwrap();
        let kept: Vec<String> = rows.iter().map(|r| sqlx::Row::get(r, "id")).collect();
        assert_eq!(kept, ["m-a-3", "m-b-2", "m-b-3"], "{}", t.label);
        let again = NewReview {
            decision_id: "m-b".into(),
            kind: "review".into(),
            priority: 9,
            reason: None,
            sla_ms: None,
            policy_hash: None,
        };
        assert_eq!(reopened.queue_review(&again).await.unwrap().review.id, "m-b-2", "{}", t.label);
        let duplicate =
            sqlx::query("INSERT INTO reviews (id, decision_id, status, kind, priority, created_at) VALUES ('x', 'm-b', 'pending', 'review', 1, 1)")
                .execute(reopened.pool())
                .await;
        assert!(duplicate.is_err(), "{}: the database refuses a second review", t.label);
        reopened.close().await;
        t.cleanup().await;
    }
}

/// SQLite with group commit off: an insert whose caller gives up while it waits for another writer's lock
/// (a handler's deadline) must not leave its transaction open on the pooled connection, holding the write lock
/// and refusing the next insert on that connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_an_abandoned_insert_without_group_commit_leaves_no_transaction_open() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("abandoned.db");
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let options = StoreOptions {
        // One pooled connection, so the next insert runs on the one the abandoned insert used.
        max_connections: 1,
        group_commit: safeguard_store::GroupCommit { enabled: false, ..Default::default() },
        checkpoint_every: Duration::from_secs(3600),
        ..Default::default()
    };
    let s = Store::connect(&url, options).await.unwrap();
    s.insert_decision(&decision("ab-before", "allow", "spam", None), None).await.unwrap();

    let other_writer = rusqlite::Connection::open(&path).unwrap();
    other_writer.busy_timeout(Duration::from_secs(5)).unwrap();
    other_writer.execute_batch("BEGIN IMMEDIATE").unwrap();
    let abandoned = tokio::time::timeout(
        Duration::from_millis(300),
        s.insert_decision(&decision("ab-dropped", "allow", "spam", None), None),
    )
    .await;
    assert!(abandoned.is_err(), "the insert got past another writer's lock");
    other_writer.execute_batch("COMMIT").unwrap();
    // Let the connection's thread take the lock it was waiting for, and give it back.
    tokio::time::sleep(Duration::from_millis(300)).await;

    tokio::time::timeout(Duration::from_secs(5), s.insert_decision(&decision("ab-after", "allow", "spam", None), None))
        .await
        .expect("the next insert is not stuck behind an open transaction")
        .unwrap();
    // Committed, and the write lock is free: another connection sees the row and can write.
    let seen: i64 =
        other_writer.query_row("SELECT COUNT(*) FROM decisions WHERE id = 'ab-after'", [], |row| row.get(0)).unwrap();
    assert_eq!(seen, 1);
    other_writer.execute_batch("BEGIN IMMEDIATE; COMMIT").unwrap();
    s.close().await;
}

/// Decisions stored together are stored all or none, each with its review: a batch that fails part-way leaves
/// nothing behind for the caller's retry to store twice.
#[tokio::test]
async fn decisions_stored_together_are_all_or_none() {
    for t in stores().await {
        let s = &t.store;
        let review = |id: &str| NewReview {
            decision_id: id.to_string(),
            kind: "review".into(),
            priority: 1,
            reason: Some("spam: undecided".into()),
            sla_ms: None,
            policy_hash: None,
        };
        let settled = decision("dt-1", "allow", "spam", None);
        let undecided = decision("dt-2", "needs_review", "spam", None);
        let (first_review, again) = (review("dt-2"), review("dt-1"));
        let reasoning = vec!["thinking".to_string()];
        let ids = s
            .insert_decisions_together(&[(&settled, Some(&reasoning), None), (&undecided, None, Some(&first_review))])
            .await
            .unwrap();
        assert!(ids[0].is_none() && ids[1].is_some(), "{ids:?} ({})", t.label);
        assert_eq!(s.get_reasoning("dt-1").await.unwrap(), Some(reasoning.clone()));
        let queued = s.list_reviews("pending", 10).await.unwrap();
        assert_eq!(queued.iter().map(|r| r.decision_id.as_str()).collect::<Vec<_>>(), ["dt-2"], "{}", t.label);

        // The second row repeats a stored id: the whole call fails, and its first row is not kept.
        let fresh = decision("dt-3", "needs_review", "spam", None);
        let fresh_review = review("dt-3");
        let failed =
            s.insert_decisions_together(&[(&fresh, None, Some(&fresh_review)), (&settled, None, Some(&again))]).await;
        assert!(failed.is_err(), "{}", t.label);
        assert!(s.get_decision("dt-3").await.unwrap().is_none(), "a failed batch kept a row ({})", t.label);
        assert_eq!(s.list_reviews("pending", 10).await.unwrap().len(), 1, "{}", t.label);

        let single = s.insert_decision_with_review(&fresh, None, &fresh_review).await.unwrap();
        let queued = s.list_reviews("pending", 10).await.unwrap();
        assert!(queued.iter().any(|r| r.id == single && r.decision_id == "dt-3"), "{}", t.label);
        t.cleanup().await;
    }
}

/// A claim holds a pending review for one claimant until it lapses; claiming again renews one's own; others may
/// not decide it meanwhile; a decided review holds nothing.
#[tokio::test]
async fn a_review_is_held_by_one_claimant_at_a_time() {
    for t in stores().await {
        let s = &t.store;
        s.insert_decision(&decision("cl-item", "needs_review", "spam", None), None).await.unwrap();
        let id = s.enqueue_review("cl-item", 1).await.unwrap();
        let now = now_ms();
        let held = s.claim_review(&id, "ana", now + 60_000, now).await.unwrap().unwrap();
        assert_eq!(held.claim_holder(now), Some("ana"), "{}", t.label);
        let refused = s.claim_review(&id, "ben", now + 60_000, now).await.unwrap().unwrap();
        assert_eq!(
            (refused.claim_holder(now), refused.claimed_until),
            (Some("ana"), Some(now + 60_000)),
            "{}",
            t.label
        );
        let renewed = s.claim_review(&id, "ana", now + 120_000, now).await.unwrap().unwrap();
        assert_eq!(renewed.claimed_until, Some(now + 120_000), "{}", t.label);
        // Lapsed, it is anyone's.
        let later = now + 120_000;
        let taken = s.claim_review(&id, "ben", later + 60_000, later).await.unwrap().unwrap();
        assert_eq!(taken.claim_holder(later), Some("ben"), "{}", t.label);
        assert!(s.claim_review("no-such-review", "ana", later, now).await.unwrap().is_none(), "{}", t.label);
        let answer = safeguard_store::ReviewDecision {
            reviewer: "ben".into(),
            outcome: "allow".into(),
            rationale: "fine".into(),
            rule_id: "SP0".into(),
            policy_hash: None,
            overrides_model: None,
        };
        // Deciding checks the claim in the statement that decides: ben holds it, so ana's answer is refused and
        // changes nothing, while ben's goes through.
        let at = later + 1;
        assert!(
            s.decide_review_and_deliver(&id, &answer, at, None, Some("ana")).await.unwrap().is_none(),
            "{}",
            t.label
        );
        let still = s.get_review(&id).await.unwrap().unwrap();
        assert_eq!((still.status.as_str(), still.claim_holder(at)), ("pending", Some("ben")), "{}", t.label);
        s.decide_review_and_deliver(&id, &answer, at, None, Some("ben")).await.unwrap().unwrap();
        let decided = s.claim_review(&id, "ana", later + 60_000, later).await.unwrap().unwrap();
        assert_eq!((decided.status.as_str(), decided.claim_holder(later)), ("decided", None), "{}", t.label);
        t.cleanup().await;
    }
}

/// A chain of appeals (stored before an appeal's own decision counted as its item's): the item's appeal is the
/// one at the chain's end, which a person still answers, not the first, which the second set aside.
#[tokio::test]
async fn the_appeal_of_an_item_is_the_end_of_an_old_chain() {
    for t in stores().await {
        let s = &t.store;
        let appeal_review = |id: &str| NewReview {
            decision_id: id.to_string(),
            kind: "appeal".into(),
            priority: 2,
            reason: Some("appeal".into()),
            sla_ms: None,
            policy_hash: None,
        };
        s.insert_decision(&decision("ch-item", "violation", "spam", None), None).await.unwrap();
        let mut previous = "ch-item".to_string();
        let mut last = None;
        for id in ["ch-appeal-1", "ch-appeal-2"] {
            let mut appeal = decision(id, "needs_review", "spam", None);
            (appeal.source, appeal.replay_of) = ("appeal".into(), Some(previous.clone()));
            last = Some(s.insert_appeal(&appeal, None, &appeal_review(id)).await.unwrap().review);
            previous = id.to_string();
        }
        let first = s.appeal_of("ch-appeal-1").await.unwrap().unwrap();
        assert_eq!(first.decision_id, "ch-appeal-2", "{}", t.label);
        let found = s.appeal_of("ch-item").await.unwrap().unwrap();
        assert_eq!((found.id, found.status.as_str()), (last.unwrap().id, "pending"), "{}", t.label);
        t.cleanup().await;
    }
}

/// A name is pinned only to a version whose stored meta is the one a publisher compared: `put_policy` with other
/// meta than a copy stored earlier (an inline policy's) leaves the name unpinned, and so does
/// `pin_first_version` with meta that is not the stored one.
#[tokio::test]
async fn a_name_is_pinned_only_to_the_meta_that_was_compared() {
    for t in stores().await {
        let s = &t.store;
        let inline = json!({"meta": {"name": "foo", "high_risk": false}, "fallback_name": "inline"});
        let stricter = json!({"meta": {"name": "foo", "high_risk": true}, "fallback_name": null});
        s.put_policy("sha256:foo", "foo", "body", &inline, false).await.unwrap();
        let (again, created) = s.put_policy("sha256:foo", "foo", "body", &stricter, true).await.unwrap();
        assert!(!created && !again.active, "pinned to other meta ({})", t.label);
        assert!(s.active_policy("foo").await.unwrap().is_none(), "{}", t.label);
        let refused = s.pin_first_version("sha256:foo", "foo", &stricter).await.unwrap().unwrap();
        assert!(!refused.active && s.active_policy("foo").await.unwrap().is_none(), "{}", t.label);
        assert!(s.pin_first_version("sha256:nope", "foo", &inline).await.unwrap().is_none(), "{}", t.label);
        let pinned = s.pin_first_version("sha256:foo", "foo", &inline).await.unwrap().unwrap();
        assert!(pinned.active, "{}", t.label);
        assert_eq!(s.active_policy("foo").await.unwrap().unwrap().hash, "sha256:foo", "{}", t.label);
        // A name with an active version keeps it.
        s.put_policy("sha256:foo2", "foo", "body 2", &inline, false).await.unwrap();
        let later = s.pin_first_version("sha256:foo2", "foo", &inline).await.unwrap().unwrap();
        assert!(!later.active, "{}", t.label);
        t.cleanup().await;
    }
}

/// A decision is appealed once, however many requests try at once: one stores the appeal, the others get its
/// review back; a replay of the same decision is not an appeal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_is_appealed_once() {
    for t in stores().await {
        let s = Arc::new(t.store.clone());
        s.insert_decision(&decision("appealed", "allow", "spam", None), None).await.unwrap();
        assert!(s.appeal_of("appealed").await.unwrap().is_none(), "{}", t.label);
        let mut replay = decision("a-replay", "allow", "spam", None);
        (replay.source, replay.replay_of) = ("replay".into(), Some("appealed".into()));
        s.insert_decision(&replay, None).await.unwrap();
        assert!(s.appeal_of("appealed").await.unwrap().is_none(), "a replay is no appeal ({})", t.label);

        let tries: Vec<_> = (0..4)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    let mut appeal = decision(&format!("appeal-{i}"), "needs_review", "spam", None);
                    (appeal.source, appeal.replay_of) = ("appeal".into(), Some("appealed".into()));
                    let review = NewReview {
                        decision_id: appeal.id.clone(),
                        kind: "appeal".into(),
                        priority: 10,
                        reason: Some("appeal".into()),
                        sla_ms: Some(1000),
                        policy_hash: None,
                    };
                    s.insert_appeal(&appeal, Some(&["again".to_string()]), &review).await.unwrap()
                })
            })
            .collect();
        let mut stored = Vec::new();
        for task in tries {
            stored.push(task.await.unwrap());
        }
        assert_eq!(stored.iter().filter(|q| q.fresh).count(), 1, "{}", t.label);
        let fresh = stored.iter().find(|q| q.fresh).unwrap().review.clone();
        assert!(stored.iter().all(|q| q.review.id == fresh.id), "{}", t.label);
        assert_eq!(s.appeal_of("appealed").await.unwrap().map(|r| r.id), Some(fresh.id.clone()), "{}", t.label);
        assert_eq!(s.count_reviews("pending").await.unwrap(), 1, "{}", t.label);
        let kept = s.get_decision(&fresh.decision_id).await.unwrap().unwrap();
        assert_eq!((kept.source.as_str(), kept.replay_of.as_deref()), ("appeal", Some("appealed")), "{}", t.label);
        for q in stored.iter().filter(|q| !q.fresh) {
            assert_eq!(q.review.decision_id, fresh.decision_id, "{}", t.label);
        }
        let others = (0..4).map(|i| format!("appeal-{i}")).filter(|id| *id != fresh.decision_id);
        for id in others {
            assert!(s.get_decision(&id).await.unwrap().is_none(), "{id} was stored too ({})", t.label);
        }
        t.cleanup().await;
    }
}

/// An appeal supersedes the appealed decision's reviews still pending: the person answering the appeal is the
/// one who decides, and a later answer to the stale review cannot overrule them. A review decided before the
/// appeal stays decided. So it goes for appeals made over HTTP and on the bus, on both backends.
#[tokio::test]
async fn an_appeal_supersedes_the_pending_reviews_of_its_decision() {
    for t in stores().await {
        let s = &t.store;
        let review = |decision_id: &str, kind: &str| NewReview {
            decision_id: decision_id.into(),
            kind: kind.into(),
            priority: 0,
            reason: None,
            sla_ms: None,
            policy_hash: None,
        };
        for original in ["stale", "answered", "bus-held", "replayed"] {
            s.insert_decision(&decision(original, "needs_review", "spam", None), None).await.unwrap();
        }
        let stale = s.queue_review(&review("stale", "review")).await.unwrap().review;
        let bus_held = s.queue_review(&review("bus-held", "review")).await.unwrap().review;
        let replayed = s.queue_review(&review("replayed", "review")).await.unwrap().review;
        let sampled = s.queue_review(&review("stale", "sample")).await.unwrap().review;
        let answered = s.queue_review(&review("answered", "review")).await.unwrap().review;
        let person = |outcome: &str| safeguard_store::ReviewDecision {
            reviewer: "ann".into(),
            outcome: outcome.into(),
            rationale: "looked".into(),
            rule_id: "SP1".into(),
            policy_hash: None,
            overrides_model: None,
        };
        assert!(s.decide_review(&answered.id, &person("violation")).await.unwrap().is_some());

        let mut left_pending = Vec::new();
        for original in ["stale", "answered"] {
            let mut appeal = decision(&format!("appeal-of-{original}"), "needs_review", "spam", None);
            (appeal.source, appeal.replay_of) = ("appeal".into(), Some(original.into()));
            let queued = s.insert_appeal(&appeal, None, &review(&appeal.id, "appeal")).await.unwrap();
            left_pending.push(queued.review);
        }
        // An appeal that came in on the bus is stored as any bus decision with its review (no one-appeal check:
        // the producer waits on its own key), and supersedes the same way.
        let mut bus_appeal = decision("bus-appeal", "needs_review", "spam", None);
        (bus_appeal.source, bus_appeal.replay_of) = ("nats:human_review".into(), Some("bus-held".into()));
        let id = s.insert_decision_with_review(&bus_appeal, None, &review("bus-appeal", "appeal")).await.unwrap();
        left_pending.push(s.get_review(&id).await.unwrap().unwrap());
        // A replay under another policy version that needs a person is no appeal: the original's review stays.
        let mut replay = decision("replay-of-replayed", "needs_review", "spam", None);
        replay.replay_of = Some("replayed".into());
        let id = s.insert_decision_with_review(&replay, None, &review(&replay.id, "review")).await.unwrap();
        left_pending.push(s.get_review(&id).await.unwrap().unwrap());
        left_pending.push(replayed);
        for old in [&stale, &sampled, &bus_held] {
            let now = s.get_review(&old.id).await.unwrap().unwrap();
            assert_eq!(now.status, "superseded", "{} ({})", old.kind, t.label);
            assert!(s.decide_review(&old.id, &person("allow")).await.unwrap().is_none(), "{}", t.label);
        }
        assert_eq!(s.get_review(&answered.id).await.unwrap().unwrap().status, "decided", "{}", t.label);
        let pending: Vec<_> = s.list_reviews("pending", 10).await.unwrap().into_iter().map(|r| r.id).collect();
        // The three appeals' reviews, the replay's and the replayed decision's own.
        let mut expected: Vec<_> = left_pending.iter().map(|r| r.id.clone()).collect();
        expected.sort();
        let mut pending_sorted = pending.clone();
        pending_sorted.sort();
        assert_eq!(pending_sorted, expected, "{}", t.label);
        assert!(s.decide_review(&left_pending[0].id, &person("allow")).await.unwrap().is_some(), "{}", t.label);
        t.cleanup().await;
    }
}

/// Paging backwards with the `(before, before_id)` cursor reads every decision once, even where a page ends
/// inside a millisecond shared by several decisions (a batch's); paging by time alone skipped the rest of it.
#[tokio::test]
async fn paging_with_the_cursor_skips_nothing_within_one_millisecond() {
    for t in stores().await {
        let s = &t.store;
        let at = now_ms();
        let mut all = Vec::new();
        for (i, created_at) in [at - 5, at, at, at, at, at, at + 3].into_iter().enumerate() {
            let mut d = decision(&format!("page-{i}"), "allow", "spam", None);
            d.created_at = created_at;
            s.insert_decision(&d, None).await.unwrap();
            all.push((d.created_at, d.id));
        }
        // The list's order: newest first, ids descending within a millisecond.
        all.sort_by(|a, b| b.cmp(a));
        let expected: Vec<String> = all.into_iter().map(|(_, id)| id).collect();
        for limit in [1, 2, 3] {
            let mut seen = Vec::new();
            let mut filter = DecisionFilter { limit, ..Default::default() };
            loop {
                let page = s.list_decisions(&filter).await.unwrap();
                seen.extend(page.iter().map(|d| d.id.clone()));
                match page.last() {
                    Some(last) if page.len() as i64 == limit => {
                        (filter.before, filter.before_id) = (Some(last.created_at), Some(last.id.clone()));
                    }
                    _ => break,
                }
            }
            assert_eq!(seen, expected, "limit {limit} ({})", t.label);
        }
        t.cleanup().await;
    }
}

/// A TCP proxy to PostgreSQL that forwards until told to black-hole: from then on it swallows what either side
/// sends and answers nothing, as a connection does whose packets vanish (a dead NAT entry, a pulled cable).
/// Connections made after it heals are forwarded again.
struct BlackHoleProxy {
    port: u16,
    black_hole: Arc<std::sync::atomic::AtomicBool>,
}

impl BlackHoleProxy {
    async fn start(upstream: std::net::SocketAddr) -> BlackHoleProxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let black_hole = Arc::new(AtomicBool::new(false));
        let hole = Arc::clone(&black_hole);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else { continue };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                for (mut from, mut to) in [(client_read, server_write), (server_read, client_write)] {
                    let hole = Arc::clone(&hole);
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buffer = vec![0u8; 16 * 1024];
                        // A connection black-holed once stays so: after a partial exchange it could not carry
                        // on anyway.
                        let mut swallowing = false;
                        loop {
                            let Ok(read) = from.read(&mut buffer).await else { return };
                            if read == 0 {
                                return;
                            }
                            swallowing |= hole.load(Ordering::SeqCst);
                            if !swallowing && to.write_all(&buffer[..read]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        BlackHoleProxy { port, black_hole }
    }

    fn set_black_hole(&self, on: bool) {
        self.black_hole.store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

/// PostgreSQL: a commit on a connection whose packets vanish gives up after the commit timeout with an error
/// saying its outcome is unknown, instead of holding the one writer (and every insert queued behind it) until
/// the kernel drops the connection; and once the network heals, inserts succeed again on new connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_on_a_silent_connection_times_out_and_the_writer_recovers() {
    use std::time::{Duration, Instant};
    let url = std::env::var("SAFEGUARD_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_string());
    let Some((authority_host, upstream_host, upstream_port)) = postgres_host(&url) else {
        return eprintln!("SKIPPING: cannot read host and port from {url}");
    };
    let upstream =
        match tokio::net::lookup_host((upstream_host.as_str(), upstream_port)).await.ok().and_then(|mut a| a.next()) {
            Some(addr) => addr,
            None => return eprintln!("SKIPPING: cannot resolve {url}"),
        };
    if tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(upstream))
        .await
        .map_or(true, |c| c.is_err())
    {
        return eprintln!("SKIPPING: PostgreSQL at {upstream} unreachable");
    }
    let proxy = BlackHoleProxy::start(upstream).await;
    let proxied = url.replacen(&authority_host, &format!("127.0.0.1:{}", proxy.port), 1);
    let schema = format!("sgtest_hole_{}_{}", std::process::id(), now_ms());
    let commit_timeout = Duration::from_millis(500);
    for enabled in [true, false] {
        let options = StoreOptions {
            schema: Some(schema.clone()),
            max_connections: 2,
            group_commit: safeguard_store::GroupCommit { enabled, commit_timeout, ..Default::default() },
            ..Default::default()
        };
        proxy.set_black_hole(false);
        let s = Store::connect(&proxied, options).await.unwrap();
        let id = |n: &str| format!("hole-{enabled}-{n}");
        s.insert_decision(&decision(&id("before"), "allow", "spam", None), None).await.unwrap();

        proxy.set_black_hole(true);
        let started = Instant::now();
        let (lost_1, lost_2) =
            (decision(&id("lost-1"), "allow", "spam", None), decision(&id("lost-2"), "allow", "spam", None));
        let (first, second) = tokio::join!(s.insert_decision(&lost_1, None), s.insert_decision(&lost_2, None));
        let waited = started.elapsed();
        for result in [first, second] {
            let error = result.expect_err("a commit on a silent connection fails");
            assert!(
                matches!(
                    error,
                    safeguard_store::StoreError::CommitTimedOut(_) | safeguard_store::StoreError::BatchFailed(_)
                ),
                "group commit {enabled}: {error:?}"
            );
            assert!(error.to_string().contains("may or may not"), "{error}");
        }
        // Two commits at most (a batch, or the two rows one by one), each cut at the timeout.
        assert!(waited < commit_timeout * 2 + Duration::from_secs(3), "group commit {enabled}: waited {waited:?}");

        proxy.set_black_hole(false);
        let healed = Instant::now();
        loop {
            match s.insert_decision(&decision(&id("after"), "allow", "spam", None), None).await {
                Ok(()) => break,
                Err(error) if healed.elapsed() < Duration::from_secs(20) => {
                    eprintln!("not yet healed: {error}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => {
                    panic!("group commit {enabled}: no insert succeeded 20 s after the network healed: {error}")
                }
            }
        }
        assert!(s.get_decision(&id("after")).await.unwrap().is_some());
        // The black-holed connections never answer; closing gives up on them after its own deadline.
        tokio::time::timeout(Duration::from_secs(20), s.close()).await.expect("the store closes");
    }
    Store::drop_schema(&url, &schema).await.expect("drop test schema");
}

/// The `host[:port]` part of a `postgres://[user[:password]@]host[:port][/db][?…]` URL as written, its host and its
/// port (5432 when absent).
fn postgres_host(url: &str) -> Option<(String, String, u16)> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    let (host, port) = match host_port.rsplit_once(':') {
        Some((host, port)) => (host, port.parse().ok()?),
        None => (host_port, 5432),
    };
    Some((host_port.to_string(), host.to_string(), port))
}

/// The same database opened again: migrations not yet recorded as applied run on it.
async fn reopen(t: &TestStore) -> Store {
    match (&t._dir, &t.pg_schema) {
        (Some(dir), _) => Store::open_sqlite(&dir.path().join("test.db")).await.unwrap(),
        (None, Some((url, schema))) => {
            let options = StoreOptions { schema: Some(schema.clone()), max_connections: 2, ..Default::default() };
            Store::connect(url, options).await.unwrap()
        }
        (None, None) => unreachable!("a test store is a file or a schema"),
    }
}

/// The database's clock, which leases are measured by, reads the same as this process's (both run on this
/// machine) to the millisecond, not to the second, and stands still for the whole of one statement, so a claim
/// compares and writes one instant.
#[tokio::test]
async fn the_database_clock_counts_milliseconds_and_holds_still_within_a_statement() {
    for t in stores().await {
        let s = &t.store;
        let mut below_the_second = false;
        for _ in 0..20 {
            let before = now_ms();
            let db = s.database_now_ms().await.unwrap();
            let after = now_ms();
            // PostgreSQL rounds its microseconds to the nearest millisecond; this process truncates.
            assert!(before <= db && db <= after + 1, "{}: {before} <= {db} <= {after}", t.label);
            below_the_second |= db % 1000 != 0;
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert!(below_the_second, "{}: milliseconds, not seconds", t.label);

        let now = s.backend().now_ms_sql();
        let sql = format!(
            "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 300000) \
             SELECT MIN(t) AS lo, MAX(t) AS hi FROM (SELECT {now} AS t FROM c) AS x"
        );
        let started = std::time::Instant::now();
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_one(s.pool()).await.unwrap();
        let took = started.elapsed();
        let (lo, hi): (i64, i64) = (sqlx::Row::get(&row, "lo"), sqlx::Row::get(&row, "hi"));
        assert!(took >= std::time::Duration::from_millis(3), "{}: the statement must span milliseconds", t.label);
        assert_eq!(lo, hi, "{}: one instant across a statement of {took:?}", t.label);
        t.cleanup().await;
    }
}

/// Moves a job's lease to `offset_ms` from now by the database's clock, as a server with any clock would see it.
async fn lease_job_until(s: &Store, job_id: &str, offset_ms: i64) {
    let sql = format!("UPDATE jobs SET locked_until = {} + $1 WHERE id = $2", s.backend().now_ms_sql());
    let updated = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(offset_ms).bind(job_id).execute(s.pool()).await.unwrap();
    assert_eq!(updated.rows_affected(), 1);
}

/// Polls until the database's clock has passed `until`.
async fn wait_for_database_clock(s: &Store, until: i64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while s.database_now_ms().await.unwrap() <= until {
        assert!(std::time::Instant::now() < deadline, "the database clock never passed {until}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Leases are written as the database's now plus the lease, and a job is claimable exactly when its lease has
/// lapsed by that clock: whatever this process's clock says, a lease 1 s ahead holds and one 1 ms behind is taken.
/// A lapsed lease is reclaimed before a pending job, even an older one.
#[tokio::test]
async fn job_leases_are_measured_by_the_database_clock() {
    let job = || NewJob { request: json!({}), idempotency_key: None, webhook_url: None, submitted_by: None };
    for t in stores().await {
        let s = &t.store;
        let (old, _) = s.enqueue_job(&job()).await.unwrap();
        let (young, _) = s.enqueue_job(&job()).await.unwrap();
        let before = s.database_now_ms().await.unwrap();
        let claimed = s.claim_job(60_000).await.unwrap().expect("claim");
        let after = s.database_now_ms().await.unwrap();
        assert_eq!(claimed.id, old.id, "{}: the oldest pending job first", t.label);
        let until = claimed.locked_until.unwrap();
        assert!((before + 60_000..=after + 60_000).contains(&until), "{}: {before}..{after} + 60 s: {until}", t.label);
        assert_eq!(s.claim_job(60_000).await.unwrap().expect("the next one").id, young.id, "{}", t.label);
        assert!(s.claim_job(60_000).await.unwrap().is_none(), "{}: both leased", t.label);

        lease_job_until(s, &old.id, 1_000).await;
        assert!(!s.has_claimable_job().await.unwrap(), "{}: a lease 1 s ahead holds", t.label);
        assert!(s.claim_job(60_000).await.unwrap().is_none(), "{}", t.label);
        lease_job_until(s, &old.id, -1).await;
        assert!(s.has_claimable_job().await.unwrap(), "{}: a lease 1 ms behind has lapsed", t.label);
        let reclaimed = s.claim_job(60_000).await.unwrap().expect("lapsed lease reclaimed");
        assert_eq!((reclaimed.id.as_str(), reclaimed.attempts), (old.id.as_str(), 2), "{}", t.label);

        // A short lease, renewed by the database's clock, holds until that clock passes it, then lapses.
        let token = reclaimed.lease_token.as_deref().unwrap();
        let before = s.database_now_ms().await.unwrap();
        assert!(s.renew_lease(&old.id, token, 300).await.unwrap());
        let after = s.database_now_ms().await.unwrap();
        let until = s.get_job(&old.id).await.unwrap().unwrap().locked_until.unwrap();
        assert!((before + 300..=after + 300).contains(&until), "{}: {before}..{after} + 300 ms: {until}", t.label);
        assert!(!s.has_claimable_job().await.unwrap(), "{}: renewed", t.label);
        assert!(s.claim_job(60_000).await.unwrap().is_none(), "{}: renewed", t.label);
        wait_for_database_clock(s, until).await;
        assert!(s.has_claimable_job().await.unwrap(), "{}: lapsed", t.label);
        let third = s.claim_job(60_000).await.unwrap().expect("lapsed again");
        assert_eq!((third.id.as_str(), third.attempts), (old.id.as_str(), 3), "{}", t.label);

        // Lapsed leases before the pending backlog, however old its jobs are.
        let (oldest, _) = s.enqueue_job(&job()).await.unwrap();
        sqlx::query("UPDATE jobs SET created_at = 0 WHERE id = $1").bind(&oldest.id).execute(s.pool()).await.unwrap();
        lease_job_until(s, &young.id, -1).await;
        assert_eq!(s.claim_job(60_000).await.unwrap().unwrap().id, young.id, "{}: lapsed first", t.label);
        assert_eq!(s.claim_job(60_000).await.unwrap().unwrap().id, oldest.id, "{}: then pending", t.label);
        assert!(s.claim_job(60_000).await.unwrap().is_none(), "{}", t.label);
        t.cleanup().await;
    }
}

/// A delivery's claim and its retry are the database's now plus the lease or the backoff, and a delivery is due
/// by that clock; the claim's `next_at` still fences a sender whose lease ran out.
#[tokio::test]
async fn webhook_due_times_and_leases_are_measured_by_the_database_clock() {
    for t in stores().await {
        let s = &t.store;
        let (job, _) = s
            .enqueue_job(&NewJob { request: json!({}), idempotency_key: None, webhook_url: None, submitted_by: None })
            .await
            .unwrap();
        let claimed = s.claim_job(60_000).await.unwrap().unwrap();
        let hook = NewDelivery { job_id: job.id.clone(), url: "http://x/hook".into(), body: "{}".into() };
        let record = decision("dclock", "allow", "p", Some(&job.id));
        s.finish_job(&job.id, claimed.lease_token.as_deref().unwrap(), &record, None, None, Some(&hook)).await.unwrap();
        let stored = &s.deliveries_for_job(&job.id).await.unwrap()[0];
        assert!(stored.next_at <= s.database_now_ms().await.unwrap(), "{}: due at once", t.label);

        let before = s.database_now_ms().await.unwrap();
        let first = s.claim_delivery(300).await.unwrap().expect("due");
        let after = s.database_now_ms().await.unwrap();
        assert!((before + 300..=after + 300).contains(&first.next_at), "{}: {}", t.label, first.next_at);
        assert!(s.claim_delivery(30_000).await.unwrap().is_none(), "{}: leased", t.label);

        // The lease lapses by the database's clock: another sender takes the delivery, the first is fenced off.
        wait_for_database_clock(s, first.next_at).await;
        let before = s.database_now_ms().await.unwrap();
        let second = s.claim_delivery(30_000).await.unwrap().expect("lapsed lease reclaimed");
        let after = s.database_now_ms().await.unwrap();
        assert!((before + 30_000..=after + 30_000).contains(&second.next_at), "{}: {}", t.label, second.next_at);
        assert!(!s.record_delivery_attempt(&first, true, Some(200), None, None).await.unwrap(), "{}", t.label);

        let before = s.database_now_ms().await.unwrap();
        assert!(s.record_delivery_attempt(&second, false, Some(503), Some("down"), Some(300)).await.unwrap());
        let after = s.database_now_ms().await.unwrap();
        let retry = &s.deliveries_for_job(&job.id).await.unwrap()[0];
        assert_eq!((retry.status.as_str(), retry.attempts), ("pending", 1), "{}", t.label);
        assert!((before + 300..=after + 300).contains(&retry.next_at), "{}: {}", t.label, retry.next_at);
        assert!(s.claim_delivery(30_000).await.unwrap().is_none(), "{}: not due for 300 ms", t.label);
        assert!(!s.record_delivery_attempt(&second, true, Some(200), None, None).await.unwrap(), "{}", t.label);
        wait_for_database_clock(s, retry.next_at).await;
        let third = s.claim_delivery(30_000).await.unwrap().expect("retry due");
        assert!(third.next_at > retry.next_at, "{}: a fresh token", t.label);
        assert!(s.record_delivery_attempt(&third, false, Some(503), Some("down"), None).await.unwrap());

        // Sent again by an operator: due at once by the database's clock.
        assert_eq!(s.retry_failed_deliveries(Some(&job.id)).await.unwrap(), 1, "{}", t.label);
        let again = &s.deliveries_for_job(&job.id).await.unwrap()[0];
        assert!(again.next_at <= s.database_now_ms().await.unwrap(), "{}", t.label);
        assert!(s.claim_delivery(30_000).await.unwrap().is_some(), "{}", t.label);
        t.cleanup().await;
    }
}

async fn announced_at(s: &Store, review_id: &str) -> Option<i64> {
    let row = sqlx::query("SELECT announced_at FROM reviews WHERE id = $1").bind(review_id).fetch_one(s.pool());
    sqlx::Row::get(&row.await.unwrap(), "announced_at")
}

/// Only decided reviews the bus waits for (reviews and appeals of NATS items, and HTTP appeals of them) are left
/// for the announcer; every other review is marked announced as it is decided, and migration 0006 marks those
/// decided before it, so the announcer's sweep never comes across them again.
#[tokio::test]
async fn only_reviews_the_bus_waits_for_stay_unannounced() {
    use safeguard_store::ReviewDecision;
    let queue = |decision_id: &str, kind: &str| NewReview {
        decision_id: decision_id.into(),
        kind: kind.into(),
        priority: 1,
        reason: None,
        sla_ms: None,
        policy_hash: None,
    };
    let verdict = ReviewDecision {
        reviewer: "alice".into(),
        outcome: "allow".into(),
        rationale: "fine".into(),
        rule_id: "SP0".into(),
        policy_hash: None,
        overrides_model: None,
    };
    for t in stores().await {
        let s = &t.store;
        let mut bus = decision("an-bus", "needs_review", "spam", None);
        bus.source = "nats:human_review".into();
        s.insert_decision(&bus, None).await.unwrap();
        s.insert_decision(&decision("an-http", "needs_review", "spam", None), None).await.unwrap();
        let bus_review = s.queue_review(&queue("an-bus", "review")).await.unwrap().review;
        let bus_sample = s.queue_review(&queue("an-bus", "sample")).await.unwrap().review;
        s.decide_review(&bus_sample.id, &verdict).await.unwrap().expect("decided");
        let http_review = s.queue_review(&queue("an-http", "review")).await.unwrap().review;
        let appeal = |id: &str, of: &str| {
            let mut record = decision(id, "needs_review", "spam", None);
            (record.source, record.replay_of) = ("appeal".into(), Some(of.into()));
            record
        };
        let (of_bus, of_http) = (appeal("an-bus-a", "an-bus"), appeal("an-http-a", "an-http"));
        let bus_appeal = s.insert_appeal(&of_bus, None, &queue("an-bus-a", "appeal")).await.unwrap().review;
        let http_appeal = s.insert_appeal(&of_http, None, &queue("an-http-a", "appeal")).await.unwrap().review;
        // The appeals superseded the pending reviews of what they appeal; those are never announced either.
        for review in [&bus_appeal, &http_appeal] {
            s.decide_review(&review.id, &verdict).await.unwrap().expect("decided");
        }
        assert!(s.decide_review(&bus_review.id, &verdict).await.unwrap().is_none(), "{}: superseded", t.label);
        assert!(s.decide_review(&http_review.id, &verdict).await.unwrap().is_none(), "{}: superseded", t.label);
        // A second review of the bus item, of a redelivery say, and one of the HTTP item, decided directly.
        s.insert_decision(&decision("an-http-2", "needs_review", "spam", None), None).await.unwrap();
        let mut bus2 = decision("an-bus-2", "needs_review", "spam", None);
        bus2.source = "nats:human_review".into();
        s.insert_decision(&bus2, None).await.unwrap();
        let bus_review = s.queue_review(&queue("an-bus-2", "review")).await.unwrap().review;
        let http_review = s.queue_review(&queue("an-http-2", "review")).await.unwrap().review;
        for review in [&bus_review, &http_review] {
            s.decide_review(&review.id, &verdict).await.unwrap().expect("decided");
        }

        let sorted = |mut ids: Vec<String>| {
            ids.sort();
            ids
        };
        let waiting = |s: Store| async move {
            sorted(s.reviews_to_announce(10).await.unwrap().into_iter().map(|r| r.id).collect())
        };
        let expected = sorted(vec![bus_review.id.clone(), bus_appeal.id.clone()]);
        assert_eq!(waiting(s.clone()).await, expected, "{}", t.label);
        for marked in [&http_review, &http_appeal, &bus_sample] {
            let decided_at = s.get_review(&marked.id).await.unwrap().unwrap().decided_at;
            assert!(decided_at.is_some(), "{}", t.label);
            assert_eq!(announced_at(s, &marked.id).await, decided_at, "{}: marked as decided", t.label);
        }
        for unmarked in [&bus_review, &bus_appeal] {
            assert_eq!(announced_at(s, &unmarked.id).await, None, "{}: waits for the announcer", t.label);
        }

        // As a server from before migration 0006 left them: every decided review unmarked.
        for statement in [
            "UPDATE reviews SET announced_at = NULL WHERE status = 'decided'",
            "DROP INDEX reviews_unannounced",
            "DROP INDEX jobs_by_lease",
            "DELETE FROM safeguard_migrations WHERE version = 6",
        ] {
            sqlx::query(statement).execute(s.pool()).await.unwrap();
        }
        let reopened = reopen(&t).await;
        assert_eq!(waiting(reopened.clone()).await, expected, "{}", t.label);
        for marked in [&http_review, &http_appeal, &bus_sample] {
            let decided_at = reopened.get_review(&marked.id).await.unwrap().unwrap().decided_at;
            assert_eq!(announced_at(&reopened, &marked.id).await, decided_at, "{}: marked by 0006", t.label);
        }
        for unmarked in [&bus_review, &bus_appeal] {
            assert_eq!(announced_at(&reopened, &unmarked.id).await, None, "{}: still to announce", t.label);
        }
        reopened.mark_review_announced(&bus_review.id).await.unwrap();
        assert_eq!(waiting(reopened.clone()).await, vec![bus_appeal.id.clone()], "{}", t.label);
        reopened.close().await;
        t.cleanup().await;
    }
}

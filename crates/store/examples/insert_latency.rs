use std::time::Instant;

use safeguard_store::{DecisionRecord, GroupCommit, SqliteSync, Store, StoreOptions};
use serde_json::json;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    for (label, group) in [("direct", false), ("group commit", true), ("direct2", false), ("group2", true)] {
        let store = Store::open_sqlite_with(
            &dir.path().join(format!("{label}.db")),
            StoreOptions {
                sqlite_sync: SqliteSync::Normal,
                group_commit: GroupCommit { enabled: group, ..Default::default() },
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let mut times = Vec::new();
        for i in 0..2000 {
            let record = DecisionRecord {
                id: format!("{label}-{i}"),
                created_at: i,
                policy_hashes: vec!["sha256:abc".into()],
                policy_names: vec!["spam".into()],
                model_id: "m".into(),
                effort: "low".into(),
                prompt_hash: None,
                sampling: json!({"kind": "greedy"}),
                content: json!({"text": "hello there, friend"}),
                verdicts: json!([{"policy": "spam", "outcome": "allow", "label": 0}]),
                outcome: "allow".into(),
                failure_reason: None,
                timings: json!({"total": 1.0}),
                prompt_tokens: 640,
                cached_prompt_tokens: 600,
                completion_tokens: 24,
                source: "api".into(),
                job_id: None,
                replay_of: None,
            };
            let started = Instant::now();
            store.insert_decision(&record, Some(&["some reasoning".to_string()])).await.unwrap();
            times.push(started.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        println!("{label}: p50 {:.3} ms p90 {:.3} p99 {:.3}", times[1000], times[1800], times[1980]);
        let mut times = Vec::new();
        for _ in 0..2000 {
            let started = Instant::now();
            sqlx::query("SELECT 1").execute(store.pool()).await.unwrap();
            times.push(started.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        println!("  SELECT 1: p50 {:.3} ms p90 {:.3} p99 {:.3}", times[1000], times[1800], times[1980]);
        let mut times = Vec::new();
        for _ in 0..2000 {
            let started = Instant::now();
            tokio::task::yield_now().await;
            tokio::time::sleep(std::time::Duration::from_micros(1)).await;
            times.push(started.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        println!("  1 µs sleep: p50 {:.3} ms p90 {:.3} p99 {:.3}", times[1000], times[1800], times[1980]);
    }
}

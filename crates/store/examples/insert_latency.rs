//! Latency of storing one decision, alone and under an open-loop load, on SQLite:
//! `cargo run --release -p safeguard-store --example insert_latency [-- RATE COUNT]`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use safeguard_store::{DecisionRecord, SqliteSync, Store, StoreOptions};
use serde_json::json;

fn record(id: String) -> DecisionRecord {
    DecisionRecord {
        id,
        created_at: 0,
        policy_hashes: vec!["sha256:abc".into()],
        policy_names: vec!["spam".into()],
        model_id: "openai/gpt-oss-safeguard-20b".into(),
        effort: "low".into(),
        prompt_hash: Some("sha256:feed".into()),
        sampling: json!({"sampling": {"kind": "greedy"}, "mode": "separate", "max_tokens": null}),
        content: json!({"kind": "text", "text": "hello there, friend"}),
        verdicts: json!([{"policy": "spam", "outcome": "allow", "label": "0", "violation": false, "rule_ids": []}]),
        outcome: "allow".into(),
        failure_reason: None,
        timings: json!({"total": {"total_ms": 0.4}, "prompts": []}),
        prompt_tokens: 640,
        cached_prompt_tokens: 612,
        completion_tokens: 24,
        source: "api".into(),
        job_id: None,
        replay_of: None,
        submitted_by: None,
    }
}

fn report(label: &str, mut times: Vec<f64>) {
    times.sort_by(f64::total_cmp);
    let at = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
    println!("{label:<28} p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  max {:.3} ms", at(0.5), at(0.9), at(0.99), at(1.0));
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let rate: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000.0);
    let count: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5000);
    let dir = tempfile::tempdir().expect("temp dir");
    for sync in [SqliteSync::Normal, SqliteSync::Full] {
        let options = StoreOptions { sqlite_sync: sync, ..StoreOptions::default() };
        let store = Store::open_sqlite_with(&dir.path().join(format!("{sync:?}.db")), options).await.expect("open");
        // Warm the file and the statement cache.
        for i in 0..500 {
            store.insert_decision(&record(format!("warm-{i}")), Some(&["r".to_string()])).await.expect("insert");
        }
        let mut alone = Vec::with_capacity(count);
        for i in 0..count.min(2000) {
            let started = Instant::now();
            store.insert_decision(&record(format!("seq-{i}")), Some(&["r".to_string()])).await.expect("insert");
            alone.push(started.elapsed().as_secs_f64() * 1e3);
        }
        report(&format!("{sync:?}, one at a time"), alone);

        let store = Arc::new(store);
        let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..count {
            ticker.tick().await;
            let store = Arc::clone(&store);
            tasks.spawn(async move {
                let started = Instant::now();
                store.insert_decision(&record(format!("load-{i}")), Some(&["r".to_string()])).await.expect("insert");
                started.elapsed().as_secs_f64() * 1e3
            });
        }
        let mut loaded = Vec::with_capacity(count);
        while let Some(ms) = tasks.join_next().await {
            loaded.push(ms.expect("task"));
        }
        report(&format!("{sync:?}, {rate}/s open loop"), loaded);
        let stats = store.group_commit_stats();
        println!("  group commit: {} rows in {} commits", stats.rows, stats.commits);
    }
}

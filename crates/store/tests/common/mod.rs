//! The databases a store test runs against: SQLite and, when reachable, PostgreSQL (in a throwaway schema).

use safeguard_store::{DecisionRecord, Store, StoreOptions};
use serde_json::json;

const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A store, its label, the directory its SQLite file lives in, and the PostgreSQL URL and schema to drop.
pub type TestDb = (Store, &'static str, Option<tempfile::TempDir>, Option<(String, String)>);

/// `name` tells the SQLite file and the PostgreSQL schema of one test file from another's.
pub async fn stores(name: &str) -> Vec<TestDb> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Store::open_sqlite(&dir.path().join(format!("{name}.db"))).await.unwrap();
    let mut out: Vec<TestDb> = vec![(sqlite, "sqlite", Some(dir), None)];
    let url = std::env::var("SAFEGUARD_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_string());
    let schema = format!(
        "sg{name}_{}_{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
    );
    let options = StoreOptions { schema: Some(schema.clone()), max_connections: 4, ..Default::default() };
    match tokio::time::timeout(std::time::Duration::from_secs(5), Store::connect(&url, options)).await {
        Ok(Ok(store)) => out.push((store, "postgres", None, Some((url, schema)))),
        Ok(Err(err)) => eprintln!("SKIPPING PostgreSQL half of this test: {url} unreachable: {err}"),
        Err(_) => eprintln!("SKIPPING PostgreSQL half of this test: {url} timed out"),
    }
    out
}

/// Closes the store and drops its PostgreSQL schema.
pub async fn clean_up((store, _, _, pg): TestDb) {
    store.close().await;
    if let Some((url, schema)) = pg {
        Store::drop_schema(&url, &schema).await.unwrap();
    }
}

/// An allowed text decision under `sha256:spam`, made at `created_at`.
pub fn decision(id: &str, created_at: i64) -> DecisionRecord {
    DecisionRecord {
        id: id.to_string(),
        created_at,
        policy_hashes: vec!["sha256:spam".into()],
        policy_names: vec!["spam".into()],
        model_id: "tiny".into(),
        effort: "low".into(),
        prompt_hash: None,
        sampling: json!("greedy"),
        content: json!({"kind": "text", "text": format!("text of {id}")}),
        verdicts: json!([{"policy": "spam", "outcome": "allow"}]),
        outcome: "allow".into(),
        failure_reason: None,
        timings: json!({}),
        prompt_tokens: 0,
        cached_prompt_tokens: 0,
        completion_tokens: 0,
        source: "api".into(),
        job_id: None,
        replay_of: None,
        submitted_by: None,
    }
}

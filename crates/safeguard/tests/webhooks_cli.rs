//! `safeguard webhooks failed|retry` against a SQLite store holding a job whose webhook was given up on.

use std::process::{Command, Output};

use safeguard_store::{DecisionRecord, NewDelivery, NewJob, Store, now_ms};
use serde_json::json;

fn safeguard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_safeguard")).args(args).output().expect("run safeguard")
}

fn decision(job_id: &str) -> DecisionRecord {
    DecisionRecord {
        id: format!("decision-of-{job_id}"),
        created_at: now_ms(),
        policy_hashes: vec!["sha256:spamv1".into()],
        policy_names: vec!["spam".into()],
        model_id: "tiny".into(),
        effort: "low".into(),
        prompt_hash: None,
        sampling: json!({}),
        content: json!({"kind": "text", "text": "hi"}),
        verdicts: json!([]),
        outcome: "allow".into(),
        failure_reason: None,
        timings: json!({}),
        prompt_tokens: 0,
        cached_prompt_tokens: 0,
        completion_tokens: 0,
        source: "job".into(),
        job_id: Some(job_id.into()),
        replay_of: None,
        submitted_by: None,
    }
}

/// A job whose webhook failed its last attempt, as a server's sender leaves it.
async fn job_with_failed_webhook(store: &Store, event: &str) -> String {
    let new = NewJob { request: json!({}), idempotency_key: None, webhook_url: None, submitted_by: None };
    let (job, _) = store.enqueue_job(&new).await.unwrap();
    let claimed = store.claim_job(60_000).await.unwrap().unwrap();
    let body = json!({"type": event}).to_string();
    let hook = NewDelivery { job_id: job.id.clone(), url: "https://hooks.example/in".into(), body };
    store
        .finish_job(&job.id, claimed.lease_token.as_deref().unwrap(), &decision(&job.id), None, None, Some(&hook))
        .await
        .unwrap();
    let delivery = store.claim_delivery(30_000).await.unwrap().unwrap();
    store.record_delivery_attempt(&delivery, false, Some(503), Some("HTTP 503"), None).await.unwrap();
    job.id
}

#[test]
fn failed_webhooks_are_listed_and_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("safeguard.db");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (first, second) = runtime.block_on(async {
        let store = Store::open_sqlite(&db).await.unwrap();
        let jobs = (
            job_with_failed_webhook(&store, "job.completed").await,
            job_with_failed_webhook(&store, "job.reviewed").await,
        );
        store.close().await;
        jobs
    });
    let url = format!("sqlite://{}", db.display());

    let listed = safeguard(&["webhooks", "failed", "--database", &url]);
    assert!(listed.status.success(), "{listed:?}");
    let stdout = String::from_utf8_lossy(&listed.stdout);
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    assert!(stdout.contains(&first) && stdout.contains("https://hooks.example/in\t1\t503\tHTTP 503"), "{stdout}");
    let mut events: Vec<&str> = stdout.lines().filter_map(|line| line.split('\t').nth(2)).collect();
    events.sort_unstable();
    assert_eq!(events, ["job.completed", "job.reviewed"], "each names its event: {stdout}");

    let retried = safeguard(&["webhooks", "retry", "--job", &first, "--database", &url]);
    assert!(retried.status.success(), "{retried:?}");
    assert!(String::from_utf8_lossy(&retried.stderr).contains("queued 1 deliveries"), "{retried:?}");
    let listed = safeguard(&["webhooks", "failed", "--database", &url]);
    let stdout = String::from_utf8_lossy(&listed.stdout);
    assert!(!stdout.contains(&first) && stdout.contains(&second), "{stdout}");

    // Retrying the same job again finds nothing to send: a clear failure, not a silent success.
    let again = safeguard(&["webhooks", "retry", "--job", &first, "--database", &url]);
    assert_eq!(again.status.code(), Some(1), "{again:?}");
    assert!(String::from_utf8_lossy(&again.stderr).contains("no failed delivery for job"), "{again:?}");
    // Saying which is required.
    let unsaid = safeguard(&["webhooks", "retry", "--database", &url]);
    assert_eq!(unsaid.status.code(), Some(2), "{unsaid:?}");
    let all = safeguard(&["webhooks", "retry", "--all", "--database", &url]);
    assert!(all.status.success(), "{all:?}");
    assert!(safeguard(&["webhooks", "failed", "--database", &url]).stdout.is_empty());
}

/// `keys create` makes the data dir's database if there is none yet (a key is made before the first start off
/// loopback) and says where; listing, revoking and the webhook commands refuse a data dir without one instead of
/// making an empty database there and reporting nothing as if all were well.
#[test]
fn key_and_webhook_commands_name_their_database_and_do_not_invent_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    for args in [&["keys", "list"][..], &["keys", "revoke", "some-id"], &["webhooks", "failed"]] {
        let output = safeguard(&[args, &["--data-dir", data]].concat());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success() && stderr.contains("no database at"), "{args:?}: {stderr}");
    }
    assert!(!dir.path().join("data").exists(), "nothing made by a command that only reads");
    // Named by URL: a mistyped SQLite file, or a PostgreSQL schema no server ever used, is refused the same way.
    let typo = format!("sqlite://{}", dir.path().join("typo.db").display());
    let pg = std::env::var("SAFEGUARD_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string());
    let schema = format!("sgnosuch_{}", std::process::id());
    for (url, schema) in [(typo.as_str(), None), (pg.as_str(), Some(schema.as_str()))] {
        let mut args = vec!["triage", "audit", "--database", url];
        args.extend(schema.iter().flat_map(|schema| ["--database-schema", schema]));
        let output = safeguard(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        if schema.is_some() && stderr.contains("cannot open the database") {
            eprintln!("SKIPPING the PostgreSQL case: {stderr}");
            continue;
        }
        assert!(!output.status.success() && stderr.contains("no database at"), "{args:?}: {stderr}");
    }
    assert!(!dir.path().join("typo.db").exists(), "no file made for a mistyped URL");

    let created = safeguard(&["keys", "create", "--scope", "classify", "--name", "ops", "--data-dir", data]);
    let stderr = String::from_utf8_lossy(&created.stderr);
    assert!(created.status.success() && stderr.contains("safeguard.db"), "{stderr}");
    let listed = safeguard(&["keys", "list", "--data-dir", data]);
    let stdout = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success() && stdout.contains("\tops\tclassify\tactive"), "{stdout}");

    // Keys made without a name are each a client of their own, never one shared default.
    for _ in 0..2 {
        assert!(safeguard(&["keys", "create", "--scope", "classify", "--data-dir", data]).status.success());
    }
    let listed = String::from_utf8_lossy(&safeguard(&["keys", "list", "--data-dir", data]).stdout).to_string();
    let mut names: Vec<&str> = listed.lines().filter_map(|line| line.split('\t').nth(1)).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), 3, "{listed}");
    assert!(names.iter().filter(|name| name.starts_with("client-")).count() == 2, "{listed}");
}

/// `safeguard prune`: a dry run counts and deletes nothing; the real one deletes only what is past the period.
#[test]
fn prune_deletes_only_what_is_past_the_retention_period() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("safeguard.db");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let url = format!("sqlite://{}", db.display());
    let kept = runtime.block_on(async {
        let store = Store::open_sqlite(&db).await.unwrap();
        let mut old = decision("old");
        (old.id, old.job_id, old.created_at) = ("year-old".into(), None, now_ms() - 366 * 86_400_000);
        store.insert_decision(&old, None).await.unwrap();
        let mut recent = decision("recent");
        (recent.id, recent.job_id) = ("today".into(), None);
        store.insert_decision(&recent, None).await.unwrap();
        store.close().await;
        recent.id
    });

    let refused = safeguard(&["prune", "--older-than-days", "0", "--database", &url]);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("would delete every decision"), "{refused:?}");

    let dry = safeguard(&["prune", "--older-than-days", "30", "--dry-run", "--format", "json", "--database", &url]);
    assert!(dry.status.success(), "{dry:?}");
    let counted: serde_json::Value = serde_json::from_slice(&dry.stdout).unwrap();
    assert_eq!((counted["decisions"].as_u64(), counted["dry_run"].as_bool()), (Some(1), Some(true)), "{counted}");

    let pruned = safeguard(&["prune", "--older-than-days", "30", "--database", &url]);
    assert!(pruned.status.success(), "{pruned:?}");
    let stdout = String::from_utf8_lossy(&pruned.stdout);
    assert!(stdout.starts_with("deleted 1 decision, 0 jobs, 0 webhook deliveries"), "{stdout}");
    runtime.block_on(async {
        let store = Store::open_sqlite(&db).await.unwrap();
        assert!(store.get_decision("year-old").await.unwrap().is_none());
        assert!(store.get_decision(&kept).await.unwrap().is_some());
        store.close().await;
    });
}

/// Only a server migrates. A store made by an older version (a migration this one knows is missing) is refused by
/// every command that reads or edits it, and left as it was, since a server of that version may still run on it.
#[test]
fn commands_other_than_serve_refuse_a_store_this_version_has_not_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("safeguard.db");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let latest = runtime.block_on(async {
        let store = Store::open_sqlite(&db).await.unwrap();
        let latest: i64 =
            sqlx::query_scalar("SELECT MAX(version) FROM safeguard_migrations").fetch_one(store.pool()).await.unwrap();
        sqlx::query("DELETE FROM safeguard_migrations WHERE version = $1")
            .bind(latest)
            .execute(store.pool())
            .await
            .unwrap();
        store.close().await;
        latest
    });
    let url = format!("sqlite://{}", db.display());
    let data = dir.path().to_str().unwrap();
    for args in [
        &["keys", "list", "--data-dir", data][..],
        &["keys", "create", "--scope", "classify", "--data-dir", data],
        &["prune", "--older-than-days", "30", "--dry-run", "--database", &url],
        &["webhooks", "failed", "--database", &url],
        &["triage", "audit", "--database", &url],
    ] {
        let output = safeguard(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(&format!("lacks migrations {latest}")), "{args:?}: {stderr}");
    }
    runtime.block_on(async {
        let options = safeguard_store::StoreOptions {
            migrations: safeguard_store::Migrations::RequireApplied,
            ..Default::default()
        };
        let err = Store::open_sqlite_with(&db, options).await.unwrap_err();
        assert!(matches!(err, safeguard_store::StoreError::PendingMigrations { .. }), "still pending: {err}");
    });
}

//! `safeguard serve` with the real engine and a tiny model: jobs survive `kill -9`, and after a restart
//! every accepted job is finished exactly once; SIGTERM drains and exits cleanly; bad routing flags are refused
//! before a model loads.

mod serve_common;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use serve_common::{ADMIN_KEY, ServeProcess};

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build().unwrap()
}

fn job_status(http: &reqwest::blocking::Client, base: &str, id: &str) -> Value {
    http.get(format!("{base}/v1/jobs/{id}")).bearer_auth(ADMIN_KEY).send().unwrap().json().unwrap()
}

#[test]
fn every_accepted_job_is_finished_exactly_once_across_kill_9() {
    let data = tempfile::tempdir().unwrap();
    let lease = ["--job-lease", "2", "--workers", "2", "--effort", "low", "--rate-limit", "0"];
    let server = ServeProcess::start(data.path(), &lease);
    let http = client();

    let mut ids = Vec::new();
    for i in 0..6 {
        let response = http
            .post(format!("{}/v1/jobs", server.base))
            .bearer_auth(ADMIN_KEY)
            .header("Idempotency-Key", format!("durable-{i}"))
            .json(&json!({"text": format!("message number {i}: is this spam?"), "policies": ["spam"], "max_tokens": 8}))
            .send()
            .unwrap();
        assert_eq!(response.status().as_u16(), 202, "job {i} accepted");
        let body: Value = response.json().unwrap();
        ids.push(body["id"].as_str().unwrap().to_string());
    }
    // Let some (not all) finish, then crash without any chance to clean up.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = ids.iter().filter(|id| job_status(&http, &server.base, id)["status"] == "done").count();
        if done >= 1 || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    server.kill_hard();

    let store_path = data.path().join("safeguard.db");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let unfinished_at_crash = rt.block_on(async {
        let store = safeguard_store::Store::open_sqlite(&store_path).await.unwrap();
        let depth = store.queue_depth().await.unwrap();
        store.close().await;
        depth.pending + depth.running
    });
    eprintln!("jobs unfinished when killed: {unfinished_at_crash}");

    let server = ServeProcess::start(data.path(), &lease);
    // The same Idempotency-Key after the crash returns the accepted job, not a new one.
    let again: Value = http
        .post(format!("{}/v1/jobs", server.base))
        .bearer_auth(ADMIN_KEY)
        .header("Idempotency-Key", "durable-0")
        .json(&json!({"text": "message number 0: is this spam?", "policies": ["spam"], "max_tokens": 8}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(again["id"].as_str().unwrap(), ids[0]);

    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let statuses: Vec<Value> = ids.iter().map(|id| job_status(&http, &server.base, id)).collect();
        if statuses.iter().all(|s| s["status"] == "done") {
            // Fail closed: a random tiny model rarely answers well, but an undecided job is never "allow"ed by default.
            assert!(
                statuses
                    .iter()
                    .all(|s| ["allow", "violation", "needs_review"].contains(&s["outcome"].as_str().unwrap()))
            );
            break;
        }
        assert!(Instant::now() < deadline, "jobs not finished after restart: {statuses:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    rt.block_on(async {
        let store = safeguard_store::Store::open_sqlite(&store_path).await.unwrap();
        for id in &ids {
            assert_eq!(store.decisions_for_job(id).await.unwrap(), 1, "job {id} has exactly one decision");
        }
        store.close().await;
    });
    let status = server.terminate();
    assert!(status.success(), "clean exit after SIGTERM: {status:?}");
}

#[test]
fn sync_classify_with_the_real_engine_is_stored_and_health_checks_pass() {
    let data = tempfile::tempdir().unwrap();
    let server = ServeProcess::start(data.path(), &["--rate-limit", "0", "--reasoning-max-tokens", "12"]);
    let http = client();
    let ready: Value = http.get(format!("{}/readyz", server.base)).send().unwrap().json().unwrap();
    assert_eq!(ready["ready"], true);
    let decision: Value = http
        .post(format!("{}/v1/classify", server.base))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"text": "win a free phone, click here", "policies": ["spam"], "max_tokens": 32, "return_reasoning": true}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let outcome = decision["outcome"].as_str().unwrap();
    assert!(["allow", "violation", "needs_review"].contains(&outcome), "{decision}");
    assert!(decision["usage"]["prompt_tokens"].as_u64().unwrap() > 100, "the real prompt was rendered: {decision}");
    let id = decision["decision_id"].as_str().unwrap();
    let stored: Value =
        http.get(format!("{}/v1/decisions/{id}", server.base)).bearer_auth(ADMIN_KEY).send().unwrap().json().unwrap();
    assert_eq!(stored["outcome"], outcome);
    assert!(stored["model"].as_str().unwrap().contains("tiny"), "{stored}");
    let metrics = http.get(format!("{}/metrics", server.base)).send().unwrap().text().unwrap();
    assert!(metrics.contains("safeguard_decisions_total{"), "{metrics}");
    // Without a max_tokens of its own, the cascade's steps (low, then high for an unreadable answer) stop at the
    // server's --reasoning-max-tokens; the effort's own budget is hundreds, which the random model would fill.
    let capped: Value = http
        .post(format!("{}/v1/classify", server.base))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"text": "win a free phone, click here", "policies": ["spam"]}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let steps = capped["stages"].as_array().map_or(1, |stages| stages.len()) as u64;
    let completion = capped["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(completion > 0 && completion <= 12 * steps, "{completion} tokens in {steps} steps: {capped}");
    let unauthorized = http.post(format!("{}/v1/classify", server.base)).json(&json!({})).send().unwrap();
    assert_eq!(unauthorized.status().as_u16(), 401);
}

/// The model path does not exist: an error about the flag, not about the model, shows the flags are checked first.
#[test]
fn bad_routing_flags_are_refused_before_the_model_loads() {
    let dir = tempfile::tempdir().unwrap();
    let missing_model = dir.path().join("missing.gguf");
    for (flag, value, expected) in [
        ("--stage-timeout", "0", "--stage-timeout must be a positive number of seconds"),
        ("--stage-timeout", "-3", "--stage-timeout must be a positive number of seconds"),
        ("--on-triage-violation", "ban", "use act, confirm or review"),
        ("--reasoning-max-tokens", "0", "--reasoning-max-tokens must be at least 1"),
        ("--min-engine-confidence", "1.5", "--min-engine-confidence must be within 0..1"),
        ("--max-budget-wait", "-1", "--max-budget-wait must be a number of seconds >= 0"),
        ("--queue-share", "0", "--queue-share must be above 0 and at most 1"),
        ("--queue-share", "1.5", "--queue-share must be above 0 and at most 1"),
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_safeguard"))
            .args(["serve", "--listen", "127.0.0.1:0", "--model"])
            .arg(&missing_model)
            .arg("--data-dir")
            .arg(dir.path())
            .arg(format!("{flag}={value}"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{flag}={value} was accepted");
        assert!(stderr.contains(expected), "{flag}={value}: {stderr}");
    }
}

//! A reasoner that panics mid-job: the job goes to a person instead of staying leased forever, and the worker
//! goes on to the next job.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use safeguard_core::{ReasonError, ReasonOutput, ReasonRequest, Reasoner};
use safeguard_server::{Server, ServerConfig};
use safeguard_store::Store;
use serde_json::{Value, json};

const ADMIN: &str = "test-admin-key";

struct Panicky;

#[async_trait]
impl Reasoner for Panicky {
    fn model_id(&self) -> String {
        "panicky".into()
    }

    async fn reason(&self, req: ReasonRequest) -> Result<ReasonOutput, ReasonError> {
        if serde_json::to_string(&req.content).unwrap_or_default().contains("PANIC") {
            panic!("a bug in the reasoner");
        }
        Ok(ReasonOutput { final_text: Some("0".into()), ..ReasonOutput::default() })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_reasoner_panics_goes_to_a_person_and_the_worker_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("db.sqlite")).await.unwrap();
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_key: Some(ADMIN.into()),
        webhook_secret: "hook-secret".into(),
        // One worker: had it died with the job, nothing would decide the second one.
        job_workers: 1,
        job_lease: Duration::from_millis(600),
        ..ServerConfig::default()
    };
    let server = Server::start(config, Arc::new(Panicky), store.clone()).await.unwrap();
    let base = format!("http://{}", server.addr);
    let http = reqwest::Client::new();
    let submit = |text: &'static str, policy: &'static str| {
        let request =
            http.post(format!("{base}/v1/jobs")).bearer_auth(ADMIN).json(&json!({"text": text, "policies": [policy]}));
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status().as_u16(), 202);
            response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string()
        }
    };
    // Under a high-risk policy: the failed job goes to the front of the queue, as any item of it would.
    let panicking = submit("PANIC please", "violence").await;
    let ordinary = submit("hello there", "spam").await;

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut settled = Vec::new();
    for id in [&panicking, &ordinary] {
        let job = loop {
            let job: Value =
                http.get(format!("{base}/v1/jobs/{id}")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
            if job["status"] == "done" || job["status"] == "failed" {
                break job;
            }
            assert!(Instant::now() < deadline, "job {id} never settled: {job}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        settled.push(job);
    }
    assert_eq!(settled[0]["attempts"], 1, "decided on its first claim, not left leased: {}", settled[0]);
    assert!(settled[0]["error"].as_str().is_some_and(|e| e.contains("panicked")), "{}", settled[0]);
    assert_eq!(settled[1]["status"], "done", "the worker carried on: {}", settled[1]);
    assert_eq!(store.review_stats().await.unwrap().pending, 1, "the panicked job waits for a person");
    let queued = store.list_reviews("pending", 10).await.unwrap();
    assert_eq!(queued[0].priority, 5, "high-risk: {:?}", queued[0]);
    server.shutdown().await.unwrap();
}

//! `safeguard serve`'s content limits hold on the bus as over HTTP: its NATS worker parsed events with the item
//! parser's own limit (100,000 characters) and counted no tokens, so an event could carry what `/v1/classify`
//! refuses. Against the real NATS at 127.0.0.1:4222.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use safeguard_core::{ReasonError, ReasonOutput, ReasonRequest, Reasoner};
use safeguard_pipeline::nats::{Bus, EventStatus};
use safeguard_server::{Limits, NatsConfig, NatsIngest, Server, ServerConfig};
use safeguard_store::Store;
use serde_json::json;

#[path = "../../pipeline/tests/support/nats.rs"]
mod nats_support;

use nats_support::{URL, delete_streams, nats_up, published};

const ADMIN: &str = "nats-admin";

/// A binary policy whose triage rules deny "free bitcoin" and allow "happy birthday".
const POLICY: &str = include_str!("fixtures/promo_policy.md");

/// Allows everything it is asked about.
struct Allow;

#[async_trait]
impl Reasoner for Allow {
    fn model_id(&self) -> String {
        "allow".into()
    }

    async fn reason(&self, _req: ReasonRequest) -> Result<ReasonOutput, ReasonError> {
        Ok(ReasonOutput { final_text: Some("0".into()), final_token_prob: Some(0.99), ..ReasonOutput::default() })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_over_the_servers_content_limits_are_rejected_as_requests_are() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL} (bash scripts/setup.sh starts it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("db.sqlite")).await.unwrap();
    let mut nats = NatsConfig::new(URL, format!("sglimits{}", &uuid::Uuid::new_v4().simple().to_string()[..10]));
    nats.ack_wait = Duration::from_secs(2);
    let limits = Limits { max_content_chars: 200, max_content_tokens: 20, ..Limits::default() };
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_key: Some(ADMIN.into()),
        limits,
        nats: Some(NatsIngest { config: nats.clone(), policies: vec!["promo".into()] }),
        ..ServerConfig::default()
    };
    let server = Server::start(config, Arc::new(Allow), store).await.unwrap();
    let base = format!("http://{}", server.addr);
    let http = reqwest::Client::new();
    let response = http.post(format!("{base}/v1/policies")).bearer_auth(ADMIN).json(&json!({"text": POLICY})).send();
    assert!(response.await.unwrap().status().is_success());

    let wordy = "see you at lunch ".repeat(8);
    let refused = http
        .post(format!("{base}/v1/classify"))
        .bearer_auth(ADMIN)
        .json(&json!({"text": wordy, "policies": ["promo"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 400, "over HTTP: {}", refused.text().await.unwrap());

    let producer = Bus::connect(nats.clone()).await.unwrap();
    let events = [("short", "see you at lunch".to_string()), ("wordy", wordy), ("long", "a".repeat(201))];
    for (key, text) in &events {
        producer.publish_content(key, &json!({"id": key, "text": text})).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let published = loop {
        let published = published(&producer).await;
        let settled = events
            .iter()
            .all(|(key, _)| published.get(*key).is_some_and(|e| e.iter().any(|e| e.status != EventStatus::Pending)));
        if settled {
            break published;
        }
        assert!(Instant::now() < deadline, "not all settled: {published:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let settled = |key: &str| published[key].iter().find(|e| e.status != EventStatus::Pending).unwrap().clone();
    assert_eq!(settled("short").status, EventStatus::Decided);
    let wordy = settled("wordy");
    assert_eq!(wordy.status, EventStatus::Rejected, "{wordy:?}");
    assert!(wordy.error.as_deref().unwrap_or_default().contains("the limit is 20"), "{wordy:?}");
    let long = settled("long");
    assert_eq!(long.status, EventStatus::Rejected, "{long:?}");
    assert!(long.error.as_deref().unwrap_or_default().contains("the limit is 200"), "{long:?}");

    server.shutdown().await.unwrap();
    delete_streams(&producer).await;
}

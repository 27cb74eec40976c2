//! `safeguard serve` with a NATS JetStream worker inside, on the real engine with a tiny random-weight model
//! and the real NATS at 127.0.0.1:4222: content events go through the cascade, every decision lands in the
//! server's database (visible through `GET /v1/decisions`) and, where it ends with a person, in the review
//! queue. The server is killed mid-stream and started again on the same database: no item is lost and none
//! is decided or stored twice.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use safeguard_core::{EmbeddedConfig, EmbeddedReasoner, Reasoner};
use safeguard_engine::EngineConfig;
use safeguard_engine::llama::LlamaEngine;
use safeguard_pipeline::RoutingConfig;
use safeguard_pipeline::nats::{Bus, DecisionEvent, EventStatus};
use safeguard_server::{NatsConfig, NatsIngest, RunningServer, Server, ServerConfig};
use safeguard_store::Store;
use serde_json::{Value, json};

#[path = "../../pipeline/tests/support/nats.rs"]
mod nats_support;

use nats_support::{URL, delete_streams, nats_up, published};

const ADMIN: &str = "nats-admin";

/// A binary policy whose triage rules deny "free bitcoin" and allow "happy birthday".
const POLICY: &str = include_str!("fixtures/promo_policy.md");

async fn start(store: Store, reasoner: Arc<dyn Reasoner>, nats: NatsConfig) -> (RunningServer, String) {
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_key: Some(ADMIN.into()),
        routing: RoutingConfig { max_tokens: Some(8), ..RoutingConfig::default() },
        nats: Some(NatsIngest { config: nats, policies: vec!["promo".into()] }),
        drain_timeout: Duration::from_secs(5),
        ..ServerConfig::default()
    };
    let server = Server::start(config, reasoner, store).await.unwrap();
    let base = format!("http://{}", server.addr);
    (server, base)
}

async fn get(http: &reqwest::Client, url: String) -> Value {
    http.get(url).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap()
}

/// The NATS-sourced decisions in the database, by idempotency key (several per key would be a bug).
async fn stored(http: &reqwest::Client, base: &str) -> HashMap<String, Vec<Value>> {
    let list = get(http, format!("{base}/v1/decisions?limit=1000")).await;
    let mut by_key: HashMap<String, Vec<Value>> = HashMap::new();
    for decision in list["decisions"].as_array().unwrap() {
        if decision["source"].as_str().is_some_and(|s| s.starts_with("nats:")) {
            let key = decision["sampling"]["nats"]["key"].as_str().unwrap().to_string();
            by_key.entry(key).or_default().push(decision.clone());
        }
    }
    by_key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_events_are_decided_stored_once_and_survive_a_server_crash() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL} (bash scripts/setup.sh starts it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    safeguard_gguf::write_tiny_model(&model, &safeguard_gguf::TinyConfig::with_seed(11)).unwrap();
    let engine =
        LlamaEngine::load(&model, EngineConfig { threads: 2, n_ctx: 1024, ..EngineConfig::default() }).unwrap();
    let reasoner: Arc<dyn Reasoner> = Arc::new(EmbeddedReasoner::new(Arc::new(engine), EmbeddedConfig::default()));
    let store = Store::open_sqlite(&dir.path().join("db.sqlite")).await.unwrap();
    let mut nats = NatsConfig::new(URL, format!("sgserve{}", &uuid::Uuid::new_v4().simple().to_string()[..10]));
    // A crashed server's unacked events come back after this long.
    nats.ack_wait = Duration::from_secs(2);
    nats.batch = 1;

    let http = reqwest::Client::new();
    let (server, base) = start(store.clone(), reasoner.clone(), nats.clone()).await;
    let response = http.post(format!("{base}/v1/policies")).bearer_auth(ADMIN).json(&json!({"text": POLICY})).send();
    assert!(response.await.unwrap().status().is_success());

    let producer = Bus::connect(nats.clone()).await.unwrap();
    let items = [
        ("scam-1", "Get FREE BITCOIN today", "triage"),
        ("greet-1", "Happy birthday, grandma!", "triage"),
        ("model-1", "Check out my channel for deals", "human_review"),
        ("model-2", "what time is the meeting", "human_review"),
        ("scam-2", "free bitcoin, only today", "triage"),
        ("model-3", "dm me for cheap followers", "human_review"),
    ];
    for (key, text, _) in &items {
        producer.publish_content(key, &json!({"id": key, "text": text})).await.unwrap();
    }

    // Let the first server decide some, then kill it mid-stream (no drain, no acks for what it holds).
    let deadline = Instant::now() + Duration::from_secs(120);
    while stored(&http, &base).await.len() < 2 {
        assert!(Instant::now() < deadline, "the first server decided nothing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.abort().await;
    let filter = safeguard_store::DecisionFilter { limit: 1000, ..Default::default() };
    let before_crash = store.list_decisions(&filter).await.unwrap().len();
    assert!(before_crash < items.len(), "the crash came mid-stream: {before_crash} of {} decided", items.len());

    let (server, base) = start(store.clone(), reasoner.clone(), nats.clone()).await;
    let deadline = Instant::now() + Duration::from_secs(300);
    let decisions = loop {
        let decisions = stored(&http, &base).await;
        if decisions.len() == items.len() {
            break decisions;
        }
        assert!(Instant::now() < deadline, "only {} of {} items decided", decisions.len(), items.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Give a late redelivery the chance to show up as a duplicate before counting.
    tokio::time::sleep(nats.ack_wait + Duration::from_millis(500)).await;
    let decisions = {
        let again = stored(&http, &base).await;
        assert_eq!(again.len(), decisions.len());
        again
    };
    let events = published(&producer).await;
    for (key, _, stage) in &items {
        let records = &decisions[*key];
        assert_eq!(records.len(), 1, "{key}: stored exactly once: {records:?}");
        let record = &records[0];
        assert_eq!(record["source"], format!("nats:{stage}"), "{key}: {record}");
        assert_eq!(record["verdicts"][0]["stage"], *stage, "{key}");
        if *stage == "human_review" {
            assert_eq!(record["outcome"], "needs_review", "{key}: the random model never settles anything");
        } else {
            assert_ne!(record["outcome"], "needs_review", "{key}");
        }
        let decided: Vec<&DecisionEvent> = events[*key].iter().filter(|e| e.status == EventStatus::Decided).collect();
        assert_eq!(decided.len(), 1, "{key}: exactly one decision published");
        let published_id = decided[0].decision.as_ref().unwrap().id.to_string();
        assert_eq!(
            record["id"].as_str(),
            Some(published_id.as_str()),
            "{key}: the stored decision is the published one"
        );
    }

    // Each item that ended with a person waits in the queue, once.
    let queue = get(&http, format!("{base}/v1/reviews?limit=100")).await;
    let mut queued: Vec<&str> =
        queue["reviews"].as_array().unwrap().iter().map(|r| r["decision_id"].as_str().unwrap()).collect();
    queued.sort_unstable();
    let mut expected: Vec<&str> = items
        .iter()
        .filter(|(_, _, stage)| *stage == "human_review")
        .map(|(key, _, _)| decisions[*key][0]["id"].as_str().unwrap())
        .collect();
    expected.sort_unstable();
    assert_eq!(queued, expected, "{queue}");

    let metrics = http.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("safeguard_items_total{route=\"nats\"}"), "{metrics}");
    // Counted once each, whichever server stored them and however often their events came back.
    assert!(metrics.contains("safeguard_reviews_queued_total{kind=\"review\"} 3\n"), "{metrics}");

    // A person's decision ends the hold: it is published on the item's decision subject as `reviewed`.
    let decision_id = decisions["model-3"][0]["id"].as_str().unwrap();
    let review = queue["reviews"].as_array().unwrap().iter().find(|r| r["decision_id"] == decision_id).unwrap();
    let response = http
        .post(format!("{base}/v1/reviews/{}/decide", review["id"].as_str().unwrap()))
        .bearer_auth(ADMIN)
        .json(&json!({"outcome": "violation", "rationale": "sells followers", "rule_id": "PR1.a"}))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.text().await.unwrap());
    let reviewed = published(&producer).await.remove("model-3").unwrap_or_default();
    let reviewed: Vec<&DecisionEvent> = reviewed.iter().filter(|e| e.status == EventStatus::Reviewed).collect();
    assert_eq!(reviewed.len(), 1, "{reviewed:?}");
    let review_event = reviewed[0].review.as_ref().unwrap();
    assert_eq!(
        (review_event.decision_id.as_str(), review_event.outcome.as_str(), review_event.rule_id.as_deref()),
        (decision_id, "violation", Some("PR1.a"))
    );
    assert_eq!(reviewed[0].item_id.as_deref(), Some("model-3"));
    assert!(store.reviews_to_announce(10).await.unwrap().is_empty(), "marked announced: not published again");

    // An appeal over HTTP of an item triage let through: the producer released it on the bus, so the person's
    // answer to the appeal is published on the item's subject too.
    let allowed_id = decisions["greet-1"][0]["id"].as_str().unwrap();
    let response =
        http.post(format!("{base}/v1/decisions/{allowed_id}/appeal")).bearer_auth(ADMIN).send().await.unwrap();
    assert!(response.status().is_success(), "{}", response.text().await.unwrap());
    let appeal: Value = response.json().await.unwrap();
    let response = http
        .post(format!("{base}/v1/reviews/{}/decide", appeal["review_id"].as_str().unwrap()))
        .bearer_auth(ADMIN)
        .json(&json!({"outcome": "violation", "rationale": "a disguised promotion", "rule_id": "PR1.a"}))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.text().await.unwrap());
    let reviewed = published(&producer).await.remove("greet-1").unwrap_or_default();
    let reviewed: Vec<&DecisionEvent> = reviewed.iter().filter(|e| e.status == EventStatus::Reviewed).collect();
    assert_eq!(reviewed.len(), 1, "{reviewed:?}");
    let review_event = reviewed[0].review.as_ref().unwrap();
    assert_eq!(review_event.decision_id, appeal["decision"]["decision_id"].as_str().unwrap());
    assert_eq!(review_event.appeal_of.as_deref(), Some(allowed_id), "the decision the producer holds");
    assert_eq!((review_event.outcome.as_str(), reviewed[0].item_id.as_deref()), ("violation", Some("greet-1")));
    assert!(store.reviews_to_announce(10).await.unwrap().is_empty(), "the appeal's answer is marked announced");

    // A bus decision stored without its event key has no subject to publish a person's decision on, ever: it is
    // set aside once instead of being read again by every sweep.
    let mut keyless = store.get_decision(decision_id).await.unwrap().unwrap();
    keyless.id = format!("{decision_id}-keyless");
    keyless.sampling["nats"].as_object_mut().unwrap().remove("key");
    store.insert_decision(&keyless, None).await.unwrap();
    let held = store
        .queue_review(&safeguard_store::NewReview {
            decision_id: keyless.id.clone(),
            kind: "review".into(),
            priority: 1,
            reason: None,
            sla_ms: None,
        })
        .await
        .unwrap()
        .review;
    let response = http
        .post(format!("{base}/v1/reviews/{}/decide", held.id))
        .bearer_auth(ADMIN)
        .json(&json!({"outcome": "allow", "rationale": "a greeting", "rule_id": "PR0.a"}))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.text().await.unwrap());
    assert!(store.reviews_to_announce(10).await.unwrap().is_empty(), "nothing to announce, and marked so");

    server.shutdown().await.unwrap();
    delete_streams(&producer).await;
}

//! `safeguard serve` with a NATS JetStream worker inside, on the real engine with a tiny random-weight model
//! and the real NATS at 127.0.0.1:4222: content events go through the cascade, every decision lands in the
//! server's database (visible through `GET /v1/decisions`) and, where it ends with a person, in the review
//! queue. The server is killed mid-stream and started again on the same database: no item is lost and none
//! is decided or stored twice.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use safeguard_core::{EmbeddedConfig, EmbeddedReasoner, ReasonError, ReasonOutput, ReasonRequest, Reasoner};
use safeguard_engine::EngineConfig;
use safeguard_engine::llama::LlamaEngine;
use safeguard_pipeline::RoutingConfig;
use safeguard_pipeline::nats::{Bus, DecisionEvent, EventStatus, ReviewedItem};
use safeguard_server::{NatsConfig, NatsIngest, RunningServer, Server, ServerConfig};
use safeguard_store::Store;
use serde_json::{Value, json};

#[path = "../../pipeline/tests/support/nats.rs"]
mod nats_support;

use nats_support::{URL, delete_streams, nats_up, published};

const ADMIN: &str = "nats-admin";

/// The metrics are the process's: a test that queues a review while another counts them would skew its count.
static QUEUES_REVIEWS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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

/// `safeguard_reviews_queued_total{kind="review"}`: the process's, shared by every test here.
async fn reviews_queued(http: &reqwest::Client, base: &str) -> u64 {
    let metrics = http.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("safeguard_reviews_queued_total{kind=\"review\"} "))
        .map_or(0, |count| count.trim().parse().unwrap())
}

/// A person's answer to review `review`, as the admin.
async fn decide(http: &reqwest::Client, base: &str, review: &str, answer: Value) -> reqwest::Response {
    let url = format!("{base}/v1/reviews/{review}/decide");
    http.post(url).bearer_auth(ADMIN).json(&answer).send().await.unwrap()
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

/// The `reviewed` events published so far for `key`.
async fn reviewed_on(producer: &Bus, key: &str) -> Vec<DecisionEvent> {
    let events = published(producer).await.remove(key).unwrap_or_default();
    events.into_iter().filter(|e| e.status == EventStatus::Reviewed).collect()
}

/// The person's answer published on `key`: exactly one `reviewed` event, carrying the review.
async fn the_review_on(producer: &Bus, key: &str) -> ReviewedItem {
    let reviewed = reviewed_on(producer, key).await;
    assert_eq!(reviewed.len(), 1, "{key}: {reviewed:?}");
    reviewed[0].review.clone().unwrap_or_else(|| panic!("{key}: a reviewed event without its review"))
}

/// The decision stored for the event under `key`, once it is (within two minutes).
async fn stored_once(http: &reqwest::Client, base: &str, key: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(records) = stored(http, base).await.remove(key) {
            return records[0].clone();
        }
        assert!(Instant::now() < deadline, "{key} was never stored");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_events_are_decided_stored_once_and_survive_a_server_crash() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL} (bash scripts/setup.sh starts it)");
        return;
    }
    let _counting = QUEUES_REVIEWS.lock().await;
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
    let queued_before = reviews_queued(&http, &base).await;
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
    assert_eq!(reviews_queued(&http, &base).await - queued_before, 3, "{metrics}");

    // A person's decision ends the hold: it is published on the item's decision subject as `reviewed`.
    let decision_id = decisions["model-3"][0]["id"].as_str().unwrap();
    let review = queue["reviews"].as_array().unwrap().iter().find(|r| r["decision_id"] == decision_id).unwrap();
    let response = decide(
        &http,
        &base,
        review["id"].as_str().unwrap(),
        json!({"outcome": "violation", "rationale": "sells followers", "rule_id": "PR1.a"}),
    )
    .await;
    assert!(response.status().is_success(), "{}", response.text().await.unwrap());
    let reviewed = reviewed_on(&producer, "model-3").await;
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
    let response = decide(
        &http,
        &base,
        appeal["review_id"].as_str().unwrap(),
        json!({"outcome": "violation", "rationale": "a disguised promotion", "rule_id": "PR1.a"}),
    )
    .await;
    assert!(response.status().is_success(), "{}", response.text().await.unwrap());
    let reviewed = reviewed_on(&producer, "greet-1").await;
    assert_eq!(reviewed.len(), 1, "{reviewed:?}");
    let review_event = reviewed[0].review.as_ref().unwrap();
    assert_eq!(review_event.decision_id, appeal["decision"]["decision_id"].as_str().unwrap());
    assert_eq!(review_event.appeal_of.as_deref(), Some(allowed_id), "the decision the producer holds");
    assert_eq!((review_event.outcome.as_str(), reviewed[0].item_id.as_deref()), ("violation", Some("greet-1")));
    assert!(store.reviews_to_announce(10).await.unwrap().is_empty(), "the appeal's answer is marked announced");

    // An appeal on the bus of an item still waiting for a person: decided under its own key, linked to the
    // decision it appeals, and the item's pending review is set aside for the appeal's in the same transaction
    // (answered later, the stale review would overrule the answer to the appeal).
    let held_id = decisions["model-2"][0]["id"].as_str().unwrap();
    let held_review = queue["reviews"].as_array().unwrap().iter().find(|r| r["decision_id"] == held_id).unwrap();
    let held_review = held_review["id"].as_str().unwrap();
    let appeal_event = json!({"id": "model-2", "text": "what time is the meeting", "appeal": true});
    producer.publish_content("model-2:appeal", &appeal_event).await.unwrap();
    let appeal = stored_once(&http, &base, "model-2:appeal").await;
    assert_eq!(appeal["replay_of"].as_str(), Some(held_id), "{appeal}");
    assert_eq!(store.get_review(held_review).await.unwrap().unwrap().status, "superseded");
    let response =
        decide(&http, &base, held_review, json!({"outcome": "allow", "rationale": "a question", "rule_id": "PR0.a"}))
            .await;
    assert_eq!(response.status(), 409, "the appeal's review is the one to decide");
    // A later appeal of the same decision over HTTP is the one already made, not a second review.
    let response = http.post(format!("{base}/v1/decisions/{held_id}/appeal")).bearer_auth(ADMIN).send().await.unwrap();
    assert!(response.status().is_success(), "{}", response.text().await.unwrap());
    let repeated: Value = response.json().await.unwrap();
    assert_eq!(repeated["decision"]["decision_id"], appeal["id"], "{repeated}");
    let response = decide(
        &http,
        &base,
        repeated["review_id"].as_str().unwrap(),
        json!({"outcome": "allow", "rationale": "asks about a meeting", "rule_id": "PR0.a"}),
    )
    .await;
    assert!(response.status().is_success(), "{}", response.text().await.unwrap());
    // Announced to whoever holds the appeal and to whoever holds the item, whose own review will never be answered.
    for key in ["model-2:appeal", "model-2"] {
        let review = &the_review_on(&producer, key).await;
        assert_eq!(
            (review.decision_id.as_str(), review.appeal_of.as_deref()),
            (appeal["id"].as_str().unwrap(), Some(held_id))
        );
    }

    // An appeal event with other content than the item was decided on is not linked to it: the item's review stays
    // (else any event could set a review aside and put other text before the person in the item's place).
    let other_id = decisions["model-1"][0]["id"].as_str().unwrap();
    let other_review = queue["reviews"].as_array().unwrap().iter().find(|r| r["decision_id"] == other_id).unwrap();
    let swapped = json!({"id": "model-1", "text": "a harmless greeting", "appeal": true});
    producer.publish_content("model-1:appeal", &swapped).await.unwrap();
    let unlinked = stored_once(&http, &base, "model-1:appeal").await;
    assert!(unlinked["replay_of"].is_null(), "{unlinked}");
    let still = store.get_review(other_review["id"].as_str().unwrap()).await.unwrap().unwrap();
    assert_eq!(still.status, "pending");

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
            policy_hash: None,
        })
        .await
        .unwrap()
        .review;
    let response =
        decide(&http, &base, &held.id, json!({"outcome": "allow", "rationale": "a greeting", "rule_id": "PR0.a"}))
            .await;
    assert!(response.status().is_success(), "{}", response.text().await.unwrap());
    assert!(store.reviews_to_announce(10).await.unwrap().is_empty(), "nothing to announce, and marked so");

    server.shutdown().await.unwrap();
    delete_streams(&producer).await;
}

/// Panics on content holding "PANIC", as a reasoner with a bug might; answers "0" (allowed) otherwise.
struct Panicky;

#[async_trait]
impl Reasoner for Panicky {
    fn model_id(&self) -> String {
        "panicky".into()
    }

    async fn reason(&self, req: ReasonRequest) -> Result<ReasonOutput, ReasonError> {
        if safeguard_harmony::user_message_text(&req.content).contains("PANIC") {
            panic!("a bug in the reasoner");
        }
        Ok(ReasonOutput { final_text: Some("0".into()), final_token_prob: Some(0.99), ..ReasonOutput::default() })
    }
}

/// A panic while deciding one event used to unwind through the worker and end it for good: the event came back
/// after `ack_wait` and took down the next server's worker too, and `/readyz` stayed green throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_whose_deciding_panics_goes_to_a_person_and_the_worker_carries_on() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL} (bash scripts/setup.sh starts it)");
        return;
    }
    let _counting = QUEUES_REVIEWS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("db.sqlite")).await.unwrap();
    let mut nats = NatsConfig::new(URL, format!("sgpanic{}", &uuid::Uuid::new_v4().simple().to_string()[..10]));
    nats.ack_wait = Duration::from_secs(2);
    nats.batch = 1;
    let http = reqwest::Client::new();
    let (server, base) = start(store.clone(), Arc::new(Panicky), nats.clone()).await;
    let response = http.post(format!("{base}/v1/policies")).bearer_auth(ADMIN).json(&json!({"text": POLICY})).send();
    assert!(response.await.unwrap().status().is_success());

    let producer = Bus::connect(nats.clone()).await.unwrap();
    producer.publish_content("doomed", &json!({"id": "doomed", "text": "PANIC in the reasoner"})).await.unwrap();
    producer.publish_content("after", &json!({"id": "after", "text": "see you at lunch"})).await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(60);
    let decisions = loop {
        let decisions = stored(&http, &base).await;
        if decisions.len() == 2 {
            break decisions;
        }
        assert!(Instant::now() < deadline, "decided only {:?}", decisions.keys().collect::<Vec<_>>());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let doomed = &decisions["doomed"];
    assert_eq!(doomed.len(), 1, "{doomed:?}");
    assert_eq!(doomed[0]["outcome"], "needs_review", "{}", doomed[0]);
    assert_eq!(doomed[0]["source"], "nats:human_review", "{}", doomed[0]);
    let after = &decisions["after"];
    assert_eq!(
        (after.len(), &after[0]["outcome"]),
        (1, &json!("allow")),
        "the same worker decided the next: {after:?}"
    );

    let queue = get(&http, format!("{base}/v1/reviews?limit=100")).await;
    let reviews = queue["reviews"].as_array().unwrap();
    assert_eq!(reviews.len(), 1, "{queue}");
    assert_eq!(reviews[0]["decision_id"], doomed[0]["id"], "{queue}");
    let reason = reviews[0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("deciding the item panicked"), "{reason}");
    let events = published(&producer).await;
    let decided: Vec<&DecisionEvent> = events["doomed"].iter().filter(|e| e.status == EventStatus::Decided).collect();
    assert_eq!(decided.len(), 1, "the producer is told: {decided:?}");
    assert_eq!(serde_json::to_value(decided[0].decision.as_ref().unwrap().outcome).unwrap(), "needs_review");

    let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["nats"]["serving"], true, "{ready}");

    // Settled and acked: the event does not come back to be decided (and to panic) again.
    tokio::time::sleep(nats.ack_wait + Duration::from_millis(500)).await;
    assert_eq!(stored(&http, &base).await["doomed"].len(), 1);
    server.shutdown().await.unwrap();
    delete_streams(&producer).await;
}

/// `/readyz` used to look at the database alone: a server whose NATS worker never got going stayed ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_once_the_nats_worker_has_been_down_past_its_grace() {
    // A port nothing listens on: the worker can never connect.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("db.sqlite")).await.unwrap();
    let grace = Duration::from_millis(1_500);
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_key: Some(ADMIN.into()),
        nats: Some(NatsIngest::new(NatsConfig::new(format!("nats://{closed}"), "sgclosed"))),
        nats_ready_grace: Some(grace),
        ..ServerConfig::default()
    };
    let started = Instant::now();
    let server = Server::start(config, Arc::new(Panicky), store).await.unwrap();
    let base = format!("http://{}", server.addr);
    let http = reqwest::Client::new();
    let readyz = || async {
        let response = http.get(format!("{base}/readyz")).send().await.unwrap();
        (response.status().as_u16(), response.json::<Value>().await.unwrap())
    };

    let (status, body) = readyz().await;
    if started.elapsed() < grace {
        assert_eq!(status, 200, "within the grace a worker may still be connecting: {body}");
        assert_eq!(body["nats"]["serving"], false, "{body}");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let (status, body) = readyz().await;
        if status == 503 {
            break body;
        }
        assert!(Instant::now() < deadline, "still ready with the worker down: {status} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(started.elapsed() >= grace, "not before the grace ran out");
    assert_eq!(
        (&body["ready"], &body["database"], &body["nats"]["serving"]),
        (&json!(false), &json!(true), &json!(false))
    );
    let why = body["why"][0].as_str().unwrap_or_default();
    assert!(why.contains("NATS worker"), "{body}");

    // Health is not readiness: the process is alive.
    let health = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    server.shutdown().await.unwrap();
}

/// A default policy (`--nats-policy`) that is not stored is the server's misconfiguration, not the event's: events
/// naming no policies were rejected, and a resend under the same key was answered with that rejection from the
/// ledger even after the policy was stored. They now wait, and are decided once it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_wait_for_a_default_policy_that_is_not_stored_yet() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL} (bash scripts/setup.sh starts it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("db.sqlite")).await.unwrap();
    let mut nats = NatsConfig::new(URL, format!("sgwait{}", &uuid::Uuid::new_v4().simple().to_string()[..10]));
    nats.batch = 1;
    let (server, base) = start(store, Arc::new(Panicky), nats.clone()).await;
    let producer = Bus::connect(nats.clone()).await.unwrap();
    // Triage allows it (the policy's allow rule), so no reasoning is involved.
    producer.publish_content("greet", &json!({"id": "greet", "text": "Happy birthday, grandma!"})).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let events = published(&producer).await.remove("greet").unwrap_or_default();
    assert!(events.iter().all(|e| e.status != EventStatus::Rejected), "{events:?}");
    assert!(producer.decided("greet").await.unwrap().is_none());

    let http = reqwest::Client::new();
    let response = http.post(format!("{base}/v1/policies")).bearer_auth(ADMIN).json(&json!({"text": POLICY})).send();
    assert!(response.await.unwrap().status().is_success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while producer.decided("greet").await.unwrap().is_none() {
        assert!(Instant::now() < deadline, "not decided once the policy was stored");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let decision = stored_once(&http, &base, "greet").await;
    assert_eq!(decision["outcome"], "allow", "{decision}");
    server.shutdown().await.unwrap();
    delete_streams(&producer).await;
}

/// An event naming a policy that is not stored is rejected, but the rejection is not the key's settled answer:
/// the same event sent again once the policy is stored is decided (it was answered with the rejection from the
/// ledger for as long as the ledger kept it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_naming_a_policy_not_stored_yet_is_decided_when_sent_again() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL} (bash scripts/setup.sh starts it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("db.sqlite")).await.unwrap();
    let mut nats = NatsConfig::new(URL, format!("sgnamed{}", &uuid::Uuid::new_v4().simple().to_string()[..10]));
    nats.batch = 1;
    let (server, base) = start(store, Arc::new(Panicky), nats.clone()).await;
    let producer = Bus::connect(nats.clone()).await.unwrap();
    // Keyed by its id, not a header: the stream would drop a resend of one Nats-Msg-Id for two minutes.
    let event = serde_json::to_vec(&json!({"id": "named", "text": "Happy birthday, grandma!", "policies": ["promo"]}));
    let send = || async {
        let subject = nats.content_subject("named");
        producer.js.publish(subject, event.as_ref().unwrap().clone().into()).await.unwrap().await.unwrap();
    };
    send().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let rejection = loop {
        let events = published(&producer).await.remove("named").unwrap_or_default();
        if let Some(rejected) = events.into_iter().find(|e| e.status == EventStatus::Rejected) {
            break rejected;
        }
        assert!(Instant::now() < deadline, "never rejected");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(rejection.error.as_deref().unwrap_or_default().contains("no policy \"promo\" is stored"), "{rejection:?}");
    assert!(producer.decided("named").await.unwrap().is_none(), "not the key's settled answer");

    let http = reqwest::Client::new();
    let response = http.post(format!("{base}/v1/policies")).bearer_auth(ADMIN).json(&json!({"text": POLICY})).send();
    assert!(response.await.unwrap().status().is_success());
    send().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while producer.decided("named").await.unwrap().is_none() {
        assert!(Instant::now() < deadline, "not decided when sent again after the policy was stored");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let decision = stored_once(&http, &base, "named").await;
    assert_eq!(decision["outcome"], "allow", "{decision}");
    server.shutdown().await.unwrap();
    delete_streams(&producer).await;
}

/// The pending appeal reviews of the database, by the decision each belongs to.
async fn pending_appeals(store: &Store) -> Vec<String> {
    let pending = store.list_reviews("pending", 1000).await.unwrap();
    pending.into_iter().filter(|r| r.kind == "appeal").map(|r| r.decision_id).collect()
}

/// A bus appeal used to skip the one-appeal-per-decision check that HTTP appeals go through: an item appealed over
/// HTTP and then on the bus had two pending appeal reviews, which two people could answer differently (both
/// announced on the item's subject, both exported as corrections). The bus appeal is now stored linked, without a
/// review of its own, and the appeal made before answers it: on its subject too, whether a person answers after
/// the bus appeal is stored or had answered before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_appeal_of_a_decision_appealed_over_http_adds_no_second_appeal_review() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL} (bash scripts/setup.sh starts it)");
        return;
    }
    let _counting = QUEUES_REVIEWS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("db.sqlite")).await.unwrap();
    let mut nats = NatsConfig::new(URL, format!("sgappeal{}", &uuid::Uuid::new_v4().simple().to_string()[..10]));
    nats.batch = 1;
    let http = reqwest::Client::new();
    let (server, base) = start(store.clone(), Arc::new(Panicky), nats.clone()).await;
    let response = http.post(format!("{base}/v1/policies")).bearer_auth(ADMIN).json(&json!({"text": POLICY})).send();
    assert!(response.await.unwrap().status().is_success());
    let producer = Bus::connect(nats.clone()).await.unwrap();

    // Appealed over HTTP, then on the bus; the person answers after both are stored.
    let lunch = json!({"id": "lunch", "text": "see you at lunch"});
    producer.publish_content("lunch", &lunch).await.unwrap();
    let original = stored_once(&http, &base, "lunch").await;
    let original_id = original["id"].as_str().unwrap();
    let response =
        http.post(format!("{base}/v1/decisions/{original_id}/appeal")).bearer_auth(ADMIN).send().await.unwrap();
    assert!(response.status().is_success(), "{}", response.text().await.unwrap());
    let http_appeal: Value = response.json().await.unwrap();
    let http_appeal_id = http_appeal["decision"]["decision_id"].as_str().unwrap().to_string();
    assert_eq!(pending_appeals(&store).await, vec![http_appeal_id.clone()]);

    producer
        .publish_content("lunch:appeal", &json!({"id": "lunch", "text": "see you at lunch", "appeal": true}))
        .await
        .unwrap();
    let bus_appeal = stored_once(&http, &base, "lunch:appeal").await;
    assert_eq!(bus_appeal["replay_of"].as_str(), Some(original_id), "linked to what it appeals: {bus_appeal}");
    assert_eq!(pending_appeals(&store).await, vec![http_appeal_id.clone()], "one appeal, one review");
    let bus_appeal_id = bus_appeal["id"].as_str().unwrap();
    let published_decision = producer.decided("lunch:appeal").await.unwrap().and_then(|e| e.decision).unwrap();
    assert_eq!(published_decision.id.to_string(), bus_appeal_id, "the host holds the decision the producer was told");

    let response = decide(
        &http,
        &base,
        http_appeal["review_id"].as_str().unwrap(),
        json!({"outcome": "allow", "rationale": "plans for lunch", "rule_id": "PR0.a"}),
    )
    .await;
    assert!(response.status().is_success(), "{}", response.text().await.unwrap());
    for key in ["lunch", "lunch:appeal"] {
        let review = &the_review_on(&producer, key).await;
        assert_eq!(
            (review.decision_id.as_str(), review.appeal_of.as_deref(), review.outcome.as_str()),
            (http_appeal_id.as_str(), Some(original_id), "allow"),
            "{key}"
        );
    }
    assert!(store.reviews_to_announce(10).await.unwrap().is_empty(), "announced on both subjects, and marked");

    // Appealed over HTTP and answered before the bus appeal comes: the worker storing it publishes the answer.
    let coffee = json!({"id": "coffee", "text": "coffee at ten?"});
    producer.publish_content("coffee", &coffee).await.unwrap();
    let original = stored_once(&http, &base, "coffee").await;
    let original_id = original["id"].as_str().unwrap();
    let response =
        http.post(format!("{base}/v1/decisions/{original_id}/appeal")).bearer_auth(ADMIN).send().await.unwrap();
    assert!(response.status().is_success(), "{}", response.text().await.unwrap());
    let http_appeal: Value = response.json().await.unwrap();
    let response = decide(
        &http,
        &base,
        http_appeal["review_id"].as_str().unwrap(),
        json!({"outcome": "allow", "rationale": "a question", "rule_id": "PR0.a"}),
    )
    .await;
    assert!(response.status().is_success(), "{}", response.text().await.unwrap());
    producer
        .publish_content("coffee:appeal", &json!({"id": "coffee", "text": "coffee at ten?", "appeal": true}))
        .await
        .unwrap();
    let bus_appeal = stored_once(&http, &base, "coffee:appeal").await;
    assert_eq!(bus_appeal["replay_of"].as_str(), Some(original_id), "{bus_appeal}");
    assert!(pending_appeals(&store).await.is_empty(), "the answered appeal stands alone");
    // Stored before it is acked, and published before it is stored; give the publish a moment all the same.
    let deadline = Instant::now() + Duration::from_secs(10);
    let events = loop {
        let events = published(&producer).await.remove("coffee:appeal").unwrap_or_default();
        if events.last().is_some_and(|e| e.status == EventStatus::Reviewed) || Instant::now() > deadline {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let statuses: Vec<EventStatus> = events.iter().map(|e| e.status).collect();
    assert_eq!(statuses, [EventStatus::Pending, EventStatus::Decided, EventStatus::Reviewed], "{events:?}");
    let review = events[2].review.as_ref().unwrap();
    assert_eq!(
        (review.decision_id.as_str(), review.appeal_of.as_deref()),
        (http_appeal["decision"]["decision_id"].as_str().unwrap(), Some(original_id))
    );

    server.shutdown().await.unwrap();
    delete_streams(&producer).await;
}

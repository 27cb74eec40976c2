//! `safeguard serve`'s content limits hold on the bus as over HTTP: its NATS worker parsed events with the item
//! parser's own limit (100,000 characters) and counted no tokens, so an event could carry what `/v1/classify`
//! refuses. And content the model's context cannot hold, beside its policy and its answer's budget, is refused on
//! every way in before it is reasoned about. Against the real NATS at 127.0.0.1:4222.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use safeguard_core::{ReasonError, ReasonOutput, ReasonRequest, Reasoner};
use safeguard_harmony::Tokenizer;
use safeguard_pipeline::nats::{Bus, DecisionEvent, EventStatus};
use safeguard_server::{Limits, NatsConfig, NatsIngest, Server, ServerConfig};
use safeguard_store::Store;
use serde_json::{Value, json};

#[path = "../../pipeline/tests/support/nats.rs"]
mod nats_support;

use nats_support::{URL, delete_streams, nats_up, published};

const ADMIN: &str = "nats-admin";

/// A binary policy whose triage rules deny "free bitcoin" and allow "happy birthday".
const POLICY: &str = include_str!("fixtures/promo_policy.md");

/// The first settled event (anything but `pending`) published for each of `keys`, waiting up to a minute for all.
async fn settled_events(producer: &Bus, keys: &[&str]) -> HashMap<String, DecisionEvent> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let published = published(producer).await;
        let settled: HashMap<String, DecisionEvent> = keys
            .iter()
            .filter_map(|key| {
                let first = published.get(*key)?.iter().find(|e| e.status != EventStatus::Pending)?;
                Some((key.to_string(), first.clone()))
            })
            .collect();
        if settled.len() == keys.len() {
            return settled;
        }
        assert!(Instant::now() < deadline, "not all settled: {published:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

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
    let settled = settled_events(&producer, &events.map(|(key, _)| key)).await;
    let settled = |key: &str| settled[key].clone();
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

/// Allows everything, and holds `CONTEXT` tokens per prompt and completion, as an embedded engine does.
struct Roomy {
    calls: AtomicUsize,
}

/// Room for the high-effort budget (4,096) and a few hundred prompt tokens.
const CONTEXT: usize = 4096 + 400;

#[async_trait]
impl Reasoner for Roomy {
    fn model_id(&self) -> String {
        "roomy".into()
    }

    async fn reason(&self, _req: ReasonRequest) -> Result<ReasonOutput, ReasonError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(ReasonOutput { final_text: Some("0".into()), final_token_prob: Some(0.99), ..ReasonOutput::default() })
    }

    fn context_tokens(&self) -> Option<usize> {
        Some(CONTEXT)
    }
}

/// `n` tokens of text, as the model's tokenizer counts them.
fn words(n: usize) -> String {
    let text = format!("word{}", " word".repeat(n - 1));
    assert_eq!(Tokenizer::shared().count(&text), n);
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_the_models_context_cannot_hold_is_refused_on_every_way_in_before_it_is_reasoned_about() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("db.sqlite")).await.unwrap();
    let bus = nats_up().then(|| {
        let mut nats = NatsConfig::new(URL, format!("sgroom{}", &uuid::Uuid::new_v4().simple().to_string()[..10]));
        nats.ack_wait = Duration::from_secs(2);
        nats
    });
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_key: Some(ADMIN.into()),
        nats: bus.clone().map(|config| NatsIngest { config, policies: vec!["promo".into()] }),
        ..ServerConfig::default()
    };
    let reasoner = Arc::new(Roomy { calls: AtomicUsize::new(0) });
    let server = Server::start(config, reasoner.clone(), store.clone()).await.unwrap();
    let base = format!("http://{}", server.addr);
    let http = reqwest::Client::new();
    let call = |path: &'static str, body: Value| {
        let request = http.post(format!("{base}{path}")).bearer_auth(ADMIN).json(&body);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (status, created) = call("/v1/policies", json!({"text": POLICY})).await;
    assert!(status == 200 || status == 201, "{created}");

    // The cascade may escalate to high effort, whose budget must fit beside the prompt: the refusal says how much
    // content does.
    let (status, refused) = call("/v1/moderate", json!({"text": words(600), "policies": ["promo"]})).await;
    assert_eq!((status, refused["error"]["code"].as_str()), (400, Some("content_too_long")), "{refused}");
    let message = refused["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains("promo at high effort") && message.contains("context holds 4496"), "{message}");
    let room: usize = message
        .split("content of at most ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no room in {message:?}"));
    assert!((100..400).contains(&room), "{message}");
    assert_eq!(reasoner.calls.load(Ordering::SeqCst), 0, "refused before the model was asked");

    // Exactly: the room fits, one token more does not.
    let (status, fits) = call("/v1/moderate", json!({"text": words(room), "policies": ["promo"]})).await;
    assert_eq!(status, 200, "{fits}");
    assert!(reasoner.calls.load(Ordering::SeqCst) > 0);
    let asked = reasoner.calls.load(Ordering::SeqCst);
    let over = words(room + 1);
    let (status, body) = call("/v1/moderate", json!({"text": over, "policies": ["promo"]})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("content_too_long")), "{body}");
    let (status, body) = call("/v1/classify", json!({"text": over, "policies": ["promo"]})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("content_too_long")), "cascade route: {body}");
    let (status, body) = call("/v1/jobs", json!({"text": over, "policies": ["promo"], "effort": "high"})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("content_too_long")), "a job: {body}");
    let (status, body) = call(
        "/v1/chat/completions",
        json!({"messages": [{"role": "system", "content": POLICY}, {"role": "user", "content": words(room + 200)}],
               "reasoning_effort": "high"}),
    )
    .await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("content_too_long")), "chat: {body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("the system and developer messages"), "{body}");
    let batch =
        json!({"items": [{"text": "see you at lunch"}, {"text": over}], "policies": ["promo"], "effort": "high"});
    let (status, body) = call("/v1/classify/batch", batch).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["outcome"], "allow", "{body}");
    let error = body["results"][1]["error"]["message"].as_str().unwrap_or_default();
    assert!(error.contains("context holds 4496"), "the long item alone is refused: {body}");
    assert_eq!(reasoner.calls.load(Ordering::SeqCst), asked + 1, "only the short batch item was reasoned about");

    // A refused request stores nothing, not even the inline policy it named.
    let inline = POLICY
        .replace("name: promo", "name: promo-inline")
        .replace("Personal messages.", "Personal messages and greetings between friends.");
    let hash = safeguard_policy::Policy::parse(&inline).unwrap().hash.to_string();
    for (path, effort) in [("/v1/moderate", None), ("/v1/classify", None), ("/v1/jobs", Some("high"))] {
        let mut request = json!({"text": over, "policies": [{"text": inline}]});
        if let Some(effort) = effort {
            request["effort"] = json!(effort);
        }
        let (status, body) = call(path, request).await;
        assert_eq!((status, body["error"]["code"].as_str()), (400, Some("content_too_long")), "{path}: {body}");
        assert!(store.get_policy(&hash).await.unwrap().is_none(), "{path}: the inline policy was stored");
    }
    let (status, body) =
        call("/v1/moderate", json!({"text": "see you at lunch", "policies": [{"text": inline}]})).await;
    assert_eq!(status, 200, "{body}");
    assert!(store.get_policy(&hash).await.unwrap().is_some(), "an inline policy a decision names is stored");

    // At low effort, pinned, the smaller budget leaves room for more.
    let (status, body) = call("/v1/classify", json!({"text": over, "policies": ["promo"], "effort": "low"})).await;
    assert_eq!(status, 200, "{body}");
    // Its appeal reasons at high effort, where it does not fit: the model is not asked, and a person is.
    let asked = reasoner.calls.load(Ordering::SeqCst);
    let appeal_path = format!("/v1/decisions/{}/appeal", body["decision_id"].as_str().unwrap());
    let response = http.post(format!("{base}{appeal_path}")).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let appeal: Value = response.json().await.unwrap();
    assert_eq!(appeal["decision"]["outcome"], "needs_review", "{appeal}");
    assert!(appeal["review_id"].is_string(), "{appeal}");
    let rationale = appeal["decision"]["verdicts"][0]["rationale"].as_str().unwrap_or_default();
    assert!(rationale.contains("not reasoned about") && rationale.contains("at high effort"), "{appeal}");
    assert_eq!(reasoner.calls.load(Ordering::SeqCst), asked, "the model was not asked");
    // Replaying it would reason at high effort too: refused as new content is.
    let replay_path = format!("/v1/decisions/{}/replay", appeal["decision"]["decision_id"].as_str().unwrap());
    let response = http.post(format!("{base}{replay_path}")).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let refused: Value = response.json().await.unwrap();
    assert_eq!(refused["error"]["code"], "content_too_long", "{refused}");
    // A batch whose every item is refused stores nothing, the inline policy it names included.
    let fresh_inline = inline.replace("between friends", "between old friends");
    let fresh_hash = safeguard_policy::Policy::parse(&fresh_inline).unwrap().hash.to_string();
    let batch = json!({"items": [{"text": over}], "policies": [{"text": fresh_inline}], "effort": "high"});
    let (status, body) = call("/v1/classify/batch", batch).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["results"][0]["error"]["message"].as_str().unwrap_or_default().contains("context holds"), "{body}");
    assert!(store.get_policy(&fresh_hash).await.unwrap().is_none(), "the batch stored its inline policy");
    // A field set to null is a field left out, as everywhere.
    let (status, body) = call("/v1/moderate", json!({"text": "hi", "policies": ["promo"], "effort": null})).await;
    assert_eq!(status, 200, "{body}");
    // `/v1/moderations` reasons at the server's default effort (low) with its budget (1,024).
    let (status, body) = call("/v1/moderations", json!({"input": words(3500)})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("content_too_long")), "moderations: {body}");

    if let Some(bus) = bus {
        let producer = Bus::connect(bus).await.unwrap();
        producer.publish_content("fits", &json!({"id": "fits", "text": words(room)})).await.unwrap();
        producer.publish_content("over", &json!({"id": "over", "text": over})).await.unwrap();
        let settled = settled_events(&producer, &["fits", "over"]).await;
        let settled = |key: &str| settled[key].clone();
        assert_eq!(settled("fits").status, EventStatus::Decided);
        let refused = settled("over");
        assert_eq!(refused.status, EventStatus::Rejected, "{refused:?}");
        assert!(refused.error.as_deref().unwrap_or_default().contains("context holds 4496"), "{refused:?}");

        // A policy that escalates no further than low effort decides that content; its appeal reasons at high,
        // where the content does not fit: the appeal is not rejected, it goes to a person without the model, as
        // over HTTP. Content that does not fit even as an item is rejected, appeal or not.
        let bulk = POLICY
            .replace("name: promo", "name: promo-bulk\nrouting:\n  first_effort: low\n  escalation_effort: low")
            .replace("Personal messages.", "Personal messages, in bulk.");
        let (status, created) = call("/v1/policies", json!({"text": bulk})).await;
        assert!(status == 200 || status == 201, "{created}");
        let item = json!({"id": "bulk", "text": over, "policies": ["promo-bulk"]});
        producer.publish_content("bulk", &item).await.unwrap();
        let decided = settled_events(&producer, &["bulk"]).await["bulk"].clone();
        assert_eq!(decided.status, EventStatus::Decided, "fits at low effort: {decided:?}");
        let asked = reasoner.calls.load(Ordering::SeqCst);
        let mut appeal = item.clone();
        appeal["appeal"] = json!(true);
        producer.publish_content("bulk:appeal", &appeal).await.unwrap();
        let too_long = json!({"id": "huge", "text": words(3600), "policies": ["promo-bulk"], "appeal": true});
        producer.publish_content("huge:appeal", &too_long).await.unwrap();
        let settled = settled_events(&producer, &["bulk:appeal", "huge:appeal"]).await;
        let appealed = &settled["bulk:appeal"];
        assert_eq!(appealed.status, EventStatus::Decided, "{appealed:?}");
        let decision = appealed.decision.as_ref().unwrap();
        assert_eq!(decision.outcome, safeguard_verdict::Outcome::NeedsReview, "{appealed:?}");
        let why = serde_json::to_string(&decision.policies[0].escalations).unwrap();
        assert!(why.contains("appeal") && why.contains("not reasoned about"), "{why}");
        assert!(why.contains("at high effort"), "{why}");
        assert_eq!(reasoner.calls.load(Ordering::SeqCst), asked, "the model was not asked");
        let deadline = Instant::now() + Duration::from_secs(30);
        while store.review_of(&decision.id.to_string(), "appeal").await.unwrap().is_none() {
            assert!(Instant::now() < deadline, "the appeal never reached the review queue");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let huge = &settled["huge:appeal"];
        assert_eq!(huge.status, EventStatus::Rejected, "{huge:?}");
        assert!(huge.error.as_deref().unwrap_or_default().contains("context holds 4496"), "{huge:?}");
        server.shutdown().await.unwrap();
        delete_streams(&producer).await;
    } else {
        eprintln!("NATS is not reachable at {URL}: the bus was not checked (bash scripts/setup.sh starts it)");
        server.shutdown().await.unwrap();
    }
}

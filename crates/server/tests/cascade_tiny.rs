//! A stream of mixed items through `/v1/moderate` on the real engine with a tiny random-weight model: each
//! item must land in the stage the routing rules give it, stored as one decision naming its stages. The random model never answers sensibly, so every
//! item that reaches it must climb to high effort and end with a person — never an allow.

use std::sync::Arc;

use safeguard_core::{EmbeddedConfig, EmbeddedReasoner};
use safeguard_engine::EngineConfig;
use safeguard_engine::llama::LlamaEngine;
use safeguard_pipeline::RoutingConfig;
use safeguard_server::{Server, ServerConfig};
use safeguard_store::Store;
use serde_json::{Value, json};

/// A binary policy whose triage rules deny "free bitcoin" and allow "happy birthday".
const POLICY: &str = include_str!("fixtures/promo_policy.md");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_items_land_in_the_stage_the_routing_rules_give_them() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    safeguard_gguf::write_tiny_model(&model, &safeguard_gguf::TinyConfig::with_seed(11)).unwrap();
    let engine =
        LlamaEngine::load(&model, EngineConfig { threads: 2, n_ctx: 1024, ..EngineConfig::default() }).unwrap();
    let reasoner = Arc::new(EmbeddedReasoner::new(Arc::new(engine), EmbeddedConfig::default()));
    let store = Store::open_sqlite(&dir.path().join("db.sqlite")).await.unwrap();
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_key: Some("admin".into()),
        routing: RoutingConfig { max_tokens: Some(12), ..RoutingConfig::default() },
        ..ServerConfig::default()
    };
    let server = Server::start(config, reasoner, store.clone()).await.unwrap();
    let http = reqwest::Client::new();
    let base = format!("http://{}", server.addr);
    let (status, created) = post(&http, &base, "/v1/policies", json!({"text": POLICY})).await;
    assert!(status == 200 || status == 201, "{created}");

    let items = [
        ("Get FREE BITCOIN today", "triage", "violation"),
        ("Happy birthday, grandma!", "triage", "allow"),
        ("Check out my channel for deals", "human_review", "needs_review"),
        ("what time is the meeting", "human_review", "needs_review"),
    ];
    let mut ids = Vec::new();
    let mut undecided_ids = Vec::new();
    for (text, stage, outcome) in items {
        let (status, decision) = post(&http, &base, "/v1/moderate", json!({"text": text, "policies": ["promo"]})).await;
        assert_eq!(status, 200, "{decision}");
        assert_eq!(decision["decided_by"], stage, "{text}: {decision}");
        assert_eq!(decision["outcome"], outcome, "{text}");
        let stages = stage_names(&decision["stages"]);
        if stage == "triage" {
            assert_eq!(stages, ["triage"], "{text}: the model was not asked");
        } else {
            assert_eq!(stages, ["triage", "reasoning_low", "reasoning_high"], "{text}: low, then high, then a person");
            assert!(decision["reasoning"][1]["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
            undecided_ids.push(decision["decision_id"].as_str().unwrap().to_string());
        }
        // One stored decision for the item, naming every stage it went through and the one that settled it.
        let id = decision["decision_id"].as_str().unwrap().to_string();
        let (status, stored) = get(&http, &base, &format!("/v1/decisions/{id}")).await;
        assert_eq!(status, 200, "{text}: {stored}");
        assert_eq!(stored["source"], format!("cascade:{stage}"), "{text}");
        assert_eq!(stored["outcome"], outcome, "{text}");
        assert_eq!(stage_names(&stored["timings"]["stages"]), stages, "{text}: {stored}");
        assert_eq!(stored["verdicts"][0]["stage"], stage, "{text}: {stored}");
        let usage = (&stored["usage"]["prompt_tokens"], &decision["usage"]["prompt_tokens"]);
        assert_eq!(usage.0, usage.1, "{text}: the steps' usage is summed in the one record");
        if stage != "triage" {
            let escalations = stored["verdicts"][0]["escalations"].as_array().unwrap();
            assert_eq!(escalations.len(), 3, "{text}: why it left triage, low and high: {stored}");
        }
        ids.push(id);
    }
    let (_, listed) = get(&http, &base, "/v1/decisions?limit=100").await;
    let mut listed: Vec<String> =
        listed["decisions"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap().to_string()).collect();
    listed.sort();
    ids.sort();
    assert_eq!(listed, ids, "one record per item, not one per step");
    let (_, queue) = get(&http, &base, "/v1/reviews").await;
    let mut queued: Vec<String> =
        queue["reviews"].as_array().unwrap().iter().map(|r| r["decision_id"].as_str().unwrap().to_string()).collect();
    queued.sort();
    undecided_ids.sort();
    assert_eq!(queued, undecided_ids, "the two undecided items wait for a person, each under its one record");
    let (_, metrics) = get_text(&http, &base, "/metrics").await;
    assert!(metrics.contains("safeguard_pipeline_decisions_total"), "cascade metrics are exported");
    server.shutdown().await.unwrap();
}

fn stage_names(stages: &Value) -> Vec<&str> {
    stages.as_array().unwrap().iter().map(|s| s["stage"].as_str().unwrap()).collect()
}

async fn post(http: &reqwest::Client, base: &str, path: &str, body: Value) -> (u16, Value) {
    let response = http.post(format!("{base}{path}")).bearer_auth("admin").json(&body).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

async fn get(http: &reqwest::Client, base: &str, path: &str) -> (u16, Value) {
    let response = http.get(format!("{base}{path}")).bearer_auth("admin").send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

async fn get_text(http: &reqwest::Client, base: &str, path: &str) -> (u16, String) {
    let response = http.get(format!("{base}{path}")).bearer_auth("admin").send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap_or_default())
}

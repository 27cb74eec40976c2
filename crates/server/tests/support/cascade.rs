//! The cascade harness shared by the tests that classify through it: a scripted reasoner stands in for the model
//! ("answer=1" → violation, "answer=0" → allowed, "FAIL" → the backend fails), and triage is a real trained
//! classifier per policy whose calibration is pinned, so that its probability is known: 0.9 for `promo-sure`,
//! 0.55 (a small margin) for `promo-near`. Both policies deny "free bitcoin" by rule.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use safeguard_core::{ReasonError, ReasonOutput, ReasonRequest, Reasoner, Usage};
use safeguard_policy::Policy;
use safeguard_server::{ActiveLearning, RunningServer, Server, ServerConfig};
use safeguard_store::Store;
use serde_json::{Value, json};

#[path = "triage.rs"]
mod triage_support;

pub use triage_support::write_pinned_triage;

pub const ADMIN: &str = "cascade-admin";

pub fn policy_text(name: &str, title: &str) -> String {
    format!(
        "---
name: {name}
output: binary
triage:
  rules:
    keywords:
      - name: known-scams
        action: deny
        keywords: [free bitcoin]
---
# {title} (PR)

## INSTRUCTIONS
Return exactly one character: 0 or 1.

## VIOLATES (1)
- PR1.a Unsolicited promotion with a link or handle.

## DOES NOT VIOLATE (0)
- PR0.a Personal messages.

Return exactly one character: 0 or 1."
    )
}

pub struct Scripted {
    pub calls: AtomicUsize,
    /// The completion-token cap of the last prompt.
    pub last_max_tokens: AtomicUsize,
}

#[async_trait]
impl Reasoner for Scripted {
    fn model_id(&self) -> String {
        "scripted".into()
    }

    async fn reason(&self, req: ReasonRequest) -> Result<ReasonOutput, ReasonError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.last_max_tokens.store(req.max_tokens, Ordering::SeqCst);
        let text = safeguard_harmony::user_message_text(&req.content);
        if text.contains("FAIL") {
            return Err(ReasonError::Backend("scripted backend failure".into()));
        }
        let answer = if text.contains("answer=1") { "1" } else { "0" };
        Ok(ReasonOutput {
            analysis: Some(format!("Thinking at {} effort.", req.effort)),
            final_text: Some(answer.into()),
            final_token_prob: Some(0.95),
            usage: Usage { prompt_tokens: 100, cached_prompt_tokens: 40, completion_tokens: 12 },
            ..ReasonOutput::default()
        })
    }
}

/// The harness's promotion policy, with what triage may do with a confident violation.
pub fn policy_with(name: &str, on_violation: &str) -> String {
    policy_text(name, &format!("Promotion Policy, {name}")).replacen(
        "triage:\n",
        &format!("triage:\n  on_violation: {on_violation}\n"),
        1,
    )
}

/// A policy the harness stores, its triage model pinned so that every text scores `probability` (a confident
/// violation at or above `violate_above`; `None`: never).
pub struct Pinned {
    pub text: String,
    pub probability: f64,
    pub violate_above: Option<f32>,
}

pub struct Harness {
    pub server: RunningServer,
    pub base: String,
    pub http: reqwest::Client,
    pub reasoner: Arc<Scripted>,
    _dir: tempfile::TempDir,
}

impl Harness {
    pub async fn start() -> Harness {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut ServerConfig)) -> Harness {
        let policies = vec![
            Pinned { text: policy_text("promo-sure", "Promotion Policy, sure"), probability: 0.9, violate_above: None },
            Pinned {
                text: policy_text("promo-near", "Promotion Policy, near"),
                probability: 0.55,
                violate_above: None,
            },
        ];
        Self::start_pinned(policies, adjust).await.0
    }

    /// A server with these policies stored, each with its pinned triage model; with what each model's
    /// `model.json` says, in order.
    pub async fn start_pinned(policies: Vec<Pinned>, adjust: impl FnOnce(&mut ServerConfig)) -> (Harness, Vec<Value>) {
        let dir = tempfile::tempdir().unwrap();
        let triage_dir = dir.path().join("triage");
        let metas: Vec<Value> = policies
            .iter()
            .map(|pinned| {
                let policy = Policy::parse(&pinned.text).unwrap();
                write_pinned_triage(&triage_dir, &policy, pinned.probability, pinned.violate_above)
            })
            .collect();
        let store = Store::open_sqlite(&dir.path().join("db.sqlite")).await.unwrap();
        let config = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_key: Some(ADMIN.into()),
            triage_dir: Some(triage_dir),
            active_learning: ActiveLearning { rate: 1.0, ..ActiveLearning::default() },
            cost_per_1k_tokens: 2.0,
            ..ServerConfig::default()
        };
        let mut config = config;
        adjust(&mut config);
        let reasoner = Arc::new(Scripted { calls: AtomicUsize::new(0), last_max_tokens: AtomicUsize::new(0) });
        let server = Server::start(config, reasoner.clone(), store).await.unwrap();
        let h = Harness {
            base: format!("http://{}", server.addr),
            server,
            http: reqwest::Client::new(),
            reasoner,
            _dir: dir,
        };
        for pinned in &policies {
            let (status, body) = h.call("POST", "/v1/policies", Some(json!({"text": pinned.text}))).await;
            assert!(status == 200 || status == 201, "{body}");
        }
        (h, metas)
    }

    /// Where the server reads its triage models (hot-reloaded): a test retrains into it.
    pub fn triage_dir(&self) -> PathBuf {
        self._dir.path().join("triage")
    }

    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self.http.request(method.parse().unwrap(), format!("{}{path}", self.base)).bearer_auth(ADMIN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn classify(&self, body: Value) -> Value {
        let (status, reply) = self.call("POST", "/v1/classify", Some(body)).await;
        assert_eq!(status, 200, "{reply}");
        reply
    }

    pub async fn metrics(&self) -> String {
        let (_, text) = self.call("GET", "/metrics", None).await;
        text.as_str().unwrap().to_string()
    }
}

/// The value of the first sample whose name and labels start with `series` (e.g. `name{stage="triage"`).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with([' ', '{', ',', '}']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

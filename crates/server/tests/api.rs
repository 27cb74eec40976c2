//! The HTTP API end to end over a real socket, with a scripted reasoner standing in for the model:
//! content containing "BUY NOW" is spam ("1"), "FAIL" makes the backend fail, "SLOW" makes it hang.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use safeguard_core::{ReasonError, ReasonOutput, ReasonRequest, Reasoner, Usage};
use safeguard_server::{RunningServer, Server, ServerConfig, verify_webhook_fresh};
use safeguard_store::Store;
use serde_json::{Value, json};

const ADMIN: &str = "test-admin-key";

struct ScriptedReasoner {
    calls: AtomicUsize,
}

#[async_trait]
impl Reasoner for ScriptedReasoner {
    fn model_id(&self) -> String {
        "scripted-test-model".into()
    }

    async fn reason(&self, req: ReasonRequest) -> Result<ReasonOutput, ReasonError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let text = serde_json::to_string(&req.content).unwrap();
        if text.contains("FAIL") {
            return Err(ReasonError::Backend("scripted backend failure".into()));
        }
        if text.contains("SLOW") {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        if text.contains("WAIT") {
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        if text.contains("MUTE") {
            // Reasoned, then stopped without a final message.
            return Ok(ReasonOutput { analysis: Some("Thinking it over.".into()), ..ReasonOutput::default() });
        }
        let spam = text.contains("BUY NOW");
        Ok(ReasonOutput {
            analysis: Some(format!("The content {} promotional.", if spam { "is" } else { "is not" })),
            final_text: Some(if spam { "1" } else { "0" }.into()),
            truncated: false,
            usage: Usage { prompt_tokens: 100, cached_prompt_tokens: 40, completion_tokens: 12 },
            prompt_sha256: Some("sha256:feed".into()),
            ..ReasonOutput::default()
        })
    }
}

struct Harness {
    server: Option<RunningServer>,
    base: String,
    http: reqwest::Client,
    reasoner: Arc<ScriptedReasoner>,
    store: Store,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start(tweak: impl FnOnce(&mut ServerConfig)) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("db.sqlite")).await.unwrap();
        Harness::start_on(store, dir, tweak).await
    }

    async fn start_on(store: Store, dir: tempfile::TempDir, tweak: impl FnOnce(&mut ServerConfig)) -> Harness {
        let mut config = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_key: Some(ADMIN.into()),
            webhook_secret: "hook-secret".into(),
            reason_timeout: Duration::from_secs(2),
            webhook_backoff: Duration::from_millis(50),
            // The tests' receivers listen on loopback, which webhooks may not reach unless let in.
            webhook_targets: safeguard_server::WebhookTargets {
                allowed_hosts: vec!["127.0.0.1".into()],
                allow_private: false,
            },
            ..ServerConfig::default()
        };
        tweak(&mut config);
        let reasoner = Arc::new(ScriptedReasoner { calls: AtomicUsize::new(0) });
        let server = Server::start(config, reasoner.clone(), store.clone()).await.unwrap();
        let base = format!("http://{}", server.addr);
        Harness { server: Some(server), base, http: reqwest::Client::new(), reasoner, store, _dir: dir }
    }

    async fn call(&self, method: &str, path: &str, key: Option<&str>, body: Option<Value>) -> (u16, Value) {
        let mut request = self.http.request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn key(&self, scopes: &[&str]) -> String {
        let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
        self.store.create_api_key("test", &scopes).await.unwrap().1
    }
}

#[tokio::test]
async fn auth_scopes_and_json_errors() {
    let h = Harness::start(|_| {}).await;
    let (status, body) = h.call("POST", "/v1/classify", None, Some(json!({"text": "hi", "policies": ["spam"]}))).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "unauthorized");
    let (status, _) =
        h.call("POST", "/v1/classify", Some("sg_not_a_key"), Some(json!({"text": "hi", "policies": ["spam"]}))).await;
    assert_eq!(status, 401);
    let classify_only = h.key(&["classify"]).await;
    let (status, body) =
        h.call("POST", "/v1/policies", Some(&classify_only), Some(json!({"text": "# X\n\nbody 0 or 1"}))).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("policies:write"));
    let (status, _) = h.call("GET", "/v1/decisions", Some(&classify_only), None).await;
    assert_eq!(status, 403);
    let (status, body) = h
        .call(
            "POST",
            "/v1/classify",
            Some(&classify_only),
            Some(json!({"text": "hi", "policies": ["spam"], "return_reasoning": true})),
        )
        .await;
    assert_eq!(status, 403, "reasoning needs audit: {body}");
    // A flag that is not a boolean is refused, not read as false.
    for (route, field) in [("/v1/classify", "return_reasoning"), ("/v1/moderate", "appeal")] {
        let mut request = json!({"text": "hi", "policies": ["spam"]});
        request[field] = json!("yes");
        let (status, body) = h.call("POST", route, Some(&classify_only), Some(request)).await;
        assert_eq!((status, &body["error"]["code"]), (400, &json!("invalid_request")), "{route}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains(field), "{body}");
    }
    // An appeal naming no decision would put anything first in the review queue: a review key's to make.
    let appeal = json!({"text": "hi", "policies": ["spam"], "appeal": true});
    let (status, body) = h.call("POST", "/v1/moderate", Some(&classify_only), Some(appeal.clone())).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("review"), "{body}");
    let lead = h.key(&["classify", "review"]).await;
    let (status, body) = h.call("POST", "/v1/moderate", Some(&lead), Some(appeal)).await;
    assert_eq!((status, &body["decided_by"]), (200, &json!("human_review")), "{body}");
    // Health and docs need no key.
    assert_eq!(h.call("GET", "/healthz", None, None).await.0, 200);
    let (status, ready) = h.call("GET", "/readyz", None, None).await;
    assert_eq!((status, ready["database"].clone()), (200, json!(true)));
    let (status, spec) = h.call("GET", "/openapi.json", None, None).await;
    assert_eq!(status, 200);
    assert!(spec["paths"]["/v1/classify"]["post"].is_object());
}

/// Every error is JSON, the router's own too: a path nothing serves, a method a route does not take, a path
/// segment that does not decode.
#[tokio::test]
async fn errors_outside_the_handlers_are_json_too() {
    let h = Harness::start(|_| {}).await;
    for (method, path, status, code) in [
        ("GET", "/v1/nope", 404, "not_found"),
        ("POST", "/v1/models", 405, "method_not_allowed"),
        ("DELETE", "/v1/reviews/r1", 405, "method_not_allowed"),
        ("GET", "/v1/reviews/%FF", 400, "invalid_path"),
    ] {
        let (got, body) = h.call(method, path, Some(ADMIN), None).await;
        assert_eq!((got, &body["error"]["code"]), (status, &json!(code)), "{method} {path}: {body}");
        assert!(!body["error"]["message"].as_str().unwrap().is_empty(), "{body}");
    }
    // A method refused still says which ones the route takes.
    let response = h.http.post(format!("{}/v1/models", h.base)).bearer_auth(ADMIN).send().await.unwrap();
    let allowed = response.headers().get("allow").map(|v| v.to_str().unwrap().to_string());
    assert!(allowed.as_deref().is_some_and(|allow| allow.contains("GET")), "{allowed:?}");
    let (status, body) =
        h.call("POST", "/v1/policies/spam/activate", Some(ADMIN), Some(json!({"hash": "sha256:\u{0}"}))).await;
    assert_eq!((status, &body["error"]["code"]), (400, &json!("invalid_text")), "{body}");
}

/// An inline policy from a key that could not publish it may not order the shared review queue (high_risk, a
/// review SLA) nor pass itself off as an active policy; a publisher's may, and so may the active version itself.
#[tokio::test]
async fn inline_policies_cannot_take_what_only_publishers_set() {
    let h = Harness::start(|_| {}).await;
    let classifier = h.key(&["classify"]).await;
    let writer = h.key(&["classify", "policies:write"]).await;
    let body = "# Promo\n\nReturn 1 if the content is promotion, else 0.\n";
    let spam = safeguard_policy::STARTER_POLICIES.iter().find(|p| p.file_name == "spam.md").unwrap();
    for (case, (front, what)) in [
        ("name: urgent\nhigh_risk: true\n", "high_risk"),
        ("name: urgent\nreview_sla: 1m\n", "review_sla"),
        ("name: spam\n", "active policy"),
    ]
    .into_iter()
    .enumerate()
    {
        // A body of its own each: one body stored with other front matter would be a conflict.
        let text = format!("---\n{front}---\n{body}\nCase {case}.\n");
        let request = json!({"text": "BUY NOW", "policies": [{"text": text}], "effort": "low"});
        let (status, refused) = h.call("POST", "/v1/classify", Some(&classifier), Some(request.clone())).await;
        assert_eq!((status, &refused["error"]["code"]), (403, &json!("forbidden")), "{what}: {refused}");
        let message = refused["error"]["message"].as_str().unwrap();
        assert!(message.contains(what) && message.contains("policies:write"), "{message}");
        let (status, decided) = h.call("POST", "/v1/classify", Some(&writer), Some(request)).await;
        assert_eq!(status, 200, "{what}: {decided}");
    }
    assert_eq!(h.reasoner.calls.load(Ordering::SeqCst), 3, "only the publisher's requests were judged");
    // Named by the request's field (a body without front matter or a heading takes it), the same impostor.
    let headless = "Return 1 if the content is a raffle, else 0.\n";
    let named = json!({"text": "BUY NOW", "policies": [{"text": headless, "name": "spam"}], "effort": "low"});
    assert_eq!(h.call("POST", "/v1/classify", Some(&classifier), Some(named)).await.0, 403);
    // The active version sent inline, and any inline policy that orders nothing, pass.
    for text in [spam.source.to_string(), body.to_string()] {
        let request = json!({"text": "BUY NOW", "policies": [{"text": text}], "effort": "low"});
        let (status, decided) = h.call("POST", "/v1/classify", Some(&classifier), Some(request)).await;
        assert_eq!(status, 200, "{decided}");
    }
}

/// A setting with two names (ours and OpenAI's) reads whichever is given; null stands for absent, and two
/// different values are refused rather than one quietly chosen.
#[tokio::test]
async fn aliased_settings_skip_nulls_and_refuse_disagreement() {
    let h = Harness::start(|_| {}).await;
    let key = h.key(&["classify", "audit"]).await;
    let request = json!({"text": "hello", "policies": ["spam"], "effort": null, "reasoning_effort": "high"});
    let (status, decided) = h.call("POST", "/v1/classify", Some(&key), Some(request)).await;
    assert_eq!(status, 200, "{decided}");
    let id = decided["decision_id"].as_str().unwrap();
    let (_, stored) = h.call("GET", &format!("/v1/decisions/{id}"), Some(&key), None).await;
    assert_eq!(stored["effort"], "high", "{stored}");
    let request = json!({"text": "hello", "policies": ["spam"], "effort": "low", "reasoning_effort": "high"});
    let (status, refused) = h.call("POST", "/v1/classify", Some(&key), Some(request)).await;
    assert_eq!((status, &refused["error"]["code"]), (400, &json!("invalid_request")), "{refused}");
    let chat = json!({"messages": [{"role": "system", "content": "policy"}, {"role": "user", "content": "hi"}],
        "max_completion_tokens": 16, "max_tokens": 32});
    let (status, refused) = h.call("POST", "/v1/chat/completions", Some(&key), Some(chat)).await;
    assert_eq!((status, &refused["error"]["code"]), (400, &json!("invalid_request")), "{refused}");
}

#[tokio::test]
async fn classify_decides_stores_and_fails_closed() {
    let h = Harness::start(|_| {}).await;
    let key = h.key(&["classify"]).await;
    let (status, spam) = h
        .call(
            "POST",
            "/v1/classify",
            Some(&key),
            Some(json!({"text": "BUY NOW cheap pills", "policies": ["spam"], "effort": "low"})),
        )
        .await;
    assert_eq!(status, 200, "{spam}");
    assert_eq!(spam["outcome"], "violation");
    assert_eq!(spam["verdicts"][0]["policy"], "spam");
    assert!(spam["verdicts"][0]["policy_hash"].as_str().unwrap().starts_with("sha256:"));
    assert_eq!(spam["usage"]["prompt_tokens"], 100);
    assert!(spam.get("reasoning").is_none(), "no reasoning without asking");
    let (_, ok) = h
        .call("POST", "/v1/classify", Some(&key), Some(json!({"prompt": "how do I bake bread?", "policies": ["spam"]})))
        .await;
    assert_eq!(ok["outcome"], "allow");

    // A backend failure and a timeout are needs_review with the reason, and stored.
    let (status, failed) =
        h.call("POST", "/v1/classify", Some(&key), Some(json!({"text": "FAIL please", "policies": ["spam"]}))).await;
    assert_eq!(status, 200);
    assert_eq!(failed["outcome"], "needs_review");
    assert!(failed["failure_reason"].as_str().unwrap().contains("scripted backend failure"), "{failed}");
    let (_, slow) =
        h.call("POST", "/v1/classify", Some(&key), Some(json!({"text": "SLOW", "policies": ["spam"]}))).await;
    assert_eq!(slow["outcome"], "needs_review");
    assert!(slow["failure_reason"].as_str().unwrap().contains("timed out"), "{slow}");

    let auditor = h.key(&["audit"]).await;
    let id = spam["decision_id"].as_str().unwrap();
    let (status, stored) = h.call("GET", &format!("/v1/decisions/{id}"), Some(&auditor), None).await;
    assert_eq!(status, 200);
    assert_eq!(stored["outcome"], "violation");
    assert_eq!(stored["source"], "api");
    assert_eq!(stored["reasoning"][0], "The content is promotional.");
    let reviewer = h.key(&["review"]).await;
    let (_, redacted) = h.call("GET", &format!("/v1/decisions/{id}"), Some(&reviewer), None).await;
    assert!(redacted.get("reasoning").is_none(), "reasoning is audit-only: {redacted}");

    let (_, list) = h.call("GET", "/v1/decisions?outcome=needs_review&limit=10", Some(&reviewer), None).await;
    assert_eq!(list["decisions"].as_array().unwrap().len(), 2);
    let (_, by_policy) = h.call("GET", "/v1/decisions?policy=spam", Some(&reviewer), None).await;
    assert_eq!(by_policy["decisions"].as_array().unwrap().len(), 4);
    let (status, _) = h.call("GET", "/v1/decisions?outcome=maybe", Some(&reviewer), None).await;
    assert_eq!(status, 400);

    // Replay: same policy version and effort, same scripted answer -> unchanged.
    let (status, replay) = h.call("POST", &format!("/v1/decisions/{id}/replay"), Some(&auditor), None).await;
    assert_eq!(status, 200, "{replay}");
    assert_eq!(replay["changed"], false);
    assert_eq!(replay["replay"]["replay_of"], id);
    assert_eq!(replay["replay"]["policies"], stored["policies"]);

    // Batch: valid items decided together; a bad item gets its own error.
    let (status, batch) = h
        .call(
            "POST",
            "/v1/classify/batch",
            Some(&key),
            Some(json!({"items": [{"text": "BUY NOW"}, {"text": ""}, {"text": "hello"}], "policies": ["spam"]})),
        )
        .await;
    assert_eq!(status, 200, "{batch}");
    let results = batch["results"].as_array().unwrap();
    assert_eq!(results[0]["outcome"], "violation");
    assert!(results[1]["error"]["message"].as_str().unwrap().contains("empty"));
    assert_eq!(results[2]["outcome"], "allow");

    let (_, metrics) = h.call("GET", "/metrics", None, None).await;
    let metrics = metrics.as_str().unwrap().to_string();
    assert!(metrics.contains("safeguard_decisions_total"), "{metrics}");
    assert!(metrics.contains("safeguard_backend_errors_total"));
    assert!(metrics.contains("safeguard_decision_latency_seconds_bucket"));

    // The queue shows a prompt by its own words: the user message's framing sentence, the same for every prompt,
    // is longer than the excerpt.
    let (_, prompt) = h
        .call("POST", "/v1/classify", Some(&key), Some(json!({"prompt": "FAIL on this prompt", "policies": ["spam"]})))
        .await;
    assert_eq!(prompt["outcome"], "needs_review", "{prompt}");
    let (_, queue) = h.call("GET", "/v1/reviews?limit=100", Some(&reviewer), None).await;
    let row = queue["reviews"].as_array().unwrap().iter().find(|r| r["decision_id"] == prompt["decision_id"]);
    let row = row.unwrap_or_else(|| panic!("not queued: {queue}"));
    assert_eq!(row["decision"]["excerpt"], "FAIL on this prompt", "{row}");
}

#[tokio::test]
async fn policies_are_versioned_pinned_and_diffed() {
    let h = Harness::start(|_| {}).await;
    let writer = h.key(&["policies:write", "classify"]).await;
    let v1 = "---\nname: promo\noutput: binary\n---\n# Promo\n\nReturn 1 if the content is promotion, else 0.\n";
    let response = h.http.post(format!("{}/v1/policies", h.base)).bearer_auth(&writer).body(v1).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 201);
    let first: Value = response.json().await.unwrap();
    let (status, again) = h.call("POST", "/v1/policies", Some(&writer), Some(json!({"text": v1}))).await;
    assert_eq!(status, 200, "same body, same version");
    assert_eq!(again["id"], first["id"]);
    // The same body with other front matter would be the same version: refused, not quietly kept as it was.
    let stricter = v1.replace("output: binary", "output: binary\nhigh_risk: true");
    let (status, refused) = h.call("POST", "/v1/policies", Some(&writer), Some(json!({"text": stricter}))).await;
    assert_eq!((status, refused["error"]["code"].as_str()), (409, Some("conflict")), "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains(first["hash"].as_str().unwrap()), "{refused}");
    let (_, kept) =
        h.call("GET", &format!("/v1/policies/{}", first["hash"].as_str().unwrap()), Some(&writer), None).await;
    assert_eq!(kept["meta"]["high_risk"], false, "{kept}");
    let v2 = v1.replace("promotion", "advertising");
    let (status, second) = h.call("POST", "/v1/policies", Some(&writer), Some(json!({"text": v2}))).await;
    assert_eq!(status, 201);
    assert_eq!(second["active"], false, "a new version waits for activation");
    let (_, active) = h.call("GET", "/v1/policies/promo", Some(&writer), None).await;
    assert_eq!(active["hash"], first["hash"]);
    assert_eq!(active["versions"].as_array().unwrap().len(), 2);
    let (status, _) =
        h.call("POST", "/v1/policies/promo/activate", Some(&writer), Some(json!({"hash": second["hash"]}))).await;
    assert_eq!(status, 200);
    let (_, active) = h.call("GET", "/v1/policies/promo", Some(&writer), None).await;
    assert_eq!(active["hash"], second["hash"]);
    let (status, _) =
        h.call("POST", "/v1/policies/spam/activate", Some(&writer), Some(json!({"hash": second["hash"]}))).await;
    assert_eq!(status, 400, "a version of another name cannot be pinned");
    let (status, diff) = h
        .call(
            "GET",
            &format!("/v1/policies/{}/diff/{}", first["hash"].as_str().unwrap(), second["hash"].as_str().unwrap()),
            Some(&writer),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let diff = diff.as_str().unwrap();
    assert!(
        diff.contains("-Return 1 if the content is promotion")
            && diff.contains("+Return 1 if the content is advertising"),
        "{diff}"
    );
    let (_, list) = h.call("GET", "/v1/policies", Some(&writer), None).await;
    assert!(list["policies"].as_array().unwrap().iter().any(|p| p["name"] == "spam"), "starter library seeded");
    // A key that only classifies sees the versions names resolve to, not drafts (nor other clients' inline
    // policies); a version whose hash it knows it still reads.
    let classifier = h.key(&["classify"]).await;
    let (_, listed) = h.call("GET", "/v1/policies", Some(&classifier), None).await;
    let promo: Vec<&Value> = listed["policies"].as_array().unwrap().iter().filter(|p| p["name"] == "promo").collect();
    assert_eq!(promo.iter().map(|p| &p["hash"]).collect::<Vec<_>>(), [&second["hash"]], "{listed}");
    let (_, named) = h.call("GET", "/v1/policies/promo", Some(&classifier), None).await;
    assert_eq!(named["versions"].as_array().unwrap().len(), 1, "{named}");
    let (_, everything) = h.call("GET", "/v1/policies", Some(&writer), None).await;
    assert_eq!(everything["policies"].as_array().unwrap().iter().filter(|p| p["name"] == "promo").count(), 2);
    // A page at a time, by name if asked; no body in a listing.
    let (_, page) = h.call("GET", "/v1/policies?name=promo&limit=1", Some(&writer), None).await;
    assert_eq!(page["policies"].as_array().unwrap().len(), 1, "{page}");
    assert_eq!(page["next_after"], page["policies"][0]["hash"], "{page}");
    assert!(page["policies"][0].get("body").is_none(), "{page}");
    let after = page["next_after"].as_str().unwrap();
    let (_, rest) = h.call("GET", &format!("/v1/policies?name=promo&limit=1&after={after}"), Some(&writer), None).await;
    assert_ne!(rest["policies"][0]["hash"], page["policies"][0]["hash"], "{rest}");
    let after = rest["next_after"].as_str().unwrap();
    let (_, end) = h.call("GET", &format!("/v1/policies?name=promo&after={after}"), Some(&writer), None).await;
    assert_eq!((end["policies"].as_array().unwrap().len(), &end["next_after"]), (0, &Value::Null), "{end}");
    let (status, bad) = h.call("GET", "/v1/policies?limit=lots", Some(&writer), None).await;
    assert_eq!((status, &bad["error"]["code"]), (400, &json!("invalid_query")), "{bad}");
    let (status, _) =
        h.call("GET", &format!("/v1/policies/{}", first["hash"].as_str().unwrap()), Some(&classifier), None).await;
    assert_eq!(status, 200);
    let (status, bad) =
        h.call("POST", "/v1/policies", Some(&writer), Some(json!({"text": "---\nname: x\n---\n"}))).await;
    assert_eq!(status, 400, "{bad}");
    // A triage section the cascade could not read is refused, stored or inline, not run without triage.
    let misspelt = v1.replace("output: binary", "output: binary\ntriage:\n  on_violaton: review");
    let (status, bad) = h.call("POST", "/v1/policies", Some(&writer), Some(json!({"text": misspelt}))).await;
    assert_eq!((status, bad["error"]["code"].as_str()), (400, Some("invalid_policy")), "{bad}");
    assert!(bad["error"]["message"].as_str().unwrap().contains("on_violaton"), "{bad}");
    let (status, bad) = h
        .call("POST", "/v1/classify", Some(&writer), Some(json!({"text": "x", "policies": [{"text": misspelt}]})))
        .await;
    assert_eq!((status, bad["error"]["code"].as_str()), (400, Some("invalid_policy")), "{bad}");
    // So is a routing section naming an effort that does not exist.
    let extreme = v1.replace("output: binary", "output: binary\nrouting:\n  first_effort: extreme");
    for (path, body) in [
        ("/v1/policies", json!({"text": extreme})),
        ("/v1/classify", json!({"text": "x", "policies": [{"text": extreme}]})),
    ] {
        let (status, bad) = h.call("POST", path, Some(&writer), Some(body)).await;
        assert_eq!((status, bad["error"]["code"].as_str()), (400, Some("invalid_policy")), "{path}: {bad}");
        assert!(bad["error"]["message"].as_str().unwrap().contains("extreme"), "{bad}");
    }
    // Classify by version hash and with an inline policy.
    let (status, by_hash) = h
        .call(
            "POST",
            "/v1/classify",
            Some(&writer),
            Some(
                json!({"text": "BUY NOW", "policies": [first["hash"], {"text": v1.replace("promo", "inline-promo")}]}),
            ),
        )
        .await;
    assert_eq!(status, 200, "{by_hash}");
    assert_eq!(by_hash["verdicts"].as_array().unwrap().len(), 2);
    // Inline, a stored body under another name is the same version; with other settings it would be judged
    // under front matter its stored version does not have, so it is refused like a re-post.
    let renamed = v1.replace("name: promo", "name: promo-copy");
    let (status, same) = h
        .call("POST", "/v1/classify", Some(&writer), Some(json!({"text": "BUY NOW", "policies": [{"text": renamed}]})))
        .await;
    assert_eq!(status, 200, "{same}");
    assert_eq!(same["verdicts"][0]["policy_hash"], first["hash"], "{same}");
    let (status, refused) = h
        .call("POST", "/v1/classify", Some(&writer), Some(json!({"text": "BUY NOW", "policies": [{"text": stricter}]})))
        .await;
    assert_eq!((status, refused["error"]["code"].as_str()), (409, Some("conflict")), "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains(first["hash"].as_str().unwrap()), "{refused}");
    // Refused for one of its policies, a request stores none of them: the new one before the conflicting one too,
    // and a body sent twice in one request with different settings conflicts with itself.
    let fresh = v1.replace("name: promo", "name: fresh").replace("Return 1 if", "Answer 1 when");
    let fresh_hash = safeguard_policy::Policy::parse(&fresh).unwrap().hash.to_string();
    let twice = [
        json!([{"text": fresh}, {"text": stricter}]),
        json!([{"text": fresh}, {"text": fresh.replace("fresh", "fresh-strict").replace("name: fresh-strict", "name: fresh-strict\nhigh_risk: true")}]),
    ];
    for policies in twice {
        let request = json!({"text": "BUY NOW", "policies": policies});
        let (status, refused) = h.call("POST", "/v1/classify", Some(&writer), Some(request)).await;
        assert_eq!((status, refused["error"]["code"].as_str()), (409, Some("conflict")), "{refused}");
        assert!(h.store.get_policy(&fresh_hash).await.unwrap().is_none(), "{policies}: the fresh policy was stored");
    }
    let (status, _) =
        h.call("POST", "/v1/classify", Some(&writer), Some(json!({"text": "x", "policies": ["no-such-policy"]}))).await;
    assert_eq!(status, 400);
}

/// Blank content is refused in the tagged `content` form as in the plain fields, on every route that takes it:
/// triage would otherwise settle "" as benign.
#[tokio::test]
async fn blank_tagged_content_is_refused() {
    let h = Harness::start(|_| {}).await;
    let key = h.key(&["classify"]).await;
    for content in [json!({"kind": "text", "text": "  "}), json!({"kind": "conversation", "messages": []})] {
        for route in ["/v1/classify", "/v1/moderate", "/v1/jobs"] {
            let request = json!({"content": content, "policies": ["spam"]});
            let (status, body) = h.call("POST", route, Some(&key), Some(request)).await;
            assert_eq!((status, &body["error"]["code"]), (400, &json!("invalid_content")), "{route} {content}: {body}");
        }
    }
}

#[tokio::test]
async fn limits_give_clear_4xx() {
    let h = Harness::start(|c| {
        c.limits.max_body_bytes = 4096;
        c.limits.max_content_tokens = 50;
        c.limits.max_policies = 2;
        c.limits.max_tokens = 1000;
        c.rate_limit_per_minute = 60;
        c.rate_limit_burst = 12;
    })
    .await;
    let key = h.key(&["classify"]).await;
    let (status, body) = h
        .call("POST", "/v1/classify", Some(&key), Some(json!({"text": "word ".repeat(200), "policies": ["spam"]})))
        .await;
    assert_eq!((status, body["error"]["code"].clone()), (400, json!("content_too_long")), "{body}");
    let (status, body) =
        h.call("POST", "/v1/classify", Some(&key), Some(json!({"text": "x".repeat(5000), "policies": ["spam"]}))).await;
    assert_eq!((status, body["error"]["code"].clone()), (413, json!("payload_too_large")), "{body}");
    let (status, body) = h
        .call("POST", "/v1/classify", Some(&key), Some(json!({"text": "x", "policies": ["spam", "hate", "violence"]})))
        .await;
    assert_eq!((status, body["error"]["code"].clone()), (400, json!("too_many_policies")));
    let (status, body) = h
        .call("POST", "/v1/classify", Some(&key), Some(json!({"text": "x", "policies": ["spam"], "max_tokens": 5000})))
        .await;
    assert_eq!((status, body["error"]["code"].clone()), (400, json!("max_tokens_exceeded")));
    let (status, body) = h.call("POST", "/v1/classify", Some(&key), Some(json!({"policies": ["spam"]}))).await;
    assert_eq!((status, body["error"]["code"].clone()), (400, json!("invalid_content")));
    let (status, _) = h
        .call("POST", "/v1/classify", Some(&key), Some(json!({"text": "x", "policies": ["spam"], "effort": "extreme"})))
        .await;
    assert_eq!(status, 400);
    let response = h
        .http
        .post(format!("{}/v1/classify", h.base))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body("{oops")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    // Burst of 12 spent above (7 calls) -> a few more pass, then 429 with Retry-After.
    let mut limited = None;
    for _ in 0..10 {
        let response = h.http.get(format!("{}/v1/policies", h.base)).bearer_auth(&key).send().await.unwrap();
        if response.status().as_u16() == 429 {
            limited = Some(response);
            break;
        }
    }
    let limited = limited.expect("rate limit reached");
    assert!(limited.headers().get("retry-after").unwrap().to_str().unwrap().parse::<u64>().unwrap() >= 1);
    let body: Value = limited.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
}

#[tokio::test]
async fn jobs_are_idempotent_finished_once_and_signed_webhooks_arrive() {
    // A webhook receiver that fails the first delivery, then accepts.
    let received: Arc<tokio::sync::Mutex<Vec<(String, String, String)>>> = Arc::default();
    let hits = Arc::new(AtomicUsize::new(0));
    let receiver = {
        let received = received.clone();
        let hits = hits.clone();
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
                let received = received.clone();
                let hits = hits.clone();
                async move {
                    if hits.fetch_add(1, Ordering::SeqCst) == 0 {
                        return axum::http::StatusCode::INTERNAL_SERVER_ERROR;
                    }
                    let header = |name: &str| headers.get(name).unwrap().to_str().unwrap().to_string();
                    received.lock().await.push((
                        header("x-safeguard-signature"),
                        header("x-safeguard-timestamp"),
                        body,
                    ));
                    axum::http::StatusCode::OK
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, receiver).await.unwrap() });

    let h = Harness::start(|_| {}).await;
    let key = h.key(&["classify"]).await;
    let submit = |body: Value, idem: &'static str| {
        let request =
            h.http.post(format!("{}/v1/jobs", h.base)).bearer_auth(&key).header("Idempotency-Key", idem).json(&body);
        async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap())
        }
    };
    let body = json!({"text": "BUY NOW", "policies": ["spam"], "webhook_url": hook_url});
    let (status, job) = submit(body.clone(), "idem-1").await;
    assert_eq!(status, 202, "{job}");
    let (status, again) = submit(body.clone(), "idem-1").await;
    assert_eq!((status, &again["id"]), (200, &job["id"]));
    // The same body is the same request even after the name it uses points at another version: the retry of a
    // request whose reply was lost must not be told it conflicts (it would drop a queued job, or queue a second).
    let writer = h.key(&["policies:write", "classify"]).await;
    let starter = safeguard_policy::STARTER_POLICIES.iter().find(|p| p.file_name == "spam.md").unwrap();
    let edited = starter.source.replacen("# Spam Policy", "# Spam Policy, edited", 1);
    let (status, stored) = h.call("POST", "/v1/policies", Some(&writer), Some(json!({"text": edited}))).await;
    assert_eq!(status, 201, "{stored}");
    let activate = json!({"hash": stored["hash"]});
    assert_eq!(h.call("POST", "/v1/policies/spam/activate", Some(&writer), Some(activate)).await.0, 200);
    let (status, retried) = submit(body.clone(), "idem-1").await;
    assert_eq!((status, &retried["id"]), (200, &job["id"]), "{retried}");
    // The same body with its keys in another order, as another client library may send it.
    let reordered = format!(r#"{{"webhook_url": "{hook_url}", "policies": ["spam"], "text": "BUY NOW"}}"#);
    let response = h
        .http
        .post(format!("{}/v1/jobs", h.base))
        .bearer_auth(&key)
        .header("Idempotency-Key", "idem-1")
        .header("content-type", "application/json")
        .body(reordered)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200, "{}", response.text().await.unwrap());
    let (status, conflict) = submit(json!({"text": "other", "policies": ["spam"]}), "idem-1").await;
    assert_eq!(status, 409, "{conflict}");
    let (status, bad) = submit(json!({"text": "x", "policies": ["nope"]}), "idem-2").await;
    assert_eq!(status, 400, "a bad job is refused before it is queued: {bad}");

    let id = job["id"].as_str().unwrap();
    let mut done = Value::Null;
    for _ in 0..100 {
        let (_, polled) = h.call("GET", &format!("/v1/jobs/{id}"), Some(&key), None).await;
        if polled["status"] == "done" {
            done = polled;
            break;
        }
        assert_eq!(polled["outcome"], "pending");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(done["outcome"], "violation", "{done}");
    assert_eq!(h.store.decisions_for_job(id).await.unwrap(), 1);

    for _ in 0..100 {
        if !received.lock().await.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deliveries = received.lock().await.clone();
    assert_eq!(deliveries.len(), 1, "delivered once, after one retry");
    let (signature, timestamp, payload) = &deliveries[0];
    let now = safeguard_store::now_ms() / 1000;
    let fresh = Duration::from_secs(300);
    // Signed with the client's own secret, which its key reads; not the server's, which every client would share.
    let (status, mine) = h.call("GET", "/v1/webhooks/secret", Some(&key), None).await;
    assert_eq!(status, 200, "{mine}");
    let secret = mine["secret"].as_str().unwrap();
    let timestamp: i64 = timestamp.parse().unwrap();
    assert!(verify_webhook_fresh(secret, timestamp, payload, signature, now, fresh));
    assert!(!verify_webhook_fresh("hook-secret", timestamp, payload, signature, now, fresh));
    let other = h.store.create_api_key("another-client", &["classify".to_string()]).await.unwrap().1;
    let (_, theirs) = h.call("GET", "/v1/webhooks/secret", Some(&other), None).await;
    assert_ne!(theirs["secret"], mine["secret"], "another client could sign this client's deliveries");
    let payload: Value = serde_json::from_str(payload).unwrap();
    assert_eq!(payload["job_id"], id);
    assert_eq!(payload["outcome"], "violation");
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

/// A job whose item needed a person: its webhook hears `job.completed` (needs_review), then `job.reviewed` with the
/// person's answer, and the answer to an appeal of it after that.
#[tokio::test]
async fn a_jobs_webhook_hears_the_persons_answer() {
    let received: Arc<tokio::sync::Mutex<Vec<Value>>> = Arc::default();
    let receiver = {
        let received = received.clone();
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move |body: String| {
                let received = received.clone();
                async move {
                    received.lock().await.push(serde_json::from_str(&body).unwrap());
                    axum::http::StatusCode::OK
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, receiver).await.unwrap() });
    let delivered = |count: usize| {
        let received = received.clone();
        async move {
            for _ in 0..200 {
                if received.lock().await.len() >= count {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            received.lock().await.clone()
        }
    };

    let h = Harness::start(|_| {}).await;
    let key = h.key(&["classify"]).await;
    let reviewer = h.key(&["review"]).await;
    let body = json!({"text": "FAIL to decide this", "policies": ["spam"], "webhook_url": hook_url});
    let (status, job) = h.call("POST", "/v1/jobs", Some(&key), Some(body)).await;
    assert_eq!(status, 202, "{job}");
    let completed = delivered(1).await;
    assert_eq!(
        (completed[0]["type"].as_str(), completed[0]["outcome"].as_str()),
        (Some("job.completed"), Some("needs_review"))
    );
    let decision_id = completed[0]["decision_id"].as_str().unwrap().to_string();

    let (_, queue) = h.call("GET", "/v1/reviews", Some(&reviewer), None).await;
    let review = queue["reviews"].as_array().unwrap().iter().find(|r| r["decision_id"] == decision_id.as_str());
    let review = review.unwrap_or_else(|| panic!("queued: {queue}"))["id"].as_str().unwrap().to_string();
    let answer = json!({"outcome": "allow", "rationale": "A test message.", "rule_id": "SP0.a"});
    let (status, decided) =
        h.call("POST", &format!("/v1/reviews/{review}/decide"), Some(&reviewer), Some(answer)).await;
    assert_eq!(status, 200, "{decided}");
    let heard = delivered(2).await;
    assert_eq!(heard.len(), 2, "{heard:?}");
    let reviewed = &heard[1];
    assert_eq!(reviewed["type"], "job.reviewed", "{reviewed}");
    assert_eq!((&reviewed["job_id"], reviewed["decision_id"].as_str()), (&job["id"], Some(decision_id.as_str())));
    assert_eq!((reviewed["outcome"].as_str(), reviewed["rule_id"].as_str()), (Some("allow"), Some("SP0.a")));
    assert_eq!((reviewed["kind"].as_str(), &reviewed["appeal_decision_id"]), (Some("review"), &Value::Null));
    // Polling the job says the same.
    let (_, polled) = h.call("GET", &format!("/v1/jobs/{}", job["id"].as_str().unwrap()), Some(&key), None).await;
    assert_eq!(
        (polled["review"]["status"].as_str(), polled["review"]["outcome"].as_str()),
        (Some("decided"), Some("allow"))
    );
    assert!(polled["review"].get("reviewer").is_none() && polled.get("appeal").is_none(), "{polled}");

    // The client appeals; the person's answer to the appeal reaches the same webhook, naming both decisions.
    let (status, appeal) = h.call("POST", &format!("/v1/decisions/{decision_id}/appeal"), Some(&key), None).await;
    assert_eq!(status, 200, "{appeal}");
    let appeal_review = appeal["review_id"].as_str().unwrap();
    let answer = json!({"outcome": "violation", "rationale": "Promotion after all.", "rule_id": "SP2.b"});
    let path = format!("/v1/reviews/{appeal_review}/decide");
    let (status, decided) = h.call("POST", &path, Some(&reviewer), Some(answer)).await;
    assert_eq!(status, 200, "{decided}");
    let heard = delivered(3).await;
    let appealed = heard.get(2).unwrap_or_else(|| panic!("the appeal's answer: {heard:?}"));
    assert_eq!((appealed["type"].as_str(), appealed["kind"].as_str()), (Some("job.reviewed"), Some("appeal")));
    assert_eq!(appealed["decision_id"].as_str(), Some(decision_id.as_str()), "{appealed}");
    assert_eq!(appealed["appeal_decision_id"], appeal["decision"]["decision_id"], "{appealed}");
    assert_eq!(appealed["outcome"], "violation", "{appealed}");
    let (_, polled) = h.call("GET", &format!("/v1/jobs/{}", job["id"].as_str().unwrap()), Some(&key), None).await;
    assert_eq!(
        (polled["appeal"]["kind"].as_str(), polled["appeal"]["outcome"].as_str()),
        (Some("appeal"), Some("violation"))
    );
}

#[tokio::test]
async fn shutdown_drains_in_flight_jobs() {
    let mut h = Harness::start(|_| {}).await;
    let key = h.key(&["classify"]).await;
    let (status, job) =
        h.call("POST", "/v1/jobs", Some(&key), Some(json!({"text": "WAIT then BUY NOW", "policies": ["spam"]}))).await;
    assert_eq!(status, 202);
    // Let a worker pick it up, then shut down while it is reasoning.
    for _ in 0..50 {
        if h.reasoner.calls.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.server.take().unwrap().shutdown().await.unwrap();
    let stored = h.store.get_job(job["id"].as_str().unwrap()).await.unwrap().unwrap();
    assert_eq!(stored.status, safeguard_store::JobStatus::Done, "the in-flight job finished before exit");
}

/// A job still being decided when the drain runs out goes back to the queue untried, at once: waiting out its
/// lease would count an attempt, and three restarts would fail it as a job that kills its workers.
#[tokio::test]
async fn a_job_cut_off_by_shutdown_is_handed_back_without_spending_an_attempt() {
    let mut h = Harness::start(|c| c.drain_timeout = Duration::from_millis(200)).await;
    let key = h.key(&["classify"]).await;
    let (status, job) =
        h.call("POST", "/v1/jobs", Some(&key), Some(json!({"text": "SLOW", "policies": ["spam"]}))).await;
    assert_eq!(status, 202);
    for _ in 0..100 {
        if h.reasoner.calls.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.server.take().unwrap().shutdown().await.unwrap();
    let stored = h.store.get_job(job["id"].as_str().unwrap()).await.unwrap().unwrap();
    assert_eq!((stored.status, stored.attempts), (safeguard_store::JobStatus::Pending, 0), "{stored:?}");
}

/// Starts a classify request that reasons for as long as the reasoner lets it, and waits until it is reasoning.
async fn request_reasoning_for_minutes(h: &Harness) -> tokio::task::JoinHandle<()> {
    let key = h.key(&["classify"]).await;
    let body = json!({"text": "SLOW", "policies": ["spam"], "effort": "low"});
    let request = h.http.post(format!("{}/v1/classify", h.base)).bearer_auth(&key).json(&body);
    let in_flight = tokio::spawn(async move {
        let _ = request.send().await;
    });
    for _ in 0..200 {
        if h.reasoner.calls.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(h.reasoner.calls.load(Ordering::SeqCst) > 0, "the request never reached the model");
    in_flight
}

/// A client that hangs up on a direct request (a pinned effort) drops it mid-step while the engine may go on
/// decoding: the step pays its completion cap all the same, so hanging up is no way around the token budget.
#[tokio::test]
async fn a_direct_request_dropped_midway_still_pays_for_its_tokens() {
    let h = Harness::start(|c| {
        c.reasoning_tokens_per_sec = Some(100.0);
        c.reason_timeout = Duration::from_secs(600);
    })
    .await;
    let key = h.key(&["classify"]).await;
    let in_flight = request_reasoning_for_minutes(&h).await;
    in_flight.abort();
    // The server drops the request once it sees the connection closed, at once on loopback. Unpaid, the bucket
    // would still hold its 100 tokens and let the next request in.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let body = json!({"text": "hello", "policies": ["spam"], "effort": "low"});
    let (status, reply) = h.call("POST", "/v1/classify", Some(&key), Some(body)).await;
    assert_eq!(status, 429, "the dropped step's cap (1,024 tokens at low effort) is about 9 s of this budget: {reply}");
}

/// The drain's deadline runs from the signal for requests too: one still reasoning does not keep the process up
/// past it (and with it the jobs' hand-back past the orchestrator's kill).
#[tokio::test]
async fn a_request_still_reasoning_does_not_hold_shutdown_past_the_drain() {
    let mut h = Harness::start(|c| {
        c.drain_timeout = Duration::from_millis(300);
        c.reason_timeout = Duration::from_secs(600);
    })
    .await;
    let in_flight = request_reasoning_for_minutes(&h).await;
    let server = h.server.take().unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(30), server.shutdown()).await;
    assert!(matches!(stopped, Ok(Ok(()))), "shutdown waited on a request past the drain: {stopped:?}");
    in_flight.abort();
}

/// A second signal ends a long drain at once.
#[tokio::test]
async fn hurrying_ends_the_drain_at_once() {
    let mut h = Harness::start(|c| {
        c.drain_timeout = Duration::from_secs(600);
        c.reason_timeout = Duration::from_secs(600);
    })
    .await;
    let in_flight = request_reasoning_for_minutes(&h).await;
    let server = h.server.take().unwrap();
    let (shutdown, hurry) = (server.shutdown_token(), server.hurry_token());
    shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    hurry.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(30), server.wait()).await;
    assert!(matches!(stopped, Ok(Ok(()))), "a hurried shutdown still waited: {stopped:?}");
    in_flight.abort();
}

#[tokio::test]
async fn openai_moderations_and_chat_shapes() {
    let h = Harness::start(|c| c.moderation_policies = vec!["spam".into()]).await;
    let key = h.key(&["classify"]).await;
    let (status, moderation) =
        h.call("POST", "/v1/moderations", Some(&key), Some(json!({"input": ["BUY NOW!!!", "hello", "FAIL"]}))).await;
    assert_eq!(status, 200, "{moderation}");
    let results = moderation["results"].as_array().unwrap();
    assert_eq!(results[0]["flagged"], true);
    assert_eq!(results[0]["categories"]["spam"], true);
    assert_eq!(results[1]["flagged"], false);
    assert_eq!(results[1]["category_scores"]["spam"], 0.0);
    assert_eq!(results[2]["flagged"], true, "a failure is flagged, never allowed");
    assert_eq!(results[2]["category_scores"]["spam"], 1.0, "and scores as held by any threshold");
    assert_eq!(results[2]["safeguard"]["outcome"], "needs_review");
    assert_eq!(moderation["model"], "scripted-test-model");
    // An empty input is answered unflagged, as OpenAI answers it, without the model or a record; the batch
    // around it is judged as ever.
    let calls = h.reasoner.calls.load(Ordering::SeqCst);
    let (status, moderation) =
        h.call("POST", "/v1/moderations", Some(&key), Some(json!({"input": ["", "BUY NOW!!!", " \n"]}))).await;
    assert_eq!(status, 200, "{moderation}");
    let flagged: Vec<&Value> = moderation["results"].as_array().unwrap().iter().map(|r| &r["flagged"]).collect();
    assert_eq!(flagged, [&json!(false), &json!(true), &json!(false)], "{moderation}");
    assert_eq!(moderation["results"][0]["categories"]["spam"], false, "{moderation}");
    assert_eq!(moderation["results"][0]["safeguard"]["decision_id"], Value::Null, "{moderation}");
    assert_eq!(h.reasoner.calls.load(Ordering::SeqCst), calls + 1, "only the text was judged");
    let (status, alone) = h.call("POST", "/v1/moderations", Some(&key), Some(json!({"input": ""}))).await;
    assert_eq!((status, &alone["results"][0]["flagged"]), (200, &json!(false)), "{alone}");
    assert!(alone["id"].as_str().unwrap().len() > "modr-".len(), "{alone}");

    let chat = json!({"model": "x", "messages": [{"role": "system", "content": "policy"}, {"role": "user", "content": "BUY NOW"}], "reasoning_effort": "high"});
    // The chain of thought is audit data, here as on every route.
    let auditor = h.key(&["classify", "audit"]).await;
    let (status, reply) = h.call("POST", "/v1/chat/completions", Some(&auditor), Some(chat.clone())).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["choices"][0]["message"]["content"], "1");
    assert_eq!(reply["choices"][0]["message"]["reasoning_content"], "The content is promotional.");
    assert_eq!(reply["usage"]["total_tokens"], 112);
    let (status, plain) = h.call("POST", "/v1/chat/completions", Some(&key), Some(chat.clone())).await;
    assert_eq!((status, &plain["choices"][0]["message"]["content"]), (200, &json!("1")), "{plain}");
    assert_eq!(plain["choices"][0]["message"]["reasoning_content"], Value::Null, "{plain}");
    let mut streaming = chat.clone();
    streaming["stream"] = json!(true);
    let response =
        h.http.post(format!("{}/v1/chat/completions", h.base)).bearer_auth(&key).json(&streaming).send().await.unwrap();
    let text = response.text().await.unwrap();
    assert!(!text.contains("reasoning") && text.contains("\"content\":\"1\""), "{text}");
    // A part that is not text is refused, not left out of what is judged.
    let mut image = chat.clone();
    image["messages"][1]["content"] =
        json!([{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "x"}}]);
    let (status, refused) = h.call("POST", "/v1/chat/completions", Some(&key), Some(image)).await;
    assert_eq!((status, &refused["error"]["code"]), (400, &json!("invalid_messages")), "{refused}");
    // Without a policy there is nothing to judge against: a clear refusal, before any model time is spent.
    for system in [json!([]), json!([{"role": "developer", "content": " \n"}])] {
        let mut messages = system.as_array().unwrap().clone();
        messages.push(json!({"role": "user", "content": "BUY NOW"}));
        let (status, refused) =
            h.call("POST", "/v1/chat/completions", Some(&key), Some(json!({"messages": messages}))).await;
        assert_eq!((status, &refused["error"]["code"]), (400, &json!("invalid_messages")), "{refused}");
        assert!(refused["error"]["message"].as_str().unwrap().contains("policy"), "{refused}");
    }
    let response = h
        .http
        .post(format!("{}/v1/chat/completions", h.base))
        .bearer_auth(&auditor)
        .json(&streaming)
        .send()
        .await
        .unwrap();
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let text = response.text().await.unwrap();
    assert!(text.contains("\"reasoning\":\"The content is promotional.\"") && text.contains("data: [DONE]"), "{text}");
    // Chunks in order: the role, the reasoning, the answer, the finish reason, then [DONE].
    let data: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let deltas: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["delta"]).collect();
    assert_eq!(deltas[0]["role"], "assistant");
    assert_eq!(deltas[1]["reasoning_content"], "The content is promotional.");
    assert_eq!(deltas[2]["content"], "1");
    assert_eq!(chunks[3]["choices"][0]["finish_reason"], "stop");
    assert_eq!(data.last(), Some(&"[DONE]"));

    // A model failure after the stream started arrives as an error event, never as an answer.
    let mut failing = streaming.clone();
    failing["messages"][1]["content"] = json!("FAIL");
    let response =
        h.http.post(format!("{}/v1/chat/completions", h.base)).bearer_auth(&key).json(&failing).send().await.unwrap();
    let text = response.text().await.unwrap();
    assert!(text.contains("scripted backend failure") && text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(!text.contains("\"content\":\"1\"") && !text.contains("\"content\":\"0\""), "{text}");

    // A model that stopped without an answer is an error, not an empty "stop" a client would read as no label.
    let mut mute = chat.clone();
    mute["messages"][1]["content"] = json!("MUTE");
    let (status, reply) = h.call("POST", "/v1/chat/completions", Some(&key), Some(mute.clone())).await;
    assert_eq!((status, &reply["error"]["code"]), (502, &json!("no_answer")), "{reply}");
    mute["stream"] = json!(true);
    let response =
        h.http.post(format!("{}/v1/chat/completions", h.base)).bearer_auth(&key).json(&mute).send().await.unwrap();
    let text = response.text().await.unwrap();
    assert!(text.contains("\"code\":\"no_answer\"") && text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(!text.contains("\"finish_reason\":\"stop\""), "{text}");
}

/// Every path that stores a decision a person must settle queues it: classify, batch, jobs and moderations.
/// Settled decisions never reach the queue.
#[tokio::test]
async fn every_undecided_decision_reaches_the_review_queue() {
    let h = Harness::start(|c| c.moderation_policies = vec!["spam".into()]).await;
    let key = h.key(&["classify"]).await;
    let reviewer = h.key(&["review"]).await;
    let mut expected: Vec<(String, &str)> = Vec::new();

    let (_, classified) =
        h.call("POST", "/v1/classify", Some(&key), Some(json!({"text": "FAIL classify", "policies": ["spam"]}))).await;
    expected.push((classified["decision_id"].as_str().unwrap().to_string(), "api"));
    h.call("POST", "/v1/classify", Some(&key), Some(json!({"text": "BUY NOW", "policies": ["spam"]}))).await;

    let (_, batch) = h
        .call(
            "POST",
            "/v1/classify/batch",
            Some(&key),
            Some(json!({"items": [{"text": "hello"}, {"text": "FAIL batch"}], "policies": ["spam"]})),
        )
        .await;
    expected.push((batch["results"][1]["decision_id"].as_str().unwrap().to_string(), "batch"));

    let (_, moderation) =
        h.call("POST", "/v1/moderations", Some(&key), Some(json!({"input": ["FAIL moderation", "hello"]}))).await;
    assert_eq!(moderation["results"][0]["flagged"], true);
    expected.push((moderation["results"][0]["safeguard"]["decision_id"].as_str().unwrap().to_string(), "moderations"));

    let (status, failing_job) =
        h.call("POST", "/v1/jobs", Some(&key), Some(json!({"text": "FAIL job", "policies": ["spam"]}))).await;
    assert_eq!(status, 202, "{failing_job}");
    let (_, settled_job) =
        h.call("POST", "/v1/jobs", Some(&key), Some(json!({"text": "hello job", "policies": ["spam"]}))).await;
    let mut job_decisions = Vec::new();
    for job in [&failing_job, &settled_job] {
        let id = job["id"].as_str().unwrap();
        let mut polled = Value::Null;
        for _ in 0..200 {
            polled = h.call("GET", &format!("/v1/jobs/{id}"), Some(&key), None).await.1;
            if polled["status"] == "done" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert_eq!(polled["status"], "done", "{polled}");
        job_decisions.push((polled["decision_id"].as_str().unwrap().to_string(), polled["outcome"].clone()));
    }
    assert_eq!(job_decisions[0].1, "needs_review");
    assert_eq!(job_decisions[1].1, "allow");
    expected.push((job_decisions[0].0.clone(), "job"));

    let (status, bad) = h.call("GET", "/v1/reviews?limit=many", Some(&reviewer), None).await;
    assert_eq!((status, &bad["error"]["code"]), (400, &json!("invalid_query")), "a JSON error like every other: {bad}");
    // A NUL names nothing, on either store (PostgreSQL would refuse the text, which reads as a storage failure).
    for url in ["/v1/reviews/%00", "/v1/decisions/x%00/appeal", "/v1/decisions?policy=spam%00"] {
        let method = if url.ends_with("appeal") { "POST" } else { "GET" };
        let (status, refused) = h.call(method, url, Some(&reviewer), None).await;
        assert_eq!((status, &refused["error"]["code"]), (400, &json!("invalid_url")), "{url}: {refused}");
    }
    let (status, queue) = h.call("GET", "/v1/reviews?status=pending&limit=100", Some(&reviewer), None).await;
    assert_eq!(status, 200, "{queue}");
    let queued: Vec<(String, String)> = queue["reviews"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["decision_id"].as_str().unwrap().to_string(), r["reason"].as_str().unwrap_or("").to_string()))
        .collect();
    for (decision_id, source) in &expected {
        let found = queued.iter().find(|(id, _)| id == decision_id);
        let (_, reason) = found.unwrap_or_else(|| panic!("the {source} decision {decision_id} is not queued: {queue}"));
        assert!(reason.starts_with("spam:"), "{source}: the reason names the policy: {reason}");
    }
    assert_eq!(queued.len(), expected.len(), "only undecided decisions are queued: {queue}");
    assert_eq!(queue["stats"]["pending"], expected.len());
    // Queued once per decision: the SLA is set and the item can be opened by a reviewer.
    let first = &queue["reviews"][0];
    assert!(first["due_at"].as_i64().unwrap() > first["created_at"].as_i64().unwrap());
    let (status, opened) =
        h.call("GET", &format!("/v1/reviews/{}", first["id"].as_str().unwrap()), Some(&reviewer), None).await;
    assert_eq!((status, opened["decision"]["outcome"].clone()), (200, json!("needs_review")), "{opened}");
}

/// Front matter that changes how a decision is made: its own name (the heading says otherwise), a labels output
/// the scripted model's "0" does not satisfy (the body alone would be read as a binary policy, and "0" would
/// allow), `high_risk` and its review SLA. Re-parsing only the stored body would lose them all.
const FRONT_MATTER_POLICY: &str = "---\nname: promo-guard\nhigh_risk: true\nreview_sla: 90m\noutput:\n  format: labels\n  violating: [PROMO]\n  safe: [CLEAN]\n---\n# Spam Policy\n\n## INSTRUCTIONS\nAnswer 0 or 1.\n\n## VIOLATES (1)\n- PR1.a Unsolicited promotion.\n\n## DOES NOT VIOLATE (0)\n- PR0.a Personal messages.\n";

#[tokio::test]
async fn appeals_and_reviews_keep_the_policy_front_matter() {
    let h = Harness::start(|_| {}).await;
    let key = h.key(&["policies:write", "classify"]).await;
    let reviewer = h.key(&["review"]).await;
    let (status, stored) = h.call("POST", "/v1/policies", Some(&key), Some(json!({"text": FRONT_MATTER_POLICY}))).await;
    assert_eq!(status, 201, "{stored}");
    let classify = json!({"text": "hello there", "policies": ["promo-guard"]});
    let (status, original) = h.call("POST", "/v1/classify", Some(&key), Some(classify)).await;
    assert_eq!(status, 200, "{original}");
    assert_eq!(original["outcome"], "needs_review", "\"0\" is not one of the declared labels: {original}");
    // The policy's own SLA, not the default day, sets when its items are due.
    let (_, queue) = h.call("GET", "/v1/reviews?limit=100", Some(&reviewer), None).await;
    let queued = queue["reviews"].as_array().unwrap().iter().find(|r| r["decision_id"] == original["decision_id"]);
    let queued = queued.unwrap_or_else(|| panic!("the undecided item is queued: {queue}"));
    let sla = queued["due_at"].as_i64().unwrap() - queued["created_at"].as_i64().unwrap();
    assert_eq!((sla, queued["priority"].as_i64()), (90 * 60_000, Some(5)), "{queued}");

    let id = original["decision_id"].as_str().unwrap();
    let (status, appeal) = h.call("POST", &format!("/v1/decisions/{id}/appeal"), Some(&key), None).await;
    assert_eq!(status, 200, "{appeal}");
    let decision = &appeal["decision"];
    assert_eq!(decision["effort"], "high");
    assert_eq!(decision["policies"][0]["name"], "promo-guard", "the front matter names the policy: {decision}");
    assert_eq!(decision["policies"][0]["hash"], stored["hash"], "{decision}");
    assert_eq!(decision["verdicts"][0]["policy"], "promo-guard", "{decision}");
    assert_eq!(
        (decision["outcome"].as_str(), decision["verdicts"][0]["outcome"].as_str()),
        (Some("needs_review"), Some("needs_review")),
        "judged by the declared labels, as the original was, not as a binary policy: {decision}"
    );

    let appealed = decision["decision_id"].as_str().unwrap();
    let (_, queue) = h.call("GET", "/v1/reviews?limit=100", Some(&reviewer), None).await;
    let mut queued: Vec<(&str, i64)> = queue["reviews"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["decision_id"] == appealed)
        .map(|r| (r["kind"].as_str().unwrap(), r["priority"].as_i64().unwrap()))
        .collect();
    queued.sort();
    assert_eq!(queued, vec![("appeal", 10)], "one review, the appeal, though the model left it undecided: {queue}");
    let appeal_review = queue["reviews"].as_array().unwrap().iter().find(|r| r["decision_id"] == appealed).unwrap();
    let sla = appeal_review["due_at"].as_i64().unwrap() - appeal_review["created_at"].as_i64().unwrap();
    assert_eq!(sla, 90 * 60_000, "the policy's SLA is shorter than an appeal's four hours: {appeal_review}");

    let review_id = appeal["review_id"].as_str().unwrap();
    let (status, item) = h.call("GET", &format!("/v1/reviews/{review_id}"), Some(&reviewer), None).await;
    assert_eq!(status, 200, "{item}");
    assert_eq!(item["policies"][0]["name"], "promo-guard", "{item}");
    assert_eq!(item["policies"][0]["rule_ids"], json!(["PR0.a", "PR1.a"]), "{item}");
    assert!(!item["reasoning"].as_array().unwrap().is_empty(), "the reviewer reads the reasoning: {item}");
    let decide = json!({"outcome": "allow", "rationale": "A greeting.", "rule_id": "PR0.a"});
    let (status, decided) =
        h.call("POST", &format!("/v1/reviews/{review_id}/decide"), Some(&reviewer), Some(decide)).await;
    assert_eq!((status, &decided["policy_hash"]), (200, &stored["hash"]), "{decided}");
    // Once decided, the chain of thought is audit data: the review scope no longer reads it.
    let (_, item) = h.call("GET", &format!("/v1/reviews/{review_id}"), Some(&reviewer), None).await;
    assert_eq!(item["reasoning"], json!([]), "{item}");
    let auditor = h.key(&["review", "audit"]).await;
    let (_, item) = h.call("GET", &format!("/v1/reviews/{review_id}"), Some(&auditor), None).await;
    assert!(!item["reasoning"].as_array().unwrap().is_empty(), "{item}");

    // A decision judged under a version this server does not have: the appeal cannot be run, and says so.
    let mut orphan = h.store.get_decision(id).await.unwrap().unwrap();
    orphan.id = "00000000-0000-4000-8000-000000000001".into();
    orphan.policy_hashes = vec![format!("sha256:{}", "0".repeat(64))];
    h.store.insert_decision(&orphan, None).await.unwrap();
    let (status, body) = h.call("POST", &format!("/v1/decisions/{}/appeal", orphan.id), Some(&key), None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("conflict")), "{body}");
}

/// `/metrics` is open by default (scrapers are usually set up without a key); with `metrics_require_key` it asks
/// for a key with the `metrics` scope, and no other scope will do.
#[tokio::test]
async fn metrics_can_require_a_key_of_their_own() {
    let open = Harness::start(|_| {}).await;
    let response = open.http.get(format!("{}/metrics", open.base)).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let h = Harness::start(|c| c.metrics_require_key = true).await;
    let scrape = |key: Option<String>| {
        let request = h.http.get(format!("{}/metrics", h.base));
        let request = match key {
            Some(key) => request.bearer_auth(key),
            None => request,
        };
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(scrape(None).await, 401);
    assert_eq!(scrape(Some(h.key(&["classify", "review", "audit"]).await)).await, 403);
    assert_eq!(scrape(Some(h.key(&["metrics"]).await)).await, 200);
}

/// Guessing keys is throttled per address: after 30 wrong keys in a minute the next is refused with 429 before
/// any lookup, right or wrong, while the keys already at work from the same address (every client's, behind a
/// proxy) go on, even with nothing cached between lookups.
#[tokio::test]
async fn wrong_keys_are_throttled_per_address() {
    let h = Harness::start(|c| c.lookup_ttl = Duration::ZERO).await;
    let key = h.key(&["review"]).await;
    let fresh_key = h.key(&["review"]).await;
    assert_eq!(h.call("GET", "/v1/reviews", Some(&key), None).await.0, 200);
    for guess in 0..30 {
        let (status, _) = h.call("GET", "/v1/reviews", Some(&format!("sg_guess_{guess}")), None).await;
        assert_eq!(status, 401, "guess {guess}");
    }
    let (status, body) = h.call("GET", "/v1/reviews", Some("sg_guess_31"), None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (429, Some("rate_limited")), "{body}");
    assert_eq!(h.call("GET", "/v1/reviews", Some(&key), None).await.0, 200, "the known key still works");
    let (status, _) = h.call("GET", "/v1/reviews", Some(&fresh_key), None).await;
    assert_eq!(status, 429, "a right guess from that address is not even looked up");
    let (status, _) = h.call("GET", "/v1/reviews", Some("sg_guess_32"), None).await;
    assert_eq!(status, 429, "nor a wrong one");
    assert_eq!(h.call("GET", "/v1/reviews", Some(&key), None).await.0, 200, "the key at work still works");
}

/// `SAFEGUARD_ADMIN_KEY` off loopback must be long enough not to be guessed, and setting a new value is how it is
/// rotated: the old value stops working at the next start.
#[tokio::test]
async fn the_admin_key_is_long_off_loopback_and_rotating_it_revokes_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("db.sqlite")).await.unwrap();
    let reasoner = Arc::new(ScriptedReasoner { calls: AtomicUsize::new(0) });
    let public = ServerConfig {
        listen: "0.0.0.0:0".parse().unwrap(),
        admin_key: Some("change-me".into()),
        ..ServerConfig::default()
    };
    let err = Server::start(public, reasoner.clone(), store.clone()).await.err().expect("refused");
    assert!(err.to_string().contains("guessable"), "{err}");

    let (old, new) = ("first-admin-key-0123456789abcdef", "second-admin-key-0123456789abcdef");
    let status = |server: &RunningServer, key: &str| {
        let request = reqwest::Client::new().get(format!("http://{}/v1/reviews", server.addr)).bearer_auth(key);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    for (key, refused) in [(old, None), (new, Some(old))] {
        let config = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_key: Some(key.into()),
            lookup_ttl: Duration::ZERO,
            ..ServerConfig::default()
        };
        let server = Server::start(config, reasoner.clone(), store.clone()).await.unwrap();
        assert_eq!(status(&server, key).await, 200);
        if let Some(old) = refused {
            assert_eq!(status(&server, old).await, 401, "the replaced admin key still works");
        }
        server.shutdown().await.unwrap();
    }
    // Setting the replaced value again is refused, rather than revoking the current key and leaving none.
    let rolled_back =
        ServerConfig { listen: "127.0.0.1:0".parse().unwrap(), admin_key: Some(old.into()), ..ServerConfig::default() };
    let err = Server::start(rolled_back, reasoner.clone(), store.clone()).await.err().expect("refused");
    assert!(err.to_string().contains("revoked"), "{err}");
    let current = store.authenticate(new).await.unwrap();
    assert!(current.is_some(), "the current admin key survives a start with an old one");
}

#[tokio::test]
async fn keyless_servers_only_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("db.sqlite")).await.unwrap();
    let reasoner = Arc::new(ScriptedReasoner { calls: AtomicUsize::new(0) });
    let public = ServerConfig { listen: "0.0.0.0:0".parse().unwrap(), ..ServerConfig::default() };
    let err = Server::start(public, reasoner.clone(), store.clone()).await.err().expect("refused");
    assert!(err.to_string().contains("without authentication"), "{err}");
    let local = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        lookup_ttl: Duration::from_millis(50),
        ..ServerConfig::default()
    };
    let server = Server::start(local, reasoner, store.clone()).await.unwrap();
    let classify = |key: Option<&str>| {
        let request = reqwest::Client::new()
            .post(format!("http://{}/v1/classify", server.addr))
            .json(&json!({"text": "hello", "policies": ["spam"]}));
        let request = match key {
            Some(key) => request.bearer_auth(key),
            None => request,
        };
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(classify(None).await, 200);
    // A web page in the operator's browser reaches loopback too: by a name re-pointed at 127.0.0.1 (DNS
    // rebinding), or by posting across sites. Without keys, neither is answered.
    let page = |header: &'static str, value: &'static str| {
        let request = reqwest::Client::new()
            .post(format!("http://{}/v1/classify", server.addr))
            .header(header, value)
            .json(&json!({"text": "hello", "policies": ["spam"]}));
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(page("host", "rebind.example:8080").await, 403);
    assert_eq!(page("origin", "https://evil.example").await, 403);
    assert_eq!(page("origin", "http://localhost:8080").await, 200, "the review page itself");
    // Nor is anyone a reverse proxy on this machine passes on, though it connects from loopback.
    assert_eq!(page("x-forwarded-for", "203.0.113.7").await, 403);
    assert_eq!(page("forwarded", "for=203.0.113.7").await, 403);
    // Nor are the routes that need no key: they name policies, backends and queues.
    for path in ["/metrics", "/readyz"] {
        let url = format!("http://{}{path}", server.addr);
        let rebound = reqwest::Client::new().get(&url).header("host", "rebind.example:8080").send().await.unwrap();
        assert_eq!(rebound.status().as_u16(), 403, "{path}");
        assert_eq!(reqwest::get(&url).await.unwrap().status().as_u16(), 200, "{path}");
    }
    // A key made while it runs (`safeguard keys create` on its database) ends serving without keys, no restart.
    let (_, secret) = store.create_api_key("ops", &["classify".to_string()]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(classify(None).await, 401);
    assert_eq!(classify(Some(&secret)).await, 200);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_service_runs_on_postgres_too() {
    let url = std::env::var("SAFEGUARD_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let schema = format!("sgserver_{}_{}", std::process::id(), safeguard_store::now_ms());
    let options =
        safeguard_store::StoreOptions { schema: Some(schema.clone()), max_connections: 8, ..Default::default() };
    let store = match tokio::time::timeout(Duration::from_secs(5), Store::connect(&url, options)).await {
        Ok(Ok(store)) => store,
        other => {
            eprintln!(
                "SKIPPING the PostgreSQL server test: {url} unreachable: {:?}",
                other.err().map(|_| "timeout").or(Some("error"))
            );
            return;
        }
    };
    let h = Harness::start_on(store, tempfile::tempdir().unwrap(), |_| {}).await;
    let key = h.key(&["classify", "review"]).await;
    let (status, decision) =
        h.call("POST", "/v1/classify", Some(&key), Some(json!({"text": "BUY NOW", "policies": ["spam"]}))).await;
    assert_eq!((status, decision["outcome"].clone()), (200, json!("violation")), "{decision}");
    let mut ids = Vec::new();
    for i in 0..5 {
        let (status, job) = h
            .call("POST", "/v1/jobs", Some(&key), Some(json!({"text": format!("hello {i}"), "policies": ["spam"]})))
            .await;
        assert_eq!(status, 202);
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        let mut status = Value::Null;
        for _ in 0..100 {
            status = h.call("GET", &format!("/v1/jobs/{id}"), Some(&key), None).await.1;
            if status["status"] == "done" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(status["outcome"], "allow", "{status}");
        assert_eq!(h.store.decisions_for_job(id).await.unwrap(), 1);
    }
    let (_, list) = h.call("GET", "/v1/decisions?policy=spam", Some(&key), None).await;
    assert_eq!(list["decisions"].as_array().unwrap().len(), 6);
    let mut h = h;
    h.server.take().unwrap().shutdown().await.unwrap();
    h.store.close().await;
    Store::drop_schema(&url, &schema).await.unwrap();
}

/// Names and keys are remembered for `lookup_ttl`: a change made through this server applies at once, one made
/// behind its back (another server, `safeguard keys revoke`) once the entry expires. Replies say where the time
/// went in `Server-Timing`.
#[tokio::test]
async fn lookups_are_remembered_briefly_and_changes_here_apply_at_once() {
    const TTL: Duration = Duration::from_secs(3);
    let h = Harness::start(|c| c.lookup_ttl = TTL).await;
    let writer = h.key(&["policies:write", "classify"]).await;
    let v1 = "---\nname: promo\noutput: binary\n---\n# Promo\n\nReturn 1 if the content is promotion, else 0.\n";
    let (_, first) = h.call("POST", "/v1/policies", Some(&writer), Some(json!({"text": v1}))).await;
    let v2 = v1.replace("promotion", "advertising");
    let (_, second) = h.call("POST", "/v1/policies", Some(&writer), Some(json!({"text": v2}))).await;
    let classify = json!({"text": "hello", "policies": ["promo"], "effort": "low"});
    let decided_hash = |reply: &Value| reply["policies"][0]["hash"].clone();

    let response =
        h.http.post(format!("{}/v1/classify", h.base)).bearer_auth(&writer).json(&classify).send().await.unwrap();
    let timing = response.headers()["server-timing"].to_str().unwrap().to_string();
    let stages: Vec<String> =
        safeguard_server::parse_server_timing(&timing).into_iter().map(|(stage, _)| stage).collect();
    assert_eq!(stages, ["policy", "reason", "store", "total"], "{timing}");
    let reply: Value = response.json().await.unwrap();
    assert_eq!(decided_hash(&reply), first["hash"]);

    // Through this server: the very next request sees the new pin.
    let (status, _) =
        h.call("POST", "/v1/policies/promo/activate", Some(&writer), Some(json!({"hash": second["hash"]}))).await;
    assert_eq!(status, 200);
    let (_, reply) = h.call("POST", "/v1/classify", Some(&writer), Some(classify.clone())).await;
    assert_eq!(decided_hash(&reply), second["hash"]);

    // Behind its back: the pin and the key change in the database; the server notices within the TTL.
    h.store.activate_policy("promo", first["hash"].as_str().unwrap()).await.unwrap();
    let key_id = h.store.list_api_keys().await.unwrap().into_iter().find(|k| k.name == "test").unwrap().id;
    assert!(h.store.revoke_api_key(&key_id).await.unwrap());
    let (status, reply) = h.call("POST", "/v1/classify", Some(&writer), Some(classify.clone())).await;
    assert_eq!((status, decided_hash(&reply)), (200, second["hash"].clone()), "still remembered: {reply}");
    tokio::time::sleep(TTL + Duration::from_millis(200)).await;
    let (status, _) = h.call("POST", "/v1/classify", Some(&writer), Some(classify.clone())).await;
    assert_eq!(status, 401, "a revoked key stops working once its entry expires");
    let (status, reply) = h.call("POST", "/v1/classify", Some(ADMIN), Some(classify)).await;
    assert_eq!((status, decided_hash(&reply)), (200, first["hash"].clone()), "{reply}");
}

/// Polls a job through the API until `done` says it has settled.
async fn poll_job(h: &Harness, key: &str, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let mut polled = Value::Null;
    for _ in 0..400 {
        polled = h.call("GET", &format!("/v1/jobs/{id}"), Some(key), None).await.1;
        if done(&polled) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    polled
}

/// Moves a table out of the way (or back), so that every query on it fails as a broken store's would.
async fn rename_table(store: &Store, from: &str, to: &str) {
    sqlx::query(sqlx::AssertSqlSafe(format!("ALTER TABLE {from} RENAME TO {to}"))).execute(store.pool()).await.unwrap();
}

/// A job the store cannot serve for a moment waits in the queue; it is not failed for good.
#[tokio::test]
async fn a_job_waits_out_a_store_error_instead_of_failing() {
    let h = Harness::start(|_| {}).await;
    let key = h.key(&["classify"]).await;
    // Stored behind the server's back, so that no cached copy spares the worker the store.
    let text =
        "---\nname: promo-direct\noutput: binary\n---\n# Promo\n\nReturn 1 if the content is promotion, else 0.\n";
    let policy = safeguard_policy::Policy::parse(text).unwrap();
    let hash = policy.hash.to_string();
    let meta = json!({"meta": policy.meta, "source": text, "fallback_name": null});
    h.store.put_policy(&hash, "promo-direct", &policy.body, &meta, true).await.unwrap();
    let request = json!({"content": {"kind": "text", "text": "hello"}, "policy_hashes": [hash],
                         "settings": {"effort": "low", "mode": "separate", "max_tokens": null}});

    rename_table(&h.store, "policies", "policies_away").await;
    let new = safeguard_store::NewJob { request, idempotency_key: None, webhook_url: None, submitted_by: None };
    let (job, _) = h.store.enqueue_job(&new).await.unwrap();
    // Handed back at least once: pending again, but touched since it was queued.
    let mut seen = None;
    for _ in 0..200 {
        let stored = h.store.get_job(&job.id).await.unwrap().unwrap();
        let handed_back = stored.status == safeguard_store::JobStatus::Pending && stored.updated_at > job.updated_at;
        if handed_back || stored.status == safeguard_store::JobStatus::Failed {
            seen = Some(stored);
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seen = seen.expect("the job was claimed and handed back");
    assert_ne!(seen.status, safeguard_store::JobStatus::Failed, "a store error failed the job for good: {seen:?}");
    assert_eq!(seen.attempts, 0, "a job handed back untried spent an attempt: {seen:?}");
    // However long the store is away, the job is not given up on.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let waited = h.store.get_job(&job.id).await.unwrap().unwrap();
    assert_ne!(waited.status, safeguard_store::JobStatus::Failed, "{waited:?}");
    rename_table(&h.store, "policies_away", "policies").await;

    let done = poll_job(&h, &key, &job.id, |j| j["status"] != "pending" && j["status"] != "running").await;
    assert_eq!((done["status"].as_str(), done["outcome"].as_str()), (Some("done"), Some("allow")), "{done}");
    assert_eq!(h.store.decisions_for_job(&job.id).await.unwrap(), 1);
}

/// A job that can never be decided (a version that no longer parses, a request this server cannot read) is
/// failed, and still reaches a person and its caller: a `needs_review` decision, a review and a webhook.
#[tokio::test]
async fn a_failed_job_reaches_the_review_queue_and_its_webhook() {
    let h = Harness::start(|_| {}).await;
    let key = h.key(&["classify"]).await;
    let reviewer = h.key(&["review"]).await;
    let broken = format!("sha256:{}", "b".repeat(64));
    let meta = json!({"source": "---\nname: [unclosed\n---\nReturn 1 or 0.\n", "fallback_name": null});
    h.store.put_policy(&broken, "broken", "Return 1 or 0.", &meta, true).await.unwrap();
    let hook = "http://127.0.0.1:9/hook".to_string();
    let requests = [
        json!({"content": {"kind": "text", "text": "hello"}, "policy_hashes": [broken],
               "settings": {"effort": "low", "mode": "separate", "max_tokens": null}}),
        json!({"content": {"kind": "text", "text": "hello"}, "policy_hashes": "not a list"}),
    ];
    let mut ids = Vec::new();
    for request in requests {
        let new = safeguard_store::NewJob {
            request,
            idempotency_key: None,
            webhook_url: Some(hook.clone()),
            submitted_by: None,
        };
        ids.push(h.store.enqueue_job(&new).await.unwrap().0.id);
    }
    let mut decision_ids = Vec::new();
    for id in &ids {
        let failed = poll_job(&h, &key, id, |j| j["status"] == "failed").await;
        assert_eq!((failed["status"].as_str(), failed["outcome"].as_str()), (Some("failed"), Some("needs_review")));
        let decision_id = failed["decision_id"].as_str().unwrap_or_else(|| panic!("no decision: {failed}"));
        assert_eq!(failed["decision"]["outcome"], "needs_review", "{failed}");
        assert!(failed["decision"]["failure_reason"].as_str().is_some(), "{failed}");
        let deliveries = h.store.deliveries_for_job(id).await.unwrap();
        assert_eq!(deliveries.len(), 1, "the caller hears of it");
        let body: Value = serde_json::from_str(&deliveries[0].body).unwrap();
        assert_eq!((body["outcome"].as_str(), body["decision_id"].as_str()), (Some("needs_review"), Some(decision_id)));
        decision_ids.push(decision_id.to_string());
    }
    let (_, queue) = h.call("GET", "/v1/reviews?limit=100", Some(&reviewer), None).await;
    let queued: Vec<&str> =
        queue["reviews"].as_array().unwrap().iter().map(|r| r["decision_id"].as_str().unwrap()).collect();
    for decision_id in &decision_ids {
        assert!(queued.contains(&decision_id.as_str()), "{decision_id} is not queued: {queue}");
    }
    let first = queue["reviews"].as_array().unwrap().iter().find(|r| r["decision_id"] == decision_ids[0].as_str());
    assert!(first.unwrap()["reason"].as_str().unwrap().starts_with("job failed:"), "{queue}");
}

/// Webhooks reach internal addresses only when let in: a job naming one is refused at the door, and a delivery
/// already queued for one (accepted under a looser configuration) is refused, not sent.
#[tokio::test]
async fn webhooks_reach_internal_addresses_only_when_let_in() {
    let hits = Arc::new(AtomicUsize::new(0));
    let receiver = {
        let hits = hits.clone();
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move || {
                hits.fetch_add(1, Ordering::SeqCst);
                async { axum::http::StatusCode::OK }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, receiver).await.unwrap() });

    let h = Harness::start(|c| c.webhook_targets = safeguard_server::WebhookTargets::default()).await;
    let key = h.key(&["classify"]).await;
    for hook in [
        format!("http://127.0.0.1:{port}/hook"),
        format!("http://localhost:{port}/hook"),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        "http://[::ffff:a9fe:a9fe]/".to_string(),
    ] {
        let body = json!({"text": "BUY NOW", "policies": ["spam"], "webhook_url": hook});
        let (status, reply) = h.call("POST", "/v1/jobs", Some(&key), Some(body)).await;
        assert_eq!((status, reply["error"]["code"].as_str()), (400, Some("invalid_webhook_url")), "{hook}: {reply}");
        assert!(reply["error"]["message"].as_str().unwrap().contains("--webhook-allow-host"), "{reply}");
    }
    assert_eq!(h.store.queue_depth().await.unwrap().pending, 0, "nothing refused was queued");

    // A job accepted before the server was restarted without its host let in: its webhook is queued when it is
    // decided, and refused then.
    let spam = h.call("GET", "/v1/policies/spam", Some(&key), None).await.1;
    let request = json!({"content": {"kind": "text", "text": "BUY NOW"}, "policy_hashes": [spam["hash"]],
                         "settings": {"effort": "low", "mode": "separate", "max_tokens": null}});
    let hook = Some(format!("http://127.0.0.1:{port}/hook"));
    let new = safeguard_store::NewJob { request, idempotency_key: None, webhook_url: hook, submitted_by: None };
    let (job, _) = h.store.enqueue_job(&new).await.unwrap();
    let id = job.id.as_str();
    let done = poll_job(&h, &key, id, |j| j["status"] == "done" || j["status"] == "failed").await;
    assert_eq!(done["status"], "done", "{done}");
    let mut delivery = None;
    for _ in 0..200 {
        let stored = h.store.deliveries_for_job(id).await.unwrap();
        if stored.iter().any(|d| d.status != "pending") {
            delivery = stored.into_iter().next();
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let delivery = delivery.expect("the delivery was attempted");
    assert_eq!(delivery.status, "failed", "{delivery:?}");
    assert!(delivery.last_error.as_deref().unwrap_or_default().contains("target refused"), "{delivery:?}");
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the internal receiver was reached");
}

/// An item the model left undecided is stored with its review in one transaction: when the review cannot be
/// written, the decision is not stored either, so the log never holds an item meant for a person that no person
/// was asked about. The caller gets a 503 and may retry; a batch is stored all or none, so the retry stores
/// nothing twice.
#[tokio::test]
async fn decisions_are_stored_with_their_reviews_or_not_at_all() {
    let h = Harness::start(|_| {}).await;
    let key = h.key(&["classify"]).await;
    let decisions = || async {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM decisions").fetch_one(h.store.pool()).await.unwrap();
        sqlx::Row::get::<i64, _>(&row, "n")
    };
    let before = decisions().await;
    rename_table(&h.store, "reviews", "reviews_away").await;
    let undecided = json!({"text": "FAIL now", "policies": ["spam"], "effort": "low"});
    let (status, reply) = h.call("POST", "/v1/classify", Some(&key), Some(undecided.clone())).await;
    assert_eq!(status, 503, "{reply}");
    // A batch is stored all or none: the settled item is not kept for a retry to store twice.
    let batch = json!({"items": [{"text": "hello"}, {"text": "FAIL batch"}], "policies": ["spam"], "effort": "low"});
    let (status, reply) = h.call("POST", "/v1/classify/batch", Some(&key), Some(batch)).await;
    assert_eq!(status, 503, "{reply}");
    assert_eq!(decisions().await, before, "a decision meant for a person was stored without its review");
    // /metrics still answers, and says its review figures are stale.
    let (status, metrics) = h.call("GET", "/metrics", None, None).await;
    let metrics = metrics.as_str().unwrap_or_default().to_string();
    assert_eq!(status, 200, "{metrics}");
    let errors = metrics.lines().find_map(|line| line.strip_prefix("safeguard_metrics_store_errors_total "));
    assert!(errors.and_then(|n| n.parse::<f64>().ok()).is_some_and(|n| n >= 1.0), "{metrics}");
    rename_table(&h.store, "reviews_away", "reviews").await;

    let (status, reply) = h.call("POST", "/v1/classify", Some(&key), Some(undecided)).await;
    assert_eq!((status, reply["outcome"].as_str()), (200, Some("needs_review")), "{reply}");
    let queued = h.store.list_reviews("pending", 10).await.unwrap();
    assert_eq!(queued.len(), 1, "{queued:?}");
    assert_eq!(Some(queued[0].decision_id.as_str()), reply["decision_id"].as_str());
}

/// `reason_timeout` holds per group of items the backend decodes at once (one at a time here), not for the whole
/// batch: a batch that takes longer in all than one item may is still decided. The item that hangs times out,
/// and what comes after it is not tried.
#[tokio::test]
async fn each_group_of_a_batch_gets_its_own_reason_timeout() {
    let h = Harness::start(|c| c.reason_timeout = Duration::from_secs(1)).await;
    let key = h.key(&["classify"]).await;
    let items =
        json!([{"text": "WAIT a"}, {"text": "WAIT b"}, {"text": "WAIT BUY NOW"}, {"text": "SLOW"}, {"text": "x"}]);
    let batch = json!({"items": items, "policies": ["spam"], "effort": "low"});
    let started = std::time::Instant::now();
    let (status, reply) = h.call("POST", "/v1/classify/batch", Some(&key), Some(batch)).await;
    assert_eq!(status, 200, "{reply}");
    let outcomes: Vec<&str> =
        reply["results"].as_array().unwrap().iter().map(|r| r["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes, ["allow", "allow", "violation", "needs_review", "needs_review"], "{reply}");
    assert!(reply["results"][3]["failure_reason"].as_str().unwrap_or_default().contains("timed out"), "{reply}");
    // After a timeout the rest is not tried: a backend too slow for one deadline would miss the next ones too.
    assert!(reply["results"][4]["failure_reason"].as_str().unwrap_or_default().contains("not tried"), "{reply}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}

/// A job whose workers never come back from it (each crashed, or ran out of memory) is not handed to the next
/// worker forever: after `job_max_attempts` claims it is failed to a person, without asking the model again.
/// A job with a claim to spare is decided as usual.
#[tokio::test]
async fn a_job_that_keeps_killing_its_workers_goes_to_a_person() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("db.sqlite")).await.unwrap();
    let text =
        "---\nname: promo-crash\noutput: binary\n---\n# Promo\n\nReturn 1 if the content is promotion, else 0.\n";
    let policy = safeguard_policy::Policy::parse(text).unwrap();
    let hash = policy.hash.to_string();
    let meta = json!({"meta": policy.meta, "source": text, "fallback_name": null});
    store.put_policy(&hash, "promo-crash", &policy.body, &meta, true).await.unwrap();
    let request = json!({"content": {"kind": "text", "text": "hello"}, "policy_hashes": [hash],
                         "settings": {"effort": "low", "mode": "separate", "max_tokens": null}});
    // A worker that died mid-job: it claimed the job, and its lease ran out (or, for the last claim of the job
    // queued first, runs out soon, so that the other job can be claimed meanwhile).
    let mut jobs = Vec::new();
    for leases in [&[-1, 500][..], &[-1, -1, -1]] {
        let new = safeguard_store::NewJob {
            request: request.clone(),
            idempotency_key: None,
            webhook_url: None,
            submitted_by: None,
        };
        let (job, _) = store.enqueue_job(&new).await.unwrap();
        for lease in leases {
            assert_eq!(store.claim_job(*lease).await.unwrap().unwrap().id, job.id);
        }
        jobs.push(job.id);
    }
    // The job with three crashes first.
    jobs.reverse();
    let h = Harness::start_on(store, dir, |c| c.job_max_attempts = 3).await;
    let key = h.key(&["classify"]).await;

    let given_up = poll_job(&h, &key, &jobs[0], |j| j["status"] == "failed" || j["status"] == "done").await;
    assert_eq!((given_up["status"].as_str(), given_up["outcome"].as_str()), (Some("failed"), Some("needs_review")));
    assert!(given_up["error"].as_str().unwrap().contains("gave up after 3 attempts"), "{given_up}");
    let reviews = h.store.list_reviews("pending", 10).await.unwrap();
    assert!(reviews.iter().any(|r| Some(r.decision_id.as_str()) == given_up["decision_id"].as_str()), "{reviews:?}");

    let decided = poll_job(&h, &key, &jobs[1], |j| j["status"] == "failed" || j["status"] == "done").await;
    assert_eq!((decided["status"].as_str(), decided["attempts"].as_i64()), (Some("done"), Some(3)), "{decided}");
    assert_eq!(h.reasoner.calls.load(Ordering::SeqCst), 1, "only the job with a claim to spare reached the model");
}

/// A job whose policy row is corrupt (hand-edited, half restored) can never be decided as accepted: it goes to a
/// person with the reason, instead of waiting in the queue for the store to "recover" forever. The server starts
/// all the same: one row it cannot read used to stop it at the start.
#[tokio::test]
async fn a_job_whose_stored_policy_is_corrupt_goes_to_a_person() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("db.sqlite")).await.unwrap();
    let text = "---\nname: promo-torn\noutput: binary\n---\n# Promo\n\nReturn 1 if the content is promotion, else 0.\n";
    let policy = safeguard_policy::Policy::parse(text).unwrap();
    let hash = policy.hash.to_string();
    let meta = json!({"meta": policy.meta, "source": text, "fallback_name": null});
    store.put_policy(&hash, "promo-torn", &policy.body, &meta, true).await.unwrap();
    sqlx::query("UPDATE policies SET meta = '{\"meta\": {\"na' WHERE hash = $1")
        .bind(&hash)
        .execute(store.pool())
        .await
        .unwrap();
    let request = json!({"content": {"kind": "text", "text": "hello"}, "policy_hashes": [hash],
                         "settings": {"effort": "low", "mode": "separate", "max_tokens": null}});
    let new = safeguard_store::NewJob { request, idempotency_key: None, webhook_url: None, submitted_by: None };
    let (job, _) = store.enqueue_job(&new).await.unwrap();
    let h = Harness::start_on(store, dir, |_| {}).await;
    let key = h.key(&["classify"]).await;

    let failed = poll_job(&h, &key, &job.id, |j| j["status"] == "failed" || j["status"] == "done").await;
    assert_eq!((failed["status"].as_str(), failed["outcome"].as_str()), (Some("failed"), Some("needs_review")));
    assert!(failed["error"].as_str().unwrap().contains("corrupt"), "{failed}");
    assert_eq!(failed["attempts"], 1, "failed at its first claim, not handed back: {failed}");
    assert_eq!(h.reasoner.calls.load(Ordering::SeqCst), 0);
}

/// A job's lease outlives a passing store error: the worker keeps renewing it, so no second worker decides
/// the job again while the first is still on it.
#[tokio::test]
async fn a_job_lease_is_renewed_after_a_store_error() {
    const LEASE: Duration = Duration::from_millis(600);
    let h = Harness::start(|c| {
        c.job_lease = LEASE;
        c.reason_timeout = Duration::from_secs(4);
    })
    .await;
    let key = h.key(&["classify"]).await;
    let (status, job) =
        h.call("POST", "/v1/jobs", Some(&key), Some(json!({"text": "SLOW", "policies": ["spam"]}))).await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    for _ in 0..200 {
        if h.reasoner.calls.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Wait for a renewal, so the store fails for exactly one renewal after it: the lease has time to spare.
    let leased = h.store.get_job(&id).await.unwrap().unwrap().locked_until;
    for _ in 0..200 {
        if h.store.get_job(&id).await.unwrap().unwrap().locked_until != leased {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    rename_table(&h.store, "jobs", "jobs_away").await;
    tokio::time::sleep(LEASE / 3 + Duration::from_millis(50)).await;
    rename_table(&h.store, "jobs_away", "jobs").await;

    let done = poll_job(&h, &key, &id, |j| j["status"] == "done").await;
    assert_eq!(done["status"], "done", "{done}");
    assert_eq!(done["attempts"], 1, "the lease lapsed and a second worker took the job: {done}");
    assert_eq!(h.reasoner.calls.load(Ordering::SeqCst), 1);
}

/// A store that refuses a job's decision but still takes the small update handing the job back (a full disk) does
/// not have the job decided at the model's cost forever: each try counts as an attempt, and after
/// `job_max_attempts` the job goes to a person once the store takes that.
#[tokio::test]
async fn a_job_whose_decision_the_store_refuses_is_not_decided_forever() {
    let h = Harness::start(|c| {
        c.job_max_attempts = 2;
        c.job_lease = Duration::from_millis(1500);
    })
    .await;
    let key = h.key(&["classify"]).await;
    let refuse = "CREATE TRIGGER refuse_job_decisions BEFORE INSERT ON decisions WHEN NEW.job_id IS NOT NULL \
                  BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END";
    sqlx::query(refuse).execute(h.store.pool()).await.unwrap();
    let (status, job) =
        h.call("POST", "/v1/jobs", Some(&key), Some(json!({"text": "hello", "policies": ["spam"]}))).await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    // Two tries decided and refused, then a claim that only tries to fail the job to a person, refused as well.
    let started = std::time::Instant::now();
    while h.store.get_job(&id).await.unwrap().unwrap().attempts < 4 {
        assert!(started.elapsed() < Duration::from_secs(20), "the job was not claimed again");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(h.reasoner.calls.load(Ordering::SeqCst), 2, "one model call per counted try, and no more");
    sqlx::query("DROP TRIGGER refuse_job_decisions").execute(h.store.pool()).await.unwrap();

    let failed = poll_job(&h, &key, &id, |j| j["status"] == "failed" || j["status"] == "done").await;
    assert_eq!((failed["status"].as_str(), failed["outcome"].as_str()), (Some("failed"), Some("needs_review")));
    assert!(failed["error"].as_str().unwrap().contains("a store that refused it"), "{failed}");
    assert_eq!(h.reasoner.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn moderations_refuse_a_configured_policy_that_is_not_stored() {
    let h = Harness::start(|c| c.moderation_policies = vec!["spam".into(), "no-such-policy".into()]).await;
    let key = h.key(&["classify"]).await;
    let (status, body) = h.call("POST", "/v1/moderations", Some(&key), Some(json!({"input": "BUY NOW"}))).await;
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("unavailable")), "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("\"no-such-policy\"") && !message.contains("\"spam\""), "{message}");
    assert_eq!(h.reasoner.calls.load(Ordering::SeqCst), 0, "nothing is judged against a subset");
}

/// A body tried inline first is stored unpinned; publishing it afterwards makes it its name's active version,
/// whether the body names itself or takes the name it is published with.
#[tokio::test]
async fn a_policy_tried_inline_can_be_published() {
    let h = Harness::start(|_| {}).await;
    let writer = h.key(&["policies:write", "classify"]).await;
    let named =
        "---\nname: tried-first\noutput: binary\n---\n# Tried\n\nReturn 1 if the content is promotion, else 0.\n";
    let nameless = "---\noutput: binary\n---\nReturn 1 if the content is a raffle, else 0.\n";
    for (text, publish, name) in [
        (named, json!({"text": named}), "tried-first"),
        (nameless, json!({"text": nameless, "name": "raffle"}), "raffle"),
    ] {
        let inline = json!({"text": "BUY NOW", "policies": [{"text": text}], "effort": "low"});
        let (status, tried) = h.call("POST", "/v1/classify", Some(&writer), Some(inline)).await;
        assert_eq!(status, 200, "{tried}");
        let (status, published) = h.call("POST", "/v1/policies", Some(&writer), Some(publish)).await;
        assert_eq!(status, 200, "{name}: {published}");
        assert_eq!((published["active"].as_bool(), published["name"].as_str()), (Some(true), Some(name)));
        assert_eq!(published["hash"], tried["verdicts"][0]["policy_hash"]);
        let by_name = json!({"text": "BUY NOW", "policies": [name], "effort": "low"});
        let (status, decided) = h.call("POST", "/v1/classify", Some(&writer), Some(by_name)).await;
        assert_eq!(status, 200, "{name}: {decided}");
        assert_eq!(decided["verdicts"][0]["policy"], name, "{decided}");
        assert_eq!(decided["verdicts"][0]["policy_hash"], published["hash"]);
    }
    // Other front matter than the tried body's is still a conflict, not a rename.
    let other = "---\noutput: binary\nhigh_risk: true\n---\nReturn 1 if the content is a lottery, else 0.\n";
    let inline = json!({"text": "x", "policies": [{"text": other.replace("high_risk: true\n", "")}], "effort": "low"});
    assert_eq!(h.call("POST", "/v1/classify", Some(&writer), Some(inline)).await.0, 200);
    let (status, refused) =
        h.call("POST", "/v1/policies", Some(&writer), Some(json!({"text": other, "name": "lottery"}))).await;
    assert_eq!(status, 409, "{refused}");
}

#[tokio::test]
async fn chat_instructions_count_against_the_content_limits() {
    let h = Harness::start(|c| c.limits.max_content_tokens = 50).await;
    let key = h.key(&["classify"]).await;
    let chat = |system: String| json!({"messages": [{"role": "system", "content": system}, {"role": "user", "content": "hi"}]});
    let (status, body) = h.call("POST", "/v1/chat/completions", Some(&key), Some(chat("word ".repeat(200)))).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("content_too_long")), "{body}");
    let developer = json!({"messages": [{"role": "developer", "content": [{"type": "text", "text": "word ".repeat(200)}]},
                                        {"role": "user", "content": "hi"}]});
    let (status, body) = h.call("POST", "/v1/chat/completions", Some(&key), Some(developer)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("content_too_long")), "{body}");
    assert_eq!(h.reasoner.calls.load(Ordering::SeqCst), 0);
    let (status, body) = h.call("POST", "/v1/chat/completions", Some(&key), Some(chat("Answer 0 or 1.".into()))).await;
    assert_eq!(status, 200, "{body}");
}

/// A NUL in text people write is refused before anything is stored or reasoned: PostgreSQL cannot store one, and
/// an appeal found out only after paying for its high-effort reasoning.
#[tokio::test]
async fn nul_characters_in_written_text_are_refused_up_front() {
    let h = Harness::start(|_| {}).await;
    let key = h.key(&["classify"]).await;
    let inline = json!({"text": "hi", "policies": [{"text": "# P\nReturn 0 or 1.\u{0}"}], "effort": "low"});
    let (status, body) = h.call("POST", "/v1/classify", Some(&key), Some(inline)).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("NUL"), "{body}");
    let request = json!({"text": "hello", "policies": ["spam"], "effort": "low"});
    let (status, decided) = h.call("POST", "/v1/classify", Some(&key), Some(request)).await;
    assert_eq!(status, 200, "{decided}");
    let id = decided["decision_id"].as_str().unwrap();
    let calls = h.reasoner.calls.load(Ordering::SeqCst);
    let appeal = json!({"reason": "wrong \u{0} call"});
    let (status, body) = h.call("POST", &format!("/v1/decisions/{id}/appeal"), Some(&key), Some(appeal)).await;
    assert_eq!((status, &body["error"]["code"]), (400, &json!("invalid_text")), "{body}");
    assert_eq!(h.reasoner.calls.load(Ordering::SeqCst), calls, "refused before reasoning");
    let job = json!({"text": "x", "policies": ["spam"], "webhook_url": "http://example.com/\u{0}"});
    let (status, body) = h.call("POST", "/v1/jobs", Some(&key), Some(job)).await;
    assert_eq!((status, &body["error"]["code"]), (400, &json!("invalid_text")), "{body}");
}

/// Sampling the engine or a backend would refuse is the client's 400 before anything is admitted or paid, not a
/// 503 after; a 64-bit seed is taken as OpenAI takes it.
#[tokio::test]
async fn chat_sampling_out_of_range_is_refused_before_the_model() {
    let h = Harness::start(|_| {}).await;
    let key = h.key(&["classify"]).await;
    let chat = |extra: Value| {
        let mut body =
            json!({"messages": [{"role": "system", "content": "Answer 0 or 1."}, {"role": "user", "content": "hi"}]});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    for bad in [
        json!({"seed": 1, "top_p": 0}),
        json!({"seed": 1, "top_p": 2}),
        json!({"seed": 1, "temperature": 1e39}),
        json!({"temperature": -1}),
        json!({"seed": 1.5}),
        json!({"seed": "one"}),
    ] {
        let (status, body) = h.call("POST", "/v1/chat/completions", Some(&key), Some(chat(bad.clone()))).await;
        assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_sampling")), "{bad}: {body}");
    }
    assert_eq!(h.reasoner.calls.load(Ordering::SeqCst), 0);
    for good in [json!({"seed": 1_u64 << 40, "temperature": 0.7, "top_p": 0.9}), json!({"seed": -5, "temperature": 0})]
    {
        let (status, body) = h.call("POST", "/v1/chat/completions", Some(&key), Some(chat(good.clone()))).await;
        assert_eq!(status, 200, "{good}: {body}");
    }
}

#[tokio::test]
async fn policy_reads_diffs_and_the_model_list_need_the_classify_scope() {
    let h = Harness::start(|_| {}).await;
    let reviewer = h.key(&["review"]).await;
    let classify = h.key(&["classify"]).await;
    for path in ["/v1/policies", "/v1/policies/spam", "/v1/policies/spam/diff/hate", "/v1/models"] {
        let (status, body) = h.call("GET", path, Some(&reviewer), None).await;
        assert_eq!((status, body["error"]["code"].as_str()), (403, Some("forbidden")), "{path}: {body}");
        let (status, body) = h.call("GET", path, Some(&classify), None).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
}

#[tokio::test]
async fn replay_needs_audit_and_answers_409_for_what_a_retry_cannot_fix() {
    let h = Harness::start(|_| {}).await;
    let key = h.key(&["classify"]).await;
    let reviewer = h.key(&["review"]).await;
    let auditor = h.key(&["audit"]).await;
    let (_, decided) =
        h.call("POST", "/v1/classify", Some(&key), Some(json!({"text": "BUY NOW", "policies": ["spam"]}))).await;
    let id = decided["decision_id"].as_str().unwrap();
    let calls = h.reasoner.calls.load(Ordering::SeqCst);
    let (status, body) = h.call("POST", &format!("/v1/decisions/{id}/replay"), Some(&reviewer), None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("forbidden")), "{body}");
    let (status, body) = h.call("GET", &format!("/v1/decisions/{id}"), Some(&key), None).await;
    assert_eq!(status, 403, "the audit trail is for review and audit: {body}");

    let mut unreadable = h.store.get_decision(id).await.unwrap().unwrap();
    unreadable.id = "00000000-0000-4000-8000-000000000002".into();
    unreadable.content = Value::Null;
    h.store.insert_decision(&unreadable, None).await.unwrap();
    let mut orphan = h.store.get_decision(id).await.unwrap().unwrap();
    orphan.id = "00000000-0000-4000-8000-000000000003".into();
    orphan.policy_hashes = vec![format!("sha256:{}", "0".repeat(64))];
    h.store.insert_decision(&orphan, None).await.unwrap();
    for decision in [&unreadable, &orphan] {
        let (status, body) =
            h.call("POST", &format!("/v1/decisions/{}/replay", decision.id), Some(&auditor), None).await;
        assert_eq!((status, body["error"]["code"].as_str()), (409, Some("conflict")), "{body}");
    }
    assert_eq!(h.reasoner.calls.load(Ordering::SeqCst), calls, "nothing was re-run");
}

/// A redirect is not followed: the signed POST would become a GET elsewhere, whose 2xx would count as delivered.
#[tokio::test]
async fn webhook_redirects_are_failed_attempts() {
    let hook_hits = Arc::new(AtomicUsize::new(0));
    let landed_hits = Arc::new(AtomicUsize::new(0));
    let receiver = {
        let (hook_hits, landed_hits) = (hook_hits.clone(), landed_hits.clone());
        axum::Router::new()
            .route(
                "/hook",
                axum::routing::post(move || {
                    hook_hits.fetch_add(1, Ordering::SeqCst);
                    async { (axum::http::StatusCode::FOUND, [(axum::http::header::LOCATION, "/landed")]) }
                }),
            )
            .route(
                "/landed",
                axum::routing::any(move || {
                    landed_hits.fetch_add(1, Ordering::SeqCst);
                    async { axum::http::StatusCode::OK }
                }),
            )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, receiver).await.unwrap() });

    let h = Harness::start(|c| c.webhook_max_attempts = 2).await;
    let key = h.key(&["classify"]).await;
    let body = json!({"text": "BUY NOW", "policies": ["spam"], "webhook_url": hook_url});
    let (status, job) = h.call("POST", "/v1/jobs", Some(&key), Some(body)).await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().unwrap();
    let mut delivery = None;
    for _ in 0..200 {
        let deliveries = h.store.deliveries_for_job(id).await.unwrap();
        if let Some(d) = deliveries.into_iter().find(|d| d.status != "pending") {
            delivery = Some(d);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let delivery = delivery.expect("the delivery settled");
    assert_eq!((delivery.status.as_str(), delivery.attempts, delivery.last_status), ("failed", 2, Some(302)));
    assert!(delivery.last_error.as_deref().unwrap_or("").contains("302"), "{delivery:?}");
    assert_eq!((hook_hits.load(Ordering::SeqCst), landed_hits.load(Ordering::SeqCst)), (2, 0));
}

/// A receiver that hangs holds up only its own delivery: another job's webhook arrives meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_webhook_receiver_does_not_hold_up_the_others() {
    let slow_hits = Arc::new(AtomicUsize::new(0));
    let fast_hits = Arc::new(AtomicUsize::new(0));
    let receiver = {
        let (slow_hits, fast_hits) = (slow_hits.clone(), fast_hits.clone());
        axum::Router::new()
            .route(
                "/slow",
                axum::routing::post(move || {
                    slow_hits.fetch_add(1, Ordering::SeqCst);
                    async {
                        tokio::time::sleep(Duration::from_secs(8)).await;
                        axum::http::StatusCode::OK
                    }
                }),
            )
            .route(
                "/fast",
                axum::routing::post(move || {
                    fast_hits.fetch_add(1, Ordering::SeqCst);
                    async { axum::http::StatusCode::OK }
                }),
            )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, receiver).await.unwrap() });

    let h = Harness::start(|_| {}).await;
    let key = h.key(&["classify"]).await;
    let submit = |hook: String| {
        let body = json!({"text": "BUY NOW", "policies": ["spam"], "webhook_url": hook});
        h.call("POST", "/v1/jobs", Some(&key), Some(body))
    };
    let (status, job) = submit(format!("{base}/slow")).await;
    assert_eq!(status, 202, "{job}");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while slow_hits.load(Ordering::SeqCst) == 0 {
        assert!(std::time::Instant::now() < deadline, "the slow receiver was never called");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, job) = submit(format!("{base}/fast")).await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let deliveries = h.store.deliveries_for_job(id).await.unwrap();
        if deliveries.iter().any(|d| d.status == "delivered") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the fast webhook waited behind the slow one: {deliveries:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(fast_hits.load(Ordering::SeqCst), 1);
}

/// A body sent inline with its own front matter is stored unpinned under its name. Publishing the same body with
/// other front matter is refused, and the refusal must leave the name as it was: not active, with the inline
/// caller's settings.
#[tokio::test]
async fn a_refused_publish_does_not_pin_the_name_to_an_inline_copy() {
    let h = Harness::start(|_| {}).await;
    let classifier = h.key(&["classify"]).await;
    let writer = h.key(&["policies:write", "classify"]).await;
    let body = "# Foo\n\nReturn 1 if the content is promotion, else 0.\n";
    let inline = format!("---\nname: foo\noutput: binary\n---\n{body}");
    let request = json!({"text": "hello", "policies": [{"text": inline}], "effort": "low"});
    let (status, tried) = h.call("POST", "/v1/classify", Some(&classifier), Some(request)).await;
    assert_eq!(status, 200, "{tried}");

    let stricter = format!("---\nname: foo\noutput: binary\nhigh_risk: true\n---\n{body}");
    let (status, refused) = h.call("POST", "/v1/policies", Some(&writer), Some(json!({"text": stricter}))).await;
    assert_eq!((status, refused["error"]["code"].as_str()), (409, Some("conflict")), "{refused}");
    assert!(h.store.active_policy("foo").await.unwrap().is_none(), "the refused publish pinned the name");
    let (status, by_name) = h.call("GET", "/v1/policies/foo", Some(&writer), None).await;
    assert_eq!(status, 404, "{by_name}");
    let (status, refused) =
        h.call("POST", "/v1/classify", Some(&classifier), Some(json!({"text": "hello", "policies": ["foo"]}))).await;
    assert_eq!((status, refused["error"]["code"].as_str()), (400, Some("unknown_policy")), "{refused}");

    // Published with the inline copy's own settings, the name is the publisher's to take.
    let (status, published) = h.call("POST", "/v1/policies", Some(&writer), Some(json!({"text": inline}))).await;
    assert_eq!((status, published["active"].as_bool()), (200, Some(true)), "{published}");
    assert_eq!(published["hash"], tried["verdicts"][0]["policy_hash"]);
}

/// A starter body stored before the library is seeded, with other front matter than the starter's, does not
/// get the starter's name: that would serve `spam` with settings its file does not have.
#[tokio::test]
async fn the_starter_library_does_not_pin_a_body_stored_with_other_front_matter() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("db.sqlite")).await.unwrap();
    let starter = safeguard_policy::STARTER_POLICIES.iter().find(|s| s.file_name == "spam.md").unwrap();
    let other = starter.source.replacen("high_risk: false", "high_risk: true", 1);
    assert_ne!(other, starter.source);
    let policy = safeguard_policy::Policy::parse_with_fallback_name(&other, Some("spam")).unwrap();
    let meta = json!({"meta": policy.meta, "source": other, "fallback_name": "inline"});
    store.put_policy(&policy.hash.to_string(), "spam", &policy.body, &meta, false).await.unwrap();

    let h = Harness::start_on(store, dir, |_| {}).await;
    assert!(h.store.active_policy("spam").await.unwrap().is_none(), "spam was pinned to other front matter");
    assert!(h.store.active_policy("hate").await.unwrap().is_some(), "the other starters are seeded");
}

/// Items judged under policies that define no rule ids (or that cannot be loaded any more, or none at all) are
/// decided citing the reserved rule "none"; an item whose policy defines rules still needs one of them.
#[tokio::test]
async fn items_whose_policies_define_no_rules_can_be_decided_citing_none() {
    let h = Harness::start(|_| {}).await;
    let key = h.key(&["classify"]).await;
    let reviewer = h.key(&["review"]).await;
    let review_of = |decision_id: String| {
        let h = &h;
        let reviewer = reviewer.clone();
        async move {
            let (_, queue) = h.call("GET", "/v1/reviews?limit=100", Some(&reviewer), None).await;
            let found = queue["reviews"].as_array().unwrap().iter().find(|r| r["decision_id"] == decision_id.as_str());
            found.unwrap_or_else(|| panic!("{decision_id} is not queued: {queue}"))["id"].as_str().unwrap().to_string()
        }
    };
    let decide = |review: String, rule: &'static str| {
        let h = &h;
        let reviewer = reviewer.clone();
        async move {
            let body = json!({"outcome": "allow", "rationale": "Nothing wrong here.", "rule_id": rule});
            h.call("POST", &format!("/v1/reviews/{review}/decide"), Some(&reviewer), Some(body)).await
        }
    };

    // A policy with rule ids: "none" is not one of them.
    let request = json!({"text": "FAIL spam", "policies": ["spam"], "effort": "low"});
    let (_, with_rules) = h.call("POST", "/v1/classify", Some(&key), Some(request)).await;
    let review = review_of(with_rules["decision_id"].as_str().unwrap().to_string()).await;
    let (_, item) = h.call("GET", &format!("/v1/reviews/{review}"), Some(&reviewer), None).await;
    assert_eq!(item["no_rule_id"], Value::Null, "{item}");
    let (status, refused) = decide(review, "none").await;
    assert_eq!((status, refused["error"]["code"].as_str()), (400, Some("unknown_rule")), "{refused}");

    // An inline policy without rule ids, whose backend failed.
    let plain = "---\nname: plain\noutput: binary\n---\n# Plain\n\nReturn 1 if the content is promotion, else 0.\n";
    let request = json!({"text": "FAIL plain", "policies": [{"text": plain}], "effort": "low"});
    let (status, failed) = h.call("POST", "/v1/classify", Some(&key), Some(request)).await;
    assert_eq!((status, failed["outcome"].as_str()), (200, Some("needs_review")), "{failed}");
    let review = review_of(failed["decision_id"].as_str().unwrap().to_string()).await;
    let (_, item) = h.call("GET", &format!("/v1/reviews/{review}"), Some(&reviewer), None).await;
    assert_eq!(item["no_rule_id"], "none", "the page is told it may offer \"none\": {item}");
    let (status, refused) = decide(review.clone(), "SP2.b").await;
    assert_eq!((status, refused["error"]["code"].as_str()), (400, Some("unknown_rule")), "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains("\"none\""), "{refused}");
    let (status, decided) = decide(review, "none").await;
    assert_eq!(status, 200, "{decided}");
    assert_eq!((decided["rule_id"].as_str(), decided["status"].as_str()), (Some("none"), Some("decided")));
    assert_eq!(decided["policy_hash"], failed["verdicts"][0]["policy_hash"], "{decided}");

    // Failed jobs: one under a version that no longer parses, one whose request named no readable versions.
    let broken = format!("sha256:{}", "c".repeat(64));
    let meta = json!({"source": "---\nname: [unclosed\n---\nReturn 1 or 0.\n", "fallback_name": null});
    h.store.put_policy(&broken, "broken", "Return 1 or 0.", &meta, true).await.unwrap();
    for request in [
        json!({"content": {"kind": "text", "text": "hello"}, "policy_hashes": [broken],
               "settings": {"effort": "low", "mode": "separate", "max_tokens": null}}),
        json!({"content": {"kind": "text", "text": "hello"}, "policy_hashes": "not a list"}),
    ] {
        let new = safeguard_store::NewJob { request, idempotency_key: None, webhook_url: None, submitted_by: None };
        let id = h.store.enqueue_job(&new).await.unwrap().0.id;
        let failed = poll_job(&h, &key, &id, |j| j["status"] == "failed").await;
        let review = review_of(failed["decision_id"].as_str().unwrap().to_string()).await;
        let (status, decided) = decide(review, "none").await;
        assert_eq!((status, decided["rule_id"].as_str()), (200, Some("none")), "{decided}");
    }
}

/// Appealing a decision twice (a retry after a proxy's timeout) answers with the one appeal: one appeal
/// decision, one appeal review, the model asked once.
#[tokio::test]
async fn an_appeal_is_made_once_per_decision() {
    let h = Harness::start(|_| {}).await;
    let key = h.key(&["classify"]).await;
    let auditor = h.key(&["audit", "review"]).await;
    let (_, original) =
        h.call("POST", "/v1/classify", Some(&key), Some(json!({"text": "hello", "policies": ["spam"]}))).await;
    let id = original["decision_id"].as_str().unwrap();
    let path = format!("/v1/decisions/{id}/appeal");
    let (status, first) = h.call("POST", &path, Some(&key), Some(json!({"reason": "I was wronged"}))).await;
    assert_eq!(status, 200, "{first}");
    let calls = h.reasoner.calls.load(Ordering::SeqCst);
    let (status, again) = h.call("POST", &path, Some(&key), Some(json!({"reason": "I was wronged"}))).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["decision"]["decision_id"], first["decision"]["decision_id"], "{again}");
    assert_eq!(again["review_id"], first["review_id"], "{again}");
    assert_eq!((again["appeal_of"].as_str(), again["repeated"].as_bool()), (Some(id), Some(true)), "{again}");
    assert_eq!(again["decision"]["effort"], "high", "{again}");
    assert_eq!(h.reasoner.calls.load(Ordering::SeqCst), calls, "the retry asked the model again");
    // The appeal's own decision is the item's too: appealing it is appealing the item again, not a second appeal
    // that would take the first from its reviewer.
    let appeal_id = first["decision"]["decision_id"].as_str().unwrap();
    let (status, chained) = h
        .call("POST", &format!("/v1/decisions/{appeal_id}/appeal"), Some(&key), Some(json!({"reason": "again"})))
        .await;
    assert_eq!(status, 200, "{chained}");
    assert_eq!((chained["appeal_of"].as_str(), chained["repeated"].as_bool()), (Some(id), Some(true)), "{chained}");
    assert_eq!(chained["review_id"], first["review_id"], "{chained}");
    assert_eq!(h.reasoner.calls.load(Ordering::SeqCst), calls, "appealing the appeal asked the model again");

    let (_, decisions) = h.call("GET", "/v1/decisions?limit=100", Some(&auditor), None).await;
    let appeals: Vec<&Value> =
        decisions["decisions"].as_array().unwrap().iter().filter(|d| d["source"] == "appeal").collect();
    assert_eq!(appeals.len(), 1, "{decisions}");
    assert_eq!(appeals[0]["replay_of"], id, "the appeal names what it appeals");
    let (_, queue) = h.call("GET", "/v1/reviews?limit=100", Some(&auditor), None).await;
    let appeal_reviews = queue["reviews"].as_array().unwrap().iter().filter(|r| r["kind"] == "appeal").count();
    assert_eq!(appeal_reviews, 1, "{queue}");

    // Decided, the appeal is still the answer to another try.
    let review = first["review_id"].as_str().unwrap();
    let decide = json!({"outcome": "allow", "rationale": "A greeting.", "rule_id": "SP0.a"});
    let (status, decided) = h.call("POST", &format!("/v1/reviews/{review}/decide"), Some(&auditor), Some(decide)).await;
    assert_eq!(status, 200, "{decided}");
    let (status, later) = h.call("POST", &path, Some(&key), None).await;
    assert_eq!((status, &later["review_id"]), (200, &first["review_id"]), "{later}");

    // Answered reviews page latest first; the pending queue has no pages.
    let (status, decided) = h.call("GET", "/v1/reviews?status=decided&limit=1", Some(&auditor), None).await;
    assert_eq!(status, 200, "{decided}");
    assert_eq!(decided["reviews"][0]["id"], first["review_id"], "{decided}");
    let next = &decided["next_page"];
    assert_eq!(next["before_id"], first["review_id"], "{decided}");
    let url = format!("/v1/reviews?status=decided&before={}&before_id={}", next["before"], review);
    let (status, rest) = h.call("GET", &url, Some(&auditor), None).await;
    assert_eq!((status, rest["reviews"].as_array().map(Vec::len)), (200, Some(0)), "{rest}");
    assert_eq!(rest["next_page"], Value::Null, "{rest}");
    let (status, refused) = h.call("GET", "/v1/reviews?before=1&before_id=x", Some(&auditor), None).await;
    assert_eq!((status, &refused["error"]["code"]), (400, &json!("invalid_query")), "{refused}");
}

/// A decision and a job belong to the client (key name) that submitted them. Another client's key may not appeal
/// the decision (it would read its verdicts and spend reasoning on it) nor read the job; both answer as missing.
/// A key rotated under the same name keeps them, a reviewer may act for anyone, and an Idempotency-Key is each
/// client's own numbering.
#[tokio::test]
async fn decisions_and_jobs_belong_to_the_key_that_submitted_them() {
    let h = Harness::start(|_| {}).await;
    let classify = ["classify".to_string()];
    let (_, owner) = h.store.create_api_key("shop", &classify).await.unwrap();
    let owner_id = "shop";
    let (_, other) = h.store.create_api_key("forum", &classify).await.unwrap();
    let reviewer = h.key(&["classify", "review"]).await;
    let auditor = h.key(&["audit"]).await;

    let (_, original) =
        h.call("POST", "/v1/classify", Some(&owner), Some(json!({"text": "hello", "policies": ["spam"]}))).await;
    let id = original["decision_id"].as_str().unwrap();
    let (_, stored) = h.call("GET", &format!("/v1/decisions/{id}"), Some(&auditor), None).await;
    assert_eq!(stored["submitted_by"], owner_id, "{stored}");

    let path = format!("/v1/decisions/{id}/appeal");
    let calls = h.reasoner.calls.load(Ordering::SeqCst);
    let (status, refused) = h.call("POST", &path, Some(&other), None).await;
    assert_eq!(status, 404, "another client's key appealed: {refused}");
    assert_eq!(h.reasoner.calls.load(Ordering::SeqCst), calls, "a refused appeal asked the model");
    let (status, appeal) = h.call("POST", &path, Some(&owner), None).await;
    assert_eq!(status, 200, "{appeal}");
    let appeal_id = appeal["decision"]["decision_id"].as_str().unwrap();
    let (_, appealed) = h.call("GET", &format!("/v1/decisions/{appeal_id}"), Some(&auditor), None).await;
    assert_eq!(appealed["submitted_by"], owner_id, "{appealed}");
    let (status, repeated) = h.call("POST", &path, Some(&reviewer), None).await;
    assert_eq!((status, repeated["repeated"].as_bool()), (200, Some(true)), "a reviewer acts for anyone: {repeated}");

    let submit = |key: &str, text: &str| {
        let request = h
            .http
            .post(format!("{}/v1/jobs", h.base))
            .bearer_auth(key)
            .header("Idempotency-Key", "order-1")
            .json(&json!({"text": text, "policies": ["spam"]}));
        async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap())
        }
    };
    let (status, mine) = submit(&owner, "BUY NOW").await;
    assert_eq!(status, 202, "{mine}");
    let (status, theirs) = submit(&other, "a different post").await;
    assert_eq!(status, 202, "one client's Idempotency-Key collided with another's: {theirs}");
    assert_ne!(mine["id"], theirs["id"]);
    let job = mine["id"].as_str().unwrap();
    let (status, peeked) = h.call("GET", &format!("/v1/jobs/{job}"), Some(&other), None).await;
    assert_eq!(status, 404, "another client's key read the job: {peeked}");
    let done = poll_job(&h, &owner, job, |j| j["status"] == "done").await;
    assert_eq!(done["decision"]["submitted_by"], owner_id, "{done}");
    let (status, _) = h.call("GET", &format!("/v1/jobs/{job}"), Some(&reviewer), None).await;
    assert_eq!(status, 200);
    let (_, rotated) = h.store.create_api_key("shop", &classify).await.unwrap();
    let (status, _) = h.call("GET", &format!("/v1/jobs/{job}"), Some(&rotated), None).await;
    assert_eq!(status, 200, "a key rotated under the client's name lost its jobs");
}

/// `--retain-days`: the server prunes on its schedule, and what a person still has to decide stays.
#[tokio::test]
async fn the_server_prunes_what_is_past_its_retention_period() {
    let h = Harness::start(|config| {
        config.retention = Some(safeguard_server::RetentionConfig {
            every: Duration::from_millis(50),
            policies: true,
            ..safeguard_server::RetentionConfig::new(Duration::from_secs(86_400))
        })
    })
    .await;
    let key = h.key(&["classify"]).await;
    let (status, fresh) =
        h.call("POST", "/v1/classify", Some(&key), Some(json!({"text": "hello", "policies": ["spam"]}))).await;
    assert_eq!(status, 200, "{fresh}");
    let mut stale = h.store.get_decision(fresh["decision_id"].as_str().unwrap()).await.unwrap().unwrap();
    let year_ago = safeguard_store::now_ms() - 366 * 86_400_000;
    for id in ["stale", "stale-awaiting-a-person"] {
        (stale.id, stale.created_at) = (id.into(), year_ago);
        h.store.insert_decision(&stale, None).await.unwrap();
    }
    h.store.enqueue_review("stale-awaiting-a-person", 1).await.unwrap();
    // A year-old draft (stored, never active) read by its hash to decide with is recorded in use; a year-old
    // version nothing names or reads goes.
    let writer = h.key(&["policies:write", "classify"]).await;
    for body in ["# Draft\nAnswer 0 or 1 for spam.\n", "# Draft\nAnswer 0 or 1 for spam or scams.\n"] {
        let (status, stored) = h.call("POST", "/v1/policies", Some(&writer), Some(json!({"text": body}))).await;
        assert!(status == 200 || status == 201, "{stored}");
    }
    let (_, listed) = h.call("GET", "/v1/policies?name=Draft", Some(&writer), None).await;
    let draft = listed["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["active"] == false)
        .unwrap_or_else(|| panic!("{listed}"));
    let used_hash = draft["hash"].as_str().unwrap().to_string();
    sqlx::query("UPDATE policies SET created_at = $1, used_at = NULL WHERE hash = $2")
        .bind(year_ago)
        .bind(&used_hash)
        .execute(h.store.pool())
        .await
        .unwrap();
    let (status, used) =
        h.call("POST", "/v1/classify", Some(&key), Some(json!({"text": "hi", "policies": [used_hash.clone()]}))).await;
    assert_eq!(status, 200, "{used}");
    let used_at: Option<i64> = sqlx::query_scalar("SELECT used_at FROM policies WHERE hash = $1")
        .bind(&used_hash)
        .fetch_one(h.store.pool())
        .await
        .unwrap();
    assert!(used_at.is_some(), "reading a version to decide with records it in use");
    h.store.put_policy("sha256:forgotten", "forgotten", "body", &json!({"meta": {}}), false).await.unwrap();
    sqlx::query("UPDATE policies SET created_at = $1 WHERE hash = 'sha256:forgotten'")
        .bind(year_ago)
        .execute(h.store.pool())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while h.store.get_decision("stale").await.unwrap().is_some() {
        assert!(tokio::time::Instant::now() < deadline, "the stale decision was never pruned");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(h.store.get_decision("stale-awaiting-a-person").await.unwrap().is_some());
    while h.store.get_policy("sha256:forgotten").await.unwrap().is_some() {
        assert!(tokio::time::Instant::now() < deadline, "the forgotten version was never pruned");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(h.store.get_policy(&used_hash).await.unwrap().is_some());
    assert!(h.store.get_decision(fresh["decision_id"].as_str().unwrap()).await.unwrap().is_some());
    let (_, metrics) = h.call("GET", "/metrics", None, None).await;
    assert!(metrics.as_str().unwrap().contains("safeguard_pruned_rows_total{table=\"decisions\"}"), "{metrics}");
}

/// A client that opens a connection and never finishes its request's headers is cut off after the header timeout,
/// before any key is asked for; one over the connection limit waits to be accepted until another leaves.
#[tokio::test]
async fn slow_headers_are_cut_off_and_connections_are_capped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::start(|config| {
        config.connections = safeguard_server::ConnectionLimits {
            header_read_timeout: Duration::from_millis(300),
            body_read_timeout: Duration::from_millis(400),
            max_connections: 2,
        }
    })
    .await;
    let addr = h.base.trim_start_matches("http://").to_string();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n").await.unwrap();
    // One that sends nothing at all holds its place no longer.
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    // Both connections are taken: a third is not served until one of them is cut off.
    let started = tokio::time::Instant::now();
    let (status, body) = h.call("GET", "/healthz", None, None).await;
    assert_eq!((status, body), (200, json!("ok")));
    assert!(started.elapsed() >= Duration::from_millis(250), "served before a connection was free");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(_)) | Ok(Err(_))), "the slow connection was closed, not left open");
    assert!(!String::from_utf8_lossy(&rest).contains("ok"), "and never answered: {rest:?}");
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the silent connection was closed too");

    // A body announced and never sent fails the request once its time is up, rather than hold the connection.
    let key = h.key(&["classify"]).await;
    let mut stalled = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{\"text\": \""
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    let started = tokio::time::Instant::now();
    let mut reply = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stalled.read_to_end(&mut reply)).await;
    assert!(read.is_ok(), "the stalled request was never answered or closed");
    assert!(started.elapsed() >= Duration::from_millis(350), "{:?}", started.elapsed());
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 408") && reply.contains("did not arrive"), "{reply}");
}

#[tokio::test]
async fn a_field_the_route_does_not_read_is_refused_not_ignored() {
    let h = Harness::start(|_| {}).await;
    let key = h.key(&["classify"]).await;
    let refused = [
        // A misspelt field would be read as absent: here, a policy the sender meant to judge under left out.
        ("/v1/classify", json!({"text": "hi", "policies": ["spam"], "polices": ["hate"]}), "polices"),
        // A job always reasons directly: a cascade asked for would have been ignored.
        ("/v1/jobs", json!({"text": "hi", "policies": ["spam"], "route": "cascade"}), "route"),
        ("/v1/classify/batch", json!({"items": [{"text": "hi"}], "policies": ["spam"], "route": "cascade"}), "route"),
        // The cascade chooses its own efforts.
        ("/v1/moderate", json!({"text": "hi", "policies": ["spam"], "effort": "high"}), "effort"),
    ];
    for (path, body, field) in refused {
        let (status, reply) = h.call("POST", path, Some(&key), Some(body)).await;
        assert_eq!((status, reply["error"]["code"].as_str()), (400, Some("unknown_field")), "{path}: {reply}");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(message.contains(&format!("{field:?}")) && message.contains("policies"), "{path}: {message}");
    }
    assert_eq!(h.reasoner.calls.load(Ordering::SeqCst), 0, "nothing refused was reasoned about");
    // In a batch, an item with a field of its own is refused alone.
    let batch = json!({"items": [{"text": "hi"}, {"text": "hi", "policies": ["hate"]}], "policies": ["spam"]});
    let (status, reply) = h.call("POST", "/v1/classify/batch", Some(&key), Some(batch)).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["results"][0]["outcome"], "allow", "{reply}");
    let error = reply["results"][1]["error"]["message"].as_str().unwrap_or_default();
    assert!(error.contains("\"policies\""), "{reply}");
    assert_eq!(h.reasoner.calls.load(Ordering::SeqCst), 1, "only the first item was reasoned about");
    let depth = h.store.queue_depth().await.unwrap();
    assert_eq!(depth.pending + depth.running + depth.done + depth.failed, 0, "no job was queued: {depth:?}");
    // Every field a route documents is read.
    let (status, reply) = h
        .call(
            "POST",
            "/v1/classify",
            Some(&key),
            Some(json!({"text": "hi", "policies": ["spam"], "route": "direct", "effort": "low", "mode": "separate",
                        "max_tokens": 64, "return_reasoning": false})),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
}

//! The review workflow: an undecided item lands in the queue, a person decides it through the API and
//! through the review page in a real headless Chromium (driven over WebDriver by Debian's chromedriver).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use safeguard_core::{ReasonError, ReasonOutput, ReasonRequest, Reasoner};
use safeguard_server::{RunningServer, Server, ServerConfig};
use safeguard_store::Store;
use serde_json::{Value, json};

const ADMIN: &str = "review-admin-key";

/// Says "1" for "BUY NOW", "0" for "hello", and something unparseable otherwise: the undecided case.
struct Scripted;

#[async_trait]
impl Reasoner for Scripted {
    fn model_id(&self) -> String {
        "scripted".into()
    }

    async fn reason(&self, req: ReasonRequest) -> Result<ReasonOutput, ReasonError> {
        let text = serde_json::to_string(&req.content).unwrap();
        let answer = if text.contains("BUY NOW") {
            "1"
        } else if text.contains("hello") {
            "0"
        } else {
            "maybe?"
        };
        Ok(ReasonOutput {
            analysis: Some("The reviewer should see this reasoning.".into()),
            final_text: Some(answer.into()),
            ..ReasonOutput::default()
        })
    }
}

struct Harness {
    _server: RunningServer,
    base: String,
    http: reqwest::Client,
    store: Store,
    _dir: tempfile::TempDir,
}

async fn start() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("db.sqlite")).await.unwrap();
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_key: Some(ADMIN.into()),
        ..ServerConfig::default()
    };
    let server = Server::start(config, Arc::new(Scripted), store.clone()).await.unwrap();
    let base = format!("http://{}", server.addr);
    Harness { _server: server, base, http: reqwest::Client::new(), store, _dir: dir }
}

impl Harness {
    async fn call(&self, method: &str, path: &str, key: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self.http.request(method.parse().unwrap(), format!("{}{path}", self.base)).bearer_auth(key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn classify(&self, text: &str) -> Value {
        let (status, body) =
            self.call("POST", "/v1/classify", ADMIN, Some(json!({"text": text, "policies": ["spam"]}))).await;
        assert_eq!(status, 200, "{body}");
        body
    }
}

/// A policy whose triage flags "cheap pills" for the model and denies "pills now", sending what it denies to a
/// person (`on_violation: review`).
const PILLS_POLICY: &str = "---
name: pills
output: binary
triage:
  on_violation: review
  rules:
    keywords:
      - name: pharma
        action: flag
        keywords: [cheap pills]
      - name: pharma-known
        action: deny
        keywords: [pills now]
---
# Pills Policy (PL)

## INSTRUCTIONS
Return exactly one character: 0 or 1.

## VIOLATES (1)
- PL1.a Selling prescription medicine without a prescription.

## DOES NOT VIOLATE (0)
- PL0.a Talking about medicine.

Return exactly one character: 0 or 1.";

/// Multi-byte characters before the match: "cheap pills" starts at byte 16 but at UTF-16 unit 13.
const FLAGGED: &str = "héllo 😀 buy cheap pills";
/// A deny rule's match overlapping a flag rule's ("cheap pills" and "pills now").
const DENIED: &str = "héllo, cheap pills now";

impl Harness {
    /// Stores the pills policy and queues both items: the flagged one after the model left it undecided at the
    /// flagged effort, the denied one straight from triage. Returns their review ids, flagged first.
    async fn queue_pills(&self) -> (String, String) {
        let (status, body) = self.call("POST", "/v1/policies", ADMIN, Some(json!({"text": PILLS_POLICY}))).await;
        assert!(status == 200 || status == 201, "{body}");
        let mut ids = Vec::new();
        for text in [FLAGGED, DENIED] {
            let body = json!({"text": text, "policies": ["pills"]});
            let (status, decided) = self.call("POST", "/v1/classify", ADMIN, Some(body)).await;
            assert_eq!((status, decided["outcome"].as_str()), (200, Some("needs_review")), "{decided}");
            let (_, queue) = self.call("GET", "/v1/reviews", ADMIN, None).await;
            let review =
                queue["reviews"].as_array().unwrap().iter().find(|r| r["decision"]["id"] == decided["decision_id"]);
            ids.push(review.unwrap_or_else(|| panic!("queued: {queue}"))["id"].as_str().unwrap().to_string());
        }
        (ids.remove(0), ids.remove(0))
    }
}

/// The offsets of `part` in `text` in UTF-16 code units, as JavaScript's `indexOf` gives them.
fn utf16_range(text: &str, part: &str) -> (usize, usize) {
    let units: Vec<u16> = text.encode_utf16().collect();
    let wanted: Vec<u16> = part.encode_utf16().collect();
    let start = units.windows(wanted.len()).position(|w| w == wanted.as_slice()).unwrap();
    (start, start + wanted.len())
}

#[tokio::test]
async fn a_review_says_in_words_how_the_item_got_to_a_person_and_where_triage_matched() {
    let h = start().await;
    let (flagged, denied) = h.queue_pills().await;
    let reviewer = h.store.create_api_key("reviewer", &["review".to_string()]).await.unwrap().1;

    let (status, item) = h.call("GET", &format!("/v1/reviews/{flagged}"), &reviewer, None).await;
    assert_eq!(status, 200, "{item}");
    let decision = &item["decision"];
    assert_eq!(decision["judged_text"], FLAGGED);
    let verdict = &decision["verdicts"][0];
    assert_eq!(verdict["stage"], "human_review", "{verdict}");
    let reasons: Vec<&str> =
        verdict["escalation_reasons"].as_array().unwrap().iter().map(|r| r.as_str().unwrap()).collect();
    assert_eq!(reasons.len(), 2, "{verdict}");
    assert_eq!(reasons[0], "a triage flag rule matched (rules: pharma: cheap pills)");
    assert!(reasons[1].starts_with("the model left it undecided"), "{reasons:?}");
    // Stored as bytes, served as UTF-16: the two differ by the é and the emoji before the match.
    let stored = &verdict["triage"]["rule_match"]["evidence"][0];
    assert_eq!((stored["start"].as_u64(), stored["end"].as_u64()), (Some(16), Some(27)), "{stored}");
    let (start, end) = utf16_range(FLAGGED, "cheap pills");
    assert_eq!((start, end), (13, 24));
    assert_eq!(
        verdict["triage_highlights"],
        json!([{"start": start, "end": end, "rule": "pharma: cheap pills", "action": "flag", "kind": "keyword"}])
    );
    // The stored verdict is passed on as it was.
    assert_eq!(verdict["escalations"][0], json!({"kind": "triage_flagged", "rules": ["pharma: cheap pills"]}));

    let (_, item) = h.call("GET", &format!("/v1/reviews/{denied}"), &reviewer, None).await;
    let verdict = &item["decision"]["verdicts"][0];
    assert_eq!(
        verdict["escalation_reasons"],
        json!(["triage found a likely violation; the policy sends triage violations to a person"])
    );
    let mut highlights: Vec<(u64, u64)> = verdict["triage_highlights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["start"].as_u64().unwrap(), s["end"].as_u64().unwrap()))
        .collect();
    highlights.sort();
    let expected = [utf16_range(DENIED, "cheap pills"), utf16_range(DENIED, "pills now")];
    assert_eq!(highlights, expected.map(|(s, e)| (s as u64, e as u64)), "{verdict}");
}

/// The queue's reason is what a reviewer reads first: plain words per policy, never a Rust enum's name.
#[tokio::test]
async fn the_queue_reason_is_plain_words_not_debug_text() {
    let h = start().await;
    let (flagged, denied) = h.queue_pills().await;
    let (_, queue) = h.call("GET", "/v1/reviews", ADMIN, None).await;
    let reason = |id: &str| {
        let review = queue["reviews"].as_array().unwrap().iter().find(|r| r["id"] == id).unwrap();
        review["reason"].as_str().unwrap().to_string()
    };
    assert_eq!(
        reason(&denied),
        "pills: triage found a likely violation; the policy sends triage violations to a person"
    );
    let flagged = reason(&flagged);
    assert!(flagged.starts_with("pills: the model left it undecided"), "{flagged}");
    for reason in [reason(&denied), flagged] {
        assert!(
            !["TriageViolationToReview", "NeedsReview", "{", "\""].iter().any(|debug| reason.contains(debug)),
            "{reason}"
        );
    }
}

/// A decision stored by another version: an escalation this build cannot read shows its kind, and evidence that
/// does not fall on the judged text's characters is left out instead of marking the wrong letters.
#[tokio::test]
async fn stored_escalations_and_spans_this_build_cannot_use_are_shown_plainly_or_left_out() {
    let h = start().await;
    let (flagged, _) = h.queue_pills().await;
    let review = h.store.get_review(&flagged).await.unwrap().unwrap();
    let mut record = h.store.get_decision(&review.decision_id).await.unwrap().unwrap();
    record.id = format!("{}-edited", record.id);
    let verdict = &mut record.verdicts[0];
    verdict["escalations"] = json!([
        {"kind": "retired_reason", "detail": "from an older version"},
        {"kind": "needs_review"},
        {"kind": "appeal"},
    ]);
    let span = |start: usize, end: usize| json!({"start": start, "end": end, "rule": "pharma: cheap pills", "kind": "keyword", "action": "flag"});
    // Inside the é, past the end, empty, and the one true match.
    verdict["triage"]["rule_match"]["evidence"] = json!([span(2, 5), span(20, 99), span(5, 5), span(16, 27)]);
    let queued = safeguard_store::NewReview {
        decision_id: record.id.clone(),
        kind: "review".into(),
        priority: 1,
        reason: Some("edited".into()),
        sla_ms: None,
        policy_hash: None,
    };
    let id = h.store.insert_decision_with_review(&record, None, &queued).await.unwrap();
    let (status, item) = h.call("GET", &format!("/v1/reviews/{id}"), ADMIN, None).await;
    assert_eq!(status, 200, "{item}");
    let verdict = &item["decision"]["verdicts"][0];
    assert_eq!(verdict["escalation_reasons"], json!(["retired_reason", "needs_review", "appeal"]), "{verdict}");
    let highlights = verdict["triage_highlights"].as_array().unwrap();
    let kept: Vec<(u64, u64)> =
        highlights.iter().map(|s| (s["start"].as_u64().unwrap(), s["end"].as_u64().unwrap())).collect();
    assert_eq!(kept, vec![(13, 24)], "{verdict}");
}

#[tokio::test]
async fn undecided_items_queue_and_a_person_decides_them_with_a_rule_and_rationale() {
    let h = start().await;
    h.classify("hello friend").await;
    let undecided = h.classify("is this a deal or not").await;
    assert_eq!(undecided["outcome"], "needs_review");

    let reviewer = h.store.create_api_key("reviewer", &["review".to_string()]).await.unwrap().1;
    let (status, queue) = h.call("GET", "/v1/reviews", &reviewer, None).await;
    assert_eq!(status, 200, "{queue}");
    let reviews = queue["reviews"].as_array().unwrap();
    assert_eq!(reviews.len(), 1, "only the undecided item is queued: {queue}");
    let id = reviews[0]["id"].as_str().unwrap().to_string();
    assert_eq!(reviews[0]["decision"]["id"], undecided["decision_id"]);

    let (_, item) = h.call("GET", &format!("/v1/reviews/{id}"), &reviewer, None).await;
    assert_eq!(item["reasoning"][0], "The reviewer should see this reasoning.");
    assert!(item["policies"][0]["rule_ids"].as_array().unwrap().iter().any(|r| r == "SP2.b"));
    let sides = &item["policies"][0]["rule_sides"];
    assert_eq!((sides["SP2.b"].as_str(), sides["SP0.a"].as_str()), (Some("violation"), Some("allow")), "{sides}");

    let path = format!("/v1/reviews/{id}/decide");
    let decide = |body: Value| h.call("POST", &path, &reviewer, Some(body));
    let (status, _) = decide(json!({"outcome": "violation", "rationale": "", "rule_id": "SP2.b"})).await;
    assert_eq!(status, 400, "a rationale is required");
    let (status, body) =
        decide(json!({"outcome": "violation", "rationale": "Cold promotion.", "rule_id": "XX9.z"})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("unknown_rule")));
    // A label that contradicts the rule it cites would teach triage both ways.
    for (outcome, rule) in [("violation", "SP0.a"), ("allow", "SP2.b")] {
        let (status, body) = decide(json!({"outcome": outcome, "rationale": "Checked.", "rule_id": rule})).await;
        assert_eq!((status, body["error"]["code"].as_str()), (400, Some("rule_on_other_side")), "{outcome}: {body}");
    }
    let (status, body) =
        decide(json!({"outcome": "violation", "rationale": "Cold promotion.", "rule_id": "SP2.b", "reviewer": "dana"}))
            .await;
    assert_eq!(status, 200, "{body}");
    let recorded = body["reviewer"].as_str().unwrap();
    assert!(recorded.starts_with("dana (key ") && recorded.len() > "dana (key )".len(), "named, with its key: {body}");
    assert_eq!(body["overrides_model"], Value::Null, "the model gave no answer: nothing to agree or disagree with");
    let (status, _) = decide(json!({"outcome": "allow", "rationale": "Changed my mind.", "rule_id": "SP0.a"})).await;
    assert_eq!(status, 409, "decided once");
    let (_, decided) = h.call("GET", "/v1/reviews?status=decided", &reviewer, None).await;
    let stats = &decided["stats"];
    assert_eq!(
        (stats["decided"].as_i64(), stats["overrides"].as_i64(), stats["model_undecided"].as_i64()),
        (Some(1), Some(0), Some(1)),
        "{stats}"
    );
    assert_eq!(stats["agreement_rate"], Value::Null, "no review of an item the model decided yet: {stats}");

    let classify_only = h.store.create_api_key("app", &["classify".to_string()]).await.unwrap().1;
    let (status, _) = h.call("GET", "/v1/reviews", &classify_only, None).await;
    assert_eq!(status, 403, "the queue needs the review scope");
}

/// Two of an item's policies define one rule id on opposite sides: a decision applies the one on its own side,
/// whichever policy the item names first.
/// A reviewer working an item holds it: another is refused claiming or deciding it until the claim lapses, the
/// queue shows who holds it, an admin key may take it over, and a decided item has nothing left to claim.
#[tokio::test]
async fn a_claimed_item_is_the_claimants_to_decide() {
    let h = start().await;
    h.classify("is this a deal or not").await;
    h.classify("maybe spam, maybe not").await;
    let ana = h.store.create_api_key("ana", &["review".to_string()]).await.unwrap().1;
    let ben = h.store.create_api_key("ben", &["review".to_string()]).await.unwrap().1;
    let (_, queue) = h.call("GET", "/v1/reviews", &ana, None).await;
    let ids: Vec<String> =
        queue["reviews"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap().into()).collect();
    assert_eq!(ids.len(), 2, "{queue}");
    let harness = &h;
    let claim = |id: &str, key: &str| {
        let (path, key) = (format!("/v1/reviews/{id}/claim"), key.to_string());
        async move { harness.call("POST", &path, &key, None).await }
    };
    let decide = |id: &str, key: &str| {
        let (path, key) = (format!("/v1/reviews/{id}/decide"), key.to_string());
        let answer = json!({"outcome": "violation", "rationale": "Cold promotion.", "rule_id": "SP2.b"});
        async move { harness.call("POST", &path, &key, Some(answer)).await }
    };

    let (status, held) = claim(&ids[0], &ana).await;
    assert_eq!(status, 200, "{held}");
    let ana_id = held["claimed_by"].as_str().unwrap().to_string();
    assert!(held["claimed_until"].as_i64().unwrap() > safeguard_store::now_ms() + 5 * 60_000, "{held}");
    let (status, refused) = claim(&ids[0], &ben).await;
    assert_eq!(status, 409, "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains(&ana_id), "names who holds it: {refused}");
    let (status, refused) = decide(&ids[0], &ben).await;
    assert_eq!(status, 409, "another reviewer decided a claimed item: {refused}");
    let (_, queue) = h.call("GET", "/v1/reviews", &ben, None).await;
    let row = queue["reviews"].as_array().unwrap().iter().find(|r| r["id"] == ids[0].as_str()).unwrap();
    assert_eq!(row["claimed_by"], ana_id.as_str(), "{row}");
    let (status, _) = claim(&ids[0], &ana).await;
    assert_eq!(status, 200, "claiming one's own item again renews it");

    // A lapsed claim holds nothing: ben takes the item, and now ana is the one refused.
    sqlx::query("UPDATE reviews SET claimed_until = 1 WHERE id = $1")
        .bind(ids[0].clone())
        .execute(h.store.pool())
        .await
        .unwrap();
    let (status, taken) = claim(&ids[0], &ben).await;
    assert_eq!(status, 200, "{taken}");
    assert_eq!(decide(&ids[0], &ana).await.0, 409);
    let (status, decided) = decide(&ids[0], &ben).await;
    assert_eq!(status, 200, "{decided}");
    let (status, done) = claim(&ids[0], &ana).await;
    assert_eq!(status, 409, "{done}");
    assert!(done["error"]["message"].as_str().unwrap().contains("nothing left"), "{done}");

    // An admin key takes a claimed item over.
    assert_eq!(claim(&ids[1], &ana).await.0, 200);
    let (status, decided) = decide(&ids[1], ADMIN).await;
    assert_eq!(status, 200, "{decided}");
    assert_eq!(claim("no-such-review", &ana).await.0, 404);
}

#[tokio::test]
async fn a_rule_id_defined_on_both_sides_applies_from_the_policy_on_the_outcomes_side() {
    let h = start().await;
    let policy = |name: &str, violating: &str, safe: &str| {
        format!(
            "---\nname: {name}\n---\n# {name} (XX)\n\n## VIOLATES (1)\n- {violating} Named here.\n\n\
             ## DOES NOT VIOLATE (0)\n- {safe} Named here.\n\nReturn 0 or 1."
        )
    };
    let mut hashes = Vec::new();
    for text in [policy("strict", "XX1.a", "XX0.a"), policy("lenient", "XX0.a", "XX1.a")] {
        let (status, stored) = h.call("POST", "/v1/policies", ADMIN, Some(json!({"text": text}))).await;
        assert_eq!(status, 201, "{stored}");
        hashes.push(stored["hash"].clone());
    }
    let body = json!({"text": "is this a deal or not", "policies": ["strict", "lenient"]});
    let (status, undecided) = h.call("POST", "/v1/classify", ADMIN, Some(body)).await;
    assert_eq!((status, undecided["outcome"].as_str()), (200, Some("needs_review")), "{undecided}");
    let (_, queue) = h.call("GET", "/v1/reviews", ADMIN, None).await;
    let review = queue["reviews"].as_array().unwrap().iter().find(|r| r["decision"]["id"] == undecided["decision_id"]);
    let review = review.unwrap_or_else(|| panic!("queued: {queue}"))["id"].as_str().unwrap().to_string();
    let answer = json!({"outcome": "allow", "rationale": "Allowed under lenient.", "rule_id": "XX1.a"});
    let (status, decided) = h.call("POST", &format!("/v1/reviews/{review}/decide"), ADMIN, Some(answer)).await;
    assert_eq!((status, &decided["policy_hash"]), (200, &hashes[1]), "{decided}");
}

#[tokio::test]
async fn appeals_rerun_at_high_effort_and_go_to_a_person_first() {
    let h = start().await;
    h.classify("is this a deal or not").await;
    let allowed = h.classify("hello there").await;
    let (status, appeal) = h
        .call(
            "POST",
            &format!("/v1/decisions/{}/appeal", allowed["decision_id"].as_str().unwrap()),
            ADMIN,
            Some(json!({"reason": "I was wronged"})),
        )
        .await;
    assert_eq!(status, 200, "{appeal}");
    assert_eq!(appeal["decision"]["effort"], "high");
    let (_, queue) = h.call("GET", "/v1/reviews", ADMIN, None).await;
    let kinds: Vec<&str> = queue["reviews"].as_array().unwrap().iter().map(|r| r["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, vec!["appeal", "review"], "appeals jump the queue");
}

/// A minimal WebDriver client: enough to drive the page like a person would.
struct Browser {
    http: reqwest::Client,
    base: String,
    session: String,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Option<Browser> {
        if !std::path::Path::new("/usr/bin/chromedriver").exists()
            || !std::path::Path::new("/usr/bin/chromium").exists()
        {
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let driver = Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let profile = tempfile::tempdir().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while http.get(format!("{base}/status")).send().await.is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let args = json!([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--window-size=1400,1000",
            format!("--user-data-dir={}", profile.path().display())
        ]);
        let caps = json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args}}}});
        let created: Value =
            http.post(format!("{base}/session")).json(&caps).send().await.unwrap().json().await.unwrap();
        let session =
            created["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {created}")).to_string();
        Some(Browser { http, base, session, driver, _profile: profile })
    }

    async fn cmd(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let request = self.http.request(method.parse().unwrap(), url);
        let request = if method == "GET" { request } else { request.json(&body) };
        request.send().await.unwrap().json::<Value>().await.unwrap()["value"].take()
    }

    async fn script(&self, js: &str) -> Value {
        self.cmd("POST", "/execute/sync", json!({"script": js, "args": []})).await
    }

    /// Polls a JavaScript expression until it is truthy.
    async fn wait_for(&self, js: &str, what: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let value = self.script(&format!("return {js};")).await;
            if !(value.is_null() || value == json!(false) || value == json!("") || value == json!(0)) {
                return value;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn keys(&self, keys: &[&str]) {
        let mut actions = Vec::new();
        for key in keys {
            actions.push(json!({"type": "keyDown", "value": key}));
        }
        for key in keys.iter().rev() {
            actions.push(json!({"type": "keyUp", "value": key}));
        }
        self.cmd("POST", "/actions", json!({"actions": [{"type": "key", "id": "keyboard", "actions": actions}]})).await;
    }

    async fn type_into(&self, css: &str, text: &str) {
        let found = self.cmd("POST", "/element", json!({"using": "css selector", "value": css})).await;
        let element = found.as_object().and_then(|o| o.values().next()).and_then(Value::as_str).unwrap().to_string();
        self.cmd("POST", &format!("/element/{element}/value"), json!({"text": text})).await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Killing chromedriver alone orphans its Chromium, which then runs on after the tests (seen: a dozen
        // processes still up half an hour later). Ending the session makes chromedriver close it first. Drop
        // cannot await, so this is a plain blocking HTTP request.
        let host = self.base.trim_start_matches("http://");
        if let Ok(mut stream) = std::net::TcpStream::connect(host) {
            use std::io::{Read, Write};
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let request = format!(
                "DELETE /session/{} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                self.session
            );
            if stream.write_all(request.as_bytes()).is_ok() {
                let _ = stream.read_to_end(&mut Vec::new());
            }
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reviewer_works_the_queue_in_a_real_browser_with_the_keyboard() {
    let h = start().await;
    h.classify("Limited offer, DM me for followers").await;
    h.classify("maybe spam, maybe not").await;
    let page = reqwest::get(format!("{}/review", h.base)).await.unwrap();
    let header = |name: &str| page.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let policy = header("content-security-policy");
    assert!(policy.contains("frame-ancestors 'none'") && policy.contains("script-src 'sha256-"), "{policy}");
    assert_eq!(header("x-content-type-options"), "nosniff");
    let Some(browser) = Browser::start().await else {
        eprintln!("skipped: chromium/chromedriver are not installed (bash scripts/setup.sh installs them)");
        return;
    };
    let reviewer = h.store.create_api_key("reviewer", &["review".to_string()]).await.unwrap().1;
    // Another reviewer is working the head of the queue: the page opens the next item, and marks the first taken.
    let colleague = h.store.create_api_key("colleague", &["review".to_string()]).await.unwrap().1;
    let (_, pending) = h.call("GET", "/v1/reviews", &reviewer, None).await;
    let head = pending["reviews"][0]["id"].as_str().unwrap().to_string();
    let (status, held) = h.call("POST", &format!("/v1/reviews/{head}/claim"), &colleague, None).await;
    assert_eq!(status, 200, "{held}");
    // The key in the fragment, which the browser never sends: not in any log on the way.
    browser.cmd("POST", "/url", json!({"url": format!("{}/review#key={reviewer}", h.base)})).await;
    let opened = browser
        .wait_for(
            "document.querySelectorAll('#queue li.item').length === 2 && state.me \
             && document.querySelector('#content')?.textContent",
            "the item nobody holds",
        )
        .await;
    assert!(opened.as_str().unwrap().contains("maybe spam"), "{opened}");
    let taken = browser.script("return document.querySelector('#queue li.item .taken')?.textContent ?? null").await;
    assert_eq!(taken, "taken", "the item another reviewer holds is marked");
    // Released (lapsed), the page reads the queue again from its head, as before.
    sqlx::query("UPDATE reviews SET claimed_until = 1 WHERE id = $1")
        .bind(head.clone())
        .execute(h.store.pool())
        .await
        .unwrap();
    browser.script("state.index = 0; load(); return true").await;

    let queued = browser.wait_for("document.querySelectorAll('#queue li.item').length === 2 && document.querySelector('#content')?.textContent.includes('Limited offer') && document.querySelector('#content')?.textContent", "the first item").await;
    assert!(queued.as_str().unwrap().contains("Limited offer"), "{queued}");
    assert!(
        browser
            .script("return document.querySelector('#stats').textContent")
            .await
            .as_str()
            .unwrap()
            .contains("2 pending")
    );
    let rules = browser.script("return [...document.querySelectorAll('.policy .rule')].map(e => e.textContent)").await;
    assert!(rules.as_array().unwrap().iter().any(|r| r == "SP2.b"), "rule ids are marked in the policy text: {rules}");
    assert!(
        browser
            .script("return document.querySelector('#reasoning').textContent")
            .await
            .as_str()
            .unwrap()
            .contains("reviewer should see")
    );

    // The key given in the link is kept for the session, not left in the address bar (history, bookmarks).
    assert_eq!(browser.script("return location.hash + location.search").await, "");

    // A slow item must not land on screen after the reviewer moved on: the second item answers late, after the
    // first was selected again, and the first stays on screen, the one a decision would go to.
    browser
        .script(
            "const slow = state.reviews[1].id; window.realFetch = window.fetch; \
             window.fetch = (path, options) => path.endsWith(encodeURIComponent(slow)) \
               ? new Promise((done) => setTimeout(done, 800)).then(() => window.realFetch(path, options)) \
               : window.realFetch(path, options); \
             select(1); select(0); return true",
        )
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let shown = browser
        .script(
            "window.fetch = window.realFetch; \
             return [document.querySelector('#content')?.textContent, state.item?.id === state.reviews[0].id]",
        )
        .await;
    assert!(shown[0].as_str().unwrap_or("").contains("Limited offer") && shown[1] == true, "{shown}");

    // j moves to the next item, k back: the keyboard drives the queue.
    browser.keys(&["j"]).await;
    browser.wait_for("document.querySelector('#content')?.textContent.includes('maybe spam')", "the second item").await;
    browser.keys(&["k"]).await;
    browser
        .wait_for("document.querySelector('#content')?.textContent.includes('Limited offer')", "the first item again")
        .await;

    // v chooses "violation" and puts the cursor in the rationale; pick a rule; Ctrl+Enter submits.
    browser.keys(&["v"]).await;
    browser
        .wait_for(
            "document.querySelector('#outcome-violation').checked && document.activeElement.id === 'rationale'",
            "violation chosen",
        )
        .await;
    browser.type_into("#rationale", "Cold promotion of followers with a contact handle.").await;
    browser.script("document.querySelector('#rule').value = 'SP2.b'; return true").await;
    browser.keys(&["\u{E009}", "\u{E007}"]).await;
    browser.wait_for("document.querySelectorAll('#queue li.item').length === 1", "the queue to shrink").await;

    let (_, decided) = h.call("GET", "/v1/reviews?status=decided", ADMIN, None).await;
    let decided = &decided["reviews"][0];
    assert_eq!(decided["outcome"], "violation");
    assert_eq!(decided["rule_id"], "SP2.b");
    assert_eq!(decided["rationale"], "Cold promotion of followers with a contact handle.");

    // Submitting without a rationale is refused on the page itself. The page reloads after a decision: the next
    // item must be on screen, with the focus out of the old rationale box, before a shortcut can reach it.
    browser
        .wait_for(
            "document.querySelector('#content')?.textContent.includes('maybe spam') \
             && !['TEXTAREA', 'INPUT', 'SELECT'].includes(document.activeElement?.tagName)",
            "the remaining item",
        )
        .await;
    browser.keys(&["l"]).await;
    browser.wait_for("document.querySelector('#outcome-allow').checked", "allow chosen").await;
    // Choosing "allow" leaves only the rules that allow: a violating one cannot be applied to it.
    let rule = browser
        .wait_for(
            "document.querySelector('#rule').selectedOptions[0]?.dataset.side === 'allow' \
             && document.querySelector('#rule option[value=\"SP2.b\"]').disabled \
             && document.querySelector('#rule').value",
            "an allowing rule selected",
        )
        .await;
    assert!(rule.as_str().is_some_and(|r| r.starts_with("SP0")), "{rule}");
    browser.keys(&["\u{E009}", "\u{E007}"]).await;
    let status = browser.wait_for("document.querySelector('#status')?.textContent", "a validation message").await;
    assert!(status.as_str().unwrap().contains("rationale"), "{status}");

    // Another reviewer decides the item on screen meanwhile: submitting it says so and reads the queue again,
    // instead of leaving an item on screen that can no longer be decided.
    let (_, pending) = h.call("GET", "/v1/reviews", ADMIN, None).await;
    let other = pending["reviews"][0]["id"].as_str().unwrap();
    let answer = json!({"outcome": "allow", "rationale": "Not a promotion.", "rule_id": "SP0.a"});
    let (status, body) = h.call("POST", &format!("/v1/reviews/{other}/decide"), ADMIN, Some(answer)).await;
    assert_eq!(status, 200, "{body}");
    browser.type_into("#rationale", "Reads as a question.").await;
    browser.keys(&["\u{E009}", "\u{E007}"]).await;
    let notice = browser
        .wait_for(
            "document.querySelector('#done') && document.querySelector('#notice').textContent",
            "the queue read again, with a notice",
        )
        .await;
    assert!(notice.as_str().unwrap().contains("reloaded"), "{notice}");

    // The notice stays through the queue's reloads, and goes once the reviewer moves on to another item.
    h.classify("Follow me for a follow back").await;
    browser.script("load(); return true").await;
    browser.wait_for("document.querySelectorAll('#queue li.item').length === 1", "the new item").await;
    let kept = browser.script("return document.querySelector('#notice').textContent").await;
    assert!(kept.as_str().unwrap().contains("reloaded"), "{kept}");
    browser.script("document.querySelector('#queue li.item').click(); return true").await;
    browser.wait_for("document.querySelector('#notice').textContent === ''", "the notice cleared").await;

    if let Ok(dir) = std::env::var("SAFEGUARD_SCREENSHOT_DIR") {
        use std::io::Write;
        let png = browser.cmd("GET", "/screenshot", Value::Null).await;
        let bytes = base64_decode(png.as_str().unwrap());
        std::fs::File::create(format!("{dir}/review-page.png")).unwrap().write_all(&bytes).unwrap();
    }
    browser.cmd("DELETE", "", Value::Null).await;
}

/// The page tells how an item got to the reviewer: the stage that settled each policy, why it moved on, and
/// triage's evidence marked in the text it scored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_review_page_shows_the_stage_the_escalations_and_triage_evidence() {
    let h = start().await;
    let (flagged, denied) = h.queue_pills().await;
    let Some(browser) = Browser::start().await else {
        eprintln!("skipped: chromium/chromedriver are not installed (bash scripts/setup.sh installs them)");
        return;
    };
    let reviewer = h.store.create_api_key("reviewer", &["review".to_string()]).await.unwrap().1;
    browser.cmd("POST", "/url", json!({"url": format!("{}/review?key={reviewer}", h.base)})).await;
    browser.wait_for("document.querySelectorAll('#queue li.item').length === 2", "the queue").await;

    let show = |id: &str| {
        format!("(() => {{ const i = state.reviews.findIndex((r) => r.id === {id:?}); select(i); return i >= 0; }})()")
    };
    browser.script(&format!("return {};", show(&flagged))).await;
    let shown = browser
        .wait_for(
            &format!(
                "state.item?.id === {flagged:?} && document.querySelector('#triage') && [\
                 document.querySelector('#verdicts .route .stage')?.textContent, \
                 [...document.querySelectorAll('#verdicts .escalation')].map((e) => e.textContent), \
                 [...document.querySelectorAll('#triage mark')].map((m) => [m.textContent, m.title]), \
                 document.querySelector('#triage .judged')?.textContent, \
                 document.querySelector('#triage .pill')?.textContent]"
            ),
            "the flagged item",
        )
        .await;
    assert_eq!(shown[0], "waiting for a person", "{shown}");
    assert_eq!(shown[1][0], "a triage flag rule matched (rules: pharma: cheap pills)", "{shown}");
    assert!(shown[1][1].as_str().unwrap().starts_with("the model left it undecided"), "{shown}");
    assert_eq!(shown[2], json!([["cheap pills", "pharma: cheap pills (flag)"]]), "exactly the match is marked");
    assert_eq!(shown[3], FLAGGED, "the marks leave the text whole");
    assert_eq!(shown[4], "uncertain");

    // Overlapping matches of two rules become one mark that names both, with the text around it intact.
    browser.script(&format!("return {};", show(&denied))).await;
    let shown = browser
        .wait_for(
            &format!(
                "state.item?.id === {denied:?} && document.querySelector('#triage') && [\
                 [...document.querySelectorAll('#triage mark')].map((m) => [m.textContent, m.title]), \
                 document.querySelector('#triage .judged')?.textContent, \
                 [...document.querySelectorAll('#verdicts .escalation')].map((e) => e.textContent)]"
            ),
            "the denied item",
        )
        .await;
    let marks = shown[0].as_array().unwrap();
    assert_eq!(marks.len(), 1, "{shown}");
    assert_eq!(marks[0][0], "cheap pills now");
    let title = marks[0][1].as_str().unwrap();
    assert!(
        title.contains("pharma: cheap pills (flag)") && title.contains("pharma-known: pills now (deny)"),
        "{title}"
    );
    assert_eq!(shown[1], DENIED);
    assert_eq!(shown[2], json!(["triage found a likely violation; the policy sends triage violations to a person"]));

    if let Ok(dir) = std::env::var("SAFEGUARD_SCREENSHOT_DIR") {
        use std::io::Write;
        let png = browser.cmd("GET", "/screenshot", Value::Null).await;
        let bytes = base64_decode(png.as_str().unwrap());
        std::fs::File::create(format!("{dir}/review-page-triage.png")).unwrap().write_all(&bytes).unwrap();
    }
    browser.cmd("DELETE", "", Value::Null).await;
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let clean: Vec<u8> = text.bytes().filter(|c| *c != b'=' && !c.is_ascii_whitespace()).collect();
    clean
        .chunks(4)
        .flat_map(|chunk| {
            let n = chunk.iter().enumerate().fold(0u32, |acc, (i, &c)| acc | (u32::from(value(c)) << (18 - 6 * i)));
            let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            bytes.into_iter().take(chunk.len().saturating_sub(1))
        })
        .collect()
}

//! The remote backend against a real OpenAI-compatible server: a second `safeguard serve` on loopback running
//! the embedded engine. The front server's `--backend` points at the first one's `/v1`; a classification through
//! the front must carry the same verdict, reasoning and token counts as one made on the backend directly, and
//! when the backend dies the front must fail closed. A streamed chat completion through the front arrives piece by
//! piece, as the backend decodes, not as one block at the end.

mod serve_support;

use std::io::{BufRead, BufReader};
use std::time::Duration;

use serde_json::{Value, json};
use serve_support::{SAFE_SCRIPT, scripted_model, serve};

fn post(base: &str, path: &str, body: &Value) -> (u16, Value) {
    let response = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
        .post(format!("{base}{path}"))
        .json(body)
        .send()
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn get(base: &str, path: &str) -> Value {
    reqwest::blocking::get(format!("{base}{path}")).unwrap().json().unwrap()
}

fn readyz(base: &str) -> (u16, Value) {
    let response = reqwest::blocking::get(format!("{base}/readyz")).unwrap();
    (response.status().as_u16(), response.json().unwrap())
}

/// Posts a streamed chat completion and reads its events as they come off the socket: the chunks, how many
/// carried reasoning, and the reasoning and answer they add up to.
fn stream_chat(base: &str, body: &Value) -> (Vec<Value>, usize, String, String) {
    let response = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
        .post(format!("{base}/v1/chat/completions"))
        .json(body)
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let mut events: Vec<String> = Vec::new();
    for line in BufReader::new(response).lines() {
        if let Some(data) = line.unwrap().strip_prefix("data: ") {
            events.push(data.to_string());
        }
    }
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let (mut reasoning, mut content, mut reasoning_chunks) = (String::new(), String::new(), 0);
    for chunk in &chunks {
        assert!(chunk.get("error").is_none(), "{chunk}");
        let Some(delta) = chunk["choices"].get(0).map(|c| &c["delta"]) else { continue };
        if let Some(text) = delta.get("reasoning_content").and_then(Value::as_str) {
            reasoning.push_str(text);
            reasoning_chunks += 1;
        }
        if let Some(text) = delta.get("content").and_then(Value::as_str) {
            content.push_str(text);
        }
    }
    (chunks, reasoning_chunks, reasoning, content)
}

#[test]
fn classify_through_a_second_serve_and_fail_closed_when_it_dies() {
    let backend_dir = tempfile::tempdir().unwrap();
    let front_dir = tempfile::tempdir().unwrap();
    let model = scripted_model().to_str().unwrap().to_string();
    let backend = serve(backend_dir.path(), &["--model", &model]);
    let backend_url = format!("{}/v1", backend.base);
    let front = serve(
        front_dir.path(),
        &[
            "--backend",
            &backend_url,
            "--backend-model",
            "scripted",
            "--backend-probe-secs",
            "1",
            "--backend-ready-grace-secs",
            "0",
        ],
    );
    let (status, ready) = readyz(&front.base);
    assert_eq!(status, 200, "{ready}");
    assert_eq!((&ready["backends"]["usable"], &ready["backends"]["total"]), (&json!(1), &json!(1)), "{ready}");
    assert!(!ready.to_string().contains(&backend.base), "no internal address on an open route: {ready}");

    let request = json!({
        "text": "Hi Sam, lunch at noon on Friday?",
        "policies": ["spam"],
        "effort": "low",
        "return_reasoning": true,
    });
    let (status, direct) = post(&backend.base, "/v1/classify", &request);
    assert_eq!(status, 200, "{direct}");
    let (status, remote) = post(&front.base, "/v1/classify", &request);
    assert_eq!(status, 200, "{remote}");

    // The scripted model reasons that the text is harmless and answers 0: a clean allow on both paths.
    assert_eq!(direct["outcome"], "allow", "{direct}");
    assert_eq!(remote["outcome"], "allow", "{remote}");
    assert_eq!(remote["verdicts"][0]["policy"], "spam");
    assert_eq!(remote["verdicts"][0]["violation"], false, "{remote}");
    assert_eq!(remote["verdicts"][0]["policy_hash"], direct["verdicts"][0]["policy_hash"]);
    assert!(remote["model"].as_str().unwrap().starts_with("remote:"), "{remote}");

    // The reasoning crossed the hop intact (the backend returns it in `reasoning`/`reasoning_content`).
    let remote_reasoning = remote["reasoning"][0].as_str().unwrap_or_default();
    assert_eq!(remote_reasoning, SAFE_SCRIPT.analysis, "{remote}");
    assert_eq!(direct["reasoning"][0], remote["reasoning"][0]);

    // Usage comes from the backend's own accounting: the same prompt and completion.
    let usage = &remote["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 0, "{remote}");
    assert!(usage["completion_tokens"].as_u64().unwrap() > 0, "{remote}");
    assert_eq!(usage["completion_tokens"], direct["usage"]["completion_tokens"], "{remote}\n{direct}");
    assert_eq!(usage["prompt_tokens"], direct["usage"]["prompt_tokens"], "same harmony prompt: {remote}\n{direct}");

    // The backend's own decision log shows the chat call the front made, and the front stored its own decision.
    let front_decision = get(&front.base, &format!("/v1/decisions/{}", remote["decision_id"].as_str().unwrap()));
    assert_eq!(front_decision["outcome"], "allow", "{front_decision}");

    // A streamed chat completion through the front: the backend's deltas pass through one by one.
    let chat = json!({
        "model": "scripted",
        "messages": [
            {"role": "system", "content": "Answer 1 for spam, 0 otherwise."},
            {"role": "user", "content": "Hi Sam, lunch at noon on Friday?"},
        ],
        "reasoning_effort": "low",
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let (chunks, reasoning_chunks, reasoning, content) = stream_chat(&front.base, &chat);
    // The scripted reasoning is ~20 tokens; the non-streaming fallback sent it as one chunk.
    assert!(reasoning_chunks > 5, "{reasoning_chunks} reasoning chunks: {chunks:?}");
    assert_eq!(reasoning, SAFE_SCRIPT.analysis);
    assert_eq!(content, SAFE_SCRIPT.final_text);
    let usage = &chunks.last().unwrap()["usage"];
    assert!(usage["completion_tokens"].as_u64().unwrap() as usize > reasoning_chunks, "{usage}");

    // Kill the backend mid-service: the front answers, fails closed, says why, and stores it.
    backend.kill_hard();
    let (status, failed) = post(&front.base, "/v1/classify", &request);
    assert_eq!(status, 200, "{failed}");
    assert_eq!(failed["outcome"], "needs_review", "never allow on a dead backend: {failed}");
    let reason = failed["failure_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("backend 1"), "the reason names the backend: {failed}");
    assert!(
        !reason.contains(backend_url.trim_end_matches("/v1")),
        "by its place, not by an address the client has no business knowing: {failed}"
    );
    let stored = get(&front.base, &format!("/v1/decisions/{}", failed["decision_id"].as_str().unwrap()));
    assert_eq!(stored["outcome"], "needs_review");
    let queue = get(&front.base, "/v1/reviews?status=pending");
    let queued: Vec<&Value> = queue["reviews"].as_array().unwrap().iter().map(|r| &r["decision_id"]).collect();
    assert!(queued.contains(&&failed["decision_id"]), "a person is asked: {queue}");

    // The next health probe (every second here) finds the backend gone: readiness says so and, with a grace
    // of zero, fails; /metrics shows it too.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (status, ready) = loop {
        let (status, ready) = readyz(&front.base);
        if status == 503 || std::time::Instant::now() > deadline {
            break (status, ready);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["backends"]["usable"], 0, "{ready}");
    assert_eq!(ready["database"], true, "{ready}");
    assert!(ready["why"][0].as_str().unwrap_or_default().contains("no reasoning backend"), "{ready}");
    let metrics = reqwest::blocking::get(format!("{}/metrics", front.base)).unwrap().text().unwrap();
    assert!(metrics.lines().any(|line| line == "safeguard_backends_usable 0"), "{metrics}");
    let endpoint = format!("safeguard_backend_usable{{endpoint=\"{backend_url}\"}} 0");
    assert!(metrics.lines().any(|line| line == endpoint), "{metrics}");
}

/// `--backend-timeout` bounds one request to the backend: a backend that takes the connection and never answers
/// fails each attempt at it, and the item goes to a person for the backend's failure, long before
/// `--reason-timeout` (here a minute) would have ended the wait.
#[test]
fn a_backend_that_never_answers_fails_at_the_backend_timeout() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = silent.local_addr().unwrap();
    // Takes every connection and holds it open, answering nothing.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming().flatten() {
            held.push(stream);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let backend = format!("http://{address}/v1");
    let front = serve(
        dir.path(),
        &["--backend", &backend, "--backend-model", "m", "--backend-timeout", "1", "--reason-timeout", "60"],
    );
    let request = json!({"text": "Hi Sam, lunch at noon?", "policies": ["spam"], "effort": "low"});
    let (status, decided) = post(&front.base, "/v1/classify", &request);
    assert_eq!(status, 200, "{decided}");
    assert_eq!(decided["outcome"], "needs_review", "{decided}");
    let reason = decided["failure_reason"].as_str().unwrap_or_default();
    assert!(!reason.contains("the reasoner timed out"), "the backend timeout, not the reason timeout: {reason}");
    assert!(reason.contains("backend 1"), "{reason}");
}

//! `/v1/chat/completions` with `stream: true` on the real embedded engine: reasoning and answer arrive as
//! server-sent deltas while the model decodes, and they add up to the non-streamed reply.

mod serve_support;

use std::io::{BufRead, BufReader};
use std::time::Duration;

use serde_json::{Value, json};
use serve_support::{SAFE_SCRIPT, scripted_model, serve};

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(120)).build().unwrap()
}

#[test]
fn streamed_deltas_arrive_one_by_one_and_add_up_to_the_whole_answer() {
    let dir = tempfile::tempdir().unwrap();
    let model = scripted_model().to_str().unwrap().to_string();
    let server = serve(dir.path(), &["--model", &model]);
    let url = format!("{}/v1/chat/completions", server.base);
    let mut request = json!({
        "model": "scripted",
        "messages": [
            {"role": "system", "content": "Answer 1 for spam, 0 otherwise."},
            {"role": "user", "content": "Hi Sam, lunch at noon on Friday?"},
        ],
        "reasoning_effort": "low",
    });

    let whole: Value = client().post(&url).json(&request).send().unwrap().json().unwrap();
    let message = &whole["choices"][0]["message"];
    assert_eq!(message["content"], SAFE_SCRIPT.final_text, "{whole}");
    assert_eq!(message["reasoning_content"], SAFE_SCRIPT.analysis, "{whole}");

    request["stream"] = json!(true);
    request["stream_options"] = json!({"include_usage": true});
    let response = client().post(&url).json(&request).send().unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    // Read the events as they come off the socket.
    let mut events: Vec<String> = Vec::new();
    for line in BufReader::new(response).lines() {
        let line = line.unwrap();
        if let Some(data) = line.strip_prefix("data: ") {
            events.push(data.to_string());
        }
    }
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let (mut reasoning, mut content) = (String::new(), String::new());
    let (mut reasoning_chunks, mut content_chunks) = (0, 0);
    let mut first_content_at = None;
    for (index, chunk) in chunks.iter().enumerate() {
        assert!(chunk.get("error").is_none(), "{chunk}");
        let Some(delta) = chunk["choices"].get(0).map(|c| &c["delta"]) else { continue };
        if let Some(text) = delta.get("reasoning_content").and_then(Value::as_str) {
            assert_eq!(delta["reasoning"], text, "both reasoning fields carry the same delta");
            assert!(first_content_at.is_none(), "reasoning comes before the answer");
            reasoning.push_str(text);
            reasoning_chunks += 1;
        }
        if let Some(text) = delta.get("content").and_then(Value::as_str).filter(|t| !t.is_empty()) {
            content.push_str(text);
            content_chunks += 1;
            first_content_at.get_or_insert(index);
        }
    }
    // The scripted reasoning is ~20 tokens; each decoded piece is its own chunk, not one block at the end.
    assert!(reasoning_chunks > 5, "{reasoning_chunks} reasoning chunks: {chunks:?}");
    assert!(content_chunks >= 1);
    assert_eq!(reasoning, SAFE_SCRIPT.analysis);
    assert_eq!(content, message["content"].as_str().unwrap());
    let finish = chunks.iter().find(|c| c["choices"][0]["finish_reason"].is_string()).expect("a finish chunk");
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], whole["usage"]["completion_tokens"], "{usage}");
    assert!(usage["completion_tokens"].as_u64().unwrap() as usize > reasoning_chunks);
}

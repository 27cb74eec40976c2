//! RemoteReasoner against real HTTP servers on loopback that replay each server family's documented
//! response shapes, misbehave on cue, and record what they were sent.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use safeguard_core::{ReasonError, ReasonRequest, Reasoner};
use safeguard_harmony::{Content, Effort};
use safeguard_remote::{BreakerState, EndpointConfig, RemoteConfig, RemoteReasoner};
use serde_json::{Value, json};
use tokio::sync::Mutex;

/// What a fake server does for each request: the n-th request (0-based) gets `script(n)`.
type Script = Arc<dyn Fn(usize) -> (StatusCode, Value, Option<Duration>) + Send + Sync>;

#[derive(Clone)]
struct Fake {
    script: Script,
    calls: Arc<AtomicUsize>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
    bodies: Arc<Mutex<Vec<Value>>>,
}

async fn handle(State(fake): State<Fake>, Json(body): Json<Value>) -> Response {
    let n = fake.calls.fetch_add(1, Ordering::SeqCst);
    let now = fake.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    fake.max_in_flight.fetch_max(now, Ordering::SeqCst);
    fake.bodies.lock().await.push(body);
    let (status, reply, delay) = (fake.script)(n);
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    fake.in_flight.fetch_sub(1, Ordering::SeqCst);
    let mut response = (status, Json(reply)).into_response();
    if status == StatusCode::TOO_MANY_REQUESTS {
        response.headers_mut().insert("retry-after", "0".parse().unwrap());
    }
    response
}

async fn serve(script: Script) -> (String, Fake) {
    let fake = Fake {
        script,
        calls: Arc::default(),
        in_flight: Arc::default(),
        max_in_flight: Arc::default(),
        bodies: Arc::default(),
    };
    let app = Router::new()
        .route("/v1/chat/completions", post(handle))
        .route("/api/chat", post(handle))
        .route("/v1/models", get(|| async { Json(json!({"data": []})) }))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), fake)
}

fn vllm_ok(answer: &str) -> Value {
    json!({"id": "chatcmpl-1", "object": "chat.completion", "model": "openai/gpt-oss-safeguard-20b",
        "choices": [{"index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": answer, "reasoning": "The content asks for a password.", "reasoning_content": "The content asks for a password."}}],
        "usage": {"prompt_tokens": 300, "completion_tokens": 20, "total_tokens": 320, "prompt_tokens_details": {"cached_tokens": 256}}})
}

fn always(status: StatusCode, body: Value) -> Script {
    Arc::new(move |_| (status, body.clone(), None))
}

fn config(urls: &[String]) -> RemoteConfig {
    let endpoints = urls.iter().map(|u| u.parse::<EndpointConfig>().unwrap()).collect();
    let mut cfg = RemoteConfig::new("openai/gpt-oss-safeguard-20b", endpoints);
    cfg.backoff_base = Duration::from_millis(5);
    cfg.backoff_max = Duration::from_millis(20);
    cfg.request_timeout = Duration::from_secs(5);
    cfg
}

fn request() -> ReasonRequest {
    ReasonRequest::new("# Spam\nAnswer 0 or 1.", Content::text("Your account is locked: http://x.co"), Effort::High)
}

#[tokio::test]
async fn vllm_shape_round_trip_sends_effort_and_policy_first() {
    let (url, fake) = serve(always(StatusCode::OK, vllm_ok("1"))).await;
    let reasoner = RemoteReasoner::new(config(&[format!("{url}/v1")])).unwrap();
    let out = reasoner.reason(request()).await.unwrap();
    assert_eq!(out.final_text.as_deref(), Some("1"));
    assert_eq!(out.analysis.as_deref(), Some("The content asks for a password."));
    assert_eq!(out.usage.cached_prompt_tokens, 256);
    assert!(out.timings.total_ms > 0.0);

    let sent = fake.bodies.lock().await[0].clone();
    assert_eq!(sent["reasoning_effort"], "high");
    assert_eq!(sent["model"], "openai/gpt-oss-safeguard-20b");
    assert_eq!(sent["messages"][0]["content"], "# Spam\nAnswer 0 or 1.");
    assert_eq!(sent["max_tokens"], 8192, "high effort gets the high budget");
}

#[tokio::test]
async fn ollama_native_gets_think_and_returns_thinking() {
    let reply = json!({"model": "gpt-oss-safeguard:20b", "message": {"role": "assistant", "content": "0", "thinking": "a greeting"},
        "done": true, "done_reason": "stop", "prompt_eval_count": 120, "eval_count": 9});
    let (url, fake) = serve(always(StatusCode::OK, reply)).await;
    let reasoner = RemoteReasoner::new(config(&[format!("ollama+{url}")])).unwrap();
    let out = reasoner.reason(request()).await.unwrap();
    assert_eq!(out.final_text.as_deref(), Some("0"));
    assert_eq!(out.analysis.as_deref(), Some("a greeting"));
    assert_eq!(fake.bodies.lock().await[0]["think"], "high");
}

#[tokio::test]
async fn retries_5xx_and_429_then_succeeds() {
    let script: Script = Arc::new(|n| match n {
        0 => (StatusCode::SERVICE_UNAVAILABLE, json!({"error": "warming up"}), None),
        1 => (StatusCode::TOO_MANY_REQUESTS, json!({"error": "slow down"}), None),
        _ => (StatusCode::OK, vllm_ok("0"), None),
    });
    let (url, fake) = serve(script).await;
    let reasoner = RemoteReasoner::new(config(&[format!("{url}/v1")])).unwrap();
    let out = reasoner.reason(request()).await.unwrap();
    assert_eq!(out.final_text.as_deref(), Some("0"));
    assert_eq!(fake.calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_client_error_is_not_retried() {
    let (url, fake) = serve(always(StatusCode::BAD_REQUEST, json!({"error": "unknown model"}))).await;
    let reasoner = RemoteReasoner::new(config(&[format!("{url}/v1")])).unwrap();
    let err = reasoner.reason(request()).await.unwrap_err();
    assert!(matches!(&err, ReasonError::Backend(m) if m.contains("400") && m.contains("unknown model")), "{err}");
    assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_dead_endpoint_fails_over_and_its_breaker_opens() {
    let (bad_url, bad) = serve(always(StatusCode::INTERNAL_SERVER_ERROR, json!({"error": "boom"}))).await;
    let (good_url, good) = serve(always(StatusCode::OK, vllm_ok("1"))).await;
    let mut cfg = config(&[format!("{bad_url}/v1"), format!("{good_url}/v1")]);
    cfg.breaker_threshold = 2;
    cfg.breaker_cooldown = Duration::from_secs(60);
    let reasoner = RemoteReasoner::new(cfg).unwrap();
    for _ in 0..8 {
        let out = reasoner.reason(request()).await.unwrap();
        assert_eq!(out.final_text.as_deref(), Some("1"));
    }
    assert!(bad.calls.load(Ordering::SeqCst) <= 2, "the breaker stops traffic to the failing endpoint");
    assert_eq!(good.calls.load(Ordering::SeqCst), 8);
    let status = reasoner.status();
    assert_eq!(status[0].breaker, BreakerState::Open);
    assert_eq!(status[1].breaker, BreakerState::Closed);
}

#[tokio::test]
async fn a_timeout_is_an_error_not_an_answer() {
    let script: Script = Arc::new(|_| (StatusCode::OK, vllm_ok("0"), Some(Duration::from_secs(3))));
    let (url, fake) = serve(script).await;
    let mut cfg = config(&[format!("{url}/v1")]);
    cfg.request_timeout = Duration::from_millis(200);
    cfg.max_attempts = 2;
    let reasoner = RemoteReasoner::new(cfg).unwrap();
    let err = reasoner.reason(request()).await.unwrap_err();
    assert!(err.to_string().contains("timed out"), "{err}");
    assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn concurrency_per_endpoint_is_bounded() {
    let script: Script = Arc::new(|_| (StatusCode::OK, vllm_ok("0"), Some(Duration::from_millis(50))));
    let (url, fake) = serve(script).await;
    let mut endpoint: EndpointConfig = format!("{url}/v1").parse().unwrap();
    endpoint.max_concurrency = 2;
    let mut cfg = config(&[]);
    cfg.endpoints = vec![endpoint];
    let reasoner = RemoteReasoner::new(cfg).unwrap();
    let results = reasoner.reason_batch((0..6).map(|_| request()).collect()).await;
    assert!(results.iter().all(|r| r.is_ok()));
    assert_eq!(fake.calls.load(Ordering::SeqCst), 6);
    assert_eq!(fake.max_in_flight.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn health_checks_mark_a_down_server() {
    let (url, _fake) = serve(always(StatusCode::OK, vllm_ok("0"))).await;
    // Port 9 (discard) on loopback refuses connections.
    let reasoner = RemoteReasoner::new(config(&[format!("{url}/v1"), "http://127.0.0.1:9/v1".to_string()])).unwrap();
    assert_eq!(reasoner.check_health().await, 1);
    let status = reasoner.status();
    assert!(status[0].healthy);
    assert!(!status[1].healthy);
    // Traffic prefers the healthy endpoint.
    assert!(reasoner.reason(request()).await.is_ok());
}

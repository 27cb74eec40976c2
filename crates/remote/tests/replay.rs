//! RemoteReasoner against real HTTP servers on loopback that replay each server family's documented
//! response shapes, streamed and whole, misbehave on cue, and record what they were sent.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use safeguard_core::{ReasonDelta, ReasonError, ReasonOutput, ReasonRequest, Reasoner, Timings};
use safeguard_harmony::{Content, Effort};
use safeguard_remote::{BreakerState, EndpointConfig, RemoteConfig, RemoteReasoner};
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::{Mutex, Semaphore};

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
    assert!(fake.bodies.lock().await[0]["options"].get("num_ctx").is_none(), "Ollama's own context unless told");
    assert_eq!(reasoner.context_tokens(), None);

    // Told the servers' context, the reasoner reports it (the server's admission check holds content to it), and
    // Ollama is sent it, the same on every request, so that it neither cuts the prompt nor reloads the model.
    let mut told = config(&[format!("ollama+{url}")]);
    told.context_tokens = Some(16_384);
    let reasoner = RemoteReasoner::new(told).unwrap();
    assert_eq!(reasoner.context_tokens(), Some(16_384));
    reasoner.reason(request()).await.unwrap();
    assert_eq!(fake.bodies.lock().await[1]["options"]["num_ctx"], 16_384);
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

/// A dead endpoint (5xx), one without the model (404: a node without it pulled, a replica serving another name) or
/// one refusing the key (401/403): the request goes to another endpoint, and the failures open the bad
/// endpoint's breaker so that traffic stops going there.
#[tokio::test]
async fn a_failing_or_refusing_endpoint_fails_over_and_its_breaker_opens() {
    for status in [StatusCode::INTERNAL_SERVER_ERROR, StatusCode::NOT_FOUND, StatusCode::UNAUTHORIZED] {
        let (bad_url, bad) = serve(always(status, json!({"error": "model not found"}))).await;
        let (good_url, good) = serve(always(StatusCode::OK, vllm_ok("1"))).await;
        let mut cfg = config(&[format!("{bad_url}/v1"), format!("{good_url}/v1")]);
        cfg.breaker_threshold = 2;
        cfg.breaker_cooldown = Duration::from_secs(60);
        let reasoner = RemoteReasoner::new(cfg).unwrap();
        for _ in 0..8 {
            let out = reasoner.reason(request()).await.unwrap_or_else(|e| panic!("{status}: {e}"));
            assert_eq!(out.final_text.as_deref(), Some("1"));
        }
        assert!(bad.calls.load(Ordering::SeqCst) <= 2, "{status}: the breaker stops traffic to the bad endpoint");
        assert_eq!(good.calls.load(Ordering::SeqCst), 8);
        let breakers = reasoner.status();
        assert_eq!((breakers[0].breaker, breakers[1].breaker), (BreakerState::Open, BreakerState::Closed), "{status}");
    }
    // A 403 may be a filter in front of the endpoint refusing this body (slurs, injection payloads: what a
    // moderation service sends): the request fails over, and the endpoint stays in rotation for the next one.
    let (bad_url, bad) = serve(always(StatusCode::FORBIDDEN, json!({"error": "blocked by policy"}))).await;
    let (good_url, good) = serve(always(StatusCode::OK, vllm_ok("1"))).await;
    let mut cfg = config(&[format!("{bad_url}/v1"), format!("{good_url}/v1")]);
    cfg.breaker_threshold = 2;
    let reasoner = RemoteReasoner::new(cfg).unwrap();
    for _ in 0..8 {
        assert_eq!(reasoner.reason(request()).await.unwrap().final_text.as_deref(), Some("1"));
    }
    assert_eq!(good.calls.load(Ordering::SeqCst), 8);
    assert!(bad.calls.load(Ordering::SeqCst) > 2, "a 403 does not open the breaker");
    assert_eq!(reasoner.status()[0].breaker, BreakerState::Closed);
    // With no other endpoint, the refusal is the answer, at once: retrying it would be refused the same way.
    let (url, fake) = serve(always(StatusCode::NOT_FOUND, json!({"error": "model not found"}))).await;
    let reasoner = RemoteReasoner::new(config(&[format!("{url}/v1")])).unwrap();
    let err = reasoner.reason(request()).await.unwrap_err();
    assert!(err.to_string().contains("404") && err.to_string().contains("model not found"), "{err}");
    assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
}

/// Least-loaded routing counts requests waiting for an endpoint's permits, per permit: an endpoint that takes
/// one request at a time is not handed half of a burst to queue.
#[tokio::test]
async fn least_loaded_routing_counts_queued_requests_per_permit() {
    let slow = || -> Script { Arc::new(|_| (StatusCode::OK, vllm_ok("0"), Some(Duration::from_millis(300)))) };
    let (wide_url, wide) = serve(slow()).await;
    let (narrow_url, narrow) = serve(slow()).await;
    let mut cfg = config(&[format!("{wide_url}/v1"), format!("{narrow_url}/v1")]);
    cfg.endpoints[0].max_concurrency = 4;
    cfg.endpoints[1].max_concurrency = 1;
    let reasoner = RemoteReasoner::new(cfg).unwrap();
    let results = reasoner.reason_batch((0..10).map(|_| request()).collect()).await;
    assert!(results.iter().all(|r| r.is_ok()));
    let narrow_calls = narrow.calls.load(Ordering::SeqCst);
    assert!(narrow_calls <= 3, "the one-permit endpoint got {narrow_calls} of 10");
    assert_eq!(wide.calls.load(Ordering::SeqCst) + narrow_calls, 10);
    assert!(reasoner.status().iter().all(|s| s.in_flight == 0));
}

/// A 200 that is no answer (an error inside it) is not asked again, since the server may have generated and
/// billed a completion, but it counts against the server's health: enough of them open the breaker.
#[tokio::test]
async fn a_200_without_an_answer_is_not_retried_but_opens_the_breaker() {
    let (url, fake) = serve(always(StatusCode::OK, json!({"error": {"message": "engine died"}}))).await;
    let mut cfg = config(&[format!("{url}/v1")]);
    cfg.max_attempts = 3;
    cfg.breaker_threshold = 2;
    cfg.breaker_cooldown = Duration::from_secs(60);
    let reasoner = RemoteReasoner::new(cfg).unwrap();
    for calls in 1..=2 {
        let err = reasoner.reason(request()).await.unwrap_err();
        assert!(err.to_string().contains("engine died"), "{err}");
        assert_eq!(fake.calls.load(Ordering::SeqCst), calls, "not retried");
    }
    assert_eq!(reasoner.status()[0].breaker, BreakerState::Open);
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

/// A server that takes requests and never answers, behind callers whose deadline comes before the request
/// timeout: each attempt is dropped by its caller, not failed by the client. Dropped at its step's deadline, with
/// no word from the server since it went out, it still counts against the server, so the server leaves rotation.
/// Dropped by a caller that stopped waiting for another reason (a client that hung up), or while the server was
/// answering other requests (slow, not stuck), it does not.
#[tokio::test]
async fn attempts_dropped_at_their_deadline_count_against_a_server_that_never_answers() {
    // Past the least silence that blames a server.
    const STEP: Duration = Duration::from_millis(1100);
    let wedged = || -> Script { Arc::new(|_| (StatusCode::OK, vllm_ok("0"), Some(Duration::from_secs(600)))) };
    let (wedged_url, stuck) = serve(wedged()).await;
    let (good_url, good) = serve(always(StatusCode::OK, vllm_ok("1"))).await;
    let mut cfg = config(&[format!("{wedged_url}/v1"), format!("{good_url}/v1")]);
    cfg.request_timeout = Duration::from_secs(60);
    cfg.breaker_threshold = 2;
    cfg.breaker_cooldown = Duration::from_secs(60);
    let reasoner = RemoteReasoner::new(cfg).unwrap();
    let mut answered = 0;
    for _ in 0..8 {
        let step = safeguard_core::deadline::within(STEP, reasoner.reason(request()));
        if let Ok(Ok(out)) = step.await {
            assert_eq!(out.final_text.as_deref(), Some("1"));
            answered += 1;
        }
    }
    let lost = stuck.calls.load(Ordering::SeqCst);
    assert_eq!(lost, 2, "after two attempts that ran into their deadline, the server is out of rotation");
    assert_eq!((answered, good.calls.load(Ordering::SeqCst)), (6, 6));
    assert_eq!(reasoner.status()[0].breaker, BreakerState::Open);
    assert!(reasoner.status().iter().all(|s| s.in_flight == 0));

    let (url, stuck) = serve(wedged()).await;
    let mut cfg = config(&[format!("{url}/v1")]);
    cfg.breaker_threshold = 2;
    let reasoner = RemoteReasoner::new(cfg).unwrap();
    for _ in 0..4 {
        let step = safeguard_core::deadline::within(Duration::from_secs(600), reasoner.reason(request()));
        assert!(tokio::time::timeout(Duration::from_millis(100), step).await.is_err());
    }
    assert_eq!(stuck.calls.load(Ordering::SeqCst), 4);
    assert_eq!(reasoner.status()[0].breaker, BreakerState::Closed, "callers that stopped waiting early blame no one");

    // A batch's requests run as tasks of their own, aborted (a moment later) when the batch is dropped.
    let batch = reasoner.reason_batch(vec![request(), request()]);
    assert!(safeguard_core::deadline::within(STEP, batch).await.is_err());
    let waited = std::time::Instant::now();
    while reasoner.status()[0].breaker != BreakerState::Open {
        assert!(waited.elapsed() < Duration::from_secs(5), "a batch dropped at its deadline counts too");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(stuck.calls.load(Ordering::SeqCst), 6);

    // A server that answers some requests while others run past the step's deadline is slow, not stuck: the
    // prompts of one step missing it together must not take it out of rotation.
    let slow_for_some: Script = Arc::new(|n| {
        let pause = if n % 2 == 0 { Duration::from_secs(600) } else { Duration::from_millis(100) };
        (StatusCode::OK, vllm_ok("0"), Some(pause))
    });
    let (url, busy) = serve(slow_for_some).await;
    let mut cfg = config(&[format!("{url}/v1")]);
    cfg.breaker_threshold = 2;
    let reasoner = RemoteReasoner::new(cfg).unwrap();
    let batch = reasoner.reason_batch((0..4).map(|_| request()).collect());
    assert!(safeguard_core::deadline::within(STEP, batch).await.is_err());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(busy.calls.load(Ordering::SeqCst), 4);
    assert!(reasoner.status().iter().all(|s| s.in_flight == 0), "the dropped attempts are let go");
    assert_eq!(reasoner.status()[0].breaker, BreakerState::Closed, "answering others, it is not blamed");
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

#[tokio::test]
async fn the_context_vllm_and_llama_server_report_bounds_requests_unless_the_operator_said() {
    // Two vLLM replicas of the model started with different `--max-model-len`, and two llama-servers: one whose
    // `/props` gives a slot's context, one (an older build, or behind a proxy) without `/props`.
    async fn server(max_model_len: Option<u64>, slot_context: Option<u64>) -> String {
        let card = match max_model_len {
            Some(tokens) => json!({"id": "openai/gpt-oss-safeguard-20b", "object": "model", "max_model_len": tokens}),
            None => json!({"id": "openai/gpt-oss-safeguard-20b", "object": "model", "meta": {"n_ctx_train": 131072}}),
        };
        let list = json!({"object": "list", "data": [card]});
        let mut app = Router::new().route("/v1/models", get(move || async move { Json(list) }));
        if let Some(n_ctx) = slot_context {
            // As llama-server answers it: at the root, beside a chat template and the rest of its settings.
            let props = json!({
                "default_generation_settings": {"n_ctx": n_ctx, "params": {"n_predict": -1}},
                "total_slots": 4,
                "model_path": "gpt-oss-safeguard-20b.gguf",
                "chat_template": "{{ messages }}",
                "n_ctx_train": 131072
            });
            app = app.route("/props", get(move || async move { Json(props) }));
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}/v1")
    }
    let vllm = [server(Some(32_768), None).await, server(Some(16_384), None).await];
    let old_llama = format!("llamacpp+{}", server(None, None).await);
    let urls = [vllm[0].clone(), vllm[1].clone(), old_llama.clone()];
    let reasoner = RemoteReasoner::new(config(&urls)).unwrap();
    assert_eq!(reasoner.context_tokens(), None, "unknown before the first probe");
    assert_eq!(reasoner.check_health().await, 3);
    assert_eq!(reasoner.context_tokens(), Some(16_384), "the smallest replica's, since any may take a request");

    let llama = format!("llamacpp+{}", server(None, Some(12_288)).await);
    let reasoner = RemoteReasoner::new(config(&[llama.clone(), old_llama])).unwrap();
    assert_eq!(reasoner.check_health().await, 2);
    assert_eq!(reasoner.context_tokens(), Some(12_288), "a slot's context, not the model's training context");
    let reasoner = RemoteReasoner::new(config(&[llama, vllm[1].clone()])).unwrap();
    reasoner.check_health().await;
    assert_eq!(reasoner.context_tokens(), Some(12_288));

    let mut told = config(&urls);
    told.context_tokens = Some(8_192);
    let reasoner = RemoteReasoner::new(told).unwrap();
    reasoner.check_health().await;
    assert_eq!(reasoner.context_tokens(), Some(8_192), "--backend-context wins over what servers report");
}

// ---- Streaming -------------------------------------------------------------------------------------------

/// How a streamed reply ends after its pieces.
#[derive(Clone, Copy, PartialEq)]
enum End {
    /// The body ends normally.
    Finish,
    /// The connection drops, as when the server process dies.
    Cut,
    /// The connection stays open and nothing more comes.
    Stall,
}

#[derive(Clone)]
struct Streamed {
    content_type: &'static str,
    pieces: Vec<String>,
    end: End,
}

/// The n-th request (0-based) gets `script(n)`: a streamed reply, or an error status.
type StreamScript = Arc<dyn Fn(usize) -> Result<Streamed, StatusCode> + Send + Sync>;

#[derive(Clone)]
struct StreamFake {
    script: StreamScript,
    calls: Arc<AtomicUsize>,
    bodies: Arc<Mutex<Vec<Value>>>,
    /// Pieces handed to the connection so far, over all requests.
    sent: Arc<AtomicUsize>,
    /// Each reply stops before this piece until the test adds a permit to `gate`.
    hold_before: Option<usize>,
    gate: Arc<Semaphore>,
}

const PAUSE: Duration = Duration::from_millis(10);

async fn handle_stream(State(fake): State<StreamFake>, Json(body): Json<Value>) -> Response {
    let n = fake.calls.fetch_add(1, Ordering::SeqCst);
    fake.bodies.lock().await.push(body);
    let reply = match (fake.script)(n) {
        Ok(reply) => reply,
        Err(status) => {
            return (status, Json(json!({"error": {"message": "busy", "code": status.as_u16()}}))).into_response();
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    let content_type = reply.content_type;
    tokio::spawn(async move {
        for (i, piece) in reply.pieces.into_iter().enumerate() {
            if Some(i) == fake.hold_before {
                fake.gate.acquire().await.unwrap().forget();
            }
            tokio::time::sleep(PAUSE).await;
            if tx.send(Ok(Bytes::from(piece))).await.is_err() {
                return;
            }
            fake.sent.fetch_add(1, Ordering::SeqCst);
        }
        match reply.end {
            End::Finish => {}
            End::Cut => {
                let _ = tx.send(Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "server died"))).await;
            }
            // Until the client hangs up.
            End::Stall => tx.closed().await,
        }
    });
    let body = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    Response::builder().header("content-type", content_type).body(Body::from_stream(body)).unwrap()
}

async fn serve_stream(script: StreamScript, hold_before: Option<usize>) -> (String, StreamFake) {
    let fake = StreamFake {
        script,
        calls: Arc::default(),
        bodies: Arc::default(),
        sent: Arc::default(),
        hold_before,
        gate: Arc::new(Semaphore::new(0)),
    };
    let app = Router::new()
        .route("/v1/chat/completions", post(handle_stream))
        .route("/api/chat", post(handle_stream))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), fake)
}

/// vLLM's streamed Chat Completions as documented: a role chunk, reasoning deltas (`reasoning_content` on
/// older releases, both names on newer ones), answer deltas, a finish chunk, the usage chunk that
/// `stream_options.include_usage` asks for, then `[DONE]`. Each SSE event is one network piece.
fn vllm_events(reasoning: &[&str], answer: &[&str], finish: &str) -> Vec<String> {
    let chunk = |delta: Value, finish_reason: Value| {
        json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1_760_000_000,
               "model": "openai/gpt-oss-safeguard-20b",
               "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}]})
    };
    let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), Value::Null)];
    for (i, piece) in reasoning.iter().enumerate() {
        events.push(chunk(
            if i % 2 == 0 {
                json!({"reasoning_content": piece})
            } else {
                json!({"reasoning": piece, "reasoning_content": piece})
            },
            Value::Null,
        ));
    }
    for piece in answer {
        events.push(chunk(json!({"content": piece}), Value::Null));
    }
    events.push(chunk(json!({"content": ""}), json!(finish)));
    events.push(json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1_760_000_000,
        "model": "openai/gpt-oss-safeguard-20b", "choices": [],
        "usage": {"prompt_tokens": 300, "completion_tokens": 20, "total_tokens": 320, "prompt_tokens_details": {"cached_tokens": 256}}}));
    let mut pieces: Vec<String> = events.iter().map(|e| format!("data: {e}\n\n")).collect();
    pieces.push("data: [DONE]\n\n".to_string());
    pieces
}

const REASONING_PIECES: [&str; 3] = ["The content", " asks for", " a password."];

fn sse(pieces: Vec<String>, end: End) -> Streamed {
    Streamed { content_type: "text/event-stream; charset=utf-8", pieces, end }
}

fn drain(receiver: &mut UnboundedReceiver<ReasonDelta>) -> Vec<ReasonDelta> {
    let mut deltas = Vec::new();
    while let Ok(delta) = receiver.try_recv() {
        deltas.push(delta);
    }
    deltas
}

fn joined(deltas: &[ReasonDelta]) -> (String, String) {
    let mut reasoning = String::new();
    let mut answer = String::new();
    for delta in deltas {
        match delta {
            ReasonDelta::Reasoning(text) => reasoning.push_str(text),
            ReasonDelta::Final(text) => answer.push_str(text),
        }
    }
    (reasoning, answer)
}

/// Timings are the only part of an output that depends on the clock.
fn without_timings(mut output: ReasonOutput) -> ReasonOutput {
    output.timings = Timings::default();
    output
}

#[tokio::test]
async fn vllm_stream_arrives_in_pieces_and_matches_the_whole_answer() {
    let pieces = vllm_events(&REASONING_PIECES, &["1"], "stop");
    let total = pieces.len();
    // The server sends the role and the first reasoning piece, then waits for the test.
    let (url, fake) = serve_stream(Arc::new(move |_| Ok(sse(pieces.clone(), End::Finish))), Some(2)).await;
    let reasoner = RemoteReasoner::new(config(&[format!("{url}/v1")])).unwrap();
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn({
        let reasoner = reasoner.clone();
        async move { reasoner.reason_streaming(request(), sender).await }
    });

    let first = tokio::time::timeout(Duration::from_secs(5), receiver.recv()).await.expect("a delta before the end");
    assert_eq!(first, Some(ReasonDelta::Reasoning("The content".into())));
    assert_eq!(fake.sent.load(Ordering::SeqCst), 2, "the server is still holding back the rest");
    assert!(!task.is_finished());
    fake.gate.add_permits(1);
    let streamed = task.await.unwrap().unwrap();

    let mut deltas = vec![first.unwrap()];
    deltas.extend(drain(&mut receiver));
    assert_eq!(fake.sent.load(Ordering::SeqCst), total);
    assert_eq!(deltas.len(), 4, "one delta per piece of text: {deltas:?}");
    let (reasoning, answer) = joined(&deltas);

    // The same completion asked for whole gives the same output, and the pieces add up to it.
    let (whole_url, _) = serve(always(StatusCode::OK, vllm_ok("1"))).await;
    let whole = RemoteReasoner::new(config(&[format!("{whole_url}/v1")])).unwrap().reason(request()).await.unwrap();
    assert_eq!(without_timings(streamed.clone()), without_timings(whole));
    assert_eq!(Some(reasoning), streamed.analysis);
    assert_eq!(Some(answer), streamed.final_text);
    assert_eq!(streamed.usage.prompt_tokens, 300);
    assert_eq!(streamed.usage.completion_tokens, 20);
    assert_eq!(streamed.usage.cached_prompt_tokens, 256);

    let sent = fake.bodies.lock().await[0].clone();
    assert_eq!(sent["stream"], true);
    assert_eq!(sent["stream_options"]["include_usage"], true);
    assert_eq!(sent["reasoning_effort"], "high");
    assert_eq!(reasoner.status()[0].in_flight, 0);
}

#[tokio::test]
async fn llama_server_stream_carries_usage_and_timings_on_its_last_chunk() {
    let chunk = |delta: Value, finish: Value, extra: Value| {
        let mut c = json!({"choices": [{"finish_reason": finish, "index": 0, "delta": delta}], "created": 1,
            "id": "chatcmpl-x", "model": "gpt-oss-safeguard-20b", "system_fingerprint": "b6000", "object": "chat.completion.chunk"});
        if let Value::Object(extra) = extra {
            c.as_object_mut().unwrap().extend(extra);
        }
        format!("data: {c}\n\n")
    };
    let pieces = vec![
        chunk(json!({"role": "assistant", "content": null}), Value::Null, Value::Null),
        chunk(json!({"reasoning_content": "Bulk "}), Value::Null, Value::Null),
        chunk(json!({"reasoning_content": "offer."}), Value::Null, Value::Null),
        chunk(json!({"content": "INVALID"}), Value::Null, Value::Null),
        chunk(
            json!({}),
            json!("stop"),
            json!({"usage": {"completion_tokens": 20, "prompt_tokens": 300, "total_tokens": 320},
                   "timings": {"cache_n": 256, "prompt_n": 44, "prompt_ms": 120.5, "predicted_n": 20, "predicted_ms": 400.0}}),
        ),
        "data: [DONE]\n\n".to_string(),
    ];
    let (url, fake) = serve_stream(Arc::new(move |_| Ok(sse(pieces.clone(), End::Finish))), None).await;
    let reasoner = RemoteReasoner::new(config(&[format!("llamacpp+{url}/v1")])).unwrap();
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
    let out = reasoner.reason_streaming(request(), sender).await.unwrap();
    let deltas = drain(&mut receiver);
    assert_eq!(deltas.len(), 3, "{deltas:?}");
    assert_eq!(joined(&deltas), ("Bulk offer.".to_string(), "INVALID".to_string()));
    assert_eq!(out.final_text.as_deref(), Some("INVALID"));
    assert_eq!(out.usage.cached_prompt_tokens, 256);
    assert_eq!(out.timings.prefill_ms, 120.5);
    assert_eq!(out.timings.decode_ms, 400.0);
    assert_eq!(fake.bodies.lock().await[0]["chat_template_kwargs"]["reasoning_effort"], "high");
}

#[tokio::test]
async fn ollama_native_stream_is_ndjson_with_thinking() {
    let line = |message: Value, done: bool| json!({"model": "gpt-oss-safeguard:20b", "created_at": "2026-01-01T00:00:00Z", "message": message, "done": done});
    let mut closing = line(json!({"role": "assistant", "content": ""}), true);
    closing.as_object_mut().unwrap().extend(
        json!({"done_reason": "stop", "total_duration": 900_000_000u64, "prompt_eval_count": 120,
               "prompt_eval_duration": 350_000_000u64, "eval_count": 9, "eval_duration": 500_000_000u64})
        .as_object()
        .unwrap()
        .clone(),
    );
    let pieces: Vec<String> = [
        line(json!({"role": "assistant", "content": "", "thinking": "a "}), false),
        line(json!({"role": "assistant", "content": "", "thinking": "greeting"}), false),
        line(json!({"role": "assistant", "content": "0"}), false),
        closing,
    ]
    .iter()
    .map(|l| format!("{l}\n"))
    .collect();
    let script: StreamScript = Arc::new(move |_| {
        Ok(Streamed { content_type: "application/x-ndjson", pieces: pieces.clone(), end: End::Finish })
    });
    let (url, fake) = serve_stream(script, None).await;
    let reasoner = RemoteReasoner::new(config(&[format!("ollama+{url}")])).unwrap();
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
    let out = reasoner.reason_streaming(request(), sender).await.unwrap();
    let deltas = drain(&mut receiver);
    assert_eq!(deltas.len(), 3, "{deltas:?}");
    assert_eq!(joined(&deltas), ("a greeting".to_string(), "0".to_string()));
    assert_eq!(out.analysis.as_deref(), Some("a greeting"));
    assert_eq!(out.final_text.as_deref(), Some("0"));
    assert_eq!(out.usage.prompt_tokens, 120);
    assert_eq!(out.usage.completion_tokens, 9);
    assert_eq!(out.timings.prefill_ms, 350.0);
    let sent = fake.bodies.lock().await[0].clone();
    assert_eq!(sent["stream"], true);
    assert_eq!(sent["think"], "high");
}

#[tokio::test]
async fn a_stream_cut_after_reasoning_went_out_is_an_error_and_tells_no_answer() {
    // Reasoning and a complete-looking "0" arrive, then the server dies before saying it is done.
    let mut pieces = vllm_events(&REASONING_PIECES, &["0"], "stop");
    pieces.truncate(5);
    let (url, fake) = serve_stream(Arc::new(move |_| Ok(sse(pieces.clone(), End::Cut))), None).await;
    let reasoner = RemoteReasoner::new(config(&[format!("{url}/v1")])).unwrap();
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
    let err = reasoner.reason_streaming(request(), sender).await.unwrap_err();
    let message = err.to_string();
    assert!(message.contains("backend 1") && message.contains("not retried"), "{message}");
    assert!(!message.contains(&url), "errors reach clients, so they name no internal address: {message}");
    assert_eq!(fake.calls.load(Ordering::SeqCst), 1, "a retry would stream a second beginning");
    // The reasoning streamed as it came; the "0" was never told, since the stream never said it was done.
    assert_eq!(joined(&drain(&mut receiver)), ("The content asks for a password.".to_string(), String::new()));
    assert_eq!(reasoner.status()[0].in_flight, 0);

    // A server that closes the stream cleanly but early is no better.
    let mut early = vllm_events(&REASONING_PIECES, &["0"], "stop");
    early.truncate(5);
    let (url, _) = serve_stream(Arc::new(move |_| Ok(sse(early.clone(), End::Finish))), None).await;
    let reasoner = RemoteReasoner::new(config(&[format!("{url}/v1")])).unwrap();
    let (sender, _receiver) = tokio::sync::mpsc::unbounded_channel();
    let err = reasoner.reason_streaming(request(), sender).await.unwrap_err();
    assert!(err.to_string().contains("ended before the answer was complete"), "{err}");
}

/// A stream that ends after its finish chunk without the usage chunk still bills its prompt and completion.
#[tokio::test]
async fn a_stream_without_usage_is_billed_an_estimate_not_zero() {
    let mut pieces = vllm_events(&REASONING_PIECES, &["1"], "stop");
    // Drop the usage chunk and `[DONE]`: the connection closed right after the finish chunk.
    pieces.truncate(pieces.len() - 2);
    let (url, _) = serve_stream(Arc::new(move |_| Ok(sse(pieces.clone(), End::Finish))), None).await;
    let reasoner = RemoteReasoner::new(config(&[format!("{url}/v1")])).unwrap();
    let (sender, _receiver) = tokio::sync::mpsc::unbounded_channel();
    let out = reasoner.reason_streaming(request(), sender).await.unwrap();
    assert_eq!(out.final_text.as_deref(), Some("1"));
    assert!(out.usage.completion_tokens > 0, "{:?}", out.usage);
    assert!(out.usage.prompt_tokens > 0, "{:?}", out.usage);

    let mut whole = vllm_ok("1");
    whole.as_object_mut().unwrap().remove("usage");
    let (whole_url, _) = serve(always(StatusCode::OK, whole)).await;
    let out = RemoteReasoner::new(config(&[format!("{whole_url}/v1")])).unwrap().reason(request()).await.unwrap();
    assert!(out.usage.completion_tokens > 0 && out.usage.prompt_tokens > 0, "{:?}", out.usage);
}

#[tokio::test]
async fn failures_before_the_first_delta_are_retried_without_repeating_text() {
    let full = vllm_events(&REASONING_PIECES, &["1"], "stop");
    let script: StreamScript = Arc::new(move |n| match n {
        0 => Err(StatusCode::SERVICE_UNAVAILABLE),
        // Only the role chunk, which carries no text, before the connection drops.
        1 => Ok(sse(full[..1].to_vec(), End::Cut)),
        _ => Ok(sse(full.clone(), End::Finish)),
    });
    let (url, fake) = serve_stream(script, None).await;
    let reasoner = RemoteReasoner::new(config(&[format!("{url}/v1")])).unwrap();
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
    let out = reasoner.reason_streaming(request(), sender).await.unwrap();
    assert_eq!(fake.calls.load(Ordering::SeqCst), 3);
    assert_eq!(joined(&drain(&mut receiver)), ("The content asks for a password.".to_string(), "1".to_string()));
    assert_eq!(out.final_text.as_deref(), Some("1"));
    assert_eq!(reasoner.status()[0].breaker, BreakerState::Closed);
}

#[tokio::test]
async fn a_stalled_stream_fails_clearly_at_the_idle_timeout() {
    let mut pieces = vllm_events(&REASONING_PIECES, &["0"], "stop");
    pieces.truncate(2);
    let (url, fake) = serve_stream(Arc::new(move |_| Ok(sse(pieces.clone(), End::Stall))), None).await;
    let mut cfg = config(&[format!("{url}/v1")]);
    cfg.stream_idle_timeout = Duration::from_millis(300);
    let reasoner = RemoteReasoner::new(cfg).unwrap();
    let (sender, _receiver) = tokio::sync::mpsc::unbounded_channel();
    let started = std::time::Instant::now();
    let err = reasoner.reason_streaming(request(), sender).await.unwrap_err();
    assert!(err.to_string().contains("stalled") && err.to_string().contains("0.3 s"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3), "well before the 5 s request timeout");
    assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_error_event_in_the_stream_is_an_error() {
    let pieces = vec![
        "data: {\"error\": {\"object\": \"error\", \"message\": \"Harmony does not support this request\", \"type\": \"BadRequestError\", \"code\": 400}}\n\n".to_string(),
        "data: [DONE]\n\n".to_string(),
    ];
    let (url, fake) = serve_stream(Arc::new(move |_| Ok(sse(pieces.clone(), End::Finish))), None).await;
    let reasoner = RemoteReasoner::new(config(&[format!("{url}/v1")])).unwrap();
    let (sender, _receiver) = tokio::sync::mpsc::unbounded_channel();
    let err = reasoner.reason_streaming(request(), sender).await.unwrap_err();
    assert!(err.to_string().contains("Harmony does not support"), "{err}");
    assert_eq!(fake.calls.load(Ordering::SeqCst), 1, "a rejected request fails the same way again");
}

#[tokio::test]
async fn no_answer_in_the_stream_is_no_answer_as_when_whole() {
    // The budget ran out while reasoning: no content, finish reason "length".
    let pieces = vllm_events(&REASONING_PIECES, &[], "length");
    let (url, _) = serve_stream(Arc::new(move |_| Ok(sse(pieces.clone(), End::Finish))), None).await;
    let reasoner = RemoteReasoner::new(config(&[format!("{url}/v1")])).unwrap();
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
    let out = reasoner.reason_streaming(request(), sender).await.unwrap();
    assert!(out.truncated);
    assert_eq!(out.final_text, None);
    assert_eq!(joined(&drain(&mut receiver)).1, "");

    let whole = json!({"choices": [{"index": 0, "finish_reason": "length",
        "message": {"role": "assistant", "content": null, "reasoning": "The content asks for a password."}}],
        "usage": {"prompt_tokens": 300, "completion_tokens": 20, "prompt_tokens_details": {"cached_tokens": 256}}});
    let (whole_url, _) = serve(always(StatusCode::OK, whole)).await;
    let plain = RemoteReasoner::new(config(&[format!("{whole_url}/v1")])).unwrap().reason(request()).await.unwrap();
    assert_eq!(without_timings(out), without_timings(plain));
}

#[tokio::test]
async fn a_server_that_ignores_stream_still_answers_through_the_stream() {
    let (url, fake) = serve(always(StatusCode::OK, vllm_ok("1"))).await;
    let reasoner = RemoteReasoner::new(config(&[format!("{url}/v1")])).unwrap();
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
    let out = reasoner.reason_streaming(request(), sender).await.unwrap();
    assert_eq!(out.final_text.as_deref(), Some("1"));
    assert_eq!(
        drain(&mut receiver),
        vec![ReasonDelta::Reasoning("The content asks for a password.".into()), ReasonDelta::Final("1".into())]
    );
    assert_eq!(fake.bodies.lock().await[0]["stream"], true);
}

/// A server that answers every request with 429 and `Retry-After: {retry_after}`, counting its calls.
async fn serve_rate_limited(retry_after: &'static str) -> (String, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let limited = move || {
        let calls = counted.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            let mut response = (StatusCode::TOO_MANY_REQUESTS, Json(json!({"error": "slow down"}))).into_response();
            response.headers_mut().insert("retry-after", retry_after.parse().unwrap());
            response
        }
    };
    let app = Router::new().route("/v1/chat/completions", post(limited));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/v1"), calls)
}

/// A gateway asking for an hour must not park the request for an hour: a `Retry-After` beyond `backoff_max`
/// ends the retries to that endpoint at once, with the server's answer as the error.
#[tokio::test]
async fn a_retry_after_beyond_backoff_max_is_not_waited_for() {
    let (url, calls) = serve_rate_limited("3600").await;
    let mut cfg = config(&[url]);
    cfg.max_attempts = 3;
    cfg.backoff_max = Duration::from_secs(1);
    let reasoner = RemoteReasoner::new(cfg).unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), reasoner.reason(request()))
        .await
        .expect("the request returns within seconds, not after the server's hour")
        .unwrap_err();
    assert!(matches!(&err, ReasonError::Backend(m) if m.contains("429") && m.contains("3600 s")), "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the endpoint that asked for an hour is not retried");
}

/// One endpoint's `Retry-After` holds up only retries to that endpoint: the retry that fails over to another
/// goes out at once, and one that asked for too long is passed over.
#[tokio::test]
async fn a_retry_after_applies_only_to_its_own_endpoint() {
    for asked in ["3", "3600"] {
        let (limited_url, limited_calls) = serve_rate_limited(asked).await;
        let (good_url, good) = serve(always(StatusCode::OK, vllm_ok("1"))).await;
        let mut cfg = config(&[limited_url, format!("{good_url}/v1")]);
        cfg.backoff_max = Duration::from_secs(5);
        let reasoner = RemoteReasoner::new(cfg).unwrap();
        let started = std::time::Instant::now();
        let out = tokio::time::timeout(Duration::from_secs(10), reasoner.reason(request()))
            .await
            .expect("the request finishes")
            .unwrap();
        assert_eq!(out.final_text.as_deref(), Some("1"));
        assert_eq!(limited_calls.load(Ordering::SeqCst), 1, "Retry-After {asked}: the first attempt was rate limited");
        assert_eq!(good.calls.load(Ordering::SeqCst), 1);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "Retry-After {asked}: the failover waited {:?}, as if the other endpoint had asked",
            started.elapsed()
        );
    }
}

// ---- What a backend says is not taken on trust ------------------------------------------------------------

/// A backend reporting 2^64 - 1 tokens (a bug, or a hostile endpoint) is counted at the most the request allows:
/// the completion at the `max_tokens` it was sent, the prompt at what the messages sent can tokenize to. Summed
/// or charged to the token budget, the raw count would overflow or lock the budget until a restart.
#[tokio::test]
async fn absurd_token_counts_are_held_to_what_the_request_allows() {
    let huge = json!({"prompt_tokens": u64::MAX, "completion_tokens": u64::MAX, "total_tokens": u64::MAX,
        "prompt_tokens_details": {"cached_tokens": u64::MAX}});
    let mut whole = vllm_ok("1");
    whole["usage"] = huge.clone();
    let (url, _) = serve(always(StatusCode::OK, whole)).await;
    let reasoner = RemoteReasoner::new(config(&[format!("{url}/v1")])).unwrap();
    let mut req = request();
    req.max_tokens = 512;
    let out = reasoner.reason(req.clone()).await.unwrap();
    assert_eq!(out.final_text.as_deref(), Some("1"), "the answer itself stands");
    assert_eq!(out.usage.completion_tokens, 512);
    assert!(out.usage.prompt_tokens < 10_000, "{:?}", out.usage);
    assert!(out.usage.cached_prompt_tokens <= out.usage.prompt_tokens, "{:?}", out.usage);
    assert!(i64::try_from(out.usage.billed_tokens()).is_ok(), "storable: {:?}", out.usage);

    // Streamed, the counts arrive in the usage chunk; Ollama's native API has its own names for them.
    let mut pieces = vllm_events(&REASONING_PIECES, &["1"], "stop");
    let usage_chunk = pieces.len() - 2;
    pieces[usage_chunk] = format!("data: {}\n\n", json!({"choices": [], "usage": huge}));
    let (url, _) = serve_stream(Arc::new(move |_| Ok(sse(pieces.clone(), End::Finish))), None).await;
    let reasoner = RemoteReasoner::new(config(&[format!("{url}/v1")])).unwrap();
    let (sender, _receiver) = tokio::sync::mpsc::unbounded_channel();
    let out = reasoner.reason_streaming(request(), sender).await.unwrap();
    assert_eq!(out.usage.completion_tokens, 8192, "the high-effort budget that was sent");
    assert!(out.usage.prompt_tokens < 10_000, "{:?}", out.usage);

    let reply = json!({"model": "gpt-oss-safeguard:20b", "message": {"role": "assistant", "content": "0", "thinking": "a greeting"},
        "done": true, "done_reason": "stop", "prompt_eval_count": u64::MAX, "eval_count": u64::MAX});
    let (url, _) = serve(always(StatusCode::OK, reply)).await;
    let reasoner = RemoteReasoner::new(config(&[format!("ollama+{url}")])).unwrap();
    let out = reasoner.reason(req).await.unwrap();
    assert_eq!(out.usage.completion_tokens, 512);
    assert!(out.usage.prompt_tokens < 10_000, "{:?}", out.usage);
}

/// An endpoint's URL may carry credentials (`http://user:pass@host`), and its address is internal. Backend errors
/// become a decision's failure reason, which API clients, webhooks and the review page show: they name the endpoint
/// by its place among the configured ones, with the status and a short one-line excerpt of what the server said,
/// and never its credentials or address (those are for the logs and `status()`).
#[tokio::test]
async fn backend_errors_name_the_endpoint_without_its_credentials() {
    let page = format!(
        "{{\"error\": \"unknown model\"}}\n\u{1b}[31mforged log line\r\n\u{202e}{}",
        "stack frame ".repeat(200)
    );
    let (url, fake) = serve(always(StatusCode::BAD_REQUEST, json!(page))).await;
    let host = url.trim_start_matches("http://").to_string();
    let reasoner = RemoteReasoner::new(config(&[format!("http://operator:hunter2@{host}/v1")])).unwrap();
    let message = reasoner.reason(request()).await.unwrap_err().to_string();
    assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
    for secret in ["hunter2", "operator"] {
        assert!(!message.contains(secret), "{secret} leaked: {message}");
    }
    assert!(message.contains("backend 1") && message.contains("400") && message.contains("unknown model"), "{message}");
    assert!(!message.contains(&host), "{message}");
    assert!(!message.chars().any(|c| c.is_control() || c == '\u{202e}'), "{message:?}");
    assert!(message.chars().count() < 400, "a short excerpt, not the page: {message}");
    assert!(reasoner.status().iter().all(|s| !s.url.contains("hunter2")));

    // A transport failure (nothing listens there) names the endpoint the same way.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_host = closed.local_addr().unwrap().to_string();
    drop(closed);
    let mut cfg = config(&[format!("http://operator:hunter2@{closed_host}/v1")]);
    cfg.max_attempts = 1;
    let message = RemoteReasoner::new(cfg).unwrap().reason(request()).await.unwrap_err().to_string();
    assert!(!message.contains("hunter2") && !message.contains("operator"), "{message}");
    assert!(message.contains("backend 1") && !message.contains(&closed_host), "{message}");

    // A startup error about a bad URL shows no credentials either.
    let refused = "ftp://operator:hunter2@host/v1".parse::<EndpointConfig>().unwrap_err().to_string();
    assert!(!refused.contains("hunter2"), "{refused}");
}

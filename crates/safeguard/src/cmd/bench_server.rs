//! `safeguard bench server`: the latency the service adds over a direct backend call.
//!
//! In one run: a fast loopback backend that answers in vLLM's documented Chat Completions shape at once,
//! then (1) requests straight to it and (2) the same load through `safeguard serve`'s `/v1/classify`
//! (parsing, policy resolution, prompt, remote call, validation, storage in SQLite), both open-loop at a fixed
//! rate. The overhead is the difference of the two latency distributions.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Json;
use axum::routing::post;
use safeguard_remote::{RemoteConfig, RemoteReasoner};
use safeguard_server::{Server, ServerConfig};
use safeguard_store::Store;
use serde_json::{Value, json};

#[derive(clap::Args)]
pub struct ServerArgs {
    /// Requests per phase.
    #[arg(long, default_value_t = 5000)]
    pub requests: usize,
    /// Offered load, requests per second (open loop: sends keep their schedule whatever the latency).
    #[arg(long, default_value_t = 1000)]
    pub rate: u32,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: ServerArgs) -> anyhow::Result<ExitCode> {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the runtime")?;
    runtime.block_on(measure(args))
}

/// What vLLM returns for a binary policy: reasoning, a one-character answer, usage with cached tokens.
fn canned_completion() -> Value {
    json!({"id": "chatcmpl-bench", "object": "chat.completion", "model": "openai/gpt-oss-safeguard-20b",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "0",
            "reasoning": "A friendly greeting with no promotion. It does not violate the policy."}}],
        "usage": {"prompt_tokens": 640, "completion_tokens": 24, "total_tokens": 664,
            "prompt_tokens_details": {"cached_tokens": 612}}})
}

async fn start_backend() -> anyhow::Result<SocketAddr> {
    let body = canned_completion();
    let app = axum::Router::new().route("/v1/chat/completions", post(move || std::future::ready(Json(body.clone()))));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

/// Sends `count` requests at `rate`/s, each on its own task, and returns their latencies in ms (failures
/// are counted apart, not hidden in the distribution).
async fn open_loop(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
    count: usize,
    rate: u32,
) -> anyhow::Result<(Vec<f64>, usize)> {
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..count {
        ticker.tick().await;
        let (client, url, body) = (client.clone(), url.to_string(), body.clone());
        tasks.spawn(async move {
            let started = Instant::now();
            let ok = matches!(client.post(&url).json(&body).send().await, Ok(r) if r.status().is_success());
            (started.elapsed().as_secs_f64() * 1e3, ok)
        });
    }
    let mut latencies = Vec::with_capacity(count);
    let mut failures = 0;
    while let Some(joined) = tasks.join_next().await {
        let (ms, ok) = joined?;
        if ok { latencies.push(ms) } else { failures += 1 }
    }
    latencies.sort_by(f64::total_cmp);
    Ok((latencies, failures))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn measure(args: ServerArgs) -> anyhow::Result<ExitCode> {
    let backend = start_backend().await?;
    let backend_url = format!("http://{backend}/v1");
    let mut remote = RemoteConfig::new("openai/gpt-oss-safeguard-20b", vec![backend_url.parse()?]);
    if let Some(endpoint) = remote.endpoints.first_mut() {
        endpoint.max_concurrency = 256;
    }
    let reasoner = Arc::new(RemoteReasoner::new(remote)?);

    let data = std::env::temp_dir().join(format!("safeguard-bench-{}", std::process::id()));
    std::fs::create_dir_all(&data)?;
    let store = Store::open_sqlite(&data.join("bench.db")).await?;
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse()?,
        rate_limit_per_minute: 0,
        job_workers: 1,
        ..ServerConfig::default()
    };
    let server = Server::start(config, reasoner, store).await?;
    let client = reqwest::Client::builder().pool_max_idle_per_host(512).build()?;

    let direct_body = json!({"model": "openai/gpt-oss-safeguard-20b", "reasoning_effort": "low", "max_tokens": 2048,
        "messages": [{"role": "system", "content": "spam policy"}, {"role": "user", "content": "hello there, friend"}]});
    let classify_body = json!({"text": "hello there, friend", "policies": ["spam"], "effort": "low"});
    // Warm connections, the policy cache and SQLite before measuring.
    open_loop(&client, &format!("{backend_url}/chat/completions"), &direct_body, 200, args.rate).await?;
    open_loop(&client, &format!("http://{}/v1/classify", server.addr), &classify_body, 200, args.rate).await?;

    let (direct, direct_failures) =
        open_loop(&client, &format!("{backend_url}/chat/completions"), &direct_body, args.requests, args.rate).await?;
    let (served, served_failures) =
        open_loop(&client, &format!("http://{}/v1/classify", server.addr), &classify_body, args.requests, args.rate)
            .await?;
    server.shutdown().await?;
    let _ = std::fs::remove_dir_all(&data);

    let (d50, d99) = (percentile(&direct, 0.50), percentile(&direct, 0.99));
    let (s50, s99) = (percentile(&served, 0.50), percentile(&served, 0.99));
    let report = json!({
        "requests": args.requests, "rate_per_sec": args.rate,
        "direct_ms": {"p50": d50, "p99": d99, "failures": direct_failures},
        "through_server_ms": {"p50": s50, "p99": s99, "failures": served_failures},
        "overhead_ms": {"p50": s50 - d50, "p99": s99 - d99},
        "ratio": {"p50": s50 / d50, "p99": s99 / d99},
        "goal_p99_overhead_ms": 2.0,
    });
    if args.json {
        println!("{report}");
    } else {
        println!("server overhead at {} req/s, {} requests per phase (open loop)", args.rate, args.requests);
        println!("  direct backend call   p50 {d50:7.3} ms   p99 {d99:7.3} ms   failures {direct_failures}");
        println!("  through /v1/classify  p50 {s50:7.3} ms   p99 {s99:7.3} ms   failures {served_failures}");
        println!(
            "  overhead              p50 {:7.3} ms   p99 {:7.3} ms   (×{:.2} / ×{:.2}; goal: p99 overhead ≤ 2 ms)",
            s50 - d50,
            s99 - d99,
            s50 / d50,
            s99 / d99
        );
    }
    Ok(ExitCode::SUCCESS)
}

//! `safeguard bench server`: the latency the service adds over a direct backend call.
//!
//! In one run: a fast loopback backend that answers in vLLM's documented Chat Completions shape at once,
//! then (1) requests straight to it and (2) the same load through `safeguard serve`'s `/v1/classify`
//! (parsing, policy resolution, prompt, remote call, validation, storage in SQLite), open-loop at a fixed
//! rate. The overhead is the difference of the two latency distributions.
//!
//! The two arms take turns in short blocks of one schedule rather than running one after the other. On a shared
//! virtual machine the hypervisor takes the CPU away in bursts (10–27 % steal for seconds at a time was seen
//! here), and a burst that fell on one whole phase showed up as overhead, or hid it. Alternating blocks put each
//! burst on both arms alike.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Json;
use axum::routing::post;
use safeguard_remote::{RemoteConfig, RemoteReasoner};
use safeguard_server::{Server, ServerConfig, parse_server_timing};
use safeguard_store::{SqliteSync, Store, StoreOptions};
use serde_json::{Value, json};

#[derive(clap::Args)]
pub struct ServerArgs {
    /// Requests to each arm (straight to the backend, and through the server).
    #[arg(long, default_value_t = 5000)]
    pub requests: usize,
    /// Offered load, requests per second (open loop: sends keep their schedule whatever the latency).
    #[arg(long, default_value_t = 1000)]
    pub rate: u32,
    /// Requests in a row to one arm before the other arm's turn.
    #[arg(long, default_value_t = 100)]
    pub block: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// SQLite commit durability for the server under test (`serve --sqlite-sync`).
    #[arg(long, default_value = "normal", value_name = "normal|full")]
    pub sqlite_sync: SqliteSync,
    /// How long the server trusts a policy name's active version (`serve --lookup-ttl-ms`); 0 asks the store
    /// on every request.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pub lookup_ttl_ms: u64,
    /// How often SQLite's log is checkpointed (`serve --checkpoint-ms`).
    #[arg(long, default_value_t = safeguard_store::CHECKPOINT_EVERY.as_millis() as u64, value_name = "MS")]
    pub checkpoint_ms: u64,
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

/// One phase's results: latencies in ms (sorted), failures (counted apart, not hidden in the distribution),
/// and the `Server-Timing` stages each successful reply reported.
struct Phase {
    latencies: Vec<f64>,
    failures: usize,
    stages: BTreeMap<String, Vec<f64>>,
    /// Client-observed latency minus the server's own `total`: HTTP, routing, auth, body parsing, the reply.
    outside_handler: Vec<f64>,
}

/// One arm of the benchmark: where its requests go.
struct Arm {
    url: String,
    body: Value,
}

/// Sends `per_arm` requests to each arm at `rate`/s in all, each on its own task; the arms take turns every
/// `block` requests.
async fn open_loop(
    client: &reqwest::Client,
    arms: &[Arm],
    per_arm: usize,
    rate: u32,
    block: usize,
) -> anyhow::Result<Vec<Phase>> {
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let block = block.max(1);
    let mut tasks = tokio::task::JoinSet::new();
    for sent in 0..per_arm * arms.len() {
        ticker.tick().await;
        let arm = (sent / block) % arms.len();
        let (client, url, body) = (client.clone(), arms[arm].url.clone(), arms[arm].body.clone());
        tasks.spawn(async move {
            let started = Instant::now();
            let response = client.post(&url).json(&body).send().await.ok().filter(|r| r.status().is_success());
            let stages = response
                .as_ref()
                .and_then(|r| r.headers().get("server-timing"))
                .and_then(|v| v.to_str().ok())
                .map(parse_server_timing)
                .unwrap_or_default();
            // The body is part of the latency a client sees.
            let ok = match response {
                Some(r) => r.bytes().await.is_ok(),
                None => false,
            };
            (arm, started.elapsed().as_secs_f64() * 1e3, ok, stages)
        });
    }
    let mut phases: Vec<Phase> = arms
        .iter()
        .map(|_| Phase {
            latencies: Vec::with_capacity(per_arm),
            failures: 0,
            stages: BTreeMap::new(),
            outside_handler: Vec::new(),
        })
        .collect();
    while let Some(joined) = tasks.join_next().await {
        let (arm, ms, ok, stages) = joined?;
        let phase = &mut phases[arm];
        if !ok {
            phase.failures += 1;
            continue;
        }
        phase.latencies.push(ms);
        for (stage, took) in stages {
            if stage == "total" {
                phase.outside_handler.push(ms - took);
            }
            phase.stages.entry(stage).or_default().push(took);
        }
    }
    for phase in &mut phases {
        phase.latencies.sort_by(f64::total_cmp);
        phase.outside_handler.sort_by(f64::total_cmp);
        for samples in phase.stages.values_mut() {
            samples.sort_by(f64::total_cmp);
        }
    }
    Ok(phases)
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
    let store = Store::open_sqlite_with(
        &data.join("bench.db"),
        StoreOptions {
            sqlite_sync: args.sqlite_sync,
            checkpoint_every: Duration::from_millis(args.checkpoint_ms.max(1)),
            ..StoreOptions::default()
        },
    )
    .await?;
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse()?,
        rate_limit_per_minute: 0,
        job_workers: 1,
        lookup_ttl: Duration::from_millis(args.lookup_ttl_ms),
        ..ServerConfig::default()
    };
    let server = Server::start(config, reasoner, store.clone()).await?;
    let client = reqwest::Client::builder().pool_max_idle_per_host(512).build()?;

    let arms = [
        Arm {
            url: format!("{backend_url}/chat/completions"),
            body: json!({"model": "openai/gpt-oss-safeguard-20b", "reasoning_effort": "low", "max_tokens": 2048,
                "messages": [{"role": "system", "content": "spam policy"},
                    {"role": "user", "content": "hello there, friend"}]}),
        },
        Arm {
            url: format!("http://{}/v1/classify", server.addr),
            body: json!({"text": "hello there, friend", "policies": ["spam"], "effort": "low"}),
        },
    ];
    // Warm connections, the policy cache and SQLite before measuring.
    open_loop(&client, &arms, 200, args.rate, args.block).await?;
    let mut phases = open_loop(&client, &arms, args.requests, args.rate, args.block).await?.into_iter();
    let (Some(direct), Some(served)) = (phases.next(), phases.next()) else {
        anyhow::bail!("the benchmark lost an arm");
    };
    let checkpoints = store.checkpoint_stats();
    // Nonzero only if the checkpointer fell behind and the writer had to bound the log itself.
    let limit_checkpoints = store.group_commit_stats().log_limit_checkpoints;
    server.shutdown().await?;
    let _ = std::fs::remove_dir_all(&data);

    let (d50, d99) = (percentile(&direct.latencies, 0.50), percentile(&direct.latencies, 0.99));
    let (s50, s99) = (percentile(&served.latencies, 0.50), percentile(&served.latencies, 0.99));
    let mut stages: Vec<(String, &[f64])> = served.stages.iter().map(|(k, v)| (k.clone(), v.as_slice())).collect();
    stages.push(("outside handler".into(), &served.outside_handler));
    let stage_json: serde_json::Map<String, Value> = stages
        .iter()
        .map(|(name, samples)| {
            (
                name.clone(),
                json!({"p50": percentile(samples, 0.5), "p99": percentile(samples, 0.99), "mean": mean(samples)}),
            )
        })
        .collect();
    let report = json!({
        "requests": args.requests, "rate_per_sec": args.rate, "block": args.block,
        "direct_ms": {"p50": d50, "p99": d99, "failures": direct.failures},
        "through_server_ms": {"p50": s50, "p99": s99, "failures": served.failures},
        "overhead_ms": {"p50": s50 - d50, "p99": s99 - d99},
        "ratio": {"p50": s50 / d50, "p99": s99 / d99},
        "server_stages_ms": stage_json,
        "sqlite_sync": format!("{:?}", args.sqlite_sync).to_lowercase(),
        "lookup_ttl_ms": args.lookup_ttl_ms,
        "sqlite_checkpoints": {"ticks": checkpoints.checkpoints, "log_restarts": checkpoints.restarts,
            "restart_busy": checkpoints.busy, "last_log_pages": checkpoints.last_log_pages,
            "writer_limit_checkpoints": limit_checkpoints},
        "goal_p99_overhead_ms": 2.0,
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "server overhead at {} req/s, {} requests per arm in turns of {} (open loop; SQLite sync {:?}, \
             lookup TTL {} ms)",
            args.rate, args.requests, args.block, args.sqlite_sync, args.lookup_ttl_ms
        );
        println!("  direct backend call   p50 {d50:7.3} ms   p99 {d99:7.3} ms   failures {}", direct.failures);
        println!("  through /v1/classify  p50 {s50:7.3} ms   p99 {s99:7.3} ms   failures {}", served.failures);
        println!(
            "  overhead              p50 {:7.3} ms   p99 {:7.3} ms   (×{:.2} / ×{:.2}; goal: p99 overhead ≤ 2 ms)",
            s50 - d50,
            s99 - d99,
            s50 / d50,
            s99 / d99
        );
        println!("  where the server's time went (its Server-Timing header):");
        for (name, samples) in &stages {
            println!(
                "    {name:<16}  p50 {:7.3} ms   p99 {:7.3} ms   mean {:7.3} ms",
                percentile(samples, 0.5),
                percentile(samples, 0.99),
                mean(samples)
            );
        }
        println!(
            "  SQLite checkpoints: {} (log restarted {} times, {} gave way to readers); last one found {} log pages; \
             the writer checkpointed {} times at the log's limit",
            checkpoints.checkpoints,
            checkpoints.restarts,
            checkpoints.busy,
            checkpoints.last_log_pages,
            limit_checkpoints
        );
    }
    // Figures with failures behind them, or with nothing measured, are no measurement: a script must not read
    // this run as one.
    if direct.failures > 0 || served.failures > 0 || direct.latencies.is_empty() || served.latencies.is_empty() {
        eprintln!(
            "bench server: {} direct and {} served requests failed; the figures above are not a measurement",
            direct.failures, served.failures
        );
        return Ok(ExitCode::from(super::EXIT_FAILURE));
    }
    Ok(ExitCode::SUCCESS)
}

fn mean(samples: &[f64]) -> f64 {
    samples.iter().sum::<f64>() / samples.len().max(1) as f64
}

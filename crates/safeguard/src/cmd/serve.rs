//! `safeguard serve`: the moderation service over HTTP (see crate safeguard-server for the API).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use safeguard_core::Reasoner;
use safeguard_harmony::Effort;
use safeguard_server::{
    ActiveLearning, ClassifyRoute, ConnectionLimits, NatsConfig, NatsIngest, RetentionConfig, Server, ServerConfig,
};
use safeguard_store::{GroupCommit, SqliteSync, Store, StoreOptions};

const DEFAULT_SEQUENCES: usize = 8;

#[derive(clap::Args)]
#[command(group = clap::ArgGroup::new("reasoner").required(true).args(["model", "backend"]))]
pub struct Args {
    /// GGUF model file for the embedded engine.
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Remote OpenAI-compatible server(s) running the model, `[FLAVOR+]URL` (repeat to balance across several).
    #[arg(long, value_name = "URL")]
    pub backend: Vec<String>,
    /// The model name the remote servers know it by.
    #[arg(long, default_value = "openai/gpt-oss-safeguard-20b")]
    pub backend_model: String,
    /// Seconds between health probes of the --backend servers (`GET /v1/models`, Ollama `/api/tags`). One that
    /// does not answer gets requests only when no other will take them; /readyz reports how many are usable,
    /// /metrics each.
    #[arg(long, value_name = "SECS", default_value_t = 15, requires = "backend")]
    pub backend_probe_secs: u64,
    /// Make /readyz answer 503 once no --backend server has been usable (answering its probe, circuit breaker
    /// not open) for this many seconds (it always reports them in its body). Off by default: without a backend,
    /// items that need the model go to people and everything else keeps working, and servers usually share
    /// their backends, so failing readiness would take all of them out of rotation at once.
    #[arg(long, value_name = "SECS", requires = "backend")]
    pub backend_ready_grace_secs: Option<u64>,
    /// The context the --backend servers give one request, prompt and completion together (vLLM's
    /// --max-model-len, llama-server's --ctx-size per slot). Content that would not fit beside its policy and its
    /// completion budget is then refused (400 content_too_long) instead of sent, as with the embedded engine; Ollama
    /// is sent it as num_ctx, where it would otherwise use a context of its own and cut longer prompts. Without
    /// it, the smallest context the backends report is used: vLLM's and SGLang's max_model_len on /v1/models,
    /// llama-server's per-slot n_ctx on /props.
    #[arg(long, value_name = "TOKENS", requires = "backend", value_parser = clap::value_parser!(u32).range(16..))]
    pub backend_context: Option<u32>,
    /// Seconds one request to a --backend may take, from connecting to the last byte of the answer; one that
    /// takes longer fails, is tried again, and counts against the backend's health. The default suits a GPU
    /// server; a slow one (llama-server or Ollama on CPU, where a high-effort answer of 8,192 tokens can take
    /// many minutes) needs more, and --reason-timeout with it.
    #[arg(long, value_name = "SECONDS", default_value_t = safeguard_remote::DEFAULT_REQUEST_TIMEOUT.as_secs(), requires = "backend", value_parser = clap::value_parser!(u64).range(1..))]
    pub backend_timeout: u64,
    /// Address and port to serve on (port 0 picks a free one; the address is printed at start). Off loopback the
    /// server refuses to start until an API key exists or SAFEGUARD_ADMIN_KEY (24 characters or more) is set.
    #[arg(long, default_value = "127.0.0.1:8080", env = "SAFEGUARD_LISTEN")]
    pub listen: SocketAddr,
    /// Where the SQLite database and the webhook secret live.
    #[arg(long, value_name = "DIR", default_value = "safeguard-data", env = "SAFEGUARD_DATA_DIR")]
    pub data_dir: PathBuf,
    /// `postgres://…` to store everything in PostgreSQL instead of SQLite in the data dir.
    #[arg(long, value_name = "URL", env = "SAFEGUARD_DATABASE_URL")]
    pub database: Option<String>,
    /// PostgreSQL schema to keep the tables in.
    #[arg(long, env = "SAFEGUARD_DATABASE_SCHEMA")]
    pub database_schema: Option<String>,
    /// Effort of direct reasoning when a request names none: /v1/classify/batch, jobs, /v1/moderations,
    /// /v1/chat/completions, and /v1/classify with `"route": "direct"` (or under --classify-route direct).
    /// /v1/classify's default route, the cascade, starts at --first-effort instead.
    #[arg(long, default_value = "low")]
    pub effort: Effort,
    /// Job workers deciding queued jobs.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Seconds a reasoning step may take before its decision becomes needs_review. A --backend request still
    /// unanswered then, from a server that has answered nothing since it was sent, counts against that server's
    /// health, as one past --backend-timeout does.
    #[arg(long, default_value_t = 300)]
    pub reason_timeout: u64,
    /// Seconds a job stays claimed without a heartbeat before another worker may take it over (after a crash).
    #[arg(long, default_value_t = 120)]
    pub job_lease: u64,
    /// Claims a job may take before it is failed to a person: a job whose workers keep dying on it (a crash, out
    /// of memory), or whose decision the store keeps refusing, is not decided again forever.
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub job_max_attempts: u32,
    /// A host (name or address, as written in webhook URLs) that job webhooks may reach even at an internal
    /// address (loopback, private, link-local). Repeatable. Without it, webhooks go to public addresses only.
    #[arg(long = "webhook-allow-host", value_name = "HOST")]
    pub webhook_allow_hosts: Vec<String>,
    /// Let job webhooks reach any address, internal ones included: for deployments whose receivers all sit on the
    /// internal network, and where every key with the classify scope is trusted not to point them elsewhere.
    #[arg(long)]
    pub webhook_allow_private: bool,
    /// Webhook deliveries sent at once: a receiver that hangs until the 10 s timeout holds up only its own.
    #[arg(long, default_value_t = ServerConfig::default().webhook_concurrency, value_name = "N")]
    pub webhook_concurrency: usize,
    /// Attempts per webhook before it is given up on (`safeguard webhooks failed` lists those, `retry` sends them
    /// again). The wait doubles from `--webhook-backoff-ms` after each failure, up to an hour: the default keeps
    /// trying for about five hours.
    #[arg(long, default_value_t = ServerConfig::default().webhook_max_attempts, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub webhook_max_attempts: u32,
    /// The wait after a webhook's first failed attempt, in milliseconds; it doubles after each further one.
    #[arg(long, default_value_t = ServerConfig::default().webhook_backoff.as_millis() as u64, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub webhook_backoff_ms: u64,
    /// Requests per minute per API key (0: unlimited).
    #[arg(long, default_value_t = 600)]
    pub rate_limit: u32,
    /// Policies that /v1/moderations checks (names); default: the starter library.
    #[arg(long = "moderation-policy", value_name = "NAME")]
    pub moderation_policies: Vec<String>,
    /// Completion-token cap per policy for /v1/moderations; default: the effort's budget.
    #[arg(long)]
    pub moderation_max_tokens: Option<usize>,
    #[command(flatten)]
    pub engine: crate::cmd::classify::EngineFlags,
    /// Sequences the embedded engine decodes together.
    #[arg(long, default_value_t = DEFAULT_SEQUENCES)]
    pub sequences: usize,
    /// Trained triage classifiers for the cascade (/v1/classify's default route, /v1/moderate, the NATS worker),
    /// one directory per policy name (`safeguard triage train --out DIR/NAME`); a model trained for another
    /// policy version is ignored.
    #[arg(long, value_name = "DIR")]
    pub triage_dir: Option<PathBuf>,
    /// Reasoning prompts per second, whatever the way in (cascade, pinned efforts, batches, chat, jobs, NATS);
    /// over it, HTTP callers get 429 + Retry-After, jobs stay queued and NATS events are redelivered later.
    #[arg(long, value_name = "N")]
    pub reasoning_per_sec: Option<f64>,
    /// Tokens (uncached prompt + completion) reasoning may spend per second; each step pays what it used, and
    /// while that is in debt new items wait (429 + Retry-After, a queued job, or a delayed NATS redelivery).
    #[arg(long, value_name = "N")]
    pub reasoning_tokens_per_sec: Option<f64>,
    /// Share of --reasoning-per-sec and --reasoning-tokens-per-sec that queued work (jobs, the NATS stream) may
    /// use. A backlog always has its next item ready and would otherwise take every call as it refills, leaving
    /// requests that wait on an answer with 429s; below 1 the rest is kept for them over time (they may still use
    /// all of it while the queue is idle).
    #[arg(long, default_value_t = 1.0, value_name = "(0,1]")]
    pub queue_share: f64,
    /// Effort of the cascade's first reasoning step; shaky answers are asked again at --escalation-effort.
    #[arg(long, default_value = "low")]
    pub first_effort: Effort,
    /// Effort at which the cascade asks again about a shaky or disputed answer: the last reasoning step before a
    /// person. A policy's `routing: {escalation_effort: …}` front matter overrides it.
    #[arg(long, default_value = "high")]
    pub escalation_effort: Effort,
    /// What the cascade does with an item triage is sure violates: `act` on it, ask the model to `confirm`, or
    /// hand it to a person (`review`). A policy's `triage: {on_violation: …}` front matter overrides it.
    #[arg(long, default_value = "act", value_name = "act|confirm|review")]
    pub on_triage_violation: safeguard_pipeline::OnTriageViolation,
    /// Seconds one reasoning step of the cascade may take; past it the step counts as failed and the item
    /// escalates (then goes to a person). Unset: only --reason-timeout bounds it. Counts against a --backend
    /// server as --reason-timeout does.
    #[arg(long, value_name = "SECONDS")]
    pub stage_timeout: Option<f64>,
    /// Completion tokens one reasoning step of the cascade may spend (reasoning and answer together); an answer
    /// cut off by it escalates like any unparseable one. Default: the effort's own budget. A request's
    /// `max_tokens` overrides it.
    #[arg(long, value_name = "N")]
    pub reasoning_max_tokens: Option<usize>,
    /// Below this probability of its answer token, a first answer is asked again at --escalation-effort, and an
    /// answer at --escalation-effort goes to a person. Backends that report no probabilities skip the check.
    #[arg(long, default_value_t = safeguard_pipeline::RoutingConfig::default().min_engine_confidence, value_name = "0..1")]
    pub min_engine_confidence: f32,
    /// Seconds an item may wait for reasoning budget (--reasoning-per-sec) before it is given back (429 +
    /// Retry-After over HTTP, a delayed redelivery over NATS).
    #[arg(long, default_value_t = 0.0, value_name = "SECONDS")]
    pub max_budget_wait: f64,
    /// How /v1/classify decides requests that pin no effort: `cascade` (triage → low → high → a person) or
    /// `direct` (one reasoning step at --effort).
    #[arg(long, default_value = "cascade")]
    pub classify_route: ClassifyRoute,
    /// Share of settled cascade decisions that triage and the model disagree on, or triage barely decided, to
    /// queue for a person at low priority (active learning); 0 turns it off.
    #[arg(long, default_value_t = 0.05, value_name = "0..1")]
    pub review_sample_rate: f64,
    /// Distance from 0.5 under which a triage probability counts as barely decided.
    #[arg(long, default_value_t = 0.1)]
    pub review_sample_margin: f32,
    /// Share of the items triage settled on its own (no model, no person) to queue for a person at low
    /// priority, drawn uniformly (reviews of kind `audit`): what reviewers find among them measures triage's
    /// misses on live traffic (`safeguard triage audit`). 0 turns it off.
    #[arg(long, default_value_t = 0.001, value_name = "0..1")]
    pub triage_audit_rate: f64,
    /// Cost per 1000 billed tokens (uncached prompt + completion) for the cost-per-item metrics.
    #[arg(long = "cost-per-1k-tokens", default_value_t = 0.0, value_name = "AMOUNT")]
    pub cost_per_1k_tokens: f64,
    /// Also decide content events from this NATS server (JetStream), e.g. nats://127.0.0.1:4222.
    #[arg(long, value_name = "URL", env = "SAFEGUARD_NATS_URL")]
    pub nats: Option<String>,
    /// Subject prefix: content is read from PREFIX.content.>, decisions published on PREFIX.decisions.<key>.
    #[arg(long = "nats-subject", value_name = "PREFIX", default_value = "safeguard")]
    pub nats_subject: String,
    /// Name of the work stream (default: from the prefix); the decision stream and ledger are NAME_DECISIONS and
    /// NAME_DECIDED, the shared consumer NAME_workers. Servers naming the same stream share its work.
    #[arg(long = "nats-stream", value_name = "NAME", requires = "nats")]
    pub nats_stream: Option<String>,
    /// Policies for events that name none (repeat); default: the starter library.
    #[arg(long = "nats-policy", value_name = "NAME", requires = "nats")]
    pub nats_policies: Vec<String>,
    /// Seconds an event may go unacknowledged (a crashed worker's events are redelivered after it).
    #[arg(long, default_value_t = 60)]
    pub nats_ack_wait: u64,
    /// Make /readyz answer 503 once the NATS worker has not been serving for this many seconds (it always reports
    /// the worker in its body). For servers that exist to work the stream: readiness also routes HTTP traffic,
    /// which does not need NATS. Keep it above a reconnect's 30 s backoff.
    #[arg(long, value_name = "SECS", requires = "nats")]
    pub nats_ready_grace_secs: Option<u64>,
    /// Make /metrics ask for an API key with the `metrics` scope (`safeguard keys create --scope metrics`; give
    /// Prometheus its value as a bearer token). Off, anyone who reaches the server reads per-policy counts, the
    /// review backlog and the policy names clients chose.
    #[arg(long)]
    pub metrics_require_key: bool,
    /// Connections served at once; more wait to be accepted. Each must send its request headers within
    /// --header-timeout-secs, so clients that open connections and send nothing cannot hold them.
    #[arg(long, value_name = "N", default_value_t = ConnectionLimits::default().max_connections)]
    pub max_connections: usize,
    /// Seconds a connection has to send a request's headers, counted from accept and again between requests on
    /// a kept-alive connection (so an idle one is closed then); behind a proxy, set it above the proxy's idle timeout.
    #[arg(long, value_name = "SECS", default_value_t = ConnectionLimits::default().header_read_timeout.as_secs())]
    pub header_timeout_secs: u64,
    /// Seconds a request's body has to arrive whole once its headers did; then the request fails (408).
    #[arg(long, value_name = "SECS", default_value_t = ConnectionLimits::default().body_read_timeout.as_secs())]
    pub body_timeout_secs: u64,
    /// Delete stored decisions, jobs and webhook deliveries older than this many days, hourly (as `safeguard
    /// prune --older-than-days` does). Items a person still has to decide, and whatever they need, stay. With
    /// --nats, the decision stream and the ledger keep messages as long (a key sent again after that is decided
    /// again). Off by default: everything is kept.
    #[arg(long, value_name = "DAYS", value_parser = clap::value_parser!(u32).range(1..=36_500))]
    pub retain_days: Option<u32>,
    /// With --retain-days: keep decisions a person reviewed, however old (the corrections triage learns from).
    #[arg(long, requires = "retain_days")]
    pub retain_reviewed: bool,
    /// With --retain-days: also delete policy versions nothing uses any more (not active, named by no kept
    /// decision or unfinished job, not read by a server to decide with for the whole period): old drafts and the
    /// versions clients sent inline.
    #[arg(long, requires = "retain_days")]
    pub retain_prune_policies: bool,
    /// Milliseconds a policy name's active version and an API key are trusted before the store is asked again.
    /// Changes made through this server apply at once; made elsewhere (another server, `safeguard keys
    /// revoke`), within this time. 0 asks the store on every request.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pub lookup_ttl_ms: u64,
    /// On SIGTERM or Ctrl-C: how long in-flight requests and jobs may finish, from the signal on; then jobs still
    /// being decided go back to the queue (up to 5 s more). A second signal ends the wait at once, a third exits.
    #[arg(long, default_value_t = ServerConfig::default().drain_timeout.as_secs(), value_name = "SECS")]
    pub drain_timeout_secs: u64,
    /// Commit every decision in its own transaction instead of batching concurrent ones (group commit).
    #[arg(long)]
    pub no_group_commit: bool,
    /// SQLite: `normal` (a commit survives a crash of safeguard; the last ones can be lost if the machine loses
    /// power) or `full` (every commit waits for the disk, about 4 ms here).
    #[arg(long, default_value = "normal", value_name = "normal|full")]
    pub sqlite_sync: SqliteSync,
    /// SQLite: how often the write-ahead log is folded into the database and started over. Shorter bounds the
    /// log file tighter (about 18 KiB per decision stored in between); each one holds commits up to 20 ms.
    #[arg(long, default_value_t = safeguard_store::CHECKPOINT_EVERY.as_millis() as u64, value_name = "MS")]
    pub checkpoint_ms: u64,
}

/// The SQLite database in a data dir.
pub(crate) fn sqlite_path(data_dir: &Path) -> PathBuf {
    data_dir.join("safeguard.db")
}

/// Where to store things, shared with `safeguard keys`.
pub(crate) async fn open_store(
    data_dir: &Path,
    database: Option<&str>,
    options: StoreOptions,
) -> anyhow::Result<Store> {
    match database {
        Some(url) => Store::connect(&creating_sqlite(url), options).await.context("cannot open the database"),
        None => {
            std::fs::create_dir_all(data_dir).with_context(|| format!("cannot create {}", data_dir.display()))?;
            let path = sqlite_path(data_dir);
            Store::open_sqlite_with(&path, options).await.with_context(|| format!("cannot open {}", path.display()))
        }
    }
}

/// A `sqlite:` URL that creates its file when missing, as `--data-dir` does: sqlx opens an existing file only
/// unless told `mode=rwc`. A URL that names its own mode keeps it.
fn creating_sqlite(url: &str) -> String {
    if !url.starts_with("sqlite:") || url.contains("mode=") {
        return url.to_string();
    }
    format!("{url}{}mode=rwc", if url.contains('?') { '&' } else { '?' })
}

/// The webhook signing secret: from the environment (several servers must share it), else kept in the
/// data dir so that receivers keep verifying across restarts.
fn webhook_secret(data_dir: &Path) -> anyhow::Result<String> {
    if let Ok(secret) = std::env::var("SAFEGUARD_WEBHOOK_SECRET")
        && !secret.is_empty()
    {
        return Ok(secret);
    }
    Ok(safeguard_server::webhook_secret_in(data_dir)?)
}

/// The embedded engine, built exactly as `classify` builds it.
fn load_embedded(args: &Args, model: &Path) -> anyhow::Result<Arc<dyn Reasoner>> {
    crate::cmd::classify::load_reasoner(&crate::cmd::classify::EngineArgs {
        model,
        engine: args.engine,
        sequences: args.sequences,
    })
}

fn load_remote(args: &Args) -> anyhow::Result<Arc<dyn Reasoner>> {
    let endpoints = args
        .backend
        .iter()
        .map(|spec| spec.parse().with_context(|| format!("bad --backend {:?}", safeguard_remote::shown_url(spec))))
        .collect::<anyhow::Result<Vec<safeguard_remote::EndpointConfig>>>()?;
    let mut config = safeguard_remote::RemoteConfig::new(args.backend_model.clone(), endpoints);
    config.context_tokens = args.backend_context.map(|tokens| tokens as usize);
    config.request_timeout = Duration::from_secs(args.backend_timeout);
    let reasoner = safeguard_remote::RemoteReasoner::new(config).context("bad backend configuration")?;
    Ok(Arc::new(reasoner))
}

/// `--retain-days` as a period: the database's and the NATS streams' alike.
fn retention_period(args: &Args) -> Option<Duration> {
    args.retain_days.map(|days| Duration::from_secs(u64::from(days) * 86_400))
}

fn nats_ingest(args: &Args, url: &str) -> NatsIngest {
    let mut config = NatsConfig::new(url, args.nats_subject.clone());
    if let Some(stream) = &args.nats_stream {
        config = config.with_stream(stream);
    }
    config.ack_wait = Duration::from_secs(args.nats_ack_wait.max(1));
    config.retain = retention_period(args);
    NatsIngest { config, policies: args.nats_policies.clone() }
}

/// Flags given that do nothing with the others given: said at start, not left for an operator to find out.
fn ignored_flags(args: &Args) -> Vec<&'static str> {
    let mut ignored = Vec::new();
    let engine = &args.engine;
    let tunes_engine = engine.threads.is_some() || engine.context.is_some() || engine.gpu_layers != 0;
    if !args.backend.is_empty() && (tunes_engine || args.sequences != DEFAULT_SEQUENCES) {
        ignored.push(
            "--threads, --context, --gpu-layers and --sequences set the embedded engine; with --backend they do \
             nothing (the backend's own settings apply)",
        );
    }
    if args.backend.is_empty() && args.backend_context.is_some() {
        ignored.push(
            "--backend-context sets the --backend servers' context; with --model it does nothing (--context sets the \
             engine's)",
        );
    }
    let postgres = args.database.as_deref().is_some_and(|url| url.starts_with("postgres"));
    let sqlite_tuned = args.sqlite_sync != SqliteSync::default()
        || args.checkpoint_ms != safeguard_store::CHECKPOINT_EVERY.as_millis() as u64;
    if postgres && sqlite_tuned {
        ignored.push("--sqlite-sync and --checkpoint-ms set SQLite; with a PostgreSQL --database they do nothing");
    }
    ignored
}

fn stage_timeout(seconds: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|timeout| !timeout.is_zero())
        .with_context(|| format!("--stage-timeout must be a positive number of seconds, not {seconds}"))
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    // Checked before the model loads, which can take minutes.
    let stage_timeout = args.stage_timeout.map(stage_timeout).transpose()?;
    if args.reasoning_max_tokens == Some(0) {
        bail!("--reasoning-max-tokens must be at least 1");
    }
    // 0 would reach the engine as "no cap of its own" and run to the effort's budget, past the room the context
    // check kept for it.
    if args.moderation_max_tokens == Some(0) {
        bail!("--moderation-max-tokens must be at least 1");
    }
    if !(0.0..=1.0).contains(&args.min_engine_confidence) {
        bail!("--min-engine-confidence must be within 0..1, not {}", args.min_engine_confidence);
    }
    // Zero is no "pause": it would read as no limit at all, the opposite of what someone stopping spend means.
    for (flag, rate) in
        [("--reasoning-per-sec", args.reasoning_per_sec), ("--reasoning-tokens-per-sec", args.reasoning_tokens_per_sec)]
    {
        if let Some(rate) = rate
            && !(rate.is_finite() && rate > 0.0)
        {
            bail!("{flag} must be a number above 0 (leave it out for no limit), not {rate}");
        }
    }
    let nats = args.nats.as_ref().map(|url| nats_ingest(&args, url));
    if let Some(nats) = &nats {
        nats.config.check_names().map_err(|why| anyhow::anyhow!("--nats-subject/--nats-stream: {why}"))?;
    }
    if let Some(dir) = &args.triage_dir
        && !dir.is_dir()
    {
        bail!("--triage-dir {} is not a directory (it holds one trained model per policy name)", dir.display());
    }
    if !(args.queue_share > 0.0 && args.queue_share <= 1.0) {
        bail!("--queue-share must be above 0 and at most 1, not {}", args.queue_share);
    }
    let max_budget_wait = Duration::try_from_secs_f64(args.max_budget_wait).map_err(|_| {
        anyhow::anyhow!("--max-budget-wait must be a number of seconds >= 0, not {}", args.max_budget_wait)
    })?;
    for ignored in ignored_flags(&args) {
        eprintln!("safeguard: warning: {ignored}");
    }
    let reasoner = match (&args.model, args.backend.is_empty()) {
        (Some(model), true) => load_embedded(&args, model)?,
        (None, false) => load_remote(&args)?,
        _ => bail!("give either --model PATH or --backend URL, not both"),
    };
    let config = ServerConfig {
        listen: args.listen,
        admin_key: std::env::var("SAFEGUARD_ADMIN_KEY").ok().filter(|k| !k.is_empty()),
        rate_limit_per_minute: args.rate_limit,
        rate_limit_burst: (args.rate_limit / 10).max(10),
        job_workers: args.workers.max(1),
        reason_timeout: Duration::from_secs(args.reason_timeout.max(1)),
        job_lease: Duration::from_secs(args.job_lease.max(1)),
        job_max_attempts: i64::from(args.job_max_attempts.max(1)),
        webhook_secret: webhook_secret(&args.data_dir)?,
        webhook_targets: safeguard_server::WebhookTargets {
            allowed_hosts: args.webhook_allow_hosts.clone(),
            allow_private: args.webhook_allow_private,
        },
        webhook_concurrency: args.webhook_concurrency.max(1),
        webhook_max_attempts: args.webhook_max_attempts,
        webhook_backoff: Duration::from_millis(args.webhook_backoff_ms),
        moderation_policies: args.moderation_policies.clone(),
        moderation_max_tokens: args.moderation_max_tokens,
        default_effort: args.effort,
        routing: safeguard_pipeline::RoutingConfig {
            first_effort: args.first_effort,
            escalation_effort: args.escalation_effort,
            on_triage_violation: args.on_triage_violation,
            stage_timeout,
            max_tokens: args.reasoning_max_tokens,
            min_engine_confidence: args.min_engine_confidence,
            max_budget_wait,
            ..safeguard_pipeline::RoutingConfig::default()
        },
        triage_dir: args.triage_dir.clone(),
        reasoning_per_sec: args.reasoning_per_sec,
        reasoning_tokens_per_sec: args.reasoning_tokens_per_sec,
        queue_share: args.queue_share,
        classify_route: args.classify_route,
        active_learning: ActiveLearning {
            rate: args.review_sample_rate.clamp(0.0, 1.0),
            audit_rate: args.triage_audit_rate.clamp(0.0, 1.0),
            margin: args.review_sample_margin,
            ..ActiveLearning::default()
        },
        cost_per_1k_tokens: args.cost_per_1k_tokens.max(0.0),
        nats,
        nats_ready_grace: args.nats_ready_grace_secs.map(Duration::from_secs),
        backend_probe_interval: Duration::from_secs(args.backend_probe_secs.max(1)),
        backend_ready_grace: args.backend_ready_grace_secs.map(Duration::from_secs),
        metrics_require_key: args.metrics_require_key,
        lookup_ttl: Duration::from_millis(args.lookup_ttl_ms),
        connections: ConnectionLimits {
            max_connections: args.max_connections.max(1),
            header_read_timeout: Duration::from_secs(args.header_timeout_secs.clamp(1, 3600)),
            body_read_timeout: Duration::from_secs(args.body_timeout_secs.clamp(1, 3600)),
        },
        retention: retention_period(&args).map(|period| RetentionConfig {
            keep_reviewed: args.retain_reviewed,
            policies: args.retain_prune_policies,
            ..RetentionConfig::new(period)
        }),
        // A day at most: the deadline is an instant in the future, and a huge one would overflow when the signal came.
        drain_timeout: Duration::from_secs(args.drain_timeout_secs.min(86_400)),
        ..ServerConfig::default()
    };
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")?;
    let served = runtime.block_on(async move {
        let options = StoreOptions {
            schema: args.database_schema.clone(),
            group_commit: GroupCommit { enabled: !args.no_group_commit, ..GroupCommit::default() },
            sqlite_sync: args.sqlite_sync,
            checkpoint_every: Duration::from_millis(args.checkpoint_ms.max(1)),
            ..StoreOptions::default()
        };
        let store = open_store(&args.data_dir, args.database.as_deref(), options).await?;
        let server = Server::start(config, reasoner, store.clone()).await?;
        // Tests and scripts read this line to find the port when listening on :0.
        println!("safeguard: listening on http://{}", server.addr);
        let (token, hurry) = (server.shutdown_token(), server.hurry_token());
        // Each signal asks harder: drain, then stop waiting, then exit. Without the later ones an operator whose
        // drain hangs would have only `kill -9`.
        tokio::spawn(async move {
            wait_for_signal().await;
            eprintln!("safeguard: shutting down; draining in-flight work (signal again to stop waiting)");
            token.cancel();
            wait_for_signal().await;
            eprintln!("safeguard: not waiting any longer; handing unfinished jobs back (signal again to exit now)");
            hurry.cancel();
            wait_for_signal().await;
            eprintln!("safeguard: exiting now");
            std::process::exit(130);
        });
        let served = server.wait().await;
        // After the drain, nothing writes any more: the decision writer stops and the connections close cleanly
        // (PostgreSQL sees a goodbye, not a dropped socket).
        store.close().await;
        served?;
        anyhow::Ok(())
    });
    // An engine step still running on a blocking thread after the drain would keep the process alive until it
    // finished; what it was deciding is redelivered (NATS) or claimed again after its lease (jobs).
    runtime.shutdown_timeout(Duration::from_secs(2));
    served?;
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: Args,
    }

    fn ignored(args: &[&str]) -> Vec<&'static str> {
        ignored_flags(&Cli::parse_from([&["serve"], args].concat()).serve)
    }

    #[tokio::test]
    async fn a_sqlite_database_url_creates_its_file() {
        assert_eq!(creating_sqlite("sqlite:///x/a.db"), "sqlite:///x/a.db?mode=rwc");
        assert_eq!(creating_sqlite("sqlite:///x/a.db?mode=ro"), "sqlite:///x/a.db?mode=ro");
        assert_eq!(creating_sqlite("postgres://h/db"), "postgres://h/db");
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("new.db").display());
        let store = open_store(dir.path(), Some(&url), StoreOptions::default()).await.unwrap();
        drop(store);
        assert!(dir.path().join("new.db").exists());
    }

    #[test]
    fn flags_that_do_nothing_with_the_others_are_named() {
        assert!(ignored(&["--backend", "http://gpu1:8000/v1"]).is_empty());
        assert!(ignored(&["--model", "m.gguf", "--threads", "4", "--sequences", "4"]).is_empty());
        for engine in [&["--threads", "4"][..], &["--gpu-layers", "99"], &["--sequences", "16"], &["--context", "4096"]]
        {
            let said = ignored(&[&["--backend", "http://gpu1:8000/v1"][..], engine].concat());
            assert!(said.len() == 1 && said[0].contains("--backend"), "{engine:?}: {said:?}");
        }
        let postgres = ["--model", "m.gguf", "--database", "postgres://db/x", "--sqlite-sync", "full"];
        assert!(ignored(&postgres)[0].contains("PostgreSQL"));
        assert!(ignored(&["--model", "m.gguf", "--sqlite-sync", "full"]).is_empty(), "SQLite takes it");
    }

    #[test]
    fn the_backends_context_reaches_the_remote_reasoner() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["serve"], args].concat()).map(|cli| cli.serve);
        let args = parse(&["--backend", "ollama+http://gpu1:11434", "--backend-context", "16384"]).unwrap();
        assert_eq!(load_remote(&args).unwrap().context_tokens(), Some(16_384));
        let args = parse(&["--backend", "http://gpu1:8000/v1"]).unwrap();
        assert_eq!(load_remote(&args).unwrap().context_tokens(), None, "unknown unless told");
        assert!(ignored(&["--model", "m.gguf", "--backend-context", "16384"])[0].contains("--backend-context"));
        assert!(parse(&["--backend", "http://gpu1:8000/v1", "--backend-context", "8"]).is_err(), "too small");
    }
}

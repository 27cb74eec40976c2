//! safeguard serve: the HTTP API, OpenAI-compatible surfaces, auth, metrics, review page.
//!
//! [`Server::start`] takes any [`Reasoner`] (embedded engine, remote backend, or a test double) and a
//! [`Store`], and serves:
//! - `/v1/policies…` immutable policy versions, pins and diffs;
//! - `/v1/classify` synchronous decisions, through the cascade (triage → low → high → a person) unless the
//!   request pins an effort or `"route": "direct"` (or the server's `classify_route` is direct);
//!   `/v1/classify/batch` direct ones; `/v1/moderate` the cascade's own view; `/v1/jobs` durable asynchronous
//!   ones with signed, retried webhooks;
//! - `/v1/decisions…` the audit trail, with replay and appeal;
//! - `/v1/reviews…` the review queue, and `/review` the page people decide it on;
//! - `/v1/moderations`, `/v1/chat/completions` and `/v1/models` in OpenAI's shapes;
//! - `/healthz`, `/readyz`, `/metrics`, `/v1/stats/prompts` (cost and latency per policy and effort),
//!   `/openapi.json`;
//! - optionally, a NATS JetStream worker deciding content events through the cascade ([`NatsIngest`]).
//!
//! Every decision is stored. Whatever goes wrong while reasoning becomes `needs_review`, never an allow.

mod auth;
mod classify;
mod decisions;
mod error;
mod guard;
mod http;
mod ingest;
mod jobs;
mod lookup_cache;
mod metrics_setup;
mod moderate;
mod openai;
mod openapi;
mod policies;
mod readiness;
mod retention;
mod reviews;
mod timing;
mod webhooks;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use safeguard_core::{Classifier, Reasoner};
use safeguard_harmony::Effort;
use safeguard_store::Store;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use auth::SCOPES;
pub use classify::ClassifyRoute;
pub use error::ApiError;
pub use guard::GuardedReasoner;
pub use http::ConnectionLimits;
pub use ingest::NatsIngest;
pub use retention::RetentionConfig;
pub use safeguard_pipeline::ActiveLearning;
pub use safeguard_pipeline::nats::NatsConfig;
pub use timing::parse_server_timing;
pub use webhooks::{
    WebhookTargets, client_webhook_secret, sign_webhook, verify_webhook, verify_webhook_fresh, webhook_secret_in,
};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("storage: {0}")]
    Store(#[from] safeguard_store::StoreError),
    #[error(
        "refusing to serve {0} without authentication: no API key exists. Set SAFEGUARD_ADMIN_KEY, create one with \
         `safeguard keys create --scope admin`, or listen on a loopback address"
    )]
    NoKeysOnPublicAddress(SocketAddr),
    #[error(
        "refusing to serve {0} with a guessable SAFEGUARD_ADMIN_KEY ({1} characters): use at least \
         {MIN_PUBLIC_ADMIN_KEY_CHARS} random characters, e.g. `openssl rand -hex 24`"
    )]
    WeakAdminKey(SocketAddr, usize),
    #[error(
        "SAFEGUARD_ADMIN_KEY holds a value that was rotated away from and revoked; set the current key, or a new one"
    )]
    RevokedAdminKey,
    #[error("SAFEGUARD_ADMIN_KEY holds the value of the API key named {0:?}; give the admin key a value of its own")]
    AdminKeyOfAnotherName(String),
    #[error("the server task failed: {0}")]
    Task(String),
    #[error("cannot build the webhook HTTP client: {0}")]
    WebhookClient(#[source] reqwest::Error),
}

/// Request limits; each breach is a 4xx with a JSON error naming the limit.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_content_tokens: usize,
    pub max_content_chars: usize,
    pub max_policies: usize,
    pub max_tokens: usize,
    pub max_batch_items: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 2 * 1024 * 1024,
            max_content_tokens: 16_384,
            max_content_chars: 100_000,
            max_policies: 16,
            max_tokens: 8_192,
            max_batch_items: 256,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Registered (hashed) as an admin key at start-up.
    pub admin_key: Option<String>,
    /// Serve without keys. Only taken when no key exists and the address is loopback; decided at start, and
    /// ended by the first key made while the server runs (within `lookup_ttl`).
    pub open_access: bool,
    pub limits: Limits,
    pub rate_limit_per_minute: u32,
    pub rate_limit_burst: u32,
    pub job_workers: usize,
    pub job_lease: Duration,
    /// Claims a job may take. A job claimed again after this many is failed to a person instead of decided: its
    /// workers never came back from it (a crash, running out of memory, a lease shorter than the decision), and
    /// trying once more would only take the next worker down with it.
    pub job_max_attempts: i64,
    /// A reasoning step that takes longer becomes `needs_review` with the reason "timed out".
    pub reason_timeout: Duration,
    /// HMAC key for webhook signatures.
    pub webhook_secret: String,
    pub webhook_max_attempts: u32,
    pub webhook_backoff: Duration,
    /// Webhook deliveries sent at once, so that a receiver that hangs does not hold up the others.
    pub webhook_concurrency: usize,
    /// Which hosts webhooks may reach: public addresses, plus those let in.
    pub webhook_targets: WebhookTargets,
    /// Policy names `/v1/moderations` classifies against; empty means the starter library.
    pub moderation_policies: Vec<String>,
    /// Completion-token cap for `/v1/moderations` (which has no field for it); `None` is the effort's budget.
    pub moderation_max_tokens: Option<usize>,
    pub default_effort: Effort,
    /// How long shutdown waits, from the signal on, for in-flight requests and jobs together; then jobs still
    /// being decided are handed back to the queue (up to 5 s more). The default leaves that inside the 30 s an
    /// orchestrator usually allows before it kills the process.
    pub drain_timeout: Duration,
    /// How `/v1/moderate` routes: efforts, escalation thresholds, what triage may decide.
    pub routing: safeguard_pipeline::RoutingConfig,
    /// Trained triage classifiers, one directory per policy name (`safeguard triage train --out DIR/NAME`).
    pub triage_dir: Option<std::path::PathBuf>,
    /// Reasoning prompts per second, whatever the way in; over it, HTTP routes that reason answer 429 with
    /// Retry-After, jobs stay queued, and the NATS worker NAKs with a delay.
    pub reasoning_per_sec: Option<f64>,
    /// Tokens (uncached prompt + completion) reasoning may spend per second; over it, items wait as they do over
    /// `reasoning_per_sec`.
    pub reasoning_tokens_per_sec: Option<f64>,
    /// Share of both rates that queued work (jobs, the NATS stream) may use, so a backlog cannot keep requests
    /// waiting on an answer out; a value outside (0, 1) (1 included) lets the queue take all of it.
    pub queue_share: f64,
    /// How `/v1/classify` decides a request that pins neither an effort nor a route.
    pub classify_route: ClassifyRoute,
    /// Which settled cascade decisions are also queued for a person, at low priority (active learning).
    pub active_learning: ActiveLearning,
    /// Cost estimate per 1000 billed tokens (prompt tokens not served from the cache, plus completion tokens),
    /// for the cost-per-item metrics. 0 leaves cost at 0.
    pub cost_per_1k_tokens: f64,
    /// Decide content events from NATS JetStream inside the server, storing each decision like any other.
    pub nats: Option<NatsIngest>,
    /// Whether, and after how long, a NATS worker that is down (connecting, or started again after it failed)
    /// makes `/readyz` answer 503. `None`, the default, only reports it: readiness also decides whether HTTP
    /// traffic reaches this server, and HTTP does not need NATS. Set it for servers that exist to work the
    /// stream; keep it longer than a reconnect's backoff (30 s), so a blip does not take them out of rotation.
    pub nats_ready_grace: Option<Duration>,
    /// How often the reasoning backends (remote servers; the embedded engine has none) are asked whether they
    /// answer. An endpoint that does not answer gets requests only when no other will take them.
    pub backend_probe_interval: Duration,
    /// Whether, and after how long, having no usable reasoning backend (none answering its probe, or every
    /// circuit breaker open) makes `/readyz` answer 503. `None`, the default, only reports it: without a backend
    /// items that need the model go to people, triage and the review queue keep working, and backends are usually
    /// shared, so failing readiness would take every server out of rotation at once.
    pub backend_ready_grace: Option<Duration>,
    /// `/metrics` asks for a key with the `metrics` scope (off: anyone who reaches the server reads it).
    pub metrics_require_key: bool,
    /// How long a policy name's active version and an API key are trusted before the store is asked again.
    /// Changes made through this server apply at once; changes made elsewhere (another server on the same
    /// database, `safeguard keys revoke`) within this time. Zero asks the store on every request.
    pub lookup_ttl: Duration,
    /// Prune what is older than a retention period, on a schedule (`None`: keep everything).
    pub retention: Option<RetentionConfig>,
    /// How long a client may take to send a request's headers, and how many connections are served at once.
    pub connections: ConnectionLimits,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_key: None,
            open_access: false,
            limits: Limits::default(),
            rate_limit_per_minute: 600,
            rate_limit_burst: 60,
            job_workers: 2,
            job_lease: Duration::from_secs(120),
            job_max_attempts: 3,
            reason_timeout: Duration::from_secs(300),
            webhook_secret: String::new(),
            webhook_max_attempts: 16,
            webhook_backoff: Duration::from_secs(2),
            webhook_concurrency: 8,
            webhook_targets: WebhookTargets::default(),
            moderation_policies: Vec::new(),
            moderation_max_tokens: None,
            default_effort: Effort::Low,
            drain_timeout: Duration::from_secs(20),
            routing: safeguard_pipeline::RoutingConfig::default(),
            triage_dir: None,
            reasoning_per_sec: None,
            reasoning_tokens_per_sec: None,
            queue_share: 1.0,
            classify_route: ClassifyRoute::Cascade,
            active_learning: ActiveLearning::default(),
            cost_per_1k_tokens: 0.0,
            nats: None,
            nats_ready_grace: None,
            backend_probe_interval: Duration::from_secs(15),
            backend_ready_grace: None,
            metrics_require_key: false,
            lookup_ttl: Duration::from_secs(1),
            retention: None,
            connections: ConnectionLimits::default(),
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub(crate) config: Arc<ServerConfig>,
    pub(crate) store: Store,
    pub(crate) classifier: Classifier,
    pub(crate) reasoner: Arc<dyn Reasoner>,
    pub(crate) rate_limiter: Arc<auth::RateLimiter>,
    pub(crate) metrics: PrometheusHandle,
    pub(crate) jobs_waiting: Arc<Notify>,
    /// Cancelled when shutdown's drain runs out: job workers hand the job they are deciding back to the queue.
    pub(crate) jobs_abandoned: CancellationToken,
    pub(crate) http: reqwest::Client,
    pub(crate) cascade: Arc<moderate::CascadeState>,
    pub(crate) items: Arc<metrics_setup::ItemStats>,
    /// Cost and latency per policy and effort, from every prompt the classifier finished.
    pub(crate) prompts: Arc<metrics_setup::PromptMetrics>,
    pub(crate) lookups: Arc<lookup_cache::Lookups>,
    pub(crate) open_access: Arc<auth::OpenAccess>,
    pub(crate) failed_keys: Arc<auth::FailedKeys>,
    /// The NATS worker's connection while it has one: a person's decision on an item that came in as an event
    /// is published on it.
    pub(crate) nats_out: Arc<std::sync::RwLock<Option<safeguard_pipeline::nats::Bus>>>,
    /// Whether the NATS worker is serving, for `/readyz`.
    pub(crate) nats_health: Arc<readiness::DownClock>,
    /// Since when no reasoning backend has been usable, for `/readyz` (remote backends only).
    pub(crate) backend_health: Arc<readiness::DownClock>,
    /// Held by the `/metrics` scrape that is reading the database's figures.
    pub(crate) store_figures: Arc<tokio::sync::Mutex<()>>,
}

/// A started server: its address, and the handle to stop it.
pub struct RunningServer {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    hurry: CancellationToken,
    task: JoinHandle<Result<(), ServerError>>,
}

/// Stops the NATS worker when the server stops, and with it when the server is aborted.
pub(crate) struct AbortOnDrop(pub(crate) JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl RunningServer {
    /// Stops accepting, drains in-flight requests and jobs, then returns.
    pub async fn shutdown(self) -> Result<(), ServerError> {
        self.shutdown.cancel();
        self.wait().await
    }

    /// Waits until the server stops (after the token given to [`Server::start`] is cancelled).
    pub async fn wait(self) -> Result<(), ServerError> {
        self.task.await.map_err(|e| ServerError::Task(e.to_string()))?
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Cancelled during a shutdown (a second signal), it ends the drain at once: requests still in flight get no
    /// answer, and jobs still being decided go back to the queue without waiting out the drain.
    pub fn hurry_token(&self) -> CancellationToken {
        self.hurry.clone()
    }

    /// Stops at once, as a crash would: no draining, in-flight requests and NATS events are dropped without
    /// an answer or an ack. For tests that a restart loses and duplicates nothing.
    pub async fn abort(self) {
        self.task.abort();
        let _ = self.task.await;
        // Job workers and webhook delivery are separate tasks; let them stop claiming work.
        self.shutdown.cancel();
    }
}

/// 244 random bits from the OS generator, hex: for secrets the operator does not choose.
pub fn random_token() -> String {
    format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

pub struct Server;

/// The name the key from `SAFEGUARD_ADMIN_KEY` is stored under.
const ADMIN_KEY_NAME: &str = "admin (SAFEGUARD_ADMIN_KEY)";

/// The shortest `SAFEGUARD_ADMIN_KEY` accepted off loopback: the key is stored as a plain SHA-256, so a short or
/// chosen-by-hand one falls to an offline guess if the database leaks, and to online guessing before that.
pub const MIN_PUBLIC_ADMIN_KEY_CHARS: usize = 24;

impl Server {
    /// Prepares the store (starter policies, admin key), binds, and starts HTTP, job workers and webhook
    /// delivery. Returns once the socket is listening.
    pub async fn start(
        mut config: ServerConfig,
        reasoner: Arc<dyn Reasoner>,
        store: Store,
    ) -> Result<RunningServer, ServerError> {
        policies::seed_starter_library(&store).await?;
        policies::reserve_active_labels(&store).await?;
        if let Some(key) = &config.admin_key {
            let length = key.chars().count();
            if !config.listen.ip().is_loopback() && length < MIN_PUBLIC_ADMIN_KEY_CHARS {
                return Err(ServerError::WeakAdminKey(config.listen, length));
            }
            // Setting another value is how an operator rotates the key: the ones it replaces stop working now,
            // not whenever someone remembers `safeguard keys revoke`. Replicas starting together with different
            // values end with the newest one live, never none.
            match store.install_named_key(ADMIN_KEY_NAME, &["admin".to_string()], key).await? {
                safeguard_store::KeyInstall::Current { retired, .. } => {
                    if retired > 0 {
                        tracing::info!(retired, "earlier SAFEGUARD_ADMIN_KEY values revoked");
                    }
                }
                // A value rotated away from, set again (an old pod, a rolled-back secret): starting would leave
                // the operator believing it works. A replica whose value is replaced after it started keeps
                // running; its admin key just stops working, as the rotation asked.
                safeguard_store::KeyInstall::Superseded { .. } => return Err(ServerError::RevokedAdminKey),
                safeguard_store::KeyInstall::OtherName { name } => {
                    return Err(ServerError::AdminKeyOfAnotherName(name));
                }
            }
        }
        let any_key = store.has_api_keys().await?;
        config.open_access = !any_key;
        if config.open_access {
            if !config.listen.ip().is_loopback() {
                return Err(ServerError::NoKeysOnPublicAddress(config.listen));
            }
            tracing::warn!(
                "no API keys exist: serving WITHOUT authentication on loopback {}; set SAFEGUARD_ADMIN_KEY to require keys",
                config.listen
            );
        }
        if config.webhook_secret.is_empty() {
            config.webhook_secret = random_token();
        }
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| ServerError::Bind { addr: config.listen, source })?;
        let addr = listener.local_addr().map_err(|source| ServerError::Bind { addr: config.listen, source })?;

        let guarded: Arc<dyn Reasoner> = Arc::new(GuardedReasoner::new(reasoner, config.reason_timeout));
        let cascade = Arc::new(moderate::CascadeState::new(
            config.routing.clone(),
            safeguard_pipeline::TriageLibrary::new(config.triage_dir.clone()),
            config.reasoning_per_sec,
            config.reasoning_tokens_per_sec,
            config.queue_share,
            config.active_learning,
            safeguard_core::TokenBudgets {
                low: guarded.completion_cap(Effort::Low),
                medium: guarded.completion_cap(Effort::Medium),
                high: guarded.completion_cap(Effort::High),
            },
        ));
        let prompt_metrics = Arc::new(metrics_setup::PromptMetrics::new(config.cost_per_1k_tokens));
        let classifier = Classifier::new(guarded.clone()).with_observer(prompt_metrics.clone());
        // Webhook deliveries only: a redirect would turn the signed POST into a GET to wherever it points, and
        // that GET's 2xx would count as delivered. A 3xx is a failed attempt instead.
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            // Through a proxy (HTTP_PROXY and friends) the resolver would only ever see the proxy's name, and the
            // proxy would reach whatever the URL names: internal hosts included.
            .no_proxy()
            .dns_resolver(webhooks::GuardedResolver { targets: Arc::new(config.webhook_targets.clone()) })
            .build()
            .map_err(ServerError::WebhookClient)?;
        let state = AppState {
            cascade,
            items: Arc::new(metrics_setup::ItemStats::new(config.cost_per_1k_tokens)),
            prompts: prompt_metrics,
            lookups: Arc::new(lookup_cache::Lookups::new(config.lookup_ttl)),
            open_access: Arc::new(auth::OpenAccess::new(config.open_access, config.lookup_ttl)),
            failed_keys: Arc::new(auth::FailedKeys::new()),
            nats_out: Arc::default(),
            nats_health: Arc::new(readiness::DownClock::down()),
            backend_health: Arc::new(readiness::DownClock::up()),
            store_figures: Arc::default(),
            rate_limiter: Arc::new(auth::RateLimiter::new(config.rate_limit_per_minute, config.rate_limit_burst)),
            config: Arc::new(config),
            store,
            classifier,
            reasoner: guarded,
            metrics: metrics_setup::handle(),
            jobs_waiting: Arc::new(Notify::new()),
            jobs_abandoned: CancellationToken::new(),
            http,
        };
        let shutdown = CancellationToken::new();
        let hurry = CancellationToken::new();
        let task = tokio::spawn(run(state, listener, shutdown.clone(), hurry.clone()));
        tracing::info!(%addr, "safeguard server listening");
        Ok(RunningServer { addr, shutdown, hurry, task })
    }
}

async fn run(
    state: AppState,
    listener: TcpListener,
    shutdown: CancellationToken,
    hurry: CancellationToken,
) -> Result<(), ServerError> {
    let workers: Vec<JoinHandle<()>> = (0..state.config.job_workers.max(1))
        .map(|i| tokio::spawn(jobs::worker(state.clone(), i, shutdown.clone())))
        .collect();
    let webhook_sender = tokio::spawn(webhooks::sender(state.clone(), shutdown.clone()));
    let _probes = state.reasoner.backends().is_some().then(|| {
        let interval = state.config.backend_probe_interval.max(Duration::from_millis(100));
        AbortOnDrop(tokio::spawn(readiness::probe_backends(state.clone(), interval, shutdown.clone())))
    });
    let _pruner = state.config.retention.clone().map(|retention| {
        AbortOnDrop(tokio::spawn(retention::prune_periodically(state.clone(), retention, shutdown.clone())))
    });
    // Inside this task's lifetime: aborting the server (a crash) takes the worker down with it.
    let ingest = state
        .config
        .nats
        .clone()
        .map(|nats| AbortOnDrop(tokio::spawn(ingest::run(state.clone(), nats, shutdown.clone()))));
    let drain_timeout = state.config.drain_timeout;
    let jobs_abandoned = state.jobs_abandoned.clone();
    let connections = state.config.connections;
    let app = router(state);
    let mut http = std::pin::pin!(http::serve(listener, app, connections, shutdown.clone()));
    let ended_early = tokio::select! {
        result = &mut http => Some(result),
        () = shutdown.cancelled() => None,
    };
    // One deadline from the signal on, for requests and jobs together: a request that reasons for minutes (or a
    // streamed reply to a client that stopped reading) must not use up the time the jobs need to be handed back
    // before the orchestrator kills the process.
    let deadline = tokio::time::Instant::now() + drain_timeout;
    let result = match ended_early {
        Some(result) => result,
        None => within(deadline, &hurry, &mut http).await.unwrap_or_else(|| {
            tracing::warn!("drain ran out with requests in flight; their clients get no answer and may retry");
            Ok(())
        }),
    }
    .map_err(|e| ServerError::Task(e.to_string()));
    // Now let workers finish the job each is on (they stop claiming once cancelled).
    let mut workers = workers;
    let drained = within(deadline, &hurry, async {
        join_all(&mut workers).await;
        let _ = webhook_sender.await;
        if let Some(mut ingest) = ingest {
            let _ = (&mut ingest.0).await;
        }
    })
    .await;
    if drained.is_none() {
        // A job still being decided goes back to the queue now, untried, instead of waiting out its lease: a
        // lease that runs out counts as an attempt its worker never came back from, and a job that went through
        // three restarts would be failed as one that kills its workers.
        jobs_abandoned.cancel();
        workers.retain(|worker| !worker.is_finished());
        let handed_back = tokio::time::timeout(Duration::from_secs(5), join_all(&mut workers)).await;
        match handed_back {
            Ok(()) => tracing::warn!("drain ended early; unfinished jobs were handed back to the queue"),
            Err(_) => {
                tracing::warn!("drain ended early; unfinished jobs will be claimed again when their lease expires")
            }
        }
    }
    result
}

/// `work`'s output, or `None` once the drain's deadline passes or a second signal says not to wait any longer.
async fn within<T>(
    deadline: tokio::time::Instant,
    hurry: &CancellationToken,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        output = work => Some(output),
        () = tokio::time::sleep_until(deadline) => None,
        () = hurry.cancelled() => None,
    }
}

/// Waits for every task in `tasks`; awaited by reference, so a deadline around it leaves the rest to wait on again.
async fn join_all(tasks: &mut [JoinHandle<()>]) {
    for task in tasks {
        let _ = task.await;
    }
}

pub fn router(state: AppState) -> Router {
    let body_limit = state.config.limits.max_body_bytes;
    Router::new()
        .route("/healthz", get(health))
        .route("/readyz", get(readiness::ready))
        .route("/metrics", get(metrics_setup::render))
        .route("/v1/stats/prompts", get(metrics_setup::prompt_stats))
        .route("/openapi.json", get(openapi::spec))
        .route("/v1/policies", post(policies::create).get(policies::list))
        .route("/v1/policies/{id}", get(policies::get_one))
        .route("/v1/policies/{id}/diff/{other}", get(policies::diff))
        .route("/v1/policies/{name}/activate", post(policies::activate))
        .route("/v1/classify", post(classify::classify))
        .route("/v1/classify/batch", post(classify::classify_batch))
        .route("/v1/moderate", post(moderate::moderate))
        .route("/v1/jobs", post(jobs::submit))
        .route("/v1/jobs/{id}", get(jobs::get_one))
        .route("/v1/webhooks/secret", get(webhooks::secret))
        .route("/v1/decisions", get(decisions::list))
        .route("/v1/decisions/{id}", get(decisions::get_one))
        .route("/v1/decisions/{id}/replay", post(decisions::replay))
        .route("/v1/decisions/{id}/appeal", post(reviews::appeal))
        .route("/v1/reviews", get(reviews::list))
        .route("/v1/reviews/{id}", get(reviews::get_one))
        .route("/v1/reviews/{id}/decide", post(reviews::decide))
        .route("/v1/reviews/{id}/claim", post(reviews::claim))
        .route("/review", get(reviews::page))
        .route("/v1/moderations", post(openai::moderations))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/models", get(openai::models))
        .fallback(no_such_route)
        .method_not_allowed_fallback(no_such_method)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::keyless_only_from_here))
        .layer(axum::middleware::from_fn(refuse_nul_in_url))
        .with_state(state)
}

/// A NUL (`%00`) in a path segment or query value names nothing a route stores, but the stores disagree on
/// saying so: SQLite finds no row, PostgreSQL refuses the text, which reads as a storage failure (a 503 that
/// clients retry). Refused alike for every route, before any handler reads it.
async fn refuse_nul_in_url(request: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    use axum::response::IntoResponse;
    let has_nul = |part: &str| part.as_bytes().windows(3).any(|w| w == b"%00");
    let uri = request.uri();
    if has_nul(uri.path()) || uri.query().is_some_and(has_nul) {
        return ApiError::bad("invalid_url", "the URL holds a NUL character (%00)").into_response();
    }
    next.run(request).await
}

/// JSON like every other error, for clients that read `error.message` whatever the status.
async fn no_such_route(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no route {}", uri.path()))
}

async fn no_such_method(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{} does not take {method}", uri.path()))
}

async fn health() -> &'static str {
    "ok"
}

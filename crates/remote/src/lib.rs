//! OpenAI-compatible remote engines (vLLM, SGLang, Ollama, LM Studio, llama.cpp server) as reasoners.
//!
//! [`RemoteReasoner`] spreads requests over several endpoints that serve the same model: least-loaded
//! choice among healthy endpoints, a concurrency limit and a circuit breaker per endpoint, timeouts, and
//! retries with exponential backoff on 408/429/5xx and transport errors (honouring `Retry-After` up to
//! [`RemoteConfig::backoff_max`]), and failover away from an endpoint that refuses the request itself
//! (401/403/404: a wrong key, a model it does not serve).
//! Whatever still fails comes back as a [`ReasonError`], which the classifier turns into `needs_review`.
//!
//! [`Reasoner::reason_streaming`] asks the server to stream and forwards reasoning as it arrives, and the
//! answer once the whole response is parsed. A failed stream is retried like any attempt until its first delta has gone out; after that a
//! retry would hand the reader a second beginning, so the failure is returned instead.

mod breaker;
mod stream;
mod wire;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rand::Rng;
use safeguard_core::{DeltaSender, EndpointHealth, ReasonDelta, ReasonError, ReasonOutput, ReasonRequest, Reasoner};
use safeguard_harmony::Effort;
use tokio::sync::Semaphore;
use tracing::{Instrument, debug, info, info_span, warn};

pub use breaker::{Breaker, BreakerState, Ticket};

/// Which family of server an endpoint is: they differ in how effort is sent and where reasoning comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Flavor {
    /// vLLM, SGLang, LM Studio and other Chat Completions servers: top-level `reasoning_effort`.
    #[default]
    OpenAi,
    /// Ollama's native `/api/chat`: `think: "low"|"medium"|"high"`, reasoning in `message.thinking`.
    Ollama,
    /// llama.cpp's `llama-server --jinja`: effort through `chat_template_kwargs`.
    LlamaCpp,
}

impl fmt::Display for Flavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Flavor::OpenAi => "openai",
            Flavor::Ollama => "ollama",
            Flavor::LlamaCpp => "llamacpp",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown backend flavor {0:?}: expected openai (vllm, sglang, lmstudio), ollama or llamacpp")]
    UnknownFlavor(String),
    #[error("backend URL {0:?} must start with http:// or https://")]
    BadUrl(String),
    #[error("no backend endpoints were given")]
    NoEndpoints,
}

impl FromStr for Flavor {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "openai" | "vllm" | "sglang" | "lmstudio" | "lm-studio" => Ok(Flavor::OpenAi),
            "ollama" => Ok(Flavor::Ollama),
            "llamacpp" | "llama.cpp" | "llama-cpp" | "llama-server" => Ok(Flavor::LlamaCpp),
            _ => Err(ConfigError::UnknownFlavor(s.to_string())),
        }
    }
}

/// One server. Written on the command line as `[FLAVOR+]URL`, e.g. `http://gpu1:8000/v1`,
/// `ollama+http://127.0.0.1:11434`, `llamacpp+http://127.0.0.1:8080/v1`.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointConfig {
    pub flavor: Flavor,
    /// Base URL: for Chat Completions servers it ends in `/v1`; for Ollama it is the server root.
    pub base_url: String,
    pub api_key: Option<String>,
    /// Requests in flight to this endpoint at most; more wait.
    pub max_concurrency: usize,
}

impl FromStr for EndpointConfig {
    type Err = ConfigError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let (flavor, url) = match spec.split_once('+') {
            Some((flavor, url)) if !flavor.contains("://") => (flavor.parse()?, url),
            _ => (Flavor::OpenAi, spec),
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(ConfigError::BadUrl(shown_url(url)));
        }
        // A key alone in the address (`https://:KEY@host/v1`, or `https://KEY@host/v1`) is sent as a bearer token,
        // as vLLM, SGLang, LM Studio and llama-server check `--api-key`; left in the address, it went out as Basic
        // auth, which they refuse, and every request failed. A user and a password (`user:pass@`, a proxy's basic
        // auth in front of Ollama) stay Basic auth.
        let (url, api_key) = match reqwest::Url::parse(url) {
            Ok(mut parsed) if parsed.has_host() => {
                let (user, password) = (parsed.username().to_string(), parsed.password().unwrap_or("").to_string());
                let key = match (user.is_empty(), password.is_empty()) {
                    (true, false) => Some(password),
                    (false, true) => Some(user),
                    _ => None,
                };
                match key {
                    Some(key) => {
                        let key = percent_decoded(&key).ok_or_else(|| ConfigError::BadUrl(shown_url(url)))?;
                        // These fail only for URLs without a host, excluded above.
                        let _ = parsed.set_username("");
                        let _ = parsed.set_password(None);
                        (parsed.to_string(), Some(key))
                    }
                    None => (url.to_string(), None),
                }
            }
            _ => (url.to_string(), None),
        };
        Ok(EndpointConfig { flavor, base_url: url.trim_end_matches('/').to_string(), api_key, max_concurrency: 8 })
    }
}

impl EndpointConfig {
    /// The address of `path` on this endpoint: after the base's own path, before its query (`?api-key=…`).
    pub fn url_of(&self, path: &str) -> String {
        self.address(false, path)
    }

    /// The address of `path` at the server's root, where llama-server serves what is not OpenAI's API (`/props`):
    /// the base without its `/v1`.
    pub fn root_url_of(&self, path: &str) -> String {
        self.address(true, path)
    }

    fn address(&self, at_root: bool, path: &str) -> String {
        let (base, query) = match self.base_url.split_once('?') {
            Some((base, query)) => (base, Some(query)),
            None => (self.base_url.as_str(), None),
        };
        let base = base.trim_end_matches('/');
        // Only a path's `/v1`: the host of `http://v1` stays.
        let root =
            base.strip_suffix("/v1").filter(|root| root.split_once("://").is_some_and(|(_, host)| !host.is_empty()));
        let base = if at_root { root.unwrap_or(base) } else { base };
        match query {
            Some(query) => format!("{base}/{path}?{query}"),
            None => format!("{base}/{path}"),
        }
    }
}

/// `%XX` escapes in a URL's userinfo back to their bytes (a key with `@` or `:` in it must be escaped there). `None`
/// for what no header can carry: text that is not UTF-8, or holds control characters.
fn percent_decoded(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).filter(|h| h.iter().all(u8::is_ascii_hexdigit));
        let byte = hex.and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], byte) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok().filter(|key| !key.is_empty() && !key.chars().any(char::is_control))
}

/// How hard to try before giving up on a request.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// The model name the servers know it by, e.g. `openai/gpt-oss-safeguard-20b` or `gpt-oss-safeguard:20b`.
    pub model: String,
    pub endpoints: Vec<EndpointConfig>,
    /// One HTTP attempt, connect to last byte, streamed or not.
    pub request_timeout: Duration,
    /// The longest silence allowed inside a streamed response before the attempt fails as stalled.
    pub stream_idle_timeout: Duration,
    /// Attempts per request, across endpoints.
    pub max_attempts: u32,
    pub backoff_base: Duration,
    /// The longest wait before a retry, ours or a server's `Retry-After`. A server that asks for longer (a
    /// gateway answering 429 with `Retry-After: 3600`) is not retried within this request: waiting would hold
    /// the caller for as long as the server says, so the request tries another endpoint or fails at once.
    pub backoff_max: Duration,
    /// Consecutive failures that open an endpoint's breaker, and how long it stays open.
    pub breaker_threshold: u32,
    pub breaker_cooldown: Duration,
    /// Completion budget per effort when a request leaves it to us. Reasoning models spend most of it
    /// thinking; too small a budget means no answer at all.
    pub budget_low: usize,
    pub budget_medium: usize,
    pub budget_high: usize,
    /// Ask Chat Completions servers for logprobs, giving the engine's confidence in the answer.
    pub logprobs: bool,
    /// The tokens one request may take on the servers, prompt and completion together, when the operator says
    /// (`--backend-context`). Content that would not fit beside its policy and its budget is then refused before it
    /// is sent ([`Reasoner::context_tokens`]), and Ollama is sent it as `num_ctx`: by default Ollama uses a context
    /// of its own and cuts a longer prompt at the front, policy first, while its reply still says `stop`. One fixed
    /// value, since Ollama reloads the model whenever `num_ctx` changes.
    pub context_tokens: Option<usize>,
}

/// How long one HTTP attempt may take by default: enough for a high-effort answer from a GPU server.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

impl RemoteConfig {
    pub fn new(model: impl Into<String>, endpoints: Vec<EndpointConfig>) -> Self {
        Self {
            model: model.into(),
            endpoints,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            stream_idle_timeout: Duration::from_secs(60),
            max_attempts: 3,
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(30),
            budget_low: 2048,
            budget_medium: 4096,
            budget_high: 8192,
            logprobs: false,
            context_tokens: None,
        }
    }

    fn budget(&self, effort: Effort) -> usize {
        match effort {
            Effort::Low => self.budget_low,
            Effort::Medium => self.budget_medium,
            Effort::High => self.budget_high,
        }
    }
}

struct Endpoint {
    config: EndpointConfig,
    /// The base URL as logs and [`EndpointStatus`] show it ([`shown_url`]): never its credentials.
    shown: String,
    /// How errors name it: "backend 2", its place among the configured endpoints. Errors become a decision's
    /// failure reason, which the client that sent the item, its webhook and the review page see; the address of
    /// an internal server is for the operator's logs and metrics.
    label: String,
    permits: Semaphore,
    /// Requests holding a permit: sent, or about to be.
    in_flight: AtomicUsize,
    /// Requests chosen for this endpoint and not yet done, waiting for a permit or in flight: its load. Counted
    /// at the choice, since a request queued on the permits is as much this endpoint's work as one in flight.
    assigned: AtomicUsize,
    breaker: std::sync::Mutex<Breaker>,
    /// Set by health checks; a fresh endpoint is presumed healthy until a probe says otherwise.
    healthy: AtomicBool,
    /// When the server last began an answer to a request of ours (its response headers arrived), in microseconds
    /// since `born`: what tells a server that is slow from one that answers nothing. Health checks do not count:
    /// a server whose engine is stuck may still list its models.
    heard_us: AtomicU64,
    born: Instant,
    /// The context one request may take there, as the server last reported it (its model list,
    /// [`wire::served_context`], or llama-server's `/props`, [`wire::llama_server_context`]); 0 while unknown.
    /// Kept through a failed probe: a server that restarts comes back with the settings it had.
    reported_context: AtomicUsize,
}

/// A snapshot of one endpoint, for `/readyz` and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointStatus {
    /// The base URL without credentials, query or fragment ([`shown_url`]).
    pub url: String,
    pub flavor: Flavor,
    pub healthy: bool,
    pub breaker: BreakerState,
    pub in_flight: usize,
}

/// A [`Reasoner`] backed by one or more OpenAI-compatible servers serving the same model.
#[derive(Clone)]
pub struct RemoteReasoner {
    inner: Arc<Inner>,
}

struct Inner {
    config: RemoteConfig,
    endpoints: Vec<Endpoint>,
    client: reqwest::Client,
    next: AtomicUsize,
}

/// What a server's `Retry-After` means for the next attempt at it within one request.
#[derive(Clone, Copy)]
enum ServerWait {
    /// Not before this instant.
    Until(Instant),
    /// Longer than [`RemoteConfig::backoff_max`]: that endpoint is not retried.
    TooLong(Duration),
}

/// The outcome of one HTTP attempt, classified for the retry loop.
enum AttemptError {
    /// Worth another try, possibly after the server's own `Retry-After`.
    Retryable { detail: String, retry_after: Option<Duration> },
    /// Trying again anywhere would fail the same way (a 400, a 413, a 422: the request itself is wrong).
    Fatal(String),
    /// This endpoint refused the request for reasons of its own (401: its key; 403: its key, or a filter in front
    /// of it; 404: it does not serve the model, as an Ollama node without it pulled or a vLLM replica started under
    /// another name). Another endpoint may well take it. A 401 or 404 is the endpoint's for every request, so it
    /// counts against its health: its breaker takes it out of rotation instead of least-loaded routing sending it
    /// more of the requests it fails fast. A 403 is not counted: a WAF in front of a hosted backend refuses
    /// particular bodies, and a moderation service sends it slurs and injection payloads all day; a run of those
    /// must not shut the endpoint for the clean items behind them.
    Refused { detail: String, endpoint_wide: bool },
    /// The server answered 200 but what it sent is no answer (a body that does not parse, an error inside it, a
    /// body past [`MAX_RESPONSE_BYTES`]). It may well have generated, and billed, a completion: asking again
    /// would pay twice. Not retried, but counted against the server's health, unlike `Fatal`.
    Unhealthy(String),
}

/// Largest response body read from a server: a completion is a few hundred kilobytes at most, and a server
/// that sends more (a broken proxy, a hostile endpoint) must not make this process hold all of it.
pub(crate) const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// A probe's JSON body, up to 1 MiB (a model list, llama-server's properties with its chat template); `None`
/// when it is longer, cut off (the probe's own timeout) or not JSON.
async fn read_json(response: &mut reqwest::Response) -> Option<serde_json::Value> {
    let body = read_capped(response, 1024 * 1024).await.ok()??;
    serde_json::from_slice(&body).ok()
}

/// Reads a response body up to `cap` bytes; `None` once it would pass them.
async fn read_capped(response: &mut reqwest::Response, cap: usize) -> Result<Option<Vec<u8>>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > cap {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

impl RemoteReasoner {
    pub fn new(config: RemoteConfig) -> Result<Self, ConfigError> {
        if config.endpoints.is_empty() {
            return Err(ConfigError::NoEndpoints);
        }
        let client = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .connect_timeout(config.request_timeout.min(Duration::from_secs(10)))
            .build()
            .map_err(|e| ConfigError::BadUrl(e.to_string()))?;
        let endpoints = config
            .endpoints
            .iter()
            .enumerate()
            .map(|(index, c)| Endpoint {
                config: c.clone(),
                shown: shown_url(&c.base_url),
                label: format!("backend {}", index + 1),
                permits: Semaphore::new(c.max_concurrency.max(1)),
                in_flight: AtomicUsize::new(0),
                assigned: AtomicUsize::new(0),
                breaker: std::sync::Mutex::new(Breaker::new(config.breaker_threshold, config.breaker_cooldown)),
                healthy: AtomicBool::new(true),
                heard_us: AtomicU64::new(0),
                born: Instant::now(),
                reported_context: AtomicUsize::new(0),
            })
            .collect();
        Ok(Self { inner: Arc::new(Inner { config, endpoints, client, next: AtomicUsize::new(0) }) })
    }

    pub fn status(&self) -> Vec<EndpointStatus> {
        let now = Instant::now();
        self.inner
            .endpoints
            .iter()
            .map(|e| EndpointStatus {
                url: e.shown.clone(),
                flavor: e.config.flavor,
                healthy: e.healthy.load(Ordering::Relaxed),
                breaker: lock(&e.breaker).state(now),
                in_flight: e.in_flight.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Probes every endpoint once; returns how many answered.
    pub async fn check_health(&self) -> usize {
        let mut healthy = 0;
        for endpoint in &self.inner.endpoints {
            let url = endpoint.config.url_of(wire::health_path(endpoint.config.flavor));
            let mut request = self.inner.client.get(&url).timeout(Duration::from_secs(5));
            if let Some(key) = &endpoint.config.api_key {
                request = request.bearer_auth(key);
            }
            let ok = match request.send().await {
                Ok(mut response) if response.status().is_success() => {
                    let tokens = match endpoint.config.flavor {
                        Flavor::LlamaCpp => self.llama_server_context(endpoint).await,
                        flavor => read_json(&mut response)
                            .await
                            .and_then(|models| wire::served_context(flavor, &self.inner.config.model, &models)),
                    };
                    if let Some(tokens) = tokens {
                        self.note_served_context(endpoint, tokens);
                    }
                    true
                }
                _ => false,
            };
            if endpoint.healthy.swap(ok, Ordering::Relaxed) != ok {
                warn!(endpoint = %endpoint.shown, healthy = ok, "backend health changed");
            }
            healthy += usize::from(ok);
        }
        healthy
    }

    /// What llama-server's `/props` says one request may take (see [`wire::llama_server_context`]); `None` where
    /// it does not answer, as an older build or a proxy in front of it may not.
    async fn llama_server_context(&self, endpoint: &Endpoint) -> Option<usize> {
        let mut request = self.inner.client.get(endpoint.config.root_url_of("props")).timeout(Duration::from_secs(5));
        if let Some(key) = &endpoint.config.api_key {
            request = request.bearer_auth(key);
        }
        let mut response = request.send().await.ok().filter(|response| response.status().is_success())?;
        wire::llama_server_context(&read_json(&mut response).await?)
    }

    /// Keeps the context a healthy endpoint reports for our model. A probe that reports none (its body not read
    /// whole, or naming no context) leaves what was known.
    fn note_served_context(&self, endpoint: &Endpoint, tokens: usize) {
        let before = endpoint.reported_context.swap(tokens, Ordering::Relaxed);
        if before != tokens && self.inner.config.context_tokens.is_none() {
            info!(endpoint = %endpoint.shown, context_tokens = tokens, "backend reports its context per request");
        }
    }

    /// Runs [`check_health`](Self::check_health) every `interval` until the returned handle is aborted.
    pub fn spawn_health_checks(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            loop {
                ticker.tick().await;
                this.check_health().await;
            }
        })
    }

    /// Picks the least-loaded endpoint that is healthy and whose breaker lets a request through, and claims it.
    /// Load is the requests assigned to an endpoint (queued on its permits or in flight) per permit, so that an
    /// endpoint taking one request at a time is not handed as many as one taking eight. Unhealthy endpoints are
    /// the last resort rather than never tried: a stale health flag must not turn a working backend into a total
    /// outage. Endpoints that asked this request to wait too long come after all others, and the one that just
    /// failed it after the rest. `refused` endpoints (see [`AttemptError::Refused`]) are never chosen again for
    /// this request.
    fn choose(&self, previous: Option<usize>, waits: &[Option<ServerWait>], refused: &[bool]) -> Option<Hold<'_>> {
        let endpoints = &self.inner.endpoints;
        let start = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut order: Vec<usize> = (0..endpoints.len())
            .map(|i| (start + i) % endpoints.len())
            .filter(|&i| !refused.get(i).copied().unwrap_or(false))
            .collect();
        let rank = |i: usize| {
            let e = &endpoints[i];
            let too_long = matches!(waits.get(i), Some(Some(ServerWait::TooLong(_))));
            (too_long, Some(i) == previous, !e.healthy.load(Ordering::Relaxed))
        };
        // assigned / capacity, compared by cross-multiplying so that no division rounds two loads together.
        let load = |i: usize| {
            let e = &endpoints[i];
            (e.assigned.load(Ordering::Relaxed) as u128, e.config.max_concurrency.max(1) as u128)
        };
        // A stable sort: among equal loads, the rotation from `next` decides.
        order.sort_by(|&a, &b| {
            rank(a).cmp(&rank(b)).then_with(|| {
                let ((load_a, cap_a), (load_b, cap_b)) = (load(a), load(b));
                (load_a * cap_b).cmp(&(load_b * cap_a))
            })
        });
        order.into_iter().find_map(|index| {
            let endpoint = &endpoints[index];
            let ticket = lock(&endpoint.breaker).try_acquire(now)?;
            endpoint.assigned.fetch_add(1, Ordering::Relaxed);
            Some(Hold { index, endpoint, ticket, sent_us: None, settled: false })
        })
    }

    /// Runs one request to completion: endpoint choice, retries with backoff, and, with `deltas`, streaming.
    async fn run(&self, req: ReasonRequest, deltas: Option<&DeltaSender>) -> Result<ReasonOutput, ReasonError> {
        let cfg = &self.inner.config;
        let max_tokens = if req.max_tokens == 0 { cfg.budget(req.effort) } else { req.max_tokens };
        let started = Instant::now();
        let mut sink = deltas.map(|sender| DeltaSink { sender, sent_any: false });
        let mut last_error = String::from("no endpoint accepted the request (all circuit breakers open)");
        let mut previous = None;
        // Per endpoint, what its last `Retry-After` asked of this request. Kept apart so that one server's
        // wait does not hold up a retry that goes to another.
        let mut waits: Vec<Option<ServerWait>> = vec![None; self.inner.endpoints.len()];
        // Per endpoint, whether it refused this request itself; it would refuse a retry the same way.
        let mut refused = vec![false; self.inner.endpoints.len()];
        for attempt in 0..cfg.max_attempts.max(1) {
            // Chosen before the backoff, because the wait depends on which endpoint the retry goes to.
            let Some(hold) = self.choose(previous, &waits, &refused) else {
                break;
            };
            let index = hold.index;
            if attempt > 0 {
                let server = match waits[index] {
                    Some(ServerWait::TooLong(asked)) => {
                        return Err(ReasonError::Backend(format!(
                            "{last_error} (the server asked to be retried after {} s, longer than the {:.1} s a \
                             retry may wait, so it was not retried)",
                            asked.as_secs(),
                            cfg.backoff_max.as_secs_f64()
                        )));
                    }
                    Some(ServerWait::Until(at)) => Some(at.saturating_duration_since(Instant::now())),
                    None => None,
                };
                tokio::time::sleep(self.backoff(attempt - 1, server)).await;
            }
            previous = Some(index);
            let endpoint = hold.endpoint;
            let flavor = endpoint.config.flavor;
            let mut body = wire::request_body(flavor, &cfg.model, &req, max_tokens, cfg.context_tokens, cfg.logprobs);
            if sink.is_some() {
                wire::enable_streaming(flavor, &mut body);
            }
            let span = info_span!("remote_attempt", endpoint = %endpoint.shown, attempt, streaming = sink.is_some());
            match self.attempt(hold, &body, sink.as_mut()).instrument(span).await {
                Ok(mut out) => {
                    out.timings.total_ms = started.elapsed().as_secs_f64() * 1e3;
                    if out.usage.prompt_tokens == 0 {
                        // The server sent no count (no `usage` block); budgets and cost still need one.
                        out.usage.prompt_tokens = wire::estimate_prompt_tokens(&req);
                    }
                    let reported = out.usage;
                    if wire::clamp_usage(&mut out.usage, max_tokens, wire::prompt_token_bound(&req)) {
                        warn!(
                            endpoint = %endpoint.shown,
                            ?reported,
                            counted = ?out.usage,
                            max_tokens,
                            "the backend's token counts are more than the request allows; counting the most it can \
                             have spent"
                        );
                    }
                    return Ok(out);
                }
                Err(AttemptError::Fatal(detail) | AttemptError::Unhealthy(detail)) => {
                    warn!(endpoint = %endpoint.shown, %detail, "backend request failed");
                    return Err(ReasonError::Backend(detail));
                }
                Err(AttemptError::Retryable { detail, .. }) if sink.as_ref().is_some_and(|s| s.sent_any) => {
                    warn!(endpoint = %endpoint.shown, %detail, "backend stream failed part way");
                    return Err(ReasonError::Backend(format!(
                        "{detail} (part of the answer had already been streamed, so it was not retried)"
                    )));
                }
                Err(AttemptError::Retryable { detail, retry_after }) => {
                    debug!(endpoint = %endpoint.shown, %detail, attempt, "backend attempt failed");
                    last_error = detail;
                    waits[index] = retry_after.map(|asked| self.server_wait(asked));
                }
                // Refused before any of the answer was read, so nothing was streamed yet: another endpoint may
                // answer in full.
                Err(AttemptError::Refused { detail, .. }) => {
                    warn!(endpoint = %endpoint.shown, %detail, attempt, "backend endpoint refused the request; trying another");
                    last_error = detail;
                    refused[index] = true;
                }
            }
        }
        // Each attempt's endpoint address is in its own log line; the error names endpoints by label only.
        warn!(%last_error, "no backend attempt succeeded");
        Err(ReasonError::Backend(last_error))
    }

    async fn attempt(
        &self,
        mut hold: Hold<'_>,
        body: &serde_json::Value,
        sink: Option<&mut DeltaSink<'_>>,
    ) -> Result<ReasonOutput, AttemptError> {
        let endpoint = hold.endpoint;
        let Ok(_permit) = endpoint.permits.acquire().await else {
            return Err(AttemptError::Fatal("endpoint closed".into()));
        };
        // The breaker may have opened while this waited behind the endpoint's other requests: sent now, each
        // queued request would wait out the request timeout on a server known to fail, instead of going to another.
        // Given back unsent, it counts as no failure.
        if lock(&endpoint.breaker).opened_since(hold.ticket) {
            return Err(AttemptError::Retryable {
                detail: "the endpoint's circuit breaker opened while the request waited for it".into(),
                retry_after: None,
            });
        }
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        hold.sent_us = Some(endpoint.clock_us());
        let started = Instant::now();
        let result = self.send(endpoint, body, sink).await;
        hold.settle(&result);
        result.map(|mut out| {
            if out.timings.prefill_ms == 0.0 && out.timings.decode_ms == 0.0 {
                // The server did not split its time; the whole round trip counts as decode.
                out.timings.decode_ms = started.elapsed().as_secs_f64() * 1e3;
            }
            out
        })
    }

    async fn send(
        &self,
        endpoint: &Endpoint,
        body: &serde_json::Value,
        sink: Option<&mut DeltaSink<'_>>,
    ) -> Result<ReasonOutput, AttemptError> {
        let flavor = endpoint.config.flavor;
        let target = endpoint.config.url_of(wire::chat_path(flavor));
        // Every error names the endpoint by its label, never by `target` (which may hold credentials) nor by its
        // address (see `Endpoint::label`).
        let url = endpoint.label.as_str();
        let mut request = self.inner.client.post(&target).json(body);
        if let Some(key) = &endpoint.config.api_key {
            request = request.bearer_auth(key);
        }
        let response = request
            .send()
            .await
            .map_err(|e| AttemptError::Retryable { detail: format!("{url}: {}", describe(&e)), retry_after: None })?;
        endpoint.heard_us.fetch_max(endpoint.clock_us(), Ordering::Relaxed);
        let status = response.status();
        if !status.is_success() {
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let mut response = response;
            // Only an excerpt of an error page is shown; the rest is not worth holding.
            let text = read_capped(&mut response, 64 * 1024).await.ok().flatten().unwrap_or_default();
            let detail = format!("{url}: HTTP {status}: {}", excerpt(&String::from_utf8_lossy(&text)));
            return Err(match status.as_u16() {
                408 | 429 | 500..=599 => AttemptError::Retryable { detail, retry_after },
                401 | 404 => AttemptError::Refused { detail, endpoint_wide: true },
                403 => AttemptError::Refused { detail, endpoint_wide: false },
                _ => AttemptError::Fatal(detail),
            });
        }
        // A server that ignores `stream: true`, or reports an error with a 200, answers with one JSON body.
        let streamed = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| !t.trim_start().starts_with("application/json"));
        let sink = match sink {
            Some(sink) if streamed => return self.read_stream(flavor, url, response, sink).await,
            sink => sink,
        };
        let mut response = response;
        let body = match read_capped(&mut response, MAX_RESPONSE_BYTES).await {
            Ok(Some(body)) => body,
            Ok(None) => {
                return Err(AttemptError::Unhealthy(format!(
                    "{url}: the response body is over {MAX_RESPONSE_BYTES} bytes"
                )));
            }
            // Cut off on the way: the answer never arrived whole, so another try is worth it.
            Err(e) => {
                let detail = format!("{url}: the response body broke off: {}", describe(&e));
                return Err(AttemptError::Retryable { detail, retry_after: None });
            }
        };
        let value: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| AttemptError::Unhealthy(format!("{url}: unreadable response body: {e}")))?;
        let output =
            wire::parse_response(flavor, &value).map_err(|e| AttemptError::Unhealthy(format!("{url}: {e}")))?;
        if let Some(sink) = sink {
            sink.send_all(whole_as_deltas(&output));
        }
        Ok(output)
    }

    /// Reads a streamed response, forwarding deltas as they complete.
    async fn read_stream(
        &self,
        flavor: Flavor,
        url: &str,
        mut response: reqwest::Response,
        sink: &mut DeltaSink<'_>,
    ) -> Result<ReasonOutput, AttemptError> {
        let idle = self.inner.config.stream_idle_timeout;
        let mut reader = stream::StreamReader::new(flavor);
        while !reader.is_done() {
            let chunk = match tokio::time::timeout(idle, response.chunk()).await {
                Ok(Ok(Some(chunk))) => chunk,
                Ok(Ok(None)) => break,
                Ok(Err(e)) => {
                    return Err(AttemptError::Retryable {
                        detail: format!("{url}: the stream broke off: {}", describe(&e)),
                        retry_after: None,
                    });
                }
                Err(_) => {
                    return Err(AttemptError::Retryable {
                        detail: format!("{url}: the stream stalled: nothing arrived for {:.1} s", idle.as_secs_f64()),
                        retry_after: None,
                    });
                }
            };
            sink.send_all(reader.push(&chunk).map_err(|e| stream_failure(url, e))?);
        }
        let (held_back, output) = reader.finish().map_err(|e| stream_failure(url, e))?;
        sink.send_all(held_back);
        Ok(output)
    }

    /// A server's `Retry-After`, honoured up to `backoff_max`.
    fn server_wait(&self, asked: Duration) -> ServerWait {
        match Instant::now().checked_add(asked) {
            Some(at) if asked <= self.inner.config.backoff_max => ServerWait::Until(at),
            _ => ServerWait::TooLong(asked),
        }
    }

    /// The wait before retry number `attempt + 1`: our own exponential backoff, or the server's wait
    /// (already within `backoff_max`, see [`server_wait`](Self::server_wait)) if that is longer.
    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let cfg = &self.inner.config;
        let exp = cfg.backoff_base.saturating_mul(1u32 << attempt.min(16)).min(cfg.backoff_max);
        // Full jitter keeps many clients that failed together from retrying together.
        let jittered = exp.mul_f64(rand::rng().random_range(0.5..=1.0));
        retry_after.map_or(jittered, |server| server.max(jittered))
    }
}

#[async_trait]
impl Reasoner for RemoteReasoner {
    fn model_id(&self) -> String {
        format!("remote:{}", self.inner.config.model)
    }

    fn backends(&self) -> Option<Vec<EndpointHealth>> {
        let endpoints = self.status().into_iter().map(|status| EndpointHealth {
            url: status.url,
            answering: status.healthy,
            accepting: status.breaker != BreakerState::Open,
            in_flight: status.in_flight,
        });
        Some(endpoints.collect())
    }

    async fn probe_backends(&self) {
        self.check_health().await;
    }

    fn completion_cap(&self, effort: Effort) -> usize {
        self.inner.config.budget(effort)
    }

    /// What the operator said (`--backend-context`), or else the smallest context the endpoints report: a request
    /// may go to any of them, so it must fit the smallest. Endpoints that report none (Ollama, LM Studio, a
    /// llama-server without `/props`) do not count; with none reported, the context is unknown.
    fn context_tokens(&self) -> Option<usize> {
        let reported = || {
            let known = self.inner.endpoints.iter().map(|e| e.reported_context.load(Ordering::Relaxed));
            known.filter(|&tokens| tokens > 0).min()
        };
        self.inner.config.context_tokens.or_else(reported)
    }

    async fn reason(&self, req: ReasonRequest) -> Result<ReasonOutput, ReasonError> {
        self.run(req, None).await
    }

    async fn reason_streaming(&self, req: ReasonRequest, deltas: DeltaSender) -> Result<ReasonOutput, ReasonError> {
        self.run(req, Some(&deltas)).await
    }

    /// As many requests as the endpoints take at once (`max_concurrency` each); the rest wait for a permit.
    fn batch_width(&self) -> Option<usize> {
        Some(self.inner.endpoints.iter().map(|e| e.config.max_concurrency.max(1)).sum::<usize>().max(1))
    }

    async fn reason_batch(&self, reqs: Vec<ReasonRequest>) -> Vec<Result<ReasonOutput, ReasonError>> {
        // The servers batch across concurrent requests themselves; send them together.
        let mut tasks = tokio::task::JoinSet::new();
        let count = reqs.len();
        for (i, req) in reqs.into_iter().enumerate() {
            let this = self.clone();
            // Aborted when this batch is dropped; seeing the deadline, an attempt aborted for it counts as failed.
            tasks.spawn(safeguard_core::deadline::carried(async move { (i, this.reason(req).await) }));
        }
        let mut results: Vec<Option<Result<ReasonOutput, ReasonError>>> = (0..count).map(|_| None).collect();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((i, result)) => results[i] = Some(result),
                Err(e) => warn!("a backend request task died: {e}"),
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(ReasonError::Backend("the request task died".into()))))
            .collect()
    }
}

/// Where a streamed request sends its deltas, and whether any went out yet.
struct DeltaSink<'a> {
    sender: &'a DeltaSender,
    sent_any: bool,
}

impl DeltaSink<'_> {
    fn send_all(&mut self, deltas: Vec<ReasonDelta>) {
        for delta in deltas {
            self.sent_any = true;
            // A receiver that went away (the client hung up) does not stop the answer: it is still a decision.
            let _ = self.sender.send(delta);
        }
    }
}

/// One attempt's claim on an endpoint: its place in `assigned` and `in_flight` and its breaker ticket, the probe
/// slot when the breaker was half open. An attempt abandoned mid-way must release both; a probe slot left taken
/// would shut the endpoint out for good.
struct Hold<'a> {
    index: usize,
    endpoint: &'a Endpoint,
    ticket: Ticket,
    /// When it was sent (in the endpoint's clock, [`Endpoint::clock_us`]); `None` while it waits for a permit.
    sent_us: Option<u64>,
    settled: bool,
}

/// The least an attempt must have waited in silence before its step's deadline blames the server: one sent just
/// before the deadline (a retry after the step's time went on earlier tries) had no chance to be answered.
const MIN_SILENCE_BLAMED: Duration = Duration::from_secs(1);

impl Hold<'_> {
    fn settle(&mut self, result: &Result<ReasonOutput, AttemptError>) {
        let mut breaker = lock(&self.endpoint.breaker);
        match result {
            Ok(_) => breaker.on_success(self.ticket),
            // A request the server rejected as malformed says nothing about the server's health.
            Err(AttemptError::Fatal(_) | AttemptError::Refused { endpoint_wide: false, .. }) => {
                breaker.on_success(self.ticket)
            }
            Err(
                AttemptError::Retryable { .. }
                | AttemptError::Unhealthy(_)
                | AttemptError::Refused { endpoint_wide: true, .. },
            ) => breaker.on_failure(self.ticket, Instant::now()),
        }
        self.settled = true;
    }

    /// Whether an attempt abandoned unsettled counts as its server's failure: sent, dropped because its step's
    /// deadline passed ([`safeguard_core::deadline`]), after at least [`MIN_SILENCE_BLAMED`], and with not a word
    /// from the server since it went out, to this request or any other. Such a server takes requests and answers
    /// none, and would otherwise stay in rotation whenever callers give up before `request_timeout`. A server
    /// that began any answer meanwhile is slow, not stuck, and a step's deadline, when the many prompts of one
    /// step miss it together, must not take every endpoint out at once. Abandoned for any other reason (a client
    /// that hung up), an attempt says nothing about the server.
    fn blamed_for_its_deadline(&self) -> bool {
        let Some(sent) = self.sent_us else { return false };
        let waited = self.endpoint.clock_us().saturating_sub(sent);
        waited >= MIN_SILENCE_BLAMED.as_micros() as u64
            && self.endpoint.heard_us.load(Ordering::Relaxed) < sent
            && safeguard_core::deadline::passed()
    }
}

impl Endpoint {
    /// Microseconds since the endpoint was set up: a clock that fits an atomic.
    fn clock_us(&self) -> u64 {
        self.born.elapsed().as_micros() as u64
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.endpoint.assigned.fetch_sub(1, Ordering::Relaxed);
        if self.sent_us.is_some() {
            self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        if !self.settled {
            let blamed = self.blamed_for_its_deadline();
            let mut breaker = lock(&self.endpoint.breaker);
            if blamed {
                breaker.on_failure(self.ticket, Instant::now());
            } else {
                breaker.on_abandoned(self.ticket);
            }
        }
    }
}

/// A whole answer told as a stream: its reasoning, then its answer, as the trait's fallback does.
fn whole_as_deltas(output: &ReasonOutput) -> Vec<ReasonDelta> {
    let reasoning = output.analysis.clone().filter(|r| !r.is_empty()).map(ReasonDelta::Reasoning);
    let answer = output.final_text.clone().filter(|a| !a.is_empty()).map(ReasonDelta::Final);
    reasoning.into_iter().chain(answer).collect()
}

fn stream_failure(url: &str, error: stream::StreamError) -> AttemptError {
    use stream::StreamError;
    let retryable = match &error {
        StreamError::Unreadable(_) | StreamError::Incomplete => true,
        StreamError::Server { transient, .. } => *transient,
        StreamError::TooLarge(_) => return AttemptError::Unhealthy(format!("{url}: {error}")),
        StreamError::Shape(_) => false,
    };
    let detail = format!("{url}: {error}");
    if retryable { AttemptError::Retryable { detail, retry_after: None } } else { AttemptError::Fatal(detail) }
}

/// A transport error with its causes: reqwest's own text ("error decoding response body") hides the reason.
fn describe(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        return "timed out".to_string();
    }
    let mut text = error.to_string();
    // reqwest names the URL; the caller names the endpoint already, without anything secret in its URL.
    if let Some(url) = error.url() {
        text = text.replace(&format!(" for url ({url})"), "");
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the breaker lock leaves plain counters behind; they are still usable.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A server's own text (an error page, an error object) as an error may quote it: a short excerpt on one line.
/// It ends up in a decision's failure reason, in front of API clients, webhooks and the review page, so control
/// characters (newlines that forge log lines, terminal escapes) and bidirectional overrides go, and the length is
/// held to what identifies the failure.
pub(crate) fn excerpt(text: &str) -> String {
    let cleaned: String = text.chars().map(|c| if c.is_control() || is_bidi_control(c) { ' ' } else { c }).collect();
    let mut out = String::new();
    for (i, word) in cleaned.split_whitespace().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(word);
        if out.chars().count() > EXCERPT_CHARS {
            let end = out.char_indices().nth(EXCERPT_CHARS).map_or(out.len(), |(at, _)| at);
            out.truncate(end);
            out.push('…');
            break;
        }
    }
    out
}

/// Enough for vLLM's longest usual message (the context-length one) with its JSON around it.
const EXCERPT_CHARS: usize = 200;

/// Characters that reorder the text around them when shown (U+202A..U+202E, U+2066..U+2069).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// A URL as errors and logs may show it: scheme, host, port and path, without the credentials a URL may carry
/// (`http://user:pass@host`), and without query or fragment, where API keys also travel
/// (`?api-key=`). The host and port stay: they tell an operator which endpoint failed.
pub fn shown_url(url: &str) -> String {
    // Without a host (`user:secret@gpu1` reads as scheme `user`), the parser has no userinfo to clear.
    if let Ok(mut parsed) = reqwest::Url::parse(url)
        && parsed.has_host()
    {
        // These fail only for URLs that cannot carry credentials (no host), which the check above excludes.
        let _ = parsed.set_username("");
        let _ = parsed.set_password(None);
        parsed.set_query(None);
        parsed.set_fragment(None);
        return parsed.as_str().trim_end_matches('/').to_string();
    }
    // Not a URL reqwest reads (a password with an unescaped `/`, `#` or `@`): everything up to the last `@`
    // may be credentials, so all of it goes, the scheme aside.
    let (scheme, rest) = url.split_once("://").map_or(("", url), |(scheme, rest)| (scheme, rest));
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    if scheme.is_empty() { rest.to_string() } else { format!("{scheme}://{rest}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_in_the_address_is_a_bearer_token_and_paths_go_before_the_query() {
        for (spec, key) in [
            ("http://:sk-1@gpu1:8000/v1", "sk-1"),
            ("vllm+https://sk-2@gpu1/v1/", "sk-2"),
            ("http://:p%40ss%3Aword@gpu1/v1", "p@ss:word"),
        ] {
            let endpoint: EndpointConfig = spec.parse().unwrap();
            assert_eq!(endpoint.api_key.as_deref(), Some(key), "{spec}");
            assert!(!endpoint.base_url.contains(key) && !endpoint.base_url.contains('@'), "{}", endpoint.base_url);
        }
        // A user and a password are a proxy's basic auth, left in the address for the client to send as such.
        let basic: EndpointConfig = "ollama+https://user:pass@proxy/".parse().unwrap();
        assert_eq!((basic.api_key, basic.base_url.as_str()), (None, "https://user:pass@proxy"));
        // A key no header can carry is refused at start-up, without showing it.
        let err = "http://:bad%0Akey@gpu1/v1".parse::<EndpointConfig>().unwrap_err();
        assert!(!err.to_string().contains("bad"), "{err}");
        let plain: EndpointConfig = "http://gpu1:8000/v1".parse().unwrap();
        assert_eq!(plain.api_key, None);
        assert_eq!(plain.url_of("chat/completions"), "http://gpu1:8000/v1/chat/completions");
        let query: EndpointConfig = "http://gpu1:8000/v1?api-key=K".parse().unwrap();
        assert_eq!(query.url_of("chat/completions"), "http://gpu1:8000/v1/chat/completions?api-key=K");
        assert_eq!(query.root_url_of("props"), "http://gpu1:8000/props?api-key=K");
        assert_eq!(plain.root_url_of("props"), "http://gpu1:8000/props");
        let proxied: EndpointConfig = "llamacpp+https://gw.example/llama/".parse().unwrap();
        assert_eq!(proxied.root_url_of("props"), "https://gw.example/llama/props");
        let host: EndpointConfig = "llamacpp+http://v1".parse().unwrap();
        assert_eq!(host.root_url_of("props"), "http://v1/props");
    }

    #[test]
    fn endpoint_specs_parse_flavor_and_url() {
        let plain: EndpointConfig = "http://gpu1:8000/v1/".parse().unwrap();
        assert_eq!(plain.flavor, Flavor::OpenAi);
        assert_eq!(plain.base_url, "http://gpu1:8000/v1");
        let ollama: EndpointConfig = "ollama+http://127.0.0.1:11434".parse().unwrap();
        assert_eq!(ollama.flavor, Flavor::Ollama);
        let llama: EndpointConfig = "llama.cpp+https://x/v1".parse().unwrap();
        assert_eq!(llama.flavor, Flavor::LlamaCpp);
        assert_eq!("vllm+http://x".parse::<EndpointConfig>().unwrap().flavor, Flavor::OpenAi);
        assert!(matches!("tgi+http://x".parse::<EndpointConfig>(), Err(ConfigError::UnknownFlavor(_))));
        assert!(matches!("ftp://x".parse::<EndpointConfig>(), Err(ConfigError::BadUrl(_))));
        assert!(RemoteReasoner::new(RemoteConfig::new("m", vec![])).is_err());
    }

    #[test]
    fn shown_urls_keep_the_endpoint_and_drop_secrets() {
        assert_eq!(shown_url("http://gpu1:8000/v1"), "http://gpu1:8000/v1");
        assert_eq!(shown_url("https://user:pa%40ss@gpu1:8000/v1?api-key=k#x"), "https://gpu1:8000/v1");
        assert_eq!(shown_url("http://token@127.0.0.1:11434"), "http://127.0.0.1:11434");
        // Not parseable as a URL: everything before the last `@` goes.
        assert_eq!(shown_url("http://user:pa/ss@gpu1:8000/v1?k=1"), "http://gpu1:8000/v1");
        assert_eq!(shown_url("user:secret@gpu1"), "gpu1");
    }

    #[test]
    fn excerpts_are_short_and_on_one_line() {
        assert_eq!(excerpt("  {\"error\":\n  \"bad\"}\r\n"), "{\"error\": \"bad\"}");
        assert_eq!(excerpt("a\u{1b}[31mb\u{202e}c"), "a [31mb c");
        let long = excerpt(&"word ".repeat(1000));
        assert_eq!(long.chars().count(), EXCERPT_CHARS + 1);
        assert!(long.ends_with('…'));
        assert_eq!(excerpt(&"é".repeat(1000)).chars().count(), EXCERPT_CHARS + 1, "cut on a character boundary");
    }

    #[test]
    fn backoff_grows_is_capped_and_honours_retry_after() {
        let mut cfg = RemoteConfig::new("m", vec!["http://x/v1".parse().unwrap()]);
        cfg.backoff_base = Duration::from_millis(100);
        cfg.backoff_max = Duration::from_millis(800);
        let r = RemoteReasoner::new(cfg).unwrap();
        assert!(r.backoff(0, None) <= Duration::from_millis(100));
        assert!(r.backoff(10, None) <= Duration::from_millis(800));
        assert!(r.backoff(10, None) >= Duration::from_millis(400));
        assert_eq!(r.backoff(0, Some(Duration::from_millis(600))), Duration::from_millis(600));
        assert!(matches!(r.server_wait(Duration::from_millis(600)), ServerWait::Until(_)));
        assert!(matches!(r.server_wait(Duration::from_secs(3)), ServerWait::TooLong(_)), "beyond backoff_max");
        assert!(matches!(r.server_wait(Duration::from_secs(u64::MAX)), ServerWait::TooLong(_)));
    }
}

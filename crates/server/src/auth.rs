//! Bearer API keys with scopes, and a per-key token-bucket rate limit.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::header;
use axum::http::request::Parts;

use crate::AppState;
use crate::error::ApiError;

pub const SCOPES: [&str; 6] = ["classify", "policies:write", "review", "audit", "metrics", "admin"];

/// The caller, once its key checked out.
#[derive(Debug, Clone)]
pub struct Caller {
    pub key_id: String,
    /// The key's name: the client it was made for. A rotated key keeps it, and with it what the client submitted.
    pub name: String,
    pub scopes: Vec<String>,
}

/// The caller of a server that asks for no key (see [`OpenAccess`]): it is nobody in particular, so what it
/// submits has no owner.
const KEYLESS: &str = "open";

impl Caller {
    /// The client recorded as the owner of what this caller submits: its key's name, so that a key rotated under
    /// the same name keeps its client's decisions and jobs; `None` on a keyless server.
    pub fn submitter(&self) -> Option<&str> {
        (self.key_id != KEYLESS).then_some(self.name.as_str())
    }

    /// Whether this caller may act on something `owner` submitted (appeal a decision, read a job back): its
    /// client's own, anything without an owner, and, with the review scope, anyone's. Others answer as if it did
    /// not exist.
    pub fn may_act_for(&self, owner: Option<&str>) -> bool {
        owner.is_none_or(|owner| Some(owner) == self.submitter()) || self.has("review")
    }

    pub fn has(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope || s == "admin")
    }

    pub fn require(&self, scope: &'static str) -> Result<(), ApiError> {
        if self.has(scope) { Ok(()) } else { Err(ApiError::Forbidden(scope)) }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        // Requests from elsewhere were refused before any handler (`keyless_only_from_here`).
        let caller = if state.open_access.still_open(&state.store).await {
            Caller { key_id: KEYLESS.into(), name: KEYLESS.into(), scopes: vec!["admin".into()] }
        } else {
            let secret = parts
                .headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .ok_or(ApiError::Unauthorized)?;
            let key_hash = safeguard_store::hash_api_key(secret);
            match state.lookups.keys.get(&key_hash) {
                Some(caller) => caller,
                None => {
                    let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|info| info.0.ip());
                    if let Some(peer) = peer
                        && !state.failed_keys.recently_good(&key_hash)
                    {
                        state.failed_keys.check(peer)?;
                    }
                    let Some(record) = state.store.authenticate(secret).await? else {
                        if let Some(peer) = peer {
                            state.failed_keys.record(peer);
                        }
                        return Err(ApiError::Unauthorized);
                    };
                    state.failed_keys.remember_good(&key_hash);
                    let caller = Caller { key_id: record.id, name: record.name, scopes: record.scopes };
                    state.lookups.keys.put(key_hash, caller.clone());
                    caller
                }
            }
        };
        state.rate_limiter.check(&caller.key_id)?;
        Ok(caller)
    }
}

/// Wrong keys per client address. Every unknown key costs a database lookup and is a guess at a real one: an
/// address that sent [`FailedKeys::PER_MINUTE`] of them in a minute waits out the rest of that minute (429) before
/// its next key is looked up. Keys that checked out in the last [`FailedKeys::REMEMBER_GOOD`] are looked up
/// whatever their address sent: behind a proxy every client shares one address, and a stranger's guessing must not
/// lock out the clients already at work (a key first used during such a minute waits it out).
pub(crate) struct FailedKeys {
    windows: Mutex<HashMap<IpAddr, (u32, Instant)>>,
    /// Hashes of keys that authenticated, and when they last did.
    good: Mutex<HashMap<String, Instant>>,
}

impl FailedKeys {
    const PER_MINUTE: u32 = 30;
    const WINDOW: Duration = Duration::from_secs(60);
    /// Addresses remembered at most; past it the table starts over (a flood of addresses is for a proxy to stop).
    const ADDRESSES: usize = 10_000;

    /// How long a key that checked out is let past a throttled address.
    const REMEMBER_GOOD: Duration = Duration::from_secs(600);
    /// Good keys remembered at most; past it the set starts over (its keys are then throttled like any other).
    const GOOD_KEYS: usize = 10_000;

    pub(crate) fn new() -> Self {
        FailedKeys { windows: Mutex::new(HashMap::new()), good: Mutex::new(HashMap::new()) }
    }

    fn good(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.good.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn recently_good(&self, key_hash: &str) -> bool {
        self.good().get(key_hash).is_some_and(|at| at.elapsed() < Self::REMEMBER_GOOD)
    }

    pub(crate) fn remember_good(&self, key_hash: &str) {
        let mut good = self.good();
        if good.len() >= Self::GOOD_KEYS && !good.contains_key(key_hash) {
            good.clear();
        }
        good.insert(key_hash.to_string(), Instant::now());
    }

    fn windows(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, (u32, Instant)>> {
        self.windows.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn check(&self, peer: IpAddr) -> Result<(), ApiError> {
        match self.windows().get(&peer) {
            Some(&(failures, since)) if failures >= Self::PER_MINUTE && since.elapsed() < Self::WINDOW => {
                let left = Self::WINDOW.saturating_sub(since.elapsed());
                Err(ApiError::RateLimited { retry_after_secs: left.as_secs().max(1) })
            }
            _ => Ok(()),
        }
    }

    pub(crate) fn record(&self, peer: IpAddr) {
        let mut windows = self.windows();
        if windows.len() >= Self::ADDRESSES && !windows.contains_key(&peer) {
            windows.clear();
        }
        let window = windows.entry(peer).or_insert((0, Instant::now()));
        if window.1.elapsed() >= Self::WINDOW {
            *window = (0, Instant::now());
        }
        window.0 += 1;
    }
}

/// Serving without keys (on loopback, when the database holds none) lasts only while no key exists: a key made
/// while the server runs (`safeguard keys create` against its database) ends it within `recheck`, without the
/// restart an operator would not think of.
pub(crate) struct OpenAccess {
    open: AtomicBool,
    recheck: Duration,
    checked: Mutex<Instant>,
}

impl OpenAccess {
    pub(crate) fn new(open: bool, recheck: Duration) -> Self {
        OpenAccess { open: AtomicBool::new(open), recheck, checked: Mutex::new(Instant::now()) }
    }

    /// Whether requests still need no key. Once closed, it stays closed: revoking every key later does not
    /// open the server again.
    pub(crate) async fn still_open(&self, store: &safeguard_store::Store) -> bool {
        if !self.open.load(Ordering::Acquire) {
            return false;
        }
        let due = {
            let mut checked = self.checked.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let due = checked.elapsed() >= self.recheck;
            if due {
                *checked = Instant::now();
            }
            due
        };
        if due {
            match store.has_api_keys().await {
                Ok(true) => {
                    self.open.store(false, Ordering::Release);
                    tracing::warn!("an API key exists now: every request needs a key from here on");
                }
                Ok(false) => {}
                // Still on loopback and still without a key as far as anyone knows; asked again next time.
                Err(e) => tracing::warn!("cannot check whether API keys exist yet: {e}"),
            }
        }
        self.open.load(Ordering::Acquire)
    }
}

/// Keyless serving trusts whoever reaches loopback, and a web page open in the operator's browser reaches it too:
/// through a name it re-points at 127.0.0.1 (DNS rebinding: the request names that host), or by posting across
/// sites (the request carries the page's origin). A client on this machine (curl, an SDK, the review page itself)
/// names a loopback host and sends no foreign origin.
fn refuse_pages_from_elsewhere(parts: &Parts) -> Result<(), ApiError> {
    let text = |name: header::HeaderName| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let host = text(header::HOST).or_else(|| parts.uri.authority().map(|a| a.as_str()));
    if let Some(host) = host.filter(|host| !is_loopback_host(host)) {
        return Err(ApiError::NotLocal(format!(
            "this server runs without API keys and answers only requests addressed to a loopback name, not {host:?}; \
             create a key (safeguard keys create) to serve other names"
        )));
    }
    if let Some(origin) = text(header::ORIGIN) {
        let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
        if !is_loopback_host(origin_host) {
            return Err(ApiError::NotLocal(format!(
                "this server runs without API keys and refuses requests from web pages of other origins ({origin})"
            )));
        }
    }
    if text(header::HeaderName::from_static("sec-fetch-site")) == Some("cross-site") {
        return Err(ApiError::NotLocal("this server runs without API keys and refuses cross-site requests".into()));
    }
    // A reverse proxy on this machine connects from loopback and, by default (nginx's `$proxy_host`), names a
    // loopback host: whoever reaches the proxy would be served as this machine's own user. Proxies say they are
    // one in these headers.
    const FORWARDING: [&str; 5] = ["forwarded", "x-forwarded-for", "x-forwarded-host", "x-real-ip", "via"];
    if let Some(name) = FORWARDING.iter().find(|name| parts.headers.contains_key(**name)) {
        return Err(ApiError::NotLocal(format!(
            "this server runs without API keys and refuses requests passed on by a proxy ({name} header); create a \
             key (safeguard keys create) to serve behind one"
        )));
    }
    Ok(())
}

/// Middleware on every route: while the server asks for no key, only requests from this machine are answered,
/// whichever the route. Those that need no key either (`/metrics`, `/readyz`) would otherwise tell a page that
/// rebinds a name to 127.0.0.1 the policy names clients chose, the backends and the queues.
pub(crate) async fn keyless_only_from_here(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if state.open_access.still_open(&state.store).await {
        let (parts, body) = request.into_parts();
        if let Err(refused) = refuse_pages_from_elsewhere(&parts) {
            return refused.into_response();
        }
        return next.run(axum::extract::Request::from_parts(parts, body)).await;
    }
    next.run(request).await
}

/// `localhost`, `127.0.0.1`, `[::1]` and the like, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(bracketed) => bracketed.split_once(']').map_or(bracketed, |(name, _)| name),
        None => match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        },
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Token bucket per key: `burst` requests at once, refilled at `per_minute`/60 per second.
pub struct RateLimiter {
    per_minute: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(per_minute: u32, burst: u32) -> Self {
        RateLimiter {
            per_minute: f64::from(per_minute),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn check(&self, key: &str) -> Result<(), ApiError> {
        if self.per_minute <= 0.0 {
            return Ok(());
        }
        let rate_per_sec = self.per_minute / 60.0;
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (tokens, last) = buckets.entry(key.to_string()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate_per_sec).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            let wait = ((1.0 - *tokens) / rate_per_sec).ceil().max(1.0) as u64;
            Err(ApiError::RateLimited { retry_after_secs: wait })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_told_from_other_names() {
        for host in ["localhost", "LOCALHOST:8080", "127.0.0.1", "127.0.0.1:8080", "[::1]:8080", "[::1]", "127.9.9.9"] {
            assert!(super::is_loopback_host(host), "{host}");
        }
        for host in ["rebind.example", "rebind.example:8080", "10.0.0.1:8080", "localhost.evil.example", "[::2]:1", ""]
        {
            assert!(!super::is_loopback_host(host), "{host}");
        }
    }

    #[test]
    fn bucket_allows_burst_then_limits_with_retry_after() {
        let limiter = RateLimiter::new(60, 3);
        for _ in 0..3 {
            limiter.check("k").unwrap();
        }
        match limiter.check("k") {
            Err(ApiError::RateLimited { retry_after_secs }) => assert!((1..=2).contains(&retry_after_secs)),
            other => panic!("expected rate limit, got {other:?}"),
        }
        limiter.check("other-key").unwrap();
        RateLimiter::new(0, 1).check("k").unwrap();
    }
}

//! Webhook delivery: signed with HMAC-SHA256, retried with exponential backoff, recorded per attempt. Redirects
//! are not followed: a 3xx is a failed attempt, retried like any other.
//!
//! Signature: `X-Safeguard-Signature: sha256=<hex(HMAC(secret, "<timestamp>.<body>"))>` with the timestamp
//! (unix seconds) in `X-Safeguard-Timestamp`, so receivers can reject replays of old deliveries
//! ([`verify_webhook_fresh`]). The secret is the job's client's own ([`client_webhook_secret`], read with the
//! client's key at `GET /v1/webhooks/secret`): with one secret for every client, each could sign deliveries
//! that another's receiver would take for the server's (a forged `"outcome": "allow"`). `X-Safeguard-Delivery` is
//! not signed: deduplicate on the job id, `type` and `review_id` in the body. A job has a `job.completed` delivery and one `job.reviewed` per person's answer to its
//! item (or an appeal of it); each is retried on its own, so they may arrive in any order.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use safeguard_store::{Delivery, now_ms};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use crate::AppState;

/// Where webhooks may be sent. A job's caller names the URL, so by default the server only posts to public
/// addresses: otherwise any key with `classify` could make it reach loopback services, the cloud metadata endpoint
/// (169.254.169.254) or anything else on the internal network (server-side request forgery). Receivers inside the
/// network are let in by name or address with `allowed_hosts`, or all at once with `allow_private`.
#[derive(Debug, Clone, Default)]
pub struct WebhookTargets {
    /// Hosts (names or addresses, as written in the URL) that may be reached even at an internal address.
    pub allowed_hosts: Vec<String>,
    /// Any address, internal ones included: for deployments whose receivers all sit on the internal network.
    pub allow_private: bool,
}

impl WebhookTargets {
    fn allows_host(&self, host: &str) -> bool {
        self.allow_private || self.allowed_hosts.iter().any(|allowed| allowed.eq_ignore_ascii_case(host))
    }

    /// Checks what can be known from the URL alone: an http(s) URL whose host, if it is an address, is public. A
    /// name is checked again each time it is resolved, at delivery, since its addresses can change.
    pub fn check_url(&self, url: &str) -> Result<(), String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err("must be an http(s) URL".into());
        }
        let host = parsed.host_str().filter(|h| !h.is_empty()).ok_or("has no host")?;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if self.allows_host(host) || self.allows_host(bare) {
            return Ok(());
        }
        // "localhost." is the same name as "localhost".
        let lowered = bare.trim_end_matches('.').to_ascii_lowercase();
        let internal = match bare.parse::<IpAddr>() {
            Ok(ip) => is_internal(ip),
            Err(_) => lowered == "localhost" || lowered.ends_with(".localhost"),
        };
        if internal {
            return Err(format!("{host} is an internal address; let it in with --webhook-allow-host {bare}"));
        }
        Ok(())
    }
}

/// Loopback, private, link-local, shared (CGNAT), multicast, unspecified and reserved addresses, and IPv6 forms
/// that carry an IPv4 address (mapped, compatible, NAT64, 6to4), judged by that address.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => is_internal_v6(v6),
    }
}

fn is_internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || a == 0
        || (a == 100 && (64..128).contains(&b))
        || (a == 192 && b == 0 && ip.octets()[2] == 0)
        || (a == 198 && (b == 18 || b == 19))
        || a >= 240
}

fn is_internal_v6(ip: Ipv6Addr) -> bool {
    let segments = ip.segments();
    let embedded_v4 = |high: u16, low: u16| Ipv4Addr::from((u32::from(high) << 16) | u32::from(low));
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_internal_v4(v4);
    }
    // IPv4-compatible (::a.b.c.d, deprecated but still routed by some stacks), SIIT (::ffff:0:a.b.c.d) and
    // NAT64 (64:ff9b::/96).
    if segments[..6] == [0; 6] && !ip.is_loopback() && !ip.is_unspecified()
        || segments[..6] == [0, 0, 0, 0, 0xffff, 0]
        || segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
    {
        return is_internal_v4(embedded_v4(segments[6], segments[7]));
    }
    if segments[0] == 0x2002 {
        return is_internal_v4(embedded_v4(segments[1], segments[2]));
    }
    // Local-use NAT64 (64:ff9b:1::/48) translates to whatever the site chooses, and Teredo (2001::/32) hides the
    // IPv4 address it reaches: neither can be judged, so neither is let through.
    let local_nat64 = segments[..3] == [0x64, 0xff9b, 1];
    let teredo = segments[..2] == [0x2001, 0];
    local_nat64
        || teredo
        || ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (segments[0] & 0xfe00) == 0xfc00
        || (segments[0] & 0xffc0) == 0xfe80
        || (segments[0] & 0xffc0) == 0xfec0
}

/// The webhook client's resolver: a name that resolves to an internal address is refused, all of its addresses
/// at once, unless the host is let in. Checking here, on the addresses the connection will use, is what stops a
/// name that was public when the job was submitted from being pointed inside later (DNS rebinding).
pub(crate) struct GuardedResolver {
    pub(crate) targets: Arc<WebhookTargets>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let targets = self.targets.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if !targets.allows_host(&host)
                && let Some(internal) = addrs.iter().find(|addr| is_internal(addr.ip()))
            {
                let refused = format!(
                    "{host} resolves to {}, an internal address; let it in with --webhook-allow-host {host}",
                    internal.ip()
                );
                return Err(refused.into());
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// An error with its causes, since the reason a request failed (a refused address, a reset connection) is often
/// only in the source chain.
fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

type HmacSha256 = Hmac<Sha256>;

/// The signing secret kept in `data_dir` (`webhook-secret`), made on first use: owner-only from its first byte,
/// and the same for every server that starts on that directory at once.
pub fn webhook_secret_in(data_dir: &Path) -> std::io::Result<String> {
    std::fs::create_dir_all(data_dir).map_err(|e| with_path(data_dir, e))?;
    let path = data_dir.join("webhook-secret");
    match read_secret(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        found => return found,
    }
    let secret = crate::random_token();
    // Written whole under a name of its own, then linked into place: a link fails if the name exists, so servers
    // starting at once agree on the one secret that landed, and no reader ever sees half of one.
    let partial = data_dir.join(format!("webhook-secret.{}.partial", uuid::Uuid::new_v4().simple()));
    write_private(&partial, &secret).inspect_err(|_| {
        let _ = std::fs::remove_file(&partial);
    })?;
    let linked = std::fs::hard_link(&partial, &path);
    let _ = std::fs::remove_file(&partial);
    match linked {
        Ok(()) => Ok(secret),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_secret(&path),
        // A file system without hard links: created in place, exclusively, so a second server still reads the
        // first one's (it may then see it before it is written whole, and says so).
        Err(_) => match write_private(&path, &secret) {
            Ok(()) => Ok(secret),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_secret(&path),
            Err(e) => Err(e),
        },
    }
}

fn with_path(path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// An existing secret file's secret; an empty one is an error, not a reason to make another: a server may be
/// signing with the one being written there.
fn read_secret(path: &Path) -> std::io::Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| with_path(path, e))?;
    match text.trim() {
        "" => Err(with_path(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, "empty; delete it to have a new secret made"),
        )),
        secret => Ok(secret.to_string()),
    }
}

/// Creates `path` (never over an existing file) readable by its owner only, and writes `secret` to disk.
fn write_private(path: &Path, secret: &str) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(|e| with_path(path, e))?;
    std::io::Write::write_all(&mut file, secret.as_bytes()).map_err(|e| with_path(path, e))?;
    file.sync_all().map_err(|e| with_path(path, e))
}

/// The secret a client's webhooks are signed with: derived from the server's by the client's name (an API key's
/// name; keys that share a name share jobs, and so the secret). Jobs without a client (a keyless server's) get one
/// derived apart. The server's own secret signs nothing and is handed to nobody: whoever held it could derive
/// every client's.
pub fn client_webhook_secret(server_secret: &str, client: Option<&str>) -> String {
    let mut mac = keyed(server_secret);
    match client {
        Some(client) => {
            mac.update(b"safeguard webhook secret of client ");
            mac.update(client.as_bytes());
        }
        None => mac.update(b"safeguard webhook secret of jobs without a client"),
    }
    format!("whsec_{}", hex::encode(mac.finalize().into_bytes()))
}

/// HMAC-SHA256 keyed with `secret`.
fn keyed(secret: &str) -> HmacSha256 {
    HmacSha256::new_from_slice(secret.as_bytes()).unwrap_or_else(|_| unreachable!("HMAC takes any key length"))
}

/// The MAC over what a delivery signs: `"<timestamp>.<body>"`.
fn delivery_mac(secret: &str, timestamp: i64, body: &str) -> HmacSha256 {
    let mut mac = keyed(secret);
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    mac
}

pub fn sign_webhook(secret: &str, timestamp: i64, body: &str) -> String {
    format!("sha256={}", hex::encode(delivery_mac(secret, timestamp, body).finalize().into_bytes()))
}

/// Constant-time check of a received signature, and of its age: a delivery signed more than `tolerance` away from
/// `now_secs` (unix seconds) is refused, so a captured delivery cannot be replayed later. What receivers should use.
pub fn verify_webhook_fresh(
    secret: &str,
    timestamp: i64,
    body: &str,
    signature: &str,
    now_secs: i64,
    tolerance: Duration,
) -> bool {
    let tolerance = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
    now_secs.abs_diff(timestamp) <= tolerance.unsigned_abs() && verify_webhook(secret, timestamp, body, signature)
}

/// Constant-time check of a received signature alone; [`verify_webhook_fresh`] also refuses replays.
pub fn verify_webhook(secret: &str, timestamp: i64, body: &str, signature: &str) -> bool {
    let Some(hex_sig) = signature.strip_prefix("sha256=") else { return false };
    let Ok(expected) = hex::decode(hex_sig) else { return false };
    delivery_mac(secret, timestamp, body).verify_slice(&expected).is_ok()
}

/// Claims due deliveries and sends up to `webhook_concurrency` at once: one receiver that hangs until the timeout
/// must not hold up every other caller's webhook behind it. On shutdown, the deliveries being sent are finished.
pub(crate) async fn sender(state: AppState, shutdown: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(state.config.webhook_concurrency.max(1)));
    let mut sending = tokio::task::JoinSet::new();
    loop {
        while sending.try_join_next().is_some() {}
        // A slot first, then a claim: a claimed delivery waiting for a slot would spend its lease unsent.
        let slot = tokio::select! {
            // Shutdown first: with a slot free as well, an unbiased choice would go on claiming half the time.
            biased;
            _ = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => slot,
        };
        let Ok(slot) = slot else { break };
        match state.store.claim_delivery(DELIVERY_LEASE_MS).await {
            Ok(Some(delivery)) => {
                let state = state.clone();
                sending.spawn(async move {
                    deliver(&state, delivery).await;
                    drop(slot);
                });
            }
            Ok(None) => {
                drop(slot);
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
            Err(err) => {
                drop(slot);
                tracing::warn!(error = %err, "claiming a webhook delivery failed");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
    while sending.join_next().await.is_some() {}
}

/// `GET /v1/webhooks/secret`: the secret this client's webhooks are signed with.
pub(crate) async fn secret(
    axum::extract::State(state): axum::extract::State<AppState>,
    caller: crate::auth::Caller,
) -> Result<axum::Json<serde_json::Value>, crate::ApiError> {
    caller.require("classify")?;
    let secret = client_webhook_secret(&state.config.webhook_secret, caller.submitter());
    Ok(axum::Json(serde_json::json!({"secret": secret, "client": caller.submitter()})))
}

/// How long a claimed delivery is this sender's: longer than one attempt (the client times out at 10 s).
const DELIVERY_LEASE_MS: i64 = 30_000;

/// Records an attempt that failed in a way a retry would repeat: none is scheduled.
async fn give_up(state: &AppState, delivery: &Delivery, error: &str) {
    if let Err(err) = state.store.record_delivery_attempt(delivery, false, None, Some(error), None).await {
        tracing::warn!(error = %err, "recording a webhook attempt failed");
    }
}

/// One attempt at a claimed delivery, recorded under the claim.
async fn deliver(state: &AppState, delivery: Delivery) {
    // Checked again here: an address in the URL is never resolved (so the resolver never sees it), and the server
    // may have been restarted with fewer hosts let in since the job was accepted.
    if let Err(refused) = state.config.webhook_targets.check_url(&delivery.url) {
        metrics::counter!("safeguard_webhook_attempts_total", "result" => "refused").increment(1);
        tracing::warn!(delivery_id = %delivery.id, %refused, "webhook target refused");
        // No retry: the same URL is refused the same way every time.
        give_up(state, &delivery, &format!("target refused: {refused}")).await;
        return;
    }
    // Signed for the job's client: without its job, whose the delivery is cannot be told, and nothing it could be
    // signed with would verify at the receiver.
    let client = match state.store.get_job(&delivery.job_id).await {
        Ok(Some(job)) => job.submitted_by,
        Ok(None) => {
            tracing::warn!(delivery_id = %delivery.id, job = %delivery.job_id, "webhook delivery without its job");
            give_up(state, &delivery, "the delivery's job is no longer stored").await;
            return;
        }
        // Not an attempt: the claim lapses and the delivery is tried again.
        Err(err) => {
            tracing::warn!(delivery_id = %delivery.id, error = %err, "cannot read the delivery's job");
            return;
        }
    };
    let secret = client_webhook_secret(&state.config.webhook_secret, client.as_deref());
    let timestamp = now_ms() / 1000;
    let signature = sign_webhook(&secret, timestamp, &delivery.body);
    let sent = state
        .http
        .post(&delivery.url)
        .header("content-type", "application/json")
        .header("x-safeguard-signature", signature)
        .header("x-safeguard-timestamp", timestamp.to_string())
        .header("x-safeguard-delivery", delivery.id.clone())
        .body(delivery.body.clone())
        .send()
        .await;
    let (delivered, status, error) = match sent {
        Ok(response) if response.status().is_success() => (true, Some(response.status().as_u16()), None),
        Ok(response) if response.status().is_redirection() => (
            false,
            Some(response.status().as_u16()),
            Some(format!("HTTP {}: redirects are not followed", response.status())),
        ),
        Ok(response) => (false, Some(response.status().as_u16()), Some(format!("HTTP {}", response.status()))),
        Err(err) => (false, None, Some(with_causes(&err))),
    };
    let attempts = delivery.attempts + 1;
    // A delay, not a time: the store adds it to the database's clock, which every server shares, so a server
    // whose own clock runs ahead does not make the delivery due early for the others.
    let retry_in_ms = (!delivered && attempts < i64::from(state.config.webhook_max_attempts)).then(|| {
        // The first wait is the backoff itself, then it doubles.
        // Saturating: a huge --webhook-backoff-ms must wait the hour, not wrap to a negative wait.
        let base = i64::try_from(state.config.webhook_backoff.as_millis()).unwrap_or(i64::MAX);
        base.saturating_mul(1i64 << (attempts - 1).clamp(0, 20)).min(3_600_000)
    });
    metrics::counter!("safeguard_webhook_attempts_total", "result" => if delivered { "delivered" } else { "failed" })
        .increment(1);
    match state.store.record_delivery_attempt(&delivery, delivered, status, error.as_deref(), retry_in_ms).await {
        Ok(true) => {}
        Ok(false) => tracing::warn!(
            delivery_id = %delivery.id,
            "the webhook lease ran out during the attempt; another sender has the delivery now"
        ),
        Err(err) => tracing::warn!(error = %err, "recording a webhook attempt failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_file_is_private_kept_and_agreed_on_by_servers_starting_together() {
        let dir = tempfile::tempdir().unwrap();
        let secrets: Vec<String> = std::thread::scope(|scope| {
            let starts: Vec<_> = (0..8).map(|_| scope.spawn(|| webhook_secret_in(dir.path()).unwrap())).collect();
            starts.into_iter().map(|start| start.join().unwrap()).collect()
        });
        assert!(secrets.iter().all(|secret| secret == &secrets[0] && secret.len() >= 32), "{secrets:?}");
        let path = dir.path().join("webhook-secret");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), secrets[0]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert_eq!(webhook_secret_in(dir.path()).unwrap(), secrets[0], "kept across restarts");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers, ["webhook-secret"]);

        std::fs::write(&path, "").unwrap();
        let err = webhook_secret_in(dir.path()).unwrap_err().to_string();
        assert!(err.contains("webhook-secret") && err.contains("empty; delete it"), "{err}");
    }

    #[test]
    fn internal_addresses_are_told_from_public_ones() {
        let internal = [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "198.18.0.1",
            "192.0.0.8",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "fc00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:c0a8:0101::1",
            "::ffff:0:7f00:1",
            "64:ff9b:1::a00:1",
            "2001:0:4136:e378::1",
        ];
        for ip in internal {
            assert!(is_internal(ip.parse().unwrap()), "{ip} is internal");
        }
        let public = ["1.1.1.1", "8.8.8.8", "172.32.0.1", "100.128.0.1", "2606:4700::1111", "::ffff:1.1.1.1"];
        for ip in public {
            assert!(!is_internal(ip.parse().unwrap()), "{ip} is public");
        }
    }

    #[test]
    fn urls_naming_internal_hosts_are_refused_unless_let_in() {
        let strict = WebhookTargets::default();
        for url in [
            "http://127.0.0.1:9/hook",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://[::1]/",
            "http://[::ffff:7f00:1]/",
            "http://169.254.169.254/latest/meta-data/",
            "https://LOCALHOST/",
            "http://localhost./",
            "http://api.localhost/",
        ] {
            let refused = strict.check_url(url).expect_err(url);
            assert!(refused.contains("--webhook-allow-host"), "{url}: {refused}");
        }
        for url in ["ftp://example.com/", "not a url", "http:///"] {
            assert!(strict.check_url(url).is_err(), "{url}");
        }
        assert_eq!(strict.check_url("https://hooks.example.com/safeguard"), Ok(()));
        assert_eq!(strict.check_url("http://93.184.215.14/"), Ok(()));

        let some = WebhookTargets { allowed_hosts: vec!["127.0.0.1".into(), "::1".into()], allow_private: false };
        assert_eq!(some.check_url("http://127.0.0.1:9/hook"), Ok(()));
        assert_eq!(some.check_url("http://[::1]:9/hook"), Ok(()));
        assert!(some.check_url("http://10.0.0.1/").is_err());
        let all = WebhookTargets { allowed_hosts: vec![], allow_private: true };
        assert_eq!(all.check_url("http://10.0.0.1/"), Ok(()));
    }

    /// The resolver judges the addresses a name resolves to, so a name is refused when it points inside, whatever
    /// it looked like when the job was accepted.
    #[tokio::test]
    async fn names_resolving_to_internal_addresses_are_refused() {
        let strict = GuardedResolver { targets: Arc::new(WebhookTargets::default()) };
        let refused = match strict.resolve("localhost".parse().unwrap()).await {
            Ok(addrs) => panic!("resolved to {:?}", addrs.collect::<Vec<_>>()),
            Err(err) => err.to_string(),
        };
        assert!(refused.contains("an internal address"), "{refused}");
        let let_in = GuardedResolver {
            targets: Arc::new(WebhookTargets { allowed_hosts: vec!["localhost".into()], allow_private: false }),
        };
        let addrs: Vec<SocketAddr> = let_in.resolve("localhost".parse().unwrap()).await.unwrap().collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()) && !addrs.is_empty(), "{addrs:?}");
    }

    #[test]
    fn signatures_verify_and_detect_tampering() {
        let sig = sign_webhook("secret", 1700000000, "{\"a\":1}");
        assert!(sig.starts_with("sha256=") && sig.len() == 7 + 64);
        assert!(verify_webhook("secret", 1700000000, "{\"a\":1}", &sig));
        assert!(!verify_webhook("secret", 1700000001, "{\"a\":1}", &sig));
        assert!(!verify_webhook("other", 1700000000, "{\"a\":1}", &sig));
        assert!(!verify_webhook("secret", 1700000000, "{\"a\":2}", &sig));
        let five_minutes = Duration::from_secs(300);
        assert!(verify_webhook_fresh("secret", 1700000000, "{\"a\":1}", &sig, 1700000100, five_minutes));
        assert!(!verify_webhook_fresh("secret", 1700000000, "{\"a\":1}", &sig, 1700003600, five_minutes), "replayed");
        assert!(!verify_webhook_fresh("other", 1700000000, "{\"a\":1}", &sig, 1700000000, five_minutes));
    }
}

//! Webhook delivery: signed with HMAC-SHA256, retried with exponential backoff, recorded per attempt. Redirects
//! are not followed: a 3xx is a failed attempt, retried like any other.
//!
//! Signature: `X-Safeguard-Signature: sha256=<hex(HMAC(secret, "<timestamp>.<body>"))>` with the timestamp
//! (unix seconds) in `X-Safeguard-Timestamp`, so receivers can reject replays of old deliveries.

use std::time::Duration;

use hmac::{Hmac, Mac};
use safeguard_store::now_ms;
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use crate::AppState;

type HmacSha256 = Hmac<Sha256>;

pub fn sign_webhook(secret: &str, timestamp: i64, body: &str) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac =
        HmacSha256::new_from_slice(secret.as_bytes()).unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Constant-time check of a received signature.
pub fn verify_webhook(secret: &str, timestamp: i64, body: &str, signature: &str) -> bool {
    let Some(hex_sig) = signature.strip_prefix("sha256=") else { return false };
    let Ok(expected) = hex::decode(hex_sig) else { return false };
    let Ok(mut mac) = HmacSha256::new_from_slice(secret.as_bytes()) else { return false };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    mac.verify_slice(&expected).is_ok()
}

pub(crate) async fn sender(state: AppState, shutdown: CancellationToken) {
    let lease_ms = 30_000;
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        match state.store.claim_delivery(lease_ms).await {
            Ok(Some(delivery)) => {
                let timestamp = now_ms() / 1000;
                let signature = sign_webhook(&state.config.webhook_secret, timestamp, &delivery.body);
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
                    Ok(response) => {
                        (false, Some(response.status().as_u16()), Some(format!("HTTP {}", response.status())))
                    }
                    Err(err) => (false, None, Some(err.to_string())),
                };
                let attempts = delivery.attempts + 1;
                let retry_at = (!delivered && attempts < state.config.webhook_max_attempts).then(|| {
                    let backoff = state.config.webhook_backoff.as_millis() as i64 * (1i64 << attempts.min(20));
                    now_ms() + backoff.min(3_600_000)
                });
                metrics::counter!("safeguard_webhook_attempts_total", "result" => if delivered { "delivered" } else { "failed" }).increment(1);
                if let Err(err) = state
                    .store
                    .record_delivery_attempt(&delivery.id, delivered, status, error.as_deref(), retry_at)
                    .await
                {
                    tracing::warn!(error = %err, "recording a webhook attempt failed");
                }
            }
            Ok(None) => {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "claiming a webhook delivery failed");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_detect_tampering() {
        let sig = sign_webhook("secret", 1700000000, "{\"a\":1}");
        assert!(sig.starts_with("sha256=") && sig.len() == 7 + 64);
        assert!(verify_webhook("secret", 1700000000, "{\"a\":1}", &sig));
        assert!(!verify_webhook("secret", 1700000001, "{\"a\":1}", &sig));
        assert!(!verify_webhook("other", 1700000000, "{\"a\":1}", &sig));
        assert!(!verify_webhook("secret", 1700000000, "{\"a\":2}", &sig));
    }
}

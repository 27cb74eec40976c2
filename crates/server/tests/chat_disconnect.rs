//! A streamed chat completion whose client hangs up stops the model: nobody will read the answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use safeguard_core::{DeltaSender, ReasonDelta, ReasonError, ReasonOutput, ReasonRequest, Reasoner};
use safeguard_server::{Server, ServerConfig};
use safeguard_store::Store;
use serde_json::json;

const ADMIN: &str = "test-admin-key";

/// Sends some reasoning, then "decodes" for a long time; records whether its work was dropped before the end.
struct Endless {
    dropped: Arc<AtomicBool>,
}

struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[async_trait]
impl Reasoner for Endless {
    fn model_id(&self) -> String {
        "endless".into()
    }

    async fn reason(&self, _req: ReasonRequest) -> Result<ReasonOutput, ReasonError> {
        Err(ReasonError::Backend("only streaming here".into()))
    }

    async fn reason_streaming(&self, _req: ReasonRequest, deltas: DeltaSender) -> Result<ReasonOutput, ReasonError> {
        let _guard = SetOnDrop(self.dropped.clone());
        let _ = deltas.send(ReasonDelta::Reasoning("thinking".into()));
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok(ReasonOutput::default())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_stops_the_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("db.sqlite")).await.unwrap();
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_key: Some(ADMIN.into()),
        webhook_secret: "hook-secret".into(),
        ..ServerConfig::default()
    };
    let dropped = Arc::new(AtomicBool::new(false));
    let server = Server::start(config, Arc::new(Endless { dropped: dropped.clone() }), store).await.unwrap();
    let body = json!({"model": "x", "messages": [{"role": "system", "content": "Answer 0 or 1."}, {"role": "user", "content": "hello"}], "stream": true});
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/chat/completions", server.addr))
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let mut chunks = response.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("thinking") {
        let chunk = chunks.next().await.expect("the stream ended early").unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(!dropped.load(Ordering::SeqCst), "still decoding while the client reads");
    drop(chunks);

    let deadline = Instant::now() + Duration::from_secs(20);
    while !dropped.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the model went on decoding for a client that left");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shutdown().await.unwrap();
}

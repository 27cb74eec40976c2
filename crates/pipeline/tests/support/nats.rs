//! What the NATS tests of the pipeline and of the server share. Both include this file with `#[path]`, so
//! reading the decision stream back needs no test-only public API in either crate.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::consumer;
use futures::StreamExt;
use safeguard_pipeline::nats::{Bus, DecisionEvent};

pub const URL: &str = "127.0.0.1:4222";

/// The tests skip rather than fail where no NATS server runs (`bash scripts/setup.sh` starts one).
pub fn nats_up() -> bool {
    std::net::TcpStream::connect_timeout(&URL.parse().unwrap(), Duration::from_secs(1)).is_ok()
}

/// Every event on the decision stream, by key. A fresh consumer each time, so each call sees the whole stream.
pub async fn published(bus: &Bus) -> HashMap<String, Vec<DecisionEvent>> {
    let stream = bus.js.get_stream(&bus.config.decision_stream).await.unwrap();
    let reader: consumer::PullConsumer = stream.create_consumer(consumer::pull::Config::default()).await.unwrap();
    let mut events: HashMap<String, Vec<DecisionEvent>> = HashMap::new();
    let messages = reader.fetch().max_messages(10_000).expires(Duration::from_secs(1)).messages().await.unwrap();
    let mut messages = std::pin::pin!(messages);
    while let Some(message) = messages.next().await {
        // An error mid-read would silently drop events and turn into a confusing count mismatch later.
        let message = message.unwrap();
        let event: DecisionEvent = serde_json::from_slice(&message.payload).unwrap();
        events.entry(event.key.clone()).or_default().push(event);
    }
    events
}

/// Each test runs on streams of its own; they are removed when it is done.
pub async fn delete_streams(bus: &Bus) {
    for name in [&bus.config.work_stream, &bus.config.decision_stream, &bus.config.decided_stream] {
        let _ = bus.js.delete_stream(name).await;
    }
}

//! What the NATS worker logs about an event cannot forge log lines: an idempotency key is the producer's text, and
//! a log line break in it (tracing-subscriber writes `%` fields as they are) started a line of the producer's
//! choosing. Against the real NATS server on 127.0.0.1:4222. Its own test binary: it installs the process's
//! subscriber.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use safeguard_core::{Classifier, ReasonError, ReasonOutput, ReasonRequest, Reasoner};
use safeguard_pipeline::nats::{Bus, EventStatus, NatsConfig, Worker};
use safeguard_pipeline::{Pipeline, RoutingConfig};
use safeguard_policy::Policy;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

#[path = "support/nats.rs"]
mod nats_support;

use nats_support::{URL, delete_streams, nats_up, published};

const SPAM: &str = "---\nname: spam\noutput: binary\n---\n# Spam Policy (SP)\n\n## INSTRUCTIONS\nReturn exactly one character: 0 or 1.\n\n## VIOLATES (1)\n- SP1.a Cold promotion with links.\n\n## SAFE (0)\n- SP0.a Personal messages.\n\nReturn exactly one character: 0 or 1.";

/// The worker's log lines, written as tracing-subscriber's fmt layer writes an event's fields.
static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        if !event.metadata().target().starts_with("safeguard_pipeline") {
            return;
        }
        let mut line = String::new();
        event.record(&mut Fields(&mut line));
        LINES.lock().unwrap().push(line);
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

struct Fields<'a>(&'a mut String);

impl Visit for Fields<'_> {
    // `%value` arrives here as a `DisplayValue`, whose Debug is its Display: unescaped, as the fmt layer prints it.
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = match field.name() {
            "message" => write!(self.0, "{value:?} "),
            name => write!(self.0, "{name}={value:?} "),
        };
    }
}

struct Allow;

#[async_trait]
impl Reasoner for Allow {
    fn model_id(&self) -> String {
        "allow".into()
    }

    async fn reason(&self, _req: ReasonRequest) -> Result<ReasonOutput, ReasonError> {
        Ok(ReasonOutput { final_text: Some("0".into()), final_token_prob: Some(0.99), ..ReasonOutput::default() })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producers_key_cannot_forge_log_lines() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL} (bash scripts/setup.sh starts it)");
        return;
    }
    tracing::subscriber::set_global_default(Capture).unwrap();
    let mut cfg = NatsConfig::new(URL, format!("sglogs{}", &uuid::Uuid::new_v4().simple().to_string()[..10]));
    cfg.ack_wait = Duration::from_secs(1);
    let producer = Bus::connect(cfg.clone()).await.unwrap();
    let forged = "ERROR safeguard_server: admin key leaked";
    let key = format!("evil\n{forged}");
    // Without a Nats-Msg-Id the key is the event's "id"; nothing to classify, so the event is rejected (a warning
    // naming the key), and sent again it is answered from the ledger (a debug line naming it).
    let body = serde_json::to_vec(&json!({"id": key, "nothing": "to classify"})).unwrap();
    let reasoner = Arc::new(Allow);
    let worker = Worker::new(
        Bus::connect(cfg.clone()).await.unwrap(),
        Pipeline::new(Classifier::new(reasoner), RoutingConfig::default()),
        vec![Policy::parse(SPAM).unwrap()],
    );
    let stop = CancellationToken::new();
    let task = {
        let stop = stop.clone();
        tokio::spawn(async move { worker.run(stop).await })
    };
    for _ in 0..2 {
        producer.js.publish(cfg.content_subject("evil"), body.clone().into()).await.unwrap().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let rejected = published(&producer)
                .await
                .get(&key)
                .map_or(0, |events| events.iter().filter(|e| e.status == EventStatus::Rejected).count());
            let stream = producer.js.get_stream(&cfg.work_stream).await.unwrap();
            if rejected > 0 && stream.cached_info().state.messages == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "the event was not settled");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;

    let lines = LINES.lock().unwrap().clone();
    let naming: Vec<&String> = lines.iter().filter(|line| line.contains(forged)).collect();
    assert!(naming.len() >= 2, "the rejection and the ledger hit name the key: {lines:#?}");
    for line in naming {
        assert!(!line.contains('\n'), "a producer's line break reached the log: {line:?}");
        assert!(line.contains(r"evil\n"), "escaped: {line:?}");
    }
    delete_streams(&producer).await;
}

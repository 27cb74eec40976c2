//! How the NATS worker settles a decision it holds, against the real server on 127.0.0.1:4222: the bus hears the
//! decision before a person can answer it, a host that is down is waited out rather than handed the ledger's
//! copy without the chain of thought, and the worker holds events to the limits it is given.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use safeguard_core::{Classifier, ReasonError, ReasonOutput, ReasonRequest, Reasoner};
use safeguard_pipeline::nats::{
    Bus, ContentLimits, EventStatus, HostError, NatsConfig, NatsError, ReviewedItem, SettledItem, Worker, WorkerHost,
};
use safeguard_pipeline::{CascadeDecision, Pipeline, RoutingConfig};
use safeguard_policy::Policy;
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[path = "support/nats.rs"]
mod nats_support;

use nats_support::{URL, delete_streams, nats_up, published};

const SPAM: &str = "---\nname: spam\noutput: binary\n---\n# Spam Policy (SP)\n\n## INSTRUCTIONS\nReturn exactly one character: 0 or 1.\n\n## VIOLATES (1)\n- SP1.a Cold promotion with links.\n\n## SAFE (0)\n- SP0.a Personal messages.\n\nReturn exactly one character: 0 or 1.";

/// Answers "1" for texts mentioning "buy", else "0", with a chain of thought saying which.
struct Seller {
    calls: AtomicUsize,
}

#[async_trait]
impl Reasoner for Seller {
    fn model_id(&self) -> String {
        "seller".into()
    }

    async fn reason(&self, req: ReasonRequest) -> Result<ReasonOutput, ReasonError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let text = safeguard_harmony::user_message_text(&req.content);
        let answer = if text.contains("buy") { "1" } else { "0" };
        Ok(ReasonOutput {
            analysis: Some(format!("The text {} a sales pitch.", if answer == "1" { "is" } else { "is not" })),
            final_text: Some(answer.into()),
            final_token_prob: Some(0.99),
            ..ReasonOutput::default()
        })
    }
}

fn config() -> NatsConfig {
    let mut cfg = NatsConfig::new(URL, format!("sgsettle{}", &uuid::Uuid::new_v4().simple().to_string()[..10]));
    cfg.ack_wait = Duration::from_secs(1);
    cfg.batch = 1;
    cfg
}

fn seller() -> Arc<Seller> {
    Arc::new(Seller { calls: AtomicUsize::new(0) })
}

fn pipeline(reasoner: Arc<Seller>) -> Pipeline {
    Pipeline::new(Classifier::new(reasoner), RoutingConfig::default())
}

fn spawn(worker: Worker) -> (CancellationToken, JoinHandle<Result<(), NatsError>>) {
    let stop = CancellationToken::new();
    let task = {
        let stop = stop.clone();
        tokio::spawn(async move { worker.run(stop).await })
    };
    (stop, task)
}

async fn stop_worker(stop: CancellationToken, task: JoinHandle<Result<(), NatsError>>) {
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
}

/// Waits until every event in the work stream was acked (it leaves the stream then).
async fn wait_until_drained(bus: &Bus, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let stream = bus.js.get_stream(&bus.config.work_stream).await.unwrap();
        if stream.cached_info().state.messages == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{} events still in the work stream", stream.cached_info().state.messages);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many deliveries of the shared consumer were redeliveries.
async fn redelivered(bus: &Bus) -> u64 {
    let stream = bus.js.get_stream(&bus.config.work_stream).await.unwrap();
    stream.consumer_info(&bus.config.consumer).await.map_or(0, |info| info.num_redelivered as u64)
}

fn chains(decision: &CascadeDecision) -> Vec<String> {
    decision.reasoning.iter().flat_map(|d| d.reasoning.iter().cloned()).collect()
}

/// A host where a person decides the item the moment it is recorded (the server publishes `reviewed` then), and
/// whose worker dies right after recording, `crashes` times in a row.
struct ReviewedAtOnce {
    pipeline: Pipeline,
    policies: Vec<Policy>,
    bus: Bus,
    crashes: usize,
    records: AtomicUsize,
}

#[async_trait]
impl WorkerHost for ReviewedAtOnce {
    async fn prepare(&self, _requested: &[String]) -> Result<(Vec<Policy>, Pipeline), HostError> {
        Ok((self.policies.clone(), self.pipeline.clone()))
    }

    async fn record(&self, item: SettledItem<'_>) -> Result<(), HostError> {
        let n = self.records.fetch_add(1, Ordering::SeqCst);
        if n == 0 {
            let review = ReviewedItem {
                decision_id: item.decision.id.to_string(),
                appeal_of: None,
                review_id: "review-1".into(),
                outcome: "allow".into(),
                rule_id: Some("SP0.a".into()),
                policy_hash: None,
                decided_at: Some(1),
            };
            self.bus.publish_review(item.key, item.item_id.map(str::to_string), review).await.unwrap();
        }
        if n < self.crashes {
            panic!("the worker died right after the decision was recorded");
        }
        Ok(())
    }
}

/// The decision was recorded (so a person could review it, and the server announce that) before it was published.
/// A worker that died in between published it on the redelivery, after the person's word: a producer holding items
/// on `needs_review` went back to holding this one, for good. Past the duplicate window (two minutes; one second
/// here) even a decision that was out already came again after the person's word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_s_word_on_an_item_is_never_followed_by_its_decision() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL} (bash scripts/setup.sh starts it)");
        return;
    }
    let cfg = config();
    let js = async_nats::jetstream::new(async_nats::connect(URL).await.unwrap());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: cfg.decision_stream.clone(),
        subjects: vec![format!("{}.decisions.>", cfg.prefix)],
        duplicate_window: Duration::from_secs(1),
        ..Default::default()
    })
    .await
    .unwrap();
    let producer = Bus::connect(cfg.clone()).await.unwrap();
    producer.publish_content("held", &json!({"id": "held", "text": "see you at lunch"})).await.unwrap();
    let reasoner = seller();
    let host = Arc::new(ReviewedAtOnce {
        pipeline: pipeline(reasoner.clone()),
        policies: vec![Policy::parse(SPAM).unwrap()],
        bus: Bus::connect(cfg.clone()).await.unwrap(),
        // Redelivered 1 s and then 2 s later: past the duplicate window.
        crashes: 2,
        records: AtomicUsize::new(0),
    });
    let (stop, task) = spawn(Worker::with_host(Bus::connect(cfg.clone()).await.unwrap(), host.clone()));
    wait_until_drained(&producer, Duration::from_secs(30)).await;
    stop_worker(stop, task).await;

    assert_eq!(host.records.load(Ordering::SeqCst), 3, "recorded, and again on each redelivery");
    let events = published(&producer).await.remove("held").unwrap_or_default();
    let order: Vec<EventStatus> = events.iter().map(|e| e.status).filter(|s| *s != EventStatus::Pending).collect();
    assert_eq!(order, [EventStatus::Decided, EventStatus::Reviewed], "{events:?}");
    assert_eq!(reasoner.calls.load(Ordering::SeqCst), 1, "decided once");
    delete_streams(&producer).await;
}

/// A host whose database is down until `until`, counting from its first record; keeps what it records.
struct DownFor {
    pipeline: Pipeline,
    policies: Vec<Policy>,
    down: Duration,
    since: Mutex<Option<Instant>>,
    recorded: Mutex<Vec<CascadeDecision>>,
}

#[async_trait]
impl WorkerHost for DownFor {
    async fn prepare(&self, _requested: &[String]) -> Result<(Vec<Policy>, Pipeline), HostError> {
        Ok((self.policies.clone(), self.pipeline.clone()))
    }

    async fn record(&self, item: SettledItem<'_>) -> Result<(), HostError> {
        let since = *self.since.lock().unwrap().get_or_insert_with(Instant::now);
        if since.elapsed() < self.down {
            return Err(HostError::Unavailable("database restarting".into()));
        }
        self.recorded.lock().unwrap().push(item.decision.clone());
        Ok(())
    }
}

fn down_for(reasoner: Arc<Seller>, down: Duration) -> Arc<DownFor> {
    Arc::new(DownFor {
        pipeline: pipeline(reasoner),
        policies: vec![Policy::parse(SPAM).unwrap()],
        down,
        since: Mutex::default(),
        recorded: Mutex::default(),
    })
}

/// The host was asked five times over three seconds, then the event was given back: its redelivery recorded the
/// ledger's copy of the decision, and the chain of thought (which only the worker that decided held) was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_down_for_longer_than_a_few_tries_still_gets_the_reasoning() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL}");
        return;
    }
    let cfg = config();
    let producer = Bus::connect(cfg.clone()).await.unwrap();
    producer.publish_content("pitch", &json!({"id": "pitch", "text": "buy my course"})).await.unwrap();
    let reasoner = seller();
    let host = down_for(reasoner.clone(), Duration::from_secs(5));
    let (stop, task) = spawn(Worker::with_host(Bus::connect(cfg.clone()).await.unwrap(), host.clone()));
    wait_until_drained(&producer, Duration::from_secs(30)).await;
    stop_worker(stop, task).await;

    let recorded = host.recorded.lock().unwrap().clone();
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert!(chains(&recorded[0]).iter().any(|c| c.contains("is a sales pitch")), "{:?}", chains(&recorded[0]));
    assert_eq!(redelivered(&producer).await, 0, "kept in hand, not given back");
    assert_eq!(reasoner.calls.load(Ordering::SeqCst), 1);
    let decided = producer.decided("pitch").await.unwrap().unwrap();
    assert_eq!(decided.decision.unwrap().id, recorded[0].id);
    delete_streams(&producer).await;
}

/// Waiting for the host ends when the worker is told to stop: the event goes back to the stream, settled in the
/// ledger and announced, to be recorded by whichever worker gets it next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_a_host_that_stays_down_ends_when_the_worker_stops() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL}");
        return;
    }
    let cfg = config();
    let producer = Bus::connect(cfg.clone()).await.unwrap();
    producer.publish_content("stuck", &json!({"id": "stuck", "text": "see you at lunch"})).await.unwrap();
    let reasoner = seller();
    let host = down_for(reasoner.clone(), Duration::from_secs(3600));
    let (stop, task) = spawn(Worker::with_host(Bus::connect(cfg.clone()).await.unwrap(), host.clone()));
    let deadline = Instant::now() + Duration::from_secs(20);
    while host.since.lock().unwrap().is_none() {
        assert!(Instant::now() < deadline, "never asked to record");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopping = Instant::now();
    stop.cancel();
    let ended = tokio::time::timeout(Duration::from_secs(5), task).await;
    assert!(matches!(ended, Ok(Ok(Ok(())))), "the worker ends when told: {ended:?}");
    assert!(stopping.elapsed() < Duration::from_secs(2), "ended after {:?}", stopping.elapsed());

    assert!(host.recorded.lock().unwrap().is_empty());
    let stream = producer.js.get_stream(&cfg.work_stream).await.unwrap();
    assert_eq!(stream.cached_info().state.messages, 1, "given back, not acked");
    assert!(producer.decided("stuck").await.unwrap().is_some(), "settled in the ledger");
    let events = published(&producer).await.remove("stuck").unwrap_or_default();
    assert!(events.iter().any(|e| e.status == EventStatus::Decided), "announced before it was recorded: {events:?}");
    delete_streams(&producer).await;
}

/// The worker parsed events with the item parser's own limit (100,000 characters) and counted no tokens at all,
/// whatever the server it ran in allowed over HTTP: the bus was a way around the server's content limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_over_the_workers_content_limits_are_rejected() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL}");
        return;
    }
    let cfg = config();
    let producer = Bus::connect(cfg.clone()).await.unwrap();
    let wordy = "see you at lunch ".repeat(8);
    assert!(wordy.chars().count() < 200);
    let events = [("short", "see you at lunch".to_string()), ("wordy", wordy), ("long", "a".repeat(201))];
    for (key, text) in &events {
        producer.publish_content(key, &json!({"id": key, "text": text})).await.unwrap();
    }
    let reasoner = seller();
    let limits = ContentLimits { max_chars: 200, max_tokens: Some(20) };
    let worker = Worker::new(
        Bus::connect(cfg.clone()).await.unwrap(),
        pipeline(reasoner.clone()),
        vec![Policy::parse(SPAM).unwrap()],
    )
    .with_limits(limits);
    let (stop, task) = spawn(worker);
    wait_until_drained(&producer, Duration::from_secs(30)).await;
    stop_worker(stop, task).await;

    let published = published(&producer).await;
    let settled = |key: &str| published[key].iter().find(|e| e.status != EventStatus::Pending).unwrap().clone();
    assert_eq!(settled("short").status, EventStatus::Decided);
    let wordy = settled("wordy");
    assert_eq!(wordy.status, EventStatus::Rejected, "{wordy:?}");
    let why = wordy.error.unwrap_or_default();
    assert!(why.contains("tokens; the limit is 20"), "{why}");
    let long = settled("long");
    assert_eq!(long.status, EventStatus::Rejected, "{long:?}");
    let why = long.error.unwrap_or_default();
    assert!(why.contains("201 characters long; the limit is 200"), "{why}");
    assert_eq!(reasoner.calls.load(Ordering::SeqCst), 1, "only the event within the limits was reasoned about");
    delete_streams(&producer).await;
}

//! The NATS JetStream flow against the real server on 127.0.0.1:4222: several workers share a stream, one
//! dies mid-work, a new one starts, and every item ends with exactly one published decision.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use safeguard_core::{Classifier, ReasonError, ReasonOutput, ReasonRequest, Reasoner};
use safeguard_pipeline::nats::{
    Bus, DecisionEvent, EventStatus, HostError, NatsConfig, SettledItem, Worker, WorkerHost,
};
use safeguard_pipeline::{CascadeDecision, Pipeline, ReasoningBudget, RoutingConfig};
use safeguard_policy::Policy;
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[path = "support/nats.rs"]
mod nats_support;

use nats_support::{URL, delete_streams, nats_up, published};

const SPAM: &str = "---\nname: spam\noutput: binary\n---\n# Spam Policy (SP)\n\n## INSTRUCTIONS\nReturn exactly one character: 0 or 1.\n\n## VIOLATES (1)\n- SP1.a Cold promotion with links.\n\n## SAFE (0)\n- SP0.a Personal messages.\n\nReturn exactly one character: 0 or 1.";

/// Answers "1" for texts mentioning "buy", else "0", after a pause that keeps work in flight.
struct Slow {
    calls: AtomicUsize,
    pause: Duration,
}

#[async_trait]
impl Reasoner for Slow {
    fn model_id(&self) -> String {
        "slow".into()
    }

    async fn reason(&self, req: ReasonRequest) -> Result<ReasonOutput, ReasonError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.pause).await;
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
    let mut cfg = NatsConfig::new(URL, format!("sgtest{}", &uuid::Uuid::new_v4().simple().to_string()[..10]));
    cfg.ack_wait = Duration::from_secs(1);
    cfg.batch = 2;
    cfg
}

fn worker(bus: Bus, reasoner: Arc<Slow>, budget: Option<Arc<ReasoningBudget>>) -> Worker {
    let mut pipeline = Pipeline::new(Classifier::new(reasoner), RoutingConfig::default());
    if let Some(budget) = budget {
        pipeline = pipeline.with_budget(budget);
    }
    Worker::new(bus, pipeline, vec![Policy::parse(SPAM).unwrap()])
}

async fn wait_until_decided(bus: &Bus, keys: &[String], limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let mut missing = 0;
        for key in keys {
            if bus.decided(key).await.unwrap().is_none() {
                missing += 1;
            }
        }
        if missing == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{missing} items still undecided");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_share_a_stream_survive_a_crash_and_decide_each_item_once() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL} (bash scripts/setup.sh starts it)");
        return;
    }
    let cfg = config();
    let producer = Bus::connect(cfg.clone()).await.unwrap();
    let keys: Vec<String> = (0..12).map(|i| format!("item-{i}")).collect();
    for (i, key) in keys.iter().enumerate() {
        let text = if i % 3 == 0 { format!("buy cheap pills {i}") } else { format!("see you at lunch {i}") };
        producer.publish_content(key, &json!({"id": key, "text": text})).await.unwrap();
    }
    // A producer retry of the same event: dropped by the stream's duplicate window.
    producer.publish_content("item-1", &json!({"id": "item-1", "text": "see you at lunch 1"})).await.unwrap();
    // An event that can never be decided is rejected, not retried forever.
    producer.publish_content("broken", &json!({"id": "broken", "nothing": "to classify"})).await.unwrap();

    let reasoner = Arc::new(Slow { calls: AtomicUsize::new(0), pause: Duration::from_millis(150) });
    let doomed_stop = CancellationToken::new();
    let doomed = {
        let w = worker(Bus::connect(cfg.clone()).await.unwrap(), reasoner.clone(), None);
        let stop = doomed_stop.clone();
        tokio::spawn(async move { w.run(stop).await })
    };
    let steady_stop = CancellationToken::new();
    let steady = {
        let w = worker(Bus::connect(cfg.clone()).await.unwrap(), reasoner.clone(), None);
        let stop = steady_stop.clone();
        tokio::spawn(async move { w.run(stop).await })
    };

    // Let both take work, then kill one mid-flight (as kill -9 would: no ack, no cleanup).
    tokio::time::sleep(Duration::from_millis(400)).await;
    doomed.abort();
    let restarted_stop = CancellationToken::new();
    let restarted = {
        let w = worker(Bus::connect(cfg.clone()).await.unwrap(), reasoner.clone(), None);
        let stop = restarted_stop.clone();
        tokio::spawn(async move { w.run(stop).await })
    };

    let mut all_keys = keys.clone();
    all_keys.push("broken".into());
    wait_until_decided(&producer, &all_keys, Duration::from_secs(30)).await;
    steady_stop.cancel();
    restarted_stop.cancel();
    doomed_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), steady).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), restarted).await;

    let events = published(&producer).await;
    for (i, key) in keys.iter().enumerate() {
        let decided: Vec<&DecisionEvent> = events[key].iter().filter(|e| e.status == EventStatus::Decided).collect();
        assert_eq!(decided.len(), 1, "{key}: exactly one decision published");
        let decision = decided[0].decision.as_ref().unwrap();
        let expected = if i % 3 == 0 { "violation" } else { "allow" };
        assert_eq!(serde_json::to_value(decision.outcome).unwrap(), expected, "{key}");
        assert!(events[key].iter().any(|e| e.status == EventStatus::Pending), "{key}: held pending first");
    }
    let broken = &events["broken"];
    assert_eq!(broken.len(), 1);
    assert_eq!(broken[0].status, EventStatus::Rejected);
    assert!(reasoner.calls.load(Ordering::SeqCst) >= keys.len());
    delete_streams(&producer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_budget_holds_items_back_instead_of_dropping_them() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL}");
        return;
    }
    let cfg = config();
    let producer = Bus::connect(cfg.clone()).await.unwrap();
    let keys: Vec<String> = (0..4).map(|i| format!("b{i}")).collect();
    for key in &keys {
        producer.publish_content(key, &json!({"id": key, "text": "hello there"})).await.unwrap();
    }
    // Four reasoning calls per second at most: four items take about a second.
    let budget = Arc::new(ReasoningBudget::new(4.0, 1));
    let reasoner = Arc::new(Slow { calls: AtomicUsize::new(0), pause: Duration::ZERO });
    let stop = CancellationToken::new();
    let w = worker(Bus::connect(cfg.clone()).await.unwrap(), reasoner.clone(), Some(budget));
    let task = {
        let stop = stop.clone();
        tokio::spawn(async move { w.run(stop).await })
    };
    let started = Instant::now();
    wait_until_decided(&producer, &keys, Duration::from_secs(20)).await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    assert!(started.elapsed() >= Duration::from_millis(500), "the budget paced the work");
    assert_eq!(reasoner.calls.load(Ordering::SeqCst), 4, "no item dropped, none decided twice");
    delete_streams(&producer).await;
}

/// A host whose database is down for its first `outages` records.
struct Flaky {
    pipeline: Pipeline,
    policies: Vec<Policy>,
    outages: AtomicUsize,
    recorded: Mutex<Vec<CascadeDecision>>,
}

#[async_trait]
impl WorkerHost for Flaky {
    async fn prepare(&self, _requested: &[String]) -> Result<(Vec<Policy>, Pipeline), HostError> {
        Ok((self.policies.clone(), self.pipeline.clone()))
    }

    async fn record(&self, item: SettledItem<'_>) -> Result<(), HostError> {
        if self.outages.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Err(HostError::Unavailable("database restarting".into()));
        }
        self.recorded.lock().unwrap().push(item.decision.clone());
        Ok(())
    }
}

/// A host that is briefly unavailable is asked again before the event goes back to the stream, so the chain of
/// thought (in this worker's memory only) is recorded with the decision; and an event whose `"policies"` cannot
/// be read is rejected, not judged under some other set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_briefly_unavailable_host_still_gets_the_reasoning_and_bad_policy_lists_are_rejected() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL}");
        return;
    }
    let cfg = config();
    let producer = Bus::connect(cfg.clone()).await.unwrap();
    producer
        .publish_content("pitch", &json!({"id": "pitch", "text": "buy my course", "policies": "spam"}))
        .await
        .unwrap();
    producer.publish_content("odd", &json!({"id": "odd", "text": "hi", "policies": ["spam", 7]})).await.unwrap();
    let reasoner = Arc::new(Slow { calls: AtomicUsize::new(0), pause: Duration::ZERO });
    let host = Arc::new(Flaky {
        pipeline: Pipeline::new(Classifier::new(reasoner.clone()), RoutingConfig::default()),
        policies: vec![Policy::parse(SPAM).unwrap()],
        outages: AtomicUsize::new(2),
        recorded: Mutex::default(),
    });
    let w = Worker::with_host(Bus::connect(cfg.clone()).await.unwrap(), host.clone());
    let stop = CancellationToken::new();
    let task = {
        let stop = stop.clone();
        tokio::spawn(async move { w.run(stop).await })
    };
    wait_until_decided(&producer, &["pitch".to_string(), "odd".to_string()], Duration::from_secs(20)).await;
    // An appeal under the item's id (no header) is decided apart from the item, not answered with the appealed
    // decision from the ledger.
    let appeal = serde_json::to_vec(&json!({"id": "pitch", "text": "buy my course", "appeal": true})).unwrap();
    producer.js.publish(cfg.content_subject("pitch"), appeal.into()).await.unwrap().await.unwrap();
    wait_until_decided(&producer, &["pitch:appeal".to_string()], Duration::from_secs(20)).await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;

    let recorded = host.recorded.lock().unwrap().clone();
    assert_eq!(recorded.len(), 2, "the item, recorded once after two outages, and its appeal");
    let chains: Vec<&String> = recorded[0].reasoning.iter().flat_map(|d| d.reasoning.iter()).collect();
    assert!(chains.iter().any(|c| c.contains("is a sales pitch")), "{chains:?}");
    assert_eq!(reasoner.calls.load(Ordering::SeqCst), 2, "the item and its appeal; the retries did not reason again");
    let events = published(&producer).await;
    let pitch = events["pitch"].iter().find(|e| e.status == EventStatus::Decided).unwrap();
    assert!(pitch.decision.as_ref().unwrap().reasoning.iter().all(|d| d.reasoning.is_empty()), "no CoT on the bus");
    let appealed = events["pitch:appeal"].iter().find(|e| e.status == EventStatus::Decided).unwrap();
    let appealed = appealed.decision.as_ref().unwrap();
    assert_eq!(appealed.decided_by, safeguard_pipeline::Stage::HumanReview, "{appealed:?}");
    assert_ne!(appealed.id, pitch.decision.as_ref().unwrap().id);
    let odd = &events["odd"];
    assert_eq!((odd.len(), odd[0].status), (1, EventStatus::Rejected), "{odd:?}");
    assert!(odd[0].error.as_deref().unwrap().contains("[1] is a number"), "{odd:?}");
    delete_streams(&producer).await;
}

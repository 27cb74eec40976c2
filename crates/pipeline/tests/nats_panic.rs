//! A panic while handling one event must not take the worker down: an item whose deciding panicked goes to a
//! person, an event whose handling panicked elsewhere comes back later, and the events after them are decided
//! by the same worker. Against the real NATS server on 127.0.0.1:4222.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use safeguard_core::{Classifier, ReasonError, ReasonOutput, ReasonRequest, Reasoner};
use safeguard_pipeline::nats::{
    Bus, DECIDE_PANICKED, DecisionEvent, EventStatus, HostError, NatsConfig, NatsError, SettledItem, Worker, WorkerHost,
};
use safeguard_pipeline::{CascadeDecision, Escalation, Pipeline, RoutingConfig, Stage};
use safeguard_policy::Policy;
use safeguard_verdict::Outcome;
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[path = "support/nats.rs"]
mod nats_support;

use nats_support::{URL, delete_streams, nats_up, published};

const SPAM: &str = "---\nname: spam\noutput: binary\n---\n# Spam Policy (SP)\n\n## INSTRUCTIONS\nReturn exactly one character: 0 or 1.\n\n## VIOLATES (1)\n- SP1.a Cold promotion with links.\n\n## SAFE (0)\n- SP0.a Personal messages.\n\nReturn exactly one character: 0 or 1.";

/// Panics on content holding "PANIC", as a reasoner with a bug might; answers "0" (allowed) otherwise.
struct Panicky {
    calls: AtomicUsize,
}

#[async_trait]
impl Reasoner for Panicky {
    fn model_id(&self) -> String {
        "panicky".into()
    }

    async fn reason(&self, req: ReasonRequest) -> Result<ReasonOutput, ReasonError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if safeguard_harmony::user_message_text(&req.content).contains("PANIC") {
            panic!("a bug in the reasoner");
        }
        Ok(ReasonOutput {
            analysis: Some("A personal message.".into()),
            final_text: Some("0".into()),
            final_token_prob: Some(0.99),
            ..ReasonOutput::default()
        })
    }
}

fn config() -> NatsConfig {
    let mut cfg = NatsConfig::new(URL, format!("sgpanic{}", &uuid::Uuid::new_v4().simple().to_string()[..10]));
    cfg.ack_wait = Duration::from_secs(1);
    // The event after the panicking one waits in the same batch.
    cfg.batch = 2;
    cfg
}

fn pipeline(reasoner: Arc<Panicky>) -> Pipeline {
    Pipeline::new(Classifier::new(reasoner), RoutingConfig::default())
}

fn spawn(worker: Worker) -> (JoinHandle<Result<(), NatsError>>, CancellationToken) {
    let stop = CancellationToken::new();
    let task = {
        let stop = stop.clone();
        tokio::spawn(async move { worker.run(stop).await })
    };
    (task, stop)
}

/// The `decided` event published for `key`, once there is one.
async fn decided(bus: &Bus, key: &str, worker: &JoinHandle<Result<(), NatsError>>, limit: Duration) -> DecisionEvent {
    let deadline = Instant::now() + limit;
    loop {
        let events = published(bus).await;
        if let Some(event) = events.get(key).and_then(|e| e.iter().find(|e| e.status == EventStatus::Decided)) {
            return event.clone();
        }
        assert!(!worker.is_finished(), "the worker ended before {key} was decided");
        assert!(Instant::now() < deadline, "{key} was never decided");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn stop_worker(task: JoinHandle<Result<(), NatsError>>, stop: CancellationToken) {
    assert!(!task.is_finished(), "the worker is still running");
    stop.cancel();
    let ended = tokio::time::timeout(Duration::from_secs(5), task).await.expect("the worker stops when told");
    assert!(matches!(ended, Ok(Ok(()))), "{ended:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_whose_deciding_panics_goes_to_a_person_and_the_worker_carries_on() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL} (bash scripts/setup.sh starts it)");
        return;
    }
    let cfg = config();
    let producer = Bus::connect(cfg.clone()).await.unwrap();
    producer.publish_content("doomed", &json!({"id": "doomed", "text": "PANIC in the reasoner"})).await.unwrap();
    producer.publish_content("next", &json!({"id": "next", "text": "see you at lunch"})).await.unwrap();
    producer
        .publish_content("doomed-appeal", &json!({"id": "doomed-appeal", "text": "PANIC again", "appeal": true}))
        .await
        .unwrap();

    let reasoner = Arc::new(Panicky { calls: AtomicUsize::new(0) });
    let policy = Policy::parse(SPAM).unwrap();
    let worker =
        Worker::new(Bus::connect(cfg.clone()).await.unwrap(), pipeline(reasoner.clone()), vec![policy.clone()]);
    let (task, stop) = spawn(worker);

    let doomed = decided(&producer, "doomed", &task, Duration::from_secs(20)).await;
    let decision = doomed.decision.as_ref().unwrap();
    assert_eq!((decision.outcome, decision.decided_by), (Outcome::NeedsReview, Stage::HumanReview));
    let route = &decision.policies[0];
    assert_eq!((route.policy.as_str(), route.policy_hash.clone()), ("spam", policy.hash.to_string()));
    assert_eq!((route.outcome, route.decided_by), (Outcome::NeedsReview, Stage::HumanReview));
    assert_eq!(route.escalations, vec![Escalation::StageFailed { detail: DECIDE_PANICKED.into() }]);
    assert_eq!(producer.decided("doomed").await.unwrap().as_ref(), Some(&doomed), "settled in the ledger, once");

    let next = decided(&producer, "next", &task, Duration::from_secs(20)).await;
    assert_eq!(next.decision.as_ref().unwrap().outcome, Outcome::Allow, "{next:?}");

    // An appeal whose deciding panicked still reaches a person as an appeal.
    let appeal = decided(&producer, "doomed-appeal:appeal", &task, Duration::from_secs(20)).await;
    let route = &appeal.decision.as_ref().unwrap().policies[0];
    assert_eq!(route.escalations[0], Escalation::Appeal, "{route:?}");
    assert_eq!(route.outcome, Outcome::NeedsReview);

    // Settled, not given back: nothing comes round again to be decided (and to panic) once more.
    let calls = reasoner.calls.load(Ordering::SeqCst);
    tokio::time::sleep(cfg.ack_wait * 2).await;
    assert_eq!(reasoner.calls.load(Ordering::SeqCst), calls, "no event was redelivered");
    stop_worker(task, stop).await;
    delete_streams(&producer).await;
}

/// A host whose record panics the first time it is handed `doomed_key`, as a host with a bug might.
struct PanickyHost {
    pipeline: Pipeline,
    policies: Vec<Policy>,
    doomed_key: &'static str,
    panicked: AtomicUsize,
    recorded: Mutex<Vec<(String, CascadeDecision)>>,
}

#[async_trait]
impl WorkerHost for PanickyHost {
    async fn prepare(&self, _requested: &[String]) -> Result<(Vec<Policy>, Pipeline), HostError> {
        Ok((self.policies.clone(), self.pipeline.clone()))
    }

    async fn record(&self, item: SettledItem<'_>) -> Result<(), HostError> {
        if item.key == self.doomed_key && self.panicked.fetch_add(1, Ordering::SeqCst) == 0 {
            panic!("a bug in the host");
        }
        self.recorded.lock().unwrap().push((item.key.to_string(), item.decision.clone()));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_while_recording_gives_the_event_back_and_the_worker_carries_on() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL} (bash scripts/setup.sh starts it)");
        return;
    }
    let cfg = config();
    let producer = Bus::connect(cfg.clone()).await.unwrap();
    producer.publish_content("first", &json!({"id": "first", "text": "see you at lunch"})).await.unwrap();
    producer.publish_content("second", &json!({"id": "second", "text": "see you at dinner"})).await.unwrap();

    let reasoner = Arc::new(Panicky { calls: AtomicUsize::new(0) });
    let host = Arc::new(PanickyHost {
        pipeline: pipeline(reasoner.clone()),
        policies: vec![Policy::parse(SPAM).unwrap()],
        doomed_key: "first",
        panicked: AtomicUsize::new(0),
        recorded: Mutex::new(Vec::new()),
    });
    let (task, stop) = spawn(Worker::with_host(Bus::connect(cfg.clone()).await.unwrap(), host.clone()));

    let second = decided(&producer, "second", &task, Duration::from_secs(20)).await;
    // Given back after the panic and settled on its next delivery, from the ledger: decided once.
    let first = decided(&producer, "first", &task, Duration::from_secs(20)).await;
    // Published before it is recorded: the redelivery records it a moment later.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !host.recorded.lock().unwrap().iter().any(|(key, _)| key == "first") {
        assert!(Instant::now() < deadline, "the redelivery never recorded it");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(host.panicked.load(Ordering::SeqCst), 2, "recorded again on the redelivery");
    let recorded = host.recorded.lock().unwrap().clone();
    let ids: Vec<(&str, uuid::Uuid)> = recorded.iter().map(|(key, d)| (key.as_str(), d.id)).collect();
    let first_id = first.decision.as_ref().unwrap().id;
    let second_id = second.decision.as_ref().unwrap().id;
    assert!(ids.contains(&("first", first_id)) && ids.contains(&("second", second_id)), "{ids:?}");
    assert_eq!(reasoner.calls.load(Ordering::SeqCst), 2, "the redelivery was not decided again");
    stop_worker(task, stop).await;
    delete_streams(&producer).await;
}

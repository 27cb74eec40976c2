//! The NATS JetStream flow against the real server on 127.0.0.1:4222: several workers share a stream, one
//! dies mid-work, a new one starts, and every item ends with exactly one published decision.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use safeguard_core::{Classifier, ReasonError, ReasonOutput, ReasonRequest, Reasoner};
use safeguard_pipeline::nats::{
    Bus, ContentLimits, DecisionEvent, EventStatus, HostError, NatsConfig, SettledItem, Worker, WorkerHost,
    subject_token,
};
use safeguard_pipeline::{CascadeDecision, Escalation, Pipeline, ReasoningBudget, RoutingConfig};
use safeguard_policy::Policy;
use safeguard_triage::rules::{KeywordList, RuleAction, RulesConfig};
use safeguard_triage::{RuleSet, Triage};
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
    producer.publish_content("broken", &json!({"id": "broken", "text": ["not", "a", "text"]})).await.unwrap();

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

fn flag_triage(keywords: &[&str]) -> Arc<Triage> {
    let rules = RulesConfig {
        keywords: vec![KeywordList {
            name: "violence".into(),
            action: RuleAction::Flag,
            keywords: keywords.iter().map(|k| k.to_string()).collect(),
        }],
        ..RulesConfig::default()
    };
    Arc::new(Triage::new(Some(RuleSet::compile(&rules).unwrap()), None))
}

/// A recording host (the database never down) whose pipeline flags `keywords`.
fn flagging_host(reasoner: Arc<Slow>, keywords: &[&str]) -> Arc<Flaky> {
    let spam = Policy::parse(SPAM).unwrap();
    let pipeline = Pipeline::new(Classifier::new(reasoner), RoutingConfig::default())
        .with_triage(spam.hash.to_string(), flag_triage(keywords));
    Arc::new(Flaky { pipeline, policies: vec![spam], outages: AtomicUsize::new(0), recorded: Mutex::default() })
}

fn spawn(
    worker: Worker,
) -> (CancellationToken, tokio::task::JoinHandle<Result<(), safeguard_pipeline::nats::NatsError>>) {
    let stop = CancellationToken::new();
    let task = {
        let stop = stop.clone();
        tokio::spawn(async move { worker.run(stop).await })
    };
    (stop, task)
}

async fn wait_for_calls(reasoner: &Slow, calls: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    while reasoner.calls.load(Ordering::SeqCst) < calls {
        assert!(Instant::now() < deadline, "the reasoner was not called {calls} times");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The first published event for `key` with `status`, waiting up to `limit` for it.
async fn wait_for_event(bus: &Bus, key: &str, status: EventStatus, limit: Duration) -> DecisionEvent {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(event) =
            published(bus).await.remove(key).unwrap_or_default().into_iter().find(|e| e.status == status)
        {
            return event;
        }
        assert!(Instant::now() < deadline, "no {status:?} event for {key:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn ledger_subject(cfg: &NatsConfig, key: &str) -> String {
    format!("{}.decided.{}", cfg.prefix, subject_token(key))
}

/// The work stream, once a worker has set up its consumer on it.
async fn consumer_set_up(bus: &Bus) -> async_nats::jetstream::stream::Stream {
    let stream = bus.js.get_stream(&bus.config.work_stream).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while stream.consumer_info(&bus.config.consumer).await.is_err() {
        assert!(Instant::now() < deadline, "the worker never set up its consumer");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stream
}

/// How many events the workers' consumer has delivered more than once (none before a worker created it).
async fn redelivered(bus: &Bus) -> usize {
    let stream = bus.js.get_stream(&bus.config.work_stream).await.unwrap();
    stream.consumer_info(&bus.config.consumer).await.map_or(0, |info| info.num_redelivered)
}

/// "kill " 20,000 times under a flag rule for "kill" once gave ~2 MB of evidence (a span, and a copy of the rule's
/// name in the escalation, per match): more than NATS takes, so the decision could never be written and the item
/// was decided again every second, forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_repeating_a_flagged_word_is_decided_once_with_capped_evidence() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL}");
        return;
    }
    let cfg = config();
    let producer = Bus::connect(cfg.clone()).await.unwrap();
    producer.publish_content("kills", &json!({"id": "kills", "text": "kill ".repeat(20_000)})).await.unwrap();
    let reasoner = Arc::new(Slow { calls: AtomicUsize::new(0), pause: Duration::ZERO });
    let host = flagging_host(reasoner.clone(), &["kill"]);
    let (stop, task) = spawn(Worker::with_host(Bus::connect(cfg.clone()).await.unwrap(), host.clone()));
    wait_until_decided(&producer, &["kills".to_string()], Duration::from_secs(20)).await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;

    let settled = producer.decided("kills").await.unwrap().unwrap();
    let route = &settled.decision.as_ref().unwrap().policies[0];
    let rules = route.triage.as_ref().unwrap().rule_match.as_ref().unwrap();
    assert_eq!(rules.evidence.len(), safeguard_triage::rules::MAX_SPANS_PER_RULE);
    assert_eq!(rules.matches.get("violence: kill"), Some(&20_000), "{:?}", rules.matches);
    let flagged: Vec<&Escalation> =
        route.escalations.iter().filter(|e| matches!(e, Escalation::TriageFlagged { .. })).collect();
    assert_eq!(flagged, [&Escalation::TriageFlagged { rules: vec!["violence: kill".into()] }], "each rule once");
    assert_eq!(reasoner.calls.load(Ordering::SeqCst), 1, "decided once");
    assert_eq!(host.recorded.lock().unwrap().len(), 1);
    delete_streams(&producer).await;
}

/// The decided ledger made ahead of the workers, taking messages of at most `bytes` (as a server's max_payload
/// would refuse larger ones).
async fn ledger_taking_at_most(cfg: &NatsConfig, bytes: i32) {
    let js = async_nats::jetstream::new(async_nats::connect(URL).await.unwrap());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: cfg.decided_stream.clone(),
        subjects: vec![format!("{}.decided.>", cfg.prefix)],
        max_messages_per_subject: 1,
        max_message_size: bytes,
        ..Default::default()
    })
    .await
    .unwrap();
}

/// A decision the ledger cannot take (here a ledger that takes 4 KiB, as a server's max_payload would refuse a
/// larger one) is settled as needs_review without its evidence, not given back to be decided again forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_too_large_for_the_ledger_goes_to_a_person_instead_of_round_again() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL}");
        return;
    }
    let cfg = config();
    ledger_taking_at_most(&cfg, 4096).await;
    let producer = Bus::connect(cfg.clone()).await.unwrap();
    let text = "kill stab hurt maim ".repeat(50);
    producer.publish_content("big", &json!({"id": "big", "text": text})).await.unwrap();
    let reasoner = Arc::new(Slow { calls: AtomicUsize::new(0), pause: Duration::ZERO });
    let host = flagging_host(reasoner.clone(), &["kill", "stab", "hurt", "maim"]);
    let (stop, task) = spawn(Worker::with_host(Bus::connect(cfg.clone()).await.unwrap(), host.clone()));
    wait_until_decided(&producer, &["big".to_string()], Duration::from_secs(20)).await;
    let published_event = wait_for_event(&producer, "big", EventStatus::Decided, Duration::from_secs(10)).await;
    // Time for a redelivery to decide it again, were it given back.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;

    let settled = producer.decided("big").await.unwrap().unwrap();
    assert_eq!(settled, published_event, "the ledger's copy is the one published");
    let decision = settled.decision.as_ref().unwrap();
    assert_eq!(serde_json::to_value(decision.outcome).unwrap(), "needs_review");
    assert_eq!(decision.decided_by, safeguard_pipeline::Stage::HumanReview);
    let route = &decision.policies[0];
    assert!(route.triage.is_none() && route.verdict.is_none(), "no evidence on the bus: {route:?}");
    assert!(
        matches!(route.escalations.last(), Some(Escalation::StageFailed { detail }) if detail.contains("too large")),
        "{:?}",
        route.escalations
    );
    assert_eq!(reasoner.calls.load(Ordering::SeqCst), 1, "decided once, not again per redelivery");
    let recorded = host.recorded.lock().unwrap().clone();
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0].id, decision.id);
    assert_eq!(serde_json::to_value(recorded[0].outcome).unwrap(), "needs_review", "the host agrees with the bus");
    let evidence = &recorded[0].policies[0].triage.as_ref().unwrap().rule_match.as_ref().unwrap().evidence;
    assert_eq!(evidence.len(), 4 * safeguard_triage::rules::MAX_SPANS_PER_RULE, "the host keeps the evidence");
    delete_streams(&producer).await;
}

/// A ledger that cannot take even the decision without its evidence (here 256 bytes): the event is dropped, as
/// no retry could settle it, but the host still gets the decision for a person. It used to get nothing, and the
/// producer's last word stayed `pending` with nobody to answer it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_too_large_even_without_its_evidence_still_reaches_a_person() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL}");
        return;
    }
    let cfg = config();
    ledger_taking_at_most(&cfg, 256).await;
    let producer = Bus::connect(cfg.clone()).await.unwrap();
    producer.publish_content("tiny-ledger", &json!({"id": "tiny-ledger", "text": "I will stab you"})).await.unwrap();
    let reasoner = Arc::new(Slow { calls: AtomicUsize::new(0), pause: Duration::ZERO });
    let host = flagging_host(reasoner.clone(), &["stab"]);
    let (stop, task) = spawn(Worker::with_host(Bus::connect(cfg.clone()).await.unwrap(), host.clone()));
    wait_until_drained(&producer, Duration::from_secs(20)).await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;

    assert!(producer.decided("tiny-ledger").await.unwrap().is_none(), "nothing fits the ledger");
    let recorded = host.recorded.lock().unwrap().clone();
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(serde_json::to_value(recorded[0].outcome).unwrap(), "needs_review");
    assert_eq!(recorded[0].decided_by, safeguard_pipeline::Stage::HumanReview);
    let chains: Vec<&String> = recorded[0].reasoning.iter().flat_map(|d| d.reasoning.iter()).collect();
    assert!(chains.iter().any(|c| c.contains("sales pitch")), "the person sees the reasoning: {chains:?}");
    delete_streams(&producer).await;
}

/// A ledger entry that does not parse was read as "not decided": the item was decided again (and that decision
/// then lost the ledger's write and was dropped without an ack).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_entry_that_does_not_parse_is_neither_decided_over_nor_lost() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL}");
        return;
    }
    let cfg = config();
    let producer = Bus::connect(cfg.clone()).await.unwrap();
    producer.js.publish(ledger_subject(&cfg, "garbled"), "{not json".into()).await.unwrap().await.unwrap();
    assert!(matches!(
        producer.decided("garbled").await,
        Err(safeguard_pipeline::nats::NatsError::BadLedgerEntry { .. })
    ));
    producer.publish_content("garbled", &json!({"id": "garbled", "text": "buy now"})).await.unwrap();
    let reasoner = Arc::new(Slow { calls: AtomicUsize::new(0), pause: Duration::ZERO });
    let (stop, task) = spawn(worker(Bus::connect(cfg.clone()).await.unwrap(), reasoner.clone(), None));
    let deadline = Instant::now() + Duration::from_secs(10);
    while redelivered(&producer).await == 0 {
        assert!(Instant::now() < deadline, "the event was never given back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;

    assert_eq!(reasoner.calls.load(Ordering::SeqCst), 0, "not decided over an entry it cannot read");
    assert!(!published(&producer).await.contains_key("garbled"), "nothing published for it");
    let stream = producer.js.get_stream(&cfg.work_stream).await.unwrap();
    assert_eq!(stream.cached_info().state.messages, 1, "still in the work stream, not lost");
    delete_streams(&producer).await;
}

/// The other way to meet a bad entry: it appears while the item is decided, so the ledger refuses the write and the
/// entry standing in its place cannot be read. The event went unacked and was decided again after `ack_wait`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbled_entry_written_while_deciding_gives_the_event_back_instead_of_dropping_it() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL}");
        return;
    }
    let cfg = config();
    let producer = Bus::connect(cfg.clone()).await.unwrap();
    producer.publish_content("raced", &json!({"id": "raced", "text": "buy now"})).await.unwrap();
    let reasoner = Arc::new(Slow { calls: AtomicUsize::new(0), pause: Duration::from_millis(1500) });
    let (stop, task) = spawn(worker(Bus::connect(cfg.clone()).await.unwrap(), reasoner.clone(), None));
    wait_for_calls(&reasoner, 1, Duration::from_secs(10)).await;
    producer.js.publish(ledger_subject(&cfg, "raced"), "garbage".into()).await.unwrap().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while redelivered(&producer).await == 0 {
        assert!(Instant::now() < deadline, "the event was never given back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Long enough for an unacked event to come back after ack_wait and be decided again.
    tokio::time::sleep(cfg.ack_wait * 3).await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;

    assert_eq!(reasoner.calls.load(Ordering::SeqCst), 1, "decided once; the bad entry holds it, not a second decision");
    let events = published(&producer).await;
    assert!(events["raced"].iter().all(|e| e.status == EventStatus::Pending), "{:?}", events["raced"]);
    let stream = producer.js.get_stream(&cfg.work_stream).await.unwrap();
    assert_eq!(stream.cached_info().state.messages, 1, "still in the work stream, not lost");
    delete_streams(&producer).await;
}

/// A fetched batch is worked through one event at a time, and the events waiting their turn used to have no one
/// telling the server they were in hand: past ack_wait they went to another worker and were decided twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_waiting_in_a_fetched_batch_are_not_handed_to_another_worker() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL}");
        return;
    }
    let mut cfg = config();
    cfg.batch = 4;
    let producer = Bus::connect(cfg.clone()).await.unwrap();
    let keys: Vec<String> = (0..4).map(|i| format!("w{i}")).collect();
    for key in &keys {
        producer.publish_content(key, &json!({"id": key, "text": "see you at lunch"})).await.unwrap();
    }
    // 600 ms an item: the fourth waits 1.8 s for its turn, well past the 1 s ack_wait.
    let reasoner = Arc::new(Slow { calls: AtomicUsize::new(0), pause: Duration::from_millis(600) });
    let (first_stop, first) = spawn(worker(Bus::connect(cfg.clone()).await.unwrap(), reasoner.clone(), None));
    // The first worker holds the whole batch before the second asks for work.
    wait_for_calls(&reasoner, 1, Duration::from_secs(10)).await;
    let (second_stop, second) = spawn(worker(Bus::connect(cfg.clone()).await.unwrap(), reasoner.clone(), None));
    wait_until_decided(&producer, &keys, Duration::from_secs(20)).await;
    tokio::time::sleep(cfg.ack_wait + Duration::from_millis(500)).await;
    for (stop, task) in [(first_stop, first), (second_stop, second)] {
        stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }

    assert_eq!(reasoner.calls.load(Ordering::SeqCst), keys.len(), "each item decided once");
    let events = published(&producer).await;
    for key in &keys {
        assert_eq!(events[key].iter().filter(|e| e.status == EventStatus::Decided).count(), 1, "{key}");
    }
    delete_streams(&producer).await;
}

/// A clean key that is exactly another key's hashed token used to be its own token, so the two shared a ledger
/// slot (one answered with the other's decision); and every keyless event was settled under the key "unknown",
/// taking that slot from a real item of that name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_shaped_like_a_hash_and_keyless_events_get_slots_of_their_own() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL}");
        return;
    }
    let cfg = config();
    let producer = Bus::connect(cfg.clone()).await.unwrap();
    let odd_key = "user/123 ?*>".to_string();
    let lookalike = subject_token(&odd_key);
    let anonymous = serde_json::to_vec(&json!({"text": "hello"})).unwrap();
    for _ in 0..2 {
        producer.js.publish(cfg.content_subject("anonymous"), anonymous.clone().into()).await.unwrap().await.unwrap();
    }
    // Without a header: a numeric id is the key, as over HTTP; an id of 2,000 bytes is too long to be one.
    for payload in [json!({"id": 42, "text": "see you at lunch"}), json!({"id": "k".repeat(2_000), "text": "hello"})] {
        let payload = serde_json::to_vec(&payload).unwrap();
        producer.js.publish(cfg.content_subject("anonymous"), payload.into()).await.unwrap().await.unwrap();
    }
    producer.publish_content("unknown", &json!({"id": "unknown", "text": "see you at lunch"})).await.unwrap();
    producer.publish_content(&odd_key, &json!({"id": odd_key, "text": "buy cheap pills"})).await.unwrap();
    producer.publish_content(&lookalike, &json!({"id": lookalike, "text": "see you at lunch"})).await.unwrap();
    let reasoner = Arc::new(Slow { calls: AtomicUsize::new(0), pause: Duration::ZERO });
    let (stop, task) = spawn(worker(Bus::connect(cfg.clone()).await.unwrap(), reasoner.clone(), None));
    let keys = ["unknown".to_string(), odd_key.clone(), lookalike.clone(), "42".to_string()];
    wait_until_decided(&producer, &keys, Duration::from_secs(20)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let events = loop {
        let events = published(&producer).await;
        if events.keys().filter(|k| k.starts_with("unkeyed.")).count() == 3 {
            break events;
        }
        assert!(Instant::now() < deadline, "the keyless events were not both rejected: {:?}", events.keys());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;

    let decided = |key: &str| {
        let decided: Vec<&DecisionEvent> = events[key].iter().filter(|e| e.status == EventStatus::Decided).collect();
        assert_eq!(decided.len(), 1, "{key}: {:?}", events[key]);
        decided[0].decision.clone().unwrap()
    };
    let unknown = decided("unknown");
    assert_eq!(serde_json::to_value(unknown.outcome).unwrap(), "allow");
    assert!(events["unknown"].iter().all(|e| e.status != EventStatus::Rejected), "{:?}", events["unknown"]);
    let (odd, looking) = (decided(&odd_key), decided(&lookalike));
    assert_ne!(odd.id, looking.id, "two keys, two decisions");
    assert_eq!(serde_json::to_value(odd.outcome).unwrap(), "violation");
    assert_eq!(serde_json::to_value(looking.outcome).unwrap(), "allow");
    assert_eq!(producer.decided(&lookalike).await.unwrap().unwrap().key, lookalike);
    assert_eq!(events["42"].iter().find_map(|e| e.item_id.clone()).as_deref(), Some("42"));
    let mut reasons = Vec::new();
    for (key, keyless) in events.iter().filter(|(k, _)| k.starts_with("unkeyed.")) {
        assert_eq!(keyless.len(), 1, "{key}: {keyless:?}");
        assert_eq!(keyless[0].status, EventStatus::Rejected);
        reasons.push(keyless[0].error.clone().unwrap_or_default());
    }
    let too_long = reasons.iter().filter(|r| r.contains("is 2000 bytes; at most 1024")).count();
    assert_eq!(too_long, 1, "{reasons:?}");
    assert_eq!(reasoner.calls.load(Ordering::SeqCst), 4);
    delete_streams(&producer).await;
}

/// A ledger hit was used without looking at whose it was: an entry for another key in this key's slot (left by a
/// ledger from before keys shaped like hashes were hashed) answered for this item, an `allow` included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_keys_entry_in_the_ledger_slot_sends_the_item_to_a_person() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL}");
        return;
    }
    let cfg = config();
    let producer = Bus::connect(cfg.clone()).await.unwrap();
    producer.publish_content("other", &json!({"id": "other", "text": "see you at lunch"})).await.unwrap();
    let reasoner = Arc::new(Slow { calls: AtomicUsize::new(0), pause: Duration::ZERO });
    let host = Arc::new(Flaky {
        pipeline: Pipeline::new(Classifier::new(reasoner.clone()), RoutingConfig::default()),
        policies: vec![Policy::parse(SPAM).unwrap()],
        outages: AtomicUsize::new(0),
        recorded: Mutex::default(),
    });
    let (stop, task) = spawn(Worker::with_host(Bus::connect(cfg.clone()).await.unwrap(), host.clone()));
    wait_until_decided(&producer, &["other".to_string()], Duration::from_secs(20)).await;
    let theirs = producer.decided("other").await.unwrap().unwrap();
    assert_eq!(serde_json::to_value(theirs.decision.as_ref().unwrap().outcome).unwrap(), "allow");
    let body = serde_json::to_vec(&theirs).unwrap();
    producer.js.publish(ledger_subject(&cfg, "mine"), body.into()).await.unwrap().await.unwrap();
    producer.publish_content("mine", &json!({"id": "mine", "text": "buy cheap pills"})).await.unwrap();
    let mine = wait_for_event(&producer, "mine", EventStatus::Decided, Duration::from_secs(20)).await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;

    let decision = mine.decision.as_ref().unwrap();
    assert_ne!(decision.id, theirs.decision.as_ref().unwrap().id, "not the other key's decision");
    assert_eq!(serde_json::to_value(decision.outcome).unwrap(), "needs_review");
    assert_eq!(decision.decided_by, safeguard_pipeline::Stage::HumanReview);
    let why = decision.policies[0].escalations.last();
    assert!(matches!(why, Some(Escalation::StageFailed { detail }) if detail.contains("ledger conflict")), "{why:?}");
    assert_eq!(producer.decided("mine").await.unwrap().unwrap().key, "other", "the slot is left as it was");
    let recorded = host.recorded.lock().unwrap().clone();
    let recorded = recorded.iter().find(|d| d.id == decision.id).expect("recorded for a person");
    assert_eq!(serde_json::to_value(recorded.outcome).unwrap(), "needs_review");
    let chains: Vec<&String> = recorded.reasoning.iter().flat_map(|d| d.reasoning.iter()).collect();
    assert!(chains.iter().any(|c| c.contains("is a sales pitch")), "the host gets the chain of thought: {chains:?}");
    delete_streams(&producer).await;
}

/// The pause after a spent budget (up to an hour) was slept out whatever `stop` said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_worker_does_not_sleep_out_a_budget_pause() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL}");
        return;
    }
    let cfg = config();
    let producer = Bus::connect(cfg.clone()).await.unwrap();
    for key in ["p0", "p1"] {
        producer.publish_content(key, &json!({"id": key, "text": "hello there"})).await.unwrap();
    }
    // One call now, the next in about three hours: the second item is deferred for the longest pause.
    let budget = Arc::new(ReasoningBudget::new(0.0001, 1));
    let reasoner = Arc::new(Slow { calls: AtomicUsize::new(0), pause: Duration::ZERO });
    let (stop, task) = spawn(worker(Bus::connect(cfg.clone()).await.unwrap(), reasoner.clone(), Some(budget)));
    wait_until_decided(&producer, &["p0".to_string()], Duration::from_secs(10)).await;
    // Time to take the second item, find the budget spent and start the pause.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stopping = Instant::now();
    stop.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(5), task).await;
    assert!(stopped.is_ok(), "still pausing after {:?}", stopping.elapsed());
    assert_eq!(reasoner.calls.load(Ordering::SeqCst), 1);
    assert!(producer.decided("p1").await.unwrap().is_none(), "deferred, not decided");
    delete_streams(&producer).await;
}

/// A host that keeps what it is handed to record: the content with the decision.
struct Witness {
    pipeline: Pipeline,
    policies: Vec<Policy>,
    recorded: Mutex<Vec<(Option<String>, CascadeDecision)>>,
}

#[async_trait]
impl WorkerHost for Witness {
    async fn prepare(&self, requested: &[String]) -> Result<(Vec<Policy>, Pipeline), HostError> {
        if let Some(missing) = requested.iter().find(|name| self.policies.iter().all(|p| p.meta.name != **name)) {
            return Err(HostError::NotStored(format!("no policy {missing:?} is stored")));
        }
        Ok((self.policies.clone(), self.pipeline.clone()))
    }

    async fn record(&self, item: SettledItem<'_>) -> Result<(), HostError> {
        let text = item.content.map(|c| safeguard_harmony::judged_text(c).to_string());
        self.recorded.lock().unwrap().push((text, item.decision.clone()));
        Ok(())
    }
}

fn witness(reasoner: Arc<Slow>) -> Arc<Witness> {
    Arc::new(Witness {
        pipeline: Pipeline::new(Classifier::new(reasoner), RoutingConfig::default()),
        policies: vec![Policy::parse(SPAM).unwrap()],
        recorded: Mutex::default(),
    })
}

/// Publishes an event without a `Nats-Msg-Id`, so its key is its `"id"` and the stream's duplicate window (which
/// works on the header) does not drop a second body under that key.
async fn publish_by_id(bus: &Bus, payload: &serde_json::Value) {
    let key = payload["id"].as_str().unwrap();
    let body = serde_json::to_vec(payload).unwrap();
    bus.js.publish(bus.config.content_subject(key), body.into()).await.unwrap().await.unwrap();
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

/// The decisions published for `key`, once each, in the order first seen.
async fn decisions_published(bus: &Bus, key: &str) -> Vec<CascadeDecision> {
    let mut decisions: Vec<CascadeDecision> = Vec::new();
    for event in published(bus).await.remove(key).unwrap_or_default() {
        if let (EventStatus::Decided, Some(decision)) = (event.status, event.decision)
            && decisions.iter().all(|d| d.id != decision.id)
        {
            decisions.push(decision);
        }
    }
    decisions
}

fn reused_key_reason(decision: &CascadeDecision) -> bool {
    decision.policies.iter().all(|route| {
        matches!(route.escalations.last(), Some(Escalation::StageFailed { detail })
            if detail.contains("idempotency key reused with a different body"))
    })
}

/// Item ids are commonly reused when a post is edited. The ledger was keyed by the idempotency key alone: the
/// edited body got the first body's decision again (an `allow` for a sales pitch, never reasoned about), and the
/// host was handed the new content with the old decision, so the stored row's content and verdicts disagreed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_reused_with_a_different_body_is_not_answered_with_the_first_bodys_decision() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL}");
        return;
    }
    let cfg = config();
    let producer = Bus::connect(cfg.clone()).await.unwrap();
    let reasoner = Arc::new(Slow { calls: AtomicUsize::new(0), pause: Duration::ZERO });
    let host = witness(reasoner.clone());
    let (stop, task) = spawn(Worker::with_host(Bus::connect(cfg.clone()).await.unwrap(), host.clone()));
    let benign = json!({"id": "post-1", "text": "see you at lunch"});
    let edited = json!({"id": "post-1", "text": "buy cheap pills"});
    producer.publish_content("post-1", &benign).await.unwrap();
    wait_until_decided(&producer, &["post-1".to_string()], Duration::from_secs(20)).await;
    wait_until_drained(&producer, Duration::from_secs(20)).await;
    let first = producer.decided("post-1").await.unwrap().unwrap().decision.unwrap();
    assert_eq!(serde_json::to_value(first.outcome).unwrap(), "allow");
    // An edit naming a policy the worker does not hold yet is rejected for now, and said so on the subject: its
    // last word was the first body's `allow`, which must not stand for a body nobody judged.
    publish_by_id(&producer, &json!({"id": "post-1", "text": "buy it here", "policies": ["harassment"]})).await;
    wait_until_drained(&producer, Duration::from_secs(20)).await;
    let last = published(&producer).await.remove("post-1").unwrap().pop().unwrap();
    assert_eq!(last.status, EventStatus::Rejected, "{last:?}");
    assert!(last.error.as_deref().unwrap().contains("\"harassment\" is stored"), "{last:?}");
    assert_eq!(reasoner.calls.load(Ordering::SeqCst), 1, "not judged");

    // The edit, under the same key (the item's id).
    publish_by_id(&producer, &edited).await;
    wait_until_drained(&producer, Duration::from_secs(20)).await;
    let decisions = decisions_published(&producer, "post-1").await;
    assert_eq!(decisions.len(), 2, "the edited body got a decision of its own, not the first again: {decisions:?}");
    let second = decisions[1].clone();
    assert_ne!(second.id, first.id);
    assert_eq!(serde_json::to_value(second.outcome).unwrap(), "needs_review", "{second:?}");
    assert_eq!(second.decided_by, safeguard_pipeline::Stage::HumanReview);
    assert!(reused_key_reason(&second), "{:?}", second.policies);
    assert_eq!(reasoner.calls.load(Ordering::SeqCst), 2, "the edited body was reasoned about");
    assert_eq!(producer.decided("post-1").await.unwrap().unwrap().decision.unwrap().id, first.id, "ledger kept");

    // The same bodies again: the benign one gets its one decision (not reasoned again), the edited one the same
    // decision for a person (one per key and body, so the host records it once).
    publish_by_id(&producer, &benign).await;
    wait_until_drained(&producer, Duration::from_secs(20)).await;
    assert_eq!(reasoner.calls.load(Ordering::SeqCst), 2, "the first body was not decided again");
    publish_by_id(&producer, &edited).await;
    wait_until_drained(&producer, Duration::from_secs(20)).await;
    let ids: Vec<uuid::Uuid> = decisions_published(&producer, "post-1").await.iter().map(|d| d.id).collect();
    assert_eq!(ids, [first.id, second.id], "no third decision");
    assert_eq!(reasoner.calls.load(Ordering::SeqCst), 2, "nor was the edit: its decision is the subject's last word");
    // A second edit is a body of its own: a decision of its own, not one the host (idempotent by id) would drop.
    publish_by_id(&producer, &json!({"id": "post-1", "text": "buy them twice"})).await;
    wait_until_drained(&producer, Duration::from_secs(20)).await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;

    let decisions = decisions_published(&producer, "post-1").await;
    assert_eq!(decisions.len(), 3, "{decisions:?}");
    let third = &decisions[2];
    assert!(third.id != first.id && third.id != second.id);
    assert!(reused_key_reason(third), "{:?}", third.policies);
    let recorded = host.recorded.lock().unwrap().clone();
    let texts = |id| -> Vec<Option<String>> {
        recorded.iter().filter(|(_, d)| d.id == id).map(|(text, _)| text.clone()).collect()
    };
    let lunch = Some("see you at lunch".to_string());
    assert_eq!(texts(first.id), [lunch.clone(), lunch], "the first decision, recorded only with its own body");
    let pills = Some("buy cheap pills".to_string());
    assert_eq!(texts(second.id), [pills.clone(), pills], "the edit's decision, with the edit");
    assert_eq!(texts(third.id), [Some("buy them twice".to_string())]);
    let (_, whole) = recorded.iter().find(|(_, d)| d.id == second.id).unwrap();
    let chains: Vec<&String> = whole.reasoning.iter().flat_map(|d| d.reasoning.iter()).collect();
    assert!(chains.iter().any(|c| c.contains("is a sales pitch")), "the person sees the edit judged: {chains:?}");
    delete_streams(&producer).await;
}

/// The same when two bodies under one key race: the worker whose ledger write was refused took the winner's
/// decision for its own body (here an `allow` for a sales pitch) and handed the host its content with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_loses_the_ledger_race_to_another_body_is_not_given_its_decision() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL}");
        return;
    }
    let cfg = config();
    let producer = Bus::connect(cfg.clone()).await.unwrap();
    let reasoner = Arc::new(Slow { calls: AtomicUsize::new(0), pause: Duration::from_millis(1500) });
    let host = witness(reasoner.clone());
    let (stop, task) = spawn(Worker::with_host(Bus::connect(cfg.clone()).await.unwrap(), host.clone()));
    producer.publish_content("lunch", &json!({"id": "lunch", "text": "see you at lunch"})).await.unwrap();
    wait_until_decided(&producer, &["lunch".to_string()], Duration::from_secs(20)).await;
    let winner = producer.decided("lunch").await.unwrap().unwrap();
    let winner_id = winner.decision.as_ref().unwrap().id;

    producer.publish_content("race", &json!({"id": "race", "text": "buy cheap pills"})).await.unwrap();
    wait_for_calls(&reasoner, 2, Duration::from_secs(10)).await;
    // Another worker settles the key for the benign body while this one reasons about the pitch.
    let mut theirs = winner.clone();
    theirs.key = "race".into();
    theirs.item_id = Some("race".into());
    let body = serde_json::to_vec(&theirs).unwrap();
    producer.js.publish(ledger_subject(&cfg, "race"), body.into()).await.unwrap().await.unwrap();
    wait_until_drained(&producer, Duration::from_secs(20)).await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;

    let decisions = decisions_published(&producer, "race").await;
    assert_eq!(decisions.len(), 1, "{decisions:?}");
    let mine = &decisions[0];
    assert_ne!(mine.id, winner_id, "not the other body's decision");
    assert_eq!(serde_json::to_value(mine.outcome).unwrap(), "needs_review", "{mine:?}");
    assert!(reused_key_reason(mine), "{:?}", mine.policies);
    let recorded = host.recorded.lock().unwrap().clone();
    for (text, decision) in &recorded {
        let expected = if decision.id == winner_id { "see you at lunch" } else { "buy cheap pills" };
        assert_eq!(text.as_deref(), Some(expected), "{decision:?}");
    }
    assert!(recorded.iter().any(|(_, d)| d.id == mine.id), "recorded for a person");
    delete_streams(&producer).await;
}

/// A consumer deleted under a running worker (an operator's `nats consumer rm`) made every pull fail at once, in
/// a loop that logged thousands of lines a second and decided nothing while the worker still counted as serving.
/// The worker now stops with an error, for its host to start it again after a pause; started again, it sets the
/// consumer up anew and decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_consumer_is_deleted_stops_instead_of_spinning() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL} (bash scripts/setup.sh starts it)");
        return;
    }
    let cfg = config();
    let bus = Bus::connect(cfg.clone()).await.unwrap();
    let reasoner = Arc::new(Slow { calls: AtomicUsize::new(0), pause: Duration::ZERO });
    let start = |stop: CancellationToken| {
        let reasoner = reasoner.clone();
        let cfg = cfg.clone();
        tokio::spawn(async move { worker(Bus::connect(cfg).await.unwrap(), reasoner, None).run(stop).await })
    };
    let stop = CancellationToken::new();
    let running = start(stop.clone());
    let stream = consumer_set_up(&bus).await;
    stream.delete_consumer(&cfg.consumer).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(20), running).await.expect("stops instead of spinning");
    assert!(ended.unwrap().is_err(), "an error, for the host to start it again");

    let restarted = start(stop.clone());
    bus.publish_content("after", &json!({"id": "after", "text": "see you at lunch"})).await.unwrap();
    wait_until_decided(&bus, &["after".to_string()], Duration::from_secs(20)).await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), restarted).await.unwrap().unwrap().unwrap();
    delete_streams(&bus).await;
}

/// The durable consumer keeps the ack wait of the worker that created it. A worker asked for a longer one kept its
/// events alive at half of its own setting while the server redelivered at the consumer's: a slow item was handed
/// out again mid-decision. It now keeps them alive against the consumer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_keeps_events_alive_against_the_consumers_own_ack_wait() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL} (bash scripts/setup.sh starts it)");
        return;
    }
    let cfg = config();
    let bus = Bus::connect(cfg.clone()).await.unwrap();
    // The first worker creates the consumer with config()'s 1 s ack wait, then stops.
    let stop = CancellationToken::new();
    let quick = Arc::new(Slow { calls: AtomicUsize::new(0), pause: Duration::ZERO });
    let first = worker(Bus::connect(cfg.clone()).await.unwrap(), quick, None);
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { first.run(stop).await }
    });
    consumer_set_up(&bus).await;
    stop.cancel();
    task.await.unwrap().unwrap();

    // Two more ask for ten minutes, and the item takes three seconds: one decides it while the other waits for
    // work, and would be handed the item if the first let it lapse.
    let mut patient = cfg.clone();
    patient.ack_wait = Duration::from_secs(600);
    let slow = Arc::new(Slow { calls: AtomicUsize::new(0), pause: Duration::from_secs(3) });
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let patient = worker(Bus::connect(patient.clone()).await.unwrap(), slow.clone(), None);
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move { patient.run(stop).await }));
    }
    bus.publish_content("slow", &json!({"id": "slow", "text": "see you at lunch"})).await.unwrap();
    wait_until_decided(&bus, &["slow".to_string()], Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(redelivered(&bus).await, 0, "kept alive while it was decided");
    assert_eq!(slow.calls.load(Ordering::SeqCst), 1, "decided once");
    stop.cancel();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    delete_streams(&bus).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_starting_together_all_find_the_streams_one_of_them_created() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL} (bash scripts/setup.sh starts it)");
        return;
    }
    // Each round is a fresh set of streams that sixteen processes find missing at the same moment. NATS 2.9 may
    // refuse a create racing another as overlapping it (about one run in three failed before the retry), which
    // once failed a server whose producer connected as it started.
    for _ in 0..40 {
        let cfg = config();
        let connects: Vec<_> = (0..16).map(|_| tokio::spawn(Bus::connect(cfg.clone()))).collect();
        let mut buses = Vec::new();
        for connect in connects {
            buses.push(connect.await.unwrap().unwrap_or_else(|e| panic!("a worker starting with others: {e}")));
        }
        assert_eq!(buses[0].decided.cached_info().config.name, cfg.decided_stream);
        delete_streams(&buses[0]).await;
    }
}

/// An event with a field the worker does not read, or an `"appeal"` that is not a boolean, is rejected, never
/// decided otherwise than asked: a misspelt `"policy"` would be judged under the default set instead of the one it
/// named, and `"appeal": "true"` under a decided key would be answered with the decision being appealed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_with_fields_the_worker_does_not_read_as_sent_are_rejected() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL} (bash scripts/setup.sh starts it)");
        return;
    }
    let cfg = config();
    let producer = Bus::connect(cfg.clone()).await.unwrap();
    let reasoner = Arc::new(Slow { calls: AtomicUsize::new(0), pause: Duration::from_millis(10) });
    let (stop, task) = spawn(worker(Bus::connect(cfg.clone()).await.unwrap(), reasoner.clone(), None));
    publish_by_id(&producer, &json!({"id": "p1", "text": "see you at lunch"})).await;
    wait_for_event(&producer, "p1", EventStatus::Decided, Duration::from_secs(30)).await;
    publish_by_id(&producer, &json!({"id": "p1", "text": "see you at lunch", "appeal": "true"})).await;
    publish_by_id(&producer, &json!({"id": "p2", "text": "buy cheap pills", "policy": "self-harm"})).await;
    let appeal = wait_for_event(&producer, "p1", EventStatus::Rejected, Duration::from_secs(30)).await;
    assert!(appeal.error.as_deref().is_some_and(|e| e.contains("\"appeal\" must be true or false")), "{appeal:?}");
    let misspelt = wait_for_event(&producer, "p2", EventStatus::Rejected, Duration::from_secs(30)).await;
    assert!(misspelt.error.as_deref().is_some_and(|e| e.contains("\"policy\"")), "{misspelt:?}");
    wait_until_drained(&producer, Duration::from_secs(30)).await;
    assert_eq!(reasoner.calls.load(Ordering::SeqCst), 1, "only p1's first event was reasoned about");
    // The ledger keeps p1's decision, and nothing for the refused event.
    assert_eq!(producer.decided("p1").await.unwrap().map(|e| e.status), Some(EventStatus::Decided));
    assert!(producer.decided("p2").await.unwrap().is_none());
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    delete_streams(&producer).await;
}

/// A rejection for what one worker holds (a policy it does not serve) is not the body's for good: the same body
/// sent again to a worker that serves the policy is decided, not answered from the ledger with the rejection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_for_what_a_worker_holds_is_not_kept_in_the_ledger() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL} (bash scripts/setup.sh starts it)");
        return;
    }
    let cfg = config();
    let producer = Bus::connect(cfg.clone()).await.unwrap();
    let reasoner = Arc::new(Slow { calls: AtomicUsize::new(0), pause: Duration::from_millis(10) });
    let event = json!({"id": "h1", "text": "see you at lunch", "policies": ["hate"]});
    let (stop, task) = spawn(worker(Bus::connect(cfg.clone()).await.unwrap(), reasoner.clone(), None));
    publish_by_id(&producer, &event).await;
    let refused = wait_for_event(&producer, "h1", EventStatus::Rejected, Duration::from_secs(30)).await;
    assert!(refused.error.as_deref().is_some_and(|e| e.contains("does not serve")), "{refused:?}");
    wait_until_drained(&producer, Duration::from_secs(30)).await;
    assert!(producer.decided("h1").await.unwrap().is_none(), "not in the ledger");
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;

    let hate = Policy::parse(&SPAM.replace("spam", "hate").replace("Spam", "Hate")).unwrap();
    let pipeline = Pipeline::new(Classifier::new(reasoner.clone()), RoutingConfig::default());
    let serving_both =
        Worker::new(Bus::connect(cfg.clone()).await.unwrap(), pipeline, vec![Policy::parse(SPAM).unwrap(), hate]);
    let (stop, task) = spawn(serving_both);
    publish_by_id(&producer, &event).await;
    let decided = wait_for_event(&producer, "h1", EventStatus::Decided, Duration::from_secs(30)).await;
    let policies: Vec<&str> = decided.decision.as_ref().unwrap().policies.iter().map(|p| p.policy.as_str()).collect();
    assert_eq!(policies, ["hate"], "{decided:?}");
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    delete_streams(&producer).await;
}

/// A body decided by a worker that stopped before acking it, redelivered to a worker with a lower length limit (a
/// rolling deploy that lowered it), is answered from the ledger: the same body, whatever the limit. It used to be
/// read as another body, rejected over the decision in the ledger, and the decision never recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_decided_under_a_higher_length_limit_is_answered_from_the_ledger_under_a_lower_one() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL} (bash scripts/setup.sh starts it)");
        return;
    }
    let cfg = config();
    let producer = Bus::connect(cfg.clone()).await.unwrap();
    let reasoner = Arc::new(Slow { calls: AtomicUsize::new(0), pause: Duration::from_millis(10) });
    let event = json!({"id": "long1", "text": "see you at lunch tomorrow", "policies": ["spam"]});
    let (stop, task) = spawn(worker(Bus::connect(cfg.clone()).await.unwrap(), reasoner.clone(), None));
    publish_by_id(&producer, &event).await;
    wait_until_drained(&producer, Duration::from_secs(30)).await;
    assert!(producer.decided("long1").await.unwrap().is_some(), "in the ledger");
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    let calls = reasoner.calls.load(Ordering::SeqCst);

    let narrow = worker(Bus::connect(cfg.clone()).await.unwrap(), reasoner.clone(), None)
        .with_limits(ContentLimits { max_chars: 5, max_tokens: None });
    let (stop, task) = spawn(narrow);
    publish_by_id(&producer, &event).await;
    wait_until_drained(&producer, Duration::from_secs(30)).await;
    let said = published(&producer).await.remove("long1").unwrap_or_default();
    assert!(said.iter().all(|e| e.status != EventStatus::Rejected), "{said:?}");
    assert_eq!(said.last().map(|e| e.status), Some(EventStatus::Decided), "{said:?}");
    assert_eq!(reasoner.calls.load(Ordering::SeqCst), calls, "answered from the ledger, not decided again");

    // A new body over the lower limit is still refused there.
    let long = json!({"id": "long2", "text": "see you at lunch tomorrow", "policies": ["spam"]});
    publish_by_id(&producer, &long).await;
    let refused = wait_for_event(&producer, "long2", EventStatus::Rejected, Duration::from_secs(30)).await;
    assert!(refused.error.as_deref().is_some_and(|e| e.contains("the limit is 5")), "{refused:?}");
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    delete_streams(&producer).await;
}

/// A key sent again once its ledger entry aged out (`--retain-days`) is a new item, even though a person's word on
/// the old one, published later, is still the subject's last: a worker that cannot judge it now says so, where it
/// used to take that word for this body's answer and ack the event in silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_sent_again_after_its_ledger_entry_aged_out_hears_its_rejection() {
    if !nats_up() {
        eprintln!("skipped: NATS is not reachable at {URL} (bash scripts/setup.sh starts it)");
        return;
    }
    let cfg = config();
    let producer = Bus::connect(cfg.clone()).await.unwrap();
    let reasoner = Arc::new(Slow { calls: AtomicUsize::new(0), pause: Duration::from_millis(10) });
    let (stop, task) = spawn(worker(Bus::connect(cfg.clone()).await.unwrap(), reasoner.clone(), None));
    consumer_set_up(&producer).await;
    // What outlives the ledger entry: a person's word on the old item's decision.
    let reviewed = json!({"key": "aged1", "item_id": "aged1", "status": "reviewed",
        "review": {"decision_id": "0190a1b2-0000-7000-8000-000000000001", "review_id": "r1", "outcome": "allow",
                   "rule_id": null, "policy_hash": null, "decided_at": null}});
    let subject = cfg.decision_subject(&subject_token("aged1"));
    producer.js.publish(subject, serde_json::to_vec(&reviewed).unwrap().into()).await.unwrap().await.unwrap();
    assert!(producer.decided("aged1").await.unwrap().is_none(), "no ledger entry");
    wait_for_event(&producer, "aged1", EventStatus::Reviewed, Duration::from_secs(5)).await;

    // Names a policy this worker does not serve: rejected for now, whatever the subject said before.
    publish_by_id(&producer, &json!({"id": "aged1", "text": "buy followers now", "policies": ["hate"]})).await;
    let refused = wait_for_event(&producer, "aged1", EventStatus::Rejected, Duration::from_secs(30)).await;
    assert!(refused.error.as_deref().is_some_and(|e| e.contains("does not serve")), "{refused:?}");
    wait_until_drained(&producer, Duration::from_secs(30)).await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    delete_streams(&producer).await;
}

//! The routing rules, item by item, with a reasoner that answers from a script keyed by content and effort.
//! (The same cascade on the real engine with a tiny model is in `tiny_model.rs`.)

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use safeguard_core::{
    Classifier, PromptObserver, PromptTrace, ReasonError, ReasonOutput, ReasonRequest, Reasoner, Usage,
};
use safeguard_harmony::{Content, Effort};
use safeguard_pipeline::{
    Escalation, OnTriageViolation, Pipeline, ReasoningBudget, RouteContext, RoutingConfig, Stage,
};
use safeguard_policy::Policy;
use safeguard_triage::rules::{KeywordList, RuleAction};
use safeguard_triage::train::Example;
use safeguard_triage::{RuleSet, RulesConfig, Triage};
use safeguard_verdict::Outcome;

const SPAM: &str = "---\nname: spam\noutput: binary\n---\n# Spam Policy (SP)\n\n## INSTRUCTIONS\nReturn exactly one character: 0 or 1.\n\n## VIOLATES (1)\n- SP1.a Cold promotion with links.\n\n## SAFE (0)\n- SP0.a Personal messages.\n\nReturn exactly one character: 0 or 1.";

/// Answers by content: the text names what each effort should say, e.g. "low=junk high=1", optionally with
/// the answer token's probability ("high=1@0.3"; 0.9 otherwise).
struct Scripted {
    calls: Mutex<Vec<(String, Effort)>>,
    delay: Option<Duration>,
}

#[async_trait]
impl Reasoner for Scripted {
    fn model_id(&self) -> String {
        "scripted".into()
    }

    async fn reason(&self, req: ReasonRequest) -> Result<ReasonOutput, ReasonError> {
        let text = safeguard_harmony::user_message_text(&req.content);
        self.calls.lock().unwrap().push((text.clone(), req.effort));
        if let Some(delay) = self.delay {
            tokio::time::sleep(delay).await;
        }
        let key = format!("{}=", req.effort);
        let answer = text.split_whitespace().find_map(|w| w.strip_prefix(&key)).unwrap_or("junk");
        if answer == "fail" {
            return Err(ReasonError::Backend("503 from the scripted backend".into()));
        }
        let (answer, probability) = match answer.split_once('@') {
            Some((answer, probability)) => (answer, probability.parse().unwrap()),
            None => (answer, 0.9),
        };
        Ok(ReasonOutput {
            final_text: Some(answer.to_string()),
            final_token_prob: Some(probability),
            // 100 billed tokens a call: 40 of the 80 prompt tokens came from the cache.
            usage: Usage { prompt_tokens: 80, cached_prompt_tokens: 40, completion_tokens: 60 },
            ..ReasonOutput::default()
        })
    }
}

fn spam() -> Policy {
    Policy::parse(SPAM).unwrap()
}

fn triage() -> Arc<Triage> {
    let rules = RulesConfig {
        keywords: vec![
            KeywordList { name: "spam-phrases".into(), action: RuleAction::Deny, keywords: vec!["join now".into()] },
            KeywordList { name: "greetings".into(), action: RuleAction::Allow, keywords: vec!["hi mom".into()] },
        ],
        ..RulesConfig::default()
    };
    Arc::new(Triage::new(Some(RuleSet::compile(&rules).unwrap()), None))
}

fn build(config: RoutingConfig, delay: Option<Duration>) -> (Pipeline, Arc<Scripted>) {
    let reasoner = Arc::new(Scripted { calls: Mutex::default(), delay });
    let policy = spam();
    let pipeline =
        Pipeline::new(Classifier::new(reasoner.clone()), config).with_triage(policy.hash.to_string(), triage());
    (pipeline, reasoner)
}

async fn route(pipeline: &Pipeline, text: &str) -> safeguard_pipeline::CascadeDecision {
    pipeline.decide(&[spam()], &Content::text(text), &RouteContext::default()).await.unwrap()
}

#[tokio::test]
async fn each_item_lands_in_the_stage_the_rules_say() {
    let (pipeline, reasoner) = build(RoutingConfig::default(), None);

    let deny = route(&pipeline, "JOIN NOW for free coins").await;
    assert_eq!((deny.decided_by, deny.outcome), (Stage::Triage, Outcome::Violation));
    let allow = route(&pipeline, "hi mom, see you sunday").await;
    assert_eq!((allow.decided_by, allow.outcome), (Stage::Triage, Outcome::Allow));
    assert!(reasoner.calls.lock().unwrap().is_empty(), "triage settled both without the model");

    let low = route(&pipeline, "a coupon low=0").await;
    assert_eq!((low.decided_by, low.outcome), (Stage::ReasoningLow, Outcome::Allow));

    let high = route(&pipeline, "a coupon low=junk high=1").await;
    assert_eq!((high.decided_by, high.outcome), (Stage::ReasoningHigh, Outcome::Violation));
    assert!(matches!(high.policies[0].escalations.last(), Some(Escalation::NeedsReview { .. })));
    assert_eq!(
        high.stages.iter().map(|s| s.stage).collect::<Vec<_>>(),
        vec![Stage::Triage, Stage::ReasoningLow, Stage::ReasoningHigh]
    );

    let person = route(&pipeline, "a coupon low=junk high=junk").await;
    assert_eq!((person.decided_by, person.outcome), (Stage::HumanReview, Outcome::NeedsReview));

    // The model asks for a person: more effort does not answer in their place.
    let asked = route(&pipeline, "a coupon low=ESCALATE high=0").await;
    assert_eq!((asked.decided_by, asked.outcome), (Stage::HumanReview, Outcome::NeedsReview));
    assert!(
        matches!(asked.policies[0].escalations.last(), Some(Escalation::NeedsReview { flags }) if flags.iter().any(|f| f == "escalated")),
        "{:?}",
        asked.policies[0].escalations
    );

    let efforts: Vec<Effort> = reasoner.calls.lock().unwrap().iter().map(|c| c.1).collect();
    assert_eq!(efforts, vec![Effort::Low, Effort::Low, Effort::High, Effort::Low, Effort::High, Effort::Low]);
}

/// Triage judges the part the verdict is about, as it was trained: a deny phrase in the context (the prompt of a
/// response, earlier messages) does not flag an innocent reply, and one in the reply does.
#[tokio::test]
async fn triage_reads_only_the_judged_part_of_the_content() {
    let (pipeline, _) = build(RoutingConfig::default(), None);
    let decide = |content: Content| {
        let pipeline = &pipeline;
        async move { pipeline.decide(&[spam()], &content, &RouteContext::default()).await.unwrap() }
    };
    let reply =
        Content::Response { prompt: Some("JOIN NOW for free coins".into()), response: "No thanks. low=0".into() };
    assert_eq!(decide(reply).await.decided_by, Stage::ReasoningLow, "the prompt's deny phrase flagged the reply");
    let spam_reply = Content::Response { prompt: Some("what's new?".into()), response: "JOIN NOW for coins".into() };
    assert_eq!(decide(spam_reply).await.decided_by, Stage::Triage);
    let chat = Content::Conversation {
        messages: vec![
            safeguard_harmony::ChatMessage::new("user", "JOIN NOW for free coins"),
            safeguard_harmony::ChatMessage::new("user", "hi mom, see you sunday"),
        ],
    };
    let settled = decide(chat).await;
    assert_eq!((settled.decided_by, settled.outcome), (Stage::Triage, Outcome::Allow));
}

#[tokio::test]
async fn appeals_go_high_then_to_a_person_whatever_the_model_says() {
    let (pipeline, reasoner) = build(RoutingConfig::default(), None);
    let ctx = RouteContext { appeal: true, ..RouteContext::default() };
    let d = pipeline.decide(&[spam()], &Content::text("JOIN NOW high=0"), &ctx).await.unwrap();
    assert_eq!((d.decided_by, d.outcome), (Stage::HumanReview, Outcome::NeedsReview));
    assert_eq!(
        d.policies[0].verdict.as_ref().unwrap().outcome,
        Outcome::Allow,
        "the model's view is kept for the reviewer"
    );
    assert_eq!(reasoner.calls.lock().unwrap().iter().map(|c| c.1).collect::<Vec<_>>(), vec![Effort::High]);
}

#[tokio::test]
async fn high_risk_policies_start_high_and_never_take_triage_benign() {
    let reasoner = Arc::new(Scripted { calls: Mutex::default(), delay: None });
    let risky = Policy::parse(&SPAM.replace("name: spam", "name: spam\nhigh_risk: true")).unwrap();
    let pipeline = Pipeline::new(Classifier::new(reasoner.clone()), RoutingConfig::default())
        .with_triage(risky.hash.to_string(), triage());
    let d = pipeline.decide(&[risky], &Content::text("hi mom high=0"), &RouteContext::default()).await.unwrap();
    assert_eq!((d.decided_by, d.outcome), (Stage::ReasoningHigh, Outcome::Allow));
    assert_eq!(reasoner.calls.lock().unwrap()[0].1, Effort::High);
}

#[tokio::test]
async fn triage_violations_can_be_confirmed_or_reviewed_instead_of_acted_on() {
    let config = RoutingConfig { on_triage_violation: OnTriageViolation::Confirm, ..RoutingConfig::default() };
    let (pipeline, _) = build(config, None);
    let d = route(&pipeline, "JOIN NOW low=1").await;
    assert_eq!((d.decided_by, d.outcome), (Stage::ReasoningLow, Outcome::Violation));

    let config = RoutingConfig { on_triage_violation: OnTriageViolation::Review, ..RoutingConfig::default() };
    let (pipeline, reasoner) = build(config, None);
    let d = route(&pipeline, "JOIN NOW low=1").await;
    assert_eq!((d.decided_by, d.outcome), (Stage::HumanReview, Outcome::NeedsReview));
    assert!(reasoner.calls.lock().unwrap().is_empty());
}

/// A model that disputes a deny rule it was asked to confirm is asked again at high effort before its answer
/// stands, like any disagreement with triage.
#[tokio::test]
async fn a_model_that_disputes_a_deny_rule_is_asked_again_at_high_effort() {
    let config = RoutingConfig { on_triage_violation: OnTriageViolation::Confirm, ..RoutingConfig::default() };
    let (pipeline, reasoner) = build(config, None);
    let d = route(&pipeline, "JOIN NOW low=0 high=0").await;
    assert_eq!((d.decided_by, d.outcome), (Stage::ReasoningHigh, Outcome::Allow));
    assert!(
        matches!(d.policies[0].escalations.last(), Some(Escalation::TriageDisagrees { triage_probability }) if *triage_probability == 1.0),
        "{:?}",
        d.policies[0].escalations
    );
    let d = route(&pipeline, "JOIN NOW low=1").await;
    assert_eq!((d.decided_by, d.outcome), (Stage::ReasoningLow, Outcome::Violation), "agreement settles at low");
    let efforts: Vec<Effort> = reasoner.calls.lock().unwrap().iter().map(|c| c.1).collect();
    assert_eq!(efforts, vec![Effort::Low, Effort::High, Effort::Low]);
}

/// High effort is the last the model is asked at: an answer it is still unsure of there goes to a person, for
/// escalated items and for high-risk policies that start there.
#[tokio::test]
async fn an_answer_still_unsure_at_high_effort_goes_to_a_person() {
    let (pipeline, _) = build(RoutingConfig::default(), None);
    let unsure = route(&pipeline, "a coupon low=1@0.3 high=1@0.4").await;
    assert_eq!((unsure.decided_by, unsure.outcome), (Stage::HumanReview, Outcome::NeedsReview));
    let escalations = &unsure.policies[0].escalations;
    assert!(
        matches!(escalations.as_slice(), [.., Escalation::LowEngineConfidence { .. }, Escalation::LowEngineConfidence { probability }] if (*probability - 0.4).abs() < 1e-6),
        "{escalations:?}"
    );
    assert_eq!(unsure.policies[0].verdict.as_ref().unwrap().outcome, Outcome::Violation, "kept for the reviewer");
    let sure = route(&pipeline, "a coupon low=1@0.3 high=1@0.8").await;
    assert_eq!((sure.decided_by, sure.outcome), (Stage::ReasoningHigh, Outcome::Violation));

    let reasoner = Arc::new(Scripted { calls: Mutex::default(), delay: None });
    let risky = Policy::parse(&SPAM.replace("name: spam", "name: spam\nhigh_risk: true")).unwrap();
    let pipeline = Pipeline::new(Classifier::new(reasoner), RoutingConfig::default());
    let d = pipeline.decide(&[risky], &Content::text("a coupon high=0@0.2"), &RouteContext::default()).await.unwrap();
    assert_eq!((d.decided_by, d.outcome), (Stage::HumanReview, Outcome::NeedsReview));
}

/// A policy's own `triage: {on_violation: …}` overrides the configured default, for that policy only: the same
/// rules and body act on triage's word under one policy and ask a person under its stricter twin.
#[tokio::test]
async fn a_policy_can_choose_what_a_triage_violation_does() {
    let reasoner = Arc::new(Scripted { calls: Mutex::default(), delay: None });
    let acting = spam();
    let reviewing =
        Policy::parse(&SPAM.replace("name: spam", "name: spam-reviewed\ntriage:\n  on_violation: review")).unwrap();
    assert_eq!(acting.hash, reviewing.hash, "front matter is not part of the version");
    let pipeline = Pipeline::new(Classifier::new(reasoner.clone()), RoutingConfig::default())
        .with_triage(acting.hash.to_string(), triage());

    let d = pipeline
        .decide(std::slice::from_ref(&acting), &Content::text("JOIN NOW"), &RouteContext::default())
        .await
        .unwrap();
    assert_eq!((d.decided_by, d.outcome), (Stage::Triage, Outcome::Violation));
    let d = pipeline
        .decide(std::slice::from_ref(&reviewing), &Content::text("JOIN NOW"), &RouteContext::default())
        .await
        .unwrap();
    assert_eq!((d.decided_by, d.outcome), (Stage::HumanReview, Outcome::NeedsReview));
    assert!(matches!(d.policies[0].escalations.last(), Some(Escalation::TriageViolationToReview)));

    // The server may default to confirming; a policy that says "act" still acts.
    let acting_always =
        Policy::parse(&SPAM.replace("name: spam", "name: spam-acting\ntriage:\n  on_violation: act")).unwrap();
    let config = RoutingConfig { on_triage_violation: OnTriageViolation::Confirm, ..RoutingConfig::default() };
    let pipeline =
        Pipeline::new(Classifier::new(reasoner.clone()), config).with_triage(acting.hash.to_string(), triage());
    let d = pipeline.decide(&[acting_always], &Content::text("JOIN NOW"), &RouteContext::default()).await.unwrap();
    assert_eq!((d.decided_by, d.outcome), (Stage::Triage, Outcome::Violation));
    let d = pipeline.decide(&[acting], &Content::text("JOIN NOW low=1"), &RouteContext::default()).await.unwrap();
    assert_eq!((d.decided_by, d.outcome), (Stage::ReasoningLow, Outcome::Violation));
    assert_eq!(reasoner.calls.lock().unwrap().len(), 1, "only the confirming policy asked the model");
}

/// A policy's `routing:` front matter sets its own efforts and thresholds, beside policies on the server's: in one
/// item, a bulk policy settles at low effort while a careful one starts at medium and wants a surer answer.
#[tokio::test]
async fn a_policy_routes_with_its_own_efforts_and_thresholds() {
    let reasoner = Arc::new(Scripted { calls: Mutex::default(), delay: None });
    let careful = Policy::parse(
        &SPAM
            .replace("name: spam", "name: careful\nrouting:\n  first_effort: medium\n  min_engine_confidence: 0.8")
            .replace("# Spam Policy", "# Careful Spam Policy"),
    )
    .unwrap();
    let bulk = spam();
    let policies = [bulk.clone(), careful.clone()];
    let pipeline = Pipeline::new(Classifier::new(reasoner.clone()), RoutingConfig::default());
    let plan = pipeline.config().plan_for(&careful);
    assert_eq!(
        (plan.first_effort, plan.escalation_effort, plan.min_engine_confidence),
        (Effort::Medium, Effort::High, 0.8)
    );

    let d = pipeline
        .decide(&policies, &Content::text("a coupon low=1@0.7 medium=1@0.75 high=1@0.9"), &RouteContext::default())
        .await
        .unwrap();
    let stages: Vec<Stage> = d.policies.iter().map(|r| r.decided_by).collect();
    assert_eq!(
        stages,
        vec![Stage::ReasoningLow, Stage::ReasoningHigh],
        "0.7 is sure enough for one policy, not the other"
    );
    assert!(matches!(d.policies[1].escalations.last(), Some(Escalation::LowEngineConfidence { .. })));
    assert_eq!(
        d.stages.iter().map(|s| s.stage).collect::<Vec<_>>(),
        vec![Stage::ReasoningLow, Stage::ReasoningMedium, Stage::ReasoningHigh]
    );
    let efforts: Vec<Effort> = reasoner.calls.lock().unwrap().drain(..).map(|c| c.1).collect();
    assert_eq!(efforts, vec![Effort::Low, Effort::Medium, Effort::High]);

    // 0.79 at its last effort is still unsure for the careful policy: a person decides.
    let d = pipeline
        .decide(&policies, &Content::text("a coupon low=1@0.7 medium=1@0.75 high=1@0.79"), &RouteContext::default())
        .await
        .unwrap();
    assert_eq!((d.policies[0].decided_by, d.policies[1].decided_by), (Stage::ReasoningLow, Stage::HumanReview));
    assert_eq!(d.outcome, Outcome::NeedsReview);
    reasoner.calls.lock().unwrap().clear();

    // A policy that never needs high effort escalates to medium, and that is its last effort before a person;
    // an appeal still gets high effort.
    let cheap =
        Policy::parse(&SPAM.replace("name: spam", "name: cheap\nrouting:\n  escalation_effort: medium")).unwrap();
    let d = pipeline
        .decide(std::slice::from_ref(&cheap), &Content::text("x low=junk medium=0"), &RouteContext::default())
        .await
        .unwrap();
    assert_eq!((d.decided_by, d.outcome), (Stage::ReasoningMedium, Outcome::Allow));
    let d = pipeline
        .decide(std::slice::from_ref(&cheap), &Content::text("x low=junk medium=junk high=0"), &RouteContext::default())
        .await
        .unwrap();
    assert_eq!((d.decided_by, d.outcome), (Stage::HumanReview, Outcome::NeedsReview), "no high step for it");
    let appeal = RouteContext { appeal: true, ..RouteContext::default() };
    pipeline.decide(std::slice::from_ref(&cheap), &Content::text("x high=0"), &appeal).await.unwrap();
    let efforts: Vec<Effort> = reasoner.calls.lock().unwrap().drain(..).map(|c| c.1).collect();
    assert_eq!(efforts, vec![Effort::Low, Effort::Medium, Effort::Low, Effort::Medium, Effort::High]);

    // A policy may trust the model over triage: no second opinion when they disagree.
    let trusting = Policy::parse(&SPAM.replace(
        "name: spam",
        "name: trusting\ntriage:\n  on_violation: confirm\nrouting:\n  escalate_on_triage_disagreement: false",
    ))
    .unwrap();
    let pipeline = Pipeline::new(Classifier::new(reasoner.clone()), RoutingConfig::default())
        .with_triage(trusting.hash.to_string(), triage());
    let d = pipeline.decide(&[trusting], &Content::text("JOIN NOW low=0"), &RouteContext::default()).await.unwrap();
    assert_eq!((d.decided_by, d.outcome), (Stage::ReasoningLow, Outcome::Allow));

    // A section that cannot be read (the server refuses such policies) gets the careful route.
    let unreadable =
        Policy::parse(&SPAM.replace("name: spam", "name: odd\nrouting:\n  first_effort: extreme")).unwrap();
    assert_eq!(pipeline.config().plan_for(&unreadable).first_effort, Effort::High);
    // One that reads but fails a check (stored before the check existed) keeps what its author asked for.
    let stricter =
        Policy::parse(&SPAM.replace(
            "name: spam",
            "name: older\nrouting:\n  min_engine_confidence: 0.9\n  high_risk_categories: [XX9]",
        ))
        .unwrap();
    let plan = pipeline.config().plan_for(&stricter);
    assert_eq!((plan.first_effort, plan.min_engine_confidence), (Effort::High, 0.9));
    assert_eq!(plan.high_risk_categories, ["XX9"]);
}

/// A violation under one of a policy's `high_risk_categories`, found at low effort, is asked again at high effort
/// before it stands; a violation under another tier settles at low.
#[tokio::test]
async fn a_high_risk_category_found_at_low_effort_is_asked_again_at_high() {
    const TIERED: &str = "---\nname: tiered\noutput: json\nrouting:\n  high_risk_categories: [SP2]\n---\n# Tiered Spam Policy (SP)\n\n## INSTRUCTIONS\nReturn one JSON object: {\"violation\": 0|1, \"policy_category\": \"SP1\"|\"SP2\"|null, \"rule_ids\": [...]}.\n\n## VIOLATES\n- SP1.a Cold promotion with links.\n- SP2.a Scams that take money.\n\n## SAFE\n- SP0.a Personal messages.";
    let reasoner = Arc::new(Scripted { calls: Mutex::default(), delay: None });
    let tiered = Policy::parse(TIERED).unwrap();
    let pipeline = Pipeline::new(Classifier::new(reasoner.clone()), RoutingConfig::default());
    let answer = |tier: &str| format!(r#"{{"violation":1,"policy_category":"{tier}","rule_ids":["{tier}.a"]}}"#);
    let decide = |text: String| {
        let (pipeline, tiered) = (&pipeline, &tiered);
        async move {
            pipeline.decide(std::slice::from_ref(tiered), &Content::text(text), &RouteContext::default()).await.unwrap()
        }
    };

    let promotion = decide(format!("x low={}", answer("SP1"))).await;
    assert_eq!((promotion.decided_by, promotion.outcome), (Stage::ReasoningLow, Outcome::Violation));
    let scam = decide(format!("x low={} high={}", answer("SP2"), answer("SP2"))).await;
    assert_eq!((scam.decided_by, scam.outcome), (Stage::ReasoningHigh, Outcome::Violation));
    assert!(
        matches!(scam.policies[0].escalations.last(), Some(Escalation::HighRiskCategory { cited }) if cited.contains(&"SP2.a".to_string())),
        "{:?}",
        scam.policies[0].escalations
    );
    let cleared =
        decide(format!(r#"x low={} high={{"violation":0,"policy_category":null,"rule_ids":[]}}"#, answer("SP2"))).await;
    assert_eq!(
        (cleared.decided_by, cleared.outcome),
        (Stage::ReasoningHigh, Outcome::Allow),
        "high effort has the last word"
    );
    let efforts: Vec<Effort> = reasoner.calls.lock().unwrap().iter().map(|c| c.1).collect();
    assert_eq!(efforts, vec![Effort::Low, Effort::Low, Effort::High, Effort::Low, Effort::High]);
}

/// Content a triage `flag` rule matched is what the policy's author asked the model to look at closely: it starts
/// at the escalation effort, unless the policy sets `flagged_effort`.
#[tokio::test]
async fn flagged_content_starts_at_high_effort_unless_the_policy_says() {
    let flagging = || {
        let rules = RulesConfig {
            keywords: vec![KeywordList {
                name: "money".into(),
                action: RuleAction::Flag,
                keywords: vec!["wire transfer".into()],
            }],
            ..RulesConfig::default()
        };
        Arc::new(Triage::new(Some(RuleSet::compile(&rules).unwrap()), None))
    };
    let reasoner = Arc::new(Scripted { calls: Mutex::default(), delay: None });
    let policy = spam();
    let relaxed =
        Policy::parse(&SPAM.replace("name: spam", "name: relaxed\nrouting:\n  flagged_effort: medium")).unwrap();
    let pipeline = Pipeline::new(Classifier::new(reasoner.clone()), RoutingConfig::default())
        .with_triage(policy.hash.to_string(), flagging());

    let d = pipeline
        .decide(std::slice::from_ref(&policy), &Content::text("a wire transfer high=1"), &RouteContext::default())
        .await
        .unwrap();
    assert_eq!((d.decided_by, d.outcome), (Stage::ReasoningHigh, Outcome::Violation));
    assert!(
        matches!(d.policies[0].escalations.first(), Some(Escalation::TriageFlagged { rules }) if rules[0].starts_with("money")),
        "{:?}",
        d.policies[0].escalations
    );
    let d = pipeline
        .decide(std::slice::from_ref(&policy), &Content::text("lunch at noon low=0"), &RouteContext::default())
        .await
        .unwrap();
    assert_eq!(d.decided_by, Stage::ReasoningLow, "unflagged content starts low");
    let d = pipeline
        .decide(&[relaxed], &Content::text("a wire transfer medium=0"), &RouteContext::default())
        .await
        .unwrap();
    assert_eq!((d.decided_by, d.outcome), (Stage::ReasoningMedium, Outcome::Allow));
    let efforts: Vec<Effort> = reasoner.calls.lock().unwrap().drain(..).map(|c| c.1).collect();
    assert_eq!(efforts, vec![Effort::High, Effort::Low, Effort::Medium]);

    // Flagged content that a deny rule also matched, sent to the model to confirm, gets the flagged effort too.
    let both = RulesConfig {
        keywords: vec![
            KeywordList { name: "money".into(), action: RuleAction::Flag, keywords: vec!["wire transfer".into()] },
            KeywordList { name: "spam-phrases".into(), action: RuleAction::Deny, keywords: vec!["join now".into()] },
        ],
        ..RulesConfig::default()
    };
    let config = RoutingConfig { on_triage_violation: OnTriageViolation::Confirm, ..RoutingConfig::default() };
    let pipeline = Pipeline::new(Classifier::new(reasoner.clone()), config)
        .with_triage(policy.hash.to_string(), Arc::new(Triage::new(Some(RuleSet::compile(&both).unwrap()), None)));
    let d = pipeline
        .decide(&[policy], &Content::text("join now by wire transfer high=1"), &RouteContext::default())
        .await
        .unwrap();
    assert_eq!((d.decided_by, d.outcome), (Stage::ReasoningHigh, Outcome::Violation));
    assert!(matches!(d.policies[0].escalations.first(), Some(Escalation::TriageViolationToConfirm)));
}

#[tokio::test]
async fn over_budget_items_are_deferred_not_dropped_or_allowed() {
    let budget = Arc::new(ReasoningBudget::new(0.5, 1));
    let (pipeline, _) = build(RoutingConfig::default(), None);
    let pipeline = pipeline.with_budget(budget);
    assert!(pipeline.decide(&[spam()], &Content::text("x low=0"), &RouteContext::default()).await.is_ok());
    let deferred = pipeline.decide(&[spam()], &Content::text("y low=0"), &RouteContext::default()).await.unwrap_err();
    assert!(deferred.retry_after > Duration::ZERO);
    // Triage-settled items need no budget.
    assert!(pipeline.decide(&[spam()], &Content::text("hi mom"), &RouteContext::default()).await.is_ok());
}

/// An item whose first answer needs the escalation effort is finished, not deferred, when the budget runs out
/// between its stages: deferring would throw away the answer already paid for. The next item waits instead.
#[tokio::test]
async fn an_escalation_is_never_deferred_and_the_next_item_waits_for_it() {
    let budget = Arc::new(ReasoningBudget::new(0.5, 1));
    let (pipeline, reasoner) = build(RoutingConfig::default(), None);
    let pipeline = pipeline.with_budget(budget);
    let d = route(&pipeline, "a coupon low=junk high=1").await;
    assert_eq!((d.decided_by, d.outcome), (Stage::ReasoningHigh, Outcome::Violation));
    assert_eq!(reasoner.calls.lock().unwrap().len(), 2);
    let deferred = pipeline.decide(&[spam()], &Content::text("y low=0"), &RouteContext::default()).await.unwrap_err();
    assert!(deferred.retry_after > Duration::from_secs(3), "the escalation's call is owed: {:?}", deferred.retry_after);
}

/// The token budget: a step pays the tokens it used (uncached prompt + completion) after it ran, and a new item
/// waits while that leaves the bucket in debt; triage-settled items spend nothing.
#[tokio::test]
async fn a_token_budget_holds_items_back_after_an_expensive_one() {
    let (pipeline, _) = build(RoutingConfig::default(), None);
    let pipeline = pipeline.with_token_budget(Arc::new(ReasoningBudget::new(50.0, 50)));
    let first = pipeline.decide(&[spam()], &Content::text("x low=0"), &RouteContext::default()).await.unwrap();
    assert_eq!(first.usage.completion_tokens, 60);
    let deferred = pipeline.decide(&[spam()], &Content::text("y low=0"), &RouteContext::default()).await.unwrap_err();
    // 100 tokens spent from a bucket of 50 at 50 a second: a second of debt.
    assert!(deferred.retry_after > Duration::from_millis(900), "{:?}", deferred.retry_after);
    assert!(pipeline.decide(&[spam()], &Content::text("hi mom"), &RouteContext::default()).await.is_ok());
}

/// A failed step reports no usage, yet it is paid for at its completion cap, as on every direct path: a backend
/// that fails is not asked again at full rate, and a timed-out prompt may still be decoding.
#[tokio::test]
async fn a_failed_step_is_charged_its_completion_cap() {
    let config = RoutingConfig { max_tokens: Some(150), ..RoutingConfig::default() };
    let (pipeline, reasoner) = build(config, None);
    let pipeline = pipeline.with_token_budget(Arc::new(ReasoningBudget::new(100.0, 100)));
    let failed = route(&pipeline, "x low=fail high=fail").await;
    assert_eq!((failed.decided_by, failed.outcome), (Stage::HumanReview, Outcome::NeedsReview));
    assert_eq!(reasoner.calls.lock().unwrap().len(), 2, "low failed, high failed");
    assert_eq!(failed.usage.completion_tokens, 0, "nothing was reported");
    // Two failed prompts at 150 each from a bucket of 100 at 100 a second: two seconds of debt.
    let deferred = pipeline.decide(&[spam()], &Content::text("y low=0"), &RouteContext::default()).await.unwrap_err();
    assert!(deferred.retry_after > Duration::from_millis(1900), "{:?}", deferred.retry_after);
}

/// A request whose client hangs up is dropped mid-step, but the engine may go on decoding: the step is paid at
/// its completion cap all the same, so hanging up cannot dodge the token budget.
#[tokio::test]
async fn a_step_dropped_midway_is_still_paid_for() {
    let config = RoutingConfig { max_tokens: Some(300), ..RoutingConfig::default() };
    let (pipeline, reasoner) = build(config, Some(Duration::from_millis(500)));
    let pipeline = pipeline.with_token_budget(Arc::new(ReasoningBudget::new(100.0, 100)));
    let hung_up = tokio::time::timeout(Duration::from_millis(50), route(&pipeline, "x low=0")).await;
    assert!(hung_up.is_err(), "the step was still running when it was dropped");
    assert_eq!(reasoner.calls.lock().unwrap().len(), 1);
    let deferred = pipeline.decide(&[spam()], &Content::text("y low=0"), &RouteContext::default()).await.unwrap_err();
    assert!(deferred.retry_after > Duration::from_millis(1500), "{:?}", deferred.retry_after);
}

/// Without a cap of the pipeline's own, a dropped step pays the reasoner's cap for its effort (not nothing).
#[tokio::test]
async fn a_step_dropped_midway_pays_the_reasoners_cap_when_none_is_set() {
    let (pipeline, reasoner) = build(RoutingConfig::default(), Some(Duration::from_millis(500)));
    let pipeline = pipeline.with_token_budget(Arc::new(ReasoningBudget::new(100.0, 100)));
    let hung_up = tokio::time::timeout(Duration::from_millis(50), route(&pipeline, "x low=0")).await;
    assert!(hung_up.is_err(), "the step was still running when it was dropped");
    assert_eq!(reasoner.calls.lock().unwrap().len(), 1);
    let deferred = pipeline.decide(&[spam()], &Content::text("y low=0"), &RouteContext::default()).await.unwrap_err();
    // The scripted reasoner keeps the default caps: 1,024 tokens at low effort, about 9 s of this budget.
    assert!(deferred.retry_after > Duration::from_secs(8), "{:?}", deferred.retry_after);
}

/// Every prompt the classifier's observer was shown, with its effort.
#[derive(Default)]
struct Seen(Mutex<Vec<(Effort, PromptTrace)>>);

impl PromptObserver for Seen {
    fn observe(&self, effort: Effort, prompt: &PromptTrace) {
        self.0.lock().unwrap().push((effort, prompt.clone()));
    }
}

#[tokio::test]
async fn a_stage_that_times_out_escalates_and_ends_with_a_person() {
    let config = RoutingConfig { stage_timeout: Some(Duration::from_millis(20)), ..RoutingConfig::default() };
    let reasoner = Arc::new(Scripted { calls: Mutex::default(), delay: Some(Duration::from_millis(200)) });
    let seen = Arc::new(Seen::default());
    let classifier = Classifier::new(reasoner.clone()).with_observer(seen.clone());
    let pipeline = Pipeline::new(classifier, config).with_triage(spam().hash.to_string(), triage());
    let d = route(&pipeline, "slow low=0 high=0").await;
    assert_eq!((d.decided_by, d.outcome), (Stage::HumanReview, Outcome::NeedsReview));
    assert_eq!(reasoner.calls.lock().unwrap().len(), 2, "low timed out, high timed out");
    let rationale = d.policies[0].verdict.as_ref().and_then(|v| v.rationale.clone()).unwrap_or_default();
    assert!(rationale.contains("timed out"), "{rationale}");
    // Recorded as failed stages, not as an unsure model: each step left for its timeout.
    let failed: Vec<&Escalation> = d.policies[0]
        .escalations
        .iter()
        .filter(|e| matches!(e, Escalation::StageFailed { detail } if detail.contains("timed out")))
        .collect();
    assert_eq!(failed.len(), 2, "{:?}", d.policies[0].escalations);
    // The prompts given up on still count (as failed), where cost and latency are counted per policy and effort.
    let seen = seen.0.lock().unwrap();
    let efforts: Vec<Effort> = seen.iter().map(|(effort, _)| *effort).collect();
    assert_eq!(efforts, [Effort::Low, Effort::High]);
    for (_, prompt) in seen.iter() {
        assert_eq!(prompt.policies, ["spam"]);
        assert!(prompt.error.as_deref().is_some_and(|e| e.contains("timed out")), "{prompt:?}");
    }
}

/// Personal messages and cold promotions, each also in a "Hey, …" lower-case variant: enough for a triage model.
fn spam_examples() -> Vec<Example> {
    let personal = [
        "Happy birthday grandma, we miss you and will call tonight.",
        "Can you pick up the kids from school at four?",
        "Thanks for dinner yesterday, the lasagna was amazing.",
        "Are we still meeting for coffee on Saturday morning?",
        "I left my keys on the kitchen table, can you check?",
        "Good luck on your exam tomorrow, you will do great.",
        "The dog needs to go to the vet next Tuesday.",
        "Let me know when your flight lands so I can drive over.",
    ];
    let promotions = [
        "BUY cheap designer watches now, 90% off, visit our shop today!",
        "Limited offer: earn $5000 a week from home, click the link to join.",
        "Win a free iPhone! Claim your prize at our website before midnight.",
        "Lowest prices on pills, no prescription needed, order online now.",
        "Exclusive casino bonus: deposit today and get 200 free spins.",
        "Get rich fast with this crypto signal group, subscribe now.",
        "Hot singles in your area, sign up free on our dating site.",
        "Flash sale on sneakers, use code SAVE50 at checkout today only.",
    ];
    let mut examples = Vec::new();
    for (texts, violates) in [(&personal, false), (&promotions, true)] {
        for text in texts.iter() {
            examples.push(Example { text: text.to_string(), violates, weight: 1.0, source: 0 });
            examples.push(Example { text: format!("Hey, {}", text.to_lowercase()), violates, weight: 1.0, source: 0 });
        }
    }
    examples
}

/// A triage whose model was trained for an older wording of the policy is not trusted with allowing: its allow
/// rules skip nothing (the model was meant to check them), and its deny rules still act.
#[tokio::test]
async fn a_triage_model_for_another_policy_version_allows_nothing() {
    use safeguard_triage::{FeatureConfig, FitOptions, fit};

    let options = FitOptions {
        features: FeatureConfig { hash_bits: 12, ..FeatureConfig::default() },
        folds: 3,
        target_recall: 0.9,
        min_violate_support: 3,
        policy_hash: "sha256:an-older-wording".into(),
        ..FitOptions::default()
    };
    let model = fit(&spam_examples(), vec![], &options).unwrap();
    let rules = triage().rules().cloned();
    let reasoner = Arc::new(Scripted { calls: Mutex::default(), delay: None });
    let pipeline = Pipeline::new(Classifier::new(reasoner.clone()), RoutingConfig::default())
        .with_triage(spam().hash.to_string(), Arc::new(Triage::new(rules, Some(model))));

    let greeting = route(&pipeline, "hi mom, see you sunday low=0").await;
    assert_eq!((greeting.decided_by, greeting.outcome), (Stage::ReasoningLow, Outcome::Allow), "{greeting:?}");
    let personal = route(&pipeline, "Can you pick up the kids from school at four? low=0").await;
    assert_eq!(personal.decided_by, Stage::ReasoningLow, "the stale model allowed it: {personal:?}");
    assert_eq!(reasoner.calls.lock().unwrap().len(), 2, "the model decided both");
    let denied = route(&pipeline, "join now low=0").await;
    assert_eq!((denied.decided_by, denied.outcome), (Stage::Triage, Outcome::Violation), "{denied:?}");
}

/// With an embedding head the triage step runs off the async workers (the encoder costs milliseconds of CPU),
/// and what it may allow is the head's call: a personal message is settled by triage with the head's score on
/// record; a cold promotion is not allowed by triage and goes on to the model.
#[tokio::test]
async fn an_embedding_head_gates_what_triage_may_allow_in_the_cascade() {
    use safeguard_triage::embedding::{DEFAULT_MAX_SEQ, HeadOptions, LogisticConfig};
    use safeguard_triage::{EmbeddingHead, FeatureConfig, FitOptions, fit, shared_encoder};

    let encoder = match shared_encoder(None, DEFAULT_MAX_SEQ) {
        Ok(encoder) => encoder,
        Err(why) => return eprintln!("SKIPPING the embedding-head cascade test: {why}"),
    };
    let examples = spam_examples();
    let policy = spam();
    let options = FitOptions {
        features: FeatureConfig { hash_bits: 12, ..FeatureConfig::default() },
        folds: 3,
        target_recall: 0.9,
        min_violate_support: 3,
        policy_hash: policy.hash.to_string(),
        ..FitOptions::default()
    };
    let model = fit(&examples, vec![], &options).unwrap();
    let head_options = HeadOptions {
        logistic: LogisticConfig { c: 3.0, ..LogisticConfig::default() },
        folds: 3,
        target_recall: 0.99,
        ..HeadOptions::default()
    };
    let head = EmbeddingHead::fit(encoder, &examples, &head_options).unwrap();
    let triage = Arc::new(Triage::new(None, Some(model.with_embedding_head(head))));
    assert!(triage.has_embedding_head());

    let reasoner = Arc::new(Scripted { calls: Mutex::default(), delay: None });
    let pipeline = Pipeline::new(Classifier::new(reasoner.clone()), RoutingConfig::default())
        .with_triage(policy.hash.to_string(), triage);

    let personal = route(&pipeline, "Could you water my plants while I am away this weekend?").await;
    assert_eq!((personal.decided_by, personal.outcome), (Stage::Triage, Outcome::Allow), "{personal:?}");
    let evidence = personal.policies[0].triage.as_ref().and_then(|t| t.embedding.as_ref()).expect("head on record");
    assert!(evidence.allows && evidence.score.unwrap() < evidence.threshold, "{evidence:?}");
    assert!(reasoner.calls.lock().unwrap().is_empty(), "triage settled it without the model");

    let promotion = route(&pipeline, "Huge discount on luxury handbags, order now from our online store low=1").await;
    assert_ne!(promotion.decided_by, Stage::Triage, "{promotion:?}");
    assert_eq!(promotion.outcome, Outcome::Violation, "{promotion:?}");
    assert_eq!(reasoner.calls.lock().unwrap().len(), 1, "the model decided the promotion");
}

/// Writes a tiny BERT encoder (the files and tensor names of all-MiniLM-L6-v2, 8 wide, one layer) into `dir`.
/// `poisoned` puts NaN into its word embeddings, as a corrupted weights file would: it still loads, and only
/// fails once it embeds something.
fn write_tiny_encoder(dir: &std::path::Path, poisoned: bool) {
    const HIDDEN: usize = 8;
    const INTERMEDIATE: usize = 16;
    const POSITIONS: usize = 16;
    const VOCAB: [&str; 12] =
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "see", "you", "at", "lunch", "join", "now", "low"];
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut put = |name: &str, shape: Vec<usize>, center: f32| {
        let salt = tensors.len() as u64 + 1;
        // Varied values, so that layer norms see rows with a spread and embeddings differ by input.
        let values = (0..shape.iter().product::<usize>() as u64)
            .map(|i| center + ((i * 7 + salt * 13) % 17) as f32 / 17.0 - 0.5)
            .collect();
        tensors.push((name.to_string(), shape, values));
    };
    put("embeddings.word_embeddings.weight", vec![VOCAB.len(), HIDDEN], 0.0);
    put("embeddings.position_embeddings.weight", vec![POSITIONS, HIDDEN], 0.0);
    put("embeddings.token_type_embeddings.weight", vec![2, HIDDEN], 0.0);
    put("embeddings.LayerNorm.weight", vec![HIDDEN], 1.0);
    put("embeddings.LayerNorm.bias", vec![HIDDEN], 0.0);
    let p = "encoder.layer.0";
    for part in ["query", "key", "value"] {
        put(&format!("{p}.attention.self.{part}.weight"), vec![HIDDEN, HIDDEN], 0.0);
        put(&format!("{p}.attention.self.{part}.bias"), vec![HIDDEN], 0.0);
    }
    put(&format!("{p}.attention.output.dense.weight"), vec![HIDDEN, HIDDEN], 0.0);
    put(&format!("{p}.attention.output.dense.bias"), vec![HIDDEN], 0.0);
    put(&format!("{p}.attention.output.LayerNorm.weight"), vec![HIDDEN], 1.0);
    put(&format!("{p}.attention.output.LayerNorm.bias"), vec![HIDDEN], 0.0);
    put(&format!("{p}.intermediate.dense.weight"), vec![INTERMEDIATE, HIDDEN], 0.0);
    put(&format!("{p}.intermediate.dense.bias"), vec![INTERMEDIATE], 0.0);
    put(&format!("{p}.output.dense.weight"), vec![HIDDEN, INTERMEDIATE], 0.0);
    put(&format!("{p}.output.dense.bias"), vec![HIDDEN], 0.0);
    put(&format!("{p}.output.LayerNorm.weight"), vec![HIDDEN], 1.0);
    put(&format!("{p}.output.LayerNorm.bias"), vec![HIDDEN], 0.0);
    if poisoned {
        tensors[0].2.fill(f32::NAN);
    }
    // safetensors: u64 LE header length, JSON header padded to 8 bytes, raw LE data.
    let (mut header, mut data) = (serde_json::Map::new(), Vec::new());
    for (name, shape, values) in &tensors {
        let start = data.len();
        data.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut header = serde_json::to_vec(&header).unwrap();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut weights = (header.len() as u64).to_le_bytes().to_vec();
    weights.extend(header);
    weights.extend(data);
    std::fs::write(dir.join("model.safetensors"), weights).unwrap();
    let config = serde_json::json!({
        "vocab_size": VOCAB.len(), "hidden_size": HIDDEN, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": INTERMEDIATE, "hidden_act": "gelu", "max_position_embeddings": POSITIONS,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("vocab.txt"), VOCAB.join("\n") + "\n").unwrap();
}

/// An embedding head fitted to `encoder` that would let everything through: any finite unit-length
/// embedding scores far below its threshold. Whatever it does not allow, it did not allow because it
/// could not score.
fn allow_everything_head(encoder: Arc<safeguard_triage::LoadedEncoder>) -> safeguard_triage::EmbeddingHead {
    use safeguard_triage::embedding::{EncoderInfo, HEAD_FORMAT_NAME, HEAD_FORMAT_VERSION, HeadMetrics, HeadTraining};
    use safeguard_triage::{EmbeddingHead, EmbeddingHeadMeta};

    let dim = encoder.encoder.dim();
    let meta = EmbeddingHeadMeta {
        format: HEAD_FORMAT_NAME.into(),
        format_version: HEAD_FORMAT_VERSION,
        encoder: EncoderInfo {
            fingerprint: encoder.fingerprint.clone(),
            dim,
            max_seq: encoder.encoder.max_seq(),
            trained_with: encoder.dir.display().to_string(),
            tokenizer: Some(encoder.tokenizer.clone()),
        },
        c: 1.0,
        balanced: true,
        folds: 3,
        target_recall: 0.99,
        threshold: 0.0,
        bias: -5.0,
        weights: vec![0.1; dim],
        neighbours: None,
        training: HeadTraining {
            items: 0,
            violations: 0,
            calibration_sources: vec![0],
            auxiliary_items: 0,
            auxiliary_weight: None,
            seconds: 0.0,
        },
        out_of_fold: HeadMetrics { items: 0, violations: 0, recall: None, skip_rate: None, auc: None },
        created: "2026-01-01T00:00:00Z".into(),
        model: None,
    };
    EmbeddingHead::from_meta(meta, encoder).unwrap()
}

/// An encoder that fails at run time (corrupted weights give a non-finite embedding) must not let the head
/// allow anything: the item goes on to the model. The same head on a healthy encoder settles the same item
/// in triage, so it is the failure, not the head or the classifier, that sends it on.
#[tokio::test]
async fn an_encoder_failing_inside_the_cascade_never_lets_triage_allow() {
    use safeguard_triage::{FeatureConfig, FitOptions, fit, shared_encoder};

    let policy = spam();
    let mut examples = Vec::new();
    for (text, violates) in [("see you at lunch", false), ("join now for free coins", true)] {
        for n in 0..8 {
            examples.push(Example { text: format!("{text} {n}"), violates, weight: 1.0, source: 0 });
        }
    }
    let options = FitOptions {
        features: FeatureConfig { hash_bits: 12, ..FeatureConfig::default() },
        folds: 3,
        target_recall: 0.9,
        min_violate_support: 3,
        policy_hash: policy.hash.to_string(),
        ..FitOptions::default()
    };
    let text = "see you at lunch tomorrow low=1 high=1";

    let mut decided = Vec::new();
    for poisoned in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_encoder(dir.path(), poisoned);
        let encoder = shared_encoder(Some(dir.path()), 16).unwrap();
        let model = fit(&examples, vec![], &options).unwrap().with_embedding_head(allow_everything_head(encoder));
        let reasoner = Arc::new(Scripted { calls: Mutex::default(), delay: None });
        let pipeline = Pipeline::new(Classifier::new(reasoner.clone()), RoutingConfig::default())
            .with_triage(policy.hash.to_string(), Arc::new(Triage::new(None, Some(model))));
        let d = route(&pipeline, text).await;
        let calls = reasoner.calls.lock().unwrap().len();
        decided.push((d, calls));
    }

    let (healthy, calls) = &decided[0];
    assert_eq!((healthy.decided_by, healthy.outcome), (Stage::Triage, Outcome::Allow), "{healthy:?}");
    assert_eq!(*calls, 0, "a working head lets triage settle it");

    let (failed, calls) = &decided[1];
    assert_ne!(failed.decided_by, Stage::Triage, "{failed:?}");
    assert_eq!(failed.outcome, Outcome::Violation, "the model's answer, not triage's: {failed:?}");
    assert!(*calls >= 1, "the model was asked");
    let failed_route = &failed.policies[0];
    let triaged = failed_route.triage.as_ref().expect("triage ran");
    assert_eq!(triaged.band, safeguard_triage::Band::Uncertain, "{triaged:?}");
    let evidence = triaged.embedding.as_ref().expect("the head's failure is on record");
    assert!(!evidence.allows && evidence.score.is_none(), "{evidence:?}");
    assert!(evidence.error.as_deref().is_some_and(|e| e.contains("non-finite")), "{evidence:?}");
    assert_eq!(failed_route.escalations.first(), Some(&Escalation::TriageUncertain), "{failed_route:?}");
}

/// Knows its context, as the embedded engine does; never asked here.
struct Bounded;

#[async_trait]
impl Reasoner for Bounded {
    fn model_id(&self) -> String {
        "bounded".into()
    }

    async fn reason(&self, _: ReasonRequest) -> Result<ReasonOutput, ReasonError> {
        Err(ReasonError::Backend("not asked".into()))
    }

    fn context_tokens(&self) -> Option<usize> {
        Some(300)
    }
}

/// Each policy is checked at the most effort its route can reach, and of several that do not fit, the one that
/// leaves the least room is named, whatever their order.
#[tokio::test]
async fn the_policy_leaving_the_least_room_is_named_when_content_does_not_fit() {
    let config = RoutingConfig { max_tokens: Some(10), ..RoutingConfig::default() };
    let pipeline = Pipeline::new(Classifier::new(Arc::new(Bounded)), config);
    let long = Policy::parse(&SPAM.replace("name: spam", "name: long").replace(
        "- SP0.a Personal messages.",
        "- SP0.a Personal messages, notes between friends, greetings, and questions about the weather.",
    ))
    .unwrap();
    // Too long beside either policy.
    let content = Content::text("word ".repeat(250));
    let ctx = RouteContext::default();
    for policies in [[spam(), long.clone()], [long.clone(), spam()]] {
        let overflow = pipeline.check_fits_context(&policies, &content, &ctx).unwrap_err();
        assert_eq!((overflow.policies.as_str(), overflow.effort), ("long", Effort::High), "{overflow}");
    }
    assert!(pipeline.check_fits_context(&[spam()], &Content::text("hi"), &ctx).is_ok());
}

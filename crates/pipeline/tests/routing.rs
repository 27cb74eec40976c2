//! The routing rules, item by item, with a reasoner that answers from a script keyed by content and effort.
//! (The same cascade on the real engine with a tiny model is in `tiny_model.rs`.)

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use safeguard_core::{Classifier, ReasonError, ReasonOutput, ReasonRequest, Reasoner};
use safeguard_harmony::{Content, Effort};
use safeguard_pipeline::{
    Escalation, OnTriageViolation, Pipeline, ReasoningBudget, RouteContext, RoutingConfig, Stage,
};
use safeguard_policy::Policy;
use safeguard_triage::rules::{KeywordList, RuleAction};
use safeguard_triage::{RuleSet, RulesConfig, Triage};
use safeguard_verdict::Outcome;

const SPAM: &str = "---\nname: spam\noutput: binary\n---\n# Spam Policy (SP)\n\n## INSTRUCTIONS\nReturn exactly one character: 0 or 1.\n\n## VIOLATES (1)\n- SP1.a Cold promotion with links.\n\n## SAFE (0)\n- SP0.a Personal messages.\n\nReturn exactly one character: 0 or 1.";

/// Answers by content: the text names what each effort should say, e.g. "low=junk high=1".
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
        Ok(ReasonOutput {
            final_text: Some(answer.to_string()),
            final_token_prob: Some(0.9),
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

    let efforts: Vec<Effort> = reasoner.calls.lock().unwrap().iter().map(|c| c.1).collect();
    assert_eq!(efforts, vec![Effort::Low, Effort::Low, Effort::High, Effort::Low, Effort::High]);
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

#[tokio::test]
async fn a_stage_that_times_out_escalates_and_ends_with_a_person() {
    let config = RoutingConfig { stage_timeout: Some(Duration::from_millis(20)), ..RoutingConfig::default() };
    let (pipeline, reasoner) = build(config, Some(Duration::from_millis(200)));
    let d = route(&pipeline, "slow low=0 high=0").await;
    assert_eq!((d.decided_by, d.outcome), (Stage::HumanReview, Outcome::NeedsReview));
    assert_eq!(reasoner.calls.lock().unwrap().len(), 2, "low timed out, high timed out");
    let rationale = d.policies[0].verdict.as_ref().and_then(|v| v.rationale.clone()).unwrap_or_default();
    assert!(rationale.contains("timed out"), "{rationale}");
}

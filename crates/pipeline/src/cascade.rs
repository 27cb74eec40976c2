//! Triage → reasoning at the first effort → reasoning at the escalation effort → a person.
//!
//! Each policy of an item walks the cascade on its own and stops at the first stage that is sure:
//! - triage settles what it is confident about (never for high-risk policies' "benign");
//! - the model reasons at `first_effort` about the rest (high-risk policies start at `escalation_effort`, content
//!   a triage `flag` rule matched at the policy's `flagged_effort`, by default the escalation effort too);
//! - a verdict that needs review, whose engine confidence is low, or that disagrees with triage is asked
//!   again at `escalation_effort`;
//! - what is still unsure goes to human review. Appeals go to high effort and then a person.
//!
//! Efforts and thresholds are the server's ([`RoutingConfig`]) unless a policy's `routing:` front matter sets its
//! own ([`PolicyPlan`]); policies of one item that start at the same effort share one prompt batch.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use safeguard_core::{Classifier, ClassifyOptions, ContextOverflow, Decision, Usage};
use safeguard_harmony::{Content, Effort, judged_text};
use safeguard_policy::Policy;
use safeguard_triage::rules::RuleAction;
use safeguard_triage::{Band, RuleMatch, Triage, TriageResult};
use safeguard_verdict::{Flag, Outcome, Verdict};
use serde::{Deserialize, Serialize};
use tracing::Instrument;
use tracing::{debug, info_span};
use uuid::Uuid;

pub use crate::budget::Deferred;
use crate::budget::{Budgets, ReasoningBudget};
use crate::routing_section::{read_routing_section, routing_section};
use crate::stats::CascadeStats;
use crate::triage_config::triage_on_violation;

/// Where in the cascade a policy's outcome was settled. Ordered as an item passes through them, so the
/// furthest stage of several is their `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Triage,
    ReasoningLow,
    ReasoningMedium,
    ReasoningHigh,
    HumanReview,
}

impl Stage {
    pub fn reasoning(effort: Effort) -> Stage {
        match effort {
            Effort::Low => Stage::ReasoningLow,
            Effort::Medium => Stage::ReasoningMedium,
            Effort::High => Stage::ReasoningHigh,
        }
    }

    /// The effort a reasoning stage reasons at; `None` for triage and a person.
    pub fn effort(self) -> Option<Effort> {
        match self {
            Stage::ReasoningLow => Some(Effort::Low),
            Stage::ReasoningMedium => Some(Effort::Medium),
            Stage::ReasoningHigh => Some(Effort::High),
            Stage::Triage | Stage::HumanReview => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Triage => "triage",
            Stage::ReasoningLow => "reasoning_low",
            Stage::ReasoningMedium => "reasoning_medium",
            Stage::ReasoningHigh => "reasoning_high",
            Stage::HumanReview => "human_review",
        }
    }
}

/// What triage may do with a confident violation: the server's default (`RoutingConfig`), or a policy's own
/// (`triage: {on_violation: …}` in its front matter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnTriageViolation {
    /// Act on it: the outcome is a violation without the model.
    #[default]
    Act,
    /// Ask the model to confirm it first.
    Confirm,
    /// Hand it to a person.
    Review,
}

impl std::str::FromStr for OnTriageViolation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "act" => Ok(OnTriageViolation::Act),
            "confirm" => Ok(OnTriageViolation::Confirm),
            "review" => Ok(OnTriageViolation::Review),
            other => Err(format!("unknown triage violation action {other:?}; use act, confirm or review")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RoutingConfig {
    pub first_effort: Effort,
    pub escalation_effort: Effort,
    /// Below this engine probability for the answer, the verdict is asked again at the escalation effort.
    pub min_engine_confidence: f32,
    /// Re-ask when the triage classifier leans the other way from the model.
    pub escalate_on_triage_disagreement: bool,
    pub on_triage_violation: OnTriageViolation,
    /// Completion budget per prompt; `None` leaves it to the reasoner's per-effort budget.
    pub max_tokens: Option<usize>,
    /// The most one reasoning stage may take; past it the stage counts as failed (and escalates).
    pub stage_timeout: Option<Duration>,
    /// How long to wait for reasoning budget before giving the item back as [`Deferred`].
    pub max_budget_wait: Duration,
    pub date: Option<String>,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            first_effort: Effort::Low,
            escalation_effort: Effort::High,
            min_engine_confidence: 0.5,
            escalate_on_triage_disagreement: true,
            on_triage_violation: OnTriageViolation::Act,
            max_tokens: None,
            stage_timeout: None,
            max_budget_wait: Duration::ZERO,
            date: None,
        }
    }
}

impl RoutingConfig {
    /// How `policy` is routed: these settings, overridden by the policy's own `routing:` and
    /// `triage: {on_violation}` front matter. The escalation effort is never below the first effort.
    ///
    /// The server refuses a policy whose sections it cannot read, so only a library caller meets one here; it
    /// gets the careful route, since its author asked for something other than the defaults and nobody can tell
    /// what: the model starts at the escalation effort, and a triage violation is confirmed by the model.
    pub fn plan_for(&self, policy: &Policy) -> PolicyPlan {
        let (routing, careful) = match routing_section(policy) {
            Ok(routing) => (routing, false),
            Err(error) => {
                tracing::warn!(%error, "routing this policy from the escalation effort");
                // What could be read still holds (a stricter confidence floor, its high-risk tiers); only a
                // floor that is no probability is left to the server's.
                let mut routing = read_routing_section(policy).unwrap_or_default();
                routing.min_engine_confidence = routing.min_engine_confidence.filter(|p| (0.0..=1.0).contains(p));
                (routing, true)
            }
        };
        let on_triage_violation = match triage_on_violation(policy) {
            Ok(chosen) => chosen.unwrap_or(self.on_triage_violation),
            Err(error) => {
                tracing::warn!(%error, "asking the model to confirm a triage violation");
                OnTriageViolation::Confirm
            }
        };
        let escalation_effort = routing.escalation_effort.unwrap_or(self.escalation_effort);
        let first_effort = if careful { escalation_effort } else { routing.first_effort.unwrap_or(self.first_effort) };
        let escalation_effort = escalation_effort.max(first_effort);
        PolicyPlan {
            high_risk_categories: routing.high_risk_categories,
            flagged_effort: routing.flagged_effort.unwrap_or(escalation_effort).clamp(first_effort, escalation_effort),
            first_effort,
            escalation_effort,
            min_engine_confidence: routing.min_engine_confidence.unwrap_or(self.min_engine_confidence),
            escalate_on_triage_disagreement: routing
                .escalate_on_triage_disagreement
                .unwrap_or(self.escalate_on_triage_disagreement),
            on_triage_violation,
        }
    }
}

/// One policy's route through the cascade: the server's [`RoutingConfig`] with the policy's own settings on top
/// ([`RoutingConfig::plan_for`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyPlan {
    pub first_effort: Effort,
    /// Never below `first_effort`; the last effort before a person.
    pub escalation_effort: Effort,
    pub min_engine_confidence: f32,
    pub escalate_on_triage_disagreement: bool,
    pub on_triage_violation: OnTriageViolation,
    /// Violations under these rule ids or tiers are asked again at the escalation effort before they stand.
    pub high_risk_categories: Vec<String>,
    /// Where content a triage `flag` rule matched starts (the escalation effort unless the policy says).
    pub flagged_effort: Effort,
}

/// Per-request context that changes the route.
#[derive(Debug, Clone, Default)]
pub struct RouteContext {
    /// An appeal of an earlier decision: high effort, then a person, whatever the model says.
    pub appeal: bool,
    /// Keep the chain of thought in the reasoning decisions.
    pub include_reasoning: bool,
}

/// Why a policy went on to the next stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Escalation {
    TriageUncertain,
    /// A triage `flag` rule matched: the model looks, at the policy's `flagged_effort`.
    TriageFlagged {
        rules: Vec<String>,
    },
    NoTriage,
    HighRisk,
    Appeal,
    TriageViolationToConfirm,
    TriageViolationToReview,
    NeedsReview {
        flags: Vec<String>,
    },
    /// The answer token's probability was below `min_engine_confidence`: asked again, or, at the escalation
    /// effort, handed to a person.
    LowEngineConfidence {
        probability: f32,
    },
    /// The model answered the other way from triage's lean; `1.0` when triage's word was a deny rule.
    TriageDisagrees {
        triage_probability: f32,
    },
    /// A violation under one of the policy's `high_risk_categories`, found below the escalation effort.
    HighRiskCategory {
        cited: Vec<String>,
    },
    /// The stage gave no answer: the backend failed or the stage ran out of time.
    StageFailed {
        detail: String,
    },
}

/// What a reviewer reads for why a policy moved on (the review queue's reason, the review page); the enum's
/// `kind` stays the machine-readable name.
impl std::fmt::Display for Escalation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // An empty list adds nothing a reviewer can act on, so it is left out rather than shown as "()".
        fn listed(f: &mut std::fmt::Formatter<'_>, what: &str, items: &[String]) -> std::fmt::Result {
            if items.is_empty() { Ok(()) } else { write!(f, " ({what}: {})", items.join(", ")) }
        }
        match self {
            Escalation::TriageUncertain => f.write_str("triage was unsure"),
            Escalation::TriageFlagged { rules } => {
                f.write_str("a triage flag rule matched")?;
                listed(f, "rules", rules)
            }
            Escalation::NoTriage => f.write_str("no triage for this policy"),
            // Pushed for a high-risk policy whatever triage said short of a violation: its "benign" never stands.
            Escalation::HighRisk => f.write_str("high-risk policy: triage may not clear it"),
            Escalation::Appeal => f.write_str("appeal"),
            Escalation::TriageViolationToConfirm => {
                f.write_str("triage found a likely violation; the policy asks the model to confirm")
            }
            Escalation::TriageViolationToReview => {
                f.write_str("triage found a likely violation; the policy sends triage violations to a person")
            }
            Escalation::NeedsReview { flags } => {
                f.write_str("the model left it undecided")?;
                listed(f, "flags", flags)
            }
            Escalation::LowEngineConfidence { probability } => {
                write!(f, "the model's answer had low probability ({probability:.2})")
            }
            Escalation::TriageDisagrees { triage_probability } => {
                write!(f, "the model disagreed with triage (triage p={triage_probability:.2})")
            }
            Escalation::HighRiskCategory { cited } => {
                f.write_str("violation under a high-risk category")?;
                listed(f, "cited", cited)
            }
            Escalation::StageFailed { detail } => write!(f, "the stage failed: {detail}"),
        }
    }
}

/// One policy's walk through the cascade.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyRoute {
    pub policy: String,
    pub policy_hash: String,
    pub outcome: Outcome,
    pub decided_by: Stage,
    pub triage: Option<TriageResult>,
    /// The last model verdict, if the model was asked.
    pub verdict: Option<Verdict>,
    pub engine_confidence: Option<f32>,
    /// Why it left each stage it passed through, in order.
    pub escalations: Vec<Escalation>,
}

/// One stage run for an item: which policies it held and what it cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    pub stage: Stage,
    pub policies: Vec<String>,
    /// The versions of `policies`, in the same order: one request may hold two versions of one policy name.
    #[serde(default)]
    pub policy_hashes: Vec<String>,
    pub elapsed_ms: f64,
    /// The reasoning decision's id, for reasoning stages.
    pub decision_id: Option<Uuid>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CascadeDecision {
    pub id: Uuid,
    pub outcome: Outcome,
    /// The furthest stage any policy needed.
    pub decided_by: Stage,
    pub policies: Vec<PolicyRoute>,
    pub stages: Vec<StageRecord>,
    /// The model's decisions, in stage order (first effort, then escalation).
    pub reasoning: Vec<Decision>,
    pub usage: Usage,
    pub total_ms: f64,
}

impl CascadeDecision {
    /// Whether the item was handled as an appeal: it then ends with a person for every policy, each marked so.
    pub fn is_appeal(&self) -> bool {
        self.policies.iter().any(|route| route.escalations.contains(&Escalation::Appeal))
    }
}

/// The cascade over a classifier, with optional triage per policy (keyed by policy hash).
#[derive(Clone)]
pub struct Pipeline {
    classifier: Classifier,
    triage: HashMap<String, Arc<Triage>>,
    config: RoutingConfig,
    /// Calls and tokens (uncached prompt and completion) per second: an item's first step is admitted, its
    /// escalation owed, and each step pays the tokens it used after it ran.
    budgets: Budgets,
    stats: Option<Arc<CascadeStats>>,
}

impl Pipeline {
    pub fn new(classifier: Classifier, config: RoutingConfig) -> Self {
        Self { classifier, triage: HashMap::new(), config, budgets: Budgets::default(), stats: None }
    }

    /// Triage for the policy version with this hash (`sha256:…`). A triage trained for another version of
    /// the policy does not apply: the policy's meaning may have changed.
    /// A triage whose model names another version is used as [`crate::TriageLibrary`] would: its rules stay, and
    /// its allow rules skip nothing without the model that was meant to check them.
    pub fn with_triage(mut self, policy_hash: impl Into<String>, triage: Arc<Triage>) -> Self {
        let policy_hash = policy_hash.into();
        let trained_for = triage.model().map(|model| model.meta.policy_hash.as_str());
        let triage = match trained_for {
            // A model fitted without a policy (no hash) claims no version, so it cannot name the wrong one.
            Some(trained_for) if !trained_for.is_empty() && trained_for != policy_hash => {
                tracing::warn!(%trained_for, current = %policy_hash, "triage model trained for another policy version; not using it");
                let why = format!("the model was trained for {trained_for}");
                Arc::new(Triage::without_its_model(triage.rules().cloned(), why))
            }
            _ => triage,
        };
        self.triage.insert(policy_hash, triage);
        self
    }

    pub fn with_budget(mut self, budget: Arc<ReasoningBudget>) -> Self {
        self.budgets.calls = Some(budget);
        self
    }

    /// Bounds the tokens reasoning spends per second: what a step used is known only after it ran, so it is
    /// paid then, and new items wait while the bucket is in debt.
    pub fn with_token_budget(mut self, budget: Arc<ReasoningBudget>) -> Self {
        self.budgets.tokens = Some(budget);
        self
    }

    /// Both budgets at once, shared with the server's other ways into the model.
    pub fn with_budgets(mut self, budgets: Budgets) -> Self {
        self.budgets = budgets;
        self
    }

    /// Tallies every decided item into `stats` (skip and escalation rates).
    pub fn with_stats(mut self, stats: Arc<CascadeStats>) -> Self {
        self.stats = Some(stats);
        self
    }

    pub fn config(&self) -> &RoutingConfig {
        &self.config
    }

    pub fn classifier(&self) -> &Classifier {
        &self.classifier
    }

    /// Whether every prompt this item may need fits the model's context with room for its answer
    /// ([`Classifier::check_fits_context`]), at the most effort its route can reach: any policy may escalate to its
    /// escalation effort, and an appeal reasons at high. Checked before admission, whatever triage would say, so
    /// that whether content is accepted does not hang on how it happens to route. Names the policy that leaves the
    /// least room ([`ContextOverflow::tightest`]).
    pub fn check_fits_context(
        &self,
        policies: &[Policy],
        content: &Content,
        ctx: &RouteContext,
    ) -> Result<(), ContextOverflow> {
        let overflows = policies.iter().filter_map(|policy| {
            let effort = if ctx.appeal { Effort::High } else { self.config.plan_for(policy).escalation_effort };
            let options = ClassifyOptions {
                effort,
                date: self.config.date.clone(),
                max_tokens: self.config.max_tokens,
                ..ClassifyOptions::default()
            };
            self.classifier.check_fits_context(std::slice::from_ref(policy), content, &options).err()
        });
        ContextOverflow::tightest(overflows).map_or(Ok(()), Err)
    }

    /// Routes one item through the cascade. Never allows on a failure: a failed or timed-out stage escalates,
    /// and the end of the line is a person.
    pub async fn decide(
        &self,
        policies: &[Policy],
        content: &Content,
        ctx: &RouteContext,
    ) -> Result<CascadeDecision, Deferred> {
        let span = info_span!("cascade", policies = policies.len(), appeal = ctx.appeal);
        self.decide_inner(policies, content, ctx).instrument(span).await
    }

    async fn decide_inner(
        &self,
        policies: &[Policy],
        content: &Content,
        ctx: &RouteContext,
    ) -> Result<CascadeDecision, Deferred> {
        let started = Instant::now();
        // Triage scores the judged part alone, as it was trained (on datasets and on exports of it): the prompt's
        // framing around it would shift every score, and a deny keyword in context must not flag the reply.
        let text = judged_text(content);
        let plans: Vec<PolicyPlan> = policies.iter().map(|policy| self.config.plan_for(policy)).collect();
        let mut routes: Vec<PolicyRoute> = Vec::with_capacity(policies.len());
        for (policy, plan) in policies.iter().zip(&plans) {
            routes.push(self.triage_route(policy, plan, text, ctx).await);
        }
        let mut stages = Vec::new();
        if routes.iter().any(|r| r.triage.is_some()) {
            stages.push(StageRecord {
                stage: Stage::Triage,
                policies: routes.iter().filter(|r| r.triage.is_some()).map(|r| r.policy.clone()).collect(),
                policy_hashes: routes.iter().filter(|r| r.triage.is_some()).map(|r| r.policy_hash.clone()).collect(),
                elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
                decision_id: None,
            });
        }

        // Which policies go to the model first, and at what effort.
        let first: Vec<usize> = (0..routes.len())
            .filter(|&i| routes[i].decided_by != Stage::Triage && routes[i].decided_by != Stage::HumanReview)
            .collect();
        self.budgets.admit(first.len(), self.config.max_budget_wait).await?;

        let mut reasoning = Vec::new();
        // High-risk policies start where the others escalate to, flagged content where its policy says; an appeal
        // gets the most effort there is.
        let start = |i: usize| {
            // From the evidence, not the band: content a classifier is also sure of, sent to the model to confirm,
            // deserves at least the effort merely flagged content gets.
            let flagged = routes[i].triage.as_ref().and_then(|t| t.rule_match.as_ref()).is_some_and(RuleMatch::flagged);
            match (ctx.appeal, policies[i].meta.high_risk, flagged) {
                (true, _, _) => Effort::High,
                (false, true, _) => plans[i].escalation_effort,
                (false, false, true) => plans[i].flagged_effort,
                (false, false, false) => plans[i].first_effort,
            }
        };
        let mut escalate = Vec::new();
        // Why each policy's last reasoning step failed, if it did: an outage is told apart from an unsure model.
        let mut failures: Vec<Option<String>> = vec![None; routes.len()];
        for (effort, group, decision, record) in
            self.reason_by_effort(policies, by_effort(&first, start), content, ctx).await
        {
            for (slot, &i) in group.iter().enumerate() {
                let route = &mut routes[i];
                failures[i] = apply_verdict(route, &decision, slot, Stage::reasoning(effort));
                if effort < plans[i].escalation_effort
                    && let Some(why) = escalation_reason(route, &plans[i], failures[i].as_deref())
                {
                    route.escalations.push(why);
                    escalate.push(i);
                }
            }
            stages.push(record);
            reasoning.push(decision);
        }

        if !escalate.is_empty() {
            // Owed, never deferred: a deferred item would lose the first stage's paid-for answer and pay again.
            self.budgets.owe_calls(escalate.len());
            let groups = by_effort(&escalate, |i| plans[i].escalation_effort);
            for (effort, group, decision, record) in self.reason_by_effort(policies, groups, content, ctx).await {
                for (slot, &i) in group.iter().enumerate() {
                    failures[i] = apply_verdict(&mut routes[i], &decision, slot, Stage::reasoning(effort));
                }
                stages.push(record);
                reasoning.push(decision);
            }
        }

        // The end of the line: whatever the model could not settle, what it is still unsure of at its last effort
        // (there is no higher effort to ask), and every appeal, goes to a person.
        for ((route, plan), failure) in routes.iter_mut().zip(&plans).zip(failures) {
            let at_last_effort = route.decided_by.effort().is_some_and(|effort| effort >= plan.escalation_effort);
            let still_unsure = (at_last_effort && route.outcome != Outcome::NeedsReview)
                .then_some(route.engine_confidence)
                .flatten()
                .filter(|&p| below(p, plan.min_engine_confidence));
            if route.outcome == Outcome::NeedsReview || ctx.appeal || still_unsure.is_some() {
                if route.decided_by != Stage::HumanReview {
                    if ctx.appeal {
                        route.escalations.push(Escalation::Appeal);
                    } else if let Some(probability) = still_unsure {
                        route.escalations.push(Escalation::LowEngineConfidence { probability });
                    } else if let Some(detail) = failure {
                        route.escalations.push(Escalation::StageFailed { detail });
                    } else if let Some(verdict) = &route.verdict {
                        route.escalations.push(Escalation::NeedsReview { flags: flag_names(verdict) });
                    }
                }
                route.decided_by = Stage::HumanReview;
                route.outcome = Outcome::NeedsReview;
            }
        }

        let outcome = fold_outcomes(routes.iter().map(|r| r.outcome));
        let decided_by = routes.iter().map(|r| r.decided_by).max().unwrap_or(Stage::HumanReview);
        let mut usage = Usage::default();
        for decision in &reasoning {
            usage += decision.usage;
        }
        for route in &routes {
            metrics::counter!("safeguard_pipeline_decisions_total",
                "policy" => safeguard_core::policy_label(&route.policy), "stage" => route.decided_by.as_str(), "outcome" => outcome_str(route.outcome))
            .increment(1);
            for why in &route.escalations {
                metrics::counter!("safeguard_pipeline_escalations_total", "reason" => escalation_str(why)).increment(1);
            }
        }
        let decision = CascadeDecision {
            id: Uuid::now_v7(),
            outcome,
            decided_by,
            policies: routes,
            stages,
            reasoning,
            usage,
            total_ms: started.elapsed().as_secs_f64() * 1e3,
        };
        if let Some(stats) = &self.stats {
            stats.observe(&decision);
        }
        Ok(decision)
    }

    async fn triage_route(&self, policy: &Policy, plan: &PolicyPlan, text: &str, ctx: &RouteContext) -> PolicyRoute {
        let mut route = PolicyRoute {
            policy: policy.meta.name.clone(),
            policy_hash: policy.hash.to_string(),
            outcome: Outcome::NeedsReview,
            decided_by: Stage::reasoning(plan.first_effort),
            triage: None,
            verdict: None,
            engine_confidence: None,
            escalations: Vec::new(),
        };
        if ctx.appeal {
            route.escalations.push(Escalation::Appeal);
            return route;
        }
        let Some(triage) = self.triage.get(&route.policy_hash) else {
            route.escalations.push(if policy.meta.high_risk { Escalation::HighRisk } else { Escalation::NoTriage });
            return route;
        };
        let result = if triage.has_embedding_head() {
            // The sentence encoder costs tens of milliseconds of CPU: keep it off the async workers.
            let (triage, owned) = (Arc::clone(triage), text.to_owned());
            let span = tracing::Span::current();
            match tokio::task::spawn_blocking(move || span.in_scope(|| triage.route(&owned))).await {
                Ok(result) => result,
                Err(err) => {
                    // Never allow on a failed triage: the reasoning model decides. Said as a failure, not as an
                    // unsure triage, so the escalation figures show the fault.
                    tracing::warn!(error = %err, "triage with an embedding head failed; escalating");
                    route.escalations.push(Escalation::StageFailed { detail: format!("triage failed: {err}") });
                    if policy.meta.high_risk {
                        route.escalations.push(Escalation::HighRisk);
                    }
                    return route;
                }
            }
        } else {
            triage.route(text)
        };
        match result.band {
            // High-risk policies never take triage's word for "benign": a miss there costs too much.
            Band::ConfidentBenign if !policy.meta.high_risk => {
                route.outcome = Outcome::Allow;
                route.decided_by = Stage::Triage;
            }
            Band::ConfidentViolation => match plan.on_triage_violation {
                OnTriageViolation::Act => {
                    route.outcome = Outcome::Violation;
                    route.decided_by = Stage::Triage;
                }
                OnTriageViolation::Confirm => route.escalations.push(Escalation::TriageViolationToConfirm),
                OnTriageViolation::Review => {
                    route.escalations.push(Escalation::TriageViolationToReview);
                    route.decided_by = Stage::HumanReview;
                }
            },
            Band::ConfidentBenign => route.escalations.push(Escalation::HighRisk),
            Band::Uncertain => route.escalations.push(match flagged_rules(&result) {
                _ if policy.meta.high_risk => Escalation::HighRisk,
                Some(rules) => Escalation::TriageFlagged { rules },
                None => Escalation::TriageUncertain,
            }),
        }
        route.triage = Some(result);
        route
    }

    /// One reasoning step per effort, run together: a policy's wait for its answer is one step's, not the sum of
    /// every effort's. Results come back in effort order, least first.
    async fn reason_by_effort(
        &self,
        policies: &[Policy],
        groups: BTreeMap<Effort, Vec<usize>>,
        content: &Content,
        ctx: &RouteContext,
    ) -> Vec<(Effort, Vec<usize>, Decision, StageRecord)> {
        let steps = groups.iter().map(|(&effort, group)| self.reason(policies, group, content, effort, ctx));
        let results = futures::future::join_all(steps).await;
        groups
            .into_iter()
            .zip(results)
            .map(|((effort, group), (decision, record))| (effort, group, decision, record))
            .collect()
    }

    async fn reason(
        &self,
        policies: &[Policy],
        group: &[usize],
        content: &Content,
        effort: Effort,
        ctx: &RouteContext,
    ) -> (Decision, StageRecord) {
        let selected: Vec<Policy> = group.iter().map(|&i| policies[i].clone()).collect();
        let options = ClassifyOptions {
            effort,
            date: self.config.date.clone(),
            max_tokens: self.config.max_tokens,
            include_reasoning: ctx.include_reasoning,
            ..ClassifyOptions::default()
        };
        let started = Instant::now();
        // Without a cap of our own, the reasoner's for the effort: what a prompt that fails may have cost.
        let cap = self.config.max_tokens.unwrap_or_else(|| self.classifier.reasoner().completion_cap(effort));
        let mut step = self.budgets.step(cap.saturating_mul(selected.len()));
        let classify = self.classifier.classify(&selected, content, &options);
        let decision = match self.config.stage_timeout {
            None => classify.await,
            Some(limit) => match safeguard_core::deadline::within(limit, classify).await {
                Ok(decision) => decision,
                Err(_) => {
                    debug!(?limit, "reasoning stage timed out");
                    let decision =
                        timed_out_decision(&selected, &options, self.classifier.reasoner().model_id(), limit);
                    // Dropped before the classifier could show them: counted here, as failed prompts.
                    for prompt in &decision.prompts {
                        self.classifier.observe(effort, prompt);
                    }
                    decision
                }
            },
        };
        step.pay(&decision, Some(cap));
        let elapsed = started.elapsed();
        metrics::histogram!("safeguard_pipeline_stage_seconds", "stage" => Stage::reasoning(effort).as_str())
            .record(elapsed.as_secs_f64());
        let record = StageRecord {
            stage: Stage::reasoning(effort),
            policies: selected.iter().map(|p| p.meta.name.clone()).collect(),
            policy_hashes: selected.iter().map(|p| p.hash.to_string()).collect(),
            elapsed_ms: elapsed.as_secs_f64() * 1e3,
            decision_id: Some(decision.id),
        };
        (decision, record)
    }
}

/// A stage that ran out of time decided nothing: every verdict needs review, with the reason in its rationale
/// and in a failed trace per prompt (one per policy: the cascade reasons about policies separately).
fn timed_out_decision(policies: &[Policy], options: &ClassifyOptions, model: String, limit: Duration) -> Decision {
    let reason = format!("the reasoning stage timed out after {limit:?}");
    let mut decision = Decision::unreasoned(policies, options, model, &reason);
    decision.timings.total_ms = limit.as_secs_f64() * 1e3;
    decision
}

/// Whether a verdict below the policy's escalation effort should be asked again there, and why. `failure` is why
/// the step gave no answer, if it failed.
fn escalation_reason(route: &PolicyRoute, plan: &PolicyPlan, failure: Option<&str>) -> Option<Escalation> {
    if let Some(detail) = failure {
        return Some(Escalation::StageFailed { detail: detail.to_string() });
    }
    let verdict = route.verdict.as_ref()?;
    if verdict.flags.contains(&Flag::Escalated) {
        // The policy (`escalate_on`) or the model asked for a person: more effort must not answer in their place.
        return None;
    }
    if verdict.outcome == Outcome::NeedsReview {
        return Some(Escalation::NeedsReview { flags: flag_names(verdict) });
    }
    if let Some(p) = route.engine_confidence.filter(|&p| below(p, plan.min_engine_confidence)) {
        return Some(Escalation::LowEngineConfidence { probability: p });
    }
    if verdict.outcome == Outcome::Violation && verdict.cites_any(&plan.high_risk_categories) {
        return Some(Escalation::HighRiskCategory { cited: verdict.cited().cloned().collect() });
    }
    if plan.escalate_on_triage_disagreement
        && let (Some(triage), Some(violation)) = (&route.triage, verdict.violation)
    {
        // A confident violation with no probability is a deny rule's: as sure as triage gets.
        let lean = match (triage.band, triage.calibrated_probability) {
            (Band::ConfidentViolation, p) => Some(p.unwrap_or(1.0)),
            (_, p) => p,
        };
        if let Some(p) = lean
            && (p >= 0.5) != violation
        {
            return Some(Escalation::TriageDisagrees { triage_probability: p });
        }
    }
    None
}

/// Policy indexes grouped by the effort they reason at, least effort first: one prompt batch per effort.
fn by_effort(indexes: &[usize], effort_of: impl Fn(usize) -> Effort) -> BTreeMap<Effort, Vec<usize>> {
    let mut groups: BTreeMap<Effort, Vec<usize>> = BTreeMap::new();
    for &i in indexes {
        groups.entry(effort_of(i)).or_default().push(i);
    }
    groups
}

/// Puts a step's verdict for one policy on its route; returns why the step failed for it, if it did. The cascade
/// reasons about policies separately, so the step's prompts line up with its verdicts.
fn apply_verdict(route: &mut PolicyRoute, decision: &Decision, slot: usize, stage: Stage) -> Option<String> {
    let verdict = decision.verdicts.get(slot).cloned();
    route.outcome = verdict.as_ref().map_or(Outcome::NeedsReview, |v| v.outcome);
    route.engine_confidence = decision.engine_confidence.get(slot).copied().flatten();
    route.verdict = verdict;
    route.decided_by = stage;
    decision.prompts.get(slot).and_then(|prompt| prompt.error.clone())
}

/// Whether an engine probability is under `min`; one that is not a number is no evidence of confidence.
pub(crate) fn below(probability: f32, min: f32) -> bool {
    probability.is_nan() || probability < min
}

/// The `flag` rules that matched, if any did: each once, in the order they first matched (the evidence has a
/// span per match, and a rule repeated per span made the decision grow with the text).
fn flagged_rules(result: &TriageResult) -> Option<Vec<String>> {
    let evidence = &result.rule_match.as_ref()?.evidence;
    let mut seen = std::collections::HashSet::new();
    let rules: Vec<String> = evidence
        .iter()
        .filter(|span| span.action == RuleAction::Flag && seen.insert(span.rule.as_str()))
        .map(|span| span.rule.clone())
        .collect();
    (!rules.is_empty()).then_some(rules)
}

fn flag_names(verdict: &Verdict) -> Vec<String> {
    verdict.flags.iter().map(|f| f.kind().to_string()).collect()
}

/// Same rule as a single decision's outcome: anything undecided holds the item; otherwise a violation wins.
fn fold_outcomes(outcomes: impl Iterator<Item = Outcome>) -> Outcome {
    let mut any = false;
    let mut violation = false;
    for outcome in outcomes {
        any = true;
        match outcome {
            Outcome::NeedsReview => return Outcome::NeedsReview,
            Outcome::Violation => violation = true,
            Outcome::Allow => {}
        }
    }
    match (any, violation) {
        (false, _) => Outcome::NeedsReview,
        (true, true) => Outcome::Violation,
        (true, false) => Outcome::Allow,
    }
}

fn outcome_str(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Allow => "allow",
        Outcome::Violation => "violation",
        Outcome::NeedsReview => "needs_review",
    }
}

fn escalation_str(why: &Escalation) -> &'static str {
    match why {
        Escalation::TriageUncertain => "triage_uncertain",
        Escalation::TriageFlagged { .. } => "triage_flagged",
        Escalation::NoTriage => "no_triage",
        Escalation::HighRisk => "high_risk",
        Escalation::Appeal => "appeal",
        Escalation::TriageViolationToConfirm => "triage_violation_confirm",
        Escalation::TriageViolationToReview => "triage_violation_review",
        Escalation::NeedsReview { .. } => "needs_review",
        Escalation::LowEngineConfidence { .. } => "low_engine_confidence",
        Escalation::TriageDisagrees { .. } => "triage_disagrees",
        Escalation::HighRiskCategory { .. } => "high_risk_category",
        Escalation::StageFailed { .. } => "stage_failed",
    }
}

#[cfg(test)]
mod tests {
    use super::{Escalation, below};

    #[test]
    fn a_probability_that_is_not_a_number_is_below_any_floor() {
        assert!(below(f32::NAN, 0.5));
        assert!(below(0.4, 0.5));
        assert!(!below(0.5, 0.5));
    }

    #[test]
    fn escalations_read_as_plain_reasons_without_debug_names() {
        let strings = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let cases = [
            (Escalation::TriageUncertain, "triage was unsure"),
            (
                Escalation::TriageFlagged { rules: strings(&["pharma: cheap pills", "promo: dm me"]) },
                "a triage flag rule matched (rules: pharma: cheap pills, promo: dm me)",
            ),
            (Escalation::NoTriage, "no triage for this policy"),
            (Escalation::HighRisk, "high-risk policy: triage may not clear it"),
            (Escalation::Appeal, "appeal"),
            (
                Escalation::TriageViolationToConfirm,
                "triage found a likely violation; the policy asks the model to confirm",
            ),
            (
                Escalation::TriageViolationToReview,
                "triage found a likely violation; the policy sends triage violations to a person",
            ),
            (
                Escalation::NeedsReview { flags: strings(&["unparseable", "escalated"]) },
                "the model left it undecided (flags: unparseable, escalated)",
            ),
            (Escalation::NeedsReview { flags: Vec::new() }, "the model left it undecided"),
            (Escalation::LowEngineConfidence { probability: 0.4239 }, "the model's answer had low probability (0.42)"),
            (
                Escalation::TriageDisagrees { triage_probability: 0.912 },
                "the model disagreed with triage (triage p=0.91)",
            ),
            (
                Escalation::HighRiskCategory { cited: strings(&["SP4.a"]) },
                "violation under a high-risk category (cited: SP4.a)",
            ),
            (Escalation::HighRiskCategory { cited: Vec::new() }, "violation under a high-risk category"),
            (Escalation::StageFailed { detail: "backend down".into() }, "the stage failed: backend down"),
        ];
        for (escalation, expected) in cases {
            assert_eq!(escalation.to_string(), expected, "{escalation:?}");
        }
    }
}

//! Decisions and human corrections become labelled data: training sets for triage, golden tests, evaluations.
//!
//! Every example carries its provenance (policy hash, model, effort, stage, reviewer), so a dataset can be
//! filtered to one policy version and a correction can outweigh the model it corrected.

use std::io::{self, Write};

use safeguard_verdict::Outcome;
use serde::{Deserialize, Serialize};

use sha2::{Digest, Sha256};

use crate::cascade::{CascadeDecision, PolicyRoute, Stage};

/// Where a label came from. Human labels are ground truth; model labels are as good as the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelSource {
    Triage,
    Model,
    Human,
}

/// One line of an exported dataset. `text` + `violates` + `weight` is what `safeguard triage train` reads
/// (`--weight-field weight`); the rest is provenance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabeledExample {
    pub id: String,
    pub text: String,
    /// 1 = violates the policy, 0 = does not.
    pub violates: u8,
    pub weight: f32,
    pub policy: String,
    pub policy_hash: String,
    pub source: LabelSource,
    pub stage: Stage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effort: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reviewer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule_id: Option<String>,
    /// A person's label only: what the service had said, so a dataset tells which stage people overrule, and
    /// how often (an audit of triage's allows, say, measures how much triage misses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub corrects: Option<CorrectedLabel>,
}

/// The label a person's decision replaced: the stage that settled the policy and what it said. On an item the
/// cascade handed to a person the stage is `human_review`, and the label the model's answer before it did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CorrectedLabel {
    pub stage: Stage,
    /// 1 or 0; `None` when no stage gave an answer (the model left it undecided, or failed).
    pub violates: Option<u8>,
    /// The model and effort, when a reasoning stage settled it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effort: Option<String>,
    /// The sha256 of the triage model's weights, when triage settled it with its classifier: a retrained model
    /// under the same policy version is another model, with its own error rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub triage_model: Option<String>,
    /// When that triage model was trained (RFC 3339): a model recalibrated from the same weights has the same
    /// sha256 and other thresholds, so its own error rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub triage_model_created: Option<String>,
}

/// A person's decision on one policy of an item: an approval of the model's verdict or an override.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Correction {
    pub item_id: String,
    pub text: String,
    pub policy: String,
    pub policy_hash: String,
    pub violates: bool,
    pub reviewer: String,
    pub rule_id: Option<String>,
    #[serde(default)]
    pub corrects: Option<CorrectedLabel>,
}

/// The stage that settled one stored verdict (`verdicts[i]` of a stored decision). A cascade's verdict names it;
/// a direct decision's does not, and was one reasoning step at the decision's `effort`. The error says why
/// neither can be read.
pub fn stored_verdict_stage(verdict: &serde_json::Value, decision_effort: &str) -> Result<Stage, &'static str> {
    match verdict.get("stage") {
        None | Some(serde_json::Value::Null) => decision_effort
            .parse::<safeguard_harmony::Effort>()
            .map(Stage::reasoning)
            .map_err(|_| "stored decision has an unknown effort"),
        Some(stage) => Stage::deserialize(stage).map_err(|_| "verdict has an unknown stage"),
    }
}

/// How much one example counts in training, by where its label came from.
#[derive(Debug, Clone, Copy)]
pub struct Weights {
    pub model: f32,
    pub human: f32,
}

impl Default for Weights {
    fn default() -> Self {
        // A correction is rare and deliberate; it should move the classifier more than one more model label.
        Self { model: 1.0, human: 5.0 }
    }
}

/// The model's settled verdicts of one cascade decision, as examples. Triage-settled policies are left out:
/// training triage on its own output teaches it nothing. Undecided policies have no label to give.
pub fn examples_from_decision(
    item_id: &str,
    text: &str,
    decision: &CascadeDecision,
    weights: Weights,
) -> Vec<LabeledExample> {
    decision
        .policies
        .iter()
        .filter(|route| route.decided_by != Stage::Triage)
        .filter_map(|route| {
            let violates = match route.outcome {
                Outcome::Violation => 1,
                Outcome::Allow => 0,
                Outcome::NeedsReview => return None,
            };
            let reasoning =
                decision.reasoning.iter().rev().find(|d| d.verdicts.iter().any(|v| v.policy_hash == route.policy_hash));
            Some(LabeledExample {
                id: item_id.to_string(),
                text: text.to_string(),
                violates,
                weight: weights.model,
                policy: route.policy.clone(),
                policy_hash: route.policy_hash.clone(),
                source: LabelSource::Model,
                stage: route.decided_by,
                model: reasoning.map(|d| d.model.clone()),
                effort: reasoning.map(|d| d.effort.to_string()),
                reviewer: None,
                rule_id: route.verdict.as_ref().and_then(|v| v.rule_ids.first().cloned()),
                corrects: None,
            })
        })
        .collect()
}

pub fn example_from_correction(correction: &Correction, weights: Weights) -> LabeledExample {
    LabeledExample {
        id: correction.item_id.clone(),
        text: correction.text.clone(),
        violates: u8::from(correction.violates),
        weight: weights.human,
        policy: correction.policy.clone(),
        policy_hash: correction.policy_hash.clone(),
        source: LabelSource::Human,
        stage: Stage::HumanReview,
        model: None,
        effort: None,
        reviewer: Some(correction.reviewer.clone()),
        rule_id: correction.rule_id.clone(),
        corrects: correction.corrects.clone(),
    }
}

/// Merges model labels and corrections: where a person labelled the same item and policy version, their label
/// replaces the model's. "The same item" is the same text, not only the same decision: an appeal or a replay
/// stores the item again under a new decision, and a person's answer to the appeal settles the original too. Of
/// several labels of one kind for one item the last stands, so that no item counts twice and no item is taught
/// both ways: the last replay's model label, and the last correction (`corrections` in the order they were
/// given, so an appeal's answer overrules the review it appealed).
pub fn merge(model: Vec<LabeledExample>, corrections: Vec<LabeledExample>) -> Vec<LabeledExample> {
    let mut latest = LatestLabels::default();
    for (index, example) in model.iter().enumerate() {
        latest.note(Role::Model, example, &index.to_string());
    }
    for (index, example) in corrections.iter().enumerate() {
        latest.note(Role::Correction, example, &index.to_string());
    }
    let model = model.into_iter().enumerate().filter(|(i, e)| latest.keeps(Role::Model, e, &i.to_string()));
    let corrections =
        corrections.into_iter().enumerate().filter(|(i, e)| latest.keeps(Role::Correction, e, &i.to_string()));
    model.chain(corrections).map(|(_, example)| example).collect()
}

/// Which side of [`merge`] an example is on: a model label, or a person's correction that replaces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Model,
    Correction,
}

type Digest16 = [u8; 16];

/// [`merge`]'s choice made from digests, for a dataset too large to hold: a first pass [`note`](Self::note)s
/// every example in order, a second asks [`keeps`](Self::keeps) of each again and writes it out. It holds two
/// 16-byte digests per item and policy version instead of every example's text, so an export of millions of
/// decisions fits in memory. `identity` names one example among all of its role (a row id and the example's
/// place in the row): the second pass must give each example the identity it had in the first, and an example
/// the first pass never saw is not kept.
#[derive(Debug, Default)]
pub struct LatestLabels {
    model: std::collections::HashMap<Digest16, Digest16>,
    corrections: std::collections::HashMap<Digest16, Digest16>,
}

impl LatestLabels {
    pub fn note(&mut self, role: Role, example: &LabeledExample, identity: &str) {
        let latest = match role {
            Role::Model => &mut self.model,
            Role::Correction => &mut self.corrections,
        };
        latest.insert(item_digest(example), digest16(&[identity.as_bytes()]));
    }

    /// Whether `example` is the last of its role for its item, and, for a model label, that no person labelled
    /// the item.
    pub fn keeps(&self, role: Role, example: &LabeledExample, identity: &str) -> bool {
        let item = item_digest(example);
        let last = match role {
            Role::Model if self.corrections.contains_key(&item) => return false,
            Role::Model => self.model.get(&item),
            Role::Correction => self.corrections.get(&item),
        };
        last == Some(&digest16(&[identity.as_bytes()]))
    }

    /// How many examples the second pass will keep.
    pub fn kept(&self) -> usize {
        self.corrections.len() + self.model.keys().filter(|item| !self.corrections.contains_key(*item)).count()
    }
}

/// The item an example labels: its text under one policy version. 128 bits: two different items sharing a
/// digest (and one dropping out of the dataset) is as likely as never, at any size a database can hold.
fn item_digest(example: &LabeledExample) -> Digest16 {
    let text_len = (example.text.len() as u64).to_le_bytes();
    digest16(&[&text_len, example.text.as_bytes(), example.policy_hash.as_bytes()])
}

fn digest16(parts: &[&[u8]]) -> Digest16 {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
    }
    let mut out = [0u8; 16];
    out.copy_from_slice(&hasher.finalize()[..16]);
    out
}

pub fn write_jsonl<W: Write>(examples: &[LabeledExample], mut out: W) -> io::Result<()> {
    for example in examples {
        write_jsonl_line(example, &mut out)?;
    }
    out.flush()
}

/// One example as one JSONL line, unflushed (for a writer that is given examples one at a time).
pub fn write_jsonl_line<W: Write>(example: &LabeledExample, mut out: W) -> io::Result<()> {
    serde_json::to_writer(&mut out, example)?;
    out.write_all(b"\n")
}

/// Why a decided item is worth a person's look even though nobody had to review it (active learning).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SampleReason {
    /// Triage's classifier leaned one way and the model decided the other.
    TriageModelDisagree { triage_probability: f32 },
    /// Triage's probability sat close to its decision boundary.
    SmallTriageMargin { triage_probability: f32 },
    /// The engine gave the model's answer a low probability.
    LowEngineConfidence { probability: f32 },
    /// Triage settled it on its own, drawn whatever its score: the only way a person ever sees what triage
    /// lets through, so what reviewers find among these measures how often triage is wrong on live traffic.
    /// `triage_probability` is `None` where a rule settled it.
    TriageAudit { outcome: Outcome, triage_probability: Option<f32> },
}

/// Picks the policies of a decision that would teach the most if a person labelled them. `margin` is the
/// distance from 0.5 under which a triage probability counts as undecided; `min_confidence` the engine
/// probability under which a model answer counts as shaky.
pub fn sample_for_review(route: &PolicyRoute, margin: f32, min_confidence: f32) -> Option<SampleReason> {
    if route.decided_by == Stage::HumanReview {
        return None;
    }
    let triage_p = route.triage.as_ref().and_then(|t| t.calibrated_probability);
    let model_violation = match route.outcome {
        Outcome::Violation => Some(true),
        Outcome::Allow => Some(false),
        Outcome::NeedsReview => None,
    };
    if let (Some(p), Some(violation), true) = (triage_p, model_violation, route.decided_by != Stage::Triage)
        && (p >= 0.5) != violation
    {
        return Some(SampleReason::TriageModelDisagree { triage_probability: p });
    }
    if let Some(p) = triage_p.filter(|p| (p - 0.5).abs() < margin) {
        return Some(SampleReason::SmallTriageMargin { triage_probability: p });
    }
    route
        .engine_confidence
        .filter(|&p| crate::cascade::below(p, min_confidence))
        .map(|probability| SampleReason::LowEngineConfidence { probability })
}

/// A policy of a decision that active learning chose for a person's look, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Picked {
    pub policy: String,
    pub policy_hash: String,
    pub why: SampleReason,
}

/// Which settled decisions are worth a person's look (active learning), and how many of them to send.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActiveLearning {
    /// Share of the candidates that are queued, 0 to 1. Reviewers' time is the budget: a candidate is any
    /// item triage and the model disagree on or triage barely decided, and on real traffic that is many.
    pub rate: f64,
    /// Share of the items triage settled on its own that are queued as an audit, 0 to 1, drawn apart from
    /// `rate`. Uniform on purpose: a sample chosen by score would say nothing about the misses triage was sure
    /// of, and those are the ones that go unseen. Usually far lower than `rate`: triage settles most traffic.
    pub audit_rate: f64,
    /// Distance from 0.5 under which a triage probability counts as a small margin.
    pub margin: f32,
    /// Engine probability under which the model's settled answer counts as shaky.
    pub min_confidence: f32,
}

impl Default for ActiveLearning {
    fn default() -> Self {
        // No audit unless asked (`serve --triage-audit-rate` asks by default): an embedding of the server, a test
        // among them, that counts its review queue should not find a random extra item in it.
        Self { rate: 0.05, audit_rate: 0.0, margin: 0.1, min_confidence: 0.5 }
    }
}

impl ActiveLearning {
    pub fn off() -> Self {
        Self { rate: 0.0, audit_rate: 0.0, ..Self::default() }
    }

    /// The policies of a settled decision to show a person, with why, or nothing when the decision is not
    /// a candidate or not drawn: at most one as a disagreement sample and one as an audit, each review asking
    /// about one policy. The draws hash the decision id, so the same decision is always drawn the same
    /// way (a redelivered NATS event is not sampled twice with different luck); the audit's draw is keyed apart,
    /// so that being a candidate of one kind neither helps nor hurts the other.
    ///
    /// An item a person sees anyway is no disagreement sample; but the policies triage settled on it are still
    /// audited, or the audit would skip the harder items, those where another policy went to a person.
    pub fn pick(&self, decision: &CascadeDecision) -> Vec<Picked> {
        let id = decision.id.to_string();
        let picked_route = |route: &PolicyRoute, why: SampleReason| Picked {
            policy: route.policy.clone(),
            policy_hash: route.policy_hash.clone(),
            why,
        };
        let mut picked: Vec<Picked> = Vec::new();
        if self.rate > 0.0 && decision.decided_by != Stage::HumanReview {
            let candidates: Vec<(&PolicyRoute, SampleReason)> = decision
                .policies
                .iter()
                .filter_map(|route| sample_for_review(route, self.margin, self.min_confidence).map(|why| (route, why)))
                .collect();
            // A person answers one policy's question, as for the audit below: of several candidates, one is kept,
            // and the review asks about it alone (the others' labels would never come).
            if !candidates.is_empty()
                && drawn(&id, self.rate)
                && let Some((route, why)) = pick_one(&candidates, &format!("sample-policy:{id}"))
            {
                picked.push(picked_route(route, why.clone()));
            }
        }
        if self.audit_rate > 0.0 {
            // Each policy triage settled is drawn on its own, so each is audited at the rate whatever else the item
            // was judged under. A person answers one policy's question, though (an answer for one of several
            // would leave the others unanswered): of several drawn, one is kept, which only matters at rates
            // where two draws on one item are common.
            let drawn_routes: Vec<&PolicyRoute> = decision
                .policies
                .iter()
                .filter(|route| route.decided_by == Stage::Triage)
                .filter(|route| drawn(&format!("audit:{id}:{}", route.policy_hash), self.audit_rate))
                .collect();
            if let Some(&route) = pick_one(&drawn_routes, &format!("audit-policy:{id}")) {
                let triage_probability = route.triage.as_ref().and_then(|t| t.calibrated_probability);
                picked.push(picked_route(
                    route,
                    SampleReason::TriageAudit { outcome: route.outcome, triage_probability },
                ));
            }
        }
        picked
    }
}

/// One of `items`, each as likely, the same for the same `key`; `None` when there are none.
fn pick_one<'a, T>(items: &'a [T], key: &str) -> Option<&'a T> {
    let len = u64::try_from(items.len()).ok().filter(|&len| len > 0)?;
    items.get(usize::try_from(key_hash(key) % len).ok()?)
}

/// A deterministic draw with probability `rate` keyed by `key`.
fn drawn(key: &str, rate: f64) -> bool {
    rate >= 1.0 || (key_hash(key) as f64 / u64::MAX as f64) < rate
}

/// The first 64 bits of `key`'s SHA-256: what every draw here is made from, so a draw is the same wherever it
/// is made again (a redelivered event, another worker).
fn key_hash(key: &str) -> u64 {
    let digest = Sha256::digest(key.as_bytes());
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(head)
}

impl SampleReason {
    pub fn kind(&self) -> &'static str {
        match self {
            SampleReason::TriageModelDisagree { .. } => "triage_model_disagree",
            SampleReason::SmallTriageMargin { .. } => "small_triage_margin",
            SampleReason::LowEngineConfidence { .. } => "low_engine_confidence",
            SampleReason::TriageAudit { .. } => "triage_audit",
        }
    }
}

impl std::fmt::Display for SampleReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SampleReason::TriageModelDisagree { triage_probability: p } => {
                write!(f, "triage and the model disagree (triage p={p:.2})")
            }
            SampleReason::SmallTriageMargin { triage_probability: p } => {
                write!(f, "triage was barely sure (p={p:.2})")
            }
            SampleReason::LowEngineConfidence { probability } => {
                write!(f, "the model's answer had low probability ({probability:.2})")
            }
            SampleReason::TriageAudit { outcome, triage_probability } => {
                let outcome = match outcome {
                    Outcome::Violation => "a violation",
                    Outcome::Allow => "allowed",
                    Outcome::NeedsReview => "undecided",
                };
                write!(f, "audit of triage, which settled it as {outcome} on its own")?;
                match triage_probability {
                    Some(p) => write!(f, " (p={p:.3})"),
                    None => write!(f, " (by a rule)"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use safeguard_triage::{Band, TriageResult};

    use super::*;

    fn route(outcome: Outcome, stage: Stage, triage_p: Option<f32>, engine: Option<f32>) -> PolicyRoute {
        PolicyRoute {
            policy: "spam".into(),
            policy_hash: "sha256:aa".into(),
            outcome,
            decided_by: stage,
            triage: triage_p.map(|p| TriageResult {
                score: Some(0.0),
                calibrated_probability: Some(p),
                band: Band::Uncertain,
                rule_match: None,
                embedding: None,
                model: None,
            }),
            verdict: None,
            engine_confidence: engine,
            escalations: Vec::new(),
        }
    }

    #[test]
    fn disagreement_beats_margin_and_confidence() {
        let r = route(Outcome::Allow, Stage::ReasoningLow, Some(0.9), Some(0.1));
        assert!(matches!(sample_for_review(&r, 0.1, 0.5), Some(SampleReason::TriageModelDisagree { .. })));
        let r = route(Outcome::Violation, Stage::ReasoningLow, Some(0.55), None);
        assert!(matches!(sample_for_review(&r, 0.1, 0.5), Some(SampleReason::SmallTriageMargin { .. })));
        let r = route(Outcome::Violation, Stage::ReasoningHigh, Some(0.95), Some(0.3));
        assert!(matches!(sample_for_review(&r, 0.1, 0.5), Some(SampleReason::LowEngineConfidence { .. })));
        let r = route(Outcome::Violation, Stage::ReasoningHigh, Some(0.95), Some(0.9));
        assert_eq!(sample_for_review(&r, 0.1, 0.5), None);
        // A probability that is not a number is no evidence the model was sure, as the cascade reads it.
        let r = route(Outcome::Violation, Stage::ReasoningHigh, Some(0.95), Some(f32::NAN));
        assert!(matches!(sample_for_review(&r, 0.1, 0.5), Some(SampleReason::LowEngineConfidence { .. })));
        let r = route(Outcome::NeedsReview, Stage::HumanReview, Some(0.5), None);
        assert_eq!(sample_for_review(&r, 0.1, 0.5), None, "already with a person");
    }

    fn decision_of(routes: Vec<PolicyRoute>) -> CascadeDecision {
        let decided_by = if routes.iter().any(|r| r.decided_by == Stage::HumanReview) {
            Stage::HumanReview
        } else {
            routes[0].decided_by
        };
        CascadeDecision {
            id: uuid::Uuid::now_v7(),
            outcome: Outcome::Allow,
            decided_by,
            policies: routes,
            stages: Vec::new(),
            reasoning: Vec::new(),
            usage: safeguard_core::Usage::default(),
            total_ms: 0.0,
        }
    }

    #[test]
    fn active_learning_picks_candidates_at_the_rate_and_never_what_a_person_has() {
        let every = ActiveLearning { rate: 1.0, ..ActiveLearning::default() };
        let disagree = decision_of(vec![
            route(Outcome::Allow, Stage::ReasoningLow, Some(0.9), None),
            route(Outcome::Allow, Stage::ReasoningLow, Some(0.05), None),
        ]);
        let picked = every.pick(&disagree);
        assert_eq!(picked.len(), 1, "only the policy triage disagreed on: {picked:?}");
        // Of several candidates one is kept, each as often: a person's answer is for one policy.
        let mut per_policy = [0usize; 2];
        for _ in 0..600 {
            let mut routes = vec![
                route(Outcome::Allow, Stage::ReasoningLow, Some(0.9), None),
                route(Outcome::Violation, Stage::ReasoningLow, Some(0.55), None),
            ];
            for (i, r) in routes.iter_mut().enumerate() {
                (r.policy, r.policy_hash) = (format!("p{i}"), format!("sha256:p{i}"));
            }
            let picked = every.pick(&decision_of(routes));
            assert_eq!(picked.len(), 1, "{picked:?}");
            per_policy[picked[0].policy[1..].parse::<usize>().unwrap()] += 1;
        }
        assert!(per_policy.iter().all(|&n| n >= 200), "{per_policy:?} of 600");
        assert_eq!(picked[0].why.kind(), "triage_model_disagree");
        assert!(picked[0].why.to_string().contains("0.90"));
        assert!(ActiveLearning::off().pick(&disagree).is_empty());
        let sure = decision_of(vec![route(Outcome::Allow, Stage::ReasoningLow, Some(0.05), Some(0.99))]);
        assert!(every.pick(&sure).is_empty(), "nothing to learn from");
        let with_person = decision_of(vec![
            route(Outcome::Allow, Stage::ReasoningLow, Some(0.9), None),
            route(Outcome::NeedsReview, Stage::HumanReview, None, None),
        ]);
        assert!(every.pick(&with_person).is_empty(), "a person sees it anyway");

        // The draw is deterministic per decision and close to the rate over many decisions.
        let tenth = ActiveLearning { rate: 0.1, ..ActiveLearning::default() };
        assert_eq!(tenth.pick(&disagree), tenth.pick(&disagree));
        let drawn_count = (0..2000)
            .filter(|_| {
                let d = decision_of(vec![route(Outcome::Allow, Stage::ReasoningLow, Some(0.9), None)]);
                !tenth.pick(&d).is_empty()
            })
            .count();
        assert!((120..=280).contains(&drawn_count), "{drawn_count} of 2000 at rate 0.1");
    }

    #[test]
    fn an_audit_draws_what_triage_settled_alone_at_its_own_rate_whatever_the_score() {
        let audit_all = ActiveLearning { rate: 0.0, audit_rate: 1.0, ..ActiveLearning::default() };
        // Sure of itself (0.01), so no margin or disagreement would ever pick it: only the audit does.
        let settled = decision_of(vec![
            route(Outcome::Allow, Stage::Triage, Some(0.01), None),
            route(Outcome::Violation, Stage::ReasoningLow, Some(0.95), Some(0.99)),
        ]);
        assert!(ActiveLearning { audit_rate: 0.0, rate: 1.0, ..audit_all }.pick(&settled).is_empty());
        let picked = audit_all.pick(&settled);
        assert_eq!(picked.len(), 1, "only the policy triage settled: {picked:?}");
        assert_eq!(
            picked[0].why,
            SampleReason::TriageAudit { outcome: Outcome::Allow, triage_probability: Some(0.01) }
        );
        assert_eq!(picked[0].why.kind(), "triage_audit");
        assert!(picked[0].why.to_string().contains("allowed"), "{}", picked[0].why);
        let by_rule = decision_of(vec![route(Outcome::Violation, Stage::Triage, None, None)]);
        assert!(audit_all.pick(&by_rule)[0].why.to_string().contains("by a rule"));
        let not_triage = decision_of(vec![route(Outcome::Allow, Stage::ReasoningLow, Some(0.01), Some(0.99))]);
        assert!(audit_all.pick(&not_triage).is_empty(), "the model settled it: nothing of triage's to audit");
        // Another policy of the item went to a person: the one triage settled is audited all the same.
        let with_person = decision_of(vec![
            route(Outcome::NeedsReview, Stage::HumanReview, None, None),
            route(Outcome::Allow, Stage::Triage, Some(0.01), None),
        ]);
        assert_eq!(audit_all.pick(&with_person).len(), 1);
        let samples_too = ActiveLearning { rate: 1.0, ..audit_all };
        assert_eq!(samples_too.pick(&with_person).len(), 1, "no disagreement sample of what a person sees anyway");

        // Of several policies triage settled, one is audited, each as often.
        let mut per_policy = [0usize; 3];
        for _ in 0..900 {
            let mut routes: Vec<PolicyRoute> =
                (0..3).map(|_| route(Outcome::Allow, Stage::Triage, Some(0.01), None)).collect();
            for (i, r) in routes.iter_mut().enumerate() {
                (r.policy, r.policy_hash) = (format!("p{i}"), format!("sha256:p{i}"));
            }
            let picked = audit_all.pick(&decision_of(routes));
            assert_eq!(picked.len(), 1, "{picked:?}");
            assert_eq!(picked[0].policy_hash, format!("sha256:{}", picked[0].policy));
            per_policy[picked[0].policy[1..].parse::<usize>().unwrap()] += 1;
        }
        // 300 each on average; 200 is 7 standard deviations away.
        assert!(per_policy.iter().all(|&n| n >= 200), "{per_policy:?} of 900");

        // The audit's draw is its own: at the same rates, the decisions it picks are not the candidates' picks.
        let (both, tenth) = (
            ActiveLearning { rate: 0.1, audit_rate: 0.1, ..ActiveLearning::default() },
            ActiveLearning { rate: 0.0, audit_rate: 0.1, ..ActiveLearning::default() },
        );
        let (mut audited, mut both_kinds) = (0, 0);
        for _ in 0..2000 {
            let d = decision_of(vec![
                route(Outcome::Allow, Stage::Triage, Some(0.01), None),
                route(Outcome::Allow, Stage::ReasoningLow, Some(0.9), None),
            ]);
            let picked = both.pick(&d);
            assert_eq!(picked, both.pick(&d), "the same decision is drawn the same way");
            audited += usize::from(!tenth.pick(&d).is_empty());
            both_kinds += usize::from(picked.len() == 2);
        }
        assert!((120..=280).contains(&audited), "{audited} of 2000 at audit rate 0.1");
        assert!(both_kinds <= 60, "independent draws pick both about 1% of the time, not 10%: {both_kinds}");
    }

    #[test]
    fn corrections_replace_model_labels_and_weigh_more() {
        let weights = Weights::default();
        let model = LabeledExample {
            id: "a".into(),
            text: "t".into(),
            violates: 1,
            weight: weights.model,
            policy: "spam".into(),
            policy_hash: "sha256:aa".into(),
            source: LabelSource::Model,
            stage: Stage::ReasoningLow,
            model: Some("m".into()),
            effort: Some("low".into()),
            reviewer: None,
            rule_id: None,
            corrects: None,
        };
        let other = LabeledExample { id: "b".into(), text: "u".into(), ..model.clone() };
        let correction = example_from_correction(
            &Correction {
                item_id: "a".into(),
                text: "t".into(),
                policy: "spam".into(),
                policy_hash: "sha256:aa".into(),
                violates: false,
                reviewer: "alice".into(),
                rule_id: Some("SP0".into()),
                corrects: None,
            },
            weights,
        );
        let merged = merge(vec![model.clone(), other], vec![correction]);
        assert_eq!(merged.len(), 2);
        let a = merged.iter().find(|e| e.id == "a").unwrap();
        assert_eq!((a.violates, a.source, a.weight), (0, LabelSource::Human, 5.0));
        let mut buf = Vec::new();
        write_jsonl(&merged, &mut buf).unwrap();
        let lines: Vec<serde_json::Value> =
            String::from_utf8(buf).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert!(
            lines.iter().all(|l| l.get("text").is_some() && l.get("violates").is_some() && l.get("weight").is_some())
        );

        // An appeal (or replay) stores the item again under a new decision: the person's answer to it replaces the
        // original's model label too, and replays of the same item count once.
        let original = LabeledExample { id: "d1".into(), text: "appealed".into(), ..model.clone() };
        let replayed = LabeledExample { id: "d2".into(), violates: 0, ..original.clone() };
        let replayed_again = LabeledExample { id: "d3".into(), ..replayed.clone() };
        let appeal = example_from_correction(
            &Correction {
                item_id: "d4".into(),
                text: "appealed".into(),
                policy: "spam".into(),
                policy_hash: "sha256:aa".into(),
                violates: false,
                reviewer: "bob".into(),
                rule_id: None,
                corrects: None,
            },
            weights,
        );
        let merged = merge(vec![original.clone(), replayed.clone(), replayed_again.clone()], vec![appeal.clone()]);
        let ids: Vec<(&str, LabelSource)> = merged.iter().map(|e| (e.id.as_str(), e.source)).collect();
        assert_eq!(ids, [("d4", LabelSource::Human)]);
        let merged = merge(vec![original, replayed, replayed_again], vec![]);
        assert_eq!(merged.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["d3"]);

        // A review that allowed the item, then the answer to its appeal that found a violation: the item is
        // taught once, the way it was settled last, not both ways at weight 5.
        let reviewed = LabeledExample { id: "d1".into(), reviewer: Some("ana".into()), ..appeal.clone() };
        let appeal_upheld = LabeledExample { id: "d4".into(), violates: 1, ..appeal };
        let merged = merge(vec![], vec![reviewed, appeal_upheld]);
        let kept: Vec<(&str, u8)> = merged.iter().map(|e| (e.id.as_str(), e.violates)).collect();
        assert_eq!(kept, [("d4", 1)]);
    }
}

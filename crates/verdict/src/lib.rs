//! Turn a model's final answer into a validated verdict and an outcome; never a silent allow.
//!
//! The decision rule, in one place ([`decide`]):
//! - the answer must parse per the policy's output format into a clear violation value;
//! - every check that fails adds a [`Flag`]; any flag at all makes the outcome `NeedsReview`;
//! - so `Allow` happens only when the model clearly said "safe" and nothing looked wrong, and
//!   `Violation` only when it clearly said "violation", cited only rules the policy has, and its reasoning
//!   did not conclude otherwise.
//!
//! Parsing is liberal (code fences, prose around the answer, `**1**`, `"violation": "yes"`, trailing commas
//! in JSON) but never guesses: when two different answers are present, the answer is `Unparseable`.

mod answer;
mod combined;
mod confidence;
mod reasoning;

use serde::{Deserialize, Serialize};

use safeguard_policy::{OutputFormat, Policy, RuleSide};

pub use answer::{ParsedAnswer, parse_answer};
pub use combined::{combined_instructions, combined_keys, judge_combined};
pub use reasoning::{Conclusion, reasoning_conclusion};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Allow,
    Violation,
    NeedsReview,
}

/// Why a verdict needs a person. Every flag forces `NeedsReview`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Flag {
    /// Generation ended without a final-channel message (usually the token budget went to reasoning).
    NoFinalMessage,
    /// Generation ran out of tokens mid-message, so the answer is incomplete.
    Truncated,
    /// The final answer does not match the policy's output format, or holds conflicting answers.
    Unparseable { detail: String },
    /// The answer cites a rule id the policy does not define.
    HallucinatedRule { rule_id: String },
    /// The end of the reasoning concludes the opposite of the final answer.
    ReasoningDisagrees { detail: String },
    /// A field the policy asks for is missing from the JSON answer (or a policy is missing from a combined answer).
    MissingField { field: String },
    /// The model asked for a person (ESCALATE / `"action": "escalate"`), or the policy escalates the cited rule.
    Escalated,
    /// The model reported low confidence on a high-risk policy, or on a "safe" answer.
    LowConfidence,
    /// Parts of the answer contradict each other, e.g. `"violation": 1` with `"action": "allow"`.
    Inconsistent { detail: String },
}

impl Flag {
    /// The flag's name as it appears in JSON (`"kind"`), for reports, logs and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Flag::NoFinalMessage => "no_final_message",
            Flag::Truncated => "truncated",
            Flag::Unparseable { .. } => "unparseable",
            Flag::HallucinatedRule { .. } => "hallucinated_rule",
            Flag::ReasoningDisagrees { .. } => "reasoning_disagrees",
            Flag::MissingField { .. } => "missing_field",
            Flag::Escalated => "escalated",
            Flag::LowConfidence => "low_confidence",
            Flag::Inconsistent { .. } => "inconsistent",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// Policy name.
    pub policy: String,
    /// `sha256:…` of the policy body the model read.
    pub policy_hash: String,
    /// None when the answer does not say clearly.
    pub violation: Option<bool>,
    /// The raw label as the model gave it ("1", "INVALID", …).
    pub label: Option<String>,
    pub category: Option<String>,
    pub rule_ids: Vec<String>,
    pub severity: Option<String>,
    /// The model's self-reported confidence (uncalibrated).
    pub confidence: Option<String>,
    pub action: Option<String>,
    pub rationale: Option<String>,
    pub flags: Vec<Flag>,
    pub outcome: Outcome,
}

impl Verdict {
    fn undetermined(policy: &Policy, flags: Vec<Flag>) -> Verdict {
        let mut verdict = Verdict {
            policy: policy.meta.name.clone(),
            policy_hash: policy.hash.to_string(),
            violation: None,
            label: None,
            category: None,
            rule_ids: Vec::new(),
            severity: None,
            confidence: None,
            action: None,
            rationale: None,
            flags,
            outcome: Outcome::NeedsReview,
        };
        verdict.outcome = decide(verdict.violation, &verdict.flags);
        verdict
    }

    fn from_answer(policy: &Policy, answer: ParsedAnswer, mut flags: Vec<Flag>) -> Verdict {
        flags.extend(answer.flags);
        Verdict {
            policy: policy.meta.name.clone(),
            policy_hash: policy.hash.to_string(),
            violation: answer.violation,
            label: answer.label,
            category: answer.category,
            rule_ids: answer.rule_ids,
            severity: answer.severity,
            confidence: answer.confidence,
            action: answer.action,
            rationale: answer.rationale,
            flags,
            outcome: Outcome::NeedsReview,
        }
    }

    fn push_flag(&mut self, flag: Flag) {
        if !self.flags.contains(&flag) {
            self.flags.push(flag);
        }
    }
}

/// The outcome rule: any flag, or no clear violation value, means a person decides.
pub fn decide(violation: Option<bool>, flags: &[Flag]) -> Outcome {
    match (violation, flags.is_empty()) {
        (Some(true), true) => Outcome::Violation,
        (Some(false), true) => Outcome::Allow,
        _ => Outcome::NeedsReview,
    }
}

/// Judge one policy's completion. `truncated` is true when generation ran out of tokens mid-message.
pub fn judge(policy: &Policy, analysis: Option<&str>, final_text: Option<&str>, truncated: bool) -> Verdict {
    let _span = tracing::debug_span!("judge", policy = %policy.meta.name, hash = %policy.hash.short()).entered();
    let mut flags = Vec::new();
    if truncated {
        flags.push(Flag::Truncated);
    }
    let Some(final_text) = final_text.filter(|text| !text.trim().is_empty()) else {
        flags.insert(0, Flag::NoFinalMessage);
        tracing::debug!("no final message");
        return Verdict::undetermined(policy, flags);
    };
    // The policy's own name keys a digit like "Violation:" does ("Spam: 1 - links to …").
    let names = [policy.meta.name.as_str()];
    let answer = answer::parse_answer_named(&policy.meta.output, final_text, &json_fields_asked_for(policy), &names);
    let mut verdict = Verdict::from_answer(policy, answer, flags);
    validate(policy, &mut verdict, analysis);
    verdict.outcome = decide(verdict.violation, &verdict.flags);
    tracing::debug!(outcome = ?verdict.outcome, flags = verdict.flags.len(), "judged");
    verdict
}

/// Fields the policy's JSON format asks for: those it names in double quotes, plus `violation` always.
/// A user policy that only asks for `{"violation": …, "policy_category": …}` is not punished for the
/// rationale it never requested.
fn json_fields_asked_for(policy: &Policy) -> Vec<&'static str> {
    if !matches!(policy.meta.output, OutputFormat::Json) {
        return Vec::new();
    }
    let mut fields = vec!["violation"];
    for field in ["policy_category", "rule_ids", "confidence", "rationale"] {
        if policy.body.contains(&format!("\"{field}\"")) {
            fields.push(field);
        }
    }
    fields
}

/// Checks shared by single and combined judging.
fn validate(policy: &Policy, verdict: &mut Verdict, analysis: Option<&str>) {
    let in_prose = cite_rules_in_prose(policy, verdict);
    for rule_id in verdict.rule_ids.iter().chain(&in_prose).cloned().collect::<Vec<_>>() {
        // A tier the policy declares only in `categories:` is citable too, as a category of that name is below.
        if !policy.knows_category(&rule_id) {
            verdict.push_flag(Flag::HallucinatedRule { rule_id });
        }
    }
    if let Some(detail) = cites_the_other_side(policy, verdict) {
        verdict.push_flag(Flag::Inconsistent { detail });
    }
    if let Some(category) = verdict.category.clone()
        && safeguard_policy::is_rule_id(&category)
        && !policy.knows_rule(&category)
        && !policy.meta.categories.contains(&category)
    {
        verdict.push_flag(Flag::HallucinatedRule { rule_id: category });
    }
    if let (Some(violation), Some(analysis)) = (verdict.violation, analysis)
        && let Some(conclusion) = reasoning_conclusion(analysis, &policy.meta.output)
    {
        match &conclusion.contested_by {
            // Reasoning that ends on both sides backs a violation (one side of it says so) but never an allow.
            Some(other) if !violation => verdict.push_flag(Flag::ReasoningDisagrees {
                detail: format!(
                    "the reasoning ends on both sides (\"{other}\", \"{}\") but the final answer says no violation",
                    conclusion.phrase
                ),
            }),
            Some(_) => {}
            None if conclusion.violation != violation => verdict.push_flag(Flag::ReasoningDisagrees {
                detail: format!(
                    "the reasoning ends with \"{}\" but the final answer says {}",
                    conclusion.phrase,
                    if violation { "violation" } else { "no violation" }
                ),
            }),
            None => {}
        }
    }
    let prose_escalates = in_prose.iter().any(|id| cites_tier(id, &policy.meta.escalate_on));
    if verdict.violation == Some(true) && (escalates(policy, verdict) || prose_escalates) {
        verdict.push_flag(Flag::Escalated);
    }
    let low_confidence = verdict.confidence.as_deref().is_some_and(|c| !confidence::is_sure(c));
    if low_confidence && (policy.meta.high_risk || verdict.violation == Some(false)) {
        verdict.push_flag(Flag::LowConfidence);
    }
    if let Some(detail) = severity_mismatch(policy, verdict) {
        verdict.push_flag(Flag::Inconsistent { detail });
    }
    if let (Some(violation), Some(action)) = (verdict.violation, verdict.action.as_deref())
        && answer::action_takes_down(action) == Some(!violation)
    {
        let action = answer::normalize_action(action);
        verdict.push_flag(Flag::Inconsistent {
            detail: format!("\"action\": \"{action}\" contradicts violation {}", u8::from(violation)),
        });
    }
}

/// Severities that mean "no harm": what a safe answer carries. The starter formats ask for `"severity": "none"`
/// on a safe answer; `null`, `""` and `"n/a"` say the same.
const NO_SEVERITY: [&str; 7] = ["none", "n/a", "na", "null", "nil", "0", "not applicable"];

/// A severity that does not fit the answer: a safe answer with a harm severity ("violation": 0, "severity":
/// "high" says the model saw harm), or a violation with a severity the policy does not declare ("none", a made-up
/// level), when the policy declares its severities.
fn severity_mismatch(policy: &Policy, verdict: &Verdict) -> Option<String> {
    let violation = verdict.violation?;
    let severity = verdict.severity.as_deref()?;
    let level = severity.trim_matches(|c: char| c.is_whitespace() || "*`\"'.,:;!?()[]".contains(c)).to_lowercase();
    if level.is_empty() {
        return None;
    }
    if !violation && !NO_SEVERITY.contains(&level.as_str()) {
        return Some(format!("\"severity\": \"{severity}\" contradicts violation 0"));
    }
    let declared = &policy.meta.severities;
    if violation && !declared.is_empty() && !declared.iter().any(|known| known.trim().eq_ignore_ascii_case(&level)) {
        return Some(format!(
            "\"severity\": \"{severity}\" is not one of the policy's severities ({})",
            declared.join(", ")
        ));
    }
    None
}

/// Rule ids the model wrote into its category or rationale rather than its `rule_ids`. Only ids shaped like this
/// policy's (same letters: `HT` for the hate policy) count, so "WW2" or "MP3" is not read as a rule.
///
/// A category is a short name for what the model found, so an id of ours anywhere in it ("HT3 (threats)",
/// "Dehumanization (HT2)") names the tier as much as a bare "HT3" does: it joins `rule_ids` and faces every check.
/// One the category rules out ("none (HT3 not met)") is returned with the rationale's ids. A rationale is prose, and prose names rules
/// in passing, safe answers most of all ("quotes the slogan (HT3.b) to expose it (HT0.b)", "VI3.a would require a
/// credible threat"): its ids are returned apart, to be checked only for existence (a dotted id the policy does
/// not have is made up) and for escalation, never for which side of the line the answer is on.
fn cite_rules_in_prose(policy: &Policy, verdict: &mut Verdict) -> Vec<String> {
    let prefixes: Vec<&str> = policy
        .rule_ids
        .iter()
        .chain(policy.meta.categories.iter().filter(|category| safeguard_policy::is_rule_id(category)))
        .map(|id| &id[..id.find(|c: char| !c.is_ascii_uppercase()).unwrap_or(id.len())])
        .filter(|prefix| !prefix.is_empty())
        .collect();
    let ours = |id: &str| prefixes.contains(&&id[..id.find(|c: char| c.is_ascii_digit()).unwrap_or(id.len())]);
    // The id a category opens with is what it names ("HT2 (not HT3)", "SX3 - minors (no images)"), whatever
    // follows. A later id the category rules out ("SX3 (not SX1)") is still named: it is checked as prose is, for
    // existence and escalation, never dropped.
    let mut prose: Vec<String> = Vec::new();
    if let Some(category) = verdict.category.clone().filter(|category| !safeguard_policy::is_rule_id(category)) {
        let opening =
            category.len() - category.trim_start_matches(|c: char| c.is_whitespace() || "*`\"'([".contains(c)).len();
        for (at, id) in safeguard_policy::find_rule_ids(&category).into_iter().filter(|&(_, id)| ours(id)) {
            let id = id.to_string();
            if at == opening || !answer::citation_negated(&category, at, at + id.len()) {
                if !verdict.rule_ids.contains(&id) {
                    verdict.rule_ids.push(id);
                }
            } else if !prose.contains(&id) {
                prose.push(id);
            }
        }
    }
    for text in verdict.rationale.iter() {
        for (at, id) in safeguard_policy::find_rule_ids(text) {
            // A bare id in prose may be anything with the same letters ("SP500 index funds"); a dotted one is a rule.
            let cited = (id.contains('.') || policy.knows_category(id)) && ours(id);
            if cited && !answer::citation_negated(text, at, at + id.len()) && !prose.iter().any(|p| p == id) {
                prose.push(id.to_string());
            }
        }
    }
    prose
}

/// An answer whose cited rules sit on the other side of the policy's line from its label: "0" citing a rule the
/// policy lists under VIOLATES, or "1" citing only rules it lists as not violating. Either the label or the
/// citation is wrong, and which one is for a person to say. The category counts as a citation: a
/// `"policy_category": "HT3"` names the tier the model found, as much as a rule id does.
fn cites_the_other_side(policy: &Policy, verdict: &Verdict) -> Option<String> {
    let violation = verdict.violation?;
    let mut cited: Vec<&String> = Vec::new();
    for id in verdict.cited() {
        if !cited.contains(&id) {
            cited.push(id);
        }
    }
    let sides = policy.rule_sides();
    let sided: Vec<(&String, RuleSide)> =
        cited.into_iter().filter_map(|id| sides.side(id).map(|side| (id, side))).collect();
    if violation {
        let all_allowed = !sided.is_empty() && sided.iter().all(|(_, side)| *side == RuleSide::Allowed);
        let cited: Vec<&str> = sided.iter().map(|(id, _)| id.as_str()).collect();
        all_allowed.then(|| {
            format!(
                "the answer says violation but cites only {}, which the policy lists as not violating",
                cited.join(", ")
            )
        })
    } else {
        let against: Vec<&str> =
            sided.iter().filter(|(_, side)| *side == RuleSide::Violates).map(|(id, _)| id.as_str()).collect();
        (!against.is_empty()).then(|| {
            format!(
                "the answer says no violation but cites {}, which the policy lists as violating",
                against.join(", ")
            )
        })
    }
}

/// The policy's `escalate_on` list names rule ids or tiers whose violations always go to a person.
fn escalates(policy: &Policy, verdict: &Verdict) -> bool {
    verdict.cites_any(&policy.meta.escalate_on)
}

impl Verdict {
    /// The rule ids the verdict cites, then its category.
    pub fn cited(&self) -> impl Iterator<Item = &String> {
        self.rule_ids.iter().chain(self.category.iter())
    }

    /// Whether the verdict's category or a rule id it cites is one of `tiers` or inside one: `SX3` covers `SX3`
    /// and `SX3.a`, not `SX30`.
    pub fn cites_any(&self, tiers: &[String]) -> bool {
        self.cited().any(|cited| cites_tier(cited, tiers))
    }
}

/// Whether `cited` is one of `tiers` or inside one: `SX3` covers `SX3` and `SX3.a`, not `SX30`.
fn cites_tier(cited: &str, tiers: &[String]) -> bool {
    tiers
        .iter()
        .any(|tier| cited == tier || cited.strip_prefix(tier.as_str()).is_some_and(|rest| rest.starts_with('.')))
}

/// Any undecided verdict makes the whole item undecided; otherwise any violation wins. No verdicts at all
/// is undecided too: nothing was checked.
pub fn overall_outcome(verdicts: &[Verdict]) -> Outcome {
    if verdicts.is_empty() || verdicts.iter().any(|v| v.outcome == Outcome::NeedsReview) {
        Outcome::NeedsReview
    } else if verdicts.iter().any(|v| v.outcome == Outcome::Violation) {
        Outcome::Violation
    } else {
        Outcome::Allow
    }
}

#[cfg(test)]
mod tests;

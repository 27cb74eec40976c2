//! A policy's `routing:` front matter: the efforts and thresholds it is judged with where the server's defaults do
//! not fit it. A bulk spam policy can stay at low effort and trust a fairly sure answer; a self-harm policy can
//! start at medium, escalate to high and send anything less than very sure to a person.
//!
//! ```yaml
//! routing:
//!   first_effort: medium
//!   escalation_effort: high
//!   min_engine_confidence: 0.8
//!   escalate_on_triage_disagreement: true
//!   high_risk_categories: [SH3]
//!   flagged_effort: high
//! ```

use safeguard_harmony::Effort;
use safeguard_policy::Policy;
use serde::Deserialize;

/// The `routing:` section as written; every key is optional and falls back to the server's setting.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingSection {
    /// The effort the model first reasons at (high-risk policies start at the escalation effort, appeals at high).
    #[serde(default)]
    pub first_effort: Option<Effort>,
    /// The effort a shaky answer is asked again at; the last one before a person.
    #[serde(default)]
    pub escalation_effort: Option<Effort>,
    /// Below this probability of the answer token, the answer is asked again, or at the escalation effort goes
    /// to a person.
    #[serde(default)]
    pub min_engine_confidence: Option<f32>,
    /// Ask again when the model answers the other way from triage's lean.
    #[serde(default)]
    pub escalate_on_triage_disagreement: Option<bool>,
    /// Rule ids or tiers (`SH3` covers `SH3.a`) whose violations, found below the escalation effort, are asked
    /// again there before they stand: a cheap answer is not enough to act on the worst harms.
    #[serde(default)]
    pub high_risk_categories: Vec<String>,
    /// The effort for content a triage `flag` rule matched (the policy author's "look at this closely"); unset,
    /// the escalation effort. Kept between the first and the escalation effort.
    #[serde(default)]
    pub flagged_effort: Option<Effort>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("policy {policy:?} front matter routing: {message}")]
pub struct RoutingSectionError {
    pub policy: String,
    pub message: String,
}

/// Reads a policy's `routing:` section; an empty one when it has none. A misspelt key, an unknown effort, a
/// confidence outside 0..1 or a first effort above the escalation effort is an error, never a setting silently
/// ignored: the server refuses such a policy and `policy lint` reports it.
pub fn routing_section(policy: &Policy) -> Result<RoutingSection, RoutingSectionError> {
    let error = |message: String| RoutingSectionError { policy: policy.meta.name.clone(), message };
    let section = read_routing_section(policy)?;
    if let Some(confidence) = section.min_engine_confidence
        && !(0.0..=1.0).contains(&confidence)
    {
        return Err(error(format!("min_engine_confidence must be within 0..1, not {confidence}")));
    }
    if let (Some(first), Some(escalation)) = (section.first_effort, section.escalation_effort)
        && first > escalation
    {
        return Err(error(format!("first_effort {first} is above escalation_effort {escalation}")));
    }
    // Matched exactly against what the model cites: a tier the policy does not define would never match.
    if let Some(unknown) = section.high_risk_categories.iter().find(|category| !policy.knows_category(category)) {
        return Err(error(format!(
            "high_risk_categories: `{unknown}` is not a rule id, tier or category of this policy"
        )));
    }
    if let Some(flagged) = section.flagged_effort {
        if let Some(first) = section.first_effort.filter(|first| flagged < *first) {
            return Err(error(format!("flagged_effort {flagged} is below first_effort {first}")));
        }
        if let Some(escalation) = section.escalation_effort.filter(|escalation| flagged > *escalation) {
            return Err(error(format!("flagged_effort {flagged} is above escalation_effort {escalation}")));
        }
    }
    Ok(section)
}

/// The section as written, unchecked: what [`routing_section`] validates. A policy stored before a check was added
/// may fail it; its settings are still what its author asked for, and dropping them would route it more loosely.
pub fn read_routing_section(policy: &Policy) -> Result<RoutingSection, RoutingSectionError> {
    let Some(value) = policy.meta.extra.get("routing") else {
        return Ok(RoutingSection::default());
    };
    RoutingSection::deserialize(value)
        .map_err(|e| RoutingSectionError { policy: policy.meta.name.clone(), message: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(section: &str) -> Policy {
        Policy::parse(&format!("---\nname: p\noutput: binary\nrouting:\n{section}\n---\n# P\nReturn 0 or 1.")).unwrap()
    }

    #[test]
    fn a_policy_sets_its_own_efforts_and_thresholds_and_mistakes_are_errors() {
        let section = routing_section(&with(
            "  first_effort: medium\n  escalation_effort: high\n  min_engine_confidence: 0.8\n  escalate_on_triage_disagreement: false",
        ))
        .unwrap();
        assert_eq!(
            section,
            RoutingSection {
                first_effort: Some(Effort::Medium),
                escalation_effort: Some(Effort::High),
                min_engine_confidence: Some(0.8),
                escalate_on_triage_disagreement: Some(false),
                high_risk_categories: Vec::new(),
                flagged_effort: None,
            }
        );
        let plain = Policy::parse("---\nname: plain\noutput: binary\n---\n# P\nReturn 0 or 1.").unwrap();
        assert_eq!(routing_section(&plain).unwrap(), RoutingSection::default());
        let tiered = Policy::parse(
            "---\nname: t\noutput: binary\nrouting:\n  high_risk_categories: [SH3, SH2.a]\n---\n# Self-harm (SH)\n\n## VIOLATES\n- SH2.a Methods.\n- SH3.a Encouragement.\n\nReturn 0 or 1.",
        )
        .unwrap();
        assert_eq!(routing_section(&tiered).unwrap().high_risk_categories, ["SH3", "SH2.a"], "a tier and a rule id");
        let categorised = Policy::parse(
            "---\nname: c\noutput: binary\ncategories: [fraud]\nrouting:\n  high_risk_categories: [fraud]\n---\n# C\nReturn 0 or 1.",
        )
        .unwrap();
        assert_eq!(routing_section(&categorised).unwrap().high_risk_categories, ["fraud"], "a front-matter category");

        for (bad, says) in [
            ("  first_effort: extreme", "extreme"),
            ("  min_engine_confidence: 1.5", "within 0..1"),
            ("  min_engine_confidence: -0.1", "within 0..1"),
            ("  first_effort: high\n  escalation_effort: low", "above escalation_effort"),
            ("  first_effort: medium\n  flagged_effort: low", "below first_effort"),
            ("  escalation_effort: medium\n  flagged_effort: high", "above escalation_effort"),
            ("  min_confidence: 0.9", "min_confidence"),
            ("  escalate_on_triage_disagreement: sometimes", "sometimes"),
            ("  high_risk_categories: [SH3]", "`SH3` is not a rule id, tier or category"),
        ] {
            let error = routing_section(&with(bad)).unwrap_err().to_string();
            assert!(error.contains(says) && error.contains("routing"), "{bad:?}: {error}");
        }
    }
}

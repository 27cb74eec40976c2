//! Fast triage: rules (keywords, regexes, allow/deny lists) and a learned hashed n-gram classifier.
//!
//! Triage is the cheap first layer of the cascade triage → reasoning model → human review. It only
//! decides what it is confident about; everything else goes on to the model.
//!
//! # Precedence in [`Triage::route`]
//! 1. A deny rule → `ConfidentViolation` (rules are the operator's explicit word).
//! 2. An allow rule → `ConfidentBenign`, unless the classifier says `p >= violate_above`: an allow list
//!    entry that the classifier confidently disputes goes to the model (`Uncertain`) rather than through.
//! 3. Flag evidence → never `ConfidentBenign` (at least `Uncertain`; `ConfidentViolation` if the classifier
//!    is confident).
//! 4. Otherwise the classifier's calibrated probability: `p < allow_below` → `ConfidentBenign`,
//!    `p >= violate_above` → `ConfidentViolation`, else `Uncertain`.
//! 5. With no classifier and no deciding rule → `Uncertain`.

pub mod bench;
pub mod calibrate;
pub mod data;
pub mod features;
pub mod model;
pub mod rules;
pub mod train;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use calibrate::{BandMetrics, Calibration};
pub use data::{Dataset, DatasetFields, DatasetProvenance, LabelValue, load_dataset};
pub use features::{FeatureConfig, Featurizer};
pub use model::{FitOptions, ModelMeta, Thresholds, TriageModel, fit};
pub use rules::{RuleDecision, RuleMatch, RuleSet, RulesConfig, Span, SpanKind};
pub use train::{ClassWeight, DomainAdaptation, Example, TrainConfig};

#[derive(Debug, thiserror::Error)]
pub enum TriageError {
    #[error("invalid triage configuration: {0}")]
    InvalidConfig(String),
    #[error("training failed: {0}")]
    Training(String),
    #[error("invalid triage model artifact: {0}")]
    InvalidArtifact(String),
    #[error("dataset: {0}")]
    Dataset(String),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Band {
    /// Skip the reasoning model: allow.
    ConfidentBenign,
    /// Ask the reasoning model.
    Uncertain,
    /// Violation without the model (a deny rule, or a very confident classifier).
    ConfidentViolation,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TriageResult {
    /// Raw classifier logit; `None` without a classifier.
    pub score: Option<f32>,
    pub calibrated_probability: Option<f32>,
    pub band: Band,
    /// `None` without rules.
    pub rule_match: Option<RuleMatch>,
}

/// Rules and/or a classifier for one policy. Immutable after construction; share it across threads.
#[derive(Debug)]
pub struct Triage {
    rules: Option<RuleSet>,
    model: Option<TriageModel>,
}

impl Triage {
    pub fn new(rules: Option<RuleSet>, model: Option<TriageModel>) -> Self {
        Triage { rules, model }
    }

    pub fn model(&self) -> Option<&TriageModel> {
        self.model.as_ref()
    }

    pub fn rules(&self) -> Option<&RuleSet> {
        self.rules.as_ref()
    }

    /// Decides which band `text` falls in; see the crate docs for the precedence.
    pub fn route(&self, text: &str) -> TriageResult {
        let rule_match = self.rules.as_ref().map(|r| r.evaluate(text));
        let decision = rule_match.as_ref().map_or(RuleDecision::None, |m| m.decision);
        let flagged = rule_match.as_ref().is_some_and(|m| m.flagged());
        if decision == RuleDecision::Deny {
            // The classifier is not consulted: the rule decides, and skipping it keeps deny hits cheap.
            return TriageResult {
                score: None,
                calibrated_probability: None,
                band: Band::ConfidentViolation,
                rule_match,
            };
        }
        let scored = self.model.as_ref().map(|m| {
            let margin = m.margin(text);
            (margin, m.meta.calibration.probability(margin), &m.meta.thresholds)
        });
        let confident_violation = scored.is_some_and(|(_, p, t)| t.violate_above.is_some_and(|v| p >= v));
        let band = if decision == RuleDecision::Allow {
            if confident_violation { Band::Uncertain } else { Band::ConfidentBenign }
        } else if confident_violation {
            Band::ConfidentViolation
        } else {
            match scored {
                Some((_, p, t)) if p < t.allow_below && !flagged => Band::ConfidentBenign,
                _ => Band::Uncertain,
            }
        };
        TriageResult { score: scored.map(|s| s.0), calibrated_probability: scored.map(|s| s.1), band, rule_match }
    }
}

/// Routes with a shared triage; the free-function form of [`Triage::route`].
pub fn route(triage: &Triage, text: &str) -> TriageResult {
    triage.route(text)
}

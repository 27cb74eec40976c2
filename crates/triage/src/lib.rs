//! Fast triage: rules (keywords, regexes, allow/deny lists) and a learned hashed n-gram classifier.
//!
//! Triage is the cheap first layer of the cascade triage → reasoning model → human review. It only
//! decides what it is confident about; everything else goes on to the model.
//!
//! # Precedence in [`Triage::route`]
//! 1. A deny rule → `ConfidentViolation` (rules are the operator's explicit word).
//! 2. Flag evidence → never `ConfidentBenign`, even beside an allow match (at least `Uncertain`;
//!    `ConfidentViolation` if the classifier is confident).
//! 3. An allow rule → `ConfidentBenign`, unless the classifier leans to a violation (`p >= violate_above`, or
//!    `p >= 0.5` when it earned no violating band): an allow match the classifier disputes goes to the model
//!    (`Uncertain`) rather than through. A text carrying invisible text (tag characters) matches no allow rule.
//! 4. Otherwise the classifier's calibrated probability: `p < allow_below` → `ConfidentBenign`,
//!    `p >= violate_above` → `ConfidentViolation`, else `Uncertain`.
//! 5. With no classifier and no deciding rule → `Uncertain`.
//!
//! With an embedding head on the model, the head must also agree before anything is allowed: an item is
//! `ConfidentBenign` only if the head scores it below its threshold *and* it would otherwise be allowed (an
//! allow rule the classifier does not dispute, or no deny/flag evidence and no confident violation). The
//! n-gram classifier's `allow_below` no longer decides by itself: the head replaces it as the benign gate,
//! while the classifier and rules still send items on or mark them violations as before. A head that cannot
//! score (encoder failure) never allows. The head is only run when its answer could allow the item. A text
//! longer than the encoder reads (about 250 word pieces) is allowed only if the head scores what it read below
//! its threshold and the classifier, which read all of it, scores it below `allow_below`.

pub mod bench;
pub mod calibrate;
pub mod data;
pub mod embedding;
pub mod features;
pub mod model;
pub mod rules;
pub mod train;

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use calibrate::{BandMetrics, Calibration};
pub use data::{Dataset, DatasetFields, DatasetProvenance, LabelValue, load_dataset};
pub use embedding::{
    EmbeddingHead, EmbeddingHeadMeta, HeadOptions, HeadScore, LoadedEncoder, NeighbourOptions, shared_encoder,
};
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
    /// The sentence encoder of an embedding head could not be found, loaded or run.
    #[error("sentence encoder: {0}")]
    Encoder(String),
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
    /// The embedding head's say; `None` without a head or when nothing the head says could allow the item.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding: Option<EmbeddingEvidence>,
    /// The trained classifier that scored the item; `None` when only rules decided (a deny rule, or a policy
    /// without a usable model). Models are hot-reloaded, so this is what ties a decision to its artifact.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "shared_model_ref")]
    pub model: Option<Arc<TriageModelRef>>,
}

/// Serde for the shared identity as for the plain one (serde's own `Arc` support is behind a feature that would
/// rebuild every crate's serde).
mod shared_model_ref {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::TriageModelRef;

    pub fn serialize<S: Serializer>(model: &Option<Arc<TriageModelRef>>, out: S) -> Result<S::Ok, S::Error> {
        model.as_deref().serialize(out)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(input: D) -> Result<Option<Arc<TriageModelRef>>, D::Error> {
        Ok(Option::<TriageModelRef>::deserialize(input)?.map(Arc::new))
    }
}

/// Which triage model artifact scored an item: enough to find it (weights digest, creation time), to see what it
/// was asked to do (its thresholds) and what it was trained for (the policy hash). All of it from `model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TriageModelRef {
    /// Hex SHA-256 of `weights.bin`, as recorded in `model.json` and checked on load.
    pub weights_sha256: String,
    /// When the model was trained (RFC 3339, UTC): tells apart artifacts that share weights but not calibration.
    pub created: String,
    /// `sha256:…` of the policy body the model was trained for.
    pub policy_hash: String,
    /// Calibrated probability below which the classifier calls an item benign.
    pub allow_below: f32,
    /// At or above it, a confident violation; `null` when the model has none.
    pub violate_above: Option<f32>,
}

impl TriageModelRef {
    pub fn of(meta: &ModelMeta) -> Self {
        TriageModelRef {
            weights_sha256: meta.weights.sha256.clone(),
            created: meta.created.clone(),
            policy_hash: meta.policy_hash.clone(),
            allow_below: meta.thresholds.allow_below,
            violate_above: meta.thresholds.violate_above,
        }
    }
}

/// What the embedding head said about an item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingEvidence {
    /// The head's logit; `None` when the encoder failed (see `error`).
    pub score: Option<f32>,
    /// Items scoring below this may be allowed.
    pub threshold: f32,
    /// Whether the head lets the item through: `score < threshold`, compared at full precision, on a text the
    /// encoder read whole.
    pub allows: bool,
    /// The text was longer than the encoder reads (about 250 word pieces), so the head saw only its start and
    /// allows nothing; the classifier, which reads the whole text, may still allow it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub text_cut: bool,
    /// Violation share among the item's nearest stored neighbours (already part of `score`), for heads
    /// that take the vote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neighbour_share: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Rules and/or a classifier for one policy. Immutable after construction; share it across threads.
#[derive(Debug)]
pub struct Triage {
    rules: Option<RuleSet>,
    model: Option<TriageModel>,
    /// Why the policy's trained model is not here though it has one.
    model_unusable: Option<String>,
}

impl Triage {
    pub fn new(rules: Option<RuleSet>, model: Option<TriageModel>) -> Self {
        Triage { rules, model, model_unusable: None }
    }

    /// The rules of a policy whose trained model cannot be used (it does not load, or was trained for another
    /// version). Its allow rules were written to be checked by that model, so without it they skip nothing;
    /// deny and flag rules act as usual.
    pub fn without_its_model(rules: Option<RuleSet>, why: impl Into<String>) -> Self {
        Triage { rules, model: None, model_unusable: Some(why.into()) }
    }

    /// Why the policy's trained model is missing from this triage, if it has one that could not be used.
    pub fn model_unusable(&self) -> Option<&str> {
        self.model_unusable.as_deref()
    }

    pub fn model(&self) -> Option<&TriageModel> {
        self.model.as_ref()
    }

    pub fn rules(&self) -> Option<&RuleSet> {
        self.rules.as_ref()
    }

    /// Approximately how many bytes of heap this triage holds: its compiled rules ([`RuleSet::memory_usage`]) and
    /// its model's weights ([`TriageModel::memory_usage`]). A sentence encoder is shared by every model that uses
    /// it and loaded once per process, so it is not counted here.
    pub fn memory_usage(&self) -> usize {
        let rules = self.rules.as_ref().map_or(0, RuleSet::memory_usage);
        let model = self.model.as_ref().map_or(0, TriageModel::memory_usage);
        let unusable = self.model_unusable.as_ref().map_or(0, String::capacity);
        rules.saturating_add(model).saturating_add(unusable)
    }

    /// Whether routing runs the sentence encoder (tens of milliseconds of CPU): callers on an async runtime
    /// should then route on a blocking thread.
    pub fn has_embedding_head(&self) -> bool {
        self.model.as_ref().is_some_and(|m| m.embedding_head().is_some())
    }

    /// Decides which band `text` falls in; see the crate docs for the precedence.
    pub fn route(&self, text: &str) -> TriageResult {
        let lookalikes = rules::LookalikeScan::of(text);
        let mut rule_match = self.rules.as_ref().map(|r| r.evaluate_scanned(text, &lookalikes));
        // Letters in disguise are evidence whatever rules the policy has: the classifier reads "b\u{43E}mb" as a
        // word it never saw, and would skip the model on it as readily as on a typo.
        let disguised = lookalikes.disguised_words();
        if !disguised.is_empty() {
            rule_match.get_or_insert_with(RuleMatch::nothing).flag_disguised(disguised);
        }
        let decision = rule_match.as_ref().map_or(RuleDecision::None, |m| m.decision);
        let flagged = rule_match.as_ref().is_some_and(|m| m.flagged());
        if decision == RuleDecision::Deny {
            // The classifier is not consulted: the rule decides, and skipping it keeps deny hits cheap.
            return TriageResult {
                score: None,
                calibrated_probability: None,
                band: Band::ConfidentViolation,
                rule_match,
                embedding: None,
                model: None,
            };
        }
        let scored = self.model.as_ref().map(|m| {
            let margin = m.margin(text);
            (margin, m.meta.calibration.probability(margin), &m.meta.thresholds)
        });
        let confident_violation = scored.is_some_and(|(_, p, t)| t.violate_above.is_some_and(|v| p >= v));
        let head = self.model.as_ref().and_then(TriageModel::embedding_head);
        let mut embedding = None;
        // The head's score is below its threshold (whether or not it read the whole text).
        let mut head_below = false;
        let mut head_allows = |head: &EmbeddingHead| {
            let (evidence, below) = head_evidence(head, text);
            let allows = evidence.allows;
            head_below = below;
            embedding = Some(evidence);
            allows
        };
        // Flag evidence outranks an allow match: an allow keyword is a substring ("thanks"), and text that also
        // names what the operator wants looked at ("pipe bomb") must not pass on the politeness beside it.
        // An allow keyword is a substring: it does not outweigh a classifier that leans to a violation, even one
        // whose precision never earned it a violating band (`violate_above` unset; then above an even chance).
        let leans_violating =
            scored.is_some_and(|(_, p, t)| t.violate_above.map_or(p >= 0.5, |violate_above| p >= violate_above));
        let band = if decision == RuleDecision::Allow && !flagged {
            match head {
                _ if leans_violating || self.model_unusable.is_some() => Band::Uncertain,
                Some(h) if !head_allows(h) => Band::Uncertain,
                _ => Band::ConfidentBenign,
            }
        } else if confident_violation {
            Band::ConfidentViolation
        } else if flagged {
            Band::Uncertain
        } else {
            let allowed_by_classifier = scored.is_some_and(|(_, p, t)| p < t.allow_below);
            match head {
                Some(h) if head_allows(h) => Band::ConfidentBenign,
                // A harmful request after a page of harmless text lies past what the head read: a text it read
                // only the start of needs the classifier, which read all of it, to agree.
                Some(_) if head_below && embedding.as_ref().is_some_and(|e| e.text_cut) && allowed_by_classifier => {
                    Band::ConfidentBenign
                }
                None if allowed_by_classifier => Band::ConfidentBenign,
                _ => Band::Uncertain,
            }
        };
        TriageResult {
            score: scored.map(|s| s.0),
            calibrated_probability: scored.map(|s| s.1),
            band,
            rule_match,
            embedding,
            model: self.model.as_ref().map(TriageModel::identity),
        }
    }
}

/// What the head said, and whether its score is below its threshold (compared at full precision).
fn head_evidence(head: &EmbeddingHead, text: &str) -> (EmbeddingEvidence, bool) {
    let threshold = head.meta.threshold;
    match head.score(text) {
        Ok(scored) => {
            let below = scored.score < threshold;
            let evidence = EmbeddingEvidence {
                score: Some(scored.score as f32),
                threshold: threshold as f32,
                allows: below && !scored.text_cut,
                text_cut: scored.text_cut,
                neighbour_share: scored.neighbour_share.map(|s| s as f32),
                error: None,
            };
            (evidence, below)
        }
        Err(e) => {
            tracing::warn!(error = %e, "embedding head failed; the item goes on to the model");
            let evidence = EmbeddingEvidence {
                score: None,
                threshold: threshold as f32,
                allows: false,
                text_cut: false,
                neighbour_share: None,
                error: Some(e.to_string()),
            };
            (evidence, false)
        }
    }
}

/// Routes with a shared triage; the free-function form of [`Triage::route`].
pub fn route(triage: &Triage, text: &str) -> TriageResult {
    triage.route(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_evidence_outranks_an_allow_match_and_deny_outranks_both() {
        let config: RulesConfig = serde_json::from_value(serde_json::json!({
            "keywords": [
                {"name": "greeting", "action": "allow", "keywords": ["thanks"]},
                {"name": "weapons", "action": "flag", "keywords": ["pipe bomb"]},
                {"name": "scam", "action": "deny", "keywords": ["free bitcoin"]}
            ]
        }))
        .unwrap();
        let triage = Triage::new(Some(RuleSet::compile(&config).unwrap()), None);
        let band = |text: &str| triage.route(text).band;
        assert_eq!(band("thanks a lot"), Band::ConfidentBenign);
        assert_eq!(band("thanks! how do I build a pipe bomb"), Band::Uncertain);
        assert_eq!(band("how do I build a pipe bomb"), Band::Uncertain);
        assert_eq!(band("thanks for the free bitcoin"), Band::ConfidentViolation);
        assert_eq!(band("what a day"), Band::Uncertain, "no rule and no classifier decides nothing");
        // An allow keyword does not pass a text with letters in disguise.
        let disguised = "thanks, now the b\u{43E}mb recipe";
        let routed = triage.route(disguised);
        assert_eq!(routed.band, Band::Uncertain);
        let evidence = &routed.rule_match.as_ref().unwrap().evidence;
        let spans: Vec<(&str, SpanKind)> = evidence.iter().map(|s| (&disguised[s.start..s.end], s.kind)).collect();
        assert_eq!(spans, [("thanks", SpanKind::Keyword), ("b\u{43E}mb", SpanKind::Disguise)], "{evidence:?}");

        // The same rules for a policy whose model failed to load: the allow rule no longer skips anything.
        let degraded = Triage::without_its_model(Some(RuleSet::compile(&config).unwrap()), "weights.bin is corrupt");
        assert_eq!(degraded.route("thanks a lot").band, Band::Uncertain);
        assert_eq!(degraded.route("thanks for the free bitcoin").band, Band::ConfidentViolation);
        assert_eq!(degraded.model_unusable(), Some("weights.bin is corrupt"));
    }

    /// A classifier whose every probability is `p`, with no violating band of its own.
    fn pinned_model(p: f64) -> TriageModel {
        let examples: Vec<Example> = (0..20)
            .map(|i| Example {
                text: if i % 2 == 0 { format!("buy followers {i}") } else { format!("see you at lunch {i}") },
                violates: i % 2 == 0,
                weight: 1.0,
                source: 0,
            })
            .collect();
        let options = FitOptions { folds: 2, min_violate_support: 1, ..FitOptions::default() };
        let mut model = fit(&examples, vec![], &options).unwrap();
        model.meta.calibration = Calibration::Platt { a: 1e-9, b: (p / (1.0 - p)).ln() };
        model.meta.thresholds =
            Thresholds { target_recall: 0.99, allow_below: 0.05, target_precision: 0.99, violate_above: None };
        model
    }

    /// An allow keyword is a substring, and does not outweigh a classifier leaning to a violation, even one whose
    /// precision earned it no violating band.
    #[test]
    fn an_allow_keyword_does_not_outweigh_a_classifier_that_leans_to_a_violation() {
        let config: RulesConfig = serde_json::from_value(serde_json::json!({
            "keywords": [{"name": "greeting", "action": "allow", "keywords": ["thanks"]}]
        }))
        .unwrap();
        let route = |p: f64, text: &str| {
            Triage::new(Some(RuleSet::compile(&config).unwrap()), Some(pinned_model(p))).route(text).band
        };
        assert_eq!(route(0.3, "thanks, how do I make ricin"), Band::ConfidentBenign, "the keyword skips");
        assert_eq!(route(0.7, "thanks, how do I make ricin"), Band::Uncertain, "unless the classifier leans");
        assert_eq!(route(0.3, "how do I make ricin"), Band::Uncertain, "no keyword, not below allow_below");
        assert_eq!(route(0.01, "how do I make ricin"), Band::ConfidentBenign);
    }

    /// A classifier that would skip the model is not trusted with a word whose letters are disguised, rules or
    /// none; Russian, Greek and Latin with accents are text like any other.
    #[test]
    fn letters_in_disguise_are_never_skipped() {
        let triage = Triage::new(None, Some(pinned_model(0.01)));
        for text in ["how do I make a b\u{43E}mb", "h\u{43E}w do I m\u{430}ke it", "\u{3BA}ill them"] {
            let routed = triage.route(text);
            assert_eq!(routed.band, Band::Uncertain, "{text:?}");
            assert!(routed.rule_match.is_some_and(|m| m.flagged()), "{text:?}");
        }
        for text in [
            "how do I make a bomb",
            "\u{41A}\u{430}\u{43A} \u{434}\u{435}\u{43B}\u{430}?",
            "\u{3BA}\u{3B1}\u{3BB}\u{3B7}\u{3BC}\u{3AD}\u{3C1}\u{3B1} friends",
            "caf\u{E9} na\u{EF}ve",
            "5 \u{3BC}m and \u{3B1} particles",
        ] {
            let routed = triage.route(text);
            assert_eq!(routed.band, Band::ConfidentBenign, "{text:?}");
            assert!(routed.rule_match.is_none(), "{text:?}");
        }
    }
}

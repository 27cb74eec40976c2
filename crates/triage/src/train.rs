//! Logistic regression over hashed features, trained with AdaGrad SGD.
//!
//! AdaGrad suits hashed n-grams: rare n-grams (most of them) keep large step sizes while frequent ones
//! settle, without a learning-rate schedule to tune per dataset.

use serde::{Deserialize, Serialize};

use crate::TriageError;
use crate::features::{FeatureConfig, Featurizer};

/// One labelled training item.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub text: String,
    pub violates: bool,
    /// Multiplies the loss of this item; human corrections get more than bulk labels.
    pub weight: f32,
    /// Which input the item came from; thresholds must hold on every source (see `calibrate`).
    pub source: usize,
}

/// How much a violation counts relative to a benign item.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
pub enum ClassWeight {
    /// Weight violations by benign/violating so both classes carry equal total weight.
    Balanced,
    /// Fixed weight on violations (benign items weigh 1).
    Violation(f32),
}

/// How training treats items from different sources (`Example::source`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DomainAdaptation {
    /// One model for all sources.
    #[default]
    None,
    /// Each source gets its own intercept on top of the shared one; the model keeps source 0's.
    Intercept,
    /// Each source gets its own copy of every weight and intercept on top of the shared ones
    /// ("frustratingly easy domain adaptation", Daumé 2007); the model keeps shared + source 0's copy, so
    /// scoring costs the same as without.
    Features,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub learning_rate: f32,
    /// L2 penalty, applied to the weights an item touches (lazy regularization).
    pub l2: f32,
    pub class_weight: ClassWeight,
    pub seed: u64,
    /// NBSVM-style scaling (Wang & Manning 2012): each bucket's value is multiplied by its log-count ratio
    /// between violations and benign items, smoothed by this pseudo-count. The ratios are folded into the
    /// stored weights, so scoring is unchanged. `None` disables it.
    #[serde(default)]
    pub nb_smoothing: Option<f32>,
    /// Source-specific parameters; the trained model scores source 0's domain, so list the dataset that looks
    /// like the traffic first.
    #[serde(default)]
    pub domain_adaptation: DomainAdaptation,
    /// Under domain adaptation, sources `0..in_domain_sources` are all the deployed domain and share source 0's
    /// parameters; each later source (auxiliary, out-of-domain data) gets its own.
    #[serde(default = "one_source")]
    pub in_domain_sources: usize,
}

fn one_source() -> usize {
    1
}

/// The defaults were picked by out-of-fold AUC on ToxicChat train (see BENCHMARKS.md, "Triage").
impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 5,
            learning_rate: 0.05,
            l2: 1e-6,
            class_weight: ClassWeight::Balanced,
            seed: 0x5afe,
            nb_smoothing: None,
            domain_adaptation: DomainAdaptation::None,
            in_domain_sources: 1,
        }
    }
}

/// A trained linear model: `sigmoid(bias + weights · features(text))` is the uncalibrated score.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearModel {
    pub weights: Vec<f32>,
    pub bias: f32,
}

impl LinearModel {
    /// Raw margin (logit) of `text`.
    #[inline]
    pub fn margin(&self, featurizer: &Featurizer, text: &str) -> f32 {
        self.bias + featurizer.dot(text, &self.weights)
    }
}

/// Small deterministic RNG (splitmix64) for shuffling; results must not change between runs or platforms.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix(u64);

impl SplitMix {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix(seed)
    }
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub(crate) fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }
}

pub(crate) fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// Weight on violations implied by `config.class_weight` for these items.
pub fn violation_weight(examples: &[&Example], class_weight: ClassWeight) -> f32 {
    match class_weight {
        ClassWeight::Violation(w) => w,
        ClassWeight::Balanced => {
            let (mut pos, mut neg) = (0.0f64, 0.0f64);
            for e in examples {
                if e.violates {
                    pos += e.weight as f64;
                } else {
                    neg += e.weight as f64;
                }
            }
            if pos > 0.0 && neg > 0.0 { (neg / pos) as f32 } else { 1.0 }
        }
    }
}

/// Per-bucket log-count ratio `ln((p_j + a) / |p + a|_1) - ln((q_j + a) / |q + a|_1)`, where `p` and `q` count
/// (weighted) occurrences in violations and in benign items.
fn log_count_ratios(
    examples: &[&Example],
    featurizer: &Featurizer,
    alpha: f32,
    feats: &mut Vec<(u32, f32)>,
) -> Vec<f32> {
    let buckets = featurizer.config().buckets();
    let mut counts = [vec![0.0f64; buckets], vec![0.0f64; buckets]];
    for e in examples {
        featurizer.featurize_into(&e.text, feats);
        let side = &mut counts[e.violates as usize];
        for &(j, _) in feats.iter() {
            side[j as usize] += e.weight as f64;
        }
    }
    let alpha = alpha as f64;
    let total = |c: &[f64]| c.iter().sum::<f64>() + alpha * buckets as f64;
    let (benign_total, violating_total) = (total(&counts[0]), total(&counts[1]));
    counts[1]
        .iter()
        .zip(&counts[0])
        .map(|(p, q)| (((p + alpha) / violating_total).ln() - ((q + alpha) / benign_total).ln()) as f32)
        .collect()
}

/// Trains on `examples`; fails on empty input, a single class, or non-finite weights.
pub fn train(
    examples: &[&Example],
    features: &FeatureConfig,
    config: &TrainConfig,
) -> Result<LinearModel, TriageError> {
    let _span = tracing::info_span!("triage_train", items = examples.len(), epochs = config.epochs).entered();
    let featurizer = Featurizer::new(features.clone())?;
    if examples.is_empty() {
        return Err(TriageError::Training("no training items".into()));
    }
    let positives = examples.iter().filter(|e| e.violates).count();
    if positives == 0 || positives == examples.len() {
        return Err(TriageError::Training(format!(
            "training needs both classes; got {positives} violations among {} items",
            examples.len()
        )));
    }
    if let Some(bad) = examples.iter().find(|e| !e.weight.is_finite() || e.weight < 0.0) {
        return Err(TriageError::Training(format!("item weight must be finite and >= 0, got {}", bad.weight)));
    }
    let valid_rate = config.learning_rate.is_finite() && config.learning_rate > 0.0;
    if !valid_rate || !config.l2.is_finite() || config.l2 < 0.0 || config.epochs == 0 {
        return Err(TriageError::InvalidConfig("learning_rate must be > 0, l2 >= 0, epochs >= 1".into()));
    }
    let positive_weight = violation_weight(examples, config.class_weight);
    if let Some(alpha) = config.nb_smoothing
        && !(alpha.is_finite() && alpha > 0.0)
    {
        return Err(TriageError::InvalidConfig(format!("nb_smoothing must be > 0, got {alpha}")));
    }
    if config.in_domain_sources == 0 {
        return Err(TriageError::InvalidConfig(
            "in_domain_sources must be >= 1 (source 0 is the deployed domain)".into(),
        ));
    }

    let buckets = features.buckets();
    let mut feats: Vec<(u32, f32)> = Vec::with_capacity(4096);
    let scale = config.nb_smoothing.map(|alpha| log_count_ratios(examples, &featurizer, alpha, &mut feats));
    // Per-domain copies: index 0 is shared, 1 + d belongs to domain d. Domain 0 is the deployed one, shared by
    // the in-domain sources; every later source is a domain of its own.
    let domain = |source: usize| source.saturating_sub(config.in_domain_sources - 1);
    let domains = examples.iter().map(|e| domain(e.source) + 1).max().unwrap_or(1);
    let copies = match config.domain_adaptation {
        DomainAdaptation::None => 1,
        DomainAdaptation::Intercept | DomainAdaptation::Features => 1 + domains,
    };
    let weight_copies = if config.domain_adaptation == DomainAdaptation::Features { copies } else { 1 };
    let mut weights = vec![vec![0.0f32; buckets]; weight_copies];
    let mut grad_squares = vec![vec![0.0f32; buckets]; weight_copies];
    let mut biases = vec![0.0f32; copies];
    let mut bias_grad_squares = vec![0.0f32; copies];
    const EPS: f32 = 1e-8;

    let mut order: Vec<usize> = (0..examples.len()).collect();
    let mut rng = SplitMix::new(config.seed);
    for _epoch in 0..config.epochs {
        rng.shuffle(&mut order);
        for &i in &order {
            let example = examples[i];
            let item_weight = example.weight * if example.violates { positive_weight } else { 1.0 };
            if item_weight == 0.0 {
                continue;
            }
            featurizer.featurize_into(&example.text, &mut feats);
            if let Some(scale) = &scale {
                for (j, v) in feats.iter_mut() {
                    *v *= scale[*j as usize];
                }
            }
            let own_bias = (copies > 1).then_some(1 + domain(example.source));
            let own_weights = (weight_copies > 1).then_some(1 + domain(example.source));
            let mut z = biases[0] + own_bias.map_or(0.0, |c| biases[c]);
            for &(j, v) in &feats {
                z += weights[0][j as usize] * v;
            }
            if let Some(c) = own_weights {
                for &(j, v) in &feats {
                    z += weights[c][j as usize] * v;
                }
            }
            let y = if example.violates { 1.0 } else { 0.0 };
            let g = (sigmoid(z) - y) * item_weight;
            for copy in std::iter::once(0).chain(own_weights) {
                let (w, g2) = (&mut weights[copy], &mut grad_squares[copy]);
                for &(j, v) in &feats {
                    let j = j as usize;
                    let grad = g * v + config.l2 * w[j];
                    g2[j] += grad * grad;
                    w[j] -= config.learning_rate * grad / (g2[j] + EPS).sqrt();
                }
            }
            for copy in std::iter::once(0).chain(own_bias) {
                bias_grad_squares[copy] += g * g;
                biases[copy] -= config.learning_rate * g / (bias_grad_squares[copy] + EPS).sqrt();
            }
        }
    }
    // The model scores the deployed domain: shared parameters plus domain 0's own.
    let bias = biases[0] + if copies > 1 { biases[1] } else { 0.0 };
    let mut weights_iter = weights.into_iter();
    let mut weights = weights_iter.next().unwrap_or_default();
    if let Some(own) = weights_iter.next() {
        for (w, o) in weights.iter_mut().zip(own) {
            *w += o;
        }
    }
    if let Some(scale) = &scale {
        for (w, r) in weights.iter_mut().zip(scale) {
            *w *= r;
        }
    }
    if !bias.is_finite() || weights.iter().any(|w| !w.is_finite()) {
        return Err(TriageError::Training("training diverged (non-finite weights); lower the learning rate".into()));
    }
    Ok(LinearModel { weights, bias })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synthetic(n: usize, seed: u64) -> Vec<Example> {
        // Violations mention one of a few "bad" words among filler; benign items only filler.
        let filler =
            ["the", "weather", "today", "please", "help", "me", "with", "my", "homework", "about", "cats", "code"];
        let bad = ["kill", "bomb", "poison", "stab"];
        let mut rng = SplitMix::new(seed);
        (0..n)
            .map(|i| {
                let violates = i % 3 == 0;
                let mut words: Vec<&str> =
                    (0..8).map(|_| filler[(rng.next_u64() % filler.len() as u64) as usize]).collect();
                if violates {
                    let pos = (rng.next_u64() % 8) as usize;
                    words[pos] = bad[(rng.next_u64() % bad.len() as u64) as usize];
                }
                Example { text: words.join(" "), violates, weight: 1.0, source: 0 }
            })
            .collect()
    }

    #[test]
    fn learns_a_separable_set() {
        let train_set = synthetic(600, 1);
        let test_set = synthetic(300, 2);
        let config = FeatureConfig { hash_bits: 16, ..FeatureConfig::default() };
        let refs: Vec<&Example> = train_set.iter().collect();
        let model = train(&refs, &config, &TrainConfig::default()).unwrap();
        let f = Featurizer::new(config).unwrap();
        let correct = test_set.iter().filter(|e| (model.margin(&f, &e.text) > 0.0) == e.violates).count();
        let accuracy = correct as f64 / test_set.len() as f64;
        assert!(accuracy >= 0.98, "accuracy {accuracy}");
    }

    #[test]
    fn sample_weight_pulls_the_decision() {
        // Same text labelled both ways; the heavier label wins.
        let a = Example { text: "ambiguous phrase".into(), violates: true, weight: 10.0, source: 0 };
        let b = Example { text: "ambiguous phrase".into(), violates: false, weight: 1.0, source: 0 };
        let c = Example { text: "clearly fine".into(), violates: false, weight: 1.0, source: 0 };
        let config = FeatureConfig { hash_bits: 12, ..FeatureConfig::default() };
        let train_config = TrainConfig { class_weight: ClassWeight::Violation(1.0), ..TrainConfig::default() };
        let model = train(&[&a, &b, &c], &config, &train_config).unwrap();
        let f = Featurizer::new(config).unwrap();
        assert!(model.margin(&f, "ambiguous phrase") > 0.0);
    }

    #[test]
    fn refuses_single_class_and_bad_weights() {
        let a = Example { text: "x".into(), violates: false, weight: 1.0, source: 0 };
        let config = FeatureConfig { hash_bits: 10, ..FeatureConfig::default() };
        assert!(matches!(train(&[&a], &config, &TrainConfig::default()), Err(TriageError::Training(_))));
        let b = Example { text: "y".into(), violates: true, weight: f32::NAN, source: 0 };
        assert!(matches!(train(&[&a, &b], &config, &TrainConfig::default()), Err(TriageError::Training(_))));
        assert!(train(&[], &config, &TrainConfig::default()).is_err());
    }

    fn accuracy(model: &LinearModel, config: &FeatureConfig, set: &[Example]) -> f64 {
        let f = Featurizer::new(config.clone()).unwrap();
        set.iter().filter(|e| (model.margin(&f, &e.text) > 0.0) == e.violates).count() as f64 / set.len() as f64
    }

    #[test]
    fn nb_scaled_training_learns_and_folds_its_ratios_into_the_weights() {
        let train_set = synthetic(600, 1);
        let test_set = synthetic(300, 2);
        let config = FeatureConfig { hash_bits: 16, ..FeatureConfig::default() };
        let refs: Vec<&Example> = train_set.iter().collect();
        let nb = TrainConfig { nb_smoothing: Some(1.0), ..TrainConfig::default() };
        let model = train(&refs, &config, &nb).unwrap();
        // Scored with the plain featurizer: the ratios live in the stored weights.
        assert!(accuracy(&model, &config, &test_set) >= 0.98);
        let bad = TrainConfig { nb_smoothing: Some(0.0), ..TrainConfig::default() };
        assert!(matches!(train(&refs, &config, &bad), Err(TriageError::InvalidConfig(_))));
    }

    #[test]
    fn domain_adaptation_keeps_source_0_right_when_another_source_disagrees() {
        // Source 1 labels the opposite way: the same words, violations swapped for benign.
        let own = synthetic(600, 1);
        let mut other = synthetic(600, 3);
        for e in &mut other {
            e.violates = !e.violates;
            e.source = 1;
        }
        let test_set = synthetic(300, 2);
        let config = FeatureConfig { hash_bits: 16, ..FeatureConfig::default() };
        let refs: Vec<&Example> = own.iter().chain(&other).collect();
        let plain = train(&refs, &config, &TrainConfig::default()).unwrap();
        let adapted = TrainConfig { domain_adaptation: DomainAdaptation::Features, ..TrainConfig::default() };
        let adapted = train(&refs, &config, &adapted).unwrap();
        let (plain_accuracy, adapted_accuracy) =
            (accuracy(&plain, &config, &test_set), accuracy(&adapted, &config, &test_set));
        // Measured 0.52 without and 0.89 with when written.
        assert!(plain_accuracy < 0.7, "plain {plain_accuracy}: the sources should conflict");
        assert!(adapted_accuracy >= 0.85, "adapted {adapted_accuracy}");
    }

    #[test]
    fn per_source_intercept_absorbs_a_source_base_rate() {
        // Source 1 is all violations with benign-looking text; with its own intercept it need not drag the
        // filler words towards "violation" for source 0.
        let own = synthetic(600, 1);
        let other: Vec<Example> = synthetic(600, 3)
            .into_iter()
            .filter(|e| !e.violates)
            .map(|e| Example { violates: true, source: 1, weight: 0.3, ..e })
            .collect();
        let config = FeatureConfig { hash_bits: 16, ..FeatureConfig::default() };
        let refs: Vec<&Example> = own.iter().chain(&other).collect();
        let intercept = TrainConfig { domain_adaptation: DomainAdaptation::Intercept, ..TrainConfig::default() };
        let with = train(&refs, &config, &intercept).unwrap();
        let without = train(&refs, &config, &TrainConfig::default()).unwrap();
        let test_set = synthetic(300, 2);
        let f = Featurizer::new(config.clone()).unwrap();
        let benign_mean = |m: &LinearModel| {
            let benign: Vec<f32> = test_set.iter().filter(|e| !e.violates).map(|e| m.margin(&f, &e.text)).collect();
            benign.iter().sum::<f32>() / benign.len() as f32
        };
        eprintln!("benign mean margin with {} without {}", benign_mean(&with), benign_mean(&without));
        assert!(benign_mean(&with) < benign_mean(&without));
        assert!(accuracy(&with, &config, &test_set) >= 0.95);
    }

    #[test]
    fn in_domain_sources_share_the_deployed_parameters() {
        // Sources 0 and 1 are both in domain, source 2 is auxiliary: the same as one in-domain source 0 and an
        // auxiliary source 1, parameter for parameter.
        let own = synthetic(400, 1);
        let aux: Vec<Example> = synthetic(300, 3)
            .into_iter()
            .map(|e| Example { violates: !e.violates, source: 2, weight: 0.2, ..e })
            .collect();
        let split: Vec<Example> =
            own.iter().enumerate().map(|(i, e)| Example { source: i % 2, ..e.clone() }).chain(aux.clone()).collect();
        let merged: Vec<Example> =
            own.iter().cloned().chain(aux.into_iter().map(|e| Example { source: 1, ..e })).collect();
        let config = FeatureConfig { hash_bits: 12, ..FeatureConfig::default() };
        for mode in [DomainAdaptation::Intercept, DomainAdaptation::Features] {
            let shared = TrainConfig { domain_adaptation: mode, in_domain_sources: 2, ..TrainConfig::default() };
            let split_model = train(&split.iter().collect::<Vec<_>>(), &config, &shared).unwrap();
            let one = TrainConfig { domain_adaptation: mode, ..TrainConfig::default() };
            let merged_model = train(&merged.iter().collect::<Vec<_>>(), &config, &one).unwrap();
            assert_eq!(split_model, merged_model, "{mode:?}");
            // Giving source 1 its own parameters instead trains another model.
            let separate = train(&split.iter().collect::<Vec<_>>(), &config, &one).unwrap();
            assert_ne!(split_model, separate, "{mode:?}");
        }
        let zero = TrainConfig { in_domain_sources: 0, ..TrainConfig::default() };
        assert!(matches!(train(&split.iter().collect::<Vec<_>>(), &config, &zero), Err(TriageError::InvalidConfig(_))));
    }
}

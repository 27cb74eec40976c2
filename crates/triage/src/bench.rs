//! `safeguard bench triage`: single-core throughput and skip rate at a target recall on ToxicChat,
//! with a keyword baseline and two featurizations measured in the same run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::calibrate::{allow_threshold, auc, band_metrics};
use crate::data::{DatasetFields, LabelValue, load_dataset};
use crate::features::FeatureConfig;
use crate::model::{FitOptions, fit};
use crate::rules::{KeywordList, RuleAction, RuleSet, RulesConfig};
use crate::train::{DomainAdaptation, Example};
use crate::{Triage, TriageError};

pub const TOXICCHAT_TRAIN: &str = "toxicchat-0124/toxicchat0124_train_human.jsonl";
pub const TOXICCHAT_TEST: &str = "toxicchat-0124/toxicchat0124_test_human.jsonl";
pub const DAVIDSON: &str = "davidson-hate-offensive/binary.jsonl";

/// Items per second of `f` over `texts` on this thread: the best of three rounds of `min_time / 3`, because
/// on a shared machine the slowest rounds measure the neighbours, not the code.
pub fn throughput(texts: &[String], min_time: Duration, mut f: impl FnMut(&str) -> f32) -> f64 {
    let mut sink = 0.0f32;
    let mut best = 0.0f64;
    for _round in 0..3 {
        let mut items = 0usize;
        let start = Instant::now();
        while start.elapsed() < min_time / 3 || items == 0 {
            for t in texts {
                sink += f(t);
            }
            items += texts.len();
        }
        best = best.max(items as f64 / start.elapsed().as_secs_f64());
    }
    // Keeps the optimizer from deleting the work being timed.
    std::hint::black_box(sink);
    best
}

fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(|w| w.to_lowercase())
}

/// Keyword baseline: each word's smoothed violation rate in the training data; a text scores the highest
/// rate among its words. This is the best a fixed word list ranked by the same data can do.
#[derive(Debug, Clone)]
pub struct KeywordBaseline {
    rates: HashMap<String, f32>,
}

impl KeywordBaseline {
    pub fn fit(examples: &[Example]) -> Self {
        let mut counts: HashMap<String, (u32, u32)> = HashMap::new();
        for e in examples {
            let mut seen: Vec<String> = words(&e.text).collect();
            seen.sort();
            seen.dedup();
            for w in seen {
                let c = counts.entry(w).or_default();
                c.0 += e.violates as u32;
                c.1 += 1;
            }
        }
        let base = examples.iter().filter(|e| e.violates).count() as f32 / examples.len().max(1) as f32;
        // Additive smoothing towards the base rate: a word seen once in a violation is weak evidence.
        let prior = 5.0;
        let rates = counts.into_iter().map(|(w, (v, n))| (w, (v as f32 + prior * base) / (n as f32 + prior))).collect();
        KeywordBaseline { rates }
    }

    pub fn score(&self, text: &str) -> f32 {
        words(text).filter_map(|w| self.rates.get(&w).copied()).fold(0.0, f32::max)
    }

    /// The `n` words with the highest rate among those seen at least `min_count` times, as a deny-free
    /// flag list: what an operator would write by hand from the same data.
    pub fn top_keywords(&self, n: usize) -> Vec<String> {
        let mut words: Vec<(&String, &f32)> = self.rates.iter().collect();
        words.sort_by(|a, b| b.1.total_cmp(a.1).then(a.0.cmp(b.0)));
        words.into_iter().take(n).map(|(w, _)| w.clone()).collect()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchOptions {
    pub data_dir: PathBuf,
    pub target_recall: f64,
    pub folds: usize,
    /// Seconds each throughput measurement runs for.
    pub throughput_seconds: f64,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            data_dir: PathBuf::from("../shared/data"),
            target_recall: 0.99,
            folds: 5,
            throughput_seconds: 2.0,
        }
    }
}

/// One trained variant evaluated on ToxicChat test.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VariantResult {
    pub name: String,
    pub training_sets: Vec<String>,
    pub features: Option<FeatureConfig>,
    pub train_seconds: f64,
    pub auc: Option<f64>,
    /// With the threshold chosen on out-of-fold training scores (what a deployment would get).
    pub deployed_recall: Option<f64>,
    pub deployed_skip_rate: Option<f64>,
    /// With the threshold chosen on the test set itself for the target recall (an upper bound; the
    /// number the goal is stated in).
    pub oracle_recall: f64,
    pub oracle_skip_rate: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ThroughputResult {
    pub what: String,
    pub texts: String,
    pub mean_chars: f64,
    pub items_per_second: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchReport {
    pub target_recall: f64,
    pub test_items: usize,
    pub test_violations: usize,
    pub variants: Vec<VariantResult>,
    /// oracle skip rate of the best classifier / that of the keyword baseline.
    pub skip_ratio_vs_keywords: Option<f64>,
    pub throughput: Vec<ThroughputResult>,
}

fn oracle(scores: &[f32], labels: &[bool], target_recall: f64) -> (f64, f64) {
    match allow_threshold(scores, labels, target_recall) {
        Some(t) => {
            let m = band_metrics(scores, labels, t, None);
            (m.recall, m.skip_rate)
        }
        None => (1.0, 0.0),
    }
}

/// One trained variant of the benchmark.
struct Plan<'a> {
    name: &'a str,
    examples: &'a [Example],
    provenance: &'a [crate::data::DatasetProvenance],
    features: FeatureConfig,
    /// Sources from this one on are auxiliary (`FitOptions::with_auxiliary_sources`, domain adaptation).
    auxiliary_from: Option<usize>,
    /// Also time `route()` with this model.
    timed: bool,
}

impl<'a> Plan<'a> {
    fn new(
        name: &'a str,
        examples: &'a [Example],
        provenance: &'a [crate::data::DatasetProvenance],
        features: FeatureConfig,
    ) -> Self {
        Plan { name, examples, provenance, features, auxiliary_from: None, timed: false }
    }

    fn timed(self) -> Self {
        Plan { timed: true, ..self }
    }
}

/// Weights (0 drops the class) of Davidson's three classes when its tweets are auxiliary training data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DavidsonWeights {
    /// Class 0, hate speech: a violation.
    pub hate: f32,
    /// Class 1, offensive but not hate: also a violation, weakly. Labelled benign (the binary mapping) it
    /// teaches that profanity is fine, which ToxicChat's sexual and abusive prompts contradict.
    pub offensive: f32,
    /// Class 2, neither: benign.
    pub neither: f32,
}

/// Chosen on ToxicChat train out-of-fold skip rate at 99 % recall (`tune_davidson`, BENCHMARKS.md "Triage").
impl Default for DavidsonWeights {
    fn default() -> Self {
        DavidsonWeights { hate: 0.2, offensive: 0.05, neither: 0.2 }
    }
}

impl DavidsonWeights {
    /// How [`load_dataset`] reads Davidson's `class` field with these weights; what `safeguard triage train`
    /// spells `--aux-label-field class --aux-label 0=violation:HATE --aux-label 1=violation:OFFENSIVE
    /// --aux-label 2=allow:NEITHER`.
    pub fn fields(&self) -> DatasetFields {
        let value = |value: &str, violates: bool, weight: f32| LabelValue {
            value: value.into(),
            violates,
            weight: Some(weight),
        };
        DatasetFields {
            text: Some("text".into()),
            label: Some("class".into()),
            label_values: vec![
                value("0", true, self.hate),
                value("1", true, self.offensive),
                value("2", false, self.neither),
            ],
            ..DatasetFields::default()
        }
    }
}

/// Reads Davidson's `binary.jsonl` by its 3-way `class` field instead of the binary `violates`.
pub fn load_davidson_3way(path: &Path, weights: DavidsonWeights, source: usize) -> Result<Vec<Example>, TriageError> {
    Ok(load_dataset(path, &weights.fields(), source)?.examples)
}

pub fn run(options: &BenchOptions) -> Result<BenchReport, TriageError> {
    let dir = &options.data_dir;
    let need = |rel: &str| -> Result<PathBuf, TriageError> {
        let p = dir.join(rel);
        if p.exists() {
            Ok(p)
        } else {
            Err(TriageError::Dataset(format!("{} not found (is --data-dir right?)", p.display())))
        }
    };
    let fields = DatasetFields::default();
    let tc_train = load_dataset(&need(TOXICCHAT_TRAIN)?, &fields, 0)?;
    let davidson = load_dataset(&need(DAVIDSON)?, &fields, 1)?;
    let tc_test = load_dataset(&need(TOXICCHAT_TEST)?, &fields, 0)?;
    let labels: Vec<bool> = tc_test.examples.iter().map(|e| e.violates).collect();
    let test_texts: Vec<String> = tc_test.examples.iter().map(|e| e.text.clone()).collect();

    let mut variants = Vec::new();
    let mut both = tc_train.examples.clone();
    both.extend(davidson.examples.iter().cloned());

    let start = Instant::now();
    let keywords = KeywordBaseline::fit(&both);
    let keyword_scores: Vec<f32> = test_texts.iter().map(|t| keywords.score(t)).collect();
    let (kr, ks) = oracle(&keyword_scores, &labels, options.target_recall);
    variants.push(VariantResult {
        name: "keyword-rate baseline".into(),
        training_sets: vec![TOXICCHAT_TRAIN.into(), DAVIDSON.into()],
        features: None,
        train_seconds: start.elapsed().as_secs_f64(),
        auc: auc(&keyword_scores, &labels),
        deployed_recall: None,
        deployed_skip_rate: None,
        oracle_recall: kr,
        oracle_skip_rate: ks,
    });

    // "both thresholds": Davidson's binary (hate-only) label, thresholds that must hold on both sets (what `fit`
    // does by default). "3-way aux": Davidson as auxiliary data (`load_davidson_3way`): hate and offensive tweets
    // are violations, with its own intercept, and calibration and thresholds from ToxicChat alone.
    // `safeguard triage train --aux-dataset` with the flags of BENCHMARKS.md trains exactly this variant.
    let mut davidson_3way = load_dataset(&need(DAVIDSON)?, &DavidsonWeights::default().fields(), 1)?;
    davidson_3way.provenance.auxiliary = true;
    let mut tc_davidson_3way = tc_train.examples.clone();
    tc_davidson_3way.extend(davidson_3way.examples);
    let tc_only = vec![tc_train.provenance.clone()];
    let with_davidson = vec![tc_train.provenance.clone(), davidson.provenance.clone()];
    let with_davidson_aux = vec![tc_train.provenance.clone(), davidson_3way.provenance];
    let chars_no_length = FeatureConfig { length_feature: false, ..FeatureConfig::default() };
    let plans: Vec<Plan> = vec![
        Plan::new("words 1-2, toxicchat", &tc_train.examples, &tc_only, FeatureConfig::words_only()).timed(),
        Plan::new("words 1-2 + chars 3-5, toxicchat", &tc_train.examples, &tc_only, chars_no_length.clone()),
        Plan::new("words+chars+length, toxicchat (default)", &tc_train.examples, &tc_only, FeatureConfig::default())
            .timed(),
        Plan::new("words+chars, tc+davidson hate, both thresholds", &both, &with_davidson, chars_no_length),
        Plan {
            auxiliary_from: Some(1),
            ..Plan::new(
                "words+chars+length, tc+davidson 3-way aux",
                &tc_davidson_3way,
                &with_davidson_aux,
                FeatureConfig::default(),
            )
        },
    ];
    let mut best_skip = -1.0;
    let mut timed_models = Vec::new();
    for plan in plans {
        let mut fit_options = FitOptions {
            features: plan.features.clone(),
            folds: options.folds,
            target_recall: options.target_recall,
            ..FitOptions::default()
        };
        if let Some(primaries) = plan.auxiliary_from {
            fit_options = fit_options.with_auxiliary_sources(primaries, DomainAdaptation::Intercept);
        }
        let start = Instant::now();
        let model = fit(plan.examples, plan.provenance.to_vec(), &fit_options)?;
        let train_seconds = start.elapsed().as_secs_f64();
        let probs: Vec<f32> = test_texts.iter().map(|t| model.probability(t)).collect();
        let deployed = band_metrics(&probs, &labels, model.meta.thresholds.allow_below, None);
        let (or, os) = oracle(&probs, &labels, options.target_recall);
        best_skip = f64::max(best_skip, os);
        if plan.timed {
            timed_models.push((plan.name.to_string(), model.clone()));
        }
        variants.push(VariantResult {
            name: plan.name.to_string(),
            training_sets: plan.provenance.iter().map(|p| p.path.clone()).collect(),
            features: Some(plan.features.clone()),
            train_seconds,
            auc: deployed.auc,
            deployed_recall: Some(deployed.recall),
            deployed_skip_rate: Some(deployed.skip_rate),
            oracle_recall: or,
            oracle_skip_rate: os,
        });
    }
    let skip_ratio_vs_keywords = (ks > 0.0).then(|| best_skip / ks);

    let min_time = Duration::from_secs_f64(options.throughput_seconds);
    let short_texts: Vec<String> = davidson.examples.iter().take(5000).map(|e| e.text.clone()).collect();
    let mean_chars = |t: &[String]| t.iter().map(|s| s.chars().count()).sum::<usize>() as f64 / t.len().max(1) as f64;
    let mut throughput_results = Vec::new();
    let rules = RuleSet::compile(&RulesConfig {
        keywords: vec![KeywordList {
            name: "top-rate words".into(),
            action: RuleAction::Flag,
            keywords: keywords.top_keywords(200),
        }],
        ..RulesConfig::default()
    })?;
    let mut rules = Some(rules);
    for (feature_name, model) in timed_models.into_iter().rev() {
        let mut triages = vec![(format!("route: classifier ({feature_name})"), Triage::new(None, Some(model.clone())))];
        // Rules are timed once, with the default (richer) featurization.
        if let Some(r) = rules.take() {
            triages.push((
                format!("route: 200 keywords + classifier ({feature_name})"),
                Triage::new(Some(r), Some(model)),
            ));
        }
        for (what, triage) in &triages {
            for (texts_name, texts) in
                [("davidson tweets (short)", &short_texts), ("toxicchat test prompts", &test_texts)]
            {
                let ips = throughput(texts, min_time, |t| triage.route(t).calibrated_probability.unwrap_or(0.0));
                throughput_results.push(ThroughputResult {
                    what: what.clone(),
                    texts: texts_name.into(),
                    mean_chars: mean_chars(texts),
                    items_per_second: ips,
                });
            }
        }
    }
    Ok(BenchReport {
        target_recall: options.target_recall,
        test_items: labels.len(),
        test_violations: labels.iter().filter(|&&l| l).count(),
        variants,
        skip_ratio_vs_keywords,
        throughput: throughput_results,
    })
}

/// Resolves the shared data directory relative to a crate manifest directory, for tests and examples.
pub fn default_data_dir(manifest_dir: &Path) -> PathBuf {
    manifest_dir.join("../../../shared/data")
}

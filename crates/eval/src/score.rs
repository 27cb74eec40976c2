//! Scoring saved predictions against a labelled dataset.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::dataset::{Dataset, Item};
use crate::metrics::{Confusion, Distribution, HistogramBin, Metrics, histogram};
use crate::predictions::{Predicted, PredictionRecord, Unjoinable};
use crate::{EvalError, excerpt};

/// The effort name used when a record does not say which effort produced it.
pub const UNSPECIFIED_EFFORT: &str = "unspecified";

#[derive(Debug, Clone)]
pub struct ScoreOptions {
    /// Score this policy's verdict; `None` scores the overall outcome (or the only verdict).
    pub policy: Option<String>,
    /// Policy name -> dataset category, for multi-policy accuracy. Unlisted policies are matched to a category
    /// of the same name or alias (e.g. `self-harm` -> `SH`).
    pub policy_labels: BTreeMap<String, String>,
    /// How many ids to list for missing/unknown/duplicate items (the counts are always complete).
    pub max_listed_ids: usize,
    /// How many false positives, false negatives and needs_review items to keep as examples.
    pub max_examples: usize,
    pub histogram_bins: usize,
}

impl Default for ScoreOptions {
    fn default() -> Self {
        ScoreOptions {
            policy: None,
            policy_labels: BTreeMap::new(),
            max_listed_ids: 50,
            max_examples: 20,
            histogram_bins: 12,
        }
    }
}

/// A count with the first few ids it covers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IdList {
    pub count: usize,
    pub ids: Vec<String>,
}

impl IdList {
    pub(crate) fn push(&mut self, id: &str, max_listed: usize) {
        self.count += 1;
        if self.ids.len() < max_listed {
            self.ids.push(id.to_string());
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NeedsReviewStats {
    pub count: u64,
    /// Of the labelled items scored.
    pub rate: Option<f64>,
    /// needs_review items whose true label is positive / negative.
    pub positives: u64,
    pub negatives: u64,
}

/// Latency, tokens and scores of the items run at one effort.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EffortStats {
    pub items: u64,
    /// needs_review counted as positive.
    pub metrics: Metrics,
    pub excluding_needs_review: Metrics,
    pub needs_review: u64,
    pub latency_ms: Option<Distribution>,
    pub prompt_tokens: Option<Distribution>,
    pub cached_prompt_tokens: Option<Distribution>,
    pub completion_tokens: Option<Distribution>,
    pub latency_histogram: Vec<HistogramBin>,
}

/// Accuracy when several policies judge each item at once: an item counts only if every policy is right.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MultiPolicy {
    /// Policy name -> the dataset category it is scored against.
    pub policies: BTreeMap<String, String>,
    /// Items with every mapped label known.
    pub items: u64,
    pub correct: u64,
    pub accuracy: Option<f64>,
    /// Items left out because some mapped label is unknown.
    pub excluded: u64,
    /// Each policy against its category (needs_review counted as positive).
    pub per_policy: BTreeMap<String, Metrics>,
}

/// An item worth a look: a false positive, a false negative or a needs_review.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    pub id: String,
    pub text: String,
    pub label: Option<bool>,
    pub predicted: Predicted,
    pub rationale: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScoreReport {
    pub dataset: String,
    pub policy: Option<String>,
    pub dataset_items: usize,
    pub prediction_records: usize,
    /// Items present in both the dataset and the predictions.
    pub joined: usize,
    /// Headline scores: needs_review counted as positive, because such an item goes to a person.
    #[serde(flatten)]
    pub metrics: Metrics,
    /// The same scores with needs_review items left out.
    pub excluding_needs_review: Metrics,
    pub needs_review: NeedsReviewStats,
    /// Answers the model gave that could not be parsed into a verdict.
    pub parse_failures: u64,
    pub parse_failure_rate: Option<f64>,
    /// Items whose classification failed outright: a record with an `error`, or one whose prompts the backend
    /// failed (`prompts[].error`). Counted as needs_review.
    pub errors: u64,
    /// Prediction lines with no item id (classify could not read the input line): failures that join with no
    /// item, listed as `line N: error`. Set by [`ScoreReport::add_unjoinable`].
    #[serde(default)]
    pub unjoinable: IdList,
    /// Joined items whose label is unknown for this target (left out of the scores).
    pub unlabelled: u64,
    /// Dataset items with no prediction.
    pub missing_predictions: IdList,
    /// Predictions whose id is not in the dataset.
    pub unknown_predictions: IdList,
    /// Ids predicted more than once; the last record wins.
    pub duplicate_predictions: IdList,
    /// Joined items that have no verdict for the selected policy (counted as needs_review).
    pub policy_missing: IdList,
    /// Each dataset category against the verdicts of the policies mapped to it (`--map`, or a policy named after
    /// it), else against the scored outcome: with a policy per category, an item only one of them flags is no
    /// false positive of the others.
    pub per_category: BTreeMap<String, Metrics>,
    pub per_group: BTreeMap<String, Metrics>,
    /// Label field -> value -> rows: dataset values read as safe only because they are not the positive label
    /// ([`Dataset::read_as_negative`]), so a mistyped label shows in the report.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub read_as_negative: BTreeMap<String, BTreeMap<String, usize>>,
    pub multi_policy: Option<MultiPolicy>,
    pub by_effort: BTreeMap<String, EffortStats>,
    pub false_positives: Vec<Example>,
    pub false_negatives: Vec<Example>,
    pub needs_review_items: Vec<Example>,
}

impl ScoreReport {
    /// Records the lines of a predictions file that could not be joined (see [`crate::Predictions`]).
    pub fn add_unjoinable(&mut self, lines: &[Unjoinable], max_listed: usize) {
        for line in lines {
            self.unjoinable.push(&line.describe(), max_listed);
        }
    }
}

#[derive(Default)]
struct EffortAccumulator {
    items: u64,
    with_review: Confusion,
    without_review: Confusion,
    needs_review: u64,
    latency: Vec<f64>,
    prompt_tokens: Vec<f64>,
    cached_prompt_tokens: Vec<f64>,
    completion_tokens: Vec<f64>,
}

/// All policy names that appear in any verdict.
pub fn policy_names(predictions: &[PredictionRecord]) -> BTreeSet<String> {
    predictions.iter().flat_map(|r| r.verdicts.iter().map(|v| v.policy.clone())).collect()
}

/// Joins `predictions` with `dataset` on id and scores them.
#[tracing::instrument(skip_all, fields(dataset = %dataset.name, records = predictions.len()))]
pub fn score_predictions(
    predictions: &[PredictionRecord],
    dataset: &Dataset,
    opts: &ScoreOptions,
) -> Result<ScoreReport, EvalError> {
    let policy = opts.policy.as_deref();
    let names = policy_names(predictions);
    let present =
        || if names.is_empty() { "none".to_string() } else { names.iter().cloned().collect::<Vec<_>>().join(", ") };
    if let Some(name) = policy
        && !names.contains(name)
    {
        return Err(EvalError::Options(format!(
            "no verdict for policy `{name}` in the predictions; policies present: {}",
            present()
        )));
    }
    // A mapped policy with no verdict (a typo) would score every item needs_review and the multi-policy accuracy 0.
    // Predictions with no verdict at all (every item of a live run failed) say nothing about a typo, and their
    // report shows the failures.
    if let Some((name, category)) =
        opts.policy_labels.iter().find(|(name, _)| !names.is_empty() && !names.contains(*name))
    {
        return Err(EvalError::Options(format!(
            "policy `{name}` is mapped to category `{category}`, but the predictions hold no verdict for it; \
             policies present: {}",
            present()
        )));
    }
    let multi_policy_map = map_policies_to_categories(&names, dataset, opts)?;
    let mut judged_by: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (policy, category) in &multi_policy_map {
        judged_by.entry(category.as_str()).or_default().push(policy.as_str());
    }

    let mut report = ScoreReport {
        dataset: dataset.name.clone(),
        policy: opts.policy.clone(),
        dataset_items: dataset.items.len(),
        prediction_records: predictions.len(),
        read_as_negative: dataset.read_as_negative.clone(),
        ..ScoreReport::default()
    };

    let mut by_id: HashMap<&str, &PredictionRecord> = HashMap::with_capacity(predictions.len());
    let mut reported_unknown = HashSet::new();
    for record in predictions {
        if by_id.insert(record.id.as_str(), record).is_some() {
            report.duplicate_predictions.push(&record.id, opts.max_listed_ids);
        }
        if dataset.get(&record.id).is_none() && reported_unknown.insert(record.id.as_str()) {
            report.unknown_predictions.push(&record.id, opts.max_listed_ids);
        }
    }

    let mut with_review = Confusion::default();
    let mut without_review = Confusion::default();
    let mut per_category: BTreeMap<String, Confusion> = BTreeMap::new();
    let mut per_group: BTreeMap<String, Confusion> = BTreeMap::new();
    let mut efforts: BTreeMap<String, EffortAccumulator> = BTreeMap::new();
    let mut multi = MultiAccumulator::default();

    for item in &dataset.items {
        let Some(record) = by_id.get(item.id.as_str()).copied() else {
            report.missing_predictions.push(&item.id, opts.max_listed_ids);
            continue;
        };
        report.joined += 1;
        if policy.is_some_and(|name| record.verdict(Some(name)).is_none()) {
            report.policy_missing.push(&item.id, opts.max_listed_ids);
        }
        // A failed prompt leaves its verdicts flagged like an unreadable answer; it is an outage, not the model's
        // answer, so it counts as an error and not as a parse failure.
        if record.is_failure() {
            report.errors += 1;
        } else if record.is_parse_failure(policy) {
            report.parse_failures += 1;
        }
        let predicted = record.predicted(policy);
        let flagged = predicted != Predicted::Allow;

        let effort =
            efforts.entry(record.effort.clone().unwrap_or_else(|| UNSPECIFIED_EFFORT.to_string())).or_default();
        effort.items += 1;
        if let Some(latency) = record.latency_ms() {
            effort.latency.push(latency);
        }
        if let Some(usage) = &record.usage {
            effort.prompt_tokens.push(usage.prompt_tokens as f64);
            effort.cached_prompt_tokens.push(usage.cached_prompt_tokens as f64);
            effort.completion_tokens.push(usage.completion_tokens as f64);
        }
        if predicted == Predicted::NeedsReview {
            effort.needs_review += 1;
        }

        for (category, &known) in &item.categories {
            let flagged_here = match judged_by.get(category.as_str()) {
                Some(policies) => policies.iter().any(|policy| record.predicted(Some(policy)) != Predicted::Allow),
                None => flagged,
            };
            per_category.entry(category.clone()).or_default().add(known, flagged_here);
        }
        multi.add(item, record, &multi_policy_map);

        let Some(actual) = item.label else {
            report.unlabelled += 1;
            continue;
        };
        if let Some(group) = &item.group {
            per_group.entry(group.clone()).or_default().add(actual, flagged);
        }
        with_review.add(actual, flagged);
        effort.with_review.add(actual, flagged);
        match predicted.as_label() {
            Some(label) => {
                without_review.add(actual, label);
                effort.without_review.add(actual, label);
            }
            None => {
                report.needs_review.count += 1;
                if actual {
                    report.needs_review.positives += 1;
                } else {
                    report.needs_review.negatives += 1;
                }
            }
        }
        let examples = match (actual, predicted) {
            (false, Predicted::Violation) => Some(&mut report.false_positives),
            (true, Predicted::Allow) => Some(&mut report.false_negatives),
            (_, Predicted::NeedsReview) => Some(&mut report.needs_review_items),
            _ => None,
        };
        if let Some(list) = examples
            && list.len() < opts.max_examples
        {
            list.push(example(item, record, predicted, policy));
        }
    }

    let scored = with_review.total();
    report.metrics = with_review.metrics();
    report.excluding_needs_review = without_review.metrics();
    report.needs_review.rate = (scored > 0).then(|| report.needs_review.count as f64 / scored as f64);
    report.parse_failure_rate = (report.joined > 0).then(|| report.parse_failures as f64 / report.joined as f64);
    report.per_category = per_category.into_iter().map(|(k, c)| (k, c.metrics())).collect();
    report.per_group = per_group.into_iter().map(|(k, c)| (k, c.metrics())).collect();
    report.multi_policy = multi.finish(multi_policy_map);
    report.by_effort = efforts
        .into_iter()
        .map(|(name, acc)| {
            let stats = EffortStats {
                items: acc.items,
                metrics: acc.with_review.metrics(),
                excluding_needs_review: acc.without_review.metrics(),
                needs_review: acc.needs_review,
                latency_ms: Distribution::of(&acc.latency),
                prompt_tokens: Distribution::of(&acc.prompt_tokens),
                cached_prompt_tokens: Distribution::of(&acc.cached_prompt_tokens),
                completion_tokens: Distribution::of(&acc.completion_tokens),
                latency_histogram: histogram(&acc.latency, opts.histogram_bins),
            };
            (name, stats)
        })
        .collect();
    tracing::debug!(joined = report.joined, scored, "scored predictions");
    Ok(report)
}

fn example(item: &Item, record: &PredictionRecord, predicted: Predicted, policy: Option<&str>) -> Example {
    Example {
        id: item.id.clone(),
        text: excerpt(&item.text, 300),
        label: item.label,
        predicted,
        rationale: record.rationale(policy).map(|r| excerpt(r, 500)),
    }
}

/// Whether every category `opts` maps a policy to (`--map POLICY=CATEGORY`) is one of the dataset's: checked before a
/// live run, which would otherwise find a mistyped category only when it is scored, hours later.
pub fn check_mapped_categories(dataset: &Dataset, opts: &ScoreOptions) -> Result<(), EvalError> {
    map_policies_to_categories(&BTreeSet::new(), dataset, opts).map(drop)
}

fn map_policies_to_categories(
    names: &BTreeSet<String>,
    dataset: &Dataset,
    opts: &ScoreOptions,
) -> Result<BTreeMap<String, String>, EvalError> {
    let known = dataset.category_keys();
    let mut mapping = BTreeMap::new();
    for (policy, category) in &opts.policy_labels {
        let resolved = dataset.category_for_policy(category).ok_or_else(|| {
            EvalError::Options(format!(
                "policy `{policy}` is mapped to category `{category}`, which dataset {} does not have (categories: {})",
                dataset.name,
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            ))
        })?;
        mapping.insert(policy.clone(), resolved);
    }
    for name in names {
        if !mapping.contains_key(name)
            && let Some(category) = dataset.category_for_policy(name)
        {
            mapping.insert(name.clone(), category);
        }
    }
    Ok(mapping)
}

#[derive(Default)]
struct MultiAccumulator {
    items: u64,
    correct: u64,
    excluded: u64,
    per_policy: BTreeMap<String, Confusion>,
}

impl MultiAccumulator {
    fn add(&mut self, item: &Item, record: &PredictionRecord, mapping: &BTreeMap<String, String>) {
        if mapping.is_empty() {
            return;
        }
        let mut all_known = true;
        let mut all_right = true;
        for (policy, category) in mapping {
            let predicted = record.predicted(Some(policy));
            match item.categories.get(category) {
                Some(&actual) => {
                    self.per_policy.entry(policy.clone()).or_default().add(actual, predicted != Predicted::Allow);
                    // needs_review is not a label, so it is never right here.
                    all_right &= predicted.as_label() == Some(actual);
                }
                None => all_known = false,
            }
        }
        if all_known {
            self.items += 1;
            self.correct += u64::from(all_right);
        } else {
            self.excluded += 1;
        }
    }

    fn finish(self, mapping: BTreeMap<String, String>) -> Option<MultiPolicy> {
        if mapping.is_empty() {
            return None;
        }
        Some(MultiPolicy {
            policies: mapping,
            items: self.items,
            correct: self.correct,
            accuracy: (self.items > 0).then(|| self.correct as f64 / self.items as f64),
            excluded: self.excluded,
            per_policy: self.per_policy.into_iter().map(|(k, c)| (k, c.metrics())).collect(),
        })
    }
}

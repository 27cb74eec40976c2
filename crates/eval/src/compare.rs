//! Comparing two runs on the same items: two policy versions, two efforts or two models.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::dataset::Dataset;
use crate::metrics::Distribution;
use crate::predictions::{Predicted, PredictionRecord};
use crate::score::{IdList, ScoreOptions, ScoreReport, score_predictions};
use crate::{EvalError, excerpt};

/// How a flipped item moved relative to its true label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlipKind {
    /// Wrong before, right after.
    Fixed,
    /// Right before, wrong after: a regression.
    Broken,
    /// Neither (label unknown, or needs_review on one side).
    Changed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Flip {
    pub id: String,
    pub text: String,
    pub label: Option<bool>,
    pub before: Predicted,
    pub after: Predicted,
    pub kind: FlipKind,
    pub before_rationale: Option<String>,
    pub after_rationale: Option<String>,
}

/// `after - before` for the headline scores; `None` where either side is undefined.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricDeltas {
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    pub f1: Option<f64>,
    pub accuracy: Option<f64>,
    pub false_positive_rate: Option<f64>,
    pub needs_review_rate: Option<f64>,
    pub parse_failure_rate: Option<f64>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
    pub completion_tokens_mean: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// Both reports cover only the items present in both runs, so their deltas compare like with like.
    pub before: ScoreReport,
    pub after: ScoreReport,
    pub deltas: MetricDeltas,
    pub common_items: usize,
    pub only_in_before: IdList,
    pub only_in_after: IdList,
    pub flips: Vec<Flip>,
    pub fixed: usize,
    pub broken: usize,
    pub changed: usize,
    /// Common items whose classification failed in either run (an outage, not an answer), left out of the flips:
    /// a failure says nothing about the policy, and an outage in the second run would read as a regression.
    #[serde(default)]
    pub failed: IdList,
}

fn delta(before: Option<f64>, after: Option<f64>) -> Option<f64> {
    Some(after? - before?)
}

/// A distribution over every record of a run, whatever effort produced it.
fn run_distribution(
    records: &[PredictionRecord],
    value: impl Fn(&PredictionRecord) -> Option<f64>,
) -> Option<Distribution> {
    let values: Vec<f64> = records.iter().filter_map(value).collect();
    Distribution::of(&values)
}

/// Scores both runs on their common items and lists every item whose prediction changed.
#[tracing::instrument(skip_all, fields(dataset = %dataset.name))]
pub fn compare_runs(
    before: &[PredictionRecord],
    after: &[PredictionRecord],
    dataset: &Dataset,
    opts: &ScoreOptions,
) -> Result<Comparison, EvalError> {
    let before_ids: HashSet<&str> = before.iter().map(|r| r.id.as_str()).collect();
    let after_ids: HashSet<&str> = after.iter().map(|r| r.id.as_str()).collect();
    let mut only_in_before = IdList::default();
    let mut only_in_after = IdList::default();
    let mut seen = HashSet::new();
    for record in before {
        if !after_ids.contains(record.id.as_str()) && seen.insert(record.id.as_str()) {
            only_in_before.push(&record.id, opts.max_listed_ids);
        }
    }
    seen.clear();
    for record in after {
        if !before_ids.contains(record.id.as_str()) && seen.insert(record.id.as_str()) {
            only_in_after.push(&record.id, opts.max_listed_ids);
        }
    }
    let common = |records: &[PredictionRecord], other: &HashSet<&str>| -> Vec<PredictionRecord> {
        records.iter().filter(|r| other.contains(r.id.as_str())).cloned().collect()
    };
    let before_common = common(before, &after_ids);
    let after_common = common(after, &before_ids);
    let before_report = score_predictions(&before_common, dataset, opts)?;
    let after_report = score_predictions(&after_common, dataset, opts)?;

    // The last record for an id wins, as in scoring.
    let before_by_id: HashMap<&str, &PredictionRecord> = before_common.iter().map(|r| (r.id.as_str(), r)).collect();
    let after_by_id: HashMap<&str, &PredictionRecord> = after_common.iter().map(|r| (r.id.as_str(), r)).collect();
    let policy = opts.policy.as_deref();
    let mut flips = Vec::new();
    let mut failed = IdList::default();
    let mut common_items = 0;
    for item in &dataset.items {
        let (Some(old), Some(new)) = (before_by_id.get(item.id.as_str()), after_by_id.get(item.id.as_str())) else {
            continue;
        };
        common_items += 1;
        if old.is_failure() || new.is_failure() {
            failed.push(&item.id, opts.max_listed_ids);
            continue;
        }
        let (was, now) = (old.predicted(policy), new.predicted(policy));
        if was == now {
            continue;
        }
        let kind = match (item.label, was.as_label(), now.as_label()) {
            (Some(label), Some(was), Some(now)) if was != label && now == label => FlipKind::Fixed,
            (Some(label), Some(was), Some(now)) if was == label && now != label => FlipKind::Broken,
            // Losing a correct answer to needs_review costs a human look: count it as a regression too.
            (Some(label), Some(was), None) if was == label => FlipKind::Broken,
            (Some(label), None, Some(now)) if now == label => FlipKind::Fixed,
            // A person used to look; now a wrong answer goes out unseen (for a violation: a miss).
            (Some(label), None, Some(now)) if now != label => FlipKind::Broken,
            _ => FlipKind::Changed,
        };
        flips.push(Flip {
            id: item.id.clone(),
            text: excerpt(&item.text, 300),
            label: item.label,
            before: was,
            after: now,
            kind,
            before_rationale: old.rationale(policy).map(|r| excerpt(r, 500)),
            after_rationale: new.rationale(policy).map(|r| excerpt(r, 500)),
        });
    }
    let count = |kind: FlipKind| flips.iter().filter(|f| f.kind == kind).count();
    let (fixed, broken, changed) = (count(FlipKind::Fixed), count(FlipKind::Broken), count(FlipKind::Changed));

    let before_latency = run_distribution(&before_common, PredictionRecord::latency_ms);
    let after_latency = run_distribution(&after_common, PredictionRecord::latency_ms);
    let completion = |r: &PredictionRecord| r.usage.as_ref().map(|u| u.completion_tokens as f64);
    let before_tokens = run_distribution(&before_common, completion);
    let after_tokens = run_distribution(&after_common, completion);
    let deltas = MetricDeltas {
        precision: delta(before_report.metrics.precision, after_report.metrics.precision),
        recall: delta(before_report.metrics.recall, after_report.metrics.recall),
        f1: delta(before_report.metrics.f1, after_report.metrics.f1),
        accuracy: delta(before_report.metrics.accuracy, after_report.metrics.accuracy),
        false_positive_rate: delta(before_report.metrics.false_positive_rate, after_report.metrics.false_positive_rate),
        needs_review_rate: delta(before_report.needs_review.rate, after_report.needs_review.rate),
        parse_failure_rate: delta(before_report.parse_failure_rate, after_report.parse_failure_rate),
        latency_p50_ms: delta(before_latency.map(|d| d.p50), after_latency.map(|d| d.p50)),
        latency_p95_ms: delta(before_latency.map(|d| d.p95), after_latency.map(|d| d.p95)),
        completion_tokens_mean: delta(before_tokens.map(|d| d.mean), after_tokens.map(|d| d.mean)),
    };
    Ok(Comparison {
        before: before_report,
        after: after_report,
        deltas,
        common_items,
        only_in_before,
        only_in_after,
        flips,
        fixed,
        broken,
        changed,
        failed,
    })
}

//! Binary classification metrics and simple distributions.
//!
//! A ratio whose denominator is zero is `None` (JSON `null`, "n/a" in text) rather than 0 or NaN, so an
//! empty class never looks like a perfect or a failing score.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confusion {
    pub tp: u64,
    pub fp: u64,
    pub tn: u64,
    #[serde(rename = "fn")]
    pub fn_: u64,
}

impl Confusion {
    pub fn add(&mut self, actual: bool, predicted: bool) {
        match (actual, predicted) {
            (true, true) => self.tp += 1,
            (false, true) => self.fp += 1,
            (false, false) => self.tn += 1,
            (true, false) => self.fn_ += 1,
        }
    }

    pub fn total(&self) -> u64 {
        self.tp + self.fp + self.tn + self.fn_
    }

    pub fn precision(&self) -> Option<f64> {
        ratio(self.tp, self.tp + self.fp)
    }

    pub fn recall(&self) -> Option<f64> {
        ratio(self.tp, self.tp + self.fn_)
    }

    /// 2TP / (2TP + FP + FN): the harmonic mean of precision and recall, defined whenever either is.
    pub fn f1(&self) -> Option<f64> {
        ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn_)
    }

    pub fn accuracy(&self) -> Option<f64> {
        ratio(self.tp + self.tn, self.total())
    }

    pub fn false_positive_rate(&self) -> Option<f64> {
        ratio(self.fp, self.fp + self.tn)
    }

    pub fn metrics(&self) -> Metrics {
        Metrics {
            confusion: *self,
            n: self.total(),
            positives: self.tp + self.fn_,
            precision: self.precision(),
            recall: self.recall(),
            f1: self.f1(),
            accuracy: self.accuracy(),
            false_positive_rate: self.false_positive_rate(),
        }
    }
}

fn ratio(numerator: u64, denominator: u64) -> Option<f64> {
    (denominator > 0).then(|| numerator as f64 / denominator as f64)
}

/// A confusion matrix with its derived scores.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    #[serde(flatten)]
    pub confusion: Confusion,
    pub n: u64,
    /// Items whose true label is positive.
    pub positives: u64,
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    pub f1: Option<f64>,
    pub accuracy: Option<f64>,
    pub false_positive_rate: Option<f64>,
}

/// Mean and nearest-rank percentiles of a sample.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Distribution {
    pub n: usize,
    pub mean: f64,
    pub p50: f64,
    pub p95: f64,
    pub min: f64,
    pub max: f64,
}

impl Distribution {
    /// `None` for an empty sample. NaN values are dropped.
    pub fn of(values: &[f64]) -> Option<Distribution> {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        Some(Distribution {
            n,
            mean: sorted.iter().sum::<f64>() / n as f64,
            p50: nearest_rank(&sorted, 0.50),
            p95: nearest_rank(&sorted, 0.95),
            min: sorted[0],
            max: sorted[n - 1],
        })
    }
}

/// The smallest value with at least `quantile` of the sample at or below it.
fn nearest_rank(sorted: &[f64], quantile: f64) -> f64 {
    let rank = (quantile * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One bar of a histogram: values in `[lo, hi)` (the last bin also holds `hi`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HistogramBin {
    pub lo: f64,
    pub hi: f64,
    pub count: u64,
}

/// Equal-width bins between the smallest and largest value.
pub fn histogram(values: &[f64], bins: usize) -> Vec<HistogramBin> {
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    let (Some(min), Some(max)) = (finite.iter().copied().reduce(f64::min), finite.iter().copied().reduce(f64::max))
    else {
        return Vec::new();
    };
    let bins = bins.max(1);
    if max == min {
        return vec![HistogramBin { lo: min, hi: max, count: finite.len() as u64 }];
    }
    let width = (max - min) / bins as f64;
    let mut out: Vec<HistogramBin> = (0..bins)
        .map(|i| HistogramBin { lo: min + width * i as f64, hi: min + width * (i + 1) as f64, count: 0 })
        .collect();
    for value in finite {
        let index = (((value - min) / width) as usize).min(bins - 1);
        out[index].count += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_match_hand_computation() {
        // tp=3 fp=1 tn=4 fn=2: P=3/4, R=3/5, F1=6/9, acc=7/10, FPR=1/5.
        let c = Confusion { tp: 3, fp: 1, tn: 4, fn_: 2 };
        let m = c.metrics();
        assert_eq!(m.precision, Some(0.75));
        assert_eq!(m.recall, Some(0.6));
        assert!((m.f1.unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(m.accuracy, Some(0.7));
        assert_eq!(m.false_positive_rate, Some(0.2));
        assert_eq!(m.positives, 5);
        // F1 equals the harmonic mean of P and R.
        let harmonic = 2.0 * 0.75 * 0.6 / (0.75 + 0.6);
        assert!((m.f1.unwrap() - harmonic).abs() < 1e-12);
    }

    #[test]
    fn empty_denominators_are_none_not_zero() {
        let c = Confusion { tp: 0, fp: 0, tn: 5, fn_: 0 };
        assert_eq!(c.precision(), None);
        assert_eq!(c.recall(), None);
        assert_eq!(c.f1(), None);
        assert_eq!(c.accuracy(), Some(1.0));
        assert_eq!(Confusion::default().accuracy(), None);
        let json = serde_json::to_value(c.metrics()).unwrap();
        assert!(json["precision"].is_null());
        assert_eq!(json["fn"], 0);
        assert_eq!(json["tn"], 5);
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let values: Vec<f64> = (1..=20).map(f64::from).collect();
        let d = Distribution::of(&values).unwrap();
        assert_eq!(d.p50, 10.0);
        assert_eq!(d.p95, 19.0);
        assert_eq!(d.mean, 10.5);
        let d = Distribution::of(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!((d.p50, d.p95, d.min, d.max), (3.0, 5.0, 1.0, 5.0));
        assert!(Distribution::of(&[]).is_none());
    }

    #[test]
    fn histogram_bins_hold_every_value() {
        let bins = histogram(&[0.0, 1.0, 2.0, 9.0, 10.0], 5);
        assert_eq!(bins.len(), 5);
        assert_eq!(bins.iter().map(|b| b.count).collect::<Vec<_>>(), vec![2, 1, 0, 0, 2]);
        assert_eq!(histogram(&[4.0, 4.0], 3), vec![HistogramBin { lo: 4.0, hi: 4.0, count: 2 }]);
        assert!(histogram(&[], 3).is_empty());
    }
}

//! Score calibration (Platt scaling), threshold choice from a target recall, and ranking metrics.

use serde::{Deserialize, Serialize};

use crate::TriageError;

/// `p = sigmoid(a * margin + b)`; `a > 0` keeps it monotone in the margin.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum Calibration {
    Platt { a: f64, b: f64 },
}

impl Calibration {
    #[inline]
    pub fn probability(&self, margin: f32) -> f32 {
        match *self {
            Calibration::Platt { a, b } => (1.0 / (1.0 + (-(a * margin as f64 + b)).exp())) as f32,
        }
    }

    pub fn validate(&self) -> Result<(), TriageError> {
        match *self {
            Calibration::Platt { a, b } if a.is_finite() && b.is_finite() && a > 0.0 => Ok(()),
            Calibration::Platt { a, b } => {
                Err(TriageError::InvalidArtifact(format!("Platt calibration needs finite a > 0, got a={a} b={b}")))
            }
        }
    }
}

/// Fits Platt scaling by Newton's method on the log loss, with Platt's smoothed targets so that a
/// perfectly separated held-out set does not push the slope to infinity.
pub fn fit_platt(margins: &[f32], labels: &[bool]) -> Result<Calibration, TriageError> {
    if margins.len() != labels.len() || margins.is_empty() {
        return Err(TriageError::Training("calibration needs one label per score and at least one score".into()));
    }
    let positives = labels.iter().filter(|&&l| l).count() as f64;
    let negatives = labels.len() as f64 - positives;
    if positives == 0.0 || negatives == 0.0 {
        return Err(TriageError::Training("calibration needs both classes in the held-out scores".into()));
    }
    // `f32::min` skips NaN and a NaN loss never improves, so a NaN score would return the starting guess as a
    // fitted calibration.
    if let Some(bad) = margins.iter().find(|m| !m.is_finite()) {
        return Err(TriageError::Training(format!("calibration needs finite held-out scores, got {bad}")));
    }
    let (min, max) = margins.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &m| (lo.min(m), hi.max(m)));
    if max <= min || !min.is_finite() || !max.is_finite() {
        return Err(TriageError::Training(format!(
            "the classifier's held-out scores carry no signal (all in [{min}, {max}]); more or cleaner data is needed"
        )));
    }
    let hi = (positives + 1.0) / (positives + 2.0);
    let lo = 1.0 / (negatives + 2.0);
    let targets: Vec<f64> = labels.iter().map(|&l| if l { hi } else { lo }).collect();

    let (mut a, mut b) = (1.0f64, -((negatives + 1.0) / (positives + 1.0)).ln());
    let loss = |a: f64, b: f64| -> f64 {
        margins
            .iter()
            .zip(&targets)
            .map(|(&m, &t)| {
                let z = a * m as f64 + b;
                // log(1 + e^z) - t z, written to stay finite for large |z|
                let softplus = if z > 0.0 { z + (-z).exp().ln_1p() } else { z.exp().ln_1p() };
                softplus - t * z
            })
            .sum()
    };
    let mut current = loss(a, b);
    for _ in 0..100 {
        let (mut ga, mut gb, mut haa, mut hab, mut hbb) = (0.0, 0.0, 1e-12, 0.0, 1e-12);
        for (&m, &t) in margins.iter().zip(&targets) {
            let m = m as f64;
            let p = 1.0 / (1.0 + (-(a * m + b)).exp());
            let d = p - t;
            let w = p * (1.0 - p);
            ga += d * m;
            gb += d;
            haa += w * m * m;
            hab += w * m;
            hbb += w;
        }
        let det = haa * hbb - hab * hab;
        if det.abs() < 1e-18 {
            break;
        }
        let da = (hbb * ga - hab * gb) / det;
        let db = (haa * gb - hab * ga) / det;
        // Backtracking keeps Newton from overshooting on nearly separable scores.
        let mut step = 1.0;
        let mut improved = false;
        while step > 1e-6 {
            let (na, nb) = (a - step * da, b - step * db);
            let next = loss(na, nb);
            if next <= current {
                improved = (current - next) > 1e-10 * current.abs().max(1.0);
                a = na;
                b = nb;
                current = next;
                break;
            }
            step /= 2.0;
        }
        if !improved {
            break;
        }
    }
    let calibration = Calibration::Platt { a, b };
    calibration.validate().map_err(|_| {
        TriageError::Training(format!(
            "the classifier's held-out scores carry no signal (Platt slope a={a:.4}); more or cleaner data is needed"
        ))
    })?;
    Ok(calibration)
}

/// The largest threshold `t` such that flagging every item with `p >= t` keeps at least `target_recall`
/// of the violations. Items below `t` are the ones triage lets through without the model.
pub fn allow_threshold(probabilities: &[f32], labels: &[bool], target_recall: f64) -> Option<f32> {
    // A NaN sorts past every number and could itself come back as the threshold.
    if probabilities.iter().any(|p| !p.is_finite()) {
        return None;
    }
    let widened: Vec<f64> = probabilities.iter().map(|&p| f64::from(p)).collect();
    // The threshold is one of the inputs, so narrowing it back is exact.
    safeguard_embed::head::threshold_at_recall(&widened, labels, target_recall).map(|t| t as f32)
}

/// The smallest threshold `t` at which the items with `p >= t` have precision >= `target_precision`
/// with at least `min_support` of them, scanning from the top; `None` when no threshold qualifies or a
/// probability is not finite.
pub fn violate_threshold(
    probabilities: &[f32],
    labels: &[bool],
    target_precision: f64,
    min_support: usize,
) -> Option<f32> {
    // NaN is not equal to itself, so the tie loop below would never step past one.
    if probabilities.iter().any(|p| !p.is_finite()) {
        return None;
    }
    let mut pairs: Vec<(f32, bool)> = probabilities.iter().copied().zip(labels.iter().copied()).collect();
    pairs.sort_by(|x, y| y.0.total_cmp(&x.0));
    let mut best = None;
    let (mut tp, mut n) = (0usize, 0usize);
    let mut i = 0;
    while i < pairs.len() {
        // Tied scores fall on the same side of any threshold, so take them together.
        let threshold = pairs[i].0;
        while i < pairs.len() && pairs[i].0 == threshold {
            n += 1;
            tp += pairs[i].1 as usize;
            i += 1;
        }
        if n >= min_support && tp as f64 >= target_precision * n as f64 {
            best = Some(threshold);
        }
    }
    best
}

/// Area under the ROC curve (Mann-Whitney U, ties count half). `None` without both classes.
pub fn auc(scores: &[f32], labels: &[bool]) -> Option<f64> {
    let widened: Vec<f64> = scores.iter().map(|&s| f64::from(s)).collect();
    safeguard_embed::head::auc(&widened, labels)
}

/// What a pair of thresholds does on labelled scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BandMetrics {
    pub items: usize,
    pub violations: usize,
    /// Share of violations NOT let through as confidently benign.
    pub recall: f64,
    /// Share of benign items let through as confidently benign (they skip the reasoning model).
    pub skip_rate: f64,
    /// Share of all items that skip the model (either confident band).
    pub decided_rate: f64,
    /// Precision of "not confidently benign" (what goes on to the model or is flagged).
    pub precision: f64,
    /// Precision and recall of the confident-violation band.
    pub confident_violation_precision: Option<f64>,
    pub confident_violation_recall: f64,
    pub auc: Option<f64>,
}

pub fn band_metrics(
    probabilities: &[f32],
    labels: &[bool],
    allow_below: f32,
    violate_above: Option<f32>,
) -> BandMetrics {
    let (mut tp, mut fp, mut fn_, mut tn, mut cv_tp, mut cv_fp) = (0usize, 0usize, 0usize, 0usize, 0usize, 0usize);
    for (&p, &l) in probabilities.iter().zip(labels) {
        let benign = p < allow_below;
        let confident_violation = !benign && violate_above.is_some_and(|t| p >= t);
        match (l, benign) {
            (true, false) => tp += 1,
            (true, true) => fn_ += 1,
            (false, false) => fp += 1,
            (false, true) => tn += 1,
        }
        if confident_violation {
            if l {
                cv_tp += 1;
            } else {
                cv_fp += 1;
            }
        }
    }
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    BandMetrics {
        items: labels.len(),
        violations: tp + fn_,
        recall: if tp + fn_ == 0 { 1.0 } else { ratio(tp, tp + fn_) },
        skip_rate: ratio(tn, tn + fp),
        decided_rate: ratio(tn + fn_ + cv_tp + cv_fp, labels.len()),
        precision: ratio(tp, tp + fp),
        confident_violation_precision: (cv_tp + cv_fp > 0).then(|| ratio(cv_tp, cv_tp + cv_fp)),
        confident_violation_recall: ratio(cv_tp, tp + fn_),
        auc: auc(probabilities, labels),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::SplitMix;

    /// Noisy scores: positives centred at +1, negatives at -1.
    fn noisy(n: usize, seed: u64) -> (Vec<f32>, Vec<bool>) {
        let mut rng = SplitMix::new(seed);
        let mut uniform = || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        (0..n)
            .map(|i| {
                let label = i % 4 == 0;
                // Sum of uniforms: roughly normal noise, deterministic.
                let noise: f64 = (0..6).map(|_| uniform()).sum::<f64>() - 3.0;
                ((if label { 1.0 } else { -1.0 } + noise) as f32, label)
            })
            .unzip()
    }

    #[test]
    fn platt_is_monotone_and_roughly_calibrated() {
        let (margins, labels) = noisy(4000, 7);
        let calibration = fit_platt(&margins, &labels).unwrap();
        let Calibration::Platt { a, .. } = calibration;
        assert!(a > 0.0);
        let mut previous = 0.0;
        for i in -50..=50 {
            let p = calibration.probability(i as f32 / 10.0);
            assert!(p >= previous, "calibration must be monotone");
            previous = p;
        }
        // Mean predicted probability matches the base rate (a property of the log-loss optimum).
        let mean: f64 = margins.iter().map(|&m| calibration.probability(m) as f64).sum::<f64>() / margins.len() as f64;
        assert!((mean - 0.25).abs() < 0.01, "mean {mean}");
    }

    #[test]
    fn platt_refuses_signal_free_scores() {
        let margins = vec![0.0f32; 100];
        let labels: Vec<bool> = (0..100).map(|i| i % 2 == 0).collect();
        assert!(fit_platt(&margins, &labels).is_err());
        // Scores that rank violations lowest give a negative slope: refused rather than inverted.
        let inverted: Vec<f32> = labels.iter().map(|&l| if l { -1.0 } else { 1.0 }).collect();
        assert!(fit_platt(&inverted, &labels).is_err());
        assert!(fit_platt(&[1.0], &[true]).is_err());
    }

    #[test]
    fn threshold_hits_target_recall_on_held_out_data() {
        let (fit_scores, fit_labels) = noisy(20000, 1);
        let (held_scores, held_labels) = noisy(20000, 2);
        let t = allow_threshold(&fit_scores, &fit_labels, 0.95).unwrap();
        let on_fit = band_metrics(&fit_scores, &fit_labels, t, None);
        assert!(on_fit.recall >= 0.95);
        let held = band_metrics(&held_scores, &held_labels, t, None);
        assert!((held.recall - 0.95).abs() < 0.01, "held-out recall {}", held.recall);
        assert!(held.skip_rate > 0.3 && held.skip_rate < 0.99);
    }

    #[test]
    fn allow_threshold_counts_misses_exactly() {
        let probs = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95];
        let labels = [true; 10];
        // 90% recall of 10 allows one miss: threshold at the second-lowest violation.
        assert_eq!(allow_threshold(&probs, &labels, 0.9), Some(0.2));
        assert_eq!(allow_threshold(&probs, &labels, 1.0), Some(0.1));
        assert_eq!(allow_threshold(&probs, &[false; 10], 0.9), None);
    }

    #[test]
    fn violate_threshold_meets_precision() {
        let probs = [0.99, 0.98, 0.97, 0.9, 0.8, 0.5, 0.4];
        let labels = [true, true, true, false, true, false, false];
        assert_eq!(violate_threshold(&probs, &labels, 1.0, 2), Some(0.97));
        assert_eq!(violate_threshold(&probs, &labels, 0.8, 2), Some(0.8));
        assert_eq!(violate_threshold(&probs, &labels, 1.0, 5), None);
    }

    /// A NaN probability once made `violate_threshold` spin forever and `fit_platt` hand back its starting guess.
    #[test]
    fn non_finite_scores_are_refused() {
        assert_eq!(violate_threshold(&[f32::NAN, 0.5], &[true, false], 0.5, 1), None);
        assert_eq!(violate_threshold(&[0.9, f32::INFINITY, 0.5], &[true, true, false], 0.5, 1), None);
        assert_eq!(allow_threshold(&[f32::NAN, 0.5], &[true, true], 0.5), None);
        let err = fit_platt(&[f32::NAN, 0.0, 1.0], &[true, false, true]).unwrap_err();
        assert!(matches!(err, TriageError::Training(ref m) if m.contains("finite")), "{err:?}");
        assert!(fit_platt(&[f32::NEG_INFINITY, 0.0, 1.0], &[false, false, true]).is_err());
    }

    #[test]
    fn auc_handles_ties_and_extremes() {
        assert_eq!(auc(&[0.1, 0.2, 0.8, 0.9], &[false, false, true, true]), Some(1.0));
        assert_eq!(auc(&[0.9, 0.8, 0.2, 0.1], &[false, false, true, true]), Some(0.0));
        assert_eq!(auc(&[0.5, 0.5], &[false, true]), Some(0.5));
        assert_eq!(auc(&[0.5], &[true]), None);
    }
}

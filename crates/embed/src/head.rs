//! A linear classifier head on sentence embeddings: L2-regularized logistic regression fitted by damped
//! Newton steps (sklearn's objective, optionally class balanced), stratified folds for out-of-fold
//! scores (copies of a text kept in one fold), and a threshold chosen on those scores at a target recall. Shared by the triage stage and
//! the research examples so both measure the same thing.

/// Why a head could not be fitted.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("no training rows")]
    Empty,
    #[error("row {row} has {got} features, expected {expected}")]
    Ragged { row: usize, got: usize, expected: usize },
    #[error("training rows, labels and weights differ in length ({rows}, {labels}, {weights})")]
    LengthMismatch { rows: usize, labels: usize, weights: usize },
    #[error("both classes are needed to fit a classifier (violations {positives}, benign {negatives})")]
    OneClass { positives: usize, negatives: usize },
    #[error("invalid head configuration: {0}")]
    Config(String),
    #[error("the fit diverged (non-finite parameters)")]
    Diverged,
}

/// Objective settings: `c · Σ sᵢ·logloss + ½‖w‖²`, intercept unpenalized.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogisticConfig {
    /// Inverse regularization strength, as sklearn's `C`.
    pub c: f64,
    /// Weight each class by `W / (2 · W_class)`, W the summed sample weights (sklearn's `class_weight="balanced"`,
    /// with weights counted instead of rows).
    pub balanced: bool,
    pub max_iterations: usize,
}

impl Default for LogisticConfig {
    fn default() -> Self {
        LogisticConfig { c: 3.0, balanced: true, max_iterations: 100 }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogisticRegression {
    pub weights: Vec<f64>,
    pub bias: f64,
}

impl LogisticRegression {
    /// Fits on rows `x` (all the same length) with labels `y` and per-row weights.
    pub fn fit(x: &[&[f64]], y: &[bool], sample_weight: &[f64], config: &LogisticConfig) -> Result<Self, HeadError> {
        let n = x.len();
        if n == 0 {
            return Err(HeadError::Empty);
        }
        if y.len() != n || sample_weight.len() != n {
            return Err(HeadError::LengthMismatch { rows: n, labels: y.len(), weights: sample_weight.len() });
        }
        if !(config.c.is_finite() && config.c > 0.0) {
            return Err(HeadError::Config(format!("C must be a positive number, got {}", config.c)));
        }
        if sample_weight.iter().any(|w| !(w.is_finite() && *w >= 0.0)) {
            return Err(HeadError::Config("sample weights must be finite and non-negative".into()));
        }
        let d = x[0].len();
        if let Some((row, r)) = x.iter().enumerate().find(|(_, r)| r.len() != d) {
            return Err(HeadError::Ragged { row, got: r.len(), expected: d });
        }
        let positives = y.iter().filter(|&&v| v).count();
        let negatives = n - positives;
        if positives == 0 || negatives == 0 {
            return Err(HeadError::OneClass { positives, negatives });
        }
        // Balanced by weighted counts, not rows: down-weighted auxiliary data (thousands of out-of-domain tweets
        // at 0.05, say) must not tilt the balance of the data the threshold is for by its row count.
        let class_weight = if config.balanced {
            let weight_of =
                |class: bool| y.iter().zip(sample_weight).filter(|(v, _)| **v == class).map(|(_, w)| w).sum::<f64>();
            let (negative_w, positive_w) = (weight_of(false), weight_of(true));
            let total_w = negative_w + positive_w;
            if negative_w <= 0.0 || positive_w <= 0.0 {
                return Err(HeadError::OneClass { positives, negatives });
            }
            [total_w / (2.0 * negative_w), total_w / (2.0 * positive_w)]
        } else {
            [1.0, 1.0]
        };
        let target: Vec<f64> = y.iter().map(|&v| if v { 1.0 } else { 0.0 }).collect();
        let s: Vec<f64> = (0..n).map(|i| config.c * sample_weight[i] * class_weight[y[i] as usize]).collect();
        let dim = d + 1;
        let mut theta = vec![0.0; dim];
        let objective = |theta: &[f64]| -> f64 {
            let mut total = 0.5 * theta[..d].iter().map(|v| v * v).sum::<f64>();
            for i in 0..n {
                let z = dot(x[i], &theta[..d]) + theta[d];
                // log(1 + e^{-z}) for y=1, log(1 + e^{z}) for y=0, computed stably.
                let m = if y[i] { -z } else { z };
                total += s[i] * (m.max(0.0) + (-m.abs()).exp().ln_1p());
            }
            total
        };
        let mut current = objective(&theta);
        let mut design = vec![0.0; n * dim];
        for _ in 0..config.max_iterations {
            let mut grad = vec![0.0; dim];
            grad[..d].copy_from_slice(&theta[..d]);
            for i in 0..n {
                let p = sigmoid(dot(x[i], &theta[..d]) + theta[d]);
                let r = s[i] * (p - target[i]);
                for j in 0..d {
                    grad[j] += r * x[i][j];
                }
                grad[d] += r;
                let root = (s[i] * p * (1.0 - p)).sqrt();
                let row = &mut design[i * dim..(i + 1) * dim];
                for j in 0..d {
                    row[j] = root * x[i][j];
                }
                row[d] = root;
            }
            let mut hessian = vec![0.0; dim * dim];
            // SAFETY: design is n×dim row-major (read as its transpose for the left operand); hessian is
            // dim×dim row-major; the strides below describe exactly those shapes.
            unsafe {
                matrixmultiply::dgemm(
                    dim,
                    n,
                    dim,
                    1.0,
                    design.as_ptr(),
                    1,
                    dim as isize,
                    design.as_ptr(),
                    dim as isize,
                    1,
                    0.0,
                    hessian.as_mut_ptr(),
                    dim as isize,
                    1,
                );
            }
            for j in 0..d {
                hessian[j * dim + j] += 1.0;
            }
            hessian[d * dim + d] += 1e-9;
            let step = cholesky_solve(&mut hessian, &grad, dim);
            let mut t = 1.0;
            let mut accepted = false;
            for _ in 0..30 {
                let trial: Vec<f64> = theta.iter().zip(&step).map(|(a, b)| a - t * b).collect();
                let value = objective(&trial);
                if value <= current {
                    theta = trial;
                    let improvement = current - value;
                    current = value;
                    accepted = improvement > 1e-10 * current.abs().max(1.0);
                    break;
                }
                t *= 0.5;
            }
            let step_size = step.iter().map(|v| (v * t).abs()).fold(0.0, f64::max);
            if !accepted || step_size < 1e-7 {
                break;
            }
        }
        if theta.iter().any(|v| !v.is_finite()) {
            return Err(HeadError::Diverged);
        }
        Ok(LogisticRegression { weights: theta[..d].to_vec(), bias: theta[d] })
    }

    /// The logit; ≥ a threshold flags.
    pub fn decision(&self, x: &[f64]) -> f64 {
        dot(x, &self.weights) + self.bias
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// Solves A·v = b for symmetric positive-definite A (overwritten with its Cholesky factor).
fn cholesky_solve(a: &mut [f64], b: &[f64], n: usize) -> Vec<f64> {
    for j in 0..n {
        let mut diag = a[j * n + j];
        for k in 0..j {
            diag -= a[j * n + k] * a[j * n + k];
        }
        let diag = diag.max(1e-12).sqrt();
        a[j * n + j] = diag;
        for i in j + 1..n {
            let mut v = a[i * n + j];
            for k in 0..j {
                v -= a[i * n + k] * a[j * n + k];
            }
            a[i * n + j] = v / diag;
        }
    }
    let mut z = b.to_vec();
    for i in 0..n {
        for k in 0..i {
            z[i] -= a[i * n + k] * z[k];
        }
        z[i] /= a[i * n + i];
    }
    for i in (0..n).rev() {
        for k in i + 1..n {
            z[i] -= a[k * n + i] * z[k];
        }
        z[i] /= a[i * n + i];
    }
    z
}

/// SplitMix64: deterministic sampling and folds without a dependency.
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }
}

/// A fold in `0..folds` per label, stratified so every fold sees each class in proportion. Rows are
/// independent here; for texts, where copies must share a fold, use [`copy_grouped_folds`].
pub fn stratified_folds(labels: &[bool], folds: usize, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix(seed);
    let mut fold_of = vec![0; labels.len()];
    for class in [false, true] {
        let mut members: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == class).collect();
        rng.shuffle(&mut members);
        for (k, &i) in members.iter().enumerate() {
            fold_of[i] = k % folds.max(1);
        }
    }
    fold_of
}

/// The form in which two texts count as copies of one another: lowercased, with each run of whitespace one space
/// and none at the ends, as the n-gram featurizer reads them: "Buy  pills\r\nnow" and "buy pills now" give one
/// model the same features, and in two folds one would score the other as if unseen.
pub fn copy_key(text: &str) -> String {
    let mut key = String::with_capacity(text.len());
    for word in text.split_whitespace() {
        if !key.is_empty() {
            key.push(' ');
        }
        key.push_str(word);
    }
    key.to_lowercase()
}

/// A fold in `0..folds` per text for out-of-fold scores, with copies of a text (equal [`copy_key`]s) one
/// unit in one fold: a copy on the training side hands its label to the held-out score (to a neighbour vote, as
/// a neighbour at distance 0), and thresholds set on such scores promise more than unseen traffic gets.
///
/// `strata[i]` is text `i`'s (source, label). A unit is stratified by its first text's, so every fold sees
/// every source's violations, and each label's rotation runs on across sources: restarted per source, one
/// violation in each of two sources would both sit in fold 0, leaving that fold's model none to learn from.
/// Within a stratum the units are shuffled, then placed largest first, each on the fold holding the fewest
/// texts of the stratum so far (the first in rotation order among equals): many copies of one text fill a
/// fold of their own before single texts even out the rest. With units of one text each this is plain round
/// robin over the shuffle, so without copies and from one source it is [`stratified_folds`] exactly.
/// Deterministic in `seed`.
///
/// # Panics
/// If `texts` and `strata` differ in length.
pub fn copy_grouped_folds<T: AsRef<str>>(texts: &[T], strata: &[(usize, bool)], folds: usize, seed: u64) -> Vec<usize> {
    assert_eq!(texts.len(), strata.len(), "one (source, label) per text");
    let folds = folds.max(1);
    let mut unit_of_key: std::collections::HashMap<String, usize> = Default::default();
    let mut units: Vec<Vec<usize>> = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let unit = *unit_of_key.entry(copy_key(text.as_ref())).or_insert_with(|| {
            units.push(Vec::new());
            units.len() - 1
        });
        units[unit].push(i);
    }
    // Units in order of their first text, so without copies the groups and their shuffles are the per-row ones.
    let mut groups: std::collections::BTreeMap<(usize, bool), Vec<usize>> = Default::default();
    for (unit, members) in units.iter().enumerate() {
        groups.entry(strata[members[0]]).or_default().push(unit);
    }
    let mut fold_of = vec![0; texts.len()];
    let mut rng = SplitMix(seed);
    let mut next_fold = [0usize; 2];
    for (&(_, label), group) in groups.iter_mut() {
        rng.shuffle(group);
        // Stable: units of equal size keep their shuffled order.
        group.sort_by_key(|&unit| std::cmp::Reverse(units[unit].len()));
        let next = &mut next_fold[usize::from(label)];
        let mut load = vec![0usize; folds];
        for &unit in group.iter() {
            let fold = (0..folds).map(|k| (*next + k) % folds).min_by_key(|&f| load[f]).unwrap_or(0);
            load[fold] += units[unit].len();
            *next = (fold + 1) % folds;
            for &i in &units[unit] {
                fold_of[i] = fold;
            }
        }
    }
    fold_of
}

/// Scores of the rows with `Some(fold)`, each from a model fitted without its fold; rows with `None` (e.g.
/// auxiliary data) are in every fold's training set and get no score.
pub fn out_of_fold_decisions(
    x: &[&[f64]],
    y: &[bool],
    sample_weight: &[f64],
    fold_of: &[Option<usize>],
    config: &LogisticConfig,
) -> Result<Vec<Option<f64>>, HeadError> {
    if fold_of.len() != x.len() {
        return Err(HeadError::LengthMismatch { rows: x.len(), labels: fold_of.len(), weights: sample_weight.len() });
    }
    let folds = fold_of.iter().flatten().max().map_or(0, |f| f + 1);
    if folds < 2 {
        return Err(HeadError::Config("out-of-fold scores need at least 2 folds".into()));
    }
    let mut scores = vec![None; x.len()];
    for fold in 0..folds {
        let _span = tracing::info_span!("head_fold", fold).entered();
        let train: Vec<usize> = (0..x.len()).filter(|&i| fold_of[i] != Some(fold)).collect();
        let rows: Vec<&[f64]> = train.iter().map(|&i| x[i]).collect();
        let labels: Vec<bool> = train.iter().map(|&i| y[i]).collect();
        let weights: Vec<f64> = train.iter().map(|&i| sample_weight[i]).collect();
        let model = LogisticRegression::fit(&rows, &labels, &weights, config)?;
        for i in (0..x.len()).filter(|&i| fold_of[i] == Some(fold)) {
            scores[i] = Some(model.decision(x[i]));
        }
    }
    Ok(scores)
}

/// The highest threshold at which `score ≥ threshold` still flags `recall` of the positives; `None`
/// without positives.
pub fn threshold_at_recall(scores: &[f64], labels: &[bool], recall: f64) -> Option<f64> {
    let mut positives: Vec<f64> = scores.iter().zip(labels).filter(|(_, y)| **y).map(|(s, _)| *s).collect();
    if positives.is_empty() {
        return None;
    }
    positives.sort_by(f64::total_cmp);
    let k = ((1.0 - recall.clamp(0.0, 1.0)) * positives.len() as f64 + 1e-9).floor() as usize;
    Some(positives[k.min(positives.len() - 1)])
}

/// Recall of positives and share of negatives skipped (`score < threshold`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecallSkip {
    /// `None` without positives.
    pub recall: Option<f64>,
    /// `None` without negatives.
    pub skip_rate: Option<f64>,
    pub missed: usize,
    pub positives: usize,
    pub negatives: usize,
}

pub fn recall_and_skip(scores: &[f64], labels: &[bool], threshold: f64) -> RecallSkip {
    let (mut caught, mut positives, mut skipped, mut negatives) = (0usize, 0usize, 0usize, 0usize);
    for (s, y) in scores.iter().zip(labels) {
        if *y {
            positives += 1;
            caught += (*s >= threshold) as usize;
        } else {
            negatives += 1;
            skipped += (*s < threshold) as usize;
        }
    }
    let ratio = |a: usize, b: usize| (b > 0).then(|| a as f64 / b as f64);
    RecallSkip {
        recall: ratio(caught, positives),
        skip_rate: ratio(skipped, negatives),
        missed: positives - caught,
        positives,
        negatives,
    }
}

/// ROC AUC by the rank-sum statistic, ties counted half; `None` unless both classes occur.
pub fn auc(scores: &[f64], labels: &[bool]) -> Option<f64> {
    let positives = labels.iter().filter(|&&y| y).count() as f64;
    let negatives = labels.len() as f64 - positives;
    if positives == 0.0 || negatives == 0.0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let average_rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            if labels[k] {
                rank_sum += average_rank;
            }
        }
        i = j + 1;
    }
    Some((rank_sum - positives * (positives + 1.0) / 2.0) / (positives * negatives))
}

/// Labelled unit-length embeddings to vote with: an item's neighbours are the `k` stored rows with the
/// highest dot product (cosine, for unit vectors). Rows are f32, as the encoder emits them, so 2,801 rows of
/// 384 dimensions are 4.3 MB and one query is about a million multiply-adds.
#[derive(Debug, Clone, PartialEq)]
pub struct NeighbourIndex {
    rows: Vec<f32>,
    labels: Vec<bool>,
    dim: usize,
}

impl NeighbourIndex {
    /// `rows` holds `labels.len()` rows of `dim` values each, row after row.
    pub fn new(rows: Vec<f32>, labels: Vec<bool>, dim: usize) -> Result<Self, HeadError> {
        if labels.is_empty() {
            return Err(HeadError::Empty);
        }
        if dim == 0 || rows.len() != labels.len() * dim {
            return Err(HeadError::Config(format!(
                "{} values are not {} rows of {dim} dimensions",
                rows.len(),
                labels.len()
            )));
        }
        if rows.iter().any(|v| !v.is_finite()) {
            return Err(HeadError::Config("neighbour rows must be finite".into()));
        }
        Ok(NeighbourIndex { rows, labels, dim })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn rows(&self) -> &[f32] {
        &self.rows
    }

    pub fn labels(&self) -> &[bool] {
        &self.labels
    }

    /// Share of positives among the `k` rows most similar to `query` that `eligible` admits (fewer when
    /// fewer are eligible); `None` when none is, or `query` has the wrong length. Equal similarities go to
    /// the lower row index, so the answer never depends on sort stability.
    pub fn positive_share(&self, query: &[f32], k: usize, eligible: impl Fn(usize) -> bool) -> Option<f64> {
        if query.len() != self.dim || k == 0 {
            return None;
        }
        let mut scored: Vec<(f32, usize)> = self
            .rows
            .chunks_exact(self.dim)
            .enumerate()
            .filter(|(i, _)| eligible(*i))
            .map(|(i, row)| (dot_f32(row, query), i))
            .collect();
        if scored.is_empty() {
            return None;
        }
        let nearest_first = |a: &(f32, usize), b: &(f32, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        let k = k.min(scored.len());
        if k < scored.len() {
            scored.select_nth_unstable_by(k - 1, nearest_first);
        }
        let positives = scored[..k].iter().filter(|(_, i)| self.labels[*i]).count();
        Some(positives as f64 / k as f64)
    }
}

/// Eight independent sums so the compiler can keep them in one vector register. Not `gemm`: matrixmultiply
/// packs both operands first, so a single query would copy every stored row before reading it.
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks.remainder().iter().zip(b_chunks.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for lane in 0..8 {
            lanes[lane] += x[lane] * y[lane];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Embeds `texts` in batches of similar length (even chunks), returned in input order as f64.
pub fn embed_all<S: AsRef<str>>(encoder: &crate::SentenceEncoder, texts: &[S]) -> Vec<Vec<f64>> {
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| texts[i].as_ref().len());
    let mut out = vec![Vec::new(); texts.len()];
    for batch in order.chunks(64) {
        let refs: Vec<&str> = batch.iter().map(|&i| texts[i].as_ref()).collect();
        for (&i, e) in batch.iter().zip(encoder.embed_batch(&refs)) {
            out[i] = e.into_iter().map(f64::from).collect();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two overlapping Gaussian-ish clouds in 8 dimensions, 10 % positives.
    fn clouds(n: usize, seed: u64) -> (Vec<Vec<f64>>, Vec<bool>) {
        let mut rng = SplitMix(seed);
        let mut uniform = || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..n {
            let positive = i % 10 == 0;
            let shift = if positive { 1.5 } else { -0.5 };
            x.push((0..8).map(|j| uniform() + if j < 3 { shift } else { 0.0 }).collect());
            y.push(positive);
        }
        (x, y)
    }

    #[test]
    fn out_of_fold_threshold_keeps_target_recall_and_skips_separable_negatives() {
        let (x, y) = clouds(600, 7);
        let rows: Vec<&[f64]> = x.iter().map(Vec::as_slice).collect();
        let weights = vec![1.0; rows.len()];
        let folds = stratified_folds(&y, 5, 0);
        let fold_of: Vec<Option<usize>> = folds.into_iter().map(Some).collect();
        let config = LogisticConfig::default();
        let oof: Vec<f64> = out_of_fold_decisions(&rows, &y, &weights, &fold_of, &config)
            .unwrap()
            .into_iter()
            .map(|s| s.unwrap())
            .collect();
        let target = 0.99;
        let threshold = threshold_at_recall(&oof, &y, target).unwrap();
        let metrics = recall_and_skip(&oof, &y, threshold);
        assert!(metrics.recall.unwrap() >= target, "{metrics:?}");
        assert!(metrics.skip_rate.unwrap() > 0.9, "separable data should skip most negatives: {metrics:?}");
        assert!(auc(&oof, &y).unwrap() > 0.99);
        let model = LogisticRegression::fit(&rows, &y, &weights, &config).unwrap();
        assert!(model.decision(&[1.5; 8]) > model.decision(&[-0.5; 8]));
    }

    /// Without copies and from one source, grouping by text changes nothing: the head's folds are the per-row
    /// ones it used before copies were grouped.
    #[test]
    fn grouped_folds_without_copies_are_the_per_row_folds() {
        for (n, folds, seed) in [(600, 5, 0), (37, 3, 9), (10, 5, 1), (2, 2, 4)] {
            let labels: Vec<bool> = (0..n).map(|i| i % 7 == 0 || i % 3 == 1).collect();
            let texts: Vec<String> = (0..n).map(|i| format!("text number {i}")).collect();
            let strata: Vec<(usize, bool)> = labels.iter().map(|&l| (0, l)).collect();
            assert_eq!(
                copy_grouped_folds(&texts, &strata, folds, seed),
                stratified_folds(&labels, folds, seed),
                "{n} rows, {folds} folds, seed {seed}"
            );
        }
    }

    #[test]
    fn copies_of_a_text_share_a_fold_and_fill_it_before_single_texts() {
        let mut texts: Vec<String> = (0..30).map(|i| format!("unique violation {i}")).collect();
        let mut strata = vec![(0, true); 30];
        for (k, copy) in ["Send  Me Money", "send me\r\nmoney ", "\tSEND  ME MONEY"].iter().enumerate() {
            texts.push(copy.to_string());
            strata.push((k % 2, k == 0));
        }
        for _ in 0..10 {
            texts.push("the same spam".into());
            strata.push((0, true));
        }
        for seed in 0..20 {
            let fold_of = copy_grouped_folds(&texts, &strata, 5, seed);
            let fold_of_key = |key: &str| -> Vec<usize> {
                texts.iter().zip(&fold_of).filter(|(t, _)| copy_key(t) == key).map(|(_, f)| *f).collect()
            };
            for (key, copies) in [("send me money", 3), ("the same spam", 10)] {
                let seen = fold_of_key(key);
                assert!(seen.len() == copies && seen.iter().all(|f| *f == seen[0]), "{key}: {seen:?}");
            }
            // 43 texts of one stratum: the 10 copies fill one fold, the 3 copies and 30 single texts even out the
            // other four (9, 8, 8, 8), whatever order the shuffle put them in.
            let mut load = vec![0; 5];
            for f in &fold_of {
                load[*f] += 1;
            }
            load.sort_unstable();
            assert_eq!(load, [8, 8, 8, 9, 10], "seed {seed}");
        }
    }

    #[test]
    fn neighbour_share_counts_the_nearest_eligible_rows() {
        // Four unit vectors on a circle; the query sits nearest row 0, then 1, then 3, then 2.
        let angle = |a: f32| [a.cos(), a.sin()];
        let rows: Vec<f32> = [0.0f32, 0.5, 3.0, -0.9].iter().flat_map(|&a| angle(a)).collect();
        let index = NeighbourIndex::new(rows, vec![true, false, true, true], 2).unwrap();
        let query = angle(0.1);
        assert_eq!(index.positive_share(&query, 1, |_| true), Some(1.0));
        assert_eq!(index.positive_share(&query, 2, |_| true), Some(0.5));
        assert_eq!(index.positive_share(&query, 3, |_| true), Some(2.0 / 3.0));
        // Leaving row 0 out (as out-of-fold scoring leaves out the item's own fold) moves the vote.
        assert_eq!(index.positive_share(&query, 1, |i| i != 0), Some(0.0));
        assert_eq!(index.positive_share(&query, 10, |_| true), Some(0.75), "k above the row count uses them all");
        assert_eq!(index.positive_share(&query, 1, |_| false), None);
        assert_eq!(index.positive_share(&[1.0], 1, |_| true), None, "a query of the wrong length has no vote");
        assert!(NeighbourIndex::new(vec![0.0; 3], vec![true, false], 2).is_err());
        assert!(NeighbourIndex::new(vec![f32::NAN, 0.0], vec![true], 2).is_err());
    }

    #[test]
    fn neighbour_ties_go_to_the_lower_row() {
        let index = NeighbourIndex::new(vec![1.0, 0.0, 1.0, 0.0, 1.0, 0.0], vec![false, true, true], 2).unwrap();
        assert_eq!(index.positive_share(&[1.0, 0.0], 1, |_| true), Some(0.0));
        assert_eq!(index.positive_share(&[1.0, 0.0], 2, |_| true), Some(0.5));
    }

    #[test]
    fn dot_matches_the_plain_sum_at_every_length() {
        for len in [0, 1, 7, 8, 9, 384] {
            let a: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..len).map(|i| (i as f32 * 0.11).cos()).collect();
            let plain: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot_f32(&a, &b) - plain).abs() < 1e-4, "length {len}");
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let row = [0.0, 1.0];
        let config = LogisticConfig::default();
        assert!(matches!(
            LogisticRegression::fit(&[&row, &row], &[true, true], &[1.0, 1.0], &config),
            Err(HeadError::OneClass { .. })
        ));
        assert!(matches!(LogisticRegression::fit(&[], &[], &[], &config), Err(HeadError::Empty)));
        assert!(matches!(
            LogisticRegression::fit(&[&row, &[0.0][..]], &[true, false], &[1.0, 1.0], &config),
            Err(HeadError::Ragged { row: 1, .. })
        ));
        assert!(threshold_at_recall(&[0.1], &[false], 0.99).is_none());
    }
}

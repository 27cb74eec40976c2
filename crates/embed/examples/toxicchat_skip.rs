//! How much benign ToxicChat traffic a linear head on sentence embeddings lets triage skip while
//! keeping 99% of the toxic prompts (issue 6). Embeds ToxicChat train/test (and a Davidson
//! hate/offensive subsample used as down-weighted extra examples), trains class-balanced L2 logistic
//! regression by Newton's method, picks the threshold from 5-fold out-of-fold train scores at recall
//! 0.99, and reports test recall, skip rate, the oracle skip at 99% test recall, and AUC.
//!
//! cargo run --release -p safeguard-embed --example toxicchat_skip -- [--data-dir D] [--model-dir M]
//!     [--max-seq 256] [--davidson-scale 1.0]

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use safeguard_embed::SentenceEncoder;
use serde_json::Value;

const TARGET_RECALL: f64 = 0.99;
const FOLDS: usize = 5;

struct Args {
    data_dir: PathBuf,
    model_dir: Option<PathBuf>,
    max_seq: usize,
    davidson_scale: f64,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        data_dir: Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"),
        model_dir: None,
        max_seq: 256,
        davidson_scale: 1.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--data-dir" => args.data_dir = PathBuf::from(value()?),
            "--model-dir" => args.model_dir = Some(PathBuf::from(value()?)),
            "--max-seq" => args.max_seq = value()?.parse().context("--max-seq")?,
            "--davidson-scale" => args.davidson_scale = value()?.parse().context("--davidson-scale")?,
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(args)
}

fn read_jsonl(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{} line {}", path.display(), i + 1)))
        .collect()
}

fn field_str(row: &Value, key: &str) -> Result<String> {
    row.get(key).and_then(Value::as_str).map(str::to_string).with_context(|| format!("row lacks string {key}"))
}

fn field_int(row: &Value, key: &str) -> Result<i64> {
    row.get(key).and_then(Value::as_i64).with_context(|| format!("row lacks integer {key}"))
}

struct Split {
    texts: Vec<String>,
    labels: Vec<f64>,
}

fn load_toxicchat(data_dir: &Path, split: &str) -> Result<Split> {
    let path = data_dir.join(format!("toxicchat-0124/toxicchat0124_{split}_human.jsonl"));
    let rows = read_jsonl(&path)?;
    let mut out = Split { texts: Vec::with_capacity(rows.len()), labels: Vec::with_capacity(rows.len()) };
    for row in &rows {
        out.texts.push(field_str(row, "user_input")?);
        out.labels.push(field_int(row, "toxicity")? as f64);
    }
    Ok(out)
}

/// SplitMix64: deterministic sampling and folds without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }
}

/// The research recipe's Davidson subsample: every hate tweet, 2570 offensive, 2000 neither;
/// hate and offensive count as toxic.
fn load_davidson(data_dir: &Path, scale: f64) -> Result<Split> {
    let rows = read_jsonl(&data_dir.join("davidson-hate-offensive/binary.jsonl"))?;
    let mut by_class: [Vec<usize>; 3] = Default::default();
    for (i, row) in rows.iter().enumerate() {
        let class = field_int(row, "class")?;
        let bucket = by_class.get_mut(class as usize).with_context(|| format!("davidson class {class}"))?;
        bucket.push(i);
    }
    let mut rng = Rng(0);
    let wanted = [usize::MAX, 2570, 2000];
    let mut out = Split { texts: Vec::new(), labels: Vec::new() };
    for (class, indices) in by_class.iter_mut().enumerate() {
        rng.shuffle(indices);
        let take = ((wanted[class].min(indices.len()) as f64) * scale).round() as usize;
        for &i in indices.iter().take(take.min(indices.len())) {
            out.texts.push(field_str(&rows[i], "text")?);
            out.labels.push(if class <= 1 { 1.0 } else { 0.0 });
        }
    }
    Ok(out)
}

fn embed_all(encoder: &SentenceEncoder, texts: &[String]) -> Vec<Vec<f64>> {
    // Similar lengths together keep chunks even; results go back to input order.
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| texts[i].len());
    let mut out = vec![Vec::new(); texts.len()];
    for batch in order.chunks(64) {
        let refs: Vec<&str> = batch.iter().map(|&i| texts[i].as_str()).collect();
        for (&i, e) in batch.iter().zip(encoder.embed_batch(&refs)) {
            out[i] = e.into_iter().map(f64::from).collect();
        }
    }
    out
}

/// Class-balanced, L2-regularized logistic regression (sklearn's objective:
/// C·Σ sᵢ·logloss + ½‖w‖², intercept unpenalized), fitted by damped Newton steps.
struct Logistic {
    weights: Vec<f64>,
    bias: f64,
}

impl Logistic {
    fn fit(x: &[&[f64]], y: &[f64], sample_weight: &[f64], c: f64) -> Logistic {
        let n = x.len();
        let d = x[0].len();
        let dim = d + 1;
        let positives = y.iter().filter(|&&v| v > 0.5).count() as f64;
        let class_weight = [n as f64 / (2.0 * (n as f64 - positives)), n as f64 / (2.0 * positives)];
        let s: Vec<f64> = (0..n).map(|i| c * sample_weight[i] * class_weight[(y[i] > 0.5) as usize]).collect();
        let mut theta = vec![0.0; dim];
        let objective = |theta: &[f64]| -> f64 {
            let mut total = 0.5 * theta[..d].iter().map(|v| v * v).sum::<f64>();
            for i in 0..n {
                let z = dot(x[i], &theta[..d]) + theta[d];
                // log(1 + e^{-z}) for y=1, log(1 + e^{z}) for y=0, computed stably.
                let m = if y[i] > 0.5 { -z } else { z };
                total += s[i] * (m.max(0.0) + (-m.abs()).exp().ln_1p());
            }
            total
        };
        let mut current = objective(&theta);
        let mut design = vec![0.0; n * dim];
        for _ in 0..100 {
            let mut grad = vec![0.0; dim];
            grad[..d].copy_from_slice(&theta[..d]);
            for i in 0..n {
                let p = sigmoid(dot(x[i], &theta[..d]) + theta[d]);
                let r = s[i] * (p - y[i]);
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
            // SAFETY: design is n×dim row-major; hessian is dim×dim; strides match those shapes.
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
        Logistic { weights: theta[..d].to_vec(), bias: theta[d] }
    }

    fn decision(&self, x: &[f64]) -> f64 {
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

/// The highest threshold that still flags `recall` of the positives (score ≥ threshold flags).
fn threshold_at_recall(scores: &[f64], labels: &[f64], recall: f64) -> f64 {
    let mut positives: Vec<f64> = scores.iter().zip(labels).filter(|(_, y)| **y > 0.5).map(|(s, _)| *s).collect();
    positives.sort_by(f64::total_cmp);
    let k = ((1.0 - recall) * positives.len() as f64 + 1e-9).floor() as usize;
    positives[k.min(positives.len() - 1)]
}

/// (recall of positives, fraction of negatives skipped) at `threshold`.
fn recall_and_skip(scores: &[f64], labels: &[f64], threshold: f64) -> (f64, f64, usize) {
    let (mut caught, mut positives, mut skipped, mut negatives) = (0usize, 0usize, 0usize, 0usize);
    for (s, y) in scores.iter().zip(labels) {
        if *y > 0.5 {
            positives += 1;
            caught += (*s >= threshold) as usize;
        } else {
            negatives += 1;
            skipped += (*s < threshold) as usize;
        }
    }
    (caught as f64 / positives as f64, skipped as f64 / negatives as f64, positives - caught)
}

/// ROC AUC by the rank-sum statistic, ties counted half.
fn auc(scores: &[f64], labels: &[f64]) -> f64 {
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
            if labels[k] > 0.5 {
                rank_sum += average_rank;
            }
        }
        i = j + 1;
    }
    let positives = labels.iter().filter(|&&y| y > 0.5).count() as f64;
    let negatives = labels.len() as f64 - positives;
    (rank_sum - positives * (positives + 1.0) / 2.0) / (positives * negatives)
}

fn stratified_folds(labels: &[f64], folds: usize, seed: u64) -> Vec<usize> {
    let mut rng = Rng(seed);
    let mut fold_of = vec![0; labels.len()];
    for class in [0.0, 1.0] {
        let mut members: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == class).collect();
        rng.shuffle(&mut members);
        for (k, &i) in members.iter().enumerate() {
            fold_of[i] = k % folds;
        }
    }
    fold_of
}

struct Data<'a> {
    train_x: &'a [Vec<f64>],
    train_y: &'a [f64],
    test_x: &'a [Vec<f64>],
    test_y: &'a [f64],
    aux_x: &'a [Vec<f64>],
    aux_y: &'a [f64],
}

fn fit_with_aux(data: &Data, rows: &[usize], c: f64, aux_weight: f64) -> Logistic {
    let mut x: Vec<&[f64]> = rows.iter().map(|&i| data.train_x[i].as_slice()).collect();
    let mut y: Vec<f64> = rows.iter().map(|&i| data.train_y[i]).collect();
    let mut w = vec![1.0; rows.len()];
    if aux_weight > 0.0 {
        x.extend(data.aux_x.iter().map(Vec::as_slice));
        y.extend_from_slice(data.aux_y);
        w.extend(std::iter::repeat_n(aux_weight, data.aux_y.len()));
    }
    Logistic::fit(&x, &y, &w, c)
}

fn evaluate(data: &Data, fold_of: &[usize], c: f64, aux_weight: f64) {
    let started = Instant::now();
    let mut oof = vec![0.0; data.train_y.len()];
    for fold in 0..FOLDS {
        let train_rows: Vec<usize> = (0..fold_of.len()).filter(|&i| fold_of[i] != fold).collect();
        let model = fit_with_aux(data, &train_rows, c, aux_weight);
        for i in (0..fold_of.len()).filter(|&i| fold_of[i] == fold) {
            oof[i] = model.decision(&data.train_x[i]);
        }
    }
    let all_rows: Vec<usize> = (0..data.train_y.len()).collect();
    let model = fit_with_aux(data, &all_rows, c, aux_weight);
    let test: Vec<f64> = data.test_x.iter().map(|x| model.decision(x)).collect();

    let threshold = threshold_at_recall(&oof, data.train_y, TARGET_RECALL);
    let (_, cv_skip, _) = recall_and_skip(&oof, data.train_y, threshold);
    let (recall, skip, missed) = recall_and_skip(&test, data.test_y, threshold);
    let oracle = threshold_at_recall(&test, data.test_y, TARGET_RECALL);
    let (_, oracle_skip, _) = recall_and_skip(&test, data.test_y, oracle);
    let name =
        if aux_weight > 0.0 { format!("LR C={c} bal + Davidson w={aux_weight}") } else { format!("LR C={c} bal") };
    println!(
        "{name:34} cvAUC={:.3} cvSkip99={cv_skip:.3} | test: recall={recall:.4} ({missed} missed) skip={skip:.3} \
         oracleSkip99={oracle_skip:.3} AUC={:.3}  [{:.1}s]",
        auc(&oof, data.train_y),
        auc(&test, data.test_y),
        started.elapsed().as_secs_f64()
    );
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let load_started = Instant::now();
    let encoder = SentenceEncoder::locate(args.model_dir.as_deref())?.with_max_seq(args.max_seq);
    println!("encoder loaded in {:.2}s (max_seq {})", load_started.elapsed().as_secs_f64(), encoder.max_seq());

    let train = load_toxicchat(&args.data_dir, "train")?;
    let test = load_toxicchat(&args.data_dir, "test")?;
    let davidson = load_davidson(&args.data_dir, args.davidson_scale)?;

    let mut embedded = Vec::new();
    for (name, split) in [("toxicchat train", &train), ("toxicchat test", &test), ("davidson subsample", &davidson)] {
        let tokens: usize = split.texts.iter().map(|t| encoder.encode_ids(t).len()).sum();
        let started = Instant::now();
        let vectors = embed_all(&encoder, &split.texts);
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "embedded {name}: {} items, mean {:.1} tokens, {seconds:.1}s = {:.1} items/s ({:.0} tokens/s), one thread",
            split.texts.len(),
            tokens as f64 / split.texts.len() as f64,
            split.texts.len() as f64 / seconds,
            tokens as f64 / seconds
        );
        embedded.push(vectors);
    }
    let data = Data {
        train_x: &embedded[0],
        train_y: &train.labels,
        test_x: &embedded[1],
        test_y: &test.labels,
        aux_x: &embedded[2],
        aux_y: &davidson.labels,
    };
    let positives = |y: &[f64]| y.iter().filter(|&&v| v > 0.5).count();
    println!(
        "train {} ({} toxic), test {} ({} toxic), davidson {} ({} hate/offensive); threshold from {FOLDS}-fold OOF at recall {TARGET_RECALL}",
        train.labels.len(),
        positives(&train.labels),
        test.labels.len(),
        positives(&test.labels),
        davidson.labels.len(),
        positives(&davidson.labels)
    );
    let fold_of = stratified_folds(&train.labels, FOLDS, 0);
    for c in [1.0, 3.0] {
        for aux_weight in [0.0, 0.02, 0.05] {
            evaluate(&data, &fold_of, c, aux_weight);
        }
    }
    Ok(())
}

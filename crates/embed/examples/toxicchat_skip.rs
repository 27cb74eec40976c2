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
use safeguard_embed::head::{
    LogisticConfig, LogisticRegression, SplitMix, auc, embed_all, recall_and_skip, stratified_folds,
    threshold_at_recall,
};
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
    labels: Vec<bool>,
}

fn load_toxicchat(data_dir: &Path, split: &str) -> Result<Split> {
    let path = data_dir.join(format!("toxicchat-0124/toxicchat0124_{split}_human.jsonl"));
    let rows = read_jsonl(&path)?;
    let mut out = Split { texts: Vec::with_capacity(rows.len()), labels: Vec::with_capacity(rows.len()) };
    for row in &rows {
        out.texts.push(field_str(row, "user_input")?);
        out.labels.push(field_int(row, "toxicity")? != 0);
    }
    Ok(out)
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
    let mut rng = SplitMix(0);
    let wanted = [usize::MAX, 2570, 2000];
    let mut out = Split { texts: Vec::new(), labels: Vec::new() };
    for (class, indices) in by_class.iter_mut().enumerate() {
        rng.shuffle(indices);
        let take = ((wanted[class].min(indices.len()) as f64) * scale).round() as usize;
        for &i in indices.iter().take(take.min(indices.len())) {
            out.texts.push(field_str(&rows[i], "text")?);
            out.labels.push(class <= 1);
        }
    }
    Ok(out)
}

struct Data<'a> {
    train_x: &'a [Vec<f64>],
    train_y: &'a [bool],
    test_x: &'a [Vec<f64>],
    test_y: &'a [bool],
    aux_x: &'a [Vec<f64>],
    aux_y: &'a [bool],
}

/// Fits on all train rows, with the auxiliary rows (weight `aux_weight`, or left out at 0) in every fold.
fn fit_and_score(data: &Data, fold_of: &[usize], c: f64, aux_weight: f64) -> Result<(Vec<f64>, LogisticRegression)> {
    let mut x: Vec<&[f64]> = data.train_x.iter().map(Vec::as_slice).collect();
    let mut y = data.train_y.to_vec();
    let mut w = vec![1.0; x.len()];
    let mut folds: Vec<Option<usize>> = fold_of.iter().copied().map(Some).collect();
    if aux_weight > 0.0 {
        x.extend(data.aux_x.iter().map(Vec::as_slice));
        y.extend_from_slice(data.aux_y);
        w.extend(std::iter::repeat_n(aux_weight, data.aux_y.len()));
        folds.extend(std::iter::repeat_n(None, data.aux_y.len()));
    }
    let config = LogisticConfig { c, ..LogisticConfig::default() };
    let oof = safeguard_embed::head::out_of_fold_decisions(&x, &y, &w, &folds, &config)?;
    let oof = oof.into_iter().take(data.train_y.len()).map(|s| s.unwrap_or(f64::NAN)).collect();
    Ok((oof, LogisticRegression::fit(&x, &y, &w, &config)?))
}

fn evaluate(data: &Data, fold_of: &[usize], c: f64, aux_weight: f64) -> Result<()> {
    let started = Instant::now();
    let (oof, model) = fit_and_score(data, fold_of, c, aux_weight)?;
    let test: Vec<f64> = data.test_x.iter().map(|x| model.decision(x)).collect();

    let threshold = threshold_at_recall(&oof, data.train_y, TARGET_RECALL).context("no toxic training items")?;
    let cv = recall_and_skip(&oof, data.train_y, threshold);
    let at_test = recall_and_skip(&test, data.test_y, threshold);
    let oracle = threshold_at_recall(&test, data.test_y, TARGET_RECALL).context("no toxic test items")?;
    let oracle_skip = recall_and_skip(&test, data.test_y, oracle).skip_rate.unwrap_or(f64::NAN);
    let name =
        if aux_weight > 0.0 { format!("LR C={c} bal + Davidson w={aux_weight}") } else { format!("LR C={c} bal") };
    println!(
        "{name:34} cvAUC={:.3} cvSkip99={:.3} | test: recall={:.4} ({} missed) skip={:.3} \
         oracleSkip99={oracle_skip:.3} AUC={:.3}  [{:.1}s]",
        auc(&oof, data.train_y).unwrap_or(f64::NAN),
        cv.skip_rate.unwrap_or(f64::NAN),
        at_test.recall.unwrap_or(f64::NAN),
        at_test.missed,
        at_test.skip_rate.unwrap_or(f64::NAN),
        auc(&test, data.test_y).unwrap_or(f64::NAN),
        started.elapsed().as_secs_f64()
    );
    Ok(())
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
    let positives = |y: &[bool]| y.iter().filter(|&&v| v).count();
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
            evaluate(&data, &fold_of, c, aux_weight)?;
        }
    }
    Ok(())
}

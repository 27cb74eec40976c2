//! `cargo run --release -p safeguard-triage --example tune_davidson -- ../shared/data [FILTER]`: what helps
//! the skip rate at 99 % recall on ToxicChat when training on ToxicChat train, optionally with Davidson.
//!
//! Each setting is judged on ToxicChat *train* out-of-fold scores (5 folds, averaged over three seeds, which
//! also reshuffle the folds); the test columns are printed beside it only to show how the choice transfers and
//! must not be used to choose. Thresholds are set on ToxicChat out-of-fold scores only ("dep tc"), and, for
//! comparison, as `fit` did before `calibration_sources`: the lowest over ToxicChat and Davidson ("dep all").
//!
//! Davidson's 3-way label (`class`: 0 hate, 1 offensive, 2 neither) is read directly so that offensive tweets
//! can be positives, dropped, or down-weighted instead of being taught as benign.

use std::time::Instant;

use safeguard_triage::bench::{TOXICCHAT_TEST, TOXICCHAT_TRAIN};
use safeguard_triage::calibrate::{allow_threshold, auc};
use safeguard_triage::model::out_of_fold_margins;
use safeguard_triage::train::{LinearModel, train};
use safeguard_triage::{
    ClassWeight, DatasetFields, DomainAdaptation, Example, FeatureConfig, Featurizer, FitOptions, TrainConfig,
    load_dataset,
};

const DAVIDSON_3WAY: &str = "davidson-hate-offensive/binary.jsonl";
const SEEDS: [u64; 3] = [0x5afe, 0x1234_5678, 0x0dd_ba11];

/// How Davidson's classes become training items: (label, weight) for hate, offensive, neither; `None` drops.
#[derive(Clone, Copy)]
struct DavidsonUse {
    hate: Option<(bool, f32)>,
    offensive: Option<(bool, f32)>,
    neither: Option<(bool, f32)>,
}

impl DavidsonUse {
    fn binary_hate(w: f32) -> Self {
        DavidsonUse { hate: Some((true, w)), offensive: Some((false, w)), neither: Some((false, w)) }
    }
    fn hate_or_offensive(w: f32) -> Self {
        DavidsonUse { hate: Some((true, w)), offensive: Some((true, w)), neither: Some((false, w)) }
    }
    fn drop_offensive(w: f32) -> Self {
        DavidsonUse { hate: Some((true, w)), offensive: None, neither: Some((false, w)) }
    }
    fn offensive_weighted(w: f32, offensive: f32) -> Self {
        DavidsonUse { hate: Some((true, w)), offensive: Some((true, offensive)), neither: Some((false, w)) }
    }
}

struct Setting {
    name: String,
    features: FeatureConfig,
    train: TrainConfig,
    davidson: Option<DavidsonUse>,
    /// Weight of OpenAI moderation 2022 (binary label) as a third, auxiliary source; `None` leaves it out.
    openai: Option<f32>,
}

fn load_davidson(path: &std::path::Path, usage: DavidsonUse) -> Result<Vec<Example>, Box<dyn std::error::Error>> {
    let mut out = Vec::new();
    for line in std::fs::read_to_string(path)?.lines().filter(|l| !l.trim().is_empty()) {
        let row: serde_json::Value = serde_json::from_str(line)?;
        let text = row["text"].as_str().ok_or("davidson row without text")?.to_string();
        let class = row["class"].as_u64().ok_or("davidson row without class")?;
        let rule = match class {
            0 => usage.hate,
            1 => usage.offensive,
            _ => usage.neither,
        };
        if let Some((violates, weight)) = rule {
            out.push(Example { text, violates, weight, source: 1 });
        }
    }
    Ok(out)
}

/// Share of benign items below the threshold that keeps `recall` of the violations (margins or probabilities).
fn skip_at(scores: &[f32], labels: &[bool], recall: f64) -> f64 {
    allow_threshold(scores, labels, recall).map_or(0.0, |t| skip_below(scores, labels, t).1)
}

/// (recall, skip rate) with everything below `t` let through.
fn skip_below(scores: &[f32], labels: &[bool], t: f32) -> (f64, f64) {
    let (mut caught, mut positives, mut skipped, mut negatives) = (0usize, 0usize, 0usize, 0usize);
    for (&s, &l) in scores.iter().zip(labels) {
        if l {
            positives += 1;
            caught += (s >= t) as usize;
        } else {
            negatives += 1;
            skipped += (s < t) as usize;
        }
    }
    (caught as f64 / positives.max(1) as f64, skipped as f64 / negatives.max(1) as f64)
}

#[derive(Default, Clone, Copy)]
struct Row {
    oof_auc: f64,
    oof_skip99: f64,
    oof_skip95: f64,
    test_auc: f64,
    test_skip99: f64,
    test_skip95: f64,
    dep_tc_recall: f64,
    dep_tc_skip: f64,
    dep_all_recall: f64,
    dep_all_skip: f64,
}

impl Row {
    fn add(&mut self, o: &Row, k: f64) {
        self.oof_auc += o.oof_auc * k;
        self.oof_skip99 += o.oof_skip99 * k;
        self.oof_skip95 += o.oof_skip95 * k;
        self.test_auc += o.test_auc * k;
        self.test_skip99 += o.test_skip99 * k;
        self.test_skip95 += o.test_skip95 * k;
        self.dep_tc_recall += o.dep_tc_recall * k;
        self.dep_tc_skip += o.dep_tc_skip * k;
        self.dep_all_recall += o.dep_all_recall * k;
        self.dep_all_skip += o.dep_all_skip * k;
    }
}

/// Out-of-fold margins over all items and a model on all of them, for one seed.
fn run_seed(
    examples: &[Example],
    features: &FeatureConfig,
    train_config: &TrainConfig,
    seed: u64,
) -> Result<(Vec<f32>, LinearModel), Box<dyn std::error::Error>> {
    let train_config = TrainConfig { seed, ..train_config.clone() };
    let options = FitOptions { features: features.clone(), train: train_config.clone(), ..FitOptions::default() };
    let margins = out_of_fold_margins(examples, &options)?;
    let all: Vec<&Example> = examples.iter().collect();
    let model = train(&all, features, &train_config)?;
    Ok((margins, model))
}

fn evaluate(examples: &[Example], oof: &[f32], test_margins: &[f32], test_labels: &[bool], target: f64) -> Row {
    let (tc_scores, tc_labels): (Vec<f32>, Vec<bool>) =
        examples.iter().zip(oof).filter(|(e, _)| e.source == 0).map(|(e, m)| (*m, e.violates)).unzip();
    let (dv_scores, dv_labels): (Vec<f32>, Vec<bool>) =
        examples.iter().zip(oof).filter(|(e, _)| e.source == 1).map(|(e, m)| (*m, e.violates)).unzip();
    let t_tc = allow_threshold(&tc_scores, &tc_labels, target).unwrap_or(f32::NEG_INFINITY);
    let t_all = allow_threshold(&dv_scores, &dv_labels, target).map_or(t_tc, |t| t.min(t_tc));
    let (dep_tc_recall, dep_tc_skip) = skip_below(test_margins, test_labels, t_tc);
    let (dep_all_recall, dep_all_skip) = skip_below(test_margins, test_labels, t_all);
    Row {
        oof_auc: auc(&tc_scores, &tc_labels).unwrap_or(0.0),
        oof_skip99: skip_at(&tc_scores, &tc_labels, 0.99),
        oof_skip95: skip_at(&tc_scores, &tc_labels, 0.95),
        test_auc: auc(test_margins, test_labels).unwrap_or(0.0),
        test_skip99: skip_at(test_margins, test_labels, 0.99),
        test_skip95: skip_at(test_margins, test_labels, 0.95),
        dep_tc_recall,
        dep_tc_skip,
        dep_all_recall,
        dep_all_skip,
    }
}

fn standardize(x: &[f32]) -> (f32, f32) {
    let n = x.len().max(1) as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, var.sqrt().max(1e-6))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "../shared/data".into()));
    let filter = std::env::args().nth(2);
    let fields = DatasetFields::default();
    let tc_train = load_dataset(&dir.join(TOXICCHAT_TRAIN), &fields, 0)?;
    let tc_test = load_dataset(&dir.join(TOXICCHAT_TEST), &fields, 0)?;
    let test_labels: Vec<bool> = tc_test.examples.iter().map(|e| e.violates).collect();

    let words = FeatureConfig::words_only();
    // Without the length feature: the default before it was measured here (round 1 rows).
    let chars = FeatureConfig { length_feature: false, ..FeatureConfig::default() };
    let base = TrainConfig::default();
    let len = FeatureConfig { length_feature: true, ..chars.clone() };
    let nb = |alpha: f32| TrainConfig { nb_smoothing: Some(alpha), ..base.clone() };
    let da = |mode: DomainAdaptation| TrainConfig { domain_adaptation: mode, ..base.clone() };
    let s = |name: &str, features: &FeatureConfig, train: TrainConfig, davidson: Option<DavidsonUse>| Setting {
        name: name.to_string(),
        features: features.clone(),
        train,
        davidson,
        openai: None,
    };
    let settings = vec![
        s("tc: words+chars (old default)", &chars, base.clone(), None),
        s("tc: words", &words, base.clone(), None),
        s("tc: length", &FeatureConfig { length_feature: true, ..chars.clone() }, base.clone(), None),
        s("tc: words length", &FeatureConfig { length_feature: true, ..words.clone() }, base.clone(), None),
        s(
            "dv hate-vs-neither x0.2 length",
            &FeatureConfig { length_feature: true, ..chars.clone() },
            base.clone(),
            Some(DavidsonUse::drop_offensive(0.2)),
        ),
        s(
            "dv hate|off x0.2 da-intercept length",
            &FeatureConfig { length_feature: true, ..chars.clone() },
            da(DomainAdaptation::Intercept),
            Some(DavidsonUse::hate_or_offensive(0.2)),
        ),
        s("tc: nb a=1", &chars, nb(1.0), None),
        s("tc: nb a=0.1", &chars, nb(0.1), None),
        s("tc: nb a=0.01", &chars, nb(0.01), None),
        s("tc: words nb a=1", &words, nb(1.0), None),
        s("tc: nb a=1 e10 lr.1", &chars, TrainConfig { epochs: 10, learning_rate: 0.1, ..nb(1.0) }, None),
        s("tc: cw pos x1", &chars, TrainConfig { class_weight: ClassWeight::Violation(1.0), ..base.clone() }, None),
        s("tc: cw pos x3", &chars, TrainConfig { class_weight: ClassWeight::Violation(3.0), ..base.clone() }, None),
        s("tc: cw pos x20", &chars, TrainConfig { class_weight: ClassWeight::Violation(20.0), ..base.clone() }, None),
        s("tc: cw pos x50", &chars, TrainConfig { class_weight: ClassWeight::Violation(50.0), ..base.clone() }, None),
        s("tc: 2^16", &FeatureConfig { hash_bits: 16, ..chars.clone() }, base.clone(), None),
        s("tc: 2^17", &FeatureConfig { hash_bits: 17, ..chars.clone() }, base.clone(), None),
        s("tc: 2^20", &FeatureConfig { hash_bits: 20, ..chars.clone() }, base.clone(), None),
        s("tc: 2^16 nb a=1", &FeatureConfig { hash_bits: 16, ..chars.clone() }, nb(1.0), None),
        s("dv hate x1", &chars, base.clone(), Some(DavidsonUse::binary_hate(1.0))),
        s("dv hate x0.2", &chars, base.clone(), Some(DavidsonUse::binary_hate(0.2))),
        s("dv hate|off x1", &chars, base.clone(), Some(DavidsonUse::hate_or_offensive(1.0))),
        s("dv hate|off x0.2", &chars, base.clone(), Some(DavidsonUse::hate_or_offensive(0.2))),
        s("dv hate|off x0.05", &chars, base.clone(), Some(DavidsonUse::hate_or_offensive(0.05))),
        s("dv hate-vs-neither x0.2", &chars, base.clone(), Some(DavidsonUse::drop_offensive(0.2))),
        s("dv hate x0.2 off x0.05", &chars, base.clone(), Some(DavidsonUse::offensive_weighted(0.2, 0.05))),
        s(
            "dv hate|off x0.2 da-intercept",
            &chars,
            da(DomainAdaptation::Intercept),
            Some(DavidsonUse::hate_or_offensive(0.2)),
        ),
        s(
            "dv hate|off x1 da-features",
            &chars,
            da(DomainAdaptation::Features),
            Some(DavidsonUse::hate_or_offensive(1.0)),
        ),
        s(
            "dv hate|off x0.2 da-features",
            &chars,
            da(DomainAdaptation::Features),
            Some(DavidsonUse::hate_or_offensive(0.2)),
        ),
        s("dv hate x1 da-features", &chars, da(DomainAdaptation::Features), Some(DavidsonUse::binary_hate(1.0))),
        s(
            "dv hate|off x0.2 nb a=1",
            &chars,
            TrainConfig { nb_smoothing: Some(1.0), ..base.clone() },
            Some(DavidsonUse::hate_or_offensive(0.2)),
        ),
        s(
            "dv hate|off x0.2 da-features nb a=1",
            &chars,
            TrainConfig { nb_smoothing: Some(1.0), domain_adaptation: DomainAdaptation::Features, ..base.clone() },
            Some(DavidsonUse::hate_or_offensive(0.2)),
        ),
        // Round 2: the length feature with the better Davidson uses.
        s("L tc (new default)", &len, base.clone(), None),
        s("L tc 2^16", &FeatureConfig { hash_bits: 16, ..len.clone() }, base.clone(), None),
        s("L tc 2^20", &FeatureConfig { hash_bits: 20, ..len.clone() }, base.clone(), None),
        s("L tc cw pos x20", &len, TrainConfig { class_weight: ClassWeight::Violation(20.0), ..base.clone() }, None),
        s("L tc nb a=1", &len, nb(1.0), None),
        s("L dv hate-vs-neither x0.1", &len, base.clone(), Some(DavidsonUse::drop_offensive(0.1))),
        s("L dv hate-vs-neither x0.5", &len, base.clone(), Some(DavidsonUse::drop_offensive(0.5))),
        s(
            "L dv hate-vs-neither x0.2 da-int",
            &len,
            da(DomainAdaptation::Intercept),
            Some(DavidsonUse::drop_offensive(0.2)),
        ),
        s(
            "L dv hate|off x0.1 da-int",
            &len,
            da(DomainAdaptation::Intercept),
            Some(DavidsonUse::hate_or_offensive(0.1)),
        ),
        s(
            "L dv hate|off x0.5 da-int",
            &len,
            da(DomainAdaptation::Intercept),
            Some(DavidsonUse::hate_or_offensive(0.5)),
        ),
        s("L dv hate|off x1 da-int", &len, da(DomainAdaptation::Intercept), Some(DavidsonUse::hate_or_offensive(1.0))),
        s(
            "L dv hate x0.2 off x0.05 da-int",
            &len,
            da(DomainAdaptation::Intercept),
            Some(DavidsonUse::offensive_weighted(0.2, 0.05)),
        ),
        s("L dv hate x0.2 da-int", &len, da(DomainAdaptation::Intercept), Some(DavidsonUse::binary_hate(0.2))),
        // Round 3: around the best round-2 point.
        s("M dv hate x0.2 off x0.05", &len, base.clone(), Some(DavidsonUse::offensive_weighted(0.2, 0.05))),
        s(
            "M dv hate x0.2 off x0.05 da-feat",
            &len,
            da(DomainAdaptation::Features),
            Some(DavidsonUse::offensive_weighted(0.2, 0.05)),
        ),
        s(
            "M dv hate x0.1 off x0.02 da-int",
            &len,
            da(DomainAdaptation::Intercept),
            Some(DavidsonUse::offensive_weighted(0.1, 0.02)),
        ),
        s(
            "M dv hate x0.5 off x0.1 da-int",
            &len,
            da(DomainAdaptation::Intercept),
            Some(DavidsonUse::offensive_weighted(0.5, 0.1)),
        ),
        s(
            "M dv hate x0.2 off x0.1 da-int",
            &len,
            da(DomainAdaptation::Intercept),
            Some(DavidsonUse::offensive_weighted(0.2, 0.1)),
        ),
        s(
            "M dv hate x0.2 off x0.02 da-int",
            &len,
            da(DomainAdaptation::Intercept),
            Some(DavidsonUse::offensive_weighted(0.2, 0.02)),
        ),
        // Round 4: OpenAI moderation 2022 as another auxiliary source (its own intercept).
        Setting { openai: Some(0.2), ..s("O tc + openai x0.2 da-int", &len, da(DomainAdaptation::Intercept), None) },
        Setting { openai: Some(1.0), ..s("O tc + openai x1 da-int", &len, da(DomainAdaptation::Intercept), None) },
        Setting {
            openai: Some(0.2),
            ..s(
                "O dv kept + openai x0.2 da-int",
                &len,
                da(DomainAdaptation::Intercept),
                Some(DavidsonUse::offensive_weighted(0.2, 0.05)),
            )
        },
        // Round 5: training length for the kept TC + Davidson configuration.
        s(
            "P dv kept e3",
            &len,
            TrainConfig { epochs: 3, ..da(DomainAdaptation::Intercept) },
            Some(DavidsonUse::offensive_weighted(0.2, 0.05)),
        ),
        s(
            "P dv kept e8",
            &len,
            TrainConfig { epochs: 8, ..da(DomainAdaptation::Intercept) },
            Some(DavidsonUse::offensive_weighted(0.2, 0.05)),
        ),
        s(
            "P dv kept lr.1",
            &len,
            TrainConfig { learning_rate: 0.1, ..da(DomainAdaptation::Intercept) },
            Some(DavidsonUse::offensive_weighted(0.2, 0.05)),
        ),
        s("stack: words | chars3-5 (tc)", &chars, base.clone(), None),
    ];
    println!(
        "{:<38} {:>7} {:>7} {:>7} | {:>7} {:>7} {:>7} | {:>13} {:>13} {:>6}",
        "setting",
        "oofAUC",
        "oof@99",
        "oof@95",
        "testAUC",
        "test@99",
        "test@95",
        "dep tc r/skip",
        "dep all r/skip",
        "sec"
    );
    if filter.as_deref() == Some("window") {
        let len = FeatureConfig { length_feature: true, ..FeatureConfig::default() };
        window_experiment(&tc_train.examples, &tc_test.examples, &len, &TrainConfig::default())?;
        return Ok(());
    }
    for setting in settings {
        if filter.as_deref().is_some_and(|f| !setting.name.contains(f)) {
            continue;
        }
        let started = Instant::now();
        let mut examples = tc_train.examples.clone();
        if let Some(usage) = setting.davidson {
            examples.extend(load_davidson(&dir.join(DAVIDSON_3WAY), usage)?);
        }
        if let Some(weight) = setting.openai {
            let openai = load_dataset(&dir.join("openai-moderation-2022/binary.jsonl"), &fields, 2)?;
            examples.extend(openai.examples.into_iter().map(|e| Example { weight, ..e }));
        }
        let mut mean = Row::default();
        let k = 1.0 / SEEDS.len() as f64;
        for seed in SEEDS {
            let row = if setting.name.starts_with("stack") {
                stacked(&examples, &tc_test.examples, &test_labels, &setting.train, seed)?
            } else {
                let (oof, model) = run_seed(&examples, &setting.features, &setting.train, seed)?;
                let featurizer = Featurizer::new(setting.features.clone())?;
                let test_margins: Vec<f32> =
                    tc_test.examples.iter().map(|e| model.margin(&featurizer, &e.text)).collect();
                // TUNE_DUMP=FILE writes the first seed's ToxicChat out-of-fold margins, for reading the misses.
                if let Ok(path) = std::env::var("TUNE_DUMP")
                    && seed == SEEDS[0]
                {
                    let mut out = String::new();
                    for (e, m) in examples.iter().zip(&oof).filter(|(e, _)| e.source == 0) {
                        out += &serde_json::json!({"margin": m, "violates": e.violates, "text": e.text}).to_string();
                        out.push('\n');
                    }
                    std::fs::write(path, out)?;
                }
                evaluate(&examples, &oof, &test_margins, &test_labels, 0.99)
            };
            mean.add(&row, k);
        }
        let m = mean;
        println!(
            "{:<38} {:>7.4} {:>7.4} {:>7.4} | {:>7.4} {:>7.4} {:>7.4} | {:>6.3}/{:<6.3} {:>6.3}/{:<6.3} {:>6.1}",
            setting.name,
            m.oof_auc,
            m.oof_skip99,
            m.oof_skip95,
            m.test_auc,
            m.test_skip99,
            m.test_skip95,
            m.dep_tc_recall,
            m.dep_tc_skip,
            m.dep_all_recall,
            m.dep_all_skip,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Stacking: a word model and a character model, each standardized by its out-of-fold margins, mixed by the
/// weight that maximizes ToxicChat out-of-fold AUC (one parameter chosen on out-of-fold scores).
fn stacked(
    examples: &[Example],
    test: &[Example],
    test_labels: &[bool],
    train_config: &TrainConfig,
    seed: u64,
) -> Result<Row, Box<dyn std::error::Error>> {
    let words = FeatureConfig::words_only();
    let chars =
        FeatureConfig { word_unigrams: false, word_bigrams: false, length_feature: false, ..FeatureConfig::default() };
    let (oof_w, model_w) = run_seed(examples, &words, train_config, seed)?;
    let (oof_c, model_c) = run_seed(examples, &chars, train_config, seed)?;
    let (fw, fc) = (Featurizer::new(words)?, Featurizer::new(chars)?);
    let ((mw, sw), (mc, sc)) = (standardize(&oof_w), standardize(&oof_c));
    let mix = |a: f32, w: f32, c: f32| a * (w - mw) / sw + (1.0 - a) * (c - mc) / sc;
    let labels: Vec<bool> = examples.iter().map(|e| e.violates).collect();
    let mut best = (f64::NEG_INFINITY, 0.5f32);
    for step in 0..=20 {
        let a = step as f32 / 20.0;
        let scores: Vec<f32> = oof_w.iter().zip(&oof_c).map(|(&w, &c)| mix(a, w, c)).collect();
        let value = auc(&scores, &labels).unwrap_or(0.0);
        if value > best.0 {
            best = (value, a);
        }
    }
    let a = best.1;
    eprintln!("  stack seed {seed:#x}: word share {a:.2}");
    let oof: Vec<f32> = oof_w.iter().zip(&oof_c).map(|(&w, &c)| mix(a, w, c)).collect();
    let test_margins: Vec<f32> =
        test.iter().map(|e| mix(a, model_w.margin(&fw, &e.text), model_c.margin(&fc, &e.text))).collect();
    Ok(evaluate(examples, &oof, &test_margins, test_labels, 0.99))
}

/// Splits `text` into pieces of about `width` bytes at whitespace (never inside a character).
fn windows(text: &str, width: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    while text.len() - start > width {
        let mut cut = start + width;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        let cut = text[start..cut].rfind(char::is_whitespace).map_or(cut, |i| start + i.max(1));
        out.push(&text[start..cut]);
        start = cut;
    }
    out.push(&text[start..]);
    out
}

/// Window pooling: does scoring long texts by their worst window (as well as as a whole) rank the long
/// role-play violations higher? Own 5 folds (stratified by label), TC train only; prints global vs pooled.
pub fn window_experiment(
    tc: &[Example],
    test: &[Example],
    features: &FeatureConfig,
    config: &TrainConfig,
) -> Result<(), Box<dyn std::error::Error>> {
    let featurizer = Featurizer::new(features.clone())?;
    let test_labels: Vec<bool> = test.iter().map(|e| e.violates).collect();
    for width in [192usize, 256, 384] {
        let mut rows = [Row::default(), Row::default(), Row::default(), Row::default()];
        for seed in SEEDS {
            let mut fold_of = vec![0usize; tc.len()];
            for class in [false, true] {
                let mut members: Vec<usize> = (0..tc.len()).filter(|&i| tc[i].violates == class).collect();
                let mut state = seed;
                for i in (1..members.len()).rev() {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    members.swap(i, (state >> 33) as usize % (i + 1));
                }
                for (k, &i) in members.iter().enumerate() {
                    fold_of[i] = k % 5;
                }
            }
            let plain = Featurizer::new(FeatureConfig { length_feature: false, ..features.clone() })?;
            let score = |model: &LinearModel, text: &str| -> [f32; 4] {
                let global = model.margin(&featurizer, text);
                let pooled =
                    windows(text, width).iter().map(|w| model.margin(&featurizer, w)).fold(f32::NEG_INFINITY, f32::max);
                // As a streaming scorer would: n-gram sums only per window, the text's own bias and length.
                let ngrams = |t: &str| model.margin(&plain, t) - model.bias;
                let length = global - model.bias - ngrams(text);
                let pooled_ngrams = windows(text, width).iter().map(|w| ngrams(w)).fold(f32::NEG_INFINITY, f32::max);
                let streamed = model.bias + length + 0.5 * (ngrams(text) + pooled_ngrams);
                [global, global.max(pooled), 0.5 * (global + pooled), streamed]
            };
            let mut oof = vec![[0.0f32; 4]; tc.len()];
            for fold in 0..5 {
                let train_set: Vec<&Example> =
                    tc.iter().zip(&fold_of).filter(|(_, f)| **f != fold).map(|(e, _)| e).collect();
                let model = train(&train_set, features, &TrainConfig { seed, ..config.clone() })?;
                for i in (0..tc.len()).filter(|&i| fold_of[i] == fold) {
                    oof[i] = score(&model, &tc[i].text);
                }
            }
            let all: Vec<&Example> = tc.iter().collect();
            let model = train(&all, features, &TrainConfig { seed, ..config.clone() })?;
            let test_scores: Vec<[f32; 4]> = test.iter().map(|e| score(&model, &e.text)).collect();
            for (k, row) in rows.iter_mut().enumerate() {
                let o: Vec<f32> = oof.iter().map(|s| s[k]).collect();
                let t: Vec<f32> = test_scores.iter().map(|s| s[k]).collect();
                row.add(&evaluate(tc, &o, &t, &test_labels, 0.99), 1.0 / SEEDS.len() as f64);
            }
        }
        for (name, m) in ["global", "max(global, window)", "mean(global, window)", "streamed mean"].iter().zip(rows) {
            println!(
                "window {width:>4} {name:<26} {:>7.4} {:>7.4} {:>7.4} | {:>7.4} {:>7.4} {:>7.4} | {:>6.3}/{:<6.3}",
                m.oof_auc,
                m.oof_skip99,
                m.oof_skip95,
                m.test_auc,
                m.test_skip99,
                m.test_skip95,
                m.dep_tc_recall,
                m.dep_tc_skip
            );
        }
    }
    Ok(())
}

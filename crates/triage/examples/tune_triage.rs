//! `cargo run --release -p safeguard-triage --example tune_triage [DATA_DIR]`: a small grid over training
//! settings. Settings are chosen on out-of-fold ToxicChat *train* skip rate; test numbers are printed beside
//! them only to show how well that choice transfers.

use safeguard_triage::bench::{DAVIDSON, TOXICCHAT_TEST, TOXICCHAT_TRAIN};
use safeguard_triage::calibrate::{allow_threshold, auc, band_metrics};
use safeguard_triage::{ClassWeight, DatasetFields, FeatureConfig, FitOptions, TrainConfig, fit, load_dataset};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "../shared/data".into()));
    let fields = DatasetFields::default();
    let train = load_dataset(&dir.join(TOXICCHAT_TRAIN), &fields, 0)?;
    let test = load_dataset(&dir.join(TOXICCHAT_TEST), &fields, 0)?;
    let mut davidson = load_dataset(&dir.join(DAVIDSON), &fields, 1)?;
    let labels: Vec<bool> = test.examples.iter().map(|e| e.violates).collect();
    let only = std::env::args().nth(2);

    let words = FeatureConfig::words_only();
    let chars = FeatureConfig::default();
    let chars_only = FeatureConfig { word_unigrams: false, word_bigrams: false, ..FeatureConfig::default() };
    let chars25 = FeatureConfig { char_ngrams: Some((2, 5)), ..FeatureConfig::default() };
    let base = TrainConfig::default();
    let grid: Vec<(&str, FeatureConfig, TrainConfig, f32)> = vec![
        ("words e6 lr.3", words.clone(), base.clone(), 0.0),
        ("words e3 lr.3", words.clone(), TrainConfig { epochs: 3, ..base.clone() }, 0.0),
        ("words e12 lr.1", words.clone(), TrainConfig { epochs: 12, learning_rate: 0.1, ..base.clone() }, 0.0),
        ("words e6 l2 1e-4", words.clone(), TrainConfig { l2: 1e-4, ..base.clone() }, 0.0),
        (
            "words e6 unbalanced",
            words.clone(),
            TrainConfig { class_weight: ClassWeight::Violation(1.0), ..base.clone() },
            0.0,
        ),
        (
            "words e6 pos x20",
            words.clone(),
            TrainConfig { class_weight: ClassWeight::Violation(20.0), ..base.clone() },
            0.0,
        ),
        ("chars3-5+words e6", chars.clone(), base.clone(), 0.0),
        ("chars3-5+words e3 lr.1", chars.clone(), TrainConfig { epochs: 3, learning_rate: 0.1, ..base.clone() }, 0.0),
        ("chars3-5+words e2 lr.1", chars.clone(), TrainConfig { epochs: 2, learning_rate: 0.1, ..base.clone() }, 0.0),
        ("chars3-5+words e3 lr.05", chars.clone(), TrainConfig { epochs: 3, learning_rate: 0.05, ..base.clone() }, 0.0),
        ("chars3-5+words e5 lr.05", chars.clone(), TrainConfig { epochs: 5, learning_rate: 0.05, ..base.clone() }, 0.0),
        (
            "chars3-5+words e3 lr.1 unbal",
            chars.clone(),
            TrainConfig { epochs: 3, learning_rate: 0.1, class_weight: ClassWeight::Violation(1.0), ..base.clone() },
            0.0,
        ),
        ("words e3 lr.1", words.clone(), TrainConfig { epochs: 3, learning_rate: 0.1, ..base.clone() }, 0.0),
        ("chars3-5+words 2^18", FeatureConfig { hash_bits: 18, ..chars.clone() }, base.clone(), 0.0),
        ("chars3-5+words 2^16", FeatureConfig { hash_bits: 16, ..chars.clone() }, base.clone(), 0.0),
        (
            "chars3-4+words 2^18",
            FeatureConfig { hash_bits: 18, char_ngrams: Some((3, 4)), ..chars.clone() },
            base.clone(),
            0.0,
        ),
        ("words 2^18", FeatureConfig { hash_bits: 18, ..words.clone() }, base.clone(), 0.0),
        ("chars3-5 only e6", chars_only, base.clone(), 0.0),
        ("chars2-5+words e6", chars25, base.clone(), 0.0),
        ("words e6 + davidson x0.2", words.clone(), base.clone(), 0.2),
        ("words e6 + davidson x1", words.clone(), base.clone(), 1.0),
        ("chars+words e6 + davidson x0.2", chars.clone(), base.clone(), 0.2),
    ];
    println!(
        "{:<34} {:>7} {:>9} {:>9} {:>7} {:>9} {:>9} {:>9}",
        "setting", "oofAUC", "oof skip", "dep skip", "dep r", "testAUC", "test@.99", "test@.95"
    );
    for (name, features, train_config, davidson_weight) in grid {
        if only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        let mut examples = train.examples.clone();
        let mut provenance = vec![train.provenance.clone()];
        if davidson_weight > 0.0 {
            for e in &mut davidson.examples {
                e.weight = davidson_weight;
            }
            examples.extend(davidson.examples.iter().cloned());
            provenance.push(davidson.provenance.clone());
        }
        let options = FitOptions { features, train: train_config, ..FitOptions::default() };
        let model = fit(&examples, provenance, &options)?;
        let probs: Vec<f32> = test.examples.iter().map(|e| model.probability(&e.text)).collect();
        let deployed = band_metrics(&probs, &labels, model.meta.thresholds.allow_below, None);
        let at = |r: f64| {
            allow_threshold(&probs, &labels, r).map_or(0.0, |t| band_metrics(&probs, &labels, t, None).skip_rate)
        };
        let tc_oof = &model.meta.metrics.per_dataset[0];
        println!(
            "{name:<34} {:>7.4} {:>9.4} {:>9.4} {:>7.4} {:>9.4} {:>9.4} {:>9.4}",
            tc_oof.auc.unwrap_or(0.0),
            tc_oof.skip_rate,
            deployed.skip_rate,
            deployed.recall,
            auc(&probs, &labels).unwrap_or(0.0),
            at(0.99),
            at(0.95)
        );
    }
    Ok(())
}

//! Train on ToxicChat train, evaluate on ToxicChat test (the real data in ../shared/data beside the repo).
//! Skips with a message when the data is absent; it is not committed because of its licence.

use std::path::PathBuf;

use safeguard_triage::bench::{DAVIDSON, DavidsonWeights, TOXICCHAT_TEST, TOXICCHAT_TRAIN, load_davidson_3way};
use safeguard_triage::calibrate::band_metrics;
use safeguard_triage::{Band, DatasetFields, FeatureConfig, FitOptions, Triage, TriageModel, fit, load_dataset};

fn data_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
    if dir.join(TOXICCHAT_TRAIN).exists() && dir.join(TOXICCHAT_TEST).exists() {
        Some(dir)
    } else {
        eprintln!("skipping: ToxicChat data not found under {}", dir.display());
        None
    }
}

#[test]
fn toxicchat_train_then_test_keeps_recall_and_skips_benign() {
    let Some(dir) = data_dir() else { return };
    let fields = DatasetFields::default();
    let train = load_dataset(&dir.join(TOXICCHAT_TRAIN), &fields, 0).unwrap();
    let test = load_dataset(&dir.join(TOXICCHAT_TEST), &fields, 0).unwrap();
    assert_eq!((train.provenance.items, train.provenance.violations), (2801, 384));
    assert_eq!((test.provenance.items, test.provenance.violations), (2853, 362));

    // Word features and 3 folds keep this test to seconds; the bench measures the full configuration.
    let options = FitOptions {
        features: FeatureConfig::words_only(),
        folds: 3,
        target_recall: 0.99,
        policy_hash: "sha256:test".into(),
        ..FitOptions::default()
    };
    let model = fit(&train.examples, vec![train.provenance.clone()], &options).unwrap();
    let dir_out = tempfile::tempdir().unwrap();
    model.save(dir_out.path()).unwrap();
    let model = TriageModel::load(dir_out.path()).unwrap();

    let labels: Vec<bool> = test.examples.iter().map(|e| e.violates).collect();
    let probabilities: Vec<f32> = test.examples.iter().map(|e| model.probability(&e.text)).collect();
    let m =
        band_metrics(&probabilities, &labels, model.meta.thresholds.allow_below, model.meta.thresholds.violate_above);
    eprintln!(
        "toxicchat test: recall {:.4} skip_rate {:.4} precision {:.4} auc {:?} (out-of-fold skip {:.4})",
        m.recall, m.skip_rate, m.precision, m.auc, model.meta.metrics.out_of_fold.skip_rate
    );
    // Thresholds chosen on training folds must transfer: 99% target, a few misses of slack on 362.
    assert!(m.recall >= 0.975, "recall {}", m.recall);
    assert!(m.auc.unwrap() > 0.86, "auc {:?}", m.auc);
    // Measured 0.19 (out-of-fold 0.12) when written; the floor leaves room for training-order changes.
    assert!(m.skip_rate > 0.12, "skip rate {}", m.skip_rate);

    // The router agrees with the band metrics when there are no rules.
    let triage = Triage::new(None, Some(model));
    let skipped =
        test.examples.iter().filter(|e| !e.violates && triage.route(&e.text).band == Band::ConfidentBenign).count();
    let benign = labels.iter().filter(|&&l| !l).count();
    assert!((skipped as f64 / benign as f64 - m.skip_rate).abs() < 1e-9);
}

#[test]
fn davidson_three_way_classes_map_to_weighted_violations() {
    let Some(dir) = data_dir() else { return };
    let path = dir.join(DAVIDSON);
    if !path.exists() {
        eprintln!("skipping: {} not found", path.display());
        return;
    }
    let every = DavidsonWeights { hate: 1.0, offensive: 2.0, neither: 3.0 };
    let items = load_davidson_3way(&path, every, 1).unwrap();
    let count =
        |violates: bool, weight: f32| items.iter().filter(|e| e.violates == violates && e.weight == weight).count();
    // Class counts from the dataset's README: 1,430 hate, 19,190 offensive, 4,163 neither.
    assert_eq!((count(true, 1.0), count(true, 2.0), count(false, 3.0)), (1430, 19190, 4163));
    assert!(items.iter().all(|e| e.source == 1));
    let no_offensive = load_davidson_3way(&path, DavidsonWeights { offensive: 0.0, ..every }, 1).unwrap();
    assert_eq!(no_offensive.len(), 1430 + 4163, "a zero weight drops the class");
}

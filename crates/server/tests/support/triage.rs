//! A real triage model with its calibration pinned, for the server tests that route items through triage.

use std::path::Path;

use safeguard_policy::Policy;
use safeguard_triage::{Calibration, Example, FitOptions, Thresholds, fit};
use serde_json::Value;

/// Trains a triage model for `policy` on a small fixed set, pins its calibration so that every text scores
/// `probability`, and saves it under `dir/<policy name>`. Nothing is confidently benign (`allow_below` 0); at
/// or above `violate_above` an item is a confident violation (`None`: never). Returns what `model.json` says.
pub fn write_pinned_triage(dir: &Path, policy: &Policy, probability: f64, violate_above: Option<f32>) -> Value {
    let examples: Vec<Example> = (0..40)
        .map(|i| {
            let violates = i % 2 == 0;
            let text =
                if violates { format!("buy cheap followers now deal {i}") } else { format!("see you at lunch {i}") };
            Example { text, violates, weight: 1.0, source: 0 }
        })
        .collect();
    let options = FitOptions {
        folds: 2,
        min_violate_support: 1,
        policy_name: Some(policy.meta.name.clone()),
        policy_hash: policy.hash.to_string(),
        ..FitOptions::default()
    };
    let mut model = fit(&examples, vec![], &options).unwrap();
    let logit = (probability / (1.0 - probability)).ln();
    model.meta.calibration = Calibration::Platt { a: 1e-9, b: logit };
    model.meta.thresholds = Thresholds { target_recall: 0.99, allow_below: 0.0, target_precision: 0.99, violate_above };
    let target = dir.join(&policy.meta.name);
    model.save(&target).unwrap();
    serde_json::from_slice(&std::fs::read(target.join("model.json")).unwrap()).unwrap()
}

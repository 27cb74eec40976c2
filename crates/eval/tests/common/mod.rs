//! Shared fixtures: a small labelled dataset and predictions whose metrics are computed by hand in the tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use safeguard_eval::{Dataset, DatasetSpec, FieldMapping, PredictionRecord};
use serde_json::{Value, json};

pub fn write_lines(dir: &Path, name: &str, lines: &[Value]) -> PathBuf {
    let path = dir.join(name);
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, text).unwrap();
    path
}

/// Ten items. Labels: 1-4 violating, 5-9 safe, 10 unknown. Groups: 1, 3, 5 are "a", the rest "b".
/// Item 5's text tries to inject a script into the HTML report.
pub fn dataset_lines() -> Vec<Value> {
    let label = |i: u32| match i {
        1..=4 => json!(1),
        5..=9 => json!(0),
        _ => Value::Null,
    };
    (1..=10)
        .map(|i| {
            let text = if i == 5 { "<script>alert('x')</script> buy now".to_string() } else { format!("item {i}") };
            let group = if matches!(i, 1 | 3 | 5) { "a" } else { "b" };
            json!({"id": i.to_string(), "text": text, "label": label(i), "group": group})
        })
        .collect()
}

pub fn load_dataset(dir: &Path) -> Dataset {
    let path = write_lines(dir, "data.jsonl", &dataset_lines());
    let mapping = FieldMapping { group_field: Some("group".into()), ..FieldMapping::default() };
    DatasetSpec::File(path).load(Path::new("."), &mapping).unwrap()
}

fn verdict(policy: &str, outcome: &str, flags: Value, rationale: &str) -> Value {
    let violation = match outcome {
        "violation" => json!(true),
        "allow" => json!(false),
        _ => Value::Null,
    };
    json!({"policy": policy, "policy_hash": "sha256:00", "violation": violation, "label": null, "rule_ids": [],
           "flags": flags, "outcome": outcome, "rationale": rationale})
}

/// Predictions for items 1-8 and 10 (9 is missing) plus an id the dataset lacks.
/// Items 1-4 ran at effort low with total_ms 100..400 and 10..40 completion tokens; the rest at high.
pub fn prediction_lines() -> Vec<Value> {
    let outcomes = [
        (1, "violation"),
        (2, "violation"),
        (3, "allow"),
        (4, "needs_review"),
        (5, "violation"),
        (6, "allow"),
        (7, "allow"),
        (8, "needs_review"),
        (10, "allow"),
    ];
    let mut lines: Vec<Value> = outcomes
        .iter()
        .map(|&(i, outcome)| {
            let flags = if i == 8 { json!([{"kind": "unparseable", "detail": "no JSON"}]) } else { json!([]) };
            let (effort, timings) = if i <= 4 {
                ("low", json!({"total_ms": 100.0 * i as f64}))
            } else {
                ("high", json!({"prefill_ms": 50.0, "decode_ms": 10.0 * i as f64}))
            };
            json!({"id": i.to_string(), "outcome": outcome, "effort": effort,
                   "verdicts": [verdict("spam", outcome, flags, &format!("rationale for {i} <b>"))],
                   "usage": {"prompt_tokens": 1000, "cached_prompt_tokens": 800, "completion_tokens": 10 * i},
                   "timings": timings})
        })
        .collect();
    lines.push(json!({"id": "zzz", "outcome": "allow", "verdicts": []}));
    lines
}

pub fn predictions() -> Vec<PredictionRecord> {
    prediction_lines().into_iter().map(|l| serde_json::from_value(l).unwrap()).collect()
}

pub fn prediction(id: &str, outcome: &str, rationale: &str) -> PredictionRecord {
    serde_json::from_value(json!({"id": id, "outcome": outcome,
        "verdicts": [verdict("spam", outcome, json!([]), rationale)]}))
    .unwrap()
}

//! score_predictions against values computed by hand from the fixture in `common`.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use safeguard_eval::{
    DatasetSpec, EvalError, FieldMapping, PredictionRecord, ScoreOptions, parse_prediction_line, read_predictions,
    score_predictions,
};
use serde_json::json;

fn close(actual: Option<f64>, expected: f64) {
    let actual = actual.expect("metric is defined");
    assert!((actual - expected).abs() < 1e-9, "{actual} != {expected}");
}

#[test]
fn hand_computed_metrics_with_needs_review_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = common::load_dataset(dir.path());
    let report = score_predictions(&common::predictions(), &dataset, &ScoreOptions::default()).unwrap();

    // Joined: 1-8 and 10. Labelled: 1-8. Item 4 (violating) and 8 (safe) are needs_review.
    assert_eq!(report.joined, 9);
    assert_eq!(report.unlabelled, 1);
    // needs_review as positive: tp = 1,2,4; fn = 3; fp = 5,8; tn = 6,7.
    let c = report.metrics.confusion;
    assert_eq!((c.tp, c.fp, c.tn, c.fn_), (3, 2, 2, 1));
    close(report.metrics.precision, 3.0 / 5.0);
    close(report.metrics.recall, 3.0 / 4.0);
    close(report.metrics.f1, 6.0 / 9.0);
    close(report.metrics.accuracy, 5.0 / 8.0);
    // needs_review excluded: tp = 1,2; fn = 3; fp = 5; tn = 6,7.
    let x = report.excluding_needs_review.confusion;
    assert_eq!((x.tp, x.fp, x.tn, x.fn_), (2, 1, 2, 1));
    close(report.excluding_needs_review.precision, 2.0 / 3.0);
    close(report.excluding_needs_review.recall, 2.0 / 3.0);
    close(report.excluding_needs_review.accuracy, 4.0 / 6.0);
    assert_eq!(report.needs_review.count, 2);
    close(report.needs_review.rate, 2.0 / 8.0);
    assert_eq!((report.needs_review.positives, report.needs_review.negatives), (1, 1));
    assert_eq!(report.parse_failures, 1);
    close(report.parse_failure_rate, 1.0 / 9.0);

    assert_eq!(report.missing_predictions.count, 1);
    assert_eq!(report.missing_predictions.ids, vec!["9"]);
    assert_eq!(report.unknown_predictions.ids, vec!["zzz"]);
    assert_eq!(report.duplicate_predictions.count, 0);

    // Group a = items 1 (TP), 3 (FN), 5 (FP).
    let a = report.per_group["a"].confusion;
    assert_eq!((a.tp, a.fp, a.tn, a.fn_), (1, 1, 0, 1));

    // Effort low: items 1-4, total_ms 100..400, completion tokens 10..40.
    let low = &report.by_effort["low"];
    assert_eq!(low.items, 4);
    let latency = low.latency_ms.unwrap();
    assert_eq!((latency.mean, latency.p50, latency.p95), (250.0, 200.0, 400.0));
    let completion = low.completion_tokens.unwrap();
    assert_eq!((completion.mean, completion.p50, completion.p95), (25.0, 20.0, 40.0));
    assert_eq!(low.cached_prompt_tokens.unwrap().mean, 800.0);
    assert_eq!(low.needs_review, 1);
    // Effort high: items 5-8 and 10, latency 50 + 10*i = 100, 110, 120, 130, 150.
    let high = &report.by_effort["high"];
    assert_eq!(high.items, 5);
    let latency = high.latency_ms.unwrap();
    assert_eq!((latency.mean, latency.p50, latency.p95), (122.0, 120.0, 150.0));
    assert_eq!(high.latency_histogram.iter().map(|b| b.count).sum::<u64>(), 5);

    // Examples keep the text and the rationale.
    assert_eq!(report.false_positives.len(), 1);
    assert_eq!(report.false_positives[0].id, "5");
    assert_eq!(report.false_negatives[0].rationale.as_deref(), Some("rationale for 3 <b>"));
    assert_eq!(report.needs_review_items.len(), 2);

    // The JSON carries the headline scores and counts at the top level.
    let value = serde_json::to_value(&report).unwrap();
    for key in ["precision", "recall", "f1", "accuracy", "tp", "fp", "tn", "fn"] {
        assert!(value.get(key).is_some(), "missing {key}");
    }
    assert_eq!(value["fn"], json!(1));
}

#[test]
fn selecting_a_policy_scores_its_verdict_and_rejects_unknown_names() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = common::load_dataset(dir.path());
    let opts = ScoreOptions { policy: Some("spam".into()), ..ScoreOptions::default() };
    let report = score_predictions(&common::predictions(), &dataset, &opts).unwrap();
    assert_eq!(report.metrics.confusion.tp, 3);
    assert_eq!(report.policy_missing.count, 0);

    let opts = ScoreOptions { policy: Some("hate".into()), ..ScoreOptions::default() };
    let err = score_predictions(&common::predictions(), &dataset, &opts).unwrap_err().to_string();
    assert!(err.contains("hate") && err.contains("spam"), "{err}");
}

#[test]
fn duplicate_predictions_use_the_last_and_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = common::load_dataset(dir.path());
    let mut predictions = common::predictions();
    predictions.push(common::prediction("3", "violation", "second look"));
    let report = score_predictions(&predictions, &dataset, &ScoreOptions::default()).unwrap();
    assert_eq!(report.duplicate_predictions.ids, vec!["3"]);
    // Item 3 turned from FN into TP.
    assert_eq!(report.metrics.confusion.tp, 4);
    assert_eq!(report.metrics.confusion.fn_, 0);
}

#[test]
fn multi_policy_accuracy_needs_every_policy_right() {
    let dir = tempfile::tempdir().unwrap();
    let rows = [
        json!({"id": "A", "text": "a", "spam": 1, "hate": 0}),
        json!({"id": "B", "text": "b", "spam": 0, "hate": 1}),
        json!({"id": "C", "text": "c", "spam": 0, "hate": 0}),
        json!({"id": "D", "text": "d", "spam": 1, "hate": null}),
        json!({"id": "E", "text": "e", "spam": 1, "hate": 1}),
    ];
    let path = common::write_lines(dir.path(), "multi.jsonl", &rows);
    let mapping = FieldMapping {
        label_field: Some("spam".into()),
        category_fields: vec!["spam".into(), "hate".into()],
        ..FieldMapping::default()
    };
    let dataset = DatasetSpec::File(path).load(Path::new("."), &mapping).unwrap();
    let line = |id: &str, spam: &str, hate: &str| {
        serde_json::from_value(json!({"id": id, "verdicts": [
            {"policy": "spam", "outcome": spam}, {"policy": "Hate Policy v2", "outcome": hate}]}))
        .unwrap()
    };
    let predictions = vec![
        line("A", "violation", "allow"),
        line("B", "allow", "allow"),
        line("C", "allow", "allow"),
        line("D", "violation", "allow"),
        line("E", "violation", "needs_review"),
    ];
    let opts = ScoreOptions {
        policy: Some("spam".into()),
        policy_labels: BTreeMap::from([("Hate Policy v2".to_string(), "hate".to_string())]),
        ..ScoreOptions::default()
    };
    let report = score_predictions(&predictions, &dataset, &opts).unwrap();
    let multi = report.multi_policy.expect("two policies map to categories");
    assert_eq!(multi.policies["spam"], "spam");
    assert_eq!(multi.policies["Hate Policy v2"], "hate");
    // A and C are right on both; B misses hate; E's needs_review is not a label; D has an unknown label.
    assert_eq!((multi.items, multi.correct, multi.excluded), (4, 2, 1));
    assert_eq!(multi.accuracy, Some(0.5));
    let spam = multi.per_policy["spam"].confusion;
    assert_eq!((spam.tp, spam.fp, spam.tn, spam.fn_), (3, 0, 2, 0));
    let hate = multi.per_policy["Hate Policy v2"].confusion;
    assert_eq!((hate.tp, hate.fp, hate.tn, hate.fn_), (1, 0, 2, 1));
    // Per-category scores judge each category by the policy mapped to it, not by the scored (spam) verdict: an
    // item only spam flags is no false positive of hate.
    let hate_category = report.per_category["hate"].confusion;
    assert_eq!((hate_category.tp, hate_category.fp, hate_category.tn, hate_category.fn_), (1, 0, 2, 1));
    let spam_category = report.per_category["spam"].confusion;
    assert_eq!((spam_category.tp, spam_category.fp, spam_category.tn, spam_category.fn_), (3, 0, 2, 0));

    let bad = ScoreOptions {
        policy_labels: BTreeMap::from([("spam".to_string(), "nope".to_string())]),
        ..ScoreOptions::default()
    };
    let err = score_predictions(&predictions, &dataset, &bad).unwrap_err().to_string();
    assert!(err.contains("nope") && err.contains("hate, spam"), "{err}");
}

/// A line as `safeguard classify` writes it when the backend failed the item's prompt: the decision with the
/// prompt's error, verdicts flagged as if the answer were missing, and no top-level `error`.
fn failed_backend_line(id: &str) -> String {
    let line = json!({"id": id, "line": 1, "decision_id": "0193a5c0-0000-7000-8000-000000000000",
        "outcome": "needs_review",
        "verdicts": [{"policy": "spam", "policy_hash": "sha256:ab", "violation": null, "label": null,
            "category": null, "rule_ids": [], "severity": null, "confidence": null, "action": null,
            "rationale": null, "flags": [{"kind": "no_final_message"}], "outcome": "needs_review",
            "engine_confidence": null}],
        "usage": {"prompt_tokens": 0, "cached_prompt_tokens": 0, "completion_tokens": 0},
        "timings": {"queue_ms": 0.0, "prefill_ms": 0.0, "decode_ms": 0.0, "total_ms": 3.0},
        "model": "remote:gpt-oss-safeguard-20b", "effort": "medium", "mode": "separate",
        "prompts": [{"policies": ["spam"], "prompt_sha256": null,
            "usage": {"prompt_tokens": 0, "cached_prompt_tokens": 0, "completion_tokens": 0},
            "timings": {"queue_ms": 0.0, "prefill_ms": 0.0, "decode_ms": 0.0, "total_ms": 3.0},
            "truncated": false, "final_token_prob": null, "final_text": null, "error": "connection refused"}]});
    line.to_string()
}

#[test]
fn a_prompt_the_backend_failed_is_an_error_not_the_models_answer() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::write_lines(
        dir.path(),
        "data.jsonl",
        &[json!({"id": "a", "text": "hello", "violates": 0}), json!({"id": "b", "text": "buy", "violates": 1})],
    );
    let dataset = DatasetSpec::File(path).load(Path::new("."), &FieldMapping::default()).unwrap();
    let failed = parse_prediction_line(&failed_backend_line("a")).unwrap();
    assert_eq!(failed.failure().as_deref(), Some("connection refused"));
    let answered =
        parse_prediction_line(&failed_backend_line("b").replace("\"error\":\"connection refused\"", "\"error\":null"))
            .unwrap();
    assert!(!answered.is_failure(), "a null prompt error is no error");

    let report = score_predictions(&[failed, answered], &dataset, &ScoreOptions::default()).unwrap();
    assert_eq!(report.errors, 1);
    // The answered one's missing final message is the model's; the outage is not.
    assert_eq!(report.parse_failures, 1);
}

#[test]
fn lines_without_an_item_id_are_set_aside_as_failures() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.jsonl");
    let good = json!({"id": "a", "outcome": "allow", "verdicts": []});
    std::fs::write(&path, format!("{good}\n{{\"id\":null,\"line\":2,\"error\":\"line too long\"}}\n")).unwrap();
    let predictions = read_predictions(&path).unwrap();
    assert_eq!(predictions.records.len(), 1);
    assert_eq!(predictions.unjoinable.len(), 1);
    assert_eq!(predictions.unjoinable[0].describe(), "line 2 (input line 2): line too long");

    let data = common::write_lines(dir.path(), "data.jsonl", &[json!({"id": "a", "text": "x", "violates": 0})]);
    let dataset = DatasetSpec::File(data).load(Path::new("."), &FieldMapping::default()).unwrap();
    let mut report = score_predictions(&predictions.records, &dataset, &ScoreOptions::default()).unwrap();
    report.add_unjoinable(&predictions.unjoinable, 10);
    assert_eq!(report.unjoinable.count, 1);
    assert_eq!(report.unjoinable.ids, ["line 2 (input line 2): line too long"]);
}

#[test]
fn a_byte_order_mark_does_not_break_the_first_prediction() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.jsonl");
    std::fs::write(&path, "\u{feff}{\"id\":\"a\",\"outcome\":\"allow\"}\n").unwrap();
    let predictions = read_predictions(&path).unwrap();
    assert_eq!(predictions.records.len(), 1);
    assert_eq!(predictions.records[0].id, "a");
}

/// A mapped policy that has no verdict (a typo) would score every item needs_review and the multi-policy
/// accuracy 0; it is refused with the policies present, as `--policy` is.
#[test]
fn a_mapped_policy_without_verdicts_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let rows = [json!({"id": "A", "text": "a", "spam": 1, "hate": 0})];
    let path = common::write_lines(dir.path(), "multi.jsonl", &rows);
    let mapping = FieldMapping {
        label_field: Some("spam".into()),
        category_fields: vec!["spam".into(), "hate".into()],
        ..FieldMapping::default()
    };
    let dataset = DatasetSpec::File(path).load(Path::new("."), &mapping).unwrap();
    let predictions: Vec<PredictionRecord> = vec![
        serde_json::from_value(json!({"id": "A", "verdicts": [
            {"policy": "spam", "outcome": "violation"}, {"policy": "hate", "outcome": "allow"}]}))
        .unwrap(),
    ];
    let typo = ScoreOptions {
        policy_labels: BTreeMap::from([("haet".to_string(), "hate".to_string())]),
        ..ScoreOptions::default()
    };
    let err = score_predictions(&predictions, &dataset, &typo).unwrap_err().to_string();
    assert!(err.contains("`haet`") && err.contains("policies present: hate, spam"), "{err}");

    let right = ScoreOptions {
        policy_labels: BTreeMap::from([("hate".to_string(), "hate".to_string())]),
        ..ScoreOptions::default()
    };
    let multi = score_predictions(&predictions, &dataset, &right).unwrap().multi_policy.unwrap();
    assert_eq!((multi.items, multi.correct), (1, 1));
}

#[test]
fn a_prediction_line_that_is_not_utf8_is_named_by_its_number() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.jsonl");
    let mut bytes = b"{\"id\":\"a\",\"outcome\":\"allow\"}\n{\"id\":\"b\",\"outcome\":\"allow\",\"x\":\"".to_vec();
    bytes.extend([0xe2, 0x82, b'"', b'}', b'\n']);
    std::fs::write(&path, bytes).unwrap();
    match read_predictions(&path).unwrap_err() {
        EvalError::Data { line, message, .. } => {
            assert_eq!(line, 2);
            assert!(message.contains("UTF-8"), "{message}");
        }
        other => panic!("expected a data error, got {other}"),
    }
}

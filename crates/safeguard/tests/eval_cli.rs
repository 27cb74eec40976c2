//! `safeguard eval` end to end: the real binary on files written here, with metrics computed by hand, and on
//! the shared XSTest set with synthetic predictions.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};

fn safeguard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_safeguard")).args(args).output().expect("run safeguard")
}

fn classify_line(id: &str, outcome: &str, rationale: &str) -> Value {
    let violation = match outcome {
        "violation" => json!(true),
        "allow" => json!(false),
        _ => Value::Null,
    };
    json!({"id": id, "outcome": outcome, "verdicts": [{"policy": "spam", "policy_hash": "sha256:ab",
        "violation": violation, "label": null, "rule_ids": [], "flags": [], "outcome": outcome,
        "rationale": rationale}],
        "usage": {"prompt_tokens": 900, "cached_prompt_tokens": 850, "completion_tokens": 40},
        "timings": {"queue_ms": 0.0, "prefill_ms": 20.0, "decode_ms": 80.0, "total_ms": 100.0}})
}

/// Six labelled items (a,b,c violating; d,e,f safe) with string labels, and predictions:
/// a TP, b TP, c FN, d FP, e TN, f needs_review.
fn fixture(dir: &Path) -> (PathBuf, PathBuf) {
    let dataset = dir.join("data.jsonl");
    let rows: Vec<Value> = [("a", "spam"), ("b", "spam"), ("c", "spam"), ("d", "ham"), ("e", "ham"), ("f", "ham")]
        .iter()
        .map(|(id, gold)| json!({"uid": id, "message": format!("<script>x</script> message {id}"), "gold": gold}))
        .collect();
    write_jsonl(&dataset, &rows);
    let predictions = dir.join("run.jsonl");
    write_jsonl(
        &predictions,
        &[
            classify_output_line("a", "violation", "ra"),
            classify_line("b", "violation", "rb"),
            classify_line("c", "allow", "rc"),
            classify_line("d", "violation", "rd"),
            classify_line("e", "allow", "re"),
            classify_line("f", "needs_review", "rf"),
        ],
    );
    (dataset, predictions)
}

/// classify flattens a decision (whose own `id` is a UUID) into a record that starts with the item id, so the
/// line holds `"id"` twice; the item id comes first.
fn classify_output_line(id: &str, outcome: &str, rationale: &str) -> Value {
    let mut fields = classify_line(id, outcome, rationale).as_object().unwrap().clone();
    fields.remove("id");
    let rest = serde_json::to_string(&fields).unwrap();
    let raw = format!("{{\"id\":\"{id}\",\"line\":1,\"id\":\"0193a5c0-0000-7000-8000-000000000000\",{}", &rest[1..]);
    Value::String(raw)
}

fn write_jsonl(path: &Path, lines: &[Value]) {
    // A string stands for a raw line written as is.
    let text: String = lines
        .iter()
        .map(|l| match l {
            Value::String(raw) => format!("{raw}\n"),
            other => format!("{other}\n"),
        })
        .collect();
    std::fs::write(path, text).unwrap();
}

const MAPPING: [&str; 8] =
    ["--id-field", "uid", "--text-field", "message", "--label-field", "gold", "--positive-label", "spam"];

fn close(value: &Value, expected: f64) {
    let actual = value.as_f64().unwrap_or_else(|| panic!("not a number: {value}"));
    assert!((actual - expected).abs() < 1e-9, "{actual} != {expected}");
}

#[test]
fn scores_saved_predictions_as_json_text_and_html() {
    let dir = tempfile::tempdir().unwrap();
    let (dataset, predictions) = fixture(dir.path());
    let html = dir.path().join("report.html");
    let mut args = vec!["eval", "--predictions", predictions.to_str().unwrap(), "--dataset", dataset.to_str().unwrap()];
    args.extend(MAPPING);
    args.extend(["--policy", "spam", "--format", "json", "--html", html.to_str().unwrap()]);
    let out = safeguard(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    // needs_review counted as positive: tp 2, fp 2 (d, f), tn 1, fn 1.
    assert_eq!(
        (report["tp"].clone(), report["fp"].clone(), report["tn"].clone(), report["fn"].clone()),
        (json!(2), json!(2), json!(1), json!(1))
    );
    close(&report["precision"], 0.5);
    close(&report["recall"], 2.0 / 3.0);
    close(&report["f1"], 4.0 / 7.0);
    close(&report["accuracy"], 0.5);
    // needs_review excluded: tp 2, fp 1, tn 1, fn 1.
    close(&report["excluding_needs_review"]["precision"], 2.0 / 3.0);
    close(&report["excluding_needs_review"]["accuracy"], 0.6);
    assert_eq!(report["needs_review"]["count"], 1);
    close(&report["by_effort"]["unspecified"]["latency_ms"]["p95"], 100.0);

    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<svg class=\"confusion\""));
    assert!(page.contains(">TP 2<") && page.contains(">review 1<"));
    assert!(!page.contains("http") && !page.contains("<script>"));

    let mut args = vec!["eval", "--predictions", predictions.to_str().unwrap(), "--dataset", dataset.to_str().unwrap()];
    args.extend(MAPPING);
    let out = safeguard(&args);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("review as positive") && text.contains("0.500"), "{text}");

    // A CI gate: F1 4/7 is below 0.6.
    args.extend(["--min-f1", "0.6"]);
    assert_eq!(safeguard(&args).status.code(), Some(2));
    // A bar that is no number in 0..1 is refused, not passed by every score (NaN compares false).
    for bad in ["nan", "1.5", "inf"] {
        let mut args = args.clone();
        *args.last_mut().unwrap() = bad;
        let out = safeguard(&args);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("--min-f1"), "{bad}");
    }

    // Every answer cut off: each needs review, counted as a positive, so F1 clears 0.6 on a mostly violating set;
    // the gate still fails, since it measured no answer at all.
    let unread = dir.path().join("unread.jsonl");
    let cut_off: Vec<Value> = ["a", "b", "c", "d"]
        .iter()
        .map(|id| {
            let mut line = classify_line(id, "needs_review", "");
            line["verdicts"][0]["flags"] = json!(["truncated"]);
            line
        })
        .collect();
    write_jsonl(&unread, &cut_off);
    let few = dir.path().join("few.jsonl");
    let rows: Vec<Value> = [("a", "spam"), ("b", "spam"), ("c", "spam"), ("d", "ham")]
        .iter()
        .map(|(id, gold)| json!({"uid": id, "message": format!("message {id}"), "gold": gold}))
        .collect();
    write_jsonl(&few, &rows);
    let mut args = vec!["eval", "--predictions", unread.to_str().unwrap(), "--dataset", few.to_str().unwrap()];
    args.extend(MAPPING);
    args.extend(["--min-f1", "0.6"]);
    let out = safeguard(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("4 of") && stderr.contains("could not be read"), "{stderr}");
    args.extend(["--max-parse-failures", "1"]);
    assert!(safeguard(&args).status.success(), "allowed in so many words");

    // A run that left items unjudged (a crash halfway) is reported, and does not pass.
    let partial = dir.path().join("partial.jsonl");
    write_jsonl(&partial, &[classify_line("a", "violation", "ra"), json!({"id": "b", "error": "engine died"})]);
    let mut args = vec!["eval", "--predictions", partial.to_str().unwrap(), "--dataset", dataset.to_str().unwrap()];
    args.extend(MAPPING);
    args.extend(["--format", "json"]);
    let out = safeguard(&args);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((report["errors"].as_u64(), report["missing_predictions"]["count"].as_u64()), (Some(1), Some(4)));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("1 classification(s) failed and 4 item(s) have no prediction")
    );

    // Runs joined with other policies left c and d without a verdict for --policy: each counts as needs_review,
    // a positive, which clears the F1 gate (3 TP, 1 FP), but the run never judged them and does not pass.
    let other_policy = dir.path().join("other-policy.jsonl");
    let lines: Vec<Value> = ["a", "b", "c", "d"]
        .iter()
        .map(|id| {
            let mut line = classify_line(id, "violation", "r");
            if ["c", "d"].contains(id) {
                line["verdicts"][0]["policy"] = json!("hate");
            }
            line
        })
        .collect();
    write_jsonl(&other_policy, &lines);
    let mut args = vec!["eval", "--predictions", other_policy.to_str().unwrap(), "--dataset", few.to_str().unwrap()];
    args.extend(MAPPING);
    args.extend(["--policy", "spam", "--min-f1", "0.6"]);
    let out = safeguard(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("2 prediction(s) have no verdict for the policy"), "{stderr}");
}

#[test]
fn compares_two_runs_and_lists_flips() {
    let dir = tempfile::tempdir().unwrap();
    let (dataset, before) = fixture(dir.path());
    let after = dir.path().join("after.jsonl");
    write_jsonl(
        &after,
        &[
            classify_line("a", "violation", "ra"),
            classify_line("b", "violation", "rb"),
            classify_line("c", "violation", "now caught"),
            classify_line("d", "allow", "now allowed"),
            classify_line("e", "violation", "new false alarm"),
            classify_line("f", "needs_review", "rf"),
        ],
    );
    let mut args = vec![
        "eval",
        "--compare",
        before.to_str().unwrap(),
        after.to_str().unwrap(),
        "--dataset",
        dataset.to_str().unwrap(),
    ];
    args.extend(MAPPING);
    args.extend(["--format", "json"]);
    let out = safeguard(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let comparison: Value = serde_json::from_slice(&out.stdout).unwrap();
    let flips: Vec<(String, String, String)> = comparison["flips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["id"].as_str().unwrap().into(),
                f["kind"].as_str().unwrap().into(),
                f["after_rationale"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        flips,
        vec![
            ("c".to_string(), "fixed".to_string(), "now caught".to_string()),
            ("d".to_string(), "fixed".to_string(), "now allowed".to_string()),
            ("e".to_string(), "broken".to_string(), "new false alarm".to_string()),
        ]
    );
    // Recall 2/3 -> 1; precision 2/4 -> 3/5.
    close(&comparison["deltas"]["recall"], 1.0 / 3.0);
    close(&comparison["deltas"]["precision"], 0.6 - 0.5);

    args.push("--fail-on-regression");
    assert_eq!(safeguard(&args).status.code(), Some(2));
}

#[test]
fn bad_input_fails_with_the_line_number() {
    let dir = tempfile::tempdir().unwrap();
    let (dataset, predictions) = fixture(dir.path());
    // Without --positive-label, "spam" is not a label.
    let out = safeguard(&[
        "eval",
        "--predictions",
        predictions.to_str().unwrap(),
        "--dataset",
        dataset.to_str().unwrap(),
        "--id-field",
        "uid",
        "--text-field",
        "message",
        "--label-field",
        "gold",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("data.jsonl:1:") && stderr.contains("`spam`"), "{stderr}");

    std::fs::write(&predictions, "{\"id\":\"a\",\"outcome\":\"allow\"}\n{\"outcome\":\"allow\"}\n").unwrap();
    let mut args = vec!["eval", "--predictions", predictions.to_str().unwrap(), "--dataset", dataset.to_str().unwrap()];
    args.extend(MAPPING);
    let out = safeguard(&args);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("run.jsonl:2:") && stderr.contains("id"), "{stderr}");
}

/// The shared sets sit beside the repository (`../shared/data`).
fn shared_data() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
    assert!(dir.is_dir(), "shared data not found at {}", dir.display());
    dir
}

#[test]
fn scores_synthetic_predictions_on_the_shared_xstest_set() {
    let data = shared_data();
    let dir = tempfile::tempdir().unwrap();
    // Predict the true label, except: the first 10 unsafe prompts are missed and every "homonyms" prompt
    // (25 safe ones such as "How can I kill a Python process?") is flagged.
    let rows = std::fs::read_to_string(data.join("xstest/binary.jsonl")).unwrap();
    let mut missed = 0;
    let lines: Vec<Value> = rows
        .lines()
        .map(|line| {
            let row: Value = serde_json::from_str(line).unwrap();
            let unsafe_prompt = row["violates"] == 1;
            let flagged = if unsafe_prompt {
                missed += 1;
                missed > 10
            } else {
                row["type"] == "homonyms"
            };
            classify_line(row["id"].as_str().unwrap(), if flagged { "violation" } else { "allow" }, "synthetic")
        })
        .collect();
    let predictions = dir.path().join("xstest-run.jsonl");
    write_jsonl(&predictions, &lines);
    let out = safeguard(&[
        "eval",
        "--predictions",
        predictions.to_str().unwrap(),
        "--dataset",
        "xstest",
        "--data-dir",
        data.to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["joined"], 450);
    assert_eq!(
        (report["tp"].as_u64(), report["fn"].as_u64(), report["fp"].as_u64(), report["tn"].as_u64()),
        (Some(190), Some(10), Some(25), Some(225))
    );
    close(&report["precision"], 190.0 / 215.0);
    close(&report["recall"], 0.95);
    close(&report["false_positive_rate"], 0.1);
    assert_eq!(report["per_group"]["homonyms"]["fp"], 25);
    assert_eq!(report["per_group"]["safe_contexts"]["fp"], 0);
    assert_eq!(report["missing_predictions"]["count"], 0);
}

/// A live run of the spam policy on a tiny model at low effort, cached in `cache`, reported as JSON.
fn live_eval_args(model: &Path, dataset: &Path, cache: &Path) -> Vec<String> {
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies/spam.md");
    let paths = [("--policy", policy.as_path()), ("--model", model), ("--dataset", dataset), ("--cache", cache)];
    let mut args = vec!["eval".to_string()];
    for (flag, path) in paths {
        args.extend([flag.to_string(), path.display().to_string()]);
    }
    let rest = ["--effort", "low", "--max-tokens", "8", "--threads", "2", "--context", "1024", "--format", "json"];
    args.extend(rest.map(String::from));
    args
}

#[test]
fn a_live_run_on_a_tiny_model_is_cached_and_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    safeguard_gguf::write_tiny_model(&model, &safeguard_gguf::TinyConfig::with_seed(11)).unwrap();
    let dataset = dir.path().join("data.jsonl");
    write_jsonl(
        &dataset,
        &[
            json!({"id": "s1", "text": "BUY CHEAP WATCHES NOW", "label": 1}),
            json!({"id": "h1", "text": "see you at lunch", "label": 0}),
            json!({"id": "h2", "text": "the meeting moved to 3pm", "label": 0}),
        ],
    );
    let cache = dir.path().join("cache.jsonl");
    let saved = dir.path().join("live.jsonl");
    let mut args = live_eval_args(&model, &dataset, &cache);
    args.extend(["--concurrency", "2", "--save-predictions", saved.to_str().unwrap()].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let first = safeguard(&args);
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{stderr}");
    assert!(stderr.contains("3 classified, 0 from cache, 0 failed"), "{stderr}");
    let report: Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(report["joined"], 3);
    assert_eq!(report["by_effort"]["low"]["items"], 3);
    assert!(report["by_effort"]["low"]["latency_ms"]["p50"].as_f64().unwrap() > 0.0);
    assert!(report["by_effort"]["low"]["prompt_tokens"]["mean"].as_f64().unwrap() > 0.0);
    // A random model's output never turns into a silent allow.
    let records: Vec<Value> =
        std::fs::read_to_string(&saved).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.iter().map(|r| r["id"].as_str().unwrap()).collect::<Vec<_>>(), vec!["s1", "h1", "h2"]);
    for record in &records {
        assert_eq!(record["effort"], "low");
        if record["verdicts"].as_array().unwrap().iter().any(|v| v["violation"].is_null()) {
            assert_eq!(record["outcome"], "needs_review", "{record}");
        }
    }
    assert_eq!(std::fs::read_to_string(&cache).unwrap().lines().count(), 3);

    // The same run again comes entirely from the cache, with the same scores.
    let second = safeguard(&args);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{stderr}");
    assert!(stderr.contains("0 classified, 3 from cache"), "{stderr}");
    let again: Value = serde_json::from_slice(&second.stdout).unwrap();
    for key in ["tp", "fp", "tn", "fn", "needs_review"] {
        assert_eq!(again[key], report[key], "{key}");
    }
}

/// An item the engine could not classify (here: too long for the context) is a failure, counted as
/// needs_review, and not cached: a resumed run asks again instead of reusing the failure as the model's answer.
#[test]
fn a_failed_classification_is_not_cached() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    safeguard_gguf::write_tiny_model(&model, &safeguard_gguf::TinyConfig::with_seed(11)).unwrap();
    let dataset = dir.path().join("data.jsonl");
    let long = "many words of text ".repeat(2_000);
    write_jsonl(
        &dataset,
        &[json!({"id": "ok", "text": "see you at lunch", "label": 0}), json!({"id": "long", "text": long, "label": 1})],
    );
    let cache = dir.path().join("cache.jsonl");
    let args = live_eval_args(&model, &dataset, &cache);
    let run = safeguard(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("1 classified, 0 from cache, 1 failed"), "{stderr}");
    let cached = std::fs::read_to_string(&cache).unwrap();
    assert_eq!(cached.lines().count(), 1, "{cached}");
    assert!(cached.contains("\"ok\""), "{cached}");
}

/// Three labelled items (a, b violating; c safe) with the default field names.
fn three_items(dir: &Path) -> PathBuf {
    let dataset = dir.join("three.jsonl");
    write_jsonl(
        &dataset,
        &[
            json!({"id": "a", "text": "buy now", "violates": 1}),
            json!({"id": "b", "text": "cheap pills", "violates": 1}),
            json!({"id": "c", "text": "see you at lunch", "violates": 0}),
        ],
    );
    dataset
}

/// A comparison scores the items both runs share, but a run that left items unjudged must not pass the gate.
#[test]
fn a_comparison_with_a_run_missing_items_fails() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = three_items(dir.path());
    // Every item of `three_items` judged right.
    let complete = [
        classify_line("a", "violation", "ra"),
        classify_line("b", "violation", "rb"),
        classify_line("c", "allow", "rc"),
    ];
    let before = dir.path().join("before.jsonl");
    write_jsonl(&before, &complete);
    let after = dir.path().join("after.jsonl");
    write_jsonl(&after, &[classify_line("a", "violation", "ra")]);
    let compare = |before: &Path, after: &Path| {
        safeguard(&[
            "eval",
            "--compare",
            before.to_str().unwrap(),
            after.to_str().unwrap(),
            "--dataset",
            dataset.to_str().unwrap(),
            "--min-f1",
            "0.5",
        ])
    };
    let out = compare(&before, &after);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("after.jsonl: 0 classification(s) failed and 2 item(s) have no prediction"), "{stderr}");

    // An error on the "before" side counts the same way.
    write_jsonl(&after, &complete);
    write_jsonl(
        &before,
        &[
            classify_line("a", "violation", "ra"),
            classify_line("b", "violation", "rb"),
            json!({"id": "c", "outcome": "needs_review", "error": "engine died"}),
        ],
    );
    let out = compare(&before, &after);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("before.jsonl: 1 classification(s) failed"), "{stderr}");

    // Both complete: the gate decides.
    write_jsonl(&before, &complete);
    let out = compare(&before, &after);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// classify writes `"id": null` for an input line it could not read; such a line is a failure of the run, not a
/// reason to refuse the whole file.
#[test]
fn a_line_without_an_item_id_is_a_failure_not_an_abort() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = three_items(dir.path());
    let run = dir.path().join("run.jsonl");
    write_jsonl(
        &run,
        &[
            classify_line("a", "violation", "ra"),
            classify_line("b", "violation", "rb"),
            classify_line("c", "allow", "rc"),
            json!({"id": null, "line": 4, "error": "line too long"}),
        ],
    );
    let (code, stderr, report) = score_saved_run(&run, &dataset);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("1 prediction line(s) name no item: line 4 (input line 4): line too long"), "{stderr}");
    assert_eq!((report["joined"].as_u64(), report["unjoinable"]["count"].as_u64()), (Some(3), Some(1)));
}

/// `safeguard eval --predictions RUN --dataset DATA --format json`: its exit code, standard error and report.
fn score_saved_run(run: &Path, dataset: &Path) -> (Option<i32>, String, Value) {
    let (run, dataset) = (run.to_str().unwrap(), dataset.to_str().unwrap());
    let out = safeguard(&["eval", "--predictions", run, "--dataset", dataset, "--format", "json"]);
    let report = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned(), report)
}

/// When the backend fails, classify writes the decision with the prompt's error and verdicts flagged like a
/// missing answer. That is an outage: it must fail the run, not pass as the model asking for review.
#[test]
fn a_backend_failure_in_saved_output_fails_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = three_items(dir.path());
    let run = dir.path().join("run.jsonl");
    let failed = |id: &str| {
        let mut line = classify_line(id, "needs_review", "");
        line["verdicts"][0]["flags"] = json!([{"kind": "no_final_message"}]);
        line["prompts"] = json!([{"policies": ["spam"], "prompt_sha256": null,
            "usage": {"prompt_tokens": 0, "cached_prompt_tokens": 0, "completion_tokens": 0},
            "timings": {"queue_ms": 0.0, "prefill_ms": 0.0, "decode_ms": 0.0, "total_ms": 1.0},
            "truncated": false, "final_token_prob": null, "final_text": null, "error": "connection refused"}]);
        line
    };
    write_jsonl(&run, &[failed("a"), failed("b"), failed("c")]);
    let (code, stderr, report) = score_saved_run(&run, &dataset);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("3 classification(s) failed"), "{stderr}");
    assert_eq!((report["errors"].as_u64(), report["parse_failures"].as_u64()), (Some(3), Some(0)));
}

/// A live run leaves out an export's rows labelled under another version of the policy, says so, and reads them
/// with --any-policy-version.
#[test]
fn a_live_run_scores_only_labels_of_the_policy_version_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    safeguard_gguf::write_tiny_model(&model, &safeguard_gguf::TinyConfig::with_seed(11)).unwrap();
    let spam = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies/spam.md");
    let hash = safeguard_policy::Policy::load(&spam).unwrap().hash.to_string();
    let dataset = dir.path().join("export.jsonl");
    write_jsonl(
        &dataset,
        &[
            json!({"id": "v1", "text": "see you at lunch", "violates": 1, "policy": "spam", "policy_hash": "sha256:old",
                   "source": "human"}),
            json!({"id": "v2", "text": "BUY CHEAP WATCHES NOW", "violates": 1, "policy": "spam", "policy_hash": hash,
                   "source": "human"}),
        ],
    );
    let cache = dir.path().join("cache.jsonl");
    let args = live_eval_args(&model, &dataset, &cache);
    let run = safeguard(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("left out 1 row(s) of policy `spam` labelled under other versions"), "{stderr}");
    let report: Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!((report["dataset_items"].as_u64(), report["joined"].as_u64()), (Some(1), Some(1)), "{stderr}");

    let mut args = args.clone();
    args.push("--any-policy-version".into());
    let run = safeguard(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!stderr.contains("left out"), "{stderr}");
    let report: Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(report["dataset_items"].as_u64(), Some(2), "{stderr}");
}

/// Front matter changes what the verdict code decides without changing the body hash; the cache must not hand
/// back answers judged under the old front matter.
#[test]
fn a_live_run_does_not_reuse_answers_judged_under_other_front_matter() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    safeguard_gguf::write_tiny_model(&model, &safeguard_gguf::TinyConfig::with_seed(11)).unwrap();
    let dataset = dir.path().join("data.jsonl");
    write_jsonl(&dataset, &[json!({"id": "1", "text": "see you at lunch", "label": 0})]);
    let cache = dir.path().join("cache.jsonl");
    let spam = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies/spam.md");
    let text = std::fs::read_to_string(&spam).unwrap();
    let policy = dir.path().join("spam.md");
    std::fs::write(&policy, &text).unwrap();
    let mut args = live_eval_args(&model, &dataset, &cache);
    let at = args.iter().position(|a| a == "--policy").unwrap() + 1;
    args[at] = policy.display().to_string();
    let run = || safeguard(&args.iter().map(String::as_str).collect::<Vec<_>>());

    let first = run();
    assert!(String::from_utf8_lossy(&first.stderr).contains("1 classified, 0 from cache"));
    let second = run();
    assert!(String::from_utf8_lossy(&second.stderr).contains("0 classified, 1 from cache"));

    std::fs::write(&policy, text.replace("high_risk: false", "high_risk: true")).unwrap();
    let third = run();
    let stderr = String::from_utf8_lossy(&third.stderr);
    assert!(stderr.contains("1 classified, 0 from cache"), "{stderr}");

    // Another dataset that reuses the id "1" for another text is classified afresh too.
    std::fs::write(&policy, &text).unwrap();
    write_jsonl(&dataset, &[json!({"id": "1", "text": "the meeting moved to 3pm", "label": 0})]);
    let fourth = run();
    let stderr = String::from_utf8_lossy(&fourth.stderr);
    assert!(stderr.contains("1 classified, 0 from cache"), "{stderr}");
}

/// With only --positive-label every other value reads as safe, so the values read that way are shown (a typo
/// stands out); with --negative-label a value outside both is an error on its line.
#[test]
fn label_values_read_as_safe_are_shown_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (dataset, predictions) = fixture(dir.path());
    let text = std::fs::read_to_string(&dataset).unwrap();
    let (head, last) = text.trim_end().rsplit_once('\n').unwrap();
    std::fs::write(&dataset, format!("{head}\n{}\n", last.replace("\"ham\"", "\"hma\""))).unwrap();
    let run = |extra: &[&str]| {
        let mut args =
            vec!["eval", "--predictions", predictions.to_str().unwrap(), "--dataset", dataset.to_str().unwrap()];
        args.extend(MAPPING);
        args.extend(["--policy", "spam", "--format", "json"]);
        args.extend(extra);
        safeguard(&args)
    };
    let out = run(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("field `gold`: read as safe") && stderr.contains("`ham` (2 row(s)), `hma` (1 row(s))"));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["read_as_negative"], json!({"gold": {"ham": 2, "hma": 1}}));

    let out = run(&["--negative-label", "ham"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("data.jsonl:6:") && stderr.contains("`hma`"), "{stderr}");

    let out = run(&["--negative-label", "ham,hma"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("read as safe"), "{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report.get("read_as_negative").is_none(), "{report}");
}

/// An empty dataset, or one with no known label, scores nothing: that must not pass as a clean run.
#[test]
fn a_dataset_with_nothing_to_score_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_, predictions) = fixture(dir.path());
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let unlabelled = dir.path().join("unlabelled.jsonl");
    let rows: Vec<Value> = ["a", "b", "c"].iter().map(|id| json!({"uid": id, "message": "hi", "gold": null})).collect();
    write_jsonl(&unlabelled, &rows);
    for (dataset, expected) in [(&empty, "holds no items"), (&unlabelled, "none of the 3 items")] {
        let mut args =
            vec!["eval", "--predictions", predictions.to_str().unwrap(), "--dataset", dataset.to_str().unwrap()];
        args.extend(MAPPING);
        let out = safeguard(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("nothing to score") && stderr.contains(expected), "{stderr}");
    }
}

/// A mistyped policy in --map would score every item needs_review and multi-policy accuracy 0, and pass.
#[test]
fn a_mapped_policy_that_is_not_in_the_predictions_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = three_items(dir.path());
    let run = dir.path().join("run.jsonl");
    write_jsonl(
        &run,
        &[
            classify_line("a", "violation", "ra"),
            classify_line("b", "violation", "rb"),
            classify_line("c", "allow", "rc"),
        ],
    );
    let (run, dataset) = (run.to_str().unwrap(), dataset.to_str().unwrap());
    let eval = |map: &str| {
        let args = ["eval", "--predictions", run, "--dataset", dataset, "--category-field", "violates", "--map", map];
        safeguard(&args)
    };
    let out = eval("spma=violates");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("`spma`") && stderr.contains("policies present: spam"), "{stderr}");
    let out = eval("spam=violates");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("multi-policy accuracy 1.000"), "{stdout}");
}

/// A row with no text is never judged as an empty message: a live run fails it (counted as an error, so it stays
/// in the denominators and the run does not pass) and does not cache it.
#[test]
fn a_live_run_fails_a_row_without_text() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    safeguard_gguf::write_tiny_model(&model, &safeguard_gguf::TinyConfig::with_seed(11)).unwrap();
    let dataset = dir.path().join("data.jsonl");
    write_jsonl(
        &dataset,
        &[json!({"id": "ok", "text": "see you at lunch", "label": 0}), json!({"id": "none", "text": null, "label": 1})],
    );
    let cache = dir.path().join("cache.jsonl");
    let args = live_eval_args(&model, &dataset, &cache);
    let run = safeguard(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("1 classified, 0 from cache, 1 failed"), "{stderr}");
    assert!(stderr.contains("failed none at low: ") && stderr.contains("data.jsonl:2: field `text`"), "{stderr}");
    let report: Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!((report["joined"].as_u64(), report["errors"].as_u64()), (Some(2), Some(1)));
    let cached = std::fs::read_to_string(&cache).unwrap();
    assert_eq!(cached.lines().count(), 1, "{cached}");
}

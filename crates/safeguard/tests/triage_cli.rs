//! `safeguard triage train|eval` end to end on a synthetic dataset written here: artifact files, eval JSON,
//! front-matter rules, and clear failures for a corrupt artifact, a policy mismatch and bad labels.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn safeguard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_safeguard")).args(args).output().expect("run safeguard")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Benign requests vs. threats; CSV with string labels and a weight column to exercise the loader options.
fn write_dataset(path: &Path, rounds: usize) {
    let benign =
        ["please help me bake bread", "what is the capital of france", "write a poem about rain", "fix my python code"];
    let bad = [
        "i will hurt you badly",
        "you deserve to suffer",
        "i know where you live and will hurt you",
        "go suffer you idiot",
    ];
    let mut csv = String::from("message,verdict,importance\n");
    for round in 0..rounds {
        for text in benign {
            csv.push_str(&format!("\"{text} {round}\",allow,1\n"));
        }
        for text in bad {
            csv.push_str(&format!("\"{text} {round}\",violation,2\n"));
        }
    }
    std::fs::write(path, csv).unwrap();
}

fn write_policy(path: &Path, body: &str) {
    let text = format!(
        "---\nname: threats\noutput: binary\ntriage:\n  rules:\n    keywords:\n      - name: greetings\n        action: allow\n        keywords: [\"hello friend\"]\n---\n{body}\n"
    );
    std::fs::write(path, text).unwrap();
}

#[test]
fn train_then_eval_then_refuse_bad_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.csv");
    write_dataset(&data, 12);
    let policy = dir.path().join("threats.md");
    write_policy(&policy, "# Threats\n\nAnswer 1 if the text threatens someone, else 0.");
    let model = dir.path().join("model");
    let (data_s, policy_s, model_s) = (data.to_str().unwrap(), policy.to_str().unwrap(), model.to_str().unwrap());
    let fields = ["--text-field", "message", "--label-field", "verdict", "--weight-field", "importance"];

    let mut args = vec!["triage", "train", "--policy", policy_s, "--dataset", data_s, "--out", model_s];
    args.extend(["--hash-bits", "12", "--target-recall", "0.95", "--folds", "3"]);
    args.extend(fields);
    let out = safeguard(&args);
    assert!(out.status.success(), "train failed: {}", stderr(&out));
    assert!(model.join("model.json").exists());
    assert_eq!(std::fs::metadata(model.join("weights.bin")).unwrap().len(), 4 * 4096);
    let meta: Value = serde_json::from_slice(&std::fs::read(model.join("model.json")).unwrap()).unwrap();
    assert_eq!(meta["format_version"], safeguard_triage::model::FORMAT_VERSION);
    assert!(meta["policy_hash"].as_str().unwrap().starts_with("sha256:"));
    assert_eq!(meta["training"]["items"], 96);
    assert_eq!(meta["training"]["datasets"][0]["weight_field"], "importance");

    let mut args = vec!["triage", "eval", "--model", model_s, "--dataset", data_s, "--policy", policy_s];
    args.extend(["--format", "json", "--target-recall", "0.9"]);
    args.extend(fields);
    let out = safeguard(&args);
    assert!(out.status.success(), "eval failed: {}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["items"], 96);
    assert!(report["recall"].as_f64().unwrap() >= 0.9, "{report}");
    assert!(report["skip_rate"].as_f64().unwrap() > 0.5, "{report}");
    assert!(report["items_per_second"].as_f64().unwrap() > 0.0);
    assert!(report["auc"].as_f64().unwrap() > 0.9);

    // Another policy version: the model must not be used with it.
    let other = dir.path().join("other.md");
    write_policy(&other, "# Threats\n\nAnswer 1 for threats or insults, else 0.");
    let out =
        safeguard(&["triage", "eval", "--model", model_s, "--dataset", data_s, "--policy", other.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("retrain"), "{}", stderr(&out));

    // Unknown label spelling names the line.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"x\", \"violates\": \"maybe\"}\n").unwrap();
    let out = safeguard(&["triage", "eval", "--model", model_s, "--dataset", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("bad.jsonl:1"), "{}", stderr(&out));

    // A flipped byte in the weights is caught by the checksum.
    let weights = model.join("weights.bin");
    let mut bytes = std::fs::read(&weights).unwrap();
    bytes[17] ^= 0x01;
    std::fs::write(&weights, bytes).unwrap();
    let out = safeguard(&["triage", "eval", "--model", model_s, "--dataset", data_s]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("checksum mismatch"), "{}", stderr(&out));
}

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
    assert_eq!(report["rules_from"], policy_s, "the report says whose rules it measured");
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

    // A recall gate over data without violations measured nothing: it fails.
    let benign = dir.path().join("benign.jsonl");
    std::fs::write(&benign, "{\"text\": \"see you at lunch\", \"violates\": 0}\n").unwrap();
    let benign_s = benign.to_str().unwrap();
    let out = safeguard(&["triage", "eval", "--model", model_s, "--dataset", benign_s, "--target-recall", "0.9"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("recall is undefined"), "{}", stderr(&out));

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

/// An out-of-domain corpus with its own 3-way classes (like Davidson's hate / offensive / neither) whose
/// "violations" are the primary set's benign requests word for word: held to the recall target, it would drag
/// the threshold below every benign item.
fn write_aux(path: &Path, rounds: usize) {
    let mut jsonl = String::new();
    for round in 0..rounds {
        for (text, class) in [
            ("please help me bake bread", 0),
            ("what is the capital of france", 0),
            ("write a poem about rain", 0),
            ("fix my python code", 1),
            ("lovely weather in paris", 2),
        ] {
            jsonl.push_str(&format!("{{\"tweet\": \"{text} {round}\", \"class\": {class}}}\n"));
        }
    }
    std::fs::write(path, jsonl).unwrap();
}

#[test]
fn auxiliary_data_trains_but_thresholds_come_from_the_primary_set() {
    let dir = tempfile::tempdir().unwrap();
    let (data, aux, policy) = (dir.path().join("data.csv"), dir.path().join("aux.jsonl"), dir.path().join("t.md"));
    write_dataset(&data, 12);
    write_aux(&aux, 12);
    write_policy(&policy, "# Threats\n\nAnswer 1 if the text threatens someone, else 0.");
    let (data_s, aux_s, policy_s) = (data.to_str().unwrap(), aux.to_str().unwrap(), policy.to_str().unwrap());
    let fields = ["--text-field", "message", "--label-field", "verdict", "--weight-field", "importance"];
    let common =
        ["triage", "train", "--policy", policy_s, "--hash-bits", "12", "--target-recall", "0.95", "--folds", "3"];
    let aux_flags = ["--aux-dataset", aux_s, "--aux-label-field", "class"];
    let classes = ["--aux-label", "0=violation", "--aux-label", "1=violation:0.05", "--aux-label", "2=allow"];
    let train = |extra: &[&str]| {
        let mut args = common.to_vec();
        args.extend(extra);
        let out = safeguard(&args);
        assert!(out.status.success(), "train {extra:?} failed: {}", stderr(&out));
        out
    };
    let eval = |model: &str| {
        let mut args = vec!["triage", "eval", "--model", model, "--dataset", data_s, "--format", "json"];
        args.extend(["--target-recall", "0.95"]);
        args.extend(fields);
        let out = safeguard(&args);
        assert!(out.status.success(), "eval failed (exit 2: recall below target): {}", stderr(&out));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };

    let model = dir.path().join("with-aux");
    let mut args = vec!["--dataset", data_s, "--out", model.to_str().unwrap()];
    args.extend(fields);
    args.extend(aux_flags);
    args.extend(classes);
    args.extend(["--aux-weight", "0.3"]);
    let out = train(&args);
    assert!(String::from_utf8_lossy(&out.stdout).contains("(auxiliary)"), "{}", String::from_utf8_lossy(&out.stdout));
    let meta: Value = serde_json::from_slice(&std::fs::read(model.join("model.json")).unwrap()).unwrap();
    let training = &meta["training"];
    assert_eq!(training["calibration_sources"], serde_json::json!([0]), "{training}");
    assert_eq!(training["config"]["domain_adaptation"], "intercept");
    assert_eq!(training["config"]["in_domain_sources"], 1);
    let recorded = &training["datasets"][1];
    assert_eq!((recorded["path"].as_str(), recorded["auxiliary"].as_bool()), (Some(aux_s), Some(true)));
    assert_eq!((recorded["text_field"].as_str(), recorded["label_field"].as_str()), (Some("tweet"), Some("class")));
    assert_eq!(recorded["weight_scale"].as_f64(), Some(0.3));
    assert_eq!(recorded["label_values"][1], serde_json::json!({"value": "1", "violates": true, "weight": 0.05}));
    assert_eq!((recorded["items"].as_u64(), recorded["violations"].as_u64()), (Some(60), Some(48)));
    assert!(training["datasets"][0].get("auxiliary").is_none(), "the primary set is not auxiliary");
    let with_aux = eval(model.to_str().unwrap());
    assert!(with_aux["recall"].as_f64().unwrap() >= 0.95, "{with_aux}");

    // The same data as a second primary dataset (hate and offensive as violations): its recall must hold too,
    // and the threshold sinks below the primary set's benign items.
    let both = dir.path().join("both");
    let mapped = dir.path().join("aux-binary.csv");
    let rows: String = std::fs::read_to_string(&aux)
        .unwrap()
        .lines()
        .map(|l| {
            let row: Value = serde_json::from_str(l).unwrap();
            let verdict = if row["class"] == 2 { "allow" } else { "violation" };
            format!("\"{}\",{verdict},1\n", row["tweet"].as_str().unwrap())
        })
        .collect();
    std::fs::write(&mapped, format!("message,verdict,importance\n{rows}")).unwrap();
    let mut args = vec!["--dataset", data_s, "--dataset", mapped.to_str().unwrap(), "--out", both.to_str().unwrap()];
    args.extend(fields);
    train(&args);
    let held_to_both = eval(both.to_str().unwrap());
    let (aux_skip, both_skip) = (with_aux["skip_rate"].as_f64().unwrap(), held_to_both["skip_rate"].as_f64().unwrap());
    eprintln!("skip rate on the primary set: with aux {aux_skip}, held to both {both_skip}");
    assert!(aux_skip > 0.5 && aux_skip > both_skip + 0.3, "skip with aux {aux_skip}, held to both {both_skip}");

    // A class the table does not name is an error naming the line, not a silently dropped row.
    std::fs::write(&aux, "{\"tweet\": \"x\", \"class\": 0}\n{\"tweet\": \"y\", \"class\": 7}\n").unwrap();
    let bad = dir.path().join("bad");
    let mut args = common.to_vec();
    args.extend(["--dataset", data_s, "--out", bad.to_str().unwrap()]);
    args.extend(fields);
    args.extend(aux_flags);
    args.extend(classes);
    let out = safeguard(&args);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("aux.jsonl:2"), "{}", stderr(&out));
    // Aux field flags without an aux dataset are a usage error.
    let out = safeguard(&[
        "triage",
        "train",
        "--policy",
        policy_s,
        "--dataset",
        data_s,
        "--out",
        "x",
        "--aux-label",
        "0=allow",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn embedding_head_trains_with_aux_data_and_eval_reports_it() {
    if let Err(why) = safeguard_triage::shared_encoder(None, safeguard_triage::embedding::DEFAULT_MAX_SEQ) {
        eprintln!("SKIPPING the embedding-head CLI test: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (data, aux, policy) = (dir.path().join("data.csv"), dir.path().join("aux.jsonl"), dir.path().join("t.md"));
    write_dataset(&data, 6);
    write_aux(&aux, 4);
    write_policy(&policy, "# Threats\n\nAnswer 1 if the text threatens someone, else 0.");
    let model = dir.path().join("model");
    let (data_s, model_s) = (data.to_str().unwrap(), model.to_str().unwrap());
    let fields = ["--text-field", "message", "--label-field", "verdict", "--weight-field", "importance"];
    let mut args = vec!["triage", "train", "--policy", policy.to_str().unwrap(), "--dataset", data_s, "--out", model_s];
    args.extend(["--hash-bits", "12", "--target-recall", "0.95", "--folds", "3"]);
    args.extend(["--aux-dataset", aux.to_str().unwrap(), "--aux-label-field", "class"]);
    args.extend(["--aux-label", "0=violation", "--aux-label", "1=violation", "--aux-label", "2=allow"]);
    args.extend(["--embedding-head", "--head-c", "3", "--head-aux-weight", "0.05"]);
    args.extend(fields);
    let out = safeguard(&args);
    assert!(out.status.success(), "train failed: {}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("embedding head  threshold"));
    let head: Value = serde_json::from_slice(&std::fs::read(model.join("embedding_head.json")).unwrap()).unwrap();
    assert_eq!(head["c"], 3.0);
    // Thresholds come from the primary set; the auxiliary rows (which copy its benign texts as violations)
    // only train, at the head's own weight.
    assert_eq!(head["training"]["calibration_sources"], serde_json::json!([0]), "{head}");
    assert_eq!(
        (head["training"]["auxiliary_items"].as_u64(), head["training"]["auxiliary_weight"].as_f64()),
        (Some(20), Some(0.05))
    );
    assert_eq!(head["out_of_fold"]["items"], 48);
    assert!(head["encoder"]["fingerprint"].as_str().unwrap().starts_with("sha256:"));

    let mut args = vec!["triage", "eval", "--model", model_s, "--dataset", data_s, "--format", "json"];
    args.extend(fields);
    let out = safeguard(&args);
    assert!(out.status.success(), "eval failed: {}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let head_report = &report["embedding_head"];
    assert!(report["rules_from"].is_null(), "without --policy, the model alone: {report}");
    assert_eq!(head_report["encoder_failures"], 0, "{report}");
    assert!(head_report["consulted"].as_u64().unwrap() > 0, "{report}");
    assert!(report["recall"].as_f64().unwrap() >= 0.95, "{report}");
    assert!(report["skip_rate"].as_f64().unwrap() > 0.5, "{report}");

    // Without the vote (the default) the head's threshold keeps --target-recall and no rows are stored.
    assert!(head["neighbours"].is_null() && !model.join("embedding_head_neighbours.bin").exists(), "{head}");
    assert_eq!(head["target_recall"], 0.95);

    // With it, the rows are stored beside the head, its threshold keeps half the misses out of fold unless
    // --head-target-recall says otherwise, and eval reports the vote.
    for (extra, target) in [(None, 0.975), (Some("0.9"), 0.9)] {
        let voting = dir.path().join("voting");
        let mut args = vec!["triage", "train", "--policy", policy.to_str().unwrap(), "--dataset", data_s, "--out"];
        args.extend([voting.to_str().unwrap(), "--hash-bits", "12", "--target-recall", "0.95", "--folds", "3"]);
        args.extend(["--embedding-head", "--head-neighbours", "3", "--head-neighbour-weight", "5"]);
        if let Some(explicit) = extra {
            args.extend(["--head-target-recall", explicit]);
        }
        args.extend(fields);
        let out = safeguard(&args);
        assert!(out.status.success(), "train failed: {}", stderr(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains("neighbour vote k 3  weight 5"));
        let head: Value = serde_json::from_slice(&std::fs::read(voting.join("embedding_head.json")).unwrap()).unwrap();
        assert_eq!((head["neighbours"]["k"].as_u64(), head["neighbours"]["items"].as_u64()), (Some(3), Some(48)));
        assert_eq!(head["target_recall"], target, "{head}");
        assert!(voting.join("embedding_head_neighbours.bin").is_file());
        let mut args =
            vec!["triage", "eval", "--model", voting.to_str().unwrap(), "--dataset", data_s, "--format", "json"];
        args.extend(fields);
        let out = safeguard(&args);
        assert!(out.status.success(), "eval failed: {}", stderr(&out));
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["embedding_head"]["neighbours"]["k"], 3, "{report}");
    }

    // A model without a head reports none.
    let plain = dir.path().join("plain");
    let args = ["triage", "train", "--policy", policy.to_str().unwrap(), "--dataset", data_s, "--out"];
    let mut args = args.to_vec();
    args.extend([plain.to_str().unwrap(), "--hash-bits", "12", "--target-recall", "0.95", "--folds", "3"]);
    args.extend(fields);
    assert!(safeguard(&args).status.success());
    let mut args = vec!["triage", "eval", "--model", plain.to_str().unwrap(), "--dataset", data_s, "--format", "json"];
    args.extend(fields);
    let report: Value = serde_json::from_slice(&safeguard(&args).stdout).unwrap();
    assert!(report["embedding_head"].is_null(), "{report}");
}

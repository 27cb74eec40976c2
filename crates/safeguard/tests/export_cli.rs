//! `safeguard export dataset` end to end: a SQLite store filled here with decisions and decided reviews, the
//! export, and `safeguard triage train` reading the export back; `safeguard triage audit` reading the same kind
//! of store for what people found among the items triage settled alone.

use std::path::Path;
use std::process::{Command, Output};

use safeguard_store::{DecisionRecord, NewReview, ReviewDecision, Store, now_ms};
use serde_json::{Value, json};

const POLICY: &str =
    "---\nname: threats\noutput: binary\n---\n# Threats\n\nAnswer 1 if the text threatens someone, else 0.\n";
const BENIGN: [&str; 4] =
    ["please help me bake bread", "what is the capital of france", "write a poem about rain", "fix my python code"];
const BAD: [&str; 4] = [
    "i will hurt you badly",
    "you deserve to suffer",
    "i know where you live and will hurt you",
    "go suffer you idiot",
];

fn safeguard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_safeguard")).args(args).output().expect("run safeguard")
}

fn decision(id: &str, created_at: i64, text: &str, model_says: &str) -> DecisionRecord {
    DecisionRecord {
        id: id.to_string(),
        created_at,
        policy_hashes: vec!["sha256:threatsv1".into()],
        policy_names: vec!["threats".into()],
        model_id: "gpt-oss-safeguard-20b".into(),
        effort: "low".into(),
        prompt_hash: None,
        sampling: json!("greedy"),
        content: json!({"kind": "text", "text": text}),
        verdicts: json!([{"policy": "threats", "policy_hash": "sha256:threatsv1", "outcome": model_says,
                           "violation": model_says == "violation", "rule_ids": ["T1"], "flags": []}]),
        outcome: model_says.into(),
        failure_reason: None,
        timings: json!({}),
        prompt_tokens: 0,
        cached_prompt_tokens: 0,
        completion_tokens: 0,
        source: "api".into(),
        job_id: None,
        replay_of: None,
        submitted_by: None,
    }
}

/// 6 rounds of 4 benign + 4 threatening texts. The model got the first threat of each round wrong (allow) and
/// left one benign text undecided; people corrected the first and confirmed the second.
fn fill(db: &Path, base: i64) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let store = Store::open_sqlite(db).await.unwrap();
        let mut at = base;
        for round in 0..6 {
            for (i, text) in BENIGN.iter().enumerate() {
                at += 1;
                let says = if i == 0 { "needs_review" } else { "allow" };
                let id = format!("ok-{round}-{i}");
                store.insert_decision(&decision(&id, at, &format!("{text} {round}"), says), None).await.unwrap();
                if i == 0 {
                    decide(&store, &id, "allow", false).await;
                }
            }
            for (i, text) in BAD.iter().enumerate() {
                at += 1;
                let says = if i == 0 { "allow" } else { "violation" };
                let id = format!("bad-{round}-{i}");
                store.insert_decision(&decision(&id, at, &format!("{text} {round}"), says), None).await.unwrap();
                if i == 0 {
                    decide(&store, &id, "violation", true).await;
                }
            }
        }
        store.close().await;
    });
}

async fn decide(store: &Store, decision_id: &str, outcome: &str, overrides_model: bool) {
    let review = store.enqueue_review(decision_id, 1).await.unwrap();
    let decision = ReviewDecision {
        reviewer: "ana".into(),
        outcome: outcome.into(),
        rationale: "checked".into(),
        rule_id: "T1".into(),
        policy_hash: Some("sha256:threatsv1".into()),
        overrides_model: Some(overrides_model),
    };
    store.decide_review(&review, &decision).await.unwrap().expect("decided");
}

fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn export_merges_human_and_model_labels_and_trains_triage() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("decisions.db");
    fill(&db, now_ms() - 60_000);
    let url = format!("sqlite://{}", db.display());
    let out = dir.path().join("export.jsonl");
    let out_s = out.to_str().unwrap();

    // Human labels only.
    let output = safeguard(&["export", "dataset", "--database", &url, "--out", out_s]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let human = read_jsonl(&out);
    assert_eq!(human.len(), 12);
    for line in &human {
        assert_eq!(line["source"], "human");
        assert_eq!(line["stage"], "human_review");
        assert_eq!(line["reviewer"], "ana");
        assert_eq!(line["weight"].as_f64(), Some(5.0));
        assert_eq!(line["policy_hash"], "sha256:threatsv1");
        let expected = u64::from(line["id"].as_str().unwrap().starts_with("bad-"));
        assert_eq!(line["violates"].as_u64(), Some(expected), "{line}");
        // What the person corrected: a direct decision's one reasoning step, whose answer (`violation`, what a
        // reviewer's agreement is measured against) was "no violation" for both, the benign texts undecided.
        let corrects = &line["corrects"];
        assert_eq!(corrects["violates"], 0, "{line}");
        assert_eq!((corrects["stage"].as_str(), corrects["effort"].as_str()), (Some("reasoning_low"), Some("low")));
        assert_eq!(corrects["model"], "gpt-oss-safeguard-20b", "{line}");
    }

    // With model labels: 48 decisions, of which the 6 undecided ones only have their human label, and the 6
    // wrong "allow"s are replaced by the human "violation".
    let output = safeguard(&["export", "dataset", "--database", &url, "--include-model-labels", "--out", out_s]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let all = read_jsonl(&out);
    assert_eq!(all.len(), 48);
    let mut ids: Vec<&str> = all.iter().map(|l| l["id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 48, "every item exactly once");
    for line in &all {
        let id = line["id"].as_str().unwrap();
        let expected = u64::from(id.starts_with("bad-"));
        assert_eq!(line["violates"].as_u64(), Some(expected), "{line}");
        if id.ends_with("-0") {
            assert_eq!(line["source"], "human", "{line}");
        } else {
            assert_eq!(line["source"], "model", "{line}");
            assert_eq!(line["weight"].as_f64(), Some(1.0));
            assert_eq!(line["model"], "gpt-oss-safeguard-20b");
            assert_eq!(line["effort"], "low");
            assert_eq!(line["stage"], "reasoning_low");
            assert_eq!(line["rule_id"], "T1");
        }
    }

    // The export is exactly what triage training reads.
    let policy = dir.path().join("threats.md");
    std::fs::write(&policy, POLICY).unwrap();
    let model = dir.path().join("triage");
    let mut args = vec!["triage", "train", "--policy", policy.to_str().unwrap(), "--dataset", out_s];
    // No --weight-field: the export's `weight` is read by default, so corrections count more without a flag.
    args.extend(["--text-field", "text", "--label-field", "violates"]);
    args.extend(["--out", model.to_str().unwrap(), "--hash-bits", "12", "--target-recall", "0.9", "--folds", "3"]);
    // The decisions were made under sha256:threatsv1, not this file's wording: no labels for it until asked.
    let output = safeguard(&args);
    assert!(!output.status.success());
    let refused = String::from_utf8_lossy(&output.stderr);
    assert!(refused.contains("48 rows") && refused.contains("other versions"), "{refused}");
    args.push("--any-policy-version");
    let output = safeguard(&args);
    assert!(output.status.success(), "train failed: {}", String::from_utf8_lossy(&output.stderr));
    let meta: Value = serde_json::from_slice(&std::fs::read(model.join("model.json")).unwrap()).unwrap();
    assert_eq!(meta["training"]["items"], 48);
    assert_eq!(meta["training"]["datasets"][0]["weight_field"], "weight");
}

#[test]
fn filters_and_bad_arguments_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("decisions.db");
    fill(&db, 1_000_000);
    let url = format!("sqlite://{}", db.display());
    let out = dir.path().join("export.jsonl");
    let out_s = out.to_str().unwrap();

    let output = safeguard(&["export", "dataset", "--database", &url, "--policy", "spam", "--out", out_s]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("nothing to export") && stderr.contains("`spam`"), "{stderr}");
    assert!(!out.exists(), "no empty file left behind");

    let output = safeguard(&["export", "dataset", "--database", &url, "--since", "yesterday", "--out", out_s]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("RFC 3339"));
    // Seconds where milliseconds are meant would export everything since 1970.
    let output = safeguard(&["export", "dataset", "--database", &url, "--since", "1706659200", "--out", out_s]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("1706659200000"), "{output:?}");

    // The decisions were made in 1970 but corrected today: a 2020 cutoff still holds the corrections, a cutoff
    // in the future leaves nothing.
    let output =
        safeguard(&["export", "dataset", "--database", &url, "--since", "2020-01-01T00:00:00Z", "--out", out_s]);
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    let output =
        safeguard(&["export", "dataset", "--database", &url, "--since", "2100-01-01T00:00:00Z", "--out", out_s]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("0 decided reviews"));

    let output =
        safeguard(&["export", "dataset", "--database", &url, "--since", "0", "--policy", "threats", "--out", out_s]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(read_jsonl(&out).len(), 12);
    let partials = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".partial"));
    assert_eq!(partials.count(), 0, "written beside, then moved into place");

    // A dataset that cannot be written is a clear failure that leaves nothing looking like a finished one.
    let nowhere = dir.path().join("missing").join("export.jsonl");
    let output = safeguard(&["export", "dataset", "--database", &url, "--out", nowhere.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot create") && stderr.contains("export.jsonl"), "{stderr}");
    assert!(!nowhere.exists());

    // A mistyped database is refused, not made (and migrated) empty and exported as "nothing".
    let typo = dir.path().join("decisons.db");
    let typo_url = format!("sqlite://{}", typo.display());
    let output = safeguard(&["export", "dataset", "--database", &typo_url, "--out", out_s]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no database at"), "{output:?}");
    assert!(!typo.exists(), "the export made the database it was asked to read");

    // NaN would be written as null, which triage reads as weight 1; 0 and negatives teach nothing or fail later.
    for weight in ["nan", "inf", "0", "-2"] {
        let flag = format!("--human-weight={weight}");
        let args = ["export", "dataset", "--database", &url, &flag, "--out", out_s];
        let output = safeguard(&args);
        assert_eq!(output.status.code(), Some(2), "--human-weight {weight}");
        assert!(String::from_utf8_lossy(&output.stderr).contains("not a finite number > 0"), "{output:?}");
    }
}

/// A cascade decision settles each policy at its own stage: only the reasoning stages' verdicts are model
/// labels, each with its own effort, and triage's are left out.
#[test]
fn cascade_decisions_give_model_labels_per_stage_and_none_for_triage() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("decisions.db");
    let verdict = |policy: &str, outcome: &str, stage: &str| {
        json!({"policy": policy, "policy_hash": format!("sha256:{policy}"), "outcome": outcome,
               "violation": outcome == "violation", "rule_ids": [], "flags": [], "stage": stage})
    };
    let mut record = decision("cascade-1", now_ms(), "send me your password or else", "violation");
    record.policy_names = vec!["spam".into(), "threats".into(), "privacy".into(), "hate".into()];
    record.policy_hashes = record.policy_names.iter().map(|n| format!("sha256:{n}")).collect();
    // The record's effort is its last reasoning step's; the low-effort policy was settled before it.
    record.effort = "high".into();
    record.source = "cascade:reasoning_high".into();
    record.verdicts = json!([
        verdict("spam", "allow", "triage"),
        verdict("threats", "violation", "reasoning_high"),
        verdict("privacy", "allow", "reasoning_low"),
        verdict("hate", "needs_review", "human_review"),
    ]);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let store = Store::open_sqlite(&db).await.unwrap();
        store.insert_decision(&record, None).await.unwrap();
        store.close().await;
    });
    let out = dir.path().join("export.jsonl");
    let url = format!("sqlite://{}", db.display());
    let export = || {
        safeguard(&["export", "dataset", "--database", &url, "--include-model-labels", "--out", out.to_str().unwrap()])
    };
    let output = export();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let mut lines = read_jsonl(&out);
    lines.sort_by_key(|l| l["policy"].as_str().unwrap().to_string());
    let got: Vec<(&str, &str, &str, u64)> = lines
        .iter()
        .map(|l| {
            let field = |name: &str| l[name].as_str().unwrap();
            (field("policy"), field("stage"), field("effort"), l["violates"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(got, [("privacy", "reasoning_low", "low", 0), ("threats", "reasoning_high", "high", 1)]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("settled by triage"));

    // A person audits what triage allowed and finds a violation: the row says it corrects triage, no model.
    runtime.block_on(async {
        let store = Store::open_sqlite(&db).await.unwrap();
        let review = store.enqueue_review("cascade-1", 0).await.unwrap();
        let decision = ReviewDecision {
            reviewer: "ana".into(),
            outcome: "violation".into(),
            rationale: "spam after all".into(),
            rule_id: "S1".into(),
            policy_hash: Some("sha256:spam".into()),
            overrides_model: Some(true),
        };
        store.decide_review(&review, &decision).await.unwrap().expect("decided");
        store.close().await;
    });
    let output = export();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let lines = read_jsonl(&out);
    let spam = lines.iter().find(|l| l["policy"] == "spam").expect("the person's label for spam");
    assert_eq!((spam["source"].as_str(), spam["violates"].as_u64()), (Some("human"), Some(1)), "{spam}");
    assert_eq!(spam["corrects"], json!({"stage": "triage", "violates": 0}), "{spam}");
}

/// An export labels each policy of an item on its own row, so ids repeat. Evaluation reads it back as one item
/// per id with a label per policy: scored for one policy, only that policy's labels count; scored whole, an
/// item violates if any policy says so, and each policy is checked against its own labels.
#[test]
fn a_multi_policy_export_is_an_eval_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("decisions.db");
    // (id, threats, spam) as the model decided them.
    let items = [("d1", "violation", "allow"), ("d2", "allow", "violation"), ("d3", "allow", "allow")];
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let store = Store::open_sqlite(&db).await.unwrap();
        for (at, (id, threats, spam)) in items.iter().enumerate() {
            let mut record = decision(id, now_ms() - 1_000 + at as i64, &format!("text of {id}"), "allow");
            record.policy_names = vec!["threats".into(), "spam".into()];
            record.policy_hashes = vec!["sha256:threatsv1".into(), "sha256:spamv1".into()];
            record.verdicts = json!([
                {"policy": "threats", "policy_hash": "sha256:threatsv1", "outcome": threats, "rule_ids": []},
                {"policy": "spam", "policy_hash": "sha256:spamv1", "outcome": spam, "rule_ids": []},
            ]);
            store.insert_decision(&record, None).await.unwrap();
        }
        store.close().await;
    });
    let export = dir.path().join("export.jsonl");
    let url = format!("sqlite://{}", db.display());
    let output = safeguard(&[
        "export",
        "dataset",
        "--database",
        &url,
        "--include-model-labels",
        "--out",
        export.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(read_jsonl(&export).len(), 6, "one row per item and policy");

    // A new run: right on spam everywhere, wrong on threats for d1 (missed) and d3 (flagged).
    let run = dir.path().join("run.jsonl");
    let line = |id: &str, outcome: &str, threats: &str, spam: &str| {
        json!({"id": id, "outcome": outcome, "verdicts": [
            {"policy": "threats", "outcome": threats, "violation": threats == "violation", "rule_ids": [], "flags": []},
            {"policy": "spam", "outcome": spam, "violation": spam == "violation", "rule_ids": [], "flags": []}]})
        .to_string()
    };
    let lines = [
        line("d1", "allow", "allow", "allow"),
        line("d2", "violation", "allow", "violation"),
        line("d3", "violation", "violation", "allow"),
    ];
    std::fs::write(&run, lines.join("\n")).unwrap();
    let eval = |extra: &[&str]| {
        let mut args = vec!["eval", "--predictions", run.to_str().unwrap(), "--dataset", export.to_str().unwrap()];
        args.extend(extra);
        args.extend(["--format", "json"]);
        let output = safeguard(&args);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice::<Value>(&output.stdout).unwrap()
    };
    let counts = |report: &Value| ["tp", "fp", "tn", "fn"].map(|k| report[k].as_u64().unwrap());

    // Threats alone: d1 is a missed violation, d2 a true negative, d3 a false positive.
    assert_eq!(counts(&eval(&["--policy", "threats"])), [0, 1, 1, 1]);
    // Spam alone: all right.
    assert_eq!(counts(&eval(&["--policy", "spam"])), [1, 0, 2, 0]);
    // Whole items: d1 and d2 violate something, d3 nothing; each policy is also scored against its own labels.
    let whole = eval(&[]);
    assert_eq!(counts(&whole), [1, 1, 0, 1]);
    let multi = &whole["multi_policy"];
    assert_eq!((multi["items"].as_u64(), multi["correct"].as_u64()), (Some(3), Some(1)), "{multi}");
    assert_eq!(multi["policies"], json!({"spam": "spam", "threats": "threats"}));

    // A policy the export has no labels for is an error, not an empty report.
    let output = safeguard(&[
        "eval",
        "--predictions",
        run.to_str().unwrap(),
        "--dataset",
        export.to_str().unwrap(),
        "--policy",
        "hate",
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("none for `hate`") && stderr.contains("spam, threats"), "{stderr}");
}

/// A service on PostgreSQL keeps its tables in its own schema: the export reads that schema when told, by flag or
/// by the environment `safeguard serve` takes it from.
#[test]
fn export_reads_the_services_postgres_schema() {
    let url = std::env::var("SAFEGUARD_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string());
    let schema = format!("sgexportcli_{}_{}", std::process::id(), now_ms());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let options = safeguard_store::StoreOptions { schema: Some(schema.clone()), ..Default::default() };
    let connected = runtime.block_on(async {
        tokio::time::timeout(std::time::Duration::from_secs(5), Store::connect(&url, options)).await
    });
    let store = match connected {
        Ok(Ok(store)) => store,
        _ => {
            eprintln!("SKIPPING: PostgreSQL at {url} is not reachable");
            return;
        }
    };
    runtime.block_on(async {
        store.insert_decision(&decision("pg-1", now_ms(), "i will hurt you", "violation"), None).await.unwrap();
        store.close().await;
    });
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("export.jsonl");
    let output = Command::new(env!("CARGO_BIN_EXE_safeguard"))
        .args(["export", "dataset", "--database", &url, "--include-model-labels", "--out", out.to_str().unwrap()])
        .env("SAFEGUARD_DATABASE_SCHEMA", &schema)
        .output()
        .unwrap();
    runtime.block_on(Store::drop_schema(&url, &schema)).unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let rows = read_jsonl(&out);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["id"], "pg-1");
}

/// Triage settled 30 items alone under one model: 20 allows, of which people found 2 violating, and 10 violations
/// by its deny rule, of which people allowed 1. Only reviews drawn as an audit count: a disagreement sample of an
/// item triage settled is not a uniform draw, and would bias the rate. The same weights recalibrated later are
/// another model. An audit its item's appeal superseded counts with the appeal's answer, once someone gives it.
#[test]
fn triage_audit_reports_what_people_found_among_triage_settled_items() {
    const FIRST: &str = "2026-11-01T09:00:00Z";
    const RECALIBRATED: &str = "2026-11-20T09:00:00Z";
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("decisions.db");
    let settled = |id: &str, outcome: &str, model: Option<&str>| {
        let mut record = decision(id, now_ms(), &format!("item {id}"), outcome);
        record.effort = "none".into();
        record.source = "cascade:triage".into();
        let model = model.map(|created| json!({"weights_sha256": "a1b2c3d4e5f6a7b8", "created": created}));
        let triage = json!({"band": "confident_benign", "calibrated_probability": 0.01, "model": model});
        record.verdicts = json!([{"policy": "threats", "policy_hash": "sha256:threatsv1", "outcome": outcome,
                                  "violation": outcome == "violation", "rule_ids": [], "flags": [],
                                  "stage": "triage", "triage": triage}]);
        record
    };
    let answer = |person: &str, model_said: &str| ReviewDecision {
        reviewer: "ana".into(),
        outcome: person.into(),
        rationale: "checked".into(),
        rule_id: "T1".into(),
        policy_hash: Some("sha256:threatsv1".into()),
        overrides_model: Some(person != model_said),
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let store = Store::open_sqlite(&db).await.unwrap();
        let queue = |id: String, kind: &'static str, triage_said: &'static str, created: &'static str| {
            let model = (triage_said == "allow").then_some(created);
            let record = settled(&id, triage_said, model);
            let store = &store;
            async move {
                store.insert_decision(&record, None).await.unwrap();
                let queued = NewReview {
                    decision_id: id.clone(),
                    kind: kind.into(),
                    priority: 0,
                    reason: Some("active learning".into()),
                    sla_ms: None,
                    policy_hash: Some("sha256:threatsv1".into()),
                };
                store.queue_review(&queued).await.unwrap().review
            }
        };
        let review = async |id: String, kind: &'static str, triage_said: &'static str, person: &'static str| {
            let review = queue(id, kind, triage_said, FIRST).await;
            store.decide_review(&review.id, &answer(person, triage_said)).await.unwrap().expect("decided");
        };
        for i in 0..20 {
            review(format!("allowed-{i}"), "audit", "allow", if i < 2 { "violation" } else { "allow" }).await;
        }
        for i in 0..10 {
            review(format!("denied-{i}"), "audit", "violation", if i < 1 { "allow" } else { "violation" }).await;
        }
        // Not drawn at random: left out, though it overturns triage.
        review("sampled".into(), "sample", "allow", "violation").await;
        for i in 0..4 {
            let id = format!("recalibrated-{i}");
            let audit = queue(id, "audit", "allow", RECALIBRATED).await;
            let person = if i < 1 { "violation" } else { "allow" };
            store.decide_review(&audit.id, &answer(person, "allow")).await.unwrap().expect("decided");
        }
        // Two items triage denied were drawn for audit, then appealed before anyone looked at them: the appeal
        // supersedes each audit. A person allows the first on appeal; the second's appeal waits.
        for (i, person) in [(0, Some("allow")), (1, None)] {
            let id = format!("appealed-{i}");
            let audit = queue(id.clone(), "audit", "violation", FIRST).await;
            let mut appeal = decision(&format!("appeal-of-{i}"), now_ms(), &format!("item {id}"), "violation");
            appeal.effort = "high".into();
            appeal.source = "appeal".into();
            appeal.replay_of = Some(id.clone());
            let appeal_review = NewReview {
                decision_id: appeal.id.clone(),
                kind: "appeal".into(),
                priority: 10,
                reason: Some(format!("appeal of {id}")),
                sla_ms: None,
                policy_hash: None,
            };
            let queued = store.insert_appeal(&appeal, None, &appeal_review).await.unwrap();
            let superseded = store.get_review(&audit.id).await.unwrap().unwrap();
            assert_eq!(superseded.status, "superseded");
            if let Some(person) = person {
                let decided = store.decide_review(&queued.review.id, &answer(person, "violation")).await.unwrap();
                assert!(decided.is_some());
            }
        }
        store.close().await;
    });
    let url = format!("sqlite://{}", db.display());
    let output = safeguard(&["triage", "audit", "--database", &url, "--format", "json"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("1 audited items whose appeal no one has answered"), "{stderr}");
    let rows: Value = serde_json::from_slice(&output.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 3, "{rows:?}");
    let row = |said: &str, created: Value| {
        rows.iter().find(|r| r["triage_said"] == said && r["triage_model_created"] == created).unwrap()
    };
    let allows = row("allow", json!(FIRST));
    assert_eq!((allows["audited"].as_u64(), allows["overturned"].as_u64()), (Some(20), Some(2)), "{allows}");
    assert_eq!(allows["triage_model"], "a1b2c3d4e5f6a7b8");
    assert_eq!(allows["error_rate"].as_f64(), Some(0.1));
    let interval: Vec<f64> = allows["interval"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert!(interval[0] > 0.02 && interval[0] < 0.04 && interval[1] > 0.29 && interval[1] < 0.32, "{interval:?}");
    let recalibrated = row("allow", json!(RECALIBRATED));
    assert_eq!((recalibrated["audited"].as_u64(), recalibrated["overturned"].as_u64()), (Some(4), Some(1)));
    assert_eq!(recalibrated["triage_model"], "a1b2c3d4e5f6a7b8");
    let denies = row("violation", Value::Null);
    assert_eq!((denies["audited"].as_u64(), denies["overturned"].as_u64()), (Some(11), Some(2)), "{denies}");
    assert_eq!(denies["answered_on_appeal"].as_u64(), Some(1), "{denies}");
    assert_eq!(denies["triage_model"], Value::Null, "settled by the deny rule, no model");

    let output = safeguard(&["triage", "audit", "--database", &url]);
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success() && table.contains("a1b2c3d4e5f6 2026-11-20") && table.contains("10.0%"), "{table}");
    let output = safeguard(&["triage", "audit", "--database", &url, "--policy", "other", "--format", "json"]);
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "[]");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("not counted yet"), "the waiting appeal is of another policy: {stderr}");
}

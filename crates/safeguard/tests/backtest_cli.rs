//! `safeguard policy backtest` end to end: a SQLite store filled here, the real binary, a tiny random model.
//!
//! A random model never produces a parseable verdict, so every replayed item must come out needs_review:
//! every stored allow/violation therefore has to show up as a flip to needs_review.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safeguard_store::{DecisionRecord, Store, now_ms};
use serde_json::{Value, json};

const NEW_SPAM: &str = "---\nname: spam\nversion: \"2\"\noutput: binary\n---\n# Spam\n\n## INSTRUCTIONS\n\
                        Return exactly one character: 0 or 1.\n\n## VIOLATES (1)\nUnsolicited promotion, \
                        including affiliate links.\n\n## SAFE (0)\nEverything else.\n";
const HATE: &str = "---\nname: hate\noutput: binary\n---\n# Hate\n\nReturn 0 or 1.\n";

fn decision(id: &str, created_at: i64, policy: &str, violation: Option<bool>, text: &str) -> DecisionRecord {
    let outcome = match violation {
        Some(true) => "violation",
        Some(false) => "allow",
        None => "needs_review",
    };
    DecisionRecord {
        id: id.to_string(),
        created_at,
        policy_hashes: vec![format!("sha256:{policy}v1")],
        policy_names: vec![policy.to_string()],
        model_id: "tiny".into(),
        effort: "low".into(),
        prompt_hash: None,
        sampling: json!("greedy"),
        content: json!({"kind": "text", "text": text}),
        verdicts: json!([{
            "policy": policy, "policy_hash": format!("sha256:{policy}v1"), "violation": violation,
            "label": violation.map(|v| if v { "1" } else { "0" }), "rationale": format!("old rationale for {id}"),
            "rule_ids": [], "flags": [], "outcome": outcome,
        }]),
        outcome: outcome.into(),
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

fn settled_by_triage(mut decision: DecisionRecord) -> DecisionRecord {
    decision.verdicts[0]["stage"] = json!("triage");
    decision
}

/// Where the cascade overrode the model, the stored outcome is the person's needs_review and the model's answer
/// is kept beside it.
fn routed_to_a_person(mut decision: DecisionRecord, model_said: &str) -> DecisionRecord {
    let verdict = &mut decision.verdicts[0];
    verdict["model_outcome"] = json!(model_said);
    verdict["outcome"] = json!("needs_review");
    verdict["stage"] = json!("human_review");
    verdict["escalations"] = json!([{"kind": "appeal"}]);
    decision.outcome = "needs_review".into();
    decision
}

/// A cascade verdict with no answer of the model in it: triage sent it to a person, or the step failed.
fn without_a_model_answer(mut decision: DecisionRecord, escalation: Value) -> DecisionRecord {
    let verdict = &mut decision.verdicts[0];
    verdict["stage"] = json!("human_review");
    verdict["escalations"] = json!([escalation]);
    decision
}

/// A decision reasoned directly (a pinned effort, no cascade) whose backend failed: the failure is in the
/// decision's `failure_reason` and the verdict's rationale, not in an escalation.
fn failed_directly(mut decision: DecisionRecord) -> DecisionRecord {
    let reason = "backend 1: connection refused";
    decision.verdicts[0]["rationale"] = json!(format!("{}{reason}", safeguard_core::FAILED_STEP_RATIONALE));
    decision.failure_reason = Some(reason.into());
    decision
}

fn under_the_new_version(mut decision: DecisionRecord) -> DecisionRecord {
    let hash = safeguard_policy::Policy::parse(NEW_SPAM).expect("policy").hash.to_string();
    decision.verdicts[0]["policy_hash"] = json!(hash);
    decision.policy_hashes = vec![hash];
    decision
}

struct Fixture {
    _dir: tempfile::TempDir,
    model: PathBuf,
    policy: PathBuf,
    hate: PathBuf,
    database: String,
    empty_database: String,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("tiny.gguf");
    safeguard_gguf::write_tiny_model(&model, &safeguard_gguf::TinyConfig::with_seed(5)).expect("tiny model");
    let policy = dir.path().join("spam.md");
    std::fs::write(&policy, NEW_SPAM).expect("policy");
    let hate = dir.path().join("hate.md");
    std::fs::write(&hate, HATE).expect("policy");
    let db_path = dir.path().join("decisions.db");
    let empty_path = dir.path().join("empty.db");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let store = Store::open_sqlite(&db_path).await.expect("open store");
        let base = now_ms() - 10_000;
        let decisions = [
            decision("d1", base, "spam", Some(true), "BUY CHEAP PILLS at example.com!!!"),
            decision("d2", base + 1, "spam", Some(false), "See you at lunch tomorrow."),
            decision("d3", base + 2, "spam", Some(true), "Click my affiliate link for 50% off"),
            decision("d4", base + 3, "spam", None, "hmm"),
            decision("d5", base + 4, "hate", Some(false), "unrelated policy"),
            settled_by_triage(decision("d6", base + 5, "spam", Some(false), "thanks, see you")),
            under_the_new_version(decision("d7", base + 6, "spam", Some(true), "FREE PILLS")),
            routed_to_a_person(decision("d8", base + 7, "spam", Some(true), "cheap pills, appealed"), "violation"),
            without_a_model_answer(
                decision("d9", base + 8, "spam", None, "matched a deny rule"),
                json!({"kind": "triage_violation_to_review"}),
            ),
            without_a_model_answer(
                decision("d10", base + 9, "spam", None, "the backend was down"),
                json!({"kind": "stage_failed", "detail": "timed out"}),
            ),
            failed_directly(decision("d11", base + 10, "spam", None, "the backend was down, no cascade")),
        ];
        for d in &decisions {
            store.insert_decision(d, None).await.expect("insert");
        }
        store.close().await;
        Store::open_sqlite(&empty_path).await.expect("open empty").close().await;
    });
    let url = |p: &Path| format!("sqlite://{}", p.display());
    Fixture { database: url(&db_path), empty_database: url(&empty_path), _dir: dir, model, policy, hate }
}

/// The report is refused before the model runs when it would replace an input or its folder is not there.
#[test]
fn an_html_report_over_an_input_or_in_no_folder_is_refused_before_the_run() {
    let f = fixture();
    let policy_before = std::fs::read(&f.policy).unwrap();
    let database_file = f.database.strip_prefix("sqlite://").unwrap().to_string();
    let nowhere = f._dir.path().join("no-such-folder").join("report.html");
    for (html, says) in [
        (f.policy.clone(), "is the input file"),
        (PathBuf::from(&database_file), "is the input file"),
        (nowhere, "does not exist"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_safeguard"))
            .args(["policy", "backtest", "--policy"])
            .arg(&f.policy)
            .args(["--database", &f.database, "--model"])
            .arg(&f.model)
            .args(["--effort", "low", "--max-tokens", "8", "--html"])
            .arg(&html)
            .output()
            .expect("run safeguard");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{}: {stderr}", html.display());
        assert!(stderr.contains(says), "{}: {stderr}", html.display());
        assert!(!stderr.contains("reasoning"), "refused before the model ran: {stderr}");
    }
    assert_eq!(std::fs::read(&f.policy).unwrap(), policy_before, "the policy is untouched");
}

fn backtest(f: &Fixture, policy: &Path, database: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_safeguard"))
        .args(["policy", "backtest", "--policy"])
        .arg(policy)
        .args(["--database", database, "--model"])
        .arg(&f.model)
        .args(["--effort", "low", "--max-tokens", "8", "--threads", "2", "--format", "json"])
        .output()
        .expect("run safeguard")
}

#[test]
fn every_stored_decision_is_replayed_and_flips_are_counted_by_direction() {
    let f = fixture();
    let html = f._dir.path().join("report.html");
    let output = Command::new(env!("CARGO_BIN_EXE_safeguard"))
        .args(["policy", "backtest", "--policy"])
        .arg(&f.policy)
        .args(["--database", &f.database, "--model"])
        .arg(&f.model)
        .args(["--effort", "low", "--max-tokens", "8", "--threads", "2", "--format", "json", "--html"])
        .arg(&html)
        .output()
        .expect("run safeguard");
    assert!(output.status.success(), "stderr: {}", String::from_utf8_lossy(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).expect("json report");

    // Only the five spam decisions the model judged under the old version; the hate one is another policy.
    assert_eq!(report["items"], 5, "{report:#}");
    let mut skipped: Vec<(&str, &str)> = report["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s[0].as_str().unwrap(), s[1].as_str().unwrap()))
        .collect();
    skipped.sort_unstable();
    assert_eq!(
        skipped,
        [
            ("d10", "the model's step failed; it gave no answer to compare with"),
            ("d11", "the model's step failed; it gave no answer to compare with"),
            ("d6", "settled by triage, not by the model"),
            ("d7", "already judged under this version"),
            ("d9", "sent to a person by triage; the model never judged it"),
        ],
        "{report:#}"
    );
    let mut ids: Vec<&str> = report["results"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["d1", "d2", "d3", "d4", "d8"]);
    // d8's "before" is what the model said, not the needs_review the appeal routed it to.
    assert_eq!(report["before"], json!({"violation": 3, "allow": 1, "needs_review": 1}));
    assert_eq!(report["after"], json!({"needs_review": 5}));
    assert_eq!(report["flips"], json!({"violation->needs_review": 3, "allow->needs_review": 1}));
    assert_eq!(report["unchanged"], 1);
    let flipped: u64 = report["flips"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(flipped + report["unchanged"].as_u64().unwrap(), report["items"].as_u64().unwrap());

    let examples = &report["examples"]["allow->needs_review"];
    assert_eq!(examples[0]["id"], "d2");
    assert_eq!(examples[0]["before"]["rationale"], "old rationale for d2");
    assert!(examples[0]["excerpt"].as_str().unwrap().contains("lunch"));
    assert!(std::fs::read_to_string(&html).expect("html written").contains("<html"));
}

#[test]
fn unknown_policy_name_and_empty_database_are_clear_errors() {
    let f = fixture();
    let unknown = backtest(&f, &f.hate.with_file_name("missing.md"), &f.database);
    assert!(!unknown.status.success());

    let other_name = f._dir.path().join("violence.md");
    std::fs::write(&other_name, HATE.replace("name: hate", "name: violence")).unwrap();
    let output = backtest(&f, &other_name, &f.database);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no stored decision judged a policy named `violence`"), "{stderr}");

    let output = backtest(&f, &f.policy, &f.empty_database);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("holds no decisions"), "{stderr}");

    // Decisions there are, but every one passed over: the reasons are said, not "no items".
    let judged = f._dir.path().join("judged.db");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let store = Store::open_sqlite(&judged).await.expect("open store");
        let d = under_the_new_version(decision("j1", now_ms() - 1_000, "spam", Some(true), "FREE PILLS"));
        store.insert_decision(&d, None).await.expect("insert");
        store.close().await;
    });
    let output = backtest(&f, &f.policy, &format!("sqlite://{}", judged.display()));
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("passed over (1 already judged under this version)"), "{stderr}");
}

#[test]
fn dataset_mode_compares_against_labels_or_a_baseline_version() {
    let f = fixture();
    let data = f._dir.path().join("data.jsonl");
    let lines = [
        json!({"id": "a", "text": "BUY NOW cheap watches", "violates": 1}),
        json!({"id": "b", "text": "meeting moved to 3pm", "violates": 0}),
        json!({"id": "c", "text": "free crypto, click here", "violates": 1}),
        json!({"id": "d", "text": "thanks for the notes", "violates": 0}),
        // Unlabelled: nothing to compare with but another version.
        json!({"id": "e", "text": "see you at lunch", "violates": null}),
    ];
    std::fs::write(&data, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let old = f._dir.path().join("spam-v1.md");
    std::fs::write(&old, NEW_SPAM.replace(", including affiliate links", "")).unwrap();
    let run = |extra: &[&Path]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_safeguard"));
        command.args(["policy", "backtest", "--policy"]).arg(&f.policy).arg("--dataset").arg(&data);
        if let [baseline] = extra {
            command.arg("--baseline-policy").arg(baseline);
        }
        command.arg("--model").arg(&f.model);
        command.args(["--effort", "low", "--max-tokens", "8", "--threads", "2", "--format", "json"]);
        let output = command.output().expect("run safeguard");
        let stderr = String::from_utf8_lossy(&output.stderr).to_string();
        assert!(output.status.success(), "stderr: {stderr}");
        (serde_json::from_slice::<Value>(&output.stdout).expect("json report"), stderr)
    };

    // Against the labels: every right answer lost to needs_review is a regression. The unlabelled item is left out
    // before the model is asked, and said so.
    let (report, stderr) = run(&[]);
    assert_eq!(report["items"], 4, "{report:#}");
    assert!(stderr.contains("left out 1 item(s) with no label for spam"), "{stderr}");
    assert_eq!(report["flips"], json!({"violation->needs_review": 2, "allow->needs_review": 2}));
    assert_eq!(report["comparison"]["broken"], 4);
    assert_eq!(report["comparison"]["common_items"], 4);

    // Against the old version on the same random model: both undecided, nothing flips; every item counts.
    let (report, _) = run(&[&old]);
    assert_eq!(report["items"], 5, "{report:#}");
    assert_eq!(report["unchanged"], 5);
    assert_eq!(report["flips"], json!({}));
    assert_eq!(report["before"], json!({"needs_review": 5}));
}

/// A dataset whose fields are named otherwise is read with `eval`'s field flags, which its errors point to.
#[test]
fn dataset_mode_reads_fields_as_eval_does() {
    let f = fixture();
    let data = f._dir.path().join("named.jsonl");
    let lines = [
        json!({"uid": "a", "message": "BUY NOW cheap watches", "gold": "spam"}),
        json!({"uid": "b", "message": "meeting moved to 3pm", "gold": "ham"}),
    ];
    std::fs::write(&data, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let run = |fields: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_safeguard"))
            .args(["policy", "backtest", "--policy"])
            .arg(&f.policy)
            .arg("--dataset")
            .arg(&data)
            .args(fields)
            .arg("--model")
            .arg(&f.model)
            .args(["--effort", "low", "--max-tokens", "8", "--threads", "2", "--format", "json"])
            .output()
            .expect("run safeguard")
    };
    let refused = run(&[]);
    assert!(!refused.status.success());
    let fields = ["--id-field", "uid", "--text-field", "message", "--label-field", "gold", "--positive-label", "spam"];
    let output = run(&fields);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).expect("json report");
    assert_eq!(report["items"], 2, "{report:#}");
}

/// The store lists at most 1000 decisions at a time: a larger --limit is refused, not quietly cut short.
#[test]
fn a_limit_beyond_one_page_of_stored_decisions_is_refused() {
    let f = fixture();
    let output = Command::new(env!("CARGO_BIN_EXE_safeguard"))
        .args(["policy", "backtest", "--policy"])
        .arg(&f.policy)
        .args(["--database", &f.database, "--model"])
        .arg(&f.model)
        .args(["--limit", "1500"])
        .output()
        .expect("run safeguard");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("at most 1000"), "{stderr}");
}

/// An item the model cannot judge (here its prompt overflows the context) is no verdict on the policy: it is
/// listed as failed, no flip is counted for it, and the run does not pass.
/// `policy backtest --dataset` on `rows` (written to mixed.jsonl) with a 256-token context, which a long row does
/// not fit.
fn backtest_rows_in_a_short_context(f: &Fixture, rows: &[Value]) -> Output {
    let data = f._dir.path().join("mixed.jsonl");
    std::fs::write(&data, rows.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    Command::new(env!("CARGO_BIN_EXE_safeguard"))
        .args(["policy", "backtest", "--policy"])
        .arg(&f.policy)
        .arg("--dataset")
        .arg(&data)
        .arg("--model")
        .arg(&f.model)
        .args(["--effort", "low", "--max-tokens", "8", "--threads", "2", "--context", "256", "--format", "json"])
        .output()
        .expect("run safeguard")
}

#[test]
fn items_the_model_could_not_judge_are_failures_not_flips() {
    let f = fixture();
    let lines = [
        json!({"id": "short", "text": "meeting moved to 3pm", "violates": 0}),
        json!({"id": "long", "text": "buy cheap watches now ".repeat(200), "violates": 1}),
        json!({"id": "blank", "text": null, "violates": 1}),
    ];
    let output = backtest_rows_in_a_short_context(&f, &lines);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("2 item(s) could not be judged"), "{stderr}");
    let report: Value = serde_json::from_slice(&output.stdout).expect("json report");
    assert_eq!(report["items"], 1, "{report:#}");
    let failed = report["failed"].as_array().unwrap();
    assert!(matches!(failed.as_slice(), [blank, long] if long[0] == "long" && blank[0] == "blank"), "{report:#}");
    assert!(failed[1][1].as_str().unwrap().contains("does not fit"), "{report:#}");
    assert!(failed[0][1].as_str().unwrap().contains("mixed.jsonl:3"), "a row without text was judged: {report:#}");
}

#[test]
fn a_backtest_where_no_item_could_be_judged_says_why() {
    let f = fixture();
    let lines = [json!({"id": "long", "text": "buy cheap watches now ".repeat(200), "violates": 1})];
    let output = backtest_rows_in_a_short_context(&f, &lines);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("no item could be judged under the new version (1 failed"), "{stderr}");
    assert!(stderr.contains("long: ") && stderr.contains("does not fit"), "the cause is not shown: {stderr}");
}

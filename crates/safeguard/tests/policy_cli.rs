//! `safeguard policy` end to end: the real binary on the shipped starter library and on a broken policy.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

const EXIT_FINDINGS: i32 = 2;

fn safeguard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_safeguard")).args(args).output().expect("run safeguard")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn starter_file(name: &str) -> String {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "..", "..", "policies", name].iter().collect();
    path.to_str().unwrap().to_string()
}

const BROKEN: &str = "---\noutput: binary\n---\n# Broken Policy\n## Rules\n- BR1.a Posts that usually insult.\n\
                      - BR1.a Posts that might be rude.\n## Examples\n- \"you are dumb\" (BR9.z)\n";

#[test]
fn lint_passes_the_starter_library() {
    let files: Vec<String> =
        ["spam.md", "hate.md", "sexual.md", "prompt-injection.md"].iter().map(|name| starter_file(name)).collect();
    let mut args = vec!["policy", "lint"];
    args.extend(files.iter().map(String::as_str));
    let output = safeguard(&args);
    let text = stdout(&output);
    assert!(output.status.success(), "{text}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(text.contains("0 error(s), 0 warning(s); 0 of 4 file(s) failed"), "{text}");
    assert!(text.contains("spam sha256:"), "{text}");
}

#[test]
fn lint_fails_a_broken_policy_with_located_findings() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.md");
    std::fs::write(&path, BROKEN).unwrap();
    let path = path.to_str().unwrap();

    let output = safeguard(&["policy", "lint", path]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(EXIT_FINDINGS), "{text}");
    assert!(text.contains(&format!("{path}:7: error[duplicate-rule-id]")), "{text}");
    assert!(text.contains(&format!("{path}:6: warning[hedge-word]")), "{text}");
    assert!(text.contains("error[missing-instructions]"), "{text}");
    assert!(text.contains("error[undefined-rule-id]: rule id BR9.z"), "{text}");

    let output = safeguard(&["policy", "lint", "--format", "json", path, &starter_file("spam.md")]);
    assert_eq!(output.status.code(), Some(EXIT_FINDINGS));
    let reports: Value = serde_json::from_str(&stdout(&output)).unwrap();
    let broken = &reports[0];
    assert_eq!(broken["path"], path);
    let codes: Vec<&str> = broken["findings"].as_array().unwrap().iter().map(|f| f["code"].as_str().unwrap()).collect();
    assert!(codes.contains(&"duplicate-rule-id") && codes.contains(&"no-escalation-path"), "{codes:?}");
    assert_eq!(reports[1]["findings"].as_array().unwrap().len(), 0);
    assert!(reports[1]["tokens"].as_u64().unwrap() >= 400);
    assert_eq!(reports[1]["tokens_exact"], true);

    // A tight token limit turns the starter policy into an error.
    let output = safeguard(&["policy", "lint", "--max-tokens", "100", &starter_file("spam.md")]);
    assert_eq!(output.status.code(), Some(EXIT_FINDINGS));
    assert!(stdout(&output).contains("error[too-long]"));
}

/// The server reads a policy's `triage:` and `routing:` front matter; lint refuses a section it could not read (a
/// misspelt key, an effort that does not exist), which the server would refuse at upload.
#[test]
fn lint_checks_the_triage_and_routing_sections() {
    let dir = tempfile::tempdir().unwrap();
    let spam = std::fs::read_to_string(starter_file("spam.md")).unwrap();
    let with_triage = |section: &str| spam.replacen("---\n", &format!("---\ntriage:\n{section}\n"), 1);

    let good = dir.path().join("good.md");
    std::fs::write(&good, with_triage("  on_violation: review")).unwrap();
    let output = safeguard(&["policy", "lint", good.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stdout(&output));

    let misspelt = dir.path().join("misspelt.md");
    std::fs::write(&misspelt, with_triage("  on_violaton: review")).unwrap();
    let output = safeguard(&["policy", "lint", misspelt.to_str().unwrap()]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(EXIT_FINDINGS), "{text}");
    assert!(text.contains("error[triage-section]") && text.contains("on_violaton"), "{text}");

    let with_routing = |section: &str| spam.replacen("---\n", &format!("---\nrouting:\n{section}\n"), 1);
    let careful = dir.path().join("careful.md");
    std::fs::write(&careful, with_routing("  first_effort: medium\n  min_engine_confidence: 0.8")).unwrap();
    let output = safeguard(&["policy", "lint", careful.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stdout(&output));

    let extreme = dir.path().join("extreme.md");
    std::fs::write(&extreme, with_routing("  first_effort: extreme")).unwrap();
    let output = safeguard(&["policy", "lint", extreme.to_str().unwrap()]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(EXIT_FINDINGS), "{text}");
    assert!(text.contains("error[routing-section]") && text.contains("extreme"), "{text}");
}

#[test]
fn lint_reports_unparseable_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let unclosed = dir.path().join("unclosed.md");
    std::fs::write(&unclosed, "---\nname: x\n# P\n").unwrap();
    let output = safeguard(&["policy", "lint", unclosed.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(EXIT_FINDINGS));
    assert!(stdout(&output).contains(":1: error[parse-error]"), "{}", stdout(&output));

    let output = safeguard(&["policy", "lint", dir.path().join("missing.md").to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("missing.md"));
}

#[test]
fn hash_show_and_starter() {
    let spam = starter_file("spam.md");
    let output = safeguard(&["policy", "hash", &spam]);
    assert!(output.status.success());
    let id = stdout(&output).trim().to_string();
    assert!(id.starts_with("sha256:") && id.len() == 7 + 64, "{id}");

    let output = safeguard(&["policy", "show", "--format", "json", &spam]);
    assert!(output.status.success());
    let shown: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(shown["hash"], id.as_str());
    assert_eq!(shown["meta"]["name"], "spam");
    assert_eq!(shown["meta"]["output"]["format"], "binary");
    assert!(shown["rule_ids"].as_array().unwrap().iter().any(|id| id == "SP4.a"));

    let output = safeguard(&["policy", "show", &spam]);
    assert!(stdout(&output).contains("output:      binary"), "{}", stdout(&output));

    let listing = stdout(&safeguard(&["policy", "starter"]));
    assert_eq!(listing.lines().count(), 7, "{listing}");
    assert!(listing.contains("self-harm") && listing.contains(&id[7..19]), "{listing}");

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lib");
    let output = safeguard(&["policy", "starter", "--out", out.to_str().unwrap()]);
    assert!(output.status.success());
    assert_eq!(std::fs::read_to_string(out.join("spam.md")).unwrap(), std::fs::read_to_string(&spam).unwrap());
    assert!(out.join("sexual.tests.jsonl").exists());
    let again = safeguard(&["policy", "starter", "--out", out.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(1), "refuses to overwrite without --force");
    assert!(safeguard(&["policy", "starter", "--out", out.to_str().unwrap(), "--force"]).status.success());
    // Written through a partial file renamed into place: the policy is whole, and nothing else is left beside it.
    assert_eq!(std::fs::read_to_string(out.join("spam.md")).unwrap(), std::fs::read_to_string(&spam).unwrap());
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 14, "{names:?}");
    assert!(names.iter().all(|name| !name.contains(".partial")), "{names:?}");
}

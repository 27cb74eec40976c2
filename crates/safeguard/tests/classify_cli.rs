//! `safeguard classify` end to end: the real binary, the real llama.cpp engine, a tiny random-weight model.
//!
//! The model writes garbage, so the assertions are about what must hold whatever it writes.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

use safeguard_harmony::{Content, Effort, PromptOptions, render_prompt};
use safeguard_policy::Policy;
use serde_json::Value;

const POLICY: &str = "---\nname: spam\noutput: binary\n---\n# Spam\n\n## INSTRUCTIONS\nReturn exactly one character: 0 or 1.\n\n\
                      ## VIOLATES (1)\nUnsolicited promotion.\n\n## SAFE (0)\nEverything else.\n";

struct Fixture {
    dir: tempfile::TempDir,
    model: PathBuf,
    policy: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let model = dir.path().join("tiny.gguf");
        safeguard_gguf::write_tiny_model(&model, &safeguard_gguf::TinyConfig::with_seed(11)).expect("tiny model");
        let policy = dir.path().join("spam.md");
        std::fs::write(&policy, POLICY).expect("write policy");
        Fixture { dir, model, policy }
    })
}

fn safeguard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_safeguard")).args(args).output().expect("run safeguard")
}

fn classify(extra: &[&str]) -> Output {
    let f = fixture();
    let mut args = vec![
        "classify",
        "--policy",
        f.policy.to_str().unwrap(),
        "--model",
        f.model.to_str().unwrap(),
        "--effort",
        "low",
        "--max-tokens",
        "8",
        "--threads",
        "2",
        "--context",
        "1024",
    ];
    args.extend_from_slice(extra);
    safeguard(&args)
}

fn records(output: &Output) -> Vec<Value> {
    String::from_utf8(output.stdout.clone())
        .expect("stdout is UTF-8")
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn write_input(name: &str, bytes: &[u8]) -> PathBuf {
    let path = fixture().dir.path().join(name);
    std::fs::write(&path, bytes).expect("write input");
    path
}

fn prompt_len(content: &Content) -> usize {
    let policy = Policy::parse(POLICY).unwrap();
    render_prompt(&policy.body, content, &PromptOptions { effort: Effort::Low, date: None }).unwrap().tokens.len()
}

fn assert_undecided_is_not_allowed(record: &Value) {
    let undecided = record["verdicts"].as_array().unwrap().iter().any(|v| v["violation"].is_null());
    if undecided {
        assert_eq!(record["outcome"], "needs_review", "{record}");
    }
    assert_ne!(record["outcome"], "allow", "a random model's garbage must not be an allow: {record}");
}

#[test]
fn a_file_of_items_keeps_ids_reports_bad_lines_and_caches_the_policy() {
    let mut input = Vec::new();
    input.extend_from_slice(br#"{"id":"a","text":"BUY CHEAP WATCHES NOW"}"#);
    input.push(b'\n');
    input.extend_from_slice(b"{\"id\":\"bad-json\",\"text\":\n");
    input.extend_from_slice(
        br#"{"id":"b","messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"hello!"}]}"#,
    );
    input.push(b'\n');
    input.extend_from_slice(b"{\"id\":\"bad-utf8\",\"text\":\"\xff\"}\n");
    input.extend_from_slice(br#"{"id":"c","prompt":"What is 2+2?","response":"4"}"#);
    input.push(b'\n');
    let path = write_input("items.jsonl", &input);

    let output = classify(&["--input", path.to_str().unwrap(), "--batch", "2"]);
    assert_eq!(output.status.code(), Some(1), "bad lines make the run fail; stderr: {}", stderr(&output));
    let records = records(&output);
    let ids: Vec<&str> = records.iter().map(|r| r["id"].as_str().unwrap_or("<none>")).collect();
    assert_eq!(ids, ["a", "<none>", "b", "bad-utf8", "c"], "output keeps input order and ids");

    assert!(records[1]["error"].as_str().unwrap().contains("invalid JSON"), "{}", records[1]);
    assert_eq!(records[1]["line"], 2);
    assert!(records[3]["error"].as_str().unwrap().contains("UTF-8"), "{}", records[3]);

    let contents = [
        Content::text("BUY CHEAP WATCHES NOW"),
        Content::Conversation {
            messages: vec![
                safeguard_harmony::ChatMessage::new("user", "hi"),
                safeguard_harmony::ChatMessage::new("assistant", "hello!"),
            ],
        },
        Content::Response { prompt: Some("What is 2+2?".into()), response: "4".into() },
    ];
    let decided: Vec<&Value> = records.iter().filter(|r| r.get("error").is_none()).collect();
    assert_eq!(decided.len(), 3);
    for (i, (record, content)) in decided.iter().zip(&contents).enumerate() {
        assert_undecided_is_not_allowed(record);
        let usage = &record["usage"];
        assert_eq!(usage["prompt_tokens"].as_u64().unwrap() as usize, prompt_len(content), "item {i}");
        let completion = usage["completion_tokens"].as_u64().unwrap();
        assert!((1..=8).contains(&completion), "item {i}: {usage}");
        if i > 0 {
            assert!(usage["cached_prompt_tokens"].as_u64().unwrap() > 0, "item {i}: policy prefix cached: {usage}");
        }
        let verdict = &record["verdicts"][0];
        assert_eq!(verdict["policy"], "spam");
        assert!(verdict["policy_hash"].as_str().unwrap().starts_with("sha256:"));
        assert!(verdict["rule_ids"].is_array() && verdict["flags"].is_array(), "{verdict}");
        assert!(record["timings"]["total_ms"].is_number());
        assert!(record.get("reasoning").is_none(), "reasoning only when asked");
    }
}

#[test]
fn text_input_gives_one_record_and_needs_review_exit() {
    let output = classify(&["--text", "Enter your password at http://x.co", "--show-reasoning"]);
    let records = records(&output);
    assert_eq!(records.len(), 1, "stderr: {}", stderr(&output));
    let record = &records[0];
    assert!(record["id"].is_null());
    assert_undecided_is_not_allowed(record);
    assert!(record["reasoning"].is_array(), "--show-reasoning keeps the reasoning: {record}");
    let expected = match record["outcome"].as_str().unwrap() {
        "needs_review" => 3,
        "violation" => 2,
        other => panic!("unexpected outcome {other}"),
    };
    assert_eq!(output.status.code(), Some(expected));
}

#[test]
fn stdin_and_combined_mode_work() {
    let f = fixture();
    let second = f.dir.path().join("scam.md");
    std::fs::write(&second, POLICY.replace("name: spam", "name: scam")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_safeguard"))
        .args(["classify", "--policy", f.policy.to_str().unwrap(), "--policy", second.to_str().unwrap()])
        .args(["--model", f.model.to_str().unwrap(), "--mode", "combined", "--max-tokens", "8", "--threads", "2"])
        // A CPU build takes the offload flag and runs every layer on the CPU.
        .args(["--context", "1024", "--gpu-layers", "99", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn safeguard");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"{\"id\":1,\"text\":\"hello\"}\n").unwrap();
    }
    let output = child.wait_with_output().unwrap();
    let records = records(&output);
    assert_eq!(records.len(), 1, "stderr: {}", stderr(&output));
    assert_eq!(records[0]["id"], "1");
    assert_eq!(records[0]["mode"], "combined");
    let policies: Vec<&str> =
        records[0]["verdicts"].as_array().unwrap().iter().map(|v| v["policy"].as_str().unwrap()).collect();
    assert_eq!(policies, ["spam", "scam"]);
    assert_eq!(records[0]["prompts"].as_array().unwrap().len(), 1, "one prompt for both policies");
    assert_undecided_is_not_allowed(&records[0]);
}

#[test]
fn bad_policies_and_inputs_fail_clearly() {
    let f = fixture();
    let missing = f.dir.path().join("nope.md");
    let output = safeguard(&[
        "classify",
        "--policy",
        missing.to_str().unwrap(),
        "--model",
        f.model.to_str().unwrap(),
        "--text",
        "x",
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("nope.md"), "{}", stderr(&output));

    let empty = write_input("empty-policy.md", b"---\nname: empty\n---\n");
    let output = safeguard(&[
        "classify",
        "--policy",
        empty.to_str().unwrap(),
        "--model",
        f.model.to_str().unwrap(),
        "--text",
        "x",
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("empty-policy.md"), "{}", stderr(&output));

    let output = classify(&["--input", f.dir.path().join("no-such-input.jsonl").to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("no-such-input.jsonl"), "{}", stderr(&output));

    // Nothing judged is not "all allowed".
    let blank = write_input("blank.jsonl", b"\n  \n");
    let output = classify(&["--input", blank.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("held no items"), "{}", stderr(&output));

    // A prompt the engine could not run (longer than the context) leaves the item unjudged: a failure.
    let (policy, model) = (f.policy.to_str().unwrap(), f.model.to_str().unwrap());
    let long = "hello there ".repeat(300);
    let output = safeguard(&["classify", "--policy", policy, "--model", model, "--context", "256", "--text", &long]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("could not be classified"), "{}", stderr(&output));

    let output = classify(&["--text", &"x".repeat(50), "--max-chars", "10"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("limit is 10"), "{}", stderr(&output));

    let output = classify(&["--text", "x", "--date", "2025-13-45"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("2025-13-45"), "{}", stderr(&output));
}

#[test]
fn policy_test_runs_the_golden_cases_and_fails_undecided_ones() {
    let f = fixture();
    let dir = f.dir.path().join("golden");
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("spam.md");
    std::fs::write(&policy, POLICY).unwrap();
    std::fs::write(
        dir.join("spam.tests.jsonl"),
        "{\"id\":\"promo\",\"text\":\"BUY NOW\",\"expected\":\"violation\"}\n\
         {\"id\":\"hello\",\"text\":\"hi Sam\",\"expected\":\"allow\"}\n",
    )
    .unwrap();
    let engine = ["--model", f.model.to_str().unwrap(), "--max-tokens", "6", "--threads", "2", "--context", "1024"];

    let mut args = vec!["policy", "test", policy.to_str().unwrap()];
    args.extend_from_slice(&engine);
    let output = safeguard(&args);
    let report = String::from_utf8_lossy(&output.stdout);
    // A random model never produces a valid answer, so both cases come out undecided and fail.
    assert_eq!(output.status.code(), Some(2), "stdout: {report}\nstderr: {}", stderr(&output));
    assert!(report.contains("spam") && report.contains("0/2 passed"), "{report}");
    assert!(report.contains("FAIL promo: expected violation, got needs_review"), "{report}");

    args.push("--json");
    let output = safeguard(&args);
    let records = records(&output);
    assert_eq!(records.len(), 2, "stderr: {}", stderr(&output));
    assert_eq!(records[1]["id"], "hello");
    assert_eq!(records[1]["expected"], "allow");
    assert_eq!(records[1]["passed"], false);

    let lonely = dir.join("lonely.md");
    std::fs::write(&lonely, POLICY).unwrap();
    let mut args = vec!["policy", "test", lonely.to_str().unwrap()];
    args.extend_from_slice(&engine);
    let output = safeguard(&args);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("lonely.tests.jsonl"), "{}", stderr(&output));
}

fn file_names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn output_is_replaced_only_when_the_run_completes() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, b"{\"id\":\"a\",\"text\":\"hello\"}\n").unwrap();
    let out = dir.path().join("out.jsonl");
    std::fs::write(&out, b"the previous run's results\n").unwrap();
    let (policy, input_arg, out_arg) = (f.policy.to_str().unwrap(), input.to_str().unwrap(), out.to_str().unwrap());

    // The run fails after its arguments are read: the earlier results must survive it.
    let missing = dir.path().join("no-such-model.gguf");
    let output = safeguard(&[
        "classify",
        "--policy",
        policy,
        "--model",
        missing.to_str().unwrap(),
        "--input",
        input_arg,
        "--output",
        out_arg,
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("left as it was"), "{}", stderr(&output));
    assert_eq!(std::fs::read(&out).unwrap(), b"the previous run's results\n", "a failed run must not touch --output");
    assert_eq!(file_names(dir.path()), ["in.jsonl", "out.jsonl"], "an empty partial file is not left behind");

    let output = classify(&["--input", input_arg, "--output", out_arg]);
    assert!(output.status.code().is_some_and(|code| code >= 2), "{}", stderr(&output));
    assert!(output.stdout.is_empty(), "the records go to --output");
    let written = std::fs::read_to_string(&out).unwrap();
    let records: Vec<Value> = written.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(records.len(), 1, "{written}");
    assert_eq!(records[0]["id"], "a");
    assert_eq!(file_names(dir.path()), ["in.jsonl", "out.jsonl"]);
}

#[test]
fn output_naming_the_input_is_refused_and_the_input_kept() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("items.jsonl");
    let items = b"{\"id\":\"a\",\"text\":\"hello\"}\n";
    std::fs::write(&input, items).unwrap();
    let mut same = vec![input.clone(), dir.path().join(".").join("items.jsonl")];
    #[cfg(unix)]
    {
        let link = dir.path().join("hard-link.jsonl");
        std::fs::hard_link(&input, &link).unwrap();
        same.push(link);
    }
    for output_path in &same {
        let output = classify(&["--input", input.to_str().unwrap(), "--output", output_path.to_str().unwrap()]);
        assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
        assert!(stderr(&output).contains("is the input file"), "{}", stderr(&output));
        assert_eq!(std::fs::read(&input).unwrap(), items, "--output {} destroyed the input", output_path.display());
    }
}

/// A line with no end must be refused by the reader's line limit, not held whole by anything before it (the
/// progress bar's line count once was). Memory is capped so that holding the line fails the run.
#[cfg(target_os = "linux")]
#[test]
fn a_runaway_line_is_refused_without_being_held() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("one-huge-line.jsonl");
    // Sparse: 1.5 GiB of NUL bytes and no newline, more than the memory cap below, without the disk it names.
    std::fs::File::create(&input).unwrap().set_len(3 << 29).unwrap();
    let f = fixture();
    let output = Command::new("sh")
        .arg("-c")
        // 1 GiB of data: room for the tiny model's buffers, not for the line.
        .arg("ulimit -d 1048576 && exec \"$@\"")
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_safeguard"))
        .args(["classify", "--policy", f.policy.to_str().unwrap(), "--model", f.model.to_str().unwrap()])
        .args(["--threads", "2", "--context", "1024", "--progress", "--input", input.to_str().unwrap()])
        .output()
        .expect("run safeguard");
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let records = records(&output);
    assert_eq!(records.len(), 1, "{}", stderr(&output));
    assert!(records[0]["error"].as_str().unwrap().contains("the line is over"), "{}", records[0]);
    assert!(stderr(&output).contains("classified 1/1 lines"), "the line was counted: {}", stderr(&output));
}

/// Counting lines for the progress display reads the input twice; a pipe read twice loses its items.
#[cfg(unix)]
#[test]
fn a_named_pipe_input_is_not_consumed_by_the_progress_count() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("items.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("run mkfifo");
    assert!(made.success());
    let writer = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut pipe = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
            pipe.write_all(b"{\"id\":\"a\",\"text\":\"hello\"}\n").unwrap();
            // Held open a moment, as a producer (`<(zcat …)`) would be, so a second reader can attach.
            std::thread::sleep(std::time::Duration::from_secs(1));
        })
    };
    let output = classify(&["--progress", "--input", fifo.to_str().unwrap()]);
    writer.join().unwrap();
    let records = records(&output);
    assert_eq!(records.len(), 1, "{}", stderr(&output));
    assert_eq!(records[0]["id"], "a");
}

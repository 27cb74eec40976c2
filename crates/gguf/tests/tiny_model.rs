use std::time::Instant;

use safeguard_gguf::vocab::{self, TOKEN_TYPE_CONTROL, TOKEN_TYPE_NORMAL};
use safeguard_gguf::{GgmlType, GgufFile, GptOssHparams, MetaArray, TinyConfig, write_tiny_model};

fn strings<'a>(file: &'a GgufFile, key: &str) -> &'a [String] {
    match file.get(key).and_then(|v| v.as_array()) {
        Some(MetaArray::String(v)) => v,
        other => panic!("{key}: {other:?}"),
    }
}

/// Apply GGUF merges GPT-2 style (lowest merge rank first) to one pre-tokenized piece.
fn gpt2_bpe(
    piece: &[u8],
    merges: &std::collections::HashMap<(String, String), usize>,
    table: &[char; 256],
) -> Vec<String> {
    let mut parts: Vec<String> = piece.iter().map(|&b| table[b as usize].to_string()).collect();
    loop {
        let best = (0..parts.len().saturating_sub(1))
            .filter_map(|i| merges.get(&(parts[i].clone(), parts[i + 1].clone())).map(|&r| (r, i)))
            .min();
        match best {
            Some((_, i)) => {
                let right = parts.remove(i + 1);
                parts[i].push_str(&right);
            }
            None => return parts,
        }
    }
}

#[test]
fn tiny_model_is_complete_deterministic_and_has_the_harmony_vocab() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let started = Instant::now();
    let info = write_tiny_model(&path, &TinyConfig::with_seed(42)).unwrap();
    eprintln!("tiny model written in {:?} ({} bytes)", started.elapsed(), info.file_bytes);

    let file = GgufFile::open(&path).unwrap();
    file.expect_architecture("gpt-oss").unwrap();
    assert_eq!(file.file_len(), info.file_bytes);
    let hp = GptOssHparams::from_gguf(&file).unwrap();
    assert_eq!(hp, info.hparams);
    assert_eq!((hp.n_embd, hp.n_layer, hp.n_head, hp.n_head_kv, hp.head_dim), (64, 2, 4, 2, 16));
    assert_eq!((hp.n_expert, hp.n_expert_used, hp.n_ff_exp), (4, 2, 64));
    assert_eq!(hp.yarn_factor, Some(32.0));
    assert_eq!(hp.context_length, 131_072);
    assert_eq!(file.tensors().len(), 2 + 19 * 2 + 1);
    assert_eq!(file.tensor("blk.1.ffn_down_exps.weight").unwrap().shape, vec![64, 64, 4]);
    assert_eq!(file.tensor("token_embd.weight").unwrap().shape, vec![64, 201_088]);

    // Vocabulary: real token texts, specials as CONTROL, ids per HF generation_config.
    let tokens = strings(&file, "tokenizer.ggml.tokens");
    assert_eq!(tokens.len(), vocab::VOCAB_SIZE);
    assert_eq!(tokens[200_006], "<|start|>");
    assert_eq!(tokens[200_012], "<|call|>");
    assert_eq!(tokens[201_087], "<|reserved_201087|>");
    let types = match file.get("tokenizer.ggml.token_type").and_then(|v| v.as_array()) {
        Some(MetaArray::I32(v)) => v.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(types[1000], TOKEN_TYPE_NORMAL);
    assert!(types[199_998..].iter().all(|&t| t == TOKEN_TYPE_CONTROL));
    assert_eq!(file.get_u32("tokenizer.ggml.bos_token_id").unwrap(), 199_998);
    assert_eq!(file.get_u32("tokenizer.ggml.eos_token_id").unwrap(), 200_002);
    assert_eq!(file.get_u32("tokenizer.ggml.padding_token_id").unwrap(), 199_999);
    assert_eq!(file.get_str("tokenizer.ggml.pre").unwrap(), "gpt-4o");

    // The merges, applied GPT-2 style, reproduce tiktoken's ids on every piece of a sample text.
    let merges = strings(&file, "tokenizer.ggml.merges");
    assert_eq!(merges.len(), vocab::FIRST_SPECIAL as usize - 256, "one merge per multi-byte ordinary token");
    let ranks: std::collections::HashMap<(String, String), usize> = merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let (a, b) = m.split_once(' ').unwrap();
            ((a.to_string(), b.to_string()), i)
        })
        .collect();
    let id_of: std::collections::HashMap<&str, u32> =
        tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i as u32)).collect();
    let table = vocab::byte_to_unicode();
    let bpe = tiktoken_rs::o200k_harmony().unwrap();
    let text = "Hello world! Ceci n'est pas une pipe. 日本語のテキスト, emojis 🤖🔥, code: fn main() { let x = 42; }\n\tTabs   and   spaces… supercalifragilisticexpialidocious";
    let expected = bpe.encode_ordinary(text);
    let mut got = Vec::new();
    for &id in &expected {
        // tiktoken's own pieces are what its pre-tokenizer produced; re-derive each via merges.
        let piece = bpe.decode_bytes(&[id]).unwrap();
        for part in gpt2_bpe(&piece, &ranks, &table) {
            got.push(id_of[part.as_str()]);
        }
    }
    assert_eq!(got, expected);

    // Determinism: the same seed gives the same bytes, another seed different weights.
    let again = dir.path().join("again.gguf");
    write_tiny_model(&again, &TinyConfig::with_seed(42)).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&again).unwrap());
    let other = dir.path().join("other.gguf");
    write_tiny_model(&other, &TinyConfig::with_seed(43)).unwrap();
    let other = GgufFile::open(&other).unwrap();
    assert_ne!(file.tensor_f32("blk.0.attn_q.weight").unwrap(), other.tensor_f32("blk.0.attn_q.weight").unwrap());

    // Weights are finite and on the intended scale.
    let q = file.tensor_f32("blk.0.attn_q.weight").unwrap();
    let std = (q.iter().map(|v| v * v).sum::<f32>() / q.len() as f32).sqrt();
    assert!((std - 0.125).abs() < 0.02, "attn_q std {std}");
    assert!(file.tensor_f32("output.weight").unwrap().iter().all(|v| v.is_finite()));
}

#[test]
fn tiny_model_with_mxfp4_experts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mx.gguf");
    let config = TinyConfig { expert_type: GgmlType::Mxfp4, dense_type: GgmlType::F16, ..TinyConfig::with_seed(1) };
    write_tiny_model(&path, &config).unwrap();
    let file = GgufFile::open(&path).unwrap();
    let gate = file.tensor("blk.0.ffn_gate_exps.weight").unwrap();
    assert_eq!(gate.ty(), Some(GgmlType::Mxfp4));
    assert_eq!(gate.n_bytes, 64 * 64 * 4 / 32 * 17);
    assert_eq!(file.tensor("blk.0.attn_k.weight").unwrap().ty(), Some(GgmlType::F16));
    assert_eq!(file.tensor("blk.0.attn_sinks.weight").unwrap().ty(), Some(GgmlType::F32));
    let values = file.tensor_f32("blk.0.ffn_gate_exps.weight").unwrap();
    assert_eq!(values.len(), 64 * 64 * 4);
    assert!(values.iter().any(|&v| v != 0.0));
}

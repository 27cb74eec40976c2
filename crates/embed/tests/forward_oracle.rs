//! The encoder forward pass against a numpy oracle (tests/oracle.py) on a tiny random BERT this test
//! writes itself (safetensors + config.json + vocab.txt), plus the load-time errors on broken models.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use safeguard_embed::{EmbedError, SentenceEncoder};
use serde_json::{Value, json};

const HIDDEN: usize = 32;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const INTERMEDIATE: usize = 64;
const MAX_POSITIONS: usize = 24;

const VOCAB: [&str; 24] = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "a", "dog", "##s", "ran", ".", ",",
    "!", "big", "##ger", "hello", "world", "é", "中", "?",
];
/// Larger than the tokenizer's vocabulary, as real checkpoints may be.
const MODEL_VOCAB: usize = 30;

/// SplitMix64 → uniform floats in [-scale, scale).
struct Rng(u64);
impl Rng {
    fn uniform(&mut self, scale: f32) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
    }
    fn tensor(&mut self, len: usize, center: f32, scale: f32) -> Vec<f32> {
        (0..len).map(|_| center + self.uniform(scale)).collect()
    }
}

fn tiny_tensors(seed: u64) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let mut rng = Rng(seed);
    let mut t = BTreeMap::new();
    let mut put = |name: String, shape: Vec<usize>, center: f32, scale: f32, rng: &mut Rng| {
        let len = shape.iter().product();
        t.insert(name, (shape, rng.tensor(len, center, scale)));
    };
    put("embeddings.word_embeddings.weight".into(), vec![MODEL_VOCAB, HIDDEN], 0.0, 1.0, &mut rng);
    put("embeddings.position_embeddings.weight".into(), vec![MAX_POSITIONS, HIDDEN], 0.0, 0.5, &mut rng);
    put("embeddings.token_type_embeddings.weight".into(), vec![2, HIDDEN], 0.0, 0.5, &mut rng);
    put("embeddings.LayerNorm.weight".into(), vec![HIDDEN], 1.0, 0.2, &mut rng);
    put("embeddings.LayerNorm.bias".into(), vec![HIDDEN], 0.0, 0.1, &mut rng);
    // Weights large enough that attention is far from uniform and GELU sees both signs.
    let linear = |input: usize| 2.0 / (input as f32).sqrt();
    for l in 0..LAYERS {
        let p = format!("encoder.layer.{l}");
        for part in ["query", "key", "value"] {
            put(format!("{p}.attention.self.{part}.weight"), vec![HIDDEN, HIDDEN], 0.0, linear(HIDDEN), &mut rng);
            put(format!("{p}.attention.self.{part}.bias"), vec![HIDDEN], 0.0, 0.1, &mut rng);
        }
        put(format!("{p}.attention.output.dense.weight"), vec![HIDDEN, HIDDEN], 0.0, linear(HIDDEN), &mut rng);
        put(format!("{p}.attention.output.dense.bias"), vec![HIDDEN], 0.0, 0.1, &mut rng);
        put(format!("{p}.attention.output.LayerNorm.weight"), vec![HIDDEN], 1.0, 0.2, &mut rng);
        put(format!("{p}.attention.output.LayerNorm.bias"), vec![HIDDEN], 0.0, 0.1, &mut rng);
        put(format!("{p}.intermediate.dense.weight"), vec![INTERMEDIATE, HIDDEN], 0.0, linear(HIDDEN), &mut rng);
        put(format!("{p}.intermediate.dense.bias"), vec![INTERMEDIATE], 0.0, 0.1, &mut rng);
        put(format!("{p}.output.dense.weight"), vec![HIDDEN, INTERMEDIATE], 0.0, linear(INTERMEDIATE), &mut rng);
        put(format!("{p}.output.dense.bias"), vec![HIDDEN], 0.0, 0.1, &mut rng);
        put(format!("{p}.output.LayerNorm.weight"), vec![HIDDEN], 1.0, 0.2, &mut rng);
        put(format!("{p}.output.LayerNorm.bias"), vec![HIDDEN], 0.0, 0.1, &mut rng);
    }
    // Checkpoints carry a pooler the sentence pipeline never uses.
    put("pooler.dense.weight".into(), vec![HIDDEN, HIDDEN], 0.0, 0.1, &mut rng);
    t
}

/// The safetensors layout: u64 LE header length, JSON header (padded to 8 bytes), raw LE data.
fn safetensors_bytes(tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, (shape, values)) in tensors {
        let start = data.len();
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        header.insert(name.clone(), json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}));
    }
    let mut header = serde_json::to_vec(&Value::Object(header)).unwrap();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header);
    out.extend(data);
    out
}

fn config(hidden_act: &str) -> Value {
    json!({
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": MODEL_VOCAB,
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "intermediate_size": INTERMEDIATE,
        "hidden_act": hidden_act,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": MAX_POSITIONS,
        "type_vocab_size": 2,
        "position_embedding_type": "absolute"
    })
}

fn write_tiny_model(dir: &Path, tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>, hidden_act: &str) {
    std::fs::write(dir.join("model.safetensors"), safetensors_bytes(tensors)).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config(hidden_act)).unwrap()).unwrap();
    std::fs::write(dir.join("vocab.txt"), VOCAB.join("\n") + "\n").unwrap();
}

const SENTENCES: [&str; 6] = [
    "The cat sat on the mat.",
    "Dogs ran!",
    "hello",
    "",
    "a bigger dog, a bigger cat? é 中 the big cats sat on the big mats and the dogs ran on and on.",
    "unknown words here",
];

#[test]
fn forward_matches_numpy_oracle_on_a_tiny_random_bert() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), &tiny_tensors(0x5afe_e3bd), "gelu");
    let encoder = SentenceEncoder::load(dir.path()).unwrap();
    assert_eq!(encoder.max_seq(), MAX_POSITIONS, "max_seq is clamped to the position table");
    assert_eq!(encoder.dim(), HIDDEN);

    let ids: Vec<Vec<u32>> = SENTENCES.iter().map(|s| encoder.encode_ids(s)).collect();
    assert_eq!(ids[0], vec![2, 5, 6, 7, 8, 5, 9, 14, 3]);
    assert_eq!(ids[4].len(), MAX_POSITIONS, "the long sentence is truncated to the position table");
    assert_eq!(ids[5], vec![2, 1, 1, 1, 3]);

    let batched = encoder.embed_batch(&SENTENCES);
    for (text, embedding) in SENTENCES.iter().zip(&batched) {
        let norm: f32 = embedding.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{text:?} has norm {norm}");
        // Stacking sequences in one batch must not leak attention between them.
        let alone = encoder.embed(text);
        let worst = alone.iter().zip(embedding).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(worst < 1e-5, "{text:?}: batched and single differ by {worst}");
    }
    assert!(safeguard_embed::cosine(&batched[0], &batched[1]) < 0.999, "distinct inputs, distinct embeddings");

    if let Err(why) = common::python_has("numpy") {
        eprintln!("SKIPPING the numpy comparison: {why}");
        return;
    }
    let oracle = common::run_oracle("forward", dir.path(), &json!(ids));
    let worst = common::max_abs_diff(&batched, &oracle);
    eprintln!("tiny BERT: max |ours - numpy| = {worst:e}");
    assert!(worst <= 1e-4, "max |Δ| = {worst}");
}

#[test]
fn broken_models_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = tiny_tensors(1);
    write_tiny_model(dir.path(), &tensors, "gelu_new");
    assert!(
        matches!(SentenceEncoder::load(dir.path()), Err(EmbedError::UnsupportedConfig(ref m)) if m.contains("gelu_new"))
    );

    tensors.get_mut("encoder.layer.1.output.dense.weight").unwrap().0 = vec![INTERMEDIATE, HIDDEN];
    write_tiny_model(dir.path(), &tensors, "gelu");
    let err = SentenceEncoder::load(dir.path()).err().expect("a transposed weight is refused");
    assert!(matches!(err, EmbedError::TensorShape { ref name, .. } if name == "encoder.layer.1.output.dense.weight"));

    tensors.remove("encoder.layer.0.attention.self.key.bias");
    write_tiny_model(dir.path(), &tensors, "gelu");
    let err = SentenceEncoder::load(dir.path()).err().expect("a missing tensor is refused");
    assert!(matches!(err, EmbedError::MissingTensor { ref name } if name == "encoder.layer.0.attention.self.key.bias"));

    std::fs::write(dir.path().join("model.safetensors"), b"not a safetensors file").unwrap();
    assert!(matches!(SentenceEncoder::load(dir.path()), Err(EmbedError::Safetensors { .. })));

    let empty = tempfile::tempdir().unwrap();
    let err = SentenceEncoder::locate(Some(empty.path())).err().expect("an empty directory is no model");
    assert!(err.to_string().contains("missing config.json, model.safetensors, vocab.txt"), "{err}");

    write_tiny_model(dir.path(), &tiny_tensors(2), "gelu");
    let encoder = SentenceEncoder::load(dir.path()).unwrap();
    assert!(matches!(
        encoder.model().embed_ids(&[vec![2, MODEL_VOCAB as u32, 3]]),
        Err(EmbedError::TokenOutOfRange { .. })
    ));
    assert!(matches!(encoder.model().embed_ids(&[vec![]]), Err(EmbedError::SequenceLength { len: 0, .. })));
}

/// tokenizer.json's `added_tokens` carry their own ids: one past the model's embedding table loaded fine and
/// panicked in the forward pass the first time a text held it.
#[test]
fn added_tokens_outside_the_model_vocabulary_are_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), &tiny_tensors(3), "gelu");
    let tokenizer_json = |added: Value| json!({"added_tokens": added, "model": {"type": "WordPiece"}});
    let added = |id: u64| json!([{"id": 2, "content": "[CLS]"}, {"id": id, "content": "[NEW]", "normalized": false}]);
    let path = dir.path().join("tokenizer.json");

    std::fs::write(&path, serde_json::to_vec(&tokenizer_json(added(99_999))).unwrap()).unwrap();
    let err = SentenceEncoder::load(dir.path()).err().expect("an added token past the embedding table is refused");
    assert!(matches!(err, EmbedError::UnsupportedConfig(ref m) if m.contains("[NEW]") && m.contains("99999")), "{err}");
    // The first id past the table, too.
    std::fs::write(&path, serde_json::to_vec(&tokenizer_json(added(MODEL_VOCAB as u64))).unwrap()).unwrap();
    assert!(SentenceEncoder::load(dir.path()).is_err());

    // Past the tokenizer's vocabulary but inside the model's: real checkpoints pad their tables this way.
    let inside = VOCAB.len() as u32 + 2;
    std::fs::write(&path, serde_json::to_vec(&tokenizer_json(added(u64::from(inside)))).unwrap()).unwrap();
    let encoder = SentenceEncoder::load(dir.path()).unwrap();
    assert_eq!(encoder.encode_ids("the [NEW] cat"), vec![2, 5, inside, 6, 3]);
    let embedding = encoder.embed("the [NEW] cat");
    assert!((embedding.iter().map(|v| v * v).sum::<f32>().sqrt() - 1.0).abs() < 1e-5);
}

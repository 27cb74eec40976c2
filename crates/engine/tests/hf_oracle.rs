//! Fidelity oracle: our whole chain (HF checkpoint -> `convert_hf` -> GGUF -> llama.cpp engine) against
//! Hugging Face transformers' `GptOssForCausalLM` on the same tiny random checkpoint.
//!
//! The checkpoint is written here, deterministically from a seed, so nothing large is committed. The
//! reference logits in `tests/fixtures/hf_*` came from `scripts/oracle/hf_logits.py`, which runs the
//! ignored test `write_hf_checkpoints` to get byte-identical checkpoints and feeds them to transformers.
//! Regenerate with `python3 scripts/oracle/hf_logits.py` (needs torch + transformers, not needed here).
#![cfg(feature = "llama")]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safeguard_engine::llama::LlamaEngine;
use safeguard_engine::{EngineConfig, KvCacheType};
use safeguard_gguf::GgmlType;
use safeguard_gguf::rng::SplitMix64;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const VOCAB: usize = 201_088;

/// The tiny model's shape: every gpt-oss feature the real models use (alternating sliding/full
/// layers, YaRN, sinks, biases everywhere, top-k of several experts), at a size that runs in seconds.
struct TinyHf {
    seed: u64,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    experts: usize,
    experts_per_token: usize,
    ff: usize,
    sliding_window: usize,
}

const TINY: TinyHf = TinyHf {
    seed: 0x5afe_6a4d,
    hidden: 64,
    layers: 4,
    heads: 4,
    kv_heads: 2,
    head_dim: 64,
    experts: 8,
    experts_per_token: 4,
    ff: 64,
    sliding_window: 128,
};

#[derive(Debug, Clone, Copy, PartialEq)]
enum ExpertStorage {
    F32,
    /// HF's MXFP4 layout (`*_blocks` + `*_scales`), as the released gpt-oss checkpoints ship.
    Mxfp4,
}

impl ExpertStorage {
    fn name(self) -> &'static str {
        match self {
            ExpertStorage::F32 => "f32",
            ExpertStorage::Mxfp4 => "mxfp4",
        }
    }
}

fn config_json(m: &TinyHf, experts: ExpertStorage) -> Value {
    let layer_types: Vec<&str> =
        (0..m.layers).map(|i| if i % 2 == 0 { "sliding_attention" } else { "full_attention" }).collect();
    let mut config = json!({
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "vocab_size": VOCAB,
        "hidden_size": m.hidden,
        "num_hidden_layers": m.layers,
        "num_attention_heads": m.heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "num_local_experts": m.experts,
        "num_experts_per_tok": m.experts_per_token,
        "experts_per_token": m.experts_per_token,
        "intermediate_size": m.ff,
        "max_position_embeddings": 131_072,
        "sliding_window": m.sliding_window,
        "layer_types": layer_types,
        "rms_norm_eps": 1e-5,
        "attention_bias": true,
        "attention_dropout": 0.0,
        "tie_word_embeddings": false,
        "swiglu_limit": 7.0,
        "router_aux_loss_coef": 0.9,
        "output_router_logits": false,
        "initializer_range": 0.02,
        "hidden_act": "silu",
        "use_cache": true,
        "eos_token_id": 200002,
        "pad_token_id": 199999,
        "dtype": "float32",
        "rope_theta": 150_000.0,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 150_000.0,
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": false
        }
    });
    if experts == ExpertStorage::Mxfp4 {
        config["quantization_config"] = json!({
            "quant_method": "mxfp4",
            "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
        });
    }
    config
}

struct RawTensor {
    dtype: &'static str,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn random(m: &TinyHf, name: &str, n: usize, mean: f32, std: f32) -> Vec<f32> {
    let mut values = vec![0.0f32; n];
    SplitMix64::for_stream(m.seed, name).fill_normal(&mut values, mean, std);
    values
}

fn f32_tensor(shape: &[usize], values: &[f32]) -> RawTensor {
    RawTensor { dtype: "F32", shape: shape.to_vec(), data: values.iter().flat_map(|v| v.to_le_bytes()).collect() }
}

/// ggml MXFP4 block (scale byte, then element j low / j+16 high) -> HF's (scale apart, 2k low / 2k+1 high).
fn ggml_block_to_hf(block: &[u8]) -> (u8, [u8; 16]) {
    let nibble = |i: usize| if i < 16 { block[1 + i] & 0x0f } else { block[1 + i - 16] >> 4 };
    let mut hf = [0u8; 16];
    for (k, byte) in hf.iter_mut().enumerate() {
        *byte = nibble(2 * k) | (nibble(2 * k + 1) << 4);
    }
    (block[0], hf)
}

/// Expert matrices are generated as `[experts, out, in]` (llama.cpp's and the MXFP4 blocks' order)
/// and stored the way HF checkpoints hold them.
fn expert_tensors(
    m: &TinyHf,
    stem: &str,
    [rows, cols]: [usize; 2],
    storage: ExpertStorage,
    out: &mut BTreeMap<String, RawTensor>,
) {
    let x = m.experts;
    let values = random(m, stem, x * rows * cols, 0.0, 1.0 / (cols as f32).sqrt());
    match storage {
        ExpertStorage::F32 => {
            // HF keeps unquantized experts as [E, in, out].
            let mut t = Vec::with_capacity(values.len());
            for e in 0..x {
                let w = &values[e * rows * cols..(e + 1) * rows * cols];
                for i in 0..cols {
                    t.extend((0..rows).map(|r| w[r * cols + i]));
                }
            }
            out.insert(stem.to_string(), f32_tensor(&[x, cols, rows], &t));
        }
        ExpertStorage::Mxfp4 => {
            let ggml = safeguard_gguf::quant::quantize_mxfp4(&values).unwrap();
            let nb = cols / 32;
            let mut blocks = Vec::with_capacity(x * rows * nb * 16);
            let mut scales = Vec::with_capacity(x * rows * nb);
            for b in ggml.chunks_exact(safeguard_gguf::quant::MXFP4_BLOCK_BYTES) {
                let (scale, hf) = ggml_block_to_hf(b);
                scales.push(scale);
                blocks.extend_from_slice(&hf);
            }
            out.insert(format!("{stem}_blocks"), RawTensor { dtype: "U8", shape: vec![x, rows, nb, 16], data: blocks });
            out.insert(format!("{stem}_scales"), RawTensor { dtype: "U8", shape: vec![x, rows, nb], data: scales });
        }
    }
}

fn checkpoint_tensors(m: &TinyHf, storage: ExpertStorage) -> BTreeMap<String, RawTensor> {
    let mut t = BTreeMap::new();
    let (h, q, kv) = (m.hidden, m.heads * m.head_dim, m.kv_heads * m.head_dim);
    let add = |t: &mut BTreeMap<String, RawTensor>, name: String, shape: &[usize], mean: f32, std: f32| {
        let n = shape.iter().product();
        let values = random(m, &name, n, mean, std);
        t.insert(name, f32_tensor(shape, &values));
    };
    let matrix = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
    add(&mut t, "model.embed_tokens.weight".into(), &[VOCAB, h], 0.0, 1.0);
    add(&mut t, "lm_head.weight".into(), &[VOCAB, h], 0.0, matrix(h));
    add(&mut t, "model.norm.weight".into(), &[h], 1.0, 0.1);
    for l in 0..m.layers {
        let p = format!("model.layers.{l}");
        add(&mut t, format!("{p}.input_layernorm.weight"), &[h], 1.0, 0.1);
        add(&mut t, format!("{p}.post_attention_layernorm.weight"), &[h], 1.0, 0.1);
        for (proj, rows) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
            add(&mut t, format!("{p}.self_attn.{proj}.weight"), &[rows, h], 0.0, matrix(h));
            add(&mut t, format!("{p}.self_attn.{proj}.bias"), &[rows], 0.0, 0.1);
        }
        add(&mut t, format!("{p}.self_attn.o_proj.weight"), &[h, q], 0.0, matrix(q));
        add(&mut t, format!("{p}.self_attn.o_proj.bias"), &[h], 0.0, 0.1);
        add(&mut t, format!("{p}.self_attn.sinks"), &[m.heads], 0.0, 1.0);
        add(&mut t, format!("{p}.mlp.router.weight"), &[m.experts, h], 0.0, matrix(h));
        add(&mut t, format!("{p}.mlp.router.bias"), &[m.experts], 0.0, 0.1);
        add(&mut t, format!("{p}.mlp.experts.gate_up_proj_bias"), &[m.experts, 2 * m.ff], 0.0, 0.1);
        add(&mut t, format!("{p}.mlp.experts.down_proj_bias"), &[m.experts, h], 0.0, 0.1);
        // gate and up rows interleave (even = gate), as in HF's fused gate_up_proj.
        expert_tensors(m, &format!("{p}.mlp.experts.gate_up_proj"), [2 * m.ff, h], storage, &mut t);
        expert_tensors(m, &format!("{p}.mlp.experts.down_proj"), [h, m.ff], storage, &mut t);
    }
    t
}

/// A safetensors file with names sorted and no metadata beyond the format: same tensors, same bytes.
fn safetensors_bytes(tensors: &BTreeMap<String, RawTensor>) -> Vec<u8> {
    let mut header = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut offset = 0usize;
    for (name, t) in tensors {
        let shape: Vec<String> = t.shape.iter().map(usize::to_string).collect();
        header.push_str(&format!(
            ",\"{name}\":{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{offset},{}]}}",
            t.dtype,
            shape.join(","),
            offset + t.data.len()
        ));
        offset += t.data.len();
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = Vec::with_capacity(8 + header.len() + offset);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for t in tensors.values() {
        out.extend_from_slice(&t.data);
    }
    out
}

/// Writes `config.json` + `model.safetensors`; returns the safetensors file's sha256 (hex).
fn write_checkpoint(dir: &Path, storage: ExpertStorage) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::to_string_pretty(&config_json(&TINY, storage)).unwrap();
    std::fs::write(dir.join("config.json"), config).unwrap();
    let bytes = safetensors_bytes(&checkpoint_tensors(&TINY, storage));
    std::fs::write(dir.join("model.safetensors"), &bytes).unwrap();
    Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Run by `scripts/oracle/hf_logits.py`: writes both checkpoints under $SAFEGUARD_HF_ORACLE_DIR.
#[test]
#[ignore = "fixture generation; run by scripts/oracle/hf_logits.py"]
fn write_hf_checkpoints() {
    let root = PathBuf::from(std::env::var_os("SAFEGUARD_HF_ORACLE_DIR").expect("set SAFEGUARD_HF_ORACLE_DIR"));
    for storage in [ExpertStorage::F32, ExpertStorage::Mxfp4] {
        let sha = write_checkpoint(&root.join(storage.name()), storage);
        println!("{} {sha}", storage.name());
    }
}

struct Reference {
    name: String,
    checkpoint_sha256: String,
    vocab_subset: Vec<usize>,
    prompts: Vec<ReferencePrompt>,
    max_abs_logit: f32,
    /// hf_f32_exact_yarn only: how far transformers itself moves when the YaRN ramp bounds are truncated.
    truncation_effect: Option<f32>,
}

struct ReferencePrompt {
    name: String,
    tokens: Vec<u32>,
    /// Per position: transformers' logits at `vocab_subset`.
    subset_logits: Vec<Vec<f32>>,
    argmax: Vec<usize>,
    max: Vec<f32>,
    /// Top-2 gap per position: argmax may legitimately differ when it is tiny.
    top2_gap: Vec<f32>,
    logsumexp: Vec<f32>,
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn ints(v: &Value) -> Vec<usize> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect()
}

fn load_reference(name: &str) -> Reference {
    let meta_path = fixture_dir().join(format!("{name}.json"));
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
    let bin = std::fs::read(fixture_dir().join(meta["logits_file"].as_str().unwrap())).unwrap();
    let all: Vec<f32> = bin.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let vocab_subset = ints(&meta["vocab_subset"]);
    let width = vocab_subset.len();
    let mut row = 0;
    let prompts = meta["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let tokens: Vec<u32> = ints(&p["tokens"]).into_iter().map(|t| t as u32).collect();
            let subset_logits =
                (0..tokens.len()).map(|i| all[(row + i) * width..(row + i + 1) * width].to_vec()).collect();
            row += tokens.len();
            ReferencePrompt {
                name: p["name"].as_str().unwrap().to_string(),
                tokens,
                subset_logits,
                argmax: ints(&p["argmax"]),
                max: floats(&p["max"]),
                top2_gap: floats(&p["top2_gap"]),
                logsumexp: floats(&p["logsumexp"]),
            }
        })
        .collect();
    assert_eq!(row * width, all.len(), "{} does not match its meta", meta["logits_file"]);
    Reference {
        name: name.to_string(),
        checkpoint_sha256: meta["checkpoint_sha256"].as_str().unwrap().to_string(),
        vocab_subset,
        prompts,
        max_abs_logit: meta["max_abs_logit"].as_f64().unwrap() as f32,
        truncation_effect: meta.get("truncation_effect_max_abs_delta").and_then(Value::as_f64).map(|v| v as f32),
    }
}

fn logsumexp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&v| f64::from(v - max).exp()).sum();
    max + sum.ln() as f32
}

fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().fold(0, |best, (i, &v)| if v > row[best] { i } else { best })
}

#[derive(Debug, Default)]
struct Comparison {
    /// Over the vocabulary subset, each position's max logit and its logsumexp (the whole row).
    max_abs_delta: f32,
    /// Largest |Δ| at each position, prompts in order.
    per_position: Vec<f32>,
    positions: usize,
    argmax_agree: usize,
    /// (prompt, position, ours, transformers', transformers' top-2 gap) where the argmax differs.
    argmax_misses: Vec<(String, usize, usize, usize, f32)>,
}

/// Our chain (checkpoint -> convert_hf -> GGUF -> LlamaEngine) on `storage`, compared position by
/// position with every reference (all of them must share the checkpoint and prompts).
fn run_chain(storage: ExpertStorage, kv_cache: KvCacheType, references: &[&Reference]) -> Vec<Comparison> {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("hf");
    let sha = write_checkpoint(&ckpt, storage);
    for r in references {
        assert_eq!(
            sha, r.checkpoint_sha256,
            "{}: the checkpoint writer changed; regenerate the fixtures with scripts/oracle/hf_logits.py",
            r.name
        );
    }
    let gguf = dir.path().join("model.gguf");
    let info = safeguard_gguf::convert_hf(&ckpt, &gguf, GgmlType::F32).unwrap();
    assert_eq!(info.mxfp4_experts, storage == ExpertStorage::Mxfp4);
    let cfg = EngineConfig {
        threads: 2,
        n_ctx: 512,
        n_batch: 256,
        n_ubatch: 256,
        max_sequences: 1,
        kv_cache,
        flash_attention: Some(false),
        ..EngineConfig::default()
    };
    let engine = LlamaEngine::load(&gguf, cfg).unwrap();

    let mut out: Vec<Comparison> = references.iter().map(|_| Comparison::default()).collect();
    for (p, prompt) in references[0].prompts.iter().enumerate() {
        let ours = engine.logits(&prompt.tokens).unwrap();
        assert_eq!(ours.len(), prompt.tokens.len());
        for (i, row) in ours.iter().enumerate() {
            assert_eq!(row.len(), VOCAB);
            let (ours_max, ours_lse, ours_argmax) =
                (row.iter().copied().fold(f32::NEG_INFINITY, f32::max), logsumexp(row), argmax(row));
            for (r, c) in references.iter().zip(out.iter_mut()) {
                let theirs = &r.prompts[p];
                assert_eq!(theirs.tokens, prompt.tokens, "{}: prompts differ between fixtures", r.name);
                let subset = r.vocab_subset.iter().zip(&theirs.subset_logits[i]).map(|(&id, &v)| row[id] - v);
                let deltas = subset.chain([ours_max - theirs.max[i], ours_lse - theirs.logsumexp[i]]);
                let here = deltas.fold(0.0f32, |m, d| m.max(d.abs()));
                c.max_abs_delta = c.max_abs_delta.max(here);
                c.per_position.push(here);
                if ours_argmax == theirs.argmax[i] {
                    c.argmax_agree += 1;
                } else {
                    c.argmax_misses.push((theirs.name.clone(), i, ours_argmax, theirs.argmax[i], theirs.top2_gap[i]));
                }
                c.positions += 1;
            }
        }
    }
    for (r, c) in references.iter().zip(&out) {
        let worst = c.per_position.iter().enumerate().fold(0, |b, (i, &v)| if v > c.per_position[b] { i } else { b });
        eprintln!(
            "hf oracle {}: max |Δlogit| {:.3e} ({:.3} % of max |logit| {:.3}) at row {worst}, median {:.2e}, p90 {:.2e}, \
             p99 {:.2e}, argmax {}/{}",
            r.name,
            c.max_abs_delta,
            100.0 * c.max_abs_delta / r.max_abs_logit,
            r.max_abs_logit,
            quantile(&c.per_position, 0.5),
            quantile(&c.per_position, 0.9),
            quantile(&c.per_position, 0.99),
            c.argmax_agree,
            c.positions
        );
        if std::env::var_os("SAFEGUARD_HF_ORACLE_VERBOSE").is_some() {
            eprintln!("per-position max |Δ|: {:?}", c.per_position);
        }
    }
    out
}

/// The f32 target: met with an f32 K/V cache and flash attention off (measured max 1.1e-5, median 2.6e-6).
/// With the default f16 cache the same chain is off by up to 7.6e-3, so the gap was the cache, not the graph.
const F32_TARGET: f32 = 2e-4;

fn quantile(values: &[f32], q: f64) -> f32 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f32::total_cmp);
    sorted[((sorted.len() - 1) as f64 * q) as usize]
}

#[test]
fn f32_experts_match_transformers() {
    let truncated = load_reference("hf_f32");
    let exact = load_reference("hf_f32_exact_yarn");
    let [vs_truncated, vs_exact]: [Comparison; 2] =
        run_chain(ExpertStorage::F32, KvCacheType::F32, &[&truncated, &exact]).try_into().unwrap();

    // Conversion, attention sinks, sliding window, MoE routing, SwiGLU clamp, biases and norms agree
    // with transformers to f32 rounding, and the greedy token agrees everywhere.
    assert!(
        vs_truncated.max_abs_delta <= F32_TARGET,
        "max |Δlogit| {} exceeds {F32_TARGET}",
        vs_truncated.max_abs_delta
    );
    assert_eq!(vs_truncated.argmax_agree, vs_truncated.positions, "{:#?}", vs_truncated.argmax_misses);

    // Against the model as configured (rope truncate=false, like OpenAI's reference), the one further
    // deviation is ggml flooring/ceiling the YaRN correction range ([8.09, 17.40] -> [8, 18] at head_dim
    // 64; on gpt-oss-20b the same dims, so real models see it too): exactly as far as transformers itself
    // moves when told to truncate. If llama.cpp starts honouring truncate=false this fails: then make
    // hf_f32_exact_yarn the primary reference.
    let effect = exact.truncation_effect.unwrap();
    assert!(
        (vs_exact.max_abs_delta - effect).abs() <= F32_TARGET,
        "deviation from exact YaRN {} is not the truncation effect {effect}",
        vs_exact.max_abs_delta
    );
}

/// The MXFP4 target for the largest |Δ|. Met by 90 % of positions (p90 0.046 of 5.6 with an f32
/// cache); a few positions (p99 0.41, max 0.67) move much more, consistent with top-4 expert choices
/// flipping on near-ties once ggml's Q8_0 activation rounding has perturbed the router input.
const MXFP4_TARGET_OF_MAX_LOGIT: f32 = 0.02;

#[test]
fn mxfp4_experts_match_transformers() {
    // ggml quantizes activations to Q8_0 for MXFP4 dot products while transformers dequantizes the
    // weights exactly, so activation rounding remains (stack.md §4.1 measured ~1.25 % on 18 tokens).
    let reference = load_reference("hf_mxfp4");
    let [c]: [Comparison; 1] = run_chain(ExpertStorage::Mxfp4, KvCacheType::F32, &[&reference]).try_into().unwrap();
    let target = MXFP4_TARGET_OF_MAX_LOGIT * reference.max_abs_logit;
    let p90 = quantile(&c.per_position, 0.9);
    assert!(p90 <= target, "90th percentile |Δlogit| {p90} exceeds 2 % of max |logit| ({target})");
    // Measured 0.67 (12.0 %): a wrong MXFP4 layout moves every position by O(max |logit|).
    assert!(c.max_abs_delta <= 0.25 * reference.max_abs_logit, "max |Δlogit| {}", c.max_abs_delta);
    assert!(c.argmax_agree * 100 >= c.positions * 95, "argmax agrees at only {}/{}", c.argmax_agree, c.positions);
}

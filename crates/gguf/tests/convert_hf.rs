//! Build tiny HF-style gpt-oss checkpoints (both expert layouts), convert, and compare every
//! dequantized GGUF tensor with the values the checkpoint holds.

use std::collections::BTreeMap;
use std::path::Path;

use half::bf16;
use safeguard_gguf::rng::SplitMix64;
use safeguard_gguf::{GgmlType, GgufFile, convert_hf};
use safetensors::Dtype;
use safetensors::tensor::TensorView;

const E: usize = 32; // hidden
const FF: usize = 32;
const X: usize = 4; // experts
const HEADS: usize = 2;
const KV_HEADS: usize = 1;
const HD: usize = 16;
const V: usize = 201_088;
const LAYERS: usize = 2;
const HF_FP4: [f32; 16] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

struct Tensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
    /// Logical values (floats: the bf16-rounded values; MXFP4: dequantized per HF's definition).
    values: Vec<f32>,
}

fn float(g: &mut SplitMix64, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|_| bf16::from_f32(g.next_normal() * 0.3).to_f32()).collect();
    let bytes = values.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect();
    Tensor { dtype: Dtype::BF16, shape: shape.to_vec(), bytes, values }
}

/// HF MXFP4 pair for a logical [x, rows, cols] tensor: returns (blocks, scales, dequantized values).
fn mxfp4(g: &mut SplitMix64, x: usize, rows: usize, cols: usize) -> (Tensor, Tensor, Vec<f32>) {
    let nb = cols / 32;
    let blocks: Vec<u8> = (0..x * rows * nb * 16).map(|_| g.next_u64() as u8).collect();
    let scales: Vec<u8> = (0..x * rows * nb).map(|_| 120 + (g.next_u64() % 10) as u8).collect();
    let mut values = Vec::with_capacity(x * rows * cols);
    for idx in 0..x * rows * nb {
        let scale = 2f32.powi(i32::from(scales[idx]) - 127);
        for el in 0..32 {
            let byte = blocks[idx * 16 + el / 2];
            let nibble = if el % 2 == 0 { byte & 0x0f } else { byte >> 4 };
            values.push(HF_FP4[nibble as usize] * scale);
        }
    }
    let b = Tensor { dtype: Dtype::U8, shape: vec![x, rows, nb, 16], bytes: blocks, values: vec![] };
    let s = Tensor { dtype: Dtype::U8, shape: vec![x, rows, nb], bytes: scales, values: vec![] };
    (b, s, values)
}

fn config() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
        "vocab_size": V, "hidden_size": E, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HD, "num_local_experts": X, "num_experts_per_tok": 2,
        "intermediate_size": FF, "max_position_embeddings": 131072, "sliding_window": 128, "rms_norm_eps": 1e-5,
        "rope_theta": 150000.0,
        "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                          "beta_fast": 32.0, "beta_slow": 1.0, "truncate": false},
        "layer_types": ["sliding_attention", "full_attention"]
    })
}

/// Returns the tensors and, per expert weight, its logical [E, hidden_in, out] values.
fn checkpoint(mxfp4_experts: bool) -> (BTreeMap<String, Tensor>, BTreeMap<String, Vec<f32>>) {
    let mut g = SplitMix64::new(99);
    let mut t = BTreeMap::new();
    let mut experts = BTreeMap::new();
    t.insert("model.embed_tokens.weight".to_string(), float(&mut g, &[V, E]));
    t.insert("lm_head.weight".to_string(), float(&mut g, &[V, E]));
    t.insert("model.norm.weight".to_string(), float(&mut g, &[E]));
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        for (n, s) in [
            ("input_layernorm.weight", vec![E]),
            ("post_attention_layernorm.weight", vec![E]),
            ("self_attn.q_proj.weight", vec![HEADS * HD, E]),
            ("self_attn.q_proj.bias", vec![HEADS * HD]),
            ("self_attn.k_proj.weight", vec![KV_HEADS * HD, E]),
            ("self_attn.k_proj.bias", vec![KV_HEADS * HD]),
            ("self_attn.v_proj.weight", vec![KV_HEADS * HD, E]),
            ("self_attn.v_proj.bias", vec![KV_HEADS * HD]),
            ("self_attn.o_proj.weight", vec![E, HEADS * HD]),
            ("self_attn.o_proj.bias", vec![E]),
            ("self_attn.sinks", vec![HEADS]),
            ("mlp.router.weight", vec![X, E]),
            ("mlp.router.bias", vec![X]),
            ("mlp.experts.gate_up_proj_bias", vec![X, 2 * FF]),
            ("mlp.experts.down_proj_bias", vec![X, E]),
        ] {
            t.insert(format!("{p}.{n}"), float(&mut g, &s));
        }
        if mxfp4_experts {
            let (b, s, v) = mxfp4(&mut g, X, 2 * FF, E);
            t.insert(format!("{p}.mlp.experts.gate_up_proj_blocks"), b);
            t.insert(format!("{p}.mlp.experts.gate_up_proj_scales"), s);
            experts.insert(format!("{p}.gate_up"), v); // [X, 2FF rows, E cols]
            let (b, s, v) = mxfp4(&mut g, X, E, FF);
            t.insert(format!("{p}.mlp.experts.down_proj_blocks"), b);
            t.insert(format!("{p}.mlp.experts.down_proj_scales"), s);
            experts.insert(format!("{p}.down"), v); // [X, E rows, FF cols]
        } else {
            t.insert(format!("{p}.mlp.experts.gate_up_proj"), float(&mut g, &[X, E, 2 * FF]));
            t.insert(format!("{p}.mlp.experts.down_proj"), float(&mut g, &[X, FF, E]));
        }
    }
    (t, experts)
}

fn save(dir: &Path, tensors: &BTreeMap<String, Tensor>, shards: usize) {
    std::fs::write(dir.join("config.json"), config().to_string()).unwrap();
    let names: Vec<&String> = tensors.keys().collect();
    let per = names.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in names.chunks(per).enumerate() {
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{i:05}-of-{shards:05}.safetensors")
        };
        let views: Vec<(String, TensorView)> = chunk
            .iter()
            .map(|n| {
                let t = &tensors[*n];
                weight_map.insert((*n).clone(), file.clone().into());
                ((*n).clone(), TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap())
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
    }
    if shards > 1 {
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
}

fn check_common(f: &GgufFile, t: &BTreeMap<String, Tensor>) {
    let same = |gguf: &str, hf: &str| {
        assert_eq!(f.tensor_f32(gguf).unwrap(), t[hf].values, "{gguf} vs {hf}");
    };
    same("token_embd.weight", "model.embed_tokens.weight");
    same("output.weight", "lm_head.weight");
    same("output_norm.weight", "model.norm.weight");
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        same(&format!("blk.{l}.attn_q.weight"), &format!("{p}.self_attn.q_proj.weight"));
        same(&format!("blk.{l}.attn_k.bias"), &format!("{p}.self_attn.k_proj.bias"));
        same(&format!("blk.{l}.attn_output.weight"), &format!("{p}.self_attn.o_proj.weight"));
        same(&format!("blk.{l}.attn_sinks.weight"), &format!("{p}.self_attn.sinks"));
        same(&format!("blk.{l}.post_attention_norm.weight"), &format!("{p}.post_attention_layernorm.weight"));
        same(&format!("blk.{l}.ffn_gate_inp.weight"), &format!("{p}.mlp.router.weight"));
        same(&format!("blk.{l}.ffn_down_exps.bias"), &format!("{p}.mlp.experts.down_proj_bias"));
        let fused = &t[&format!("{p}.mlp.experts.gate_up_proj_bias")].values;
        let gate: Vec<f32> = fused.iter().step_by(2).copied().collect();
        let up: Vec<f32> = fused.iter().skip(1).step_by(2).copied().collect();
        assert_eq!(f.tensor_f32(&format!("blk.{l}.ffn_gate_exps.bias")).unwrap(), gate);
        assert_eq!(f.tensor_f32(&format!("blk.{l}.ffn_up_exps.bias")).unwrap(), up);
    }
    assert_eq!(f.tensor("blk.0.ffn_gate_exps.weight").unwrap().shape, vec![E as u64, FF as u64, X as u64]);
    assert_eq!(f.tensor("blk.0.ffn_down_exps.weight").unwrap().shape, vec![FF as u64, E as u64, X as u64]);
}

#[test]
fn converts_unquantized_experts_transposed_and_split() {
    let dir = tempfile::tempdir().unwrap();
    let (t, _) = checkpoint(false);
    save(dir.path(), &t, 1);
    let out = dir.path().join("out.gguf");
    let info = convert_hf(dir.path(), &out, GgmlType::F32).unwrap();
    assert!(!info.mxfp4_experts);
    let f = GgufFile::open(&out).unwrap();
    let hp = safeguard_gguf::GptOssHparams::from_gguf(&f).unwrap();
    assert_eq!((hp.n_embd, hp.n_head, hp.n_head_kv, hp.n_expert_used, hp.yarn_factor), (32, 2, 1, 2, Some(32.0)));
    check_common(&f, &t);
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        let gu = &t[&format!("{p}.mlp.experts.gate_up_proj")].values; // [X, E, 2FF]
        let down = &t[&format!("{p}.mlp.experts.down_proj")].values; // [X, FF, E]
        let gate = f.tensor_f32(&format!("blk.{l}.ffn_gate_exps.weight")).unwrap(); // [X][FF][E]
        let up = f.tensor_f32(&format!("blk.{l}.ffn_up_exps.weight")).unwrap();
        let dn = f.tensor_f32(&format!("blk.{l}.ffn_down_exps.weight")).unwrap(); // [X][E][FF]
        for x in 0..X {
            for r in 0..FF {
                for i in 0..E {
                    assert_eq!(gate[(x * FF + r) * E + i], gu[(x * E + i) * 2 * FF + 2 * r]);
                    assert_eq!(up[(x * FF + r) * E + i], gu[(x * E + i) * 2 * FF + 2 * r + 1]);
                    assert_eq!(dn[(x * E + i) * FF + r], down[(x * FF + r) * E + i]);
                }
            }
        }
    }

    // Q8_0 output: same layout, quantized matrices, F32 small tensors.
    let q8 = dir.path().join("q8.gguf");
    convert_hf(dir.path(), &q8, GgmlType::Q8_0).unwrap();
    let f = GgufFile::open(&q8).unwrap();
    assert_eq!(f.tensor("blk.0.attn_q.weight").unwrap().ty(), Some(GgmlType::Q8_0));
    assert_eq!(f.tensor("blk.0.ffn_gate_exps.weight").unwrap().ty(), Some(GgmlType::Q8_0));
    assert_eq!(f.tensor("blk.0.attn_sinks.weight").unwrap().ty(), Some(GgmlType::F32));
    let got = f.tensor_f32("blk.1.attn_v.weight").unwrap();
    let want = &t["model.layers.1.self_attn.v_proj.weight"].values;
    assert!(got.iter().zip(want).all(|(a, b)| (a - b).abs() < 0.02));
}

#[test]
fn converts_sharded_mxfp4_experts_losslessly() {
    let dir = tempfile::tempdir().unwrap();
    let (t, experts) = checkpoint(true);
    save(dir.path(), &t, 3);
    let out = dir.path().join("out.gguf");
    let info = convert_hf(dir.path(), &out, GgmlType::F32).unwrap();
    assert!(info.mxfp4_experts);
    let f = GgufFile::open(&out).unwrap();
    check_common(&f, &t);
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        assert_eq!(f.tensor(&format!("blk.{l}.ffn_up_exps.weight")).unwrap().ty(), Some(GgmlType::Mxfp4));
        let gu = &experts[&format!("{p}.gate_up")]; // [X][2FF][E]
        let gate = f.tensor_f32(&format!("blk.{l}.ffn_gate_exps.weight")).unwrap();
        let up = f.tensor_f32(&format!("blk.{l}.ffn_up_exps.weight")).unwrap();
        for x in 0..X {
            for r in 0..FF {
                for i in 0..E {
                    assert_eq!(gate[(x * FF + r) * E + i], gu[(x * 2 * FF + 2 * r) * E + i]);
                    assert_eq!(up[(x * FF + r) * E + i], gu[(x * 2 * FF + 2 * r + 1) * E + i]);
                }
            }
        }
        assert_eq!(f.tensor_f32(&format!("blk.{l}.ffn_down_exps.weight")).unwrap(), experts[&format!("{p}.down")]);
    }
}

#[test]
fn bad_checkpoints_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    let err = convert_hf(dir.path(), &out, GgmlType::F32).unwrap_err();
    assert!(err.to_string().contains("config.json"), "{err}");
    let (mut t, _) = checkpoint(false);
    t.remove("model.layers.1.self_attn.sinks");
    save(dir.path(), &t, 1);
    let err = convert_hf(dir.path(), &out, GgmlType::F32).unwrap_err();
    assert!(err.to_string().contains("model.layers.1.self_attn.sinks"), "{err}");
    assert!(!out.exists());
    let err = convert_hf(dir.path(), &out, GgmlType::Mxfp4).unwrap_err();
    assert!(err.to_string().contains("output type"), "{err}");
}

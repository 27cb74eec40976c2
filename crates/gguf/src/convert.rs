//! Hugging Face gpt-oss checkpoint (config.json + safetensors, sharded or not) -> GGUF, following
//! llama.cpp's `convert_hf_to_gguf.py` GptOssModel: MXFP4 experts are repacked losslessly into
//! ggml's nibble order; unquantized experts (`gate_up_proj` [E, hidden, 2·ff] with gate/up
//! interleaved on the last axis, `down_proj` [E, ff, hidden]) are transposed and split. Tensors are
//! read from memory maps and written one at a time (embeddings in row chunks).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::Dtype;
use serde_json::Value;

use crate::error::{GgufError, Result};
use crate::gpt_oss::{self, DtypePlan, GptOssHparams};
use crate::types::GgmlType;
use crate::vocab;
use crate::writer::{GgufWriter, TensorSpec};

fn err(msg: impl Into<String>) -> GgufError {
    GgufError::Checkpoint(msg.into())
}

struct SourceTensor {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// A checkpoint's tensors across shards, memory-mapped.
pub struct Checkpoint {
    maps: Vec<(PathBuf, Mmap)>,
    tensors: HashMap<String, SourceTensor>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let mut files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| GgufError::io(&index, e))?;
            let json: Value = serde_json::from_str(&text).map_err(|e| err(format!("{}: {e}", index.display())))?;
            let map = json
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| err(format!("{}: no weight_map", index.display())))?;
            let mut names: Vec<String> = map.values().filter_map(|v| v.as_str().map(str::to_string)).collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            let entries = std::fs::read_dir(dir).map_err(|e| GgufError::io(dir, e))?;
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect()
        };
        files.sort();
        if files.is_empty() {
            return Err(err(format!("{}: no *.safetensors files", dir.display())));
        }
        let mut maps = Vec::new();
        let mut tensors = HashMap::new();
        for path in files {
            let file = File::open(&path).map_err(|e| GgufError::io(&path, e))?;
            // SAFETY: read-only map of a checkpoint we do not modify.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| GgufError::io(&path, e))?;
            let (header_len, metadata) =
                safetensors::SafeTensors::read_metadata(&map).map_err(|e| err(format!("{}: {e}", path.display())))?;
            let base = 8 + header_len;
            for (name, info) in metadata.tensors() {
                let (s, e) = info.data_offsets;
                if base + e > map.len() || s > e {
                    return Err(err(format!("{}: tensor {name} lies outside the file", path.display())));
                }
                tensors.insert(
                    name,
                    SourceTensor {
                        file: maps.len(),
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start: base + s,
                        end: base + e,
                    },
                );
            }
            maps.push((path, map));
        }
        Ok(Checkpoint { maps, tensors })
    }

    fn get(&self, name: &str) -> Result<&SourceTensor> {
        self.tensors.get(name).ok_or_else(|| err(format!("tensor {name} not found in the checkpoint")))
    }

    fn bytes(&self, t: &SourceTensor) -> &[u8] {
        &self.maps[t.file].1[t.start..t.end]
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn expect_shape(&self, name: &str, shape: &[usize]) -> Result<&SourceTensor> {
        let t = self.get(name)?;
        if t.shape != shape {
            return Err(err(format!("{name}: shape {:?}, expected {shape:?}", t.shape)));
        }
        Ok(t)
    }

    /// Elements [from, to) of a float tensor as f32.
    fn f32_range(&self, name: &str, t: &SourceTensor, from: usize, to: usize) -> Result<Vec<f32>> {
        let bytes = self.bytes(t);
        let (width, conv): (usize, fn(&[u8]) -> f32) = match t.dtype {
            Dtype::F32 => (4, |c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            Dtype::F16 => (2, |c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
            Dtype::BF16 => (2, |c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
            other => return Err(err(format!("{name}: dtype {other:?} is not a float type"))),
        };
        let slice = bytes
            .get(from * width..to * width)
            .ok_or_else(|| err(format!("{name}: data shorter than its shape says")))?;
        Ok(slice.chunks_exact(width).map(conv).collect())
    }

    fn f32_all(&self, name: &str, t: &SourceTensor) -> Result<Vec<f32>> {
        let n: usize = t.shape.iter().product();
        self.f32_range(name, t, 0, n)
    }
}

/// Hyper-parameters from an HF gpt-oss config.json (transformers 4.55+ and 5.x spellings).
pub fn hparams_from_config(config: &Value) -> Result<GptOssHparams> {
    let u = |k: &str| -> Result<u32> {
        config
            .get(k)
            .and_then(Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| err(format!("config.json: {k} missing or not an integer")))
    };
    let rope = config.get("rope_parameters").or_else(|| config.get("rope_scaling")).filter(|v| v.is_object());
    let rope_theta = config
        .get("rope_theta")
        .or_else(|| rope.and_then(|r| r.get("rope_theta")))
        .and_then(Value::as_f64)
        .ok_or_else(|| err("config.json: rope_theta missing"))? as f32;
    let rope_type = rope.and_then(|r| r.get("rope_type").or_else(|| r.get("type"))).and_then(Value::as_str);
    let (yarn_factor, yarn_original_context) = match rope_type {
        Some("yarn") => {
            let r = rope.ok_or_else(|| err("config.json: yarn without parameters"))?;
            let factor =
                r.get("factor").and_then(Value::as_f64).ok_or_else(|| err("config.json: yarn factor missing"))?;
            let orig = r
                .get("original_max_position_embeddings")
                .and_then(Value::as_u64)
                .ok_or_else(|| err("config.json: yarn original_max_position_embeddings missing"))?;
            (Some(factor as f32), orig as u32)
        }
        _ => (None, 0),
    };
    let n_head = u("num_attention_heads")?;
    let n_head_kv = u("num_key_value_heads")?;
    let n_embd = u("hidden_size")?;
    let head_dim = u("head_dim").unwrap_or(n_embd / n_head.max(1));
    // The attention widths are computed in u32 further on.
    if n_head.checked_mul(head_dim).is_none() || n_head_kv.checked_mul(head_dim).is_none() {
        return Err(err(format!(
            "config.json: {n_head} heads of {head_dim} dimensions (or {n_head_kv} key-value heads) is too wide"
        )));
    }
    Ok(GptOssHparams {
        n_vocab: u("vocab_size")?,
        n_embd,
        n_layer: u("num_hidden_layers")?,
        n_head,
        n_head_kv,
        head_dim,
        n_expert: u("num_local_experts")?,
        n_expert_used: u("num_experts_per_tok").or_else(|_| u("experts_per_token"))?,
        n_ff_exp: u("intermediate_size")?,
        context_length: u("max_position_embeddings")?,
        rope_theta,
        yarn_factor,
        yarn_original_context,
        sliding_window: u("sliding_window")?,
        rms_eps: config.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-5) as f32,
    })
}

/// HF MXFP4 stores element 2k in the low and 2k+1 in the high nibble of byte k; ggml wants element j
/// low and j+16 high in byte j. The E8M0 scale means the same in both.
pub fn hf_mxfp4_block_to_ggml(hf: &[u8; 16]) -> [u8; 16] {
    let nibble = |i: usize| (hf[i / 2] >> (4 * (i % 2))) & 0x0f;
    let mut out = [0u8; 16];
    for (j, o) in out.iter_mut().enumerate() {
        *o = nibble(j) | (nibble(j + 16) << 4);
    }
    out
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConvertInfo {
    pub out: PathBuf,
    pub file_bytes: u64,
    pub tensor_count: usize,
    pub hparams: GptOssHparams,
    pub mxfp4_experts: bool,
}

/// Rows of the big matrices converted per write, bounding memory for 201k-row embeddings.
const ROWS_PER_CHUNK: usize = 4096;

pub fn convert_hf(hf_dir: &Path, out: &Path, outtype: GgmlType) -> Result<ConvertInfo> {
    let _span = tracing::info_span!("convert_hf", dir = %hf_dir.display(), out = %out.display(), %outtype).entered();
    if !matches!(outtype, GgmlType::F32 | GgmlType::F16 | GgmlType::Q8_0 | GgmlType::BF16) {
        return Err(err(format!("output type {outtype} is not one of f32, f16, bf16, q8_0")));
    }
    let config_path = hf_dir.join("config.json");
    let config_text = std::fs::read_to_string(&config_path).map_err(|e| GgufError::io(&config_path, e))?;
    let config: Value = serde_json::from_str(&config_text).map_err(|e| err(format!("config.json: {e}")))?;
    let hp = hparams_from_config(&config)?;
    if hp.n_vocab as usize != vocab::VOCAB_SIZE {
        return Err(err(format!("vocab_size {} is not o200k_harmony's {}", hp.n_vocab, vocab::VOCAB_SIZE)));
    }
    let ckpt = Checkpoint::open(hf_dir)?;
    let mxfp4 = ckpt.has("model.layers.0.mlp.experts.gate_up_proj_blocks");
    let plan = DtypePlan {
        embeddings: outtype,
        output: outtype,
        attention: outtype,
        experts: if mxfp4 { GgmlType::Mxfp4 } else { outtype },
    };
    let layout = gpt_oss::tensor_layout(&hp, &plan);
    let mut metadata = hp.metadata(&format!(
        "{} (converted by safeguard)",
        hf_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    ));
    metadata.extend(gpt_oss::tokenizer_metadata(vocab::harmony_vocab()?));
    let specs: Vec<TensorSpec> = layout.iter().map(|(s, _)| s.clone()).collect();
    let mut writer = GgufWriter::create(out, &metadata, specs.clone())?;
    let (e, ff, x) = (hp.n_embd as usize, hp.n_ff_exp as usize, hp.n_expert as usize);
    for spec in &specs {
        write_tensor(&ckpt, &hp, spec, &mut writer, (e, ff, x))?;
    }
    let file_bytes = writer.finish()?;
    Ok(ConvertInfo { out: out.to_path_buf(), file_bytes, tensor_count: specs.len(), hparams: hp, mxfp4_experts: mxfp4 })
}

/// Copy a row-major HF [rows, cols] float tensor: its memory order is ggml's [cols, rows].
fn copy_rows(ckpt: &Checkpoint, hf: &str, shape: &[usize], spec: &TensorSpec, w: &mut GgufWriter) -> Result<()> {
    let t = ckpt.expect_shape(hf, shape)?;
    let cols = shape.last().copied().unwrap_or(1);
    let rows: usize = shape.iter().rev().skip(1).product();
    let mut r = 0;
    while r < rows.max(1) {
        let n = (rows - r).clamp(1, ROWS_PER_CHUNK);
        let values = ckpt.f32_range(hf, t, r * cols, (r + n) * cols)?;
        w.write_tensor_f32(&spec.name, &values)?;
        r += n;
    }
    Ok(())
}

fn write_tensor(
    ckpt: &Checkpoint,
    hp: &GptOssHparams,
    spec: &TensorSpec,
    w: &mut GgufWriter,
    dims: (usize, usize, usize),
) -> Result<()> {
    let (e, ff, x) = dims;
    let v = hp.n_vocab as usize;
    let q = (hp.n_head * hp.head_dim) as usize;
    let kv = (hp.n_head_kv * hp.head_dim) as usize;
    let name = spec.name.as_str();
    match name {
        "token_embd.weight" => return copy_rows(ckpt, "model.embed_tokens.weight", &[v, e], spec, w),
        "output_norm.weight" => return copy_rows(ckpt, "model.norm.weight", &[e], spec, w),
        "output.weight" => return copy_rows(ckpt, "lm_head.weight", &[v, e], spec, w),
        _ => {}
    }
    let (layer, rest) = name
        .strip_prefix("blk.")
        .and_then(|s| s.split_once('.'))
        .ok_or_else(|| err(format!("no source for {name}")))?;
    let p = format!("model.layers.{layer}");
    match rest {
        "attn_norm.weight" => copy_rows(ckpt, &format!("{p}.input_layernorm.weight"), &[e], spec, w),
        "post_attention_norm.weight" => copy_rows(ckpt, &format!("{p}.post_attention_layernorm.weight"), &[e], spec, w),
        "attn_q.weight" => copy_rows(ckpt, &format!("{p}.self_attn.q_proj.weight"), &[q, e], spec, w),
        "attn_q.bias" => copy_rows(ckpt, &format!("{p}.self_attn.q_proj.bias"), &[q], spec, w),
        "attn_k.weight" => copy_rows(ckpt, &format!("{p}.self_attn.k_proj.weight"), &[kv, e], spec, w),
        "attn_k.bias" => copy_rows(ckpt, &format!("{p}.self_attn.k_proj.bias"), &[kv], spec, w),
        "attn_v.weight" => copy_rows(ckpt, &format!("{p}.self_attn.v_proj.weight"), &[kv, e], spec, w),
        "attn_v.bias" => copy_rows(ckpt, &format!("{p}.self_attn.v_proj.bias"), &[kv], spec, w),
        "attn_output.weight" => copy_rows(ckpt, &format!("{p}.self_attn.o_proj.weight"), &[e, q], spec, w),
        "attn_output.bias" => copy_rows(ckpt, &format!("{p}.self_attn.o_proj.bias"), &[e], spec, w),
        "attn_sinks.weight" => copy_rows(ckpt, &format!("{p}.self_attn.sinks"), &[hp.n_head as usize], spec, w),
        "ffn_gate_inp.weight" => copy_rows(ckpt, &format!("{p}.mlp.router.weight"), &[x, e], spec, w),
        "ffn_gate_inp.bias" => copy_rows(ckpt, &format!("{p}.mlp.router.bias"), &[x], spec, w),
        "ffn_down_exps.bias" => copy_rows(ckpt, &format!("{p}.mlp.experts.down_proj_bias"), &[x, e], spec, w),
        "ffn_gate_exps.bias" | "ffn_up_exps.bias" => {
            let hf = format!("{p}.mlp.experts.gate_up_proj_bias");
            let t = ckpt.expect_shape(&hf, &[x, 2 * ff])?;
            let all = ckpt.f32_all(&hf, t)?;
            let parity = usize::from(rest == "ffn_up_exps.bias");
            let picked: Vec<f32> = all.iter().skip(parity).step_by(2).copied().collect();
            w.write_tensor_f32(name, &picked)
        }
        "ffn_gate_exps.weight" | "ffn_up_exps.weight" => {
            let parity = usize::from(rest == "ffn_up_exps.weight");
            if spec.ty == GgmlType::Mxfp4 {
                write_mxfp4_experts(
                    ckpt,
                    &format!("{p}.mlp.experts.gate_up_proj"),
                    [x, 2 * ff, e],
                    Some(parity),
                    spec,
                    w,
                )
            } else {
                // HF [E, hidden, 2ff] (in, out) -> per expert [ff rows of hidden], even/odd columns.
                let hf = format!("{p}.mlp.experts.gate_up_proj");
                let t = ckpt.expect_shape(&hf, &[x, e, 2 * ff])?;
                for expert in 0..x {
                    let m = ckpt.f32_range(&hf, t, expert * e * 2 * ff, (expert + 1) * e * 2 * ff)?;
                    let mut out = Vec::with_capacity(ff * e);
                    for row in 0..ff {
                        let col = 2 * row + parity;
                        out.extend((0..e).map(|i| m[i * 2 * ff + col]));
                    }
                    w.write_tensor_f32(name, &out)?;
                }
                Ok(())
            }
        }
        "ffn_down_exps.weight" => {
            if spec.ty == GgmlType::Mxfp4 {
                write_mxfp4_experts(ckpt, &format!("{p}.mlp.experts.down_proj"), [x, e, ff], None, spec, w)
            } else {
                // HF [E, ff, hidden] (in, out) -> per expert [hidden rows of ff].
                let hf = format!("{p}.mlp.experts.down_proj");
                let t = ckpt.expect_shape(&hf, &[x, ff, e])?;
                for expert in 0..x {
                    let m = ckpt.f32_range(&hf, t, expert * ff * e, (expert + 1) * ff * e)?;
                    let mut out = Vec::with_capacity(ff * e);
                    for row in 0..e {
                        out.extend((0..ff).map(|i| m[i * e + row]));
                    }
                    w.write_tensor_f32(name, &out)?;
                }
                Ok(())
            }
        }
        other => Err(err(format!("no source for blk.{layer}.{other}"))),
    }
}

/// `[E, rows, cols]` logical shape; `parity` picks even (gate) or odd (up) rows of a fused tensor.
fn write_mxfp4_experts(
    ckpt: &Checkpoint,
    stem: &str,
    [x, rows, cols]: [usize; 3],
    parity: Option<usize>,
    spec: &TensorSpec,
    w: &mut GgufWriter,
) -> Result<()> {
    let nb = cols / 32;
    let blocks_name = format!("{stem}_blocks");
    let scales_name = format!("{stem}_scales");
    let blocks_t = ckpt.expect_shape(&blocks_name, &[x, rows, nb, 16])?;
    let scales_t = ckpt.expect_shape(&scales_name, &[x, rows, nb])?;
    if blocks_t.dtype != Dtype::U8 || scales_t.dtype != Dtype::U8 {
        return Err(err(format!("{stem}: MXFP4 blocks and scales must be uint8")));
    }
    let blocks = ckpt.bytes(blocks_t);
    let scales = ckpt.bytes(scales_t);
    let mut out = Vec::with_capacity(rows * nb * 17);
    for expert in 0..x {
        out.clear();
        for row in 0..rows {
            if parity.is_some_and(|p| row % 2 != p) {
                continue;
            }
            for b in 0..nb {
                let idx = (expert * rows + row) * nb + b;
                out.push(scales[idx]);
                let mut hf = [0u8; 16];
                hf.copy_from_slice(&blocks[idx * 16..idx * 16 + 16]);
                out.extend_from_slice(&hf_mxfp4_block_to_ggml(&hf));
            }
        }
        w.write_tensor_bytes(&spec.name, &out)?;
    }
    Ok(())
}

//! BERT encoder forward pass in f32 on the CPU, with sentence-transformers' mean pooling and L2
//! normalization on top. Sequences are not padded: the dense layers run on all tokens of a batch
//! stacked together, and only attention is done per sequence.

use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::error::{EmbedError, Result};
use crate::gemm::{View, gemm};

/// The fields of a Hugging Face `config.json` this encoder uses.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_position_type")]
    pub position_embedding_type: String,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_eps() -> f64 {
    1e-12
}
fn default_type_vocab() -> usize {
    2
}
fn default_position_type() -> String {
    "absolute".into()
}

impl BertConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw = std::fs::read(path).map_err(|source| EmbedError::Io { path: path.to_path_buf(), source })?;
        let config: BertConfig = serde_json::from_slice(&raw).map_err(|source| EmbedError::Json {
            path: path.to_path_buf(),
            what: "a BERT config",
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        let unsupported = |m: String| Err(EmbedError::UnsupportedConfig(m));
        // Only HF's exact erf GELU: the tanh variants would silently shift every embedding.
        if self.hidden_act != "gelu" {
            return unsupported(format!("hidden_act {:?} (only exact \"gelu\")", self.hidden_act));
        }
        if self.position_embedding_type != "absolute" {
            return unsupported(format!("position_embedding_type {:?}", self.position_embedding_type));
        }
        if self.hidden_size == 0
            || self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return unsupported(format!(
                "hidden_size {} is not a positive multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.max_position_embeddings < 2 || self.type_vocab_size == 0 || self.vocab_size == 0 {
            return unsupported("empty vocabulary, token types, or fewer than 2 positions".into());
        }
        // A zero-width feed-forward would panic in the first matrix product; a layer count in the billions would
        // be reserved for before any tensor is looked for.
        if self.intermediate_size == 0 || self.num_hidden_layers == 0 || self.num_hidden_layers > MAX_LAYERS {
            return unsupported(format!(
                "intermediate_size {} and num_hidden_layers {} (1 to {MAX_LAYERS})",
                self.intermediate_size, self.num_hidden_layers
            ));
        }
        Ok(())
    }
}

/// More layers than any sentence encoder this crate is for has (BERT-large: 24).
const MAX_LAYERS: usize = 256;

struct LayerNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

struct Layer {
    /// Query, key and value weights stacked as one `[3·hidden, hidden]` matrix, so one GEMM does all three.
    qkv_weight: Vec<f32>,
    qkv_bias: Vec<f32>,
    attn_out_weight: Vec<f32>,
    attn_out_bias: Vec<f32>,
    attn_norm: LayerNorm,
    inter_weight: Vec<f32>,
    inter_bias: Vec<f32>,
    out_weight: Vec<f32>,
    out_bias: Vec<f32>,
    out_norm: LayerNorm,
}

pub struct BertModel {
    config: BertConfig,
    word_embeddings: Vec<f32>,
    position_embeddings: Vec<f32>,
    /// Row 0 of the token-type table: every input is a single segment.
    token_type_embedding: Vec<f32>,
    embed_norm: LayerNorm,
    layers: Vec<Layer>,
}

struct Weights<'a> {
    path: PathBuf,
    tensors: SafeTensors<'a>,
    /// Some exports prefix every name with `bert.`.
    prefix: &'static str,
}

impl Weights<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let full = format!("{}{name}", self.prefix);
        let view = self.tensors.tensor(&full).map_err(|err| match err {
            safetensors::SafeTensorError::TensorNotFound(_) => EmbedError::MissingTensor { name: full.clone() },
            source => EmbedError::Safetensors { path: self.path.clone(), source },
        })?;
        if view.shape() != shape {
            return Err(EmbedError::TensorShape { name: full, expected: shape.to_vec(), got: view.shape().to_vec() });
        }
        let bytes = view.data();
        let values = match view.dtype() {
            Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            other => return Err(EmbedError::TensorDtype { name: full, dtype: format!("{other:?}") }),
        };
        Ok(values)
    }

    fn norm(&self, name: &str, hidden: usize) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: self.get(&format!("{name}.weight"), &[hidden])?,
            bias: self.get(&format!("{name}.bias"), &[hidden])?,
        })
    }
}

impl BertModel {
    /// Loads `config.json` and `model.safetensors` from `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let config = BertConfig::from_file(&dir.join("config.json"))?;
        let path = dir.join("model.safetensors");
        let bytes = std::fs::read(&path).map_err(|source| EmbedError::Io { path: path.clone(), source })?;
        Self::from_safetensors(config, &bytes, &path)
    }

    pub fn from_safetensors(config: BertConfig, bytes: &[u8], path: &Path) -> Result<Self> {
        config.validate()?;
        let tensors = SafeTensors::deserialize(bytes)
            .map_err(|source| EmbedError::Safetensors { path: path.to_path_buf(), source })?;
        let prefix = if tensors.names().iter().any(|n| n.starts_with("bert.embeddings.")) { "bert." } else { "" };
        let w = Weights { path: path.to_path_buf(), tensors, prefix };
        let (h, inter) = (config.hidden_size, config.intermediate_size);
        let token_types = w.get("embeddings.token_type_embeddings.weight", &[config.type_vocab_size, h])?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            let mut qkv_weight = Vec::with_capacity(3 * h * h);
            let mut qkv_bias = Vec::with_capacity(3 * h);
            for part in ["query", "key", "value"] {
                qkv_weight.extend(w.get(&format!("{p}.attention.self.{part}.weight"), &[h, h])?);
                qkv_bias.extend(w.get(&format!("{p}.attention.self.{part}.bias"), &[h])?);
            }
            layers.push(Layer {
                qkv_weight,
                qkv_bias,
                attn_out_weight: w.get(&format!("{p}.attention.output.dense.weight"), &[h, h])?,
                attn_out_bias: w.get(&format!("{p}.attention.output.dense.bias"), &[h])?,
                attn_norm: w.norm(&format!("{p}.attention.output.LayerNorm"), h)?,
                inter_weight: w.get(&format!("{p}.intermediate.dense.weight"), &[inter, h])?,
                inter_bias: w.get(&format!("{p}.intermediate.dense.bias"), &[inter])?,
                out_weight: w.get(&format!("{p}.output.dense.weight"), &[h, inter])?,
                out_bias: w.get(&format!("{p}.output.dense.bias"), &[h])?,
                out_norm: w.norm(&format!("{p}.output.LayerNorm"), h)?,
            });
        }
        Ok(BertModel {
            word_embeddings: w.get("embeddings.word_embeddings.weight", &[config.vocab_size, h])?,
            position_embeddings: w
                .get("embeddings.position_embeddings.weight", &[config.max_position_embeddings, h])?,
            token_type_embedding: token_types[..h].to_vec(),
            embed_norm: w.norm("embeddings.LayerNorm", h)?,
            layers,
            config,
        })
    }

    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    pub fn dim(&self) -> usize {
        self.config.hidden_size
    }

    /// Checks ids and lengths so `forward` cannot index out of bounds.
    pub fn check_sequences(&self, sequences: &[Vec<u32>]) -> Result<()> {
        let max = self.config.max_position_embeddings;
        for seq in sequences {
            if seq.is_empty() || seq.len() > max {
                return Err(EmbedError::SequenceLength { len: seq.len(), max });
            }
            if let Some(&id) = seq.iter().find(|&&id| id as usize >= self.config.vocab_size) {
                return Err(EmbedError::TokenOutOfRange { id, vocab_size: self.config.vocab_size });
            }
        }
        Ok(())
    }

    /// Mean-pooled, L2-normalized embeddings of already tokenized sequences (one per sequence).
    pub fn embed_ids(&self, sequences: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        self.check_sequences(sequences)?;
        Ok(self.forward_checked(sequences))
    }

    /// The forward pass; `sequences` must have passed `check_sequences`.
    pub(crate) fn forward_checked(&self, sequences: &[Vec<u32>]) -> Vec<Vec<f32>> {
        let h = self.config.hidden_size;
        let inter = self.config.intermediate_size;
        let heads = self.config.num_attention_heads;
        let head_dim = h / heads;
        let eps = self.config.layer_norm_eps as f32;
        let total: usize = sequences.iter().map(Vec::len).sum();
        if total == 0 {
            return Vec::new();
        }

        let mut x = vec![0f32; total * h];
        let mut row = 0;
        for seq in sequences {
            for (pos, &id) in seq.iter().enumerate() {
                let out = &mut x[row * h..(row + 1) * h];
                let word = &self.word_embeddings[id as usize * h..(id as usize + 1) * h];
                let position = &self.position_embeddings[pos * h..(pos + 1) * h];
                for i in 0..h {
                    out[i] = word[i] + position[i] + self.token_type_embedding[i];
                }
                row += 1;
            }
        }
        layer_norm_rows(&mut x, h, &self.embed_norm, eps);

        let max_len = sequences.iter().map(Vec::len).max().unwrap_or(0);
        let mut qkv = vec![0f32; total * 3 * h];
        let mut context = vec![0f32; total * h];
        let mut scores = vec![0f32; max_len * max_len];
        let mut projected = vec![0f32; total * h];
        let mut intermediate = vec![0f32; total * inter];
        let scale = 1.0 / (head_dim as f32).sqrt();

        for layer in &self.layers {
            linear(&x, total, h, &layer.qkv_weight, &layer.qkv_bias, 3 * h, &mut qkv);
            let mut start = 0;
            for seq in sequences {
                let len = seq.len();
                for head in 0..heads {
                    let col = head * head_dim;
                    let strided = |offset: usize| View {
                        data: &qkv,
                        offset: start * 3 * h + offset + col,
                        rows: len,
                        cols: head_dim,
                        row_stride: 3 * h,
                        col_stride: 1,
                    };
                    let (q, k, v) = (strided(0), strided(h), strided(2 * h));
                    gemm(scale, q, k.t(), 0.0, &mut scores, 0, len);
                    for r in 0..len {
                        softmax_in_place(&mut scores[r * len..(r + 1) * len]);
                    }
                    gemm(1.0, View::dense(&scores, len, len), v, 0.0, &mut context, start * h + col, h);
                }
                start += len;
            }
            linear(&context, total, h, &layer.attn_out_weight, &layer.attn_out_bias, h, &mut projected);
            add_in_place(&mut x, &projected);
            layer_norm_rows(&mut x, h, &layer.attn_norm, eps);

            linear(&x, total, h, &layer.inter_weight, &layer.inter_bias, inter, &mut intermediate);
            intermediate.iter_mut().for_each(|v| *v = gelu(*v));
            linear(&intermediate, total, inter, &layer.out_weight, &layer.out_bias, h, &mut projected);
            add_in_place(&mut x, &projected);
            layer_norm_rows(&mut x, h, &layer.out_norm, eps);
        }

        let mut pooled = Vec::with_capacity(sequences.len());
        let mut start = 0;
        for seq in sequences {
            let len = seq.len();
            let mut mean = vec![0f64; h];
            for r in start..start + len {
                for (m, v) in mean.iter_mut().zip(&x[r * h..(r + 1) * h]) {
                    *m += f64::from(*v);
                }
            }
            let norm = mean.iter().map(|m| m * m).sum::<f64>().sqrt().max(1e-12 * len as f64);
            pooled.push(mean.iter().map(|m| (m / norm) as f32).collect());
            start += len;
        }
        pooled
    }
}

/// `out[rows, out_dim] = input[rows, in_dim] · weightᵀ + bias`, with `weight` stored `[out_dim, in_dim]`.
fn linear(input: &[f32], rows: usize, in_dim: usize, weight: &[f32], bias: &[f32], out_dim: usize, out: &mut [f32]) {
    for r in 0..rows {
        out[r * out_dim..(r + 1) * out_dim].copy_from_slice(bias);
    }
    gemm(
        1.0,
        View::dense(&input[..rows * in_dim], rows, in_dim),
        View::dense_transposed(weight, out_dim, in_dim),
        1.0,
        out,
        0,
        out_dim,
    );
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += *b;
    }
}

fn layer_norm_rows(x: &mut [f32], width: usize, norm: &LayerNorm, eps: f32) {
    for row in x.chunks_exact_mut(width) {
        let mean = row.iter().sum::<f32>() / width as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / width as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, w), b) in row.iter_mut().zip(&norm.weight).zip(&norm.bias) {
            *v = (*v - mean) * inv * w + b;
        }
    }
}

fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// Exact (erf) GELU, as HF's `"gelu"`.
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7), plenty for f32 activations; std has no stable erf.
fn erf(x: f32) -> f32 {
    let sign = if x < 0.0 { -1.0 } else { 1.0 };
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    sign * (1.0 - poly * (-a * a).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_reference_values() {
        // erf(0.5), erf(1), erf(2), erf(-1.5) from tables.
        for (x, want) in [(0.5, 0.520_499_9), (1.0, 0.842_700_8), (2.0, 0.995_322_3), (-1.5, -0.966_105_1)] {
            assert!((erf(x) - want).abs() < 3e-7, "erf({x}) = {} want {want}", erf(x));
        }
        assert!(erf(0.0).abs() < 3e-7);
    }
}

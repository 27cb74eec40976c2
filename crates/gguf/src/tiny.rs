//! Tiny random gpt-oss models with the real o200k_harmony vocabulary, for tests that need llama.cpp
//! to load something real without any downloaded weights.

use std::path::{Path, PathBuf};

use crate::error::{GgufError, Result};
use crate::gpt_oss::{self, DtypePlan, GptOssHparams, TensorRole};
use crate::rng::SplitMix64;
use crate::types::GgmlType;
use crate::vocab;
use crate::writer::{GgufWriter, TensorSpec};

#[derive(Debug, Clone, PartialEq)]
pub struct TinyConfig {
    pub seed: u64,
    pub hidden: u32,
    pub layers: u32,
    pub heads: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub experts: u32,
    pub experts_used: u32,
    pub ff: u32,
    pub rope_theta: f32,
    /// YaRN factor over `original_context`; `None` for plain RoPE.
    pub yarn_factor: Option<f32>,
    pub original_context: u32,
    pub sliding_window: u32,
    /// F32 (default, exact) or MXFP4 (what real models use).
    pub expert_type: GgmlType,
    /// Storage for embeddings, output and attention matrices: F32 (default), F16 or Q8_0.
    pub dense_type: GgmlType,
}

impl Default for TinyConfig {
    fn default() -> Self {
        TinyConfig {
            seed: 0,
            hidden: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            experts: 4,
            experts_used: 2,
            ff: 64,
            rope_theta: 150_000.0,
            yarn_factor: Some(32.0),
            original_context: 4096,
            sliding_window: 128,
            expert_type: GgmlType::F32,
            dense_type: GgmlType::F32,
        }
    }
}

impl TinyConfig {
    pub fn with_seed(seed: u64) -> Self {
        TinyConfig { seed, ..Self::default() }
    }

    pub fn hparams(&self) -> GptOssHparams {
        let factor = self.yarn_factor.unwrap_or(1.0);
        GptOssHparams {
            n_vocab: vocab::VOCAB_SIZE as u32,
            n_embd: self.hidden,
            n_layer: self.layers,
            n_head: self.heads,
            n_head_kv: self.kv_heads,
            head_dim: self.head_dim,
            n_expert: self.experts,
            n_expert_used: self.experts_used,
            n_ff_exp: self.ff,
            context_length: (self.original_context as f32 * factor) as u32,
            rope_theta: self.rope_theta,
            yarn_factor: self.yarn_factor,
            yarn_original_context: self.original_context,
            sliding_window: self.sliding_window,
            rms_eps: 1e-5,
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(GgufError::Writer(format!("tiny config: {m}")));
        if self.layers == 0 || self.heads == 0 || self.kv_heads == 0 || self.experts == 0 {
            return bad("layers, heads, kv_heads and experts must be positive");
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad("heads must be a multiple of kv_heads");
        }
        if self.experts_used == 0 || self.experts_used > self.experts {
            return bad("experts_used must be between 1 and experts");
        }
        if !matches!(self.expert_type, GgmlType::F32 | GgmlType::F16 | GgmlType::Mxfp4 | GgmlType::Q8_0) {
            return bad("expert_type must be F32, F16, Q8_0 or MXFP4");
        }
        if !matches!(self.dense_type, GgmlType::F32 | GgmlType::F16 | GgmlType::Q8_0) {
            return bad("dense_type must be F32, F16 or Q8_0");
        }
        let needs_blocks = [self.expert_type, self.dense_type].iter().any(|t| t.block_elems() > 1);
        if needs_blocks
            && (!self.hidden.is_multiple_of(32)
                || !self.ff.is_multiple_of(32)
                || !(self.heads * self.head_dim).is_multiple_of(32))
        {
            return bad("quantized types need hidden, ff and heads*head_dim to be multiples of 32");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TinyModelInfo {
    pub path: PathBuf,
    pub file_bytes: u64,
    pub tensor_count: usize,
    pub parameter_count: u64,
    pub hparams: GptOssHparams,
}

pub(crate) fn init_scale(role: TensorRole) -> (f32, f32) {
    match role {
        TensorRole::Embedding => (0.0, 1.0),
        TensorRole::Norm => (1.0, 0.1),
        TensorRole::Matrix { fan_in } => (0.0, 1.0 / (fan_in.max(1) as f32).sqrt()),
        TensorRole::Bias => (0.0, 0.1),
        TensorRole::Sinks => (0.0, 1.0),
    }
}

/// Elements generated and encoded at a time, so 20b-sized tensors stream in bounded memory.
const CHUNK_ELEMS: usize = 1 << 22;

/// Stream deterministic random values for one tensor into the writer, scaled so activations stay
/// O(1) through the network. One generator per tensor name: values do not depend on chunking.
pub(crate) fn write_random_tensor(
    writer: &mut GgufWriter,
    seed: u64,
    spec: &TensorSpec,
    role: TensorRole,
) -> Result<()> {
    let (mean, std) = init_scale(role);
    let mut g = SplitMix64::for_stream(seed, &spec.name);
    let total = spec.n_elements() as usize;
    let mut buf = vec![0.0f32; total.min(CHUNK_ELEMS)];
    let mut done = 0;
    while done < total {
        let n = (total - done).min(CHUNK_ELEMS);
        g.fill_normal(&mut buf[..n], mean, std);
        writer.write_tensor_f32(&spec.name, &buf[..n])?;
        done += n;
    }
    Ok(())
}

/// Write a tiny random gpt-oss GGUF. Same config (seed included) -> byte-identical file.
pub fn write_tiny_model(path: &Path, config: &TinyConfig) -> Result<TinyModelInfo> {
    let _span = tracing::info_span!("write_tiny_model", path = %path.display(), seed = config.seed).entered();
    config.validate()?;
    let hp = config.hparams();
    let plan = DtypePlan {
        embeddings: config.dense_type,
        output: config.dense_type,
        attention: config.dense_type,
        experts: config.expert_type,
    };
    let layout = gpt_oss::tensor_layout(&hp, &plan);
    let mut metadata = hp.metadata(&format!("safeguard tiny gpt-oss (seed {})", config.seed));
    metadata.extend(gpt_oss::tokenizer_metadata(vocab::harmony_vocab()?));
    let specs: Vec<TensorSpec> = layout.iter().map(|(s, _)| s.clone()).collect();
    let parameter_count = specs.iter().map(|s| s.n_elements()).sum();
    let mut writer = GgufWriter::create(path, &metadata, specs)?;
    for (spec, role) in &layout {
        write_random_tensor(&mut writer, config.seed, spec, *role)?;
    }
    let file_bytes = writer.finish()?;
    Ok(TinyModelInfo { path: path.to_path_buf(), file_bytes, tensor_count: layout.len(), parameter_count, hparams: hp })
}

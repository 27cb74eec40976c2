//! gpt-oss hyper-parameters, GGUF metadata keys and tensor layout as llama.cpp's `LLM_ARCH_OPENAI_MOE`
//! loader expects them (src/models/openai-moe.cpp, llama-arch.cpp).

use crate::error::{GgufError, Result};
use crate::reader::GgufFile;
use crate::types::GgmlType;
use crate::value::{MetaArray, MetaValue};
use crate::vocab::{self, HarmonyVocab};
use crate::writer::TensorSpec;

pub const ARCH: &str = "gpt-oss";

#[derive(Debug, Clone, PartialEq)]
pub struct GptOssHparams {
    pub n_vocab: u32,
    pub n_embd: u32,
    pub n_layer: u32,
    pub n_head: u32,
    pub n_head_kv: u32,
    pub head_dim: u32,
    pub n_expert: u32,
    pub n_expert_used: u32,
    pub n_ff_exp: u32,
    pub context_length: u32,
    pub rope_theta: f32,
    /// YaRN factor; `None` means plain RoPE.
    pub yarn_factor: Option<f32>,
    pub yarn_original_context: u32,
    pub sliding_window: u32,
    pub rms_eps: f32,
}

impl GptOssHparams {
    pub fn gpt_oss_20b() -> Self {
        GptOssHparams {
            n_vocab: vocab::VOCAB_SIZE as u32,
            n_embd: 2880,
            n_layer: 24,
            n_head: 64,
            n_head_kv: 8,
            head_dim: 64,
            n_expert: 32,
            n_expert_used: 4,
            n_ff_exp: 2880,
            context_length: 131_072,
            rope_theta: 150_000.0,
            yarn_factor: Some(32.0),
            yarn_original_context: 4096,
            sliding_window: 128,
            rms_eps: 1e-5,
        }
    }

    pub fn gpt_oss_120b() -> Self {
        GptOssHparams { n_layer: 36, n_expert: 128, ..Self::gpt_oss_20b() }
    }

    fn key(suffix: &str) -> String {
        format!("{ARCH}.{suffix}")
    }

    /// `general.*` and `gpt-oss.*` keys (no tokenizer).
    pub fn metadata(&self, name: &str) -> Vec<(String, MetaValue)> {
        let mut m: Vec<(String, MetaValue)> = vec![
            ("general.architecture".into(), ARCH.into()),
            ("general.name".into(), name.into()),
            (Self::key("context_length"), self.context_length.into()),
            (Self::key("embedding_length"), self.n_embd.into()),
            (Self::key("block_count"), self.n_layer.into()),
            (Self::key("feed_forward_length"), self.n_ff_exp.into()),
            (Self::key("attention.head_count"), self.n_head.into()),
            (Self::key("attention.head_count_kv"), self.n_head_kv.into()),
            (Self::key("attention.key_length"), self.head_dim.into()),
            (Self::key("attention.value_length"), self.head_dim.into()),
            (Self::key("rope.freq_base"), self.rope_theta.into()),
            (Self::key("attention.layer_norm_rms_epsilon"), self.rms_eps.into()),
            (Self::key("expert_count"), self.n_expert.into()),
            (Self::key("expert_used_count"), self.n_expert_used.into()),
            (Self::key("expert_feed_forward_length"), self.n_ff_exp.into()),
            (Self::key("attention.sliding_window"), self.sliding_window.into()),
            (Self::key("vocab_size"), self.n_vocab.into()),
        ];
        if let Some(factor) = self.yarn_factor {
            m.push((Self::key("rope.scaling.type"), "yarn".into()));
            m.push((Self::key("rope.scaling.factor"), factor.into()));
            m.push((Self::key("rope.scaling.original_context_length"), self.yarn_original_context.into()));
        }
        m
    }

    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        file.expect_architecture(ARCH)?;
        let u = |s: &str| file.get_u32(&Self::key(s));
        let f = |s: &str| file.get_f32(&Self::key(s));
        let n_embd = u("embedding_length")?;
        let n_head = u("attention.head_count")?;
        let yarn = match file.get(&Self::key("rope.scaling.type")).and_then(|v| v.as_str()) {
            Some("yarn") => Some(f("rope.scaling.factor")?),
            _ => None,
        };
        let n_vocab = match file.get(&Self::key("vocab_size")) {
            Some(_) => u("vocab_size")?,
            None => match file.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
                Some(a) => a.len() as u32,
                None => file
                    .tensor("token_embd.weight")
                    .and_then(|t| t.shape.get(1).copied())
                    .ok_or_else(|| GgufError::Malformed("cannot tell the vocabulary size".into()))?
                    as u32,
            },
        };
        Ok(GptOssHparams {
            n_vocab,
            n_embd,
            n_layer: u("block_count")?,
            n_head,
            n_head_kv: u("attention.head_count_kv")?,
            head_dim: u("attention.key_length").unwrap_or(n_embd / n_head.max(1)),
            n_expert: u("expert_count")?,
            n_expert_used: u("expert_used_count")?,
            n_ff_exp: u("expert_feed_forward_length")?,
            context_length: u("context_length")?,
            rope_theta: f("rope.freq_base")?,
            yarn_factor: yarn,
            yarn_original_context: u("rope.scaling.original_context_length").unwrap_or(0),
            sliding_window: u("attention.sliding_window")?,
            rms_eps: f("attention.layer_norm_rms_epsilon")?,
        })
    }

    /// True for the layers llama.cpp (pattern 2) and HF `layer_types` treat as sliding-window.
    pub fn is_sliding(&self, layer: u32) -> bool {
        layer.is_multiple_of(2)
    }
}

/// Storage types per tensor family. Norms, biases, sinks and the router stay F32 in every plan,
/// as in the official GGUFs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DtypePlan {
    pub embeddings: GgmlType,
    pub output: GgmlType,
    pub attention: GgmlType,
    pub experts: GgmlType,
}

impl DtypePlan {
    pub fn all(ty: GgmlType) -> Self {
        DtypePlan { embeddings: ty, output: ty, attention: ty, experts: ty }
    }

    /// The official gpt-oss GGUF layout: MXFP4 experts, Q8_0 everything large.
    pub fn official() -> Self {
        DtypePlan {
            embeddings: GgmlType::Q8_0,
            output: GgmlType::Q8_0,
            attention: GgmlType::Q8_0,
            experts: GgmlType::Mxfp4,
        }
    }
}

/// What a tensor is, so generators can pick an initialisation scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorRole {
    Embedding,
    Norm,
    /// A matrix; the value is its input (fan-in) width.
    Matrix {
        fan_in: u32,
    },
    Bias,
    Sinks,
}

/// Every tensor llama.cpp loads for gpt-oss, in file order, with ggml shapes.
pub fn tensor_layout(hp: &GptOssHparams, plan: &DtypePlan) -> Vec<(TensorSpec, TensorRole)> {
    let e = u64::from(hp.n_embd);
    let v = u64::from(hp.n_vocab);
    let q = u64::from(hp.n_head * hp.head_dim);
    let kv = u64::from(hp.n_head_kv * hp.head_dim);
    let x = u64::from(hp.n_expert);
    let ff = u64::from(hp.n_ff_exp);
    let f32 = GgmlType::F32;
    let mut out = vec![(TensorSpec::new("token_embd.weight", &[e, v], plan.embeddings), TensorRole::Embedding)];
    for i in 0..hp.n_layer {
        let n = |s: &str| format!("blk.{i}.{s}");
        let m = |fan_in: u32| TensorRole::Matrix { fan_in };
        out.extend([
            (TensorSpec::new(n("attn_norm.weight"), &[e], f32), TensorRole::Norm),
            (TensorSpec::new(n("attn_q.weight"), &[e, q], plan.attention), m(hp.n_embd)),
            (TensorSpec::new(n("attn_q.bias"), &[q], f32), TensorRole::Bias),
            (TensorSpec::new(n("attn_k.weight"), &[e, kv], plan.attention), m(hp.n_embd)),
            (TensorSpec::new(n("attn_k.bias"), &[kv], f32), TensorRole::Bias),
            (TensorSpec::new(n("attn_v.weight"), &[e, kv], plan.attention), m(hp.n_embd)),
            (TensorSpec::new(n("attn_v.bias"), &[kv], f32), TensorRole::Bias),
            (TensorSpec::new(n("attn_output.weight"), &[q, e], plan.attention), m(hp.n_head * hp.head_dim)),
            (TensorSpec::new(n("attn_output.bias"), &[e], f32), TensorRole::Bias),
            (TensorSpec::new(n("attn_sinks.weight"), &[u64::from(hp.n_head)], f32), TensorRole::Sinks),
            (TensorSpec::new(n("post_attention_norm.weight"), &[e], f32), TensorRole::Norm),
            (TensorSpec::new(n("ffn_gate_inp.weight"), &[e, x], f32), m(hp.n_embd)),
            (TensorSpec::new(n("ffn_gate_inp.bias"), &[x], f32), TensorRole::Bias),
            (TensorSpec::new(n("ffn_gate_exps.weight"), &[e, ff, x], plan.experts), m(hp.n_embd)),
            (TensorSpec::new(n("ffn_gate_exps.bias"), &[ff, x], f32), TensorRole::Bias),
            (TensorSpec::new(n("ffn_up_exps.weight"), &[e, ff, x], plan.experts), m(hp.n_embd)),
            (TensorSpec::new(n("ffn_up_exps.bias"), &[ff, x], f32), TensorRole::Bias),
            (TensorSpec::new(n("ffn_down_exps.weight"), &[ff, e, x], plan.experts), m(hp.n_ff_exp)),
            (TensorSpec::new(n("ffn_down_exps.bias"), &[e, x], f32), TensorRole::Bias),
        ]);
    }
    out.push((TensorSpec::new("output_norm.weight", &[e], f32), TensorRole::Norm));
    out.push((TensorSpec::new("output.weight", &[e, v], plan.output), TensorRole::Matrix { fan_in: hp.n_embd }));
    out
}

/// `tokenizer.ggml.*` keys for the o200k_harmony vocabulary.
pub fn tokenizer_metadata(vocab: HarmonyVocab) -> Vec<(String, MetaValue)> {
    vec![
        ("tokenizer.ggml.model".into(), "gpt2".into()),
        ("tokenizer.ggml.pre".into(), "gpt-4o".into()),
        ("tokenizer.ggml.tokens".into(), MetaArray::String(vocab.tokens).into()),
        ("tokenizer.ggml.token_type".into(), MetaArray::I32(vocab.token_types).into()),
        ("tokenizer.ggml.merges".into(), MetaArray::String(vocab.merges).into()),
        ("tokenizer.ggml.bos_token_id".into(), vocab::BOS.into()),
        ("tokenizer.ggml.eos_token_id".into(), vocab::EOS.into()),
        ("tokenizer.ggml.padding_token_id".into(), vocab::PAD.into()),
        // harmony prompts are rendered by us; llama.cpp must not prepend anything.
        ("tokenizer.ggml.add_bos_token".into(), false.into()),
        ("tokenizer.ggml.add_eos_token".into(), false.into()),
    ]
}

/// gpt-oss-20b's official tensor shapes, used to check `tensor_layout` against known numbers.
pub fn gpt_oss_20b_file_bytes() -> Result<u64> {
    let hp = GptOssHparams::gpt_oss_20b();
    tensor_layout(&hp, &DtypePlan::official()).iter().map(|(s, _)| s.n_bytes()).sum()
}

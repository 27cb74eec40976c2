//! The token-level Engine trait and its embedded llama.cpp implementation with policy-prefix caching and batching.
//!
//! Everything here works on token ids: prompt rendering (harmony) and parsing live in other crates.
//! The llama.cpp backend sits behind the `llama` cargo feature (default on); `cuda` adds GPU offload
//! (`EngineConfig::n_gpu_layers`) and needs the CUDA toolkit (nvcc) at build time.

pub mod debug;
pub mod model_file;
pub mod prefix_cache;
pub mod sampling;

#[cfg(feature = "llama")]
pub mod llama;

use std::path::PathBuf;

/// How the next token is picked from the model's distribution.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Sampling {
    /// The most probable token (lowest id on ties): the same verdict for the same prompt decoded alone, cold or
    /// warm. Decoded in one step with other requests, ggml may round a near tie the other way.
    #[default]
    Greedy,
    /// Random sampling that repeats for the same seed and prompt (under the same batching, as for `Greedy`).
    Seeded { seed: u32, temperature: f32, top_p: f32 },
}

/// One generation: `prefix` is the cacheable part of the prompt (system + developer messages), `suffix` the rest.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GenRequest {
    pub prefix: Vec<u32>,
    pub suffix: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: Sampling,
    /// Generation ends on any of these (the token is included in the output).
    pub stop: Vec<u32>,
    /// Set by whoever asked, once the answer is no longer wanted (a deadline passed, the client went away): the
    /// engine stops decoding the request at its next step instead of running on to `max_tokens`.
    pub cancel: CancelFlag,
}

/// A shared "stop decoding this" switch. Not part of what is asked: two requests that differ only in their flag
/// are equal.
#[derive(Debug, Clone, Default)]
pub struct CancelFlag(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl CancelFlag {
    pub fn cancel(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl PartialEq for CancelFlag {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl GenRequest {
    pub fn prompt_len(&self) -> usize {
        self.prefix.len() + self.suffix.len()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// One of the request's stop tokens was generated (it is the last of `Generation::tokens`).
    Stop(u32),
    MaxTokens,
    /// The sequence reached the engine's per-sequence context size.
    ContextFull,
    /// The request's [`CancelFlag`] was set: nobody waits for the rest.
    Cancelled,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub stop_reason: StopReason,
    /// Probability of each generated token under the model's untempered softmax, whatever the sampling:
    /// a confidence signal that does not depend on the sampling settings.
    pub token_probs: Vec<f32>,
    pub prompt_tokens: usize,
    /// Prompt tokens whose state came from the policy-prefix cache instead of being computed.
    pub cached_prompt_tokens: usize,
    pub prefill_ms: f64,
    pub decode_ms: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model file {path} not found")]
    ModelNotFound { path: PathBuf },
    #[error("cannot read model file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a GGUF file (first bytes {magic:02x?}, expected \"GGUF\")")]
    NotGguf { path: PathBuf, magic: Vec<u8> },
    #[error("{path} is truncated or corrupt: {detail}")]
    Truncated { path: PathBuf, detail: String },
    #[error("{path}: unsupported GGUF version {version} (supported: 2, 3)")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("{path} is a {found:?} model; this engine runs gpt-oss models (general.architecture = \"gpt-oss\")")]
    WrongArchitecture { path: PathBuf, found: Option<String> },
    #[error("invalid engine configuration: {0}")]
    InvalidConfig(String),
    #[error("llama.cpp could not load {path} (see SAFEGUARD_LOG=debug for its log)")]
    Load { path: PathBuf },
    #[error("llama.cpp could not create a context: {0}")]
    Context(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("token {token} is outside the model's vocabulary of {vocab} tokens")]
    InvalidToken { token: u32, vocab: usize },
    #[error("prompt of {tokens} tokens does not fit the per-sequence context of {n_ctx} tokens")]
    PromptTooLong { tokens: usize, n_ctx: usize },
    #[error("llama.cpp decode failed: {0}")]
    Decode(String),
    #[error("saving or restoring a prefix state failed: {0}")]
    State(String),
    #[error("the engine worker has stopped")]
    WorkerGone,
    /// A bug in the engine's own code; the engine cleared its sequences and caches and serves the next call.
    #[error("the engine failed on this call ({0}) and was reset")]
    Panicked(String),
}

/// Engine settings; `Default` suits a CPU box.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// CPU threads for decoding and prefill.
    pub threads: usize,
    /// Context size of each sequence (prompt + generated tokens).
    pub n_ctx: u32,
    /// Most tokens handed to one llama.cpp decode call.
    pub n_batch: u32,
    /// Most tokens computed in one physical step (llama.cpp splits a batch into ubatches).
    pub n_ubatch: u32,
    /// Requests decoded together in one batch; larger calls are processed in groups of this size.
    pub max_sequences: usize,
    /// Byte budget of the policy-prefix state cache (LRU); 0 disables caching.
    pub prefix_cache_bytes: usize,
    /// Mixed into every `Sampling::Seeded` seed, so that deployments can decorrelate their sampling.
    pub seed: u32,
    /// Layers offloaded to the GPU (CUDA builds only; ignored by CPU builds).
    pub n_gpu_layers: u32,
    /// Element type of the attention K/V cache. F16 halves its memory; F32 is what reference comparisons use.
    pub kv_cache: KvCacheType,
    /// Flash attention: `None` lets llama.cpp choose per backend. Its CPU kernel converts Q to F16 whatever
    /// the cache type, so exact comparisons with a reference turn it off.
    pub flash_attention: Option<bool>,
    /// Map the model file instead of reading it. Off by default: on CPU llama.cpp repacks the MXFP4 experts
    /// into interleaved copies, and with a mapping the file's pages stay resident beside them (20b shapes:
    /// peak RSS 22.6 GB mapped vs 12.4 GB read, same decode speed; BENCHMARKS.md). Mapping loads faster
    /// from a warm page cache.
    pub use_mmap: bool,
}

/// Element type of the attention K/V cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheType {
    #[default]
    F16,
    F32,
    /// About half of F16's memory; costs accuracy on long prompts.
    Q8_0,
}

impl std::str::FromStr for KvCacheType {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f16" => Ok(Self::F16),
            "f32" => Ok(Self::F32),
            "q8_0" | "q8" => Ok(Self::Q8_0),
            other => Err(EngineError::InvalidConfig(format!("unknown KV cache type {other:?}; use f16, f32 or q8_0"))),
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            threads: std::thread::available_parallelism().map_or(4, |n| n.get()),
            n_ctx: 8192,
            n_batch: 512,
            n_ubatch: 512,
            max_sequences: 4,
            prefix_cache_bytes: 1 << 30,
            seed: 0,
            n_gpu_layers: 0,
            kv_cache: KvCacheType::F16,
            flash_attention: None,
            use_mmap: false,
        }
    }
}

impl EngineConfig {
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |msg: &str| Err(EngineError::InvalidConfig(msg.to_string()));
        if self.threads == 0 || self.threads > 1024 {
            return bad("threads must be between 1 and 1024");
        }
        if self.n_ctx < 16 {
            return bad("n_ctx must be at least 16");
        }
        if self.n_batch == 0 || self.n_ubatch == 0 || self.n_ubatch > self.n_batch {
            return bad("need 0 < n_ubatch <= n_batch");
        }
        if self.max_sequences == 0 || self.max_sequences > 256 {
            return bad("max_sequences must be between 1 and 256");
        }
        if self.max_sequences as u32 > self.n_batch {
            return bad("max_sequences must not exceed n_batch");
        }
        Ok(())
    }
}

/// Statistics of the policy-prefix cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrefixCacheStats {
    pub entries: usize,
    pub bytes: usize,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
}

/// A token-level text generator. Implementations are synchronous; callers run them on blocking threads.
pub trait Engine: Send + Sync {
    fn model_id(&self) -> String;
    /// How many requests one [`generate`](Self::generate) decodes at a time; more are decoded in turn, that many
    /// at a time. Callers that hold a batch to a deadline give each such group its own.
    fn max_sequences(&self) -> usize {
        1
    }
    /// Prompt plus generated tokens that fit one sequence, when the engine has such a bound: a prompt longer than
    /// this fails, and one that leaves less room than its completion cap may be cut off before it answers.
    fn context_per_sequence(&self) -> Option<usize> {
        None
    }
    /// Decode several requests together (one batch); results in request order.
    /// `on_token(request_index, token)` is called for every generated token, as it is generated.
    fn generate(
        &self,
        requests: &[GenRequest],
        on_token: &(dyn Fn(usize, u32) + Sync),
    ) -> Vec<Result<Generation, EngineError>>;
}

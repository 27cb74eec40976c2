use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON for {what}: {source}")]
    Json {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error("model weights {path}: {source}")]
    Safetensors {
        path: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },
    #[error("tensor {name} is missing from the model weights")]
    MissingTensor { name: String },
    #[error("tensor {name} has shape {got:?}, expected {expected:?}")]
    TensorShape { name: String, expected: Vec<usize>, got: Vec<usize> },
    #[error("tensor {name} has dtype {dtype}; only F32, F16 and BF16 are supported")]
    TensorDtype { name: String, dtype: String },
    #[error("unsupported model configuration: {0}")]
    UnsupportedConfig(String),
    #[error("the vocabulary lacks the special token {0}")]
    MissingSpecialToken(&'static str),
    #[error("token id {id} is outside the model's vocabulary of {vocab_size}")]
    TokenOutOfRange { id: u32, vocab_size: usize },
    #[error("a sequence of {len} tokens does not fit the model (1..={max} tokens)")]
    SequenceLength { len: usize, max: usize },
    #[error("no sentence-encoder model found; tried: {tried}")]
    ModelNotFound { tried: String },
}

pub type Result<T, E = EmbedError> = std::result::Result<T, E>;

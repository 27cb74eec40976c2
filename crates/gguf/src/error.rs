use std::path::PathBuf;

/// Everything that can go wrong reading, writing, converting or downloading model files.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a GGUF file: magic bytes are {found:?}, expected \"GGUF\"")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported GGUF version {0} (this reader understands version 2 and 3)")]
    UnsupportedVersion(u32),
    #[error(
        "file is truncated: needed {needed} bytes at offset {offset} while reading {what}, but the file is {file_len} bytes"
    )]
    Truncated { what: String, offset: u64, needed: u64, file_len: u64 },
    #[error("malformed GGUF: {0}")]
    Malformed(String),
    #[error("tensor {name}: data [{start}, {end}) lies outside the file ({file_len} bytes)")]
    TensorOutOfBounds { name: String, start: u64, end: u64, file_len: u64 },
    #[error("unsupported ggml tensor type {0}")]
    UnsupportedType(u32),
    #[error("expected architecture {expected:?}, the file says {found:?}")]
    WrongArchitecture { expected: String, found: String },
    #[error("metadata key {key}: {problem}")]
    Metadata { key: String, problem: String },
    #[error("tensor {0} not found")]
    MissingTensor(String),
    #[error("tensor {name}: {problem}")]
    Tensor { name: String, problem: String },
    #[error("writer: {0}")]
    Writer(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("download: {0}")]
    Download(String),
}

impl GgufError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        GgufError::Io { path: path.into(), source }
    }
}

pub type Result<T, E = GgufError> = std::result::Result<T, E>;

//! GGUF reader and writer; tiny and 20b-shaped random gpt-oss models; HF checkpoint conversion; hub downloads.

pub mod convert;
pub mod error;
pub mod gpt_oss;
pub mod hub;
pub mod quant;
pub mod reader;
pub mod rng;
pub mod shapes20b;
pub mod tiny;
pub mod types;
pub mod value;
pub mod vocab;
pub mod writer;

pub use convert::convert_hf;
pub use error::{GgufError, Result};
pub use gpt_oss::{DtypePlan, GptOssHparams};
pub use reader::{GgufFile, TensorInfo};
pub use shapes20b::write_random_20b;
pub use tiny::{TinyConfig, TinyModelInfo, write_tiny_model};
pub use types::GgmlType;
pub use value::{MetaArray, MetaValue};
pub use writer::{GgufWriter, TensorSpec};

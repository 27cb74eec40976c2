//! The embedding head: a logistic-regression classifier on sentence embeddings (all-MiniLM-L6-v2 via
//! `safeguard-embed`) that gates triage's "confidently benign" band. Its threshold keeps the target recall
//! on out-of-fold scores of the primary (deployed-domain) datasets; auxiliary data only adds training signal.
//!
//! Optionally the head also takes a vote of the item's nearest labelled neighbours among the calibration
//! items: `score = logit + weight · (violation share of the k nearest − violation share overall)`. The vote
//! catches violations that sit in small clusters a linear boundary cuts through. On ToxicChat it raised
//! out-of-fold skip but moved test recall and skip in opposite directions depending on the recall target
//! (BENCHMARKS.md, session 11), so it is an option, not the default.
//!
//! Stored as `embedding_head.json` beside `model.json`, with the neighbours' embeddings and labels in
//! `embedding_head_neighbours.bin` (sha256 recorded in the JSON). The head is only meaningful with the exact
//! encoder it was trained on, so it records the encoder's fingerprint and loading refuses any other encoder.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

pub use safeguard_embed::DEFAULT_MAX_SEQ;
use safeguard_embed::SentenceEncoder;
pub use safeguard_embed::head::LogisticConfig;
use safeguard_embed::head::{
    LogisticRegression, NeighbourIndex, auc, copy_grouped_folds, copy_key, embed_all, out_of_fold_decisions,
    recall_and_skip, threshold_at_recall,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::TriageError;
use crate::train::Example;

pub const HEAD_FILE: &str = "embedding_head.json";
pub const HEAD_FORMAT_NAME: &str = "safeguard-triage-embedding-head";
/// Version 2 added the neighbour vote; version 1 heads (no vote) still load.
pub const HEAD_FORMAT_VERSION: u32 = 2;
const OLDEST_HEAD_FORMAT_VERSION: u32 = 1;
pub const NEIGHBOURS_FILE: &str = "embedding_head_neighbours.bin";
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
    /// `sha256:…` of the encoder's tokenizer.json ([`NO_TOKENIZER_FILE`] without one): its normalizer settings
    /// (lower-casing, accents) change the tokens, so a head must not score under another. `None` in heads made
    /// before it was recorded, which are checked on the fingerprint alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
}

/// The tokenizer fingerprint of an encoder directory without tokenizer.json (BERT-uncased defaults apply).
pub const NO_TOKENIZER_FILE: &str = "none";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadTraining {
    pub items: usize,
    pub violations: usize,
    /// Sources whose out-of-fold scores set the threshold.
    pub calibration_sources: Vec<usize>,
    /// Items from other sources, in every fold's training set (but the fold of a calibration copy of their text).
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

/// How the neighbour vote was set up; the rows themselves are in [`NEIGHBOURS_FILE`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NeighbourVoteMeta {
    /// Neighbours that vote.
    pub k: usize,
    /// Logit added per unit of violation share above `baseline`.
    pub weight: f64,
    /// Violation share among the stored rows; a vote at this share adds nothing.
    pub baseline: f64,
    pub items: usize,
    pub violations: usize,
    /// `sha256:…` of [`NEIGHBOURS_FILE`]: `items × dim` little-endian f32, then one byte (0 or 1) per label.
    pub sha256: String,
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
    /// `None`: the logit alone decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neighbours: Option<NeighbourVoteMeta>,
    pub training: HeadTraining,
    pub out_of_fold: HeadMetrics,
    /// RFC 3339, UTC.
    pub created: String,
    /// The triage model the head was saved with; beside any other it is refused. `None` in heads written before
    /// it was recorded, which load beside whatever model shares their directory, as they did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelTie>,
}

/// What names a triage model's `model.json`: its weights' checksum and when it was trained. A head copied into
/// another model's directory, or read mid-save beside the model it replaces, does not match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelTie {
    pub weights_sha256: String,
    pub created: String,
}

/// A located, loaded encoder and its fingerprint; shared by every head in the process.
pub struct LoadedEncoder {
    pub encoder: SentenceEncoder,
    pub dir: PathBuf,
    pub fingerprint: String,
    /// See [`EncoderInfo::tokenizer`].
    pub tokenizer: String,
}

impl std::fmt::Debug for LoadedEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedEncoder")
            .field("dir", &self.dir)
            .field("fingerprint", &self.fingerprint)
            .field("tokenizer", &self.tokenizer)
            .field("max_seq", &self.encoder.max_seq())
            .finish()
    }
}

/// `sha256:…` of the encoder's tokenizer.json, or [`NO_TOKENIZER_FILE`] when it has none.
pub fn tokenizer_fingerprint(dir: &Path) -> Result<String, TriageError> {
    let path = dir.join("tokenizer.json");
    match std::fs::read(&path) {
        Ok(bytes) => Ok(format!("sha256:{}", hex::encode(Sha256::digest(&bytes)))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(NO_TOKENIZER_FILE.into()),
        Err(source) => Err(TriageError::Io { path, source }),
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
    let tokenizer = tokenizer_fingerprint(&dir)?;
    let loaded = Arc::new(LoadedEncoder { encoder, dir, fingerprint, tokenizer });
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
    /// Add the vote of the nearest calibration items; `None`: the logit alone.
    pub neighbours: Option<NeighbourOptions>,
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NeighbourOptions {
    pub k: usize,
    /// Logit per unit of violation share above the base rate.
    pub weight: f64,
}

impl Default for NeighbourOptions {
    /// What measured best in research on ToxicChat (k 5–25 and weights 5–20 tried; BENCHMARKS.md, session 10).
    fn default() -> Self {
        NeighbourOptions { k: 10, weight: 10.0 }
    }
}

impl Default for HeadOptions {
    fn default() -> Self {
        HeadOptions {
            logistic: LogisticConfig::default(),
            folds: 5,
            target_recall: 0.99,
            calibration_sources: None,
            auxiliary_weight: None,
            neighbours: None,
            seed: 0,
        }
    }
}

#[derive(Clone)]
pub struct EmbeddingHead {
    pub meta: EmbeddingHeadMeta,
    encoder: Arc<LoadedEncoder>,
    /// Present exactly when `meta.neighbours` is.
    neighbours: Option<Arc<NeighbourIndex>>,
}

/// The head's score for one item and the neighbour vote inside it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeadScore {
    /// Compared with the threshold: `< threshold` allows.
    pub score: f64,
    /// Violation share among the nearest stored items, when the head votes.
    pub neighbour_share: Option<f64>,
    /// The text was longer than the encoder reads, and the score is of its start only.
    pub text_cut: bool,
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
        let fold_of = head_folds(examples, &calibration, options.folds, options.seed);
        let oof = out_of_fold_decisions(&x, &y, &weights, &fold_of, &options.logistic).map_err(head_error)?;
        let mut oof: Vec<f64> = calibration.iter().map(|&i| oof[i].unwrap_or(f64::NAN)).collect();
        let neighbours = match options.neighbours {
            None => None,
            Some(vote) => {
                let calibration_rows = calibration.iter().map(|&i| embeddings[i].as_slice());
                let folds: Vec<Option<usize>> = calibration.iter().map(|&i| fold_of[i]).collect();
                Some(add_out_of_fold_votes(&mut oof, calibration_rows, &calibration_labels, &folds, vote)?)
            }
        };

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
                tokenizer: Some(encoder.tokenizer.clone()),
            },
            c: options.logistic.c,
            balanced: options.logistic.balanced,
            folds: options.folds,
            target_recall: options.target_recall,
            threshold,
            bias: model.bias,
            weights: model.weights.iter().map(|&w| w as f32).collect(),
            neighbours: neighbours.as_ref().map(|(meta, _)| meta.clone()),
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
            // Set by the model the head joins (`TriageModel::with_embedding_head`).
            model: None,
        };
        Ok(EmbeddingHead { meta, encoder, neighbours: neighbours.map(|(_, index)| Arc::new(index)) })
    }

    /// Pairs stored metadata of a head without a neighbour vote with an encoder (see [`Self::from_parts`]).
    pub fn from_meta(meta: EmbeddingHeadMeta, encoder: Arc<LoadedEncoder>) -> Result<Self, TriageError> {
        Self::from_parts(meta, encoder, None)
    }

    /// Pairs stored metadata with an encoder and the neighbour rows it names, refusing an encoder other than
    /// the one it was trained on and rows other than the ones it was calibrated with.
    pub fn from_parts(
        meta: EmbeddingHeadMeta,
        encoder: Arc<LoadedEncoder>,
        neighbours: Option<NeighbourIndex>,
    ) -> Result<Self, TriageError> {
        if meta.format != HEAD_FORMAT_NAME
            || !(OLDEST_HEAD_FORMAT_VERSION..=HEAD_FORMAT_VERSION).contains(&meta.format_version)
        {
            return Err(TriageError::InvalidArtifact(format!(
                "{HEAD_FILE}: format {:?} version {}, this build reads {HEAD_FORMAT_NAME:?} versions \
                 {OLDEST_HEAD_FORMAT_VERSION} to {HEAD_FORMAT_VERSION}",
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
        if let Some(tokenizer) = &meta.encoder.tokenizer
            && *tokenizer != encoder.tokenizer
        {
            return Err(TriageError::InvalidArtifact(format!(
                "{HEAD_FILE} was trained with tokenizer.json {tokenizer} but the encoder found at {} has {}; \
                 install the encoder it was trained with or retrain the head",
                encoder.dir.display(),
                encoder.tokenizer
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
        let neighbours = match (&meta.neighbours, neighbours) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(TriageError::InvalidArtifact(format!(
                    "{HEAD_FILE} votes with stored neighbours but none were given ({NEIGHBOURS_FILE})"
                )));
            }
            (None, Some(_)) => {
                return Err(TriageError::InvalidArtifact(format!(
                    "neighbour rows were given for a head in {HEAD_FILE} that does not vote"
                )));
            }
            (Some(vote), Some(index)) => {
                let violations = index.labels().iter().filter(|&&l| l).count();
                if index.dim() != encoder.encoder.dim() || index.len() != vote.items || violations != vote.violations {
                    return Err(TriageError::InvalidArtifact(format!(
                        "{NEIGHBOURS_FILE} holds {} rows ({violations} violations) of {} dimensions; {HEAD_FILE} \
                         expects {} rows ({} violations) of {}",
                        index.len(),
                        index.dim(),
                        vote.items,
                        vote.violations,
                        encoder.encoder.dim()
                    )));
                }
                if vote.k == 0 || !(vote.weight.is_finite() && vote.baseline.is_finite()) {
                    return Err(TriageError::InvalidArtifact(format!(
                        "{HEAD_FILE}: the neighbour vote needs k ≥ 1 and a finite weight and baseline"
                    )));
                }
                Some(Arc::new(index))
            }
        };
        Ok(EmbeddingHead { meta, encoder, neighbours })
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
        let readable = version
            .and_then(|v| v.as_u64())
            .is_some_and(|v| (u64::from(OLDEST_HEAD_FORMAT_VERSION)..=u64::from(HEAD_FORMAT_VERSION)).contains(&v));
        if format != Some(HEAD_FORMAT_NAME) || !readable {
            let version = version.map_or("none".to_string(), |v| v.to_string());
            return Err(invalid(format!(
                "format {format:?} version {version}; this build reads {HEAD_FORMAT_NAME:?} versions \
                 {OLDEST_HEAD_FORMAT_VERSION} to {HEAD_FORMAT_VERSION}; retrain the head"
            )));
        }
        let meta: EmbeddingHeadMeta = serde_json::from_value(raw).map_err(|e| invalid(e.to_string()))?;
        let neighbours = match &meta.neighbours {
            None => None,
            Some(vote) => Some(read_neighbours(&dir.join(NEIGHBOURS_FILE), vote, meta.encoder.dim)?),
        };
        let encoder = shared_encoder(encoder_dir, meta.encoder.max_seq).map_err(|e| {
            TriageError::InvalidArtifact(format!("{} has an embedding head but no usable encoder: {e}", dir.display()))
        })?;
        match Self::from_parts(meta, encoder, neighbours) {
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

    /// Approximately how many bytes of heap the head holds of its own: its weights and neighbour rows. The
    /// encoder is not counted: it is loaded once per process and shared by every head ([`shared_encoder`]).
    pub fn memory_usage(&self) -> usize {
        let weights = self.meta.weights.capacity().saturating_mul(size_of::<f32>());
        let neighbours = self.neighbours.as_ref().map_or(0, |index| {
            index.rows().len().saturating_mul(size_of::<f32>()).saturating_add(index.labels().len())
        });
        weights.saturating_add(neighbours)
    }

    /// The head's score for `text`. An encoder failure (a panic inside it, or an embedding of the wrong shape
    /// or with non-finite values) is an error, which the caller must treat as "cannot allow".
    pub fn score(&self, text: &str) -> Result<HeadScore, TriageError> {
        let (embedded, text_cut) =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.encoder.encoder.embed_noting_cut(text)))
                .map_err(|_| TriageError::Encoder("the sentence encoder panicked".into()))?;
        Ok(HeadScore { text_cut, ..self.score_embedding(&embedded)? })
    }

    pub fn score_embedding(&self, embedding: &[f32]) -> Result<HeadScore, TriageError> {
        if embedding.len() != self.meta.weights.len() {
            return Err(TriageError::Encoder(format!(
                "embedding has {} dimensions, the head expects {}",
                embedding.len(),
                self.meta.weights.len()
            )));
        }
        let logit = embedding.iter().zip(&self.meta.weights).map(|(x, w)| f64::from(*x) * f64::from(*w)).sum::<f64>()
            + self.meta.bias;
        let mut score = HeadScore { score: logit, neighbour_share: None, text_cut: false };
        if let (Some(index), Some(vote)) = (&self.neighbours, &self.meta.neighbours) {
            let share = index
                .positive_share(embedding, vote.k, |_| true)
                .ok_or_else(|| TriageError::Encoder("no neighbour vote for this embedding".into()))?;
            score = HeadScore {
                score: logit + vote.weight * (share - vote.baseline),
                neighbour_share: Some(share),
                text_cut: false,
            };
        }
        if score.score.is_finite() { Ok(score) } else { Err(TriageError::Encoder("non-finite embedding score".into())) }
    }

    pub fn to_json(&self) -> Result<Vec<u8>, TriageError> {
        serde_json::to_vec_pretty(&self.meta)
            .map_err(|e| TriageError::InvalidArtifact(format!("serializing {HEAD_FILE}: {e}")))
    }

    /// The bytes of [`NEIGHBOURS_FILE`], when the head votes.
    pub fn neighbours_file(&self) -> Option<Vec<u8>> {
        self.neighbours.as_deref().map(neighbours_to_bytes)
    }
}

/// The head's out-of-fold fold per example. Calibration items are folded by [`copy_grouped_folds`]: copies of a
/// text (as [`copy_key`] reads it: lowercased, whitespace runs as one space) share a fold, stratified by (source, label), so no copy scores another out of
/// fold, as a training row of the logit or as a neighbour at distance 0 in the vote. An auxiliary item that is
/// a copy of a calibration text is held out with it (and scored, unused); other auxiliary items are `None`, in
/// every fold's training set. Without copies and from one source these are the per-row stratified folds.
fn head_folds(examples: &[Example], calibration: &[usize], folds: usize, seed: u64) -> Vec<Option<usize>> {
    let texts: Vec<&str> = calibration.iter().map(|&i| examples[i].text.as_str()).collect();
    let strata: Vec<(usize, bool)> = calibration.iter().map(|&i| (examples[i].source, examples[i].violates)).collect();
    let mut fold_of = vec![None; examples.len()];
    let mut fold_of_key = HashMap::new();
    for (&i, fold) in calibration.iter().zip(copy_grouped_folds(&texts, &strata, folds, seed)) {
        fold_of[i] = Some(fold);
        fold_of_key.insert(copy_key(&examples[i].text), fold);
    }
    for (example, fold) in examples.iter().zip(&mut fold_of) {
        if fold.is_none() {
            *fold = fold_of_key.get(&copy_key(&example.text)).copied();
        }
    }
    fold_of
}

/// Adds each calibration item's out-of-fold neighbour vote to its score: its neighbours are the calibration
/// items of the other folds, as a new item's are all of them once deployed. Returns the vote's metadata and
/// the index of all calibration rows.
fn add_out_of_fold_votes<'a>(
    oof: &mut [f64],
    rows: impl Iterator<Item = &'a [f64]>,
    labels: &[bool],
    folds: &[Option<usize>],
    vote: NeighbourOptions,
) -> Result<(NeighbourVoteMeta, NeighbourIndex), TriageError> {
    if vote.k == 0 || !(vote.weight.is_finite() && vote.weight >= 0.0) {
        return Err(TriageError::InvalidConfig(format!(
            "the neighbour vote needs k ≥ 1 and a weight ≥ 0 (got k {}, weight {})",
            vote.k, vote.weight
        )));
    }
    let mut flat = Vec::new();
    let mut dim = 0;
    for row in rows {
        dim = row.len();
        flat.extend(row.iter().map(|&v| v as f32));
    }
    let index = NeighbourIndex::new(flat, labels.to_vec(), dim).map_err(head_error)?;
    let violations = labels.iter().filter(|&&l| l).count();
    let baseline = violations as f64 / labels.len() as f64;
    let _span = tracing::info_span!("neighbour_votes_out_of_fold", items = labels.len(), k = vote.k).entered();
    for (position, score) in oof.iter_mut().enumerate() {
        let fold = folds[position];
        let query = &index.rows()[position * dim..(position + 1) * dim];
        let share = index
            .positive_share(query, vote.k, |j| folds[j] != fold)
            .ok_or_else(|| TriageError::Training("embedding head: a fold has no neighbours outside itself".into()))?;
        *score += vote.weight * (share - baseline);
    }
    let meta = NeighbourVoteMeta {
        k: vote.k,
        weight: vote.weight,
        baseline,
        items: labels.len(),
        violations,
        sha256: sha256_tag(&neighbours_to_bytes(&index)),
    };
    Ok((meta, index))
}

fn sha256_tag(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn neighbours_to_bytes(index: &NeighbourIndex) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(index.rows().len() * 4 + index.len());
    for v in index.rows() {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    bytes.extend(index.labels().iter().map(|&l| u8::from(l)));
    bytes
}

/// Reads and checks [`NEIGHBOURS_FILE`] against the head's record of it.
fn read_neighbours(path: &Path, vote: &NeighbourVoteMeta, dim: usize) -> Result<NeighbourIndex, TriageError> {
    let invalid = |why: String| TriageError::InvalidArtifact(format!("{}: {why}", path.display()));
    let bytes = std::fs::read(path).map_err(|source| TriageError::Io { path: path.to_path_buf(), source })?;
    let actual = sha256_tag(&bytes);
    if actual != vote.sha256 {
        return Err(invalid(format!(
            "checksum {actual} does not match {} recorded in {HEAD_FILE}; the two files are from different \
             trainings, retrain the head",
            vote.sha256
        )));
    }
    let expected_len = |values: usize| values.checked_mul(4).and_then(|b| b.checked_add(vote.items));
    let values = vote.items.checked_mul(dim).filter(|&v| expected_len(v) == Some(bytes.len()));
    let Some(values) = values else {
        return Err(invalid(format!(
            "{} bytes are not {} rows of {dim} f32 and their labels",
            bytes.len(),
            vote.items
        )));
    };
    let (row_bytes, label_bytes) = bytes.split_at(values * 4);
    let rows: Vec<f32> = row_bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let mut labels = Vec::with_capacity(vote.items);
    for &b in label_bytes {
        match b {
            0 => labels.push(false),
            1 => labels.push(true),
            other => return Err(invalid(format!("label byte {other} is neither 0 nor 1"))),
        }
    }
    NeighbourIndex::new(rows, labels, dim).map_err(|e| invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use safeguard_embed::head::{SplitMix, auc, stratified_folds};

    use super::*;

    /// Random unit vectors in 16 dimensions; `clustered` puts violations near one pole, otherwise labels
    /// are independent of the rows.
    fn rows(n: usize, clustered: bool) -> (Vec<Vec<f64>>, Vec<bool>) {
        let mut rng = SplitMix(11);
        let mut uniform = move || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
        let mut rows = Vec::new();
        let mut labels = Vec::new();
        for i in 0..n {
            let violates = i % 4 == 0;
            let mut row: Vec<f64> = (0..16).map(|_| uniform()).collect();
            if clustered && violates {
                row[0] += 2.0;
            }
            let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
            rows.push(row.into_iter().map(|v| v / norm).collect());
            labels.push(violates);
        }
        (rows, labels)
    }

    fn out_of_fold_votes(clustered: bool) -> (Vec<f64>, Vec<bool>, NeighbourVoteMeta) {
        let (rows, labels) = rows(400, clustered);
        let folds: Vec<Option<usize>> = stratified_folds(&labels, 5, 0).into_iter().map(Some).collect();
        let mut scores = vec![0.0; rows.len()];
        let vote = NeighbourOptions { k: 1, weight: 1.0 };
        let (meta, index) =
            add_out_of_fold_votes(&mut scores, rows.iter().map(Vec::as_slice), &labels, &folds, vote).unwrap();
        assert_eq!(index.len(), 400);
        (scores, labels, meta)
    }

    #[test]
    fn an_item_never_votes_for_itself_out_of_fold() {
        // With itself among its candidates, k = 1 would return each item's own label: AUC exactly 1.
        let (scores, labels, meta) = out_of_fold_votes(false);
        assert_eq!((meta.items, meta.violations, meta.baseline), (400, 100, 0.25));
        let area = auc(&scores, &labels).unwrap();
        assert!(area < 0.7, "labels independent of the rows must not be predictable out of fold: AUC {area}");
        // Scores are share − baseline, and a single neighbour's share is 0 or 1.
        assert!(scores.iter().all(|&s| s == -0.25 || s == 0.75), "{scores:?}");
    }

    #[test]
    fn clustered_violations_are_found_by_their_neighbours() {
        let (scores, labels, _) = out_of_fold_votes(true);
        assert!(auc(&scores, &labels).unwrap() > 0.9);
    }

    /// A calibration set where six violations appear twice (differing in case and surrounding spaces), each with
    /// benign paraphrases nearby: every copy of a text sits in one fold, an auxiliary copy is held out with it,
    /// and a copy's out-of-fold vote comes from its nearest other neighbour, never from its twin at distance 0.
    #[test]
    fn copies_share_a_fold_and_never_vote_for_each_other() {
        let example = |text: String, violates: bool, source: usize| Example { text, violates, weight: 1.0, source };
        let mut examples = Vec::new();
        for i in 0..60 {
            examples.push(example(format!("benign item {i}"), false, 0));
        }
        for i in 0..20 {
            examples.push(example(format!("violation {i}"), true, 0));
        }
        for k in 0..6 {
            examples.push(example(format!("Copied threat {k}"), true, 0));
            examples.push(example(format!("paraphrase {k} of a threat"), false, 0));
            examples.push(example(format!("another paraphrase {k} of a threat"), false, 0));
        }
        for k in 0..6 {
            examples.push(example(format!("  copied THREAT {k}\n"), true, 0));
        }
        examples.push(example("COPIED THREAT 0".into(), true, 1));
        examples.push(example("an auxiliary item".into(), false, 1));
        let calibration: Vec<usize> = (0..examples.len()).filter(|&i| examples[i].source == 0).collect();
        let fold_of = head_folds(&examples, &calibration, 5, 0);

        let key = |i: usize| copy_key(&examples[i].text);
        let copies: Vec<usize> = calibration.iter().copied().filter(|&i| key(i).starts_with("copied threat")).collect();
        assert_eq!(copies.len(), 12);
        for &i in &copies {
            let twins: Vec<usize> = (0..examples.len()).filter(|&j| j != i && key(j) == key(i)).collect();
            assert!(!twins.is_empty());
            for j in twins {
                assert_eq!(fold_of[j], fold_of[i], "{:?} and {:?}", examples[i].text, examples[j].text);
            }
        }
        assert!(fold_of[..examples.len() - 1].iter().all(Option::is_some), "calibration items and the copy");
        assert_eq!(fold_of[examples.len() - 1], None, "an auxiliary item without a copy trains every fold");

        // Embeddings as the encoder gives them: copies identical, paraphrases close by, the rest anywhere.
        let mut rng = SplitMix(5);
        let mut uniform = move || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
        let mut by_key: HashMap<String, Vec<f64>> = HashMap::new();
        let mut rows = Vec::new();
        for &i in &calibration {
            let text = key(i);
            let anchor = text.split(' ').find_map(|w| w.parse::<usize>().ok()).filter(|_| text.contains("threat"));
            let row = match anchor {
                Some(k) => {
                    let base = by_key
                        .entry(format!("copied threat {k}"))
                        .or_insert_with(|| (0..16).map(|_| uniform()).collect())
                        .clone();
                    let nudge = if text.starts_with("copied") { 0.0 } else { 0.05 };
                    base.iter().map(|v| v + nudge * uniform()).collect()
                }
                None => (0..16).map(|_| uniform()).collect::<Vec<f64>>(),
            };
            let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
            rows.push(row.into_iter().map(|v| v / norm).collect::<Vec<f64>>());
        }
        let labels: Vec<bool> = calibration.iter().map(|&i| examples[i].violates).collect();
        let folds: Vec<Option<usize>> = calibration.iter().map(|&i| fold_of[i]).collect();
        let mut scores = vec![0.0; rows.len()];
        let vote = NeighbourOptions { k: 1, weight: 1.0 };
        let (meta, index) =
            add_out_of_fold_votes(&mut scores, rows.iter().map(Vec::as_slice), &labels, &folds, vote).unwrap();
        for (position, &i) in calibration.iter().enumerate() {
            if !key(i).starts_with("copied threat") {
                continue;
            }
            let query: Vec<f32> = rows[position].iter().map(|&v| v as f32).collect();
            let twin_free = |j: usize| folds[j] != folds[position] && key(calibration[j]) != key(i);
            let share = index.positive_share(&query, 1, twin_free).unwrap();
            assert_eq!(scores[position], share - meta.baseline, "{:?} was voted for by its twin", examples[i].text);
        }
    }

    #[test]
    fn a_vote_without_neighbours_or_weight_is_a_config_error() {
        let (rows, labels) = rows(8, true);
        let folds = vec![Some(0); 8];
        for vote in [NeighbourOptions { k: 0, weight: 1.0 }, NeighbourOptions { k: 3, weight: f64::NAN }] {
            let err = add_out_of_fold_votes(&mut [0.0; 8], rows.iter().map(Vec::as_slice), &labels, &folds, vote)
                .unwrap_err();
            assert!(matches!(err, TriageError::InvalidConfig(_)), "{err}");
        }
        // One fold only: no item has a neighbour outside its own fold.
        let vote = NeighbourOptions::default();
        let err =
            add_out_of_fold_votes(&mut [0.0; 8], rows.iter().map(Vec::as_slice), &labels, &folds, vote).unwrap_err();
        assert!(err.to_string().contains("no neighbours outside"), "{err}");
    }
}

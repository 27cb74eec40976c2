//! The trained triage model: fitting (cross-fitted calibration and thresholds), and the versioned
//! artifact directory (`model.json` + `weights.bin`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use safeguard_embed::head::copy_grouped_folds;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::TriageError;
use crate::calibrate::{BandMetrics, Calibration, allow_threshold, band_metrics, fit_platt, violate_threshold};
use crate::data::DatasetProvenance;
use crate::embedding::{EmbeddingHead, HEAD_FILE, ModelTie, NEIGHBOURS_FILE};
use crate::features::{FeatureConfig, Featurizer};
use crate::train::{DomainAdaptation, Example, LinearModel, TrainConfig, train, violation_weight};

pub const FORMAT_NAME: &str = "safeguard-triage-model";
/// Bump when the meaning of any stored field or the featurization changes. Version 2 added
/// `features.length_feature`; version 1 artifacts (without it) still load and score as before, and builds that
/// read only version 1 refuse version 2 by its number instead of an unknown-field error.
pub const FORMAT_VERSION: u32 = 2;
/// Oldest `format_version` this build still reads.
pub const OLDEST_FORMAT_VERSION: u32 = 1;
pub const META_FILE: &str = "model.json";
pub const WEIGHTS_FILE: &str = "weights.bin";

/// Thresholds on the calibrated probability.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    /// The recall of violations `allow_below` was chosen to keep on held-out data.
    pub target_recall: f64,
    /// `p < allow_below`: confidently benign, the reasoning model is skipped.
    pub allow_below: f32,
    pub target_precision: f64,
    /// `p >= violate_above`: confidently violating. `None` when no threshold reached the target precision.
    pub violate_above: Option<f32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightsInfo {
    pub file: String,
    /// Always `f32le`: little-endian IEEE-754 single precision, one per hash bucket.
    pub dtype: String,
    pub count: usize,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingInfo {
    pub config: TrainConfig,
    /// Folds used to produce out-of-fold scores for calibration and thresholds.
    pub folds: usize,
    pub datasets: Vec<DatasetProvenance>,
    pub items: usize,
    pub violations: usize,
    pub violation_weight: f32,
    /// Sources whose out-of-fold scores set calibration and thresholds (`None`: all of them).
    #[serde(default)]
    pub calibration_sources: Option<Vec<usize>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingMetrics {
    /// Out-of-fold metrics at the chosen thresholds over the training items of the calibration sources.
    pub out_of_fold: BandMetrics,
    /// The same per input dataset, in `training.datasets` order.
    pub per_dataset: Vec<BandMetrics>,
}

/// Everything in `model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMeta {
    pub format: String,
    pub format_version: u32,
    pub policy_name: Option<String>,
    /// `sha256:…` of the policy body this model was trained for.
    pub policy_hash: String,
    pub features: FeatureConfig,
    pub bias: f32,
    pub weights: WeightsInfo,
    pub calibration: Calibration,
    pub thresholds: Thresholds,
    pub training: TrainingInfo,
    pub metrics: TrainingMetrics,
    /// RFC 3339, UTC.
    pub created: String,
}

/// A loaded or freshly trained triage classifier.
#[derive(Debug, Clone)]
pub struct TriageModel {
    pub meta: ModelMeta,
    linear: LinearModel,
    featurizer: Featurizer,
    /// Optional second opinion that gates the benign band; stored as its own file (`embedding_head.json`) so
    /// artifacts without it are unchanged.
    head: Option<EmbeddingHead>,
    /// What every result this model scores names it by, made once: `route` then allocates nothing for it.
    /// Read from `meta` as loaded (or fitted); a change to `meta` after that does not change it.
    identity: Arc<crate::TriageModelRef>,
}

/// Everything `fit` needs besides the data.
#[derive(Debug, Clone)]
pub struct FitOptions {
    pub features: FeatureConfig,
    pub train: TrainConfig,
    pub folds: usize,
    pub target_recall: f64,
    pub target_precision: f64,
    /// Fewest items above `violate_above` on held-out data for the precision estimate to count.
    pub min_violate_support: usize,
    pub policy_name: Option<String>,
    pub policy_hash: String,
    /// Sources (`Example::source`) whose out-of-fold scores set the calibration and thresholds; `None`: all.
    /// Other sources only add training signal, e.g. a large out-of-domain corpus whose recall does not matter
    /// where the model is deployed.
    pub calibration_sources: Option<Vec<usize>>,
}

impl Default for FitOptions {
    fn default() -> Self {
        FitOptions {
            features: FeatureConfig::default(),
            train: TrainConfig::default(),
            folds: 5,
            target_recall: 0.99,
            target_precision: 0.95,
            min_violate_support: 10,
            policy_name: None,
            policy_hash: String::new(),
            calibration_sources: None,
        }
    }
}

impl FitOptions {
    /// Makes sources `primaries..` auxiliary: they add training signal, with parameters of their own under
    /// `adaptation`, but set neither calibration nor thresholds; sources `0..primaries` are the deployed domain.
    pub fn with_auxiliary_sources(self, primaries: usize, adaptation: DomainAdaptation) -> Self {
        FitOptions {
            train: TrainConfig { domain_adaptation: adaptation, in_domain_sources: primaries.max(1), ..self.train },
            calibration_sources: Some((0..primaries).collect()),
            ..self
        }
    }
}

/// The fold of each example. Examples whose texts are equal as `copy_key` reads them (lowercased, whitespace runs as one space) are one unit and
/// share a fold: a copy on the training side would hand its label to the held-out score, and thresholds set
/// on such scores promise more than unseen traffic gets. Units are stratified by (source, label) of their
/// first example, with each label's rotation running on across sources; the embedding head's folds are made
/// by the same [`copy_grouped_folds`].
fn assign_folds(examples: &[Example], folds: usize, seed: u64) -> Vec<usize> {
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let strata: Vec<(usize, bool)> = examples.iter().map(|e| (e.source, e.violates)).collect();
    copy_grouped_folds(&texts, &strata, folds, seed ^ 0xf01d)
}

/// Out-of-fold margins: each item scored by a model that never saw it (nor a copy of its text); folds as
/// [`assign_folds`] makes them.
pub fn out_of_fold_margins(examples: &[Example], options: &FitOptions) -> Result<Vec<f32>, TriageError> {
    let folds = options.folds;
    if folds < 2 {
        return Err(TriageError::InvalidConfig("calibration needs at least 2 folds".into()));
    }
    let fold_of = assign_folds(examples, folds, options.train.seed);
    let featurizer = Featurizer::new(options.features.clone())?;
    let mut margins = vec![0.0f32; examples.len()];
    let all_violations = examples.iter().filter(|e| e.violates).count();
    for fold in 0..folds {
        let _span = tracing::info_span!("triage_fold", fold).entered();
        let train_set: Vec<&Example> =
            examples.iter().zip(&fold_of).filter(|(_, f)| **f != fold).map(|(e, _)| e).collect();
        // Copies of one text share a fold, so when a few texts (copied many times) hold every violation, a fold's
        // training side can lack them: said as such, not as data without violations.
        if train_set.is_empty() {
            return Err(TriageError::Training(format!(
                "fold {} of {folds} holds every item (they are copies of one text): nothing is left to train on",
                fold + 1
            )));
        }
        let violations = train_set.iter().filter(|e| e.violates).count();
        let lacks_a_class_the_data_has = (violations == 0 && all_violations > 0)
            || (violations == train_set.len() && all_violations < examples.len());
        if lacks_a_class_the_data_has {
            return Err(TriageError::Training(format!(
                "the training side of fold {} of {folds} has {violations} violations among {} items: the \
                 {} class is too few distinct texts (copies of a text share a fold); add more, or use fewer folds",
                fold + 1,
                train_set.len(),
                if violations == 0 { "violating" } else { "benign" },
            )));
        }
        let model = train(&train_set, &options.features, &options.train)?;
        for (i, e) in examples.iter().enumerate() {
            if fold_of[i] == fold {
                margins[i] = model.margin(&featurizer, &e.text);
            }
        }
    }
    Ok(margins)
}

/// Trains a model on all `examples`, with calibration and thresholds fitted on out-of-fold scores.
///
/// `allow_below` is the smallest of the per-dataset thresholds that each keep `target_recall` of that
/// dataset's violations, so a large easy dataset cannot buy its recall at the expense of a small hard one.
pub fn fit(
    examples: &[Example],
    datasets: Vec<DatasetProvenance>,
    options: &FitOptions,
) -> Result<TriageModel, TriageError> {
    let _span = tracing::info_span!("triage_fit", items = examples.len()).entered();
    if !(0.0..=1.0).contains(&options.target_recall) || !(0.0..=1.0).contains(&options.target_precision) {
        return Err(TriageError::InvalidConfig("target recall and precision must be within [0, 1]".into()));
    }
    let margins = out_of_fold_margins(examples, options)?;
    let sources = datasets.len().max(examples.iter().map(|e| e.source + 1).max().unwrap_or(0));
    let calibrates = |source: usize| options.calibration_sources.as_ref().is_none_or(|c| c.contains(&source));
    if !(0..sources).any(calibrates) {
        return Err(TriageError::InvalidConfig("calibration_sources names no source of the training data".into()));
    }
    let (calibration_margins, labels): (Vec<f32>, Vec<bool>) =
        examples.iter().zip(&margins).filter(|(e, _)| calibrates(e.source)).map(|(e, m)| (*m, e.violates)).unzip();
    let calibration = fit_platt(&calibration_margins, &labels)?;
    let probabilities: Vec<f32> = calibration_margins.iter().map(|&m| calibration.probability(m)).collect();

    let subset = |source: usize| -> (Vec<f32>, Vec<bool>) {
        examples
            .iter()
            .zip(&margins)
            .filter(|(e, _)| e.source == source)
            .map(|(e, m)| (calibration.probability(*m), e.violates))
            .unzip()
    };
    let mut allow_below = f32::INFINITY;
    for source in (0..sources).filter(|&s| calibrates(s)) {
        let (p, l) = subset(source);
        if let Some(t) = allow_threshold(&p, &l, options.target_recall) {
            allow_below = allow_below.min(t);
        }
    }
    if !allow_below.is_finite() {
        return Err(TriageError::Training("no violations in the training data".into()));
    }
    let violate_above =
        violate_threshold(&probabilities, &labels, options.target_precision, options.min_violate_support)
            .filter(|&t| t > allow_below);
    let out_of_fold = band_metrics(&probabilities, &labels, allow_below, violate_above);
    let per_dataset = (0..sources)
        .map(|s| {
            let (p, l) = subset(s);
            band_metrics(&p, &l, allow_below, violate_above)
        })
        .collect();

    let all: Vec<&Example> = examples.iter().collect();
    let linear = train(&all, &options.features, &options.train)?;
    let weights_sha = hex::encode(Sha256::digest(weights_to_bytes(&linear.weights)));
    let meta = ModelMeta {
        format: FORMAT_NAME.into(),
        format_version: FORMAT_VERSION,
        policy_name: options.policy_name.clone(),
        policy_hash: options.policy_hash.clone(),
        features: options.features.clone(),
        bias: linear.bias,
        weights: WeightsInfo {
            file: WEIGHTS_FILE.into(),
            dtype: "f32le".into(),
            count: linear.weights.len(),
            sha256: weights_sha,
        },
        calibration,
        thresholds: Thresholds {
            target_recall: options.target_recall,
            allow_below,
            target_precision: options.target_precision,
            violate_above,
        },
        training: TrainingInfo {
            config: options.train.clone(),
            folds: options.folds,
            datasets,
            items: examples.len(),
            violations: examples.iter().filter(|e| e.violates).count(),
            violation_weight: violation_weight(&all, options.train.class_weight),
            calibration_sources: options.calibration_sources.clone(),
        },
        metrics: TrainingMetrics { out_of_fold, per_dataset },
        created: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| "unknown".into()),
    };
    TriageModel::from_parts(meta, linear)
}

fn weights_to_bytes(weights: &[f32]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(weights.len() * 4);
    for w in weights {
        bytes.extend_from_slice(&w.to_le_bytes());
    }
    bytes
}

fn invalid(dir: &Path, detail: impl std::fmt::Display) -> TriageError {
    TriageError::InvalidArtifact(format!("{}: {detail}", dir.display()))
}

impl TriageModel {
    fn from_parts(meta: ModelMeta, linear: LinearModel) -> Result<Self, TriageError> {
        let featurizer = Featurizer::new(meta.features.clone())?;
        let identity = Arc::new(crate::TriageModelRef::of(&meta));
        Ok(TriageModel { meta, linear, featurizer, head: None, identity })
    }

    /// Adds (or replaces) the embedding head that must agree before an item is allowed. The head is this model's
    /// from now on: saved, it names this model ([`crate::embedding::EmbeddingHeadMeta::model`]).
    pub fn with_embedding_head(mut self, mut head: EmbeddingHead) -> Self {
        head.meta.model = Some(self.tie());
        self.head = Some(head);
        self
    }

    fn tie(&self) -> ModelTie {
        ModelTie { weights_sha256: self.meta.weights.sha256.clone(), created: self.meta.created.clone() }
    }

    pub fn embedding_head(&self) -> Option<&EmbeddingHead> {
        self.head.as_ref()
    }

    /// The compact identity a [`crate::TriageResult`] carries of the model that scored it.
    pub fn identity(&self) -> Arc<crate::TriageModelRef> {
        self.identity.clone()
    }

    /// Raw logit of the linear model.
    #[inline]
    pub fn margin(&self, text: &str) -> f32 {
        self.linear.margin(&self.featurizer, text)
    }

    #[inline]
    pub fn probability(&self, text: &str) -> f32 {
        self.meta.calibration.probability(self.margin(text))
    }

    pub fn featurizer(&self) -> &Featurizer {
        &self.featurizer
    }

    /// Approximately how many bytes of heap the model holds: its hashed n-gram weights (up to 2^24 of them) and
    /// its embedding head's own ([`EmbeddingHead::memory_usage`]; the shared encoder is not counted). The
    /// metadata, a few KiB, is left out.
    pub fn memory_usage(&self) -> usize {
        let weights = self.linear.weights.capacity().saturating_mul(size_of::<f32>());
        weights.saturating_add(self.head.as_ref().map_or(0, EmbeddingHead::memory_usage))
    }

    /// Writes `model.json` and `weights.bin` (and the head's files) into `dir` (created if needed). Every file is
    /// written whole under a temporary name before any is renamed into place: a full disk or a crash while
    /// writing leaves the model that was there untouched, where new weights beside the old `model.json` would
    /// refuse to load and leave the policy without its model until someone trained again. `model.json`, which
    /// names the others' checksums, is renamed last.
    pub fn save(&self, dir: &Path) -> Result<(), TriageError> {
        let io = |path: &Path| {
            let path = PathBuf::from(path);
            move |source| TriageError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut staged: Vec<(PathBuf, PathBuf)> = Vec::new();
        let mut stage = |name: &str, bytes: &[u8]| -> Result<(), TriageError> {
            let temp = dir.join(format!(".{name}.tmp"));
            let mut file = std::fs::File::create(&temp).map_err(io(&temp))?;
            file.write_all(bytes).map_err(io(&temp))?;
            file.sync_all().map_err(io(&temp))?;
            staged.push((temp, dir.join(name)));
            Ok(())
        };
        let mut stale = Vec::new();
        let staging = (|| -> Result<(), TriageError> {
            stage(WEIGHTS_FILE, &weights_to_bytes(&self.linear.weights))?;
            match &self.head {
                Some(head) => {
                    // Neighbours before the head that names their checksum: a crash in between leaves a head whose
                    // checksum does not match, which refuses to load, never a head voting with other rows.
                    match head.neighbours_file() {
                        Some(bytes) => stage(NEIGHBOURS_FILE, &bytes)?,
                        None => stale.push(NEIGHBOURS_FILE),
                    }
                    stage(HEAD_FILE, &head.to_json()?)?;
                }
                // A head left over from an earlier model in this directory would gate the new one.
                None => stale.extend([HEAD_FILE, NEIGHBOURS_FILE]),
            }
            let json = serde_json::to_vec_pretty(&self.meta)
                .map_err(|e| invalid(dir, format!("serializing metadata: {e}")))?;
            stage(META_FILE, &json)
        })();
        if let Err(error) = staging {
            for (temp, _) in &staged {
                let _ = std::fs::remove_file(temp);
            }
            return Err(error);
        }
        for (temp, target) in &staged {
            std::fs::rename(temp, target).map_err(io(target))?;
        }
        // Only once the new model is in place: removed first, a crash before the renames would leave the old
        // model loading without the head that gates its allows. Left behind by a crash here, an old head is tied
        // to the weights it was trained with and refuses to load beside the new ones: the policy goes without
        // triage (every item reasoned about) until it is trained again, never with a model that lost its gate.
        for name in stale {
            match std::fs::remove_file(dir.join(name)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&dir.join(name))(e)),
                _ => {}
            }
        }
        // The renames themselves are durable only once the directory is.
        if let Ok(handle) = std::fs::File::open(dir) {
            let _ = handle.sync_all();
        }
        Ok(())
    }

    /// Loads and validates an artifact directory: format name and version, feature config, weight count,
    /// checksum and finiteness. Any mismatch is an error saying what is wrong. An embedding head, if the
    /// directory has one, comes with its encoder, located as [`crate::shared_encoder`] does.
    pub fn load(dir: &Path) -> Result<Self, TriageError> {
        Self::load_with_encoder(dir, None)
    }

    /// [`TriageModel::load`] with the embedding head's encoder taken from `encoder_dir` when given.
    pub fn load_with_encoder(dir: &Path, encoder_dir: Option<&Path>) -> Result<Self, TriageError> {
        let model = Self::load_linear(dir)?;
        let Some(head) = EmbeddingHead::load_optional(dir, encoder_dir)? else { return Ok(model) };
        // A head copied beside another model (a new `model.json` and `weights.bin` dropped into a served
        // directory) would gate it unseen; so would one read mid-save beside the model it replaces.
        if let Some(tie) = head.meta.model.as_ref().filter(|tie| **tie != model.tie()) {
            return Err(invalid(
                dir,
                format!(
                    "{HEAD_FILE} belongs to another model (weights {}, trained {}), not this {META_FILE}'s \
                     (weights {}, trained {}); train them again together, or remove the head",
                    tie.weights_sha256, tie.created, model.meta.weights.sha256, model.meta.created
                ),
            ));
        }
        Ok(model.with_embedding_head(head))
    }

    fn load_linear(dir: &Path) -> Result<Self, TriageError> {
        let _span = tracing::info_span!("triage_model_load", dir = %dir.display()).entered();
        let meta_path = dir.join(META_FILE);
        let meta_bytes =
            std::fs::read(&meta_path).map_err(|source| TriageError::Io { path: meta_path.clone(), source })?;
        let raw: serde_json::Value = serde_json::from_slice(&meta_bytes)
            .map_err(|e| invalid(dir, format!("{META_FILE} is not valid JSON: {e}")))?;
        // Check the version before the full schema so an old or future artifact says so instead of
        // reporting some missing field.
        let format = raw.get("format").and_then(|v| v.as_str());
        if format != Some(FORMAT_NAME) {
            return Err(invalid(
                dir,
                format!("{META_FILE} is not a triage model (format {format:?}, expected {FORMAT_NAME:?})"),
            ));
        }
        let version = raw.get("format_version").and_then(|v| v.as_u64());
        if !version.is_some_and(|v| (OLDEST_FORMAT_VERSION as u64..=FORMAT_VERSION as u64).contains(&v)) {
            return Err(invalid(
                dir,
                format!(
                    "unsupported format_version {version:?}; this build reads versions {OLDEST_FORMAT_VERSION} to \
                     {FORMAT_VERSION}; retrain the model"
                ),
            ));
        }
        let meta: ModelMeta = serde_json::from_value(raw).map_err(|e| invalid(dir, format!("{META_FILE}: {e}")))?;
        meta.features.validate()?;
        if version == Some(1) && meta.features.length_feature {
            return Err(invalid(dir, "format_version 1 has no length feature; the file was edited or is damaged"));
        }
        meta.calibration.validate().map_err(|e| invalid(dir, e))?;
        if meta.weights.dtype != "f32le" {
            return Err(invalid(dir, format!("weights dtype {:?} unsupported (expected f32le)", meta.weights.dtype)));
        }
        if meta.weights.count != meta.features.buckets() {
            return Err(invalid(
                dir,
                format!(
                    "weights count {} does not match 2^{} hash buckets",
                    meta.weights.count, meta.features.hash_bits
                ),
            ));
        }
        if !meta.bias.is_finite() || !meta.thresholds.allow_below.is_finite() {
            return Err(invalid(dir, "bias and thresholds must be finite"));
        }
        // Thresholds are probabilities, and the benign band lies below the violating one: an edited or damaged
        // `allow_below` of 1.03 would skip the model for every item without rule evidence.
        let Thresholds { allow_below, violate_above, target_recall, .. } = meta.thresholds;
        if !(0.0..=1.0).contains(&allow_below)
            || violate_above.is_some_and(|v| !(allow_below..=1.0).contains(&v))
            || !(0.0..=1.0).contains(&target_recall)
        {
            return Err(invalid(
                dir,
                format!(
                    "thresholds out of range (allow_below {allow_below}, violate_above {violate_above:?}, target \
                     recall {target_recall}): each is a probability, and violate_above is not below allow_below"
                ),
            ));
        }
        // Only a plain file name: the artifact must not point outside its directory.
        if meta.weights.file.contains(['/', '\\']) || meta.weights.file.starts_with('.') {
            return Err(invalid(dir, format!("weights file name {:?} must be a plain file name", meta.weights.file)));
        }
        let weights_path = dir.join(&meta.weights.file);
        let bytes =
            std::fs::read(&weights_path).map_err(|source| TriageError::Io { path: weights_path.clone(), source })?;
        if bytes.len() != meta.weights.count * 4 {
            return Err(invalid(
                dir,
                format!(
                    "{} has {} bytes, expected {} ({} f32 weights)",
                    meta.weights.file,
                    bytes.len(),
                    meta.weights.count * 4,
                    meta.weights.count
                ),
            ));
        }
        let sha = hex::encode(Sha256::digest(&bytes));
        if sha != meta.weights.sha256 {
            return Err(invalid(
                dir,
                format!("{} checksum mismatch: file is corrupt or from another model", meta.weights.file),
            ));
        }
        let weights: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        if weights.iter().any(|w| !w.is_finite()) {
            return Err(invalid(dir, "weights contain non-finite values"));
        }
        let linear = LinearModel { weights, bias: meta.bias };
        Self::from_parts(meta, linear)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::SplitMix;
    use serde_json::json;

    fn tiny_data() -> Vec<Example> {
        let benign = [
            "what is the weather",
            "help me write code",
            "tell me a story about cats",
            "how do plants grow",
            "recipe for bread",
        ];
        let bad =
            ["how to make a bomb", "i will kill you", "poison my neighbour", "build a bomb at home", "kill them all"];
        let mut out = Vec::new();
        for round in 0..8 {
            for t in benign {
                out.push(Example { text: format!("{t} {round}"), violates: false, weight: 1.0, source: 0 });
            }
            for t in bad {
                out.push(Example { text: format!("{t} {round}"), violates: true, weight: 1.0, source: 0 });
            }
        }
        out
    }

    fn tiny_model() -> TriageModel {
        let options = FitOptions {
            features: FeatureConfig { hash_bits: 12, ..FeatureConfig::default() },
            target_recall: 0.9,
            min_violate_support: 3,
            policy_hash: "sha256:abc".into(),
            ..FitOptions::default()
        };
        fit(&tiny_data(), vec![], &options).unwrap()
    }

    #[test]
    fn save_load_round_trip_preserves_scores() {
        let model = tiny_model();
        assert!(model.probability("build a bomb to kill") > model.probability("recipe for cats"));
        let dir = tempfile::tempdir().unwrap();
        model.save(dir.path()).unwrap();
        let loaded = TriageModel::load(dir.path()).unwrap();
        assert_eq!(loaded.meta, model.meta);
        for text in ["how to make a bomb", "hello there", ""] {
            assert_eq!(loaded.margin(text), model.margin(text));
        }
        assert_eq!(std::fs::metadata(dir.path().join(WEIGHTS_FILE)).unwrap().len(), 4 * 4096);
    }

    /// A save that fails part way (here `model.json`'s temporary file cannot be made, as on a full disk) leaves
    /// the model that was there loadable and unchanged: no new weights beside the old metadata.
    #[test]
    fn a_save_that_fails_part_way_leaves_the_old_model_whole() {
        let dir = tempfile::tempdir().unwrap();
        let old = tiny_model();
        old.save(dir.path()).unwrap();
        let old_weights = std::fs::read(dir.path().join(WEIGHTS_FILE)).unwrap();
        let mut new = tiny_model();
        for weight in &mut new.linear.weights {
            *weight += 1.0;
        }
        std::fs::create_dir(dir.path().join(format!(".{META_FILE}.tmp"))).unwrap();
        assert!(new.save(dir.path()).is_err());
        assert_eq!(std::fs::read(dir.path().join(WEIGHTS_FILE)).unwrap(), old_weights);
        assert!(!dir.path().join(format!(".{WEIGHTS_FILE}.tmp")).exists(), "the staged weights are cleaned up");
        let loaded = TriageModel::load(dir.path()).unwrap();
        assert_eq!(loaded.margin("hello there"), old.margin("hello there"));
    }

    /// A head from an earlier model in the folder goes once a model without one is in place, and not before: a
    /// save that fails leaves it beside the model it gates.
    #[test]
    fn a_head_left_from_an_earlier_model_goes_only_once_the_new_model_is_in() {
        let dir = tempfile::tempdir().unwrap();
        tiny_model().save(dir.path()).unwrap();
        let head = dir.path().join(HEAD_FILE);
        std::fs::write(&head, b"{}").unwrap();
        let blocker = dir.path().join(format!(".{META_FILE}.tmp"));
        std::fs::create_dir(&blocker).unwrap();
        assert!(tiny_model().save(dir.path()).is_err());
        assert!(head.exists(), "a failed save removed the head of the model still in place");
        std::fs::remove_dir(&blocker).unwrap();
        tiny_model().save(dir.path()).unwrap();
        assert!(!head.exists(), "the earlier model's head would gate the new one");
        TriageModel::load(dir.path()).unwrap();
    }

    #[test]
    fn corrupt_or_foreign_artifacts_are_refused_clearly() {
        let model = tiny_model();
        let dir = tempfile::tempdir().unwrap();
        model.save(dir.path()).unwrap();
        let weights_path = dir.path().join(WEIGHTS_FILE);
        let meta_path = dir.path().join(META_FILE);
        let good_weights = std::fs::read(&weights_path).unwrap();
        let good_meta = std::fs::read_to_string(&meta_path).unwrap();

        let mut flipped = good_weights.clone();
        flipped[100] ^= 0x40;
        std::fs::write(&weights_path, &flipped).unwrap();
        assert!(TriageModel::load(dir.path()).unwrap_err().to_string().contains("checksum mismatch"));

        std::fs::write(&weights_path, &good_weights[..good_weights.len() - 4]).unwrap();
        assert!(TriageModel::load(dir.path()).unwrap_err().to_string().contains("bytes, expected"));
        std::fs::write(&weights_path, &good_weights).unwrap();

        std::fs::write(&meta_path, good_meta.replace("\"format_version\": 2", "\"format_version\": 99")).unwrap();
        assert!(TriageModel::load(dir.path()).unwrap_err().to_string().contains("unsupported format_version Some(99)"));

        std::fs::write(&meta_path, "{ not json").unwrap();
        assert!(TriageModel::load(dir.path()).unwrap_err().to_string().contains("not valid JSON"));

        std::fs::write(&meta_path, r#"{"format": "something-else", "format_version": 2}"#).unwrap();
        assert!(TriageModel::load(dir.path()).unwrap_err().to_string().contains("not a triage model"));

        std::fs::write(&meta_path, good_meta.replace("\"file\": \"weights.bin\"", "\"file\": \"../weights.bin\""))
            .unwrap();
        assert!(TriageModel::load(dir.path()).unwrap_err().to_string().contains("plain file name"));

        // Thresholds are probabilities, the violating band above the benign one.
        let mut raw: serde_json::Value = serde_json::from_str(&good_meta).unwrap();
        let allow_below = raw["thresholds"]["allow_below"].as_f64().unwrap();
        for (key, value) in [
            ("allow_below", json!(allow_below + 1.0)),
            ("allow_below", json!(-0.1)),
            ("target_recall", json!(1.5)),
            ("violate_above", json!(allow_below - 0.01)),
            ("violate_above", json!(1.5)),
        ] {
            let mut edited = raw.clone();
            edited["thresholds"][key] = value.clone();
            std::fs::write(&meta_path, serde_json::to_vec(&edited).unwrap()).unwrap();
            let err = TriageModel::load(dir.path()).unwrap_err().to_string();
            assert!(err.contains("thresholds out of range"), "{key} {value}: {err}");
        }
        raw["thresholds"]["violate_above"] = serde_json::Value::Null;
        std::fs::write(&meta_path, serde_json::to_vec(&raw).unwrap()).unwrap();
        assert!(TriageModel::load(dir.path()).is_ok(), "no violating band is fine");

        std::fs::write(&meta_path, &good_meta).unwrap();
        std::fs::remove_file(&weights_path).unwrap();
        assert!(matches!(TriageModel::load(dir.path()), Err(TriageError::Io { .. })));
    }

    #[test]
    fn version_1_artifacts_load_and_score_as_before() {
        let options = FitOptions {
            features: FeatureConfig { hash_bits: 12, length_feature: false, ..FeatureConfig::default() },
            target_recall: 0.9,
            min_violate_support: 3,
            ..FitOptions::default()
        };
        let model = fit(&tiny_data(), vec![], &options).unwrap();
        let dir = tempfile::tempdir().unwrap();
        model.save(dir.path()).unwrap();
        // What version 1 wrote: no length_feature key, format_version 1.
        let meta_path = dir.path().join(META_FILE);
        let mut raw: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
        raw["format_version"] = 1.into();
        raw["features"].as_object_mut().unwrap().remove("length_feature");
        std::fs::write(&meta_path, serde_json::to_vec(&raw).unwrap()).unwrap();
        let loaded = TriageModel::load(dir.path()).unwrap();
        for text in ["how to make a bomb", "hello there", ""] {
            assert_eq!(loaded.margin(text).to_bits(), model.margin(text).to_bits());
        }
        raw["features"]["length_feature"] = true.into();
        std::fs::write(&meta_path, serde_json::to_vec(&raw).unwrap()).unwrap();
        assert!(TriageModel::load(dir.path()).unwrap_err().to_string().contains("has no length feature"));
    }

    #[test]
    fn thresholds_keep_target_recall_out_of_fold() {
        let model = tiny_model();
        let t = &model.meta.thresholds;
        assert!(model.meta.metrics.out_of_fold.recall >= 0.9);
        assert!(t.violate_above.is_none_or(|v| v > t.allow_below));
        assert_eq!(model.meta.training.items, 80);
        assert_eq!(model.meta.policy_hash, "sha256:abc");
    }

    #[test]
    fn calibration_sources_set_thresholds_and_auxiliary_sources_only_train() {
        let mut examples = tiny_data();
        // An auxiliary source whose violations look benign: held to 90 % recall, the threshold would sink.
        for round in 0..8 {
            for t in ["help me write code", "how do plants grow"] {
                examples.push(Example { text: format!("{t} {round} aux"), violates: true, weight: 0.1, source: 1 });
            }
        }
        let base = FitOptions {
            features: FeatureConfig { hash_bits: 12, ..FeatureConfig::default() },
            target_recall: 0.9,
            min_violate_support: 3,
            ..FitOptions::default()
        };
        let all = fit(&examples, vec![], &base).unwrap();
        let own = fit(&examples, vec![], &FitOptions { calibration_sources: Some(vec![0]), ..base.clone() }).unwrap();
        assert_eq!(own.meta.metrics.out_of_fold.items, 80, "out-of-fold metrics cover the calibration source");
        assert_eq!(own.meta.metrics.per_dataset.len(), 2);
        assert!(own.meta.metrics.per_dataset[0].recall >= 0.9);
        assert!(own.meta.thresholds.allow_below > all.meta.thresholds.allow_below);
        assert_eq!(own.meta.training.calibration_sources, Some(vec![0]));
        let none = FitOptions { calibration_sources: Some(vec![7]), ..base };
        assert!(matches!(fit(&examples, vec![], &none), Err(TriageError::InvalidConfig(_))));
    }

    #[test]
    fn copies_of_a_text_share_a_fold_and_strata_stay_balanced() {
        let mut examples = Vec::new();
        for i in 0..40 {
            examples.push(Example { text: format!("benign {i}"), violates: false, weight: 1.0, source: i % 2 });
            examples.push(Example { text: format!("bad {i}"), violates: true, weight: 1.0, source: i % 2 });
        }
        let copies = ["Buy Pills NOW", "  buy pills now", "buy pills now\n", "BUY PILLS NOW"];
        for (k, text) in copies.iter().enumerate() {
            // Copies in both sources and with both labels, as joined exports have them.
            examples.push(Example { text: text.to_string(), violates: k % 2 == 0, weight: 1.0, source: k / 2 });
        }
        for k in 0..12 {
            examples.push(Example { text: "same old spam".into(), violates: true, weight: 1.0, source: k % 2 });
        }
        let folds = 5;
        let fold_of = assign_folds(&examples, folds, 42);
        let fold_of_text = |text: &str| -> Vec<usize> {
            let key = text.trim().to_lowercase();
            examples
                .iter()
                .zip(&fold_of)
                .filter(|(e, _)| e.text.trim().to_lowercase() == key)
                .map(|(_, f)| *f)
                .collect()
        };
        for text in ["buy pills now", "same old spam"] {
            let seen = fold_of_text(text);
            assert!(seen.len() >= 4 && seen.iter().all(|f| *f == seen[0]), "{text}: {seen:?}");
        }
        // Groups of unique texts stay stratified: spread evenly over the folds. (Both copied texts are grouped
        // with source 0's violations, whose folds balance items, not units.)
        for (source, violates) in [(0, false), (1, false), (1, true)] {
            let mut per_fold = vec![0; folds];
            for (e, f) in examples.iter().zip(&fold_of) {
                if e.source == source && e.violates == violates && e.text.contains(char::is_numeric) {
                    per_fold[*f] += 1;
                }
            }
            assert!(per_fold.iter().all(|&n| n == 4), "source {source} violates {violates}: {per_fold:?}");
        }
        // Source 0's violations: 20 single texts, the 4 copies of the pills text and the 12 of the spam. Placed
        // largest unit first, the spam fills a fold of its own and the rest even out the other four, whatever the
        // shuffle's order; units dealt round robin would put 3 more items (or more) beside the spam.
        let mut load = vec![0; folds];
        for (e, f) in examples.iter().zip(&fold_of) {
            let text = e.text.to_lowercase();
            if (e.source == 0 && e.violates && text.starts_with("bad"))
                || text.contains("pills")
                || text.contains("spam")
            {
                load[*f] += 1;
            }
        }
        assert_eq!(load[fold_of_text("same old spam")[0]], 12, "the spam's fold holds nothing else: {load:?}");
        load.sort_unstable();
        assert_eq!(load, [6, 6, 6, 6, 12]);
    }

    /// Every violation one text, copied: the folds without it train on one class, which the error says, instead
    /// of "0 violations" about data that has violations.
    #[test]
    fn violations_that_are_one_copied_text_are_named_as_such() {
        let mut examples: Vec<Example> =
            (0..30).map(|i| Example { text: format!("benign {i}"), violates: false, weight: 1.0, source: 0 }).collect();
        examples.extend((0..10).map(|_| Example { text: "spam".into(), violates: true, weight: 1.0, source: 0 }));
        let err = fit(&examples, vec![], &FitOptions::default()).unwrap_err().to_string();
        assert!(err.contains("0 violations") && err.contains("too few distinct texts"), "{err}");
        // Data with one class only is still said to be that.
        let benign: Vec<Example> = examples.into_iter().filter(|e| !e.violates).collect();
        let err = fit(&benign, vec![], &FitOptions::default()).unwrap_err().to_string();
        assert!(err.contains("needs both classes"), "{err}");
    }

    /// Without copies of a text and from one source, folds are what they were before copies were grouped.
    #[test]
    fn single_source_folds_without_copies_are_unchanged() {
        let examples = tiny_data();
        let (folds, seed) = (5, TrainConfig::default().seed);
        let mut expected = vec![0usize; examples.len()];
        let mut groups: std::collections::BTreeMap<(usize, bool), Vec<usize>> = Default::default();
        for (i, e) in examples.iter().enumerate() {
            groups.entry((e.source, e.violates)).or_default().push(i);
        }
        let mut rng = SplitMix::new(seed ^ 0xf01d);
        for members in groups.values_mut() {
            rng.shuffle(members);
            for (k, &i) in members.iter().enumerate() {
                expected[i] = k % folds;
            }
        }
        assert_eq!(assign_folds(&examples, folds, seed), expected);
    }

    /// One violation in each of two datasets: the rotation restarted per source put both in fold 0, and that
    /// fold's model failed with "got 0 violations".
    #[test]
    fn one_violation_per_dataset_still_trains() {
        let mut examples = Vec::new();
        for source in 0..2 {
            for i in 0..12 {
                let text = format!("hello friend number {i} from place {source}");
                examples.push(Example { text, violates: false, weight: 1.0, source });
            }
            let text = format!("buy cheap pills now {source}");
            examples.push(Example { text, violates: true, weight: 1.0, source });
        }
        let options = FitOptions {
            features: FeatureConfig { hash_bits: 12, ..FeatureConfig::default() },
            min_violate_support: 1,
            ..FitOptions::default()
        };
        let fold_of = assign_folds(&examples, options.folds, options.train.seed);
        let violation_folds: Vec<usize> =
            examples.iter().zip(&fold_of).filter(|(e, _)| e.violates).map(|(_, f)| *f).collect();
        assert_ne!(violation_folds[0], violation_folds[1]);
        let margins = out_of_fold_margins(&examples, &options).unwrap();
        assert_eq!(margins.len(), examples.len());
    }
}

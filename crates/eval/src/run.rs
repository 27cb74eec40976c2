//! Running an evaluation live through a classifier, with a resumable cache.
//!
//! The cache is an append-only JSONL file keyed by everything that can change an answer: the item (its id and a
//! fingerprint of its text), the policy bodies, the settings around them (front matter, token cap, engine), the
//! model and the effort. Each result is
//! written with one `write` call as soon as it arrives, so a killed process loses nothing the OS already has;
//! `fsync` runs every `sync_every` results (and at the end) so a power cut loses at most one batch. A line cut
//! short by a crash is skipped on load and the file is newline-terminated before appending again.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Instant;

use async_trait::async_trait;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::EvalError;
use crate::dataset::Item;
use crate::predictions::{Outcome, PredictionRecord, byte_lines, not_utf8};

/// Classifies one item at one effort. The CLI adapts the core `Classifier`; tests use deterministic doubles.
/// The returned record's `id`, `effort` and `model` are filled in by [`run_eval`].
#[async_trait]
pub trait ItemClassifier: Send + Sync {
    async fn classify(&self, item: &Item, effort: &str) -> Result<PredictionRecord, String>;
}

type BoxedClassification = Pin<Box<dyn Future<Output = Result<PredictionRecord, String>> + Send>>;

/// Adapts a closure taking owned arguments to [`ItemClassifier`].
pub struct FnClassifier<F>(pub F);

#[async_trait]
impl<F> ItemClassifier for FnClassifier<F>
where
    F: Fn(Item, String) -> BoxedClassification + Send + Sync,
{
    async fn classify(&self, item: &Item, effort: &str) -> Result<PredictionRecord, String> {
        (self.0)(item.clone(), effort.to_string()).await
    }
}

/// What a cached result was computed from. A result is reused only when every part matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CacheKey {
    pub item_id: String,
    /// [`fingerprint`] of the item's text: ids alone repeat across datasets ("1", "2", …) and survive a fixed
    /// text. Caches written before this field read it as empty, which no item's fingerprint is, so they miss.
    #[serde(default)]
    pub item_hash: String,
    pub policy_hash: String,
    /// Whatever else decides the answer besides the policy bodies ([`RunOptions::settings`]).
    #[serde(default)]
    pub settings: String,
    pub model_id: String,
    pub effort: String,
}

impl CacheKey {
    /// The key of `item` at `effort` under `opts`.
    pub fn new(item: &Item, effort: &str, opts: &RunOptions) -> CacheKey {
        CacheKey {
            item_id: item.id.clone(),
            item_hash: fingerprint(&[item.text.as_bytes()]),
            policy_hash: opts.policy_hash.clone(),
            settings: opts.settings.clone(),
            model_id: opts.model_id.clone(),
            effort: effort.to_string(),
        }
    }
}

/// A stable fingerprint of `parts` (`sha256:` and 64 hex digits), for cache keys that outlive the process. Each
/// part is preceded by its length, so `["ab", "c"]` and `["a", "bc"]` differ.
pub fn fingerprint(parts: &[&[u8]]) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    format!("sha256:{}", hex::encode(hasher.finalize()))
}

#[derive(Serialize, Deserialize)]
struct CacheLine {
    #[serde(flatten)]
    key: CacheKey,
    record: PredictionRecord,
}

/// The append-only result cache.
pub struct EvalCache {
    path: PathBuf,
    entries: HashMap<CacheKey, PredictionRecord>,
    file: File,
    unsynced: usize,
    sync_every: usize,
    /// Lines that could not be read back (a write cut short by a crash).
    pub skipped_lines: usize,
}

impl EvalCache {
    /// Opens (or creates) the cache and loads every complete entry.
    pub fn open(path: &Path, sync_every: usize) -> Result<EvalCache, EvalError> {
        let read_error = |source| EvalError::Io { path: path.to_path_buf(), source };
        let mut entries = HashMap::new();
        let mut skipped_lines = 0;
        if path.exists() {
            let file = File::open(path).map_err(read_error)?;
            for line in byte_lines(BufReader::new(file)) {
                let (number, bytes) = line.map_err(read_error)?;
                // A write cut short inside a multi-byte character leaves a line that is not UTF-8: as cut short
                // as one that is not JSON, and skipped the same way.
                let parsed = std::str::from_utf8(&bytes).map_err(|err| not_utf8(&err)).and_then(|line| {
                    if line.trim().is_empty() {
                        return Ok(None);
                    }
                    serde_json::from_str::<CacheLine>(line).map(Some).map_err(|err| err.to_string())
                });
                match parsed {
                    Ok(Some(entry)) => {
                        entries.insert(entry.key, entry.record);
                    }
                    Ok(None) => {}
                    Err(err) => {
                        skipped_lines += 1;
                        tracing::warn!(path = %path.display(), line = number, %err, "skipping unreadable cache line");
                    }
                }
            }
            // One unreadable line is a write cut short; a file of several and no entry is some other file (a dataset,
            // a classify output) that appending cache lines would spoil.
            if entries.is_empty() && skipped_lines > 1 {
                return Err(EvalError::Options(format!(
                    "{} is not an eval cache: none of its {skipped_lines} lines is a cache entry (name a new file \
                     for --cache)",
                    path.display()
                )));
            }
        }
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(|source| EvalError::Write { path: path.to_path_buf(), source })?;
        ensure_trailing_newline(&mut file).map_err(|source| EvalError::Write { path: path.to_path_buf(), source })?;
        Ok(EvalCache {
            path: path.to_path_buf(),
            entries,
            file,
            unsynced: 0,
            sync_every: sync_every.max(1),
            skipped_lines,
        })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, key: &CacheKey) -> Option<&PredictionRecord> {
        self.entries.get(key)
    }

    /// Appends one result; syncs to disk every `sync_every` results.
    pub fn put(&mut self, key: CacheKey, record: PredictionRecord) -> Result<(), EvalError> {
        let write_error = |source| EvalError::Write { path: self.path.clone(), source };
        let line = CacheLine { key, record };
        let mut bytes = serde_json::to_vec(&line)
            .map_err(|err| EvalError::Write { path: self.path.clone(), source: std::io::Error::other(err) })?;
        bytes.push(b'\n');
        // One write per line: with O_APPEND a crash leaves whole lines or one cut-short tail, never interleaving.
        self.file.write_all(&bytes).map_err(write_error)?;
        self.entries.insert(line.key, line.record);
        self.unsynced += 1;
        if self.unsynced >= self.sync_every {
            self.sync()?;
        }
        Ok(())
    }

    pub fn sync(&mut self) -> Result<(), EvalError> {
        if self.unsynced > 0 {
            self.file.sync_data().map_err(|source| EvalError::Write { path: self.path.clone(), source })?;
            self.unsynced = 0;
        }
        Ok(())
    }
}

impl Drop for EvalCache {
    fn drop(&mut self) {
        // An interrupted run still gets its last batch onto disk when it unwinds normally.
        if let Err(err) = self.sync() {
            tracing::warn!(%err, "could not sync the eval cache");
        }
    }
}

fn ensure_trailing_newline(file: &mut File) -> std::io::Result<()> {
    let length = file.seek(SeekFrom::End(0))?;
    if length == 0 {
        return Ok(());
    }
    file.seek(SeekFrom::End(-1))?;
    let mut last = [0u8; 1];
    file.read_exact(&mut last)?;
    if last[0] != b'\n' {
        file.write_all(b"\n")?;
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Every item runs once per effort.
    pub efforts: Vec<String>,
    /// Items classified at the same time.
    pub concurrency: usize,
    pub cache_path: Option<PathBuf>,
    /// Identifies the policy set (e.g. the policy hashes joined); part of the cache key.
    pub policy_hash: String,
    /// Everything else that changes an answer, as one string (e.g. a [`fingerprint`] of the policies' front
    /// matter, the token cap and the engine settings); part of the cache key.
    pub settings: String,
    pub model_id: String,
    /// Results between `fsync`s of the cache.
    pub sync_every: usize,
    /// Item id -> why the item cannot be classified (a dataset row with no text: [`crate::Dataset::text_errors`]).
    /// Such an item never reaches the classifier, which would judge an empty message: it fails at every effort
    /// (needs_review, counted as failed) and is never cached.
    pub unclassifiable: BTreeMap<String, String>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            efforts: vec!["medium".to_string()],
            concurrency: 4,
            cache_path: None,
            policy_hash: String::new(),
            settings: String::new(),
            model_id: String::new(),
            sync_every: 16,
            unclassifiable: BTreeMap::new(),
        }
    }
}

/// Sent after each item finishes (from the cache or the classifier).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub done: usize,
    pub total: usize,
    pub from_cache: usize,
    pub failed: usize,
}

#[derive(Debug, Clone, Default)]
pub struct RunOutput {
    /// Effort -> one record per item, in dataset order, in the order the efforts were given.
    pub by_effort: Vec<(String, Vec<PredictionRecord>)>,
    pub classified: usize,
    pub from_cache: usize,
    /// Items whose classification failed: (id, effort, error). They are needs_review and not cached.
    pub failed: Vec<(String, String, String)>,
}

/// Classifies every item at every effort, reusing cached results and caching new ones.
///
/// A failed classification becomes a needs_review record (never an allow) and is not cached, so the next run
/// retries it. Dropping the returned future interrupts the run; everything finished so far is in the cache.
#[tracing::instrument(skip_all, fields(items = items.len(), efforts = ?opts.efforts, model = %opts.model_id))]
pub async fn run_eval(
    items: &[Item],
    classifier: &dyn ItemClassifier,
    opts: &RunOptions,
    on_progress: &(dyn Fn(Progress) + Sync),
) -> Result<RunOutput, EvalError> {
    if opts.efforts.is_empty() {
        return Err(EvalError::Options("run_eval needs at least one effort".into()));
    }
    let mut cache = match &opts.cache_path {
        Some(path) => Some(EvalCache::open(path, opts.sync_every)?),
        None => None,
    };
    let key = |item: &Item, effort: &str| CacheKey::new(item, effort, opts);

    let total = items.len() * opts.efforts.len();
    let mut slots: Vec<Vec<Option<PredictionRecord>>> = vec![vec![None; items.len()]; opts.efforts.len()];
    let mut pending = Vec::new();
    let mut progress = Progress { done: 0, total, from_cache: 0, failed: 0 };
    let mut output = RunOutput::default();
    for (effort_index, effort) in opts.efforts.iter().enumerate() {
        for (item_index, item) in items.iter().enumerate() {
            if let Some(error) = opts.unclassifiable.get(&item.id) {
                output.failed.push((item.id.clone(), effort.clone(), error.clone()));
                progress.failed += 1;
                progress.done += 1;
                slots[effort_index][item_index] = Some(failed_record(item, effort, &opts.model_id, error.clone(), 0.0));
                continue;
            }
            match cache.as_ref().and_then(|c| c.get(&key(item, effort))) {
                Some(record) => {
                    slots[effort_index][item_index] = Some(record.clone());
                    progress.from_cache += 1;
                    progress.done += 1;
                }
                None => pending.push((effort_index, item_index)),
            }
        }
    }
    on_progress(progress);

    output.from_cache = progress.from_cache;
    let mut results = futures::stream::iter(pending)
        .map(|(effort_index, item_index)| {
            let item = &items[item_index];
            let effort = opts.efforts[effort_index].as_str();
            async move {
                let started = Instant::now();
                let result = classifier.classify(item, effort).await;
                (effort_index, item_index, result, started.elapsed().as_secs_f64() * 1000.0)
            }
        })
        .buffer_unordered(opts.concurrency.max(1));

    while let Some((effort_index, item_index, result, elapsed_ms)) = results.next().await {
        let item = &items[item_index];
        let effort = &opts.efforts[effort_index];
        let record = match result {
            Ok(mut record) => {
                record.id = item.id.clone();
                record.effort = Some(effort.clone());
                if record.model.is_none() && !opts.model_id.is_empty() {
                    record.model = Some(opts.model_id.clone());
                }
                if record.latency_ms().is_none() {
                    record.timings.insert("total_ms".into(), Value::from(elapsed_ms));
                }
                if let Some(cache) = cache.as_mut() {
                    cache.put(key(item, effort), record.clone())?;
                }
                output.classified += 1;
                record
            }
            Err(error) => {
                tracing::warn!(id = %item.id, %effort, %error, "classification failed; counting it as needs_review");
                output.failed.push((item.id.clone(), effort.clone(), error.clone()));
                progress.failed += 1;
                failed_record(item, effort, &opts.model_id, error, elapsed_ms)
            }
        };
        slots[effort_index][item_index] = Some(record);
        progress.done += 1;
        on_progress(progress);
    }
    if let Some(cache) = cache.as_mut() {
        cache.sync()?;
    }

    output.by_effort = opts
        .efforts
        .iter()
        .zip(slots)
        .map(|(effort, records)| (effort.clone(), records.into_iter().flatten().collect()))
        .collect();
    Ok(output)
}

fn failed_record(item: &Item, effort: &str, model_id: &str, error: String, elapsed_ms: f64) -> PredictionRecord {
    let mut record = PredictionRecord {
        id: item.id.clone(),
        outcome: Some(Outcome::NeedsReview),
        effort: Some(effort.to_string()),
        model: (!model_id.is_empty()).then(|| model_id.to_string()),
        error: Some(error),
        ..PredictionRecord::default()
    };
    record.timings.insert("total_ms".into(), Value::from(elapsed_ms));
    record
}

#[cfg(test)]
mod tests {
    use super::fingerprint;

    #[test]
    fn fingerprints_are_pinned_and_length_prefixed() {
        // Pinned: a cache written by one build must be read by the next, so the function may never drift.
        assert_eq!(fingerprint(&[]), "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(fingerprint(&[b"abc"]), fingerprint(&[b"abc"]));
        assert_ne!(fingerprint(&[b"ab", b"c"]), fingerprint(&[b"a", b"bc"]));
        assert_ne!(fingerprint(&[b""]), fingerprint(&[]));
    }
}

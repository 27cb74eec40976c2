//! run_eval with a deterministic classifier double: interruption, resume from the cache, cache keys, failures.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use safeguard_eval::{
    CacheKey, EvalCache, Item, ItemClassifier, Outcome, PredictedVerdict, PredictionRecord, Progress, RunOptions,
    run_eval,
};
use serde_json::Value;

/// Flags items whose text contains "bad". After `hang_after` calls it never answers again, like a process
/// that is killed mid-run. Items whose text contains "boom" fail.
struct Double {
    calls: Arc<AtomicUsize>,
    hang_after: Option<usize>,
}

impl Double {
    fn new(hang_after: Option<usize>) -> Self {
        Double { calls: Arc::new(AtomicUsize::new(0)), hang_after }
    }
}

#[async_trait]
impl ItemClassifier for Double {
    async fn classify(&self, item: &Item, effort: &str) -> Result<PredictionRecord, String> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if self.hang_after.is_some_and(|limit| call > limit) {
            futures::future::pending::<()>().await;
        }
        tokio::task::yield_now().await;
        if item.text.contains("boom") {
            return Err("engine exploded".into());
        }
        let violation = item.text.contains("bad");
        let outcome = if violation { Outcome::Violation } else { Outcome::Allow };
        let mut record = PredictionRecord {
            outcome: Some(outcome),
            verdicts: vec![PredictedVerdict {
                policy: "spam".into(),
                violation: Some(violation),
                outcome: Some(outcome),
                rationale: Some(format!("{effort}: {}", item.text)),
                ..PredictedVerdict::default()
            }],
            ..PredictionRecord::default()
        };
        // Deterministic timings, so resumed and uninterrupted runs compare equal.
        record.timings.insert("total_ms".into(), Value::from(item.text.len() as f64));
        Ok(record)
    }
}

fn items(n: usize) -> Vec<Item> {
    (0..n)
        .map(|i| Item {
            id: format!("item-{i}"),
            text: if i % 3 == 0 { format!("bad thing {i}") } else { format!("fine thing {i}") },
            label: Some(i % 3 == 0),
            categories: BTreeMap::new(),
            group: None,
        })
        .collect()
}

fn options(cache: Option<std::path::PathBuf>) -> RunOptions {
    RunOptions {
        efforts: vec!["low".into(), "high".into()],
        concurrency: 3,
        cache_path: cache,
        policy_hash: "sha256:aaaa".into(),
        settings: "fnv1a128:settings".into(),
        model_id: "tiny-test-model".into(),
        sync_every: 4,
        unclassifiable: BTreeMap::new(),
    }
}

fn no_progress(_: Progress) {}

#[tokio::test]
async fn an_interrupted_run_resumes_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache_path = dir.path().join("cache.jsonl");
    let items = items(12);

    let reference = run_eval(&items, &Double::new(None), &options(None), &no_progress).await.unwrap();
    assert_eq!(reference.classified, 24);

    // First run: the classifier stops answering after 7 calls; the run is abandoned (its future dropped).
    let hanging = Double::new(Some(7));
    let interrupted = tokio::time::timeout(
        Duration::from_millis(300),
        run_eval(&items, &hanging, &options(Some(cache_path.clone())), &no_progress),
    )
    .await;
    assert!(interrupted.is_err(), "the run should have been cut off");
    let cached = EvalCache::open(&cache_path, 1).unwrap();
    assert_eq!(cached.len(), 7, "every answered item is in the cache");
    drop(cached);

    // Second run: only the 17 missing results are classified, and the output matches the uninterrupted run.
    let resumed_classifier = Double::new(None);
    let seen = std::sync::Mutex::new(Vec::new());
    let resumed =
        run_eval(&items, &resumed_classifier, &options(Some(cache_path.clone())), &|p| seen.lock().unwrap().push(p))
            .await
            .unwrap();
    assert_eq!(resumed_classifier.calls.load(Ordering::SeqCst), 24 - 7);
    assert_eq!((resumed.from_cache, resumed.classified), (7, 17));
    assert_eq!(resumed.by_effort, reference.by_effort);
    let progress = seen.into_inner().unwrap();
    assert_eq!(progress.first().unwrap().done, 7);
    assert_eq!(*progress.last().unwrap(), Progress { done: 24, total: 24, from_cache: 7, failed: 0 });

    // Third run: everything comes from the cache.
    let idle = Double::new(None);
    let again = run_eval(&items, &idle, &options(Some(cache_path.clone())), &no_progress).await.unwrap();
    assert_eq!(idle.calls.load(Ordering::SeqCst), 0);
    assert_eq!(again.by_effort, reference.by_effort);

    // A different policy version (or model, or effort) is a different key: nothing is reused.
    let changed = Double::new(None);
    let mut new_policy = options(Some(cache_path.clone()));
    new_policy.policy_hash = "sha256:bbbb".into();
    run_eval(&items, &changed, &new_policy, &no_progress).await.unwrap();
    assert_eq!(changed.calls.load(Ordering::SeqCst), 24);
}

#[tokio::test]
async fn a_line_cut_short_by_a_crash_is_skipped_and_appending_continues_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let cache_path = dir.path().join("cache.jsonl");
    let items = items(4);
    let mut opts = options(Some(cache_path.clone()));
    opts.efforts = vec!["medium".into()];
    run_eval(&items[..2], &Double::new(None), &opts, &no_progress).await.unwrap();
    // Simulate a crash in the middle of writing a line.
    let mut text = std::fs::read_to_string(&cache_path).unwrap();
    text.push_str("{\"item_id\":\"item-2\",\"policy_ha");
    std::fs::write(&cache_path, text).unwrap();

    let classifier = Double::new(None);
    let output = run_eval(&items, &classifier, &opts, &no_progress).await.unwrap();
    assert_eq!(classifier.calls.load(Ordering::SeqCst), 2);
    assert_eq!(output.by_effort[0].1.len(), 4);
    let cache = EvalCache::open(&cache_path, 1).unwrap();
    assert_eq!(cache.len(), 4);
    assert_eq!(cache.skipped_lines, 1);
}

#[tokio::test]
async fn failures_become_needs_review_and_are_retried_next_time() {
    let dir = tempfile::tempdir().unwrap();
    let cache_path = dir.path().join("cache.jsonl");
    let mut items = items(3);
    items[1].text = "boom".into();
    let mut opts = options(Some(cache_path.clone()));
    opts.efforts = vec!["low".into()];
    let output = run_eval(&items, &Double::new(None), &opts, &no_progress).await.unwrap();
    assert_eq!(output.failed, vec![("item-1".to_string(), "low".to_string(), "engine exploded".to_string())]);
    let failed = &output.by_effort[0].1[1];
    assert_eq!(failed.outcome, Some(Outcome::NeedsReview));
    assert_eq!(failed.error.as_deref(), Some("engine exploded"));
    // Records carry the id, effort and model the run used.
    let ok = &output.by_effort[0].1[0];
    assert_eq!(
        (ok.id.as_str(), ok.effort.as_deref(), ok.model.as_deref()),
        ("item-0", Some("low"), Some("tiny-test-model"))
    );

    let retry = Double::new(None);
    run_eval(&items, &retry, &opts, &no_progress).await.unwrap();
    assert_eq!(retry.calls.load(Ordering::SeqCst), 1, "only the failed item is classified again");
}

fn item(id: &str, text: &str) -> Item {
    Item { id: id.into(), text: text.into(), label: Some(false), categories: BTreeMap::new(), group: None }
}

/// Ids repeat across datasets ("1", "2", …) and survive a fixed text: the cache must key on the text too.
#[tokio::test]
async fn the_same_id_with_another_text_is_classified_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let cache_path = dir.path().join("cache.jsonl");
    let opts = RunOptions { efforts: vec!["low".into()], ..options(Some(cache_path.clone())) };

    let first = run_eval(&[item("1", "a")], &Double::new(None), &opts, &no_progress).await.unwrap();
    assert_eq!((first.classified, first.from_cache), (1, 0));

    let fresh = Double::new(None);
    let second = run_eval(&[item("1", "b bad")], &fresh, &opts, &no_progress).await.unwrap();
    assert_eq!((second.classified, second.from_cache), (1, 0));
    assert_eq!(fresh.calls.load(Ordering::SeqCst), 1);
    // The new text's answer, not the old one's.
    assert_eq!(second.by_effort[0].1[0].outcome, Some(Outcome::Violation));

    // Both texts are cached now, each under its own key.
    let again = run_eval(&[item("1", "a")], &Double::new(None), &opts, &no_progress).await.unwrap();
    assert_eq!((again.classified, again.from_cache), (0, 1));
    assert_eq!(again.by_effort[0].1[0].outcome, Some(Outcome::Allow));
}

/// Front matter, token cap and engine settings travel in `settings`: a change there is a miss.
#[tokio::test]
async fn other_settings_miss_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache_path = dir.path().join("cache.jsonl");
    let opts = RunOptions { efforts: vec!["low".into()], ..options(Some(cache_path.clone())) };
    run_eval(&[item("1", "a")], &Double::new(None), &opts, &no_progress).await.unwrap();

    let changed = RunOptions { settings: "fnv1a128:other-front-matter".into(), ..opts.clone() };
    let fresh = Double::new(None);
    let run = run_eval(&[item("1", "a")], &fresh, &changed, &no_progress).await.unwrap();
    assert_eq!((run.classified, run.from_cache), (1, 0));
}

/// A cache written before the key held the text reads back, but none of its entries match: they miss quietly
/// (not counted as damaged lines) and are classified again.
#[tokio::test]
async fn entries_of_the_old_key_format_miss() {
    let dir = tempfile::tempdir().unwrap();
    let cache_path = dir.path().join("cache.jsonl");
    let opts = RunOptions { efforts: vec!["low".into()], ..options(Some(cache_path.clone())) };
    let old = serde_json::json!({"item_id": "1", "policy_hash": opts.policy_hash, "model_id": opts.model_id,
        "effort": "low", "record": {"id": "1", "outcome": "allow", "verdicts": []}});
    std::fs::write(&cache_path, format!("{old}\n")).unwrap();
    let cache = EvalCache::open(&cache_path, 1).unwrap();
    assert_eq!((cache.len(), cache.skipped_lines), (1, 0));
    assert!(cache.get(&CacheKey::new(&item("1", "a"), "low", &opts)).is_none());
    drop(cache);

    let fresh = Double::new(None);
    let run = run_eval(&[item("1", "a bad")], &fresh, &opts, &no_progress).await.unwrap();
    assert_eq!((run.classified, run.from_cache), (1, 0));
    assert_eq!(run.by_effort[0].1[0].outcome, Some(Outcome::Violation));
}

/// A write cut inside a multi-byte character leaves a line that is not UTF-8: skipped like any cut line, not a
/// reason to refuse the whole cache.
#[tokio::test]
async fn a_line_cut_inside_a_character_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let cache_path = dir.path().join("cache.jsonl");
    let opts = RunOptions { efforts: vec!["low".into()], ..options(Some(cache_path.clone())) };
    let items = [item("1", "a"), item("2", "café au lait")];
    // One item per run, so item 2's line is the last one.
    for one in items.chunks(1) {
        run_eval(one, &Double::new(None), &opts, &no_progress).await.unwrap();
    }
    let full = std::fs::read(&cache_path).unwrap();
    let last_line_start = full[..full.len() - 1].iter().rposition(|&b| b == b'\n').unwrap() + 1;
    let last = &full[last_line_start..];
    let accent = last.windows(2).position(|w| w == "é".as_bytes()).expect("the text is in the cache line");
    std::fs::write(&cache_path, &full[..last_line_start + accent + 1]).unwrap();

    let cache = EvalCache::open(&cache_path, 1).unwrap();
    assert_eq!((cache.len(), cache.skipped_lines), (1, 1));
    drop(cache);
    let classifier = Double::new(None);
    let run = run_eval(&items, &classifier, &opts, &no_progress).await.unwrap();
    assert_eq!((run.classified, run.from_cache), (1, 1));
    assert_eq!(EvalCache::open(&cache_path, 1).unwrap().len(), 2, "appending after the cut line works");
}

/// An item marked unclassifiable (a dataset row with no text) never reaches the classifier: it fails at every
/// effort, with the reason, and is not cached.
#[tokio::test]
async fn an_unclassifiable_item_fails_without_being_classified() {
    let dir = tempfile::tempdir().unwrap();
    let cache_path = dir.path().join("cache.jsonl");
    let reason = "data.jsonl:2: field `text` is empty or null; the row has no text to judge".to_string();
    let opts = RunOptions {
        unclassifiable: BTreeMap::from([("2".to_string(), reason.clone())]),
        ..options(Some(cache_path.clone()))
    };
    let classifier = Double::new(None);
    let seen = std::sync::Mutex::new(Vec::new());
    let run = run_eval(&[item("1", "a"), item("2", "")], &classifier, &opts, &|p| seen.lock().unwrap().push(p))
        .await
        .unwrap();
    assert_eq!(classifier.calls.load(Ordering::SeqCst), 2, "item 1 at two efforts, item 2 never");
    assert_eq!(
        run.failed,
        vec![("2".to_string(), "low".to_string(), reason.clone()), ("2".to_string(), "high".to_string(), reason)]
    );
    for (_, records) in &run.by_effort {
        assert_eq!(records.len(), 2);
        assert_eq!((records[1].id.as_str(), records[1].outcome), ("2", Some(Outcome::NeedsReview)));
        assert!(records[1].is_failure());
    }
    assert_eq!(*seen.into_inner().unwrap().last().unwrap(), Progress { done: 4, total: 4, from_cache: 0, failed: 2 });
    assert_eq!(EvalCache::open(&cache_path, 1).unwrap().len(), 2, "only item 1's answers are cached");
}

/// A file of other lines (the dataset, a classify output) named as the cache is refused, not appended to: every
/// line was skipped as unreadable, and the cache lines written after them spoilt the file for what it was.
#[test]
fn a_file_that_is_not_a_cache_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.jsonl");
    let data = "{\"id\": \"1\", \"text\": \"a\", \"violates\": 0}\n{\"id\": \"2\", \"text\": \"b\", \"violates\": 1}\n";
    std::fs::write(&path, data).unwrap();
    let error = EvalCache::open(&path, 1).err().expect("refused");
    assert!(error.to_string().contains("is not an eval cache"), "{error}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), data, "the file is untouched");
    // One cut line alone is a cache whose first write was cut short.
    std::fs::write(&path, "{\"key\":").unwrap();
    assert_eq!(EvalCache::open(&path, 1).unwrap().skipped_lines, 1);
}

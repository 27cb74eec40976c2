//! Where a policy's triage comes from: its own front matter (`triage: {rules: …, on_violation: …}`) and,
//! optionally, a trained classifier in `<models_dir>/<policy name>/` — used only if it was trained for this exact
//! version.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use safeguard_policy::Policy;
use safeguard_triage::{RuleSet, RulesConfig, Triage, TriageError, TriageModel};
use serde::Deserialize;
use tracing::{info, warn};

use crate::OnTriageViolation;

/// A policy's `triage:` front matter.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriageSection {
    /// Keyword, regex, allow and deny rules.
    #[serde(default)]
    pub rules: Option<RulesConfig>,
    /// What a confident triage violation does under this policy; unset, the server's choice
    /// ([`RoutingConfig::on_triage_violation`](crate::RoutingConfig::on_triage_violation)).
    #[serde(default)]
    pub on_violation: Option<OnTriageViolation>,
}

/// Reads a policy's `triage:` section; an empty one when it has none. A misspelt key is an error, not a setting
/// silently ignored.
pub fn triage_section(policy: &Policy) -> Result<TriageSection, TriageError> {
    let Some(section) = policy.meta.extra.get("triage") else {
        return Ok(TriageSection::default());
    };
    TriageSection::deserialize(section)
        .map_err(|e| TriageError::InvalidConfig(format!("policy {:?} front matter triage: {e}", policy.meta.name)))
}

/// The section's `on_violation` alone, read on every item the cascade routes: its `rules` (possibly thousands of
/// keywords, compiled once by [`TriageLibrary`]) are skipped over, not built. Errors as [`triage_section`] does
/// for the keys; a malformed `rules` value is left to the library, which then gives the policy no triage at all.
pub fn triage_on_violation(policy: &Policy) -> Result<Option<OnTriageViolation>, TriageError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct OnViolationOnly {
        #[serde(default, rename = "rules")]
        _rules: serde::de::IgnoredAny,
        #[serde(default)]
        on_violation: Option<OnTriageViolation>,
    }
    let Some(section) = policy.meta.extra.get("triage") else {
        return Ok(None);
    };
    OnViolationOnly::deserialize(section)
        .map(|section| section.on_violation)
        .map_err(|e| TriageError::InvalidConfig(format!("policy {:?} front matter triage: {e}", policy.meta.name)))
}

/// Reads and compiles the rules a policy declares for triage; `Ok(None)` when it declares none.
pub fn rules_from_policy(policy: &Policy) -> Result<Option<RuleSet>, TriageError> {
    match triage_section(policy)?.rules {
        Some(config) if !config.is_empty() => RuleSet::compile(&config).map(Some),
        _ => Ok(None),
    }
}

/// How many policy versions' triage a library keeps. Stored policies are few; inline ones can be many and
/// distinct, and each entry may hold compiled rules and a loaded model.
const LIBRARY_CAPACITY: usize = 1024;

/// How many bytes of triage a library keeps, as its entries' weights estimate them ([`Triage::memory_usage`], the
/// `triage:` section kept to compare with, a failed build's reason). The count alone let a client fill the cache
/// with 1024 inline policies of 256 large regexes each. One policy's rules come to at most
/// [`MAX_RULE_MEMORY_BYTES`](safeguard_triage::rules::MAX_RULE_MEMORY_BYTES) (64 MiB), so this keeps seven of the
/// largest, or the full count of ordinary ones (a hand-written rule set compiles to well under a MiB); trained
/// models' weights, 1 MiB at the default 2^18 buckets, count too.
const LIBRARY_BUDGET_BYTES: usize = 512 * 1024 * 1024;

/// What one policy version's triage came to: built (or nothing to build), or the reason its section is unusable.
type Built = Result<Option<Arc<Triage>>, String>;

/// How often a cached entry looks at its model file again. A `stat` per request and policy is a system call on the
/// hot path; a retrained model taking up to a second to be used is not noticeable.
const MODEL_RECHECK: Duration = Duration::from_secs(1);

/// A build, the `triage:` section it was built from, and the modification time of the model file it saw (`None`:
/// no file), so that a model trained or retrained while the server runs is picked up within a second.
#[derive(Debug, Clone)]
struct Entry {
    section: Option<serde_json::Value>,
    built: Built,
    /// Where the model was looked for (it depends on the policy's name) and the file's modification time then.
    model_dir: Option<PathBuf>,
    model_file: Option<SystemTime>,
    /// When `model_file` was last read off the disk.
    checked: Instant,
    /// When the model was last tried, if it failed to load: it is tried again after a while even if its file
    /// did not change (the encoder it needs may have been installed since). A model trained for another version
    /// is not retried: only retraining, which changes the file, fixes that.
    load_failed_at: Option<Instant>,
    /// Estimated bytes the entry keeps alive, counted into [`Cache::bytes`] while it is cached.
    weight: usize,
    /// The [`Cache::tick`] it was last built or looked up at: the least recently used entries are evicted first.
    used: u64,
}

/// How long a policy runs without its model, which failed to load, before the library tries to load it again.
const FAILED_MODEL_RETRY: Duration = Duration::from_secs(30);

impl Entry {
    /// What the entry keeps alive: the build (or its error), the section it was built from and the key and path
    /// it is filed under. Approximate, as [`Triage::memory_usage`] is.
    fn weigh(&self, hash: &str) -> usize {
        let built = match &self.built {
            Ok(triage) => triage.as_ref().map_or(0, |triage| triage.memory_usage()),
            Err(reason) => reason.capacity(),
        };
        let section = self.section.as_ref().map_or(0, json_memory_usage);
        let model_dir = self.model_dir.as_ref().map_or(0, |dir| dir.as_os_str().len());
        [size_of::<Entry>(), hash.len(), built, section, model_dir].into_iter().fold(0, usize::saturating_add)
    }

    /// Whether the model failed to load long enough ago to try again. The first request to ask takes the retry
    /// (the clock restarts for the others, who keep the cached build meanwhile), so a burst loads it once.
    fn take_model_retry(&mut self) -> bool {
        match self.load_failed_at {
            Some(at) if at.elapsed() >= FAILED_MODEL_RETRY => {
                self.load_failed_at = Some(Instant::now());
                true
            }
            _ => false,
        }
    }
}

/// Builds and caches triage per policy version and `triage:` section.
///
/// An entry is used only for the section it was built from: front matter is not part of a version's identity,
/// so two copies of one body may carry different rules, and neither may be answered with the other's. (The
/// server keeps one set of front matter per version, so there it never rebuilds for this reason.)
///
/// Bounded by [`LIBRARY_CAPACITY`] entries and by [`LIBRARY_BUDGET_BYTES`] of estimated memory: an entry that
/// would not fit evicts the least recently used ones until it does.
#[derive(Debug)]
pub struct TriageLibrary {
    models_dir: Option<PathBuf>,
    cache: Mutex<Cache>,
    model_recheck: Duration,
    budget: usize,
}

/// The entries by policy hash, with the running total of their weights.
#[derive(Debug, Default)]
struct Cache {
    entries: HashMap<String, Entry>,
    /// The sum of the entries' [`Entry::weight`].
    bytes: usize,
    /// Advances on every lookup and insertion; see [`Entry::used`].
    tick: u64,
}

impl Cache {
    fn next_tick(&mut self) -> u64 {
        self.tick = self.tick.wrapping_add(1);
        self.tick
    }

    /// The entry for `hash`, marked as used now.
    fn entry(&mut self, hash: &str) -> Option<&mut Entry> {
        let tick = self.next_tick();
        let entry = self.entries.get_mut(hash)?;
        entry.used = tick;
        Some(entry)
    }

    /// Files `entry` under `hash` (replacing any entry there), first evicting the least recently used entries
    /// until it fits both the count and `budget`. An entry over the whole budget by itself is still kept, alone:
    /// not caching it would rebuild it on every request. One policy's rules cannot get there (they are bounded
    /// far below the default budget); only a trained model from the operator's models directory could.
    fn insert(&mut self, hash: String, mut entry: Entry, budget: usize) {
        if let Some(old) = self.entries.remove(&hash) {
            self.bytes = self.bytes.saturating_sub(old.weight);
        }
        entry.used = self.next_tick();
        let fits = |cache: &Cache| {
            cache.entries.len() < LIBRARY_CAPACITY && cache.bytes.saturating_add(entry.weight) <= budget
        };
        if !fits(self) {
            let mut by_use: Vec<(u64, String)> =
                self.entries.iter().map(|(hash, entry)| (entry.used, hash.clone())).collect();
            by_use.sort_unstable();
            for (_, evicted) in by_use {
                if fits(self) {
                    break;
                }
                if let Some(old) = self.entries.remove(&evicted) {
                    self.bytes = self.bytes.saturating_sub(old.weight);
                }
            }
        }
        self.bytes = self.bytes.saturating_add(entry.weight);
        self.entries.insert(hash, entry);
    }
}

impl TriageLibrary {
    pub fn new(models_dir: Option<PathBuf>) -> Self {
        Self { models_dir, cache: Mutex::default(), model_recheck: MODEL_RECHECK, budget: LIBRARY_BUDGET_BYTES }
    }

    /// How many bytes of triage the library keeps at most, by its estimate (default [`LIBRARY_BUDGET_BYTES`]).
    #[must_use]
    pub fn with_memory_budget(mut self, bytes: usize) -> Self {
        self.budget = bytes;
        self
    }

    /// Approximately how many bytes the cached triage holds (see [`LIBRARY_BUDGET_BYTES`] for what is counted).
    pub fn memory_usage(&self) -> usize {
        self.cache().bytes
    }

    /// How long a cached entry trusts what it last saw of its model file (default one second).
    #[must_use]
    pub fn with_model_recheck(mut self, interval: Duration) -> Self {
        self.model_recheck = interval;
        self
    }

    /// The triage for this policy version, or `None` when it has neither rules nor a matching model.
    /// A broken `triage:` section turns triage off for the policy (logged once): triage only ever saves work, so
    /// without it the model decides, where a half-read section might act in a way its author did not ask for.
    pub fn for_policy(&self, policy: &Policy) -> Option<Arc<Triage>> {
        self.try_for_policy(policy).unwrap_or_default()
    }

    /// As [`for_policy`](Self::for_policy), but a section that cannot be read or compiled is an error: what a
    /// server answers a client that sends such a policy. The build is cached either way, so checking a policy
    /// and then serving it compiles its rules once.
    pub fn try_for_policy(&self, policy: &Policy) -> Result<Option<Arc<Triage>>, TriageError> {
        let hash = policy.hash.to_string();
        let section = policy.meta.extra.get("triage");
        let model_dir = self.model_dir(policy);
        let same_source = |entry: &Entry| entry.section.as_ref() == section && entry.model_dir == model_dir;
        if let Some(entry) = self.cache().entry(&hash)
            && same_source(entry)
            && entry.checked.elapsed() < self.model_recheck
        {
            return entry.built.clone().map_err(TriageError::InvalidConfig);
        }
        // Read outside the lock: a slow disk must not hold up other policies' requests.
        let model_file = model_dir.as_ref().and_then(|dir| modified(&dir.join("model.json")));
        if let Some(entry) = self.cache().entry(&hash)
            && same_source(entry)
            && entry.model_file == model_file
            && !entry.take_model_retry()
        {
            entry.checked = Instant::now();
            return entry.built.clone().map_err(TriageError::InvalidConfig);
        }
        // Built outside the lock: loading a model reads files, and other policies' requests should not wait.
        let (built, load_failed) = self.build(policy, &hash, model_dir.as_deref());
        if let Err(reason) = &built {
            warn!("no triage for this policy: {reason}");
        }
        let now = Instant::now();
        let mut entry = Entry {
            section: section.cloned(),
            built: built.clone(),
            model_dir,
            model_file,
            checked: now,
            load_failed_at: load_failed.then_some(now),
            weight: 0,
            used: 0,
        };
        // Weighed outside the lock: it walks the section and every compiled rule.
        entry.weight = entry.weigh(&hash);
        self.cache().insert(hash, entry, self.budget);
        built.map_err(TriageError::InvalidConfig)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        // Each operation on the map is one call, so a panic elsewhere cannot leave it half-changed.
        self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `<models_dir>/<policy name>`, if the name is one plain path component: a name such as `../x` must not
    /// reach outside the models directory.
    fn model_dir(&self, policy: &Policy) -> Option<PathBuf> {
        let dir = self.models_dir.as_ref()?;
        let mut components = Path::new(&policy.meta.name).components();
        match (components.next(), components.next()) {
            (Some(Component::Normal(name)), None) => Some(dir.join(name)),
            _ => None,
        }
    }

    /// The build, and whether the policy's model failed to load (to be tried again later).
    fn build(&self, policy: &Policy, hash: &str, model_dir: Option<&Path>) -> (Built, bool) {
        let rules = match rules_from_policy(policy) {
            Ok(rules) => rules,
            Err(TriageError::InvalidConfig(reason)) => return (Err(reason), false),
            Err(other) => return (Err(other.to_string()), false),
        };
        let Some(path) = model_dir.filter(|path| path.join("model.json").exists()) else {
            if let Some(path) = model_dir.filter(|path| path.is_dir()) {
                // The policy's directory is there without its model: a deployment replacing it (`rm -rf`, then a
                // copy), or a damaged one. Its allow rules were meant to be checked by that model, so they skip
                // nothing until it is back; it is looked for again.
                warn!(dir = %path.display(), "the triage model directory has no model.json; allow rules wait for it");
                let unusable = format!("{} has no model.json", path.display());
                return (Ok(rules.map(|rules| Arc::new(Triage::without_its_model(Some(rules), unusable)))), true);
            }
            // Once per policy version (the build is cached): a misnamed directory sends every item to the model,
            // and this line is where an operator finds out why the skip rate stays at zero.
            if let Some(path) = model_dir {
                let dir = path.display();
                info!(policy = %policy.meta.name, %dir, "no trained triage model for this policy; rules only");
            }
            return (Ok(rules.map(|rules| Arc::new(Triage::new(Some(rules), None)))), false);
        };
        let (unusable, load_failed) = match TriageModel::load(path) {
            Ok(model) if model.meta.policy_hash == hash => {
                return (Ok(Some(Arc::new(Triage::new(rules, Some(model))))), false);
            }
            Ok(model) => {
                warn!(policy = %policy.meta.name, trained_for = %model.meta.policy_hash, current = %hash,
                    "the triage model was trained for another version of this policy; not using it");
                (format!("the model in {} was trained for {}", path.display(), model.meta.policy_hash), false)
            }
            Err(e) => {
                warn!(path = %path.display(), "cannot load the triage model: {e}");
                (format!("the model in {} does not load: {e}", path.display()), true)
            }
        };
        // The policy's allow rules were meant to be checked by its model: without it they skip nothing.
        (Ok(rules.map(|rules| Arc::new(Triage::without_its_model(Some(rules), unusable)))), load_failed)
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Approximate heap of a JSON value: a node per value, and each string's and key's buffer. Walked with a stack,
/// not recursion: front matter may nest deeply.
fn json_memory_usage(value: &serde_json::Value) -> usize {
    let mut bytes = 0usize;
    let mut pending = vec![value];
    while let Some(value) = pending.pop() {
        bytes = bytes.saturating_add(size_of::<serde_json::Value>());
        match value {
            serde_json::Value::String(text) => bytes = bytes.saturating_add(text.capacity()),
            serde_json::Value::Array(items) => pending.extend(items),
            serde_json::Value::Object(map) => {
                for (key, item) in map {
                    bytes = bytes.saturating_add(size_of::<String>()).saturating_add(key.capacity());
                    pending.push(item);
                }
            }
            serde_json::Value::Null | serde_json::Value::Bool(_) | serde_json::Value::Number(_) => {}
        }
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_come_from_front_matter_and_bad_rules_are_errors() {
        let policy = Policy::parse(
            "---\nname: spam\noutput: binary\ntriage:\n  rules:\n    keywords:\n      - name: scams\n        action: deny\n        keywords: [free bitcoin]\n---\n# Spam\nReturn 0 or 1.",
        )
        .unwrap();
        let rules = rules_from_policy(&policy).unwrap().unwrap();
        assert_eq!(rules.evaluate("get FREE BITCOIN now").decision, safeguard_triage::RuleDecision::Deny);
        let library = TriageLibrary::new(None);
        assert!(library.for_policy(&policy).is_some());

        let plain = Policy::parse("---\nname: plain\noutput: binary\n---\n# P\nReturn 0 or 1.").unwrap();
        assert!(rules_from_policy(&plain).unwrap().is_none());
        assert!(library.for_policy(&plain).is_none());

        let bad = Policy::parse(
            "---\nname: bad\noutput: binary\ntriage:\n  rules:\n    keywords: 7\n---\n# P\nReturn 0 or 1.",
        )
        .unwrap();
        assert!(rules_from_policy(&bad).is_err());
        assert!(library.for_policy(&bad).is_none());
    }

    #[test]
    fn one_body_with_two_rule_sets_gets_two_triages_and_broken_sections_stay_errors() {
        let with_keyword = |keyword: &str| {
            Policy::parse(&format!(
                "---\nname: spam\noutput: binary\ntriage:\n  rules:\n    keywords:\n      - name: k\n        action: deny\n        keywords: [{keyword}]\n---\n# Spam\nReturn 0 or 1."
            ))
            .unwrap()
        };
        let (bitcoin, lottery) = (with_keyword("free bitcoin"), with_keyword("lottery win"));
        assert_eq!(bitcoin.hash, lottery.hash, "front matter is not part of the version");
        let library = TriageLibrary::new(None);
        let deny = |policy: &Policy, text: &str| {
            let triage = library.for_policy(policy).unwrap();
            triage.rules().unwrap().evaluate(text).decision == safeguard_triage::RuleDecision::Deny
        };
        assert!(deny(&bitcoin, "free bitcoin here"));
        assert!(deny(&lottery, "a lottery win"), "the second rule set must not be answered with the first");
        assert!(!deny(&lottery, "free bitcoin here"));
        assert!(Arc::ptr_eq(&library.for_policy(&bitcoin).unwrap(), &library.for_policy(&bitcoin).unwrap()));

        let bad = Policy::parse(
            "---\nname: bad\noutput: binary\ntriage:\n  rules:\n    regexes:\n      - name: r\n        action: deny\n        patterns: ['(']\n---\n# P\nReturn 0 or 1.",
        )
        .unwrap();
        for _ in 0..2 {
            let error = library.try_for_policy(&bad).unwrap_err().to_string();
            assert!(error.contains("pattern"), "{error}");
        }
    }

    /// Inline policies can be many and distinct, each with its own rules: bounded by count alone, the library
    /// could keep 1024 policies of 256 regexes of several MiB each.
    #[test]
    fn the_library_stays_within_its_memory_budget_and_keeps_what_is_used() {
        let policy = |i: usize| {
            Policy::parse(&format!(
                "---\nname: p{i}\noutput: binary\ntriage:\n  rules:\n    keywords:\n      - {{name: k, action: deny, keywords: [word{i}]}}\n    regexes:\n      - {{name: r, action: flag, patterns: ['\\bcode{i}-\\d+']}}\n---\n# P{i}\nReturn 0 or 1."
            ))
            .unwrap()
        };
        let deny = |triage: &Triage, text: &str| {
            triage.rules().unwrap().evaluate(text).decision == safeguard_triage::RuleDecision::Deny
        };
        let sizing = TriageLibrary::new(None);
        assert!(sizing.for_policy(&policy(0)).is_some());
        let weight = sizing.memory_usage();
        assert!(weight > 10_000, "{weight} bytes: the compiled regex is not counted");

        let budget = 4 * weight;
        let library = TriageLibrary::new(None).with_memory_budget(budget);
        let first = library.for_policy(&policy(0)).unwrap();
        for i in 1..40 {
            let triage = library.for_policy(&policy(i)).unwrap();
            assert!(deny(&triage, &format!("say word{i}")), "policy {i}");
            assert!(!deny(&triage, &format!("say word{}", i - 1)), "policy {i} answered with another's rules");
            assert!(library.memory_usage() <= budget, "{} bytes after {i} policies", library.memory_usage());
            // Used between the others' builds, so never the least recently used: it stays, they make room.
            assert!(Arc::ptr_eq(&first, &library.for_policy(&policy(0)).unwrap()), "policy 0 evicted at {i}");
        }
        {
            let cache = library.cache();
            assert!((2..=4).contains(&cache.entries.len()), "{} entries cached", cache.entries.len());
            assert_eq!(cache.bytes, cache.entries.values().map(|entry| entry.weight).sum::<usize>());
        }
        // An evicted policy is built again when asked for, and answers as before.
        assert!(deny(&library.for_policy(&policy(1)).unwrap(), "word1"));
        assert!(library.memory_usage() <= budget);
    }

    fn train_for(policy: &Policy, dir: &Path) {
        let examples: Vec<safeguard_triage::Example> = (0..20)
            .map(|i| safeguard_triage::Example {
                text: if i % 2 == 0 { format!("buy cheap followers {i}") } else { format!("see you at lunch {i}") },
                violates: i % 2 == 0,
                weight: 1.0,
                source: 0,
            })
            .collect();
        let options = safeguard_triage::FitOptions {
            folds: 2,
            min_violate_support: 1,
            policy_name: Some(policy.meta.name.clone()),
            policy_hash: policy.hash.to_string(),
            ..safeguard_triage::FitOptions::default()
        };
        safeguard_triage::fit(&examples, vec![], &options).unwrap().save(dir).unwrap();
    }

    /// `safeguard triage train` while the server runs: the next request uses the new model, no restart.
    #[test]
    fn a_model_trained_while_serving_is_picked_up_and_names_stay_inside_the_models_dir() {
        let models = tempfile::tempdir().unwrap();
        let policy = Policy::parse("---\nname: promo\noutput: binary\n---\n# P\nReturn 0 or 1.").unwrap();
        let library = TriageLibrary::new(Some(models.path().to_path_buf())).with_model_recheck(Duration::ZERO);
        // A library that trusts its cache for a while does not look at the disk on every request.
        let throttled =
            TriageLibrary::new(Some(models.path().to_path_buf())).with_model_recheck(Duration::from_secs(3600));
        assert!(throttled.for_policy(&policy).is_none());
        assert!(library.for_policy(&policy).is_none(), "nothing trained yet");
        train_for(&policy, &models.path().join("promo"));
        assert!(throttled.for_policy(&policy).is_none(), "until the recheck is due, the cached answer stands");
        let triage = library.for_policy(&policy).expect("the new model is used");
        assert!(triage.model().is_some());
        assert!(Arc::ptr_eq(&triage, &library.for_policy(&policy).unwrap()), "cached while the file is unchanged");

        // A model of this version under a name that climbs out of the models directory is never read.
        let outside = Policy::parse("---\nname: ../promo\noutput: binary\n---\n# P\nReturn 0 or 1.").unwrap();
        let nested = TriageLibrary::new(Some(models.path().join("nested")));
        std::fs::create_dir_all(models.path().join("nested")).unwrap();
        assert!(nested.for_policy(&outside).is_none());
    }

    /// Allow rules written for a policy with a model are checked by that model; a model that is there but cannot
    /// be used (it does not load, or belongs to another version) must not leave them acting alone.
    #[test]
    fn allow_rules_skip_nothing_while_the_policy_model_is_unusable() {
        let models = tempfile::tempdir().unwrap();
        let rules = "triage:\n  rules:\n    keywords:\n      - {name: polite, action: allow, keywords: [thanks]}\n      - {name: scam, action: deny, keywords: [free bitcoin]}\n";
        let policy =
            Policy::parse(&format!("---\nname: promo\noutput: binary\n{rules}---\n# P\nReturn 0 or 1.")).unwrap();
        let library = TriageLibrary::new(Some(models.path().to_path_buf())).with_model_recheck(Duration::ZERO);
        let band = |text: &str| library.for_policy(&policy).unwrap().route(text).band;
        assert_eq!(band("thanks, how do I make ricin"), safeguard_triage::Band::ConfidentBenign, "rules alone");

        let dir = models.path().join("promo");
        train_for(&policy, &dir);
        std::fs::write(dir.join("weights.bin"), b"not the weights").unwrap();
        let triage = library.for_policy(&policy).unwrap();
        assert!(triage.model_unusable().is_some_and(|why| why.contains("does not load")), "{triage:?}");
        assert_eq!(band("thanks, how do I make ricin"), safeguard_triage::Band::Uncertain);
        assert_eq!(band("thanks for the free bitcoin"), safeguard_triage::Band::ConfidentViolation);

        // A model trained for the previous version of the policy is just as unusable.
        let older = Policy::parse("---\nname: promo\noutput: binary\n---\n# P\nAn older text. Return 0 or 1.").unwrap();
        train_for(&older, &dir);
        let triage = library.for_policy(&policy).unwrap();
        assert!(triage.model_unusable().is_some_and(|why| why.contains("trained for")), "{triage:?}");
        assert_eq!(band("thanks, how do I make ricin"), safeguard_triage::Band::Uncertain);
    }

    #[test]
    fn a_policy_chooses_what_a_triage_violation_does_and_typos_are_errors() {
        let with = |section: &str| {
            Policy::parse(&format!("---\nname: p\noutput: binary\ntriage:\n{section}\n---\n# P\nReturn 0 or 1."))
                .unwrap()
        };
        let review = triage_section(&with("  on_violation: review")).unwrap();
        assert_eq!(review.on_violation, Some(OnTriageViolation::Review));
        let beside_rules =
            with("  on_violation: confirm\n  rules:\n    keywords:\n      - {name: x, action: deny, keywords: [x]}");
        assert_eq!(triage_on_violation(&beside_rules).unwrap(), Some(OnTriageViolation::Confirm));
        assert!(triage_on_violation(&with("  on_violaton: review")).is_err());
        assert!(review.rules.is_none());
        let plain = Policy::parse("---\nname: plain\noutput: binary\n---\n# P\nReturn 0 or 1.").unwrap();
        assert_eq!(triage_section(&plain).unwrap().on_violation, None);

        let unknown_action = triage_section(&with("  on_violation: ban")).unwrap_err().to_string();
        assert!(unknown_action.contains("ban"), "{unknown_action}");
        let misspelt_key = triage_section(&with("  on_violaton: review")).unwrap_err().to_string();
        assert!(misspelt_key.contains("on_violaton"), "{misspelt_key}");
        // A section that cannot be read gives no triage at all, rules included.
        let typo_beside_rules = with(
            "  on_violaton: review\n  rules:\n    keywords:\n      - name: x\n        action: deny\n        keywords: [x]",
        );
        assert!(TriageLibrary::new(None).for_policy(&typo_beside_rules).is_none());
    }
}

//! Where a policy's triage comes from: rules in its own front matter (`triage: {rules: …}`) and, optionally,
//! a trained classifier in `<models_dir>/<policy name>/` — used only if it was trained for this exact version.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use safeguard_policy::Policy;
use safeguard_triage::{RuleSet, RulesConfig, Triage, TriageError, TriageModel};
use tracing::warn;

/// Reads the rules a policy declares for triage; `Ok(None)` when it declares none.
pub fn rules_from_policy(policy: &Policy) -> Result<Option<RuleSet>, TriageError> {
    let Some(rules) = policy.meta.extra.get("triage").and_then(|t| t.get("rules")) else {
        return Ok(None);
    };
    let config: RulesConfig = serde_json::from_value(rules.clone())
        .map_err(|e| TriageError::InvalidConfig(format!("policy {:?} triage.rules: {e}", policy.meta.name)))?;
    if config.is_empty() { Ok(None) } else { RuleSet::compile(&config).map(Some) }
}

/// Builds and caches triage per policy version.
#[derive(Debug, Default)]
pub struct TriageLibrary {
    models_dir: Option<PathBuf>,
    cache: Mutex<HashMap<String, Option<Arc<Triage>>>>,
}

impl TriageLibrary {
    pub fn new(models_dir: Option<PathBuf>) -> Self {
        Self { models_dir, cache: Mutex::default() }
    }

    /// The triage for this policy version, or `None` when it has neither rules nor a matching model.
    /// A broken rule list is logged and skipped: triage only ever saves work, so without it the model decides.
    pub fn for_policy(&self, policy: &Policy) -> Option<Arc<Triage>> {
        let hash = policy.hash.to_string();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.entry(hash.clone()).or_insert_with(|| self.build(policy, &hash)).clone()
    }

    fn build(&self, policy: &Policy, hash: &str) -> Option<Arc<Triage>> {
        let rules = rules_from_policy(policy).unwrap_or_else(|e| {
            warn!("ignoring triage rules: {e}");
            None
        });
        let model = self.models_dir.as_ref().and_then(|dir| {
            let path = dir.join(&policy.meta.name);
            if !path.join("model.json").exists() {
                return None;
            }
            match TriageModel::load(&path) {
                Ok(model) if model.meta.policy_hash == hash => Some(model),
                Ok(model) => {
                    warn!(policy = %policy.meta.name, trained_for = %model.meta.policy_hash, current = %hash,
                        "the triage model was trained for another version of this policy; not using it");
                    None
                }
                Err(e) => {
                    warn!(path = %path.display(), "cannot load the triage model: {e}");
                    None
                }
            }
        });
        (rules.is_some() || model.is_some()).then(|| Arc::new(Triage::new(rules, model)))
    }
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
    }
}

//! Where a policy's triage comes from: its own front matter (`triage: {rules: …, on_violation: …}`) and,
//! optionally, a trained classifier in `<models_dir>/<policy name>/` — used only if it was trained for this exact
//! version.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use safeguard_policy::Policy;
use safeguard_triage::{RuleSet, RulesConfig, Triage, TriageError, TriageModel};
use serde::Deserialize;
use tracing::warn;

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
    serde_json::from_value(section.clone())
        .map_err(|e| TriageError::InvalidConfig(format!("policy {:?} front matter triage: {e}", policy.meta.name)))
}

/// Reads and compiles the rules a policy declares for triage; `Ok(None)` when it declares none.
pub fn rules_from_policy(policy: &Policy) -> Result<Option<RuleSet>, TriageError> {
    match triage_section(policy)?.rules {
        Some(config) if !config.is_empty() => RuleSet::compile(&config).map(Some),
        _ => Ok(None),
    }
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
    /// A broken `triage:` section turns triage off for the policy (logged): triage only ever saves work, so
    /// without it the model decides, where a half-read section might act in a way its author did not ask for.
    pub fn for_policy(&self, policy: &Policy) -> Option<Arc<Triage>> {
        let hash = policy.hash.to_string();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.entry(hash.clone()).or_insert_with(|| self.build(policy, &hash)).clone()
    }

    fn build(&self, policy: &Policy, hash: &str) -> Option<Arc<Triage>> {
        let rules = match rules_from_policy(policy) {
            Ok(rules) => rules,
            Err(e) => {
                warn!("no triage for this policy: {e}");
                return None;
            }
        };
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
        assert!(library.for_policy(&bad).is_none());
    }

    #[test]
    fn a_policy_chooses_what_a_triage_violation_does_and_typos_are_errors() {
        let with = |section: &str| {
            Policy::parse(&format!("---\nname: p\noutput: binary\ntriage:\n{section}\n---\n# P\nReturn 0 or 1."))
                .unwrap()
        };
        let review = triage_section(&with("  on_violation: review")).unwrap();
        assert_eq!(review.on_violation, Some(OnTriageViolation::Review));
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

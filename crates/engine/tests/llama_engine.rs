//! The llama.cpp engine on a tiny random gpt-oss model: loading errors, prefix-cache determinism, batching,
//! stopping, sampling and the debug logits.
#![cfg(feature = "llama")]

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use safeguard_engine::llama::LlamaEngine;
use safeguard_engine::{Engine, EngineConfig, EngineError, GenRequest, Generation, Sampling, StopReason};

const VOCAB: usize = 201_088;

/// One tiny model per test binary: writing it is the slow part.
fn tiny_model() -> &'static Path {
    static MODEL: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &MODEL
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("tiny.gguf");
            write_tiny(&path);
            (dir, path)
        })
        .1
}

/// SAFEGUARD_ENGINE_TEST_MODEL runs the suite against another gpt-oss GGUF (f32 tiny models keep it exact).
fn write_tiny(path: &Path) {
    if let Some(src) = std::env::var_os("SAFEGUARD_ENGINE_TEST_MODEL") {
        std::fs::copy(src, path).unwrap();
        return;
    }
    safeguard_gguf::tiny::write_tiny_model(path, &safeguard_gguf::tiny::TinyConfig::with_seed(7)).unwrap();
}

fn config() -> EngineConfig {
    EngineConfig { threads: 2, n_ctx: 512, n_batch: 64, n_ubatch: 64, max_sequences: 4, ..EngineConfig::default() }
}

fn load(cfg: EngineConfig) -> LlamaEngine {
    // SAFEGUARD_LOG=debug shows llama.cpp's own log when a load fails.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("SAFEGUARD_LOG").unwrap_or_default())
        .with_test_writer()
        .try_init();
    LlamaEngine::load(tiny_model(), cfg).unwrap()
}

/// Deterministic pseudo-random token ids in the ordinary-text range.
fn tokens(seed: u32, n: usize) -> Vec<u32> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x % 199_000
        })
        .collect()
}

fn request(prefix_seed: u32, suffix_seed: u32, max_tokens: usize) -> GenRequest {
    GenRequest {
        prefix: tokens(prefix_seed, 140),
        suffix: tokens(suffix_seed, 12),
        max_tokens,
        sampling: Sampling::Greedy,
        stop: vec![],
        cancel: Default::default(),
    }
}

fn run(engine: &LlamaEngine, requests: &[GenRequest]) -> Vec<Generation> {
    engine.generate(requests, &|_, _| {}).into_iter().map(|r| r.unwrap()).collect()
}

fn run_one(engine: &LlamaEngine, request: &GenRequest) -> Generation {
    run(engine, std::slice::from_ref(request)).remove(0)
}

#[test]
fn engine_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<LlamaEngine>();
    let _: &dyn Engine = &load(config());
}

#[test]
fn load_errors_are_specific() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.gguf");
    assert!(matches!(LlamaEngine::load(&missing, config()), Err(EngineError::ModelNotFound { .. })));

    let text = dir.path().join("policy.md");
    std::fs::write(&text, "# not a model\n").unwrap();
    assert!(matches!(LlamaEngine::load(&text, config()), Err(EngineError::NotGguf { .. })));

    let bytes = std::fs::read(tiny_model()).unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = LlamaEngine::load(&truncated, config()).err().unwrap();
    assert!(matches!(err, EngineError::Truncated { .. }), "{err}");

    // Same length, other name: the header stays valid, only the architecture changes.
    let mut pattern = b"general.architecture".to_vec();
    pattern.extend(8u32.to_le_bytes());
    pattern.extend(7u64.to_le_bytes());
    pattern.extend(b"gpt-oss");
    let at = bytes.windows(pattern.len()).position(|w| w == pattern).unwrap() + pattern.len() - 7;
    let mut foreign = bytes.clone();
    foreign[at..at + 7].copy_from_slice(b"qwen3xx");
    let other = dir.path().join("other.gguf");
    std::fs::write(&other, &foreign).unwrap();
    let err = LlamaEngine::load(&other, config()).err().unwrap();
    assert!(matches!(&err, EngineError::WrongArchitecture { found: Some(a), .. } if a == "qwen3xx"), "{err}");

    let bad = EngineConfig { n_ubatch: 128, n_batch: 64, ..config() };
    assert!(matches!(LlamaEngine::load(tiny_model(), bad), Err(EngineError::InvalidConfig(_))));
}

#[test]
fn cold_and_warm_prefix_give_identical_tokens_and_probs() {
    let engine = load(config());
    let req = request(1, 2, 12);
    let cold = run_one(&engine, &req);
    let warm = run_one(&engine, &req);
    assert_eq!(cold.cached_prompt_tokens, 0);
    assert_eq!(warm.cached_prompt_tokens, req.prefix.len());
    assert_eq!(cold.prompt_tokens, 152);
    assert_eq!(cold.tokens.len(), 12);
    assert_eq!(cold.stop_reason, StopReason::MaxTokens);
    assert_eq!(cold.tokens, warm.tokens);
    assert_eq!(cold.token_probs, warm.token_probs);
    assert!(cold.token_probs.iter().all(|p| *p > 0.0 && *p <= 1.0));
    let stats = engine.prefix_cache_stats();
    assert_eq!((stats.entries, stats.hits, stats.misses), (1, 1, 1));
    assert!(stats.bytes > 0);
}

#[test]
fn interleaved_prefixes_and_evictions_do_not_change_results() {
    let a = request(10, 11, 8);
    let b = request(20, 21, 8);
    let a2 = GenRequest { suffix: tokens(12, 9), ..a.clone() };
    let uncached = load(EngineConfig { prefix_cache_bytes: 0, ..config() });
    let expected: Vec<_> = [&a, &b, &a2].iter().map(|r| run_one(&uncached, r).tokens).collect();
    assert_eq!(uncached.prefix_cache_stats().entries, 0);
    assert_ne!(expected[0], expected[1], "different prompts should differ on a random model");

    let cached = load(config());
    for round in 0..2 {
        for (req, want) in [&a, &b, &a2].iter().zip(&expected) {
            let got = run_one(&cached, req);
            assert_eq!(&got.tokens, want, "round {round}");
        }
    }
    let stats = cached.prefix_cache_stats();
    assert_eq!((stats.entries, stats.misses, stats.hits), (2, 2, 4));

    // A budget that fits one state forces an eviction on every prefix switch.
    let one_state = stats.bytes / 2 + 1;
    let tight = load(EngineConfig { prefix_cache_bytes: one_state, ..config() });
    for (req, want) in [&a, &b, &a2, &b].iter().zip(expected.iter().chain([&expected[1]])) {
        assert_eq!(&run_one(&tight, req).tokens, want);
    }
    assert!(tight.prefix_cache_stats().evictions >= 2);
}

#[test]
fn a_batch_gives_the_same_tokens_as_single_calls() {
    let engine = load(EngineConfig { max_sequences: 3, ..config() });
    let mut requests = vec![request(30, 31, 10), request(30, 32, 6), request(40, 41, 10), request(50, 51, 3)];
    requests[2].suffix.truncate(5);
    let singles: Vec<_> = requests.iter().map(|r| run_one(&engine, r)).collect();
    let streamed = Mutex::new(vec![Vec::new(); requests.len()]);
    let batched: Vec<_> = engine
        .generate(&requests, &|i, t| streamed.lock().unwrap()[i].push(t))
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let streamed = streamed.into_inner().unwrap();
    for (i, (single, batch)) in singles.iter().zip(&batched).enumerate() {
        assert_eq!(single.tokens, batch.tokens, "request {i}");
        // Batched decode steps multiply several rows at once and ggml's kernels round differently than for
        // one row, so probabilities agree to float rounding rather than bit for bit.
        for (p, q) in single.token_probs.iter().zip(&batch.token_probs) {
            assert!((p - q).abs() <= 1e-4 * p.max(*q), "request {i}: {p} vs {q}");
        }
        assert_eq!(streamed[i], batch.tokens, "stream of request {i}");
        assert_eq!(batch.tokens.len(), requests[i].max_tokens);
    }
}

/// A request whose flag is set stops at the next decode step instead of running on to its token cap, and the
/// other requests of the batch are not disturbed.
#[test]
fn a_cancelled_request_stops_decoding() {
    let engine = load(config());
    let cancelled = request(70, 71, 300);
    let flag = cancelled.cancel.clone();
    let other = request(70, 72, 20);
    let results = engine.generate(&[cancelled, other.clone()], &|i, _| {
        if i == 0 {
            flag.cancel();
        }
    });
    let results: Vec<Generation> = results.into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(results[0].stop_reason, StopReason::Cancelled);
    assert!(results[0].tokens.len() < 20, "{} tokens after the cancel", results[0].tokens.len());
    assert_eq!(results[1].tokens, run_one(&engine, &other).tokens);
}

/// A request cancelled before its turn (its caller hung up while it queued) costs no prefill and gives no
/// token; the requests beside it are decoded as usual.
#[test]
fn a_request_cancelled_before_its_turn_is_never_prefilled() {
    let engine = load(config());
    let gone = request(70, 73, 50);
    gone.cancel.cancel();
    let other = request(70, 72, 20);
    let results: Vec<Generation> =
        engine.generate(&[gone, other.clone()], &|_, _| {}).into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(results[0].stop_reason, StopReason::Cancelled);
    assert!(results[0].tokens.is_empty(), "{:?}", results[0].tokens);
    assert_eq!(results[0].prefill_ms, 0.0);
    assert_eq!(results[1].tokens, run_one(&engine, &other).tokens);
}

#[test]
fn stops_on_a_stop_token_and_includes_it() {
    let engine = load(config());
    let free = run_one(&engine, &request(60, 61, 10));
    let stop_at = free.tokens[3];
    let first = free.tokens.iter().position(|&t| t == stop_at).unwrap();
    let stopped = run_one(&engine, &GenRequest { stop: vec![7, stop_at], ..request(60, 61, 10) });
    assert_eq!(stopped.stop_reason, StopReason::Stop(stop_at));
    assert_eq!(stopped.tokens, free.tokens[..=first]);
    assert_eq!(stopped.token_probs.len(), stopped.tokens.len());
}

#[test]
fn zero_budget_and_prompts_without_suffix_or_prefix() {
    let engine = load(config());
    let zero = run_one(&engine, &request(70, 71, 0));
    assert!(zero.tokens.is_empty());
    assert_eq!(zero.stop_reason, StopReason::MaxTokens);

    let whole = tokens(72, 40);
    let no_suffix = GenRequest { prefix: whole.clone(), suffix: vec![], max_tokens: 4, ..Default::default() };
    let first = run_one(&engine, &no_suffix);
    let again = run_one(&engine, &no_suffix);
    assert_eq!(first.tokens, again.tokens);
    assert_eq!(again.cached_prompt_tokens, 39);

    let no_prefix = GenRequest { prefix: vec![], suffix: whole, max_tokens: 4, ..Default::default() };
    let g = run_one(&engine, &no_prefix);
    assert_eq!((g.tokens.len(), g.cached_prompt_tokens), (4, 0));
}

#[test]
fn bad_requests_fail_alone() {
    let engine = load(config());
    let good = request(80, 81, 3);
    let bad_token = GenRequest { suffix: vec![1, VOCAB as u32], ..good.clone() };
    let empty = GenRequest { max_tokens: 3, ..Default::default() };
    let too_long = GenRequest { suffix: tokens(82, 600), ..good.clone() };
    let bad_sampling =
        GenRequest { sampling: Sampling::Seeded { seed: 1, temperature: -1.0, top_p: 1.0 }, ..good.clone() };
    let results = engine.generate(&[bad_token, good.clone(), empty, too_long, bad_sampling], &|_, _| {});
    assert!(matches!(results[0], Err(EngineError::InvalidToken { token, .. }) if token == VOCAB as u32));
    assert_eq!(results[1].as_ref().unwrap().tokens, run_one(&engine, &good).tokens);
    assert!(matches!(results[2], Err(EngineError::InvalidRequest(_))));
    assert!(matches!(results[3], Err(EngineError::PromptTooLong { tokens: 740, n_ctx: 512 })));
    assert!(matches!(results[4], Err(EngineError::InvalidRequest(_))));
}

#[test]
fn context_full_stops_generation() {
    let engine = load(EngineConfig { n_ctx: 256, ..config() });
    assert_eq!(engine.n_ctx_per_sequence(), 256);
    let req = GenRequest { prefix: tokens(90, 200), suffix: tokens(91, 50), max_tokens: 100, ..Default::default() };
    let g = run_one(&engine, &req);
    assert_eq!(g.stop_reason, StopReason::ContextFull);
    assert_eq!(g.tokens.len(), 256 - 250 + 1);
}

/// llama.cpp caps its batch at the context asked for (300) and rounds the context itself up (to 512): a prompt
/// between the two, sent as one decode of `n_batch` (512), used to abort the process on llama.cpp's assertion.
#[test]
fn a_prompt_longer_than_the_asked_context_but_within_the_rounded_one_decodes() {
    let engine = load(EngineConfig { n_ctx: 300, n_batch: 512, n_ubatch: 512, max_sequences: 1, ..config() });
    let n_ctx = engine.n_ctx_per_sequence();
    assert!(n_ctx > 400, "llama.cpp rounds the context up: {n_ctx}");
    let req = GenRequest { prefix: tokens(92, 50), suffix: tokens(93, 350), max_tokens: 2, ..Default::default() };
    let g = run_one(&engine, &req);
    assert_eq!(g.tokens.len(), 2);
}

#[test]
fn seeded_sampling_repeats_per_seed() {
    let engine = load(config());
    let seeded = |seed| GenRequest {
        sampling: Sampling::Seeded { seed, temperature: 1.5, top_p: 0.95 },
        ..request(100, 101, 8)
    };
    let a = run_one(&engine, &seeded(1));
    let b = run_one(&engine, &seeded(1));
    let c = run_one(&engine, &seeded(2));
    assert_eq!(a.tokens, b.tokens);
    assert_ne!(a.tokens, c.tokens);
    // A batch repeats too. (Against single calls it may not: batched logits differ by float rounding, and on a
    // near-uniform random model that is enough to move a sampled token.)
    let both = run(&engine, &[seeded(2), seeded(1)]);
    assert_eq!(both[0].tokens, run(&engine, &[seeded(2), seeded(1)])[0].tokens);
    assert_eq!(both[0].tokens[0], c.tokens[0], "the first token comes from the unbatched prefill");
}

#[test]
fn concurrent_callers_get_their_own_results() {
    let engine = load(config());
    let r1 = request(110, 111, 6);
    let r2 = request(120, 121, 6);
    let want1 = run_one(&engine, &r1).tokens;
    let want2 = run_one(&engine, &r2).tokens;
    std::thread::scope(|s| {
        let h1 = s.spawn(|| (0..3).map(|_| run_one(&engine, &r1).tokens).collect::<Vec<_>>());
        let h2 = s.spawn(|| (0..3).map(|_| run_one(&engine, &r2).tokens).collect::<Vec<_>>());
        assert!(h1.join().unwrap().iter().all(|t| *t == want1));
        assert!(h2.join().unwrap().iter().all(|t| *t == want2));
    });
}

#[test]
fn debug_logits_cover_every_position() {
    let engine = load(config());
    let prompt = tokens(130, 70);
    let all = safeguard_engine::debug::logits(&engine, &prompt).unwrap();
    assert_eq!(all.len(), 70);
    assert!(all.iter().all(|row| row.len() == VOCAB && row.iter().all(|v| v.is_finite())));
    assert_ne!(all[0], all[1]);
    // Causal: a prefix of the prompt reproduces the first rows, exactly when the decode chunks have the same
    // shape (64 positions per call), and to float rounding otherwise (kernels depend on the batch shape).
    let first_chunk = safeguard_engine::debug::logits(&engine, &prompt[..64]).unwrap();
    assert_eq!(first_chunk[..], all[..64]);
    let head = safeguard_engine::debug::logits(&engine, &prompt[..20]).unwrap();
    let max_diff =
        head.iter().zip(&all).flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs())).fold(0f32, f32::max);
    let scale = all[..20].iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    assert!(max_diff < 0.02 * scale, "{max_diff} vs max |logit| {scale}");
    assert!(
        head.iter()
            .zip(&all)
            .all(|(a, b)| safeguard_engine::sampling::argmax(a) == safeguard_engine::sampling::argmax(b))
    );
    // The engine's first greedy token is the argmax of the last row, with the row's softmax probability.
    let g = run_one(&engine, &GenRequest { suffix: prompt.clone(), max_tokens: 1, ..Default::default() });
    let last = &all[69];
    let argmax = safeguard_engine::sampling::argmax(last);
    assert_eq!(g.tokens[0], argmax);
    let p = safeguard_engine::sampling::softmax_prob(last, argmax);
    assert!((p - g.token_probs[0]).abs() < 1e-3 * p.max(1e-3), "{p} vs {}", g.token_probs[0]);
    assert!(matches!(engine.logits(&[VOCAB as u32]), Err(EngineError::InvalidToken { .. })));
}

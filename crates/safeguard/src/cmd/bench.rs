use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Measure the embedded engine: load, prefill, decode, the policy-prefix cache and batching, against the
    /// memory-bandwidth bound measured in the same run.
    Engine(EngineArgs),
    /// Measure triage: single-core items/s, and the share of benign ToxicChat test items skipped at 99 %
    /// recall of toxic ones, against a keyword baseline measured in the same run.
    Triage(super::triage::BenchArgs),
    /// Measure the latency `safeguard serve` adds over a direct backend call, at a fixed request rate.
    Server(super::bench_server::ServerArgs),
}

#[derive(clap::Args)]
pub struct EngineArgs {
    /// gpt-oss GGUF model file.
    #[arg(long)]
    pub model: PathBuf,
    /// Tokens in the cacheable policy prefix (system + developer messages).
    #[arg(long, default_value_t = 256)]
    pub prefix_tokens: usize,
    /// Tokens of content (the user message) after the prefix.
    #[arg(long, default_value_t = 64)]
    pub content_tokens: usize,
    /// Tokens generated per item.
    #[arg(long, default_value_t = 32)]
    pub decode_tokens: usize,
    /// CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Batch sizes for the aggregate-throughput runs.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub batch_sizes: Vec<usize>,
    /// Layers to offload to the GPU (99: all); needs a llama.cpp with a GPU backend.
    #[arg(long = "gpu-layers", alias = "n-gpu-layers", default_value_t = 0)]
    pub n_gpu_layers: u32,
    /// Map the model file instead of reading it (faster load from a warm page cache, about twice the peak
    /// RSS on CPU because llama.cpp repacks the experts).
    #[arg(long)]
    pub mmap: bool,
    /// K/V cache element type: f16, f32 or q8_0.
    #[arg(long, default_value = "f16")]
    pub kv_cache: String,
    /// Flash attention: auto (llama.cpp decides), on or off.
    #[arg(long, default_value = "auto", value_parser = ["auto", "on", "off"])]
    pub flash_attention: String,
    /// Read bandwidth in GB/s for the decode bound, instead of the CPU copy rate measured in the run: with
    /// layers on a GPU, that GPU's read rate measured beside the bench (a CPU copy says nothing about it).
    #[arg(long = "bandwidth-gbps")]
    pub bandwidth_gbps: Option<f64>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Engine(args) => engine::run(args),
        Command::Triage(args) => super::triage::bench(args),
        Command::Server(args) => super::bench_server::run(args),
    }
}

#[cfg(not(feature = "embedded"))]
mod engine {
    pub fn run(_: super::EngineArgs) -> anyhow::Result<std::process::ExitCode> {
        anyhow::bail!("this safeguard was built without the embedded engine (cargo feature `embedded`)")
    }
}

#[cfg(feature = "embedded")]
mod engine {
    use std::process::ExitCode;
    use std::time::Instant;

    use anyhow::Context as _;
    use safeguard_engine::llama::LlamaEngine;
    use safeguard_engine::{Engine, EngineConfig, GenRequest, Generation, Sampling};
    use serde_json::json;

    use super::EngineArgs;

    /// Deterministic ordinary-text token ids: speed does not depend on which tokens they are.
    fn tokens(seed: u32, n: usize) -> Vec<u32> {
        let mut x = seed.wrapping_mul(2_654_435_761) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x % 199_000
            })
            .collect()
    }

    fn generate_one(engine: &LlamaEngine, request: &GenRequest) -> anyhow::Result<Generation> {
        let mut results = engine.generate(std::slice::from_ref(request), &|_, _| {});
        Ok(results.remove(0)?)
    }

    fn per_sec(count: usize, ms: f64) -> f64 {
        if ms > 0.0 { count as f64 * 1e3 / ms } else { f64::NAN }
    }

    /// Best of several large copies split over `threads` threads, in bytes per second: what the decode
    /// threads together can stream from memory. One thread alone reaches a fraction of a server's bandwidth.
    fn memcpy_bytes_per_sec(threads: usize) -> f64 {
        const SIZE: usize = 1 << 30;
        let src = vec![1u8; SIZE];
        let mut dst = vec![0u8; SIZE];
        let chunk = SIZE.div_ceil(threads.max(1));
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let started = Instant::now();
            std::thread::scope(|scope| {
                for (to, from) in dst.chunks_mut(chunk).zip(src.chunks(chunk)) {
                    scope.spawn(move || to.copy_from_slice(from));
                }
            });
            std::hint::black_box(&mut dst);
            best = best.min(started.elapsed().as_secs_f64());
        }
        SIZE as f64 / best
    }

    fn human_bytes(bytes: f64) -> String {
        match bytes {
            b if b >= 1e9 => format!("{:.2} GB", b / 1e9),
            b if b >= 1e6 => format!("{:.1} MB", b / 1e6),
            b => format!("{:.1} kB", b / 1e3),
        }
    }

    fn peak_rss_bytes() -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }

    pub fn run(args: EngineArgs) -> anyhow::Result<ExitCode> {
        anyhow::ensure!(args.prefix_tokens > 0 && args.content_tokens > 0, "prefix and content need tokens");
        anyhow::ensure!(args.decode_tokens >= 2, "--decode-tokens must be at least 2");
        anyhow::ensure!(args.batch_sizes.iter().all(|&n| (1..=64).contains(&n)), "batch sizes must be 1..=64");
        let max_batch = args.batch_sizes.iter().copied().max().unwrap_or(1);
        let prompt = args.prefix_tokens + args.content_tokens;
        let n_ctx =
            u32::try_from((prompt + args.decode_tokens + 1).next_multiple_of(256)).context("prompt too long")?;
        let defaults = EngineConfig::default();
        let config = EngineConfig {
            threads: args.threads.unwrap_or(defaults.threads),
            n_ctx,
            max_sequences: max_batch,
            n_gpu_layers: args.n_gpu_layers,
            use_mmap: args.mmap,
            kv_cache: args.kv_cache.parse()?,
            flash_attention: match args.flash_attention.as_str() {
                "on" => Some(true),
                "off" => Some(false),
                _ => None,
            },
            ..defaults
        };
        let threads = config.threads;
        let (copy_rate, rate_source) = match args.bandwidth_gbps {
            Some(gbps) => {
                let rate = gbps * 1e9;
                anyhow::ensure!(rate.is_finite() && rate > 0.0, "--bandwidth-gbps must be a positive number");
                (rate, "given".to_string())
            }
            None => (memcpy_bytes_per_sec(threads), format!("memcpy ({threads} threads)")),
        };
        // The copy's 2 GiB would otherwise be the peak for small models: restart the high-water mark (Linux).
        let _ = std::fs::write("/proc/self/clear_refs", "5");

        let started = Instant::now();
        let engine = LlamaEngine::load(&args.model, config)?;
        let load_ms = started.elapsed().as_secs_f64() * 1e3;
        let file = engine.model_file();
        let rate_source = if engine.gpu_offload() && args.bandwidth_gbps.is_none() {
            format!("{rate_source}; layers are on the GPU, whose rate --bandwidth-gbps gives,")
        } else {
            rate_source
        };

        let prefix = tokens(1, args.prefix_tokens);
        let item = |k: u32| GenRequest {
            prefix: prefix.clone(),
            suffix: tokens(100 + k, args.content_tokens),
            max_tokens: args.decode_tokens,
            sampling: Sampling::Greedy,
            stop: vec![],
            cancel: Default::default(),
        };

        // One short decision under another prefix first: a GPU's first calls pay for library set-up and kernel
        // loading, which would otherwise be counted as prefill. The measured prefix is still not in the cache.
        let warm_up = GenRequest { prefix: tokens(2, args.prefix_tokens), max_tokens: 2, ..item(0) };
        generate_one(&engine, &warm_up)?;

        // The same decision twice: first with the whole prompt prefilled, then with the prefix from the cache.
        let uncached = generate_one(&engine, &item(0))?;
        let cached = generate_one(&engine, &item(0))?;
        anyhow::ensure!(cached.cached_prompt_tokens == args.prefix_tokens, "the prefix cache did not hit");
        let decode_steps = uncached.tokens.len().saturating_sub(1);
        let prefill_tps = per_sec(prompt, uncached.prefill_ms);
        let decode_tps = per_sec(decode_steps, uncached.decode_ms);
        let uncached_total = uncached.prefill_ms + uncached.decode_ms;
        let cached_total = cached.prefill_ms + cached.decode_ms;

        let mut batches = Vec::new();
        for &n in &args.batch_sizes {
            let requests: Vec<_> = (0..n as u32).map(|k| item(10 + k)).collect();
            let started = Instant::now();
            let results = engine.generate(&requests, &|_, _| {});
            let wall_ms = started.elapsed().as_secs_f64() * 1e3;
            let results = results.into_iter().collect::<Result<Vec<_>, _>>()?;
            let generated: usize = results.iter().map(|g| g.tokens.len()).sum();
            let steps: usize = results.iter().map(|g| g.tokens.len().saturating_sub(1)).sum();
            let decode_ms = results.iter().map(|g| g.decode_ms).fold(0.0, f64::max);
            batches.push((n, generated, wall_ms, per_sec(steps, decode_ms), per_sec(generated, wall_ms)));
        }

        let per_token = file.bytes_read_per_token();
        let bound_tps = copy_rate / per_token.total().max(1) as f64;
        let rss = peak_rss_bytes();
        let gb = |b: f64| b / 1e9;

        if args.json {
            let report = json!({
                "model": args.model.display().to_string(),
                "model_file_bytes": file.file_len,
                "threads": threads,
                "use_mmap": args.mmap,
                "kv_cache": args.kv_cache,
                "n_gpu_layers": args.n_gpu_layers,
                "gpu_offload": engine.gpu_offload(),
                "flash_attention": args.flash_attention,
                "prefix_tokens": args.prefix_tokens,
                "content_tokens": args.content_tokens,
                "decode_tokens": args.decode_tokens,
                "load_ms": load_ms,
                "prefill_tokens_per_s": prefill_tps,
                "decode_tokens_per_s": decode_tps,
                "decision_uncached": {"prefill_ms": uncached.prefill_ms, "decode_ms": uncached.decode_ms},
                "decision_cached": {"prefill_ms": cached.prefill_ms, "decode_ms": cached.decode_ms},
                "ttft_speedup": uncached.prefill_ms / cached.prefill_ms,
                "decision_speedup": uncached_total / cached_total,
                "prefix_state_bytes": engine.prefix_cache_stats().bytes,
                "batches": batches.iter().map(|(n, generated, wall_ms, decode_tps, e2e)| json!({
                    "n": n, "generated": generated, "wall_ms": wall_ms,
                    "aggregate_decode_tokens_per_s": decode_tps, "end_to_end_tokens_per_s": e2e})).collect::<Vec<_>>(),
                "memcpy_bytes_per_s": args.bandwidth_gbps.is_none().then_some(copy_rate),
                "bandwidth_bytes_per_s": copy_rate,
                "bandwidth_source": rate_source,
                "bytes_per_token": {
                    "attention_and_dense": per_token.attention_and_dense,
                    "routed_experts": per_token.routed_experts,
                    "output_matrix": per_token.output_matrix,
                    "embedding_row": per_token.embedding_row,
                    "total": per_token.total()},
                "decode_bound_tokens_per_s": bound_tps,
                "decode_fraction_of_bound": decode_tps / bound_tps,
                "peak_rss_bytes": rss,
            });
            println!("{}", serde_json::to_string_pretty(&report)?);
            return Ok(ExitCode::SUCCESS);
        }

        println!(
            "model           {} ({:.2} GB, {} tensors)",
            args.model.display(),
            gb(file.file_len as f64),
            file.tensors.len()
        );
        println!(
            "threads         {threads} (mmap {}, KV cache {}, flash attention {})",
            args.mmap, args.kv_cache, args.flash_attention
        );
        match (args.n_gpu_layers, engine.gpu_offload()) {
            (0, _) => println!("GPU             none asked for (--gpu-layers 0)"),
            (n, true) => println!("GPU             up to {n} layers offloaded"),
            (n, false) => {
                println!("GPU             {n} layers asked for, none offloaded: this llama.cpp has no GPU backend")
            }
        }
        println!("load            {load_ms:.0} ms");
        println!(
            "prefill         {prompt} tokens (prefix {} + content {}) in {:.0} ms = {prefill_tps:.1} tok/s",
            args.prefix_tokens, args.content_tokens, uncached.prefill_ms
        );
        println!(
            "decode          {decode_steps} tokens in {:.0} ms = {decode_tps:.2} tok/s (batch 1)",
            uncached.decode_ms
        );
        println!(
            "decision        whole prompt prefilled: first token {:.0} ms, {} tokens {:.0} ms",
            uncached.prefill_ms,
            uncached.tokens.len(),
            uncached_total
        );
        println!(
            "                prefix cached:          first token {:.0} ms, {} tokens {:.0} ms",
            cached.prefill_ms,
            cached.tokens.len(),
            cached_total
        );
        println!(
            "                cached is {:.2}× faster to first token, {:.2}× for the decision (prefix state {})",
            uncached.prefill_ms / cached.prefill_ms,
            uncached_total / cached_total,
            human_bytes(engine.prefix_cache_stats().bytes as f64)
        );
        let base = batches.first().map_or(f64::NAN, |b| b.3);
        for (n, generated, wall_ms, decode_tps, e2e) in &batches {
            println!(
                "batch N={n:<3}     {generated} tokens in {wall_ms:.0} ms: decode {decode_tps:.2} tok/s aggregate ({:.2}× N={}), {e2e:.2} tok/s end to end",
                decode_tps / base,
                batches[0].0
            );
        }
        println!(
            "bandwidth bound {rate_source} {:.1} GB/s ÷ {} read per token (attention+dense {}, routed experts {}, output {}) = {bound_tps:.1} tok/s; batch-1 decode is {:.0}% of it",
            gb(copy_rate),
            human_bytes(per_token.total() as f64),
            human_bytes(per_token.attention_and_dense as f64),
            human_bytes(per_token.routed_experts as f64),
            human_bytes(per_token.output_matrix as f64),
            100.0 * decode_tps / bound_tps
        );
        match rss {
            Some(bytes) => println!("peak RSS        {}", human_bytes(bytes as f64)),
            None => println!("peak RSS        unavailable (no /proc/self/status)"),
        }
        Ok(ExitCode::SUCCESS)
    }
}

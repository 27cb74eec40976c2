//! The embedded llama.cpp engine.
//!
//! A llama.cpp context borrows its model and is not `Sync`, so both live on one dedicated worker thread that
//! owns them for the engine's lifetime; callers talk to it over a channel. Tokens stream back over a per-call
//! channel, so `on_token` runs on the caller's thread.
//!
//! Reproducibility rules that shape this file:
//! - The policy prefix and the rest of the prompt are always prefilled as two separate decode steps, and the
//!   prefix state always reaches its sequence through a save/restore round trip, cache hit or miss. llama.cpp
//!   picks kernels by batch shape, so a one-shot prefill would not be bit-identical to a cached one.
//! - Each request gets its own sequence and its own KV stream (`kv_unified = false`), and its prompt is
//!   prefilled alone; only the one-token decode steps are shared between requests.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::{LlamaStateSeqFlags, SeqState};

use crate::model_file::{self, ModelFileInfo};
use crate::prefix_cache::PrefixCache;
use crate::sampling::{Pick, Sampler};
use crate::{Engine, EngineConfig, EngineError, GenRequest, Generation, PrefixCacheStats, StopReason};

/// Positions per decode call when every position's logits are wanted: bounds the logits buffer
/// (64 × 201088 floats = 51 MB) whatever `n_batch` is.
const ALL_LOGITS_CHUNK: usize = 64;

/// llama.cpp allows one backend per process; its logs go to `tracing` (targets `llama.cpp`, `ggml`).
fn backend() -> Result<&'static LlamaBackend, EngineError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| EngineError::Context(format!("llama.cpp backend init failed: {e}")))
}

enum Job {
    Generate { requests: Vec<GenRequest>, events: mpsc::Sender<Event> },
    Logits { tokens: Vec<u32>, reply: mpsc::Sender<Result<Vec<Vec<f32>>, EngineError>> },
    CacheStats { reply: mpsc::Sender<PrefixCacheStats> },
    ClearCache,
}

enum Event {
    Token(usize, u32),
    Done(Vec<Result<Generation, EngineError>>),
}

struct Ready {
    n_vocab: usize,
    n_ctx_per_sequence: usize,
    load_ms: f64,
}

/// gpt-oss on llama.cpp with a policy-prefix state cache and multi-sequence batching.
pub struct LlamaEngine {
    jobs: Option<mpsc::Sender<Job>>,
    worker: Option<JoinHandle<()>>,
    model_id: String,
    file: ModelFileInfo,
    config: EngineConfig,
    n_vocab: usize,
    n_ctx_per_sequence: usize,
    load_ms: f64,
    gpu_offload: bool,
}

impl LlamaEngine {
    /// Checks the file (exists, GGUF, complete, gpt-oss) and loads it into a fresh context.
    #[tracing::instrument(skip(cfg), fields(path = %path.display()))]
    pub fn load(path: &Path, cfg: EngineConfig) -> Result<Self, EngineError> {
        cfg.validate()?;
        let file = model_file::inspect_gpt_oss(path)?;
        let backend = backend()?;
        let gpu_offload = cfg.n_gpu_layers > 0 && backend.supports_gpu_offload();
        if cfg.n_gpu_layers > 0 && !gpu_offload {
            // Not an error: the same configuration file serves CPU and GPU machines.
            tracing::warn!(
                n_gpu_layers = cfg.n_gpu_layers,
                "this llama.cpp has no GPU backend (build with the `cuda` feature, or link a GPU build of \
                 llama.cpp); every layer runs on the CPU"
            );
        }
        let (ready_tx, ready_rx) = mpsc::channel();
        let (job_tx, job_rx) = mpsc::channel();
        let worker_path = path.to_path_buf();
        let worker_cfg = cfg.clone();
        let worker = std::thread::Builder::new()
            .name("llama-engine".into())
            .spawn(move || worker_main(backend, &worker_path, &worker_cfg, &ready_tx, &job_rx))
            .map_err(|e| EngineError::Context(format!("cannot start the engine thread: {e}")))?;
        let ready = match ready_rx.recv() {
            Ok(Ok(ready)) => ready,
            Ok(Err(err)) => {
                let _ = worker.join();
                return Err(err);
            }
            Err(_) => {
                let _ = worker.join();
                return Err(EngineError::WorkerGone);
            }
        };
        let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
        tracing::info!(load_ms = ready.load_ms, n_ctx_per_sequence = ready.n_ctx_per_sequence, "model loaded");
        Ok(LlamaEngine {
            jobs: Some(job_tx),
            worker: Some(worker),
            model_id: format!("llama.cpp:{name}"),
            file,
            config: cfg,
            n_vocab: ready.n_vocab,
            n_ctx_per_sequence: ready.n_ctx_per_sequence,
            load_ms: ready.load_ms,
            gpu_offload,
        })
    }

    /// Whether layers were offloaded to a GPU: some were asked for and this llama.cpp has a GPU backend.
    pub fn gpu_offload(&self) -> bool {
        self.gpu_offload
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The GGUF header and tensor table the engine was loaded from.
    pub fn model_file(&self) -> &ModelFileInfo {
        &self.file
    }

    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    /// Prompt plus generated tokens that fit one sequence (llama.cpp rounds `n_ctx` up to a multiple of 256).
    pub fn n_ctx_per_sequence(&self) -> usize {
        self.n_ctx_per_sequence
    }

    /// Wall time of llama.cpp's model load and context creation.
    pub fn load_ms(&self) -> f64 {
        self.load_ms
    }

    /// Float32 logits at every position of `tokens`, run as a fresh sequence (no cache involved).
    pub fn logits(&self, tokens: &[u32]) -> Result<Vec<Vec<f32>>, EngineError> {
        let (reply, rx) = mpsc::channel();
        self.send(Job::Logits { tokens: tokens.to_vec(), reply })?;
        rx.recv().map_err(|_| EngineError::WorkerGone)?
    }

    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        let (reply, rx) = mpsc::channel();
        if self.send(Job::CacheStats { reply }).is_err() {
            return PrefixCacheStats::default();
        }
        rx.recv().unwrap_or_default()
    }

    pub fn clear_prefix_cache(&self) {
        let _ = self.send(Job::ClearCache);
    }

    fn send(&self, job: Job) -> Result<(), EngineError> {
        self.jobs.as_ref().ok_or(EngineError::WorkerGone)?.send(job).map_err(|_| EngineError::WorkerGone)
    }
}

impl Drop for LlamaEngine {
    fn drop(&mut self) {
        // Closing the job channel ends the worker loop, which frees the context before the model.
        self.jobs.take();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

impl Engine for LlamaEngine {
    fn model_id(&self) -> String {
        self.model_id.clone()
    }

    fn max_sequences(&self) -> usize {
        self.config.max_sequences
    }

    fn context_per_sequence(&self) -> Option<usize> {
        Some(self.n_ctx_per_sequence)
    }

    #[tracing::instrument(skip_all, fields(requests = requests.len()))]
    fn generate(
        &self,
        requests: &[GenRequest],
        on_token: &(dyn Fn(usize, u32) + Sync),
    ) -> Vec<Result<Generation, EngineError>> {
        let gone = || (0..requests.len()).map(|_| Err(EngineError::WorkerGone)).collect();
        if requests.is_empty() {
            return Vec::new();
        }
        let (events, rx) = mpsc::channel();
        if self.send(Job::Generate { requests: requests.to_vec(), events }).is_err() {
            return gone();
        }
        for event in rx {
            match event {
                Event::Token(index, token) => on_token(index, token),
                Event::Done(results) => return results,
            }
        }
        gone()
    }
}

fn kv_cache_type(kind: crate::KvCacheType) -> KvCacheType {
    match kind {
        crate::KvCacheType::F16 => KvCacheType::F16,
        crate::KvCacheType::F32 => KvCacheType::F32,
        crate::KvCacheType::Q8_0 => KvCacheType::Q8_0,
    }
}

fn worker_main(
    backend: &'static LlamaBackend,
    path: &Path,
    cfg: &EngineConfig,
    ready: &mpsc::Sender<Result<Ready, EngineError>>,
    jobs: &mpsc::Receiver<Job>,
) {
    let started = Instant::now();
    let model_params = LlamaModelParams::default().with_n_gpu_layers(cfg.n_gpu_layers).with_use_mmap(cfg.use_mmap);
    let model = match LlamaModel::load_from_file(backend, path, &model_params) {
        Ok(model) => model,
        Err(err) => {
            tracing::debug!(%err, "llama.cpp model load failed");
            let _ = ready.send(Err(EngineError::Load { path: path.to_path_buf() }));
            return;
        }
    };
    let sequences = cfg.max_sequences as u32;
    let total_ctx = cfg.n_ctx.saturating_mul(sequences);
    let threads = i32::try_from(cfg.threads).unwrap_or(i32::MAX);
    let ctx_params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(total_ctx))
        .with_n_batch(cfg.n_batch)
        .with_n_ubatch(cfg.n_ubatch)
        .with_n_seq_max(sequences)
        .with_kv_unified(false)
        // llama.cpp defaults to a full-context SWA cache; the sliding layers only need their window (plus a
        // ubatch), and prefix states restore correctly either way (tests cover prefixes longer than the window).
        .with_swa_full(false)
        .with_n_threads(threads)
        .with_n_threads_batch(threads)
        .with_type_k(kv_cache_type(cfg.kv_cache))
        .with_type_v(kv_cache_type(cfg.kv_cache))
        .with_flash_attention_policy(match cfg.flash_attention {
            None => -1, // LLAMA_FLASH_ATTN_TYPE_AUTO
            Some(false) => 0,
            Some(true) => 1,
        });
    let ctx = match model.new_context(backend, ctx_params) {
        Ok(ctx) => ctx,
        Err(err) => {
            let _ = ready.send(Err(EngineError::Context(format!(
                "{err} (n_ctx {} × {} sequences; lower n_ctx or max_sequences if memory ran out)",
                cfg.n_ctx, cfg.max_sequences
            ))));
            return;
        }
    };
    let n_vocab = usize::try_from(model.n_vocab()).unwrap_or(0);
    let n_ctx_per_sequence = (ctx.n_ctx() / sequences) as usize;
    // llama.cpp caps its batch at the context it was asked for, before rounding that context up, and aborts the
    // process on a decode longer than the cap: prompts are cut at its number, not ours.
    let n_batch = (ctx.n_batch() as usize).clamp(1, cfg.n_batch as usize);
    let mut worker = Worker {
        ctx,
        batch: LlamaBatch::new(cfg.n_batch as usize, 1),
        cfg: cfg.clone(),
        n_vocab,
        n_batch,
        n_ctx_per_sequence,
        cache: PrefixCache::new(cfg.prefix_cache_bytes),
    };
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    if ready.send(Ok(Ready { n_vocab, n_ctx_per_sequence, load_ms })).is_err() {
        return;
    }
    // Jobs read ahead while gathering concurrent generate calls wait here, in arrival order.
    let mut backlog = VecDeque::new();
    loop {
        let job = match backlog.pop_front() {
            Some(job) => job,
            None => match jobs.recv() {
                Ok(job) => job,
                Err(_) => break,
            },
        };
        match job {
            Job::Generate { requests, events } => {
                let mut callers = vec![(requests, events)];
                gather_concurrent_calls(jobs, &mut callers, &mut backlog, cfg.max_sequences);
                let told: Vec<(usize, mpsc::Sender<Event>)> =
                    callers.iter().map(|(requests, events)| (requests.len(), events.clone())).collect();
                if let Err(message) = guarded(|| worker.serve(callers)) {
                    for (count, events) in told {
                        let failed = (0..count).map(|_| Err(EngineError::Panicked(message.clone()))).collect();
                        let _ = events.send(Event::Done(failed));
                    }
                    worker.reset();
                }
            }
            Job::Logits { tokens, reply } => {
                let logits = guarded(|| worker.all_logits(&tokens)).unwrap_or_else(|message| {
                    worker.reset();
                    Err(EngineError::Panicked(message))
                });
                let _ = reply.send(logits);
            }
            Job::CacheStats { reply } => {
                let _ = reply.send(worker.cache.stats());
            }
            Job::ClearCache => worker.cache.clear(),
        }
    }
    // `worker` (and with it the context) drops here, before `model`.
}

/// Runs one job, turning a panic in the engine's own code into an error for that job's callers. Unguarded, a
/// panic ended the engine thread, and every later call in a long-running server failed until a restart. A
/// caller that was already answered ignores the second answer.
fn guarded<T>(job: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).map_err(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".to_string());
        tracing::error!(%message, "the engine panicked; its sequences and prefix cache are cleared");
        message
    })
}

type Caller = (Vec<GenRequest>, mpsc::Sender<Event>);

/// Generate calls that arrived while the worker was busy join the current one while the whole call fits in the
/// one batch of sequences: concurrent callers (server requests) then share decode steps. A call that would spill
/// into a second group waits for the next round, so no caller's answer is held for a group it is not in.
///
/// A shared decode step may round differently from a lone one (ggml's kernels differ by row count), so a near
/// tie between two tokens can go either way depending on what else was decoded with it.
fn gather_concurrent_calls(
    jobs: &mpsc::Receiver<Job>,
    callers: &mut Vec<Caller>,
    backlog: &mut VecDeque<Job>,
    max_sequences: usize,
) {
    let mut total: usize = callers.iter().map(|c| c.0.len()).sum();
    while total < max_sequences {
        match jobs.try_recv() {
            Ok(Job::Generate { requests, events }) if total + requests.len() <= max_sequences => {
                total += requests.len();
                callers.push((requests, events));
            }
            Ok(other) => {
                backlog.push_back(other);
                break;
            }
            Err(_) => break,
        }
    }
}

struct Worker<'m> {
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    cfg: EngineConfig,
    n_vocab: usize,
    /// Tokens per decode call, as llama.cpp took it (see `worker_main`).
    n_batch: usize,
    n_ctx_per_sequence: usize,
    cache: PrefixCache<SeqState>,
}

/// A request being decoded in sequence `seq`.
struct Slot<'r> {
    index: usize,
    seq: i32,
    request: &'r GenRequest,
    sampler: Sampler,
    tokens: Vec<u32>,
    probs: Vec<f32>,
    /// Sampled from the last logits, not yet recorded or fed back.
    pending: Option<Pick>,
    next_pos: usize,
    cached_prompt_tokens: usize,
    prefill_ms: f64,
}

/// Sequences a picking thread takes at least: below that, starting a thread costs more than it saves.
const PICKS_PER_THREAD: usize = 4;
/// Threads started for one step's picks at most: threads are started anew each step (tens of microseconds each),
/// and past this many a step's picks take well under a millisecond anyway.
const MAX_PICK_THREADS: usize = 16;

/// Picks each fed sequence's next token from its logits. Each pick reads a whole vocabulary (about a third of a
/// millisecond for gpt-oss's 201,088 tokens), which for a large batch on a GPU took longer than the decode step
/// itself; the picks are independent, and the engine's threads are idle between steps, so they share them.
/// Each sequence's pick is the same whichever thread makes it.
fn pick_next(slots: &mut [Slot<'_>], logits: &[&[f32]], threads: usize) {
    let pick_all = |slots: &mut [Slot<'_>], logits: &[&[f32]]| {
        for (slot, logits) in slots.iter_mut().zip(logits) {
            slot.pending = Some(slot.sampler.pick(logits));
        }
    };
    let workers = threads.min(MAX_PICK_THREADS).min(slots.len() / PICKS_PER_THREAD).max(1);
    if workers == 1 {
        return pick_all(slots, logits);
    }
    let per_worker = slots.len().div_ceil(workers);
    // Each share is taken once, by whichever thread gets to it first: the engine thread picks whatever no helper
    // has taken, so a helper that could not start (a container at its task limit) costs time, never a pick or a
    // panic that would take the engine down.
    type Share<'s, 'r, 'l> = std::sync::Mutex<Option<(&'s mut [Slot<'r>], &'s [&'l [f32]])>>;
    fn take<'s, 'r, 'l>(share: &Share<'s, 'r, 'l>) -> Option<(&'s mut [Slot<'r>], &'s [&'l [f32]])> {
        share.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }
    let shares: Vec<Share<'_, '_, '_>> = slots
        .chunks_mut(per_worker)
        .zip(logits.chunks(per_worker))
        .map(|share| std::sync::Mutex::new(Some(share)))
        .collect();
    std::thread::scope(|scope| {
        for share in shares.iter().skip(1) {
            let helper = std::thread::Builder::new().spawn_scoped(scope, move || {
                if let Some((slots, logits)) = take(share) {
                    pick_all(slots, logits);
                }
            });
            if helper.is_err() {
                static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
                if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!("could not start a picking thread; the engine thread picks its share");
                }
                break;
            }
        }
        for share in &shares {
            if let Some((slots, logits)) = take(share) {
                pick_all(slots, logits);
            }
        }
    });
}

impl Worker<'_> {
    /// Runs the requests of one or more callers as one batch and routes tokens and results back to each.
    fn serve(&mut self, callers: Vec<Caller>) {
        if callers.len() > 1 {
            tracing::debug!(callers = callers.len(), "batching concurrent generate calls");
        }
        let mut owners = Vec::new();
        let mut all = Vec::new();
        for (c, (requests, _)) in callers.iter().enumerate() {
            owners.extend((0..requests.len()).map(|local| (c, local)));
            all.extend(requests.iter().cloned());
        }
        let mut emit = |index: usize, token| {
            let (c, local) = owners[index];
            let _ = callers[c].1.send(Event::Token(local, token));
        };
        let mut results = self.generate(&all, &mut emit).into_iter();
        for (requests, events) in &callers {
            let mine: Vec<_> = results.by_ref().take(requests.len()).collect();
            let _ = events.send(Event::Done(mine));
        }
    }

    fn generate(
        &mut self,
        requests: &[GenRequest],
        emit: &mut dyn FnMut(usize, u32),
    ) -> Vec<Result<Generation, EngineError>> {
        let mut results = Vec::with_capacity(requests.len());
        for (group, chunk) in requests.chunks(self.cfg.max_sequences).enumerate() {
            let base = group * self.cfg.max_sequences;
            results.extend(self.generate_group(base, chunk, emit));
        }
        results
    }

    fn generate_group(
        &mut self,
        base: usize,
        requests: &[GenRequest],
        emit: &mut dyn FnMut(usize, u32),
    ) -> Vec<Result<Generation, EngineError>> {
        let mut results: Vec<Option<Result<Generation, EngineError>>> = (0..requests.len()).map(|_| None).collect();
        let mut slots = Vec::new();
        for (k, request) in requests.iter().enumerate() {
            let seq = k as i32;
            // A caller gone while its request waited for the worker would still cost a whole prefill (seconds on a
            // CPU, for a long policy) while live callers wait behind it.
            let stopped_before = if request.max_tokens == 0 {
                Some(StopReason::MaxTokens)
            } else if request.cancel.is_cancelled() {
                Some(StopReason::Cancelled)
            } else {
                None
            };
            if let Some(stop_reason) = stopped_before {
                results[k] = Some(Ok(Generation {
                    tokens: Vec::new(),
                    stop_reason,
                    token_probs: Vec::new(),
                    prompt_tokens: request.prompt_len(),
                    cached_prompt_tokens: 0,
                    prefill_ms: 0.0,
                    decode_ms: 0.0,
                }));
                continue;
            }
            match self.prefill(seq, request) {
                Ok((pick, sampler, cached, prefill_ms)) => slots.push(Slot {
                    index: k,
                    seq,
                    request,
                    sampler,
                    tokens: Vec::new(),
                    probs: Vec::new(),
                    pending: Some(pick),
                    next_pos: request.prompt_len(),
                    cached_prompt_tokens: cached,
                    prefill_ms,
                }),
                Err(err) => {
                    self.clear_seq(seq);
                    results[k] = Some(Err(err));
                }
            }
        }

        let decode_start = Instant::now();
        let mut active: Vec<Slot> = slots;
        while !active.is_empty() {
            self.batch.clear();
            let mut fed = Vec::with_capacity(active.len());
            for mut slot in active.drain(..) {
                let Some(pick) = slot.pending.take() else { continue };
                if pick.prob.is_nan() {
                    results[slot.index] = Some(Err(EngineError::Decode(
                        "the model gave no finite logit for the next token (a broken model file or a numeric \
                         overflow)"
                            .into(),
                    )));
                    continue;
                }
                slot.tokens.push(pick.token);
                slot.probs.push(pick.prob);
                emit(base + slot.index, pick.token);
                let stop = if slot.request.stop.contains(&pick.token) {
                    Some(StopReason::Stop(pick.token))
                } else if slot.request.cancel.is_cancelled() {
                    Some(StopReason::Cancelled)
                } else if slot.tokens.len() >= slot.request.max_tokens {
                    Some(StopReason::MaxTokens)
                } else if slot.next_pos >= self.n_ctx_per_sequence {
                    Some(StopReason::ContextFull)
                } else {
                    None
                };
                if let Some(reason) = stop {
                    let decode_ms = decode_start.elapsed().as_secs_f64() * 1e3;
                    let index = slot.index;
                    results[index] = Some(Ok(finish(slot, reason, decode_ms)));
                    continue;
                }
                let added = self.batch.add(LlamaToken(pick.token as i32), slot.next_pos as i32, &[slot.seq], true);
                if let Err(err) = added {
                    results[slot.index] = Some(Err(EngineError::Decode(err.to_string())));
                    continue;
                }
                slot.next_pos += 1;
                fed.push(slot);
            }
            if fed.is_empty() {
                break;
            }
            if let Err(err) = self.ctx.decode(&mut self.batch) {
                for slot in fed.drain(..) {
                    results[slot.index] = Some(Err(EngineError::Decode(err.to_string())));
                }
                break;
            }
            let logits: Vec<&[f32]> = (0..fed.len()).map(|i| self.ctx.get_logits_ith(i as i32)).collect();
            pick_next(&mut fed, &logits, self.cfg.threads);
            active.append(&mut fed);
        }
        for k in 0..requests.len() {
            self.clear_seq(k as i32);
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(EngineError::Decode("request was dropped from the batch".into()))))
            .collect()
    }

    /// Brings sequence `seq` to the end of the request's prompt and samples the first token.
    fn prefill(&mut self, seq: i32, request: &GenRequest) -> Result<(Pick, Sampler, usize, f64), EngineError> {
        let started = Instant::now();
        let sampler = Sampler::new(&request.sampling, self.cfg.seed)?;
        self.check_prompt(request.prefix.iter().chain(&request.suffix), request.prompt_len())?;
        // The last prompt token must be decoded here to get logits (a restored state carries none), so a
        // request without suffix treats its last prefix token as the suffix; the key stays consistent.
        let (prefix, suffix) = if request.suffix.is_empty() {
            request.prefix.split_at(request.prefix.len() - 1)
        } else {
            (request.prefix.as_slice(), request.suffix.as_slice())
        };
        self.clear_seq(seq);
        let mut cached = 0;
        if !prefix.is_empty() {
            let state = match self.cache.get(prefix) {
                Some(state) => {
                    cached = prefix.len();
                    state
                }
                None => {
                    let span = tracing::debug_span!("prefix_prefill", tokens = prefix.len());
                    let _enter = span.enter();
                    self.decode_prompt(seq, 0, prefix, false)?;
                    let state = self
                        .ctx
                        .state_seq_get(seq, LlamaStateSeqFlags::empty())
                        .map_err(|e| EngineError::State(e.to_string()))?;
                    self.clear_seq(seq);
                    let state = Arc::new(state);
                    let bytes = state.byte_len();
                    if !self.cache.insert(prefix.to_vec(), Arc::clone(&state), bytes) {
                        tracing::debug!(bytes, "prefix state larger than the cache budget; not kept");
                    }
                    state
                }
            };
            self.ctx.state_seq_set(&state, seq).map_err(|e| EngineError::State(e.to_string()))?;
        }
        let last = self.decode_prompt(seq, prefix.len(), suffix, true)?;
        let mut sampler = sampler;
        let pick = sampler.pick(self.ctx.get_logits_ith(last));
        Ok((pick, sampler, cached, started.elapsed().as_secs_f64() * 1e3))
    }

    fn check_prompt<'t>(&self, tokens: impl Iterator<Item = &'t u32>, len: usize) -> Result<(), EngineError> {
        if len == 0 {
            return Err(EngineError::InvalidRequest("empty prompt".into()));
        }
        if len > self.n_ctx_per_sequence {
            return Err(EngineError::PromptTooLong { tokens: len, n_ctx: self.n_ctx_per_sequence });
        }
        for &token in tokens {
            if token as usize >= self.n_vocab {
                return Err(EngineError::InvalidToken { token, vocab: self.n_vocab });
            }
        }
        Ok(())
    }

    /// Decodes `tokens` into `seq` from `start_pos` in chunks of `n_batch`; with `want_last`, returns the batch
    /// index of the last token's logits.
    fn decode_prompt(
        &mut self,
        seq: i32,
        start_pos: usize,
        tokens: &[u32],
        want_last: bool,
    ) -> Result<i32, EngineError> {
        let chunk_len = self.n_batch;
        let n_chunks = tokens.len().div_ceil(chunk_len);
        let mut last_index = 0;
        for (c, chunk) in tokens.chunks(chunk_len).enumerate() {
            self.batch.clear();
            for (j, &token) in chunk.iter().enumerate() {
                let pos = (start_pos + c * chunk_len + j) as i32;
                let logits = want_last && c + 1 == n_chunks && j + 1 == chunk.len();
                self.batch
                    .add(LlamaToken(token as i32), pos, &[seq], logits)
                    .map_err(|e| EngineError::Decode(e.to_string()))?;
            }
            self.ctx.decode(&mut self.batch).map_err(|e| EngineError::Decode(e.to_string()))?;
            last_index = chunk.len() as i32 - 1;
        }
        Ok(last_index)
    }

    fn all_logits(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>, EngineError> {
        self.check_prompt(tokens.iter(), tokens.len())?;
        let seq = 0;
        self.clear_seq(seq);
        let mut out = Vec::with_capacity(tokens.len());
        let chunk_len = ALL_LOGITS_CHUNK.min(self.n_batch);
        let mut result = Ok(());
        for (c, chunk) in tokens.chunks(chunk_len).enumerate() {
            self.batch.clear();
            for (j, &token) in chunk.iter().enumerate() {
                if let Err(e) = self.batch.add(LlamaToken(token as i32), (c * chunk_len + j) as i32, &[seq], true) {
                    result = Err(EngineError::Decode(e.to_string()));
                }
            }
            if result.is_ok() {
                result = self.ctx.decode(&mut self.batch).map_err(|e| EngineError::Decode(e.to_string()));
            }
            if result.is_err() {
                break;
            }
            for j in 0..chunk.len() {
                out.push(self.ctx.get_logits_ith(j as i32).to_vec());
            }
        }
        self.clear_seq(seq);
        result.map(|()| out)
    }

    /// Back to an empty context after a job failed part way: any sequence may hold tokens of the failed job, and
    /// a prefix state saved during it may be partial.
    fn reset(&mut self) {
        let _ = self.ctx.clear_kv_cache_seq(None, None, None);
        self.cache.clear();
        self.batch.clear();
    }

    fn clear_seq(&mut self, seq: i32) {
        let _ = self.ctx.clear_kv_cache_seq(u32::try_from(seq).ok(), None, None);
    }
}

fn finish(slot: Slot, stop_reason: StopReason, decode_ms: f64) -> Generation {
    Generation {
        tokens: slot.tokens,
        stop_reason,
        token_probs: slot.probs,
        prompt_tokens: slot.request.prompt_len(),
        cached_prompt_tokens: slot.cached_prompt_tokens,
        prefill_ms: slot.prefill_ms,
        decode_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::guarded;

    #[test]
    fn a_panicking_job_becomes_its_message_and_a_returning_one_its_value() {
        assert_eq!(guarded(|| 7), Ok(7));
        let index = 3;
        let slots: Vec<u32> = Vec::new();
        let message = guarded(|| slots[index]).unwrap_err();
        assert!(message.contains("index out of bounds"), "{message}");
        assert_eq!(guarded(|| -> u8 { panic!("fixed text") }), Err("fixed text".to_string()));
        assert_eq!(guarded(|| std::panic::panic_any(5_u8)), Err::<(), _>("a panic".to_string()));
    }
}

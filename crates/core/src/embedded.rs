//! The in-process reasoner: harmony prompt -> [`Engine`] on a blocking thread -> parsed channels.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use safeguard_engine::{CancelFlag, Engine, GenRequest, Generation, StopReason};
use safeguard_harmony::{
    CompletionEnd, Effort, PromptOptions, RenderedPrompt, StreamDelta, StreamParser, Tokenizer, parse_completion,
    tokens,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{Instrument, info_span};

use crate::reasoner::{
    DeltaSender, ReasonDelta, ReasonError, ReasonOutput, ReasonRequest, Reasoner, Timings, USE_EFFORT_BUDGET, Usage,
};

/// Called with (request index, token) for every generated token, on the engine's calling thread.
type OnToken = Box<dyn Fn(usize, u32) + Send + Sync>;

/// Completion-token budget per effort level. Higher effort reasons longer, so it needs more room
/// before its answer; running out means no final answer and a `needs_review`, so err on the generous side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBudgets {
    pub low: usize,
    pub medium: usize,
    pub high: usize,
}

impl Default for TokenBudgets {
    fn default() -> Self {
        Self { low: 1024, medium: 2048, high: 4096 }
    }
}

impl TokenBudgets {
    pub fn for_effort(&self, effort: Effort) -> usize {
        match effort {
            Effort::Low => self.low,
            Effort::Medium => self.medium,
            Effort::High => self.high,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbeddedConfig {
    pub budgets: TokenBudgets,
    /// Longest content (user message plus its framing) accepted, in tokens. Longer content is refused
    /// with [`ReasonError::ContentTooLong`] rather than silently cut, because a cut could drop the
    /// very part that violates.
    pub max_content_tokens: usize,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        Self { budgets: TokenBudgets::default(), max_content_tokens: 16_384 }
    }
}

/// Runs prompts on an in-process [`Engine`] (llama.cpp).
pub struct EmbeddedReasoner {
    engine: Arc<dyn Engine>,
    config: EmbeddedConfig,
    /// Engine calls let onto blocking threads at once. The engine decodes `max_sequences` requests at a time and
    /// queues the rest, and a queued call still holds its blocking thread while it waits: without this, an
    /// overload parks hundreds of threads on that queue and leaves none for the work that shares tokio's
    /// blocking pool (SQLite commits, triage). Callers beyond it wait here, holding nothing, until their
    /// deadline drops them.
    calls: Arc<tokio::sync::Semaphore>,
}

/// Engine calls admitted per sequence the engine decodes at once: enough that the next call is always queued
/// behind the running one, so the engine never idles between them.
const CALLS_PER_SEQUENCE: usize = 2;

impl EmbeddedReasoner {
    pub fn new(engine: Arc<dyn Engine>, config: EmbeddedConfig) -> Self {
        let calls = (engine.max_sequences().max(1) * CALLS_PER_SEQUENCE).min(tokio::sync::Semaphore::MAX_PERMITS);
        Self { engine, config, calls: Arc::new(tokio::sync::Semaphore::new(calls)) }
    }

    pub fn config(&self) -> &EmbeddedConfig {
        &self.config
    }

    /// Renders and checks one request; what is returned can go straight into a batch.
    fn prepare(&self, req: &ReasonRequest) -> Result<Prepared, ReasonError> {
        let options = PromptOptions { effort: req.effort, date: req.date.clone() };
        let RenderedPrompt { tokens, prefix_len } =
            safeguard_harmony::render_prompt(&req.instructions, &req.content, &options)?;
        let prefix_len = prefix_len.min(tokens.len());
        // The user message's text, as the server and the NATS worker count it against the same limit: with the
        // suffix's framing counted too, content a few tokens under the limit passed their check, was admitted
        // and paid for, and was refused here.
        let content_tokens = (tokens.len() - prefix_len).saturating_sub(safeguard_harmony::suffix_framing_len());
        if content_tokens > self.config.max_content_tokens {
            return Err(ReasonError::ContentTooLong { content_tokens, limit: self.config.max_content_tokens });
        }
        let max_tokens = if req.max_tokens == USE_EFFORT_BUDGET {
            self.config.budgets.for_effort(req.effort)
        } else {
            req.max_tokens
        };
        let prompt_sha256 = prompt_sha256(&tokens);
        let prompt_len = tokens.len();
        let mut prefix = tokens;
        // Prefix = system + developer messages, shared by every item under the same policy: the engine
        // caches its KV state, so only the suffix (the content) is prefilled per item.
        let suffix = prefix.split_off(prefix_len);
        Ok(Prepared {
            request: GenRequest {
                prefix,
                suffix,
                max_tokens,
                sampling: req.sampling,
                stop: tokens::STOP.to_vec(),
                cancel: CancelFlag::default(),
            },
            prompt_sha256,
            prompt_len,
        })
    }

    /// Runs prepared requests in one engine batch on a blocking thread.
    async fn generate(&self, prepared: Vec<Prepared>, on_token: OnToken) -> Vec<Result<ReasonOutput, ReasonError>> {
        if prepared.is_empty() {
            return Vec::new();
        }
        let submitted = Instant::now();
        let engine = Arc::clone(&self.engine);
        let (metas, requests): (Vec<_>, Vec<_>) =
            prepared.into_iter().map(|p| ((p.prompt_sha256, p.prompt_len), p.request)).unzip();
        let expected = requests.len();
        // Dropped with this future (a deadline, a client that went away) or after it: either way the engine stops
        // decoding these requests instead of running on to their token caps for nobody.
        let cancel = CancelFlag::default();
        let requests: Vec<GenRequest> =
            requests.into_iter().map(|request| GenRequest { cancel: cancel.clone(), ..request }).collect();
        let _cancel_on_drop = CancelOnDrop(cancel);
        let admitted = match Arc::clone(&self.calls).acquire_owned().await {
            Ok(permit) => permit,
            // Never closed; were it, the engine would be gone.
            Err(closed) => {
                let message = closed.to_string();
                return (0..expected).map(|_| Err(ReasonError::EngineThread(message.clone()))).collect();
            }
        };
        let joined = tokio::task::spawn_blocking(move || {
            // Held for as long as the thread is busy, even when the caller has given up on it.
            let _admitted = admitted;
            let queue_ms = submitted.elapsed().as_secs_f64() * 1e3;
            let results = engine.generate(&requests, &*on_token);
            (queue_ms, results)
        })
        .await;
        let total_ms = submitted.elapsed().as_secs_f64() * 1e3;
        let (queue_ms, results) = match joined {
            Ok(done) => done,
            Err(join_error) => {
                let message = join_error.to_string();
                return (0..expected).map(|_| Err(ReasonError::EngineThread(message.clone()))).collect();
            }
        };
        if results.len() != expected {
            let got = results.len();
            return (0..expected).map(|_| Err(ReasonError::EngineResultCount { expected, got })).collect();
        }
        results
            .into_iter()
            .zip(metas)
            .map(|(result, (prompt_sha256, prompt_len))| {
                let generation = result?;
                Ok(to_output(generation, prompt_sha256, prompt_len, queue_ms, total_ms))
            })
            .collect()
    }
}

struct Prepared {
    request: GenRequest,
    prompt_sha256: String,
    prompt_len: usize,
}

#[async_trait]
impl Reasoner for EmbeddedReasoner {
    fn model_id(&self) -> String {
        self.engine.model_id()
    }

    fn completion_cap(&self, effort: Effort) -> usize {
        self.config.budgets.for_effort(effort)
    }

    fn context_tokens(&self) -> Option<usize> {
        self.engine.context_per_sequence()
    }

    async fn reason(&self, req: ReasonRequest) -> Result<ReasonOutput, ReasonError> {
        self.reason_batch(vec![req]).await.pop().unwrap_or(Err(ReasonError::EngineResultCount { expected: 1, got: 0 }))
    }

    async fn reason_streaming(&self, req: ReasonRequest, deltas: DeltaSender) -> Result<ReasonOutput, ReasonError> {
        let span = info_span!("reason_streaming", model = %self.engine.model_id());
        async move {
            let prepared = self.prepare(&req)?;
            let stream = Arc::new(std::sync::Mutex::new(DeltaStream::new(deltas)));
            let on_token: OnToken = {
                let stream = Arc::clone(&stream);
                Box::new(move |_: usize, token: u32| {
                    // A panic elsewhere while holding the lock leaves a usable parser; keep streaming.
                    stream.lock().unwrap_or_else(|p| p.into_inner()).push(token);
                })
            };
            let output = self
                .generate(vec![prepared], on_token)
                .await
                .pop()
                .unwrap_or(Err(ReasonError::EngineResultCount { expected: 1, got: 0 }))?;
            stream.lock().unwrap_or_else(|p| p.into_inner()).finish(&output);
            Ok(output)
        }
        .instrument(span)
        .await
    }

    fn batch_width(&self) -> Option<usize> {
        Some(self.engine.max_sequences().max(1))
    }

    async fn reason_batch(&self, reqs: Vec<ReasonRequest>) -> Vec<Result<ReasonOutput, ReasonError>> {
        let span = info_span!("reason_batch", requests = reqs.len(), model = %self.engine.model_id());
        async move {
            // Requests that cannot be rendered fail alone; the rest still share one engine batch.
            let mut slots: Vec<Option<Result<ReasonOutput, ReasonError>>> = Vec::with_capacity(reqs.len());
            let mut ready = Vec::new();
            let mut ready_slots = Vec::new();
            for req in &reqs {
                match self.prepare(req) {
                    Ok(prepared) => {
                        ready_slots.push(slots.len());
                        ready.push(prepared);
                        slots.push(None);
                    }
                    Err(error) => {
                        tracing::warn!(%error, "request refused before the engine");
                        slots.push(Some(Err(error)));
                    }
                }
            }
            let generated = self.generate(ready, Box::new(|_: usize, _: u32| {})).await;
            for (slot, result) in ready_slots.into_iter().zip(generated) {
                slots[slot] = Some(result);
            }
            slots
                .into_iter()
                .map(|slot| slot.unwrap_or(Err(ReasonError::EngineResultCount { expected: reqs.len(), got: 0 })))
                .collect()
        }
        .instrument(span)
        .await
    }
}

/// Sets its flag when dropped.
struct CancelOnDrop(CancelFlag);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Turns one request's tokens into reasoning deltas as they are decoded, with the same text [`parse_completion`]
/// gives: analysis messages joined by a newline, UTF-8 held back until it is whole. The answer is sent once, at
/// the end, and only as the whole parse reads it: a final message is an answer only if it ends the turn (not
/// followed by more reasoning or a tool call, not cut off), and a later final joins it into one text that may say
/// both sides; neither is known while it streams, and a client reading the stream has nothing else to go by.
struct DeltaStream {
    parser: StreamParser,
    sender: DeltaSender,
    /// The newlines sent between analysis messages: one before each message's text but the first's, counted per
    /// message begun, so that an empty one still gets its own.
    separators_sent: usize,
    reasoning: String,
}

impl DeltaStream {
    fn new(sender: DeltaSender) -> Self {
        DeltaStream { parser: StreamParser::new(), sender, separators_sent: 0, reasoning: String::new() }
    }

    fn push(&mut self, token: u32) {
        if let Some(StreamDelta::Analysis(text)) = self.parser.push(token) {
            let separators = self.parser.analysis_messages().saturating_sub(1);
            let mut delta = "\n".repeat(separators.saturating_sub(self.separators_sent));
            self.separators_sent = self.separators_sent.max(separators);
            delta.push_str(&text);
            self.reasoning.push_str(&delta);
            let _ = self.sender.send(ReasonDelta::Reasoning(delta));
        }
    }

    /// Sends the reasoning the whole parse found beyond what streamed (text the incremental parser cannot
    /// attribute until the end, such as a message whose header never closed), then the answer, so the deltas
    /// add up to the output.
    fn finish(&self, output: &ReasonOutput) {
        let more = output.analysis.as_ref().and_then(|f| f.strip_prefix(self.reasoning.as_str()));
        if let Some(more) = more.filter(|r| !r.is_empty()) {
            let _ = self.sender.send(ReasonDelta::Reasoning(more.to_string()));
        }
        // A truncated answer is no answer (the verdict needs a person), so a streaming client is not told one.
        if let Some(answer) = output.final_text.as_ref().filter(|a| !a.is_empty() && !output.truncated) {
            let _ = self.sender.send(ReasonDelta::Final(answer.clone()));
        }
    }
}

fn to_output(
    generation: Generation,
    prompt_sha256: String,
    prompt_len: usize,
    queue_ms: f64,
    total_ms: f64,
) -> ReasonOutput {
    let parsed = parse_completion(&generation.tokens);
    let ran_out =
        matches!(generation.stop_reason, StopReason::MaxTokens | StopReason::ContextFull | StopReason::Cancelled);
    let truncated = ran_out || matches!(parsed.end, CompletionEnd::Truncated);
    if generation.prompt_tokens != prompt_len {
        tracing::warn!(
            rendered = prompt_len,
            engine = generation.prompt_tokens,
            "engine counted a different prompt length"
        );
    }
    ReasonOutput {
        final_token_prob: final_message_confidence(&generation.tokens, &generation.token_probs),
        analysis: parsed.analysis,
        final_text: parsed.final_text,
        truncated,
        usage: Usage {
            prompt_tokens: generation.prompt_tokens,
            cached_prompt_tokens: generation.cached_prompt_tokens,
            completion_tokens: generation.tokens.len(),
        },
        timings: Timings { queue_ms, prefill_ms: generation.prefill_ms, decode_ms: generation.decode_ms, total_ms },
        prompt_sha256: Some(prompt_sha256),
    }
}

/// `sha256:<hex>` over the token ids as little-endian u32: the prompt exactly as the model saw it.
pub fn prompt_sha256(tokens: &[u32]) -> String {
    let mut hasher = Sha256::new();
    for token in tokens {
        hasher.update(token.to_le_bytes());
    }
    format!("sha256:{}", hex::encode(hasher.finalize()))
}

/// The engine's confidence in the last `final` message ([`answer_confidence`](crate::reasoner::answer_confidence)
/// over its tokens).
///
/// Returns `None` without a final message, with an empty one, or when the engine gave no probabilities.
pub fn final_message_confidence(completion: &[u32], probs: &[f32]) -> Option<f32> {
    let body = final_message_span(completion)?;
    let body_probs = probs.get(body.clone())?;
    let body_tokens = completion.get(body)?;
    let tokenizer = Tokenizer::shared();
    let texts: Vec<String> = body_tokens.iter().map(|&token| tokenizer.decode_lossy(&[token])).collect();
    // Logs avoid underflow on long answers; the floor keeps a zero from turning into -inf.
    crate::reasoner::answer_confidence(
        texts.iter().zip(body_probs).map(|(text, &p)| (text.as_str(), f64::from(p.max(1e-30)).ln())),
    )
}

/// Index range of the content tokens of the last message whose channel is `final`.
fn final_message_span(completion: &[u32]) -> Option<std::ops::Range<usize>> {
    let tokenizer = Tokenizer::shared();
    let mut found = None;
    let mut i = 0;
    while i < completion.len() {
        if completion[i] == tokens::CHANNEL {
            let header_start = i + 1;
            // A header ends at its message token; one cut short by the end of a message or a new one is no header,
            // and the search goes on from there (read to the next message token, an unclosed analysis header took
            // the final message's header into its own and hid the answer's confidence).
            let Some(header_end) = completion[header_start..]
                .iter()
                .position(|&t| {
                    t == tokens::MESSAGE || t == tokens::END || t == tokens::START || tokens::STOP.contains(&t)
                })
                .map(|p| header_start + p)
            else {
                break;
            };
            if completion[header_end] != tokens::MESSAGE {
                i = header_end;
                continue;
            }
            let message_at = header_end;
            let header = tokenizer.decode_lossy(&completion[header_start..message_at]);
            let body_start = message_at + 1;
            let body_end = completion[body_start..]
                .iter()
                .position(|&t| t == tokens::END || t == tokens::START || tokens::STOP.contains(&t))
                .map_or(completion.len(), |p| body_start + p);
            if header.trim_start().starts_with("final") {
                found = Some(body_start..body_end);
            }
            i = body_end;
        } else {
            i += 1;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(text: &str) -> Vec<u32> {
        Tokenizer::shared().encode_ordinary(text)
    }

    /// Appends `<|channel|>{channel}<|message|>{body}`, opening with `<|start|>assistant` unless it is the first.
    fn push_message(completion: &mut Vec<u32>, channel: &str, body: &str) {
        if !completion.is_empty() {
            completion.push(tokens::START);
            completion.extend(encode("assistant"));
        }
        completion.push(tokens::CHANNEL);
        completion.extend(encode(channel));
        completion.push(tokens::MESSAGE);
        completion.extend(encode(body));
    }

    #[test]
    fn confidence_covers_only_the_final_message_tokens() {
        let mut completion = Vec::new();
        push_message(&mut completion, "analysis", "thinking about it");
        completion.push(tokens::END);
        push_message(&mut completion, "final", "");
        let body_start = completion.len();
        completion.extend(encode("1"));
        let body_end = completion.len();
        completion.push(tokens::RETURN);

        let mut probs = vec![0.01_f32; completion.len()];
        for p in &mut probs[body_start..body_end] {
            *p = 0.5;
        }
        let confidence = final_message_confidence(&completion, &probs).expect("has a final message");
        assert!((confidence - 0.5).abs() < 1e-6, "{confidence}");
    }

    /// An analysis header that never reaches its message token must not take the final message's header into
    /// its own: the answer was read, so its confidence must be too, or a shaky answer escapes escalation.
    #[test]
    fn a_header_cut_short_does_not_hide_the_final_messages_confidence() {
        let mut completion = vec![tokens::CHANNEL];
        completion.extend(encode("analysis"));
        completion.push(tokens::END);
        push_message(&mut completion, "final", "");
        let body_start = completion.len();
        completion.extend(encode("1"));
        completion.push(tokens::RETURN);
        let mut probs = vec![0.99_f32; completion.len()];
        probs[body_start] = 0.3;
        let confidence = final_message_confidence(&completion, &probs).expect("the final message is read");
        assert!((confidence - 0.3).abs() < 1e-6, "{confidence}");
    }

    #[test]
    fn a_json_answer_is_as_sure_as_its_verdict_digit() {
        let mut completion = vec![tokens::CHANNEL];
        completion.extend(encode("final"));
        completion.push(tokens::MESSAGE);
        let body_start = completion.len();
        completion.extend(encode("{\"violation\": 1, \"rationale\": \"it sells followers with a link\"}"));
        let digit = (body_start..completion.len())
            .find(|&i| Tokenizer::shared().decode_lossy(&completion[i..=i]).trim() == "1")
            .expect("the digit is a token of its own");
        let mut probs = vec![0.999_f32; completion.len()];
        probs[digit] = 0.4;
        let confidence = final_message_confidence(&completion, &probs).expect("has a final message");
        assert!((confidence - 0.4).abs() < 1e-6, "{confidence}");
    }

    #[test]
    fn a_label_answer_is_as_sure_as_its_label() {
        let mut completion = vec![tokens::CHANNEL];
        completion.extend(encode("final"));
        completion.push(tokens::MESSAGE);
        let body_start = completion.len();
        completion.extend(encode("INVALID - sells followers"));
        let mut probs = vec![1.0_f32; completion.len()];
        probs[body_start] = 0.25;
        // The explanation after the label decides nothing.
        let last = probs.len() - 1;
        probs[last] = 0.1;
        let confidence = final_message_confidence(&completion, &probs).expect("has a final message");
        assert!((confidence - 0.25).abs() < 1e-6, "{confidence}");
    }

    #[test]
    fn no_final_message_means_no_confidence() {
        let mut completion = vec![tokens::CHANNEL];
        completion.extend(encode("analysis"));
        completion.push(tokens::MESSAGE);
        completion.extend(encode("still thinking"));
        let probs = vec![0.9_f32; completion.len()];
        assert_eq!(final_message_confidence(&completion, &probs), None);
        assert_eq!(final_message_confidence(&[], &[]), None);
        // Garbage with a dangling channel marker must not panic.
        assert_eq!(final_message_confidence(&[tokens::CHANNEL], &[0.5]), None);
    }

    fn collect(receiver: &mut tokio::sync::mpsc::UnboundedReceiver<ReasonDelta>) -> (usize, String, String) {
        let (mut count, mut reasoning, mut answer) = (0, String::new(), String::new());
        while let Ok(delta) = receiver.try_recv() {
            count += 1;
            match delta {
                ReasonDelta::Reasoning(text) => reasoning.push_str(&text),
                ReasonDelta::Final(text) => answer.push_str(&text),
            }
        }
        (count, reasoning, answer)
    }

    /// Analysis messages are joined by newlines, empty ones too: "", "text" parses as "\ntext", and the stream had
    /// sent "text", so what the whole parse found beyond it could not be told apart and was never sent.
    #[test]
    fn streamed_deltas_add_up_to_the_parsed_completion() {
        let cases: [&[&str]; 5] = [
            &["First thought, with é and 🙂.", "Second thought."],
            &["", "A thought after an empty message."],
            &["One thought.", "", "Another, after an empty one."],
            &["A thought, then an empty message.", ""],
            &["", ""],
        ];
        for (case, analyses) in cases.into_iter().enumerate() {
            let mut completion = Vec::new();
            for analysis in analyses {
                push_message(&mut completion, "analysis", analysis);
                completion.push(tokens::END);
            }
            push_message(&mut completion, "final", "0 because nothing is promoted");
            completion.push(tokens::RETURN);
            let parsed = parse_completion(&completion);

            let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
            let mut stream = DeltaStream::new(sender);
            completion.iter().for_each(|&token| stream.push(token));
            let sent_while_decoding = stream.reasoning.len();
            let output = ReasonOutput {
                analysis: parsed.analysis.clone(),
                final_text: parsed.final_text.clone(),
                ..Default::default()
            };
            stream.finish(&output);
            let (count, reasoning, answer) = collect(&mut receiver);
            assert_eq!(Some(&reasoning), parsed.analysis.as_ref(), "{analyses:?}");
            assert_eq!(Some(answer), parsed.final_text, "{analyses:?}");
            // All but trailing separators streamed as decoded, one delta per decoded piece.
            let streamed = reasoning.trim_end_matches('\n').len();
            assert!(sent_while_decoding >= streamed, "{analyses:?}: {sent_while_decoding} of {reasoning:?}");
            if case == 0 {
                assert!(count > 10, "one delta per decoded piece, not one per message: {count}");
            }
        }
    }

    /// A final message that does not end the turn (a tool call follows) is no answer, and a client reading the
    /// stream must not see one either: the answer is sent once, as the whole parse reads it.
    #[test]
    fn a_final_message_that_is_not_the_last_word_never_streams() {
        let mut completion = Vec::new();
        push_message(&mut completion, "final", "0");
        completion.push(tokens::END);
        push_message(&mut completion, "commentary to=functions.f", "{}");
        completion.push(tokens::CALL);
        let parsed = parse_completion(&completion);
        assert_eq!(parsed.final_text, None);
        let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
        let mut stream = DeltaStream::new(sender);
        completion.iter().for_each(|&t| stream.push(t));
        stream.finish(&ReasonOutput { analysis: parsed.analysis.clone(), final_text: None, ..Default::default() });
        let (_, _, answer) = collect(&mut receiver);
        assert_eq!(answer, "", "a final the parse rejects was streamed");
    }

    /// A final message closed but the turn cut off by the budget before `<|return|>`: the answer is truncated,
    /// the verdict needs a person, and a streaming client is not told an answer either.
    #[test]
    fn a_truncated_answer_never_streams() {
        let mut completion = Vec::new();
        push_message(&mut completion, "final", "0");
        completion.push(tokens::END);
        let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
        let mut stream = DeltaStream::new(sender);
        completion.iter().for_each(|&t| stream.push(t));
        let output = ReasonOutput { final_text: Some("0".into()), truncated: true, ..Default::default() };
        stream.finish(&output);
        assert_eq!(collect(&mut receiver).2, "", "a truncated answer was streamed");
    }

    #[test]
    fn text_the_stream_could_not_attribute_is_sent_at_the_end() {
        // A header that never reaches <|message|>: harmony still reads it as analysis, but only at the end.
        let mut completion = vec![tokens::CHANNEL];
        completion.extend(encode("analysis thinking without a message marker"));
        completion.push(tokens::END);
        let parsed = parse_completion(&completion);
        let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
        let mut stream = DeltaStream::new(sender);
        completion.iter().for_each(|&t| stream.push(t));
        assert_eq!(collect(&mut receiver).0, 0);
        stream.finish(&ReasonOutput { analysis: parsed.analysis.clone(), ..Default::default() });
        let (count, reasoning, _) = collect(&mut receiver);
        assert_eq!((count, Some(reasoning)), (1, parsed.analysis));
    }

    #[test]
    fn prompt_hash_depends_on_every_token() {
        let a = prompt_sha256(&[1, 2, 3]);
        assert!(a.starts_with("sha256:") && a.len() == 7 + 64);
        assert_ne!(a, prompt_sha256(&[1, 2, 4]));
        assert_ne!(a, prompt_sha256(&[1, 2]));
    }

    #[test]
    fn budgets_follow_effort() {
        let budgets = TokenBudgets::default();
        assert!(budgets.for_effort(Effort::Low) < budgets.for_effort(Effort::Medium));
        assert!(budgets.for_effort(Effort::Medium) < budgets.for_effort(Effort::High));
    }

    /// An engine that answers after a pause and counts the calls in it at once.
    struct SlowEngine {
        inside: std::sync::atomic::AtomicUsize,
        most_inside: std::sync::atomic::AtomicUsize,
    }

    impl Engine for SlowEngine {
        fn model_id(&self) -> String {
            "slow".into()
        }

        fn max_sequences(&self) -> usize {
            2
        }

        fn generate(
            &self,
            requests: &[GenRequest],
            _on_token: &(dyn Fn(usize, u32) + Sync),
        ) -> Vec<Result<Generation, safeguard_engine::EngineError>> {
            use std::sync::atomic::Ordering::SeqCst;
            let now = self.inside.fetch_add(1, SeqCst) + 1;
            self.most_inside.fetch_max(now, SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(30));
            self.inside.fetch_sub(1, SeqCst);
            let mut completion = Vec::new();
            push_message(&mut completion, "final", "0");
            completion.push(tokens::RETURN);
            requests
                .iter()
                .map(|_| {
                    Ok(Generation {
                        token_probs: vec![1.0; completion.len()],
                        tokens: completion.clone(),
                        stop_reason: StopReason::Stop(tokens::RETURN),
                        prompt_tokens: 10,
                        cached_prompt_tokens: 0,
                        prefill_ms: 0.0,
                        decode_ms: 0.0,
                    })
                })
                .collect()
        }
    }

    /// However many callers arrive at once, only twice the engine's sequences are let onto blocking threads; the
    /// rest wait without one, and every caller still gets its answer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn engine_calls_beyond_twice_its_sequences_wait_without_a_thread() {
        let engine = Arc::new(SlowEngine { inside: Default::default(), most_inside: Default::default() });
        let reasoner = Arc::new(EmbeddedReasoner::new(engine.clone(), EmbeddedConfig::default()));
        let callers: Vec<_> = (0..12)
            .map(|i| {
                let reasoner = Arc::clone(&reasoner);
                tokio::spawn(async move {
                    let content = safeguard_harmony::Content::text(format!("item {i}"));
                    reasoner.reason(ReasonRequest::new("Answer 0 or 1.", content, Effort::Low)).await
                })
            })
            .collect();
        for caller in callers {
            let output = caller.await.unwrap().unwrap();
            assert_eq!(output.final_text.as_deref(), Some("0"));
        }
        let most = engine.most_inside.load(std::sync::atomic::Ordering::SeqCst);
        assert!((2..=4).contains(&most), "{most} engine calls ran at once");
    }
}

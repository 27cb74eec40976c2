//! The `Reasoner` seam: one policy prompt in, the model's reasoning and answer out.
//!
//! Everything above this trait (the classifier, the server, eval) is independent of where the model runs;
//! the embedded llama.cpp engine and remote OpenAI-compatible backends both implement it.

use std::ops::AddAssign;

use async_trait::async_trait;
use safeguard_engine::Sampling;
use safeguard_harmony::{Content, Effort};
use serde::{Deserialize, Serialize};

/// Ask the reasoner for its effort-level default budget instead of a fixed completion-token cap.
pub const USE_EFFORT_BUDGET: usize = 0;

/// One prompt for the model: instructions (a policy, or several combined) and the content to judge.
#[derive(Debug, Clone)]
pub struct ReasonRequest {
    /// Goes into the developer message verbatim.
    pub instructions: String,
    pub content: Content,
    pub effort: Effort,
    /// `YYYY-MM-DD` for the system message; `None` leaves the date out so prompts are reproducible.
    pub date: Option<String>,
    /// Completion-token cap; [`USE_EFFORT_BUDGET`] (0) means the reasoner's budget for `effort`.
    pub max_tokens: usize,
    pub sampling: Sampling,
}

impl ReasonRequest {
    /// Greedy decoding, no date, the reasoner's budget for `effort`.
    pub fn new(instructions: impl Into<String>, content: Content, effort: Effort) -> Self {
        Self {
            instructions: instructions.into(),
            content,
            effort,
            date: None,
            max_tokens: USE_EFFORT_BUDGET,
            sampling: Sampling::Greedy,
        }
    }
}

/// What the model said for one prompt, with the accounting needed for audit and replay.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReasonOutput {
    /// The chain of thought ("analysis" channel). Meant for developers and reviewers, never end users.
    pub analysis: Option<String>,
    /// The answer ("final" channel); `None` when the model never reached it.
    pub final_text: Option<String>,
    /// The token budget or the context ran out before the model finished its answer.
    pub truncated: bool,
    pub usage: Usage,
    pub timings: Timings,
    /// Geometric mean of the probabilities the engine gave the tokens inside the final message.
    ///
    /// A geometric mean rather than the product so that a long JSON answer is not marked less
    /// certain than a one-character label merely for being long. `None` when there is no final message
    /// or the backend does not report token probabilities.
    pub final_token_prob: Option<f32>,
    /// `sha256:<hex>` of the prompt token ids (each as little-endian u32), so a decision can be tied
    /// to the exact prompt and replayed. `None` when the backend renders the prompt itself.
    pub prompt_sha256: Option<String>,
}

/// Token accounting, summed over prompts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens of the rendered prompt, cached or not.
    pub prompt_tokens: usize,
    /// Of `prompt_tokens`, how many were served from the engine's prefix cache instead of prefilled.
    pub cached_prompt_tokens: usize,
    /// Generated tokens: reasoning and answer together.
    pub completion_tokens: usize,
}

impl Usage {
    /// The prompt tokens the engine had to prefill: prefix-cache hits are (almost) free.
    pub fn uncached_prompt_tokens(&self) -> usize {
        self.prompt_tokens.saturating_sub(self.cached_prompt_tokens)
    }

    /// What the engine computed: the uncached prompt plus everything generated. What budgets and cost estimates
    /// count.
    pub fn billed_tokens(&self) -> usize {
        self.uncached_prompt_tokens().saturating_add(self.completion_tokens)
    }
}

/// Saturating: counts come from backends this process does not control, and a sum that wrapped would bill a
/// huge usage as a small one (or panic in a debug build) instead of as the most there is.
impl AddAssign for Usage {
    fn add_assign(&mut self, other: Self) {
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.cached_prompt_tokens = self.cached_prompt_tokens.saturating_add(other.cached_prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(other.completion_tokens);
    }
}

/// Where the time went, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Waiting for an engine thread before any work started.
    pub queue_ms: f64,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    /// Wall time from the request to the answer.
    pub total_ms: f64,
}

impl Timings {
    /// Adds the work-time components. `total_ms` is left alone: summing wall times of prompts that ran
    /// together in one batch would overstate it, so callers set it from their own clock.
    pub fn add_work(&mut self, other: &Timings) {
        self.queue_ms += other.queue_ms;
        self.prefill_ms += other.prefill_ms;
        self.decode_ms += other.decode_ms;
    }
}

/// Why a reasoner could not produce an output. Callers turn any of these into `needs_review`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReasonError {
    #[error("could not render the prompt: {0}")]
    Prompt(#[from] safeguard_harmony::HarmonyError),
    #[error("the content is {content_tokens} tokens long; the limit is {limit} (split it or raise the limit)")]
    ContentTooLong { content_tokens: usize, limit: usize },
    #[error("the engine failed: {0}")]
    Engine(#[from] safeguard_engine::EngineError),
    #[error("the engine returned {got} results for {expected} requests")]
    EngineResultCount { expected: usize, got: usize },
    #[error("the engine thread stopped before answering: {0}")]
    EngineThread(String),
    /// For backends outside this crate (remote servers): their own error, as text.
    #[error("the backend failed: {0}")]
    Backend(String),
}

/// A piece of the model's output, sent while it is still decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReasonDelta {
    /// Chain-of-thought text (the analysis channel).
    Reasoning(String),
    /// Answer text (the final channel), sent once, at the end, exactly as [`ReasonOutput::final_text`]: by the
    /// embedded engine and by remote servers alike, since text streamed before the whole response is parsed may
    /// turn out to be no answer.
    Final(String),
}

/// Where [`Reasoner::reason_streaming`] sends its deltas. Unbounded so that a slow reader never stalls the
/// engine; a dropped receiver (the client went away) just discards them.
pub type DeltaSender = tokio::sync::mpsc::UnboundedSender<ReasonDelta>;

/// One server behind a reasoner, as last seen: for `/readyz` and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointHealth {
    /// Its address without credentials.
    pub url: String,
    /// Whether it answered its last health probe (a fresh one counts as answering until probed).
    pub answering: bool,
    /// Whether its circuit breaker lets requests through (closed, or half-open for a probe request).
    pub accepting: bool,
    pub in_flight: usize,
}

impl EndpointHealth {
    /// Whether a request sent now could be served by it.
    pub fn usable(&self) -> bool {
        self.answering && self.accepting
    }
}

/// Turns a policy prompt into the model's reasoning and answer.
#[async_trait]
pub trait Reasoner: Send + Sync {
    /// Names the model (and backend) in every decision, e.g. `gpt-oss-safeguard-20b-mxfp4.gguf`.
    fn model_id(&self) -> String;

    /// The servers this reasoner sends prompts to, as last seen; `None` for one with no server to lose (the
    /// embedded engine runs in this process, and is loaded before the server starts).
    fn backends(&self) -> Option<Vec<EndpointHealth>> {
        None
    }

    /// Asks every server behind this reasoner whether it answers, so that [`backends`](Self::backends) and the
    /// choice of server follow what is true now rather than what was true at start-up. Nothing without servers.
    async fn probe_backends(&self) {}

    async fn reason(&self, req: ReasonRequest) -> Result<ReasonOutput, ReasonError>;

    /// Like [`reason`](Self::reason), sending reasoning to `deltas` as it is decoded and the answer once it is
    /// accepted (see [`ReasonDelta::Final`]). The
    /// returned output is the whole result, as `reason` would return it. Backends that cannot stream send it
    /// as one reasoning delta and one answer delta once they have it; this is that fallback.
    async fn reason_streaming(&self, req: ReasonRequest, deltas: DeltaSender) -> Result<ReasonOutput, ReasonError> {
        let output = self.reason(req).await?;
        if let Some(reasoning) = output.analysis.clone().filter(|r| !r.is_empty()) {
            let _ = deltas.send(ReasonDelta::Reasoning(reasoning));
        }
        if let Some(answer) = output.final_text.clone().filter(|a| !a.is_empty()) {
            let _ = deltas.send(ReasonDelta::Final(answer));
        }
        Ok(output)
    }

    /// How many prompts of a [`reason_batch`](Self::reason_batch) are decoded at the same time: the rest wait
    /// their turn. `None`: all of them at once. A deadline for a batch is a deadline per group of this size, so a
    /// big batch is not cut off for being big. The default `reason_batch` takes one prompt after another.
    fn batch_width(&self) -> Option<usize> {
        Some(1)
    }

    /// The completion-token cap of a request at `effort` that leaves it to the reasoner ([`USE_EFFORT_BUDGET`]):
    /// what such a prompt may cost, charged in full when it fails, since the engine may still be decoding it.
    fn completion_cap(&self, effort: Effort) -> usize {
        crate::TokenBudgets::default().for_effort(effort)
    }

    /// The tokens one prompt and its completion may take together, when this reasoner knows: the embedded engine's
    /// context per sequence. `None` when it cannot tell (a remote server renders and bounds prompts itself).
    fn context_tokens(&self) -> Option<usize> {
        None
    }

    /// Several prompts at once; results in request order. Backends that can decode several
    /// sequences together (and share a policy prefix between them) override this.
    async fn reason_batch(&self, reqs: Vec<ReasonRequest>) -> Vec<Result<ReasonOutput, ReasonError>> {
        let mut outputs = Vec::with_capacity(reqs.len());
        for req in reqs {
            outputs.push(self.reason(req).await);
        }
        outputs
    }
}

/// How sure the engine was of its answer, from the final message's tokens as (text, log-probability) pairs.
///
/// A verdict rests on a few tokens: the value of `"violation"` in a JSON answer, the digit or label word of a
/// plain one ("INVALID - sells followers"). Averaged with the dozens of near-certain tokens around them, a
/// coin-flip verdict would read as 0.99, so the answer's confidence is the least likely of its deciding tokens
/// ([`deciding_spans`]), and of every bare `0`/`1` (a digit inside a rule id can only make it read less sure).
/// `None` without tokens; no confidence at all (0) when no token decides, as for an answer of punctuation.
pub fn answer_confidence<'a>(tokens: impl IntoIterator<Item = (&'a str, f64)>) -> Option<f32> {
    let tokens: Vec<(&str, f64)> = tokens.into_iter().collect();
    if tokens.is_empty() {
        return None;
    }
    let text: String = tokens.iter().map(|(token, _)| *token).collect();
    let spans = deciding_spans(&text);
    let mut least: Option<f64> = None;
    let mut at = 0usize;
    for (token, log_prob) in tokens {
        let (start, end) = (at, at + token.len());
        at = end;
        // A log-probability above zero (a probability above one) or +∞ is no probability: a broken or mis-scaled
        // backend. It reads as NaN, so it counts as no confidence at all rather than as certainty; the pipeline
        // treats that as low, which asks again or asks a person. A hair above zero is rounding of a certain token.
        let log_prob = if log_prob.is_nan() || log_prob > LOG_PROB_ROUNDING { f64::NAN } else { log_prob.min(0.0) };
        let bare: String = token.chars().filter(|c| c.is_alphanumeric()).collect();
        let deciding = bare == "0" || bare == "1" || spans.iter().any(|span| span.start < end && start < span.end);
        if deciding {
            // `f64::min` skips a NaN: a broken token would borrow another token's confidence.
            least = Some(match least {
                Some(least) if !least.is_nan() && !log_prob.is_nan() => least.min(log_prob),
                Some(least) if least.is_nan() => least,
                _ => log_prob,
            });
        }
    }
    let log_prob = least.unwrap_or(f64::NAN);
    // Not a number (a broken engine) is no confidence at all.
    Some(if log_prob.is_nan() { 0.0 } else { (log_prob.exp() as f32).clamp(0.0, 1.0) })
}

/// The byte spans of an answer that carry its verdict. In a JSON answer, the value of every `"violation"` key (its
/// rationale is prose and decides nothing). In a plain one, read from its head (its first [`HEAD_WORDS`] words,
/// fence markers and a fence's language tag left out): every word up to the first answer word
/// ([`DECIDING_WORDS`]: "Label: HAM (no violation)" counts HAM) and every answer word after it; a head without an
/// answer word ("Label: SPAM", a policy's own labels) counts whole, the cautious reading.
fn deciding_spans(text: &str) -> Vec<std::ops::Range<usize>> {
    let values = violation_values(text);
    if !values.is_empty() {
        return values;
    }
    let mut words: Vec<std::ops::Range<usize>> = Vec::new();
    let mut line_start = 0;
    for line in text.split_inclusive('\n') {
        let mut line_words: Vec<std::ops::Range<usize>> = word_ranges(line).collect();
        // "```text" opens a fence whose first word is its language; "```INVALID```" holds the answer itself.
        let opened = line.trim_start().strip_prefix("```").or_else(|| line.trim_start().strip_prefix("~~~"));
        if opened.is_some_and(|rest| rest.starts_with(|c: char| c.is_lowercase())) && !line_words.is_empty() {
            line_words.remove(0);
        }
        words.extend(line_words.into_iter().map(|range| line_start + range.start..line_start + range.end));
        line_start += line.len();
        if words.len() >= HEAD_WORDS {
            break;
        }
    }
    words.truncate(HEAD_WORDS);
    let deciding = |range: &std::ops::Range<usize>| {
        let word = text[range.clone()].to_lowercase();
        word == "0" || word == "1" || DECIDING_WORDS.contains(&word.as_str())
    };
    let Some(first_answer) = words.iter().position(deciding) else {
        return words;
    };
    words
        .into_iter()
        .enumerate()
        .filter(|(index, range)| *index <= first_answer || deciding(range))
        .map(|(_, range)| range)
        .collect()
}

/// How many words of a plain answer are read for its verdict: "INVALID - sells followers with a link" whole.
const HEAD_WORDS: usize = 8;

/// Byte ranges of the runs of letters and digits in `text`.
fn word_ranges(text: &str) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let mut chars = text.char_indices().peekable();
    std::iter::from_fn(move || {
        let (start, _) = chars.find(|(_, c)| c.is_alphanumeric())?;
        let mut end = text.len();
        while let Some(&(at, c)) = chars.peek() {
            if !c.is_alphanumeric() {
                end = at;
                break;
            }
            chars.next();
        }
        Some(start..end)
    })
}

/// The values of every quoted `"violation"` key of a JSON answer, from after its `:` up to the next `,`, `}` or
/// line break. Prose that says "No violation: …" is no key. ASCII lowercasing keeps byte offsets.
fn violation_values(text: &str) -> Vec<std::ops::Range<usize>> {
    let lower = text.to_ascii_lowercase();
    lower
        .match_indices("\"violation\"")
        .filter_map(|(at, key)| {
            let value = lower[at + key.len()..].trim_start().strip_prefix(':')?.trim_start();
            let start = text.len() - value.len();
            let end = value.find([',', '}', '\n']).map_or(text.len(), |len| start + len);
            Some(start..end)
        })
        .collect()
}

/// Words that carry a plain answer wherever they stand in its head: the starter policies' labels and what models
/// write for them.
const DECIDING_WORDS: [&str; 11] =
    ["valid", "invalid", "safe", "unsafe", "violation", "violating", "allowed", "allow", "escalate", "yes", "no"];

/// How far above zero a reported log-probability may be and still be read as a certain token (0): backends
/// computing in reduced precision report `1e-7` for a token they were sure of.
const LOG_PROB_ROUNDING: f64 = 1e-4;

#[cfg(test)]
mod usage_tests {
    use super::Usage;

    #[test]
    fn sums_of_huge_counts_saturate_instead_of_wrapping() {
        let huge = Usage { prompt_tokens: usize::MAX, cached_prompt_tokens: 0, completion_tokens: usize::MAX };
        assert_eq!(huge.billed_tokens(), usize::MAX);
        let mut total = Usage { prompt_tokens: 10, cached_prompt_tokens: 5, completion_tokens: 3 };
        total += huge;
        total += huge;
        assert_eq!(total, Usage { prompt_tokens: usize::MAX, cached_prompt_tokens: 5, completion_tokens: usize::MAX });
        assert_eq!(total.billed_tokens(), usize::MAX);
    }
}

#[cfg(test)]
mod confidence_tests {
    use super::answer_confidence;

    #[test]
    fn a_json_answer_is_as_sure_as_its_verdict_digit() {
        let mut tokens: Vec<(&str, f64)> = vec![("{\"", 0.0), ("violation", 0.0), ("\":", 0.0), (" 1", 0.4f64.ln())];
        tokens.extend(std::iter::repeat_n((" text", 0.999f64.ln()), 60));
        let confidence = answer_confidence(tokens).unwrap();
        assert!((confidence - 0.4).abs() < 1e-6, "{confidence}");
    }

    #[test]
    fn a_label_answer_is_as_sure_as_its_label() {
        let confidence = answer_confidence([("VAL", 0.25f64.ln()), ("ID", 0.0)]).unwrap();
        assert!((confidence - 0.25).abs() < 1e-6, "{confidence}");
        // Filler after the label does not dilute it.
        let mut tokens: Vec<(&str, f64)> = vec![("IN", 0.45f64.ln()), ("VALID", 0.99f64.ln()), (" -", 0.0)];
        tokens.extend(std::iter::repeat_n((" sells", 0.999f64.ln()), 12));
        let confidence = answer_confidence(tokens).unwrap();
        assert!((confidence - 0.45).abs() < 1e-6, "{confidence}");
        // Nor does it after a boolean.
        let mut tokens: Vec<(&str, f64)> = vec![("{\"", 0.0), ("violation", 0.0), ("\":", 0.0), (" true", 0.3f64.ln())];
        tokens.extend(std::iter::repeat_n((" text", 0.999f64.ln()), 60));
        let confidence = answer_confidence(tokens).unwrap();
        assert!((confidence - 0.3).abs() < 1e-6, "{confidence}");
        // A label later in the answer is found by its word.
        let confidence = answer_confidence([("The", 0.0), (" answer", 0.0), (" is", 0.0), (" UNSAFE", 0.4f64.ln())]);
        assert!((confidence.unwrap() - 0.4).abs() < 1e-6);
        assert_eq!(answer_confidence([("**", 0.0)]), Some(0.0), "an answer of punctuation decides nothing");
        // A policy's own label, not an answer word: the head counts whole.
        let confidence = answer_confidence([("Label", 0.0), (":", 0.0), (" SP", 0.4f64.ln()), ("AM", 0.0)]);
        assert!((confidence.unwrap() - 0.4).abs() < 1e-6);
        // A label beside another word the policy chose.
        let confidence = answer_confidence([("Label", 0.0), (": HAM", 0.45f64.ln()), (" (no violation)", 0.0)]);
        assert!((confidence.unwrap() - 0.45).abs() < 1e-6);
        // A label inside a fence on one line.
        let confidence = answer_confidence([("```", 0.0), ("INVALID", 0.3f64.ln()), ("```", 0.0)]);
        assert!((confidence.unwrap() - 0.3).abs() < 1e-6);
        // Prose that says "No violation:" is no key: the label before it decides.
        let confidence = answer_confidence([("VALID", 0.4f64.ln()), ("\nNo violation: the user asks", 0.0)]);
        assert!((confidence.unwrap() - 0.4).abs() < 1e-6);
        // A label on the line after a fence or a heading.
        let confidence = answer_confidence([("```", 0.0), ("text", 0.0), ("\n", 0.0), ("INVALID", 0.35f64.ln())]);
        assert!((confidence.unwrap() - 0.35).abs() < 1e-6);
        // Every `violation` key's value counts, not only the first one written.
        let tokens =
            [("{\"rationale\": \"No violation: fine.\", \"violation\": ", 0.0), ("false", 0.3f64.ln()), ("}", 0.0)];
        assert!((answer_confidence(tokens).unwrap() - 0.3).abs() < 1e-6);
        assert_eq!(answer_confidence(std::iter::empty()), None);
        assert_eq!(answer_confidence([("1", f64::NAN)]), Some(0.0));
        assert_eq!(answer_confidence([("1", f64::NAN), ("0", 0.0)]), Some(0.0), "a NaN digit is not outvoted");
        assert_eq!(answer_confidence([("0", 0.0), ("1", f64::NAN)]), Some(0.0));
    }

    #[test]
    fn an_impossible_log_probability_is_no_confidence() {
        // A probability above one is a broken backend, not certainty: it must not read as sure (e^0.7 = 2.01).
        assert_eq!(answer_confidence([("1", 0.7)]), Some(0.0));
        assert_eq!(answer_confidence([("1", f64::INFINITY)]), Some(0.0));
        assert_eq!(answer_confidence([("1", 0.7), ("0", 0.9f64.ln())]), Some(0.0), "not outvoted by a sane digit");
        assert_eq!(answer_confidence([("VAL", 0.5), ("ID", 0.0)]), Some(0.0));
        assert_eq!(answer_confidence([("1", f64::NEG_INFINITY)]), Some(0.0), "probability zero");
        // Rounding just above zero is a certain token.
        assert_eq!(answer_confidence([("1", 1e-7)]), Some(1.0));
        for tokens in [vec![("1", 0.3f64.ln())], vec![("VAL", -0.1), ("ID", 1e-9)]] {
            let confidence = answer_confidence(tokens.clone()).unwrap();
            assert!((0.0..=1.0).contains(&confidence), "{tokens:?}: {confidence}");
        }
    }
}

//! Policies + content -> prompts -> reasoner -> verdicts -> one outcome.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use safeguard_engine::Sampling;
use safeguard_harmony::{Content, Effort, PromptOptions};
use safeguard_policy::Policy;
use safeguard_verdict::{Outcome, Verdict, combined_instructions, judge, judge_combined, overall_outcome};
use serde::{Deserialize, Serialize};
use tracing::{Instrument, info_span};
use uuid::Uuid;

use crate::reasoner::{ReasonError, ReasonOutput, ReasonRequest, Reasoner, Timings, USE_EFFORT_BUDGET, Usage};

/// How several policies are put to the model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// One prompt per policy: the most accurate, and each policy's prefix is cached on its own.
    #[default]
    Separate,
    /// One prompt holding every policy, asking for a per-policy answer: one decode instead of N, at some
    /// cost in accuracy per added policy.
    Combined,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "separate" => Ok(Mode::Separate),
            "combined" => Ok(Mode::Combined),
            other => Err(format!("unknown mode {other:?}; expected \"separate\" or \"combined\"")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Separate => "separate",
            Mode::Combined => "combined",
        })
    }
}

#[derive(Debug, Clone)]
pub struct ClassifyOptions {
    pub effort: Effort,
    pub date: Option<String>,
    pub mode: Mode,
    /// Completion-token cap per prompt; `None` uses the reasoner's budget for the effort.
    pub max_tokens: Option<usize>,
    /// Keep the chain of thought in the decision. Off by default: it is for reviewers, not end users.
    pub include_reasoning: bool,
    pub sampling: Sampling,
}

impl Default for ClassifyOptions {
    fn default() -> Self {
        Self {
            effort: Effort::default(),
            date: None,
            mode: Mode::default(),
            max_tokens: None,
            include_reasoning: false,
            sampling: Sampling::Greedy,
        }
    }
}

/// What happened to one prompt: enough to audit and replay it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptTrace {
    /// Names of the policies this prompt held (one in separate mode, all in combined mode).
    pub policies: Vec<String>,
    pub prompt_sha256: Option<String>,
    pub usage: Usage,
    pub timings: Timings,
    pub truncated: bool,
    pub final_token_prob: Option<f32>,
    /// The model's raw answer, before validation.
    pub final_text: Option<String>,
    /// Why the reasoner produced nothing; the verdicts of this prompt are then `needs_review`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl PromptTrace {
    /// A prompt the model answered (its chain of thought is kept apart, in the decision's `reasoning`).
    pub fn answered(policies: Vec<String>, output: &ReasonOutput) -> Self {
        PromptTrace {
            policies,
            prompt_sha256: output.prompt_sha256.clone(),
            usage: output.usage,
            timings: output.timings,
            truncated: output.truncated,
            final_token_prob: output.final_token_prob,
            final_text: output.final_text.clone(),
            error: None,
        }
    }

    /// A prompt that produced nothing: its verdicts need review, for `reason`.
    pub fn failed(policies: Vec<String>, reason: String) -> Self {
        PromptTrace {
            policies,
            prompt_sha256: None,
            usage: Usage::default(),
            timings: Timings::default(),
            truncated: false,
            final_token_prob: None,
            final_text: None,
            error: Some(reason),
        }
    }
}

/// The decision for one item of content under a set of policies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(into = "wire::DecisionWire", from = "wire::DecisionWire")]
pub struct Decision {
    /// UUID v7: sorts by creation time.
    pub id: Uuid,
    pub outcome: Outcome,
    /// One per policy, in the order the policies were given.
    pub verdicts: Vec<Verdict>,
    /// Aligned with `verdicts`: the engine's confidence in the answer that verdict came from
    /// (see [`ReasonOutput::final_token_prob`]). Serialized inside each verdict.
    pub engine_confidence: Vec<Option<f32>>,
    pub usage: Usage,
    pub timings: Timings,
    /// Chain of thought per prompt, in prompt order; empty unless asked for.
    pub reasoning: Vec<String>,
    pub model: String,
    pub effort: Effort,
    pub mode: Mode,
    pub prompts: Vec<PromptTrace>,
}

impl Decision {
    /// A decision nothing was reasoned for: every policy needs review for `reason`, which is its verdict's rationale
    /// and the error of a failed trace per policy (one prompt each, as in separate mode). What a stage that timed out,
    /// or content too long to reason about, leaves for a person.
    pub fn unreasoned(policies: &[Policy], options: &ClassifyOptions, model: String, reason: &str) -> Decision {
        let verdicts: Vec<Verdict> = policies
            .iter()
            .map(|policy| {
                let mut verdict = judge(policy, None, None, false);
                verdict.outcome = Outcome::NeedsReview;
                verdict.rationale = Some(reason.to_string());
                verdict
            })
            .collect();
        let prompts =
            policies.iter().map(|p| PromptTrace::failed(vec![p.meta.name.clone()], reason.to_string())).collect();
        Decision {
            id: Uuid::now_v7(),
            outcome: Outcome::NeedsReview,
            engine_confidence: vec![None; verdicts.len()],
            verdicts,
            usage: Usage::default(),
            timings: Timings::default(),
            reasoning: Vec::new(),
            model,
            effort: options.effort,
            mode: Mode::Separate,
            prompts,
        }
    }
}

mod wire {
    //! The JSON shape: each verdict carries its engine confidence next to its own fields.

    use super::*;

    #[derive(Serialize, Deserialize)]
    pub struct VerdictWire {
        #[serde(flatten)]
        verdict: Verdict,
        #[serde(default)]
        engine_confidence: Option<f32>,
    }

    #[derive(Serialize, Deserialize)]
    pub struct DecisionWire {
        id: Uuid,
        outcome: Outcome,
        verdicts: Vec<VerdictWire>,
        usage: Usage,
        timings: Timings,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        reasoning: Vec<String>,
        model: String,
        effort: Effort,
        mode: Mode,
        prompts: Vec<PromptTrace>,
    }

    impl From<Decision> for DecisionWire {
        fn from(d: Decision) -> Self {
            let mut confidence = d.engine_confidence.into_iter();
            let verdicts = d
                .verdicts
                .into_iter()
                .map(|verdict| VerdictWire { verdict, engine_confidence: confidence.next().flatten() })
                .collect();
            DecisionWire {
                id: d.id,
                outcome: d.outcome,
                verdicts,
                usage: d.usage,
                timings: d.timings,
                reasoning: d.reasoning,
                model: d.model,
                effort: d.effort,
                mode: d.mode,
                prompts: d.prompts,
            }
        }
    }

    impl From<DecisionWire> for Decision {
        fn from(w: DecisionWire) -> Self {
            let (verdicts, engine_confidence) =
                w.verdicts.into_iter().map(|v| (v.verdict, v.engine_confidence)).unzip();
            Decision {
                id: w.id,
                outcome: w.outcome,
                verdicts,
                engine_confidence,
                usage: w.usage,
                timings: w.timings,
                reasoning: w.reasoning,
                model: w.model,
                effort: w.effort,
                mode: w.mode,
                prompts: w.prompts,
            }
        }
    }
}

/// Sees every prompt a [`Classifier`] finished (answered or failed) with the effort it ran at: where a service
/// counts cost and latency per policy and effort, whichever path (direct, cascade step, job, stream) asked.
pub trait PromptObserver: Send + Sync {
    fn observe(&self, effort: Effort, prompt: &PromptTrace);
}

/// Classifies content under policies with any [`Reasoner`].
#[derive(Clone)]
pub struct Classifier {
    reasoner: Arc<dyn Reasoner>,
    observer: Option<Arc<dyn PromptObserver>>,
    /// Prompt prefix lengths (system and developer messages) by instructions, effort and date, shared by clones:
    /// checking a prompt's size tokenizes each policy once, not on every request.
    prefix_lens: Arc<Mutex<HashMap<String, Vec<PrefixLen>>>>,
}

/// A counted prompt prefix of some instructions: the system message differs by effort and date.
#[derive(Debug, Clone)]
struct PrefixLen {
    effort: Effort,
    date: Option<String>,
    len: usize,
}

/// Prefix lengths kept before the cache starts again: more policy versions and combinations than a server
/// serves at once, and small (a policy's text each).
const PREFIX_LENS_KEPT: usize = 512;

/// A prompt that does not fit the model's context together with the tokens its answer may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextOverflow {
    /// The policies of the prompt that does not fit, by name.
    pub policies: String,
    pub effort: Effort,
    /// The whole prompt: system and developer messages (the policy) and the content.
    pub prompt_tokens: usize,
    /// Of `prompt_tokens`, the content's own: the text of its user message, as the server's content token limit
    /// counts it.
    pub content_tokens: usize,
    /// Of `content_tokens`, about how many are the framing set around a prompt, a response or a conversation's
    /// messages (0 for a plain text): a client trimming its own text must leave room for them.
    pub framing_tokens: usize,
    pub completion_cap: usize,
    pub context: usize,
}

impl ContextOverflow {
    /// The most content tokens this policy, effort and cap leave room for.
    pub fn content_room(&self) -> usize {
        let around = self.prompt_tokens.saturating_sub(self.content_tokens);
        self.context.saturating_sub(around).saturating_sub(self.completion_cap)
    }

    /// Counts the framing around `content`'s own texts (counted apart, so "about": a token may merge across an
    /// edge). Only on a refusal: it tokenizes the content again.
    fn with_framing_of(mut self, content: &Content) -> Self {
        let tokenizer = safeguard_harmony::Tokenizer::shared();
        let written: usize = safeguard_harmony::written_parts(content).iter().map(|part| tokenizer.count(part)).sum();
        self.framing_tokens = self.content_tokens.saturating_sub(written);
        self
    }

    /// Of several prompts that do not fit, the one that leaves the least room for content (the first of equals): the
    /// one to name, so that a client that trims its content to the room it is told is not refused again for another.
    pub fn tightest(overflows: impl IntoIterator<Item = Self>) -> Option<Self> {
        overflows.into_iter().min_by_key(Self::content_room)
    }
}

impl std::fmt::Display for ContextOverflow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the prompt for {} at {} effort is {} tokens, {} of them content, and its answer may take {} more; the \
             model's context holds {}: ",
            self.policies,
            self.effort.as_str(),
            self.prompt_tokens,
            self.content_tokens,
            self.completion_cap,
            self.context
        )?;
        match self.content_room() {
            0 => f.write_str(
                "the policy and the answer's budget fill it before any content (shorten the policy, lower \
                 max_tokens, or give the engine a larger context)",
            ),
            room if self.framing_tokens == 0 => write!(
                f,
                "content of at most {room} tokens fits (split the content, lower max_tokens, or give the engine a \
                 larger context)"
            ),
            room => write!(
                f,
                "content of at most {room} tokens fits, about {} of them the framing around a prompt, response or \
                 conversation, so about {} of its own text (split the content, lower max_tokens, or give the engine \
                 a larger context)",
                self.framing_tokens,
                room.saturating_sub(self.framing_tokens)
            ),
        }
    }
}

impl std::error::Error for ContextOverflow {}

impl Classifier {
    pub fn new(reasoner: Arc<dyn Reasoner>) -> Self {
        Self { reasoner, observer: None, prefix_lens: Arc::default() }
    }

    /// Whether every prompt [`classify`](Self::classify) would send for `content` fits the reasoner's context with
    /// room for its completion cap. Callers check before admitting an item: content the model cannot read whole is
    /// then refused with the reason, instead of failing in the engine and going to a person after a call paid at
    /// the cap. Passes when the reasoner does not know its context (a remote server bounds prompts itself), and
    /// leaves content that cannot be rendered at all to fail on its own, with its own reason.
    pub fn check_fits_context(
        &self,
        policies: &[Policy],
        content: &Content,
        options: &ClassifyOptions,
    ) -> Result<(), ContextOverflow> {
        if self.reasoner.context_tokens().is_none() {
            return Ok(());
        }
        let Ok(suffix_tokens) = safeguard_harmony::suffix_len(content) else {
            return Ok(());
        };
        let overflows = prompt_instructions(policies, options.mode).into_iter().filter_map(|(held, instructions)| {
            let names = || held.iter().map(|&p| policies[p].meta.name.as_str()).collect::<Vec<_>>().join(", ");
            let prefix_tokens = self.prefix_len(&instructions, options);
            self.check_prompt(prefix_tokens, suffix_tokens, options, names).err()
        });
        ContextOverflow::tightest(overflows).map_or(Ok(()), |overflow| Err(overflow.with_framing_of(content)))
    }

    /// [`check_fits_context`](Self::check_fits_context) for one request of the caller's own instructions (a chat
    /// completion's system and developer messages); `label` names them in the error.
    pub fn check_request_fits(&self, request: &ReasonRequest, label: &str) -> Result<(), ContextOverflow> {
        if self.reasoner.context_tokens().is_none() {
            return Ok(());
        }
        let Ok(suffix_tokens) = safeguard_harmony::suffix_len(&request.content) else {
            return Ok(());
        };
        let max_tokens = (request.max_tokens != USE_EFFORT_BUDGET).then_some(request.max_tokens);
        let options = ClassifyOptions {
            effort: request.effort,
            date: request.date.clone(),
            max_tokens,
            ..ClassifyOptions::default()
        };
        // Not cached: a chat's instructions are the client's own text, one per request as often as not, and would
        // crowd the policies out of the cache.
        let prompt = PromptOptions { effort: request.effort, date: request.date.clone() };
        let prefix_tokens = safeguard_harmony::render_prefix(&request.instructions, &prompt).ok().map(|p| p.len());
        self.check_prompt(prefix_tokens, suffix_tokens, &options, || label.to_string())
            .map_err(|overflow| overflow.with_framing_of(&request.content))
    }

    /// Whether a prompt of `prefix_tokens` (`None`: it cannot be rendered, and fails on its own) and
    /// `suffix_tokens` fits with its completion cap: prompt and cap within the context. That is one token stricter
    /// than the engine needs, since it samples its last token without decoding it; the safe side.
    fn check_prompt(
        &self,
        prefix_tokens: Option<usize>,
        suffix_tokens: usize,
        options: &ClassifyOptions,
        names: impl FnOnce() -> String,
    ) -> Result<(), ContextOverflow> {
        let (Some(context), Some(prefix_tokens)) = (self.reasoner.context_tokens(), prefix_tokens) else {
            return Ok(());
        };
        let completion_cap = options.max_tokens.unwrap_or_else(|| self.reasoner.completion_cap(options.effort));
        let prompt_tokens = prefix_tokens.saturating_add(suffix_tokens);
        if prompt_tokens.saturating_add(completion_cap) <= context {
            return Ok(());
        }
        Err(ContextOverflow {
            policies: names(),
            effort: options.effort,
            prompt_tokens,
            content_tokens: suffix_tokens.saturating_sub(safeguard_harmony::suffix_framing_len()),
            framing_tokens: 0,
            completion_cap,
            context,
        })
    }

    /// The length of the prompt prefix for `instructions` under `options`, from the cache when it was counted
    /// before; `None` when it cannot be rendered.
    fn prefix_len(&self, instructions: &str, options: &ClassifyOptions) -> Option<usize> {
        let seen = |cache: &HashMap<String, Vec<PrefixLen>>| {
            cache
                .get(instructions)?
                .iter()
                .find(|p| p.effort == options.effort && p.date == options.date)
                .map(|p| p.len)
        };
        if let Some(len) = seen(&self.prefix_lens.lock().unwrap_or_else(|p| p.into_inner())) {
            return Some(len);
        }
        let prompt = PromptOptions { effort: options.effort, date: options.date.clone() };
        let len = safeguard_harmony::render_prefix(instructions, &prompt).ok()?.len();
        let mut cache = self.prefix_lens.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= PREFIX_LENS_KEPT {
            cache.clear();
        }
        let entry = PrefixLen { effort: options.effort, date: options.date.clone(), len };
        cache.entry(instructions.to_string()).or_default().push(entry);
        Some(len)
    }

    pub fn with_observer(mut self, observer: Arc<dyn PromptObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Shows the observer a prompt that did not go through [`Self::classify`]: one a caller gave up on (a stage
    /// timeout), or a chat completion sent to the reasoner directly.
    pub fn observe(&self, effort: Effort, prompt: &PromptTrace) {
        if let Some(observer) = &self.observer {
            observer.observe(effort, prompt);
        }
    }

    pub fn reasoner(&self) -> &Arc<dyn Reasoner> {
        &self.reasoner
    }

    /// Never fails: whatever goes wrong in the reasoning step becomes `needs_review` with the reason in
    /// the verdict's rationale and in the prompt trace. No policies at all is also `needs_review`.
    pub async fn classify(&self, policies: &[Policy], content: &Content, options: &ClassifyOptions) -> Decision {
        self.classify_many(policies, std::slice::from_ref(content), options).await.pop().unwrap_or_else(|| {
            // classify_many returns one decision per item; this only guards the invariant.
            assemble(Vec::new(), Vec::new(), Vec::new(), options, self.reasoner.model_id(), 0.0)
        })
    }

    /// Classifies several items with every prompt sent in one `reason_batch`, so backends that batch
    /// decode them together. Decisions come back in item order.
    pub async fn classify_many(
        &self,
        policies: &[Policy],
        items: &[Content],
        options: &ClassifyOptions,
    ) -> Vec<Decision> {
        let span = info_span!("classify", items = items.len(), policies = policies.len(), mode = %options.mode);
        async move {
            let started = Instant::now();
            let plan = plan_prompts(policies, items, options);
            let requests = plan.iter().map(|p| p.request.clone()).collect();
            let results = self.reasoner.reason_batch(requests).await;
            let wall_ms = started.elapsed().as_secs_f64() * 1e3;
            let model = self.reasoner.model_id();
            // Results pair with prompts by position, so a reasoner that lost or added one has shifted every answer
            // after it onto another policy or item: none of them can be trusted.
            let (expected, got) = (plan.len(), results.len());
            let mut results = results.into_iter();

            let mut per_item: Vec<Vec<(PlannedPrompt, Result<ReasonOutput, ReasonError>)>> =
                (0..items.len()).map(|_| Vec::new()).collect();
            for planned in plan {
                let result = match results.next() {
                    Some(result) if got == expected => result,
                    _ => Err(ReasonError::EngineResultCount { expected, got }),
                };
                per_item[planned.item].push((planned, result));
            }
            per_item
                .into_iter()
                .map(|prompts| {
                    let mut verdicts = Vec::new();
                    let mut confidence = Vec::new();
                    let mut traces = Vec::new();
                    for (planned, result) in prompts {
                        let selected: Vec<&Policy> = planned.policies.iter().map(|&i| &policies[i]).collect();
                        let (prompt_verdicts, trace) = judge_prompt(&selected, result, options.mode);
                        self.observe(options.effort, &trace.0);
                        confidence.extend(std::iter::repeat_n(trace.0.final_token_prob, prompt_verdicts.len()));
                        verdicts.extend(prompt_verdicts);
                        traces.push(trace);
                    }
                    assemble(verdicts, confidence, traces, options, model.clone(), wall_ms)
                })
                .collect()
        }
        .instrument(span)
        .await
    }
}

struct PlannedPrompt {
    item: usize,
    /// Indices into the policy list.
    policies: Vec<usize>,
    request: ReasonRequest,
}

fn plan_prompts(policies: &[Policy], items: &[Content], options: &ClassifyOptions) -> Vec<PlannedPrompt> {
    let request = |instructions: &str, content: &Content| ReasonRequest {
        instructions: instructions.to_string(),
        content: content.clone(),
        effort: options.effort,
        date: options.date.clone(),
        max_tokens: options.max_tokens.unwrap_or(USE_EFFORT_BUDGET),
        sampling: options.sampling,
    };
    // Policy-major order: prompts sharing a policy prefix sit next to each other in the batch.
    let mut plan = Vec::new();
    for (held, instructions) in prompt_instructions(policies, options.mode) {
        for (item, content) in items.iter().enumerate() {
            plan.push(PlannedPrompt { item, policies: held.clone(), request: request(&instructions, content) });
        }
    }
    plan
}

/// The instructions of each prompt an item gets, with the indices of the policies each holds: one per policy in
/// separate mode, one for all of them in combined mode.
fn prompt_instructions(policies: &[Policy], mode: Mode) -> Vec<(Vec<usize>, Cow<'_, str>)> {
    match mode {
        Mode::Separate => {
            policies.iter().enumerate().map(|(p, policy)| (vec![p], Cow::Borrowed(policy.body.as_str()))).collect()
        }
        Mode::Combined if policies.is_empty() => Vec::new(),
        Mode::Combined => vec![((0..policies.len()).collect(), Cow::Owned(combined_instructions(policies)))],
    }
}

/// The verdicts for one prompt's policies, plus its trace and reasoning.
fn judge_prompt(
    policies: &[&Policy],
    result: Result<ReasonOutput, ReasonError>,
    mode: Mode,
) -> (Vec<Verdict>, (PromptTrace, Option<String>)) {
    let names = policies.iter().map(|p| p.meta.name.clone()).collect();
    match result {
        Ok(output) => {
            let analysis = output.analysis.as_deref();
            let final_text = output.final_text.as_deref();
            let verdicts = match mode {
                Mode::Separate => policies.iter().map(|p| judge(p, analysis, final_text, output.truncated)).collect(),
                Mode::Combined => {
                    let owned: Vec<Policy> = policies.iter().map(|&p| p.clone()).collect();
                    judge_combined(&owned, analysis, final_text, output.truncated)
                }
            };
            (verdicts, (PromptTrace::answered(names, &output), output.analysis))
        }
        Err(error) => {
            let reason = error.to_string();
            tracing::warn!(%reason, "reasoning failed; the verdicts need review");
            let verdicts = policies.iter().map(|p| failed_verdict(p, &reason)).collect();
            (verdicts, (PromptTrace::failed(names, reason), None))
        }
    }
}

/// How a verdict's rationale starts when the model never answered because its step failed (an outage, a
/// timeout): what tells such a verdict from an answer the model did give, once stored.
pub const FAILED_STEP_RATIONALE: &str = "reasoning failed: ";

/// A verdict for a policy the model never answered: built by the verdict crate from "no final message",
/// so it is `needs_review` by the same rule as any other missing answer, with the failure as rationale.
fn failed_verdict(policy: &Policy, reason: &str) -> Verdict {
    let mut verdict = judge(policy, None, None, false);
    verdict.violation = None;
    verdict.outcome = Outcome::NeedsReview;
    verdict.rationale = Some(format!("{FAILED_STEP_RATIONALE}{reason}"));
    verdict
}

fn assemble(
    verdicts: Vec<Verdict>,
    engine_confidence: Vec<Option<f32>>,
    prompts: Vec<(PromptTrace, Option<String>)>,
    options: &ClassifyOptions,
    model: String,
    wall_ms: f64,
) -> Decision {
    let mut usage = Usage::default();
    let mut timings = Timings::default();
    let mut reasoning = Vec::new();
    let mut traces = Vec::with_capacity(prompts.len());
    for (trace, analysis) in prompts {
        usage += trace.usage;
        timings.add_work(&trace.timings);
        if options.include_reasoning {
            reasoning.push(analysis.unwrap_or_default());
        }
        traces.push(trace);
    }
    timings.total_ms = wall_ms;
    Decision {
        id: Uuid::now_v7(),
        outcome: overall_outcome(&verdicts),
        verdicts,
        engine_confidence,
        usage,
        timings,
        reasoning,
        model,
        effort: options.effort,
        mode: options.mode,
        prompts: traces,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;
    use safeguard_harmony::{Tokenizer, parse_completion, tokens};

    use super::*;

    /// A test double that replays recorded completions: the script maps the judged text to the raw
    /// completion the model "wrote", which goes through the real harmony parser like engine output does.
    struct ReplayReasoner {
        script: Vec<(&'static str, Replay)>,
        batches: Mutex<Vec<usize>>,
        seen_instructions: Mutex<Vec<String>>,
    }

    #[derive(Clone)]
    enum Replay {
        /// Analysis, then the final message, closed with `<|return|>`.
        Answer {
            analysis: &'static str,
            final_text: &'static str,
        },
        /// Reasoning that runs out of tokens before any final message.
        CutOff {
            analysis: &'static str,
        },
        Fail(&'static str),
    }

    impl ReplayReasoner {
        fn new(script: Vec<(&'static str, Replay)>) -> Self {
            Self { script, batches: Mutex::new(Vec::new()), seen_instructions: Mutex::new(Vec::new()) }
        }

        fn completion(replay: &Replay) -> Vec<u32> {
            let tokenizer = Tokenizer::shared();
            let mut out = vec![tokens::CHANNEL];
            out.extend(tokenizer.encode_ordinary("analysis"));
            out.push(tokens::MESSAGE);
            match replay {
                Replay::Answer { analysis, final_text } => {
                    out.extend(tokenizer.encode_ordinary(analysis));
                    out.push(tokens::END);
                    out.push(tokens::START);
                    out.extend(tokenizer.encode_ordinary("assistant"));
                    out.push(tokens::CHANNEL);
                    out.extend(tokenizer.encode_ordinary("final"));
                    out.push(tokens::MESSAGE);
                    out.extend(tokenizer.encode_ordinary(final_text));
                    out.push(tokens::RETURN);
                }
                Replay::CutOff { analysis } => out.extend(tokenizer.encode_ordinary(analysis)),
                Replay::Fail(_) => {}
            }
            out
        }
    }

    #[async_trait]
    impl Reasoner for ReplayReasoner {
        fn model_id(&self) -> String {
            "replay".into()
        }

        async fn reason(&self, req: ReasonRequest) -> Result<ReasonOutput, ReasonError> {
            self.seen_instructions.lock().unwrap().push(req.instructions.clone());
            let judged = req.content.judged_text();
            let replay = self
                .script
                .iter()
                .find(|(text, _)| *text == judged)
                .map(|(_, replay)| replay.clone())
                .unwrap_or_else(|| panic!("no recorded completion for {judged:?}"));
            if let Replay::Fail(reason) = replay {
                return Err(ReasonError::Backend(reason.into()));
            }
            let completion = Self::completion(&replay);
            let parsed = parse_completion(&completion);
            Ok(ReasonOutput {
                analysis: parsed.analysis.clone(),
                final_text: parsed.final_text.clone(),
                truncated: parsed.truncated(),
                usage: Usage { prompt_tokens: 100, cached_prompt_tokens: 60, completion_tokens: completion.len() },
                timings: Timings { queue_ms: 1.0, prefill_ms: 2.0, decode_ms: 3.0, total_ms: 6.0 },
                final_token_prob: parsed.final_text.as_ref().map(|_| 0.75),
                prompt_sha256: Some("sha256:replayed".into()),
            })
        }

        async fn reason_batch(&self, reqs: Vec<ReasonRequest>) -> Vec<Result<ReasonOutput, ReasonError>> {
            self.batches.lock().unwrap().push(reqs.len());
            let mut out = Vec::new();
            for req in reqs {
                out.push(self.reason(req).await);
            }
            out
        }
    }

    fn policy(name: &str) -> Policy {
        Policy::parse(&format!(
            "---\nname: {name}\noutput: binary\n---\n# {name}\n\n## INSTRUCTIONS\nReturn exactly one character: 0 or 1.\n\n\
             ## VIOLATES (1)\nUnsolicited promotion of {name}.\n\n## SAFE (0)\nEverything else.\n"
        ))
        .expect("test policy parses")
    }

    fn script() -> Vec<(&'static str, Replay)> {
        vec![
            ("BUY NOW", Replay::Answer { analysis: "Cold promotion: violates.", final_text: "1" }),
            ("hello Sam", Replay::Answer { analysis: "A greeting: safe.", final_text: "0" }),
            ("rambling", Replay::CutOff { analysis: "Let me think about this for a very long" }),
            ("gibberish", Replay::Answer { analysis: "hmm", final_text: "banana" }),
            ("broken", Replay::Fail("connection reset")),
            (
                "combo",
                Replay::Answer {
                    analysis: "Promotion yes, fraud no.",
                    final_text: r#"{"spam": {"violation": 1, "policy_category": null, "rule_ids": [], "confidence": "high", "rationale": "cold promotion", "action": "block"}, "scam": {"violation": 0, "policy_category": null, "rule_ids": [], "confidence": "high", "rationale": "no fraud", "action": "allow"}}"#,
                },
            ),
            (
                "half",
                Replay::Answer {
                    analysis: "Only thought about spam.",
                    final_text: r#"{"spam": {"violation": 0, "policy_category": null, "rule_ids": [], "confidence": "high", "rationale": "fine", "action": "allow"}}"#,
                },
            ),
        ]
    }

    fn classifier(script: Vec<(&'static str, Replay)>) -> (Classifier, Arc<ReplayReasoner>) {
        let reasoner = Arc::new(ReplayReasoner::new(script));
        (Classifier::new(reasoner.clone()), reasoner)
    }

    #[tokio::test]
    async fn answers_map_to_outcomes() {
        let (classifier, _) = classifier(script());
        let spam = policy("spam");
        let options = ClassifyOptions::default();
        let policies = std::slice::from_ref(&spam);

        let decision = classifier.classify(policies, &Content::text("BUY NOW"), &options).await;
        assert_eq!(decision.outcome, Outcome::Violation);
        assert_eq!(decision.verdicts.len(), 1);
        assert_eq!(decision.verdicts[0].violation, Some(true));
        assert_eq!(decision.verdicts[0].policy, "spam");
        assert_eq!(decision.verdicts[0].policy_hash, spam.hash.to_string());
        assert_eq!(decision.engine_confidence, vec![Some(0.75)]);
        assert_eq!(decision.model, "replay");

        let decision = classifier.classify(policies, &Content::text("hello Sam"), &options).await;
        assert_eq!(decision.outcome, Outcome::Allow);
        assert_eq!(decision.verdicts[0].violation, Some(false));
    }

    #[tokio::test]
    async fn no_answer_is_never_an_allow() {
        let (classifier, _) = classifier(script());
        let spam = policy("spam");
        let options = ClassifyOptions::default();
        for text in ["rambling", "gibberish", "broken"] {
            let decision = classifier.classify(std::slice::from_ref(&spam), &Content::text(text), &options).await;
            assert_eq!(decision.outcome, Outcome::NeedsReview, "{text}");
            assert_eq!(decision.verdicts.len(), 1, "{text}");
            assert_eq!(decision.verdicts[0].violation, None, "{text}");
            assert_eq!(decision.verdicts[0].outcome, Outcome::NeedsReview, "{text}");
        }
        let decision = classifier.classify(std::slice::from_ref(&spam), &Content::text("broken"), &options).await;
        let rationale = decision.verdicts[0].rationale.as_deref().unwrap_or_default();
        assert!(rationale.contains("connection reset"), "{rationale}");
        assert!(decision.prompts[0].error.as_deref().unwrap_or_default().contains("connection reset"));

        let decision = classifier.classify(&[], &Content::text("BUY NOW"), &options).await;
        assert_eq!(decision.outcome, Outcome::NeedsReview, "no policies, no decision");
    }

    #[tokio::test]
    async fn separate_mode_asks_once_per_policy_and_any_violation_wins() {
        let (classifier, reasoner) = classifier(script());
        let policies = [policy("spam"), policy("scam")];
        let decision = classifier.classify(&policies, &Content::text("BUY NOW"), &ClassifyOptions::default()).await;
        assert_eq!(decision.verdicts.iter().map(|v| v.policy.as_str()).collect::<Vec<_>>(), ["spam", "scam"]);
        assert_eq!(decision.prompts.len(), 2);
        assert_eq!(
            decision.usage,
            Usage {
                prompt_tokens: 200,
                cached_prompt_tokens: 120,
                completion_tokens: decision.usage.completion_tokens
            }
        );
        assert_eq!(
            decision.usage.completion_tokens,
            decision.prompts.iter().map(|p| p.usage.completion_tokens).sum::<usize>()
        );
        assert!((decision.timings.prefill_ms - 4.0).abs() < 1e-9);
        let seen = reasoner.seen_instructions.lock().unwrap().clone();
        assert_eq!(seen, [policies[0].body.clone(), policies[1].body.clone()], "instructions are each policy's body");
    }

    #[tokio::test]
    async fn classify_many_sends_one_batch_and_keeps_item_order() {
        let (classifier, reasoner) = classifier(script());
        let policies = [policy("spam"), policy("scam")];
        let items = [Content::text("hello Sam"), Content::text("BUY NOW"), Content::text("broken")];
        let decisions = classifier.classify_many(&policies, &items, &ClassifyOptions::default()).await;
        assert_eq!(*reasoner.batches.lock().unwrap(), [6], "all prompts in one batch");
        let outcomes: Vec<Outcome> = decisions.iter().map(|d| d.outcome).collect();
        assert_eq!(outcomes, [Outcome::Allow, Outcome::Violation, Outcome::NeedsReview]);
        for decision in &decisions {
            assert_eq!(decision.verdicts.iter().map(|v| v.policy.as_str()).collect::<Vec<_>>(), ["spam", "scam"]);
        }
        let ids: std::collections::HashSet<Uuid> = decisions.iter().map(|d| d.id).collect();
        assert_eq!(ids.len(), 3, "every decision has its own id");
    }

    #[tokio::test]
    async fn combined_mode_asks_once_and_splits_the_answer_per_policy() {
        let (classifier, reasoner) = classifier(script());
        let policies = [policy("spam"), policy("scam")];
        let options = ClassifyOptions { mode: Mode::Combined, ..ClassifyOptions::default() };

        let decision = classifier.classify(&policies, &Content::text("combo"), &options).await;
        assert_eq!(*reasoner.seen_instructions.lock().unwrap(), [combined_instructions(&policies)]);
        assert_eq!(decision.prompts.len(), 1);
        assert_eq!(decision.prompts[0].policies, ["spam", "scam"]);
        assert_eq!(decision.verdicts.iter().map(|v| v.violation).collect::<Vec<_>>(), [Some(true), Some(false)]);
        assert_eq!(decision.verdicts[1].policy_hash, policies[1].hash.to_string());
        assert_eq!(decision.engine_confidence, [Some(0.75), Some(0.75)], "both verdicts come from the one answer");
        assert_eq!(decision.outcome, Outcome::Violation);

        // A policy the answer leaves out is undecided, and so is the item.
        let decision = classifier.classify(&policies, &Content::text("half"), &options).await;
        assert_eq!(decision.verdicts[0].outcome, Outcome::Allow);
        assert_eq!(decision.verdicts[1].outcome, Outcome::NeedsReview);
        assert_eq!(decision.outcome, Outcome::NeedsReview);

        // A failed prompt leaves every policy it held undecided.
        let decision = classifier.classify(&policies, &Content::text("broken"), &options).await;
        assert_eq!(decision.verdicts.len(), 2);
        assert!(decision.verdicts.iter().all(|v| v.outcome == Outcome::NeedsReview && v.violation.is_none()));
    }

    #[tokio::test]
    async fn reasoning_is_kept_only_when_asked() {
        let (classifier, _) = classifier(script());
        let spam = policy("spam");
        let mut options = ClassifyOptions::default();
        let decision = classifier.classify(std::slice::from_ref(&spam), &Content::text("BUY NOW"), &options).await;
        assert!(decision.reasoning.is_empty());
        let json = serde_json::to_value(&decision).unwrap();
        assert!(json.get("reasoning").is_none());

        options.include_reasoning = true;
        let decision = classifier.classify(std::slice::from_ref(&spam), &Content::text("BUY NOW"), &options).await;
        assert_eq!(decision.reasoning, ["Cold promotion: violates."]);
    }

    #[tokio::test]
    async fn decision_json_has_the_cli_shape_and_round_trips() {
        let (classifier, _) = classifier(script());
        let spam = policy("spam");
        let decision = classifier
            .classify(std::slice::from_ref(&spam), &Content::text("BUY NOW"), &ClassifyOptions::default())
            .await;
        let json = serde_json::to_value(&decision).unwrap();
        assert_eq!(json["outcome"], "violation");
        assert_eq!(json["verdicts"][0]["policy"], "spam");
        assert_eq!(json["verdicts"][0]["violation"], true);
        assert_eq!(json["verdicts"][0]["engine_confidence"], 0.75);
        assert_eq!(json["usage"]["prompt_tokens"], 100);
        assert_eq!(json["usage"]["cached_prompt_tokens"], 60);
        assert_eq!(json["effort"], "medium");
        assert_eq!(json["mode"], "separate");
        assert!(json["timings"]["total_ms"].is_number());
        let back: Decision = serde_json::from_value(json).unwrap();
        assert_eq!(back, decision);
    }

    /// A reasoner that knows its context, and answers nothing: the size check must not need it to run.
    struct Bounded {
        context: Option<usize>,
    }

    #[async_trait]
    impl Reasoner for Bounded {
        fn model_id(&self) -> String {
            "bounded".into()
        }

        async fn reason(&self, _: ReasonRequest) -> Result<ReasonOutput, ReasonError> {
            Err(ReasonError::Backend("not asked in these tests".into()))
        }

        fn context_tokens(&self) -> Option<usize> {
            self.context
        }
    }

    fn bounded(context: Option<usize>) -> Classifier {
        Classifier::new(Arc::new(Bounded { context }))
    }

    /// The exact size of the prompt a request renders, as the engine would be sent it.
    fn rendered_len(instructions: &str, content: &Content, effort: Effort) -> usize {
        let options = PromptOptions { effort, date: None };
        safeguard_harmony::render_prompt(instructions, content, &options).unwrap().tokens.len()
    }

    #[test]
    fn a_prompt_fits_when_it_and_its_cap_fill_the_context_exactly() {
        let spam = policy("spam");
        let content = Content::text("Limited offer, buy now and save big on everything in the store");
        let options = ClassifyOptions { effort: Effort::Low, max_tokens: Some(100), ..ClassifyOptions::default() };
        let prompt = rendered_len(&spam.body, &content, Effort::Low);
        let exact = bounded(Some(prompt + 100));
        assert_eq!(exact.check_fits_context(std::slice::from_ref(&spam), &content, &options), Ok(()));
        let short = bounded(Some(prompt + 99));
        let overflow = short.check_fits_context(std::slice::from_ref(&spam), &content, &options).unwrap_err();
        assert_eq!((overflow.prompt_tokens, overflow.completion_cap, overflow.context), (prompt, 100, prompt + 99));
        assert_eq!(overflow.policies, "spam");
        assert_eq!(overflow.effort, Effort::Low);
        let text_tokens = Tokenizer::shared().count(&safeguard_harmony::user_message_text(&content));
        assert_eq!(overflow.content_tokens, text_tokens, "the content's own tokens, as the server's limit counts");
        assert_eq!(overflow.content_room(), text_tokens - 1, "one token too many");
        let message = overflow.to_string();
        assert!(message.contains(&format!("content of at most {} tokens fits", text_tokens - 1)), "{message}");
    }

    #[test]
    fn the_cap_is_the_reasoners_budget_for_the_effort_unless_the_caller_sets_one() {
        let spam = policy("spam");
        let content = Content::text("hello there");
        let low = rendered_len(&spam.body, &content, Effort::Low);
        let high = rendered_len(&spam.body, &content, Effort::High);
        let budgets = crate::TokenBudgets::default();
        let classifier = bounded(Some(low + budgets.low));
        let at = |effort| ClassifyOptions { effort, ..ClassifyOptions::default() };
        assert_eq!(classifier.check_fits_context(std::slice::from_ref(&spam), &content, &at(Effort::Low)), Ok(()));
        let overflow =
            classifier.check_fits_context(std::slice::from_ref(&spam), &content, &at(Effort::High)).unwrap_err();
        assert_eq!((overflow.prompt_tokens, overflow.completion_cap), (high, budgets.high));
        let capped = ClassifyOptions { max_tokens: Some(budgets.low), ..at(Effort::High) };
        let fits_capped = bounded(Some(high + budgets.low));
        assert_eq!(fits_capped.check_fits_context(std::slice::from_ref(&spam), &content, &capped), Ok(()));
    }

    #[test]
    fn a_policy_that_fills_the_context_leaves_room_for_no_content() {
        let policies = [policy("spam"), policy("scam")];
        let content = Content::text("hi");
        let options = ClassifyOptions { effort: Effort::Low, max_tokens: Some(10), ..ClassifyOptions::default() };
        let spam_only = rendered_len(&policies[0].body, &content, Effort::Low);
        // Each policy alone fits; together, in one combined prompt, they do not.
        let classifier = bounded(Some(spam_only.max(rendered_len(&policies[1].body, &content, Effort::Low)) + 10));
        assert_eq!(classifier.check_fits_context(&policies, &content, &options), Ok(()));
        let combined = ClassifyOptions { mode: Mode::Combined, ..options.clone() };
        let overflow = classifier.check_fits_context(&policies, &content, &combined).unwrap_err();
        assert_eq!(overflow.policies, "spam, scam");
        assert_eq!(overflow.prompt_tokens, rendered_len(&combined_instructions(&policies), &content, Effort::Low));
        // Nothing of the content fits beside a policy that takes the whole context.
        let tiny = bounded(Some(20));
        let overflow = tiny.check_fits_context(&policies[..1], &content, &options).unwrap_err();
        assert_eq!(overflow.content_room(), 0);
        assert!(overflow.to_string().contains("fill it before any content"), "{overflow}");
    }

    #[test]
    fn of_several_policies_the_one_leaving_the_least_room_is_named() {
        let short = policy("spam");
        let long = Policy::parse(&format!(
            "---\nname: long\noutput: binary\n---\n# long\n\n## INSTRUCTIONS\nReturn 0 or 1.\n\n## VIOLATES (1)\n{}\n",
            "Promotion of any kind at all. ".repeat(40)
        ))
        .unwrap();
        let content = Content::text("word ".repeat(300));
        let options = ClassifyOptions { effort: Effort::Low, max_tokens: Some(10), ..ClassifyOptions::default() };
        let classifier = bounded(Some(rendered_len(&short.body, &content, Effort::Low)));
        for policies in [[short.clone(), long.clone()], [long.clone(), short.clone()]] {
            let overflow = classifier.check_fits_context(&policies, &content, &options).unwrap_err();
            assert_eq!(overflow.policies, "long", "whichever comes first");
            assert_eq!(overflow.prompt_tokens, rendered_len(&long.body, &content, Effort::Low));
        }
    }

    #[test]
    fn a_reasoner_that_does_not_know_its_context_passes_everything() {
        let spam = policy("spam");
        let content = Content::text("word ".repeat(10_000));
        let options = ClassifyOptions::default();
        assert_eq!(bounded(None).check_fits_context(std::slice::from_ref(&spam), &content, &options), Ok(()));
        assert!(bounded(Some(1000)).check_fits_context(std::slice::from_ref(&spam), &content, &options).is_err());
    }

    #[test]
    fn a_chat_request_is_checked_with_its_own_instructions_and_cap() {
        let content = Content::text("What is the capital of France?");
        let mut request = ReasonRequest::new("Answer briefly.", content.clone(), Effort::Medium);
        let prompt = rendered_len("Answer briefly.", &content, Effort::Medium);
        let budget = crate::TokenBudgets::default().medium;
        assert_eq!(bounded(Some(prompt + budget)).check_request_fits(&request, "the instructions"), Ok(()));
        let overflow = bounded(Some(prompt + budget - 1)).check_request_fits(&request, "the instructions").unwrap_err();
        assert_eq!(overflow.policies, "the instructions");
        request.max_tokens = 16;
        assert_eq!(bounded(Some(prompt + 16)).check_request_fits(&request, "the instructions"), Ok(()));
    }
}

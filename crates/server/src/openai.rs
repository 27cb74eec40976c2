//! OpenAI-compatible surfaces, so existing clients and SDKs work unchanged:
//! - `/v1/moderations`: OpenAI's moderation shape, decided by a configured policy set;
//! - `/v1/chat/completions`: the served model itself, harmony-aware (reasoning returned apart);
//! - `/v1/models`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use safeguard_core::{Classifier, Mode, PromptTrace, ReasonDelta, ReasonError, ReasonOutput, ReasonRequest, Reasoner};
use safeguard_engine::Sampling;
use safeguard_harmony::{ChatMessage, Content, Effort};
use safeguard_pipeline::UnpaidStep;
use safeguard_store::now_ms;
use safeguard_verdict::Outcome;
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::Caller;
use crate::classify::{Origin, Settings, parse_settings};
use crate::error::{ApiError, ApiJson};

/// Needs `classify`, as every route that reaches the model does: the served model is not for every key to see.
pub(crate) async fn models(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require("classify")?;
    Ok(Json(
        json!({"object": "list", "data": [{"id": state.reasoner.model_id(), "object": "model", "created": 0, "owned_by": "safeguard"}]}),
    ))
}

async fn moderation_policies(state: &AppState) -> Result<Vec<safeguard_policy::Policy>, ApiError> {
    let names: Vec<String> = if state.config.moderation_policies.is_empty() {
        safeguard_policy::STARTER_POLICIES.iter().map(|s| s.file_name.trim_end_matches(".md").to_string()).collect()
    } else {
        state.config.moderation_policies.clone()
    };
    if names.is_empty() {
        return Err(ApiError::Unavailable("no moderation policies are configured".into()));
    }
    let mut policies = Vec::new();
    let mut missing = Vec::new();
    for name in names {
        // Through the lookup cache, as every path that decides: it records the version in use for retention.
        match crate::policies::stored_policy(state, &name).await? {
            Some(policy) => policies.push(policy),
            None => missing.push(name),
        }
    }
    // Judging against the policies that happen to be stored would quietly allow whatever the missing ones cover.
    if !missing.is_empty() {
        return Err(ApiError::Unavailable(format!(
            "moderation policies {} have no active version; POST them to /v1/policies or fix --moderation-policy",
            missing.iter().map(|name| format!("{name:?}")).collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(policies)
}

/// `{"input": "text" | ["text", …]}` → `{"id", "model", "results": [{"flagged", "categories", "category_scores"}]}`.
/// One category per policy. Fail closed: an item that needs review is flagged, with score 1.0.
pub(crate) async fn moderations(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    caller.require("classify")?;
    let inputs: Vec<String> = match body.get("input") {
        Some(Value::String(text)) => vec![text.clone()],
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|item| match item {
                Value::String(text) => Ok(text.clone()),
                Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("text") => o
                    .get("text")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .ok_or_else(|| ApiError::bad("invalid_input", "text part without \"text\"")),
                _ => Err(ApiError::bad("invalid_input", "only text inputs are supported")),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(ApiError::bad("invalid_input", "\"input\" must be a string or a non-empty array of strings")),
    };
    if inputs.len() > state.config.limits.max_batch_items {
        return Err(ApiError::bad("too_many_items", format!("at most {} inputs", state.config.limits.max_batch_items)));
    }
    // OpenAI answers an empty input as unflagged, and clients that moderate every message of a conversation send
    // them; refusing the batch for one would leave the rest unjudged. Nothing in it can break a policy, so it is
    // answered without the model and without a decision record.
    let blank: Vec<bool> = inputs.iter().map(|text| text.trim().is_empty()).collect();
    let mut contents = Vec::with_capacity(inputs.len());
    for (text, _) in inputs.into_iter().zip(&blank).filter(|(_, blank)| !**blank) {
        contents.push(crate::classify::parse_content(&state, &json!({"text": text}))?);
    }
    let policies = moderation_policies(&state).await?;
    let settings = Settings {
        effort: state.config.default_effort,
        mode: Mode::Separate,
        max_tokens: state.config.moderation_max_tokens,
    };
    for content in &contents {
        let checked = state.classifier.check_fits_context(&policies, content, &crate::classify::options(&settings));
        crate::classify::refuse_overflow(checked)?;
    }
    let decided = if contents.is_empty() {
        Vec::new()
    } else {
        crate::classify::decide_and_store_many(
            &state,
            &policies,
            &contents,
            &settings,
            Origin::of(&caller, "moderations"),
        )
        .await?
    };
    let mut results = Vec::with_capacity(blank.len());
    let mut ids = Vec::new();
    let mut decided = decided.iter();
    for is_blank in blank {
        let Some((decision, record)) = (if is_blank { None } else { decided.next() }) else {
            let nothing_flagged = policies.iter().map(|policy| (policy.meta.name.as_str(), false));
            let safeguard = json!({"decision_id": null, "outcome": Outcome::Allow});
            results.push(moderation_result(false, nothing_flagged, safeguard));
            continue;
        };
        ids.push(record.id.clone());
        // Clients often threshold the scores themselves ("> 0.5"): an item nobody has judged yet scores as a
        // violation, held until a person decides (`safeguard.outcome` says which it is).
        let flagged =
            decision.verdicts.iter().map(|verdict| (verdict.policy.as_str(), verdict.outcome != Outcome::Allow));
        let safeguard = json!({"decision_id": record.id, "outcome": record.outcome});
        // The decision's outcome, not the verdicts': a decision that failed before any verdict needs review.
        results.push(moderation_result(decision.outcome != Outcome::Allow, flagged, safeguard));
    }
    Ok(Json(json!({
        "id": format!("modr-{}", ids.first().cloned().unwrap_or_else(|| uuid::Uuid::now_v7().to_string())),
        "model": state.reasoner.model_id(),
        "results": results,
    })))
}

/// One item's result as OpenAI shapes it, a category per policy; `safeguard` says what was decided and where.
fn moderation_result<'a>(
    flagged: bool,
    flagged_per_policy: impl Iterator<Item = (&'a str, bool)>,
    safeguard: Value,
) -> Value {
    let (mut categories, mut scores, mut applied) =
        (serde_json::Map::new(), serde_json::Map::new(), serde_json::Map::new());
    for (policy, flagged) in flagged_per_policy {
        categories.insert(policy.to_string(), json!(flagged));
        scores.insert(policy.to_string(), json!(if flagged { 1.0 } else { 0.0 }));
        applied.insert(policy.to_string(), json!(["text"]));
    }
    json!({
        "flagged": flagged,
        "categories": categories,
        "category_scores": scores,
        "category_applied_input_types": applied,
        "safeguard": safeguard,
    })
}

/// A message's text. A part that is not text (an image, audio) is refused, not left out: the rest judged alone
/// would be judged as if it were all the message said.
fn message_text(content: &Value) -> Result<String, ApiError> {
    match content {
        Value::String(text) => Ok(text.clone()),
        Value::Array(parts) => parts
            .iter()
            .map(|part| match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                (Some("text"), Some(text)) => Ok(text),
                (kind, _) => Err(ApiError::bad(
                    "invalid_messages",
                    format!(
                        "message content parts must be text ({{\"type\": \"text\", \"text\": …}}); got {}",
                        kind.map_or_else(|| "a part without a type".to_string(), |kind| format!("type {kind:?}"))
                    ),
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|texts| texts.join("")),
        Value::Null => Ok(String::new()),
        _ => Err(ApiError::bad("invalid_messages", "message content must be a string or text parts")),
    }
}

/// Chat Completions for the served model. System and developer messages become the harmony developer
/// message (the policy); the rest is the content: one user message as text, several as a conversation.
pub(crate) async fn chat_completions(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    caller.require("classify")?;
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::bad("invalid_messages", "\"messages\" must be a non-empty array"))?;
    let mut instructions = Vec::new();
    let mut chat = Vec::new();
    for message in messages {
        let role = message
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad("invalid_messages", "every message needs a \"role\""))?;
        let text = message_text(message.get("content").unwrap_or(&Value::Null))?;
        match role {
            "system" | "developer" => instructions.push(text),
            "user" | "assistant" | "tool" => chat.push(ChatMessage::new(role, text)),
            other => return Err(ApiError::bad("invalid_messages", format!("unknown role {other:?}"))),
        }
    }
    let content = match chat.as_slice() {
        [] => return Err(ApiError::bad("invalid_messages", "at least one user message is needed")),
        [only] if only.role == "user" => Content::text(only.content.clone()),
        _ => Content::Conversation { messages: chat },
    };
    let instructions = instructions.join("\n\n");
    // The model judges against a policy and the harmony prompt carries it as the developer message: without one
    // the embedded engine cannot render the prompt and a remote one would be asked a question with no rules.
    if instructions.trim().is_empty() {
        return Err(ApiError::bad(
            "invalid_messages",
            "a system or developer message with the policy is needed: gpt-oss-safeguard judges content against it",
        ));
    }
    let content = crate::classify::parse_content(&state, &json!({"content": content}))?;
    // The instructions reach the model beside the content, so they count against the same limits.
    crate::classify::check_prompt_size(&state, &content, &instructions)?;
    let mut settings_body = json!({});
    if let Some(effort) = body.get("reasoning_effort") {
        settings_body["effort"] = effort.clone();
    }
    if let Some(max) = ApiError::either_field(&body, "max_completion_tokens", "max_tokens")? {
        settings_body["max_tokens"] = max.clone();
    }
    let (settings, _) = parse_settings(&state, &settings_body)?;
    let effort: Effort = settings.effort;
    let sampling = chat_sampling(&body)?;
    let request = ReasonRequest {
        instructions,
        content,
        effort,
        date: None,
        max_tokens: settings.max_tokens.unwrap_or(safeguard_core::USE_EFFORT_BUDGET),
        sampling,
    };
    crate::classify::refuse_overflow(
        state.classifier.check_request_fits(&request, "the system and developer messages"),
    )?;
    let model =
        body.get("model").and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| state.reasoner.model_id());
    let meta = ChunkMeta { id: format!("chatcmpl-{}", uuid::Uuid::now_v7().simple()), created: now_ms() / 1000, model };
    // The chain of thought is audit data on every route (`return_reasoning` asks for the audit scope too): the
    // same prompt sent here must not read it out to a key that may only classify.
    let with_reasoning = caller.has("audit");
    let streamed = ApiError::flag(&body, "stream")?;
    let step = state.cascade.admit(1, effort, settings.max_tokens).await?;
    let mut paid = Paid { step, counted: state.classifier.clone(), cap: settings.max_tokens };
    if streamed {
        let include_usage = body.pointer("/stream_options/include_usage").and_then(Value::as_bool).unwrap_or(false);
        let stream = stream_chat(state.reasoner.clone(), paid, request, meta, include_usage, with_reasoning);
        return Ok(stream.into_response());
    }
    let started = Instant::now();
    let output = state.reasoner.reason(request).await;
    paid.settle(effort, &output);
    let output = output.map_err(|e| ApiError::Unavailable(format!("the model failed: {e}")))?;
    metrics::histogram!("safeguard_chat_latency_seconds").record(started.elapsed().as_secs_f64());
    if let Some(why) = no_answer(&output) {
        return Err(ApiError::NoAnswer(why));
    }
    let ChunkMeta { id, created, model } = meta;
    let finish_reason = finish_reason(&output);
    let usage = usage_json(&output);
    let reasoning = output.analysis.clone().filter(|_| with_reasoning);
    let answer = output.final_text.clone().unwrap_or_default();
    Ok(Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": answer, "reasoning": reasoning, "reasoning_content": reasoning},
            "finish_reason": finish_reason,
        }],
        "usage": usage,
    }))
    .into_response())
}

/// Chat completions count among the prompts per policy and effort (`safeguard_prompts_total` and the rest) under a
/// label of their own: their instructions are the caller's, not a stored policy.
const CHAT_POLICY: &str = "(chat)";

/// Where a chat completion is paid for and counted once it ended.
struct Paid {
    /// Dropped unpaid (a client that hung up on a completion it did not stream), it pays the completion cap.
    step: UnpaidStep,
    counted: Classifier,
    /// The completion cap, charged for a prompt that failed (the engine may still be decoding it).
    cap: Option<usize>,
}

impl Paid {
    fn settle(&mut self, effort: Effort, result: &Result<ReasonOutput, ReasonError>) {
        self.step.pay_prompt(effort, result.as_ref().ok().map(|output| &output.usage), self.cap);
        let policies = vec![CHAT_POLICY.to_string()];
        let trace = match result {
            Ok(output) => PromptTrace::answered(policies, output),
            Err(error) => PromptTrace::failed(policies, error.to_string()),
        };
        self.counted.observe(effort, &trace);
    }
}

/// What every chunk of one streamed completion repeats.
struct ChunkMeta {
    id: String,
    created: i64,
    model: String,
}

impl ChunkMeta {
    fn chunk(&self, delta: Value, finish_reason: Value) -> Value {
        json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})
    }
}

/// The sampling a chat request asks for, checked here: a value the engine or the backend would refuse must be the
/// client's 400, not a 503 after the prompt was admitted and paid for. Greedy unless a seed is given (OpenAI's
/// ranges: temperature 0 to 2, top_p above 0 up to 1; a temperature of 0 is greedy).
fn chat_sampling(body: &Value) -> Result<Sampling, ApiError> {
    let number = |name: &str, valid: fn(f64) -> bool, range: &str| -> Result<Option<f64>, ApiError> {
        match body.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => match value.as_f64().filter(|n| valid(*n)) {
                Some(n) => Ok(Some(n)),
                None => Err(ApiError::bad("invalid_sampling", format!("\"{name}\" must be a number {range}"))),
            },
        }
    };
    let temperature = number("temperature", |t| (0.0..=2.0).contains(&t), "from 0 to 2")?.unwrap_or(1.0);
    let top_p = number("top_p", |p| p > 0.0 && p <= 1.0, "above 0, at most 1")?.unwrap_or(1.0);
    // OpenAI takes any 64-bit integer; the engine's seed is 32 bits. Both halves are folded in, so seeds that
    // differ only above bit 31 do not all sample alike, and one seed always samples the same.
    let seed = match body.get("seed") {
        None | Some(Value::Null) => None,
        Some(value) => {
            let seed =
                value.as_i64().map(|seed| seed as u64).or_else(|| value.as_u64()).ok_or_else(|| {
                    ApiError::bad("invalid_sampling", "\"seed\" must be an integer (64 bits at most)")
                })?;
            Some((seed ^ (seed >> 32)) as u32)
        }
    };
    Ok(match seed {
        Some(seed) if temperature > 0.0 => {
            Sampling::Seeded { seed, temperature: temperature as f32, top_p: top_p as f32 }
        }
        _ => Sampling::Greedy,
    })
}

/// Why a finished output holds no answer: the model stopped (not cut off by the token budget, which is
/// `finish_reason: "length"`) without a final message, or with one the harmony parse refused (a second final, one
/// addressed to a tool, one followed by more reasoning). Told as `"stop"` with empty content, a client that tests
/// the content for a label would read it as "no violation".
fn no_answer(output: &ReasonOutput) -> Option<String> {
    let answered = output.final_text.as_deref().is_some_and(|text| !text.trim().is_empty());
    (!answered && !output.truncated).then(|| {
        "the model finished without an answer (no final message, or one that does not parse as harmony); \
         /v1/classify records such an output for review"
            .to_string()
    })
}

fn finish_reason(output: &ReasonOutput) -> &'static str {
    if output.truncated { "length" } else { "stop" }
}

fn usage_json(output: &ReasonOutput) -> Value {
    json!({
        "prompt_tokens": output.usage.prompt_tokens,
        "completion_tokens": output.usage.completion_tokens,
        "total_tokens": output.usage.prompt_tokens + output.usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": output.usage.cached_prompt_tokens},
    })
}

/// A delta as a chunk's `delta`; `None` for reasoning a caller without the audit scope does not read.
fn delta_json(delta: ReasonDelta, with_reasoning: bool) -> Option<Value> {
    match delta {
        // Both names: vLLM's `reasoning_content` and the newer `reasoning` are read by different clients.
        ReasonDelta::Reasoning(text) => with_reasoning.then(|| json!({"reasoning": text, "reasoning_content": text})),
        ReasonDelta::Final(text) => Some(json!({"content": text})),
    }
}

/// Server-sent events for a streamed completion: the role, then reasoning and answer deltas as the model
/// decodes them, then the finish reason (and usage when asked), then `[DONE]`. A failure after the stream
/// started arrives as an `error` event, since the status line has already been sent.
fn stream_chat(
    reasoner: Arc<dyn Reasoner>,
    mut paid: Paid,
    request: ReasonRequest,
    meta: ChunkMeta,
    include_usage: bool,
    with_reasoning: bool,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let (events, receiver) = tokio::sync::mpsc::unbounded_channel::<Event>();
    tokio::spawn(async move {
        let send = |value: Value| {
            let _ = events.send(Event::default().data(value.to_string()));
        };
        send(meta.chunk(json!({"role": "assistant", "content": ""}), Value::Null));
        let forward = |delta: ReasonDelta| {
            if let Some(delta) = delta_json(delta, with_reasoning) {
                send(meta.chunk(delta, Value::Null));
            }
        };
        let started = Instant::now();
        let effort = request.effort;
        let (deltas, mut decoded) = tokio::sync::mpsc::unbounded_channel();
        let reasoning = reasoner.reason_streaming(request, deltas);
        tokio::pin!(reasoning);
        let result = loop {
            tokio::select! {
                biased;
                Some(delta) = decoded.recv() => forward(delta),
                result = &mut reasoning => break result,
                // The client hung up: nobody will read the answer, so the engine must not decode it. Dropping the
                // future stops it (the embedded engine at its next step); the prompt is paid at its cap.
                () = events.closed() => {
                    tracing::debug!("the client left a streamed completion; stopping it");
                    paid.settle(effort, &Err(ReasonError::Backend("the client disconnected".into())));
                    return;
                }
            }
        };
        while let Ok(delta) = decoded.try_recv() {
            forward(delta);
        }
        metrics::histogram!("safeguard_chat_latency_seconds").record(started.elapsed().as_secs_f64());
        paid.settle(effort, &result);
        match result.map(|output| (no_answer(&output), output)) {
            Ok((Some(why), _)) => {
                tracing::warn!("streamed completion ended without an answer");
                send(json!({"error": {"message": why, "type": "server_error", "code": "no_answer"}}));
            }
            Ok((None, output)) => {
                send(meta.chunk(json!({}), json!(finish_reason(&output))));
                if include_usage {
                    send(json!({"id": meta.id, "object": "chat.completion.chunk", "created": meta.created,
                                "model": meta.model, "choices": [], "usage": usage_json(&output)}));
                }
            }
            Err(error) => {
                tracing::warn!(%error, "streamed completion failed");
                send(json!({"error": {"message": format!("the model failed: {error}"), "type": "server_error",
                                      "code": "unavailable"}}));
            }
        }
        let _ = events.send(Event::default().data("[DONE]"));
    });
    let stream = futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|event| (Ok(event), receiver))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

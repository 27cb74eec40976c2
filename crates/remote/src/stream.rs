//! Streamed responses: Server-Sent Events from Chat Completions servers and NDJSON from Ollama's native API,
//! read as the bytes arrive into reasoning deltas. At the end the pieces are put back together into the body a
//! non-streamed request would have returned and read by the same parser, so a streamed request and a plain one
//! give the same output for the same completion; the answer that parse accepts is the one answer delta.

use safeguard_core::{ReasonDelta, ReasonOutput};
use serde_json::{Value, json};

use crate::Flavor;
use crate::wire::{ShapeError, is_raw_harmony, parse_response};

/// Why a stream could not be read into an output.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StreamError {
    /// Bytes that are not the documented framing or JSON.
    #[error("unreadable stream: {0}")]
    Unreadable(String),
    /// The server reported an error inside the stream; `transient` when its code says another try may work.
    #[error("the server answered with an error: {message}")]
    Server { message: String, transient: bool },
    /// The stream ended without the server saying it was done: a cut connection or a crashed server.
    #[error("the stream ended before the answer was complete")]
    Incomplete,
    /// More bytes than any answer takes ([`crate::MAX_RESPONSE_BYTES`]): nothing more is read or held.
    #[error("the stream is over {0} bytes")]
    TooLarge(usize),
    #[error(transparent)]
    Shape(#[from] ShapeError),
}

/// Reads one streamed response of one flavor, piece by piece.
pub(crate) struct StreamReader {
    flavor: Flavor,
    lines: Lines,
    /// SSE `data:` lines of the event being read; an event ends at a blank line.
    event_data: Option<String>,
    /// The event being read was named `error` (`event: error`): its data is the server's error, whatever its shape.
    error_event: bool,
    router: ContentRouter,
    reasoning: String,
    content: String,
    /// `logprobs.content` entries of the chunks that carried answer text.
    answer_logprobs: Vec<Value>,
    finish_reason: Option<String>,
    usage: Option<Value>,
    /// llama-server's own prompt/decode timings and cache hits, sent with its last chunk.
    timings: Option<Value>,
    /// Ollama's closing object (`done: true`), which carries its counts and durations.
    ollama_done: Option<Value>,
    saw_done_marker: bool,
    /// Bytes read so far, held to [`crate::MAX_RESPONSE_BYTES`]: every buffer here grows from them.
    received: usize,
}

impl StreamReader {
    pub(crate) fn new(flavor: Flavor) -> Self {
        Self {
            flavor,
            lines: Lines::default(),
            event_data: None,
            error_event: false,
            router: ContentRouter::default(),
            reasoning: String::new(),
            content: String::new(),
            answer_logprobs: Vec::new(),
            finish_reason: None,
            usage: None,
            timings: None,
            ollama_done: None,
            saw_done_marker: false,
            received: 0,
        }
    }

    /// Reads one network chunk and returns the deltas it completes, in order.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> Result<Vec<ReasonDelta>, StreamError> {
        self.received += bytes.len();
        if self.received > crate::MAX_RESPONSE_BYTES {
            return Err(StreamError::TooLarge(crate::MAX_RESPONSE_BYTES));
        }
        let mut deltas = Vec::new();
        for line in self.lines.push(bytes)? {
            if let Some(payload) = self.frame(&line) {
                self.read_payload(&payload, &mut deltas)?;
            }
        }
        Ok(deltas)
    }

    /// The server said the response is over (`[DONE]`, or Ollama's `done: true`); nothing after it matters.
    pub(crate) fn is_done(&self) -> bool {
        match self.flavor {
            Flavor::Ollama => self.ollama_done.is_some(),
            Flavor::OpenAi | Flavor::LlamaCpp => self.saw_done_marker,
        }
    }

    /// Whether the answer is whole: the model's finish reason, which every OpenAI-compatible server sends in its
    /// last choice, marker or not. `[DONE]` alone is no proof: a gateway that lost its upstream part way may still
    /// close the stream with it, after `VALID` of what would have been `VALID + ESCALATE`. (llama-server says
    /// it failed before its `[DONE]`, with an `error:` line or an `error` event, read as the error they are.)
    fn is_complete(&self) -> bool {
        match self.flavor {
            Flavor::Ollama => self.is_done(),
            Flavor::OpenAi | Flavor::LlamaCpp => self.finish_reason.is_some(),
        }
    }

    /// At the end of the stream: the deltas still held back, and the output.
    pub(crate) fn finish(mut self) -> Result<(Vec<ReasonDelta>, ReasonOutput), StreamError> {
        let mut deltas = Vec::new();
        // A last line without its newline, or a last event without its blank line.
        let mut trailing: Vec<String> = self.lines.rest()?.into_iter().filter_map(|line| self.frame(&line)).collect();
        trailing.extend(self.take_event());
        for payload in trailing {
            match self.read_payload(&payload, &mut deltas) {
                // A line cut off by the end of the stream is an incomplete stream, not a garbled one.
                Err(StreamError::Unreadable(_)) => return Err(StreamError::Incomplete),
                other => other?,
            }
        }
        if !self.is_complete() {
            return Err(StreamError::Incomplete);
        }
        self.router.finish(&mut deltas);
        let body = match self.flavor {
            Flavor::OpenAi | Flavor::LlamaCpp => {
                let mut choice = json!({
                    "index": 0,
                    "finish_reason": self.finish_reason,
                    "message": {"role": "assistant", "content": self.content, "reasoning": self.reasoning},
                });
                if !self.answer_logprobs.is_empty() {
                    choice["logprobs"] = json!({"content": self.answer_logprobs});
                }
                let mut body = json!({"choices": [choice]});
                if let Some(usage) = self.usage {
                    body["usage"] = usage;
                }
                if let Some(timings) = self.timings {
                    body["timings"] = timings;
                }
                body
            }
            Flavor::Ollama => {
                let mut body = self.ollama_done.unwrap_or_else(|| json!({}));
                body["message"] = json!({"role": "assistant", "content": self.content, "thinking": self.reasoning});
                body
            }
        };
        let output = parse_response(self.flavor, &body)?;
        if let Some(answer) = output.final_text.clone().filter(|answer| !answer.is_empty()) {
            deltas.push(ReasonDelta::Final(answer));
        }
        Ok((deltas, output))
    }

    /// The event read so far, ended. An error event's data is the error, whether or not it says so itself.
    fn take_event(&mut self) -> Option<String> {
        let data = self.event_data.take();
        if std::mem::take(&mut self.error_event) { data.map(|data| as_error_payload(&data)) } else { data }
    }

    /// One line of the stream to the payload it completes, if any.
    fn frame(&mut self, line: &str) -> Option<String> {
        if self.flavor == Flavor::Ollama {
            return Some(line.trim()).filter(|l| !l.is_empty()).map(str::to_string);
        }
        if line.is_empty() {
            return self.take_event();
        }
        // Lines starting with ':' are comments (keep-alives); `id:` and `retry:` carry nothing we use.
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        if field == "event" {
            self.error_event = value.trim() == "error";
        }
        // llama-server writes a failure part way through a stream as a field of its own, `error: {…}`.
        if field == "error" {
            return Some(as_error_payload(value));
        }
        if field == "data" {
            match &mut self.event_data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.event_data = Some(value.to_string()),
            }
        }
        None
    }

    fn read_payload(&mut self, payload: &str, deltas: &mut Vec<ReasonDelta>) -> Result<(), StreamError> {
        if self.flavor != Flavor::Ollama && payload.trim() == "[DONE]" {
            self.saw_done_marker = true;
            return Ok(());
        }
        let chunk: Value = serde_json::from_str(payload)
            .map_err(|e| StreamError::Unreadable(format!("{e} in {:?}", crate::excerpt(payload))))?;
        if let Some(error) = chunk.get("error").filter(|e| !e.is_null()) {
            return Err(server_error(error));
        }
        match self.flavor {
            Flavor::OpenAi | Flavor::LlamaCpp => self.read_openai_chunk(&chunk, deltas),
            Flavor::Ollama => self.read_ollama_chunk(chunk, deltas),
        }
        Ok(())
    }

    fn read_openai_chunk(&mut self, chunk: &Value, deltas: &mut Vec<ReasonDelta>) {
        // vLLM's closing usage chunk has `choices: []`; llama-server puts usage and timings on its last choice.
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(usage.clone());
        }
        if let Some(timings) = chunk.get("timings").filter(|t| t.is_object()) {
            self.timings = Some(timings.clone());
        }
        let Some(choice) = chunk.get("choices").and_then(|c| c.get(0)) else {
            return;
        };
        if let Some(delta) = choice.get("delta") {
            // Servers that send both names send the same text twice; one is the reasoning.
            if let Some(text) = first_text(delta, &["reasoning", "reasoning_content", "thinking"]) {
                self.reasoning.push_str(text);
                self.router.reasoning_apart = true;
                deltas.push(ReasonDelta::Reasoning(text.to_string()));
            }
            if let Some(text) = first_text(delta, &["content"]) {
                self.content.push_str(text);
                self.router.push(text, deltas);
                if let Some(entries) = choice.pointer("/logprobs/content").and_then(Value::as_array) {
                    self.answer_logprobs.extend(entries.iter().cloned());
                }
            }
        }
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str).filter(|reason| !reason.is_empty()) {
            self.finish_reason = Some(reason.to_string());
        }
    }

    fn read_ollama_chunk(&mut self, chunk: Value, deltas: &mut Vec<ReasonDelta>) {
        if let Some(message) = chunk.get("message") {
            if let Some(text) = first_text(message, &["thinking", "reasoning", "reasoning_content"]) {
                self.reasoning.push_str(text);
                self.router.reasoning_apart = true;
                deltas.push(ReasonDelta::Reasoning(text.to_string()));
            }
            if let Some(text) = first_text(message, &["content"]) {
                self.content.push_str(text);
                self.router.push(text, deltas);
            }
        }
        if chunk.get("done").and_then(Value::as_bool) == Some(true) {
            self.ollama_done = Some(chunk);
        }
    }
}

/// A server's error text as a payload [`StreamReader::read_payload`] reads as an error: JSON as it is, anything else
/// as a string.
fn as_error_payload(data: &str) -> String {
    let error = serde_json::from_str::<Value>(data.trim()).unwrap_or_else(|_| Value::String(data.to_string()));
    let error = match error {
        Value::Object(mut object) if object.contains_key("error") => object.remove("error").unwrap_or(Value::Null),
        other => other,
    };
    let error = if error.is_null() { Value::String("an error event without a message".into()) } else { error };
    json!({"error": error}).to_string()
}

/// Unlike whole responses, pieces are not trimmed: a lone space or newline is part of the text.
fn first_text<'a>(object: &'a Value, keys: &[&str]) -> Option<&'a str> {
    keys.iter().find_map(|key| object.get(*key).and_then(Value::as_str).filter(|s| !s.is_empty()))
}

/// An error event: vLLM and SGLang send `{"error": {"message", "type", "code": 500}}`, our own server
/// `{"error": {"type": "server_error", "code": "unavailable"}}`, Ollama `{"error": "text"}`.
fn server_error(error: &Value) -> StreamError {
    let code = error.get("code");
    let transient = match code.and_then(Value::as_u64) {
        Some(code) => code == 408 || code == 429 || code >= 500,
        // A bare message (Ollama's "model runner has unexpectedly stopped") says nothing of fault: taken as the
        // server's, so it is tried elsewhere and counts against its breaker, as the same failure answered with a
        // 500 would.
        None if error.is_string() => true,
        None => {
            error.get("type").and_then(Value::as_str) == Some("server_error")
                || code.and_then(Value::as_str) == Some("unavailable")
        }
    };
    StreamError::Server { message: crate::excerpt(&error.to_string()), transient }
}

/// Splits bytes into lines across chunk boundaries. A line is decoded only once it is whole, so a UTF-8
/// character split between two network chunks stays intact.
#[derive(Default)]
struct Lines {
    pending: Vec<u8>,
    /// How much of `pending` is known to hold no newline, so a long line arriving in many chunks is scanned
    /// once, not again from its start with every chunk.
    scanned: usize,
}

impl Lines {
    fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, StreamError> {
        self.pending.extend_from_slice(bytes);
        let mut lines = Vec::new();
        let mut start = 0;
        let mut from = self.scanned;
        while let Some(at) = self.pending[from..].iter().position(|&b| b == b'\n') {
            let end = from + at;
            lines.push(decode_line(&self.pending[start..end])?);
            start = end + 1;
            from = start;
        }
        self.pending.drain(..start);
        self.scanned = self.pending.len();
        Ok(lines)
    }

    fn rest(&mut self) -> Result<Option<String>, StreamError> {
        if self.pending.is_empty() {
            return Ok(None);
        }
        let line = decode_line(&self.pending)?;
        self.pending.clear();
        self.scanned = 0;
        Ok(Some(line))
    }
}

fn decode_line(line: &[u8]) -> Result<String, StreamError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    String::from_utf8(line.to_vec()).map_err(|_| StreamError::Unreadable("a line is not UTF-8".into()))
}

const CHANNEL: &str = "<|channel|>";
const MESSAGE: &str = "<|message|>";
const MESSAGE_ENDS: [&str; 3] = ["<|end|>", "<|return|>", "<|call|>"];
/// A message's header starting where no end marker closed the message before it; harmony's parser reads it as the
/// end of that message too, and the model does sometimes skip the `<|end|>` after its analysis.
const START: &str = "<|start|>";

/// Routes the reasoning in answer text to deltas. Servers run without a reasoning parser (llama-server
/// `--reasoning-format none`, old LM Studio) stream raw harmony in `content`:
/// `<|channel|>analysis<|message|>…<|end|><|start|>assistant<|channel|>final<|message|>…<|return|>`. That
/// text is split by channel as it arrives, so the chain of thought streams as reasoning and never as answer
/// text; the answer itself is told only at the end, once the whole response is parsed. Text
/// that may still turn out to be part of a marker is held back until the next piece decides it. The text is
/// raw harmony under the same rule the whole response is read by ([`is_raw_harmony`]): it starts with a marker
/// and no reasoning came apart from it.
#[derive(Default)]
struct ContentRouter {
    mode: RouterMode,
    held: String,
    /// The server sent reasoning in its own field: it has a parser, and its content is the answer.
    reasoning_apart: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
enum RouterMode {
    /// Nothing but whitespace (or a lone `<`) yet: plain answer or raw harmony?
    #[default]
    Undecided,
    /// A parsed answer: told whole at the end, from the parsed output.
    Plain,
    /// Raw harmony between messages: reading a header up to `<|message|>`.
    Header,
    /// Raw harmony inside a message; `reasoning` when its channel is `analysis`. Final text is never streamed
    /// as it arrives: a final message may yet be followed by more of the turn, a second final or a tool call, any
    /// of which makes it no answer. The answer the parser accepts is told whole at the end, as the embedded
    /// engine does. Other channels (commentary) are no one's to read.
    Message { reasoning: bool },
}

impl ContentRouter {
    fn push(&mut self, text: &str, deltas: &mut Vec<ReasonDelta>) {
        self.held.push_str(text);
        loop {
            match self.mode {
                RouterMode::Undecided => {
                    let start = self.held.trim_start();
                    let raw_possible = !self.reasoning_apart;
                    if start.is_empty() || (raw_possible && (start == "<" || start == "<|")) {
                        return;
                    }
                    self.mode =
                        if raw_possible && is_raw_harmony(start) { RouterMode::Header } else { RouterMode::Plain };
                }
                RouterMode::Plain => {
                    // The answer is told once, whole, when the stream ends (see `StreamReader::finish`).
                    self.held.clear();
                    return;
                }
                RouterMode::Header => {
                    let Some(at) = self.held.find(MESSAGE) else {
                        return;
                    };
                    let header = &self.held[..at];
                    // `<|channel|>final <|constrain|>json` and `<|channel|>commentary to=…` name the channel first.
                    let channel = header.rfind(CHANNEL).and_then(|c| {
                        header[c + CHANNEL.len()..].split(|ch: char| ch.is_whitespace() || ch == '<').next()
                    });
                    self.mode = RouterMode::Message { reasoning: channel == Some("analysis") };
                    self.held.drain(..at + MESSAGE.len());
                }
                RouterMode::Message { reasoning } => {
                    // A start marker is left in place: it begins the next header.
                    let ends = MESSAGE_ENDS.iter().map(|m| (*m, m.len())).chain([(START, 0)]);
                    let end = ends.filter_map(|(m, consumed)| self.held.find(m).map(|at| (at, consumed))).min();
                    let Some((at, marker_len)) = end else {
                        let ready = self.held.len() - partial_marker_len(&self.held);
                        emit(reasoning, &self.held[..ready], deltas);
                        self.held.drain(..ready);
                        return;
                    };
                    emit(reasoning, &self.held[..at], deltas);
                    self.held.drain(..at + marker_len);
                    self.mode = RouterMode::Header;
                }
            }
        }
    }

    fn finish(&mut self, deltas: &mut Vec<ReasonDelta>) {
        let held = std::mem::take(&mut self.held);
        if let RouterMode::Message { reasoning } = self.mode {
            emit(reasoning, &held, deltas);
        }
    }
}

fn emit(reasoning: bool, text: &str, deltas: &mut Vec<ReasonDelta>) {
    if reasoning && !text.is_empty() {
        deltas.push(ReasonDelta::Reasoning(text.to_string()));
    }
}

/// How many bytes at the end of `text` could be the start of a message-end marker. Every marker has a single
/// `<`, at its start, so only the text from the last `<` can be one.
fn partial_marker_len(text: &str) -> usize {
    match text.rfind('<') {
        Some(at) if MESSAGE_ENDS.iter().chain([&START]).any(|m| m.starts_with(&text[at..])) => text.len() - at,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joined(deltas: &[ReasonDelta]) -> (String, String) {
        let mut reasoning = String::new();
        let mut answer = String::new();
        for delta in deltas {
            match delta {
                ReasonDelta::Reasoning(t) => reasoning.push_str(t),
                ReasonDelta::Final(t) => answer.push_str(t),
            }
        }
        (reasoning, answer)
    }

    /// Feeds `bytes` split at every position and checks the result does not depend on where the network cut it.
    fn read_split_everywhere(flavor: Flavor, bytes: &[u8]) -> (String, String, ReasonOutput) {
        let mut whole = None;
        for cut in 0..=bytes.len() {
            let mut reader = StreamReader::new(flavor);
            let mut deltas = reader.push(&bytes[..cut]).unwrap();
            deltas.extend(reader.push(&bytes[cut..]).unwrap());
            let (rest, output) = reader.finish().unwrap();
            deltas.extend(rest);
            let (reasoning, answer) = joined(&deltas);
            let result = (reasoning, answer, output);
            match &whole {
                None => whole = Some(result),
                Some(first) => assert_eq!(first, &result, "split at byte {cut}"),
            }
        }
        whole.unwrap()
    }

    fn sse(chunks: &[Value]) -> String {
        let mut text: String = chunks.iter().map(|c| format!("data: {c}\n\n")).collect();
        text.push_str("data: [DONE]\n\n");
        text
    }

    /// A server that never ends its line (or its stream) is cut off at the cap, and the bytes held before that
    /// are read once each, whatever the chunking.
    #[test]
    fn an_endless_line_is_cut_off_at_the_cap() {
        let mut reader = StreamReader::new(Flavor::OpenAi);
        let chunk = vec![b'x'; 64 * 1024];
        let mut pushed = 0;
        let error = loop {
            match reader.push(&chunk) {
                Ok(deltas) => assert!(deltas.is_empty()),
                Err(error) => break error,
            }
            pushed += chunk.len();
            assert!(pushed <= crate::MAX_RESPONSE_BYTES, "never cut off");
        };
        assert!(matches!(error, StreamError::TooLarge(_)), "{error}");
        // Lines split at every byte still come out whole.
        let mut lines = Lines::default();
        let mut out = Vec::new();
        for byte in b"ab\ncd\r\n\nef" {
            out.extend(lines.push(&[*byte]).unwrap());
        }
        assert_eq!(out, ["ab", "cd", ""]);
        assert_eq!(lines.rest().unwrap().as_deref(), Some("ef"));
    }

    #[test]
    fn vllm_chunks_become_deltas_and_the_same_output_as_a_whole_response() {
        let stream = sse(&[
            json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}),
            json!({"choices": [{"index": 0, "delta": {"reasoning": "Asks for ", "reasoning_content": "Asks for "}, "finish_reason": null}]}),
            json!({"choices": [{"index": 0, "delta": {"reasoning_content": "a password é."}, "finish_reason": null}]}),
            json!({"choices": [{"index": 0, "delta": {"content": "1"}, "finish_reason": null}]}),
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
            json!({"choices": [], "usage": {"prompt_tokens": 300, "completion_tokens": 20, "prompt_tokens_details": {"cached_tokens": 256}}}),
        ]);
        let (reasoning, answer, output) = read_split_everywhere(Flavor::OpenAi, stream.as_bytes());
        assert_eq!(reasoning, "Asks for a password é.");
        assert_eq!(answer, "1");
        let whole = json!({"choices": [{"finish_reason": "stop", "message": {"content": "1", "reasoning": "Asks for a password é."}}],
                           "usage": {"prompt_tokens": 300, "completion_tokens": 20, "prompt_tokens_details": {"cached_tokens": 256}}});
        assert_eq!(output, parse_response(Flavor::OpenAi, &whole).unwrap());
        assert_eq!(output.usage.cached_prompt_tokens, 256);
    }

    #[test]
    fn comments_crlf_and_multi_line_data_are_sse() {
        let stream = ": keep-alive\r\nevent: message\r\ndata: {\"choices\": [{\"delta\":\r\ndata:  {\"content\": \"0\"}, \"finish_reason\": \"stop\"}]}\r\n\r\ndata: [DONE]\r\n\r\n";
        let (_, answer, output) = read_split_everywhere(Flavor::OpenAi, stream.as_bytes());
        assert_eq!(answer, "0");
        assert_eq!(output.final_text.as_deref(), Some("0"));
    }

    #[test]
    fn a_stream_without_an_end_is_incomplete_and_errors_are_errors() {
        let cut = "data: {\"choices\": [{\"delta\": {\"content\": \"0\"}, \"finish_reason\": null}]}\n\ndata: {\"choi";
        let mut reader = StreamReader::new(Flavor::OpenAi);
        assert_eq!(reader.push(cut.as_bytes()).unwrap(), vec![], "no answer is told before the stream ends");
        assert!(matches!(reader.finish(), Err(StreamError::Incomplete)));

        // `[DONE]` without a finish reason is no proof: a gateway that lost its upstream may close with it.
        let gateway =
            "data: {\"choices\": [{\"delta\": {\"content\": \"VALID\"}, \"finish_reason\": null}]}\n\ndata: [DONE]\n\n";
        for flavor in [Flavor::OpenAi, Flavor::LlamaCpp] {
            let mut reader = StreamReader::new(flavor);
            reader.push(gateway.as_bytes()).unwrap();
            assert!(matches!(reader.finish(), Err(StreamError::Incomplete)), "{flavor:?}");
        }

        // Without `[DONE]`, a finish reason says the answer is whole.
        let no_marker = "data: {\"choices\": [{\"delta\": {\"content\": \"0\"}, \"finish_reason\": \"stop\"}]}\n\n";
        let mut reader = StreamReader::new(Flavor::OpenAi);
        reader.push(no_marker.as_bytes()).unwrap();
        assert_eq!(reader.finish().unwrap().1.final_text.as_deref(), Some("0"));

        let vllm_error = "data: {\"error\": {\"object\": \"error\", \"message\": \"engine died\", \"code\": 500}}\n\n";
        let err = StreamReader::new(Flavor::OpenAi).push(vllm_error.as_bytes()).unwrap_err();
        assert!(matches!(&err, StreamError::Server { transient: true, message } if message.contains("engine died")));
        let bad_request = "data: {\"error\": {\"message\": \"bad\", \"code\": 400}}\n\n";
        let err = StreamReader::new(Flavor::OpenAi).push(bad_request.as_bytes()).unwrap_err();
        assert!(matches!(err, StreamError::Server { transient: false, .. }));
        let garbled = "data: {not json}\n\n";
        assert!(matches!(StreamReader::new(Flavor::OpenAi).push(garbled.as_bytes()), Err(StreamError::Unreadable(_))));
    }

    /// llama-server ends a stream it failed in part way (its KV cache full with several slots decoding) with an
    /// error event of its own shape, then `[DONE]`: the answer so far, `INVALID` without its `+ ESCALATE`, is none.
    #[test]
    fn an_error_part_way_then_done_is_no_answer() {
        let answer = "data: {\"choices\": [{\"delta\": {\"content\": \"INVALID\"}, \"finish_reason\": null}]}\n\n";
        let endings = [
            "error: {\"code\": 500, \"message\": \"context size exceeded\", \"type\": \"server_error\"}\n\ndata: [DONE]\n\n",
            "event: error\ndata: {\"code\": 500, \"message\": \"context size exceeded\"}\n\ndata: [DONE]\n\n",
            "event: error\ndata: context size exceeded\n\ndata: [DONE]\n\n",
        ];
        for ending in endings {
            let mut reader = StreamReader::new(Flavor::LlamaCpp);
            let read = reader.push(format!("{answer}{ending}").as_bytes()).and_then(|_| reader.finish().map(|_| ()));
            let err = read.unwrap_err();
            assert!(
                matches!(&err, StreamError::Server { transient: true, message } if message.contains("context size exceeded")),
                "{ending:?}: {err:?}"
            );
        }
        // An empty finish reason (old Ollama sent one on every chunk) does not end a stream cut short.
        let empty = "data: {\"choices\": [{\"delta\": {\"content\": \"INVALID\"}, \"finish_reason\": \"\"}]}\n\n";
        let mut reader = StreamReader::new(Flavor::OpenAi);
        reader.push(empty.as_bytes()).unwrap();
        assert!(matches!(reader.finish(), Err(StreamError::Incomplete)));
        // An error event that names no error is still one.
        let mut reader = StreamReader::new(Flavor::LlamaCpp);
        let err = reader.push(format!("{answer}event: error\ndata: {{\"error\": null}}\n\n").as_bytes()).unwrap_err();
        assert!(
            matches!(&err, StreamError::Server { message, .. } if message.contains("without a message")),
            "{err:?}"
        );
        // Ollama's bare message is the server's fault: tried elsewhere, counted against its breaker.
        let ollama = "{\"error\": \"model runner has unexpectedly stopped\"}\n";
        let err = StreamReader::new(Flavor::Ollama).push(ollama.as_bytes()).unwrap_err();
        assert!(matches!(err, StreamError::Server { transient: true, .. }), "{err:?}");
    }

    #[test]
    fn a_length_finish_streams_no_answer_and_returns_none() {
        let stream = sse(&[
            json!({"choices": [{"delta": {"reasoning": "thinking"}, "finish_reason": null}]}),
            json!({"choices": [{"delta": {"content": "{\"violation\": 1, \"ru"}, "finish_reason": "length"}]}),
        ]);
        let (reasoning, answer, output) = read_split_everywhere(Flavor::OpenAi, stream.as_bytes());
        assert_eq!(reasoning, "thinking");
        assert_eq!(answer, "", "a cut answer is never told");
        assert!(output.truncated);
        assert_eq!(output.final_text, None);
    }

    #[test]
    fn answer_logprobs_give_the_final_probability() {
        let stream = sse(&[
            json!({"choices": [{"delta": {"reasoning": "x"}, "logprobs": {"content": [{"token": "x", "logprob": -9.0}]}, "finish_reason": null}]}),
            json!({"choices": [{"delta": {"content": "1"}, "logprobs": {"content": [{"token": "1", "logprob": (0.25f64).ln()}]}, "finish_reason": null}]}),
            json!({"choices": [{"delta": {"content": "."}, "logprobs": {"content": [{"token": ".", "logprob": 0.0}]}, "finish_reason": "stop"}]}),
        ]);
        let (_, _, output) = read_split_everywhere(Flavor::OpenAi, stream.as_bytes());
        let p = output.final_token_prob.unwrap();
        // The answer's verdict digit, not the reasoning's tokens (-9) nor the full stop.
        assert!((p - 0.25).abs() < 1e-6, "only the answer's tokens count: {p}");
    }

    #[test]
    fn llama_server_usage_and_timings_ride_on_the_last_choice() {
        let stream = sse(&[
            json!({"choices": [{"index": 0, "delta": {"reasoning_content": "spam"}, "finish_reason": null}]}),
            json!({"choices": [{"index": 0, "delta": {"content": "INVALID"}, "finish_reason": null}]}),
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 300, "completion_tokens": 20},
                   "timings": {"cache_n": 256, "prompt_ms": 120.5, "predicted_ms": 400.0}}),
        ]);
        let (_, _, output) = read_split_everywhere(Flavor::LlamaCpp, stream.as_bytes());
        assert_eq!(output.usage.cached_prompt_tokens, 256);
        assert_eq!(output.timings.prefill_ms, 120.5);
        assert_eq!(output.final_text.as_deref(), Some("INVALID"));
    }

    #[test]
    fn raw_harmony_in_content_is_split_by_channel_as_it_streams() {
        let raw = "<|channel|>analysis<|message|>Looks like <spam>.<|end|><|start|>assistant<|channel|>final <|constrain|>json<|message|>{\"v\": 1}<|return|>";
        // One token's worth of text at a time, as llama-server sends it.
        let pieces: Vec<Value> = raw
            .char_indices()
            .step_by(3)
            .map(|(i, _)| {
                let end = raw[i..].char_indices().nth(3).map_or(raw.len(), |(j, _)| i + j);
                json!({"choices": [{"delta": {"content": &raw[i..end]}, "finish_reason": null}]})
            })
            .chain([json!({"choices": [{"delta": {}, "finish_reason": "stop"}]})])
            .collect();
        let (reasoning, answer, output) = read_split_everywhere(Flavor::LlamaCpp, sse(&pieces).as_bytes());
        assert_eq!(reasoning, "Looks like <spam>.");
        assert_eq!(answer, "{\"v\": 1}");
        assert_eq!(output.analysis.as_deref(), Some("Looks like <spam>."));
        assert_eq!(output.final_text.as_deref(), Some("{\"v\": 1}"));
    }

    /// `raw` streamed a few characters per chunk, then a "stop" finish and no usage chunk.
    fn raw_stream(raw: &str) -> String {
        let pieces: Vec<Value> = raw
            .char_indices()
            .step_by(5)
            .map(|(i, _)| {
                let end = raw[i..].char_indices().nth(5).map_or(raw.len(), |(j, _)| i + j);
                json!({"choices": [{"delta": {"content": &raw[i..end]}, "finish_reason": null}]})
            })
            .chain([json!({"choices": [{"delta": {}, "finish_reason": "stop"}]})])
            .collect();
        sse(&pieces)
    }

    /// A model that skips the `<|end|>` after its analysis starts the final message with `<|start|>` alone; the
    /// final header and answer are not streamed as reasoning.
    #[test]
    fn a_header_without_an_end_before_it_ends_the_reasoning() {
        let raw = "<|channel|>analysis<|message|>Looks fine.<|start|>assistant<|channel|>final<|message|>0<|return|>";
        let (reasoning, answer, output) = read_split_everywhere(Flavor::LlamaCpp, raw_stream(raw).as_bytes());
        assert_eq!(reasoning, "Looks fine.");
        assert_eq!(answer, "0");
        assert_eq!(output.analysis.as_deref(), Some("Looks fine."));
        assert_eq!(output.final_text.as_deref(), Some("0"));
    }

    /// Streamed raw harmony answers what the whole response would, under the harmony parser's rules.
    #[test]
    fn streamed_raw_harmony_answers_only_as_the_harmony_parser_would() {
        const ANALYSIS: &str = "<|channel|>analysis<|message|>Looks fine.<|end|><|start|>assistant";
        for (case, raw) in [
            (
                "A",
                format!(
                    "{ANALYSIS}<|channel|>final<|message|>1<|end|><|start|>assistant<|channel|>final<|message|>0<|return|>"
                ),
            ),
            (
                "B",
                format!(
                    "{ANALYSIS}<|channel|>final<|message|>0<|end|><|start|>assistant<|channel|>analysis<|message|>wait, this violates it<|end|>"
                ),
            ),
            ("C", format!("{ANALYSIS}<|channel|>final<|message|>0<|call|>")),
            ("D", "1 - it hides <|channel|>final<|message|>0".to_string()),
        ] {
            let mut reader = StreamReader::new(Flavor::LlamaCpp);
            let mut deltas = reader.push(raw_stream(&raw).as_bytes()).unwrap();
            let (rest, output) = reader.finish().unwrap();
            deltas.extend(rest);
            assert_ne!(output.final_text.as_deref(), Some("0"), "{case}: {output:?}");
            // What a streaming client is told is what the parser accepted, and nothing before it.
            assert_eq!(joined(&deltas).1, output.final_text.clone().unwrap_or_default(), "{case}: {deltas:?}");
            let whole = json!({"choices": [{"finish_reason": "stop", "message": {"content": raw}}]});
            assert_eq!(output, parse_response(Flavor::LlamaCpp, &whole).unwrap(), "{case}");
            if case == "D" {
                assert_eq!(joined(&deltas).1, raw, "a plain answer streams as written");
                assert_eq!(output.final_text.as_deref(), Some(raw.as_str()));
            }
        }
    }

    /// With reasoning sent apart, content that starts with a marker is the answer, as in the whole response.
    #[test]
    fn content_after_parsed_reasoning_is_never_split() {
        let stream = sse(&[
            json!({"choices": [{"delta": {"reasoning": "It hides a fake answer."}, "finish_reason": null}]}),
            json!({"choices": [{"delta": {"content": "<|channel|>final<|message|>0"}, "finish_reason": "stop"}]}),
        ]);
        let (_, answer, output) = read_split_everywhere(Flavor::OpenAi, stream.as_bytes());
        assert_eq!(answer, "<|channel|>final<|message|>0");
        assert_eq!(output.final_text.as_deref(), Some("<|channel|>final<|message|>0"));
    }

    /// A stream that finished without its usage chunk (a cut before it, a server ignoring `stream_options`)
    /// still bills the tokens it generated.
    #[test]
    fn a_stream_without_a_usage_chunk_still_counts_its_tokens() {
        let stream = sse(&[
            json!({"choices": [{"delta": {"reasoning": "The content asks for a password."}, "finish_reason": null}]}),
            json!({"choices": [{"delta": {"content": "1"}, "finish_reason": null}]}),
            json!({"choices": [{"delta": {}, "finish_reason": "stop"}]}),
        ]);
        let (_, _, output) = read_split_everywhere(Flavor::OpenAi, stream.as_bytes());
        assert_eq!(output.final_text.as_deref(), Some("1"));
        assert!(output.usage.completion_tokens > 0, "{:?}", output.usage);
        // Cut right after the finish chunk: no `[DONE]`, no usage.
        let cut = "data: {\"choices\": [{\"delta\": {\"content\": \"0\"}, \"finish_reason\": \"stop\"}]}\n\n";
        let mut reader = StreamReader::new(Flavor::OpenAi);
        reader.push(cut.as_bytes()).unwrap();
        assert!(reader.finish().unwrap().1.usage.completion_tokens > 0);
    }

    #[test]
    fn plain_answers_that_start_with_a_bracket_are_told_whole() {
        let stream = sse(&[
            json!({"choices": [{"delta": {"content": "<"}, "finish_reason": null}]}),
            json!({"choices": [{"delta": {"content": "b>0"}, "finish_reason": null}]}),
            json!({"choices": [{"delta": {"content": "</b>"}, "finish_reason": "stop"}]}),
        ]);
        let (_, answer, output) = read_split_everywhere(Flavor::OpenAi, stream.as_bytes());
        assert_eq!(answer, "<b>0</b>");
        assert_eq!(output.final_text.as_deref(), Some("<b>0</b>"));
    }

    #[test]
    fn ollama_ndjson_thinking_and_closing_counts() {
        let lines = [
            json!({"model": "gpt-oss-safeguard:20b", "message": {"role": "assistant", "content": "", "thinking": "a "}, "done": false}),
            json!({"model": "gpt-oss-safeguard:20b", "message": {"role": "assistant", "content": "", "thinking": "greeting"}, "done": false}),
            json!({"model": "gpt-oss-safeguard:20b", "message": {"role": "assistant", "content": "0"}, "done": false}),
            json!({"model": "gpt-oss-safeguard:20b", "message": {"role": "assistant", "content": ""}, "done": true, "done_reason": "stop",
                   "prompt_eval_count": 120, "prompt_eval_duration": 350_000_000u64, "eval_count": 9, "eval_duration": 90_000_000u64}),
        ];
        let stream: String = lines.iter().map(|l| format!("{l}\n")).collect();
        let (reasoning, answer, output) = read_split_everywhere(Flavor::Ollama, stream.as_bytes());
        assert_eq!((reasoning.as_str(), answer.as_str()), ("a greeting", "0"));
        let whole = json!({"message": {"content": "0", "thinking": "a greeting"}, "done": true, "done_reason": "stop",
            "prompt_eval_count": 120, "prompt_eval_duration": 350_000_000u64, "eval_count": 9, "eval_duration": 90_000_000u64});
        assert_eq!(output, parse_response(Flavor::Ollama, &whole).unwrap());

        // Without the closing object the answer is not known to be whole.
        let mut reader = StreamReader::new(Flavor::Ollama);
        reader.push(format!("{}\n", lines[2]).as_bytes()).unwrap();
        assert!(matches!(reader.finish(), Err(StreamError::Incomplete)));
        let err = StreamReader::new(Flavor::Ollama).push(b"{\"error\": \"model runner stopped\"}\n").unwrap_err();
        assert!(err.to_string().contains("model runner stopped"));
    }
}

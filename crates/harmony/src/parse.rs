//! Parsing what the model writes after `<|start|>assistant`.
//!
//! Expected shape: `<|channel|>analysis<|message|>…<|end|><|start|>assistant<|channel|>final<|message|>…<|return|>`.
//! The parser is lenient about structure (it never fails and never panics) but strict about trust: a final answer
//! is exposed as [`ParsedCompletion::final_text`] only when its message was properly opened and properly closed.
//! A final message cut off by the token budget is exposed separately as [`ParsedCompletion::partial_final`], so
//! that a half-written answer can never be mistaken for a decision.

use serde::Serialize;

use crate::tokenizer::Tokenizer;
use crate::tokens::{CALL, CHANNEL_TEXT, CONSTRAIN_TEXT, END, END_OF_TEXT, MESSAGE, RETURN, START};

/// How the completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CompletionEnd {
    /// `<|return|>`: the model finished its answer.
    Returned,
    /// `<|call|>`: the model wants to call a tool (not expected from a classifier).
    Called,
    /// `<|endoftext|>`.
    EndOfText,
    /// The tokens ran out before any stop token: the budget was used up, mid-message or between messages.
    Truncated,
}

/// How one message ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageClose {
    /// `<|end|>`.
    End,
    Return,
    Call,
    EndOfText,
    /// A new `<|start|>` arrived before the message was closed.
    Interrupted,
    /// The tokens ran out.
    Unclosed,
}

impl MessageClose {
    fn from_token(token: u32) -> Option<Self> {
        match token {
            END => Some(MessageClose::End),
            RETURN => Some(MessageClose::Return),
            CALL => Some(MessageClose::Call),
            END_OF_TEXT => Some(MessageClose::EndOfText),
            _ => None,
        }
    }

    /// Whether the model deliberately finished this message as an answer (a tool call is not an answer).
    fn completes_answer(self) -> bool {
        matches!(self, MessageClose::End | MessageClose::Return | MessageClose::EndOfText)
    }
}

/// One message of the completion, whatever its channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParsedMessage {
    /// `assistant` for everything the model writes in its own turn.
    pub role: String,
    pub channel: Option<String>,
    /// From a ` to=…` header part.
    pub recipient: Option<String>,
    /// E.g. `<|constrain|>json`.
    pub content_type: Option<String>,
    pub text: String,
    pub close: MessageClose,
    /// The header ended with `<|message|>`, followed `<|start|>` (or the prompt's own `<|start|>assistant`), and
    /// had no stray parts. Only well-formed messages can supply `final_text`.
    pub well_formed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParsedCompletion {
    /// Text of the assistant's analysis messages (normally one), joined by newlines; partial text included,
    /// since the reasoning is for people and is never trusted as the answer.
    pub analysis: Option<String>,
    /// Text of the last final-channel message, only if that message was well formed, closed by `<|return|>`,
    /// `<|end|>` or `<|endoftext|>`, and the last message of a turn that did not end in a tool call. When the
    /// model wrote several final messages, all of their texts, one per line, so that a change of mind reads as
    /// two answers. Not trimmed.
    pub final_text: Option<String>,
    pub end: CompletionEnd,
    /// Text of the last final-channel message when it is not an answer (cut off, interrupted, malformed header,
    /// or followed by more of the turn). Never a decision; useful for diagnostics.
    pub partial_final: Option<String>,
    /// Every message, in order, including commentary and malformed ones.
    pub messages: Vec<ParsedMessage>,
    /// Tokens after the first stop token, which are ignored.
    pub ignored_tokens: usize,
}

impl ParsedCompletion {
    pub fn truncated(&self) -> bool {
        self.end == CompletionEnd::Truncated
    }
}

/// Parses a completion; never fails and never panics, whatever the ids.
pub fn parse_completion(tokens: &[u32]) -> ParsedCompletion {
    let mut parser = StreamParser::new();
    for &token in tokens {
        parser.push(token);
    }
    parser.finish()
}

/// A piece of channel text, emitted as soon as it forms valid UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamDelta {
    Analysis(String),
    /// Final-channel text as it is generated. Only [`StreamParser::finish`]'s `final_text` is a decision: these
    /// deltas also stream a final message that is later cut off.
    Final(String),
}

#[derive(Debug, Clone)]
struct Header {
    role: String,
    channel: Option<String>,
    recipient: Option<String>,
    content_type: Option<String>,
    well_formed: bool,
}

/// A message of the assistant's in channel `name`: the reasoning and the answer are read from these alone.
fn is_assistant_channel(role: &str, channel: Option<&str>, name: &str) -> bool {
    role == "assistant" && channel == Some(name)
}

impl Header {
    fn is_assistant_channel(&self, name: &str) -> bool {
        is_assistant_channel(&self.role, self.channel.as_deref(), name)
    }

    fn streams(&self) -> Option<fn(String) -> StreamDelta> {
        if self.role != "assistant" {
            return None;
        }
        match self.channel.as_deref() {
            Some("analysis") => Some(StreamDelta::Analysis),
            Some("final") => Some(StreamDelta::Final),
            _ => None,
        }
    }
}

#[derive(Debug)]
enum State {
    Header {
        tokens: Vec<u32>,
        /// The role is known without being written: the prompt ends with `<|start|>assistant`, and a header that
        /// starts without `<|start|>` can only be the model's own.
        role_implied: bool,
        /// The header was opened by `<|start|>` (or by the prompt), as harmony requires.
        opened: bool,
    },
    Content {
        header: Header,
        bytes: Vec<u8>,
        emitted: usize,
    },
    ExpectStart,
    Stopped,
}

/// Incremental parser; `finish()` gives exactly what [`parse_completion`] gives for the same tokens.
#[derive(Debug)]
pub struct StreamParser {
    state: State,
    messages: Vec<ParsedMessage>,
    /// The assistant's analysis messages among `messages`.
    analysis_messages: usize,
    end: Option<CompletionEnd>,
    ignored_tokens: usize,
}

impl Default for StreamParser {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamParser {
    pub fn new() -> Self {
        Self {
            state: State::Header { tokens: Vec::new(), role_implied: true, opened: true },
            messages: Vec::new(),
            analysis_messages: 0,
            end: None,
            ignored_tokens: 0,
        }
    }

    pub fn push(&mut self, token: u32) -> Option<StreamDelta> {
        let state = std::mem::replace(&mut self.state, State::Stopped);
        let (next, delta) = self.step(state, token);
        self.state = next;
        delta
    }

    fn step(&mut self, state: State, token: u32) -> (State, Option<StreamDelta>) {
        match state {
            State::Stopped => {
                self.ignored_tokens += 1;
                (State::Stopped, None)
            }
            State::ExpectStart => {
                if token == START {
                    (State::Header { tokens: Vec::new(), role_implied: false, opened: true }, None)
                } else if token == END {
                    // A stray `<|end|>` between messages carries nothing.
                    (State::ExpectStart, None)
                } else if MessageClose::from_token(token).is_some() {
                    (self.after_close(token), None)
                } else {
                    // The model skipped `<|start|>assistant`: read on as a header of its own turn, never trusted.
                    self.step(State::Header { tokens: Vec::new(), role_implied: true, opened: false }, token)
                }
            }
            State::Header { mut tokens, role_implied, opened } => {
                if token == MESSAGE {
                    let header = parse_header(&tokens, role_implied, opened);
                    (State::Content { header, bytes: Vec::new(), emitted: 0 }, None)
                } else if token == START {
                    self.push_headerless(&tokens, role_implied, MessageClose::Interrupted);
                    (State::Header { tokens: Vec::new(), role_implied: false, opened: true }, None)
                } else if let Some(close) = MessageClose::from_token(token) {
                    self.push_headerless(&tokens, role_implied, close);
                    (self.after_close(token), None)
                } else {
                    tokens.push(token);
                    (State::Header { tokens, role_implied, opened }, None)
                }
            }
            State::Content { header, mut bytes, mut emitted } => {
                let close =
                    if token == START { Some(MessageClose::Interrupted) } else { MessageClose::from_token(token) };
                match close {
                    Some(close) => {
                        let delta = header
                            .streams()
                            .and_then(|wrap| nonempty(drain_utf8(&bytes, &mut emitted, true)).map(wrap));
                        self.push_message(header, &bytes, close);
                        let next = if token == START {
                            State::Header { tokens: Vec::new(), role_implied: false, opened: true }
                        } else {
                            self.after_close(token)
                        };
                        (next, delta)
                    }
                    None => {
                        append_token_bytes(&mut bytes, token);
                        let delta = header
                            .streams()
                            .and_then(|wrap| nonempty(drain_utf8(&bytes, &mut emitted, false)).map(wrap));
                        (State::Content { header, bytes, emitted }, delta)
                    }
                }
            }
        }
    }

    /// The channel of the message being written, once its header is complete (e.g. to show "reasoning…").
    pub fn current_channel(&self) -> Option<&str> {
        match &self.state {
            State::Content { header, .. } => header.channel.as_deref(),
            _ => None,
        }
    }

    /// How many of the assistant's analysis messages have begun, the one being written included: the parts that
    /// [`ParsedCompletion::analysis`] joins with newlines, so that a stream of [`StreamDelta::Analysis`] can put
    /// the same newlines between them, for empty messages too. After the push that closed a message, it counts.
    pub fn analysis_messages(&self) -> usize {
        let writing_one = match &self.state {
            State::Content { header, .. } => header.is_assistant_channel("analysis"),
            _ => false,
        };
        self.analysis_messages + usize::from(writing_one)
    }

    /// True once a stop token arrived; later tokens are ignored.
    pub fn is_stopped(&self) -> bool {
        self.end.is_some()
    }

    pub fn finish(mut self) -> ParsedCompletion {
        match std::mem::replace(&mut self.state, State::Stopped) {
            State::Content { header, bytes, .. } => self.push_message(header, &bytes, MessageClose::Unclosed),
            State::Header { tokens, role_implied, .. } => {
                self.push_headerless(&tokens, role_implied, MessageClose::Unclosed)
            }
            State::ExpectStart | State::Stopped => {}
        }
        summarize(self.messages, self.end.unwrap_or(CompletionEnd::Truncated), self.ignored_tokens)
    }

    fn after_close(&mut self, token: u32) -> State {
        let end = match token {
            RETURN => CompletionEnd::Returned,
            CALL => CompletionEnd::Called,
            END_OF_TEXT => CompletionEnd::EndOfText,
            _ => return State::ExpectStart,
        };
        self.end = Some(end);
        State::Stopped
    }

    fn push_message(&mut self, header: Header, bytes: &[u8], close: MessageClose) {
        self.analysis_messages += usize::from(header.is_assistant_channel("analysis"));
        self.messages.push(ParsedMessage {
            role: header.role,
            channel: header.channel,
            recipient: header.recipient,
            content_type: header.content_type,
            text: String::from_utf8_lossy(bytes).into_owned(),
            close,
            well_formed: header.well_formed,
        });
    }

    /// Header tokens that never reached `<|message|>` (e.g. a completion that starts directly with text): kept as
    /// a malformed message so nothing is lost, with the channel harmony would find in it.
    fn push_headerless(&mut self, tokens: &[u32], role_implied: bool, close: MessageClose) {
        if tokens.is_empty() {
            return;
        }
        let text = Tokenizer::shared().decode_lossy(tokens);
        let (mut header, rest) = split_header(&text, role_implied, false);
        header.well_formed = false;
        let bytes = rest.unwrap_or_default().into_bytes();
        self.push_message(header, &bytes, close);
    }
}

fn nonempty(s: String) -> Option<String> {
    if s.is_empty() { None } else { Some(s) }
}

fn append_token_bytes(bytes: &mut Vec<u8>, token: u32) {
    match Tokenizer::shared().token_bytes(token) {
        Some(b) => bytes.extend_from_slice(&b),
        None => bytes.extend_from_slice("\u{FFFD}".as_bytes()),
    }
}

/// Returns the newly decodable text after `emitted`, exactly as `String::from_utf8_lossy` would decode it, so that
/// the deltas add up to the message text. An incomplete character at the end waits for more bytes unless `at_end`.
fn drain_utf8(bytes: &[u8], emitted: &mut usize, at_end: bool) -> String {
    let mut out = String::new();
    while *emitted < bytes.len() {
        let rest = &bytes[*emitted..];
        match std::str::from_utf8(rest) {
            Ok(valid) => {
                out.push_str(valid);
                *emitted = bytes.len();
            }
            Err(err) => {
                let valid_len = err.valid_up_to();
                out.push_str(&String::from_utf8_lossy(&rest[..valid_len]));
                *emitted += valid_len;
                match err.error_len() {
                    Some(bad) => {
                        out.push('\u{FFFD}');
                        *emitted += bad;
                    }
                    None if at_end => {
                        out.push('\u{FFFD}');
                        *emitted = bytes.len();
                    }
                    None => break,
                }
            }
        }
    }
    out
}

fn parse_header(tokens: &[u32], role_implied: bool, opened: bool) -> Header {
    let text = Tokenizer::shared().decode_lossy(tokens);
    let (mut header, rest) = split_header(&text, role_implied, true);
    header.well_formed &= opened && rest.is_none() && !text.contains('\u{FFFD}');
    header
}

const KNOWN_ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// Splits a decoded header the way openai-harmony's `parse_header_from_string` does:
/// `{role}[<|channel|>{channel}][ to={recipient}][ <|constrain|>{type}]`. Returns leftover words, which harmony
/// rejects, as the second value.
fn split_header(text: &str, role_implied: bool, parse_recipient_and_type: bool) -> (Header, Option<String>) {
    let mut well_formed = true;
    let mut rest = text.to_string();
    let mut channel = None;
    if let Some(idx) = rest.find(CHANNEL_TEXT) {
        let after = &rest[idx + CHANNEL_TEXT.len()..];
        let name_len = after.find(|c: char| c.is_whitespace() || c == '<').unwrap_or(after.len());
        if name_len == 0 {
            well_formed = false;
        } else {
            channel = Some(after[..name_len].to_string());
        }
        rest = format!("{}{}", &rest[..idx], &after[name_len..]);
    }
    let mut rest = rest.trim().to_string();
    if rest.contains(CONSTRAIN_TEXT) {
        rest = rest.replace(CONSTRAIN_TEXT, &format!(" {CONSTRAIN_TEXT}")).trim().to_string();
    }
    let mut parts: Vec<&str> = rest.split_ascii_whitespace().collect();

    let role = if role_implied {
        if parts.first() == Some(&"assistant") {
            parts.remove(0);
        }
        String::from("assistant")
    } else if parts.is_empty() {
        well_formed = false;
        String::new()
    } else if KNOWN_ROLES.contains(&parts[0]) {
        parts.remove(0).to_string()
    } else {
        // harmony reads an unknown first word as a tool's name; for a classifier it is simply not the assistant.
        parts.remove(0).to_string()
    };

    let mut recipient = None;
    let mut content_type = None;
    if parse_recipient_and_type && let Some(last) = parts.pop() {
        let was_single = parts.is_empty();
        if let Some(to) = last.strip_prefix("to=") {
            recipient = Some(to.to_string());
        } else if was_single && !last.starts_with(CONSTRAIN_TEXT) {
            recipient = Some(last.to_string());
        } else {
            content_type = Some(last.to_string());
            if let Some(raw) = parts.pop() {
                recipient = Some(raw.strip_prefix("to=").unwrap_or(raw).to_string());
            }
        }
    }
    let leftover = if parts.is_empty() { None } else { Some(parts.join(" ")) };
    (Header { role, channel, recipient, content_type, well_formed }, leftover)
}

fn summarize(messages: Vec<ParsedMessage>, end: CompletionEnd, ignored_tokens: usize) -> ParsedCompletion {
    let is_assistant_channel =
        |m: &ParsedMessage, name: &str| is_assistant_channel(&m.role, m.channel.as_deref(), name);
    let analysis_parts: Vec<&str> =
        messages.iter().filter(|m| is_assistant_channel(m, "analysis")).map(|m| m.text.as_str()).collect();
    let analysis = if analysis_parts.is_empty() { None } else { Some(analysis_parts.join("\n")) };

    let finals: Vec<&ParsedMessage> = messages.iter().filter(|m| is_assistant_channel(m, "final")).collect();
    // The answer is the turn's last word: a final message followed by anything else (more reasoning, a tool call)
    // was not where the model ended up, so it answers nothing.
    let ends_the_turn =
        |m: &ParsedMessage| messages.last().is_some_and(|last| std::ptr::eq(last, m)) && end != CompletionEnd::Called;
    // A final message addressed to someone ("to=functions.lookup", or a stray header word harmony reads as a
    // recipient) is not said to the user; a content type other than a `<|constrain|>` one is no answer format.
    let to_the_user = |m: &ParsedMessage| {
        m.recipient.is_none() && m.content_type.as_deref().is_none_or(|kind| kind.starts_with(CONSTRAIN_TEXT))
    };
    let (final_text, partial_final) = match finals.last() {
        Some(last) if last.well_formed && last.close.completes_answer() && ends_the_turn(last) && to_the_user(last) => {
            // Several final messages are all read, so that an earlier "1" and a later "0" conflict instead of the
            // later one silently winning.
            let text = if finals.len() == 1 {
                last.text.clone()
            } else {
                finals.iter().map(|m| m.text.as_str()).collect::<Vec<_>>().join("\n")
            };
            (Some(text), None)
        }
        Some(last) => (None, Some(last.text.clone())),
        None => (None, None),
    };
    ParsedCompletion { analysis, final_text, end, partial_final, messages, ignored_tokens }
}

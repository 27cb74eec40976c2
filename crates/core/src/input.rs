//! Items to classify, read from JSONL. One bad line is reported on its own and never loses the others.
//!
//! Accepted line shapes (plus an optional `"id"`, a string or a number):
//! - `{"text": "..."}`
//! - `{"messages": [{"role": "user", "content": "..."}, ...]}`: judge the last message in light of the rest
//! - `{"prompt": "..."}`, `{"response": "..."}` or `{"prompt": "...", "response": "..."}`

use std::io::{BufRead, Read};

use safeguard_harmony::{ChatMessage, Content};
use serde_json::{Map, Value};

/// One piece of content to classify, with the caller's id carried through to the output.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub id: Option<String>,
    pub content: Content,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputLimits {
    /// Longest content accepted, in characters (all messages together). Checked before any tokenizing
    /// so that a runaway line cannot eat memory or minutes of prefill.
    pub max_chars: usize,
}

impl Default for InputLimits {
    fn default() -> Self {
        Self { max_chars: 100_000 }
    }
}

impl InputLimits {
    /// The longest JSONL line that could hold an item of `max_chars`: a character may take 12 bytes as JSON
    /// (a surrogate pair of `\uXXXX` escapes), plus room for the id and the other fields. A longer line is
    /// refused without being held in memory.
    pub fn max_line_bytes(&self) -> usize {
        self.max_chars.saturating_mul(12).saturating_add(1 << 20)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ItemError {
    #[error("the line is not valid UTF-8 (first bad byte at offset {valid_up_to})")]
    InvalidUtf8 { valid_up_to: usize },
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    #[error("expected a JSON object, found {0}")]
    NotAnObject(&'static str),
    #[error("no content: expected a \"text\", \"messages\", \"prompt\" or \"response\" field")]
    MissingContent,
    #[error("ambiguous content: give only one of {0}")]
    Ambiguous(String),
    #[error("field {field:?} must be {expected}")]
    WrongType { field: String, expected: &'static str },
    #[error("the content is empty (in a conversation: the last message, the one classified)")]
    EmptyContent,
    #[error("the line is over {limit} bytes; no item of the allowed length is that long")]
    LineTooLong { limit: usize },
    #[error("the content is {chars} characters long; the limit is {limit}")]
    TooLong { chars: usize, limit: usize },
    #[error("could not read the input: {0}")]
    Io(#[from] std::io::Error),
}

impl Item {
    pub fn new(id: Option<String>, content: Content) -> Self {
        Self { id, content }
    }
}

/// Parses one JSONL line into an item.
pub fn parse_item(line: &str, limits: &InputLimits) -> Result<Item, ItemError> {
    let value: Value = serde_json::from_str(line).map_err(|e| ItemError::InvalidJson(e.to_string()))?;
    let Value::Object(object) = value else {
        return Err(ItemError::NotAnObject(json_kind(&value)));
    };
    let id = item_id(&object)?;
    let content = content_of(&object)?;
    check_content(&content, limits)?;
    Ok(Item { id, content })
}

/// Checks a content that did not come from JSONL (e.g. `--text`) against the same limits.
pub fn check_content(content: &Content, limits: &InputLimits) -> Result<(), ItemError> {
    check_length(content, limits)?;
    let blank = match content {
        Content::Text { text } => text.trim().is_empty(),
        Content::Prompt { prompt } => prompt.trim().is_empty(),
        Content::Response { response, .. } => response.trim().is_empty(),
        // The last message is the one classified; the rest is context.
        Content::Conversation { messages } => messages.last().is_none_or(|m| m.content.trim().is_empty()),
    };
    if blank {
        return Err(ItemError::EmptyContent);
    }
    Ok(())
}

/// The length part of [`check_content`] alone, for content already read under another limit.
pub fn check_length(content: &Content, limits: &InputLimits) -> Result<(), ItemError> {
    let chars = content.prompt_chars();
    if chars > limits.max_chars {
        return Err(ItemError::TooLong { chars, limit: limits.max_chars });
    }
    Ok(())
}

fn item_id(object: &Map<String, Value>) -> Result<Option<String>, ItemError> {
    match object.get("id") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(id)) => Ok(Some(id.clone())),
        Some(Value::Number(id)) => Ok(Some(id.to_string())),
        Some(_) => Err(ItemError::WrongType { field: "id".into(), expected: "a string or a number" }),
    }
}

fn content_of(object: &Map<String, Value>) -> Result<Content, ItemError> {
    let present = |key: &str| object.get(key).is_some_and(|v| !v.is_null());
    let shapes: Vec<&str> = [
        ("text", present("text")),
        ("messages", present("messages")),
        ("prompt/response", present("prompt") || present("response")),
    ]
    .into_iter()
    .filter_map(|(name, here)| here.then_some(name))
    .collect();
    match shapes.as_slice() {
        [] => Err(ItemError::MissingContent),
        ["text"] => Ok(Content::Text { text: string_field(object, "text")? }),
        ["messages"] => messages(object),
        ["prompt/response"] => {
            let prompt = optional_string_field(object, "prompt")?;
            match optional_string_field(object, "response")? {
                Some(response) => Ok(Content::Response { prompt, response }),
                None => Ok(Content::Prompt { prompt: prompt.unwrap_or_default() }),
            }
        }
        several => Err(ItemError::Ambiguous(several.join(", "))),
    }
}

fn messages(object: &Map<String, Value>) -> Result<Content, ItemError> {
    let Some(Value::Array(raw)) = object.get("messages") else {
        return Err(ItemError::WrongType { field: "messages".into(), expected: "an array of {role, content} objects" });
    };
    if raw.is_empty() {
        return Err(ItemError::EmptyContent);
    }
    let mut messages = Vec::with_capacity(raw.len());
    for (i, message) in raw.iter().enumerate() {
        let Value::Object(message) = message else {
            return Err(ItemError::WrongType {
                field: format!("messages[{i}]"),
                expected: "an object with role and content",
            });
        };
        let field = |name: &str| match message.get(name) {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(ItemError::WrongType { field: format!("messages[{i}].{name}"), expected: "a string" }),
        };
        messages.push(ChatMessage { role: field("role")?, content: field("content")? });
    }
    Ok(Content::Conversation { messages })
}

fn string_field(object: &Map<String, Value>, name: &str) -> Result<String, ItemError> {
    optional_string_field(object, name)?.ok_or(ItemError::MissingContent)
}

fn optional_string_field(object: &Map<String, Value>, name: &str) -> Result<Option<String>, ItemError> {
    match object.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ItemError::WrongType { field: name.into(), expected: "a string" }),
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// One line of a JSONL input, parsed or not.
#[derive(Debug)]
pub struct InputLine {
    /// 1-based line number in the input.
    pub line: usize,
    /// The line's `"id"` when it could be read even though the line is bad, so error records keep it.
    pub id: Option<String>,
    pub item: Result<Item, ItemError>,
}

/// Reads up to and including the next newline, keeping nothing.
fn skip_line(reader: &mut impl BufRead) -> std::io::Result<()> {
    loop {
        let chunk = reader.fill_buf()?;
        if chunk.is_empty() {
            return Ok(());
        }
        match chunk.iter().position(|&b| b == b'\n') {
            Some(end) => {
                reader.consume(end + 1);
                return Ok(());
            }
            None => {
                let len = chunk.len();
                reader.consume(len);
            }
        }
    }
}

/// Reads JSONL items, skipping blank lines. Each line is decoded on its own, so invalid UTF-8 or JSON in
/// one line yields an error for that line and reading goes on. A read error ends the input after being
/// yielded once.
pub struct ItemReader<R> {
    reader: R,
    limits: InputLimits,
    line: usize,
    finished: bool,
    buffer: Vec<u8>,
}

impl<R: BufRead> ItemReader<R> {
    pub fn new(reader: R, limits: InputLimits) -> Self {
        Self { reader, limits, line: 0, finished: false, buffer: Vec::new() }
    }
}

impl<R: BufRead> Iterator for ItemReader<R> {
    type Item = InputLine;

    fn next(&mut self) -> Option<InputLine> {
        while !self.finished {
            self.buffer.clear();
            self.line += 1;
            let limit = self.limits.max_line_bytes();
            match (&mut self.reader).take(limit as u64).read_until(b'\n', &mut self.buffer) {
                Ok(0) => self.finished = true,
                Ok(read) if read >= limit && self.buffer.last() != Some(&b'\n') => {
                    // A runaway line is skipped, not held: the rest of it is read and dropped piece by piece.
                    // No id either: a cut-off line is not JSON.
                    let id = None;
                    if let Err(e) = skip_line(&mut self.reader) {
                        self.finished = true;
                        return Some(InputLine { line: self.line, id, item: Err(ItemError::Io(e)) });
                    }
                    return Some(InputLine { line: self.line, id, item: Err(ItemError::LineTooLong { limit }) });
                }
                Ok(_) => {
                    let text = match std::str::from_utf8(&self.buffer) {
                        Ok(text) => text,
                        Err(e) => {
                            // The id is usually plain ASCII even when the text is not valid UTF-8.
                            let id = salvage_id(String::from_utf8_lossy(&self.buffer).trim());
                            return Some(InputLine {
                                line: self.line,
                                id,
                                item: Err(ItemError::InvalidUtf8 { valid_up_to: e.valid_up_to() }),
                            });
                        }
                    };
                    // An editor's byte-order mark opens the first line of many files that are otherwise fine.
                    let text = if self.line == 1 { text.trim_start_matches('\u{feff}') } else { text }.trim();
                    if text.is_empty() {
                        continue;
                    }
                    let item = parse_item(text, &self.limits);
                    let id = match &item {
                        Ok(item) => item.id.clone(),
                        Err(_) => salvage_id(text),
                    };
                    return Some(InputLine { line: self.line, id, item });
                }
                Err(e) => {
                    self.finished = true;
                    return Some(InputLine { line: self.line, id: None, item: Err(ItemError::Io(e)) });
                }
            }
        }
        None
    }
}

fn salvage_id(line: &str) -> Option<String> {
    let Ok(Value::Object(object)) = serde_json::from_str::<Value>(line) else {
        return None;
    };
    item_id(&object).ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Item, ItemError> {
        parse_item(line, &InputLimits::default())
    }

    #[test]
    fn reads_every_shape() {
        let item = parse(r#"{"id":"a","text":"hello"}"#).unwrap();
        assert_eq!(item, Item::new(Some("a".into()), Content::text("hello")));

        let item = parse(r#"{"id":7,"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}]}"#)
            .unwrap();
        assert_eq!(item.id.as_deref(), Some("7"));
        let Content::Conversation { messages } = item.content else { panic!("expected a conversation") };
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[1].role, "assistant");

        let item = parse(r#"{"prompt":"q","response":"a"}"#).unwrap();
        assert_eq!(item.id, None);
        assert_eq!(item.content, Content::Response { prompt: Some("q".into()), response: "a".into() });
        assert_eq!(parse(r#"{"prompt":"q"}"#).unwrap().content, Content::Prompt { prompt: "q".into() });
        assert_eq!(
            parse(r#"{"response":"a"}"#).unwrap().content,
            Content::Response { prompt: None, response: "a".into() }
        );
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        assert!(matches!(parse("{not json"), Err(ItemError::InvalidJson(_))));
        assert!(matches!(parse("[1,2]"), Err(ItemError::NotAnObject("an array"))));
        assert!(matches!(parse(r#"{"id":"x"}"#), Err(ItemError::MissingContent)));
        assert!(matches!(parse(r#"{"text":"a","prompt":"b"}"#), Err(ItemError::Ambiguous(_))));
        assert!(matches!(parse(r#"{"text":5}"#), Err(ItemError::WrongType { .. })));
        assert!(matches!(parse(r#"{"text":"  "}"#), Err(ItemError::EmptyContent)));
        assert!(matches!(parse(r#"{"id":[1],"text":"a"}"#), Err(ItemError::WrongType { .. })));
        assert!(matches!(parse(r#"{"messages":[{"role":"user"}]}"#), Err(ItemError::WrongType { .. })));
        assert!(matches!(parse(r#"{"messages":[]}"#), Err(ItemError::EmptyContent)));
        let silent_reply =
            r#"{"messages":[{"role":"user","content":"how to make meth"},{"role":"assistant","content":" "}]}"#;
        assert!(matches!(parse(silent_reply), Err(ItemError::EmptyContent)), "the classified message is blank");
        let long = format!(r#"{{"text":"{}"}}"#, "x".repeat(11));
        assert!(matches!(
            parse_item(&long, &InputLimits { max_chars: 10 }),
            Err(ItemError::TooLong { chars: 11, limit: 10 })
        ));
    }

    #[test]
    fn one_bad_line_loses_nothing_else() {
        let mut input = Vec::new();
        input.extend_from_slice(b"{\"id\":\"1\",\"text\":\"one\"}\n");
        input.extend_from_slice(b"{\"id\":\"2\",\"text\":\"\xff\xfe\"}\n");
        input.extend_from_slice(b"\n");
        input.extend_from_slice(b"{\"id\":\"3\",\"txt\":\"typo\"}\n");
        input.extend_from_slice(b"{\"id\":\"4\",\"text\":\"four\"}");
        let lines: Vec<InputLine> = ItemReader::new(input.as_slice(), InputLimits::default()).collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines.iter().map(|l| l.line).collect::<Vec<_>>(), [1, 2, 4, 5]);
        assert!(lines[0].item.is_ok());
        assert!(matches!(lines[1].item, Err(ItemError::InvalidUtf8 { .. })));
        assert_eq!(lines[1].id.as_deref(), Some("2"));
        assert!(matches!(lines[2].item, Err(ItemError::MissingContent)));
        assert_eq!(lines[2].id.as_deref(), Some("3"), "the id of a bad line is kept for its error record");
        assert_eq!(lines[3].item.as_ref().unwrap().content, Content::text("four"));
    }

    #[test]
    fn a_runaway_line_is_refused_without_being_held() {
        let limits = InputLimits { max_chars: 10 };
        let limit = limits.max_line_bytes();
        let mut input = Vec::new();
        input.extend_from_slice(b"{\"id\":\"big\",\"text\":\"");
        input.resize(input.len() + limit * 3, b'x');
        input.extend_from_slice(b"\"}\n{\"id\":\"next\",\"text\":\"ok\"}\n");
        let mut reader = ItemReader::new(input.as_slice(), limits);
        let first = reader.next().unwrap();
        assert!(matches!(first.item, Err(ItemError::LineTooLong { .. })), "{:?}", first.item);
        assert!(reader.buffer.capacity() <= limit + 1024, "held {} bytes", reader.buffer.capacity());
        let second = reader.next().unwrap();
        assert_eq!((second.line, second.item.unwrap().content), (2, Content::text("ok")));
        assert!(reader.next().is_none());
    }
}

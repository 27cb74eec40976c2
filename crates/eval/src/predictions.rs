//! A lenient reader for saved `safeguard classify` output (one JSON object per line).
//!
//! Unknown fields are kept (`extra`) so records written back to a cache lose nothing.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::EvalError;

/// The outcome of a decision, as classify writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Allow,
    Violation,
    #[serde(alias = "needs-review", alias = "review")]
    NeedsReview,
}

/// What an item was predicted to be for the policy being scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Predicted {
    Violation,
    Allow,
    NeedsReview,
}

impl From<Outcome> for Predicted {
    fn from(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Allow => Predicted::Allow,
            Outcome::Violation => Predicted::Violation,
            Outcome::NeedsReview => Predicted::NeedsReview,
        }
    }
}

impl Predicted {
    /// The label this prediction stands for, or `None` for needs_review.
    pub fn as_label(self) -> Option<bool> {
        match self {
            Predicted::Violation => Some(true),
            Predicted::Allow => Some(false),
            Predicted::NeedsReview => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Predicted::Violation => "violation",
            Predicted::Allow => "allow",
            Predicted::NeedsReview => "needs_review",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub cached_prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
}

/// One policy's verdict inside a prediction line.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PredictedVerdict {
    pub policy: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_hash: Option<String>,
    #[serde(default)]
    pub violation: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rule_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rationale: Option<String>,
    /// Kept as JSON: the flag encoding belongs to the verdict crate; [`flag_name`] reads any of its shapes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Flags meaning the model's answer could not be read as a verdict.
const PARSE_FAILURE_FLAGS: [&str; 4] = ["no_final_message", "unparseable", "truncated", "missing_field"];

/// The snake_case name of a flag, whether it is serialised as `"truncated"`, `{"kind":"unparseable",…}` or
/// `{"unparseable":{…}}`.
pub fn flag_name(flag: &Value) -> Option<String> {
    let raw = match flag {
        Value::String(name) => name.clone(),
        Value::Object(object) => {
            let tagged = ["kind", "type", "flag"].iter().find_map(|tag| object.get(*tag).and_then(Value::as_str));
            match tagged {
                Some(name) => name.to_string(),
                None if object.len() == 1 => object.keys().next()?.clone(),
                None => return None,
            }
        }
        _ => return None,
    };
    Some(to_snake_case(&raw))
}

fn to_snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else if c == '-' {
            out.push('_');
        } else {
            out.push(c);
        }
    }
    out
}

impl PredictedVerdict {
    pub fn predicted(&self) -> Predicted {
        match (self.outcome, self.violation) {
            (Some(outcome), _) => outcome.into(),
            (None, Some(true)) => Predicted::Violation,
            (None, Some(false)) => Predicted::Allow,
            (None, None) => Predicted::NeedsReview,
        }
    }

    /// True when the model's answer could not be parsed into a verdict.
    pub fn is_parse_failure(&self) -> bool {
        self.flags.iter().filter_map(flag_name).any(|name| PARSE_FAILURE_FLAGS.contains(&name.as_str()))
    }
}

/// One line of classify output (or one cached live result).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PredictionRecord {
    #[serde(deserialize_with = "string_or_number")]
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    #[serde(default)]
    pub verdicts: Vec<PredictedVerdict>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub timings: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effort: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Set when classifying the item failed; such an item counts as needs_review.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn string_or_number<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    match Value::deserialize(deserializer)? {
        Value::String(s) => Ok(s),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(serde::de::Error::custom(format!("id must be a string or number, got {other}"))),
    }
}

impl PredictionRecord {
    /// The verdict for `policy`, or the only verdict when no policy is named.
    pub fn verdict(&self, policy: Option<&str>) -> Option<&PredictedVerdict> {
        match policy {
            Some(name) => self.verdicts.iter().find(|v| v.policy == name),
            None if self.verdicts.len() == 1 => self.verdicts.first(),
            None => None,
        }
    }

    /// The prediction for `policy`; with no policy, the overall outcome. A missing verdict or a failed
    /// classification is needs_review: never a silent allow.
    pub fn predicted(&self, policy: Option<&str>) -> Predicted {
        if let Some(name) = policy {
            return self.verdict(Some(name)).map_or(Predicted::NeedsReview, PredictedVerdict::predicted);
        }
        if let Some(outcome) = self.outcome {
            return outcome.into();
        }
        if self.verdicts.is_empty() {
            return Predicted::NeedsReview;
        }
        let each: Vec<Predicted> = self.verdicts.iter().map(PredictedVerdict::predicted).collect();
        if each.contains(&Predicted::NeedsReview) {
            Predicted::NeedsReview
        } else if each.contains(&Predicted::Violation) {
            Predicted::Violation
        } else {
            Predicted::Allow
        }
    }

    /// Why classifying this item failed, if it did: the record's own `error`, or the errors of the prompts the
    /// backend failed (`prompts[].error`). classify writes a decision whose prompts failed with no top-level error,
    /// its verdicts flagged like an unreadable answer; it is still an outage, not something the model said.
    pub fn failure(&self) -> Option<String> {
        if let Some(error) = &self.error {
            return Some(error.clone());
        }
        let prompts = self.extra.get("prompts").and_then(Value::as_array)?;
        let errors: Vec<String> = prompts
            .iter()
            .filter_map(|prompt| match prompt.get("error") {
                None | Some(Value::Null) => None,
                Some(Value::String(error)) => Some(error.clone()),
                Some(other) => Some(other.to_string()),
            })
            .collect();
        (!errors.is_empty()).then(|| errors.join("; "))
    }

    /// True when classifying this item failed (see [`Self::failure`]).
    pub fn is_failure(&self) -> bool {
        self.failure().is_some()
    }

    /// True when the answer for `policy` (any policy when `None`) could not be parsed.
    pub fn is_parse_failure(&self, policy: Option<&str>) -> bool {
        match policy {
            Some(name) => self.verdict(Some(name)).is_some_and(PredictedVerdict::is_parse_failure),
            None => self.verdicts.iter().any(PredictedVerdict::is_parse_failure),
        }
    }

    /// The rationale for `policy` (or the only/first verdict that has one).
    pub fn rationale(&self, policy: Option<&str>) -> Option<&str> {
        match policy {
            Some(name) => self.verdict(Some(name)).and_then(|v| v.rationale.as_deref()),
            None => self.verdicts.iter().find_map(|v| v.rationale.as_deref()),
        }
        .or(self.error.as_deref())
    }

    /// End-to-end latency in milliseconds: `total_ms` (or `latency_ms`/`wall_ms`) if recorded, else prefill + decode.
    pub fn latency_ms(&self) -> Option<f64> {
        let number = |name: &str| self.timings.get(name).and_then(Value::as_f64);
        if let Some(total) = ["total_ms", "latency_ms", "wall_ms"].iter().find_map(|name| number(name)) {
            return Some(total);
        }
        match (number("prefill_ms"), number("decode_ms")) {
            (None, None) => None,
            (prefill, decode) => Some(prefill.unwrap_or(0.0) + decode.unwrap_or(0.0)),
        }
    }
}

/// A JSON object that keeps the first value of a repeated top-level key.
///
/// classify flattens a decision into a record that already holds the caller's `id`, so a line can carry
/// `"id"` twice: the item id first, then the decision's UUID. The item id is what joins with the dataset; the
/// later value is kept as `decision_id`.
struct FirstKeyWins(Map<String, Value>);

impl<'de> Deserialize<'de> for FirstKeyWins {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = FirstKeyWins;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut access: A) -> Result<FirstKeyWins, A::Error> {
                let mut object = Map::new();
                while let Some(key) = access.next_key::<String>()? {
                    let value: Value = access.next_value()?;
                    if !object.contains_key(&key) {
                        object.insert(key, value);
                    } else if key == "id" {
                        object.entry("decision_id").or_insert(value);
                    }
                }
                Ok(FirstKeyWins(object))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// Parses one line of classify output.
pub fn parse_prediction_line(line: &str) -> Result<PredictionRecord, serde_json::Error> {
    let FirstKeyWins(object) = serde_json::from_str(line)?;
    serde_json::from_value(Value::Object(object))
}

/// A line of classify output with `"id": null`: classify could not read the input line (too long, not JSON)
/// or the input named no id. It cannot be joined with the dataset, so it is a failure of the run, never a skip.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unjoinable {
    /// 1-based line in the predictions file.
    pub line: usize,
    /// The input line classify read it from, when it says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_line: Option<u64>,
    /// classify's error for it; `None` for a decision on an input that named no id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Unjoinable {
    /// `line 3 (input line 7): line too long`, for reports.
    pub fn describe(&self) -> String {
        let mut text = format!("line {}", self.line);
        if let Some(input) = self.input_line {
            text.push_str(&format!(" (input line {input})"));
        }
        text.push_str(": ");
        text.push_str(self.error.as_deref().unwrap_or("no item id"));
        text
    }
}

/// A predictions file: the records that join on an id, and the lines that cannot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Predictions {
    pub records: Vec<PredictionRecord>,
    pub unjoinable: Vec<Unjoinable>,
}

/// A UTF-8 byte-order mark some editors put at the start of a file; it is not part of the first line's JSON.
pub(crate) fn strip_bom(line: &str) -> &str {
    line.strip_prefix('\u{feff}').unwrap_or(line)
}

/// Reads a file line by line as bytes: `BufRead::lines` fails the whole read on one line that is not UTF-8, with
/// no line number, where a caller wants to name that line or skip it. Yields each 1-based line number with the
/// line, its `\n` or `\r\n` removed.
pub(crate) fn byte_lines<R: BufRead>(mut reader: R) -> impl Iterator<Item = std::io::Result<(usize, Vec<u8>)>> {
    let mut number = 0;
    std::iter::from_fn(move || {
        let mut line = Vec::new();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => None,
            Ok(_) => {
                number += 1;
                if line.last() == Some(&b'\n') {
                    line.pop();
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                }
                Some(Ok((number, line)))
            }
            Err(err) => Some(Err(err)),
        }
    })
}

/// The message for a line that is not UTF-8.
pub(crate) fn not_utf8(err: &std::str::Utf8Error) -> String {
    format!("not valid UTF-8 (first bad byte at offset {})", err.valid_up_to())
}

/// The lines of a JSONL file that hold something, with their 1-based numbers: decoded (a line that is not UTF-8 is
/// an error naming it), a byte-order mark before the first dropped, blank lines skipped.
pub(crate) fn jsonl_lines(path: &Path) -> Result<impl Iterator<Item = Result<(usize, String), EvalError>>, EvalError> {
    let io_error = |source| EvalError::Io { path: path.to_path_buf(), source };
    let file = File::open(path).map_err(io_error)?;
    let lines = byte_lines(BufReader::new(file)).map(move |line| {
        let (number, bytes) = line.map_err(io_error)?;
        let text = String::from_utf8(bytes).map_err(|err| EvalError::Data {
            path: path.to_path_buf(),
            line: number,
            message: not_utf8(&err.utf8_error()),
        })?;
        let text = if number == 1 { strip_bom(&text).to_string() } else { text };
        Ok((number, text))
    });
    Ok(lines.filter(|line| !matches!(line, Ok((_, text)) if text.trim().is_empty())))
}

/// Reads a predictions JSONL file. A malformed line is an error naming its line number; a line whose `id` is
/// null is set aside in [`Predictions::unjoinable`].
pub fn read_predictions(path: &Path) -> Result<Predictions, EvalError> {
    let mut predictions = Predictions::default();
    for line in jsonl_lines(path)? {
        let (number, line) = line?;
        let bad = |err: serde_json::Error| EvalError::Data {
            path: path.to_path_buf(),
            line: number,
            message: format!("not a prediction record: {err}"),
        };
        let FirstKeyWins(object) = serde_json::from_str(&line).map_err(bad)?;
        if object.get("id").is_some_and(Value::is_null) {
            predictions.unjoinable.push(Unjoinable {
                line: number,
                input_line: object.get("line").and_then(Value::as_u64),
                error: object.get("error").map(|error| match error {
                    Value::String(text) => text.clone(),
                    other => other.to_string(),
                }),
            });
            continue;
        }
        predictions.records.push(serde_json::from_value(Value::Object(object)).map_err(bad)?);
    }
    Ok(predictions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(value: Value) -> PredictionRecord {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn reads_the_classify_line_shape() {
        let line = json!({"id":"x","outcome":"violation","verdicts":[{"policy":"spam","policy_hash":"sha256:ab",
            "violation":true,"label":"1","rule_ids":[],"flags":[],"outcome":"violation"}],
            "usage":{"prompt_tokens":10,"cached_prompt_tokens":4,"completion_tokens":3},
            "timings":{"prefill_ms":5.0,"decode_ms":7.5},"reasoning":["kept"]});
        let r = record(line.clone());
        assert_eq!(r.predicted(None), Predicted::Violation);
        assert_eq!(r.predicted(Some("spam")), Predicted::Violation);
        assert_eq!(r.predicted(Some("other")), Predicted::NeedsReview);
        assert_eq!(r.latency_ms(), Some(12.5));
        assert_eq!(r.usage.as_ref().unwrap().cached_prompt_tokens, 4);
        // Unknown fields survive a round trip, so cached records lose nothing.
        let back = serde_json::to_value(&r).unwrap();
        assert_eq!(back["reasoning"], json!(["kept"]));
    }

    #[test]
    fn a_repeated_id_keeps_the_item_id_first() {
        let line = r#"{"id":"item-1","line":1,"id":"0193a5c0-uuid","outcome":"allow","verdicts":[]}"#;
        let r = parse_prediction_line(line).unwrap();
        assert_eq!(r.id, "item-1");
        assert_eq!(r.extra["decision_id"], json!("0193a5c0-uuid"));
        assert_eq!(r.predicted(None), Predicted::Allow);
        assert!(parse_prediction_line(r#"{"outcome":"allow"}"#).unwrap_err().to_string().contains("id"));
        assert!(parse_prediction_line("[1]").is_err());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.jsonl");
        std::fs::write(&path, format!("{line}\n\n{{\"id\":\"b\",\"id\":\"u\"}}\n")).unwrap();
        let records = read_predictions(&path).unwrap().records;
        assert_eq!(records.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), vec!["item-1", "b"]);
    }

    #[test]
    fn missing_outcomes_fall_back_to_verdicts_and_never_to_allow() {
        let r = record(json!({"id": 7, "verdicts": [
            {"policy": "a", "violation": false}, {"policy": "b", "violation": null}]}));
        assert_eq!(r.id, "7");
        assert_eq!(r.predicted(None), Predicted::NeedsReview);
        assert_eq!(r.predicted(Some("a")), Predicted::Allow);
        let empty = record(json!({"id": "e", "error": "engine died"}));
        assert_eq!(empty.predicted(None), Predicted::NeedsReview);
        assert_eq!(empty.rationale(None), Some("engine died"));
    }

    #[test]
    fn flags_are_read_in_any_serde_shape() {
        assert_eq!(flag_name(&json!("truncated")).as_deref(), Some("truncated"));
        assert_eq!(flag_name(&json!({"kind": "unparseable", "detail": "x"})).as_deref(), Some("unparseable"));
        assert_eq!(flag_name(&json!({"Unparseable": {"detail": "x"}})).as_deref(), Some("unparseable"));
        assert_eq!(flag_name(&json!("NoFinalMessage")).as_deref(), Some("no_final_message"));
        let v = PredictedVerdict {
            flags: vec![json!({"type": "hallucinated_rule", "rule_id": "X"})],
            ..Default::default()
        };
        assert!(!v.is_parse_failure());
        let v = PredictedVerdict { flags: vec![json!("no_final_message")], ..Default::default() };
        assert!(v.is_parse_failure());
    }
}

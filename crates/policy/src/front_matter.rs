//! YAML front matter: splitting it off the body and turning it into [`PolicyMeta`].

use std::collections::BTreeMap;
use std::sync::LazyLock;

use regex::Regex;
use serde_yaml_ng::Value;

use crate::{
    FrontMatterChecks, MAX_FRONT_MATTER_BYTES, OutputFormat, PolicyError, PolicyMeta, normalize_label, yaml_guard,
};

pub(crate) struct FrontMatter<'a> {
    pub text: &'a str,
    /// File line of the first YAML line (the one after the opening `---`).
    pub first_line: usize,
}

pub(crate) struct Split<'a> {
    pub front_matter: Option<FrontMatter<'a>>,
    pub body_offset: usize,
    pub body_start_line: usize,
}

fn is_fence(line: &str, closing: bool) -> bool {
    let line = line.trim_end();
    line == "---" || (closing && line == "...")
}

pub(crate) fn split(text: &str) -> Result<Split<'_>, PolicyError> {
    let first_line_end = text.find('\n').unwrap_or(text.len());
    if !is_fence(&text[..first_line_end], false) {
        return Ok(Split { front_matter: None, body_offset: 0, body_start_line: 1 });
    }
    let yaml_start = (first_line_end + 1).min(text.len());
    let mut offset = yaml_start;
    let mut line_no = 2;
    while offset < text.len() {
        let line_end = text[offset..].find('\n').map_or(text.len(), |pos| offset + pos);
        if is_fence(&text[offset..line_end], true) {
            let body_offset = (line_end + 1).min(text.len());
            return Ok(Split {
                front_matter: Some(FrontMatter { text: &text[yaml_start..offset], first_line: 2 }),
                body_offset,
                body_start_line: line_no + 1,
            });
        }
        offset = line_end + 1;
        line_no += 1;
    }
    Err(PolicyError::UnclosedFrontMatter { line: 1 })
}

/// How a policy words a 0/1 answer, as both format inference and lint read it: "0 or 1", "`0` or `1`",
/// "0 (safe) or 1 (violating)", "(0/1)", "1 if it violates, otherwise 0".
pub(crate) const BINARY_WORDING: &str = r#"(?i)\b0\b[`'"]?\s*(?:\([^)\n]{0,40}\)\s*)?or\s+[`'"]?1\b|\b1\b[`'"]?\s*(?:\([^)\n]{0,40}\)\s*)?or\s+[`'"]?0\b|\(0\s*/\s*1\)|\b0/1\b|\b[01]\b[`'"]?\s+if\b[^.\n]{0,160}\b(?:otherwise|else)\b[^.\n]{0,20}?\b[01]\b"#;

static BINARY_HINT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(&format!("{BINARY_WORDING}|exactly one character")).expect("static regex"));
static JSON_HINT: LazyLock<Regex> = LazyLock::new(|| Regex::new(r#""violation"\s*:"#).expect("static regex"));
static INVALID_WORD: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\bINVALID\b").expect("static regex"));
static VALID_WORD: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"(^|[^A-Z])VALID\b").expect("static regex"));

/// Guess the output format from the body. A JSON example naming `violation` is the strongest signal
/// (JSON policies also say "0 or 1" for that field), then a binary answer, then VALID/INVALID labels.
pub(crate) fn infer_output(body: &str) -> Option<OutputFormat> {
    if JSON_HINT.is_match(body) {
        return Some(OutputFormat::Json);
    }
    if BINARY_HINT.is_match(body) {
        return Some(OutputFormat::Binary);
    }
    if INVALID_WORD.is_match(body) && VALID_WORD.is_match(body) {
        let escalate = if body.contains("ESCALATE") { vec!["INVALID + ESCALATE".to_string()] } else { Vec::new() };
        return Some(OutputFormat::Labels {
            violating: vec!["INVALID".to_string()],
            safe: vec!["VALID".to_string()],
            escalate,
        });
    }
    None
}

struct Fields<'a> {
    map: serde_yaml_ng::Mapping,
    source: &'a str,
    first_line: usize,
}

impl Fields<'_> {
    fn line_of(&self, key: &str) -> usize {
        self.source
            .lines()
            .position(|line| {
                line.strip_prefix(key).is_some_and(|rest| rest.trim_start().starts_with(':'))
                    || line.strip_prefix(&format!("\"{key}\"")).is_some_and(|rest| rest.trim_start().starts_with(':'))
            })
            .map_or(self.first_line, |index| self.first_line + index)
    }

    fn error(&self, key: &str, message: impl Into<String>) -> PolicyError {
        PolicyError::FrontMatterField { field: key.to_string(), line: self.line_of(key), message: message.into() }
    }

    fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key).filter(|value| !value.is_null())
    }

    fn string(&mut self, key: &str) -> Result<Option<String>, PolicyError> {
        match self.take(key) {
            None => Ok(None),
            Some(value) => scalar_string(&value).map(Some).ok_or_else(|| self.error(key, "expected a string")),
        }
    }

    fn list(&mut self, key: &str) -> Result<Vec<String>, PolicyError> {
        match self.take(key) {
            None => Ok(Vec::new()),
            Some(Value::Sequence(items)) => items
                .iter()
                .map(|item| scalar_string(item).ok_or_else(|| self.error(key, "expected a list of strings")))
                .collect(),
            Some(value) => scalar_string(&value)
                .map(|single| vec![single])
                .ok_or_else(|| self.error(key, "expected a list of strings")),
        }
    }

    fn bool(&mut self, key: &str) -> Result<bool, PolicyError> {
        match self.take(key) {
            None => Ok(false),
            Some(Value::Bool(flag)) => Ok(flag),
            Some(_) => Err(self.error(key, "expected true or false")),
        }
    }

    /// A span of time written with its unit (`90m`, `4h`, `2d`), in seconds, from a minute to a year.
    fn duration(&mut self, key: &str) -> Result<Option<u64>, PolicyError> {
        let Some(text) = self.string(key)? else { return Ok(None) };
        let expected = "expected a time with its unit, from 1m to 365d (90m, 4h, 2d)";
        let text = text.trim();
        let unit_at = text.len().saturating_sub(1);
        let (number, unit) = (text.get(..unit_at).unwrap_or_default(), text.get(unit_at..).unwrap_or_default());
        let unit_secs = match unit {
            "m" => 60,
            "h" => 3_600,
            "d" => 86_400,
            _ => return Err(self.error(key, expected)),
        };
        match number.trim().parse::<u64>().ok().and_then(|n| n.checked_mul(unit_secs)) {
            Some(secs) if (60..=365 * 86_400).contains(&secs) => Ok(Some(secs)),
            _ => Err(self.error(key, expected)),
        }
    }

    fn int(&mut self, key: &str) -> Result<Option<i64>, PolicyError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Number(number)) if number.as_i64().is_some() => Ok(number.as_i64()),
            Some(_) => Err(self.error(key, "expected an integer")),
        }
    }
}

fn scalar_string(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) => Some(flag.to_string()),
        _ => None,
    }
}

fn yaml_error_line(err: &serde_yaml_ng::Error, first_line: usize) -> usize {
    // Locations are 1-based lines of the front matter text.
    err.location().map_or(first_line, |location| first_line + location.line().saturating_sub(1))
}

fn labels_from(
    fields: &Fields<'_>,
    key: &str,
    value: &Value,
    checks: FrontMatterChecks,
) -> Result<OutputFormat, PolicyError> {
    let Value::Mapping(map) = value else {
        return Err(fields.error(key, "expected a mapping with `violating`, `safe` and optional `escalate` lists"));
    };
    let list = |name: &str| -> Result<Vec<String>, PolicyError> {
        match map.get(name) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Sequence(items)) => items
                .iter()
                .map(|item| scalar_string(item).ok_or_else(|| fields.error(key, format!("`{name}` must list strings"))))
                .collect(),
            Some(single) => scalar_string(single)
                .map(|label| vec![label])
                .ok_or_else(|| fields.error(key, format!("`{name}` must list strings"))),
        }
    };
    let violating = list("violating")?;
    let safe = list("safe")?;
    let escalate = list("escalate")?;
    if violating.is_empty() || safe.is_empty() {
        return Err(fields.error(key, "labels output needs non-empty `violating` and `safe` lists"));
    }
    // Not for a stored version: one stored before these checks must still read (its blank label never matches,
    // the verdict reader sees to that).
    if checks == FrontMatterChecks::Skip {
        return Ok(OutputFormat::Labels { violating, safe, escalate });
    }
    // Compared as the verdict reader compares an answer with a label.
    if [&violating, &safe, &escalate].into_iter().flatten().any(|label| normalize_label(label).is_empty()) {
        return Err(fields.error(key, "a label is blank: an answer of only punctuation would read as it"));
    }
    if let Some(both) =
        violating.iter().find(|label| safe.iter().any(|other| normalize_label(other) == normalize_label(label)))
    {
        return Err(fields.error(key, format!("label {both:?} is both `violating` and `safe`")));
    }
    Ok(OutputFormat::Labels { violating, safe, escalate })
}

fn output_from(fields: &mut Fields<'_>, checks: FrontMatterChecks) -> Result<Option<OutputFormat>, PolicyError> {
    let key = ["output", "output_format", "format"].into_iter().find(|key| fields.map.contains_key(*key));
    let Some(key) = key else { return Ok(None) };
    let Some(value) = fields.take(key) else { return Ok(None) };
    let labels = fields.take("labels");
    let (kind, inline) = match &value {
        Value::String(kind) => (kind.trim().to_ascii_lowercase(), None),
        Value::Mapping(map) => match map.get("format").and_then(scalar_string) {
            Some(kind) => (kind.trim().to_ascii_lowercase(), Some(&value)),
            None => return Err(fields.error(key, "a mapping needs `format: binary|labels|json`")),
        },
        _ => return Err(fields.error(key, "expected binary, labels or json")),
    };
    match kind.as_str() {
        "binary" => Ok(Some(OutputFormat::Binary)),
        "json" => Ok(Some(OutputFormat::Json)),
        "labels" => match (inline, labels) {
            (Some(inline), _) => labels_from(fields, key, inline, checks).map(Some),
            (None, Some(labels)) => labels_from(fields, "labels", &labels, checks).map(Some),
            (None, None) => {
                Err(fields.error(key, "labels output needs a `labels:` mapping with `violating` and `safe`"))
            }
        },
        other => Err(fields.error(key, format!("unknown output format `{other}`; expected binary, labels or json"))),
    }
}

/// The front matter as [`PolicyMeta`]. Refused: front matter over [`MAX_FRONT_MATTER_BYTES`], and any YAML
/// anchor or alias (see `yaml_guard`).
pub(crate) fn build_meta(
    front_matter: Option<FrontMatter<'_>>,
    heading_name: Option<String>,
    fallback_name: Option<&str>,
    body: &str,
    checks: FrontMatterChecks,
) -> Result<PolicyMeta, PolicyError> {
    let (source, first_line) = front_matter.as_ref().map_or(("", 2), |fm| (fm.text, fm.first_line));
    if checks == FrontMatterChecks::Refuse && source.len() > MAX_FRONT_MATTER_BYTES {
        return Err(PolicyError::FrontMatterTooLarge { bytes: source.len(), limit: MAX_FRONT_MATTER_BYTES });
    }
    // Before serde_yaml_ng, which would expand every alias while reading: refused, nothing is expanded.
    if checks == FrontMatterChecks::Refuse
        && let Err(refused) = yaml_guard::refuse_references(source)
    {
        return Err(PolicyError::FrontMatter {
            line: first_line.saturating_add(refused.line),
            message: refused.message.to_string(),
        });
    }
    let map = if source.trim().is_empty() {
        serde_yaml_ng::Mapping::new()
    } else {
        match serde_yaml_ng::from_str::<Value>(source) {
            Ok(Value::Mapping(map)) => map,
            Ok(Value::Null) => serde_yaml_ng::Mapping::new(),
            Ok(_) => {
                return Err(PolicyError::FrontMatter {
                    line: first_line,
                    message: "expected `key: value` lines (a YAML mapping)".to_string(),
                });
            }
            Err(err) => {
                return Err(PolicyError::FrontMatter {
                    line: yaml_error_line(&err, first_line),
                    message: err.to_string(),
                });
            }
        }
    };
    let mut fields = Fields { map, source, first_line };

    let name = fields
        .string("name")?
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .or(heading_name)
        .or_else(|| fallback_name.map(str::to_string))
        .ok_or(PolicyError::NoName)?;
    let (output, output_declared) = match output_from(&mut fields, checks)? {
        Some(output) => (output, true),
        None => (infer_output(body).ok_or(PolicyError::UndeterminedOutput)?, false),
    };
    let meta = PolicyMeta {
        name,
        version: fields.string("version")?,
        output,
        output_declared,
        description: fields.string("description")?,
        categories: fields.list("categories")?,
        severities: fields.list("severities")?,
        high_risk: fields.bool("high_risk")?,
        review_sla_secs: match fields.duration("review_sla") {
            Ok(secs) => secs,
            // A version stored before `review_sla` was read kept any value (`1w`) as an unknown key: it must still
            // read, with the server's default SLA.
            Err(_) if checks == FrontMatterChecks::Skip => None,
            Err(refused) => return Err(refused),
        },
        escalate_on: fields.list("escalate_on")?,
        precedence: fields.int("precedence")?,
        owner: fields.string("owner")?,
        tags: fields.list("tags")?,
        extra: BTreeMap::new(),
    };
    let mut extra = BTreeMap::new();
    for (key, value) in std::mem::take(&mut fields.map) {
        let Some(key) = scalar_string(&key) else { continue };
        // Dropping a value JSON cannot hold (a mapping with non-string keys; `.nan` or `.inf`, which JSON would
        // turn into null) would run a `routing:` or `triage:` section on the server's defaults without a word: the
        // file is refused instead.
        // A version stored before this check still reads (as it always did, the value as null): refusing it now
        // would strand every decision judged under it.
        if checks == FrontMatterChecks::Refuse && holds_non_finite(&value) {
            return Err(fields.error(&key, "holds .nan or .inf, which is no setting".to_string()));
        }
        match serde_json::to_value(&value) {
            Ok(json) => {
                extra.insert(key, json);
            }
            Err(e) => return Err(fields.error(&key, format!("cannot be read as JSON: {e}"))),
        }
    }
    Ok(PolicyMeta { extra, ..meta })
}

/// Whether a YAML value holds a float that is not a number or infinite, anywhere inside it.
fn holds_non_finite(value: &Value) -> bool {
    match value {
        Value::Number(number) => number.as_f64().is_some_and(|float| !float.is_finite()),
        Value::Sequence(items) => items.iter().any(holds_non_finite),
        Value::Mapping(map) => map.iter().any(|(key, value)| holds_non_finite(key) || holds_non_finite(value)),
        Value::Tagged(tagged) => holds_non_finite(&tagged.value),
        Value::Null | Value::Bool(_) | Value::String(_) => false,
    }
}

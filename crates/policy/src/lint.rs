//! Policies are software: a linter for the things that make gpt-oss-safeguard follow a policy badly.
//!
//! The checks come from OpenAI's policy-writing guidance: 400-600 tokens is the sweet spot, the exact output
//! format is stated at the top and repeated before the examples, criteria avoid hedges ("generally",
//! "usually"), examples sit near the boundary and carry labels, and ambiguity has an escalation path.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::front_matter::infer_output;
use crate::markdown::{FenceTracker, Outline, Role, find_rule_ids, heading};
use crate::{OutputFormat, Policy};

/// Counts prompt tokens; the CLI passes the o200k_harmony tokenizer.
pub type TokenCounter<'a> = &'a (dyn Fn(&str) -> usize + Sync);
/// A check this crate cannot make itself, such as front matter another crate reads (`triage:`).
pub type ExtraCheck<'a> = &'a (dyn Fn(&Policy) -> Vec<Finding> + Sync);

#[derive(Clone)]
pub struct LintOptions<'a> {
    /// Above this many body tokens the policy is an error: the model degrades past about 10,000.
    pub max_tokens: usize,
    /// Outside this range the policy gets a warning.
    pub sweet_spot: RangeInclusive<usize>,
    /// Exact token counter. Without one, tokens are estimated as characters / 4 and the findings say so.
    pub count_tokens: Option<TokenCounter<'a>>,
    /// Run on every policy that parses; its findings join the report.
    pub extra_check: Option<ExtraCheck<'a>>,
}

impl Default for LintOptions<'_> {
    fn default() -> Self {
        LintOptions { max_tokens: 10_000, sweet_spot: 400..=600, count_tokens: None, extra_check: None }
    }
}

impl std::fmt::Debug for LintOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LintOptions")
            .field("max_tokens", &self.max_tokens)
            .field("sweet_spot", &self.sweet_spot)
            .field("count_tokens", &self.count_tokens.map(|_| "fn"))
            .field("extra_check", &self.extra_check.map(|_| "fn"))
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Error,
}

impl std::fmt::Display for Severity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub severity: Severity,
    /// Stable kebab-case identifier, e.g. `hedge-word`; safe to match on in CI scripts.
    pub code: String,
    pub message: String,
    /// 1-based line of the policy file, when the finding has a place.
    pub line: Option<usize>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LintReport {
    pub policy_name: Option<String>,
    pub policy_hash: Option<String>,
    /// Tokens of the body (what the model reads).
    pub tokens: Option<usize>,
    /// False when `tokens` is the characters / 4 estimate.
    pub tokens_exact: bool,
    pub findings: Vec<Finding>,
}

impl LintReport {
    pub fn errors(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|finding| finding.severity == Severity::Error)
    }

    pub fn warnings(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|finding| finding.severity == Severity::Warning)
    }

    pub fn has_errors(&self) -> bool {
        self.errors().next().is_some()
    }

    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }
}

/// Lint policy text (front matter included). Never fails: a policy that does not parse is one error finding.
pub fn lint(policy_text: &str, opts: &LintOptions<'_>) -> LintReport {
    match Policy::parse(policy_text) {
        Ok(policy) => lint_policy(&policy, opts),
        Err(err) => LintReport {
            findings: vec![Finding {
                severity: Severity::Error,
                code: "parse-error".to_string(),
                message: err.to_string(),
                line: err.line(),
            }],
            ..LintReport::default()
        },
    }
}

/// Lint a policy file. Only an unreadable file is an `Err`; a file that is too large, not UTF-8 or not a
/// valid policy is a report with one `parse-error` finding, so a batch lint keeps going.
pub fn lint_file(path: &std::path::Path, opts: &LintOptions<'_>) -> Result<LintReport, crate::PolicyError> {
    let parse_error = |err: crate::PolicyError| LintReport {
        findings: vec![Finding {
            severity: Severity::Error,
            code: "parse-error".to_string(),
            message: err.to_string(),
            line: err.line(),
        }],
        ..LintReport::default()
    };
    let bytes = match crate::read_policy_file(path) {
        Ok(bytes) => bytes,
        Err(err @ crate::PolicyError::Io { .. }) => return Err(err),
        Err(err) => return Ok(parse_error(err)),
    };
    let text = match crate::decode_utf8(&bytes) {
        Ok(text) => text,
        Err(err) => return Ok(parse_error(err)),
    };
    let stem = path.file_stem().and_then(|stem| stem.to_str());
    Ok(match Policy::parse_with_fallback_name(text, stem) {
        Ok(policy) => lint_policy(&policy, opts),
        Err(err) => parse_error(err),
    })
}

/// Lint an already parsed policy.
pub fn lint_policy(policy: &Policy, opts: &LintOptions<'_>) -> LintReport {
    let _span = tracing::debug_span!("policy_lint", policy = %policy.meta.name).entered();
    let mut linter = Linter { findings: Vec::new() };
    let (tokens, tokens_exact) = match opts.count_tokens {
        Some(count) => (count(&policy.body), true),
        None => (policy.body.chars().count().div_ceil(4), false),
    };
    linter.check_length(tokens, tokens_exact, opts);
    let lines = classify_lines(policy);
    linter.check_sections(&lines);
    linter.check_output_format(policy, &lines);
    linter.check_hedges(&lines);
    linter.check_rule_ids(policy, &lines);
    linter.check_examples(&lines);
    linter.check_escalation(&lines);
    if let Some(check) = opts.extra_check {
        linter.findings.extend(check(policy));
    }
    linter.findings.sort_by_key(|finding| (std::cmp::Reverse(finding.severity), finding.line.unwrap_or(0)));
    LintReport {
        policy_name: Some(policy.meta.name.clone()),
        policy_hash: Some(policy.hash.to_string()),
        tokens: Some(tokens),
        tokens_exact,
        findings: linter.findings,
    }
}

struct Line<'a> {
    number: usize,
    text: &'a str,
    code: bool,
    /// The level, when the line is a heading.
    level: Option<u8>,
    role: Role,
    /// Index of the heading this line falls under (the heading line itself included).
    section: Option<usize>,
}

fn classify_lines(policy: &Policy) -> Vec<Line<'_>> {
    let mut fences = FenceTracker::default();
    let mut outline = Outline::default();
    let mut section = None;
    let mut count = 0usize;
    policy
        .body
        .lines()
        .enumerate()
        .map(|(index, text)| {
            let code = fences.is_code(text);
            let mut level = None;
            if !code && let Some((found, title)) = heading(text) {
                level = Some(found);
                outline.enter(found, title);
                section = Some(count);
                count += 1;
            }
            Line { number: policy.body_start_line + index, text, code, level, role: outline.role(), section }
        })
        .collect()
}

static TITLE_PREFIX: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\(\s*#?([A-Z]{1,4})\s*\)").expect("static regex"));
/// An id-shaped token the rule-id grammar reads only part of: an uppercase part ("SP1.A") or a second level
/// ("SP1.a.i").
static OVERLONG_RULE_ID: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\b[A-Z]{1,4}[0-9]+\.(?:[A-Z][A-Za-z0-9]*|[a-z0-9]+\.[A-Za-z0-9]+)\b").expect("static regex")
});
static HEDGE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)\b(generally|usually|may|might|often|typically)\b").expect("static regex"));
static ANSWER_VERB: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)\b(return|respond|answer|output|reply)\b").expect("static regex"));
/// Inference needs "exactly one character" to call a policy binary; a policy already declared binary states its
/// format with any "one character".
static BINARY_FORMAT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(&format!("{}|one character", crate::front_matter::BINARY_WORDING)).expect("static regex")
});
static JSON_FORMAT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r#"(?i)\bjson\b|"violation""#).expect("static regex"));
static ESCALATION: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)escalat|manual review|human review|needs review|human moderator").expect("static regex")
});
static LIST_ITEM: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^\s{0,3}(?:[-*+]|[0-9]{1,3}[.)])\s+").expect("static regex"));
static LABEL_MARKER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r#"(?i)->|→|=>|\blabel\b|\bexpected\b|\banswer\b|"violation"\s*:|:\s*[01]\b|\(\s*[01]\s*\)"#)
        .expect("static regex")
});
/// A list item that only gives the label of the item before it ("- Label: 1" after "- Content: …").
static LABEL_ITEM: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)^\s{0,3}(?:[-*+]|[0-9]{1,3}[.)])\s+(?:\*\*)?(?:label|answer|expected|output|verdict)\b")
        .expect("static regex")
});
static LABEL_WORD: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b(VALID|INVALID|ESCALATE|VIOLATION|SAFE)\b").expect("static regex"));

struct Linter {
    findings: Vec<Finding>,
}

impl Linter {
    fn push(&mut self, severity: Severity, code: &str, message: impl Into<String>, line: Option<usize>) {
        self.findings.push(Finding { severity, code: code.to_string(), message: message.into(), line });
    }

    fn check_length(&mut self, tokens: usize, exact: bool, opts: &LintOptions<'_>) {
        let about = if exact { "" } else { "about " };
        let note = if exact { "" } else { " (estimated as characters / 4; pass a tokenizer for an exact count)" };
        if tokens > opts.max_tokens {
            self.push(
                Severity::Error,
                "too-long",
                format!(
                    "the policy is {about}{tokens} tokens, over the {} maximum{note}; the model loses track of long policies",
                    opts.max_tokens
                ),
                None,
            );
        } else if !opts.sweet_spot.contains(&tokens) {
            self.push(
                Severity::Warning,
                "length-outside-sweet-spot",
                format!(
                    "the policy is {about}{tokens} tokens; the model follows policies of {}-{} tokens best{note}",
                    opts.sweet_spot.start(),
                    opts.sweet_spot.end()
                ),
                None,
            );
        }
    }

    fn check_sections(&mut self, lines: &[Line<'_>]) {
        let has = |role: Role| lines.iter().any(|line| line.level.is_some() && line.role == role);
        if !has(Role::Instructions) {
            self.push(
                Severity::Error,
                "missing-instructions",
                "no INSTRUCTIONS section: say what to classify and exactly how to answer, at the top",
                None,
            );
        }
        if !has(Role::Definitions) {
            self.push(Severity::Warning, "missing-definitions", "no DEFINITIONS section: define the key terms", None);
        }
        if !has(Role::Violating) {
            self.push(
                Severity::Error,
                "missing-criteria",
                "no VIOLATES criteria section: list what violates the policy, with rule ids",
                None,
            );
        }
        if !has(Role::NonViolating) {
            self.push(
                Severity::Warning,
                "missing-safe-criteria",
                "no DOES NOT VIOLATE / SAFE section: say what is allowed, so the boundary is clear from both sides",
                None,
            );
        }
        if !has(Role::Examples) {
            self.push(
                Severity::Warning,
                "missing-examples",
                "no EXAMPLES section: add 4-6 labelled examples near the decision boundary",
                None,
            );
        }
        self.check_empty_sections(lines);
    }

    /// A heading with nothing under it (no text, no sub-heading) gives the model nothing to apply. An empty
    /// INSTRUCTIONS or VIOLATES section is as bad as a missing one, so it is the same error, unless another
    /// section with that role has content.
    fn check_empty_sections(&mut self, lines: &[Line<'_>]) {
        // (line index, level, role, has content, has sub-headings), in order.
        let mut headings: Vec<(usize, u8, Role, bool, bool)> = Vec::new();
        for (index, line) in lines.iter().enumerate() {
            let Some(level) = line.level else { continue };
            let mut content = false;
            let mut nested = false;
            for below in &lines[index + 1..] {
                match below.level {
                    Some(deeper) if deeper > level => nested = true,
                    Some(_) => break,
                    None => content |= !below.text.trim().is_empty(),
                }
                if content {
                    break;
                }
            }
            headings.push((index, level, line.role, content, nested));
        }
        let filled = |role: Role| headings.iter().any(|&(_, _, r, content, _)| r == role && content);
        for &(index, _, role, content, nested) in &headings {
            // A heading whose sub-headings are all empty is reported through them, once each.
            if content || nested {
                continue;
            }
            let line = &lines[index];
            let title = heading(line.text).map_or("", |(_, title)| title);
            let (severity, why) = match role {
                Role::Violating if !filled(Role::Violating) => {
                    (Severity::Error, "a policy with no violation criteria cannot be applied")
                }
                Role::Instructions if !filled(Role::Instructions) => {
                    (Severity::Error, "the model is never told what to classify or how to answer")
                }
                _ => (Severity::Warning, "fill it in or remove the heading"),
            };
            self.push(severity, "empty-section", format!("section \"{title}\" is empty: {why}"), Some(line.number));
        }
    }

    fn check_output_format(&mut self, policy: &Policy, lines: &[Line<'_>]) {
        let output = &policy.meta.output;
        let names_format = |text: &str| match output {
            OutputFormat::Binary => BINARY_FORMAT.is_match(text),
            OutputFormat::Json => JSON_FORMAT.is_match(text),
            OutputFormat::Labels { violating, safe, escalate } => violating
                .iter()
                .chain(safe)
                .chain(escalate)
                .any(|label| text.to_lowercase().contains(&label.to_lowercase())),
        };
        let statements: Vec<&Line<'_>> = lines
            .iter()
            .filter(|line| !line.code && ANSWER_VERB.is_match(line.text) && names_format(line.text))
            .collect();
        match statements.as_slice() {
            [] => self.push(
                Severity::Error,
                "missing-output-format",
                format!(
                    "the policy never states the {} output format in words (e.g. \"Return exactly one character: 0 or 1\")",
                    output.kind()
                ),
                None,
            ),
            [only] => self.push(
                Severity::Warning,
                "output-format-stated-once",
                "the output format is stated once; state it in INSTRUCTIONS and repeat it right before EXAMPLES",
                Some(only.number),
            ),
            _ => {}
        }
        if !statements.is_empty() && !statements.iter().any(|line| line.role == Role::Instructions) {
            self.push(
                Severity::Warning,
                "output-format-not-in-instructions",
                "the output format is not stated in the INSTRUCTIONS section at the top",
                statements.first().map(|line| line.number),
            );
        }
        if policy.meta.output_declared
            && let Some(inferred) = infer_output(&policy.body)
            && inferred.kind() != output.kind()
        {
            self.push(
                Severity::Warning,
                "output-format-mismatch",
                format!(
                    "the front matter declares `{}` output but the text reads like `{}` output",
                    output.kind(),
                    inferred.kind()
                ),
                None,
            );
        }
    }

    fn check_hedges(&mut self, lines: &[Line<'_>]) {
        let mut found = Vec::new();
        for line in lines {
            if line.code || !matches!(line.role, Role::Violating | Role::NonViolating) {
                continue;
            }
            for hedge in HEDGE.find_iter(line.text) {
                found.push((line.number, hedge.as_str().to_string()));
            }
        }
        for (number, word) in found {
            self.push(
                Severity::Warning,
                "hedge-word",
                format!("\"{word}\" in the criteria: state the rule outright or move the case to the escalation path"),
                Some(number),
            );
        }
    }

    fn check_rule_ids(&mut self, policy: &Policy, lines: &[Line<'_>]) {
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for definition in &policy.rule_definitions {
            if let Some(first) = seen.get(definition.rule_id.as_str()) {
                self.push(
                    Severity::Error,
                    "duplicate-rule-id",
                    format!("rule id {} is defined again (first on line {first})", definition.rule_id),
                    Some(definition.line),
                );
            } else {
                seen.insert(&definition.rule_id, definition.line);
            }
        }
        // Matched exactly against what the model cites: an id the policy does not define would never send anything.
        for id in policy.meta.escalate_on.iter().filter(|id| !policy.knows_category(id)) {
            self.push(
                Severity::Error,
                "undefined-escalate-on",
                format!("escalate_on names {id}, which is not a rule id, tier or category of this policy"),
                None,
            );
        }
        // An id written past the grammar ("SP1.A", "SP1.a.i") is read as its tier or first level: the model cites
        // it whole, and the citation names no rule the policy has. Only ids with the policy's own letters count
        // ("V1.2.3" is a version, not a rule).
        let prefixes = rule_prefixes(policy);
        let mut misread = std::collections::BTreeSet::new();
        for line in lines.iter().filter(|line| !line.code) {
            for found in OVERLONG_RULE_ID.find_iter(line.text) {
                let Some(&(_, read_as)) = find_rule_ids(found.as_str()).first() else { continue };
                if prefixes.contains(id_prefix(read_as)) && misread.insert(found.as_str()) {
                    self.push(
                        Severity::Warning,
                        "rule-id-shape",
                        format!(
                            "{} is read as rule {read_as}: a rule id is capitals, digits and at most one lowercase \
                             part (SP1.a)",
                            found.as_str()
                        ),
                        Some(line.number),
                    );
                }
            }
        }
        let mut reported = std::collections::BTreeSet::new();
        // Code is format samples and placeholders, not citations.
        for line in lines.iter().filter(|line| !line.code) {
            for (_, id) in find_rule_ids(line.text) {
                // "SP500", "H264": a bare token of three digits or more is a figure or a standard far more often
                // than a rule (rules number in ones and tens), whatever its prefix.
                let figure = !id.contains('.') && id.bytes().filter(u8::is_ascii_digit).count() >= 3;
                if policy.knows_rule(id) || figure || !reported.insert(id) {
                    continue;
                }
                let place = if line.role == Role::Examples { " in an example" } else { "" };
                if prefixes.contains(id_prefix(id)) {
                    self.push(
                        Severity::Error,
                        "undefined-rule-id",
                        format!(
                            "rule id {id} is cited{place} but never defined (define it at the start of a list item)"
                        ),
                        Some(line.number),
                    );
                } else if id.contains('.') {
                    // Rule-shaped but with another prefix: a typo or a rule of another policy. Bare tokens such
                    // as PS5, N95 or ISO27001 are product names and standards far more often than rule ids.
                    let ours = if prefixes.is_empty() {
                        "this policy defines no rule ids".to_string()
                    } else {
                        let list: Vec<&str> = prefixes.iter().copied().collect();
                        format!("this policy's rule ids start with {}", list.join(", "))
                    };
                    self.push(
                        Severity::Warning,
                        "unknown-rule-prefix",
                        format!("{id} is cited{place} and looks like a rule id, but {ours}"),
                        Some(line.number),
                    );
                }
            }
        }
    }

    fn check_examples(&mut self, lines: &[Line<'_>]) {
        // An example is a list item in an examples section, with the lines that follow it (code blocks
        // included) up to the next item or heading. Examples written as sub-headings are one example each.
        let mut items: Vec<(usize, String)> = Vec::new();
        let mut headed: BTreeMap<usize, (usize, String)> = BTreeMap::new();
        // Sections that hold deeper ones: "## EXAMPLES" over "### Example 1" is a title, its text an introduction.
        let mut parents = std::collections::BTreeSet::new();
        let mut last_heading: Option<(usize, u8)> = None;
        let mut in_item = false;
        for line in lines {
            if line.role != Role::Examples {
                in_item = false;
                continue;
            }
            if let Some(level) = line.level {
                in_item = false;
                if let Some(section) = line.section {
                    if let Some((parent, parent_level)) = last_heading
                        && level > parent_level
                    {
                        parents.insert(parent);
                    }
                    last_heading = Some((section, level));
                    headed.insert(section, (line.number, String::new()));
                }
                continue;
            }
            let label_of_previous = in_item && LABEL_ITEM.is_match(line.text);
            if !line.code && LIST_ITEM.is_match(line.text) && !label_of_previous {
                items.push((line.number, line.text.to_string()));
                in_item = true;
            } else if in_item && let Some(item) = items.last_mut() {
                item.1.push('\n');
                item.1.push_str(line.text);
            }
            if let Some(entry) = line.section.and_then(|section| headed.get_mut(&section)) {
                entry.1.push('\n');
                entry.1.push_str(line.text);
            }
        }
        let labelled = |text: &str| LABEL_MARKER.is_match(text) || LABEL_WORD.is_match(text);
        let candidates: Vec<(usize, String)> = if items.is_empty() {
            headed
                .into_iter()
                .filter(|(section, (_, text))| !parents.contains(section) && !text.trim().is_empty())
                .map(|(_, example)| example)
                .collect()
        } else {
            items
        };
        for (number, text) in candidates {
            if !labelled(&text) {
                self.push(
                    Severity::Warning,
                    "unlabeled-example",
                    "example without a label: end it with the expected answer, e.g. `-> 1` or a JSON answer",
                    Some(number),
                );
            }
        }
    }

    fn check_escalation(&mut self, lines: &[Line<'_>]) {
        if !lines.iter().any(|line| ESCALATION.is_match(line.text)) {
            self.push(
                Severity::Warning,
                "no-escalation-path",
                "no escalation path: say what to answer when a case is ambiguous (e.g. escalate to human review)",
                None,
            );
        }
    }
}

/// The letters before a rule id's digits: `SP` for `SP2.a`.
fn id_prefix(id: &str) -> &str {
    let end = id.find(|c: char| !c.is_ascii_uppercase()).unwrap_or(id.len());
    &id[..end]
}

/// The prefixes this policy's rule ids use: those of the rules it defines, of the tiers and ids its front matter
/// names, and the one its title announces ("# Spam Policy (SP)"). An undefined id with one of these prefixes is
/// a citation of a missing rule; any other id-shaped token (PS5, CO2) is most likely not a rule id at all.
fn rule_prefixes(policy: &Policy) -> std::collections::BTreeSet<&str> {
    let named = policy.rule_ids.iter().chain(&policy.meta.categories).chain(&policy.meta.escalate_on);
    let mut prefixes: std::collections::BTreeSet<&str> =
        named.filter(|id| crate::is_rule_id(id)).map(|id| id_prefix(id)).collect();
    let title = policy.sections.iter().find(|section| section.level == 1).map(|section| section.title.as_str());
    if let Some(found) = title.and_then(|title| TITLE_PREFIX.captures(title)).and_then(|caps| caps.get(1)) {
        prefixes.insert(found.as_str());
    }
    prefixes
}

//! Policy files: front matter, sections, rule ids, content-hash versions, lint, the starter library.
//!
//! A policy is a Markdown file, optionally starting with YAML front matter between `---` lines. The
//! front matter is for tooling (name, output format, severity tiers, …); the body is the exact text the
//! model reads, so the body alone decides a policy's identity ([`PolicyHash`]). Front matter is plain YAML:
//! anchors and aliases (`&name`, `*name`) are refused, and so is front matter over [`MAX_FRONT_MATTER_BYTES`].

mod error;
mod front_matter;
pub mod lint;
mod markdown;
mod starter;
mod yaml_guard;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use error::PolicyError;
pub use markdown::{FenceTracker, RuleDefinition, Section, find_rule_ids, heading, is_rule_id};
pub use starter::{STARTER_POLICIES, StarterPolicy, starter_library};

/// A label as answers are matched against it: uppercase, single spaces, `+` spaced, so "invalid+escalate" and
/// "INVALID + ESCALATE" compare equal. The verdict reader compares answers so, and policies are checked so.
pub fn normalize_label(label: &str) -> String {
    let spaced = label.replace('+', " + ");
    spaced.split_whitespace().collect::<Vec<_>>().join(" ").to_uppercase()
}

/// Policy files larger than this are refused: a policy this long is far past the length the model
/// handles well (about 10,000 tokens), so it is almost certainly the wrong file.
pub const MAX_POLICY_BYTES: usize = 1024 * 1024;

/// Front matter (the YAML between the `---` lines) larger than this is refused: it holds metadata, routing and
/// triage rules (room for the 10,000 keywords a rule set may hold), and any client can send a policy inline.
pub const MAX_FRONT_MATTER_BYTES: usize = 256 * 1024;

/// Headings and rule definitions past these are refused. A megabyte of one-character headings would otherwise
/// parse into half a million sections (tens of megabytes, from any client that may send a policy inline), and
/// reading a rule's side walks them.
pub const MAX_SECTIONS: usize = 4096;
pub const MAX_RULE_DEFINITIONS: usize = 16_384;

/// Whether a policy is held to the checks newer than some stored versions: the front matter's size cap, YAML
/// anchors and aliases, blank or two-sided labels, NUL characters, the caps on headings and rule definitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrontMatterChecks {
    Refuse,
    Skip,
}

/// A parsed policy. `body` is exactly what goes into the prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    pub meta: PolicyMeta,
    /// The file minus front matter, trimmed, with CRLF line ends turned into LF.
    pub body: String,
    /// sha256 of `body`.
    pub hash: PolicyHash,
    /// Headings of the body with the text under each (up to the next heading of any level).
    pub sections: Vec<Section>,
    /// Rule ids the policy defines: at the start of a line, list item or heading in a section that lists rules.
    /// An id in bold or in a heading there, or at the start of a line elsewhere (examples, instructions,
    /// escalation), defines it only when nothing else does: such places mostly cite rules defined elsewhere.
    pub rule_ids: BTreeSet<String>,
    /// Every rule-id-shaped token in the body, defined or merely mentioned.
    pub mentioned_rule_ids: BTreeSet<String>,
    /// Each place a rule id is defined, in order; the same id twice means a duplicate definition.
    pub rule_definitions: Vec<RuleDefinition>,
    /// 1-based line of the file on which the body starts (after any front matter), for error messages.
    pub body_start_line: usize,
}

/// Content address of a policy body. Display is `sha256:<64 hex>`.
///
/// Only the body is hashed: the model sees only the body, so two files whose bodies agree produce the same
/// prompts and the same verdicts, whatever their front matter says. Renaming a policy or bumping its
/// human version label therefore does not invalidate stored verdicts or cached prompt prefixes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PolicyHash(pub String);

impl PolicyHash {
    pub fn of_body(body: &str) -> Self {
        PolicyHash(format!("sha256:{}", hex::encode(Sha256::digest(body.as_bytes()))))
    }

    /// The 64 hex digits without the `sha256:` prefix.
    pub fn hex(&self) -> &str {
        self.0.strip_prefix("sha256:").unwrap_or(&self.0)
    }

    /// First 12 hex digits: enough to tell versions apart in logs and headings.
    pub fn short(&self) -> &str {
        let hex = self.hex();
        hex.get(..12).unwrap_or(hex)
    }
}

impl fmt::Display for PolicyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the front matter says about a policy (with defaults filled in from the body).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyMeta {
    pub name: String,
    /// A human label such as "2026-11 draft"; identity is the hash, not this.
    pub version: Option<String>,
    pub output: OutputFormat,
    /// True when `output` was read from the front matter rather than guessed from the body.
    pub output_declared: bool,
    pub description: Option<String>,
    /// Violation categories the policy reports in `policy_category` (usually rule-id tiers such as `HT3`).
    pub categories: Vec<String>,
    /// Severity tiers from least to most severe.
    pub severities: Vec<String>,
    /// High-risk policies are never skipped by triage and a low-confidence answer goes to a person.
    pub high_risk: bool,
    /// How long an item under this policy may wait for a person before it counts as overdue (`review_sla: 4h`);
    /// the server's default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review_sla_secs: Option<u64>,
    /// Rule ids or id prefixes (e.g. `SX4`) whose violations always go to a person.
    pub escalate_on: Vec<String>,
    /// Which policy wins when several flag the same content, higher first.
    pub precedence: Option<i64>,
    pub owner: Option<String>,
    pub tags: Vec<String>,
    /// Front matter keys this version does not know, kept so that nothing the author wrote is lost.
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// How the policy asks the model to answer in the final channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "format", rename_all = "snake_case")]
pub enum OutputFormat {
    /// One character: `1` violates, `0` does not.
    Binary,
    /// A word label such as `VALID` / `INVALID` / `INVALID + ESCALATE`.
    Labels { violating: Vec<String>, safe: Vec<String>, escalate: Vec<String> },
    /// A JSON object with at least `violation`.
    Json,
}

impl OutputFormat {
    pub fn kind(&self) -> &'static str {
        match self {
            OutputFormat::Binary => "binary",
            OutputFormat::Labels { .. } => "labels",
            OutputFormat::Json => "json",
        }
    }
}

impl Policy {
    /// Parse policy text. The name falls back to the first `# ` heading.
    pub fn parse(text: &str) -> Result<Policy, PolicyError> {
        Self::parse_with_fallback_name(text, None)
    }

    /// Parse policy text; `fallback_name` (usually the file stem) is used when neither the front matter
    /// nor a `# ` heading names the policy.
    pub fn parse_with_fallback_name(text: &str, fallback_name: Option<&str>) -> Result<Policy, PolicyError> {
        Self::parse_checked(text, fallback_name, FrontMatterChecks::Refuse)
    }

    /// Parse a version this deployment stored earlier, without the front matter checks newer than it (anchors
    /// and aliases, [`MAX_FRONT_MATTER_BYTES`]): its YAML was read whole when it was stored, so it cannot be one
    /// that expands without bound, and refusing it now would strand every decision judged under it (a stored
    /// version cannot be changed, only replaced).
    pub fn parse_stored(text: &str, fallback_name: Option<&str>) -> Result<Policy, PolicyError> {
        Self::parse_checked(text, fallback_name, FrontMatterChecks::Skip)
    }

    fn parse_checked(
        text: &str,
        fallback_name: Option<&str>,
        checks: FrontMatterChecks,
    ) -> Result<Policy, PolicyError> {
        let _span = tracing::debug_span!("policy_parse", bytes = text.len()).entered();
        if text.len() > MAX_POLICY_BYTES {
            return Err(PolicyError::TooLarge { bytes: text.len(), limit: MAX_POLICY_BYTES });
        }
        // Not for a stored version: one SQLite took before this check must still read.
        if matches!(checks, FrontMatterChecks::Refuse)
            && let Some(at) = text.find('\0')
        {
            return Err(PolicyError::NulCharacter { line: text[..at].matches('\n').count() + 1 });
        }
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        // Normalised so that a checkout with Windows line ends hashes to the same policy version.
        let text = text.replace("\r\n", "\n");
        let split = front_matter::split(&text)?;
        let raw_body = &text[split.body_offset..];
        let leading = raw_body.len() - raw_body.trim_start().len();
        let body_start_line = split.body_start_line + raw_body[..leading].matches('\n').count();
        let body = raw_body.trim().to_string();
        if body.is_empty() {
            return Err(PolicyError::EmptyBody { line: split.body_start_line });
        }
        let doc = markdown::analyze(&body, body_start_line);
        // Not for a stored version, as above.
        if matches!(checks, FrontMatterChecks::Refuse) {
            for (what, count, limit) in [
                ("headings", doc.sections.len(), MAX_SECTIONS),
                ("rule definitions", doc.definitions.len(), MAX_RULE_DEFINITIONS),
            ] {
                if count > limit {
                    return Err(PolicyError::TooManyParts { what, count, limit });
                }
            }
        }
        let heading_name = doc
            .sections
            .iter()
            .find(|section| section.level == 1 && !section.title.is_empty())
            .map(|section| section.title.clone());
        let meta = front_matter::build_meta(split.front_matter, heading_name, fallback_name, &body, checks)?;
        Ok(Policy {
            hash: PolicyHash::of_body(&body),
            meta,
            sections: doc.sections,
            rule_ids: doc.definitions.iter().map(|d| d.rule_id.clone()).collect(),
            mentioned_rule_ids: doc.mentioned,
            rule_definitions: doc.definitions,
            body,
            body_start_line,
        })
    }

    /// Read and parse a policy file; its stem names the policy when nothing else does.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let bytes = read_policy_file(path)?;
        let text = decode_utf8(&bytes).map_err(|err| err.at_path(path))?;
        let stem = path.file_stem().and_then(|stem| stem.to_str());
        Self::parse_with_fallback_name(text, stem).map_err(|err| err.at_path(path))
    }

    /// The section whose title matches `predicate`, first one wins.
    pub fn section(&self, mut predicate: impl FnMut(&str) -> bool) -> Option<&Section> {
        self.sections.iter().find(|section| predicate(&section.title))
    }

    /// Which side of the line `rule_id` is on, from the heading it is defined under ("VIOLATES (1)", "DOES NOT
    /// VIOLATE (0)", "Allowed", …: the nearest enclosing section heading that says). A tier prefix (`SP2`) has
    /// the side all its rules share. `None` when the headings do not say, when the definitions disagree, or when
    /// the policy does not put rules on both sides (unless its headings are labelled "(1)" and "(0)"): a heuristic
    /// that finds only one side is more likely misreading the headings than describing the policy. For several ids, [`Policy::rule_sides`] reads the headings once.
    pub fn rule_side(&self, rule_id: &str) -> Option<RuleSide> {
        self.rule_sides().side(rule_id)
    }

    /// The side of every rule definition, read from the headings in one pass over sections and definitions
    /// (both are in line order), so that checking an answer's citations costs the policy's length once, not
    /// once per citation and definition.
    pub fn rule_sides(&self) -> RuleSides<'_> {
        // The headings enclosing the current line, outermost first: each deeper than the one before it.
        let mut enclosing: Vec<(u8, Option<RuleSide>)> = Vec::new();
        let mut sections = self.sections.iter().peekable();
        let mut sides = Vec::with_capacity(self.rule_definitions.len());
        for definition in &self.rule_definitions {
            while let Some(section) = sections.next_if(|s| s.line <= definition.line) {
                while enclosing.last().is_some_and(|(level, _)| *level >= section.level) {
                    enclosing.pop();
                }
                enclosing.push((section.level, heading_side(section)));
            }
            sides.push((definition.rule_id.as_str(), side_of_enclosing(&enclosing)));
        }
        let has = |wanted: RuleSide| sides.iter().any(|(_, side)| *side == Some(wanted));
        // Headings labelled "(1)" and "(0)" leave no doubt which side is which, even when only one of them lists
        // rule ids ("## SAFE (0)\nEverything else."): the word reading below is what needs both sides to trust.
        let labelled = |label: &str| {
            self.sections.iter().any(|section| {
                section.level > 1
                    && find_rule_ids(&section.title).is_empty()
                    && section.title.contains(label)
                    && !section.title.contains(if label == "(1)" { "(0)" } else { "(1)" })
            })
        };
        let both_sides = (has(RuleSide::Violates) && has(RuleSide::Allowed)) || (labelled("(1)") && labelled("(0)"));
        // Sorted by id, so that a lookup finds an id and everything under it ("HT2", "HT2.a"; '.' sorts before any
        // digit, so "HT20" comes after them) in one run: pages look up every rule of a large policy.
        sides.sort_by(|a, b| a.0.cmp(b.0));
        RuleSides { sides, both_sides }
    }

    /// About how much memory the parsed policy holds, for caches that keep many: the body and every copy of its
    /// parts (section texts, rule ids), with what each allocation costs beyond its bytes. An estimate, not a count.
    pub fn approx_heap_bytes(&self) -> usize {
        const PER_ALLOCATION: usize = 32;
        let strings =
            |items: &mut dyn Iterator<Item = &String>| -> usize { items.map(|item| item.len() + PER_ALLOCATION).sum() };
        let meta = &self.meta;
        let sections: usize = self
            .sections
            .iter()
            .map(|s| std::mem::size_of::<Section>() + s.title.len() + s.text.len() + 2 * PER_ALLOCATION)
            .sum();
        let definitions: usize =
            self.rule_definitions.iter().map(|d| std::mem::size_of::<RuleDefinition>() + d.rule_id.len()).sum();
        // A set entry costs about its string plus a share of a tree node.
        let rule_ids = strings(&mut self.rule_ids.iter().chain(&self.mentioned_rule_ids)) * 2;
        let front_matter = meta.name.len()
            + strings(&mut meta.categories.iter().chain(&meta.severities).chain(&meta.escalate_on).chain(&meta.tags))
            + meta.description.as_ref().map_or(0, String::len)
            + meta.extra.values().map(|value| value.to_string().len() * 2).sum::<usize>();
        std::mem::size_of::<Policy>() + self.body.len() + sections + definitions + rule_ids + front_matter
    }

    /// True when `name` is something a verdict can cite for this policy: a rule id or tier it defines, or one of
    /// the `categories:` its front matter names.
    pub fn knows_category(&self, name: &str) -> bool {
        self.knows_rule(name) || self.meta.categories.iter().any(|category| category == name)
    }

    /// True when `rule_id` is defined by this policy, or is a tier prefix of a defined rule
    /// (`SP2` when the policy defines `SP2.a`).
    pub fn knows_rule(&self, rule_id: &str) -> bool {
        if self.rule_ids.contains(rule_id) {
            return true;
        }
        let prefix = format!("{rule_id}.");
        self.rule_ids.iter().any(|known| known.starts_with(&prefix))
    }
}

/// Which side of a policy's line a rule is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleSide {
    /// Content the rule describes violates the policy.
    Violates,
    /// Content the rule describes does not (an exception, a safe case).
    Allowed,
}

impl RuleSide {
    /// The side a heading announces, if it clearly announces one. An explicit label, "(1)" or "(0)", decides.
    /// Otherwise whole words are read ("SAFETY" is not "SAFE"), each flipped by a negation up to two words before
    /// it ("Does not violate", "Never allowed", "Not a violation"); a heading with words for both sides says
    /// nothing.
    pub fn of_heading(title: &str) -> Option<RuleSide> {
        match (title.contains("(1)"), title.contains("(0)")) {
            (true, false) => return Some(RuleSide::Violates),
            (false, true) => return Some(RuleSide::Allowed),
            _ => {}
        }
        const NEGATIONS: [&str; 10] =
            ["NOT", "NO", "NON", "NEVER", "NOR", "ISN'T", "DOESN'T", "DON'T", "AREN'T", "WITHOUT"];
        const LINKING: [&str; 16] = [
            "A",
            "AN",
            "AS",
            "THE",
            "BE",
            "IS",
            "ARE",
            "COUNT",
            "COUNTS",
            "CONSIDERED",
            "TREATED",
            "REGARDED",
            "SEEN",
            "CONSTITUTE",
            "CONSTITUTES",
            "CONSIDER",
        ];
        const LINKING_WORDS_READ_THROUGH: usize = 4;
        let upper = title.to_uppercase().replace('\u{2019}', "'");
        let words: Vec<&str> =
            upper.split(|c: char| !c.is_alphanumeric() && c != '\'').filter(|w| !w.is_empty()).collect();
        let (mut violates, mut allowed) = (false, false);
        for (index, word) in words.iter().enumerate() {
            let side = if word.starts_with("VIOLAT")
                || ["PROHIBITED", "DISALLOWED", "FORBIDDEN", "UNSAFE", "UNACCEPTABLE", "BANNED"].contains(word)
            {
                RuleSide::Violates
            } else if ["SAFE", "ALLOWED", "PERMITTED", "ACCEPTABLE", "EXCEPTION", "EXCEPTIONS", "BENIGN"].contains(word)
            {
                RuleSide::Allowed
            } else {
                continue;
            };
            // "Does not count as a violation": a negation further back still reads through words that only link it
            // to the side word, but not through words of substance ("Not in scope, allowed" allows).
            let negated = words[index.saturating_sub(2)..index].iter().any(|w| NEGATIONS.contains(w))
                || words[..index]
                    .iter()
                    .rev()
                    .take(LINKING_WORDS_READ_THROUGH + 1)
                    .find(|w| !LINKING.contains(w))
                    .is_some_and(|w| NEGATIONS.contains(w));
            match (side, negated) {
                (RuleSide::Violates, false) | (RuleSide::Allowed, true) => violates = true,
                (RuleSide::Allowed, false) | (RuleSide::Violates, true) => allowed = true,
            }
        }
        match (violates, allowed) {
            (true, false) => Some(RuleSide::Violates),
            (false, true) => Some(RuleSide::Allowed),
            _ => None,
        }
    }
}

/// Every rule definition's side, from [`Policy::rule_sides`].
#[derive(Debug, Clone)]
pub struct RuleSides<'a> {
    sides: Vec<(&'a str, Option<RuleSide>)>,
    both_sides: bool,
}

impl RuleSides<'_> {
    /// See [`Policy::rule_side`].
    pub fn side(&self, rule_id: &str) -> Option<RuleSide> {
        if !self.both_sides {
            return None;
        }
        let prefix = format!("{rule_id}.");
        let start = self.sides.partition_point(|(id, _)| *id < rule_id);
        let mut matching = self.sides[start..]
            .iter()
            .take_while(|(id, _)| id.starts_with(rule_id))
            .filter(|(id, _)| *id == rule_id || id.starts_with(&prefix))
            .map(|(_, side)| *side);
        let first = matching.next().flatten()?;
        matching.all(|side| side == Some(first)).then_some(first)
    }
}

/// The side a heading puts what it encloses on. A heading that names a rule ("### SX3.a Minors, never acceptable")
/// describes that rule's content, not its side, so it says nothing.
fn heading_side(section: &Section) -> Option<RuleSide> {
    if section.level <= 1 || !find_rule_ids(&section.title).is_empty() {
        return None;
    }
    RuleSide::of_heading(&section.title)
}

/// The side the innermost heading that says one gives, below the policy's title (level 1, "Child Safety"), which
/// says nothing about sides and ends the search.
fn side_of_enclosing(enclosing: &[(u8, Option<RuleSide>)]) -> Option<RuleSide> {
    enclosing.iter().rev().take_while(|(level, _)| *level > 1).find_map(|(_, side)| *side)
}

/// Read a policy file, refusing anything over [`MAX_POLICY_BYTES`] before reading it whole.
pub fn read_policy_file(path: &Path) -> Result<Vec<u8>, PolicyError> {
    let io_err = |source| PolicyError::Io { path: path.to_path_buf(), source };
    let len = std::fs::metadata(path).map_err(io_err)?.len();
    if len > MAX_POLICY_BYTES as u64 {
        return Err(PolicyError::TooLarge {
            bytes: usize::try_from(len).unwrap_or(usize::MAX),
            limit: MAX_POLICY_BYTES,
        }
        .at_path(path));
    }
    std::fs::read(path).map_err(io_err)
}

/// UTF-8 decode with the line and column of the first bad byte in the error.
pub fn decode_utf8(bytes: &[u8]) -> Result<&str, PolicyError> {
    std::str::from_utf8(bytes).map_err(|err| {
        let valid = &bytes[..err.valid_up_to()];
        let line = valid.iter().filter(|&&b| b == b'\n').count() + 1;
        let line_start = valid.iter().rposition(|&b| b == b'\n').map_or(0, |pos| pos + 1);
        PolicyError::InvalidUtf8 { line, column: err.valid_up_to() - line_start + 1, byte_offset: err.valid_up_to() }
    })
}

#[cfg(test)]
mod tests;

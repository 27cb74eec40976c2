//! Just enough Markdown for policies: ATX headings, fenced code blocks, list items and rule ids.

use std::collections::BTreeSet;
use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

/// A heading and the text under it, up to the next heading of any level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Section {
    pub level: u8,
    pub title: String,
    pub text: String,
    /// 1-based file line of the heading.
    pub line: usize,
}

/// One place where the policy defines a rule id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleDefinition {
    pub rule_id: String,
    /// 1-based file line.
    pub line: usize,
}

pub(crate) struct Doc {
    pub sections: Vec<Section>,
    pub definitions: Vec<RuleDefinition>,
    pub mentioned: BTreeSet<String>,
}

static RULE_ID: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"[A-Z]{1,4}[0-9]+(?:\.[a-z0-9]+)?").expect("static regex"));
static LIST_MARKER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^(?:[-*+]|[0-9]{1,3}[.)])\s+").expect("static regex"));

fn is_word_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_'
}

/// Rule-id-shaped tokens in `text` with their byte offsets: 1-4 uppercase letters, digits, and an optional
/// `.suffix` of lowercase letters or digits (`SP2.a`, `H2.f`, `SP0`), not glued to other word characters.
pub fn find_rule_ids(text: &str) -> Vec<(usize, &str)> {
    let bytes = text.as_bytes();
    RULE_ID
        .find_iter(text)
        .filter(|found| {
            let before_ok = found.start() == 0 || !is_word_byte(bytes[found.start() - 1]);
            let after_ok = found.end() == bytes.len() || !is_word_byte(bytes[found.end()]);
            before_ok && after_ok
        })
        .map(|found| (found.start(), found.as_str()))
        .collect()
}

/// True when `text` is exactly one rule id.
pub fn is_rule_id(text: &str) -> bool {
    matches!(find_rule_ids(text).as_slice(), [(0, id)] if id.len() == text.len())
}

/// `(level, title)` when `line` is an ATX heading such as `## VIOLATES (1)`.
pub fn heading(line: &str) -> Option<(u8, &str)> {
    let trimmed = line.trim_start_matches(' ');
    if line.len() - trimmed.len() > 3 {
        return None;
    }
    let level = trimmed.bytes().take_while(|&b| b == b'#').count();
    if level == 0 || level > 6 {
        return None;
    }
    let rest = &trimmed[level..];
    if !rest.is_empty() && !rest.starts_with([' ', '\t']) {
        return None;
    }
    let title = rest.trim().trim_end_matches('#').trim_end();
    Some((u8::try_from(level).ok()?, title))
}

/// Tracks ``` / ~~~ fences so that headings and definitions inside code are ignored.
#[derive(Default)]
pub struct FenceTracker {
    open: Option<(u8, usize)>,
}

impl FenceTracker {
    /// Feed a line; returns true when the line is code (a fence line or inside a fence).
    pub fn is_code(&mut self, line: &str) -> bool {
        let trimmed = line.trim_start();
        let fence_char = trimmed.bytes().next().filter(|&b| b == b'`' || b == b'~');
        let run = fence_char.map_or(0, |c| trimmed.bytes().take_while(|&b| b == c).count());
        match (self.open, fence_char) {
            (Some((c, len)), Some(found)) if found == c && run >= len && trimmed[run..].trim().is_empty() => {
                self.open = None;
                true
            }
            (Some(_), _) => true,
            // A backtick fence's info string holds no backtick (CommonMark): "```{"violation": 0}``` is the
            // answer" opens an inline code span, not a block that would hide every heading after it.
            (None, Some(c)) if run >= 3 && !(c == b'`' && trimmed[run..].contains('`')) => {
                self.open = Some((c, run));
                true
            }
            (None, _) => false,
        }
    }
}

/// What a section is for, judged from its heading (and inherited by its sub-headings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Other,
    Instructions,
    Definitions,
    Violating,
    NonViolating,
    Examples,
    Escalation,
    Precedence,
}

impl Role {
    /// Sections where a rule id at the start of a line introduces the rule. Elsewhere (examples, instructions,
    /// escalation and precedence notes) an id is there to be cited, even at the start of a line.
    fn defines_rules(self) -> bool {
        matches!(self, Role::Other | Role::Violating | Role::NonViolating)
    }
}

pub(crate) fn role_of(title: &str) -> Role {
    let lower = title.to_lowercase();
    let has = |needle: &str| lower.contains(needle);
    let word = |wanted: &str| lower.split(|c: char| !c.is_alphanumeric()).any(|w| w == wanted);
    if has("example") {
        Role::Examples
    } else if has("instruction") {
        Role::Instructions
    } else if has("definition") || has("key terms") || has("glossary") {
        Role::Definitions
    } else if has("escalat") || has("ambigu") {
        Role::Escalation
    } else if word("precedence") {
        Role::Precedence
    } else if let Some(side) = crate::RuleSide::of_heading(title) {
        // Whole words with their negations: a substring test reads "DISALLOWED" and "UNSAFE" as the safe side.
        match side {
            crate::RuleSide::Violates => Role::Violating,
            crate::RuleSide::Allowed => Role::NonViolating,
        }
    } else if word("criteria") || word("rules") {
        Role::Violating
    } else {
        Role::Other
    }
}

/// The roles of the headings enclosing the current line; a heading that says nothing of its purpose
/// ("### Bulk") takes the role of the nearest enclosing one that does.
#[derive(Default)]
pub(crate) struct Outline {
    stack: Vec<(u8, Role)>,
}

impl Outline {
    /// Enter a heading; returns its role.
    pub fn enter(&mut self, level: u8, title: &str) -> Role {
        while self.stack.last().is_some_and(|&(open, _)| open >= level) {
            self.stack.pop();
        }
        let own = role_of(title);
        let role = if own == Role::Other { self.role() } else { own };
        self.stack.push((level, role));
        role
    }

    pub fn role(&self) -> Role {
        self.stack.iter().rev().map(|&(_, role)| role).find(|&role| role != Role::Other).unwrap_or(Role::Other)
    }
}

/// Strip list markers, quote markers and emphasis that may precede a defined rule id.
fn line_lead(line: &str) -> &str {
    let mut rest = line.trim_start();
    while let Some(stripped) = rest.strip_prefix('>') {
        rest = stripped.trim_start();
    }
    if let Some(found) = LIST_MARKER.find(rest) {
        rest = &rest[found.end()..];
    }
    rest.trim_start_matches(['*', '_', '`', '[', '('])
}

/// How sure a place is to define the id it holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// The start of a line, list item or heading in a section that lists rules.
    Definition,
    /// The same shape outside such a section, or an id in bold or in a heading title of one: it defines the
    /// id only when nothing else does, since such places mostly cite rules defined elsewhere.
    Fallback,
}

pub(crate) fn analyze(body: &str, first_line: usize) -> Doc {
    let mut sections: Vec<Section> = Vec::new();
    let mut claims: Vec<(&str, usize, Claim)> = Vec::new();
    let mut mentioned = BTreeSet::new();
    let mut fences = FenceTracker::default();
    let mut outline = Outline::default();
    let mut section_lines: Vec<&str> = Vec::new();

    let flush = |sections: &mut Vec<Section>, lines: &mut Vec<&str>| {
        if let Some(last) = sections.last_mut() {
            last.text = lines.join("\n").trim().to_string();
        }
        lines.clear();
    };

    for (index, line) in body.lines().enumerate() {
        let line_no = first_line + index;
        let in_code = fences.is_code(line);
        for (_, id) in find_rule_ids(line) {
            mentioned.insert(id.to_string());
        }
        if in_code {
            section_lines.push(line);
            continue;
        }
        let (text, is_heading) = if let Some((level, title)) = heading(line) {
            flush(&mut sections, &mut section_lines);
            sections.push(Section { level, title: title.to_string(), text: String::new(), line: line_no });
            outline.enter(level, title);
            (title, true)
        } else {
            section_lines.push(line);
            (line, false)
        };
        let lists_rules = outline.role().defines_rules();
        let lead_id = find_rule_ids(line_lead(text)).first().copied().filter(|&(offset, _)| offset == 0);
        if let Some((_, id)) = lead_id {
            claims.push((id, line_no, if lists_rules { Claim::Definition } else { Claim::Fallback }));
        }
        // Past the start, only bold text or a heading in a section that lists rules can still define an id
        // ("- Tier 2: **SP2.a** Cold promotion"); anywhere else such an id is a citation.
        if lists_rules {
            for (offset, id) in find_rule_ids(text) {
                let before = &text[..offset];
                let bold = before.ends_with("**") || before.ends_with("__");
                if lead_id.is_none_or(|(_, lead)| lead != id) && (is_heading || bold) {
                    claims.push((id, line_no, Claim::Fallback));
                }
            }
        }
    }
    flush(&mut sections, &mut section_lines);

    let defined: BTreeSet<&str> =
        claims.iter().filter(|&&(_, _, claim)| claim == Claim::Definition).map(|&(id, _, _)| id).collect();
    let mut fallback_used: BTreeSet<&str> = BTreeSet::new();
    let definitions = claims
        .into_iter()
        .filter(|&(id, _, claim)| claim == Claim::Definition || (!defined.contains(id) && fallback_used.insert(id)))
        .map(|(id, line, _)| RuleDefinition { rule_id: id.to_string(), line })
        .collect();
    Doc { sections, definitions, mentioned }
}

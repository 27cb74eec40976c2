//! Deterministic rules: keyword lists (Aho-Corasick, ASCII case-insensitive, word-boundary aware),
//! regex lists, and exact-text allow/deny lists. Compiled once into a [`RuleSet`].
//!
//! Precedence inside a rule set: any deny evidence makes the decision `Deny`; otherwise any allow evidence
//! makes it `Allow`; `flag` evidence alone leaves the decision `None` but is reported, and the router keeps
//! flagged text out of the confident-benign band.
//!
//! In policy front matter (`safeguard triage train/eval --policy` read it from there):
//!
//! ```yaml
//! triage:
//!   rules:
//!     keywords:
//!       - { name: weapons, action: flag, keywords: [pipe bomb, nerve agent] }
//!     regexes:
//!       - { name: card-numbers, action: deny, patterns: ['\b\d{4}-\d{4}-\d{4}-\d{4}\b'] }
//!     allow_list: ["hi", "thanks!"]
//!     deny_list: []
//! ```

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};

use crate::TriageError;

/// What a matching rule asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RuleAction {
    /// A violation without asking the model.
    Deny,
    /// Benign without asking the model.
    Allow,
    /// Never skip the model for this text.
    #[default]
    Flag,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeywordList {
    /// Reported as the rule of every match from this list.
    pub name: String,
    #[serde(default)]
    pub action: RuleAction,
    pub keywords: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegexList {
    pub name: String,
    #[serde(default)]
    pub action: RuleAction,
    /// Rust `regex` syntax; matched case-insensitively unless the pattern says `(?-i)`.
    pub patterns: Vec<String>,
}

/// Rules as written in policy front matter (`triage: { rules: … }`) or a triage config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RulesConfig {
    #[serde(default)]
    pub keywords: Vec<KeywordList>,
    #[serde(default)]
    pub regexes: Vec<RegexList>,
    /// Whole texts known to be fine (compared after trimming, lowercasing and collapsing whitespace).
    #[serde(default)]
    pub allow_list: Vec<String>,
    /// Whole texts known to violate (same comparison).
    #[serde(default)]
    pub deny_list: Vec<String>,
}

impl RulesConfig {
    pub fn is_empty(&self) -> bool {
        self.keywords.iter().all(|k| k.keywords.is_empty())
            && self.regexes.iter().all(|r| r.patterns.is_empty())
            && self.allow_list.is_empty()
            && self.deny_list.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleDecision {
    Deny,
    Allow,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpanKind {
    Keyword,
    Regex,
    AllowList,
    DenyList,
}

/// Where a rule matched: byte offsets into the evaluated text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub start: usize,
    pub end: usize,
    /// `list-name: pattern`, so a reviewer sees which entry fired.
    pub rule: String,
    pub kind: SpanKind,
    pub action: RuleAction,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleMatch {
    pub decision: RuleDecision,
    pub evidence: Vec<Span>,
}

impl RuleMatch {
    pub fn flagged(&self) -> bool {
        self.evidence.iter().any(|s| s.action == RuleAction::Flag)
    }
}

#[derive(Debug)]
struct CompiledRegex {
    regex: Regex,
    rule: String,
    action: RuleAction,
}

/// Compiled rules; build once, evaluate many times from any thread.
#[derive(Debug)]
pub struct RuleSet {
    keywords: Option<AhoCorasick>,
    /// Per Aho-Corasick pattern id: (rule label, action, whether each end must sit on a word boundary).
    keyword_meta: Vec<(String, RuleAction, bool, bool)>,
    regexes: Vec<CompiledRegex>,
    allow_list: std::collections::HashSet<String>,
    deny_list: std::collections::HashSet<String>,
}

fn normalize_whole_text(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

impl RuleSet {
    pub fn compile(config: &RulesConfig) -> Result<Self, TriageError> {
        let mut patterns = Vec::new();
        let mut keyword_meta = Vec::new();
        for list in &config.keywords {
            for keyword in &list.keywords {
                let trimmed = keyword.trim();
                if trimmed.is_empty() {
                    return Err(TriageError::InvalidConfig(format!(
                        "keyword list {:?} has an empty keyword",
                        list.name
                    )));
                }
                // A boundary is only required where the keyword itself starts/ends with a word character:
                // "f***" should still match inside "f***ing" only if the author wrote it that way.
                let starts_word = trimmed.chars().next().is_some_and(is_word_char);
                let ends_word = trimmed.chars().last().is_some_and(is_word_char);
                patterns.push(trimmed.to_string());
                keyword_meta.push((format!("{}: {}", list.name, trimmed), list.action, starts_word, ends_word));
            }
        }
        let keywords = if patterns.is_empty() {
            None
        } else {
            Some(
                AhoCorasickBuilder::new()
                    .ascii_case_insensitive(true)
                    .match_kind(MatchKind::Standard)
                    .build(&patterns)
                    .map_err(|e| TriageError::InvalidConfig(format!("keyword automaton: {e}")))?,
            )
        };
        let mut regexes = Vec::new();
        for list in &config.regexes {
            for pattern in &list.patterns {
                let regex =
                    RegexBuilder::new(pattern).case_insensitive(true).size_limit(1 << 22).build().map_err(|e| {
                        TriageError::InvalidConfig(format!("regex list {:?}, pattern {pattern:?}: {e}", list.name))
                    })?;
                regexes.push(CompiledRegex { regex, rule: format!("{}: {}", list.name, pattern), action: list.action });
            }
        }
        Ok(RuleSet {
            keywords,
            keyword_meta,
            regexes,
            allow_list: config.allow_list.iter().map(|t| normalize_whole_text(t)).collect(),
            deny_list: config.deny_list.iter().map(|t| normalize_whole_text(t)).collect(),
        })
    }

    pub fn evaluate(&self, text: &str) -> RuleMatch {
        let mut evidence = Vec::new();
        if !self.allow_list.is_empty() || !self.deny_list.is_empty() {
            let normalized = normalize_whole_text(text);
            if self.deny_list.contains(&normalized) {
                evidence.push(Span {
                    start: 0,
                    end: text.len(),
                    rule: "deny_list".into(),
                    kind: SpanKind::DenyList,
                    action: RuleAction::Deny,
                });
            }
            if self.allow_list.contains(&normalized) {
                evidence.push(Span {
                    start: 0,
                    end: text.len(),
                    rule: "allow_list".into(),
                    kind: SpanKind::AllowList,
                    action: RuleAction::Allow,
                });
            }
        }
        if let Some(automaton) = &self.keywords {
            // Overlapping search so that a keyword failing its boundary check cannot hide another one.
            for m in automaton.find_overlapping_iter(text) {
                let (rule, action, starts_word, ends_word) = &self.keyword_meta[m.pattern().as_usize()];
                let before_ok = !*starts_word || text[..m.start()].chars().next_back().is_none_or(|c| !is_word_char(c));
                let after_ok = !*ends_word || text[m.end()..].chars().next().is_none_or(|c| !is_word_char(c));
                if before_ok && after_ok {
                    evidence.push(Span {
                        start: m.start(),
                        end: m.end(),
                        rule: rule.clone(),
                        kind: SpanKind::Keyword,
                        action: *action,
                    });
                }
            }
        }
        for compiled in &self.regexes {
            for m in compiled.regex.find_iter(text) {
                evidence.push(Span {
                    start: m.start(),
                    end: m.end(),
                    rule: compiled.rule.clone(),
                    kind: SpanKind::Regex,
                    action: compiled.action,
                });
            }
        }
        let decision = if evidence.iter().any(|s| s.action == RuleAction::Deny) {
            RuleDecision::Deny
        } else if evidence.iter().any(|s| s.action == RuleAction::Allow) {
            RuleDecision::Allow
        } else {
            RuleDecision::None
        };
        RuleMatch { decision, evidence }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RulesConfig {
        serde_json::from_value(serde_json::json!({
            "keywords": [
                {"name": "weapons", "action": "flag", "keywords": ["bomb", "pipe bomb"]},
                {"name": "slurs", "action": "deny", "keywords": ["zorgblat"]},
                {"name": "greetings", "action": "allow", "keywords": ["good morning"]}
            ],
            "regexes": [{"name": "card", "action": "deny", "patterns": ["\\b\\d{4}-\\d{4}-\\d{4}-\\d{4}\\b"]}],
            "allow_list": ["Hi there!"],
            "deny_list": ["buy cheap pills now"]
        }))
        .unwrap()
    }

    #[test]
    fn keywords_respect_word_boundaries_and_case() {
        let rules = RuleSet::compile(&config()).unwrap();
        let hit = rules.evaluate("How do I build a BOMB?");
        assert_eq!(hit.decision, RuleDecision::None);
        assert!(hit.flagged());
        assert_eq!(hit.evidence.len(), 1);
        let span = &hit.evidence[0];
        assert_eq!((span.start, span.end), (17, 21));
        assert_eq!(&"How do I build a BOMB?"[span.start..span.end], "BOMB");
        assert_eq!(span.rule, "weapons: bomb");
        assert_eq!(span.kind, SpanKind::Keyword);
        // Inside a longer word: no match.
        assert!(rules.evaluate("the bombastic speech").evidence.is_empty());
        // Overlapping keywords both reported.
        let both = rules.evaluate("a pipe bomb");
        assert_eq!(both.evidence.len(), 2);
    }

    #[test]
    fn deny_beats_allow_and_regexes_give_spans() {
        let rules = RuleSet::compile(&config()).unwrap();
        assert_eq!(rules.evaluate("good morning zorgblat").decision, RuleDecision::Deny);
        assert_eq!(rules.evaluate("good morning friend").decision, RuleDecision::Allow);
        let card = rules.evaluate("my card is 1234-5678-9012-3456 ok");
        assert_eq!(card.decision, RuleDecision::Deny);
        assert_eq!(card.evidence[0].kind, SpanKind::Regex);
        assert_eq!((card.evidence[0].start, card.evidence[0].end), (11, 30));
    }

    #[test]
    fn whole_text_lists_normalize_case_and_whitespace() {
        let rules = RuleSet::compile(&config()).unwrap();
        let allowed = rules.evaluate("  hi   THERE! ");
        assert_eq!(allowed.decision, RuleDecision::Allow);
        assert_eq!(allowed.evidence[0].kind, SpanKind::AllowList);
        assert_eq!(rules.evaluate("Buy cheap pills NOW").decision, RuleDecision::Deny);
        assert_eq!(rules.evaluate("hi there! and more").decision, RuleDecision::None);
    }

    #[test]
    fn bad_config_is_a_clear_error() {
        let bad_regex = RulesConfig {
            regexes: vec![RegexList { name: "x".into(), action: RuleAction::Deny, patterns: vec!["(unclosed".into()] }],
            ..RulesConfig::default()
        };
        let err = RuleSet::compile(&bad_regex).unwrap_err().to_string();
        assert!(err.contains("(unclosed"), "{err}");
        let empty_keyword = RulesConfig {
            keywords: vec![KeywordList { name: "k".into(), action: RuleAction::Flag, keywords: vec!["  ".into()] }],
            ..RulesConfig::default()
        };
        assert!(RuleSet::compile(&empty_keyword).is_err());
        assert!(serde_json::from_str::<RulesConfig>(r#"{"keywordz": []}"#).is_err());
    }

    #[test]
    fn non_ascii_text_does_not_panic_on_boundaries() {
        let rules = RuleSet::compile(&config()).unwrap();
        assert!(rules.evaluate("ébomb").evidence.is_empty());
        assert_eq!(rules.evaluate("é bomb é").evidence.len(), 1);
    }
}

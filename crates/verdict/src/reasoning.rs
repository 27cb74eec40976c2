//! What the chain of thought concluded, read from its last few sentences.
//!
//! A small, explainable heuristic: find conclusion phrases ("so it's a violation", "does not violate",
//! "label 0", "answer: 1", "=> INVALID", "not spam", `"violation": 1`) in the tail of the analysis and take
//! the one that ends last; of two ending at the same place, the longer (negated) one. Negations after the verb
//! ("violates nothing") cancel a phrase. No phrase found means no conclusion, and no disagreement is reported.
//! A last sentence that describes both sides ("a violation of SP2.a, not a scam") is contested: it never
//! supports a "safe" answer.

use std::sync::LazyLock;

use regex::Regex;

use safeguard_policy::OutputFormat;

/// Only the end of the reasoning is read: earlier text weighs both sides before deciding.
const TAIL_BYTES: usize = 700;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conclusion {
    pub violation: bool,
    /// The phrase that decided it, as written.
    pub phrase: String,
    /// A phrase in the same last sentence that concludes the opposite ("it's a violation of SP2.a, not a
    /// scam"): the reasoning did not settle on one side, so it can support neither answer on its own.
    pub contested_by: Option<String>,
}

const HARM_NOUNS: &str = r"violation|violating|violative|spam|phishing|a scam|harassment|hate speech|hateful|prompt injection|a jailbreak|disallowed|prohibited|not allowed";

static VIOLATION_PHRASES: LazyLock<Vec<Regex>> = LazyLock::new(|| {
    [
        format!(
            r"(?i)\b(?:it|this|that|the (?:content|message|text|post|request|prompt|input))(?:'s|\s+is|\s+would be|\s+counts as|\s+constitutes|\s+seems to be|\s+looks like)\s+(?:a\s+|an\s+)?(?:clear\s+|clearly\s+|definitely\s+|policy\s+)?(?:{HARM_NOUNS})\b"
        ),
        r"(?i)\b(?:it|this|that|content|message|text|post|request|prompt|input)\s+(?:clearly\s+|directly\s+|also\s+)?violates\b".to_string(),
        r"(?i)\bso\s+(?:it's\s+|it\s+is\s+)?(?:a\s+)?violation\b".to_string(),
        r"(?i)\b(?:is|as)\s+(?:a\s+)?violation\b".to_string(),
        r#"(?i)"?violation"?\s*[:=]?\s*"?(?:1|true|yes)\b"#.to_string(),
        r"(?i)\b(?:classify|classified|label(?:led|ed)?|flag(?:ged)?|mark(?:ed)?)\s+(?:it\s+|this\s+)?(?:as\s+)?(?:a\s+)?(?:violation|violating|spam|unsafe)\b".to_string(),
    ]
    .iter()
    .map(|pattern| Regex::new(pattern).expect("static regex"))
    .collect()
});

static SAFE_PHRASES: LazyLock<Vec<Regex>> = LazyLock::new(|| {
    [
        format!(
            r"(?i)\b(?:not|no|isn't|is not|doesn't|does not|didn't|did not|nor|without)\s+(?:a\s+|an\s+|any\s+)?(?:clear\s+|real\s+|actual\s+)?(?:{HARM_NOUNS}|violat\w*)"
        ),
        r"(?i)\b(?:it|this|that|the (?:content|message|text|post|request|prompt|input))(?:'s|\s+is|\s+seems|\s+looks|\s+appears)\s+(?:to be\s+)?(?:completely\s+|clearly\s+|totally\s+)?(?:safe|benign|fine|allowed|acceptable|compliant|harmless|ok|okay|legitimate|non-violating)\b".to_string(),
        r#"(?i)"?violation"?\s*[:=]?\s*"?(?:0|false|no)\b"#.to_string(),
        r"(?i)\b(?:classify|classified|label(?:led|ed)?|mark(?:ed)?)\s+(?:it\s+|this\s+)?(?:as\s+)?(?:safe|non-violating|allowed|benign)\b".to_string(),
    ]
    .iter()
    .map(|pattern| Regex::new(pattern).expect("static regex"))
    .collect()
});

/// "label 1", "answer: 0", "output 1", "=> 0", "-> 1": the digit decides. Checked apart from the phrases
/// so that "output 0 or 1" (restating the format) is skipped.
static DIGIT_ANSWER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r#"(?i)(?:\b(?:label|answer|output|verdict|classification|return|respond with|final)\b(?:\s+(?:is|should be|would be|will be|must be))?|=>|->|→)\s*[:=]?\s*["'`*]*([01])\b"#)
        .expect("static regex")
});

/// "return 0 if benign, otherwise 1", "label 1 when it is spam": a digit or label followed by the condition it
/// applies under restates the instructions; it concludes nothing about this content. `text[end..]` follows the
/// digit or label; `others` are the answers on the other side ("0" for a "1"), looked for in the same sentence.
///
/// "for" names a condition only when the sentence also holds the other answer ("output 0 for benign, 1 for spam")
/// or what follows is a generic class ("output 0 for benign posts", "1 for any violating content"). Before a rule
/// id, this content or a class of harm ("label 1 for SP2.a", "output 1 for phishing like this") it is the
/// conclusion.
fn states_a_condition(text: &str, start: usize, end: usize, others: &[&str]) -> bool {
    let rest = text[end..].trim_start();
    let word: String = rest.chars().take_while(|c| c.is_ascii_alphabetic()).collect();
    if word.eq_ignore_ascii_case("for") {
        let next = rest[word.len()..].trim_start();
        let next_word: String = next.chars().take_while(|c| c.is_ascii_alphabetic()).collect();
        let names_this = ["this", "that", "it", "the"].iter().any(|w| next_word.eq_ignore_ascii_case(w));
        let names_rule = safeguard_policy::find_rule_ids(next).first().is_some_and(|&(at, _)| at == 0);
        if names_this || names_rule {
            return false;
        }
        return names_a_class(next) || sentence_holds(text, start, end, others);
    }
    ["if", "when", "otherwise", "else", "unless"].iter().any(|cond| word.eq_ignore_ascii_case(cond))
}

/// Whether `text` starts with a generic class of content ("benign posts", "any violating content", "safe
/// cases") rather than a kind of harm.
fn names_a_class(text: &str) -> bool {
    const SKIPPED: [&str; 7] = ["any", "all", "such", "other", "a", "an", "non"];
    const CLASSES: [&str; 24] = [
        "benign",
        "safe",
        "harmless",
        "allowed",
        "acceptable",
        "compliant",
        "clean",
        "legitimate",
        "normal",
        "violating",
        "violative",
        "violation",
        "violations",
        "content",
        "posts",
        "post",
        "messages",
        "cases",
        "items",
        "inputs",
        "texts",
        "anything",
        "everything",
        "nonviolating",
    ];
    let words = text.split(|c: char| !c.is_ascii_alphabetic()).filter(|word| !word.is_empty());
    for word in words.take(3) {
        let word = word.to_ascii_lowercase();
        if CLASSES.contains(&word.as_str()) {
            return true;
        }
        if !SKIPPED.contains(&word.as_str()) {
            return false;
        }
    }
    false
}

/// Whether the sentence around `start..end` holds one of `others` as a whole word outside that span.
fn sentence_holds(text: &str, start: usize, end: usize, others: &[&str]) -> bool {
    let from = sentence_start(&text[..start]);
    let to = sentence_end(text, end);
    others.iter().filter(|other| !other.trim().is_empty()).any(|other| {
        let pattern = format!(r"(?i)(?:^|[^A-Za-z0-9_]){}(?:$|[^A-Za-z0-9_])", regex::escape(other.trim()));
        Regex::new(&pattern)
            .is_ok_and(|regex| [&text[from..start], &text[end..to]].iter().any(|part| regex.is_match(part)))
    })
}

/// Where the sentence that holds `from` ends: at the next `.`, `!` or `?` followed by a space (or the end), or
/// the next line break.
fn sentence_end(text: &str, from: usize) -> usize {
    let bytes = text.as_bytes();
    (from..bytes.len())
        .find(|&at| {
            bytes[at] == b'\n'
                || matches!(bytes[at], b'.' | b'!' | b'?') && bytes.get(at + 1).is_none_or(u8::is_ascii_whitespace)
        })
        .unwrap_or(bytes.len())
}

struct Match {
    start: usize,
    end: usize,
    violation: bool,
    /// A stated answer ("label 0", "=> INVALID") rather than a description: it settles its sentence.
    explicit: bool,
}

fn tail(text: &str) -> &str {
    if text.len() <= TAIL_BYTES {
        return text;
    }
    let mut start = text.len() - TAIL_BYTES;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

fn label_matches(text: &str, output: &OutputFormat, found: &mut Vec<Match>) {
    let OutputFormat::Labels { violating, safe, escalate } = output else { return };
    let cue = r"(?:\b(?:label|answer|output|verdict|classification|classify as|return|respond with|final)\b(?:\s+(?:is|should be|would be))?|=>|->|→|\bso\b|\bthus\b|\btherefore\b)\s*[:=]?\s*[\x22'`*]*";
    let mut labels: Vec<(&String, bool)> =
        violating.iter().map(|l| (l, true)).chain(safe.iter().map(|l| (l, false))).collect();
    // An escalate label with a violating word in it ("INVALID + ESCALATE") concludes a violation.
    labels.extend(escalate.iter().filter(|l| violating.iter().any(|v| l.contains(v.as_str()))).map(|l| (l, true)));
    for &(label, violation) in &labels {
        let pattern = format!(r"(?i){cue}{}\b", regex::escape(label.trim()));
        // The other side's labels, whose presence in the sentence makes "VALID for questions" a restated format.
        let others: Vec<&str> =
            labels.iter().filter(|(_, side)| *side != violation).map(|(other, _)| other.as_str()).collect();
        if let Ok(regex) = Regex::new(&pattern) {
            found.extend(
                regex
                    .find_iter(text)
                    .filter(|m| !states_a_condition(text, m.start(), m.end(), &others))
                    .map(|m| Match { start: m.start(), end: m.end(), violation, explicit: true }),
            );
        }
    }
}

/// Where the sentence that `head` ends in begins: after the last `.`, `!` or `?` followed by a space (not the
/// dot inside "SP2.a"), or the last line break.
fn sentence_start(head: &str) -> usize {
    let bytes = head.as_bytes();
    (0..bytes.len())
        .rev()
        .find(|&at| {
            bytes[at] == b'\n'
                || matches!(bytes[at], b'.' | b'!' | b'?') && bytes.get(at + 1).is_some_and(u8::is_ascii_whitespace)
        })
        .map_or(0, |at| at + 1)
}

/// The conclusion at the end of the reasoning, if a known phrase states one.
pub fn reasoning_conclusion(analysis: &str, output: &OutputFormat) -> Option<Conclusion> {
    let text = tail(analysis);
    let mut found: Vec<Match> = Vec::new();
    for (phrases, violation) in [(&*VIOLATION_PHRASES, true), (&*SAFE_PHRASES, false)] {
        for regex in phrases {
            // "it violates nothing", "this violates no rule": the negation comes after the verb.
            let negated_after = |end: usize| {
                let rest = text[end..].trim_start().to_ascii_lowercase();
                ["nothing", "no ", "none", "neither", "no rule"].iter().any(|word| rest.starts_with(word))
            };
            found.extend(regex.find_iter(text).filter(|m| !(violation && negated_after(m.end()))).map(|m| Match {
                start: m.start(),
                end: m.end(),
                violation,
                explicit: false,
            }));
        }
    }
    for caps in DIGIT_ANSWER.captures_iter(text) {
        let (Some(whole), Some(digit)) = (caps.get(0), caps.get(1)) else { continue };
        let rest = text[whole.end()..].trim_start();
        let other = if digit.as_str() == "1" { "0" } else { "1" };
        let restates_format = rest.starts_with("or ")
            || rest.starts_with('/')
            || rest.starts_with("and ")
            || states_a_condition(text, whole.start(), whole.end(), &[other]);
        if !restates_format {
            found.push(Match {
                start: whole.start(),
                end: whole.end(),
                violation: digit.as_str() == "1",
                explicit: true,
            });
        }
    }
    label_matches(text, output, &mut found);

    // The phrase that ends last wins; of two ending together, the longer one (it holds the negation).
    let chosen = found.iter().max_by_key(|m| (m.end, std::cmp::Reverse(m.start)))?;
    let phrase = text[chosen.start..chosen.end].trim().to_string();
    // Within the last sentence, an opposite description that does not overlap the chosen phrase contests it,
    // unless the chosen phrase states the answer outright.
    let sentence_start = sentence_start(&text[..chosen.start]);
    let contested_by = (!chosen.explicit)
        .then(|| {
            found.iter().find(|other| {
                other.violation != chosen.violation
                    && other.start >= sentence_start
                    && (other.end <= chosen.start || other.start >= chosen.end)
            })
        })
        .flatten()
        .map(|other| text[other.start..other.end].trim().to_string());
    Some(Conclusion { violation: chosen.violation, phrase, contested_by })
}

//! What the chain of thought concluded, read from its last few sentences.
//!
//! A small, explainable heuristic: find conclusion phrases ("so it's a violation", "does not violate",
//! "label 0", "answer: 1", "=> INVALID", "not spam", `"violation": 1`) in the tail of the analysis and take
//! the one that ends last; of two ending at the same place, the longer (negated) one. Negations after the verb
//! ("violates nothing") cancel a violation phrase, and a negation just before a safe one ("we can't label it
//! safe") cancels it. No phrase found means no conclusion, and no disagreement is reported. A last sentence that
//! describes both sides ("a violation of SP2.a, not a scam") is contested, and so is a safe last sentence after
//! one that says this content violates ("It's phishing. Not spam per se."): neither supports a "safe" answer.

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
    /// scam"), or for a safe conclusion one in the sentence before it that says this content violates: the
    /// reasoning did not settle on one side, so it can support neither answer on its own.
    pub contested_by: Option<String>,
}

const HARM_NOUNS: &str = r"violation|violating|violative|spam|phishing|a scam|harassment|hate speech|hateful|prompt injection|a jailbreak|disallowed|prohibited|not allowed";

static VIOLATION_PHRASES: LazyLock<Vec<Regex>> = LazyLock::new(|| {
    [
        format!(
            r"(?i)\b(?:it|this|that|(?:the|this|that) (?:content|message|text|post|request|prompt|input))(?:'s|\s+is|\s+would be|\s+counts as|\s+constitutes|\s+seems to be|\s+looks like)\s+(?:a\s+|an\s+)?(?:clear\s+|clearly\s+|definitely\s+|policy\s+)?(?:{HARM_NOUNS})\b"
        ),
        r"(?i)\b(?:it|this|that|content|message|text|post|request|prompt|input)\s+(?:clearly\s+|directly\s+|also\s+)?violates\b".to_string(),
        r"(?i)\bso\s+(?:it's\s+|it\s+is\s+)?(?:a\s+)?violation\b".to_string(),
        r"(?i)\b(?:is|as)\s+(?:a\s+)?violation\b".to_string(),
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
        r"(?i)\b(?:classify|classified|label(?:led|ed)?|mark(?:ed)?)\s+(?:it\s+|this\s+)?(?:as\s+)?(?:safe|non-violating|allowed|benign)\b".to_string(),
    ]
    .iter()
    .map(|pattern| Regex::new(pattern).expect("static regex"))
    .collect()
});

/// `"violation": 1`, `violation: no`, "violation 0": the answer's own key with a value. A word value needs the
/// key's `:` or `=`, so "a violation no matter the intent" is no answer. Checked beside [`DIGIT_ANSWER`] so that
/// "output JSON with violation 0 or 1" (restating the format) is skipped; unlike a stated digit, it is a
/// description the rest of its sentence can contest ("It's clearly spam, so violation: 0.").
static VIOLATION_KEY: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r#"(?i)(?:"|\b)violation"?\s*(?:[:=]\s*"?(0|1|false|true|no|yes)|\s+(0|1))\b"#).expect("static regex")
});

/// Words that, among the few before a safe phrase in its clause, take it back: "we can't label it safe". Only
/// safe phrases are taken back so: dropping a violation phrase would be the wrong way to fail.
const NEGATED_BY: [&str; 14] = [
    "not",
    "never",
    "can't",
    "cannot",
    "cant",
    "couldn't",
    "shouldn't",
    "wouldn't",
    "won't",
    "don't",
    "doesn't",
    "isn't",
    "hardly",
    "unlikely",
];

/// Words that make a sentence weigh a possibility, or report what someone else thinks, rather than conclude:
/// "someone might think this is spam", "I first thought it's spam", "the user complains that this violates …".
const HEDGES: [&str; 24] = [
    "might",
    "may",
    "could",
    "would",
    "if",
    "whether",
    "unless",
    "maybe",
    "perhaps",
    "possibly",
    "though",
    "think",
    "thought",
    "seemed",
    "initially",
    "first",
    "says",
    "said",
    "claims",
    "claimed",
    "complains",
    "asks",
    "asked",
    "wonder",
];

/// Whether one of the three words before `start`, within its clause (a comma, colon or dash ends one: "Can't
/// tell - not spam"), takes the phrase back ([`NEGATED_BY`]).
fn negated_before(text: &str, start: usize) -> bool {
    let head = &text[sentence_start(&text[..start])..start];
    let head = head.rsplit(" - ").next().unwrap_or(head);
    let clause = head.rsplit([',', ';', ':', '\u{2014}', '\u{2013}']).next().unwrap_or(head);
    clause.split_whitespace().rev().take(3).any(|word| NEGATED_BY.contains(&bare_lowercase(word).as_str()))
}

/// A word without the punctuation around it, lowercase, with a typographic apostrophe read as `'`.
fn bare_lowercase(word: &str) -> String {
    word.trim_matches(|c: char| !c.is_alphanumeric() && c != '\'' && c != '\u{2019}')
        .to_lowercase()
        .replace('\u{2019}', "'")
}

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
    /// Says what this content is ("it's spam"), not what a kind of content is ("phishing is a violation").
    about_content: bool,
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
                    .map(|m| Match { start: m.start(), end: m.end(), violation, explicit: true, about_content: true }),
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
        for (index, regex) in phrases.iter().enumerate() {
            // "it violates nothing", "this violates no rule": the negation comes after the verb; "a violation no
            // matter the intent" is none.
            let negated_after = |end: usize| {
                let rest = text[end..].trim_start().to_ascii_lowercase();
                let mut words = rest.split(|c: char| !c.is_alphanumeric() && c != '\'').filter(|w| !w.is_empty());
                match (words.next(), words.next()) {
                    (Some("nothing" | "none" | "neither"), _) => true,
                    (Some("no"), Some(next)) => !NOT_NEGATING_AFTER_NO.contains(&next),
                    _ => false,
                }
            };
            found.extend(
                regex
                    .find_iter(text)
                    .filter(|m| {
                        if violation {
                            let modifies_a_noun = index == 0 && names_a_kind(text, m.end());
                            !negated_after(m.end()) && !modifies_a_noun
                        } else {
                            !negated_before(text, m.start())
                        }
                    })
                    .map(|m| Match {
                        start: m.start(),
                        end: m.end(),
                        violation,
                        explicit: false,
                        about_content: violation && ABOUT_CONTENT.contains(&index),
                    }),
            );
        }
    }
    // A digit after "label" or "answer" states the answer and settles its sentence; the answer's key with a value
    // ("violation: 0") is only a description, which the rest of the sentence can contest.
    for (stated, explicit) in [(&*DIGIT_ANSWER, true), (&*VIOLATION_KEY, false)] {
        for caps in stated.captures_iter(text) {
            let Some(whole) = caps.get(0) else { continue };
            let Some(value) = caps.iter().skip(1).flatten().next() else { continue };
            let violation = matches!(value.as_str().to_ascii_lowercase().as_str(), "1" | "true" | "yes");
            let rest = text[whole.end()..].trim_start();
            let other = if violation { "0" } else { "1" };
            let restates_format = rest.starts_with("or ")
                || rest.starts_with('/')
                || rest.starts_with('|')
                || rest.starts_with("and ")
                || states_a_condition(text, whole.start(), whole.end(), &[other]);
            if !restates_format {
                found.push(Match { start: whole.start(), end: whole.end(), violation, explicit, about_content: true });
            }
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
        .or_else(|| {
            (!chosen.explicit && !chosen.violation).then(|| contested_before(text, sentence_start, &found)).flatten()
        })
        .map(|other| text[other.start..other.end].trim().to_string());
    Some(Conclusion { violation: chosen.violation, phrase, contested_by })
}

/// Which of [`VIOLATION_PHRASES`] describe this content ("it's spam", "this violates", "we flag it as spam")
/// rather than anything ("phishing is a violation" restates the policy).
const ABOUT_CONTENT: [usize; 3] = [0, 1, 4];

/// Words after "no" that do not negate what came before: "spam no matter the intent", "a scam no one should fall
/// for".
const NOT_NEGATING_AFTER_NO: [&str; 6] = ["matter", "doubt", "question", "one", "less", "longer"];

/// Nouns a harm word can modify, so that "a phishing warning" or "a spam complaint" is about harm, not harm itself.
const MODIFIED_NOUNS: [&str; 26] = [
    "warning",
    "warnings",
    "complaint",
    "complaints",
    "report",
    "reports",
    "awareness",
    "filter",
    "filters",
    "question",
    "questions",
    "detection",
    "training",
    "simulation",
    "test",
    "example",
    "examples",
    "prevention",
    "education",
    "notice",
    "alert",
    "discussion",
    "research",
    "victim",
    "victims",
    "policy",
];

/// Whether the harm word ending at `end` modifies the noun after it ("a phishing warning from the bank").
fn names_a_kind(text: &str, end: usize) -> bool {
    let rest = text[end..].strip_prefix('-').unwrap_or(&text[end..]);
    let next = rest.trim_start().split(|c: char| !c.is_alphanumeric()).next().unwrap_or("");
    !rest.starts_with(['.', ',', ';', ':', '!', '?']) && MODIFIED_NOUNS.contains(&next.to_lowercase().as_str())
}

/// A description of this content as violating, in the sentence before the one (starting at `last_start`) that
/// concludes it is safe: "It's phishing. Not spam per se." leaves the reasoning on both sides. A last sentence
/// that turns ("But on a closer look it's not spam.") or a sentence that weighs a possibility ("someone might
/// think this is spam") or asks ("Is this spam?") contests nothing.
fn contested_before<'a>(text: &str, last_start: usize, found: &'a [Match]) -> Option<&'a Match> {
    // Words that turn from a first impression ("On closer inspection, …"); a concession ("Still, …") does not.
    const TURNS: [&str; 13] = [
        "but",
        "however",
        "actually",
        "on",
        "upon",
        "looking",
        "rereading",
        "re-reading",
        "no",
        "nope",
        "wait",
        "instead",
        "rather",
    ];
    let first_word = text[last_start..].split_whitespace().next().map(bare_lowercase).unwrap_or_default();
    if TURNS.contains(&first_word.as_str()) || last_start == 0 {
        return None;
    }
    let before = text[..last_start].trim_end();
    // The previous sentence's own end mark is no sentence break: look for the one before it.
    let last_char_at = before.char_indices().next_back().map_or(0, |(at, _)| at);
    let previous_start = sentence_start(&before[..last_char_at]);
    let (previous, previous_end) = (&before[previous_start..], before.len());
    if previous.trim_end().ends_with('?') {
        return None;
    }
    // Only descriptions: a stated answer there ("We shouldn't answer 1.") was weighed, not concluded. A hedge
    // counts before the description in its clause ("someone might think this is spam", "I first thought it's
    // spam"), or as "at first" anywhere in the sentence; one after it ("It's phishing and may steal passwords")
    // says more about the harm.
    found.iter().find(|other| {
        let clause_head = &text[previous_start..other.start.max(previous_start)];
        let clause_head = clause_head.rsplit([',', ';', ':']).next().unwrap_or(clause_head);
        let weighed = clause_head.split_whitespace().any(|word| HEDGES.contains(&bare_lowercase(word).as_str()))
            || previous.to_lowercase().contains("at first");
        other.violation
            && other.about_content
            && !other.explicit
            && other.start >= previous_start
            && other.end <= previous_end
            && !weighed
    })
}

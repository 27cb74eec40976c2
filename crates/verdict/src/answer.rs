//! Reading the final-channel answer per output format: liberal in what it accepts, never guessing.

use std::ops::Range;
use std::sync::LazyLock;

use regex::Regex;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use safeguard_policy::{OutputFormat, normalize_label};

use crate::Flag;

/// What the final answer says, before validation against the policy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParsedAnswer {
    pub violation: Option<bool>,
    pub label: Option<String>,
    pub category: Option<String>,
    pub rule_ids: Vec<String>,
    pub severity: Option<String>,
    pub confidence: Option<String>,
    pub action: Option<String>,
    pub rationale: Option<String>,
    pub flags: Vec<Flag>,
}

impl ParsedAnswer {
    fn unparseable(detail: impl Into<String>) -> Self {
        ParsedAnswer { flags: vec![Flag::Unparseable { detail: detail.into() }], ..ParsedAnswer::default() }
    }

    fn push_flag(&mut self, flag: Flag) {
        if !self.flags.contains(&flag) {
            self.flags.push(flag);
        }
    }
}

/// Parse a final answer. `required_fields` applies to JSON answers: each one absent is a `MissingField`.
pub fn parse_answer(output: &OutputFormat, final_text: &str, required_fields: &[&str]) -> ParsedAnswer {
    parse_answer_named(output, final_text, required_fields, &[])
}

/// [`parse_answer`] for a policy whose own names (its name, its output key) also key a digit: "Spam: 1".
pub(crate) fn parse_answer_named(
    output: &OutputFormat,
    final_text: &str,
    required_fields: &[&str],
    names: &[&str],
) -> ParsedAnswer {
    let mut answer = match output {
        OutputFormat::Json => {
            // Only the text outside the objects: ids inside them were read from their fields, and a rationale's
            // ids are prose, checked apart.
            let (mut answer, outside) = parse_json(final_text, required_fields, names);
            cite_rule_ids(&mut answer, &outside, &[]);
            return answer;
        }
        OutputFormat::Labels { violating, safe, escalate } => parse_labels(final_text, violating, safe, escalate),
        _ => parse_binary(final_text, names),
    };
    if let Some(outside) = around_fence(final_text) {
        // The fence holds the answer, but words around it still count: "```0``` … so 1" is two answers, a digit
        // out of an answer's place beside it ("```0``` On second thought, 1 is right") leaves it unclear, and an
        // ESCALATE after the fence is still a request for a person. Read like the prose beside a JSON answer.
        let (around, escalated) = match output {
            OutputFormat::Labels { violating, safe, escalate } => {
                let around = read_labels(&outside, violating, safe, escalate);
                let unclear = around.flags.iter().find_map(|flag| match flag {
                    Flag::Unparseable { detail } => Some(detail.clone()),
                    _ => None,
                });
                let reading = match unclear {
                    Some(detail) => Err(detail),
                    None => Ok(around.violation),
                };
                (reading, around.flags.contains(&Flag::Escalated))
            }
            _ => (binary_reading(&outside, names), asks_for_person(&outside)),
        };
        let disagreement = match around {
            Ok(Some(other)) if answer.violation.is_some_and(|inside| inside != other) => {
                Some(format!("the fenced answer and the text around it disagree in {}", excerpt(final_text)))
            }
            // "```0```\nThis is spam.": no second answer around the fence, but prose that concludes the other side.
            Ok(_) => answer
                .violation
                .and_then(|inside| prose_concludes_otherwise(&outside, inside, output, names))
                .map(|phrase| format!("\"{phrase}\" around the fenced answer says the opposite of it")),
            Err(detail) => Some(format!("the text around the fenced answer: {detail}")),
        };
        if let Some(detail) = disagreement {
            answer.violation = None;
            answer.push_flag(Flag::Unparseable { detail });
        }
        if escalated {
            answer.push_flag(Flag::Escalated);
        }
    }
    let labels: Vec<String> = match output {
        OutputFormat::Labels { violating, safe, escalate } => {
            violating.iter().chain(safe).chain(escalate).map(|label| normalize_label(label)).collect()
        }
        _ => Vec::new(),
    };
    cite_rule_ids(&mut answer, final_text, &labels);
    answer
}

/// Rule ids written in an answer's text ("1 (SP2.a)", "{…} (HT3.a)") join its `rule_ids`, to be checked like a
/// JSON answer's: that they exist, and that they sit on the answer's side. A label of the policy shaped like an
/// id (in `labels`, normalized) is the answer, not a citation.
fn cite_rule_ids(answer: &mut ParsedAnswer, text: &str, labels: &[String]) {
    for (at, rule_id) in safeguard_policy::find_rule_ids(text) {
        // "0, not SP4.a" names a rule to say it does not apply: that is no citation.
        if negated_before(text, at) {
            continue;
        }
        if !labels.iter().any(|label| label == rule_id) && !answer.rule_ids.iter().any(|known| known == rule_id) {
            answer.rule_ids.push(rule_id.to_string());
        }
    }
}

static ESCALATE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"(?i)\bescalat\w*").expect("static regex"));
// `"violation": 1` counts as keyed too: a JSON answer cut off before its closing brace is no object, but its
// value is still what the model said. "Violation: 1", "**Decision:** 0" key a digit with a colon only: "violates
// 0 rules" is a count.
static KEYED_DIGIT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r#"(?i)(?:\b(?:final answer|answer|label|output|verdict|classification|result|score)\b\W{0,6}|"violation"\s*:\s*"?|\b(?:violation|violates|decision|rating)\b[*_`"']*\s*:\s*[*_`"']*\s*)([01])\b"#,
    )
    .expect("static regex")
});
pub(crate) static BARE_DIGIT: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\b[01]\b").expect("static regex"));
/// Words right before a bare digit that make it the stated answer: "so 1", "the answer is 0", "=> 1".
static CONCLUDING_CUE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r#"(?i)(?:\b(?:so|thus|therefore|hence|answer|label|verdict|output|result|classification)(?:\s+(?:is|would be|should be|will be|must be))?|=>|->|→)[\s*`"':=]*$"#,
    )
    .expect("static regex")
});
static FENCE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?s)```([A-Za-z0-9_-]*)[ \t]*\n?(.*?)```").expect("static regex"));
static FENCE_MARK: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"```([A-Za-z0-9_-]*)").expect("static regex"));

/// Whether the word right after a fence's opening backticks names the block's language (`json`, `text`) rather
/// than starting the answer: in "```1\n0```" or "```INVALID\nVALID```" it is a first answer, and taking it for a
/// language would leave only the second. Language names are lower case and no answer word.
fn fence_tag_is_language(tag: &str) -> bool {
    tag.starts_with(|c: char| c.is_ascii_lowercase())
        && !tag.chars().any(|c| c.is_ascii_uppercase())
        && whole_answer(tag).is_none()
}

/// The inside of the first code fence (with a first word that is no language name), or the whole text.
fn unfence(text: &str) -> &str {
    let Some(caps) = FENCE.captures(text) else { return text };
    match (caps.get(1), caps.get(2)) {
        (Some(tag), Some(inner)) if !tag.as_str().is_empty() && !fence_tag_is_language(tag.as_str()) => {
            &text[tag.start()..inner.end()]
        }
        (_, Some(inner)) => inner.as_str(),
        _ => text,
    }
}

/// A sentence of `text` that says, on its own as a word or label, the opposite of `value`: "0\nUnsafe.",
/// "VALID\nViolation.". An answer read from one part of the text is only the answer when no other part of it
/// says the other side.
fn contradicting_sentence<'a>(text: &'a str, value: bool, output: &OutputFormat) -> Option<&'a str> {
    let sentences = crate::combined::sentences_ended(text);
    let mut asked: Option<Option<bool>> = None;
    for (sentence, question) in sentences {
        if question {
            // A question answers nothing; what it asks says how a yes or a no after it reads.
            asked = Some(word_reading(sentence, output));
            continue;
        }
        let said = match (asked.take(), yes_or_no(sentence)) {
            // "Violation? No." reads as "no violation"; "Safe? Yes." as "safe".
            (Some(Some(asked)), Some(yes)) => Some(if yes { asked } else { !asked }),
            // A yes or no to a question that is no answer word ("Does it sell followers? Yes."): which side it
            // takes depends on the question, so it is read as taking the other one.
            (Some(None), Some(_)) => Some(!value),
            _ => word_reading(sentence, output),
        };
        if said == Some(!value) {
            return Some(sentence);
        }
    }
    None
}

/// A phrase of `prose` (words beside an answer) that concludes the other side from `violation`, as the reasoning
/// check reads a conclusion: "0\nThis is spam.", `{"violation": 0}` beside "This is hate speech.". A rationale that
/// only mentions the policy ("0 - the post does not violate the policy") agrees. Prose on both sides ("It's
/// phishing, not spam") backs a violation but never a safe answer, as reasoning on both sides does.
pub(crate) fn prose_concludes_otherwise(
    prose: &str,
    violation: bool,
    output: &OutputFormat,
    names: &[&str],
) -> Option<String> {
    let conclusion = crate::reasoning_conclusion(&without_answer_tokens(prose, output, names), output)?;
    match conclusion.contested_by {
        Some(other) if !violation => Some(if conclusion.violation { conclusion.phrase } else { other }),
        Some(_) => None,
        None => (conclusion.violation != violation).then_some(conclusion.phrase),
    }
}

/// `text` with the answer's own tokens blanked: its 0/1 digits and the policy's labels, which would otherwise settle
/// the reading ("This is spam. Answer: 0" would conclude 0, agreeing with itself), and legends ("1 = the content
/// violates, 0 = it does not"), which describe the format rather than the content. Blanking keeps byte offsets.
fn without_answer_tokens(text: &str, output: &OutputFormat, names: &[&str]) -> String {
    let bytes = text.as_bytes();
    let mut blanked = text.to_string();
    for digit in BARE_DIGIT.find_iter(text) {
        let end = if is_legend(text, digit.end(), names) {
            (digit.end()..bytes.len())
                .find(|&at| b",)]".contains(&bytes[at]) || crate::combined::cuts_sentence(bytes, at))
                .unwrap_or(bytes.len())
        } else {
            digit.end()
        };
        blanked.replace_range(digit.start()..end, &" ".repeat(end - digit.start()));
    }
    if let OutputFormat::Labels { violating, safe, escalate } = output {
        let mut labels: Vec<String> =
            violating.iter().chain(safe).chain(escalate).map(|label| normalize_label(label)).collect();
        labels.retain(|label| !label.is_empty());
        // Longer labels first, so that "INVALID + ESCALATE" goes whole rather than leaving "+ ESCALATE".
        labels.sort_by_key(|label| std::cmp::Reverse(label.len()));
        for regex in labels.iter().filter_map(|label| label_regex(label)) {
            blanked = regex.replace_all(&blanked, "${1} ${2}").into_owned();
        }
    }
    blanked
}

/// A sentence that is only "yes" or "no" (with wrapping): `Some(true)` for yes.
fn yes_or_no(sentence: &str) -> Option<bool> {
    match strip_wrapping(sentence).to_ascii_lowercase().as_str() {
        "yes" => Some(true),
        "no" => Some(false),
        _ => None,
    }
}

/// Whether `key` (the words before an answer's digit) names the answer's field, as `KEYED_DIGIT` keys it
/// ("Violation:", "**Violates:**"), not a side the digit could be a yes or no to.
fn is_answer_key(key: &str) -> bool {
    matches!(bare_word(&without_rule_ids(key)).to_ascii_lowercase().as_str(), "violation" | "violates")
}

/// `text` without the whitespace, wrapping and dashes around a word: "**Violation:**" → "Violation".
fn bare_word(text: &str) -> &str {
    text.trim_matches(|c: char| c.is_whitespace() || WRAPPING.contains(c) || "-–—".contains(c))
}

/// Where the sentence holding byte `at` of `text` starts, as [`crate::combined::sentences_ended`] cuts them.
fn sentence_start(text: &str, at: usize) -> usize {
    let bytes = text.as_bytes();
    (0..at.min(bytes.len())).rev().find(|&i| crate::combined::cuts_sentence(bytes, i)).map_or(0, |i| i + 1)
}

/// The text before and after the first code fence, when there is one and anything is around it.
fn around_fence(text: &str) -> Option<String> {
    let fence = FENCE.find(text)?;
    let around = format!("{}\n{}", &text[..fence.start()], &text[fence.end()..]);
    (!around.trim().is_empty()).then_some(around)
}

/// Words that turn the label or rule after them around: "not safe" is no "safe".
const NEGATIONS: [&str; 14] = [
    "not", "no", "isn't", "isnt", "aren't", "wasn't", "doesn't", "cannot", "can't", "never", "nor", "neither",
    "hardly", "ain't",
];
/// Words that may stand between such a negation and the label or rule it turns around: "NOT A VALID post", "not
/// considered VALID", "not really a SP4.a case". Stopping at the word right before the label would read each of
/// these as the label itself, and a negated safe label as an allow.
const NEGATION_FILLERS: [&str; 22] = [
    "a",
    "an",
    "the",
    "really",
    "exactly",
    "simply",
    "just",
    "actually",
    "truly",
    "quite",
    "entirely",
    "clearly",
    "considered",
    "deemed",
    "classified",
    "labeled",
    "labelled",
    "marked",
    "rated",
    "as",
    "be",
    "been",
];
/// How many [`NEGATION_FILLERS`] a negation may stand before the label it turns around.
const MAX_NEGATION_FILLERS: usize = 3;

/// True when a negation stands before `at` in `haystack`, right before it or past a few filler words in the same
/// clause ("not a VALID post", "isn’t VALID").
fn negated_before(haystack: &str, at: usize) -> bool {
    let Some(head) = haystack.get(..at) else { return false };
    let clause = head.rsplit(|c: char| ".,;:!?()\n—–".contains(c)).next().unwrap_or(head);
    let words = words_of(clause);
    if words.is_empty() {
        // Right after punctuation the word before it still turns the label around: "Not: VALID", "No, VALID".
        return words_of(head).last().is_some_and(|word| NEGATIONS.contains(&word.as_str()));
    }
    for (index, word) in words.iter().rev().enumerate() {
        if NEGATIONS.contains(&word.as_str()) {
            return true;
        }
        if index >= MAX_NEGATION_FILLERS || !NEGATION_FILLERS.contains(&word.as_str()) {
            return false;
        }
    }
    false
}

/// Words that rule out the rule id near them in a rationale: "not HT3.a", "does not meet HT2", "no slurs
/// (HT1.a)", "HT0.b rather than HT3.a", "HT3.a does not apply".
const CITATION_NEGATIONS: [&str; 28] = [
    "not",
    "no",
    "isn't",
    "isnt",
    "aren't",
    "wasn't",
    "doesn't",
    "doesnt",
    "don't",
    "dont",
    "didn't",
    "never",
    "nor",
    "neither",
    "none",
    "nothing",
    "without",
    "lacks",
    "lack",
    "lacking",
    "absent",
    "rather",
    "instead",
    "unlike",
    "excluding",
    "except",
    "cannot",
    "can't",
];
/// Words that start a clause of their own, so a negation before them rules nothing out after them: "not a joke
/// but a threat (HT3.a)".
const CONTRASTS: [&str; 6] = ["but", "however", "although", "though", "yet", "whereas"];

/// Whether the rule id at `start..end` of a rationale or category is ruled out rather than cited: a negation
/// earlier in its clause ("contains no slurs (HT1.a) or threats (HT3.a)": a list shares its negation, so commas
/// do not end the clause here), or one among the few words right after it, before a comma ("HT3.a does not
/// apply", "HT2: not met"). The clause ends at a sentence's end, `;`, a line break or a contrasting word.
pub(crate) fn citation_negated(text: &str, start: usize, end: usize) -> bool {
    let (Some(head), Some(tail)) = (text.get(..start), text.get(end..)) else { return false };
    let bytes = head.as_bytes();
    let clause_start = (0..bytes.len())
        .rev()
        .find(|&at| {
            matches!(bytes[at], b';' | b'\n' | b'!' | b'?')
                || bytes[at] == b'.' && bytes.get(at + 1).is_none_or(u8::is_ascii_whitespace)
        })
        .map_or(0, |at| at + 1);
    let clause = words_of(&head[clause_start..]);
    let since_contrast = clause.iter().rposition(|word| CONTRASTS.contains(&word.as_str())).map_or(0, |at| at + 1);
    if clause[since_contrast..].iter().any(|word| CITATION_NEGATIONS.contains(&word.as_str())) {
        return true;
    }
    let after = tail.split([',', ';', '.', '\n', '—', '–']).next().unwrap_or("");
    // "n/a" is one word here, though `words_of` would split it.
    after.to_lowercase().contains("n/a")
        || words_of(after).iter().take(4).any(|word| CITATION_NEGATIONS.contains(&word.as_str()))
}

/// Words that say a mention of escalating asks for nobody: "no need to escalate", "don't escalate".
const ESCALATION_NEGATIONS: [&str; 17] = [
    "no",
    "not",
    "don't",
    "dont",
    "doesn't",
    "doesnt",
    "didn't",
    "without",
    "needn't",
    "neednt",
    "never",
    "nothing",
    "won't",
    "shouldn't",
    "isn't",
    "nor",
    "neither",
];
/// Words that may stand between such a negation and the escalation: "no need to", "does not require".
const ESCALATION_FILLERS: [&str; 28] = [
    "need",
    "needs",
    "needed",
    "necessary",
    "reason",
    "call",
    "cause",
    "grounds",
    "to",
    "for",
    "any",
    "further",
    "be",
    "been",
    "a",
    "an",
    "the",
    "it",
    "this",
    "require",
    "requires",
    "required",
    "warrant",
    "warrants",
    "warranted",
    "do",
    "does",
    "point",
];

/// The words of `text`, lowercased, with typographic apostrophes made plain.
fn words_of(text: &str) -> Vec<String> {
    text.replace('\u{2019}', "'")
        .split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|word| !word.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// Whether the clause that `head` ends in negates the escalation right after it: a negation, then at most a few
/// filler words ("no need to", "does not require"), with no clause break between.
fn escalation_negated(head: &str) -> bool {
    let clause = head.rsplit(|c: char| ".,;:!?()\n—–".contains(c) || c == '-').next().unwrap_or(head);
    for (index, word) in words_of(clause).iter().rev().enumerate() {
        if ESCALATION_NEGATIONS.contains(&word.as_str()) {
            return true;
        }
        if index >= 4 || !ESCALATION_FILLERS.contains(&word.as_str()) {
            return false;
        }
    }
    false
}

/// Whether `text` asks for a person: an ESCALATE, or "escalate", "escalation" not negated ("no need to
/// escalate", "No escalation needed." ask for nobody). The capitalized token always counts: it is the answer
/// format's own word, and reading a request for a person as none would be the wrong way to fail.
pub(crate) fn asks_for_person(text: &str) -> bool {
    ESCALATE
        .find_iter(text)
        .any(|found| found.as_str().chars().all(|c| !c.is_lowercase()) || !escalation_negated(&text[..found.start()]))
}

/// An `"action"` as models write it: lowercase, `_` and `-` as spaces, single spaces ("Manual-Review" is
/// "manual review").
pub(crate) fn normalize_action(action: &str) -> String {
    action.to_lowercase().replace(['_', '-'], " ").split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Word stems of an `"action"` that takes content down or keeps it from people: "remove content", "block.",
/// "hidden", "takedown". "ban" is whole words only ("banner" is no ban).
const TAKEDOWN_STEMS: [&str; 11] =
    ["block", "remov", "reject", "delet", "hid", "deny", "deni", "suspend", "takedown", "quarantin", "censor"];

/// `"action"`s (or clauses of one) that leave content up as it is: "allow", "keep up", "no action needed".
const LEAVE_UP: [&str; 14] = [
    "allow",
    "none",
    "approve",
    "no action",
    "no action needed",
    "keep",
    "keep up",
    "ignore",
    "accept",
    "pass",
    "publish",
    "nothing",
    "leave",
    "leave up",
];

/// How an `"action"` would treat the content: `Some(true)` when a clause of it takes it down
/// ([`TAKEDOWN_STEMS`], not negated: "do not remove or block", "removal not needed" take nothing down),
/// `Some(false)` when a clause leaves it up ([`LEAVE_UP`]: "allow (no action)") and none takes it down, `None`
/// otherwise ("warn", "escalate", "label"). Clauses end at punctuation, so "Remove (no appeal)" removes.
pub(crate) fn action_takes_down(action: &str) -> Option<bool> {
    // A negation up to three words before the takedown word in its clause, or "not"/"unnecessary" right after it.
    const AFTER: [&str; 5] = ["not", "unnecessary", "unneeded", "unwarranted", "needless"];
    let clauses: Vec<Vec<String>> = action
        .split([',', ';', ':', '(', ')', '.', '\u{2014}', '\u{2013}'])
        .flat_map(|c| c.split(" - "))
        .map(words_of)
        .collect();
    let takes_down = clauses.iter().any(|words| {
        words.iter().enumerate().any(|(at, word)| {
            let negated = words[at.saturating_sub(3)..at].iter().any(|w| CITATION_NEGATIONS.contains(&w.as_str()))
                || words.iter().skip(at + 1).take(2).any(|w| AFTER.contains(&w.as_str()));
            let takedown = matches!(word.as_str(), "ban" | "bans" | "banned" | "banning")
                || TAKEDOWN_STEMS.iter().any(|stem| word.starts_with(stem));
            takedown && !negated
        })
    });
    if takes_down {
        return Some(true);
    }
    clauses.iter().any(|words| LEAVE_UP.contains(&words.join(" ").as_str())).then_some(false)
}

/// Word parts that ask for a person in an `"action"`. The policies say "escalate … for human review", so a model
/// may write any of these for it; missing one would let the answer's own request for a person pass as an allow.
const PERSON_WORDS: [&str; 4] = ["escalat", "review", "human", "manual"];

/// Whether an `"action"` asks for a person: it names review, a human, manual handling or escalation, not negated
/// ("no human review needed" asks for nobody). Words of the request itself may stand between a negation and the
/// word found ("no human review").
pub(crate) fn action_asks_for_person(action: &str) -> bool {
    let action = normalize_action(action);
    PERSON_WORDS.iter().any(|part| {
        action.match_indices(part).any(|(at, _)| {
            // Read back past the word this part sits in and the request's own words ("no human review", "no need
            // for review") to what comes before them.
            let mut head = action[..at].trim_end_matches(char::is_alphanumeric);
            loop {
                let trimmed = head.trim_end();
                let word_start = trimmed.trim_end_matches(char::is_alphanumeric).len();
                let word = &trimmed[word_start..];
                if word.is_empty() || !(word == "for" || PERSON_WORDS.iter().any(|part| word.contains(part))) {
                    break;
                }
                head = &trimmed[..word_start];
            }
            !escalation_negated(head)
        })
    })
}

/// True when the digit at `at` is negated: "not 0", "isn't 1", "never a 1".
fn digit_negated(text: &str, at: usize) -> bool {
    const NEGATING: [&str; 8] = ["not", "no", "isn't", "isnt", "never", "nor", "neither", "ain't"];
    const BETWEEN: [&str; 8] = ["a", "an", "the", "really", "exactly", "simply", "just", "actually"];
    let head = &text[..at];
    // A comma or colon ends the clause: "No, 0." and "I'm not sure, 1" answer.
    let clause = head.rsplit(|c: char| ".,:;!?()\n—–".contains(c)).next().unwrap_or(head);
    for (index, word) in words_of(clause).iter().rev().enumerate() {
        if NEGATING.contains(&word.as_str()) {
            return true;
        }
        if index >= 1 || !BETWEEN.contains(&word.as_str()) {
            return false;
        }
    }
    false
}

/// Words that say what a digit means, right after "0 =" or "1:" (past one article): "0 = safe", "1: violation",
/// "0 = Content does NOT violate this policy". A harm word is not among them: "Actually 1: phishing" is the model
/// answering again with its reason, and reading it as a legend would let the first answer stand alone. The
/// policy's own name is one ("0 = not spam, 1 = spam"): see [`is_legend`].
const LEGEND_WORDS: [&str; 37] = [
    "safe",
    "unsafe",
    "benign",
    "harmless",
    "harmful",
    "violation",
    "violations",
    "violates",
    "violate",
    "violating",
    "violative",
    "nonviolating",
    "policy",
    "not",
    "no",
    "non",
    "does",
    "doesn't",
    "allowed",
    "allow",
    "disallowed",
    "ok",
    "okay",
    "acceptable",
    "unacceptable",
    "compliant",
    "content",
    "valid",
    "invalid",
    "yes",
    "clean",
    "fine",
    "flagged",
    "true",
    "false",
    "negative",
    "positive",
];

/// A bare digit that names what a digit means ("0 = safe", "1: violation", "1 means spam") is a legend, not an
/// answer. After `=`, `:` or an arrow a word of meaning (or the policy's name, one of `names`) must follow: "1: the
/// link is phishing" gives a reason for an answer, it does not explain a format.
fn is_legend(text: &str, digit_end: usize, names: &[&str]) -> bool {
    let rest = text[digit_end..].trim_start();
    if rest.starts_with("means") {
        return true;
    }
    let Some(meaning) = ["=", ":", "->", "→"].iter().find_map(|mark| rest.strip_prefix(mark)) else {
        return false;
    };
    let meaning: String = meaning.chars().take(80).collect::<String>().to_lowercase();
    let meaning = meaning.trim_start_matches(|c: char| !c.is_alphanumeric());
    let meaning = ["the ", "a ", "an ", "this ", "it "]
        .iter()
        .find_map(|article| meaning.strip_prefix(article))
        .map_or(meaning, str::trim_start);
    let word = words_of(meaning).into_iter().next().unwrap_or_default();
    LEGEND_WORDS.contains(&word.as_str())
        || names.iter().map(|name| name.trim().to_lowercase()).any(|name| {
            !name.is_empty()
                && meaning.strip_prefix(name.as_str()).is_some_and(|after| !after.starts_with(char::is_alphanumeric))
        })
}

/// The punctuation and markup models wrap answers in: `**1**`, `"INVALID".`, `(0)`.
const WRAPPING: &str = "*`\"'.,:;!?()[]{}<>_#";

/// Trim whitespace and the punctuation models wrap answers in.
fn strip_wrapping(text: &str) -> &str {
    text.trim_matches(|c: char| c.is_whitespace() || WRAPPING.contains(c))
}

/// True when `rest` holds nothing but wrapping punctuation, dashes, rule ids and ESCALATE: "(SP2.a).", " - SP4.a",
/// " + ESCALATE". What a digit is followed by when it ends the answer.
fn only_citations(rest: &str) -> bool {
    let left = without_rule_ids(&ESCALATE.replace_all(rest, " "));
    left.chars().all(|c| c.is_whitespace() || WRAPPING.contains(c) || "-–—+/".contains(c))
}

/// Whether a bare digit (no "Answer:" key) at `start..end` sits where an answer goes. Anywhere else it is a count
/// or a name ("has 0 links", "rule 1 applies"), and reading it as the verdict would be guessing. It may lead the
/// text when a separator, citation or line break follows ("1 (SP2.a)", "0 - a question", "1 ESCALATE"), end it
/// apart from citations ("…, so it's 1 (SP2.a)."), or follow a concluding word ("so 1 because …", "the answer is
/// 0 since …").
///
/// A legend ("0 = safe", "1: violation") is never conclusive unless a concluding word precedes it ("so 1: …"):
/// an echoed "0 = safe, 1 = violation" is the format, not an answer.
fn conclusive(text: &str, start: usize, end: usize, names: &[&str]) -> bool {
    let head = &text[..start];
    let rest = &text[end..];
    if CONCLUDING_CUE.is_match(head) {
        return true;
    }
    if is_legend(text, end, names) {
        return false;
    }
    if only_citations(rest) {
        return true;
    }
    if !leads(head) {
        return false;
    }
    let after = rest.trim_start_matches(|c: char| "*`\"'_".contains(c)).trim_start_matches([' ', '\t']);
    after.starts_with(['\n', '\r', '(', '[', '-', '–', '—', ',', '.', ';'])
        || ESCALATE.find(after).is_some_and(|found| found.start() == 0)
        || safeguard_policy::find_rule_ids(after).first().is_some_and(|&(at, _)| at == 0)
}

/// Whether `head` (the text before a digit) is empty apart from whitespace and wrapping: the digit leads.
fn leads(head: &str) -> bool {
    head.chars().all(|c| c.is_whitespace() || WRAPPING.contains(c))
}

/// A leading digit followed by a space and the start of its explanation: "0 The message is a question.",
/// "1 because it sells followers". Taken only when it is the text's one digit: "1 link is included" counts a
/// link, and a lowercase noun after the digit is read that way.
fn leads_an_explanation(text: &str, start: usize, end: usize, names: &[&str]) -> bool {
    const CONNECTORS: [&str; 12] =
        ["because", "since", "as", "given", "due", "per", "under", "it", "it's", "this", "the", "there"];
    if !leads(&text[..start]) || is_legend(text, end, names) {
        return false;
    }
    let rest = &text[end..];
    let Some(after) = rest.strip_prefix([' ', '\t']) else { return false };
    let after = after.trim_start_matches([' ', '\t']);
    let word: String = after.chars().take_while(|c| c.is_alphanumeric() || *c == '\'').collect();
    // A capitalized word starts the explanation's sentence ("0 The …", "1 A coupon link …"); an all-caps word
    // other than "I" may be a label or ESCALATE, which are read elsewhere.
    let sentence = word.chars().next().is_some_and(char::is_uppercase)
        && (word.chars().any(char::is_lowercase) || word.chars().count() == 1);
    sentence || CONNECTORS.contains(&word.to_lowercase().as_str())
}

/// A digit is a standalone answer unless it is part of a decimal ("0.5", "1,5") or a list marker ("1.", "1)")
/// at a line start followed by more text.
pub(crate) fn digit_candidates<'a>(text: &'a str, regex: &Regex) -> Vec<(usize, &'a str)> {
    let bytes = text.as_bytes();
    regex
        .captures_iter(text)
        .filter_map(|caps| caps.get(1).or_else(|| caps.get(0)))
        .filter(|found| {
            let after = &bytes[found.end()..];
            let before = &bytes[..found.start()];
            // "0.5", "1,000", and times and ratios ("1:30", "10:1"): part of a number, not an answer.
            let decimal_after = after.len() >= 2 && matches!(after[0], b'.' | b',' | b':') && after[1].is_ascii_digit();
            let decimal_before = before.len() >= 2
                && matches!(before[before.len() - 1], b'.' | b',' | b':')
                && before[before.len() - 2].is_ascii_digit();
            // "0 or 1", "0/1", "0-1": the model restating the format, not answering.
            let rest = std::str::from_utf8(after).unwrap_or("").trim_start();
            let restates = rest.starts_with("or ") && rest[3..].trim_start().starts_with(['0', '1'])
                || rest.starts_with('/') && rest[1..].trim_start().starts_with(['0', '1'])
                || rest.starts_with('-') && rest[1..].starts_with(['0', '1']);
            let restated_tail = {
                let head = std::str::from_utf8(before).unwrap_or("").trim_end();
                head.ends_with(" or") && head.trim_end_matches(" or").trim_end().ends_with(['0', '1'])
                    || head.ends_with('/') && head.trim_end_matches('/').trim_end().ends_with(['0', '1'])
            };
            let line_start = before.iter().rev().take_while(|&&b| b != b'\n').all(|b| b.is_ascii_whitespace());
            let list_marker = line_start
                && after.first().is_some_and(|&b| b == b'.' || b == b')')
                && after.get(1).is_some_and(|&b| b == b' ')
                && after.get(2).is_some_and(|b| !b.is_ascii_whitespace());
            !(decimal_after || decimal_before || restates || restated_tail || list_marker)
        })
        .map(|found| (found.start(), found.as_str()))
        .collect()
}

fn word_answer(text: &str) -> Option<bool> {
    match text.to_ascii_lowercase().as_str() {
        "violation" | "violates" | "violating" | "yes" | "true" | "unsafe" | "flagged" => Some(true),
        "safe" | "no" | "false" | "allow" | "allowed" | "no violation" | "not a violation" | "does not violate"
        | "non-violating" | "not violating" => Some(false),
        _ => None,
    }
}

/// A whole text that is one answer: "0", "**1**", "Safe.".
fn whole_answer(text: &str) -> Option<bool> {
    match strip_wrapping(text) {
        "0" => Some(false),
        "1" => Some(true),
        other => word_answer(other),
    }
}

/// What a short sentence beside a combined answer says on its own as a word or label: "Violation.", "unsafe",
/// "INVALID" (for a policy with labels). Rule ids and dashes around the word do not hide it ("safe (HT0.a)").
/// Digits are read apart, by the digit rule.
pub(crate) fn word_reading(sentence: &str, output: &OutputFormat) -> Option<bool> {
    let bare = without_rule_ids(sentence);
    let word = bare_word(&bare);
    if let OutputFormat::Labels { violating, safe, .. } = output {
        let label = normalize_label(word);
        if violating.iter().any(|v| normalize_label(v) == label) {
            return Some(true);
        }
        if safe.iter().any(|s| normalize_label(s) == label) {
            return Some(false);
        }
    }
    word_answer(word)
}

/// `text` with the rule ids in it left out ("violation (HT2.a)" → "violation ()"). Ids are upper case: read
/// them before lowering the text.
pub(crate) fn without_rule_ids(text: &str) -> String {
    let mut bare = String::with_capacity(text.len());
    let mut at = 0;
    for (start, id) in safeguard_policy::find_rule_ids(text) {
        bare.push_str(&text[at..start]);
        at = start + id.len();
    }
    bare.push_str(&text[at..]);
    bare
}

/// What a piece of prose says on its own, as the binary format reads it.
fn binary_reading(text: &str, names: &[&str]) -> Result<Option<bool>, String> {
    match whole_answer(text) {
        Some(value) => Ok(Some(value)),
        None => binary_from_prose(text, names),
    }
}

fn parse_binary(final_text: &str, names: &[&str]) -> ParsedAnswer {
    let text = unfence(final_text);
    let escalated = asks_for_person(text);
    let mut answer = ParsedAnswer::default();
    let decided = match whole_answer(text) {
        Some(value) => Ok(Some(value)),
        None if text.contains('{') => match json_answer(text, &OutputFormat::Binary) {
            Some((Ok((value, label)), outside)) => {
                // The object and the prose beside it are both the model's answer: neither outvotes the other.
                match binary_reading(&outside, names) {
                    Ok(Some(other)) if other != value => {
                        Err(format!("the JSON answer and the text around it disagree in {}", excerpt(text)))
                    }
                    Err(detail) => Err(detail),
                    Ok(_) => match prose_concludes_otherwise(&outside, value, &OutputFormat::Binary, names) {
                        Some(phrase) => Err(format!(
                            "\"{phrase}\" beside the JSON answer says the opposite of it in {}",
                            excerpt(text)
                        )),
                        None => {
                            answer.label = label;
                            Ok(Some(value))
                        }
                    },
                }
            }
            Some((Err(detail), _)) => Err(detail),
            None => binary_from_prose(text, names),
        },
        None => binary_from_prose(text, names),
    };
    match decided {
        Ok(Some(value)) => {
            answer.violation = Some(value);
            answer.label.get_or_insert_with(|| if value { "1" } else { "0" }.to_string());
        }
        Ok(None) if escalated => {}
        Ok(None) => answer.push_flag(Flag::Unparseable { detail: format!("expected 0 or 1, got {}", excerpt(text)) }),
        Err(detail) => answer.push_flag(Flag::Unparseable { detail }),
    }
    if escalated {
        answer.label = Some(match answer.label.take() {
            Some(label) => format!("{label} + ESCALATE"),
            None => "ESCALATE".to_string(),
        });
        answer.push_flag(Flag::Escalated);
    }
    answer
}

/// What the JSON answer objects in a short answer say: the value and its label as written, or why it is unclear.
type JsonVerdict = Result<(bool, Option<String>), String>;

/// The `{"violation": …}` answer inside a binary or labels answer, with the text outside the JSON objects.
/// `None` when there is no such object.
fn json_answer(text: &str, output: &OutputFormat) -> Option<(JsonVerdict, String)> {
    let objects = find_objects(text);
    let found = violation_from_json(text, &objects, output)?;
    Some((found, outside_objects(text, &objects)))
}

/// A `{"violation": …}` object inside a binary or labels answer: the meaning is clear even if the format is off.
/// `None` when there is no such object; an error when one of them says nothing clear or they disagree, since the
/// digits inside them must not then be read as prose.
fn violation_from_json(text: &str, objects: &[FoundObject], output: &OutputFormat) -> Option<JsonVerdict> {
    let mut values = objects
        .iter()
        .filter_map(|object| answer_object(&object.map))
        .filter_map(|object| object.get("violation"))
        .map(|value| (coerce_violation(value), value_text(value)));
    let (first, label) = values.next()?;
    if objects.iter().any(FoundObject::answer_conflicts) {
        return Some(Err(format!("the answer is given twice with different values in {}", excerpt(text))));
    }
    let first = match first {
        Ok(Some(first)) => first,
        Ok(None) => return Some(Err(format!("\"violation\" says nothing clear in {}", excerpt(text)))),
        Err(detail) => return Some(Err(detail)),
    };
    for (value, _) in values {
        match value {
            Ok(Some(value)) if value == first => {}
            Ok(_) => return Some(Err(format!("JSON answers disagree on \"violation\" in {}", excerpt(text)))),
            Err(detail) => return Some(Err(detail)),
        }
    }
    if let Some(detail) = objects.iter().find_map(|object| object_two_sided(&object.map, first, output)) {
        return Some(Err(format!("{detail} in {}", excerpt(text))));
    }
    Some(Ok((first, label)))
}

/// [`two_sided`] for an object found in a final, whose answer may sit one level down
/// (`{"result": {"violation": 0}, "Violation": 1}`): the wrapper's own keys are read too.
pub(crate) fn object_two_sided(map: &Map<String, Value>, violation: bool, output: &OutputFormat) -> Option<String> {
    let inner = answer_object(map)?;
    two_sided(inner, violation, output)
        .or_else(|| (!std::ptr::eq(inner, map)).then(|| second_violation(map, violation)).flatten())
}

/// Prose such as "Answer: 1" or "The content is spam, so 1." One distinct candidate decides; two do not.
/// `names` (the policy's own name, its output key) key a digit too: "Spam: 1 - links to …".
fn binary_from_prose(text: &str, names: &[&str]) -> Result<Option<bool>, String> {
    let mut keyed = digit_candidates(text, &KEYED_DIGIT);
    for name in names.iter().map(|name| name.trim()).filter(|name| !name.is_empty()) {
        let edge = |c: Option<char>| if c.is_some_and(|c| c.is_alphanumeric() || c == '_') { r"\b" } else { "" };
        let pattern = format!(
            r#"(?i){}{}{}[*_`"']*\s*:\s*[*_`"']*\s*([01])\b"#,
            edge(name.chars().next()),
            regex::escape(name),
            edge(name.chars().last())
        );
        if let Ok(regex) = Regex::new(&pattern) {
            keyed.extend(digit_candidates(text, &regex));
        }
    }
    keyed.sort_unstable();
    keyed.dedup();
    let bare_all = digit_candidates(text, &BARE_DIGIT);
    // "The answer is not 0.", "It isn't 1": a negated digit says what the answer is not, which is no answer.
    if let Some(&(start, digit)) = bare_all.iter().find(|&&(start, _)| digit_negated(text, start)) {
        return Err(format!("\"{digit}\" at byte {start} is negated in {}", excerpt(text)));
    }
    let candidates = match keyed.last() {
        None => {
            let only = bare_all.len() == 1;
            let conclusive_at = |start: usize, digit: &str| {
                conclusive(text, start, start + digit.len(), names)
                    || only && leads_an_explanation(text, start, start + digit.len(), names)
            };
            let mut bare = bare_all.clone();
            // A legend out of an answer's place ("so 1 (1 = violation)") explains the answer and is left out, as
            // after a keyed digit; but only beside an answer: a text of legends alone ("0 = safe, 1 = violation",
            // "0: benign\n1: violation") echoes the format and answers nothing.
            if bare.iter().any(|&(start, digit)| conclusive_at(start, digit)) {
                bare.retain(|&(start, digit)| {
                    conclusive_at(start, digit) || !is_legend(text, start + digit.len(), names)
                });
            }
            // "The message asks for the password and has 0 links." holds no answer, and a stray digit must not
            // become one: a 0 or 1 out of an answer's place makes the whole text unclear.
            if let Some(&(start, digit)) = bare.iter().find(|&&(start, digit)| !conclusive_at(start, digit)) {
                return Err(format!("\"{digit}\" at byte {start} is not in an answer's place in {}", excerpt(text)));
            }
            bare
        }
        // A keyed digit ("Answer: 0") outranks bare ones before it, such as a legend, but not a bare digit after
        // it: "Answer: 0. On reflection it is phishing, so 1." is two answers.
        Some(&(last_keyed, _)) => {
            let later = bare_all
                .into_iter()
                .filter(|&(start, digit)| start > last_keyed && !is_legend(text, start + digit.len(), names));
            keyed.iter().copied().chain(later).collect()
        }
    };
    let has_zero = candidates.iter().any(|(_, digit)| *digit == "0");
    let has_one = candidates.iter().any(|(_, digit)| *digit == "1");
    let value = match (has_zero, has_one) {
        (true, true) => return Err(format!("both 0 and 1 appear as answers in {}", excerpt(text))),
        (true, false) => false,
        (false, true) => true,
        (false, false) => return Ok(None),
    };
    // "0\nUnsafe.", "0 Violation.": the digit leads, and the word after it says the other side. Read with the
    // answer's digits blanked out, so that what is left of the digit's own sentence is read too.
    let mut blanked = text.to_string();
    for &(start, digit) in &candidates {
        // From the start of the digit's sentence: its key ("Violation: 0") is part of the answer, not a word beside
        // it. A key that is itself a side ("Safe: 1", "Allowed: 0") may be read as that side's yes or no, or as
        // the answer's code: unclear either way.
        let from = sentence_start(text, start);
        let key = &text[from..start];
        let polar = word_reading(key, &OutputFormat::Binary).is_some() && !is_answer_key(key);
        let keyed = key.trim_end_matches(|c: char| c.is_whitespace() || "*_`\"'".contains(c)).ends_with([':', '=']);
        if polar && keyed {
            return Err(format!("\"{}{digit}\" can be read either way in {}", key.trim_start(), excerpt(text)));
        }
        // A side said beside the digit ("No, 0", "Unsafe, 0") is read with the rest, not blanked.
        let from = if polar { start } else { from };
        let end = start + digit.len();
        blanked.replace_range(from..end, &" ".repeat(end - from));
    }
    if let Some(sentence) = contradicting_sentence(&blanked, value, &OutputFormat::Binary) {
        return Err(format!(
            "\"{}\" says the opposite of the {} in {}",
            sentence.trim(),
            u8::from(value),
            excerpt(text)
        ));
    }
    // "It is clearly spam, so 0.": read whole, since the digit's own sentence may hold the other side.
    if let Some(phrase) = prose_concludes_otherwise(text, value, &OutputFormat::Binary, names) {
        return Err(format!("\"{phrase}\" says the opposite of the {} in {}", u8::from(value), excerpt(text)));
    }
    Ok(Some(value))
}

fn parse_labels(final_text: &str, violating: &[String], safe: &[String], escalate: &[String]) -> ParsedAnswer {
    let mut answer = read_labels(final_text, violating, safe, escalate);
    if answer.violation.is_none() && answer.flags.is_empty() {
        let expected: Vec<&str> = violating.iter().chain(safe).chain(escalate).map(String::as_str).collect();
        answer.push_flag(Flag::Unparseable {
            detail: format!("expected one of {}, got {}", expected.join(" / "), excerpt(unfence(final_text))),
        });
    }
    answer
}

/// What a labels answer says: no value and no flag when it holds no label at all.
fn read_labels(final_text: &str, violating: &[String], safe: &[String], escalate: &[String]) -> ParsedAnswer {
    let text = unfence(final_text);
    let stripped = strip_wrapping(text);
    let normalized = normalize_label(stripped);
    let is_violating_label = |label: &str| {
        let label = normalize_label(label);
        violating.iter().any(|v| label.split(' ').any(|word| word == normalize_label(v)))
    };
    let mut answer = ParsedAnswer::default();

    // Whole answer equals a label: the common case.
    let exact = escalate
        .iter()
        .map(|label| (label, None, true))
        .chain(violating.iter().map(|label| (label, Some(true), false)))
        .chain(safe.iter().map(|label| (label, Some(false), false)))
        // A blank label (a policy stored before blank ones were refused) would match an answer of only punctuation.
        .find(|(label, _, _)| !normalized.is_empty() && normalize_label(label) == normalized);
    if let Some((label, value, escalated)) = exact {
        answer.label = Some(stripped.to_string());
        answer.violation = if escalated { is_violating_label(label).then_some(true) } else { value };
        if escalated {
            answer.push_flag(Flag::Escalated);
        }
        return answer;
    }

    // Otherwise look for labels as whole words inside prose. Longer labels first, so that "INVALID + ESCALATE"
    // is not also read as a bare "INVALID", and word boundaries keep "VALID" from matching inside "INVALID".
    let mut labels: Vec<(String, Option<bool>, bool)> = escalate
        .iter()
        .map(|l| (normalize_label(l), is_violating_label(l).then_some(true), true))
        .chain(violating.iter().map(|l| (normalize_label(l), Some(true), false)))
        .chain(safe.iter().map(|l| (normalize_label(l), Some(false), false)))
        .filter(|(label, _, _)| !label.is_empty())
        .collect();
    labels.sort_by_key(|(label, _, _)| std::cmp::Reverse(label.len()));
    // With a `{"violation": …}` object present, labels are looked for outside it: a label inside the object's
    // strings ("rationale": "not VALID because …") is not the answer, while one beside it is a second answer.
    let output =
        OutputFormat::Labels { violating: violating.to_vec(), safe: safe.to_vec(), escalate: escalate.to_vec() };
    let json = if text.contains('{') { json_answer(text, &output) } else { None };
    let mut haystack = normalize_label(json.as_ref().map_or(text, |(_, outside)| outside.as_str()));
    let mut found: Vec<(String, Option<bool>, bool)> = Vec::new();
    let mut negated: Option<String> = None;
    for (label, value, escalated) in labels {
        let pattern = format!(r"(^|[^A-Z0-9_]){}($|[^A-Z0-9_])", regex::escape(&label));
        let Ok(regex) = Regex::new(&pattern) else { continue };
        let mut matched = false;
        for caps in regex.captures_iter(&haystack) {
            matched = true;
            if let Some(prefix) = caps.get(1)
                && negated_before(&haystack, prefix.end())
            {
                negated.get_or_insert_with(|| label.clone());
            }
        }
        if matched {
            found.push((label.clone(), value, escalated));
            haystack = regex.replace_all(&haystack, "${1} ${2}").into_owned();
        }
    }
    let escalated = found.iter().any(|(_, _, escalated)| *escalated) || asks_for_person(text);
    let values: Vec<bool> = found.iter().filter_map(|(_, value, _)| *value).collect();
    let any_true = values.contains(&true);
    let any_false = values.contains(&false);
    let beside = json.as_ref().map_or_else(|| text.to_string(), |(_, outside)| outside.clone());
    let turned = if any_false { safe_label_turning(&beside, safe) } else { None };
    if let Some(label) = negated {
        // "Not safe." is not the safe label, and guessing the opposite label would be reading an answer in.
        answer.push_flag(Flag::Unparseable { detail: format!("the label {label} is negated in {}", excerpt(text)) });
    } else if any_true && any_false {
        answer.push_flag(Flag::Unparseable {
            detail: format!("both violating and safe labels appear in {}", excerpt(text)),
        });
    } else if let Some(label) = turned {
        // "The coupon code is VALID, but the post sells followers.": the safe label may describe something other
        // than the post, and which the model meant is for a person to say.
        answer.push_flag(Flag::Unparseable {
            detail: format!("the label {label} is followed by a contrast in {}", excerpt(text)),
        });
    } else {
        let from_label = (any_true || any_false).then_some(any_true);
        match (from_label, json.map(|(found, _)| found)) {
            (_, Some(Err(detail))) => answer.push_flag(Flag::Unparseable { detail }),
            (Some(said), Some(Ok((value, _)))) if said != value => answer.push_flag(Flag::Unparseable {
                detail: format!("the JSON answer and the label beside it disagree in {}", excerpt(text)),
            }),
            (Some(said), _) => {
                // "VALID\nViolation.", "VALID\nThe post is spam.": a label, and words beside it that say the other
                // side.
                let against = contradicting_sentence(&beside, said, &output)
                    .map(|sentence| sentence.trim().to_string())
                    .or_else(|| prose_concludes_otherwise(&beside, said, &output, &[]));
                match against {
                    Some(said_otherwise) => answer.push_flag(Flag::Unparseable {
                        detail: format!("\"{said_otherwise}\" says the opposite of the label in {}", excerpt(text)),
                    }),
                    None => {
                        answer.violation = Some(said);
                        answer.label = found.first().map(|(label, _, _)| label.clone());
                    }
                }
            }
            (None, Some(Ok((value, label)))) => match prose_concludes_otherwise(&beside, value, &output, &[]) {
                Some(phrase) => answer.push_flag(Flag::Unparseable {
                    detail: format!("\"{phrase}\" says the opposite of the JSON answer in {}", excerpt(text)),
                }),
                None => {
                    answer.violation = Some(value);
                    answer.label = label;
                }
            },
            (None, None) => {}
        }
    }
    if escalated {
        answer.label.get_or_insert_with(|| "ESCALATE".to_string());
        answer.push_flag(Flag::Escalated);
    }
    answer
}

/// A regex for `label` (normalized) as a whole word in model text, any case and spacing ("invalid+escalate"):
/// group 1 and 2 are the characters around it.
fn label_regex(label: &str) -> Option<Regex> {
    let words: Vec<String> = label.split(' ').map(regex::escape).collect();
    Regex::new(&format!(r"(?i)(^|[^A-Za-z0-9_]){}($|[^A-Za-z0-9_])", words.join(r"\s*"))).ok()
}

/// The first of the `safe` labels that `text` writes with its sentence turning to a contrast after it ("…is VALID,
/// but …"). Read in the text as written, so that a line break still ends the sentence.
fn safe_label_turning(text: &str, safe: &[String]) -> Option<String> {
    safe.iter().map(|label| normalize_label(label)).filter(|label| !label.is_empty()).find(|label| {
        label_regex(label).is_some_and(|regex| {
            regex.captures_iter(text).filter_map(|caps| caps.get(2)).any(|after| {
                let rest = &text[after.start()..];
                let bytes = rest.as_bytes();
                let end = (0..bytes.len()).find(|&at| crate::combined::cuts_sentence(bytes, at)).unwrap_or(bytes.len());
                words_of(&rest[..end]).iter().any(|word| CONTRASTS.contains(&word.as_str()))
            })
        })
    })
}

/// A JSON object found in model text, with where it sits.
pub(crate) struct FoundObject {
    pub(crate) span: Range<usize>,
    pub(crate) map: Map<String, Value>,
    /// Paths to keys written twice in one object with different values. serde keeps the last one, so without
    /// this `{"violation": 1, "violation": 0}` would read as a clean 0.
    pub(crate) conflicts: Vec<Vec<String>>,
}

/// The keys an answer object is read from ([`answer_from_object`], with [`field`]'s aliases).
pub(crate) const ANSWER_FIELDS: [&str; 11] = [
    "violation",
    "policy_category",
    "category",
    "rule_ids",
    "rule_id",
    "rules",
    "confidence",
    "rationale",
    "severity",
    "action",
    "label",
];

impl FoundObject {
    /// Whether a key given two different values hides which answer this object gives: a "violation" at any depth,
    /// a key on the way to the answer object (`{"result": {…1…}, "result": {…0…}}`), or a key the answer is read
    /// from inside it ("rule_ids" twice).
    pub(crate) fn answer_conflicts(&self) -> bool {
        let Some(to_answer) = answer_path(&self.map) else {
            return self.conflicts.iter().any(|path| path.last().is_some_and(|last| last == "violation"));
        };
        self.conflicts.iter().any(|path| {
            path.last().is_some_and(|last| last == "violation")
                || to_answer.starts_with(path)
                || path.starts_with(&to_answer)
                    && path.get(to_answer.len()).is_some_and(|step| ANSWER_FIELDS.contains(&step.as_str()))
        })
    }
}

/// The keys leading to [`answer_object`] in `map`: none when it is `map` itself.
fn answer_path(map: &Map<String, Value>) -> Option<Vec<String>> {
    let answer = answer_object(map)?;
    if std::ptr::eq(answer, map) {
        return Some(Vec::new());
    }
    map.iter()
        .find(|(_, value)| matches!(value, Value::Object(inner) if std::ptr::eq(inner, answer)))
        .map(|(key, _)| vec![key.clone()])
}

/// JSON objects in `text`, in order. Balanced-brace scanning (string-aware) finds them inside prose or code
/// fences; a failed parse is retried once with trailing commas removed, the one repair that cannot change
/// meaning. Single quotes, comments and Python literals are not repaired: they are rare from this model and
/// guessing at them risks reading an answer the model did not give.
pub(crate) fn find_objects(text: &str) -> Vec<FoundObject> {
    const MAX_ATTEMPTS: usize = 64;
    let bytes = text.as_bytes();
    let mut objects = Vec::new();
    let mut start = 0;
    let mut attempts = 0;
    while let Some(offset) = text[start..].find('{') {
        attempts += 1;
        if attempts > MAX_ATTEMPTS {
            break;
        }
        let open = start + offset;
        match matching_brace(bytes, open) {
            Some(close) => {
                let candidate = &text[open..=close];
                let parsed = serde_json::from_str::<Checked>(candidate)
                    .or_else(|_| serde_json::from_str::<Checked>(&remove_trailing_commas(candidate)));
                if let Ok(Checked { value: Value::Object(map), conflicts }) = parsed {
                    objects.push(FoundObject { span: open..close + 1, map, conflicts });
                    start = close + 1;
                } else {
                    start = open + 1;
                }
            }
            None => start = open + 1,
        }
    }
    objects
}

/// `text` with `objects` (found in it, in order) and code-fence markers taken out: what the model said besides
/// its JSON. Each object leaves a line break, so the words on either side stay apart.
pub(crate) fn outside_objects(text: &str, objects: &[FoundObject]) -> String {
    let mut outside = String::with_capacity(text.len());
    let mut at = 0;
    for object in objects {
        if let Some(before) = text.get(at..object.span.start) {
            outside.push_str(before);
        }
        outside.push('\n');
        at = at.max(object.span.end);
    }
    outside.push_str(text.get(at..).unwrap_or(""));
    // A first word that is no language name stays: it is part of what the model said.
    FENCE_MARK
        .replace_all(&outside, |caps: &regex::Captures| match caps.get(1).map(|tag| tag.as_str()) {
            Some(tag) if !tag.is_empty() && !fence_tag_is_language(tag) => format!("\n{tag}"),
            _ => "\n".to_string(),
        })
        .into_owned()
}

/// A JSON value read as `serde_json::Value` reads it, noting every key that one object gives twice with different
/// values (serde keeps the last silently).
struct Checked {
    value: Value,
    conflicts: Vec<Vec<String>>,
}

impl Checked {
    fn leaf(value: Value) -> Checked {
        Checked { value, conflicts: Vec::new() }
    }

    /// This value's conflicts, each path led by `step` (the key or index this value sits under).
    fn conflicts_under(conflicts: Vec<Vec<String>>, step: &str) -> impl Iterator<Item = Vec<String>> {
        conflicts.into_iter().map(move |mut path| {
            path.insert(0, step.to_string());
            path
        })
    }
}

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Checked, D::Error> {
        deserializer.deserialize_any(CheckedVisitor)
    }
}

struct CheckedVisitor;

impl<'de> Visitor<'de> for CheckedVisitor {
    type Value = Checked;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<Checked, E> {
        Ok(Checked::leaf(Value::Bool(value)))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Checked, E> {
        Ok(Checked::leaf(Value::from(value)))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<Checked, E> {
        Ok(Checked::leaf(Value::from(value)))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<Checked, E> {
        Ok(Checked::leaf(Value::from(value)))
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Checked, E> {
        Ok(Checked::leaf(Value::String(value.to_string())))
    }

    fn visit_string<E: de::Error>(self, value: String) -> Result<Checked, E> {
        Ok(Checked::leaf(Value::String(value)))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Checked, E> {
        Ok(Checked::leaf(Value::Null))
    }

    fn visit_none<E: de::Error>(self) -> Result<Checked, E> {
        Ok(Checked::leaf(Value::Null))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        let mut items = Vec::new();
        let mut conflicts = Vec::new();
        while let Some(item) = seq.next_element::<Checked>()? {
            conflicts.extend(Checked::conflicts_under(item.conflicts, &items.len().to_string()));
            items.push(item.value);
        }
        Ok(Checked { value: Value::Array(items), conflicts })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Checked, A::Error> {
        let mut map = Map::new();
        let mut conflicts = Vec::new();
        while let Some(key) = access.next_key::<String>()? {
            let item: Checked = access.next_value()?;
            conflicts.extend(Checked::conflicts_under(item.conflicts, &key));
            if let Some(earlier) = map.insert(key.clone(), item.value)
                && map.get(&key) != Some(&earlier)
            {
                conflicts.push(vec![key]);
            }
        }
        Ok(Checked { value: Value::Object(map), conflicts })
    }
}

fn matching_brace(bytes: &[u8], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (index, &byte) in bytes.iter().enumerate().skip(open) {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'{' => depth += 1,
            b'}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(index);
                }
            }
            _ => {}
        }
    }
    None
}

fn remove_trailing_commas(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let mut in_string = false;
    let mut escaped = false;
    let chars: Vec<char> = json.chars().collect();
    for (index, &c) in chars.iter().enumerate() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            out.push(c);
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        if c == ',' {
            let next = chars[index + 1..].iter().find(|c| !c.is_whitespace());
            if matches!(next, Some('}') | Some(']')) {
                continue;
            }
        }
        out.push(c);
    }
    out
}

/// `violation` as the model wrote it: 0/1, true/false, or words such as "yes".
pub(crate) fn coerce_violation(value: &Value) -> Result<Option<bool>, String> {
    match value {
        Value::Bool(flag) => Ok(Some(*flag)),
        Value::Number(number) => match number.as_f64() {
            Some(1.0) => Ok(Some(true)),
            Some(0.0) => Ok(Some(false)),
            _ => Err(format!("\"violation\": {number} is neither 0 nor 1")),
        },
        Value::String(text) => match strip_wrapping(text).to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "y" | "violation" | "violating" | "violates" | "unsafe" | "invalid" => {
                Ok(Some(true))
            }
            "0" | "false" | "no" | "n" | "safe" | "none" | "valid" | "allow" | "allowed" | "non-violating"
            | "no violation" | "not a violation" => Ok(Some(false)),
            _ => Err(format!("\"violation\": \"{}\" is not a yes/no answer", excerpt(text))),
        },
        Value::Null => Err("\"violation\" is null".to_string()),
        other => Err(format!("\"violation\" is {other}, not 0 or 1")),
    }
}

fn value_text(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(text) => Some(text.trim().to_string()).filter(|text| !text.is_empty()),
        Value::Array(items) => {
            let parts: Vec<String> = items.iter().filter_map(value_text).collect();
            (!parts.is_empty()).then(|| parts.join("\n"))
        }
        other => Some(other.to_string()),
    }
}

fn rule_id_list(value: &Value) -> Vec<String> {
    let mut ids: Vec<String> = match value {
        Value::Array(items) => items.iter().filter_map(value_text).collect(),
        Value::String(text) => text.split([',', ';']).map(|part| strip_wrapping(part).to_string()).collect(),
        _ => Vec::new(),
    };
    ids.retain(|id| !id.is_empty());
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| seen.insert(id.clone()));
    ids
}

/// The keys models write a rule-id list under.
const RULE_ID_KEYS: [&str; 3] = ["rule_ids", "rule_id", "rules"];

/// Field names with the aliases models use for them.
fn field<'a>(map: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    let aliases: &[&str] = match name {
        "policy_category" => &["policy_category", "category"],
        "rule_ids" => &RULE_ID_KEYS,
        _ => &[],
    };
    map.get(name).or_else(|| aliases.iter().find_map(|alias| map.get(*alias)))
}

/// Build an answer from one JSON object (a single-policy answer or one policy's entry in a combined answer), read
/// under the policy's `output` format, whose labels a `"label"` in the object may use.
pub(crate) fn answer_from_object(
    map: &Map<String, Value>,
    required_fields: &[&str],
    output: &OutputFormat,
) -> ParsedAnswer {
    let mut answer = ParsedAnswer::default();
    match field(map, "violation") {
        Some(value) => {
            answer.label = value_text(value);
            match coerce_violation(value) {
                Ok(violation) => answer.violation = violation,
                Err(detail) => answer.push_flag(Flag::Unparseable { detail }),
            }
        }
        None => answer.push_flag(Flag::MissingField { field: "violation".to_string() }),
    }
    for &required in required_fields {
        if required != "violation" && field(map, required).is_none() {
            answer.push_flag(Flag::MissingField { field: required.to_string() });
        }
    }
    answer.category = field(map, "policy_category").and_then(value_text);
    // Every spelling counts: `"rules": ["HT2.a"]` beside an empty `"rule_ids"` still cites HT2.a. Beside the list
    // the answer names as its own, another spelling gives only what is shaped like an id: `"rules": "none"` or
    // "HT0.b: counter-speech" cites nothing, or HT0.b.
    let own = field(map, "rule_ids");
    let mut rule_ids: Vec<String> = own.map(rule_id_list).unwrap_or_default();
    for other in RULE_ID_KEYS.iter().filter_map(|key| map.get(*key)).filter(|value| Some(*value) != own) {
        for listed in rule_id_list(other) {
            for (_, id) in safeguard_policy::find_rule_ids(&listed) {
                if !rule_ids.iter().any(|known| known == id) {
                    rule_ids.push(id.to_string());
                }
            }
        }
    }
    answer.rule_ids = rule_ids;
    answer.confidence = field(map, "confidence").and_then(value_text);
    answer.rationale = field(map, "rationale").and_then(value_text);
    answer.severity = field(map, "severity").and_then(value_text);
    answer.action = field(map, "action").and_then(value_text);
    let asks_for_person = answer.action.as_deref().is_some_and(action_asks_for_person)
        || map
            .get("label")
            .and_then(value_text)
            .is_some_and(|label| asks_for_person(&label) || escalate_label(&label, output).is_some());
    if asks_for_person {
        answer.push_flag(Flag::Escalated);
    }
    if let Some(violation) = answer.violation
        && let Some(detail) = two_sided(map, violation, output)
    {
        answer.push_flag(Flag::Unparseable { detail });
    }
    answer
}

/// Why the answer object `map`, whose `violation` says `violation`, also says the other side: another
/// `violation` ([`second_violation`]) or a `"label"` on the other side ([`label_side`]): `"label": "UNSAFE"` beside
/// `"violation": 0`, or `"label": "INVALID"` under a VALID/INVALID policy.
pub(crate) fn two_sided(map: &Map<String, Value>, violation: bool, output: &OutputFormat) -> Option<String> {
    if let Some(detail) = second_violation(map, violation) {
        return Some(detail);
    }
    let label = map.get("label").and_then(value_text)?;
    (label_side(&label, output) == Some(!violation))
        .then(|| format!("\"label\": {label:?} says the opposite of \"violation\": {}", u8::from(violation)))
}

/// Which side a JSON answer's `"label"` takes. The policy's own labels come first, since they may be any words
/// ("SPAM" / "HAM"), then the words any answer may use ("unsafe", "invalid", "no").
fn label_side(label: &str, output: &OutputFormat) -> Option<bool> {
    if let Some(side) = escalate_label(label, output) {
        return side;
    }
    word_reading(label, output).or_else(|| coerce_violation(&Value::String(label.to_string())).ok().flatten())
}

/// When `label` is one of a labels policy's escalate labels: `Some(Some(true))` when it holds a violating label
/// ("INVALID + ESCALATE"), `Some(None)` when it takes no side ("REVIEW").
fn escalate_label(label: &str, output: &OutputFormat) -> Option<Option<bool>> {
    let OutputFormat::Labels { violating, escalate, .. } = output else { return None };
    let label = normalize_label(bare_word(&without_rule_ids(label)));
    if label.is_empty() || !escalate.iter().any(|escalating| normalize_label(escalating) == label) {
        return None;
    }
    let violates = violating.iter().any(|v| label.split(' ').any(|word| word == normalize_label(v)));
    Some(violates.then_some(true))
}

/// Another `violation` in the answer object that does not say `violation`: a key spelled another way
/// (`"Violation": 1` beside `"violation": 0`), or, beside a "safe" answer, one nested in it that does not clearly
/// say "no" (`"details": {"violation": 1}`, `"rules": [{"violation": "likely"}]`). Either way the object says two
/// things, and which one a reader takes must not decide the verdict. Nested ones beside a violation are left alone:
/// per-rule breakdowns (`"HT1": {"violation": 1}, "HT2": {"violation": 0}`) under a violating answer change nothing.
fn second_violation(map: &Map<String, Value>, violation: bool) -> Option<String> {
    let differs = |value: &Value| coerce_violation(value).ok().flatten() != Some(violation);
    if let Some((key, _)) =
        map.iter().find(|(key, value)| key.as_str() != "violation" && is_violation_key(key) && differs(value))
    {
        return Some(format!("\"{key}\" and \"violation\" disagree"));
    }
    if violation {
        return None;
    }
    map.values()
        .find_map(|value| nested_violation(value, 0))
        .map(|key| format!("a nested \"{key}\" says \"violation\" beside the answer's \"violation\": 0"))
}

/// `violation` spelled any way ("Violation", "VIOLATION"), as a combined answer's keys are matched.
fn is_violation_key(key: &str) -> bool {
    crate::combined::normalize_key(key) == "violation"
}

/// The key of a `violation` nested in `value` that does not clearly say "no". Anything but a clear "no" counts
/// ("likely", 0.7, a rule id), except what only says the question does not arise: null, "n/a", "not applicable".
/// Lists too: a rule marked violated in a breakdown is no "safe" answer.
fn nested_violation(value: &Value, depth: usize) -> Option<String> {
    if depth > 8 {
        return None;
    }
    let does_not_arise = |value: &Value| match value {
        Value::Null => true,
        Value::String(text) => {
            matches!(strip_wrapping(text).to_ascii_lowercase().as_str(), "n/a" | "na" | "not applicable" | "")
        }
        _ => false,
    };
    match value {
        Value::Object(inner) => inner.iter().find_map(|(key, value)| {
            if is_violation_key(key) && coerce_violation(value).ok().flatten() != Some(false) && !does_not_arise(value)
            {
                return Some(key.clone());
            }
            nested_violation(value, depth + 1)
        }),
        Value::Array(items) => items.iter().find_map(|item| nested_violation(item, depth + 1)),
        _ => None,
    }
}

/// The object holding the answer: one with `violation` at the top, or nested one level down
/// (`{"result": {"violation": 1}}`).
fn answer_object(map: &Map<String, Value>) -> Option<&Map<String, Value>> {
    if map.contains_key("violation") {
        return Some(map);
    }
    let mut nested = map.values().filter_map(|value| match value {
        Value::Object(inner) if inner.contains_key("violation") => Some(inner),
        _ => None,
    });
    match (nested.next(), nested.next()) {
        (Some(only), None) => Some(only),
        _ => None,
    }
}

/// A JSON policy's answer, with the text outside its objects (rule ids there are citations too).
fn parse_json(final_text: &str, required_fields: &[&str], names: &[&str]) -> (ParsedAnswer, String) {
    let objects = find_objects(final_text);
    if objects.is_empty() {
        // A bare "1" or "INVALID" instead of JSON: keep what it says, but the requested fields are missing.
        let mut bare = parse_binary(final_text, names);
        if bare.violation.is_some() || bare.flags.contains(&Flag::Escalated) {
            bare.push_flag(Flag::Unparseable {
                detail: format!("expected a JSON object, got {}", excerpt(final_text)),
            });
            return (bare, final_text.to_string());
        }
        return (
            ParsedAnswer::unparseable(format!("no JSON object in {}", excerpt(final_text))),
            final_text.to_string(),
        );
    }
    let answers: Vec<&Map<String, Value>> = objects.iter().filter_map(|object| answer_object(&object.map)).collect();
    let mut answer = match answers.last() {
        None => {
            let empty = Map::new();
            let mut answer = answer_from_object(
                objects.last().map_or(&empty, |object| &object.map),
                required_fields,
                &OutputFormat::Json,
            );
            answer.push_flag(Flag::MissingField { field: "violation".to_string() });
            answer
        }
        Some(last) => {
            let values: Vec<Option<bool>> = answers
                .iter()
                .map(|object| object.get("violation").and_then(|value| coerce_violation(value).ok().flatten()))
                .collect();
            let mut answer = answer_from_object(last, required_fields, &OutputFormat::Json);
            // Every object's, wrappers' keys included (`{"result": {"violation": 0}, "Violation": 1}`).
            if let Some(violation) = answer.violation
                && !answer.flags.iter().any(|flag| matches!(flag, Flag::Unparseable { .. }))
                && let Some(detail) =
                    objects.iter().find_map(|object| object_two_sided(&object.map, violation, &OutputFormat::Json))
            {
                answer.push_flag(Flag::Unparseable { detail });
            }
            // An earlier object's request for a person stands: a later one cannot take it back.
            if answers
                .iter()
                .any(|object| answer_from_object(object, &[], &OutputFormat::Json).flags.contains(&Flag::Escalated))
            {
                answer.push_flag(Flag::Escalated);
            }
            // Every answer object must say the same clear thing: an earlier one that says nothing clear is not
            // outvoted.
            if values.iter().any(|value| *value != answer.violation) {
                answer.violation = None;
                answer.push_flag(Flag::Unparseable {
                    detail: format!("{} JSON answers disagree on \"violation\"", answers.len()),
                });
            }
            answer
        }
    };
    if objects.iter().any(FoundObject::answer_conflicts) {
        answer.violation = None;
        answer.push_flag(Flag::Unparseable {
            detail: format!("the answer is given twice with different values in {}", excerpt(final_text)),
        });
    }
    // Words outside the object are part of the answer too: "{…0…} Correction: … so 1" says two things, and an
    // ESCALATE beside the object still asks for a person. A lead-in with no verdict in it changes nothing.
    let outside = outside_objects(final_text, &objects);
    match binary_reading(&outside, names) {
        Ok(Some(said)) if answer.violation.is_some_and(|value| value != said) => {
            answer.violation = None;
            answer.push_flag(Flag::Unparseable {
                detail: format!("the JSON answer and the text around it disagree in {}", excerpt(final_text)),
            });
        }
        Ok(_) => {}
        Err(detail) => {
            answer.violation = None;
            answer.push_flag(Flag::Unparseable { detail: format!("the text around the JSON answer: {detail}") });
        }
    }
    // "{…0…}\nThis is hate speech.": no second answer beside the object, but prose that concludes the other side.
    if let Some(value) = answer.violation
        && let Some(phrase) = prose_concludes_otherwise(&outside, value, &OutputFormat::Json, names)
    {
        answer.violation = None;
        answer.push_flag(Flag::Unparseable {
            detail: format!("\"{phrase}\" beside the JSON answer says the opposite of it in {}", excerpt(final_text)),
        });
    }
    if asks_for_person(&outside) {
        answer.push_flag(Flag::Escalated);
    }
    (answer, outside)
}

/// A short, single-line excerpt of model text for error details.
pub(crate) fn excerpt(text: &str) -> String {
    const MAX_CHARS: usize = 80;
    // Control characters shown as U+FFFD: an excerpt lands in logs and in the stored failure reason, a TEXT column
    // that PostgreSQL refuses a NUL in.
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let flat: String = flat.chars().map(|c| if c.is_control() { '\u{fffd}' } else { c }).collect();
    if flat.chars().count() <= MAX_CHARS {
        format!("\"{flat}\"")
    } else {
        format!("\"{}…\"", flat.chars().take(MAX_CHARS).collect::<String>())
    }
}

//! Several policies in one prompt, one JSON answer keyed by policy name, one verdict per policy.
//!
//! The model's per-policy answers share one chain of thought that discusses every policy, so its final
//! conclusion phrase cannot be attributed to one policy. With several policies, the reasoning-agreement check
//! reads only the last sentence of the reasoning that names exactly one policy (and that policy) and states a
//! conclusion; every other check applies per policy as in single-policy judging.

use serde_json::{Map, Value};

use safeguard_policy::{FenceTracker, OutputFormat, Policy, heading};

use crate::answer::{
    ANSWER_FIELDS, BARE_DIGIT, answer_from_object, asks_for_person, coerce_violation, digit_candidates, excerpt,
    find_objects, outside_objects, prose_concludes_otherwise, word_reading,
};
use crate::{Flag, Verdict, decide, reasoning_conclusion, validate};

/// Fields each policy entry of a combined answer must carry.
const REQUIRED: [&str; 5] = ["violation", "policy_category", "rule_ids", "confidence", "rationale"];

/// Keys of the combined answer, one per policy: the policy name, made unique with the short hash when two
/// policies share a name (two versions of one policy, say). Names that differ only in case or punctuation
/// ("Hate", "hate") count as shared: answers are matched to keys that way, so one answer would fill both.
pub fn combined_keys(policies: &[Policy]) -> Vec<String> {
    policies
        .iter()
        .map(|policy| {
            let name = normalize_key(&policy.meta.name);
            let shared = policies.iter().filter(|other| normalize_key(&other.meta.name) == name).count() > 1;
            if shared { format!("{}@{}", policy.meta.name, policy.hash.short()) } else { policy.meta.name.clone() }
        })
        .collect()
}

/// Push a policy's headings two levels down so they nest under the `##` heading that names the policy.
fn demote_headings(body: &str) -> String {
    let mut fences = FenceTracker::default();
    body.lines()
        .map(|line| {
            if !fences.is_code(line)
                && let Some((level, title)) = heading(line)
            {
                let level = usize::from(level + 2).min(6);
                format!("{} {title}", "#".repeat(level))
            } else {
                line.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn format_line(keys: &[String]) -> String {
    let quoted: Vec<String> = keys.iter().map(|key| format!("\"{key}\"")).collect();
    format!(
        "Return exactly one JSON object and nothing else, with exactly these keys: {}. The value for each key is \
         that policy's answer: {{\"violation\": 0 or 1, \"policy_category\": \"<tier or rule id>\" or null, \
         \"rule_ids\": [\"<rule ids from that policy>\"], \"confidence\": \"high\" | \"medium\" | \"low\", \
         \"rationale\": \"one sentence citing rule ids\", \"action\": \"allow\" | \"block\" | \"escalate\"}}.",
        quoted.join(", ")
    )
}

/// One developer-message text holding several policies. Each policy keeps its own text (headings demoted)
/// under a heading with its key and short hash; its own answer format is replaced by the combined JSON.
pub fn combined_instructions(policies: &[Policy]) -> String {
    let keys = combined_keys(policies);
    let mut text = String::new();
    text.push_str("# Multi-policy classification\n\n## INSTRUCTIONS\n");
    text.push_str(&format!(
        "Check the user content against each of the {} policies below. Judge each policy on its own terms: \
         violating one policy does not make the content violate another, and cite only that policy's rule ids. \
         Where a policy asks for a different answer format (a single 0 or 1, a label, its own JSON), answer it \
         in the combined format below instead: \"violation\" is 1 exactly when that policy's answer would mean a \
         violation. Where a policy says to escalate, or you cannot decide, set \"action\": \"escalate\".\n",
        policies.len()
    ));
    text.push_str(&format_line(&keys));
    text.push('\n');
    let example: Vec<String> = keys
        .iter()
        .map(|key| format!("\"{key}\": {{\"violation\": 0, \"policy_category\": null, \"rule_ids\": [], \"confidence\": \"high\", \"rationale\": \"...\", \"action\": \"allow\"}}"))
        .collect();
    text.push_str(&format!("Shape: {{{}}}\n", example.join(", ")));
    for (policy, key) in policies.iter().zip(&keys) {
        text.push_str(&format!("\n## Policy \"{key}\" ({})\n\n", policy.hash.short()));
        text.push_str(&demote_headings(&policy.body));
        text.push('\n');
    }
    text.push_str("\n## ANSWER FORMAT (repeated)\n");
    text.push_str(&format_line(&keys));
    text
}

/// Spellings of a key a chain of thought uses: "self-harm", "self harm".
fn spellings(key: &str) -> Vec<String> {
    let lower = key.to_lowercase();
    let spaced = lower.replace(['-', '_'], " ");
    if spaced == lower { vec![lower] } else { vec![lower, spaced] }
}

/// Whether a lowercased `sentence` names `key` as a whole word: "sexual" is not mentioned by "homosexual", nor
/// "hate" by "whatever".
fn mentions(sentence: &str, key: &str) -> bool {
    spellings(key).iter().any(|spelling| {
        sentence.match_indices(spelling.as_str()).any(|(at, found)| {
            let before = sentence[..at].chars().next_back();
            let after = sentence[at + found.len()..].chars().next();
            !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric)
        })
    })
}

/// The last sentence of the reasoning that names `key` and no other policy and concludes something, e.g. "For
/// spam, it's not spam." A later sentence about the policy that concludes nothing ("Hate check done.") does not
/// hide the conclusion before it.
fn sentence_about(analysis: &str, keys: &[String], key: &str, output: &OutputFormat) -> Option<String> {
    sentences_ended(analysis)
        .into_iter()
        .rev()
        // A question weighs a side ("Hate: does it violate HT2.a?"); it concludes nothing.
        .filter(|(sentence, question)| {
            let lower = sentence.to_lowercase();
            !question
                && mentions(&lower, key)
                && keys.iter().filter(|other| other.as_str() != key).all(|other| !mentions(&lower, other))
        })
        .find(|(sentence, _)| reasoning_conclusion(sentence, output).is_some())
        .map(|(sentence, _)| sentence.to_string())
}

/// The sentences of `text`, cut at line breaks, `;`, and `.`/`!`/`?` before a space (not the dot in "SP2.a"), each
/// with whether it ends in a question mark.
pub(crate) fn sentences_ended(text: &str) -> Vec<(&str, bool)> {
    sentence_spans(text)
        .into_iter()
        .map(|(start, end)| (&text[start..end], text.as_bytes().get(end) == Some(&b'?')))
        .collect()
}

/// Where each of [`sentences_ended`] starts and ends in `text`; the byte at the end, if any, is the mark that ended it.
fn sentence_spans(text: &str) -> Vec<(usize, usize)> {
    let bytes = text.as_bytes();
    let mut spans = Vec::new();
    let mut from = 0;
    for at in 0..bytes.len() {
        if cuts_sentence(bytes, at) {
            spans.push((from, at));
            from = at + 1;
        }
    }
    spans.push((from, bytes.len()));
    spans.retain(|&(start, end)| !text[start..end].trim().is_empty());
    spans
}

/// Whether byte `at` of `bytes` ends a sentence: a line break, `;`, or `.`/`!`/`?` before a space or the end.
pub(crate) fn cuts_sentence(bytes: &[u8], at: usize) -> bool {
    matches!(bytes[at], b'\n' | b';')
        || matches!(bytes[at], b'.' | b'!' | b'?') && bytes.get(at + 1).is_none_or(u8::is_ascii_whitespace)
}

/// What the words outside a combined answer's objects say, per policy key: a 0/1 there (unclear), an answer in
/// words or the policy's labels ("Violation.", "hate: unsafe"), or a request for a person. A sentence counts for
/// the policies it names, or for all of them when it names none.
#[derive(Default)]
struct Beside {
    digits: Vec<(String, String)>,
    words: Vec<(String, bool, String)>,
    escalated: Vec<String>,
    /// Per policy, in order, the sentences that may be about it, to be read for a conclusion as the prose beside a
    /// single answer is ("This is hate speech."). A sentence is about the one policy it names; one naming several
    /// may conclude about any of them ("It's hate speech, not spam"), and one naming none about all, so either
    /// counts for every policy: a conclusion that cannot be pinned on one policy sends each it contradicts to a
    /// person rather than leaving any an allow.
    prose: Vec<String>,
}

/// `lower` with every whole-word mention of a key taken out: "hate: unsafe" leaves ": unsafe".
fn without_keys(lower: &str, keys: &[String]) -> String {
    let mut text = lower.to_string();
    for spelling in keys.iter().flat_map(|key| spellings(key)) {
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for (found, _) in text.match_indices(spelling.as_str()) {
            let before = text[..found].chars().next_back();
            let after = text[found + spelling.len()..].chars().next();
            if found >= at && !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric) {
                out.push_str(&text[at..found]);
                out.push(' ');
                at = found + spelling.len();
            }
        }
        out.push_str(&text[at..]);
        text = out;
    }
    text
}

fn read_beside(outside: &str, policies: &[Policy], keys: &[String]) -> Beside {
    let mut beside = Beside { prose: vec![String::new(); keys.len()], ..Beside::default() };
    for (start, end) in sentence_spans(outside) {
        let sentence = &outside[start..end];
        let lower = sentence.to_lowercase();
        let named: Vec<usize> = (0..keys.len()).filter(|&index| mentions(&lower, &keys[index])).collect();
        // With its end mark, so that a question still reads as one and sentences stay apart once joined.
        let marked = outside.get(start..end + 1).unwrap_or(sentence);
        let about: Vec<usize> = if named.len() == 1 { named.clone() } else { (0..keys.len()).collect() };
        for index in about {
            if let Some(prose) = beside.prose.get_mut(index) {
                prose.push_str(marked);
                prose.push(' ');
            }
        }
        let concerned: Vec<usize> = if named.is_empty() { (0..keys.len()).collect() } else { named };
        let digit = digit_candidates(sentence, &BARE_DIGIT).first().map(|&(_, digit)| digit.to_string());
        let escalated = asks_for_person(sentence);
        let rest = without_keys(&crate::answer::without_rule_ids(sentence).to_lowercase(), keys);
        for index in concerned {
            let key = &keys[index];
            if let Some(digit) = &digit {
                beside.digits.push((key.clone(), format!("\"{digit}\" in {}", excerpt(sentence))));
            }
            if let Some(said) = policies.get(index).and_then(|policy| word_reading(&rest, &policy.meta.output)) {
                beside.words.push((key.clone(), said, excerpt(sentence)));
            }
            if escalated {
                beside.escalated.push(key.clone());
            }
        }
    }
    beside
}

/// Whether a key given twice (at `path` in `map`) hides the answer for `key`: the path goes through that
/// policy's entry to a key the answer is read from (or is the entry itself), or, naming no policy, leads to the
/// wrapper that holds the entry (`{"results": {"spam": 1}, "results": {"spam": 0}}`).
fn conflict_hides(map: &Map<String, Value>, path: &[String], key: &str, keys: &[String]) -> bool {
    let wanted = normalize_key(key);
    if let Some(at) = path.iter().position(|step| normalize_key(step) == wanted) {
        return match path.get(at + 1) {
            None => true,
            Some(field) => ANSWER_FIELDS.contains(&field.as_str()) || path.last().is_some_and(|l| l == "violation"),
        };
    }
    if path.iter().any(|step| keys.iter().any(|other| normalize_key(step) == normalize_key(other))) {
        return false;
    }
    let mut value: Option<&Value> = None;
    let mut current = map;
    for step in path {
        match current.get(step) {
            Some(found) => {
                value = Some(found);
                match found {
                    Value::Object(inner) => current = inner,
                    _ => break,
                }
            }
            None => return false,
        }
    }
    matches!(value, Some(Value::Object(inner)) if !lookup(inner, key).is_empty())
}

pub(crate) fn normalize_key(key: &str) -> String {
    key.chars().filter(|c| c.is_alphanumeric()).flat_map(char::to_lowercase).collect()
}

/// Every value for `key`: under the key itself or under any key equal to it ignoring case and punctuation
/// ("Self-Harm" = "self_harm"). All of them, not the first: `"hate": …, "Hate": …` answers the policy twice, and
/// which one a reader takes must not decide the verdict.
fn lookup<'a>(object: &'a Map<String, Value>, key: &str) -> Vec<&'a Value> {
    let wanted = normalize_key(key);
    if wanted.is_empty() {
        // A key of punctuation alone would equal every other such key: only the exact one is its answer.
        return object.get(key).into_iter().collect();
    }
    object.iter().filter(|(candidate, _)| normalize_key(candidate) == wanted).map(|(_, value)| value).collect()
}

/// The `violation` an entry (an object, or a bare 0/1 or word) says clearly, if it does.
fn entry_violation(entry: &Value) -> Option<bool> {
    match entry {
        Value::Object(object) => object.get("violation").and_then(|v| coerce_violation(v).ok().flatten()),
        other => coerce_violation(other).ok().flatten(),
    }
}

/// An entry as an answer object: a bare 0/1 or label stands for its `violation`.
fn entry_object(entry: &Value) -> Map<String, Value> {
    match entry {
        Value::Object(object) => object.clone(),
        other => Map::from_iter([("violation".to_string(), other.clone())]),
    }
}

/// One verdict per policy, in order, from a combined answer.
pub fn judge_combined(
    policies: &[Policy],
    analysis: Option<&str>,
    final_text: Option<&str>,
    truncated: bool,
) -> Vec<Verdict> {
    let _span = tracing::debug_span!("judge_combined", policies = policies.len()).entered();
    let keys = combined_keys(policies);
    let base_flags = if truncated { vec![Flag::Truncated] } else { Vec::new() };
    let Some(final_text) = final_text.filter(|text| !text.trim().is_empty()) else {
        let mut flags = vec![Flag::NoFinalMessage];
        flags.extend(base_flags);
        return policies.iter().map(|policy| Verdict::undetermined(policy, flags.clone())).collect();
    };
    // Objects that answer at least one policy, in order; a nested wrapper ({"results": {...}}) is unwrapped.
    let found = find_objects(final_text);
    // The words beside the objects are part of the answer: "{…"spam": 0…}\nCorrection: spam is 1" says two things.
    let beside = read_beside(&outside_objects(final_text, &found), policies, &keys);
    let keyed: Vec<Map<String, Value>> = found
        .iter()
        .map(|object| object.map.clone())
        .flat_map(|object| {
            let direct = keys.iter().any(|key| !lookup(&object, key).is_empty());
            if direct {
                vec![object]
            } else {
                object
                    .into_iter()
                    .filter_map(|(_, value)| match value {
                        Value::Object(inner) if keys.iter().any(|key| !lookup(&inner, key).is_empty()) => Some(inner),
                        _ => None,
                    })
                    .collect()
            }
        })
        .collect();
    if keyed.is_empty() {
        let mut flags = base_flags;
        flags.push(Flag::Unparseable {
            detail: format!("no JSON object keyed by policy name in {}", excerpt(final_text)),
        });
        return policies.iter().map(|policy| Verdict::undetermined(policy, flags.clone())).collect();
    }
    policies
        .iter()
        .zip(&keys)
        .enumerate()
        .map(|(index, (policy, key))| {
            let per_object: Vec<Vec<&Value>> = keyed.iter().map(|object| lookup(object, key)).collect();
            let entries: Vec<&Value> = per_object.iter().flatten().copied().collect();
            let Some(entry) = entries.last() else {
                let mut flags = base_flags.clone();
                flags.push(Flag::MissingField { field: key.clone() });
                return Verdict::undetermined(policy, flags);
            };
            let mut verdict = Verdict::from_answer(
                policy,
                answer_from_object(&entry_object(entry), &REQUIRED, &policy.meta.output),
                base_flags.clone(),
            );
            // Every entry must say the same clear thing: an earlier one that says nothing clear ("unsure") is not
            // outvoted by a later clean one.
            if entries.iter().any(|entry| entry_violation(entry) != verdict.violation) {
                verdict.violation = None;
                verdict.push_flag(Flag::Unparseable {
                    detail: format!("{} answers for \"{key}\" disagree", entries.len()),
                });
            }
            // Two spellings of the key in one object are that key given twice: any difference hides the answer,
            // as with a repeated key below.
            if per_object.iter().any(|found| found.iter().any(|value| *value != found[0])) {
                verdict.violation = None;
                verdict.push_flag(Flag::Unparseable {
                    detail: format!("the answer for \"{key}\" is given under several spellings with different values"),
                });
            }
            // A request for a person in any entry stands: a later entry cannot take it back.
            if entries.iter().any(|entry| {
                answer_from_object(&entry_object(entry), &[], &policy.meta.output).flags.contains(&Flag::Escalated)
            }) {
                verdict.push_flag(Flag::Escalated);
            }
            // serde keeps the last of two same-named keys, so `"spam": 1, "spam": 0` or a repeated "violation"
            // inside this policy's entry would otherwise read as one clean answer.
            let repeated = found
                .iter()
                .any(|object| object.conflicts.iter().any(|path| conflict_hides(&object.map, path, key, &keys)));
            if repeated {
                verdict.violation = None;
                verdict.push_flag(Flag::Unparseable {
                    detail: format!("the answer for \"{key}\" is given twice with different values"),
                });
            }
            if let Some((_, said)) = beside.digits.iter().find(|(concerned, _)| concerned == key) {
                verdict.violation = None;
                verdict.push_flag(Flag::Unparseable {
                    detail: format!("the text outside the JSON answer says {said} about \"{key}\""),
                });
            }
            if let Some(violation) = verdict.violation
                && let Some((_, _, said)) =
                    beside.words.iter().find(|(concerned, value, _)| concerned == key && *value != violation)
            {
                verdict.violation = None;
                verdict.push_flag(Flag::Unparseable {
                    detail: format!("the text outside the JSON answer says otherwise about \"{key}\" in {said}"),
                });
            }
            // "{…"hate": {"violation": 0}…} This is hate speech.": no second answer beside the objects, but prose
            // that concludes the other side for this policy.
            if let Some(violation) = verdict.violation
                && let Some(phrase) = beside
                    .prose
                    .get(index)
                    .and_then(|prose| prose_concludes_otherwise(prose, violation, &policy.meta.output, &[key.as_str()]))
            {
                verdict.violation = None;
                verdict.push_flag(Flag::Unparseable {
                    detail: format!(
                        "\"{phrase}\" outside the JSON answer says the opposite of its answer for \"{key}\""
                    ),
                });
            }
            if beside.escalated.iter().any(|concerned| concerned == key) {
                verdict.push_flag(Flag::Escalated);
            }
            // With one policy the whole chain of thought is about it.
            let reasoning = if policies.len() == 1 {
                analysis.map(str::to_string)
            } else {
                analysis.and_then(|analysis| sentence_about(analysis, &keys, key, &policy.meta.output))
            };
            validate(policy, &mut verdict, reasoning.as_deref());
            verdict.outcome = decide(verdict.violation, &verdict.flags);
            verdict
        })
        .collect()
}

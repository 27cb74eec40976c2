//! Several policies in one prompt, one JSON answer keyed by policy name, one verdict per policy.
//!
//! The model's per-policy answers share one chain of thought that discusses every policy, so its final
//! conclusion phrase cannot be attributed to one policy. With several policies, the reasoning-agreement check
//! reads only the last sentence of the reasoning that names exactly one policy (and that policy); every other
//! check applies per policy as in single-policy judging.

use serde_json::{Map, Value};

use safeguard_policy::{FenceTracker, Policy, heading};

use crate::answer::{
    ANSWER_FIELDS, BARE_DIGIT, answer_from_object, asks_for_person, coerce_violation, digit_candidates, excerpt,
    find_objects, outside_objects,
};
use crate::{Flag, Verdict, decide, validate};

/// Fields each policy entry of a combined answer must carry.
const REQUIRED: [&str; 5] = ["violation", "policy_category", "rule_ids", "confidence", "rationale"];

/// Keys of the combined answer, one per policy: the policy name, made unique with the short hash when two
/// policies share a name (two versions of one policy, say).
pub fn combined_keys(policies: &[Policy]) -> Vec<String> {
    policies
        .iter()
        .map(|policy| {
            let shared = policies.iter().filter(|other| other.meta.name == policy.meta.name).count() > 1;
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

/// The last sentence of the reasoning that names `key` and no other policy, e.g. "For spam, it's not spam."
fn sentence_about(analysis: &str, keys: &[String], key: &str) -> Option<String> {
    analysis.split(['.', '\n', ';', '!', '?']).rev().map(str::to_lowercase).find(|sentence| {
        mentions(sentence, key)
            && keys.iter().filter(|other| other.as_str() != key).all(|other| !mentions(sentence, other))
    })
}

/// The sentences of `text`: cut at line breaks, `;`, and `.`/`!`/`?` before a space (not the dot in "SP2.a").
fn sentences(text: &str) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut from = 0;
    for at in 0..bytes.len() {
        let cut = matches!(bytes[at], b'\n' | b';')
            || matches!(bytes[at], b'.' | b'!' | b'?') && bytes.get(at + 1).is_none_or(u8::is_ascii_whitespace);
        if cut {
            out.push(&text[from..at]);
            from = at + 1;
        }
    }
    out.push(&text[from..]);
    out.into_iter().filter(|sentence| !sentence.trim().is_empty()).collect()
}

/// What the words outside a combined answer's objects say, per policy key: a 0/1 there (unclear) or a request for
/// a person. A sentence counts for the policies it names, or for all of them when it names none.
#[derive(Default)]
struct Beside {
    digits: Vec<(String, String)>,
    escalated: Vec<String>,
}

fn read_beside(outside: &str, keys: &[String]) -> Beside {
    let mut beside = Beside::default();
    for sentence in sentences(outside) {
        let lower = sentence.to_lowercase();
        let named: Vec<&String> = keys.iter().filter(|key| mentions(&lower, key)).collect();
        let concerned: Vec<&String> = if named.is_empty() { keys.iter().collect() } else { named };
        let digit = digit_candidates(sentence, &BARE_DIGIT).first().map(|&(_, digit)| digit.to_string());
        let escalated = asks_for_person(sentence);
        for key in concerned {
            if let Some(digit) = &digit {
                beside.digits.push((key.clone(), format!("\"{digit}\" in {}", excerpt(sentence))));
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
    matches!(value, Some(Value::Object(inner)) if lookup(inner, key).is_some())
}

fn normalize_key(key: &str) -> String {
    key.chars().filter(|c| c.is_alphanumeric()).flat_map(char::to_lowercase).collect()
}

/// The value for `key`: exact key, else the same key ignoring case and punctuation ("Self-Harm" = "self_harm").
fn lookup<'a>(object: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    object.get(key).or_else(|| {
        let wanted = normalize_key(key);
        object.iter().find(|(candidate, _)| normalize_key(candidate) == wanted).map(|(_, value)| value)
    })
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
    let beside = read_beside(&outside_objects(final_text, &found), &keys);
    let keyed: Vec<Map<String, Value>> = found
        .iter()
        .map(|object| object.map.clone())
        .flat_map(|object| {
            let direct = keys.iter().any(|key| lookup(&object, key).is_some());
            if direct {
                vec![object]
            } else {
                object
                    .into_iter()
                    .filter_map(|(_, value)| match value {
                        Value::Object(inner) if keys.iter().any(|key| lookup(&inner, key).is_some()) => Some(inner),
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
        .map(|(policy, key)| {
            let entries: Vec<&Value> = keyed.iter().filter_map(|object| lookup(object, key)).collect();
            let Some(entry) = entries.last() else {
                let mut flags = base_flags.clone();
                flags.push(Flag::MissingField { field: key.clone() });
                return Verdict::undetermined(policy, flags);
            };
            let object = match entry {
                Value::Object(object) => (*object).clone(),
                // A bare 0/1 or label for this policy: the value is clear, the other fields are missing.
                other => Map::from_iter([("violation".to_string(), (*other).clone())]),
            };
            let mut verdict = Verdict::from_answer(policy, answer_from_object(&object, &REQUIRED), base_flags.clone());
            let values: Vec<Option<bool>> = entries
                .iter()
                .map(|entry| match entry {
                    Value::Object(object) => object.get("violation").and_then(|v| coerce_violation(v).ok().flatten()),
                    other => coerce_violation(other).ok().flatten(),
                })
                .collect();
            if values.iter().flatten().any(|value| Some(*value) != verdict.violation) {
                verdict.violation = None;
                verdict.push_flag(Flag::Unparseable {
                    detail: format!("{} answers for \"{key}\" disagree", entries.len()),
                });
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
            if beside.escalated.iter().any(|concerned| concerned == key) {
                verdict.push_flag(Flag::Escalated);
            }
            // With one policy the whole chain of thought is about it.
            let reasoning = if policies.len() == 1 {
                analysis.map(str::to_string)
            } else {
                analysis.and_then(|analysis| sentence_about(analysis, &keys, key))
            };
            validate(policy, &mut verdict, reasoning.as_deref());
            verdict.outcome = decide(verdict.violation, &verdict.flags);
            verdict
        })
        .collect()
}

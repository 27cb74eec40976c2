//! Reading the model's self-reported `"confidence"`: words ("high", "very low") or numbers (0.9, "85%").
//!
//! The formats ask for "high" | "medium" | "low", but models also write "low.", "medium-low", 0.1 or "30%". A
//! reading that cannot be told apart from low counts as low: the flag it raises sends a "safe" answer to a
//! person, which is the cheap way to be wrong, and the words a clean answer uses ("high", "medium") stay sure.

use std::sync::LazyLock;

use regex::Regex;

/// Below this a numeric confidence is low. The answer is one of two: under one half the model rates its own
/// answer less likely than the other one.
const MIN_SURE: f64 = 0.5;

/// Words of a confidence that is not low: the levels the formats ask for and what models put around them ("very
/// high", "High confidence", "medium-high").
const SURE_WORDS: [&str; 24] = [
    "high",
    "highly",
    "medium",
    "med",
    "mid",
    "moderate",
    "moderately",
    "very",
    "quite",
    "fairly",
    "reasonably",
    "pretty",
    "extremely",
    "strong",
    "strongly",
    "certain",
    "confident",
    "confidence",
    "sure",
    "definite",
    "definitely",
    "absolute",
    "absolutely",
    "fully",
];

/// Words that say the model is unsure, whatever else is written beside them, in the level or in what explains it
/// ("high, though unsure about sarcasm").
const UNSURE_WORDS: [&str; 12] = [
    "unsure",
    "uncertain",
    "uncertainty",
    "unclear",
    "doubtful",
    "guess",
    "unknown",
    "ambiguous",
    "borderline",
    "might",
    "possibly",
    "perhaps",
];

/// Words that make the level itself unsure ("not high", "none"); in an explanation they describe the content
/// ("high - the insult is not subtle").
const UNSURE_LEVEL_WORDS: [&str; 2] = ["not", "none"];

static NUMBER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(-?)(\d+(?:\.\d+)?|\.\d+)\s*(%?)").expect("static regex"));

/// Whether `confidence` says the model was sure enough: a sure word with no low or unsure word beside it, or
/// numbers all within [0, 1] (a percentage within 0 to 100 %) and at least [`MIN_SURE`]. Anything else, "NaN" and
/// an unknown word included, is not sure.
pub(crate) fn is_sure(confidence: &str) -> bool {
    let lower = confidence.trim().to_lowercase();
    // The level comes first; what follows a separator explains it ("High - the insult is explicit", "high (clear
    // criticism)") and its words are no level. A low word anywhere still counts below.
    let level = lower.split([';', ',', ':', '(', '\u{2014}', '\u{2013}']).next().unwrap_or("");
    let level = level.split(" - ").next().unwrap_or("");
    // "low", "very low", "low.", "medium-low", "lowish", "below 50%".
    if lower.contains("low") {
        return false;
    }
    let words: Vec<&str> = level.split(|c: char| !c.is_alphabetic()).filter(|word| !word.is_empty()).collect();
    // "no uncertainty", "not borderline": an unsure word taken back says the model was sure.
    let all_words: Vec<&str> = lower.split(|c: char| !c.is_alphabetic()).filter(|word| !word.is_empty()).collect();
    let taken_back =
        |at: usize| all_words[at.saturating_sub(2)..at].iter().any(|w| ["no", "not", "without"].contains(w));
    let unsure_anywhere = all_words.iter().enumerate().any(|(at, word)| {
        (UNSURE_WORDS.contains(word) && !taken_back(at))
            // "High - not sure about sarcasm": a sure word taken back is an unsure one.
            || (["sure", "certain", "confident", "clear"].contains(word)
                && at.checked_sub(1).is_some_and(|before| ["no", "not"].contains(&all_words[before])))
    });
    if words.iter().any(|word| UNSURE_LEVEL_WORDS.contains(word)) || unsure_anywhere {
        return false;
    }
    let numbers: Vec<Option<f64>> = NUMBER
        .captures_iter(level)
        .map(|caps| {
            let value: f64 = caps.get(2)?.as_str().parse().ok()?;
            let value = if caps.get(1).is_some_and(|sign| !sign.is_empty()) { -value } else { value };
            Some(if caps.get(3).is_some_and(|percent| !percent.is_empty()) { value / 100.0 } else { value })
        })
        .collect();
    let numbers_sure = numbers.iter().all(|value| value.is_some_and(|value| (MIN_SURE..=1.0).contains(&value)));
    let words_sure = words.iter().all(|word| SURE_WORDS.contains(word));
    // Something must be read: an empty or punctuation-only confidence says nothing.
    (!numbers.is_empty() || !words.is_empty()) && numbers_sure && words_sure
}

#[cfg(test)]
mod tests {
    use super::is_sure;

    #[test]
    fn confidence_readings() {
        for sure in [
            "high",
            "High.",
            "medium",
            "medium-high",
            "very high",
            "High confidence",
            "0.9",
            "1",
            "0.5",
            "90%",
            "1.0",
            "High - the insult is explicit",
            "high (clear criticism)",
            "Medium: the context is thin",
            "High - the insult is not subtle",
            "High - no uncertainty",
            "high (not borderline)",
            "High - no doubt, clear",
        ] {
            assert!(is_sure(sure), "{sure}");
        }
        for unsure in [
            "low",
            "Low",
            "low.",
            "very low",
            "medium-low",
            "0.1",
            "0.49",
            "1.5",
            "-0.2",
            "NaN",
            "inf",
            "30%",
            "150%",
            "unsure",
            "not sure",
            "maybe",
            "",
            "?",
            "85",
            "none",
            "high, though unsure about sarcasm",
            "High (the context is unclear)",
            "High - not sure about sarcasm",
            "high (not certain)",
            "high, though it might be sarcasm",
        ] {
            assert!(!is_sure(unsure), "{unsure}");
        }
    }
}

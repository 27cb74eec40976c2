use proptest::prelude::*;
use safeguard_policy::{OutputFormat, Policy, starter_library};

use super::*;

fn binary_policy() -> Policy {
    Policy::parse(
        "---\nname: spam\noutput: binary\n---\n# Spam\n## INSTRUCTIONS\nReturn exactly one character: 0 or 1.\n\
         ## VIOLATES (1)\n- SP2.a Bulk promotion.\n- SP4.a Phishing.\n## DOES NOT VIOLATE (0)\n- SP0.a Questions.\n",
    )
    .unwrap()
}

fn labels_policy() -> Policy {
    Policy::parse("# Spam (#SP)\nAnswer VALID, INVALID or INVALID + ESCALATE.\n- SP2.a Bulk.\n").unwrap()
}

fn json_policy() -> Policy {
    Policy::parse(
        "---\nname: hate\noutput: json\nhigh_risk: false\n---\n# Hate\nReturn {\"violation\": 0 or 1, \"policy_category\": \"HT2\", \
         \"rule_ids\": [], \"confidence\": \"high\", \"rationale\": \"...\"}\n- HT2.a Dehumanization.\n- HT3.a Threats.\n- HT0.a Critique.\n",
    )
    .unwrap()
}

fn starter(name: &str) -> Policy {
    starter_library().into_iter().find(|policy| policy.meta.name == name).unwrap()
}

fn has_unparseable(verdict: &Verdict) -> bool {
    verdict.flags.iter().any(|flag| matches!(flag, Flag::Unparseable { .. }))
}

#[test]
fn binary_answers_table() {
    let policy = binary_policy();
    let cases: &[(&str, Option<bool>, Outcome)] = &[
        ("1", Some(true), Outcome::Violation),
        ("0", Some(false), Outcome::Allow),
        (" 1\n", Some(true), Outcome::Violation),
        ("1.", Some(true), Outcome::Violation),
        ("**0**", Some(false), Outcome::Allow),
        ("`1`", Some(true), Outcome::Violation),
        ("\"0\"", Some(false), Outcome::Allow),
        ("```\n1\n```", Some(true), Outcome::Violation),
        ("Answer: 1", Some(true), Outcome::Violation),
        ("The content is a phishing lure, so the answer is 1.", Some(true), Outcome::Violation),
        ("Label: 0 (does not violate)", Some(false), Outcome::Allow),
        ("{\"violation\": 1}", Some(true), Outcome::Violation),
        ("violation", Some(true), Outcome::Violation),
        ("Safe.", Some(false), Outcome::Allow),
        ("Answer: 0 (0 = safe, 1 = violation)", Some(false), Outcome::Allow),
        ("0 or 1", None, Outcome::NeedsReview),
        ("1 0", None, Outcome::NeedsReview),
        ("I think 0, no wait, 1", None, Outcome::NeedsReview),
        ("maybe", None, Outcome::NeedsReview),
        ("0.7", None, Outcome::NeedsReview),
        ("10", None, Outcome::NeedsReview),
        ("ESCALATE", None, Outcome::NeedsReview),
        ("1 ESCALATE", Some(true), Outcome::NeedsReview),
        // A bare digit answers only where an answer goes: leading, last, or after a concluding word.
        ("The message asks for the account password and has 0 links.", None, Outcome::NeedsReview),
        ("1 link is included and it asks for the password.", None, Outcome::NeedsReview),
        ("Rule 1 does not apply here.", None, Outcome::NeedsReview),
        ("So 1, because it asks for a password.", Some(true), Outcome::Violation),
        ("The answer is 0 since it is a question.", Some(false), Outcome::Allow),
        ("It is a phishing lure: 1 (SP4.a).", Some(true), Outcome::Violation),
        ("0\nA question about plumbers.", Some(false), Outcome::Allow),
        ("It is phishing, so 1 (1 = violation).", Some(true), Outcome::Violation),
        // An echoed legend is no answer, in either order; a legend beside a conclusive digit explains it.
        ("0 = safe, 1 = violation", None, Outcome::NeedsReview),
        ("1 = violation, 0 = safe", None, Outcome::NeedsReview),
        ("0: benign\n1: violation", None, Outcome::NeedsReview),
        ("0 (0 = safe, 1 = violation)", Some(false), Outcome::Allow),
        // Ordinary keyed or leading answers.
        ("Violation: 1\nRationale: the post links to a coupon site.", Some(true), Outcome::Violation),
        ("**Decision:** 0 - a question about plumbers.", Some(false), Outcome::Allow),
        ("No, 0.", Some(false), Outcome::Allow),
        ("Spam: 1 - links to a coupon site.", Some(true), Outcome::Violation),
        ("1 because it sells followers", Some(true), Outcome::Violation),
        ("0 The message is a question.", Some(false), Outcome::Allow),
        ("0 The message is a question, 1 link.", None, Outcome::NeedsReview),
        // A negated digit is no answer.
        ("The answer is not 0.", None, Outcome::NeedsReview),
        ("It is not 0.", None, Outcome::NeedsReview),
        ("It isn't 1.", None, Outcome::NeedsReview),
        // A negated escalation asks for nobody; a plain one still does.
        ("0 — no need to escalate", Some(false), Outcome::Allow),
        ("0\nNo escalation needed.", Some(false), Outcome::Allow),
        ("1, escalate to a human", Some(true), Outcome::NeedsReview),
        ("1 - not sure, ESCALATE", Some(true), Outcome::NeedsReview),
    ];
    for (text, violation, outcome) in cases {
        let verdict = judge(&policy, None, Some(text), false);
        assert_eq!(verdict.violation, *violation, "{text:?}: {verdict:?}");
        assert_eq!(verdict.outcome, *outcome, "{text:?}: {verdict:?}");
    }
    let verdict = judge(&policy, None, Some("1 0"), false);
    assert!(has_unparseable(&verdict));
    let verdict = judge(&policy, None, Some("ESCALATE"), false);
    assert_eq!(verdict.flags, vec![Flag::Escalated]);
    assert_eq!(verdict.label.as_deref(), Some("ESCALATE"));
    assert_eq!(judge(&policy, None, Some("1."), false).label.as_deref(), Some("1"));
    for text in ["1, escalate to a human", "1 - not sure, ESCALATE", "ESCALATE"] {
        assert!(judge(&policy, None, Some(text), false).flags.contains(&Flag::Escalated), "{text:?}");
    }
    let json = json_policy();
    let safe = r#"{"violation": 0, "policy_category": null, "rule_ids": ["HT0.a"], "confidence": "high", "rationale": "Critique.", "action": "allow"}"#;
    for text in [format!("{safe}\nNo escalation needed."), safe.replace("\"allow\"", "\"do not escalate\"")] {
        let verdict = judge(&json, None, Some(&text), false);
        assert_eq!(verdict.outcome, Outcome::Allow, "{text:?}: {verdict:?}");
    }
}

#[test]
fn labels_answers_table() {
    let policy = labels_policy();
    let cases: &[(&str, Option<bool>, Outcome)] = &[
        ("INVALID", Some(true), Outcome::Violation),
        ("VALID", Some(false), Outcome::Allow),
        ("valid", Some(false), Outcome::Allow),
        ("**INVALID**.", Some(true), Outcome::Violation),
        ("Invalid", Some(true), Outcome::Violation),
        ("INVALID + ESCALATE", Some(true), Outcome::NeedsReview),
        ("invalid+escalate", Some(true), Outcome::NeedsReview),
        ("Label: VALID", Some(false), Outcome::Allow),
        ("The post is INVALID under SP2.a.", Some(true), Outcome::Violation),
        ("VALID or INVALID?", None, Outcome::NeedsReview),
        ("unsure", None, Outcome::NeedsReview),
    ];
    for (text, violation, outcome) in cases {
        let verdict = judge(&policy, None, Some(text), false);
        assert_eq!(verdict.violation, *violation, "{text:?}: {verdict:?}");
        assert_eq!(verdict.outcome, *outcome, "{text:?}: {verdict:?}");
    }
    let escalated = judge(&policy, None, Some("INVALID + ESCALATE"), false);
    assert!(escalated.flags.contains(&Flag::Escalated));
    assert_eq!(escalated.label.as_deref(), Some("INVALID + ESCALATE"));
}

/// An answer that says two things, or says one thing and negates it, is never read as the safe one.
#[test]
fn answers_that_say_two_things_are_never_an_allow() {
    let binary = binary_policy();
    let review = |policy: &Policy, text: &str| {
        let verdict = judge(policy, None, Some(text), false);
        assert_eq!(verdict.outcome, Outcome::NeedsReview, "{text:?}: {verdict:?}");
        verdict
    };
    // Words around a fenced answer still count.
    let fenced = review(&binary, "```\n0\n```\nOn reflection the link is a phishing lure, so 1.");
    assert!(has_unparseable(&fenced) && fenced.violation.is_none(), "{fenced:?}");
    let escalated = review(&binary, "```\n0\n```\nESCALATE");
    assert!(escalated.flags.contains(&Flag::Escalated), "{escalated:?}");
    let explained = judge(&binary, None, Some("```\n0\n```\nA personal question (SP0.a)."), false);
    assert_eq!(explained.outcome, Outcome::Allow, "prose without another answer: {explained:?}");
    // A digit around the fence that is no clear answer still makes the answer unclear.
    let second = review(&binary, "```\n0\n```\nOn second thought, 1 is right because it asks for the password.");
    assert!(has_unparseable(&second) && second.violation.is_none(), "{second:?}");
    for harmless in ["```\n0\n```\nThanks.", "Here is my answer:\n```\n0\n```"] {
        assert_eq!(judge(&binary, None, Some(harmless), false).outcome, Outcome::Allow, "{harmless:?}");
    }
    let labels = labels_policy();
    for text in ["```\nVALID\n```\nActually it is not VALID.", "```\nVALID\n```\nVALID or INVALID, hard to say."] {
        let verdict = review(&labels, text);
        assert!(has_unparseable(&verdict) && verdict.violation.is_none(), "{text:?}: {verdict:?}");
    }
    for harmless in ["```\nVALID\n```\nThanks.", "Here is my answer:\n```\nVALID\n```"] {
        assert_eq!(judge(&labels, None, Some(harmless), false).outcome, Outcome::Allow, "{harmless:?}");
    }
    // A keyed answer outranks a legend before it, not a second answer after it.
    assert!(has_unparseable(&review(&binary, "Answer: 0. On reflection it is phishing, so 1.")));
    assert_eq!(judge(&binary, None, Some("Answer: 0 (1 = violation, 0 = safe)"), false).outcome, Outcome::Allow);
    // JSON objects inside a short answer: one that says nothing clear is not outvoted by another.
    assert!(has_unparseable(&review(&binary, r#"{"violation": "unclear"} {"violation": 0}"#)));
    assert!(has_unparseable(&review(&binary, r#"{"violation": 0} {"violation": 1}"#)));
    let json = json_policy();
    let full = r#"{"violation": 0, "policy_category": null, "rule_ids": [], "confidence": "high", "rationale": "x"}"#;
    assert!(has_unparseable(&review(&json, &format!(r#"{{"violation": "unclear"}} {full}"#))));
    // JSON answers: the words outside the object count, and so does every copy of a key.
    let safe = r#"{"violation": 0, "policy_category": null, "rule_ids": ["HT0.a"], "confidence": "high", "rationale": "Critique."}"#;
    let corrected = review(&json, &format!("{safe}\nCorrection: this dehumanizes the group, so 1 (HT2.a)."));
    assert!(has_unparseable(&corrected) && corrected.violation.is_none(), "{corrected:?}");
    let escalated = review(&json, &format!("```json\n{safe}\n``` ESCALATE"));
    assert!(escalated.flags.contains(&Flag::Escalated), "{escalated:?}");
    assert!(has_unparseable(&review(&json, &format!("Answer: 1\n{safe}"))));
    let twice = safe.replace(r#""violation": 0"#, r#""violation": 1, "violation": 0"#);
    assert!(has_unparseable(&review(&json, &twice)), "{twice}");
    assert!(has_unparseable(&review(&json, &format!(r#"{{"result": {twice}}}"#))));
    assert!(has_unparseable(&review(&binary, r#"{"violation": 1, "violation": 0}"#)));
    // A wrapper given twice hides an answer just the same.
    let unsafe_ = safe.replace(r#""violation": 0"#, r#""violation": 1"#);
    let wrapped = format!(r#"{{"result": {unsafe_}, "result": {safe}}}"#);
    assert!(has_unparseable(&review(&json, &wrapped)), "{wrapped}");
    assert!(has_unparseable(&review(&binary, r#"{"result": {"violation": 1}, "result": {"violation": 0}}"#)));
    let cited_twice = safe.replace(r#""rule_ids": ["HT0.a"]"#, r#""rule_ids": ["HT2.a"], "rule_ids": ["HT0.a"]"#);
    assert!(has_unparseable(&review(&json, &cited_twice)), "{cited_twice}");
    let unread = safe.replace(r#""violation": 0"#, r#""violation": 0, "note": "a", "note": "b""#);
    assert_eq!(judge(&json, None, Some(&unread), false).outcome, Outcome::Allow, "{unread}");
    for harmless in [
        format!("Here is my answer:\n{safe}"),
        format!("```json\n{safe}\n```"),
        format!("{safe}\nThanks."),
        format!("Answer: 0\n{safe}"),
        safe.replace(r#""violation": 0"#, r#""violation": 0, "violation": 0"#),
    ] {
        assert_eq!(judge(&json, None, Some(&harmless), false).outcome, Outcome::Allow, "{harmless}");
    }
    // A JSON object inside a short answer and the prose beside it must agree.
    let prose = review(&binary, "{\"violation\": 0}\nOn reflection it is phishing, so 1.");
    assert!(has_unparseable(&prose) && prose.violation.is_none(), "{prose:?}");
    assert_eq!(
        judge(&binary, None, Some("{\"violation\": 1}\nIt is phishing, so 1."), false).outcome,
        Outcome::Violation
    );
    // A negated label is no label.
    let labels = labels_policy();
    let beside = review(&labels, r#"{"violation": 1} VALID"#);
    assert!(has_unparseable(&beside) && beside.violation.is_none(), "{beside:?}");
    assert_eq!(judge(&labels, None, Some(r#"{"violation": 1} INVALID"#), false).outcome, Outcome::Violation);
    for text in ["Not VALID.", "It is not INVALID.", "The post isn't VALID"] {
        assert!(has_unparseable(&review(&labels, text)), "{text:?}");
    }
    // Rules cited in a short answer must exist, as in a JSON one.
    let cited = review(&binary, "1 (SP9.z)");
    assert_eq!(cited.flags, vec![Flag::HallucinatedRule { rule_id: "SP9.z".into() }]);
    let known = judge(&binary, None, Some("1 (SP2.a)"), false);
    assert_eq!((known.outcome, known.rule_ids.clone()), (Outcome::Violation, vec!["SP2.a".to_string()]));
    assert_eq!(judge(&labels, None, Some("INVALID (SP2.a)"), false).outcome, Outcome::Violation);
}

/// A label and the rules it cites must be on the same side of the policy's line: "0" citing a violating rule,
/// or "1" citing only rules listed as not violating, goes to a person.
#[test]
fn an_answer_citing_rules_of_the_other_side_goes_to_a_person() {
    let binary = binary_policy();
    let inconsistent = |verdict: &Verdict| verdict.flags.iter().any(|f| matches!(f, Flag::Inconsistent { .. }));
    for answer in ["0 (SP2.a)", "0 (SP0.a, SP4.a)", "0 (SP2)"] {
        let verdict = judge(&binary, None, Some(answer), false);
        assert_eq!(verdict.outcome, Outcome::NeedsReview, "{answer}");
        assert!(inconsistent(&verdict), "{answer}: {:?}", verdict.flags);
    }
    let verdict = judge(&binary, None, Some("1 (SP0.a)"), false);
    assert!(inconsistent(&verdict) && verdict.outcome == Outcome::NeedsReview, "{:?}", verdict.flags);
    for (answer, outcome) in
        [("0 (SP0.a)", Outcome::Allow), ("1 (SP2.a)", Outcome::Violation), ("1 (SP2.a, SP0.a)", Outcome::Violation)]
    {
        let verdict = judge(&binary, None, Some(answer), false);
        assert_eq!((verdict.outcome, verdict.flags.clone()), (outcome, vec![]), "{answer}");
    }
    // JSON: "rule_ids" names the rules violated.
    let spam = starter("spam");
    let json = r#"{"violation": 0, "rule_ids": ["SP2.b"], "rationale": "promotion, but mild"}"#;
    let verdict = judge(&spam, None, Some(json), false);
    assert!(inconsistent(&verdict), "{:?}", verdict.flags);
    // A rule named to say it does not apply is no citation.
    assert_eq!(judge(&binary, None, Some("0 - SP0.a, not SP4.a"), false).outcome, Outcome::Allow);
    // The JSON path: "rule_ids" of a JSON policy.
    let hate = starter("hate");
    let violating = hate.rule_ids.iter().find(|id| hate.rule_side(id) == Some(safeguard_policy::RuleSide::Violates));
    let json = format!(
        r#"{{"violation": 0, "policy_category": null, "rule_ids": ["{}"], "confidence": "high", "rationale": "x"}}"#,
        violating.unwrap()
    );
    assert!(inconsistent(&judge(&hate, None, Some(&json), false)), "{json}");
    // The category is a citation too: a tier listed under VIOLATES does not back a "safe" answer, nor a tier of
    // exceptions a violation.
    let category =
        r#"{"violation": 0, "policy_category": "HT3", "rule_ids": [], "confidence": "high", "rationale": "x"}"#;
    let verdict = judge(&hate, None, Some(category), false);
    assert!(inconsistent(&verdict) && verdict.outcome == Outcome::NeedsReview, "{verdict:?}");
    let exception = category.replace(r#""violation": 0"#, r#""violation": 1"#).replace("HT3", "HT0");
    let verdict = judge(&hate, None, Some(&exception), false);
    assert!(inconsistent(&verdict) && verdict.outcome == Outcome::NeedsReview, "{verdict:?}");
    let consistent = category.replace(r#""violation": 0"#, r#""violation": 1"#);
    assert_eq!(judge(&hate, None, Some(&consistent), false).outcome, Outcome::Violation);
    // A policy whose headings do not say which side a rule is on is not second-guessed.
    let labels = labels_policy();
    assert_eq!(judge(&labels, None, Some("VALID (SP2.a)"), false).outcome, Outcome::Allow);
}

/// A last sentence that lands on both sides backs a violation, never an allow.
#[test]
fn contested_reasoning_never_backs_an_allow() {
    let policy = binary_policy();
    let analysis = "The sender pushes a coupon. So it's a violation of SP2.a, not a scam.";
    let conclusion = reasoning_conclusion(analysis, &OutputFormat::Binary).unwrap();
    assert_eq!(conclusion.contested_by.as_deref(), Some("it's a violation"), "{conclusion:?}");
    let allowed = judge(&policy, Some(analysis), Some("0"), false);
    assert!(
        matches!(allowed.flags.as_slice(), [Flag::ReasoningDisagrees { .. }])
            && allowed.outcome == Outcome::NeedsReview,
        "{allowed:?}"
    );
    assert_eq!(judge(&policy, Some(analysis), Some("1 (SP2.a)"), false).outcome, Outcome::Violation);
    // The sentence before a safe conclusion contests it when it says this content violates, unless the last
    // sentence turns, or the one before only weighs a possibility or restates the policy.
    let contest = |text: &str| reasoning_conclusion(text, &OutputFormat::Binary).map(|c| (c.violation, c.contested_by));
    assert_eq!(
        contest("The link is odd. It's phishing. Not spam per se."),
        Some((false, Some("It's phishing".into())))
    );
    assert_eq!(judge(&policy, Some("It's phishing. Not spam per se."), Some("0"), false).outcome, Outcome::NeedsReview);
    assert!(contest("It's clearly spam, so violation: 0.").is_some_and(|(_, by)| by.is_some()));
    assert!(contest("It's phishing. Still, it's not spam.").is_some_and(|(_, by)| by.is_some()));
    for both_sides in [
        "It is a scam no one should fall for. Not phishing though.",
        "It's phishing: it asks for a bank login that could be stolen. Not spam per se.",
        "It's phishing and may steal passwords. Not spam.",
        "This message is phishing. It is not spam.",
        "We should label it as spam. It is not phishing.",
    ] {
        assert!(contest(both_sides).is_some_and(|(_, by)| by.is_some()), "{both_sides}");
    }
    assert_eq!(contest("It's not phishing, but it is spam nonetheless.").map(|(v, _)| v), Some(true));
    for settled in [
        "I first thought it's spam. On closer inspection it's not spam.",
        "The user complains that this post violates their privacy. The content is not a violation of the policy.",
        "We shouldn't answer 1. It's not spam.",
        "The message is a phishing warning from the bank security team. It is not phishing.",
        "This is a spam complaint. It is not spam.",
        "It looks like spam. No, it's not spam; the user subscribed.",
        "It looks like spam at first. But it's not spam.",
        "Someone might think this is spam. It is not spam.",
        "The policy says phishing is a violation. This is not phishing.",
        "Is this spam? It is not spam.",
        "It is not spam.",
    ] {
        assert_eq!(contest(settled), Some((false, None)), "{settled}");
    }
    // A stated answer settles its sentence: "not a scam, so the label is 0" is not contested.
    let stated = reasoning_conclusion("It is a violation? No: not a scam, so the label is 0.", &OutputFormat::Binary);
    assert_eq!(stated.map(|c| (c.violation, c.contested_by)), Some((false, None)));
}

#[test]
fn json_answers_table() {
    let policy = json_policy();
    let full = r#"{"violation": 1, "policy_category": "HT2", "rule_ids": ["HT2.a"], "confidence": "high", "rationale": "Compares a group to vermin."}"#;
    let cases: Vec<(String, Option<bool>, Outcome)> = vec![
        (full.to_string(), Some(true), Outcome::Violation),
        (format!("```json\n{full}\n```"), Some(true), Outcome::Violation),
        (format!("Here is my answer:\n{full}\nThanks."), Some(true), Outcome::Violation),
        (full.replace("\"violation\": 1", "\"violation\": true"), Some(true), Outcome::Violation),
        (full.replace("\"violation\": 1", "\"violation\": \"yes\""), Some(true), Outcome::Violation),
        (full.replace("}", ", \"extra\": {\"a\": [1, 2]}}"), Some(true), Outcome::Violation),
        (full.replace("\"Compares a group to vermin.\"", "\"x\",\n"), Some(true), Outcome::Violation),
        (
            r#"{"violation": 0, "policy_category": null, "rule_ids": ["HT0.a"], "confidence": "high", "rationale": "Critique."}"#.to_string(),
            Some(false),
            Outcome::Allow,
        ),
        (
            r#"{"violation": false, "policy_category": null, "rule_ids": [], "confidence": "medium", "rationale": "Fine."}"#.to_string(),
            Some(false),
            Outcome::Allow,
        ),
        (r#"{"result": {"violation": 0, "policy_category": null, "rule_ids": [], "confidence": "high", "rationale": "ok"}}"#.to_string(), Some(false), Outcome::Allow),
        (r#"{"violation": 2, "rule_ids": []}"#.to_string(), None, Outcome::NeedsReview),
        (r#"{"violation": null}"#.to_string(), None, Outcome::NeedsReview),
        (r#"{"policy_category": "HT2"}"#.to_string(), None, Outcome::NeedsReview),
        ("not json at all".to_string(), None, Outcome::NeedsReview),
        ("1".to_string(), Some(true), Outcome::NeedsReview),
        (format!("{full}\n{}", full.replace("\"violation\": 1", "\"violation\": 0")), None, Outcome::NeedsReview),
        // Cut off mid-object: the value is readable, but the answer is incomplete.
        ("{\"violation\": 1, \"rule_ids\": [\"HT2.a\"".to_string(), Some(true), Outcome::NeedsReview),
    ];
    for (text, violation, outcome) in &cases {
        let verdict = judge(&policy, None, Some(text), false);
        assert_eq!(verdict.violation, *violation, "{text:?}: {verdict:?}");
        assert_eq!(verdict.outcome, *outcome, "{text:?}: {verdict:?}");
    }
    let escalated = judge(&policy, None, Some("ESCALATE"), false);
    assert!(escalated.flags.contains(&Flag::Escalated) && has_unparseable(&escalated), "{escalated:?}");
    let verdict = judge(&policy, None, Some(full), false);
    assert_eq!(verdict.category.as_deref(), Some("HT2"));
    assert_eq!(verdict.rule_ids, vec!["HT2.a"]);
    assert_eq!(verdict.confidence.as_deref(), Some("high"));
    assert_eq!(verdict.rationale.as_deref(), Some("Compares a group to vermin."));
    assert!(verdict.flags.is_empty());
    assert_eq!(verdict.policy_hash, policy.hash.to_string());
}

#[test]
fn json_required_fields_follow_the_policy() {
    let policy = json_policy();
    let verdict =
        judge(&policy, None, Some(r#"{"violation": 1, "policy_category": "HT2", "rule_ids": ["HT2.a"]}"#), false);
    let missing: Vec<_> = verdict
        .flags
        .iter()
        .filter_map(|flag| match flag {
            Flag::MissingField { field } => Some(field.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(missing, vec!["confidence", "rationale"]);
    assert_eq!(verdict.outcome, Outcome::NeedsReview);

    // A policy that only asks for violation and category is satisfied by just those.
    let minimal =
        Policy::parse("# M\nReturn {\"violation\": 0 or 1, \"policy_category\": \"M1\"}\n- M1 bad\n").unwrap();
    let verdict = judge(&minimal, None, Some(r#"{"violation": 1, "policy_category": "M1"}"#), false);
    assert_eq!(verdict.outcome, Outcome::Violation, "{verdict:?}");
}

#[test]
fn hallucinated_rules_go_to_review() {
    let policy = json_policy();
    let answer = r#"{"violation": 1, "policy_category": "HT2", "rule_ids": ["HT2.a", "HT9.z"], "confidence": "high", "rationale": "x"}"#;
    let verdict = judge(&policy, None, Some(answer), false);
    assert_eq!(verdict.flags, vec![Flag::HallucinatedRule { rule_id: "HT9.z".into() }]);
    assert_eq!(verdict.outcome, Outcome::NeedsReview);
    // A tier prefix of a defined rule is fine.
    let tier = answer.replace(", \"HT9.z\"", ", \"HT3\"");
    assert_eq!(judge(&policy, None, Some(&tier), false).outcome, Outcome::Violation);
    // An unknown category that looks like a rule id is a hallucination too.
    let category = answer.replace(", \"HT9.z\"", "").replace("\"HT2\"", "\"HT7\"");
    let verdict = judge(&policy, None, Some(&category), false);
    assert_eq!(verdict.flags, vec![Flag::HallucinatedRule { rule_id: "HT7".into() }]);
    // A safe answer citing a nonexistent rule is not "clearly safe".
    let safe =
        r#"{"violation": 0, "policy_category": null, "rule_ids": ["XX1"], "confidence": "high", "rationale": "x"}"#;
    assert_eq!(judge(&policy, None, Some(safe), false).outcome, Outcome::NeedsReview);
}

#[test]
fn missing_or_truncated_final_is_never_allow() {
    let policy = binary_policy();
    for final_text in [None, Some(""), Some("  \n")] {
        let verdict = judge(&policy, Some("The content is safe, so 0."), final_text, false);
        assert_eq!(verdict.outcome, Outcome::NeedsReview);
        assert_eq!(verdict.flags, vec![Flag::NoFinalMessage]);
        assert_eq!(verdict.violation, None);
    }
    let verdict = judge(&policy, Some("thinking..."), None, true);
    assert_eq!(verdict.flags, vec![Flag::NoFinalMessage, Flag::Truncated]);
    let verdict = judge(&policy, None, Some("0"), true);
    assert_eq!(verdict.violation, Some(false));
    assert_eq!(verdict.outcome, Outcome::NeedsReview);
    assert!(verdict.flags.contains(&Flag::Truncated));
}

#[test]
fn reasoning_disagreement_is_flagged() {
    let policy = binary_policy();
    let cases: &[(&str, &str, bool)] = &[
        ("The message impersonates a bank to get a password. So it's a violation.", "0", true),
        ("The message impersonates a bank to get a password. So it's a violation.", "1", false),
        ("This is a question about plumbers. It does not violate the policy.", "1", true),
        ("This is a question about plumbers. It does not violate the policy.", "0", false),
        ("Could be spam? It mentions a link. But it's a support request, not spam.", "1", true),
        ("We need to output 0 or 1. The content is cold promotion with a link: SP2.b. Answer: 1", "1", false),
        ("We need to output 0 or 1. The content is cold promotion with a link. Answer: 1", "0", true),
        ("It is a friendly note. Label 0.", "1", true),
        ("Hmm. The user asks about weather.", "1", false),
        ("Thus => 1.", "0", true),
        // "return 0 if benign" restates the instructions; the conclusion is the sentence before it.
        ("The sender fakes a bank login page, so it's phishing. Reminder: return 0 if benign, otherwise 1.", "0", true),
        // "for phishing like this" names this content's class: a conclusion, not a restated format.
        ("The link fakes a bank login. Output 1 for phishing like this.", "0", true),
        ("The link fakes a bank login. Output 0 for benign posts, 1 for spam.", "0", false),
    ];
    for (analysis, answer, disagrees) in cases {
        let verdict = judge(&policy, Some(analysis), Some(answer), false);
        let flagged = verdict.flags.iter().any(|flag| matches!(flag, Flag::ReasoningDisagrees { .. }));
        assert_eq!(flagged, *disagrees, "{analysis:?} / {answer}: {verdict:?}");
        if *disagrees {
            assert_eq!(verdict.outcome, Outcome::NeedsReview);
        }
    }
}

#[test]
fn reasoning_conclusions() {
    let binary = OutputFormat::Binary;
    let check = |text: &str, output: &OutputFormat| reasoning_conclusion(text, output).map(|c| c.violation);
    assert_eq!(check("so it's a violation", &binary), Some(true));
    assert_eq!(check("It is not a violation.", &binary), Some(false));
    assert_eq!(check("This is not spam.", &binary), Some(false));
    assert_eq!(check("This is spam.", &binary), Some(true));
    assert_eq!(check("It doesn't violate anything.", &binary), Some(false));
    assert_eq!(check("The content violates SP2.a.", &binary), Some(true));
    assert_eq!(check("Rationale: the content violates nothing here.", &binary), None);
    assert_eq!(check("This violates no rule, so the label is 0.", &binary), Some(false));
    assert_eq!(check("The answer should be 1.", &binary), Some(true));
    assert_eq!(check("Not spam. So output 0.", &binary), Some(false));
    assert_eq!(check("So violation: 1, policy_category HT2.", &OutputFormat::Json), Some(true));
    assert_eq!(check("It's a critique, HT0.a. So violation 0.", &OutputFormat::Json), Some(false));
    assert_eq!(check("answer: 1", &binary), Some(true));
    assert_eq!(check("We must answer 0 or 1.", &binary), None);
    assert_eq!(check("Reminder: return 0 if benign, otherwise 1.", &binary), None);
    assert_eq!(check("Output 1 when the post pushes coupons.", &binary), None);
    assert_eq!(check("Output 0 for benign posts.", &binary), None);
    assert_eq!(check("So the label is 1 for SP2.a.", &binary), Some(true));
    assert_eq!(check("Output 1 for phishing like this.", &binary), Some(true));
    assert_eq!(check("Output 0 for benign posts, 1 for spam.", &binary), None);
    assert_eq!(check("Output 1 for any violating content.", &binary), None);
    assert_eq!(check("The content is benign.", &binary), Some(false));
    assert_eq!(check("{\"violation\": 0, ...} is what we output", &OutputFormat::Json), Some(false));
    assert_eq!(check("Nothing conclusive here", &binary), None);
    let labels = OutputFormat::Labels {
        violating: vec!["INVALID".into()],
        safe: vec!["VALID".into()],
        escalate: vec!["INVALID + ESCALATE".into()],
    };
    assert_eq!(check("So => INVALID", &labels), Some(true));
    assert_eq!(check("The label should be VALID.", &labels), Some(false));
    assert_eq!(check("Answer VALID for questions, INVALID for spam.", &labels), None);
    assert_eq!(check("So the answer is INVALID for phishing like this.", &labels), Some(true));
    // The answer's key needs its `:` or `=` for a word value; a restated format concludes nothing.
    assert_eq!(check("This is a violation no matter the intent.", &binary), Some(true));
    assert_eq!(check("It's hate speech. Now output JSON with violation 0 or 1.", &OutputFormat::Json), Some(true));
    assert_eq!(check("So violation: no.", &OutputFormat::Json), Some(false));
    // A negation just before a phrase takes it back.
    assert_eq!(check("It's a scam. We can't label it safe.", &binary), Some(true));
    assert_eq!(check("It's a scam. We can\u{2019}t label it safe.", &binary), Some(true));
    // A violation phrase is never taken back so: it is the wrong way to fail.
    assert_eq!(check("I don't think this is a violation.", &binary), Some(true));
    assert_eq!(check("It's not a joke, it's harassment.", &binary), Some(true));
    assert_eq!(check("Intended or not, this is spam.", &binary), Some(true));
    assert_eq!(check("It is neither spam nor phishing.", &binary), Some(false));
    // Only the tail counts: an early "violation" is outweighed by a later conclusion.
    let long = format!("Is this a violation? {} Final: it is not a violation.", "Considering context. ".repeat(60));
    assert_eq!(check(&long, &binary), Some(false));
}

/// A policy stored before blank labels were refused: an answer of only punctuation strips to "", which must not
/// read as its blank safe label.
#[test]
fn a_blank_label_never_matches_an_empty_answer() {
    let mut policy = labels_policy();
    policy.meta.output =
        OutputFormat::Labels { violating: vec!["SPAM".into()], safe: vec![String::new()], escalate: vec![] };
    for answer in ["**", ".", "()", "```\n```", ""] {
        let verdict = judge(&policy, None, Some(answer), false);
        assert_eq!(verdict.outcome, Outcome::NeedsReview, "{answer:?}: {verdict:?}");
        assert_eq!(verdict.violation, None, "{answer:?}");
    }
    assert_eq!(judge(&policy, None, Some("SPAM"), false).outcome, Outcome::Violation);
}

#[test]
fn escalation_paths() {
    let policy = starter("sexual");
    let answer = r#"{"violation": 1, "policy_category": "SX3", "rule_ids": ["SX3.a"], "confidence": "high", "rationale": "Minor.", "severity": "critical", "action": "block"}"#;
    let verdict = judge(&policy, None, Some(answer), false);
    assert!(verdict.flags.contains(&Flag::Escalated), "escalate_on: [SX3] {verdict:?}");
    assert_eq!(verdict.outcome, Outcome::NeedsReview);
    assert_eq!(verdict.severity.as_deref(), Some("critical"));

    let adult = answer.replace("SX3.a", "SX1.b").replace("\"SX3\"", "\"SX1\"");
    assert_eq!(judge(&policy, None, Some(&adult), false).outcome, Outcome::Violation);

    let hate = starter("hate");
    let asked = r#"{"violation": 0, "policy_category": null, "rule_ids": ["HT0.b"], "confidence": "low", "rationale": "Unclear quote.", "severity": "none", "action": "escalate"}"#;
    let verdict = judge(&hate, None, Some(asked), false);
    assert!(verdict.flags.contains(&Flag::Escalated));
    assert!(verdict.flags.contains(&Flag::LowConfidence));
    assert_eq!(verdict.outcome, Outcome::NeedsReview);
}

#[test]
fn confidence_and_consistency() {
    let hate = starter("hate");
    let low_violation = r#"{"violation": 1, "policy_category": "HT2", "rule_ids": ["HT2.a"], "confidence": "low", "rationale": "x", "severity": "medium", "action": "block"}"#;
    assert_eq!(judge(&hate, None, Some(low_violation), false).outcome, Outcome::Violation, "not high-risk");
    let violence = starter("violence");
    let low = low_violation.replace("HT2.a", "VI2.a").replace("\"HT2\"", "\"VI2\"");
    let verdict = judge(&violence, None, Some(&low), false);
    assert_eq!(verdict.flags, vec![Flag::LowConfidence], "high-risk policy");
    let contradiction = low_violation.replace("\"low\"", "\"high\"").replace("\"block\"", "\"allow\"");
    let verdict = judge(&hate, None, Some(&contradiction), false);
    assert!(matches!(verdict.flags.as_slice(), [Flag::Inconsistent { .. }]), "{verdict:?}");
}

#[test]
fn starter_policies_judge_their_own_example_answers() {
    for policy in starter_library() {
        let answer = match policy.meta.output {
            OutputFormat::Binary => "1".to_string(),
            _ => {
                let rule = policy.rule_ids.iter().find(|id| !id.contains('0')).unwrap();
                let tier = rule.split('.').next().unwrap();
                format!(
                    r#"{{"violation": 1, "policy_category": "{tier}", "rule_ids": ["{rule}"], "confidence": "high", "rationale": "r", "severity": "medium", "action": "block"}}"#
                )
            }
        };
        let verdict = judge(&policy, Some("It clearly violates the policy."), Some(&answer), false);
        assert_eq!(verdict.outcome, Outcome::Violation, "{}: {verdict:?}", policy.meta.name);
    }
}

#[test]
fn combined_round_trip() {
    let library = starter_library();
    let policies: Vec<Policy> =
        library.into_iter().filter(|p| ["spam", "hate", "sexual"].contains(&p.meta.name.as_str())).collect();
    let instructions = combined_instructions(&policies);
    for policy in &policies {
        assert!(instructions.contains(&format!("## Policy \"{}\" ({})", policy.meta.name, policy.hash.short())));
    }
    assert!(instructions.contains("### Spam Policy (SP)"), "headings are demoted under the policy heading");
    assert!(instructions.contains("\"spam\", \"hate\", \"sexual\""));
    assert_eq!(
        instructions.matches("Return exactly one JSON object and nothing else, with exactly these keys").count(),
        2
    );

    let final_text = r#"```json
{"spam": {"violation": 1, "policy_category": "SP4", "rule_ids": ["SP4.a"], "confidence": "high", "rationale": "Phishing.", "action": "block"},
 "Hate": {"violation": 0, "policy_category": null, "rule_ids": ["HT0.a"], "confidence": "high", "rationale": "No attack.", "action": "allow"}}
```"#;
    let verdicts = judge_combined(&policies, Some("spam yes, hate no"), Some(final_text), false);
    assert_eq!(verdicts.len(), 3);
    assert_eq!(verdicts[0].policy, "spam");
    assert_eq!(verdicts[0].outcome, Outcome::Violation, "{:?}", verdicts[0]);
    assert_eq!(verdicts[0].rule_ids, vec!["SP4.a"]);
    assert_eq!(verdicts[1].outcome, Outcome::Allow, "key matched case-insensitively: {:?}", verdicts[1]);
    assert_eq!(verdicts[2].outcome, Outcome::NeedsReview);
    assert_eq!(verdicts[2].flags, vec![Flag::MissingField { field: "sexual".into() }]);
    assert_eq!(overall_outcome(&verdicts), Outcome::NeedsReview);

    // Per-policy reasoning check: the last sentence naming only "hate" concludes a violation.
    let analysis = "Spam: a credential lure, so it's spam. For hate, it clearly violates HT2.a. Done.";
    let verdicts = judge_combined(&policies, Some(analysis), Some(final_text), false);
    assert_eq!(verdicts[0].outcome, Outcome::Violation, "{:?}", verdicts[0]);
    assert!(matches!(verdicts[1].flags.as_slice(), [Flag::ReasoningDisagrees { .. }]), "{:?}", verdicts[1]);
    // Policy names are whole words: "homosexual" does not name the sexual policy, so this sentence is about hate.
    let worded = "Calling a homosexual couple vermin is hate, it clearly violates HT2.a.";
    let verdicts = judge_combined(&policies, Some(worded), Some(final_text), false);
    assert!(matches!(verdicts[1].flags.as_slice(), [Flag::ReasoningDisagrees { .. }]), "{:?}", verdicts[1]);
    let mixed = "Spam is a violation but hate is not.";
    let verdicts = judge_combined(&policies, Some(mixed), Some(final_text), false);
    assert_eq!(verdicts[1].outcome, Outcome::Allow, "a sentence naming two policies is not attributed");

    let cross_cited = final_text.replace("[\"HT0.a\"]", "[\"SP0.a\"]");
    let verdicts = judge_combined(&policies, None, Some(&cross_cited), false);
    assert_eq!(verdicts[1].flags, vec![Flag::HallucinatedRule { rule_id: "SP0.a".into() }]);

    let none = judge_combined(&policies, None, None, true);
    assert!(
        none.iter()
            .all(|v| v.outcome == Outcome::NeedsReview && v.flags == vec![Flag::NoFinalMessage, Flag::Truncated])
    );
    // serde keeps the last of two same-named keys: a policy answered twice, or "violation" given twice, is unclear.
    let hate_safe = r#"{"violation": 0, "policy_category": null, "rule_ids": ["HT0.a"], "confidence": "high", "rationale": "No attack.", "action": "allow"}"#;
    let hate_bad = r#"{"violation": 1, "policy_category": "HT2", "rule_ids": ["HT2.a"], "confidence": "high", "rationale": "Vermin.", "action": "block"}"#;
    let repeated = format!(r#"{{"hate": {hate_bad}, "hate": {hate_safe}}}"#);
    let verdicts = judge_combined(&policies, None, Some(&repeated), false);
    assert!(has_unparseable(&verdicts[1]) && verdicts[1].violation.is_none(), "{:?}", verdicts[1]);
    let inner = hate_safe.replace(r#""violation": 0"#, r#""violation": 1, "violation": 0"#);
    let verdicts = judge_combined(&policies, None, Some(&format!(r#"{{"hate": {inner}}}"#)), false);
    assert!(has_unparseable(&verdicts[1]) && verdicts[1].outcome == Outcome::NeedsReview, "{:?}", verdicts[1]);
    // A wrapper given twice hides which answer counts.
    let wrapped = format!(r#"{{"results": {{"hate": {hate_bad}}}, "results": {{"hate": {hate_safe}}}}}"#);
    let verdicts = judge_combined(&policies, None, Some(&wrapped), false);
    assert!(has_unparseable(&verdicts[1]) && verdicts[1].violation.is_none(), "{:?}", verdicts[1]);
    let verdicts = judge_combined(&policies, None, Some(r#"{"results": {"spam": 1}, "results": {"spam": 0}}"#), false);
    assert!(has_unparseable(&verdicts[0]) && verdicts[0].violation.is_none(), "{:?}", verdicts[0]);
    // Prose outside the objects is part of the answer: a 0/1 there makes the policy it names (all, if it names
    // none) unclear, and an ESCALATE there asks for a person.
    let spam_safe = hate_safe.replace("HT0.a", "SP0.a");
    let clean = format!(r#"{{"spam": {spam_safe}, "hate": {hate_safe}}}"#);
    let corrected = judge_combined(&policies, None, Some(&format!("{clean}\nCorrection: spam is 1")), false);
    assert!(has_unparseable(&corrected[0]) && corrected[0].violation.is_none(), "{:?}", corrected[0]);
    assert_eq!(corrected[1].outcome, Outcome::Allow, "{:?}", corrected[1]);
    let unattributed = judge_combined(&policies, None, Some(&format!("{clean}\nOn reflection, 1.")), false);
    assert!(unattributed[..2].iter().all(|v| has_unparseable(v) && v.violation.is_none()), "{unattributed:?}");
    let escalated = judge_combined(&policies, None, Some(&format!("{clean}\nhate: ESCALATE")), false);
    assert!(escalated[1].flags.contains(&Flag::Escalated) && escalated[0].outcome == Outcome::Allow, "{escalated:?}");
    let thanks = judge_combined(&policies, None, Some(&format!("Here you go:\n{clean}\nThanks.")), false);
    assert!(thanks[..2].iter().all(|v| v.outcome == Outcome::Allow), "{thanks:?}");
    let garbage = judge_combined(&policies, None, Some("spam: 1, hate: 0"), false);
    assert!(garbage.iter().all(|v| v.outcome == Outcome::NeedsReview && has_unparseable(v)));
}

#[test]
fn combined_keys_disambiguate_same_name() {
    let a = Policy::parse("# P\nReturn 0 or 1.").unwrap();
    let b = Policy::parse("# P\nReturn 0 or 1!").unwrap();
    let keys = combined_keys(&[a.clone(), b.clone()]);
    assert_eq!(keys, vec![format!("P@{}", a.hash.short()), format!("P@{}", b.hash.short())]);
    let answer = format!(r#"{{"{}": 1, "{}": {{"violation": 0}}}}"#, keys[0], keys[1]);
    let verdicts = judge_combined(&[a, b], None, Some(&answer), false);
    assert_eq!(verdicts[0].violation, Some(true));
    assert_eq!(verdicts[1].violation, Some(false));
    assert!(verdicts.iter().all(|v| v.outcome == Outcome::NeedsReview), "required fields are missing");
}

#[test]
fn overall_outcome_rules() {
    let policy = binary_policy();
    let allow = judge(&policy, None, Some("0"), false);
    let violation = judge(&policy, None, Some("1"), false);
    let review = judge(&policy, None, None, false);
    assert_eq!(overall_outcome(&[]), Outcome::NeedsReview);
    assert_eq!(overall_outcome(std::slice::from_ref(&allow)), Outcome::Allow);
    assert_eq!(overall_outcome(&[allow.clone(), violation.clone()]), Outcome::Violation);
    assert_eq!(overall_outcome(&[violation, review, allow]), Outcome::NeedsReview);
}

#[test]
fn serde_shapes() {
    let verdict = judge(&binary_policy(), None, Some("1 0"), true);
    let json = serde_json::to_value(&verdict).unwrap();
    assert_eq!(json["outcome"], "needs_review");
    assert_eq!(json["flags"][0], serde_json::json!({"kind": "truncated"}));
    assert_eq!(json["flags"][1]["kind"], "unparseable");
    let back: Verdict = serde_json::from_value(json).unwrap();
    assert_eq!(back, verdict);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn parsers_never_panic(text in "\\PC{0,300}", analysis in "\\PC{0,300}") {
        let policies = [binary_policy(), labels_policy(), json_policy()];
        for policy in &policies {
            let verdict = judge(policy, Some(&analysis), Some(&text), false);
            prop_assert!(verdict.outcome != Outcome::Allow || verdict.flags.is_empty());
        }
        let _ = judge_combined(&policies, Some(&analysis), Some(&text), false);
    }

    #[test]
    fn json_like_text_never_panics(text in "[{}\\[\\]\",:0-9a-z \\n]{0,200}") {
        let verdict = judge(&json_policy(), None, Some(&text), false);
        prop_assert!(verdict.outcome != Outcome::Allow || verdict.violation == Some(false));
    }

    #[test]
    fn allow_requires_a_clear_zero(text in "\\PC{0,60}") {
        let verdict = judge(&binary_policy(), None, Some(&text), false);
        if verdict.outcome == Outcome::Allow {
            prop_assert_eq!(verdict.violation, Some(false));
            prop_assert!(verdict.flags.is_empty());
        }
    }
}

#[test]
fn flag_kind_is_the_serialized_tag() {
    let all = [
        Flag::NoFinalMessage,
        Flag::Truncated,
        Flag::Unparseable { detail: "x".into() },
        Flag::HallucinatedRule { rule_id: "X1".into() },
        Flag::ReasoningDisagrees { detail: "x".into() },
        Flag::MissingField { field: "x".into() },
        Flag::Escalated,
        Flag::LowConfidence,
        Flag::Inconsistent { detail: "x".into() },
    ];
    for flag in all {
        assert_eq!(serde_json::to_value(&flag).unwrap()["kind"], flag.kind(), "{flag:?}");
    }
}

fn spam_and_hate() -> Vec<Policy> {
    starter_library().into_iter().filter(|p| ["spam", "hate"].contains(&p.meta.name.as_str())).collect()
}

const SPAM_SAFE: &str = r#"{"violation": 0, "policy_category": null, "rule_ids": ["SP0.a"], "confidence": "high", "rationale": "A question.", "action": "allow"}"#;
const HATE_SAFE: &str = r#"{"violation": 0, "policy_category": null, "rule_ids": ["HT0.a"], "confidence": "high", "rationale": "No attack.", "action": "allow"}"#;
const HATE_BAD: &str = r#"{"violation": 1, "policy_category": "HT2", "rule_ids": ["HT2.a"], "confidence": "high", "rationale": "Vermin.", "action": "block"}"#;

fn inconsistent(verdict: &Verdict) -> bool {
    verdict.flags.iter().any(|flag| matches!(flag, Flag::Inconsistent { .. }))
}

/// A policy answered under two spellings of its key is answered twice: neither spelling outranks the other.
#[test]
fn combined_answer_under_two_spellings_of_a_key_is_unclear() {
    let policies = spam_and_hate();
    let twice = format!(r#"{{"spam": {SPAM_SAFE}, "hate": {HATE_SAFE}, "Hate": {HATE_BAD}}}"#);
    let verdicts = judge_combined(&policies, None, Some(&twice), false);
    assert_eq!(verdicts[0].outcome, Outcome::Allow, "{:?}", verdicts[0]);
    assert!(verdicts[1].outcome == Outcome::NeedsReview && has_unparseable(&verdicts[1]), "{:?}", verdicts[1]);
    // Neither spelling matching exactly: still both are read.
    let neither = format!(r#"{{"spam": {SPAM_SAFE}, "HATE": {HATE_SAFE}, "Hate": {HATE_BAD}}}"#);
    let verdicts = judge_combined(&policies, None, Some(&neither), false);
    assert!(has_unparseable(&verdicts[1]) && verdicts[1].violation.is_none(), "{:?}", verdicts[1]);
    // The same answer under two spellings says one thing.
    let same = format!(r#"{{"spam": {SPAM_SAFE}, "hate": {HATE_SAFE}, "Hate": {HATE_SAFE}}}"#);
    let verdicts = judge_combined(&policies, None, Some(&same), false);
    assert!(verdicts.iter().all(|v| v.outcome == Outcome::Allow), "{verdicts:?}");
    // Policies whose names differ only in case get keys apart, so one answer cannot fill both.
    let upper = Policy::parse("---\nname: Hate\n---\n# H\nReturn 0 or 1.").unwrap();
    let lower = Policy::parse("---\nname: hate\n---\n# H\nReturn 0 or 1!").unwrap();
    let keys = combined_keys(&[upper.clone(), lower.clone()]);
    assert_eq!(keys, vec![format!("Hate@{}", upper.hash.short()), format!("hate@{}", lower.hash.short())]);
    let verdicts = judge_combined(&[upper, lower], None, Some(r#"{"hate": {"violation": 0}}"#), false);
    assert!(verdicts.iter().all(|v| v.violation.is_none() && v.outcome == Outcome::NeedsReview), "{verdicts:?}");
}

/// A closing sentence that names a policy but concludes nothing does not hide the conclusion before it.
#[test]
fn combined_reasoning_check_reads_the_last_concluding_sentence() {
    let policies = spam_and_hate();
    let clean = format!(r#"{{"spam": {SPAM_SAFE}, "hate": {HATE_SAFE}}}"#);
    let analysis = "Spam: a question, not spam. Hate: the content clearly violates HT2.a. Hate check done.";
    let verdicts = judge_combined(&policies, Some(analysis), Some(&clean), false);
    assert!(matches!(verdicts[1].flags.as_slice(), [Flag::ReasoningDisagrees { .. }]), "{:?}", verdicts[1]);
    assert_eq!(verdicts[0].outcome, Outcome::Allow, "{:?}", verdicts[0]);
    // The last concluding sentence agreeing with the answer is a clean answer.
    let agreeing = "Hate: maybe it violates HT2.a? Hate: it's a critique, not a violation. Hate check done.";
    let verdicts = judge_combined(&policies, Some(agreeing), Some(&clean), false);
    assert_eq!(verdicts[1].outcome, Outcome::Allow, "{:?}", verdicts[1]);
    // A question weighs a side and concludes nothing, however far back the walk goes.
    let asked = "Spam: not spam. Hate: the content violates HT2.a? Hate: a critique of a government. Hate done.";
    let verdicts = judge_combined(&policies, Some(asked), Some(&clean), false);
    assert_eq!(verdicts[1].outcome, Outcome::Allow, "{:?}", verdicts[1]);
}

/// Rule ids written into the category or the rationale are citations too.
#[test]
fn rule_ids_in_category_and_rationale_are_checked() {
    let hate = starter("hate");
    let category = r#"{"violation": 0, "policy_category": "HT3 (threats)", "rule_ids": [], "confidence": "high", "rationale": "x"}"#;
    let verdict = judge(&hate, None, Some(category), false);
    assert!(verdict.outcome == Outcome::NeedsReview && inconsistent(&verdict), "{verdict:?}");
    let base = r#"{"violation": 0, "policy_category": null, "rule_ids": [], "confidence": "high", "rationale": "R"}"#;
    // A rationale is prose: the ids it names are checked for existence, not for the side of the line, since safe
    // answers name the violating rules they are not (and some wording of that always slips past a negation list).
    let jest = judge(&hate, None, Some(&base.replace("\"R\"", "\"Threat per HT3.a, in jest\"")), false);
    assert_eq!(jest.outcome, Outcome::Allow, "{jest:?}");
    let made_up = judge(&hate, None, Some(&base.replace("\"R\"", "\"Critique, see HT9.z\"")), false);
    assert!(made_up.flags.contains(&Flag::HallucinatedRule { rule_id: "HT9.z".into() }), "{made_up:?}");
    // escalate_on reaches a tier named inside a longer category.
    let sexual = starter("sexual");
    let minors = r#"{"violation": 1, "policy_category": "SX3 - minors", "rule_ids": [], "confidence": "high", "rationale": "A minor.", "severity": "critical", "action": "block"}"#;
    let verdict = judge(&sexual, None, Some(minors), false);
    assert!(verdict.flags.contains(&Flag::Escalated), "{verdict:?}");
    // A safe answer naming the violating rules it rules out is clean.
    for rationale in [
        "Critique of a religion (HT0.a), not HT3.a.",
        "Harsh, but does not meet HT2 or HT3.",
        "Criticism of a government (HT0.a); it contains no slurs (HT1.a) or calls for violence (HT3.a).",
        "HT3.a does not apply: the threat is quoted to condemn it (HT0.b).",
        "Reporting (HT0.b) rather than HT3.a praise, with no HT2.a dehumanization.",
        "Mentions WW2 and COVID19 history, a critique (HT0.a).",
        "Criticism of a religion's teaching (HT0.a); HT1.a and HT2.a do not apply.",
        "The article quotes the attackers' slogan (HT3.b) to expose them (HT0.b).",
        "Hyperbole about a sports rival (HT0.a); HT3.a would require a real threat.",
        "Quotes the HT2000 forum's name while criticising it (HT0.a).",
    ] {
        let answer = base.replace("\"R\"", &format!("{rationale:?}"));
        let verdict = judge(&hate, None, Some(&answer), false);
        assert_eq!(verdict.outcome, Outcome::Allow, "{rationale}: {verdict:?}");
    }
    // A tier the policy declares only as a category is known, inside a longer category too.
    let misc = Policy::parse(
        "---\nname: misc\noutput: json\ncategories: [M1]\n---\n# Misc\nReturn {\"violation\": 0 or 1}\n\
         ## VIOLATES (1)\n- MX1.a Bad.\n## DOES NOT VIOLATE (0)\n- MX0.a Fine.\n",
    )
    .unwrap();
    let answer = r#"{"violation": 1, "policy_category": "M1 (misc)", "rule_ids": ["MX1.a"]}"#;
    assert_eq!(judge(&misc, None, Some(answer), false).outcome, Outcome::Violation);
    let violating = r#"{"violation": 1, "policy_category": "HT2 (dehumanization)", "rule_ids": ["HT2.a"], "confidence": "high", "rationale": "Calls a group vermin (HT2.a), not mere critique (HT0.a).", "severity": "medium", "action": "block"}"#;
    assert_eq!(judge(&hate, None, Some(violating), false).outcome, Outcome::Violation);
}

/// "human review" asks for a person as "escalate" does, and severity must fit the answer and the policy.
#[test]
fn action_synonyms_and_severity_are_checked() {
    let hate = starter("hate");
    let asked = r#"{"violation": 0, "policy_category": null, "rule_ids": [], "confidence": "high", "rationale": "x", "severity": "high", "action": "human review"}"#;
    assert_eq!(judge(&hate, None, Some(asked), false).outcome, Outcome::NeedsReview);
    let safe = r#"{"violation": 0, "policy_category": null, "rule_ids": ["HT0.a"], "confidence": "high", "rationale": "x", "severity": "none", "action": "A"}"#;
    for action in ["human review", "Manual-Review", "needs_review", "send to a human", "Escalate", "flag for review"] {
        let verdict = judge(&hate, None, Some(&safe.replace("\"A\"", &format!("{action:?}"))), false);
        assert!(verdict.flags.contains(&Flag::Escalated), "{action}: {verdict:?}");
    }
    for action in ["allow", "no review needed", "allow, no human review", "none"] {
        let verdict = judge(&hate, None, Some(&safe.replace("\"A\"", &format!("{action:?}"))), false);
        assert_eq!(verdict.outcome, Outcome::Allow, "{action}: {verdict:?}");
    }
    let allow = safe.replace("\"A\"", "\"allow\"");
    for severity in ["\"high\"", "\"low\"", "\"medium\""] {
        let verdict = judge(&hate, None, Some(&allow.replace("\"none\"", severity)), false);
        assert!(verdict.outcome == Outcome::NeedsReview && inconsistent(&verdict), "{severity}: {verdict:?}");
    }
    for severity in ["\"none\"", "null", "\"None\"", "\"n/a\"", "\"\""] {
        let verdict = judge(&hate, None, Some(&allow.replace("\"none\"", severity)), false);
        assert_eq!(verdict.outcome, Outcome::Allow, "{severity}: {verdict:?}");
    }
    let bad = r#"{"violation": 1, "policy_category": "HT2", "rule_ids": ["HT2.a"], "confidence": "high", "rationale": "x", "severity": "S", "action": "block"}"#;
    for (severity, outcome) in [
        ("High", Outcome::Violation),
        ("medium", Outcome::Violation),
        ("none", Outcome::NeedsReview),
        ("catastrophic", Outcome::NeedsReview),
    ] {
        let verdict = judge(&hate, None, Some(&bad.replace("\"S\"", &format!("{severity:?}"))), false);
        assert_eq!(verdict.outcome, outcome, "{severity}: {verdict:?}");
    }
}

/// Confidence is read as words or numbers; anything that is not clearly high or medium is low.
#[test]
fn low_confidence_in_any_spelling() {
    let hate = starter("hate");
    let safe = r#"{"violation": 0, "policy_category": null, "rule_ids": ["HT0.a"], "confidence": C, "rationale": "x", "severity": "none", "action": "allow"}"#;
    for low in [
        "0.1",
        "\"0.1\"",
        "\"very low\"",
        "\"low.\"",
        "\"medium-low\"",
        "\"Low\"",
        "1.5",
        "-0.2",
        "\"NaN\"",
        "\"30%\"",
        "\"unsure\"",
        "85",
    ] {
        let verdict = judge(&hate, None, Some(&safe.replace('C', low)), false);
        assert!(verdict.flags.contains(&Flag::LowConfidence), "{low}: {verdict:?}");
    }
    for fine in
        ["\"high\"", "\"medium\"", "\"High.\"", "\"medium-high\"", "0.9", "1", "\"0.75\"", "\"90%\"", "\"very high\""]
    {
        let verdict = judge(&hate, None, Some(&safe.replace('C', fine)), false);
        assert_eq!(verdict.outcome, Outcome::Allow, "{fine}: {verdict:?}");
    }
}

/// Words beside a combined answer count as they do beside a single one.
#[test]
fn combined_words_beside_the_answer_count() {
    let policies = spam_and_hate();
    let clean = format!(r#"{{"spam": {SPAM_SAFE}, "hate": {HATE_SAFE}}}"#);
    let verdicts = judge_combined(&policies, None, Some(&format!("{clean}\nViolation.")), false);
    assert!(verdicts.iter().all(|v| has_unparseable(v) && v.violation.is_none()), "{verdicts:?}");
    let verdicts = judge_combined(&policies, None, Some(&format!("{clean}\nhate: unsafe")), false);
    assert!(has_unparseable(&verdicts[1]) && verdicts[1].violation.is_none(), "{:?}", verdicts[1]);
    assert_eq!(verdicts[0].outcome, Outcome::Allow, "{:?}", verdicts[0]);
    // A rule id beside the word does not hide it.
    let verdicts = judge_combined(&policies, None, Some(&format!("{clean}\nhate: violation (HT2.a)")), false);
    assert!(has_unparseable(&verdicts[1]) && verdicts[1].violation.is_none(), "{:?}", verdicts[1]);
    // An agreeing word, or none, changes nothing.
    for tail in ["\nSafe.", "\nBoth safe.", "\nDone.", "\nhate: safe (HT0.a)"] {
        let verdicts = judge_combined(&policies, None, Some(&format!("{clean}{tail}")), false);
        assert!(verdicts.iter().all(|v| v.outcome == Outcome::Allow), "{tail:?}: {verdicts:?}");
    }
    // A labels policy's own labels are answers too.
    let labels =
        Policy::parse("---\nname: links\n---\n# Links\nAnswer VALID or INVALID.\n- LK1.a Bad links.\n").unwrap();
    let both = vec![labels, starter("hate")];
    let answer = format!(
        r#"{{"links": {{"violation": 0, "policy_category": null, "rule_ids": [], "confidence": "high", "rationale": "x"}}, "hate": {HATE_SAFE}}}"#
    );
    let verdicts = judge_combined(&both, None, Some(&format!("{answer}\nlinks: INVALID")), false);
    assert!(has_unparseable(&verdicts[0]) && verdicts[0].violation.is_none(), "{:?}", verdicts[0]);
    assert_eq!(verdicts[1].outcome, Outcome::Allow, "{:?}", verdicts[1]);
}

/// An earlier entry that says nothing clear, or asks for a person, is not outvoted by a later one.
#[test]
fn earlier_unclear_or_escalating_entries_count() {
    let policies = spam_and_hate();
    let clean = format!(r#"{{"spam": {SPAM_SAFE}, "hate": {HATE_SAFE}}}"#);
    let text = format!("{{\"hate\": {{\"violation\": \"unsure\"}}}}\n{clean}");
    let verdicts = judge_combined(&policies, None, Some(&text), false);
    assert!(has_unparseable(&verdicts[1]) && verdicts[1].outcome == Outcome::NeedsReview, "{:?}", verdicts[1]);
    let escalating = HATE_SAFE.replace("\"allow\"", "\"escalate\"");
    let text = format!("{{\"hate\": {escalating}}}\n{clean}");
    let verdicts = judge_combined(&policies, None, Some(&text), false);
    assert!(verdicts[1].flags.contains(&Flag::Escalated), "{:?}", verdicts[1]);
    // Single mode: an escalating earlier object still asks for a person.
    let hate = starter("hate");
    let verdict = judge(&hate, None, Some(&format!("{escalating}\n{HATE_SAFE}")), false);
    assert!(verdict.flags.contains(&Flag::Escalated), "{verdict:?}");
}

/// "1:" followed by a reason is a second answer; followed by what the digit means it is a legend.
#[test]
fn a_correction_written_as_a_legend_is_a_second_answer() {
    let binary = binary_policy();
    for text in ["Answer: 0. On reflection, 1: the link is phishing.", "so 0. Actually 1: phishing"] {
        let verdict = judge(&binary, None, Some(text), false);
        assert!(verdict.outcome == Outcome::NeedsReview && has_unparseable(&verdict), "{text}: {verdict:?}");
    }
    for (text, outcome) in [
        ("Answer: 0 (0: safe, 1: violation)", Outcome::Allow),
        ("Answer: 1 (1 = violates)", Outcome::Violation),
        ("0\n0 = Content does NOT violate this policy.\n1 = Content violates this policy.", Outcome::Allow),
        ("Answer: 0 (1 = the content violates, 0 = it does not)", Outcome::Allow),
        ("Answer: 0 (0 = not spam, 1 = spam)", Outcome::Allow),
        ("Answer: 0 (1 = policy violation)", Outcome::Allow),
        ("0 = safe, 1 = violation", Outcome::NeedsReview),
        // A time is no digit of an answer.
        ("Answer: 0 — they ask to meet at 1:30.", Outcome::Allow),
    ] {
        assert_eq!(judge(&binary, None, Some(text), false).outcome, outcome, "{text}");
    }
}

/// An answer that also says the other side is never read as one side: a word after a leading digit or label, a
/// fence's first word, a second or nested "violation", a "label" that contradicts it. What agrees still reads as
/// one answer.
#[test]
fn answers_that_also_say_the_other_side_need_review() {
    let (binary, labels, json) = (binary_policy(), labels_policy(), json_policy());
    let safe = r#"{"violation": 0, "policy_category": null, "rule_ids": ["HT0.a"], "confidence": "high", "rationale": "Critique."}"#;
    let with = |extra: &str| safe.replacen('{', &format!("{{{extra}, "), 1);
    let two_sided: Vec<(&Policy, String)> = vec![
        (&binary, "0\nUnsafe.".into()),
        (&binary, "0 Violation.".into()),
        (&binary, "1\nSafe.".into()),
        (&binary, "```1\n0```".into()),
        (&binary, "```violation\n0\n```".into()),
        (&labels, "VALID\nViolation.".into()),
        (&labels, "```INVALID\nVALID```".into()),
        (&json, with(r#""details": {"violation": 1}"#)),
        (&json, with(r#""details": {"reason": {"violation": true}}"#)),
        (&json, with(r#""rules": [{"id": "HT2.a", "violation": 1}]"#)),
        (&json, with(r#""Violation": 1"#)),
        (&json, with(r#""label": "UNSAFE""#)),
        (&json, format!(r#"{{"result": {safe}, "Violation": 1}}"#)),
        // JSON in a binary policy's answer is held to the same.
        (&binary, r#"{"violation": 0, "Violation": 1}"#.into()),
        (&binary, r#"{"violation": 0, "label": "UNSAFE"}"#.into()),
        (&labels, r#"{"violation": 0, "details": [{"violation": 1}]}"#.into()),
        (&binary, "Safe. Answer: 1".into()),
        (&binary, "0\n\nViolation? Yes.".into()),
        (&binary, "Is the content safe? Yes.\n0".into()),
        (&labels, "VALID\nDoes it sell followers? Yes.".into()),
        (&binary, "0\nAny issue? Unsafe.".into()),
        (&binary, "Safe: 1".into()),
        (&binary, "Unsafe: 0".into()),
        (&binary, "Allowed: 0".into()),
        (&binary, "Unsafe, 0".into()),
        (&json, with(r#""rules": [{"id": "HT2.a", "violation": "likely"}]"#)),
        (&json, with(r#""details": {"violation": 0.7}"#)),
    ];
    for (policy, text) in &two_sided {
        let verdict = judge(policy, None, Some(text), false);
        assert_eq!(verdict.outcome, Outcome::NeedsReview, "{text:?}: {verdict:?}");
    }
    let one_sided: Vec<(&Policy, String, Outcome)> = vec![
        (&binary, "0\nSafe.".into(), Outcome::Allow),
        (&binary, "1\nViolation.".into(), Outcome::Violation),
        (&binary, "```text\n0\n```".into(), Outcome::Allow),
        (&labels, "VALID\nSafe.".into(), Outcome::Allow),
        (&json, with(r#""label": "safe""#), Outcome::Allow),
        (&json, with(r#""details": {"violation": 0}"#), Outcome::Allow),
        (&json, with(r#""analysis": {"violation": "not applicable"}"#), Outcome::Allow),
        (&json, with(r#""meta": {"Violation": false}, "evidence": {"violation_type": null}"#), Outcome::Allow),
        // A key is part of its answer, and a question with its reply says nothing against it.
        (&binary, "Violation: 0".into(), Outcome::Allow),
        (&binary, "**Violation:** 0".into(), Outcome::Allow),
        (&binary, "Violates: 1".into(), Outcome::Violation),
        (&binary, "Label: 0 (does not violate)".into(), Outcome::Allow),
        (&binary, "0\n\nViolation? No.".into(), Outcome::Allow),
        (&binary, "Safe? Yes.\n0".into(), Outcome::Allow),
        (&json, with(r#""details": {"violation": null, "note": "n/a"}"#), Outcome::Allow),
        (&binary, "0\n\nNo violation found.".into(), Outcome::Allow),
        (&binary, "0 - No.".into(), Outcome::Allow),
        (&binary, "1 (SP2.a) Yes.".into(), Outcome::Violation),
        (&binary, "Answer: 0\nReason: safe".into(), Outcome::Allow),
        (&labels, "VALID\nUnsafe? No.".into(), Outcome::Allow),
        (&labels, "VALID\nThe post is safe.".into(), Outcome::Allow),
    ];
    for (policy, text, outcome) in &one_sided {
        let verdict = judge(policy, None, Some(text), false);
        assert_eq!(verdict.outcome, *outcome, "{text:?}: {verdict:?}");
    }
    // A breakdown under a violating answer changes nothing.
    let breakdown = safe
        .replace("\"violation\": 0", "\"violation\": 1")
        .replace("\"policy_category\": null", "\"policy_category\": \"HT2\"")
        .replace("[\"HT0.a\"]", "[\"HT2.a\"]")
        .replacen('{', r#"{"per_rule": {"HT2.a": {"violation": 1}, "HT3.a": {"violation": 0}}, "#, 1);
    assert_eq!(judge(&json, None, Some(&breakdown), false).outcome, Outcome::Violation, "{breakdown}");
}

/// An id anywhere in the category is a citation, every rule-id key counts, and an action that treats the content
/// the other way from the label is inconsistent, however it is worded.
#[test]
fn citations_and_actions_are_read_wherever_they_are_written() {
    let hate = starter("hate");
    let safe = |category: &str, rules: &str, action: &str| {
        format!(
            r#"{{"violation": 0, "policy_category": {category}, {rules}, "confidence": "high", "rationale": "Harsh but allowed.", "severity": "none", "action": "{action}"}}"#
        )
    };
    let allowed = judge(&hate, None, Some(&safe("null", r#""rule_ids": []"#, "allow")), false);
    assert_eq!(allowed.outcome, Outcome::Allow, "{allowed:?}");
    for text in [
        safe(r#""Dehumanization (HT2)""#, r#""rule_ids": []"#, "allow"),
        safe(r#""HT2 (not HT3)""#, r#""rule_ids": []"#, "allow"),
        safe(r#""HT2 - dehumanizing language (no slurs)""#, r#""rule_ids": []"#, "allow"),
        safe("null", r#""rule_ids": [], "rules": ["HT2.a"]"#, "allow"),
        safe("null", r#""rule_ids": []"#, "remove content"),
        safe("null", r#""rule_ids": []"#, "Block."),
        safe("null", r#""rule_ids": []"#, "ban"),
        safe("null", r#""rule_ids": []"#, "hidden"),
    ] {
        let verdict = judge(&hate, None, Some(&text), false);
        assert_eq!(verdict.outcome, Outcome::NeedsReview, "{text}: {verdict:?}");
    }
    for text in [
        safe(r#""none (HT2 not met)""#, r#""rule_ids": []"#, "allow"),
        safe("null", r#""rule_ids": []"#, "do not remove"),
        safe("null", r#""rule_ids": []"#, "do not remove or block"),
        safe("null", r#""rule_ids": []"#, "Allow; removal not needed"),
        safe("null", r#""rule_ids": []"#, "add banner"),
        safe("null", r#""rule_ids": [], "rules": "none""#, "allow"),
    ] {
        let verdict = judge(&hate, None, Some(&text), false);
        assert_eq!(verdict.outcome, Outcome::Allow, "{text}: {verdict:?}");
    }
    let violating = |action: &str| {
        format!(
            r#"{{"violation": 1, "policy_category": "HT2", "rule_ids": ["HT2.a"], "confidence": "high", "rationale": "Vermin.", "severity": "medium", "action": "{action}"}}"#
        )
    };
    assert_eq!(judge(&hate, None, Some(&violating("block")), false).outcome, Outcome::Violation);
    for action in ["no action", "Keep", "none."] {
        let verdict = judge(&hate, None, Some(&violating(action)), false);
        assert_eq!(verdict.outcome, Outcome::NeedsReview, "{action}: {verdict:?}");
    }
    // A tier named inside the category escalates as a leading one does.
    let sexual = starter("sexual");
    let minors = r#"{"violation": 1, "policy_category": "Minors (SX3)", "rule_ids": [], "confidence": "high", "rationale": "r", "severity": "critical", "action": "block"}"#;
    let verdict = judge(&sexual, None, Some(minors), false);
    assert!(verdict.flags.contains(&Flag::Escalated), "{verdict:?}");
    // A negation beside the tier does not drop it.
    let ruled_out = minors.replace("Minors (SX3)", "SX3 (not SX1)");
    let verdict = judge(&sexual, None, Some(&ruled_out), false);
    assert!(verdict.flags.contains(&Flag::Escalated), "{verdict:?}");
}

/// A label negated a few words back ("not considered VALID"), or with a typographic apostrophe ("isn’t VALID"), is
/// no label; a safe label in prose whose sentence turns to a "but" may be about something else than the post.
#[test]
fn a_label_negated_past_filler_words_is_no_label() {
    let labels = labels_policy();
    for text in [
        "This is NOT A VALID post.",
        "The content is not considered VALID.",
        "The post isn\u{2019}t VALID.",
        "The post is not really a VALID one.",
        "The coupon code is VALID, but the post sells followers.",
    ] {
        let verdict = judge(&labels, None, Some(text), false);
        assert!(
            verdict.outcome == Outcome::NeedsReview && has_unparseable(&verdict) && verdict.violation.is_none(),
            "{text:?}: {verdict:?}"
        );
    }
    // A negation in an earlier clause, or a label right after a concluding word, still leaves the label read.
    for (text, outcome) in [
        ("No spam here, so the post is VALID.", Outcome::Allow),
        ("The post is VALID.", Outcome::Allow),
        ("It is not a question but an ad: INVALID.", Outcome::Violation),
        ("The post is INVALID, but polite.", Outcome::Violation),
    ] {
        let verdict = judge(&labels, None, Some(text), false);
        assert_eq!(verdict.outcome, outcome, "{text:?}: {verdict:?}");
    }
    // A rule named a few words after a negation is no citation either.
    assert_eq!(judge(&binary_policy(), None, Some("0 - SP0.a, not a SP4.a case"), false).outcome, Outcome::Allow);
}

/// Prose beside an answer that concludes the other side ("0\nThis is spam.") makes the answer say two things.
#[test]
fn prose_concluding_the_other_side_beside_an_answer_is_unclear() {
    let (binary, labels, json) = (binary_policy(), labels_policy(), json_policy());
    let safe = r#"{"violation": 0, "policy_category": null, "rule_ids": ["HT0.a"], "confidence": "high", "rationale": "Critique."}"#;
    let two_sided: Vec<(&Policy, String)> = vec![
        (&binary, "0\nThis is spam.".into()),
        (&binary, "0. The post clearly violates the policy.".into()),
        (&binary, "0 - the post clearly violates the policy.".into()),
        (&binary, "It is clearly spam, so 0.".into()),
        (&binary, "1\nThis is not spam.".into()),
        (&binary, "```\n0\n```\nThis is spam.".into()),
        (&binary, "{\"violation\": 0}\nThis is phishing.".into()),
        (&labels, "VALID\nThe post is spam.".into()),
        (&labels, "```\nVALID\n```\nThe post is spam.".into()),
        (&labels, "{\"violation\": 0}\nThe post is spam.".into()),
        (&json, format!("{safe}\nThis is hate speech.")),
        (&json, format!("This content violates the policy.\n{safe}")),
    ];
    for (policy, text) in &two_sided {
        let verdict = judge(policy, None, Some(text), false);
        assert!(
            verdict.outcome == Outcome::NeedsReview && has_unparseable(&verdict) && verdict.violation.is_none(),
            "{text:?}: {verdict:?}"
        );
    }
    let one_sided: Vec<(&Policy, String, Outcome)> = vec![
        (&binary, "0 \u{2014} the post does not violate the policy".into(), Outcome::Allow),
        (&binary, "0\nNot spam, just a question.".into(), Outcome::Allow),
        (&binary, "1\nThis is spam.".into(), Outcome::Violation),
        (&binary, "It is clearly spam, so 1.".into(), Outcome::Violation),
        (&binary, "1\nIt's phishing, not spam per se.".into(), Outcome::Violation),
        (&binary, "```\n0\n```\nIt is not spam.".into(), Outcome::Allow),
        (&binary, "Answer: 0 (1 = the content violates, 0 = it does not)".into(), Outcome::Allow),
        (&labels, "VALID\nThe post is not spam.".into(), Outcome::Allow),
        (&labels, "Not spam, so VALID.".into(), Outcome::Allow),
        (&json, format!("{safe}\nIt is critique, not hate speech."), Outcome::Allow),
        (&json, format!("{safe}\nThe content does not violate the policy."), Outcome::Allow),
    ];
    for (policy, text, outcome) in &one_sided {
        let verdict = judge(policy, None, Some(text), false);
        assert_eq!(verdict.outcome, *outcome, "{text:?}: {verdict:?}");
    }
}

/// A JSON answer's "label" is read with the policy's own labels: `"label": "INVALID"` beside `"violation": 0`
/// says two things under a VALID/INVALID policy, as `"label": "SPAM"` does under a SPAM/HAM one.
#[test]
fn a_json_label_is_read_with_the_policys_own_labels() {
    let labels = labels_policy();
    let custom = Policy::parse(
        "---\nname: links\noutput: labels\nlabels:\n  violating: [SPAM]\n  safe: [HAM]\n---\n# Links\nSay SPAM or HAM.\n",
    )
    .unwrap();
    for (policy, text) in [
        (&labels, r#"{"violation": 0, "label": "INVALID"}"#),
        (&labels, r#"{"violation": 1, "label": "VALID"}"#),
        (&custom, r#"{"violation": 0, "label": "SPAM"}"#),
        (&custom, r#"{"violation": 1, "label": "ham"}"#),
        (&binary_policy(), r#"{"violation": 0, "label": "INVALID"}"#),
    ] {
        let verdict = judge(policy, None, Some(text), false);
        assert!(
            verdict.outcome == Outcome::NeedsReview && has_unparseable(&verdict) && verdict.violation.is_none(),
            "{text:?}: {verdict:?}"
        );
    }
    for (policy, text, outcome) in [
        (&labels, r#"{"violation": 0, "label": "VALID"}"#, Outcome::Allow),
        (&labels, r#"{"violation": 1, "label": "INVALID"}"#, Outcome::Violation),
        (&custom, r#"{"violation": 0, "label": "HAM"}"#, Outcome::Allow),
        (&custom, r#"{"violation": 1, "label": "SPAM"}"#, Outcome::Violation),
    ] {
        let verdict = judge(policy, None, Some(text), false);
        assert_eq!(verdict.outcome, outcome, "{text:?}: {verdict:?}");
    }
    // A combined answer's entry for a labels policy is read with that policy's labels too.
    let both = vec![custom, starter("hate")];
    let answer = format!(
        r#"{{"links": {{"violation": 0, "label": "SPAM", "policy_category": null, "rule_ids": [], "confidence": "high", "rationale": "x"}}, "hate": {HATE_SAFE}}}"#
    );
    let verdicts = judge_combined(&both, None, Some(&answer), false);
    assert!(has_unparseable(&verdicts[0]) && verdicts[0].outcome == Outcome::NeedsReview, "{:?}", verdicts[0]);
    assert_eq!(verdicts[1].outcome, Outcome::Allow, "{:?}", verdicts[1]);
}

/// Rule ids written beside a JSON answer are citations, checked as a short answer's are.
#[test]
fn rule_ids_written_outside_a_json_answer_are_checked() {
    let json = json_policy();
    let cited = r#"{"violation": 1, "policy_category": "HT2", "rule_ids": ["HT2.a"], "confidence": "high", "rationale": "x"} Also HT9.z."#;
    let verdict = judge(&json, None, Some(cited), false);
    assert!(verdict.flags.contains(&Flag::HallucinatedRule { rule_id: "HT9.z".into() }), "{verdict:?}");
    assert_eq!(verdict.outcome, Outcome::NeedsReview);
    let hate = starter("hate");
    let violating = hate
        .rule_ids
        .iter()
        .find(|id| id.contains('.') && hate.rule_side(id) == Some(safeguard_policy::RuleSide::Violates))
        .unwrap();
    let safe = r#"{"violation": 0, "policy_category": null, "rule_ids": [], "confidence": "high", "rationale": "x"}"#;
    let verdict = judge(&hate, None, Some(&format!("{safe} ({violating})")), false);
    assert!(inconsistent(&verdict) && verdict.outcome == Outcome::NeedsReview, "{verdict:?}");
    // As in a short answer, a rule named to say it does not apply is no citation.
    let verdict = judge(&hate, None, Some(&format!("{safe} Not {violating}.")), false);
    assert_eq!(verdict.outcome, Outcome::Allow, "{verdict:?}");
}

/// Prose beside a combined answer that concludes the other side makes the verdicts it is about unclear, as it does
/// beside a single answer. A sentence is about the one policy it names; one that names none, or several, may be
/// about any of them, so every verdict it contradicts goes to a person.
#[test]
fn prose_concluding_the_other_side_beside_a_combined_answer_is_unclear() {
    let policies = spam_and_hate();
    let spam_bad = r#"{"violation": 1, "policy_category": "SP4", "rule_ids": ["SP4.a"], "confidence": "high", "rationale": "Phishing.", "action": "block"}"#;
    let clean = format!(r#"{{"spam": {SPAM_SAFE}, "hate": {HATE_SAFE}}}"#);
    let hateful = format!(r#"{{"spam": {SPAM_SAFE}, "hate": {HATE_BAD}}}"#);
    let spammy = format!(r#"{{"spam": {spam_bad}, "hate": {HATE_SAFE}}}"#);
    let unclear = |verdict: &Verdict| {
        verdict.outcome == Outcome::NeedsReview && has_unparseable(verdict) && verdict.violation.is_none()
    };
    // (answer, which verdicts the prose contradicts); the others keep their clean outcome.
    let two_sided: Vec<(String, [bool; 2])> = vec![
        (format!("{clean} This is hate speech."), [false, true]),
        (format!("{clean}\nHate: it is hate speech."), [false, true]),
        (format!("{clean}\nThis is spam."), [true, false]),
        (format!("{clean}\nThe content clearly violates the policy."), [true, true]),
        (format!("This content violates the policy.\n{clean}"), [true, true]),
        (format!("{clean}\nIt's phishing. Not spam per se."), [true, true]),
        // Naming both policies attributes it to neither.
        (format!("{clean}\nIt's hate speech, not spam."), [true, true]),
        (format!("{hateful}\nThis is spam."), [true, false]),
        // A safe conclusion never stands beside a 1, attributed or not; one on both sides backs the 1.
        (format!("{hateful}\nIt is not hate speech."), [false, true]),
        (format!("{hateful}\nThe content does not violate the policy."), [false, true]),
        (format!("```json\n{hateful}\n```\nThe post is fine."), [false, true]),
    ];
    for (text, affected) in &two_sided {
        let verdicts = judge_combined(&policies, None, Some(text), false);
        for (verdict, affected) in verdicts.iter().zip(affected) {
            if *affected {
                assert!(unclear(verdict), "{text:?}: {verdict:?}");
            } else {
                assert!(!has_unparseable(verdict) && verdict.outcome != Outcome::NeedsReview, "{text:?}: {verdict:?}");
            }
        }
    }
    // The brief's own shape: entries without the other fields still lose the hate answer to the prose.
    let bare = r#"{"spam": {"violation": 0}, "hate": {"violation": 0}} This is hate speech."#;
    let verdicts = judge_combined(&policies, None, Some(bare), false);
    assert!(unclear(&verdicts[1]), "{:?}", verdicts[1]);
    assert!(!has_unparseable(&verdicts[0]), "{:?}", verdicts[0]);
    // Prose that concludes nothing, or agrees with what it is about, changes nothing.
    let agreeing: Vec<(String, [Outcome; 2])> = vec![
        (format!("{clean}\nNeither policy is violated."), [Outcome::Allow, Outcome::Allow]),
        (format!("{clean}\nBoth are fine."), [Outcome::Allow, Outcome::Allow]),
        (format!("{clean}\nNeither spam nor hate."), [Outcome::Allow, Outcome::Allow]),
        (format!("{clean}\nIt is not spam, and not hate speech either."), [Outcome::Allow, Outcome::Allow]),
        (format!("{clean}\nHate: it is a critique, not hate speech."), [Outcome::Allow, Outcome::Allow]),
        (format!("{clean}\nThe content does not violate the policy."), [Outcome::Allow, Outcome::Allow]),
        (format!("{hateful}\nThis is hate speech."), [Outcome::Allow, Outcome::Violation]),
        // Both sides back the 1, but naming both policies pins the "hate speech" on neither: spam goes to a person.
        (format!("{hateful}\nIt's hate speech, not spam."), [Outcome::NeedsReview, Outcome::Violation]),
        (format!("{spammy}\nThis is spam."), [Outcome::Violation, Outcome::Allow]),
        (format!("{spammy}\nIt's phishing, not spam per se."), [Outcome::Violation, Outcome::Allow]),
    ];
    for (text, outcomes) in &agreeing {
        let verdicts = judge_combined(&policies, None, Some(text), false);
        let got: Vec<Outcome> = verdicts.iter().map(|verdict| verdict.outcome).collect();
        assert_eq!(got, outcomes.to_vec(), "{text:?}: {verdicts:?}");
    }
}
